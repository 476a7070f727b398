//! Agents under test, and a `Fleet`: a control plane, enrolled agents and a
//! trusted publisher key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};

use hotswap_common::profile::Profile;
use serde_json::Value;

use crate::control_plane::{ControlPlane, ctl_offline};
use crate::daemon::{Daemon, TestDir, binary, eventually, free_port, send_signal};

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
            // One compile of each test component per machine, not per test
            // agent (seconds of CPU each); an explicit flag in `extra` wins.
            .env("HOTSWAP_WASM_CACHE_DIR", shared_wasm_cache())
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

impl Agent {
    /// Pid of the running agent (0 when stopped).
    pub fn pid(&self) -> u32 {
        self.daemon
            .as_ref()
            .and_then(|d| d.child.as_ref())
            .map_or(0, Child::id)
    }
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

/// The compiled-component cache every test agent shares, under the
/// target directory (`target/wasm-fixtures/compiled`).
pub fn shared_wasm_cache() -> PathBuf {
    binary("hotswap-agent")
        .parent()
        .and_then(Path::parent)
        .map(|target| target.join("wasm-fixtures").join("compiled"))
        .expect("target directory")
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

    /// A fleet made elsewhere: `cp` (already trusting the public half of
    /// `key`, e.g. one replica of several) and its enrolled agents, so the
    /// module helpers work on it.
    pub fn of(
        cp: ControlPlane,
        agent: Agent,
        others: Vec<Agent>,
        key: PathBuf,
        work: &Path,
    ) -> Self {
        Self {
            cp,
            agent,
            others,
            key,
            work: work.to_path_buf(),
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
        crate::load::pack_dir(&src, &self.key, &out);
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
