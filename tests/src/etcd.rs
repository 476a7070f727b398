//! A real etcd cluster for tests: `/usr/bin/etcd` members (Debian's
//! etcd-server, installed by `scripts/ci-deps.sh`) on loopback ports, each
//! with its data directory in the cluster's temp dir; members can be killed
//! and restarted, and all of them stop when the handle drops.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::daemon::{Daemon, TestDir, eventually, free_port, try_http_get};

/// The etcd binary of Debian's `etcd-server` package.
pub const ETCD_BINARY: &str = "/usr/bin/etcd";

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    daemon: Option<Daemon>,
}

/// A running etcd cluster. Members are stopped (SIGKILL) before the temp
/// dir is removed: fields drop in order.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    dir: TestDir,
}

impl EtcdCluster {
    /// Start `members` members and wait until every one reports healthy.
    pub fn start(members: usize) -> Self {
        assert!(
            Path::new(ETCD_BINARY).exists(),
            "{ETCD_BINARY} not found: install Debian's etcd-server with `sudo bash scripts/ci-deps.sh`"
        );
        assert!(members > 0, "an etcd cluster needs at least one member");
        let dir = TestDir::new();
        let members: Vec<Member> = (0..members)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                data_dir: dir.path().join(format!("etcd-m{i}")),
                daemon: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!(
            "hotswap-test-{}-{}",
            std::process::id(),
            members[0].client_port
        );
        let mut cluster = Self {
            members,
            initial_cluster,
            token,
            dir,
        };
        for i in 0..cluster.members.len() {
            cluster.spawn(i);
        }
        for i in 0..cluster.members.len() {
            cluster.wait_healthy(i);
        }
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let member = &self.members[i];
        let client_url = format!("http://127.0.0.1:{}", member.client_port);
        let peer_url = format!("http://127.0.0.1:{}", member.peer_port);
        let mut command = Command::new(ETCD_BINARY);
        command
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&member.data_dir)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            // Ignored when the data dir exists, so a restart rejoins.
            .args(["--initial-cluster-state", "new"])
            // Loopback round trips are well under a millisecond: elect a
            // new leader within about half a second of losing one, instead
            // of etcd's default second, to keep failover tests short.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        let log = self.dir.path().join(format!("etcd-{}.log", member.name));
        let daemon = Daemon::spawn(&format!("etcd {}", member.name), command, log);
        self.members[i].daemon = Some(daemon);
    }

    fn wait_healthy(&mut self, i: usize) {
        let port = self.members[i].client_port;
        let name = self.members[i].name.clone();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        eventually(&format!("etcd member {name} healthy"), || {
            if let Some(daemon) = self.members[i].daemon.as_mut()
                && let Some(status) = daemon.exited()
            {
                panic!("etcd member {name} exited: {status}");
            }
            match try_http_get(addr, "/health")? {
                (200, body) if body.contains("\"health\":\"true\"") => Ok(()),
                (code, body) => Err(format!("{code}: {body}")),
            }
        });
    }

    /// How many members the cluster has (running or not).
    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Member `i`'s client URL.
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.members[i].client_port)
    }

    /// Every member's client URL, comma-separated.
    pub fn endpoints(&self) -> String {
        (0..self.members.len())
            .map(|i| self.endpoint(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The member whose client URL is `url`.
    pub fn index_of(&self, url: &str) -> Option<usize> {
        (0..self.members.len()).find(|&i| self.endpoint(i) == url.trim_end_matches('/'))
    }

    /// SIGKILL member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut daemon) = self.members[i].daemon.take() {
            daemon.kill();
        }
    }

    /// Start member `i` again on its data dir and wait until it is healthy
    /// (it has rejoined and sees a leader).
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
        self.wait_healthy(i);
    }

    /// Member `i`'s log.
    pub fn log(&self, i: usize) -> String {
        self.members[i]
            .daemon
            .as_ref()
            .map(Daemon::log_text)
            .unwrap_or_default()
    }
}
