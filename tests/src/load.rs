//! Load and content: a continuous HTTP load on a module, the agent
//! simulator (`hotswap-agent simulate`), module directories and large
//! incompressible files.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use crate::control_plane::{ControlPlane, ctl_offline};
use crate::daemon::{Daemon, binary, tail};

/// `hotswapctl module pack SRC --key KEY -o OUT`, which must succeed.
pub fn pack_dir(src: &Path, key: &Path, out: &Path) {
    let packed = ctl_offline(&[
        "module",
        "pack",
        src.to_str().expect("utf8"),
        "--key",
        key.to_str().expect("utf8"),
        "-o",
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(packed.code, 0, "{packed:?}");
}

/// A bundle module `name@version` carrying `payload`, written under `work`
/// and packed signed with `key`; returns the `.hsm` file.
pub fn pack_bundle(work: &Path, name: &str, version: &str, payload: &[u8], key: &Path) -> PathBuf {
    let src = work.join(format!("src-{name}-{version}"));
    write_module(&src, name, version, payload);
    let out = work.join(format!("{name}-{version}.hsm"));
    pack_dir(&src, key, &out);
    out
}

/// Write a bundle module directory with a manifest and a payload file.
pub fn write_module(dir: &Path, name: &str, version: &str, payload: &[u8]) {
    std::fs::create_dir_all(dir).expect("module dir");
    std::fs::write(
        dir.join("module.toml"),
        format!("name = \"{name}\"\nversion = \"{version}\"\nruntime = \"bundle\"\n"),
    )
    .expect("manifest");
    std::fs::write(dir.join("data.bin"), payload).expect("payload");
}

/// Write `len` bytes of incompressible pseudo-random data to `path`, a
/// megabyte at a time (xorshift64: fast, and nothing for zstd to find).
pub fn write_pseudo_random(path: &Path, len: u64, seed: u64) {
    use std::io::Write;
    let mut out = std::io::BufWriter::new(File::create(path).expect("create random file"));
    let mut state = seed | 1;
    let mut block = vec![0u8; 1024 * 1024];
    let mut left = len;
    while left > 0 {
        for word in block.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = left.min(block.len() as u64) as usize;
        out.write_all(&block[..n]).expect("write random file");
        left -= n as u64;
    }
    out.flush().expect("write random file");
}

/// The traffic canary tests send each node: at least the 50 requests
/// analysis needs within seconds, and far below what a debug build of the
/// example server answers on a busy 2-core host.
pub const CANARY_LOAD_PER_SECOND: u32 = 50;

/// Continuous HTTP load: one new connection per request, counting failures.
/// [`Load::start`] sends the next request as soon as one is answered (what
/// a swap must not drop); [`Load::paced`] sends at a steady rate, as real
/// traffic arrives, so a faster version does not serve more of it (and
/// burn more CPU) just by answering sooner: what canary analysis compares.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<LoadStats>>,
}

#[derive(Debug, Default)]
pub struct LoadStats {
    pub ok: u64,
    pub failures: Vec<String>,
    /// Versions seen in `x-hello-version`, in order of first appearance.
    pub versions: Vec<String>,
}

impl Load {
    pub fn start(port: u16) -> Self {
        Self::run(port, None)
    }

    /// `per_second` requests a second, on one connection each; a late
    /// request is sent at once, without a burst to catch up.
    pub fn paced(port: u16, per_second: u32) -> Self {
        Self::run(port, Some(Duration::from_secs(1) / per_second.max(1)))
    }

    fn run(port: u16, every: Option<Duration>) -> Self {
        use std::io::{Read, Write};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut stats = LoadStats::default();
            let mut next = std::time::Instant::now();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(every) = every {
                    let now = std::time::Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    next = next.max(now) + every;
                }
                let result = (|| -> Result<String, String> {
                    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))
                        .map_err(|e| format!("connect: {e}"))?;
                    stream
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .map_err(|e| e.to_string())?;
                    stream
                        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
                        .map_err(|e| format!("write: {e}"))?;
                    let mut response = String::new();
                    stream
                        .read_to_string(&mut response)
                        .map_err(|e| format!("read: {e}"))?;
                    if !response.starts_with("HTTP/1.1 200") {
                        return Err(format!(
                            "response: {:?}",
                            response.lines().next().unwrap_or("<empty>")
                        ));
                    }
                    Ok(response
                        .lines()
                        .find_map(|l| l.strip_prefix("x-hello-version: "))
                        .unwrap_or("?")
                        .trim()
                        .to_string())
                })();
                match result {
                    Ok(version) => {
                        stats.ok += 1;
                        if stats.versions.last() != Some(&version) {
                            stats.versions.push(version);
                        }
                    }
                    Err(e) => stats.failures.push(e),
                }
            }
            stats
        });
        Self {
            stop,
            handle: Some(handle),
        }
    }

    pub fn finish(mut self) -> LoadStats {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Counters of a simulator's progress line (`simulate: enrolled N (failed
/// F, rate-limited R), connected C, sessions S, heartbeats H, reports P,
/// installs I, ...`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimCounters {
    pub enrolled: u64,
    /// Enrollment attempts that failed (and were retried, unless fatal).
    pub enroll_failed: u64,
    /// Enrollment attempts the control plane's rate limit refused.
    pub enroll_rate_limited: u64,
    /// Sessions open now (welcomed by a control plane).
    pub connected: u64,
    /// Sessions opened since the start.
    pub sessions: u64,
    /// Simulated installs completed since the start.
    pub installs: u64,
}

impl SimCounters {
    fn parse(line: &str) -> Option<Self> {
        let after = |word: &str| -> Option<u64> {
            let at = line.find(&format!("{word} "))? + word.len() + 1;
            line[at..]
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        };
        Some(Self {
            enrolled: after("enrolled")?,
            enroll_failed: after("failed").unwrap_or(0),
            enroll_rate_limited: after("rate-limited").unwrap_or(0),
            connected: after("connected")?,
            sessions: after("sessions")?,
            installs: after("installs")?,
        })
    }
}

/// `hotswap-agent simulate`: many simulated agents in one process.
pub struct Simulator {
    daemon: Daemon,
}

impl Simulator {
    /// Create a token with enough uses and start `count` simulated agents
    /// with `labels` (e.g. `["environment=dev"]`) and extra flags.
    pub fn start(
        cp: &ControlPlane,
        name: &str,
        count: usize,
        labels: &[&str],
        extra: &[&str],
    ) -> Self {
        let uses = count.to_string();
        let (token, fp) = cp.token(&["--uses", &uses]);
        let mut command = Command::new(binary("hotswap-agent"));
        command
            .args(["simulate", "--count", &uses, "--control-plane", &cp.url()])
            .args(["--join-token", &token, "--ca-fingerprint", &fp])
            .args(["--name-prefix", name]);
        if !extra.contains(&"--stats-every") {
            command.args(["--stats-every", "1s"]);
        }
        for label in labels {
            command.args(["--label", label]);
        }
        command.args(extra);
        let log = cp.work.join(format!("simulate-{name}.log"));
        Self {
            daemon: Daemon::spawn(&format!("simulator {name}"), command, log),
        }
    }

    pub fn log(&self) -> String {
        self.daemon.log_text()
    }

    /// The counters of the simulator's last progress line (printed every
    /// `--stats-every`), read from the end of its log; `None` before the
    /// first line.
    pub fn counters(&self) -> Option<SimCounters> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = File::open(&self.daemon.log).ok()?;
        let len = file.metadata().ok()?.len();
        file.seek(SeekFrom::Start(len.saturating_sub(8192))).ok()?;
        let mut tail = Vec::new();
        file.read_to_end(&mut tail).ok()?;
        let text = String::from_utf8_lossy(&tail);
        text.lines()
            .rev()
            .filter_map(|l| l.strip_prefix("simulate: "))
            .find_map(SimCounters::parse)
    }

    pub fn pid(&self) -> u32 {
        self.daemon.child.as_ref().map_or(0, Child::id)
    }

    /// `Err` with its log's tail if the simulator has exited.
    pub fn check_running(&mut self) -> Result<(), String> {
        match self.daemon.exited() {
            None => Ok(()),
            Some(status) => Err(format!(
                "simulator exited with {status}:\n{}",
                tail(&self.daemon.log, 20)
            )),
        }
    }

    /// SIGTERM and a clean exit.
    pub fn stop(&mut self) -> ExitStatus {
        self.daemon.stop()
    }
}
