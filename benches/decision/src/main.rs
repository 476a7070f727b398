//! `hotswap-bench-decision`: decision and rollback latency of the deployment
//! engine with N simulated nodes, in one process.
//!
//! The real [`Store`] (sled in a temp dir), [`Registry`] and [`Engine`] run
//! unchanged; only the agents are simulated: one tokio task per node waits on
//! its session's desired-state watch and reports the module running (or
//! failed) the moment it changes.
//!
//! * Decision latency: in a rolling deployment (batch 10 %, no minimum healthy
//!   time), from the instant the last node of wave k reports healthy to the
//!   instant the first node of wave k+1 sees its desired state change. In
//!   between the engine observes the fleet, steps the machine, persists the
//!   transition (durable sled flush), writes the next wave's desired states
//!   (another flush) and pushes them.
//! * Rollback latency: nodes of wave `--fail-wave` fail to activate the new
//!   version; from the first failing report to the instant the first node of
//!   an earlier wave sees its desired version go back.
//!
//! Afterwards (with `--profile`, or when a goal is missed) the engine is
//! stopped and the pieces of one engine iteration are timed in isolation
//! through the same public APIs, to show what dominates.
//!
//! Backends: `--backends sled` (the default) opens the sled store in a temp
//! dir; `--backends etcd` starts a 3-member etcd 3.4 on loopback, runs the
//! library's `init` against it and opens the store through
//! `server::open_etcd`, what `run` does for `[store] backend = "etcd"`, then
//! leads (campaigns, so every commit is fenced by the election key) and
//! publishes its sessions under a lease, as the leading replica does.
//! `--backends sled,etcd` sets both up in this process and alternates the
//! runs (sled, etcd, sled, etcd, ...), so the ratio is of one sitting.
//!
//! Output: one JSON object on stdout; progress on stderr.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use hotswap_common::labels::Labels;
use hotswap_common::timefmt::{now_ms, rfc3339_from_ms};
use hotswap_control_plane::config::{Settings, StoreBackend, StoreSettings};
use hotswap_control_plane::deploy::engine::{
    CreateRequest, DeploymentRecord, Engine, EngineHandles, observe_nodes,
};
use hotswap_control_plane::deploy::machine::{
    BatchSize, Input, NodeState, State, Strategy, plan_waves,
};
use hotswap_control_plane::events::EventLog;
use hotswap_control_plane::init::InitOptions;
use hotswap_control_plane::metrics::Metrics;
use hotswap_control_plane::registry::{ModuleState, Registry, Report, SessionHandle};
use hotswap_control_plane::replica::Leading;
use hotswap_control_plane::service::enrollment::token_hash;
use hotswap_control_plane::store::etcd::{EtcdStore, Leader};
use hotswap_control_plane::store::{
    ArtifactRecord, DesiredModuleRecord, KeyRecord, NodeRecord, SignatureRecord, Store, TokenRecord,
};
use hotswap_tests::EtcdCluster;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const MODULE: &str = "sim";
const ENVIRONMENT: &str = "dev";
const DECISION_GOAL_P99_MS: f64 = 10.0;
const ROLLBACK_GOAL_P99_MS: f64 = 50.0;

#[derive(Parser, Clone)]
#[command(
    name = "hotswap-bench-decision",
    about = "Deployment engine decision and rollback latency with N simulated nodes, in-process"
)]
struct Args {
    /// Simulated nodes (enrolled, attached, each with a simulated agent).
    #[arg(long, default_value_t = 10_000)]
    nodes: usize,
    /// Rolling deployments measured for decision latency (alternating 1.0.0 / 2.0.0).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Delay between an agent seeing a new desired state and reporting.
    #[arg(long, default_value_t = 0)]
    agent_latency_ms: u64,
    /// Version the nodes of `--fail-wave` and later fail to activate (phase
    /// failed, message "simulated failure"). Used by the rollback runs; when
    /// not given they deploy 3.0.0 as the failing version.
    #[arg(long)]
    fail_version: Option<String>,
    /// 1-based wave from which nodes fail the failing version; earlier waves
    /// succeed, so there is something to roll back.
    #[arg(long, default_value_t = 2)]
    fail_wave: usize,
    /// Rolling deployments of the failing version measured for rollback latency (0 skips).
    #[arg(long, default_value_t = 5)]
    rollback_runs: usize,
    /// Rolling batch size, as `deploy create --batch-size` takes it.
    #[arg(long, default_value = "10%")]
    batch: String,
    /// Enrollments and session attaches in flight at once during setup
    /// (each is one durable sled flush).
    #[arg(long, default_value_t = 1)]
    setup_concurrency: usize,
    /// Directory for the temporary sled database (default: the system temp dir).
    #[arg(long)]
    tmpdir: Option<PathBuf>,
    /// Give up on one deployment after this long.
    #[arg(long, default_value_t = 600)]
    run_timeout_s: u64,
    /// After each deployment, wait at most this long for the process to go
    /// idle (the engine works off queued node-change notifications).
    #[arg(long, default_value_t = 20)]
    settle_max_s: u64,
    /// Time the pieces of one engine iteration afterwards even when every goal is met.
    #[arg(long)]
    profile: bool,
    /// Tokio worker threads (default: one per CPU).
    #[arg(long)]
    worker_threads: Option<usize>,
    /// Store backends, comma-separated; with more than one, every run
    /// alternates between them (sled, etcd, sled, etcd, ...).
    #[arg(long, value_delimiter = ',', default_value = "sled")]
    backends: Vec<BackendKind>,
    /// Members of the etcd cluster the etcd backend starts.
    #[arg(long, default_value_t = 3)]
    etcd_members: usize,
    /// etcd's `--max-request-bytes` (default: etcd's own, 1.5 MiB; the
    /// store splits deployment records to fit it, so this is for
    /// experiments only).
    #[arg(long)]
    etcd_max_request_bytes: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum BackendKind {
    Sled,
    Etcd,
}

impl BackendKind {
    fn name(self) -> &'static str {
        match self {
            BackendKind::Sled => "sled",
            BackendKind::Etcd => "etcd",
        }
    }
}

/// An etcd cluster on loopback with a hotswap cluster `init`ed under the
/// default prefix (started before the runtime: the harness and `init`
/// block).
struct EtcdPrep {
    cluster: EtcdCluster,
    settings: StoreSettings,
    /// The data dir `init` made (CA, admin profile); the records are in etcd.
    _data_dir: tempfile::TempDir,
}

fn prepare_etcd(members: usize, max_request_bytes: Option<u64>) -> anyhow::Result<EtcdPrep> {
    eprintln!("etcd: starting {members} members on loopback");
    let cluster = match max_request_bytes {
        Some(bytes) => {
            EtcdCluster::start_with_flags(members, &["--max-request-bytes", &bytes.to_string()])
        }
        None => EtcdCluster::start(members),
    };
    let settings = StoreSettings {
        backend: StoreBackend::Etcd,
        endpoints: (0..cluster.len()).map(|i| cluster.endpoint(i)).collect(),
        ..StoreSettings::default()
    };
    let data_dir = tempfile::tempdir()?;
    hotswap_control_plane::init::init(&InitOptions {
        data_dir: data_dir.path().join("cp"),
        sans: Vec::new(),
        endpoint: "127.0.0.1:7443".into(),
        store: Some(settings.clone()),
    })
    .map_err(|e| anyhow::anyhow!("init on etcd: {e}"))?;
    Ok(EtcdPrep {
        cluster,
        settings,
        _data_dir: data_dir,
    })
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    ensure!(args.nodes > 0, "--nodes must be at least 1");
    let mut seen = Vec::new();
    args.backends.retain(|b| {
        let new = !seen.contains(b);
        seen.push(*b);
        new
    });
    ensure!(!args.backends.is_empty(), "--backends names no backend");
    let etcd = if args.backends.contains(&BackendKind::Etcd) {
        Some(prepare_etcd(
            args.etcd_members,
            args.etcd_max_request_bytes,
        )?)
    } else {
        None
    };
    ensure!(args.fail_wave >= 2, "--fail-wave must be 2 or more");
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all();
    if let Some(n) = args.worker_threads {
        builder.worker_threads(n);
    }
    let runtime = builder.build()?;
    let result = runtime.block_on(run(args, etcd))?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    // Sled and leftover tasks need not be torn down cleanly.
    runtime.shutdown_timeout(Duration::from_secs(5));
    Ok(())
}

// ---------------------------------------------------------------------------
// Clock and event log

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the benchmark started (monotonic).
fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    /// The agent's desired-state watch fired and it read this version.
    Seen,
    /// The agent is about to report the version running and healthy.
    Healthy,
    /// The agent is about to report a failed activation of this version.
    Failed,
}

#[derive(Clone, Debug)]
struct Event {
    node: u32,
    kind: Kind,
    version: String,
    at_ns: u64,
}

/// Shared state of the simulated agents.
struct Sim {
    log: Mutex<Vec<Event>>,
    latency: Duration,
    /// Version that nodes flagged in `failing` fail to activate.
    fail_version: Mutex<Option<String>>,
    failing: Vec<AtomicBool>,
    reports: AtomicU64,
}

impl Sim {
    fn record(&self, node: u32, kind: Kind, version: &str, at_ns: u64) {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Event {
                node,
                kind,
                version: version.to_string(),
                at_ns,
            });
    }

    fn take_log(&self) -> Vec<Event> {
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn fails(&self, node: u32, version: &str) -> bool {
        self.failing[node as usize].load(Ordering::Relaxed)
            && self
                .fail_version
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_deref()
                == Some(version)
    }
}

/// One simulated agent: report the desired version of `sim` as running and
/// healthy (or failed) whenever the desired state changes.
async fn agent(index: u32, registry: Arc<Registry>, mut handle: SessionHandle, sim: Arc<Sim>) {
    let mut running = String::new();
    loop {
        if handle.desired.changed().await.is_err() {
            return;
        }
        let seen = now_ns();
        let desired = handle.desired.borrow_and_update().clone();
        let want = desired
            .modules
            .get(MODULE)
            .map(|m| m.version.clone())
            .unwrap_or_default();
        sim.record(index, Kind::Seen, &want, seen);
        if !sim.latency.is_zero() {
            tokio::time::sleep(sim.latency).await;
        }
        let modules = if want.is_empty() {
            running.clear();
            Vec::new()
        } else if sim.fails(index, &want) {
            // Activation failed: the previous version stays active.
            sim.record(index, Kind::Failed, &want, now_ns());
            vec![module_state(
                &running,
                "failed",
                "unhealthy",
                "simulated failure",
            )]
        } else {
            sim.record(index, Kind::Healthy, &want, now_ns());
            running = want.clone();
            vec![module_state(&want, "running", "healthy", "")]
        };
        registry.report(
            &handle,
            Report {
                at_ms: now_ms(),
                observed_generation: desired.generation,
                desired_generation: desired.generation,
                modules,
                usage: None,
            },
        );
        sim.reports.fetch_add(1, Ordering::Relaxed);
    }
}

fn module_state(version: &str, phase: &str, health: &str, message: &str) -> ModuleState {
    ModuleState {
        name: MODULE.to_string(),
        version: version.to_string(),
        phase: hotswap_common::status::Phase::parse(phase),
        health: hotswap_common::status::Health::parse(health),
        message: message.to_string(),
        staged_version: String::new(),
        previous_version: String::new(),
        restarts: 0,
        crash_loop: false,
        metrics: None,
        settling: Vec::new(),
        failure_kind: None,
        usage: None,
    }
}

// ---------------------------------------------------------------------------
// Statistics

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // Nearest rank.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn summary(samples: &[f64]) -> Value {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let round = |v: f64| (v * 1000.0).round() / 1000.0;
    json!({
        "samples": sorted.len(),
        "min_ms": round(sorted.first().copied().unwrap_or(f64::NAN)),
        "p50_ms": round(percentile(&sorted, 50.0)),
        "p90_ms": round(percentile(&sorted, 90.0)),
        "p99_ms": round(percentile(&sorted, 99.0)),
        "max_ms": round(sorted.last().copied().unwrap_or(f64::NAN)),
        "mean_ms": round(sorted.iter().sum::<f64>() / sorted.len().max(1) as f64),
    })
}

fn p99(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    percentile(&sorted, 99.0)
}

/// Median of a few repetitions of an operation, in ms.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let r = v[v.len() / 2];
    (r * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------------------
// Counters of what the engine is woken by and what it persists

#[derive(Default)]
struct Counters {
    commits: AtomicU64,
    commits_lagged: AtomicU64,
    /// Every persisted transition as the engine announced it (after its
    /// desired-state changes went out): when, which deployment, which wave.
    commit_log: Mutex<Vec<(u64, String, usize, State)>>,
}

/// Node changes are not followed here: the registry counts them itself
/// (`changes_announced`), and a subscriber would make every change build a
/// full node state, which a control plane with nobody watching does not do.
fn spawn_counters(engine: &Engine, counters: Arc<Counters>) {
    let mut commits = engine.subscribe();
    tokio::spawn(async move {
        loop {
            match commits.recv().await {
                Ok(record) => {
                    let at = now_ns();
                    counters.commits.fetch_add(1, Ordering::Relaxed);
                    counters
                        .commit_log
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((
                            at,
                            record.id.clone(),
                            record.deployment.wave,
                            record.deployment.state,
                        ));
                }
                Err(RecvError::Lagged(n)) => {
                    counters.commits_lagged.fetch_add(n, Ordering::Relaxed);
                }
                Err(RecvError::Closed) => return,
            }
        }
    });
}

/// CPU time (user + system) of this process, in seconds.
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name, which is in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    ticks / 100.0
}

/// Wait until the process is (nearly) idle: the engine may still be working
/// through node-change notifications queued during the last deployment.
async fn settle(limit: Duration) -> f64 {
    let started = Instant::now();
    loop {
        let cpu = process_cpu_seconds();
        tokio::time::sleep(Duration::from_millis(250)).await;
        let busy = (process_cpu_seconds() - cpu) / 0.25;
        if busy < 0.05 || started.elapsed() > limit {
            return started.elapsed().as_secs_f64();
        }
    }
}

// ---------------------------------------------------------------------------
// Setup

struct Fleet {
    store: Store,
    registry: Arc<Registry>,
    events: Arc<EventLog>,
    metrics: Arc<Metrics>,
    /// Node ids in name order; index = simulator node number.
    ids: Vec<String>,
    index_of: HashMap<String, u32>,
    setup: Value,
}

fn node_id(i: usize) -> String {
    // Deterministic, uuid-like ids that do not sort like the names.
    let mut x = (i as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut mix = || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    format!("{:016x}{:016x}", mix(), mix())
}

fn dev_labels() -> Labels {
    [("environment".to_string(), ENVIRONMENT.to_string())].into()
}

async fn setup(
    args: &Args,
    store: Store,
    etcd: Option<&EtcdStore>,
    shutdown: &CancellationToken,
) -> anyhow::Result<(Fleet, Vec<SessionHandle>)> {
    let n = args.nodes;
    let started = Instant::now();
    // One join token per setup stripe: every enrollment takes a use of its
    // token, and on etcd concurrent enrollments with one token conflict on
    // its record (each is a guarded read-modify-write of the token).
    let concurrency = args.setup_concurrency.max(1);
    let hashes: Vec<String> = (0..concurrency)
        .map(|stripe| token_hash(&format!("bench-join-token-{stripe}")))
        .collect();
    for hash in &hashes {
        store
            .insert_token(
                hash,
                &TokenRecord {
                    created_at_ms: now_ms(),
                    expires_at_ms: u64::MAX,
                    uses_total: n.max(10_000) as u32,
                    uses_left: n.max(10_000) as u32,
                    labels: dev_labels(),
                    created_by: "bench".into(),
                },
            )
            .await?;
    }
    let ids: Vec<String> = (0..n).map(node_id).collect();

    // Enrollment: one sled transaction and one durable flush each.
    let enroll_started = Instant::now();
    let enroll_latencies = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let mut tasks = Vec::new();
    for (stripe, hash) in hashes.iter().enumerate() {
        let store = store.clone();
        let hash = hash.clone();
        let ids = ids.clone();
        let latencies = enroll_latencies.clone();
        tasks.push(tokio::spawn(async move {
            for i in (stripe..ids.len()).step_by(concurrency) {
                let t = Instant::now();
                store
                    .enroll(
                        &hash,
                        now_ms(),
                        NodeRecord {
                            id: ids[i].clone(),
                            name: format!("sim-{i:05}"),
                            labels: dev_labels(),
                            forced_labels: Labels::new(),
                            enrolled_at_ms: now_ms(),
                            cert_fingerprint: format!("sha256:bench-{i}"),
                            cert_not_after_ms: u64::MAX,
                            last_seen_ms: None,
                            agent_version: "bench".into(),
                            previous_cert_fingerprint: None,
                            previous_cert_not_after_ms: 0,
                            token_hash: hash.clone(),
                            enroll_key: String::new(),
                        },
                    )
                    .await
                    .map_err(|e| anyhow::anyhow!("enroll sim-{i:05}: {e}"))?;
                latencies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(t.elapsed().as_secs_f64() * 1e3);
                if stripe == 0 && i > 0 && i % (1000 * concurrency) == 0 {
                    eprintln!("  enrolled {i}/{}", ids.len());
                }
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let enroll_s = enroll_started.elapsed().as_secs_f64();

    // Deployments need artifacts signed by a trusted key: trust one and sign
    // each version's statement with it, as `module push` would have.
    let signer = hotswap_common::artifact::keys::generate().context("generate key")?;
    let key_id = hotswap_common::artifact::keys::key_id(&signer.verifying_key());
    store
        .put_key(&KeyRecord {
            name: "bench".into(),
            key_id: key_id.clone(),
            public_key_pem: hotswap_common::artifact::keys::public_key_pem(&signer.verifying_key()),
            added_at_ms: now_ms(),
            added_by: "bench".into(),
            revoked_at_ms: None,
        })
        .await
        .context("trust key")?;
    for version in ["1.0.0", "2.0.0", "3.0.0"] {
        store
            .insert_artifact(&artifact(version, &signer))
            .await
            .context("insert artifact")?;
    }
    if let Some(v) = &args.fail_version
        && store.get_artifact(MODULE, v)?.is_none()
    {
        store.insert_artifact(&artifact(v, &signer)).await?;
    }

    let (metrics, _prometheus) = Metrics::new();
    let metrics = Arc::new(metrics);
    let events =
        Arc::new(EventLog::open(&store, 100_000).map_err(|e| anyhow::anyhow!("event log: {e}"))?);
    let registry = Registry::new(store.clone(), events.clone(), metrics.clone())
        .map_err(|e| anyhow::anyhow!("registry: {e}"))?;
    if let Some(etcd) = etcd {
        // As `run` does on etcd: every session is published under the
        // replica's lease (granted by the caller).
        registry.share_sessions("bench".into(), Arc::new(etcd.clone()), shutdown.clone());
    }

    // Sessions: attach writes the node record (last seen, labels) with a flush.
    let attach_started = Instant::now();
    let attach_latencies = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let mut tasks = Vec::new();
    for stripe in 0..concurrency {
        let registry = registry.clone();
        let ids = ids.clone();
        let latencies = attach_latencies.clone();
        tasks.push(tokio::spawn(async move {
            let mut handles = Vec::new();
            for i in (stripe..ids.len()).step_by(concurrency) {
                let t = Instant::now();
                let handle = registry
                    .attach(&ids[i], &format!("sha256:bench-{i}"), dev_labels(), "bench")
                    .await
                    .map_err(|e| anyhow::anyhow!("attach sim-{i:05}: {e}"))?;
                latencies
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(t.elapsed().as_secs_f64() * 1e3);
                handles.push((i, handle));
            }
            anyhow::Ok(handles)
        }));
    }
    let mut handles = Vec::with_capacity(n);
    for task in tasks {
        handles.extend(task.await??);
    }
    handles.sort_by_key(|(i, _)| *i);
    let handles: Vec<SessionHandle> = handles.into_iter().map(|(_, h)| h).collect();
    let attach_s = attach_started.elapsed().as_secs_f64();

    let enroll_l = enroll_latencies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let attach_l = attach_latencies
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let setup = json!({
        "total_s": round3(started.elapsed().as_secs_f64()),
        "enroll_s": round3(enroll_s),
        "enroll_per_node": summary(&enroll_l),
        "attach_s": round3(attach_s),
        "attach_per_node": summary(&attach_l),
        "concurrency": concurrency,
        "note": "each enrollment (Store::enroll) and each attach (Registry::attach -> Store::put_node) ends with its own durable flush (sled: fsync; etcd: a guarded txn, concurrent flushes grouped); setup time is those 2*N flushes",
        "db_bytes_on_disk": store.size_on_disk(),
    });
    let index_of = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), i as u32))
        .collect();
    Ok((
        Fleet {
            store,
            registry,
            events,
            metrics,
            ids,
            index_of,
            setup,
        },
        handles,
    ))
}

fn artifact(version: &str, signer: &ed25519_dalek::SigningKey) -> ArtifactRecord {
    use ed25519_dalek::Signer as _;
    use hotswap_common::artifact::format::{Digest, statement};
    let digest = Digest::of(version.as_bytes());
    let key_id = hotswap_common::artifact::keys::key_id(&signer.verifying_key());
    let signed_at_ms = now_ms();
    let message = statement(MODULE, version, &digest, &key_id, signed_at_ms, None);
    let signature = hex::encode(signer.sign(&message).to_bytes());
    ArtifactRecord {
        name: MODULE.into(),
        version: version.into(),
        digest: digest.to_string(),
        size: 1,
        runtime: "process".into(),
        manifest: String::new(),
        signatures: vec![SignatureRecord {
            key_id,
            signed_at_ms,
            expires_at_ms: None,
            signature,
        }],
        pushed_at_ms: now_ms(),
        pushed_by: "bench".into(),
        yanked: None,
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------------------
// Runs

fn request(version: &str, batch: &str) -> CreateRequest {
    CreateRequest {
        module: MODULE.into(),
        version: version.into(),
        environment: ENVIRONMENT.into(),
        strategy: Some("rolling".into()),
        batch_size: Some(batch.into()),
        min_healthy_time: Some(Duration::ZERO),
        // Runs alternate versions (1.0.0, 2.0.0, 1.0.0, ...): going back is
        // the point, not a mistake the downgrade guard should catch.
        allow_downgrade: true,
        ..Default::default()
    }
}

/// Create a deployment and wait until it is terminal.
async fn deploy(
    engine: &Engine,
    args: &Args,
    version: &str,
) -> anyhow::Result<(Arc<DeploymentRecord>, Arc<DeploymentRecord>, u64)> {
    let created_ns = now_ns();
    let (record, _) = engine
        .create(request(version, &args.batch), "bench")
        .await
        .map_err(|e| anyhow::anyhow!("create {MODULE}@{version}: {e}"))?;
    let record = record.context("dry run?")?;
    let limit = Instant::now() + Duration::from_secs(args.run_timeout_s);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = engine
            .get(&record.id)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        if now.deployment.state.is_terminal() {
            return Ok((record, now, created_ns));
        }
        if Instant::now() > limit {
            bail!(
                "deployment {} of {version} not finished after {}s: {} wave {}/{}",
                record.id,
                args.run_timeout_s,
                now.deployment.state.as_str(),
                now.deployment.wave + 1,
                now.deployment.waves
            );
        }
    }
}

/// Wave of each node (by simulator index) in a deployment.
fn waves_of(fleet: &Fleet, record: &DeploymentRecord) -> Vec<Vec<u32>> {
    let mut waves = vec![Vec::new(); record.deployment.waves];
    for track in &record.deployment.nodes {
        waves[track.wave].push(fleet.index_of[&track.node]);
    }
    for wave in &mut waves {
        wave.sort_unstable();
    }
    waves
}

fn first_time(log: &[Event], node: u32, kind: Kind, version: &str, after: u64) -> Option<u64> {
    // Logs are appended in time order per node; scanning is fine at this size.
    log.iter()
        .filter(|e| e.node == node && e.kind == kind && e.version == version && e.at_ns >= after)
        .map(|e| e.at_ns)
        .min()
}

/// Index events by (node, kind, version) → times.
fn index_log(log: &[Event]) -> HashMap<(u32, Kind, &str), Vec<u64>> {
    let mut map: HashMap<(u32, Kind, &str), Vec<u64>> = HashMap::new();
    for e in log {
        map.entry((e.node, e.kind, e.version.as_str()))
            .or_default()
            .push(e.at_ns);
    }
    map
}

struct DecisionRun {
    gaps_ms: Vec<f64>,
    json: Value,
}

async fn decision_run(
    fleet: &Fleet,
    engine: &Engine,
    sim: &Sim,
    counters: &Counters,
    args: &Args,
    version: &str,
) -> anyhow::Result<DecisionRun> {
    sim.take_log();
    let changes0 = fleet.registry.changes_announced();
    let commits0 = counters.commits.load(Ordering::Relaxed);
    let cpu0 = process_cpu_seconds();
    let (created, done, created_ns) = deploy(engine, args, version).await?;
    ensure!(
        done.deployment.state == State::Succeeded,
        "deployment {} ended {}: {}",
        done.id,
        done.deployment.state.as_str(),
        done.deployment.reason
    );
    let log = sim.take_log();
    let index = index_log(&log);
    let first = |node: u32, kind: Kind| -> Option<u64> {
        index
            .get(&(node, kind, version))
            .and_then(|v| v.iter().min().copied())
    };
    let waves = waves_of(fleet, &created);
    let commit_log = counters
        .commit_log
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let announced = |wave: usize| -> Option<u64> {
        commit_log
            .iter()
            .filter(|(_, id, w, _)| id == &created.id && *w == wave)
            .map(|(at, ..)| *at)
            .min()
    };
    let mut gaps = Vec::new();
    let mut boundaries = Vec::new();
    let mut announced_after = Vec::new();
    let mut last_healthy = 0;
    for k in 0..waves.len() {
        let healthy: Vec<u64> = waves[k]
            .iter()
            .map(|&n| first(n, Kind::Healthy).context("node never reported healthy"))
            .collect::<anyhow::Result<_>>()?;
        let t0 = *healthy.iter().max().context("empty wave")?;
        last_healthy = last_healthy.max(t0);
        if k + 1 == waves.len() {
            break;
        }
        let seen: Vec<u64> = waves[k + 1]
            .iter()
            .map(|&n| first(n, Kind::Seen).context("node never saw the new version"))
            .collect::<anyhow::Result<_>>()?;
        let t1 = *seen.iter().min().context("empty wave")?;
        ensure!(
            t1 > t0,
            "wave {} was pushed before wave {} was healthy",
            k + 2,
            k + 1
        );
        let gap = ms(t1 - t0);
        gaps.push(gap);
        boundaries.push(round3(gap));
        announced_after.push(announced(k + 1).map(|at| round3((at as f64 - t0 as f64) / 1e6)));
    }
    let first_seen = waves[0]
        .iter()
        .filter_map(|&n| first(n, Kind::Seen))
        .min()
        .unwrap_or(created_ns);
    let result = json!({
        "version": version,
        "deployment": created.id,
        "waves": waves.len(),
        "wave_sizes": waves.iter().map(Vec::len).collect::<Vec<_>>(),
        "decision_ms_by_boundary": boundaries,
        "commit_announced_ms_after_t0_by_boundary": announced_after,
        "create_to_first_push_ms": round3(ms(first_seen.saturating_sub(created_ns))),
        "create_to_last_healthy_report_ms": round3(ms(last_healthy - created_ns)),
        "engine_commits": counters.commits.load(Ordering::Relaxed) - commits0,
        "node_change_notifications": fleet.registry.changes_announced() - changes0,
        "process_cpu_s": round3(process_cpu_seconds() - cpu0),
    });
    Ok(DecisionRun {
        gaps_ms: gaps,
        json: result,
    })
}

struct RollbackRun {
    latency_ms: f64,
    json: Value,
}

async fn rollback_run(
    fleet: &Fleet,
    engine: &Engine,
    sim: &Sim,
    counters: &Counters,
    args: &Args,
    fail_version: &str,
) -> anyhow::Result<RollbackRun> {
    sim.take_log();
    let commits0 = counters.commits.load(Ordering::Relaxed);
    let changes0 = fleet.registry.changes_announced();
    let (created, done, created_ns) = deploy(engine, args, fail_version).await?;
    ensure!(
        done.deployment.state == State::RolledBack,
        "deployment {} ended {} instead of rolled_back: {}",
        done.id,
        done.deployment.state.as_str(),
        done.deployment.reason
    );
    let log = sim.take_log();
    let waves = waves_of(fleet, &created);
    let fw = args.fail_wave - 1;
    ensure!(
        fw < waves.len(),
        "only {} waves; no wave {} to fail",
        waves.len(),
        args.fail_wave
    );
    let t0 = log
        .iter()
        .filter(|e| {
            e.kind == Kind::Failed
                && e.version == fail_version
                && waves[fw].binary_search(&e.node).is_ok()
        })
        .map(|e| e.at_ns)
        .min()
        .context("no failing report from the failing wave")?;
    let from: BTreeMap<u32, String> = created
        .deployment
        .nodes
        .iter()
        .map(|t| (fleet.index_of[&t.node], t.from_version.clone()))
        .collect();
    let earlier: Vec<u32> = waves[..fw].iter().flatten().copied().collect();
    let t1 = earlier
        .iter()
        .filter_map(|&n| first_time(&log, n, Kind::Seen, &from[&n], t0))
        .min()
        .context("no node of an earlier wave saw its version go back")?;
    let last_back = earlier
        .iter()
        .chain(waves[fw].iter())
        .filter_map(|&n| first_time(&log, n, Kind::Healthy, &from[&n], t0))
        .max()
        .unwrap_or(t1);
    let latency = ms(t1 - t0);
    let json = json!({
        "version": fail_version,
        "deployment": created.id,
        "from_version": from.values().next(),
        "failed_nodes": done.deployment.nodes.iter().filter(|t| t.state == NodeState::Failed).count(),
        "rolled_back_nodes": done.deployment.nodes.iter().filter(|t| t.state == NodeState::RolledBack).count(),
        "rollback_ms": round3(latency),
        "first_failure_to_last_node_back_ms": round3(ms(last_back - t0)),
        "create_to_first_failure_ms": round3(ms(t0.saturating_sub(created_ns))),
        "engine_commits": counters.commits.load(Ordering::Relaxed) - commits0,
        "node_change_notifications": fleet.registry.changes_announced() - changes0,
        "reason": done.deployment.reason.chars().take(160).collect::<String>(),
    });
    Ok(RollbackRun {
        latency_ms: latency,
        json,
    })
}

// ---------------------------------------------------------------------------
// Profile: the pieces of one engine iteration, timed in isolation

/// The observation the engine builds (`Engine::observe`): one `Registry::find`
/// per target node.
fn observe_like_engine(registry: &Registry, record: &DeploymentRecord) -> Input {
    Input::Observe {
        nodes: observe_nodes(registry, &record.deployment),
        analysis: None,
    }
}

async fn profile(fleet: &Fleet, last: &DeploymentRecord, reps: usize) -> anyhow::Result<Value> {
    let registry = &fleet.registry;
    let n = last.deployment.nodes.len();
    let version = last.deployment.spec.version.clone();

    // A running deployment whose wave w just became healthy: every node of
    // waves < w healthy, wave w updating (its reports say healthy), later waiting.
    let mut running = last.clone();
    let w = running.deployment.waves / 2;
    running.deployment.state = State::Running;
    running.deployment.finished_ms = None;
    running.deployment.wave = w;
    running.deployment.hold_since_ms = None;
    let now = now_ms();
    for t in &mut running.deployment.nodes {
        t.since_ms = now - 1000;
        t.state = match t.wave.cmp(&w) {
            std::cmp::Ordering::Less => NodeState::Healthy,
            std::cmp::Ordering::Equal => NodeState::Updating,
            std::cmp::Ordering::Greater => NodeState::Waiting,
        };
        t.touched = t.wave <= w;
    }

    let mut observe = Vec::new();
    let mut input = None;
    for _ in 0..reps {
        let t = Instant::now();
        input = Some(observe_like_engine(registry, &running));
        observe.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let input = input.context("no observation")?;

    let mut step = Vec::new();
    let mut compare = Vec::new();
    let mut actions_len = 0;
    let mut next = None;
    for _ in 0..reps {
        let t = Instant::now();
        let (nx, actions) = running
            .deployment
            .step(now_ms(), &input)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        step.push(t.elapsed().as_secs_f64() * 1e3);
        actions_len = actions.len();
        let t = Instant::now();
        let same = nx == running.deployment;
        compare.push(t.elapsed().as_secs_f64() * 1e3);
        ensure!(!same, "the fabricated step changed nothing");
        next = Some(nx);
    }
    let next = DeploymentRecord {
        deployment: next.context("no step")?,
        ..running.clone()
    };
    ensure!(
        next.deployment.wave == w + 1,
        "fabricated step did not advance (wave {} -> {})",
        w,
        next.deployment.wave
    );

    let mut serialize = Vec::new();
    let mut bytes = 0;
    for _ in 0..reps {
        let t = Instant::now();
        bytes = serde_json::to_vec(&next)?.len();
        serialize.push(t.elapsed().as_secs_f64() * 1e3);
    }

    let mut put = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        fleet
            .store
            .put_deployment("bench-profile", &next)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        put.push(t.elapsed().as_secs_f64() * 1e3);
    }

    // A small durable write: what every flush costs at minimum.
    let mut small_flush = Vec::new();
    let record = fleet
        .store
        .get_node(&fleet.ids[0])?
        .context("node 0 missing")?;
    for _ in 0..reps {
        let t = Instant::now();
        fleet.store.put_node(&record).await?;
        small_flush.push(t.elapsed().as_secs_f64() * 1e3);
    }

    // The next wave's desired states: one batch, one flush, N pushes and
    // N node-change notifications (the agents are stopped; the versions
    // alternate so every change is real).
    let wave: Vec<String> = next
        .deployment
        .nodes
        .iter()
        .filter(|t| t.wave == w + 1)
        .map(|t| t.node.clone())
        .collect();
    let mut set_desired = Vec::new();
    for r in 0..reps {
        let changes: Vec<(String, String, Option<DesiredModuleRecord>)> = wave
            .iter()
            .map(|node| {
                (
                    node.clone(),
                    MODULE.to_string(),
                    Some(DesiredModuleRecord {
                        version: if r % 2 == 0 {
                            "9.9.9".into()
                        } else {
                            version.clone()
                        },
                        staged_version: String::new(),
                        traceparent: String::new(),
                    }),
                )
            })
            .collect();
        let t = Instant::now();
        registry
            .set_desired_modules(
                &changes,
                &hotswap_control_plane::store::HistoryOrigin::default(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        set_desired.push(t.elapsed().as_secs_f64() * 1e3);
    }

    // The parts of `set_desired_modules`: the existence check (one sled read
    // and JSON decode per node; the API's all-or-nothing check, which the
    // engine's path leaves to the batch), the desired-state writes as one
    // batch (what the engine's commit writes: a wave is one desired run),
    // the one flush, and the run's fold after the push.
    let mut get_nodes = Vec::new();
    let mut writes = Vec::new();
    let mut flush = Vec::new();
    let mut fold = Vec::new();
    for r in 0..reps {
        let t = Instant::now();
        for node in &wave {
            fleet.store.get_node(node)?.context("node missing")?;
        }
        get_nodes.push(t.elapsed().as_secs_f64() * 1e3);
        let want = if r % 2 == 0 { "8.8.8" } else { "9.9.9" };
        let set = |record: &mut hotswap_control_plane::store::DesiredRecord| {
            record.modules.insert(
                MODULE.to_string(),
                DesiredModuleRecord {
                    version: want.to_string(),
                    staged_version: String::new(),
                    traceparent: String::new(),
                },
            );
            true
        };
        let batch: Vec<(&str, hotswap_control_plane::store::Change<'_, _>)> =
            wave.iter().map(|node| (node.as_str(), &set as _)).collect();
        let t = Instant::now();
        let written = fleet.store.update_desired_batch(
            &batch,
            &hotswap_control_plane::store::HistoryOrigin::default(),
        )?;
        ensure!(
            written.iter().all(Option::is_some),
            "a wave node is not enrolled"
        );
        writes.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        fleet.store.flush().await?;
        flush.push(t.elapsed().as_secs_f64() * 1e3);
        // What the registry does once the wave is handed over, off the
        // decision's path: the run becomes one key per node.
        let t = Instant::now();
        fleet.store.fold_desired()?;
        fold.push(t.elapsed().as_secs_f64() * 1e3);
    }

    // What `assign_late_joiners` costs on every wake once any environment-wide
    // deployment has succeeded.
    let mut list = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let nodes = registry
            .list(Some(ENVIRONMENT))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        ensure!(
            nodes.len() == fleet.ids.len(),
            "list returned {}",
            nodes.len()
        );
        list.push(t.elapsed().as_secs_f64() * 1e3);
    }

    // The lookups alone, without building the observation: every target
    // node, in the deployment's (name) order.
    let mut find = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        for track in &running.deployment.nodes {
            registry
                .find(&track.node)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        find.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // And the observation again, now that everything is warm.
    let mut observe_again = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        let input = observe_like_engine(registry, &running);
        observe_again.push(t.elapsed().as_secs_f64() * 1e3);
        drop(input);
    }

    let observe_ms = median(observe);
    let step_ms = median(step);
    let compare_ms = median(compare);
    let serialize_ms = median(serialize);
    let put_ms = median(put);
    let set_ms = median(set_desired);
    let list_ms = median(list);
    let advancing = observe_ms + step_ms + compare_ms + put_ms + set_ms;
    Ok(json!({
        "method": format!("engine and agents stopped; each piece repeated {reps} times through the same public APIs the engine uses, median reported"),
        "target_nodes": n,
        "observe_all_nodes_ms": observe_ms,
        "registry_find_all_nodes_ms": median(find),
        "observe_all_nodes_again_ms": median(observe_again),
        "machine_step_ms": step_ms,
        "machine_step_actions": actions_len,
        "deployment_compare_ms": compare_ms,
        "deployment_record_json_bytes": bytes,
        "deployment_serialize_ms": serialize_ms,
        "put_deployment_with_flush_ms": put_ms,
        "small_put_with_flush_ms": median(small_flush),
        "set_desired_modules_one_wave_ms": set_ms,
        "set_desired_modules_wave_nodes": wave.len(),
        "of_which_node_existence_checks_ms": median(get_nodes),
        "of_which_desired_writes_ms": median(writes),
        "of_which_flush_ms": median(flush),
        "after_the_push_fold_ms": median(fold),
        "registry_list_environment_ms": list_ms,
        "estimated_advancing_iteration_ms": round3(advancing),
        "estimated_idle_iteration_ms": round3(observe_ms + step_ms + compare_ms + put_ms),
        "estimated_extra_per_iteration_after_a_success_ms": list_ms,
    }))
}

// ---------------------------------------------------------------------------

fn machine_facts(args: &Args, dir: &std::path::Path) -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpu = read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    json!({
        "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "mem_gib": (mem_kib as f64 / 1048576.0 * 10.0).round() / 10.0,
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "date": rfc3339_from_ms(now_ms()),
        "db_dir": dir.display().to_string(),
        "tokio_worker_threads": args.worker_threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
    })
}

/// The etcd side of a backend: the cluster, the store, and this process's
/// leadership and session lease (held for the benchmark's life).
struct EtcdSide {
    cluster: EtcdCluster,
    _store: EtcdStore,
    _leading: Leading,
    _sessions: hotswap_etcd::KeepAlive,
    _prep_dir: tempfile::TempDir,
}

/// Counters from etcd's own `/metrics`, summed over the members.
#[derive(Clone, Copy, Default)]
struct EtcdCounters {
    cpu_s: f64,
    proposals_committed: f64,
    wal_fsyncs: f64,
    wal_fsync_s: f64,
    backend_commits: f64,
    backend_commit_s: f64,
    /// Bytes the members received from clients over gRPC (requests).
    client_bytes_received: f64,
}

impl EtcdSide {
    fn counters(&self) -> EtcdCounters {
        let mut c = EtcdCounters::default();
        for i in 0..self.cluster.len() {
            if let Some(pid) = self.cluster.pid(i) {
                c.cpu_s += pid_cpu_seconds(pid);
            }
            let endpoint = self.cluster.endpoint(i);
            let Some(addr) = endpoint
                .strip_prefix("http://")
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
            else {
                continue;
            };
            let Ok((200, body)) = hotswap_tests::try_http_get(addr, "/metrics") else {
                continue;
            };
            let value = |name: &str| -> f64 {
                body.lines()
                    .find(|l| l.split_whitespace().next() == Some(name))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0.0)
            };
            // Every member commits every proposal: the leader's count is
            // the cluster's (take the largest).
            c.proposals_committed = c
                .proposals_committed
                .max(value("etcd_server_proposals_committed_total"));
            c.wal_fsyncs += value("etcd_disk_wal_fsync_duration_seconds_count");
            c.wal_fsync_s += value("etcd_disk_wal_fsync_duration_seconds_sum");
            c.backend_commits += value("etcd_disk_backend_commit_duration_seconds_count");
            c.backend_commit_s += value("etcd_disk_backend_commit_duration_seconds_sum");
            c.client_bytes_received += value("etcd_network_client_grpc_received_bytes_total");
        }
        c
    }
}

/// What etcd did between two readings of its counters.
fn etcd_delta(before: EtcdCounters, after: EtcdCounters, members: usize) -> Value {
    let fsyncs = after.wal_fsyncs - before.wal_fsyncs;
    let fsync_s = after.wal_fsync_s - before.wal_fsync_s;
    let commits = after.backend_commits - before.backend_commits;
    let commit_s = after.backend_commit_s - before.backend_commit_s;
    let per = |s: f64, n: f64| if n > 0.0 { round3(s * 1e3 / n) } else { 0.0 };
    json!({
        "etcd_cpu_s": round3(after.cpu_s - before.cpu_s),
        "etcd_proposals_committed": after.proposals_committed - before.proposals_committed,
        "etcd_wal_fsyncs_per_member": round3(fsyncs / members.max(1) as f64),
        "etcd_wal_fsync_mean_ms": per(fsync_s, fsyncs),
        "etcd_backend_commit_mean_ms": per(commit_s, commits),
        "etcd_client_bytes_received": after.client_bytes_received - before.client_bytes_received,
    })
}

/// CPU time (user + system) of another process, in seconds.
fn pid_cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields
        .get(11..13)
        .map(|f| f.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    ticks / 100.0
}

/// One backend under test: its fleet, simulated agents and engine, and
/// what its runs measured.
struct Bench {
    kind: BackendKind,
    fleet: Fleet,
    sim: Arc<Sim>,
    agents: Vec<JoinHandle<()>>,
    engine: Arc<Engine>,
    counters: Arc<Counters>,
    shutdown: CancellationToken,
    engine_task: JoinHandle<()>,
    etcd: Option<EtcdSide>,
    gaps: Vec<f64>,
    runs: Vec<Value>,
    last_record: Option<String>,
    rollback_ms: Vec<f64>,
    rollbacks: Vec<Value>,
    _tmp: tempfile::TempDir,
}

impl Bench {
    fn etcd_counters(&self) -> Option<EtcdCounters> {
        self.etcd.as_ref().map(EtcdSide::counters)
    }

    /// Add the process's and etcd's CPU since `before` to a run's JSON.
    fn account(&self, json: &mut Value, cpu0: f64, before: Option<EtcdCounters>) {
        json["backend"] = json!(self.kind.name());
        json["process_cpu_s"] = json!(round3(process_cpu_seconds() - cpu0));
        if let (Some(side), Some(before), Some(after)) = (&self.etcd, before, self.etcd_counters())
        {
            let delta = etcd_delta(before, after, side.cluster.len());
            if let (Some(out), Some(add)) = (json.as_object_mut(), delta.as_object()) {
                out.extend(add.clone());
            }
        }
    }
}

async fn start_bench(
    args: &Args,
    kind: BackendKind,
    prep: Option<EtcdPrep>,
) -> anyhow::Result<Bench> {
    let tmp = match &args.tmpdir {
        Some(base) => tempfile::tempdir_in(base)?,
        None => tempfile::tempdir()?,
    };
    let shutdown = CancellationToken::new();
    let (store, etcd) = match (kind, prep) {
        (BackendKind::Sled, _) => (
            Store::open(&tmp.path().join("db"), 256 * 1024 * 1024)?,
            None,
        ),
        (BackendKind::Etcd, None) => bail!("etcd backend without a cluster"),
        (BackendKind::Etcd, Some(prep)) => {
            let store = hotswap_control_plane::server::open_etcd(&prep.settings)
                .await
                .map_err(|e| anyhow::anyhow!("open etcd: {e}"))?;
            let lease = Settings::default().leader_lease;
            let sessions = store
                .client()
                .grant(lease)
                .await
                .map_err(|e| anyhow::anyhow!("session lease: {e}"))?;
            let keep_alive = store.client().keep_alive(sessions);
            store.set_session_lease(sessions.id);
            let leading = hotswap_control_plane::replica::lead(
                &store,
                &Leader {
                    name: "bench".into(),
                    endpoint: Some("https://127.0.0.1:7443".into()),
                },
                lease,
                &shutdown,
            )
            .await
            .map_err(|e| anyhow::anyhow!("campaign: {e}"))?
            .context("shut down while campaigning")?;
            let EtcdPrep {
                cluster, _data_dir, ..
            } = prep;
            (
                Store::etcd(store.clone()),
                Some(EtcdSide {
                    cluster,
                    _store: store,
                    _leading: leading,
                    _sessions: keep_alive,
                    _prep_dir: _data_dir,
                }),
            )
        }
    };
    eprintln!(
        "setup {}: {} nodes (enroll + attach, {} at a time)",
        kind.name(),
        args.nodes,
        args.setup_concurrency
    );
    let (fleet, handles) = setup(args, store, etcd.as_ref().map(|e| &e._store), &shutdown).await?;
    eprintln!("setup {}: {}", kind.name(), fleet.setup);

    let sim = Arc::new(Sim {
        log: Mutex::new(Vec::with_capacity(4 * args.nodes)),
        latency: Duration::from_millis(args.agent_latency_ms),
        fail_version: Mutex::new(None),
        failing: (0..args.nodes).map(|_| AtomicBool::new(false)).collect(),
        reports: AtomicU64::new(0),
    });
    let agents: Vec<JoinHandle<()>> = handles
        .into_iter()
        .enumerate()
        .map(|(i, h)| tokio::spawn(agent(i as u32, fleet.registry.clone(), h, sim.clone())))
        .collect();

    let engine = Engine::new(
        EngineHandles::new(
            fleet.registry.clone(),
            &fleet.store,
            fleet.events.clone(),
            fleet.metrics.clone(),
        ),
        Settings::default(),
    )
    .map_err(|e| anyhow::anyhow!("engine: {e}"))?;
    let counters = Arc::new(Counters::default());
    spawn_counters(&engine, counters.clone());
    // As `run` starts it: on a thread of its own.
    let engine_task = engine
        .clone()
        .spawn_on_own_thread(shutdown.clone())
        .context("engine thread")?;
    Ok(Bench {
        kind,
        fleet,
        sim,
        agents,
        engine,
        counters,
        shutdown,
        engine_task,
        etcd,
        gaps: Vec::new(),
        runs: Vec::new(),
        last_record: None,
        rollback_ms: Vec::new(),
        rollbacks: Vec::new(),
        _tmp: tmp,
    })
}

fn median_of(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    median(v.to_vec())
}

async fn run(args: Args, etcd: Option<EtcdPrep>) -> anyhow::Result<Value> {
    now_ns();
    let facts = machine_facts(
        &args,
        &args.tmpdir.clone().unwrap_or_else(std::env::temp_dir),
    );
    let mut etcd = etcd;
    let mut benches = Vec::new();
    for &kind in &args.backends {
        let prep = if kind == BackendKind::Etcd {
            etcd.take()
        } else {
            None
        };
        benches.push(start_bench(&args, kind, prep).await?);
    }

    // Decision latency, alternating backends run by run.
    for r in 0..args.runs {
        let version = if r % 2 == 0 { "1.0.0" } else { "2.0.0" };
        for b in &mut benches {
            eprintln!(
                "decision run {}/{} on {}: {MODULE}@{version}",
                r + 1,
                args.runs,
                b.kind.name()
            );
            let cpu0 = process_cpu_seconds();
            let etcd0 = b.etcd_counters();
            let run =
                decision_run(&b.fleet, &b.engine, &b.sim, &b.counters, &args, version).await?;
            let mut json = run.json;
            b.account(&mut json, cpu0, etcd0);
            let settle_s = settle(Duration::from_secs(args.settle_max_s)).await;
            json["settle_after_s"] = json!(round3(settle_s));
            eprintln!("  {json}");
            b.gaps.extend(run.gaps_ms);
            b.last_record = Some(json["deployment"].as_str().unwrap_or_default().to_string());
            b.runs.push(json);
        }
    }

    // Rollback latency, alternating the same way.
    let fail_version = args.fail_version.clone().unwrap_or_else(|| "3.0.0".into());
    if args.rollback_runs > 0 {
        let batch = match args.batch.strip_suffix('%') {
            Some(p) => BatchSize::Percent(p.parse()?),
            None => BatchSize::Count(args.batch.parse()?),
        };
        let plan = plan_waves(
            &Strategy::Rolling {
                batch,
                min_healthy_ms: 0,
            },
            args.nodes,
        );
        ensure!(
            plan.len() >= args.fail_wave,
            "{} nodes in batches of {} make {} waves; no wave {} to fail",
            args.nodes,
            args.batch,
            plan.len(),
            args.fail_wave
        );
        for b in &benches {
            for wave in &plan[args.fail_wave - 1..] {
                for &i in wave {
                    b.sim.failing[i].store(true, Ordering::Relaxed);
                }
            }
            *b.sim.fail_version.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(fail_version.clone());
        }
        for r in 0..args.rollback_runs {
            for b in &mut benches {
                eprintln!(
                    "rollback run {}/{} on {}: {MODULE}@{fail_version}, wave {}+ fails",
                    r + 1,
                    args.rollback_runs,
                    b.kind.name(),
                    args.fail_wave
                );
                let cpu0 = process_cpu_seconds();
                let etcd0 = b.etcd_counters();
                let run = rollback_run(
                    &b.fleet,
                    &b.engine,
                    &b.sim,
                    &b.counters,
                    &args,
                    &fail_version,
                )
                .await?;
                let mut json = run.json;
                b.account(&mut json, cpu0, etcd0);
                let settle_s = settle(Duration::from_secs(args.settle_max_s)).await;
                json["settle_after_s"] = json!(round3(settle_s));
                eprintln!("  {json}");
                b.rollback_ms.push(run.latency_ms);
                b.rollbacks.push(json);
            }
        }
    }

    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let mut results = Vec::new();
    for b in benches {
        let decision_p99 = p99(&b.gaps);
        let rollback_p99 = p99(&b.rollback_ms);
        let decision_met = !b.gaps.is_empty() && decision_p99 <= DECISION_GOAL_P99_MS;
        let rollback_met = b.rollback_ms.is_empty() || rollback_p99 <= ROLLBACK_GOAL_P99_MS;

        // Stop the engine and the agents before timing the pieces alone.
        b.shutdown.cancel();
        let _ = b.engine_task.await;
        for a in &b.agents {
            a.abort();
        }
        let profile = if args.profile || !decision_met || !rollback_met {
            match &b.last_record {
                Some(id) => {
                    eprintln!("profiling the engine iteration on {}", b.kind.name());
                    let record = b.engine.get(id).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    profile(&b.fleet, &record, 5).await?
                }
                None => Value::Null,
            }
        } else {
            Value::Null
        };
        let cpu = |runs: &[Value], key: &str| -> f64 {
            round3(median_of(
                &runs
                    .iter()
                    .filter_map(|r| r[key].as_f64())
                    .collect::<Vec<_>>(),
            ))
        };
        let mut cpu_medians = json!({
            "decision_run_process_cpu_s": cpu(&b.runs, "process_cpu_s"),
            "rollback_run_process_cpu_s": cpu(&b.rollbacks, "process_cpu_s"),
        });
        if b.etcd.is_some() {
            cpu_medians["decision_run_etcd_cpu_s"] = json!(cpu(&b.runs, "etcd_cpu_s"));
            cpu_medians["rollback_run_etcd_cpu_s"] = json!(cpu(&b.rollbacks, "etcd_cpu_s"));
        }
        results.push((
            b.kind,
            json!({
                "benchmark": "deployment engine decision and rollback latency",
                "backend": b.kind.name(),
                "etcd_members": b.etcd.as_ref().map(|e| e.cluster.len()),
                "command": command,
                "machine": facts,
                "nodes": args.nodes,
                "batch": args.batch,
                "agent_latency_ms": args.agent_latency_ms,
                "setup": b.fleet.setup,
                "goals": {
                    "decision_p99_ms": DECISION_GOAL_P99_MS,
                    "rollback_p99_ms": ROLLBACK_GOAL_P99_MS,
                    "decision_met": decision_met,
                    "rollback_met": rollback_met,
                },
                "decision": {
                    "definition": "last node of wave k reports healthy -> first node of wave k+1 sees its desired state change",
                    "runs": args.runs,
                    "latency": summary(&b.gaps),
                    "per_run": b.runs,
                },
                "rollback": {
                    "definition": "first failing report of the failing wave -> first node of an earlier wave sees its desired version go back",
                    "fail_version": fail_version,
                    "fail_wave": args.fail_wave,
                    "runs": args.rollback_runs,
                    "latency": summary(&b.rollback_ms),
                    "per_run": b.rollbacks,
                },
                "cpu_medians": cpu_medians,
                "agent_reports": b.sim.reports.load(Ordering::Relaxed),
                "profile": profile,
            }),
        ));
    }
    if results.len() == 1 {
        return Ok(results.remove(0).1);
    }
    let get = |kind: BackendKind| results.iter().find(|(k, _)| *k == kind).map(|(_, v)| v);
    let ratios = match (get(BackendKind::Sled), get(BackendKind::Etcd)) {
        (Some(sled), Some(etcd)) => {
            let ratio = |path: &[&str]| -> Value {
                let at = |v: &Value| path.iter().fold(v.clone(), |v, k| v[*k].clone()).as_f64();
                match (at(sled), at(etcd)) {
                    (Some(a), Some(b)) if a > 0.0 => json!(round3(b / a)),
                    _ => Value::Null,
                }
            };
            json!({
                "decision_p50": ratio(&["decision", "latency", "p50_ms"]),
                "decision_p99": ratio(&["decision", "latency", "p99_ms"]),
                "rollback_p50": ratio(&["rollback", "latency", "p50_ms"]),
                "rollback_p99": ratio(&["rollback", "latency", "p99_ms"]),
                "decision_run_process_cpu": ratio(&["cpu_medians", "decision_run_process_cpu_s"]),
                "rollback_run_process_cpu": ratio(&["cpu_medians", "rollback_run_process_cpu_s"]),
            })
        }
        _ => Value::Null,
    };
    Ok(json!({
        "benchmark": "deployment engine decision and rollback latency, backends alternated",
        "command": command,
        "order": "every decision run, then every rollback run, alternates the backends in this order",
        "backends": args.backends.iter().map(|b| b.name()).collect::<Vec<_>>(),
        "etcd_over_sled": ratios,
        "results": results.into_iter().map(|(_, v)| v).collect::<Vec<_>>(),
    }))
}
