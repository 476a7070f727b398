//! A real etcd cluster for tests: `/usr/bin/etcd` members (Debian's
//! etcd-server, installed by `scripts/ci-deps.sh`) on loopback ports, each
//! with its data directory in the cluster's temp dir; members can be killed
//! and restarted, and all of them stop when the handle drops. A cluster
//! may speak TLS on its client port ([`EtcdCluster::start_tls`]), with
//! certificates made here with rcgen; peers stay on plain
//! http, which the client never sees.

use std::path::{Path, PathBuf};
use std::process::Command;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use crate::daemon::{Daemon, TestDir, eventually, free_port, try_http_get};

/// The etcd binary of Debian's `etcd-server` package.
pub const ETCD_BINARY: &str = "/usr/bin/etcd";

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    /// Where `/health` is polled: the client port for a plain cluster; a
    /// plain-http metrics port for a TLS one, so the harness needs no TLS
    /// client of its own.
    health_port: u16,
    data_dir: PathBuf,
    daemon: Option<Daemon>,
}

/// The PEM files of a TLS cluster, in its temp dir: the CA that signed the
/// members' server certificate (valid for `127.0.0.1` and `localhost`), and
/// a client certificate and key from the same CA, for `--client-cert-auth`.
#[derive(Debug, Clone)]
pub struct EtcdTlsFiles {
    pub ca_file: PathBuf,
    pub client_cert_file: PathBuf,
    pub client_key_file: PathBuf,
    server_cert_file: PathBuf,
    server_key_file: PathBuf,
    /// Whether members require a client certificate signed by the CA.
    pub client_cert_auth: bool,
}

impl EtcdTlsFiles {
    /// Make a CA, the members' server certificate and a client certificate
    /// with rcgen, and write them under `dir`.
    ///
    /// The server certificate is for client authentication too: with
    /// `--client-cert-auth`, etcd 3.4's HTTP gateway dials its own client
    /// port with its `--cert-file` (3.4 has no separate client certificate
    /// option), and refuses itself a certificate without that usage.
    fn generate(dir: &Path, client_cert_auth: bool) -> Self {
        let key = || KeyPair::generate().expect("generate a key");
        let ca_key = key();
        let mut ca_params = CertificateParams::default();
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "hotswap test etcd CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params
            .self_signed(&ca_key)
            .expect("self-sign the etcd CA");
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf = |names: Vec<String>, usages: Vec<ExtendedKeyUsagePurpose>| {
            let key = key();
            let mut params = CertificateParams::new(names).expect("certificate names");
            params.is_ca = IsCa::ExplicitNoCa;
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            params.extended_key_usages = usages;
            let cert = params.signed_by(&key, &issuer).expect("sign a certificate");
            (cert.pem(), key.serialize_pem())
        };
        let (server_cert, server_key) = leaf(
            vec!["127.0.0.1".to_string(), "localhost".to_string()],
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        );
        let (client_cert, client_key) = leaf(
            vec!["etcd-test-client".to_string()],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
        );

        let tls_dir = dir.join("etcd-tls");
        std::fs::create_dir_all(&tls_dir).expect("create the etcd TLS dir");
        let write = |name: &str, text: &str| {
            let path = tls_dir.join(name);
            std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
            path
        };
        Self {
            ca_file: write("ca.pem", &ca_cert.pem()),
            client_cert_file: write("client.pem", &client_cert),
            client_key_file: write("client-key.pem", &client_key),
            server_cert_file: write("server.pem", &server_cert),
            server_key_file: write("server-key.pem", &server_key),
            client_cert_auth,
        }
    }
}

/// A running etcd cluster. Members are stopped (SIGKILL) before the temp
/// dir is removed: fields drop in order.
pub struct EtcdCluster {
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    tls: Option<EtcdTlsFiles>,
    /// Flags every member starts with, beyond the harness's own.
    extra: Vec<String>,
    dir: TestDir,
}

impl EtcdCluster {
    /// Start `members` members and wait until every one reports healthy.
    pub fn start(members: usize) -> Self {
        Self::start_with(members, None)
    }

    /// Start `members` members serving clients over TLS only (`https://`
    /// endpoints), with certificates made for the cluster (see
    /// [`Self::tls`]); with `client_cert_auth`, members refuse clients
    /// without a certificate from the cluster's CA.
    pub fn start_tls(members: usize, client_cert_auth: bool) -> Self {
        Self::start_with(members, Some(client_cert_auth))
    }

    /// As [`Self::start`], every member also given `extra` flags (a
    /// benchmark raising `--max-request-bytes`).
    pub fn start_with_flags(members: usize, extra: &[&str]) -> Self {
        Self::start_configured(members, None, extra.iter().map(|s| s.to_string()).collect())
    }

    fn start_with(members: usize, tls: Option<bool>) -> Self {
        Self::start_configured(members, tls, Vec::new())
    }

    fn start_configured(members: usize, tls: Option<bool>, extra: Vec<String>) -> Self {
        assert!(
            Path::new(ETCD_BINARY).exists(),
            "{ETCD_BINARY} not found: install Debian's etcd-server with `sudo bash scripts/ci-deps.sh`"
        );
        assert!(members > 0, "an etcd cluster needs at least one member");
        let dir = TestDir::new();
        let tls = tls.map(|client_cert_auth| EtcdTlsFiles::generate(dir.path(), client_cert_auth));
        let members: Vec<Member> = (0..members)
            .map(|i| {
                let client_port = free_port();
                Member {
                    name: format!("m{i}"),
                    client_port,
                    peer_port: free_port(),
                    health_port: if tls.is_some() {
                        free_port()
                    } else {
                        client_port
                    },
                    data_dir: dir.path().join(format!("etcd-m{i}")),
                    daemon: None,
                }
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
            tls,
            extra,
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
        let client_url = self.endpoint(i);
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
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            .args(&self.extra);
        if let Some(tls) = &self.tls {
            let metrics_url = format!("http://127.0.0.1:{}", member.health_port);
            command
                .arg("--cert-file")
                .arg(&tls.server_cert_file)
                .arg("--key-file")
                .arg(&tls.server_key_file)
                .args(["--listen-metrics-urls", &metrics_url]);
            if tls.client_cert_auth {
                command
                    .arg("--trusted-ca-file")
                    .arg(&tls.ca_file)
                    .arg("--client-cert-auth");
            }
        }
        let log = self.dir.path().join(format!("etcd-{}.log", member.name));
        let daemon = Daemon::spawn(&format!("etcd {}", member.name), command, log);
        self.members[i].daemon = Some(daemon);
    }

    fn wait_healthy(&mut self, i: usize) {
        let port = self.members[i].health_port;
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

    /// Member `i`'s client URL, `https://` when the cluster speaks TLS.
    pub fn endpoint(&self, i: usize) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.members[i].client_port)
    }

    /// The certificate files of a cluster started with [`Self::start_tls`].
    pub fn tls(&self) -> Option<&EtcdTlsFiles> {
        self.tls.as_ref()
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

    /// Pid of member `i` while it runs (benchmarks read its CPU time).
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.members[i]
            .daemon
            .as_ref()
            .and_then(|d| d.child.as_ref())
            .map(std::process::Child::id)
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

/// The agent sessions the replicas publish on etcd (under the default
/// prefix, `/hotswap/sessions/<node_id>`): node id to the name of the
/// replica holding the session.
pub fn session_records(endpoints: &str) -> std::collections::BTreeMap<String, String> {
    crate::control_plane::runtime().block_on(async {
        let config = hotswap_etcd::ClientConfig::from_list(endpoints).expect("endpoints");
        let client = hotswap_etcd::Client::connect(config)
            .await
            .expect("connect to etcd");
        let prefix = "/hotswap/sessions/";
        let (_, kvs) = client.range(prefix.as_bytes()).await.expect("range");
        kvs.into_iter()
            .map(|kv| {
                let node = String::from_utf8_lossy(&kv.key[prefix.len()..]).into_owned();
                let record: serde_json::Value =
                    serde_json::from_slice(&kv.value).expect("record json");
                (
                    node,
                    record["replica"].as_str().unwrap_or_default().to_string(),
                )
            })
            .collect()
    })
}
