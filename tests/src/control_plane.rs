//! The control plane under test: `init`, start and stop, its settings,
//! `hotswapctl` runs against it, and gRPC channels for a test's own calls.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use hotswap_common::profile::Profile;
use serde_json::Value;

use crate::daemon::{CtlOutput, Daemon, binary, eventually, http_get};

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
    pub(crate) work: PathBuf,
    daemon: Option<Daemon>,
    pub grpc: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    starts: u32,
    /// Extra environment for this control plane's next starts.
    env: Vec<(String, String)>,
    /// Flags every `run` of this control plane gets (a replica's store).
    run_args: Vec<String>,
    /// Log of the last start.
    log_name: String,
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
            run_args: Vec::new(),
            log_name: "cp".into(),
        }
    }

    /// `init` a replica's data dir `work/NAME` for a cluster on etcd
    /// (`endpoints`) with artifacts in `s3`'s bucket, and fix its gRPC
    /// port so agents and clients can list it before it serves.
    pub fn init_on_etcd(work: &Path, name: &str, endpoints: &str, s3: &crate::SeaweedS3) -> Self {
        let data_dir = work.join(name);
        let blobs = format!("s3://{}", s3.bucket);
        let output = Command::new(binary("hotswap-control-plane"))
            .args(["init", "--data-dir"])
            .arg(&data_dir)
            .args(["--etcd-endpoints", endpoints, "--blobs", &blobs])
            .args(["--s3-endpoint", &s3.endpoint])
            .envs(crate::s3::credentials())
            .output()
            .expect("run init");
        assert!(
            output.status.success(),
            "init on etcd failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        std::fs::write(work.join("cp.toml"), settings_with("")).expect("write settings");
        let run_args = [
            "--etcd-endpoints",
            endpoints,
            "--blobs",
            &blobs,
            "--s3-endpoint",
            &s3.endpoint,
            "--name",
            name,
        ]
        .map(String::from)
        .to_vec();
        let port = crate::free_port();
        Self {
            data_dir,
            work: work.to_path_buf(),
            daemon: None,
            grpc: Some(SocketAddr::from(([127, 0, 0, 1], port))),
            admin: None,
            starts: 0,
            env: crate::s3::credentials(),
            run_args,
            log_name: name.to_string(),
        }
    }

    /// Another replica of the same cluster: a copy of this one's data dir
    /// (the PKI, as `cp -r` gives an operator) in `work/NAME`, on a port of
    /// its own.
    pub fn replica(&self, name: &str) -> Self {
        let data_dir = self.work.join(name);
        let copied = Command::new("cp")
            .arg("-r")
            .arg(&self.data_dir)
            .arg(&data_dir)
            .status()
            .expect("cp -r");
        assert!(copied.success(), "cp -r of the data dir");
        let _ = std::fs::remove_dir_all(data_dir.join("run"));
        let mut run_args = self.run_args.clone();
        if let Some(at) = run_args.iter().position(|a| a == "--name") {
            run_args[at + 1] = name.to_string();
        }
        Self {
            data_dir,
            work: self.work.clone(),
            daemon: None,
            grpc: Some(SocketAddr::from(([127, 0, 0, 1], crate::free_port()))),
            admin: None,
            starts: 0,
            env: self.env.clone(),
            run_args,
            log_name: name.to_string(),
        }
    }

    /// Reach etcd at `endpoints` (comma-separated) from this replica's next
    /// start on, instead of the cluster's own URLs: through a proxy per
    /// member, so a test can cut this replica off from etcd alone.
    pub fn set_etcd_endpoints(&mut self, endpoints: &str) {
        let at = self
            .run_args
            .iter()
            .position(|a| a == "--etcd-endpoints")
            .expect("a replica on etcd");
        self.run_args[at + 1] = endpoints.to_string();
    }

    /// Give `flag` this `value` from this replica's next start on
    /// (replacing the value it has, e.g. `--name`, or adding the flag).
    pub fn set_run_arg(&mut self, flag: &str, value: &str) {
        match self.run_args.iter().position(|a| a == flag) {
            Some(at) => self.run_args[at + 1] = value.to_string(),
            None => self.run_args.extend([flag.to_string(), value.to_string()]),
        }
    }

    /// Start a replica expecting it to refuse to start: waits for its exit
    /// and returns the status and its log.
    pub fn start_replica_refused(&mut self) -> (ExitStatus, String) {
        self.start_replica();
        let mut daemon = self.daemon.take().expect("started");
        let status = daemon.wait_exit();
        (status, daemon.log_text())
    }

    /// Start a replica that may have to wait for leadership: spawned, not
    /// waited for (see [`ControlPlane::wait_serving`]).
    pub fn start_replica(&mut self) {
        assert!(self.daemon.is_none(), "control plane already running");
        let addresses = self.data_dir.join("run/addresses.json");
        let _ = std::fs::remove_file(&addresses);
        let listen = self.grpc.expect("a replica has a fixed port").to_string();
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
            .args(&self.run_args)
            .envs(self.env.iter().cloned());
        let log = self
            .work
            .join(format!("{}-{}.log", self.log_name, self.starts));
        self.daemon = Some(Daemon::spawn("control plane", command, log));
    }

    /// Wait until a started replica serves (it leads), within `patience`.
    pub fn wait_serving(&mut self) {
        let addresses = self.data_dir.join("run/addresses.json");
        let daemon = self.daemon.as_mut().expect("started");
        let parsed: Value = eventually("the replica to serve", || {
            if let Some(status) = daemon.exited() {
                panic!("replica exited with {status}:\n{}", daemon.log_text());
            }
            let text = std::fs::read_to_string(&addresses).map_err(|e| e.to_string())?;
            serde_json::from_str(&text).map_err(|e| e.to_string())
        });
        self.admin = parsed["admin"].as_str().and_then(|s| s.parse().ok());
    }

    /// Whether this replica serves now (published its addresses).
    pub fn is_serving(&self) -> bool {
        self.data_dir.join("run/addresses.json").exists()
    }

    /// Set `name=value` in the environment of this control plane from its
    /// next start on (e.g. `LD_PRELOAD` of libfaketime in the chaos suite).
    /// Run under libfaketime (`library`) from the next start: the wall
    /// clock follows the offset written in `offset_file` (re-read on every
    /// call), the monotonic clock is left alone, as an NTP step leaves it.
    pub fn follow_clock_offset(&mut self, library: &Path, offset_file: &Path) {
        self.set_env("LD_PRELOAD", library.to_str().expect("utf8"));
        self.set_env(
            "FAKETIME_TIMESTAMP_FILE",
            offset_file.to_str().expect("utf8"),
        );
        self.set_env("FAKETIME_NO_CACHE", "1");
        self.set_env("FAKETIME_DONT_FAKE_MONOTONIC", "1");
    }

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
            .args(&self.run_args)
            .args(extra)
            .envs(self.env.iter().cloned());
        let log = self
            .work
            .join(format!("{}-{}.log", self.log_name, self.starts));
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

    /// SIGTERM without waiting: the graceful stop begins (see
    /// [`ControlPlane::wait_stopped`]).
    pub fn terminate(&mut self) {
        let daemon = self.daemon.as_mut().expect("running");
        crate::daemon::send_signal(daemon.child(), libc::SIGTERM);
    }

    /// Wait for the exit a [`ControlPlane::terminate`] began and assert it
    /// was clean.
    pub fn wait_stopped(&mut self) {
        let status = self.daemon.as_mut().expect("running").wait_exit();
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
        CtlOutput::of(output)
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

    /// Whether this replica leads now (`hotswap_leader` is 1); false while
    /// it cannot be asked (restarting, not started).
    pub fn leads(&self) -> bool {
        let Some(admin) = self.admin else {
            return false;
        };
        crate::daemon::try_http_get(admin, "/metrics").is_ok_and(|(code, body)| {
            code == 200 && body.lines().any(|l| l.trim() == "hotswap_leader 1")
        })
    }
}

/// Run `hotswapctl` without a control plane (offline commands).
pub fn ctl_offline(args: &[&str]) -> CtlOutput {
    CtlOutput::of(
        Command::new(binary("hotswapctl"))
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .expect("run hotswapctl"),
    )
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
