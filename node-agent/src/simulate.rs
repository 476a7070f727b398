//! `hotswap-agent simulate`: many agents in one process, for scale tests and
//! benchmarks. Each simulated agent generates its own key, enrolls with the
//! join token, and keeps its own mTLS session (its own TCP connection,
//! spread over several source addresses so the count can exceed one
//! address's port range), speaking the real protocol: hello, heartbeats at
//! the interval the control plane asks for, status reports on every change
//! and every few seconds. With several control-plane endpoints (replicas),
//! every agent enrolls through the first one (the next on each retry) and
//! agent `i` opens its first session on endpoint `i mod n` (so the fleet
//! starts spread evenly) and each attempt after a session ended or failed
//! goes to its next endpoint, as the real agent fails over. Modules are simulated: a desired version is
//! "installing" for `--install-latency`, then running and healthy — or, with
//! probability `--failure-rate`, failed. With `--fetch`, an install really
//! fetches the artifact over the agent's own connection, checks its digest
//! and verifies its signatures against the control plane's trusted keys,
//! all in memory, before the module counts as running. Options add health
//! flapping and disconnect churn. Nothing touches the disk.
//!
//! A failed enrollment is retried with exponential backoff and jitter
//! (capped); refusals by the control plane's enrollment rate limit
//! (`ResourceExhausted`) are counted apart from other failures.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hotswap_common::artifact::Digest;
use hotswap_common::labels::Labels;
use hotswap_common::status::{Health, ModuleStatus, ModuleUsage, Phase};
use hotswap_common::tls::{
    self, ChannelOptions, ClientIdentity, ControlPlaneUrl, Endpoints, ServerTrust,
};
use rand::Rng;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::artifacts::{
    ArtifactSource, ContentStream as _, SourceError, WrongArtifact, check_identity,
};
use crate::backoff::Backoff;
use crate::control_plane::{
    self, Connection, EncodedReport, EnrollError, Enrollment, EnrollmentKey, Hello, Inbound,
};
use crate::report::{AgentReport, ModuleReport};
use crate::scrape::Window;
use crate::state::Desired;
use crate::sysinfo::NodeUsage;

/// What `simulate` was asked to do.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub count: usize,
    /// The control plane's replicas (one for a single control plane).
    pub control_plane: Endpoints,
    pub join_token: String,
    pub ca_fingerprint: [u8; 32],
    pub labels: Labels,
    pub name_prefix: String,
    /// Source addresses, used round-robin (empty: the OS picks).
    pub source_addrs: Vec<IpAddr>,
    /// Enrollments in flight at once.
    pub enroll_concurrency: usize,
    /// Fraction of installs that fail.
    pub failure_rate: f64,
    pub install_latency: Duration,
    /// Toggle each module's health this often (none: steady).
    pub flap_every: Option<Duration>,
    /// Each agent drops its connection after a random time around this.
    pub churn_every: Option<Duration>,
    /// Reported request error rate of healthy modules.
    pub error_rate: f64,
    /// Reported p99 latency of healthy modules.
    pub latency_p99: Duration,
    /// A status report this often even without a change (the real agent's
    /// summary interval is 5 s; shorter loads the control plane's ingest).
    pub report_every: Duration,
    /// Fetch and verify each artifact for real (in memory) on install.
    pub fetch: bool,
}

/// Largest artifact a simulated agent fetches into memory.
const MAX_FETCH_BYTES: u64 = 64 * 1024 * 1024;

/// Why a simulated install's fetch failed; the module reports it as failed.
#[derive(Debug, thiserror::Error)]
enum SimFetchError {
    #[error("{what}: {message}")]
    Source { what: String, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {size} bytes is over the simulator's limit")]
    TooLarge { what: String, size: u64 },
    #[error("cannot read the trusted keys: {0}")]
    TrustedKeys(String),
    #[error("trusted key {name:?} is unreadable: {reason}")]
    UnreadableKey { name: String, reason: String },
    #[error("{what}: transfer interrupted: {message}")]
    Interrupted { what: String, message: String },
    #[error("{what}: chunk at an unexpected offset or past the end")]
    BadChunk { what: String },
    #[error("{what}: content does not match digest {digest}")]
    DigestMismatch { what: String, digest: Digest },
    /// The artifact does not check out (manifest or signatures).
    #[error("{what}: {reason}")]
    Rejected { what: String, reason: String },
    #[error(transparent)]
    WrongArtifact(#[from] WrongArtifact),
}

/// Fetch `name@version` over `connection` and verify it as an agent does:
/// content digest, then the signatures against the control plane's
/// non-revoked keys; in memory, nothing kept. Returns the content size.
async fn fetch_verified(
    connection: Connection,
    name: String,
    version: String,
) -> Result<u64, SimFetchError> {
    use hotswap_common::artifact::format::content_info;
    use hotswap_common::artifact::keys::{self, TrustSet};
    let what = format!("artifact {name}@{version}");
    let source = |e: SourceError| SimFetchError::Source {
        what: what.clone(),
        message: e.message().to_string(),
    };
    let descriptor = connection
        .describe(&name, &version)
        .await
        .map_err(|e| match e {
            SourceError::Invalid(message) => SimFetchError::Invalid(message),
            e => source(e),
        })?;
    if descriptor.size > MAX_FETCH_BYTES {
        return Err(SimFetchError::TooLarge {
            what,
            size: descriptor.size,
        });
    }
    let digest = descriptor.digest;
    let mut trust = TrustSet::new();
    // Sent with the descriptor by a control plane that does; asked for
    // otherwise, as the agent does.
    let listed = match descriptor.trusted_keys {
        Some(keys) => keys,
        None => connection
            .trusted_keys()
            .await
            .map_err(|e| SimFetchError::TrustedKeys(e.message().to_string()))?,
    };
    for key in listed {
        let public = keys::parse_public_key(&key.public_key_pem).map_err(|reason| {
            SimFetchError::UnreadableKey {
                name: key.name.clone(),
                reason,
            }
        })?;
        trust.add(&key.name, public);
    }
    let mut content = Vec::with_capacity(descriptor.size as usize);
    let mut stream = connection.content(&digest, 0).await.map_err(source)?;
    while let Some(chunk) = stream
        .next_chunk()
        .await
        .map_err(|e| SimFetchError::Interrupted {
            what: what.clone(),
            message: e.message().to_string(),
        })?
    {
        if chunk.offset != content.len() as u64
            || content.len() as u64 + chunk.data.len() as u64 > descriptor.size
        {
            return Err(SimFetchError::BadChunk { what });
        }
        content.extend_from_slice(&chunk.data);
    }
    if Digest::of(&content) != digest {
        return Err(SimFetchError::DigestMismatch { what, digest });
    }
    // The digest was just checked over these bytes: parse the manifest and
    // check the signatures without hashing the content again.
    let signatures = descriptor.signatures.map_err(SimFetchError::Invalid)?;
    let rejected = |reason: String| SimFetchError::Rejected {
        what: what.clone(),
        reason,
    };
    let info = content_info(&content, digest, signatures).map_err(|e| rejected(e.to_string()))?;
    check_identity(&info, &name, &version)?;
    trust
        .verify(&info, hotswap_common::timefmt::now_ms())
        .map_err(|e| rejected(e.to_string()))?;
    Ok(content.len() as u64)
}

/// Counters over all simulated agents, printed while running.
#[derive(Default)]
pub struct SimStats {
    pub enrolled: AtomicU64,
    /// Enrollment attempts that failed, except rate-limit refusals.
    pub enroll_failures: AtomicU64,
    /// Enrollment attempts the control plane refused with
    /// `ResourceExhausted` (its `enroll_per_minute` limit).
    pub enroll_rate_limited: AtomicU64,
    pub connected: AtomicU64,
    pub sessions: AtomicU64,
    pub reports: AtomicU64,
    pub heartbeats: AtomicU64,
    pub installs: AtomicU64,
    pub fetched_bytes: AtomicU64,
    pub fetch_failures: AtomicU64,
}

impl SimStats {
    pub fn line(&self) -> String {
        format!(
            "enrolled {} (failed {}, rate-limited {}), connected {}, sessions {}, heartbeats {}, reports {}, installs {}, fetched bytes {} (failed {})",
            self.enrolled.load(Ordering::Relaxed),
            self.enroll_failures.load(Ordering::Relaxed),
            self.enroll_rate_limited.load(Ordering::Relaxed),
            self.connected.load(Ordering::Relaxed),
            self.sessions.load(Ordering::Relaxed),
            self.heartbeats.load(Ordering::Relaxed),
            self.reports.load(Ordering::Relaxed),
            self.installs.load(Ordering::Relaxed),
            self.fetched_bytes.load(Ordering::Relaxed),
            self.fetch_failures.load(Ordering::Relaxed),
        )
    }
}

/// An enrolled simulated node.
struct SimIdentity {
    node_id: String,
    name: String,
    client: Arc<rustls::ClientConfig>,
}

/// A `--source-addrs` value that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SourceAddrsError(String);

/// Parse `--source-addrs`: a list, or a range like `127.0.0.2-127.0.0.40`.
pub fn parse_source_addrs(text: &str) -> Result<Vec<IpAddr>, SourceAddrsError> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((from, to)) => {
                let parse = |s: &str| {
                    s.parse::<std::net::Ipv4Addr>()
                        .map_err(|e| SourceAddrsError(format!("{s:?} is not an IPv4 address: {e}")))
                };
                let (from, to) = (u32::from(parse(from)?), u32::from(parse(to)?));
                if to < from || to - from > 65_535 {
                    return Err(SourceAddrsError(format!("bad address range {part:?}")));
                }
                out.extend((from..=to).map(|a| IpAddr::from(std::net::Ipv4Addr::from(a))));
            }
            None => out
                .push(part.parse().map_err(|e| {
                    SourceAddrsError(format!("{part:?} is not an IP address: {e}"))
                })?),
        }
    }
    Ok(out)
}

/// First retry of a failed enrollment after 250-500 ms, then twice as long
/// each time (half fixed, half random), up to 15-30 s. A fleet of simulated
/// agents sharing one source address runs into the control plane's
/// per-address `enroll_per_minute` limit; retrying at a fixed pace there
/// keeps the limiter refusing (tens of thousands of attempts a minute for a
/// thousand agents), while the backoff lets the bucket refill and spreads
/// the agents out.
const ENROLL_RETRY_BASE: Duration = Duration::from_millis(500);
const ENROLL_RETRY_MAX: Duration = Duration::from_secs(30);

/// Enroll and run `count` agents until `shutdown`.
pub async fn run(config: SimConfig, stats: Arc<SimStats>, shutdown: CancellationToken) {
    let config = Arc::new(config);
    let enroll_slots = Arc::new(Semaphore::new(config.enroll_concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..config.count {
        let config = config.clone();
        let stats = stats.clone();
        let shutdown = shutdown.clone();
        let slots = enroll_slots.clone();
        tasks.spawn(async move {
            let source = (!config.source_addrs.is_empty())
                .then(|| config.source_addrs[i % config.source_addrs.len()]);
            let mut backoff = Backoff::new(ENROLL_RETRY_BASE, ENROLL_RETRY_MAX);
            // One key for every attempt, as the real agent does: a retry of
            // an attempt that committed gets the node it created.
            let key = match EnrollmentKey::generate(&sim_name(&config, i)) {
                Ok(key) => key,
                Err(error) => {
                    stats.enroll_failures.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(agent = i, error = %error, "simulated agent cannot make its key pair");
                    return;
                }
            };
            let identity = loop {
                let permit = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    permit = slots.acquire() => permit,
                };
                let result = enroll(&config, i, &key, source, backoff.attempts()).await;
                drop(permit);
                match result {
                    Ok(identity) => break identity,
                    Err(error) if error.is_rate_limited() => {
                        stats.enroll_rate_limited.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(agent = i, error = %error, attempt = backoff.attempts() + 1, "enrollment rate-limited; backing off");
                    }
                    Err(error) if error.is_transient() => {
                        stats.enroll_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(agent = i, error = %error, attempt = backoff.attempts() + 1, "enrollment failed; backing off");
                    }
                    Err(error) => {
                        stats.enroll_failures.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(agent = i, error = %error, "simulated agent cannot enroll");
                        return;
                    }
                }
                let delay = backoff.next_delay(rand::rng().random::<f64>());
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            };
            stats.enrolled.fetch_add(1, Ordering::Relaxed);
            agent_loop(&config, i, &identity, source, &stats, &shutdown).await;
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Why a simulated agent did not enroll.
#[derive(Debug, thiserror::Error)]
enum SimEnrollError {
    #[error(transparent)]
    Enroll(#[from] EnrollError),
    #[error("enrolled, but the identity is unusable: {0}")]
    Identity(String),
}

impl SimEnrollError {
    fn is_rate_limited(&self) -> bool {
        matches!(self, SimEnrollError::Enroll(e) if e.is_rate_limited())
    }

    fn is_transient(&self) -> bool {
        matches!(self, SimEnrollError::Enroll(e) if e.is_transient())
    }
}

/// Enroll agent `index` the way the real agent does (the same call and
/// checks), from its own source address. The first attempt goes to the
/// first endpoint and each retry to the next: a join token's remaining uses
/// are one record, so a fleet enrolling through several replicas at once
/// would have them contend on it.
/// The name simulated agent `index` enrolls with.
fn sim_name(config: &SimConfig, index: usize) -> String {
    format!("{}-{index:05}", config.name_prefix)
}

async fn enroll(
    config: &SimConfig,
    index: usize,
    key: &EnrollmentKey,
    source: Option<IpAddr>,
    attempt: u32,
) -> Result<SimIdentity, SimEnrollError> {
    let name = sim_name(config, index);
    let options = ChannelOptions {
        keepalive_interval: None,
        local_addr: source,
        ..ChannelOptions::default()
    };
    let endpoints = config.control_plane.all();
    let enrolled = control_plane::enroll(&Enrollment {
        url: &endpoints[attempt as usize % endpoints.len()],
        key,
        options: &options,
        join_token: &config.join_token,
        ca_fingerprint: config.ca_fingerprint,
        name: &name,
        labels: &config.labels,
        agent_version: format!("{}-sim", hotswap_common::VERSION),
    })
    .await?;
    let client = tls::client_config(
        ServerTrust::Ca(enrolled.ca_certificate_pem),
        Some(ClientIdentity {
            cert_pem: &enrolled.certificate_pem,
            key_pem: &enrolled.key_pem,
        }),
    )
    .map_err(|e| SimEnrollError::Identity(e.to_string()))?;
    Ok(SimIdentity {
        node_id: enrolled.node_id,
        name,
        client,
    })
}

/// A simulated module: what it runs and since when.
#[derive(Clone, Debug, PartialEq)]
struct SimModule {
    version: String,
    previous: String,
    staged: String,
    phase: Phase,
    health: Health,
    message: String,
    /// When an install in progress completes.
    ready_at: Option<tokio::time::Instant>,
}

/// Apply a desired state to the simulated modules; returns whether anything changed.
fn apply_desired(
    modules: &mut BTreeMap<String, SimModule>,
    desired: &Desired,
    latency: Duration,
    now: tokio::time::Instant,
) -> bool {
    let mut changed = false;
    for (name, want) in &desired.modules {
        let m = modules.entry(name.clone()).or_insert_with(|| SimModule {
            version: String::new(),
            previous: String::new(),
            staged: String::new(),
            phase: Phase::Installing,
            health: Health::Unknown,
            message: String::new(),
            ready_at: None,
        });
        if !want.staged_version.is_empty() && m.staged != want.staged_version {
            m.staged = want.staged_version.clone();
            changed = true;
        }
        if !want.version.is_empty() && m.version != want.version {
            if !m.version.is_empty() {
                m.previous = m.version.clone();
            }
            m.version = want.version.clone();
            m.phase = Phase::Installing;
            m.health = Health::Unknown;
            m.message.clear();
            m.ready_at = Some(now + latency);
            if m.staged == want.version {
                m.staged.clear();
            }
            changed = true;
        }
    }
    let before = modules.len();
    modules.retain(|name, _| desired.modules.contains_key(name));
    changed || modules.len() != before
}

fn report(
    modules: &BTreeMap<String, SimModule>,
    generation: u64,
    config: &SimConfig,
) -> AgentReport {
    let converged = modules.values().all(|m| m.ready_at.is_none());
    AgentReport {
        modules: modules
            .iter()
            .map(|(name, m)| ModuleReport {
                status: ModuleStatus {
                    name: name.clone(),
                    version: m.version.clone(),
                    phase: m.phase,
                    health: m.health,
                    message: m.message.clone(),
                    staged_version: m.staged.clone(),
                    previous_version: m.previous.clone(),
                    restarts: 0,
                    crash_loop: false,
                    metrics: (m.phase == Phase::Running).then(|| Window {
                        request_rate: 100.0,
                        error_rate: if m.health == Health::Healthy {
                            config.error_rate
                        } else {
                            1.0
                        },
                        latency_p99_seconds: Some(config.latency_p99.as_secs_f64()),
                    }),
                    // Simulated swaps are instant and never fail on the node.
                    settling: Vec::new(),
                    failure_kind: None,
                    usage: (m.phase == Phase::Running).then_some(ModuleUsage {
                        cpu_percent: 5.0,
                        memory_resident_bytes: 32 << 20,
                    }),
                },
                pid: 0,
            })
            .collect(),
        observed_generation: if converged { generation } else { 0 },
        usage: Some(NodeUsage {
            cpu_percent: 5.0,
            memory_used_bytes: 256 << 20,
            memory_total_bytes: 4 << 30,
        }),
        desired_generation: generation,
    }
}

/// Sessions until shutdown, reconnecting after failures and churn: agent
/// `index` starts on endpoint `index mod n` and moves to the next one after
/// every session, whether it broke, churned or never opened.
async fn agent_loop(
    config: &SimConfig,
    index: usize,
    identity: &SimIdentity,
    source: Option<IpAddr>,
    stats: &SimStats,
    shutdown: &CancellationToken,
) {
    let mut modules: BTreeMap<String, SimModule> = BTreeMap::new();
    let mut generation = 0u64;
    let mut delay = Duration::from_millis(100);
    let endpoints = config.control_plane.all();
    let mut at = index % endpoints.len();
    loop {
        let established = session(
            config,
            &endpoints[at],
            identity,
            source,
            stats,
            shutdown,
            &mut modules,
            &mut generation,
        )
        .await;
        if shutdown.is_cancelled() {
            return;
        }
        at = (at + 1) % endpoints.len();
        if established {
            delay = Duration::from_millis(100);
        } else {
            delay = (delay * 2).min(Duration::from_secs(5));
        }
        let jittered = delay.mul_f64(rand::rng().random_range(0.5..1.0));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(jittered) => {}
        }
    }
}

/// One session with `url`; returns whether it got as far as the welcome.
#[allow(clippy::too_many_arguments)]
async fn session(
    config: &SimConfig,
    url: &ControlPlaneUrl,
    identity: &SimIdentity,
    source: Option<IpAddr>,
    stats: &SimStats,
    shutdown: &CancellationToken,
    modules: &mut BTreeMap<String, SimModule>,
    generation: &mut u64,
) -> bool {
    let options = ChannelOptions {
        local_addr: source,
        ..ChannelOptions::default()
    };
    let Ok(channel) = tls::connect(url, identity.client.clone(), &options).await else {
        return false;
    };
    let channel = Connection::new(channel);
    let hello = Hello {
        node_id: identity.node_id.clone(),
        name: identity.name.clone(),
        labels: config.labels.clone(),
        agent_version: format!("{}-sim", hotswap_common::VERSION),
    };
    let Ok(mut session) = channel.open_session(&hello).await else {
        return false;
    };
    let interval = match session.next().await {
        Ok(Some(Inbound::Welcome(welcome))) => welcome.heartbeat_interval(),
        _ => return false,
    };
    stats.sessions.fetch_add(1, Ordering::Relaxed);
    stats.connected.fetch_add(1, Ordering::Relaxed);
    let _connected = Decrement(&stats.connected);

    // Spread heartbeats so N agents do not beat in lockstep.
    let offset = interval.mul_f64(rand::rng().random_range(0.0..1.0));
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
    let mut summary = tokio::time::interval_at(
        tokio::time::Instant::now()
            + config
                .report_every
                .mul_f64(rand::rng().random_range(0.0..1.0)),
        config.report_every,
    );
    let churn_at = config.churn_every.map(|every| {
        tokio::time::Instant::now() + every.mul_f64(rand::rng().random_range(0.5..1.5))
    });
    let mut flap = config
        .flap_every
        .map(|every| tokio::time::interval_at(tokio::time::Instant::now() + every, every));
    let mut seq = 0u64;
    let mut dirty = true;
    // Results of real fetches (`--fetch`): module, version, outcome.
    let (fetched_tx, mut fetched_rx) =
        mpsc::channel::<(String, String, Result<u64, SimFetchError>)>(4);
    let start_fetches = |modules: &mut BTreeMap<String, SimModule>| {
        if !config.fetch {
            return;
        }
        for (name, m) in modules.iter_mut() {
            if m.ready_at.take().is_some() {
                let (channel, tx) = (channel.clone(), fetched_tx.clone());
                let (name, version) = (name.clone(), m.version.clone());
                tokio::spawn(async move {
                    let outcome = fetch_verified(channel, name.clone(), version.clone()).await;
                    let _ = tx.send((name, version, outcome)).await;
                });
            }
        }
    };
    start_fetches(modules);
    loop {
        if dirty {
            dirty = false;
            stats.reports.fetch_add(1, Ordering::Relaxed);
            let report = EncodedReport::new(&report(modules, *generation, config));
            if session.send_report(report).await.is_err() {
                return true;
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return true,
            _ = async {
                match churn_at {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => return true,
            _ = beat.tick() => {
                seq += 1;
                stats.heartbeats.fetch_add(1, Ordering::Relaxed);
                if session.send_heartbeat(seq).await.is_err() {
                    return true;
                }
            }
            _ = summary.tick() => dirty = true,
            _ = async {
                match flap.as_mut() {
                    Some(flap) => { flap.tick().await; }
                    None => std::future::pending().await,
                }
            } => {
                for m in modules.values_mut().filter(|m| m.phase == Phase::Running) {
                    m.health = if m.health == Health::Healthy { Health::Unhealthy } else { Health::Healthy };
                }
                dirty = true;
            }
            Some((name, version, outcome)) = fetched_rx.recv() => {
                if let Some(m) = modules.get_mut(&name).filter(|m| m.version == version) {
                    stats.installs.fetch_add(1, Ordering::Relaxed);
                    match outcome {
                        Ok(bytes) => {
                            stats.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
                            m.phase = Phase::Running;
                            m.health = Health::Healthy;
                        }
                        Err(e) => {
                            stats.fetch_failures.fetch_add(1, Ordering::Relaxed);
                            m.phase = Phase::Failed;
                            m.health = Health::Unhealthy;
                            m.message = e.to_string();
                        }
                    }
                    dirty = true;
                }
            }
            // Only while an install is pending: idle agents cost no wake-ups.
            _ = async {
                match modules.values().filter_map(|m| m.ready_at).min() {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                let now = tokio::time::Instant::now();
                for m in modules.values_mut() {
                    if m.ready_at.is_some_and(|at| at <= now) {
                        m.ready_at = None;
                        stats.installs.fetch_add(1, Ordering::Relaxed);
                        if rand::rng().random_bool(config.failure_rate.clamp(0.0, 1.0)) {
                            m.phase = Phase::Failed;
                            m.health = Health::Unhealthy;
                            m.message = "simulated install failure".into();
                        } else {
                            m.phase = Phase::Running;
                            m.health = Health::Healthy;
                        }
                        dirty = true;
                    }
                }
            }
            message = session.next() => match message {
                Ok(Some(Inbound::Desired(desired))) => {
                    *generation = desired.generation;
                    apply_desired(modules, &desired, config.install_latency, tokio::time::Instant::now());
                    start_fetches(modules);
                    dirty = true;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return true,
            },
        }
    }
}

/// Decrements a counter when dropped (the session ended, however it ended).
struct Decrement<'a>(&'a AtomicU64);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_address_lists_and_ranges() {
        let addrs = parse_source_addrs("127.0.0.2-127.0.0.4, 10.0.0.1").expect("parse");
        let text: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        assert_eq!(text, ["127.0.0.2", "127.0.0.3", "127.0.0.4", "10.0.0.1"]);
        assert!(parse_source_addrs("127.0.0.9-127.0.0.1").is_err());
        assert!(parse_source_addrs("x").is_err());
        assert!(parse_source_addrs("").expect("empty").is_empty());
    }

    #[test]
    fn enrollment_retries_back_off_with_jitter_up_to_a_cap() {
        let mut backoff = Backoff::new(ENROLL_RETRY_BASE, ENROLL_RETRY_MAX);
        let longest: Vec<u64> = (0..10)
            .map(|_| backoff.next_delay(1.0).as_millis() as u64)
            .collect();
        assert_eq!(
            longest,
            [
                500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000, 30_000
            ]
        );
        let mut backoff = Backoff::new(ENROLL_RETRY_BASE, ENROLL_RETRY_MAX);
        let shortest: Vec<u64> = (0..3)
            .map(|_| backoff.next_delay(0.0).as_millis() as u64)
            .collect();
        assert_eq!(shortest, [250, 500, 1_000], "half of each step is random");
    }

    #[test]
    fn stats_line_counts_rate_limited_enrollments_apart() {
        let stats = SimStats::default();
        stats.enroll_failures.fetch_add(1, Ordering::Relaxed);
        stats.enroll_rate_limited.fetch_add(7, Ordering::Relaxed);
        assert!(
            stats
                .line()
                .starts_with("enrolled 0 (failed 1, rate-limited 7), "),
            "{}",
            stats.line()
        );
    }

    #[test]
    fn desired_state_drives_simulated_modules() {
        let now = tokio::time::Instant::now();
        let mut modules = BTreeMap::new();
        let want = |version: &str, staged: &str| Desired {
            generation: 1,
            modules: BTreeMap::from([(
                "web".to_string(),
                crate::state::DesiredModule {
                    version: version.into(),
                    staged_version: staged.into(),
                    traceparent: String::new(),
                },
            )]),
            min_signatures: 1,
        };
        assert!(apply_desired(
            &mut modules,
            &want("1.0.0", ""),
            Duration::from_secs(1),
            now
        ));
        let m = &modules["web"];
        assert_eq!((m.phase, m.version.as_str()), (Phase::Installing, "1.0.0"));
        assert!(!apply_desired(
            &mut modules,
            &want("1.0.0", ""),
            Duration::from_secs(1),
            now
        ));
        assert!(apply_desired(
            &mut modules,
            &want("", "2.0.0"),
            Duration::from_secs(1),
            now
        ));
        assert_eq!(modules["web"].staged, "2.0.0");
        assert!(apply_desired(
            &mut modules,
            &want("2.0.0", ""),
            Duration::from_secs(1),
            now
        ));
        let m = &modules["web"];
        assert_eq!(
            (m.version.as_str(), m.previous.as_str(), m.staged.as_str()),
            ("2.0.0", "1.0.0", "")
        );
        let empty = Desired {
            generation: 2,
            modules: BTreeMap::new(),
            min_signatures: 1,
        };
        assert!(apply_desired(&mut modules, &empty, Duration::ZERO, now));
        assert!(modules.is_empty());
    }
}
