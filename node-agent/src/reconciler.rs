//! The reconciler: converges the node's modules to the desired state,
//! level-triggered. Every pass compares desired with actual and does what is
//! missing (stage, fetch, install, activate, remove), persisting each step,
//! so an agent restarted at any point simply runs the next pass. Sending the
//! same desired state again changes nothing.
//!
//! Every failure is classified ([`FailureKind`]) and retried until the
//! desired state changes: infrastructure failures (control plane
//! unreachable, transfer broken, disk full) quickly, with backoff and jitter;
//! release failures (rejected artifact, failing health gate or hook) with a
//! longer backoff, so a broken hook is not run in a tight loop.
//!
//! A new desired state preempts the step in flight: when it no longer asks
//! for the version being installed or swapped in, the fetch is abandoned and
//! a candidate inside its health gate (or activate hook) is stopped at once,
//! instead of the pass finishing the gate first. Preemption only cuts
//! waiting short; state is written only after a step returned, so
//! `state.json` and the instance ledger stay true wherever it lands.
//! While a swap waits, reports keep going out, naming the versions still
//! settling (see [`ModuleReport::settling`]).
//!
//! Work done for a desired entry that carries a trace context (a deployment's
//! node command) is traced as its children: `fetch`, `verify`, `unpack`
//! (artifact store), `swap`, and `health` (the first health result after the
//! swap, or the pre-check of a staged version).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::control_plane::Connection;
use hotswap_common::artifact::unpack::Limits;
use hotswap_common::labels::Labels;
use hotswap_common::manifest::{self, HealthCheck, Manifest, Runtime, Vars};
use hotswap_common::telemetry;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::artifacts::{ArtifactStore, FetchError, TrustSource};
use crate::health::{Health, probe_once};
use crate::runtime::listeners::{ListenerBook, conflict_message};
use crate::runtime::process::{ProcessStatus, Supervisor, VersionSpec};
use crate::runtime::wasm::engine::{Budget, Engines};
use crate::runtime::wasm::{WasmHost, WasmSpec};
use crate::runtime::{ActivateError, Phase, ProgramError, bundle, check_program, hotswap_env, os};
use crate::scrape::MetricNames;
use crate::state::{AgentState, Desired, ModuleRecord, StateError};
use crate::sysinfo::{CpuSampler, NodeUsage, ProcessSampler};

pub use crate::report::{AgentReport, ModuleReport};
pub use hotswap_common::status::FailureKind;
use hotswap_common::status::{ModuleStatus, ModuleUsage};

/// Why a step (stage, install, swap) did not happen.
#[derive(Clone, Debug, PartialEq, Eq)]
enum StepError {
    /// A new desired state abandoned it; nothing to retry.
    Preempted(String),
    Failed {
        message: String,
        kind: FailureKind,
        /// The control plane could not be reached: the module's phase stays
        /// what it was (nothing failed on the node), and a reconnect retries
        /// at once.
        transient: bool,
    },
}

impl StepError {
    fn release(message: impl Into<String>) -> Self {
        StepError::Failed {
            message: message.into(),
            kind: FailureKind::Release,
            transient: false,
        }
    }
}

/// Why an installed version cannot run as it is: the release's fault.
#[derive(Debug, thiserror::Error)]
enum VersionError {
    #[error(transparent)]
    Manifest(#[from] manifest::ManifestError),
    /// A `${...}` in the manifest that cannot be expanded.
    #[error("{0}")]
    Expand(String),
    #[error("socket {socket:?}: listen {listen:?} (from {template:?}) is not ip:port: {reason}")]
    Socket {
        socket: String,
        listen: String,
        template: String,
        reason: String,
    },
    #[error("artifact declares module {declared:?}, expected {expected:?}")]
    WrongModule { declared: String, expected: String },
    #[error(transparent)]
    Program(#[from] ProgramError),
    /// Another module of the node holds an address this version listens on.
    #[error("{0}")]
    ListenerTaken(String),
    /// A wasm version that cannot be served: its component missing or
    /// outside the module dir.
    #[error("{0}")]
    Wasm(String),
}

/// Artifact trouble, classified: the artifact itself (rejected: unknown,
/// altered, not signed by enough trusted keys) is the release's fault; the
/// way to it (network, control plane) and the disk under it are not.
fn classify_fetch(error: FetchError) -> StepError {
    let (kind, transient) = match &error {
        FetchError::Abandoned(message) => return StepError::Preempted(message.clone()),
        FetchError::Transient(_) => (FailureKind::Infrastructure, true),
        FetchError::Local(_) => (FailureKind::Infrastructure, false),
        FetchError::Rejected(_) => (FailureKind::Release, false),
    };
    StepError::Failed {
        message: error.to_string(),
        kind,
        transient,
    }
}

/// A runtime's activation failure, classified by the runtime.
fn classify_activate(error: ActivateError) -> StepError {
    match error {
        ActivateError::Preempted(message) => StepError::Preempted(message),
        ActivateError::Release(message) => StepError::release(message),
        ActivateError::Infrastructure(message) => StepError::Failed {
            message,
            kind: FailureKind::Infrastructure,
            transient: false,
        },
    }
}

/// How long to wait before retrying a step that failed `attempts` times.
/// Infrastructure trouble retries quickly (it usually clears: a transfer
/// resumes, a disk gets room); a release failure waits longer, so a broken
/// hook or health gate is not run in a tight loop. `jitter` in [0, 1)
/// spreads a fleet's retries by up to ±20 %.
fn retry_delay(kind: FailureKind, attempts: u32, jitter: f64) -> Duration {
    let (base, cap) = match kind {
        FailureKind::Infrastructure => (1u64, 30u64),
        FailureKind::Release => (5, 300),
    };
    let secs = (base << attempts.min(8)).min(cap) as f64;
    Duration::from_secs_f64(secs * (0.8 + 0.4 * jitter.clamp(0.0, 1.0)))
}

/// Which step a preemption watch stands guard over.
#[derive(Clone, Copy, Debug)]
enum Step {
    Stage,
    Activate,
}

/// Why the reconciler cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ReconcilerError {
    #[error(transparent)]
    Store(#[from] FetchError),
    #[error(transparent)]
    State(#[from] StateError),
}

pub struct ReconcilerConfig {
    pub data_dir: PathBuf,
    pub node_name: String,
    pub labels: Labels,
    pub trust: TrustSource,
    pub limits: Limits,
    /// Compiled wasm components, by digest and engine.
    pub wasm_cache_dir: PathBuf,
}

/// Channels between the session and the reconciler.
pub struct ReconcilerLinks {
    /// Desired state from the control plane.
    pub desired: watch::Receiver<Option<Desired>>,
    /// The session's channel while connected, for fetching artifacts.
    pub channel: watch::Receiver<Option<Connection>>,
    /// Reports out.
    pub report: watch::Sender<AgentReport>,
}

/// Retry state of a (module, version) that failed.
struct Failure {
    attempts: u32,
    retry_at: tokio::time::Instant,
    message: String,
    kind: FailureKind,
    transient: bool,
}

pub struct Reconciler {
    config: ReconcilerConfig,
    store: ArtifactStore,
    state: AgentState,
    supervisors: BTreeMap<String, Supervisor>,
    /// Which module holds each listening address, shared with the
    /// supervisors: no two modules of the node share a port.
    listener_book: ListenerBook,
    /// Notified when any supervisor's status changes.
    supervisor_changed: Arc<Notify>,
    /// Wasm modules, served in this process; they report like supervisors.
    wasm_hosts: BTreeMap<String, WasmHost>,
    /// Compiled components and the engines they run on, shared by them.
    wasm_engines: Engines,
    /// Status of bundle modules (process modules report through supervisors).
    bundle_status: BTreeMap<String, (Phase, Health, String)>,
    /// The bundle version whose activate hook runs, per module.
    bundle_settling: BTreeMap<String, String>,
    /// The desired state as the session last received it (ahead of
    /// `state.desired` while a pass runs): what preempts a step in flight.
    latest_desired: Option<watch::Receiver<Option<Desired>>>,
    /// Reports out, also while a pass waits on a swap.
    reports: Option<watch::Sender<AgentReport>>,
    failures: BTreeMap<(String, String), Failure>,
    cpu: CpuSampler,
    usage: Option<NodeUsage>,
    /// Per process module: its sampler and the last usage it measured
    /// (of the process the sampler last read).
    module_usage: BTreeMap<String, (ProcessSampler, Option<ModuleUsage>)>,
    shutdown: CancellationToken,
}

const USAGE_INTERVAL: Duration = Duration::from_secs(5);

impl Reconciler {
    pub fn new(
        config: ReconcilerConfig,
        shutdown: CancellationToken,
    ) -> Result<Self, ReconcilerError> {
        let store = ArtifactStore::open(&config.data_dir, config.trust.clone(), config.limits)?
            .with_node_name(&config.node_name);
        let state = AgentState::load(&config.data_dir)?;
        let wasm_engines = Engines::new(config.wasm_cache_dir.clone());
        let mut reconciler = Self {
            config,
            store,
            state,
            supervisors: BTreeMap::new(),
            listener_book: ListenerBook::default(),
            supervisor_changed: Arc::new(Notify::new()),
            wasm_hosts: BTreeMap::new(),
            wasm_engines,
            bundle_status: BTreeMap::new(),
            bundle_settling: BTreeMap::new(),
            latest_desired: None,
            reports: None,
            failures: BTreeMap::new(),
            cpu: CpuSampler::new(),
            usage: None,
            module_usage: BTreeMap::new(),
            shutdown,
        };
        reconciler.adopt_running();
        Ok(reconciler)
    }

    fn log_dir(&self) -> PathBuf {
        self.config.data_dir.join("logs")
    }

    fn module_root(&self, name: &str) -> PathBuf {
        self.store
            .module_dir(name, "x")
            .parent()
            .map(PathBuf::from)
            .unwrap_or_default()
    }

    /// Supervise process modules a previous agent left running.
    fn adopt_running(&mut self) {
        let records: Vec<(String, ModuleRecord)> = self
            .state
            .modules
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, record) in records {
            // A wasm module ran inside the previous agent: the first pass
            // serves its active version again (compiled code from the cache).
            if record.runtime == "wasm" {
                continue;
            }
            if record.runtime != "process" {
                if let Some(active) = &record.active {
                    self.bundle_status.insert(
                        name.clone(),
                        (Phase::Running, Health::Healthy, String::new()),
                    );
                    tracing::debug!(module = %name, version = %active, "bundle active");
                }
                continue;
            }
            let (Some(active), Some(instance)) = (record.active.clone(), record.instance.clone())
            else {
                continue;
            };
            let spec = match self.version_spec(&name, &active, record.previous.as_deref()) {
                Ok((_, spec)) => spec,
                Err(e) => {
                    tracing::error!(module = %name, error = %e, "cannot rebuild the running version's spec");
                    continue;
                }
            };
            let supervisor = self.new_supervisor(&name, Some((instance, spec)));
            self.supervisors.insert(name, supervisor);
        }
    }

    fn new_supervisor(
        &self,
        name: &str,
        adopt: Option<(crate::runtime::process::InstanceRecord, VersionSpec)>,
    ) -> Supervisor {
        let _ = std::fs::create_dir_all(self.log_dir());
        let supervisor = Supervisor::spawn(
            name,
            self.listener_book.clone(),
            self.log_dir().join(format!("{name}.log")),
            self.config
                .data_dir
                .join("instances")
                .join(format!("{name}.json")),
            adopt,
            self.shutdown.clone(),
        );
        let mut status = supervisor.status();
        let notify = self.supervisor_changed.clone();
        tokio::spawn(async move {
            while status.changed().await.is_ok() {
                notify.notify_one();
            }
        });
        supervisor
    }

    fn vars<'a>(&'a self, dir: &'a str) -> Vars<'a> {
        Vars {
            node_name: &self.config.node_name,
            labels: &self.config.labels,
            module_dir: dir,
        }
    }

    /// Load an installed version's manifest and build what the runtime needs.
    fn version_spec(
        &self,
        name: &str,
        version: &str,
        previous: Option<&str>,
    ) -> Result<(Manifest, VersionSpec), VersionError> {
        let dir = self.store.module_dir(name, version);
        let manifest = manifest::load_manifest(&dir.join(manifest::MANIFEST_FILE))?;
        let dir_text = dir.display().to_string();
        let vars = self.vars(&dir_text);
        let expand = |value: &str| manifest::expand(value, &vars).map_err(VersionError::Expand);
        let expand_all = |values: &[String]| {
            values
                .iter()
                .map(|v| expand(v))
                .collect::<Result<Vec<_>, _>>()
        };
        let mut env = hotswap_env(name, version, previous, &dir, &self.config.node_name);
        let health = match &manifest.health {
            Some(spec) => {
                let check = match &spec.check {
                    HealthCheck::Http(url) => HealthCheck::Http(expand(url)?),
                    HealthCheck::Tcp(addr) => HealthCheck::Tcp(expand(addr)?),
                    HealthCheck::Exec(cmd) => HealthCheck::Exec(expand_all(cmd)?),
                };
                Some((check, spec.clone()))
            }
            None => None,
        };
        let metrics = match &manifest.metrics {
            Some(spec) => Some((expand(&spec.prometheus)?, MetricNames::from(spec))),
            None => None,
        };
        let (command, swap, stop_signal, stop_timeout, sockets) = match &manifest.process {
            Some(process) => {
                for (key, value) in &process.env {
                    env.push((key.clone(), expand(value)?));
                }
                let mut sockets = Vec::new();
                for socket in &process.sockets {
                    let text = expand(&socket.listen)?;
                    let listen = text.parse().map_err(|e: std::net::AddrParseError| {
                        VersionError::Socket {
                            socket: socket.name.clone(),
                            listen: text.clone(),
                            template: socket.listen.clone(),
                            reason: e.to_string(),
                        }
                    })?;
                    sockets.push(crate::runtime::process::ListenSocket {
                        name: socket.name.clone(),
                        listen,
                    });
                }
                (
                    expand_all(&process.command)?,
                    process.swap,
                    os::signal_number(process.stop_signal.name),
                    process.stop_timeout,
                    sockets,
                )
            }
            None => (
                Vec::new(),
                manifest::SwapStrategy::StartFirst,
                libc::SIGTERM,
                Duration::from_secs(10),
                Vec::new(),
            ),
        };
        let spec = VersionSpec {
            version: version.to_string(),
            dir,
            command,
            env,
            swap,
            stop_signal,
            stop_timeout,
            sockets,
            health,
            metrics,
        };
        Ok((manifest, spec))
    }

    /// What the wasm runtime needs of an installed version.
    fn wasm_spec(&self, name: &str, version: &str) -> Result<WasmSpec, VersionError> {
        let (manifest, spec) = self.version_spec(name, version, None)?;
        let Some(wasm) = &manifest.wasm else {
            return Err(VersionError::Wasm(format!(
                "{version} is a {} module, not a wasm one",
                manifest.runtime
            )));
        };
        let dir_text = spec.dir.display().to_string();
        let vars = self.vars(&dir_text);
        let expand = |value: &str| manifest::expand(value, &vars).map_err(VersionError::Expand);
        let mut env = Vec::with_capacity(wasm.env.len());
        for (key, value) in &wasm.env {
            env.push((key.clone(), expand(value)?));
        }
        let mut sockets = Vec::with_capacity(wasm.sockets.len());
        for socket in &wasm.sockets {
            let text = expand(&socket.listen)?;
            let listen =
                text.parse()
                    .map_err(|e: std::net::AddrParseError| VersionError::Socket {
                        socket: socket.name.clone(),
                        listen: text.clone(),
                        template: socket.listen.clone(),
                        reason: e.to_string(),
                    })?;
            sockets.push((socket.name.clone(), listen));
        }
        let component = crate::runtime::wasm::component_path(&spec.dir, &wasm.component)
            .map_err(VersionError::Wasm)?;
        Ok(WasmSpec {
            version: version.to_string(),
            component,
            budget: Budget {
                max_memory: wasm.max_memory,
                max_concurrent_requests: wasm.max_concurrent_requests,
            },
            request_timeout: wasm.request_timeout,
            env,
            sockets,
            health: spec.health,
            dir: spec.dir,
        })
    }

    fn wasm_host(&mut self, name: &str) -> &mut WasmHost {
        if !self.wasm_hosts.contains_key(name) {
            let _ = std::fs::create_dir_all(self.log_dir());
            let host = WasmHost::new(
                name,
                self.listener_book.clone(),
                self.wasm_engines.clone(),
                self.log_dir().join(format!("{name}.log")),
            );
            let mut status = host.status();
            let notify = self.supervisor_changed.clone();
            tokio::spawn(async move {
                while status.changed().await.is_ok() {
                    notify.notify_one();
                }
            });
            self.wasm_hosts.insert(name.to_string(), host);
        }
        self.wasm_hosts.get_mut(name).expect("inserted just above")
    }

    /// Fetch (if needed) and unpack a version; returns its directory.
    async fn ensure_installed(
        &self,
        channel: Option<&Connection>,
        name: &str,
        version: &str,
        preempt: &CancellationToken,
    ) -> Result<PathBuf, FetchError> {
        let dir = self.store.module_dir(name, version);
        let required = self.required_signatures();
        if dir.is_dir() && required <= 1 {
            return Ok(dir);
        }
        if self.store.cached_digest(name, version).is_none() {
            let channel = channel.ok_or_else(|| {
                FetchError::Transient(format!(
                    "artifact {name}@{version} is not cached and the control plane is not connected"
                ))
            })?;
            self.store
                .fetch_until(channel, name, version, preempt)
                .await?;
        }
        self.store.install(name, version, required).await
    }

    /// Distinct trusted keys an artifact needs before this node unpacks or
    /// runs it: the environment's `min_signatures` as the control plane
    /// sent it (at least one).
    fn required_signatures(&self) -> u32 {
        self.state
            .desired
            .as_ref()
            .map_or(1, |d| d.min_signatures.max(1))
    }

    /// Install `name@version`; a download is abandoned when the desired
    /// state stops asking for it (see [`ArtifactStore::fetch_until`]).
    async fn install_preemptible(
        &self,
        channel: Option<&Connection>,
        name: &str,
        version: &str,
        preempt: &CancellationToken,
    ) -> Result<PathBuf, StepError> {
        self.ensure_installed(channel, name, version, preempt)
            .await
            .map_err(classify_fetch)
    }

    /// A token cancelled as soon as the desired state the session received
    /// no longer asks for `version` of `name` (checked at once, then on
    /// every change). Cancel it when the step is over: that ends the watch.
    fn preemption(&self, name: &str, version: &str, step: Step) -> CancellationToken {
        let token = CancellationToken::new();
        let Some(latest) = &self.latest_desired else {
            return token;
        };
        let mut latest = latest.clone();
        let watch = token.clone();
        let (name, version) = (name.to_string(), version.to_string());
        tokio::spawn(async move {
            loop {
                let abandoned = latest.borrow_and_update().as_ref().is_some_and(|d| {
                    d.modules.get(&name).is_none_or(|m| match step {
                        Step::Activate => m.version != version,
                        // A staged version about to be activated is still wanted.
                        Step::Stage => m.staged_version != version && m.version != version,
                    })
                });
                if abandoned {
                    tracing::info!(module = %name, version = %version, "desired state changed; preempting the step in flight");
                    watch.cancel();
                    return;
                }
                tokio::select! {
                    changed = latest.changed() => if changed.is_err() { return },
                    _ = watch.cancelled() => return,
                }
            }
        });
        token
    }

    /// Send the current report if it changed (also from inside a pass).
    fn send_report(&self) {
        let Some(reports) = &self.reports else {
            return;
        };
        reports.send_if_modified(|current| {
            let fresh = self.report();
            if *current == fresh {
                return false;
            }
            *current = fresh;
            true
        });
    }

    /// Pre-check an unpacked version without activating it.
    fn precheck(&self, name: &str, version: &str) -> Result<Manifest, VersionError> {
        let (manifest, spec) = self.version_spec(name, version, None)?;
        if manifest.name != name {
            return Err(VersionError::WrongModule {
                declared: manifest.name,
                expected: name.to_string(),
            });
        }
        match manifest.runtime {
            Runtime::Process => {
                check_program(&spec.command[0], &spec.dir)?;
                // Staging fails at once on another module's address, so a
                // blue-green wave stops before anything is switched; the
                // supervisor's claim at bind time closes the remaining race.
                for socket in &spec.sockets {
                    if let Some(taken) = self.listener_book.taken(name, socket.listen) {
                        return Err(VersionError::ListenerTaken(conflict_message(
                            name,
                            &socket.name,
                            socket.listen,
                            &taken,
                        )));
                    }
                }
            }
            Runtime::Bundle => {
                if let Some(bundle) = &manifest.bundle {
                    for hook in [&bundle.activate, &bundle.deactivate].into_iter().flatten() {
                        if let Some(program) = hook.first() {
                            check_program(program, &spec.dir)?;
                        }
                    }
                }
            }
            Runtime::Wasm => {
                let wasm = self.wasm_spec(name, version)?;
                for (socket, listen) in &wasm.sockets {
                    if let Some(taken) = self.listener_book.taken(name, *listen) {
                        return Err(VersionError::ListenerTaken(conflict_message(
                            name, socket, *listen, &taken,
                        )));
                    }
                }
            }
        }
        Ok(manifest)
    }

    /// [`Reconciler::precheck`] of a version being staged, traced as the
    /// `health` step of the node command that asked for it.
    fn precheck_staged(
        &self,
        name: &str,
        version: &str,
        traceparent: &str,
    ) -> Result<Manifest, VersionError> {
        let span = telemetry::span_with_parent(
            tracing::info_span!(
                target: telemetry::TARGET,
                "health",
                module = %name,
                version = %version,
                node = %self.config.node_name,
                check = "pre-check",
            ),
            traceparent,
        );
        let result = span.in_scope(|| self.precheck(name, version));
        telemetry::record_result(&span, result)
    }

    /// The first health result of a version just swapped in, traced as the
    /// `health` step of the node command that asked for it: one probe of a
    /// bundle with a health check (an observation only; the runtime's own
    /// tracking is unchanged), else the health the runtime reports. A process
    /// module is never probed here: its supervisor probes it, and a second
    /// prober could overlap its probes.
    async fn first_health(&self, name: &str, spec: &VersionSpec) {
        let span = tracing::info_span!(
            target: telemetry::TARGET,
            "health",
            module = %name,
            version = %spec.version,
            node = %self.config.node_name,
            check = tracing::field::Empty,
            health = tracing::field::Empty,
        );
        let probe = async {
            let supervisor = self.supervisors.get(name);
            let health = match &spec.health {
                Some((check, health)) => {
                    let kind = match check {
                        HealthCheck::Http(_) => "http",
                        HealthCheck::Tcp(_) => "tcp",
                        HealthCheck::Exec(_) => "exec",
                    };
                    span.record("check", kind);
                    if let Some(supervisor) = supervisor {
                        // Healthy exactly when it just passed its start gate.
                        supervisor.status().borrow().health
                    } else {
                        match probe_once(check, health.timeout, &spec.env, &spec.dir).await {
                            Ok(()) => Health::Healthy,
                            Err(e) => {
                                telemetry::record_error(&span, e);
                                Health::Unhealthy
                            }
                        }
                    }
                }
                None => {
                    span.record("check", "none");
                    match supervisor {
                        Some(supervisor) => supervisor.status().borrow().health,
                        None => self
                            .bundle_status
                            .get(name)
                            .map_or(Health::Unknown, |(_, health, _)| *health),
                    }
                }
            };
            span.record("health", health.as_str());
        };
        probe.instrument(span.clone()).await;
    }

    fn persist(&self) {
        if let Err(e) = self.state.save(&self.config.data_dir) {
            tracing::error!(error = %e, "cannot persist agent state");
        }
    }

    /// Record a failed step for its retry; returns false when the step
    /// was preempted instead (nothing failed, nothing to retry).
    fn fail(&mut self, name: &str, version: &str, error: StepError) -> bool {
        let (message, kind, transient) = match error {
            StepError::Preempted(message) => {
                tracing::info!(module = %name, version = %version, reason = %message, "step preempted");
                return false;
            }
            StepError::Failed {
                message,
                kind,
                transient,
            } => (message, kind, transient),
        };
        let key = (name.to_string(), version.to_string());
        let attempts = self.failures.get(&key).map_or(1, |f| f.attempts + 1);
        let delay = retry_delay(kind, attempts, rand::random::<f64>());
        tracing::warn!(module = %name, version = %version, attempts, kind = kind.as_str(), retry_in_ms = delay.as_millis() as u64, error = %message, "step failed");
        self.failures.insert(
            key,
            Failure {
                attempts,
                retry_at: tokio::time::Instant::now() + delay,
                message,
                kind,
                transient,
            },
        );
        true
    }

    /// One pass; returns true when everything desired is in place.
    async fn pass(&mut self, channel: Option<Connection>) -> bool {
        let Some(desired) = self.state.desired.clone() else {
            return true;
        };
        let mut converged = true;
        let now = tokio::time::Instant::now();
        for (name, want) in &desired.modules {
            // Staging (blue-green): fetch, verify, unpack and pre-check only.
            if !want.staged_version.is_empty() {
                let record = self.state.modules.get(name).cloned().unwrap_or_default();
                let staged = &want.staged_version;
                if record.staged.as_ref() != Some(staged) && record.active.as_ref() != Some(staged)
                {
                    if self.waiting(name, staged, now) {
                        converged = false;
                    } else {
                        let preempt = self.preemption(name, staged, Step::Stage);
                        let _done = preempt.clone().drop_guard();
                        let installed = telemetry::in_trace(
                            &want.traceparent,
                            self.install_preemptible(channel.as_ref(), name, staged, &preempt),
                        )
                        .await;
                        let checked = match installed {
                            Ok(dir) => {
                                match self.precheck_staged(name, staged, &want.traceparent) {
                                    Ok(manifest) if manifest.runtime == Runtime::Wasm => {
                                        self.stage_wasm(name, staged).await.map(|()| manifest)
                                    }
                                    other => other.map_err(|e| {
                                        StepError::release(format!(
                                            "pre-check of {staged} failed: {e}"
                                        ))
                                    }),
                                }
                                .map(|manifest| (dir, manifest))
                            }
                            Err(e) => Err(e),
                        };
                        match checked {
                            Ok((_, manifest)) => {
                                let entry = self.state.modules.entry(name.clone()).or_default();
                                entry.staged = Some(staged.clone());
                                if entry.runtime.is_empty() {
                                    entry.runtime = manifest.runtime.as_str().to_string();
                                }
                                self.failures.remove(&(name.clone(), staged.clone()));
                                self.persist();
                                tracing::info!(module = %name, version = %staged, "staged");
                            }
                            Err(e) => {
                                if !self.fail(name, staged, e) {
                                    // Preempted: the next pass works on the new desired state.
                                    return false;
                                }
                                converged = false;
                            }
                        }
                    }
                }
            }
            if want.version.is_empty() {
                continue;
            }
            let record = self.state.modules.get(name).cloned().unwrap_or_default();
            let running_ok = record.active.as_ref() == Some(&want.version)
                && match record.runtime.as_str() {
                    "process" => self.supervisors.contains_key(name),
                    // In process: after an agent restart it serves nothing
                    // until activated again.
                    "wasm" => {
                        self.wasm_hosts.get(name).and_then(WasmHost::current)
                            == Some(want.version.clone())
                    }
                    _ => true,
                };
            if running_ok {
                continue;
            }
            if self.waiting(name, &want.version, now) {
                converged = false;
                continue;
            }
            if let Err(error) = self
                .activate(channel.as_ref(), name, &want.version, &want.traceparent)
                .await
            {
                if !self.fail(name, &want.version, error) {
                    // Preempted: the next pass works on the new desired state.
                    return false;
                }
                converged = false;
            } else {
                self.failures.remove(&(name.clone(), want.version.clone()));
            }
        }
        // Modules no longer desired are stopped and forgotten (the cache stays).
        let unwanted: Vec<String> = self
            .state
            .modules
            .keys()
            .filter(|m| !desired.modules.contains_key(*m))
            .cloned()
            .collect();
        for name in unwanted {
            self.remove(&name).await;
        }
        if converged && self.state.observed_generation != desired.generation {
            self.state.observed_generation = desired.generation;
            self.persist();
        }
        converged
    }

    /// Compile and check a staged wasm version, so a bad component fails
    /// its stage and the activation later is only the switch.
    async fn stage_wasm(&mut self, name: &str, version: &str) -> Result<(), StepError> {
        let spec = self
            .wasm_spec(name, version)
            .map_err(|e| StepError::release(format!("pre-check of {version} failed: {e}")))?;
        self.wasm_host(name)
            .stage(spec)
            .await
            .map(|_| ())
            .map_err(|e| classify_activate(e.map_message(|m| format!("staging {version}: {m}"))))
    }

    fn waiting(&self, name: &str, version: &str, now: tokio::time::Instant) -> bool {
        self.failures
            .get(&(name.to_string(), version.to_string()))
            .is_some_and(|f| f.retry_at > now)
    }

    async fn activate(
        &mut self,
        channel: Option<&Connection>,
        name: &str,
        version: &str,
        traceparent: &str,
    ) -> Result<(), StepError> {
        let started = std::time::Instant::now();
        let preempt = self.preemption(name, version, Step::Activate);
        // Ends the watch however this returns.
        let _done = preempt.clone().drop_guard();
        let result = telemetry::in_trace(
            traceparent,
            self.activate_inner(channel, name, version, &preempt),
        )
        .await;
        // Neither a transient failure (the control plane unreachable) nor a
        // preemption is a swap.
        let outcome = match &result {
            Ok(_) => Some("ok"),
            Err(StepError::Failed {
                transient: false, ..
            }) => Some("failed"),
            Err(_) => None,
        };
        if let Some(outcome) = outcome {
            crate::metrics::SWAPS
                .get_or_create(&crate::metrics::SwapLabels {
                    module: name.to_string(),
                    result: outcome,
                })
                .inc();
            crate::metrics::SWAP_SECONDS
                .get_or_create(&crate::metrics::ModuleLabel {
                    module: name.to_string(),
                })
                .observe(started.elapsed().as_secs_f64());
        }
        let spec = result?;
        // Outside the swap's timing: only traced activations probe here.
        if !traceparent.is_empty() && telemetry::enabled() {
            telemetry::in_trace(traceparent, self.first_health(name, &spec)).await;
        }
        Ok(())
    }

    /// Install, then swap; returns the spec of the version now active.
    async fn activate_inner(
        &mut self,
        channel: Option<&Connection>,
        name: &str,
        version: &str,
        preempt: &CancellationToken,
    ) -> Result<VersionSpec, StepError> {
        self.install_preemptible(channel, name, version, preempt)
            .await?;
        let span = tracing::info_span!(
            target: telemetry::TARGET,
            "swap",
            module = %name,
            version = %version,
            node = %self.config.node_name,
        );
        let result = self
            .swap(name, version, preempt)
            .instrument(span.clone())
            .await;
        match &result {
            Err(StepError::Failed { message, .. }) | Err(StepError::Preempted(message)) => {
                telemetry::record_error(&span, message)
            }
            Ok(_) => {}
        }
        result
    }

    /// Pre-check an installed version and make it the active one. Reports
    /// go out while the runtime works (a process swap's health gate, a
    /// bundle's activate hook), naming the candidate as settling; cancelling
    /// `preempt` stops the candidate and keeps the previous version.
    async fn swap(
        &mut self,
        name: &str,
        version: &str,
        preempt: &CancellationToken,
    ) -> Result<VersionSpec, StepError> {
        let manifest = self
            .precheck(name, version)
            .map_err(|e| StepError::release(format!("pre-check of {version} failed: {e}")))?;
        let record = self.state.modules.get(name).cloned().unwrap_or_default();
        let previous = record.active.clone().filter(|a| a != version);
        // Switching runtimes: retire the old one first.
        if !record.runtime.is_empty()
            && record.runtime != manifest.runtime.as_str()
            && record.active.is_some()
        {
            self.remove(name).await;
        }
        let (_, spec) = self
            .version_spec(name, version, previous.as_deref())
            .map_err(|e| StepError::release(e.to_string()))?;
        tracing::info!(module = %name, version = %version, previous = ?previous, runtime = manifest.runtime.as_str(), "activating");
        match manifest.runtime {
            Runtime::Bundle => {
                let hook = manifest.bundle.as_ref().and_then(|b| b.activate.clone());
                let dir_text = spec.dir.display().to_string();
                let hook = match hook {
                    Some(cmd) => Some(
                        cmd.iter()
                            .map(|v| manifest::expand(v, &self.vars(&dir_text)))
                            .collect::<Result<Vec<_>, _>>()
                            .map_err(StepError::release)?,
                    ),
                    None => None,
                };
                self.bundle_status.insert(
                    name.to_string(),
                    (Phase::Starting, Health::Unknown, String::new()),
                );
                self.bundle_settling
                    .insert(name.to_string(), version.to_string());
                self.send_report();
                let root = self.module_root(name);
                let result = bundle::activate(
                    &root,
                    version,
                    previous.as_deref(),
                    hook.as_deref(),
                    &spec.env,
                    preempt,
                )
                .await;
                self.bundle_settling.remove(name);
                if let Err(e) = result {
                    // The hook failed or was preempted: the previous version
                    // (if any) is active again. A failure shows as `failed`
                    // for the version it was asked to run.
                    let status = match (&e, &previous) {
                        (ActivateError::Preempted(_), Some(_)) => {
                            (Phase::Running, Health::Healthy, String::new())
                        }
                        (ActivateError::Preempted(_), None) => {
                            (Phase::Stopped, Health::Unknown, e.to_string())
                        }
                        _ => (Phase::Failed, Health::Unhealthy, e.to_string()),
                    };
                    self.bundle_status.insert(name.to_string(), status);
                    return Err(classify_activate(e));
                }
                self.bundle_status.insert(
                    name.to_string(),
                    (Phase::Running, Health::Healthy, String::new()),
                );
            }
            Runtime::Wasm => {
                let wasm = self
                    .wasm_spec(name, version)
                    .map_err(|e| StepError::release(e.to_string()))?;
                // Compiling (seconds on a cache miss) and the health gate run
                // off the request path; the version serving keeps serving.
                self.wasm_host(name)
                    .activate(wasm, preempt)
                    .await
                    .map(|_| ())
                    .map_err(|e| classify_activate(e.map_message(|m| format!("{version}: {m}"))))?;
            }
            Runtime::Process => {
                if !self.supervisors.contains_key(name) {
                    let supervisor = self.new_supervisor(name, None);
                    self.supervisors.insert(name.to_string(), supervisor);
                }
                let supervisor = self
                    .supervisors
                    .get(name)
                    .ok_or_else(|| StepError::Failed {
                        message: "supervisor missing".to_string(),
                        kind: FailureKind::Infrastructure,
                        transient: false,
                    })?;
                // The gate may last the version's whole `start_timeout`:
                // report every status change meanwhile, so the control
                // plane sees the candidate settling rather than the old
                // version simply running.
                let mut status = supervisor.status();
                let activation = supervisor.activate(spec.clone(), preempt.clone());
                tokio::pin!(activation);
                let mut watching = true;
                let result = loop {
                    tokio::select! {
                        result = &mut activation => break result,
                        changed = status.changed(), if watching => match changed {
                            Ok(()) => self.send_report(),
                            Err(_) => watching = false,
                        },
                    }
                };
                result.map_err(classify_activate)?;
            }
        }
        let entry = self.state.modules.entry(name.to_string()).or_default();
        if entry.active.as_deref() != Some(version) {
            entry.previous = entry.active.take().or(entry.previous.take());
        }
        entry.active = Some(version.to_string());
        entry.runtime = manifest.runtime.as_str().to_string();
        if entry.staged.as_deref() == Some(version) {
            entry.staged = None;
        }
        self.sync_instances();
        self.persist();
        tracing::info!(module = %name, version = %version, "active");
        Ok(spec)
    }

    async fn remove(&mut self, name: &str) {
        let Some(record) = self.state.modules.get(name).cloned() else {
            return;
        };
        tracing::info!(module = %name, "no longer desired; removing");
        if let Some(mut host) = self.wasm_hosts.remove(name) {
            host.stop();
        } else if let Some(supervisor) = self.supervisors.remove(name) {
            if let Err(e) = supervisor.stop().await {
                tracing::warn!(module = %name, error = %e, "stop failed");
            }
        } else if record.runtime == "bundle"
            && let Some(active) = &record.active
        {
            let hook = self.version_spec(name, active, None).ok().and_then(|_| {
                manifest::load_manifest(
                    &self
                        .store
                        .module_dir(name, active)
                        .join(manifest::MANIFEST_FILE),
                )
                .ok()
                .and_then(|m| m.bundle.and_then(|b| b.deactivate))
            });
            let env = hotswap_env(
                name,
                active,
                None,
                &self.store.module_dir(name, active),
                &self.config.node_name,
            );
            if let Err(e) =
                bundle::deactivate(&self.module_root(name), active, hook.as_deref(), &env).await
            {
                tracing::warn!(module = %name, error = %e, "deactivate failed");
            }
        }
        self.bundle_status.remove(name);
        self.state.modules.remove(name);
        self.persist();
    }

    /// Copy process instance records from the supervisors into the state.
    fn sync_instances(&mut self) -> bool {
        let mut changed = false;
        for (name, supervisor) in &self.supervisors {
            let instance = supervisor.status().borrow().instance.clone();
            if let Some(record) = self.state.modules.get_mut(name)
                && record.instance != instance
            {
                record.instance = instance;
                changed = true;
            }
        }
        changed
    }

    fn report(&self) -> AgentReport {
        let mut modules = Vec::new();
        let desired = self.state.desired.clone().unwrap_or_default();
        for (name, record) in &self.state.modules {
            let mut report = ModuleReport {
                status: ModuleStatus {
                    name: name.clone(),
                    version: record.active.clone().unwrap_or_default(),
                    previous_version: record.previous.clone().unwrap_or_default(),
                    staged_version: record.staged.clone().unwrap_or_default(),
                    phase: if record.active.is_some() {
                        Phase::Running
                    } else if record.staged.is_some() {
                        Phase::Staged
                    } else {
                        Phase::Installing
                    },
                    ..Default::default()
                },
                pid: 0,
            };
            if let Some(supervisor) = self.supervisors.get(name) {
                let status: ProcessStatus = supervisor.status().borrow().clone();
                report.phase = status.phase;
                report.health = status.health;
                report.message = status.message;
                report.restarts = status.restarts;
                report.crash_loop = status.crash_loop;
                report.pid = status.instance.as_ref().map_or(0, |i| i.pid);
                report.usage = self
                    .module_usage
                    .get(name)
                    .filter(|(sampler, _)| report.pid != 0 && sampler.pid() == Some(report.pid))
                    .and_then(|(_, usage)| *usage);
                report.metrics = status.metrics;
                report.settling = status.settling;
                if let Some(version) = status.version {
                    report.version = version;
                }
                // The running version's own failure: it crash-loops, or
                // could not be started again.
                if report.crash_loop || report.phase == Phase::Failed {
                    report.failure_kind = Some(FailureKind::Release);
                }
            } else if let Some(host) = self.wasm_hosts.get(name) {
                let status: ProcessStatus = host.status().borrow().clone();
                report.phase = status.phase;
                report.health = status.health;
                report.message = status.message;
                report.metrics = status.metrics;
                report.settling = status.settling;
                if let Some(version) = status.version {
                    report.version = version;
                }
            } else if let Some((phase, health, message)) = self.bundle_status.get(name) {
                report.phase = *phase;
                report.health = *health;
                report.message = message.clone();
                report.settling = self
                    .bundle_settling
                    .get(name)
                    .cloned()
                    .into_iter()
                    .collect();
            }
            let status = &mut report.status;
            status.settling.retain(|v| *v != status.version);
            // A desired version that keeps failing shows as failed.
            if let Some(want) = desired.modules.get(name)
                && let Some(failure) = self.failures.get(&(name.clone(), want.version.clone()))
                && report.version != want.version
            {
                if !failure.transient {
                    report.phase = Phase::Failed;
                }
                report.message = failure.message.clone();
                report.failure_kind = Some(failure.kind);
            }
            modules.push(report);
        }
        // Desired modules not installed at all yet.
        for (name, want) in &desired.modules {
            if self.state.modules.contains_key(name) {
                continue;
            }
            let failure = self.failures.get(&(name.clone(), want.version.clone()));
            modules.push(ModuleReport {
                status: ModuleStatus {
                    name: name.clone(),
                    phase: match failure {
                        Some(f) if !f.transient => Phase::Failed,
                        _ => Phase::Installing,
                    },
                    message: failure.map(|f| f.message.clone()).unwrap_or_default(),
                    failure_kind: failure.map(|f| f.kind),
                    ..Default::default()
                },
                pid: 0,
            });
        }
        for m in &modules {
            crate::metrics::set_module_health(&m.name, m.health.as_str());
        }
        AgentReport {
            modules,
            observed_generation: self.state.observed_generation,
            desired_generation: desired.generation,
            usage: self.usage,
        }
    }

    /// Take the desired state the session received last, if it differs
    /// from the one in `state.json`.
    fn take_desired(&mut self, desired: &mut watch::Receiver<Option<Desired>>) {
        let latest = desired.borrow_and_update().clone();
        if let Some(latest) = latest
            && self.state.desired.as_ref() != Some(&latest)
        {
            tracing::info!(
                generation = latest.generation,
                modules = latest.modules.len(),
                "desired state received"
            );
            // New desired state: give every failed step a fresh start.
            self.failures.clear();
            self.state.desired = Some(latest);
            self.persist();
        }
    }

    /// Run until shutdown. Module processes are left running on return.
    pub async fn run(mut self, links: ReconcilerLinks) {
        let ReconcilerLinks {
            mut desired,
            mut channel,
            report,
        } = links;
        self.latest_desired = Some(desired.clone());
        self.reports = Some(report);
        let mut usage_tick = tokio::time::interval(USAGE_INTERVAL);
        usage_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A desired state that arrived during the last pass (and maybe
            // preempted it) is taken up before the next one.
            self.take_desired(&mut desired);
            let connection = channel.borrow().clone();
            self.pass(connection).await;
            if self.sync_instances() {
                self.persist();
            }
            self.send_report();
            let next_retry = self.failures.values().map(|f| f.retry_at).min();
            let notify = self.supervisor_changed.clone();
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                changed = desired.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Taken at the top of the loop.
                }
                changed = channel.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Reconnected: transient failures may go through now.
                    let now = tokio::time::Instant::now();
                    for failure in self.failures.values_mut().filter(|f| f.transient) {
                        failure.retry_at = now;
                    }
                }
                _ = notify.notified() => {}
                _ = async {
                    match next_retry {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => {}
                _ = usage_tick.tick() => {
                    self.usage = self.cpu.sample().ok();
                    self.sample_modules();
                    self.probe_bundles().await;
                }
            }
        }
    }

    /// Each process module's usage since the previous tick, from its
    /// current instance; modules without one are forgotten.
    fn sample_modules(&mut self) {
        let now = std::time::Instant::now();
        let running: BTreeMap<String, u32> = self
            .supervisors
            .iter()
            .filter_map(|(name, supervisor)| {
                let pid = supervisor.status().borrow().instance.as_ref()?.pid;
                Some((name.clone(), pid))
            })
            .collect();
        self.module_usage
            .retain(|name, _| running.contains_key(name));
        for (name, pid) in running {
            let (sampler, usage) = self.module_usage.entry(name).or_default();
            // A process that just exited has no /proc entry: no sample.
            *usage = sampler.sample(pid, now).ok().flatten();
        }
    }

    /// Bundles with a [health] section are probed on the usage tick.
    async fn probe_bundles(&mut self) {
        let names: Vec<(String, String)> = self
            .state
            .modules
            .iter()
            .filter(|(_, r)| r.runtime == "bundle")
            .filter_map(|(n, r)| r.active.clone().map(|a| (n.clone(), a)))
            .collect();
        for (name, version) in names {
            let Ok((_, spec)) = self.version_spec(&name, &version, None) else {
                continue;
            };
            let Some((check, health)) = spec.health.clone() else {
                continue;
            };
            let ok = probe_once(&check, health.timeout, &spec.env, &spec.dir)
                .await
                .is_ok();
            if let Some(status) = self.bundle_status.get_mut(&name)
                && status.0 == Phase::Running
            {
                status.1 = if ok {
                    Health::Healthy
                } else {
                    Health::Unhealthy
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(kind: FailureKind, transient: bool) -> StepError {
        StepError::Failed {
            message: "m".into(),
            kind,
            transient,
        }
    }

    #[test]
    fn fetch_failures_are_classified() {
        use FailureKind::*;
        let check = |error: FetchError, expected: StepError| {
            let what = format!("{error:?}");
            assert_eq!(classify_fetch(error), expected, "{what}");
        };
        // The control plane unreachable, a transfer cut: infrastructure,
        // and the module's phase stays what it was.
        check(
            FetchError::Transient("m".into()),
            failed(Infrastructure, true),
        );
        // A full disk, an unwritable cache: infrastructure, reported failed.
        check(FetchError::Local("m".into()), failed(Infrastructure, false));
        // Unknown, altered, unsigned or under-signed artifacts: the release.
        check(FetchError::Rejected("m".into()), failed(Release, false));
        // No longer desired: nothing failed.
        check(
            FetchError::Abandoned("m".into()),
            StepError::Preempted("m".into()),
        );
    }

    #[test]
    fn activation_failures_are_classified() {
        use FailureKind::*;
        let check = |error: ActivateError, expected: StepError| {
            let what = format!("{error:?}");
            assert_eq!(classify_activate(error), expected, "{what}");
        };
        check(ActivateError::Release("m".into()), failed(Release, false));
        check(
            ActivateError::Infrastructure("m".into()),
            failed(Infrastructure, false),
        );
        check(
            ActivateError::Preempted("m".into()),
            StepError::Preempted("m".into()),
        );
    }

    #[test]
    fn node_trouble_is_told_from_the_module_s() {
        use crate::runtime::is_node_trouble;
        let os = std::io::Error::from_raw_os_error;
        assert!(is_node_trouble(&os(libc::ENOSPC)));
        assert!(is_node_trouble(&os(libc::EDQUOT)));
        assert!(is_node_trouble(&os(libc::EIO)));
        assert!(!is_node_trouble(&os(libc::ENOENT)));
        assert!(!is_node_trouble(&os(libc::EACCES)));
        assert!(!is_node_trouble(&std::io::Error::other("no errno")));
    }

    #[test]
    fn infrastructure_retries_sooner_than_release_and_both_are_capped() {
        use FailureKind::*;
        let secs = |kind, attempts, jitter| retry_delay(kind, attempts, jitter).as_secs_f64();
        // No jitter at 0.5: the nominal delay.
        assert_eq!(secs(Infrastructure, 1, 0.5), 2.0);
        assert_eq!(secs(Release, 1, 0.5), 10.0);
        for attempts in 1..20 {
            assert!(secs(Infrastructure, attempts, 0.5) < secs(Release, attempts, 0.5));
        }
        assert_eq!(secs(Infrastructure, 50, 0.5), 30.0);
        assert_eq!(secs(Release, 50, 0.5), 300.0);
        // Jitter spreads by ±20 %, and never beyond, whatever it is given.
        assert_eq!(secs(Infrastructure, 50, 0.0), 24.0);
        assert_eq!(secs(Infrastructure, 50, 1.0), 36.0);
        assert_eq!(secs(Infrastructure, 50, 7.0), 36.0);
    }

    #[test]
    fn failure_kinds_have_their_wire_words() {
        assert_eq!(FailureKind::Release.as_str(), "release");
        assert_eq!(FailureKind::Infrastructure.as_str(), "infrastructure");
    }
}
