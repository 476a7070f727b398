//! Integration test harness: starts the real `hotswap-control-plane`,
//! `hotswap-agent` and `hotswapctl` binaries on loopback ports chosen by the
//! OS, each test in its own temporary directory. Children's logs go to files
//! that are printed when a test fails; waits poll a condition until a deadline
//! (`HOTSWAP_TEST_PATIENCE_SECS`, default 30) and fail loudly with the last
//! observation. Every process is stopped when its handle drops.
//!
//! The binaries must be built first (`make test` does `cargo build --bins`).

use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use hotswap_common::profile::Profile;
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

fn send_signal(child: &Child, signal: i32) {
    // SAFETY: kill(2) with a pid we spawned; no memory is involved.
    unsafe {
        libc::kill(child.id() as i32, signal);
    }
}

/// Wait for a child to exit, or panic after `timeout`.
fn wait_with_deadline(child: &mut Child, timeout: Duration, what: &str) -> ExitStatus {
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

fn tail(path: &Path, lines: usize) -> String {
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
struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &str, mut command: Command, log: PathBuf) -> Self {
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

    fn child(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .unwrap_or_else(|| panic!("{} is not running", self.name))
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGTERM, wait for a clean exit.
    fn stop(&mut self) -> ExitStatus {
        let name = self.name.clone();
        let child = self.child();
        send_signal(child, libc::SIGTERM);
        let status = wait_with_deadline(child, Duration::from_secs(20), &name);
        self.child = None;
        status
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            send_signal(&child, libc::SIGKILL);
            let _ = child.wait();
        }
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let name = self.name.clone();
        let status = wait_with_deadline(self.child(), patience(), &name);
        self.child = None;
        status
    }

    fn log_text(&self) -> String {
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
    fn from(output: Output) -> Self {
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

/// Settings file used by tests: fast heartbeats so disconnects show quickly.
/// Settings every test control plane starts with: quick heartbeats, and
/// operator rate limits out of the way of suites that deploy many times a
/// minute with one admin (a test of the limits sets its own).
pub const FAST_SETTINGS: &str = "heartbeat_interval = \"200ms\"\nheartbeat_grace = \"2s\"\nshutdown_timeout = \"5s\"\noperator_writes_per_minute = 100000\noperator_writes_burst = 100000\ndeployments_per_minute = 100000\ndeployments_burst = 100000\n";

/// [`FAST_SETTINGS`] less the keys `extra` sets, then `extra`.
fn settings_with(extra: &str) -> String {
    let key = |line: &str| {
        line.split('=')
            .next()
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    let overridden: Vec<String> = extra
        .lines()
        .filter(|l| l.contains('=') && !l.trim_start().starts_with('['))
        .map(key)
        .collect();
    let base: String = FAST_SETTINGS
        .lines()
        .filter(|l| !overridden.contains(&key(l)))
        .map(|l| format!("{l}\n"))
        .collect();
    format!("{base}{extra}")
}

/// A control plane with its own data directory.
pub struct ControlPlane {
    pub data_dir: PathBuf,
    work: PathBuf,
    daemon: Option<Daemon>,
    pub grpc: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    starts: u32,
    /// Extra environment for this control plane's next starts.
    env: Vec<(String, String)>,
}

impl ControlPlane {
    /// `init` a new data dir under `work`.
    pub fn init(work: &Path) -> Self {
        Self::init_with_settings(work, "")
    }

    /// As [`ControlPlane::init`], with extra lines for the settings file.
    pub fn init_with_settings(work: &Path, extra: &str) -> Self {
        let data_dir = work.join("cp");
        let output = Command::new(binary("hotswap-control-plane"))
            .args(["init", "--data-dir"])
            .arg(&data_dir)
            .output()
            .expect("run init");
        assert!(
            output.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::write(work.join("cp.toml"), settings_with(extra)).expect("write settings");
        Self {
            data_dir,
            work: work.to_path_buf(),
            daemon: None,
            grpc: None,
            admin: None,
            starts: 0,
            env: Vec::new(),
        }
    }

    /// Set `name=value` in the environment of this control plane from its
    /// next start on (e.g. `LD_PRELOAD` of libfaketime in the chaos suite).
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.retain(|(n, _)| n != name);
        self.env.push((name.to_string(), value.to_string()));
    }

    /// Start (or restart) `run`. Restarts reuse the first gRPC port, so
    /// agents find the control plane where they left it.
    pub fn start(&mut self) {
        self.start_with_args(&[]);
    }

    /// As [`ControlPlane::start`], with extra flags for `run`.
    pub fn start_with_args(&mut self, extra: &[&str]) {
        assert!(self.daemon.is_none(), "control plane already running");
        let addresses = self.data_dir.join("run/addresses.json");
        let _ = std::fs::remove_file(&addresses);
        let listen = self
            .grpc
            .map(|a| a.to_string())
            .unwrap_or_else(|| "127.0.0.1:0".into());
        self.starts += 1;
        let mut command = Command::new(binary("hotswap-control-plane"));
        command
            .args(["run", "--data-dir"])
            .arg(&self.data_dir)
            .args([
                "--listen",
                &listen,
                "--admin-listen",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(self.work.join("cp.toml"))
            .args(extra)
            .envs(self.env.iter().cloned());
        let log = self.work.join(format!("cp-{}.log", self.starts));
        let mut daemon = Daemon::spawn("control plane", command, log);
        let parsed: Value = eventually("control plane to publish its addresses", || {
            if let Some(status) = daemon.exited() {
                panic!(
                    "control plane exited early with {status}:\n{}",
                    daemon.log_text()
                );
            }
            let text = std::fs::read_to_string(&addresses).map_err(|e| e.to_string())?;
            serde_json::from_str(&text).map_err(|e| e.to_string())
        });
        self.grpc = Some(
            parsed["grpc"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("grpc address"),
        );
        self.admin = Some(
            parsed["admin"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .expect("admin address"),
        );
        self.daemon = Some(daemon);
    }

    /// Run `run` (with extra flags) expecting it to refuse to start: waits
    /// for its exit and returns the status and its output.
    pub fn start_refused(&mut self, extra: &[&str]) -> (ExitStatus, String) {
        assert!(self.daemon.is_none(), "control plane already running");
        self.starts += 1;
        let mut command = Command::new(binary("hotswap-control-plane"));
        command
            .args(["run", "--data-dir"])
            .arg(&self.data_dir)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--config",
            ])
            .arg(self.work.join("cp.toml"))
            .args(extra)
            .envs(self.env.iter().cloned());
        let log = self.work.join(format!("cp-{}.log", self.starts));
        let mut daemon = Daemon::spawn("control plane", command, log);
        let status = daemon.wait_exit();
        (status, daemon.log_text())
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.grpc.expect("control plane started"))
    }

    pub fn admin_profile(&self) -> PathBuf {
        self.data_dir.join("admin.profile.toml")
    }

    /// SIGTERM and assert a clean exit.
    pub fn stop(&mut self) {
        let status = self.daemon.as_mut().expect("running").stop();
        assert!(status.success(), "control plane exited with {status}");
        self.daemon = None;
    }

    /// SIGKILL: no cleanup at all.
    pub fn kill(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.kill();
        }
    }

    pub fn log(&self) -> String {
        self.daemon
            .as_ref()
            .map(Daemon::log_text)
            .unwrap_or_default()
    }

    /// Run `hotswapctl` with the admin profile against this control plane.
    pub fn ctl(&self, args: &[&str]) -> CtlOutput {
        self.ctl_with_profile(&self.admin_profile(), args)
    }

    pub fn ctl_with_profile(&self, profile: &Path, args: &[&str]) -> CtlOutput {
        let output = self
            .ctl_command(profile, &self.url(), args)
            .output()
            .expect("run hotswapctl");
        CtlOutput::from(output)
    }

    /// The `hotswapctl` command for `args` with `profile` against
    /// `endpoint` (this control plane's URL, or a proxy's), not started.
    pub fn ctl_command(&self, profile: &Path, endpoint: &str, args: &[&str]) -> Command {
        let mut command = Command::new(binary("hotswapctl"));
        command
            .arg("--profile")
            .arg(profile)
            .args(["--endpoint", endpoint])
            .args(args)
            .env("NO_COLOR", "1");
        command
    }

    /// A profile for another operator, signed by this control plane's CA
    /// (what `users create` will do over the API).
    pub fn operator_profile(&self, user: &str) -> PathBuf {
        self.user_profile(user, "admin")
    }

    /// `users create USER --role ROLE` with the admin profile; returns the
    /// written profile.
    pub fn user_profile(&self, user: &str, role: &str) -> PathBuf {
        let path = self.work.join(format!("{user}.profile.toml"));
        let out = path.to_str().expect("utf-8 path");
        let created = self.ctl(&["users", "create", user, "--role", role, "--out", out]);
        assert_eq!(created.code, 0, "users create {user}: {created:?}");
        path
    }

    /// A profile with a certificate minted straight from the CA, bypassing
    /// the user table (what a stolen CA key could produce).
    pub fn unregistered_profile(&self, user: &str) -> PathBuf {
        use hotswap_common::pki::{CertificateAuthority, Principal};
        let read = |f: &str| std::fs::read_to_string(self.data_dir.join(f)).expect("ca file");
        let ca = CertificateAuthority::from_pem(&read("ca.crt"), &read("ca.key")).expect("ca");
        let issued = ca
            .issue_client_with_new_key(
                &Principal::User(user.to_string()),
                Duration::from_secs(3600),
            )
            .expect("issue");
        let profile = Profile {
            endpoint: self.url(),
            ca_cert: read("ca.crt"),
            client_cert: issued.cert_pem,
            client_key: issued.key_pem,
        };
        let path = self.work.join(format!("{user}.minted.profile.toml"));
        profile.save(&path).expect("save profile");
        path
    }

    /// Create a join token; returns `(token, ca_fingerprint)`.
    pub fn token(&self, extra: &[&str]) -> (String, String) {
        let mut args = vec!["-o", "json", "tokens", "create"];
        args.extend_from_slice(extra);
        let json = self.ctl(&args).json();
        (
            json["token"].as_str().expect("token").to_string(),
            json["ca_fingerprint"]
                .as_str()
                .expect("fingerprint")
                .to_string(),
        )
    }

    /// `nodes list -o json`.
    pub fn nodes(&self) -> Vec<Value> {
        match self.ctl(&["-o", "json", "nodes", "list"]).json() {
            Value::Array(nodes) => nodes,
            other => panic!("nodes list is not an array: {other}"),
        }
    }

    /// Status of the node named `name`, if listed.
    pub fn node_status(&self, name: &str) -> Option<String> {
        self.nodes()
            .into_iter()
            .find(|n| n["name"] == name)
            .map(|n| n["status"].as_str().unwrap_or_default().to_string())
    }

    pub fn wait_status(&self, name: &str, status: &str) {
        eventually(&format!("node {name} to be {status}"), || {
            match self.node_status(name) {
                Some(s) if s == status => Ok(()),
                other => Err(format!("status is {other:?}")),
            }
        });
    }

    /// GET a path on the admin endpoint; returns `(status code, body)`.
    pub fn admin_get(&self, path: &str) -> (u16, String) {
        http_get(self.admin.expect("started"), path)
    }
}

/// Minimal HTTP/1.1 GET for the admin endpoints.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|e| panic!("{e}"))
}

/// As [`http_get`], with failures returned (for polling a daemon that may
/// be restarting).
pub fn try_http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let mut stream =
        std::net::TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| format!("timeout: {e}"))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
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

/// An agent with its own data directory.
pub struct Agent {
    pub name: String,
    pub data_dir: PathBuf,
    work: PathBuf,
    daemon: Option<Daemon>,
    starts: u32,
}

impl Agent {
    pub fn new(work: &Path, name: &str) -> Self {
        Self {
            name: name.to_string(),
            data_dir: work.join(format!("agent-{name}")),
            work: work.to_path_buf(),
            daemon: None,
            starts: 0,
        }
    }

    /// Start `hotswap-agent run` with extra flags (token, fingerprint, labels).
    pub fn start(&mut self, control_plane: &str, extra: &[&str]) {
        assert!(self.daemon.is_none(), "agent {} already running", self.name);
        self.starts += 1;
        let mut command = Command::new(binary("hotswap-agent"));
        command
            .args(["run", "--data-dir"])
            .arg(&self.data_dir)
            .args([
                "--control-plane",
                control_plane,
                "--name",
                &self.name,
                "--admin-listen",
                "127.0.0.1:0",
            ])
            .args(["--reconnect-base", "100ms", "--reconnect-max", "1s"])
            .args(extra);
        let log = self
            .work
            .join(format!("agent-{}-{}.log", self.name, self.starts));
        self.daemon = Some(Daemon::spawn(&format!("agent {}", self.name), command, log));
    }

    /// Start with a join token and CA fingerprint.
    pub fn enroll(&mut self, control_plane: &str, token: &str, fingerprint: &str, extra: &[&str]) {
        let mut args = vec!["--join-token", token, "--ca-fingerprint", fingerprint];
        args.extend_from_slice(extra);
        self.start(control_plane, &args);
    }

    /// Wait for the agent to exit on its own; returns its code and log.
    pub fn wait_exit(&mut self) -> (ExitStatus, String) {
        let daemon = self.daemon.as_mut().expect("running");
        let status = daemon.wait_exit();
        let log = daemon.log_text();
        self.daemon = None;
        (status, log)
    }

    pub fn stop(&mut self) -> ExitStatus {
        let status = self.daemon.as_mut().expect("running").stop();
        self.daemon = None;
        status
    }

    pub fn kill(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.kill();
        }
    }

    /// Send a signal to the running agent (SIGSTOP/SIGCONT in tests).
    pub fn signal(&mut self, signal: i32) {
        send_signal(self.daemon.as_mut().expect("running").child(), signal);
    }

    pub fn is_running(&mut self) -> bool {
        self.daemon.as_mut().is_some_and(|d| d.exited().is_none())
    }

    pub fn log(&self) -> String {
        self.daemon
            .as_ref()
            .map(Daemon::log_text)
            .unwrap_or_default()
    }

    /// Node id from the stored identity.
    pub fn node_id(&self) -> String {
        let text = std::fs::read_to_string(self.data_dir.join("identity/node.json"))
            .expect("identity present");
        let info: Value = serde_json::from_str(&text).expect("identity json");
        info["node_id"].as_str().expect("node_id").to_string()
    }

    /// A profile that uses this node's certificate, for negative tests.
    pub fn node_profile(&self, endpoint: &str) -> PathBuf {
        let read = |f: &str| {
            std::fs::read_to_string(self.data_dir.join("identity").join(f)).expect("identity file")
        };
        let profile = Profile {
            endpoint: endpoint.to_string(),
            ca_cert: read("ca.crt"),
            client_cert: read("node.crt"),
            client_key: read("node.key"),
        };
        let path = self.work.join(format!("node-{}.profile.toml", self.name));
        profile.save(&path).expect("save profile");
        path
    }

    /// The admin address the running agent published.
    pub fn admin(&self) -> SocketAddr {
        eventually("agent to publish its admin address", || {
            let text = std::fs::read_to_string(self.data_dir.join("run/addresses.json"))
                .map_err(|e| e.to_string())?;
            let json: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            json["admin"]
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| "no admin address".to_string())
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        // Module processes outlive agents by design; tests must not leak them.
        for pid in self.module_pids() {
            // SAFETY: kill(2) on a pid this agent recorded as its module instance.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
    }
}

impl Agent {
    /// Pids of the module processes this agent's state records.
    pub fn module_pids(&self) -> Vec<u32> {
        let Ok(text) = std::fs::read_to_string(self.data_dir.join("state.json")) else {
            return Vec::new();
        };
        let Ok(state) = serde_json::from_str::<Value>(&text) else {
            return Vec::new();
        };
        state["modules"]
            .as_object()
            .map(|modules| {
                modules
                    .values()
                    .filter_map(|m| m["instance"]["pid"].as_u64())
                    .map(|p| p as u32)
                    .collect()
            })
            .unwrap_or_default()
    }
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

/// A TCP proxy that forwards to `upstream` and cuts every connection after
/// `budget` bytes have gone from upstream to the client: a transfer broken
/// mid-way, deterministically.
pub struct CutProxy {
    pub addr: SocketAddr,
}

impl CutProxy {
    pub fn start(upstream: SocketAddr, budget: u64) -> Self {
        use std::io::{Read, Write};
        use std::net::{Shutdown, TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let (mut c_read, mut s_write) = (
                    client.try_clone().expect("clone"),
                    server.try_clone().expect("clone"),
                );
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_read, &mut s_write);
                    let _ = s_write.shutdown(Shutdown::Write);
                });
                let (mut s_read, mut c_write) = (server, client);
                std::thread::spawn(move || {
                    let mut sent = 0u64;
                    let mut buf = [0u8; 8192];
                    while sent < budget {
                        let n = match s_read.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n.min((budget - sent) as usize),
                        };
                        if c_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        sent += n as u64;
                    }
                    let _ = c_write.shutdown(Shutdown::Both);
                    let _ = s_read.shutdown(Shutdown::Both);
                });
            }
        });
        Self { addr }
    }
}

/// A TCP proxy that can partition the network between its clients and
/// `upstream`. While open it forwards both ways. [`PartitionProxy::partition`]
/// makes every connection silent: bytes are read and dropped in both
/// directions and nothing is closed, as when packets are lost on the way,
/// so each side has to notice the silence by itself. Connections made
/// during the partition are accepted and silent too. After
/// [`PartitionProxy::heal`] new connections forward again; the silenced ones
/// stay silent, like TCP connections whose peer gave up during the outage.
pub struct PartitionProxy {
    pub addr: SocketAddr,
    partitioned: std::sync::Arc<std::sync::atomic::AtomicBool>,
    connections:
        std::sync::Arc<std::sync::Mutex<Vec<std::sync::Weak<std::sync::atomic::AtomicBool>>>>,
}

impl PartitionProxy {
    pub fn start(upstream: SocketAddr) -> Self {
        use std::net::{TcpListener, TcpStream};
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex, Weak};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let partitioned = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<Weak<AtomicBool>>>> = Arc::default();
        let (flag, list) = (partitioned.clone(), connections.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let silent = Arc::new(AtomicBool::new(flag.load(Ordering::SeqCst)));
                {
                    let mut list = list.lock().unwrap_or_else(|e| e.into_inner());
                    list.retain(|w| w.strong_count() > 0);
                    list.push(Arc::downgrade(&silent));
                }
                if silent.load(Ordering::SeqCst) {
                    // Partitioned from the start: swallow, never connect.
                    std::thread::spawn(move || pump(client, None, silent));
                    continue;
                }
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let (client2, server2) = match (client.try_clone(), server.try_clone()) {
                    (Ok(c), Ok(s)) => (c, s),
                    _ => continue,
                };
                let silent2 = silent.clone();
                std::thread::spawn(move || pump(client, Some(server), silent));
                std::thread::spawn(move || pump(server2, Some(client2), silent2));
            }
        });
        Self {
            addr,
            partitioned,
            connections,
        }
    }

    /// `https://` URL of the proxy, for an agent's `--control-plane`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Cut every connection, present and future, silently.
    pub fn partition(&self) {
        use std::sync::atomic::Ordering;
        self.partitioned.store(true, Ordering::SeqCst);
        let list = self.connections.lock().unwrap_or_else(|e| e.into_inner());
        for connection in list.iter().filter_map(std::sync::Weak::upgrade) {
            connection.store(true, Ordering::SeqCst);
        }
    }

    /// Let new connections through again.
    pub fn heal(&self) {
        self.partitioned
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Copy `from` to `to` until either end closes; once `silent` is set, read
/// and drop instead (and close nothing).
fn pump(
    mut from: std::net::TcpStream,
    mut to: Option<std::net::TcpStream>,
    silent: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::io::{Read, Write};
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if silent.load(std::sync::atomic::Ordering::SeqCst) {
            continue;
        }
        if let Some(out) = to.as_mut()
            && out.write_all(&buf[..n]).is_err()
        {
            break;
        }
    }
    if !silent.load(std::sync::atomic::Ordering::SeqCst)
        && let Some(out) = to
    {
        let _ = out.shutdown(std::net::Shutdown::Write);
    }
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

/// Run `hotswapctl` without a control plane (offline commands).
pub fn ctl_offline(args: &[&str]) -> CtlOutput {
    CtlOutput::from(
        Command::new(binary("hotswapctl"))
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .expect("run hotswapctl"),
    )
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

/// A control plane, one enrolled agent and a trusted publisher key.
pub struct Fleet {
    pub cp: ControlPlane,
    pub agent: Agent,
    /// Further agents from [`Fleet::start_many`].
    pub others: Vec<Agent>,
    pub key: PathBuf,
    work: PathBuf,
}

impl Fleet {
    pub fn start(dir: &TestDir, agent_args: &[&str]) -> Self {
        Self::start_named(dir, "node-1", agent_args)
    }

    fn start_named(dir: &TestDir, name: &str, agent_args: &[&str]) -> Self {
        Self::start_named_with_settings(dir, name, agent_args, "")
    }

    fn start_named_with_settings(
        dir: &TestDir,
        name: &str,
        agent_args: &[&str],
        settings: &str,
    ) -> Self {
        let work = dir.path().to_path_buf();
        let mut cp = ControlPlane::init_with_settings(&work, settings);
        cp.start();
        let key_base = work.join("publisher");
        ctl_offline(&[
            "keys",
            "generate",
            "--out",
            key_base.to_str().expect("utf8"),
        ])
        .ok();
        let public = work.join("publisher.pub");
        let trusted = cp.ctl(&[
            "keys",
            "trust",
            public.to_str().expect("utf8"),
            "--name",
            "publisher",
        ]);
        assert_eq!(trusted.code, 0, "{trusted:?}");
        let (token, fp) = cp.token(&[]);
        let mut agent = Agent::new(&work, name);
        agent.enroll(&cp.url(), &token, &fp, agent_args);
        cp.wait_status(name, "connected");
        Self {
            cp,
            agent,
            others: Vec::new(),
            key: work.join("publisher.key"),
            work,
        }
    }

    /// A fleet of agents `names` in `environment`, each with a `port` label
    /// (module sockets use `${NODE_LABEL_port}`). Returns the ports by node.
    pub fn start_many(dir: &TestDir, environment: &str, names: &[&str]) -> (Self, Vec<u16>) {
        Self::start_many_with_settings(dir, environment, names, "")
    }

    /// As [`Fleet::start_many`], with extra lines for the control plane's
    /// settings file (e.g. `max_artifact_bytes`).
    pub fn start_many_with_settings(
        dir: &TestDir,
        environment: &str,
        names: &[&str],
        settings: &str,
    ) -> (Self, Vec<u16>) {
        let env_label = format!("environment={environment}");
        let first_port = free_port();
        let first_label = format!("port={first_port}");
        let mut fleet = Self::start_named_with_settings(
            dir,
            names[0],
            &["--label", &env_label, "--label", &first_label],
            settings,
        );
        let mut ports = vec![first_port];
        let (token, fp) = fleet.cp.token(&["--uses", "100"]);
        for name in &names[1..] {
            let port = free_port();
            let label = format!("port={port}");
            let mut agent = Agent::new(&fleet.work, name);
            agent.enroll(
                &fleet.cp.url(),
                &token,
                &fp,
                &["--label", &env_label, "--label", &label],
            );
            fleet.cp.wait_status(name, "connected");
            fleet.others.push(agent);
            ports.push(port);
        }
        (fleet, ports)
    }

    /// Push `hello@version` listening on each node's `port` label.
    pub fn push_hello_per_node(&self, version: &str, env: &str) {
        self.push_hello_per_node_starting(version, env, "3s");
    }

    /// As [`Fleet::push_hello_per_node`], with the health gate's `start_timeout`.
    pub fn push_hello_per_node_starting(&self, version: &str, env: &str, start_timeout: &str) {
        self.push("hello", version, |dir| {
            std::fs::create_dir_all(dir.join("bin")).expect("bin");
            std::fs::copy(binary("hello-server"), dir.join("bin/hello-server")).expect("copy hello-server");
            let addr = "127.0.0.1:${NODE_LABEL_port}";
            std::fs::write(
                dir.join("module.toml"),
                format!(
                    "name = \"hello\"\nversion = \"{version}\"\nruntime = \"process\"\n\n[process]\ncommand = [\"bin/hello-server\"]\nenv = {{ {env} }}\nstop_timeout = \"5s\"\n[[process.sockets]]\nname = \"http\"\nlisten = \"{addr}\"\n\n[health]\nhttp = \"http://{addr}/healthz\"\ninterval = \"100ms\"\ntimeout = \"1s\"\nhealthy_threshold = 1\nunhealthy_threshold = 2\nstart_timeout = \"{start_timeout}\"\n\n[metrics]\nprometheus = \"http://{addr}/metrics\"\n"
                ),
            )
            .expect("manifest");
        });
    }

    /// Enroll one more agent in `environment`; returns its port label.
    pub fn add_node(&mut self, name: &str, environment: &str) -> u16 {
        let (token, fp) = self.cp.token(&[]);
        let port = free_port();
        let (env_label, port_label) =
            (format!("environment={environment}"), format!("port={port}"));
        let mut agent = Agent::new(&self.work, name);
        agent.enroll(
            &self.cp.url(),
            &token,
            &fp,
            &["--label", &env_label, "--label", &port_label],
        );
        self.cp.wait_status(name, "connected");
        self.others.push(agent);
        port
    }

    /// Every agent of the fleet.
    pub fn agents(&self) -> Vec<&Agent> {
        std::iter::once(&self.agent)
            .chain(self.others.iter())
            .collect()
    }

    /// The active version of `module` on `node`, as reported.
    pub fn version_on(&self, node: &str, module: &str) -> String {
        let node = self.cp.ctl(&["-o", "json", "nodes", "get", node]).json();
        node["modules"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == module))
            .and_then(|m| m["version"].as_str())
            .unwrap_or_default()
            .to_string()
    }

    /// Pack and push a module directory prepared by `fill`.
    pub fn push(&self, name: &str, version: &str, fill: impl FnOnce(&Path)) {
        let src = self.work.join(format!("src-{name}-{version}"));
        std::fs::create_dir_all(&src).expect("module dir");
        fill(&src);
        let out = self.work.join(format!("{name}-{version}.hsm"));
        let packed = ctl_offline(&[
            "module",
            "pack",
            src.to_str().expect("utf8"),
            "--key",
            self.key.to_str().expect("utf8"),
            "-o",
            out.to_str().expect("utf8"),
        ]);
        assert_eq!(packed.code, 0, "{packed:?}");
        let pushed = self
            .cp
            .ctl(&["module", "push", out.to_str().expect("utf8")]);
        assert_eq!(pushed.code, 0, "{pushed:?}");
    }

    /// Push `hello@version`: the example HTTP server on `port`; `env` lines
    /// go into `[process] env`, `extra` is appended to the manifest.
    pub fn push_hello(&self, version: &str, port: u16, env: &str, start_timeout: &str) {
        self.push_hello_swap(version, port, env, start_timeout, "start-first");
    }

    /// As [`Fleet::push_hello`], with the swap strategy given.
    pub fn push_hello_swap(
        &self,
        version: &str,
        port: u16,
        env: &str,
        start_timeout: &str,
        swap: &str,
    ) {
        self.push("hello", version, |dir| {
            std::fs::create_dir_all(dir.join("bin")).expect("bin");
            std::fs::copy(binary("hello-server"), dir.join("bin/hello-server")).expect("copy hello-server");
            std::fs::write(
                dir.join("module.toml"),
                format!(
                    "name = \"hello\"\nversion = \"{version}\"\nruntime = \"process\"\n\n[process]\ncommand = [\"bin/hello-server\"]\nenv = {{ {env} }}\nswap = \"{swap}\"\nstop_timeout = \"5s\"\n[[process.sockets]]\nname = \"http\"\nlisten = \"127.0.0.1:{port}\"\n\n[health]\nhttp = \"http://127.0.0.1:{port}/healthz\"\ninterval = \"100ms\"\ntimeout = \"1s\"\nhealthy_threshold = 1\nunhealthy_threshold = 2\nstart_timeout = \"{start_timeout}\"\n\n[metrics]\nprometheus = \"http://127.0.0.1:{port}/metrics\"\n"
                ),
            )
            .expect("manifest");
        });
    }

    pub fn set(&self, node: &str, module_at_version: &str, extra: &[&str]) {
        let mut args = vec!["nodes", "set-module", node, module_at_version];
        args.extend_from_slice(extra);
        let out = self.cp.ctl(&args);
        assert_eq!(out.code, 0, "{out:?}");
    }

    /// The node's report for one module (`nodes get -o json`).
    pub fn module(&self, name: &str) -> Option<Value> {
        let node = self
            .cp
            .ctl(&["-o", "json", "nodes", "get", "node-1"])
            .json();
        node["modules"]
            .as_array()?
            .iter()
            .find(|m| m["name"] == name)
            .cloned()
    }

    /// Wait until the module's report satisfies `check`.
    pub fn wait_module(&self, name: &str, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        eventually(what, || match self.module(name) {
            Some(m) if check(&m) => Ok(m),
            other => Err(format!("module report: {other:?}")),
        })
    }

    /// Wait until `name` runs `version`, healthy, with the desired state observed.
    pub fn wait_running(&self, name: &str, version: &str) -> Value {
        eventually(&format!("{name}@{version} running and observed"), || {
            let node = self
                .cp
                .ctl(&["-o", "json", "nodes", "get", "node-1"])
                .json();
            let module = node["modules"]
                .as_array()
                .and_then(|ms| ms.iter().find(|m| m["name"] == name))
                .cloned();
            match module {
                Some(m)
                    if m["version"] == version
                        && m["phase"] == "running"
                        && node["observed_generation"] == node["desired_generation"] =>
                {
                    Ok(m)
                }
                other => Err(format!(
                    "module {other:?}, generations {} / {}",
                    node["observed_generation"], node["desired_generation"]
                )),
            }
        })
    }
}

/// Continuous HTTP load: one new connection per request, counting failures.
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
        use std::io::{Read, Write};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut stats = LoadStats::default();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
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
            .args(["--name-prefix", name, "--stats-every", "1s"]);
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

impl ControlPlane {
    /// Pid of the running control plane (from `run/addresses.json`).
    pub fn pid(&self) -> u32 {
        self.daemon
            .as_ref()
            .and_then(|d| d.child.as_ref())
            .map_or(0, Child::id)
    }
}

impl Agent {
    /// Pid of the running agent (0 when stopped).
    pub fn pid(&self) -> u32 {
        self.daemon
            .as_ref()
            .and_then(|d| d.child.as_ref())
            .map_or(0, Child::id)
    }
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

/// A TCP proxy that forwards server→client freely and client→server at
/// about `bytes_per_second`, and stops forwarding client→server (without
/// closing anything) once `stall_after` bytes went through: a slow link,
/// and an upload that stalls while the connection stays up.
pub struct ThrottleProxy {
    pub addr: SocketAddr,
}

impl ThrottleProxy {
    pub fn start(upstream: SocketAddr, bytes_per_second: u64, stall_after: Option<u64>) -> Self {
        use std::io::{Read, Write};
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                let (Ok(mut c_read), Ok(mut s_write)) = (client.try_clone(), server.try_clone())
                else {
                    continue;
                };
                std::thread::spawn(move || {
                    // Ten slices a second.
                    let slice = (bytes_per_second / 10).max(1) as usize;
                    let mut buf = vec![0u8; slice];
                    let mut sent = 0u64;
                    loop {
                        if stall_after.is_some_and(|limit| sent >= limit) {
                            // Hold the connection open, forward nothing.
                            std::thread::sleep(Duration::from_secs(3600));
                            return;
                        }
                        let want = stall_after
                            .map_or(slice as u64, |limit| (limit - sent).min(slice as u64))
                            as usize;
                        let n = match c_read.read(&mut buf[..want]) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if s_write.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        sent += n as u64;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    let _ = s_write.shutdown(std::net::Shutdown::Write);
                });
                let (mut s_read, mut c_write) = (server, client);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s_read, &mut c_write);
                    let _ = c_write.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Self { addr }
    }

    /// `https://` URL of the proxy, for `hotswapctl --endpoint`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

/// Whether this process may mount file systems (root with CAP_SYS_ADMIN).
pub fn can_mount() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run_tool(command: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(command)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{command}: {e}"))
}

/// A small tmpfs mounted for one test, unmounted on drop.
pub struct SmallDisk {
    path: PathBuf,
}

impl SmallDisk {
    pub fn mount(path: &Path, size: &str) -> Self {
        std::fs::create_dir_all(path).expect("mount point");
        let out = run_tool(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                path.to_str().expect("utf8"),
            ],
        );
        assert!(out.status.success(), "mount: {out:?}");
        Self {
            path: path.to_path_buf(),
        }
    }

    /// Fill the file system to the last byte; the filler's path.
    pub fn fill(&self) -> PathBuf {
        let filler = self.path.join("filler");
        let mut file = std::fs::File::create(&filler).expect("filler");
        let block = vec![0xa5u8; 64 * 1024];
        let mut size = block.len();
        // Large blocks first, then smaller ones for the tail.
        while size > 0 {
            match std::io::Write::write_all(&mut file, &block[..size]) {
                Ok(()) => {}
                Err(_) => size /= 2,
            }
        }
        let _ = file.sync_all();
        filler
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = run_tool("umount", &["-l", self.path.to_str().unwrap_or_default()]);
    }
}

/// A current-thread tokio runtime for a test's own gRPC calls.
pub fn runtime() -> tokio::runtime::Runtime {
    hotswap_common::install_crypto_provider();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A lazy mTLS channel to `url` with the CA and client certificate of the
/// profile at `profile` (an operator's, or a node's from `Agent::node_profile`).
pub fn channel_for(profile: &Path, url: &str) -> tonic::transport::Channel {
    use hotswap_common::tls::{self, ClientIdentity, ControlPlaneUrl, ServerTrust};
    let profile = Profile::load(profile).expect("profile");
    let config = tls::client_config(
        ServerTrust::Ca(profile.ca_cert.clone()),
        Some(ClientIdentity {
            cert_pem: &profile.client_cert,
            key_pem: &profile.client_key,
        }),
    )
    .expect("tls config");
    tls::connect_lazy(
        &ControlPlaneUrl::parse(url).expect("url"),
        config,
        &Default::default(),
    )
    .expect("channel")
}

impl ControlPlane {
    /// One sample of `name` (with its labels, as `/metrics` prints them)
    /// from the control plane's `/metrics`; panics when it is missing.
    pub fn metric(&self, name: &str) -> f64 {
        let (code, metrics) = self.admin_get("/metrics");
        assert_eq!(code, 200, "{metrics}");
        metrics
            .lines()
            .find(|l| l.rsplit_once(' ').map(|(n, _)| n) == Some(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    }
}
