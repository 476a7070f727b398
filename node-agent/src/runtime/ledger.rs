//! The instance ledger of one process module: every process the supervisor
//! started and has not yet seen exit, written to disk *before* the fork.
//!
//! The agent records the instance that serves a module in `state.json` only
//! once a swap is over. An agent killed in between (the new version started
//! and gating, or the old one being stopped) would leave a process nobody
//! supervises, still accepting on the module's listener. Each process
//! therefore gets a random marker in its environment (`HOTSWAP_INSTANCE`),
//! and the marker goes into the ledger before the process exists; its pid
//! follows right after the fork. The next supervisor of the module stops
//! every ledger process that is not the one it adopts, found by pid and start
//! time, or, for an entry the agent had no time to complete, by its marker in
//! `/proc/<pid>/environ`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::os;

/// Environment variable carrying an instance's marker.
pub const MARKER_VAR: &str = "HOTSWAP_INSTANCE";

/// One process the supervisor started.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub marker: String,
    pub version: String,
    /// Unknown between the write before the fork and the one after it.
    pub pid: Option<u32>,
    pub start_ticks: Option<u64>,
    /// How to stop it if it is found left behind.
    pub stop_signal: i32,
    pub stop_timeout_ms: u64,
}

impl Entry {
    /// Whether this entry stands for the process `pid` started at `start_ticks`.
    fn is(&self, pid: u32, start_ticks: u64) -> bool {
        self.pid == Some(pid) && self.start_ticks == Some(start_ticks)
    }

    /// The live process this entry stands for, if any.
    fn live_pid(&self) -> Option<u32> {
        match (self.pid, self.start_ticks) {
            (Some(pid), Some(ticks)) => os::is_same_process(pid, ticks).then_some(pid),
            // Forked (perhaps) but never recorded: look for the marker.
            _ => find_by_marker(&self.marker),
        }
    }
}

/// A fresh random marker.
pub fn new_marker() -> String {
    format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// The ledger file of one module, loaded.
pub struct Ledger {
    path: PathBuf,
    entries: Vec<Entry>,
}

impl Ledger {
    /// Read the ledger at `path`; a missing file is an empty ledger and an
    /// unreadable one is logged and treated as empty (it only ever lists
    /// processes to stop, so losing it loses no desired state).
    pub fn load(path: &Path) -> Self {
        let entries = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "instance ledger unreadable; ignoring it");
                Vec::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the instance ledger");
                Vec::new()
            }
        };
        Self {
            path: path.to_path_buf(),
            entries,
        }
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Record `entry` durably (before its fork, or with its pid after it).
    pub fn record(&mut self, entry: Entry) -> std::io::Result<()> {
        self.entries.retain(|e| e.marker != entry.marker);
        self.entries.push(entry);
        self.save()
    }

    /// Drop entries of processes that are gone, and write the rest.
    pub fn save(&mut self) -> std::io::Result<()> {
        self.entries.retain(|e| match (e.pid, e.start_ticks) {
            (Some(pid), Some(ticks)) => os::is_same_process(pid, ticks),
            _ => true,
        });
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let bytes = serde_json::to_vec(&self.entries).map_err(std::io::Error::other)?;
        hotswap_common::fsutil::write_atomic(
            &self.path,
            &bytes,
            hotswap_common::fsutil::PRIVATE_FILE_MODE,
        )
    }

    /// The processes of this ledger still alive apart from `keep` (the
    /// instance being adopted, by pid and start time): what a previous agent
    /// left behind.
    pub fn strays(&self, keep: Option<(u32, u64)>) -> Vec<(Entry, u32)> {
        self.entries
            .iter()
            .filter(|e| keep.is_none_or(|(pid, ticks)| !e.is(pid, ticks)))
            .filter_map(|e| {
                let pid = e.live_pid()?;
                // The adoptee found through its marker is no stray either.
                if keep.is_some_and(|(p, _)| p == pid) {
                    return None;
                }
                Some((e.clone(), pid))
            })
            .collect()
    }

    /// Forget every entry but `keep`'s.
    pub fn retain_only(&mut self, keep: Option<(u32, u64)>) {
        self.entries
            .retain(|e| keep.is_some_and(|(pid, ticks)| e.is(pid, ticks)));
    }
}

/// The pid of a live process whose environment carries `marker`.
fn find_by_marker(marker: &str) -> Option<u32> {
    let needle = format!("{MARKER_VAR}={marker}");
    let needle = needle.as_bytes();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle))
        })
}

/// Stop a process this agent does not supervise: its stop signal, then
/// SIGKILL after its stop timeout. Returns how it ended.
pub async fn stop_stray(entry: &Entry, pid: u32) -> String {
    let Ok(pidfd) = os::pidfd_open(pid) else {
        return "already gone".to_string();
    };
    let exited = os::watch_pidfd_exit(&pidfd);
    let wait = |limit: Duration| {
        let exited = exited.clone();
        async move {
            tokio::time::timeout(limit, os::wait_exited(exited))
                .await
                .is_ok()
        }
    };
    let _ = os::pidfd_signal(&pidfd, entry.stop_signal);
    if wait(Duration::from_millis(entry.stop_timeout_ms)).await {
        return "stopped".to_string();
    }
    let _ = os::pidfd_signal(&pidfd, libc::SIGKILL);
    if wait(Duration::from_secs(10)).await {
        "killed after its stop timeout".to_string()
    } else {
        "did not exit after SIGKILL".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(marker: &str, pid: Option<u32>, ticks: Option<u64>) -> Entry {
        Entry {
            marker: marker.into(),
            version: "1.0.0".into(),
            pid,
            start_ticks: ticks,
            stop_signal: libc::SIGTERM,
            stop_timeout_ms: 1000,
        }
    }

    #[test]
    fn round_trips_and_prunes_exited_processes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("instances/web.json");
        let me = std::process::id();
        let my_ticks = os::process_start_ticks(me).unwrap();
        let mut ledger = Ledger::load(&path);
        assert!(ledger.entries().is_empty());
        ledger.record(entry("a", None, None)).unwrap();
        ledger.record(entry("a", Some(me), Some(my_ticks))).unwrap();
        // A pid that is not alive with that start time is pruned on save.
        ledger
            .record(entry("gone", Some(me), Some(my_ticks + 1)))
            .unwrap();
        let loaded = Ledger::load(&path);
        assert_eq!(loaded.entries(), &[entry("a", Some(me), Some(my_ticks))]);
        // The process being kept is no stray; anything else alive is.
        assert!(loaded.strays(Some((me, my_ticks))).is_empty());
        assert_eq!(loaded.strays(None).len(), 1);
    }

    #[test]
    fn an_unreadable_ledger_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("web.json");
        std::fs::write(&path, b"{not json").unwrap();
        assert!(Ledger::load(&path).entries().is_empty());
    }

    #[test]
    fn an_entry_without_pid_is_found_by_its_marker() {
        let marker = new_marker();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .env(MARKER_VAR, &marker)
            .spawn()
            .unwrap();
        // Until the child has exec'd, /proc shows the parent's environment
        // (without the marker): on a loaded machine that takes a while.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let found = loop {
            let found = crate::runtime::ledger::find_by_marker(&marker);
            if found.is_some() || std::time::Instant::now() > deadline {
                break found;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(found, Some(child.id()));
        assert_eq!(find_by_marker(&new_marker()), None);
    }
}
