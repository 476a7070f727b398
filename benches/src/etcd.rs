//! Peer measurements against etcd, the store fleets most often lean on for
//! liveness and change delivery, run on the same machine in the same way as
//! ours (Debian's `etcd-server`, installed by `scripts/bench-deps.sh`):
//!
//! - `etcd-leases`: N clients, each on its own mTLS connection, each with a
//!   lease and a keep-alive stream sending every `--keepalive` (an agent's
//!   session with its heartbeats); etcd's memory per stream and CPU;
//! - `etcd-fanout`: N watchers, each on its own mTLS connection, and one put
//!   of a `--value-kib` value; the time until every watcher has it.
//!
//! etcd runs with TLS 1.3 and client-certificate authentication, certificates
//! from a CA made with our own PKI code, a data dir in a temp dir, and its
//! default settings otherwise. The clients use our TLS connector (rustls,
//! ring), so both sides of both comparisons pay the same crypto.

use std::net::IpAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hotswap_common::pki::{CertificateAuthority, Principal};
use hotswap_common::tls::{self, ChannelOptions, ClientIdentity, ControlPlaneUrl, ServerTrust};
use hotswap_tests::{TestDir, free_port};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::{cpu_seconds, machine, round, rss_kib};

/// etcd's v3 stubs, shared with the HA store's client.
pub use hotswap_etcd::pb;

/// The etcd binary of Debian's `etcd-server` package.
const ETCD: &str = "/usr/bin/etcd";

/// A running etcd with its certificates.
struct Etcd {
    child: Child,
    url: ControlPlaneUrl,
    client: Arc<rustls::ClientConfig>,
    _dir: TestDir,
}

impl Etcd {
    fn start() -> anyhow::Result<Self> {
        if !std::path::Path::new(ETCD).exists() {
            bail!("{ETCD} not found: run scripts/bench-deps.sh (installs Debian's etcd-server)");
        }
        let dir = TestDir::new();
        let (ca, ca_pems) = CertificateAuthority::generate("bench etcd ca")?;
        let server = ca.issue_server(
            &["127.0.0.1".to_string(), "localhost".to_string()],
            Duration::from_secs(86_400),
        )?;
        let client = ca.issue_client_with_new_key(
            &Principal::User("bench".into()),
            Duration::from_secs(86_400),
        )?;
        let write = |name: &str, text: &str| -> anyhow::Result<String> {
            let path = dir.path().join(name);
            std::fs::write(&path, text)?;
            Ok(path.display().to_string())
        };
        let ca_file = write("ca.crt", &ca_pems.cert_pem)?;
        let cert_file = write("server.crt", &server.cert_pem)?;
        let key_file = write("server.key", &server.key_pem)?;
        let (client_port, peer_port) = (free_port(), free_port());
        let log = std::fs::File::create(dir.path().join("etcd.log"))?;
        let child = Command::new(ETCD)
            .args(["--name", "bench"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg(format!(
                "--listen-client-urls=https://127.0.0.1:{client_port}"
            ))
            .arg(format!(
                "--advertise-client-urls=https://127.0.0.1:{client_port}"
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
            ))
            .arg(format!(
                "--initial-cluster=bench=http://127.0.0.1:{peer_port}"
            ))
            .arg(format!("--cert-file={cert_file}"))
            .arg(format!("--key-file={key_file}"))
            .arg(format!("--trusted-ca-file={ca_file}"))
            .arg("--client-cert-auth")
            // Room for the fan-out value and the connections.
            .arg("--max-request-bytes=10485760")
            .arg("--max-concurrent-streams=4294967295")
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting {ETCD}"))?;
        let url = ControlPlaneUrl::parse(&format!("https://127.0.0.1:{client_port}"))?;
        let client = tls::client_config(
            ServerTrust::Ca(ca_pems.cert_pem.clone()),
            Some(ClientIdentity {
                cert_pem: &client.cert_pem,
                key_pem: &client.key_pem,
            }),
        )?;
        Ok(Self {
            child,
            url,
            client,
            _dir: dir,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    async fn connect(&self, source: Option<IpAddr>) -> anyhow::Result<Channel> {
        let options = ChannelOptions {
            local_addr: source,
            // Like an agent: keepalive pings on the connection.
            keepalive_interval: Some(Duration::from_secs(10)),
            ..ChannelOptions::default()
        };
        Ok(tls::connect(&self.url, self.client.clone(), &options).await?)
    }

    /// Wait until etcd answers a put.
    async fn ready(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let attempt = async {
                let channel = self.connect(None).await?;
                pb::kv_client::KvClient::new(channel)
                    .put(pb::PutRequest {
                        key: b"/bench/ready".to_vec(),
                        value: b"1".to_vec(),
                        ..Default::default()
                    })
                    .await?;
                anyhow::Ok(())
            };
            match attempt.await {
                Ok(()) => return Ok(()),
                Err(e) if Instant::now() > deadline => bail!("etcd not ready: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Loopback source addresses to spread `count` connections over (one per
/// 20k, at least four), as the agent simulator does.
fn sources(count: usize) -> Vec<IpAddr> {
    let n = (count / 20_000).max(1) * 4;
    (0..n)
        .map(|i| IpAddr::from([127, 0, 0, 2 + i as u8]))
        .collect()
}

/// Open connections `concurrency` at a time.
async fn connect_all(
    etcd: &Arc<Etcd>,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<Channel>> {
    let sources = sources(count);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut tasks = Vec::with_capacity(count);
    for i in 0..count {
        let etcd = etcd.clone();
        let source = sources[i % sources.len()];
        let permit = semaphore.clone().acquire_owned().await?;
        tasks.push(tokio::spawn(async move {
            let channel = etcd.connect(Some(source)).await;
            drop(permit);
            channel
        }));
    }
    let mut channels = Vec::with_capacity(count);
    for task in tasks {
        channels.push(task.await??);
    }
    Ok(channels)
}

pub fn leases(count: usize, keepalive: Duration, window: Duration) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let etcd = Arc::new(Etcd::start()?);
        etcd.ready().await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let idle_kib = rss_kib(etcd.pid());
        let started = Instant::now();
        let channels = connect_all(&etcd, count, 64).await?;
        let sent = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(AtomicU64::new(0));
        let alive = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        for channel in channels {
            let (sent, acked, alive, failed) =
                (sent.clone(), acked.clone(), alive.clone(), failed.clone());
            tokio::spawn(async move {
                let fail = |what: String| {
                    failed.lock().unwrap_or_else(|e| e.into_inner()).push(what);
                };
                let mut lease = pb::lease_client::LeaseClient::new(channel);
                // etcd sheds load with "too many requests" while its raft
                // apply queue is long; retry those as etcd's own client does.
                let mut backoff = Duration::from_millis(100);
                let granted = loop {
                    match lease
                        .lease_grant(pb::LeaseGrantRequest { ttl: 15, id: 0 })
                        .await
                    {
                        Ok(granted) => break granted,
                        Err(e) if e.message().contains("too many requests") => {
                            tokio::time::sleep(
                                backoff.mul_f64(1.0 + rand_fraction(backoff.as_nanos() as i64)),
                            )
                            .await;
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                        Err(e) => return fail(format!("lease grant: {e}")),
                    }
                };
                let id = granted.into_inner().id;
                let (tx, rx) = mpsc::channel(4);
                // etcd answers the stream's headers with the first
                // response, so the first keep-alive goes before the call.
                sent.fetch_add(1, Ordering::Relaxed);
                if tx.send(pb::LeaseKeepAliveRequest { id }).await.is_err() {
                    return fail("keep-alive stream closed".into());
                }
                let response = match lease.lease_keep_alive(ReceiverStream::new(rx)).await {
                    Ok(response) => response,
                    Err(e) => return fail(format!("keep-alive stream: {e}")),
                };
                let mut inbound = response.into_inner();
                alive.fetch_add(1, Ordering::Relaxed);
                // Spread the keep-alives like agents spread heartbeats.
                let offset = keepalive.mul_f64(rand_fraction(id));
                let mut tick =
                    tokio::time::interval_at(tokio::time::Instant::now() + offset, keepalive);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            sent.fetch_add(1, Ordering::Relaxed);
                            if tx.send(pb::LeaseKeepAliveRequest { id }).await.is_err() { break; }
                        }
                        message = inbound.message() => match message {
                            Ok(Some(_)) => { acked.fetch_add(1, Ordering::Relaxed); }
                            _ => break,
                        },
                    }
                }
                alive.fetch_sub(1, Ordering::Relaxed);
            });
        }
        let deadline = Instant::now() + Duration::from_secs(1800);
        let mut progress = Instant::now();
        while alive.load(Ordering::Relaxed) < count as u64 {
            if progress.elapsed() > Duration::from_secs(10) {
                progress = Instant::now();
                eprintln!(
                    "etcd-leases: {} of {count} streams up after {:?}",
                    alive.load(Ordering::Relaxed),
                    started.elapsed()
                );
            }
            let failures = failed.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if !failures.is_empty() {
                bail!(
                    "{} of {count} keep-alive streams failed, e.g. {}",
                    failures.len(),
                    failures[0]
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "only {} of {count} keep-alive streams up",
                    alive.load(Ordering::Relaxed)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let connect = started.elapsed();
        eprintln!("etcd-leases: {count} streams in {connect:?}");
        tokio::time::sleep(Duration::from_secs(10)).await;
        let kib = rss_kib(etcd.pid());
        let (cpu0, acked0) = (cpu_seconds(etcd.pid()), acked.load(Ordering::Relaxed));
        let t0 = Instant::now();
        tokio::time::sleep(window).await;
        let secs = t0.elapsed().as_secs_f64();
        let cores = (cpu_seconds(etcd.pid()) - cpu0) / secs;
        let rate = (acked.load(Ordering::Relaxed) - acked0) as f64 / secs;
        let result = json!({
            "benchmark": "etcd-leases",
            "machine": machine(),
            "etcd_version": etcd_version(),
            "streams": count,
            "keepalive_s": keepalive.as_secs_f64(),
            "connect_s": round(connect.as_secs_f64()),
            "etcd_rss_mib": round(kib as f64 / 1024.0),
            "etcd_idle_rss_mib": round(idle_kib as f64 / 1024.0),
            "etcd_kib_per_stream": round(kib.saturating_sub(idle_kib) as f64 / count as f64),
            "window_s": round(secs),
            "etcd_cores": round(cores),
            "keepalives_per_s": round(rate),
            "keepalives_per_s_per_core": round(rate / cores.max(0.001)),
        });
        println!("{result}");
        anyhow::Ok(())
    })
}

/// A fraction in [0, 1) from a lease id, to spread timers without a RNG.
fn rand_fraction(id: i64) -> f64 {
    let mixed = (id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (mixed >> 11) as f64 / (1u64 << 53) as f64
}

fn etcd_version() -> String {
    Command::new(ETCD)
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default()
}

pub fn fanout(watchers: usize, value_kib: usize, runs: usize) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let etcd = Arc::new(Etcd::start()?);
        etcd.ready().await?;
        let channels = connect_all(&etcd, watchers, 64).await?;
        let key = b"/bench/fanout".to_vec();
        // Every watcher reports (revision, when) for each put it sees.
        let (seen_tx, mut seen_rx) = mpsc::unbounded_channel::<(i64, Instant)>();
        let created = Arc::new(AtomicU64::new(0));
        for channel in channels {
            let (seen_tx, created, key) = (seen_tx.clone(), created.clone(), key.clone());
            tokio::spawn(async move {
                let (tx, rx) = mpsc::channel(1);
                let _ = tx
                    .send(pb::WatchRequest {
                        request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                            pb::WatchCreateRequest {
                                key,
                                ..Default::default()
                            },
                        )),
                    })
                    .await;
                let Ok(response) = pb::watch_client::WatchClient::new(channel)
                    .watch(ReceiverStream::new(rx))
                    .await
                else {
                    return;
                };
                let mut inbound = response.into_inner();
                while let Ok(Some(message)) = inbound.message().await {
                    if message.created {
                        created.fetch_add(1, Ordering::Relaxed);
                    }
                    for event in message.events {
                        let revision = event.kv.map_or(0, |kv| kv.mod_revision);
                        let _ = seen_tx.send((revision, Instant::now()));
                    }
                }
                // Keep the request stream open while the watch lives.
                drop(tx);
            });
        }
        drop(seen_tx);
        while created.load(Ordering::Relaxed) < watchers as u64 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        eprintln!("etcd-fanout: {watchers} watchers created");
        let mut kv = pb::kv_client::KvClient::new(etcd.connect(None).await?);
        let mut times = Vec::new();
        for run in 0..runs {
            let value = vec![(run % 251) as u8; value_kib * 1024];
            let t0 = Instant::now();
            let revision = kv
                .put(pb::PutRequest {
                    key: key.clone(),
                    value,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .header
                .map_or(0, |h| h.revision);
            let mut got = 0;
            let mut last = t0;
            while got < watchers {
                let Some((rev, at)) =
                    tokio::time::timeout(Duration::from_secs(120), seen_rx.recv()).await?
                else {
                    bail!("watchers ended");
                };
                if rev == revision {
                    got += 1;
                    last = last.max(at);
                }
            }
            let ms = last.duration_since(t0).as_secs_f64() * 1000.0;
            eprintln!("etcd-fanout: run {} all {watchers} in {ms:.1} ms", run + 1);
            times.push(ms);
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let result = json!({
            "benchmark": "etcd-fanout",
            "machine": machine(),
            "etcd_version": etcd_version(),
            "watchers": watchers,
            "value_kib": value_kib,
            "runs_ms": times.iter().map(|t| round(*t)).collect::<Vec<_>>(),
            "median_ms": round(sorted[sorted.len() / 2]),
        });
        println!("{result}");
        anyhow::Ok(())
    })
}
