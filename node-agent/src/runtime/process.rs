//! The process runtime: one supervisor task per process module.
//!
//! The supervisor owns the module's listening sockets and hands them to every
//! version it starts by the systemd convention (`LISTEN_FDS`, `LISTEN_PID`,
//! `LISTEN_FDNAMES`, fds from 3), so during a swap the old and the new version
//! accept from the same kernel queue and no connection is refused or reset.
//!
//! - `start-first`: start the new version, wait until it is healthy within
//!   `start_timeout`, then stop the old one (`stop_signal`, then SIGKILL after
//!   `stop_timeout`). `stop-first` stops the old one first, and starts it again
//!   if the new one does not come up.
//! - Unexpected exits restart with exponential backoff; three within a minute
//!   is a crash loop, reported unhealthy.
//! - Module processes run in their own session and outlive the agent: when
//!   the agent stops or is killed they keep serving, and the next agent
//!   re-adopts them (pid plus start time, via pidfd) and takes their
//!   listening sockets back with `pidfd_getfd`.
//! - Every process started is in the module's instance ledger before it is
//!   forked (see [`ledger`]), so a process left behind by an agent killed
//!   mid-swap is stopped by the next one instead of serving unsupervised.
//! - An activation can be preempted: when the caller's token is cancelled
//!   while the new version is inside its health gate, the candidate is
//!   stopped at once and the version that served before keeps (or resumes)
//!   serving. Preemption only ends waiting (probes, sleeps); every other
//!   step (start, ledger write, stop) runs to its end, so the ledger and the
//!   published instance always name the processes that exist.
//! - The status names every version other than the current one that still
//!   has a live process (`settling`): a candidate inside its gate, an old
//!   version being stopped, a process a previous agent left behind.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hotswap_common::manifest::{HealthSpec, SwapStrategy};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::ledger::{self, Ledger};
use super::listeners::{ListenerBook, conflict_message};
use super::os::{self, wait_exited, watch_pidfd_exit};
use super::{ActivateError, Phase, base_env, is_node_trouble, resolve_program};
use crate::health::{Health, HealthTracker, probe_once};
use crate::scrape::{MetricNames, Sample, Window, scrape, window};

/// A listening socket of one version, its address resolved on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenSocket {
    pub name: String,
    pub listen: std::net::SocketAddr,
}

/// Everything needed to run one version, with variables already expanded.
#[derive(Clone, Debug)]
pub struct VersionSpec {
    pub version: String,
    pub dir: PathBuf,
    pub command: Vec<String>,
    /// Manifest env (expanded) plus the HOTSWAP_* variables.
    pub env: Vec<(String, String)>,
    pub swap: SwapStrategy,
    pub stop_signal: i32,
    pub stop_timeout: Duration,
    pub sockets: Vec<ListenSocket>,
    pub health: Option<(hotswap_common::manifest::HealthCheck, HealthSpec)>,
    pub metrics: Option<(String, MetricNames)>,
}

/// What the agent persists to re-adopt a running instance after a restart.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceRecord {
    pub version: String,
    pub pid: u32,
    pub start_ticks: u64,
}

/// The supervisor's view, published on every change.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessStatus {
    pub version: Option<String>,
    pub phase: Phase,
    pub health: Health,
    pub message: String,
    pub restarts: u32,
    pub crash_loop: bool,
    pub instance: Option<InstanceRecord>,
    pub metrics: Option<Window>,
    /// Versions other than `version` with a live process: starting inside
    /// their health gate, being stopped, or left behind by a previous agent.
    pub settling: Vec<String>,
}

enum Request {
    Activate(
        Box<VersionSpec>,
        CancellationToken,
        oneshot::Sender<Result<(), ActivateError>>,
    ),
    Stop(oneshot::Sender<()>),
}

/// The supervisor task ended (the agent is shutting down).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("supervisor is gone")]
pub struct SupervisorGone;

/// Why a version did not become ready after it started.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
enum StartError {
    #[error("exited during start ({0})")]
    Exited(String),
    #[error("not healthy within {}s: {last_error}", within.as_secs_f64())]
    NotHealthy {
        within: Duration,
        last_error: String,
    },
}

/// Handle to a module's supervisor task.
pub struct Supervisor {
    requests: mpsc::Sender<Request>,
    status: watch::Receiver<ProcessStatus>,
}

/// Crashes within this window count towards a crash loop.
const CRASH_WINDOW: Duration = Duration::from_secs(60);
const CRASH_LOOP_THRESHOLD: usize = 3;
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Without a health check, a new version counts as started once it has stayed up this long.
const SETTLE_WITHOUT_HEALTH: Duration = Duration::from_secs(1);
/// How often metrics are scraped for analysis.
const SCRAPE_INTERVAL: Duration = Duration::from_secs(5);
/// Module output beyond this is rotated to `<name>.log.1`.
const LOG_CAP_BYTES: u64 = 8 * 1024 * 1024;

impl Supervisor {
    /// Start supervising module `name`. With `adopt`, first try to take over
    /// an instance a previous agent started.
    pub fn spawn(
        name: &str,
        book: ListenerBook,
        log_path: PathBuf,
        ledger_path: PathBuf,
        adopt: Option<(InstanceRecord, VersionSpec)>,
        shutdown: CancellationToken,
    ) -> Self {
        let (requests, rx) = mpsc::channel(8);
        let (status_tx, status) = watch::channel(ProcessStatus {
            phase: Phase::Stopped,
            ..Default::default()
        });
        let task = Task {
            module: name.to_string(),
            book,
            log_path,
            ledger: Ledger::load(&ledger_path),
            listeners: Vec::new(),
            current: None,
            status: status_tx,
            crashes: VecDeque::new(),
            restart_at: None,
            tracker: None,
            last_sample: None,
            pending_spec: None,
            settling: Vec::new(),
        };
        // A root: the task outlives whatever span spawned it (a swap), and
        // a child would keep that span open for as long as the module runs.
        let span = tracing::info_span!(parent: None, "supervisor", module = %name);
        tokio::spawn(tracing::Instrument::instrument(
            task.run(rx, adopt, shutdown),
            span,
        ));
        Self { requests, status }
    }

    /// Make `spec` the running version (a swap if another one runs).
    /// Cancelling `preempt` while the new version is inside its health gate
    /// stops it and ends the activation with [`ActivateError::Preempted`].
    pub async fn activate(
        &self,
        spec: VersionSpec,
        preempt: CancellationToken,
    ) -> Result<(), ActivateError> {
        let gone = || ActivateError::Infrastructure("supervisor is gone".to_string());
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Activate(Box::new(spec), preempt, tx))
            .await
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }

    /// Stop the module for good (it is no longer desired).
    pub async fn stop(&self) -> Result<(), SupervisorGone> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Stop(tx))
            .await
            .map_err(|_| SupervisorGone)?;
        rx.await.map_err(|_| SupervisorGone)
    }

    pub fn status(&self) -> watch::Receiver<ProcessStatus> {
        self.status.clone()
    }
}

struct Instance {
    spec: Arc<VersionSpec>,
    pid: u32,
    start_ticks: u64,
    pidfd: OwnedFd,
    /// Becomes `Some(description)` when the process has exited.
    exited: watch::Receiver<Option<String>>,
    started: Instant,
}

impl Instance {
    fn record(&self) -> InstanceRecord {
        InstanceRecord {
            version: self.spec.version.clone(),
            pid: self.pid,
            start_ticks: self.start_ticks,
        }
    }

    fn has_exited(&self) -> Option<String> {
        self.exited.borrow().clone()
    }

    async fn wait_exit(&mut self) -> String {
        wait_exited(self.exited.clone()).await
    }

    /// Ask it to stop, then force it; returns how it ended.
    async fn stop(&mut self) -> String {
        let _ = os::pidfd_signal(&self.pidfd, self.spec.stop_signal);
        match tokio::time::timeout(self.spec.stop_timeout, self.wait_exit()).await {
            Ok(how) => how,
            Err(_) => {
                tracing::warn!(
                    pid = self.pid,
                    timeout_s = self.spec.stop_timeout.as_secs(),
                    "did not stop in time; sending SIGKILL"
                );
                let _ = os::pidfd_signal(&self.pidfd, libc::SIGKILL);
                tokio::time::timeout(Duration::from_secs(10), self.wait_exit())
                    .await
                    .unwrap_or_else(|_| "did not exit after SIGKILL".to_string())
            }
        }
    }
}

struct Task {
    module: String,
    /// The node's listening addresses and the module owning each: a
    /// listener is claimed there before it is bound or taken back.
    book: ListenerBook,
    log_path: PathBuf,
    ledger: Ledger,
    /// Agent-owned listening sockets: (name, address, fd).
    listeners: Vec<(String, std::net::SocketAddr, OwnedFd)>,
    current: Option<Instance>,
    status: watch::Sender<ProcessStatus>,
    crashes: VecDeque<Instant>,
    restart_at: Option<tokio::time::Instant>,
    tracker: Option<HealthTracker>,
    last_sample: Option<(Instant, Sample)>,
    /// The version to start again after a crash (or a vanished adoptee).
    pending_spec: Option<Arc<VersionSpec>>,
    /// Versions with a live process besides the current one (published as
    /// [`ProcessStatus::settling`], without the status's own version).
    settling: Vec<String>,
}

impl Task {
    fn publish(&self, change: impl FnOnce(&mut ProcessStatus)) {
        self.status.send_modify(|status| {
            change(status);
            status.instance = self.current.as_ref().map(Instance::record);
            let mut settling: Vec<String> = Vec::new();
            for version in &self.settling {
                if status.version.as_ref() != Some(version) && !settling.contains(version) {
                    settling.push(version.clone());
                }
            }
            status.settling = settling;
        });
    }

    /// Set the versions with a live process besides the current one, and
    /// publish them.
    fn set_settling(&mut self, versions: Vec<String>) {
        self.settling = versions;
        self.publish(|_| {});
    }

    async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        adopt: Option<(InstanceRecord, VersionSpec)>,
        shutdown: CancellationToken,
    ) {
        if let Some((record, spec)) = adopt {
            self.adopt(record, spec);
        }
        self.stop_strays().await;
        let mut probe = tokio::time::interval(Duration::from_secs(1));
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut scrape_tick = tokio::time::interval(SCRAPE_INTERVAL);
        scrape_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if let Some(period) = self
                .current
                .as_ref()
                .and_then(|i| i.spec.health.as_ref())
                .map(|(_, h)| h.interval)
                && probe.period() != period
            {
                probe = tokio::time::interval(period);
                probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            }
            let restart_at = self.restart_at;
            let exit = self.current.as_ref().map(|i| i.exited.clone());
            tokio::select! {
                // Leave module processes running: they outlive the agent.
                _ = shutdown.cancelled() => return,
                request = requests.recv() => match request {
                    None => return,
                    Some(Request::Activate(spec, preempt, reply)) => {
                        let result = self.activate(*spec, preempt).await;
                        let _ = reply.send(result);
                    }
                    Some(Request::Stop(reply)) => {
                        self.stop_all().await;
                        let _ = reply.send(());
                    }
                },
                how = async {
                    match exit {
                        Some(rx) => wait_exited(rx).await,
                        None => std::future::pending().await,
                    }
                } => self.on_crash(how),
                _ = async {
                    match restart_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => self.restart(),
                _ = probe.tick() => self.probe().await,
                _ = scrape_tick.tick() => { self.scrape().await; self.cap_log(); }
            }
        }
    }

    fn adopt(&mut self, record: InstanceRecord, spec: VersionSpec) {
        let pidfd = match os::is_same_process(record.pid, record.start_ticks)
            .then(|| os::pidfd_open(record.pid))
        {
            Some(Ok(pidfd)) => pidfd,
            _ => {
                tracing::warn!(pid = record.pid, version = %record.version, "previous instance is gone; starting it again");
                self.restart_at = Some(tokio::time::Instant::now());
                self.current = None;
                self.publish(|s| {
                    s.version = Some(spec.version.clone());
                    s.phase = Phase::Starting;
                });
                self.pending_spec = Some(Arc::new(spec));
                return;
            }
        };
        // Take the listening sockets back from the running process, so later
        // versions share the very same kernel queue; any it no longer holds
        // come from a process left behind, or are bound anew (`stop_strays`).
        self.take_listeners(&pidfd, &spec);
        let exited = watch_pidfd_exit(&pidfd);
        tracing::info!(pid = record.pid, version = %record.version, "re-adopted running instance");
        let spec = Arc::new(spec);
        self.tracker = spec
            .health
            .as_ref()
            .map(|(_, h)| HealthTracker::new(h.healthy_threshold, h.unhealthy_threshold));
        self.current = Some(Instance {
            spec: spec.clone(),
            pid: record.pid,
            start_ticks: record.start_ticks,
            pidfd,
            exited,
            started: Instant::now(),
        });
        self.publish(|s| {
            s.version = Some(spec.version.clone());
            s.phase = Phase::Running;
            s.health = Health::Unknown;
            s.message = "re-adopted after agent restart".to_string();
        });
    }

    /// Take the listeners `spec` declares that the agent does not hold yet
    /// from a running instance (its fds 3.., checked by address); returns
    /// the sockets it could not take.
    fn take_listeners(&mut self, pidfd: &OwnedFd, spec: &VersionSpec) -> Vec<ListenSocket> {
        let mut missing = Vec::new();
        for (i, socket) in spec.sockets.iter().enumerate() {
            if self
                .listeners
                .iter()
                .any(|(_, addr, _)| *addr == socket.listen)
            {
                continue;
            }
            match os::pidfd_getfd(pidfd, 3 + i as RawFd)
                .ok()
                .filter(|fd| os::listening_addr(fd) == Some(socket.listen))
            {
                Some(fd) => match self.book.claim(&self.module, socket.listen) {
                    Ok(()) => self
                        .listeners
                        .push((socket.name.clone(), socket.listen, fd)),
                    // Two modules shared the address before an agent that
                    // refuses it: the process keeps its socket, this agent
                    // holds none for it, and the module's next start is a
                    // clear conflict instead of more shared traffic.
                    Err(taken) => {
                        let message =
                            conflict_message(&self.module, &socket.name, socket.listen, &taken);
                        tracing::error!(error = %message, "not taking back a listener another module holds");
                        missing.push(socket.clone());
                    }
                },
                None => missing.push(socket.clone()),
            }
        }
        missing
    }

    /// Stop every process of the ledger but the adopted one: what an agent
    /// killed mid-swap left behind (a new version still gating, an old one
    /// being stopped). Before anything else runs, so no version but the
    /// supervised one keeps accepting on the module's listeners.
    async fn stop_strays(&mut self) {
        let keep = self.current.as_ref().map(|i| (i.pid, i.start_ticks));
        // The version this supervisor will run: its listeners must outlive
        // the strays, or connections queued on them would be reset.
        let spec = self
            .current
            .as_ref()
            .map(|i| i.spec.clone())
            .or_else(|| self.pending_spec.clone());
        let strays = self.ledger.strays(keep);
        // Listeners first: from the strays, which may hold the very queue
        // the module's clients are connected to; only what nobody holds is
        // bound anew (its own queue, beside any other: SO_REUSEPORT).
        if let Some(spec) = &spec {
            for (_, pid) in &strays {
                if let Ok(pidfd) = os::pidfd_open(*pid) {
                    self.take_listeners(&pidfd, spec);
                }
            }
            if self.current.is_some() {
                for socket in &spec.sockets {
                    if self
                        .listeners
                        .iter()
                        .any(|(_, addr, _)| *addr == socket.listen)
                    {
                        continue;
                    }
                    if let Err(taken) = self.book.claim(&self.module, socket.listen) {
                        let message =
                            conflict_message(&self.module, &socket.name, socket.listen, &taken);
                        tracing::error!(error = %message, "not binding a listener another module holds");
                        continue;
                    }
                    match os::bind_listener(socket.listen) {
                        Ok(fd) => {
                            tracing::warn!(socket = %socket.name, addr = %socket.listen, "could not take the listener back from a running process; bound a new one (SO_REUSEPORT)");
                            self.listeners
                                .push((socket.name.clone(), socket.listen, fd));
                        }
                        Err(e) => {
                            self.release_unheld();
                            tracing::error!(socket = %socket.name, addr = %socket.listen, error = %e, "cannot bind listener");
                        }
                    }
                }
            }
        }
        if !strays.is_empty() {
            self.set_settling(strays.iter().map(|(e, _)| e.version.clone()).collect());
        }
        for (entry, pid) in &strays {
            tracing::warn!(pid, version = %entry.version, "stopping a module process a previous agent left behind");
            let how = ledger::stop_stray(entry, *pid).await;
            tracing::info!(pid, version = %entry.version, ended = %how, "left-behind process stopped");
        }
        if !strays.is_empty() {
            self.set_settling(Vec::new());
        }
        self.ledger.retain_only(keep);
        if let Some(instance) = &self.current {
            // An instance adopted from an agent that kept no ledger.
            let entry = ledger::Entry {
                marker: String::new(),
                version: instance.spec.version.clone(),
                pid: Some(instance.pid),
                start_ticks: Some(instance.start_ticks),
                stop_signal: instance.spec.stop_signal,
                stop_timeout_ms: instance.spec.stop_timeout.as_millis() as u64,
            };
            if !self.ledger.entries().iter().any(|e| e.pid == entry.pid) {
                let _ = self.ledger.record(entry);
            }
        }
        if let Err(e) = self.ledger.save() {
            tracing::warn!(error = %e, "cannot write the instance ledger");
        }
    }

    /// Bind any listener `spec` needs that is not open yet.
    fn ensure_listeners(&mut self, spec: &VersionSpec) -> Result<(), ActivateError> {
        for socket in &spec.sockets {
            if self
                .listeners
                .iter()
                .any(|(_, addr, _)| *addr == socket.listen)
            {
                continue;
            }
            // Another module's address is the version's fault (its manifest
            // names it), not the node's: a release failure naming both.
            self.book
                .claim(&self.module, socket.listen)
                .map_err(|taken| {
                    ActivateError::Release(conflict_message(
                        &self.module,
                        &socket.name,
                        socket.listen,
                        &taken,
                    ))
                })?;
            let fd = match os::bind_listener(socket.listen) {
                Ok(fd) => fd,
                Err(e) => {
                    self.release_unheld();
                    return Err(ActivateError::Infrastructure(format!(
                        "cannot listen on {} for socket {:?}: {e}",
                        socket.listen, socket.name
                    )));
                }
            };
            self.listeners
                .push((socket.name.clone(), socket.listen, fd));
        }
        Ok(())
    }

    /// Close listeners no version needs any more.
    fn prune_listeners(&mut self, spec: &VersionSpec) {
        self.listeners
            .retain(|(_, addr, _)| spec.sockets.iter().any(|s| s.listen == *addr));
        self.release_unheld();
    }

    /// Give up the claims on addresses this module holds no listener for.
    fn release_unheld(&self) {
        let held: Vec<std::net::SocketAddr> =
            self.listeners.iter().map(|(_, addr, _)| *addr).collect();
        self.book
            .release_unless(&self.module, |addr| held.contains(&addr));
    }

    fn start(&mut self, spec: Arc<VersionSpec>) -> Result<Instance, ActivateError> {
        let node = ActivateError::Infrastructure;
        self.ensure_listeners(&spec)?;
        // fds in the order of the manifest's sockets: fd 3 is the first.
        let fds: Vec<RawFd> = spec
            .sockets
            .iter()
            .filter_map(|s| {
                self.listeners
                    .iter()
                    .find(|(_, addr, _)| *addr == s.listen)
                    .map(|(_, _, fd)| fd.as_raw_fd())
            })
            .collect();
        let names: Vec<&str> = spec.sockets.iter().map(|s| s.name.as_str()).collect();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map_err(|e| node(format!("cannot open log {}: {e}", self.log_path.display())))?;
        let log_err = log
            .try_clone()
            .map_err(|e| node(format!("cannot open log: {e}")))?;
        let program = resolve_program(&spec.command[0], &spec.dir);
        // On disk before the fork: whatever happens to the agent from here
        // on, its successor can find this process (module docs).
        let mut entry = ledger::Entry {
            marker: ledger::new_marker(),
            version: spec.version.clone(),
            pid: None,
            start_ticks: None,
            stop_signal: spec.stop_signal,
            stop_timeout_ms: spec.stop_timeout.as_millis() as u64,
        };
        self.ledger.record(entry.clone()).map_err(|e| {
            node(format!(
                "cannot record the instance before starting it: {e}"
            ))
        })?;
        let mut command = if fds.is_empty() {
            let mut c = tokio::process::Command::new(&program);
            c.args(&spec.command[1..]);
            c
        } else {
            // LISTEN_PID must be the module's own pid, known only after fork:
            // a shell sets it to $$ and then execs the program in place.
            let mut c = tokio::process::Command::new("/bin/sh");
            c.arg("-c")
                .arg("LISTEN_PID=$$; export LISTEN_PID; exec \"$0\" \"$@\"")
                .arg(&program)
                .args(&spec.command[1..]);
            c
        };
        command
            .current_dir(&spec.dir)
            .env_clear()
            .envs(base_env())
            .envs(spec.env.iter().cloned())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::from(log))
            .stderr(std::process::Stdio::from(log_err))
            .kill_on_drop(false);
        command.env(ledger::MARKER_VAR, &entry.marker);
        // After env_clear, so they reach the module.
        if !fds.is_empty() {
            command
                .env("LISTEN_FDS", fds.len().to_string())
                .env("LISTEN_FDNAMES", names.join(":"));
        }
        let count = fds.len() as RawFd;
        // SAFETY: only async-signal-safe calls (setsid, fcntl, dup2) between fork and exec.
        unsafe {
            command.pre_exec(move || {
                // Own session: signals to the agent's process group (Ctrl-C,
                // a service manager stopping the agent) do not reach modules.
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Move the listeners out of the way, then into 3.., which
                // also clears close-on-exec on the targets.
                let mut high = [0 as RawFd; 64];
                for (i, fd) in fds.iter().enumerate().take(64) {
                    let dup = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 3 + count + 16);
                    if dup < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    high[i] = dup;
                }
                for (i, dup) in high.iter().take(fds.len()).enumerate() {
                    if libc::dup2(*dup, 3 + i as RawFd) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| {
            let message = format!("cannot start {program}: {e}");
            if is_node_trouble(&e) {
                ActivateError::Infrastructure(message)
            } else {
                ActivateError::Release(message)
            }
        })?;
        let pid = child.id().ok_or_else(|| {
            ActivateError::Release("process exited before it could be tracked".to_string())
        })?;
        let pidfd =
            os::pidfd_open(pid).map_err(|e| node(format!("cannot open pidfd for {pid}: {e}")))?;
        let start_ticks = os::process_start_ticks(pid).unwrap_or(0);
        entry.pid = Some(pid);
        entry.start_ticks = Some(start_ticks);
        if let Err(e) = self.ledger.record(entry) {
            // The marker entry already on disk still finds it.
            tracing::warn!(pid, error = %e, "cannot record the started instance's pid");
        }
        let (tx, exited) = watch::channel(None);
        tokio::spawn(async move {
            let how = match child.wait().await {
                Ok(status) => describe_exit(status),
                Err(e) => format!("wait failed: {e}"),
            };
            let _ = tx.send(Some(how));
        });
        tracing::info!(pid, version = %spec.version, "started");
        Ok(Instance {
            spec,
            pid,
            start_ticks,
            pidfd,
            exited,
            started: Instant::now(),
        })
    }

    /// Wait until a freshly started instance is healthy (or has stayed up,
    /// without a health check) within its start timeout.
    async fn wait_ready(instance: &mut Instance) -> Result<(), StartError> {
        let Some((check, spec)) = instance.spec.health.clone() else {
            return match tokio::time::timeout(SETTLE_WITHOUT_HEALTH, instance.wait_exit()).await {
                Ok(how) => Err(StartError::Exited(how)),
                Err(_) => Ok(()),
            };
        };
        let deadline = tokio::time::Instant::now() + spec.start_timeout;
        let mut streak = 0;
        let mut last_error = "no probe completed".to_string();
        loop {
            if let Some(how) = instance.has_exited() {
                return Err(StartError::Exited(how));
            }
            match probe_once(&check, spec.timeout, &instance.spec.env, &instance.spec.dir).await {
                Ok(()) => {
                    streak += 1;
                    if streak >= spec.healthy_threshold {
                        return Ok(());
                    }
                }
                Err(e) => {
                    streak = 0;
                    last_error = e.to_string();
                }
            }
            if tokio::time::Instant::now() + spec.interval > deadline {
                return Err(StartError::NotHealthy {
                    within: spec.start_timeout,
                    last_error,
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(spec.interval) => {}
                how = instance.wait_exit() => return Err(StartError::Exited(how)),
            }
        }
    }

    /// The last lines the module wrote, to explain a failed start.
    fn log_tail(&self) -> String {
        let text = std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(3).collect();
        let tail: Vec<&str> = lines.into_iter().rev().collect();
        let joined = tail.join(" | ");
        // The last 400 bytes, started on a character boundary: module
        // output is anything, and a cut inside a character would panic.
        let mut start = joined.len().saturating_sub(400);
        while !joined.is_char_boundary(start) {
            start += 1;
        }
        joined[start..].to_string()
    }

    /// The health gate of a new instance ([`Task::wait_ready`]), ended early
    /// when `preempt` is cancelled. Only waiting is cut short: the caller
    /// stops the candidate itself, so nothing is left half done.
    async fn gate(
        instance: &mut Instance,
        preempt: &CancellationToken,
    ) -> Result<(), ActivateError> {
        let version = instance.spec.version.clone();
        tokio::select! {
            // Checked first: once preempted, a probe that passes at the same
            // moment does not make the abandoned version the running one.
            biased;
            _ = preempt.cancelled() => Err(ActivateError::Preempted(format!(
                "activation of {version} preempted by a new desired state"
            ))),
            ready = Self::wait_ready(instance) => ready.map_err(|e| ActivateError::Release(e.to_string())),
        }
    }

    async fn activate(
        &mut self,
        spec: VersionSpec,
        preempt: CancellationToken,
    ) -> Result<(), ActivateError> {
        if self
            .current
            .as_ref()
            .is_some_and(|c| c.spec.version == spec.version && c.has_exited().is_none())
        {
            return Ok(());
        }
        let spec = Arc::new(spec);
        self.restart_at = None;
        self.pending_spec = None;
        self.publish(|s| {
            s.phase = Phase::Starting;
            s.message = format!("starting {}", spec.version);
        });
        let result = match spec.swap {
            SwapStrategy::StartFirst => self.swap_start_first(spec.clone(), &preempt).await,
            SwapStrategy::StopFirst => self.swap_stop_first(spec.clone(), &preempt).await,
        }
        .map_err(|e| match e {
            // The module's last words explain its own failure, not a preemption.
            ActivateError::Preempted(_) => e,
            e => {
                let tail = self.log_tail();
                if tail.is_empty() {
                    e
                } else {
                    e.map_message(|m| format!("{m}; last output: {tail}"))
                }
            }
        });
        // Whatever happened, the candidate has been stopped or is current.
        self.settling.clear();
        match &result {
            Ok(()) => {
                self.prune_listeners(&spec);
                self.crashes.clear();
                self.tracker = spec.health.as_ref().map(|(_, h)| {
                    let mut t = HealthTracker::new(h.healthy_threshold, h.unhealthy_threshold);
                    // It passed its start gate: healthy until probes say otherwise.
                    for _ in 0..h.healthy_threshold {
                        t.observe(true);
                    }
                    t
                });
                self.last_sample = None;
                self.publish(|s| {
                    s.version = Some(spec.version.clone());
                    s.phase = Phase::Running;
                    s.health = if spec.health.is_some() {
                        Health::Healthy
                    } else {
                        Health::Unknown
                    };
                    s.message = String::new();
                    s.restarts = 0;
                    s.crash_loop = false;
                    s.metrics = None;
                });
            }
            Err(e) => {
                let still_running = self.current.as_ref().map(|c| c.spec.version.clone());
                let preempted = matches!(e, ActivateError::Preempted(_));
                self.publish(|s| {
                    s.phase = match (&still_running, preempted) {
                        (Some(_), _) => Phase::Running,
                        (None, true) => Phase::Stopped,
                        (None, false) => Phase::Failed,
                    };
                    s.version = still_running;
                    s.message = if preempted {
                        e.to_string()
                    } else {
                        format!("activating {} failed: {e}", spec.version)
                    };
                });
            }
        }
        result
    }

    async fn swap_start_first(
        &mut self,
        spec: Arc<VersionSpec>,
        preempt: &CancellationToken,
    ) -> Result<(), ActivateError> {
        let mut fresh = self.start(spec)?;
        let new_version = fresh.spec.version.clone();
        self.set_settling(vec![new_version.clone()]);
        if let Err(e) = Self::gate(&mut fresh, preempt).await {
            let how = fresh.stop().await;
            tracing::warn!(error = %e, stopped = %how, "new version did not become ready; the old one keeps serving");
            return Err(e);
        }
        let Some(mut old) = self.current.take() else {
            self.current = Some(fresh);
            return Ok(());
        };
        self.settling = vec![old.spec.version.clone(), new_version.clone()];
        self.publish(|s| s.message = format!("stopping {}", old.spec.version));
        let how = old.stop().await;
        tracing::info!(version = %old.spec.version, pid = old.pid, ended = %how, "old version stopped");
        self.set_settling(vec![new_version]);
        // While both versions shared the listener, a probe may have been
        // answered by the old one. Now only the new one accepts: check it
        // again, and bring the old version back if it fails (or if a new
        // desired state abandons it meanwhile).
        if let Err(e) = Self::gate(&mut fresh, preempt).await {
            tracing::warn!(error = %e, "new version failed its check after the cutover, or was preempted; reverting");
            let reverted = match self.start(old.spec.clone()) {
                Ok(mut back) => {
                    let ready = Self::wait_ready(&mut back).await;
                    let how = fresh.stop().await;
                    tracing::info!(stopped = %how, "failed version stopped");
                    self.current = Some(back);
                    match ready {
                        Ok(()) => format!("reverted to {}", old.spec.version),
                        Err(r) => format!(
                            "reverted to {}, which is not healthy either: {r}",
                            old.spec.version
                        ),
                    }
                }
                Err(r) => {
                    // Keep the new one rather than nothing at all.
                    self.current = Some(fresh);
                    format!("could not restart {}: {r}", old.spec.version)
                }
            };
            return Err(e.map_message(|m| format!("{m} after the cutover; {reverted}")));
        }
        self.current = Some(fresh);
        Ok(())
    }

    async fn swap_stop_first(
        &mut self,
        spec: Arc<VersionSpec>,
        preempt: &CancellationToken,
    ) -> Result<(), ActivateError> {
        let old_spec = match self.current.take() {
            Some(mut old) => {
                self.publish(|s| s.phase = Phase::Stopping);
                let how = old.stop().await;
                tracing::info!(version = %old.spec.version, ended = %how, "old version stopped");
                Some(old.spec.clone())
            }
            None => None,
        };
        let outcome = match self.start(spec) {
            Ok(mut fresh) => {
                self.set_settling(vec![fresh.spec.version.clone()]);
                match Self::gate(&mut fresh, preempt).await {
                    Ok(()) => {
                        self.current = Some(fresh);
                        return Ok(());
                    }
                    Err(e) => {
                        fresh.stop().await;
                        self.set_settling(Vec::new());
                        e
                    }
                }
            }
            Err(e) => e,
        };
        // Put the old version back so the module keeps serving.
        if let Some(old_spec) = old_spec {
            match self.start(old_spec) {
                Ok(old) => self.current = Some(old),
                Err(e) => tracing::error!(error = %e, "could not restart the previous version"),
            }
        }
        Err(outcome)
    }

    async fn stop_all(&mut self) {
        self.restart_at = None;
        self.pending_spec = None;
        if let Some(mut instance) = self.current.take() {
            self.publish(|s| s.phase = Phase::Stopping);
            let how = instance.stop().await;
            tracing::info!(version = %instance.spec.version, ended = %how, "stopped");
        }
        self.listeners.clear();
        self.release_unheld();
        self.tracker = None;
        self.publish(|s| {
            s.phase = Phase::Stopped;
            s.version = None;
            s.health = Health::Unknown;
            s.metrics = None;
        });
    }

    fn on_crash(&mut self, how: String) {
        let Some(instance) = self.current.take() else {
            return;
        };
        let now = Instant::now();
        self.crashes.push_back(now);
        while self
            .crashes
            .front()
            .is_some_and(|t| now.duration_since(*t) > CRASH_WINDOW)
        {
            self.crashes.pop_front();
        }
        let crash_loop = self.crashes.len() >= CRASH_LOOP_THRESHOLD;
        let backoff = Duration::from_secs(1)
            .saturating_mul(1u32 << self.crashes.len().saturating_sub(1).min(5))
            .min(RESTART_BACKOFF_MAX);
        tracing::warn!(version = %instance.spec.version, pid = instance.pid, ended = %how, up_s = instance.started.elapsed().as_secs(), restart_in_s = backoff.as_secs(), crash_loop, "module process exited unexpectedly");
        self.restart_at = Some(tokio::time::Instant::now() + backoff);
        self.tracker = None;
        let version = instance.spec.version.clone();
        self.pending_spec = Some(instance.spec);
        self.publish(|s| {
            s.version = Some(version);
            s.restarts += 1;
            s.crash_loop = crash_loop;
            s.phase = if crash_loop {
                Phase::Failed
            } else {
                Phase::Starting
            };
            s.health = Health::Unhealthy;
            s.message = format!(
                "exited unexpectedly ({how}); restarting in {}s",
                backoff.as_secs()
            );
        });
    }

    fn restart(&mut self) {
        self.restart_at = None;
        let Some(spec) = self.pending_spec.take() else {
            return;
        };
        match self.start(spec.clone()) {
            Ok(instance) => {
                self.tracker = spec
                    .health
                    .as_ref()
                    .map(|(_, h)| HealthTracker::new(h.healthy_threshold, h.unhealthy_threshold));
                self.current = Some(instance);
                self.publish(|s| s.message = "restarted".to_string());
            }
            Err(e) => {
                // Same path as a crash: back off and try again.
                self.pending_spec = Some(spec);
                self.crashes.push_back(Instant::now());
                let backoff =
                    RESTART_BACKOFF_MAX.min(Duration::from_secs(1u64 << self.crashes.len().min(5)));
                self.restart_at = Some(tokio::time::Instant::now() + backoff);
                self.publish(|s| {
                    s.phase = Phase::Failed;
                    s.health = Health::Unhealthy;
                    s.message = e.to_string();
                });
            }
        }
    }

    async fn probe(&mut self) {
        let Some(instance) = self.current.as_ref() else {
            return;
        };
        let Some((check, spec)) = instance.spec.health.clone() else {
            return;
        };
        let result = probe_once(&check, spec.timeout, &instance.spec.env, &instance.spec.dir).await;
        let Some(tracker) = self.tracker.as_mut() else {
            return;
        };
        if let Some(changed) = tracker.observe(result.is_ok()) {
            let message = result.err().map(|e| e.to_string()).unwrap_or_default();
            tracing::info!(health = changed.as_str(), message = %message, "health changed");
            let healthy_again = changed == Health::Healthy;
            self.publish(|s| {
                s.health = changed;
                s.message = message;
                if healthy_again {
                    s.crash_loop = false;
                    s.phase = Phase::Running;
                }
            });
        } else if self.status.borrow().phase == Phase::Starting
            && instance.has_exited().is_none()
            && result.is_ok()
        {
            // A restarted instance answering probes is running again.
            self.publish(|s| s.phase = Phase::Running);
        }
    }

    async fn scrape(&mut self) {
        let Some(instance) = self.current.as_ref() else {
            return;
        };
        let Some((url, names)) = instance.spec.metrics.clone() else {
            return;
        };
        match scrape(&url, &names, Duration::from_secs(2)).await {
            Ok(sample) => {
                let now = Instant::now();
                if let Some((at, previous)) = &self.last_sample {
                    let w = window(previous, &sample, now.duration_since(*at));
                    self.publish(|s| s.metrics = Some(w));
                }
                self.last_sample = Some((now, sample));
            }
            Err(e) => tracing::debug!(error = %e, "metrics scrape failed"),
        }
    }

    /// Keep module output bounded: past the cap, the log moves to `.1`.
    fn cap_log(&self) {
        let Ok(meta) = std::fs::metadata(&self.log_path) else {
            return;
        };
        if meta.len() <= LOG_CAP_BYTES {
            return;
        }
        let mut rotated = self.log_path.clone().into_os_string();
        rotated.push(".1");
        // Copy then truncate: the process keeps its O_APPEND descriptor.
        if std::fs::copy(&self.log_path, &rotated).is_ok()
            && let Ok(file) = std::fs::OpenOptions::new().write(true).open(&self.log_path)
        {
            let _ = file.set_len(0);
        }
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit code {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => "exited".to_string(),
    }
}
