//! What both daemons' handles share: spawning a binary with its log in a
//! file (printed when a test fails), stopping it by SIGTERM with a deadline,
//! polling with `eventually`, a temporary directory per test, free ports,
//! the admin HTTP endpoints, and process output and memory measurement.

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long `eventually` waits before failing.
pub fn patience() -> Duration {
    let secs = std::env::var("HOTSWAP_TEST_PATIENCE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(secs)
}

/// Poll `check` until it returns `Ok`, or panic after `patience()` with the
/// last error it gave.
pub fn eventually<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + patience();
    let mut last = String::from("never checked");
    while Instant::now() < deadline {
        match check() {
            Ok(value) => return value,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!(
        "timed out after {:?} waiting for {what}; last observation: {last}",
        patience()
    );
}

/// Path of a workspace binary next to the test executable's directory.
pub fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("HOTSWAP_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // Tests live in target/<profile>/deps/, bench binaries in target/<profile>/.
    let here = exe.parent().expect("executable dir");
    let dir = if here.ends_with("deps") {
        here.parent().expect("target dir")
    } else {
        here
    };
    let path = dir.join(name);
    assert!(
        path.exists(),
        "binary {} not found; build it first with `cargo build --workspace --bins` (or `make test`)",
        path.display()
    );
    path
}

pub(crate) fn send_signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) with a pid we spawned; no memory is involved.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
}

/// Wait for a child to exit, or panic after `timeout`.
pub(crate) fn wait_with_deadline(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                panic!("{what} did not exit within {timeout:?}");
            }
            Err(e) => panic!("waiting for {what}: {e}"),
        }
    }
}

pub(crate) fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Extra environment for every daemon this test process spawns from now on.
static DAEMON_ENV: std::sync::Mutex<Vec<(String, String)>> = std::sync::Mutex::new(Vec::new());

/// Set `name=value` in the environment of every control plane, agent and
/// simulator started after this call (not of `hotswapctl`). For tests that
/// need one in all daemons, e.g. `OTEL_EXPORTER_OTLP_ENDPOINT`; it holds
/// for the whole test binary, so use it only in a binary of its own.
pub fn set_daemon_env(name: &str, value: &str) {
    let mut vars = DAEMON_ENV.lock().unwrap_or_else(|e| e.into_inner());
    vars.retain(|(n, _)| n != name);
    vars.push((name.to_string(), value.to_string()));
}

fn daemon_env() -> Vec<(String, String)> {
    DAEMON_ENV.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// A spawned daemon with its log file.
pub(crate) struct Daemon {
    name: String,
    pub(crate) child: Option<Child>,
    pub(crate) log: PathBuf,
}

impl Daemon {
    pub(crate) fn spawn(name: &str, mut command: Command, log: PathBuf) -> Self {
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let err = out.try_clone().expect("log file");
        command
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .stdin(Stdio::null());
        command.env("NO_COLOR", "1").env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        );
        command.envs(daemon_env());
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        Self {
            name: name.to_string(),
            child: Some(child),
            log,
        }
    }

    pub(crate) fn child(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .unwrap_or_else(|| panic!("{} is not running", self.name))
    }

    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, wait for a clean exit.
    pub(crate) fn stop(&mut self) -> ExitStatus {
        let name = self.name.clone();
        let child = self.child();
        send_signal(child, libc::SIGTERM);
        let status = wait_with_deadline(child, Duration::from_secs(20), &name);
        self.child = None;
        status
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(&child, libc::SIGKILL);
            let _ = child.wait();
        }
    }

    pub(crate) fn wait_exit(&mut self) -> ExitStatus {
        let name = self.name.clone();
        let status = wait_with_deadline(self.child(), patience(), &name);
        self.child = None;
        status
    }

    pub(crate) fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- last log lines of {} ({}) -----\n{}\n-----",
                self.name,
                self.log.display(),
                tail(&self.log, 80)
            );
        }
        self.kill();
    }
}

/// Output of one `hotswapctl` run.
#[derive(Debug)]
pub struct CtlOutput {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CtlOutput {
    pub fn of(output: Output) -> Self {
        Self {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Assert the command exited 0.
    pub fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "hotswapctl failed: {self:?}");
        self
    }

    /// Parse stdout as JSON, asserting success first.
    pub fn json(&self) -> Value {
        assert_eq!(self.code, 0, "hotswapctl failed: {self:?}");
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", self.stdout))
    }

    /// The last line of JSON Lines output (a streaming command's final
    /// object), whatever the exit code.
    pub fn last_json_line(&self) -> Value {
        let line = self
            .stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_else(|| panic!("no output: {self:?}"));
        serde_json::from_str(line).unwrap_or_else(|e| panic!("last line is not JSON ({e}): {line}"))
    }
}

/// Minimal HTTP/1.1 GET for the admin endpoints.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|e| panic!("{e}"))
}

/// As [`http_get`], with failures returned (for polling a daemon that may
/// be restarting).
pub fn try_http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    try_http(addr, "GET", path, b"")
}

/// One HTTP/1.1 request with `body` (none when empty) and its status and
/// body; status 0 when the answer is not HTTP.
pub fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| format!("timeout: {e}"))?;
    let length = if body.is_empty() {
        String::new()
    } else {
        format!("Content-Length: {}\r\n", body.len())
    };
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{length}Connection: close\r\n\r\n"
    )
    .and_then(|()| stream.write_all(body))
    .map_err(|e| format!("send request to {addr}: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("read response from {addr}: {e}"))?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// A temporary directory for one test, kept (and its path printed) if the test fails.
pub struct TestDir {
    dir: Option<tempfile::TempDir>,
}

impl TestDir {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("hotswap-test-")
            .tempdir()
            .expect("tempdir");
        Self { dir: Some(dir) }
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().expect("present").path()
    }
}

impl Default for TestDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(dir) = self.dir.take()
        {
            eprintln!("test files kept in {}", dir.keep().display());
        }
    }
}

/// A port that was free a moment ago, for a module to listen on later.
///
/// Taken below the kernel's ephemeral range (32768 and up on Linux), from a
/// start that differs per process, and never the same twice in a process:
/// a port from `bind(0)` is an ephemeral one, which the kernel may hand to
/// the next daemon that binds port 0 (a control plane, an agent's admin
/// endpoint) before the module listens on it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id().wrapping_mul(7919)) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (LOW + (start + n * 37) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}

/// Peak resident memory (`VmHWM`) of a running process, in KiB; 0 when it
/// cannot be read.
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Run `command` to completion (stdin closed, output captured through files
/// in `scratch`) and return its output and its peak resident memory in KiB,
/// from `wait4`'s resource usage of exactly that child (`ru_maxrss`), so
/// other children of the test process do not count.
pub fn run_measured(mut command: Command, scratch: &Path) -> (CtlOutput, u64) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let (out_path, err_path) = (
        scratch.join(format!("measured-{n}.out")),
        scratch.join(format!("measured-{n}.err")),
    );
    #[expect(
        clippy::zombie_processes,
        reason = "reaped by wait4 below, which also gives its resource usage"
    )]
    let child = command
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).expect("stdout file"))
        .stderr(File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn measured command");
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    // SAFETY: an all-zero rusage is a valid value of the plain C struct.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4(2) on our own child, with valid out-pointers; `child`
    // is not waited for by std afterwards (dropping a Child does not wait).
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid, "wait4: {}", std::io::Error::last_os_error());
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    let read = |path: &Path| std::fs::read_to_string(path).unwrap_or_default();
    let output = CtlOutput {
        code,
        stdout: read(&out_path),
        stderr: read(&err_path),
    };
    // ru_maxrss is in KiB on Linux.
    (output, usage.ru_maxrss.max(0) as u64)
}
