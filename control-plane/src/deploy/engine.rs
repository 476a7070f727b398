//! The deployment engine: the I/O shell around [`machine`](super::machine).
//!
//! It keeps every deployment in memory and in sled. On each tick and on every
//! node change it builds an observation of each active deployment's nodes
//! from the registry, steps the machine, **persists the new state, then**
//! carries out the actions (desired-state changes pushed to agents). On start
//! it re-asserts the desired state each active deployment expects, so an
//! action lost to a crash between persisting and acting is carried out then;
//! setting an unchanged desired state swaps nothing.
//!
//! Between deployments it brings nodes that attach later to their
//! environment's current version ([`catch_up`]).

mod catch_up;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use hotswap_common::labels::Labels;
use hotswap_common::telemetry;
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, broadcast};
use tokio_util::sync::CancellationToken;

use super::current::downgrade_refusal;
use super::machine::{
    Action, Aggregate, Analysis, BatchSize, Control, Deployment, Input, MAX_LATENCY_WINDOWS,
    NodeReport, NodeState, Outcome, Reports, Spec, State, Strategy, Thresholds, plan_waves,
};
use crate::clock::steady_now_ms;
use crate::config::Settings;
use crate::error::ApiError;
use crate::events::Event;
use crate::registry::{DesiredChange, Registry};
use crate::store::DesiredModuleRecord;

/// A deployment as stored: identity plus the machine's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub id: String,
    pub environment: String,
    pub deployment: Deployment,
    /// Labels narrowing the environment; empty for an environment-wide deployment.
    #[serde(default)]
    pub selector: Labels,
    /// W3C trace context of the deployment's root span: waves and node
    /// commands, also after a restart, join this one trace. Empty when
    /// traces were not exported at creation.
    #[serde(default)]
    pub traceparent: String,
}

/// Where a pipeline is. Stored as its lowercase word, as the strings it
/// replaced were, so records written before read the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelineState {
    Running,
    Succeeded,
    Failed,
}

impl PipelineState {
    pub fn as_str(self) -> &'static str {
        match self {
            PipelineState::Running => "running",
            PipelineState::Succeeded => "succeeded",
            PipelineState::Failed => "failed",
        }
    }
}

/// Where one stage of a pipeline is (stored as its lowercase word).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    /// Not started: an earlier stage runs, or it waits for a connected node
    /// or for another deployment of the module there.
    Waiting,
    Running,
    Succeeded,
    Failed,
    /// The environment has no nodes at all.
    Skipped,
}

impl StageState {
    pub fn as_str(self) -> &'static str {
        match self {
            StageState::Waiting => "waiting",
            StageState::Running => "running",
            StageState::Succeeded => "succeeded",
            StageState::Failed => "failed",
            StageState::Skipped => "skipped",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineStage {
    pub environment: String,
    pub deployment_id: String,
    pub state: StageState,
    pub reason: String,
    /// Since when the stage waits for a connected node in its environment
    /// (bounded by `pipeline_wait_timeout`).
    #[serde(default)]
    pub waiting_since_ms: Option<u64>,
}

/// One version promoted through the environments, stage by stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineRecord {
    pub id: String,
    pub module: String,
    pub version: String,
    pub state: PipelineState,
    pub stages: Vec<PipelineStage>,
    pub reason: String,
    pub created_by: String,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
    /// Stages may deploy a version older than their environment's current one.
    #[serde(default)]
    pub allow_downgrade: bool,
}

/// What `deploy create` asks for, already parsed.
#[derive(Clone, Debug, Default)]
pub struct CreateRequest {
    pub module: String,
    pub version: String,
    pub environment: String,
    pub selector: Labels,
    pub strategy: Option<String>,
    pub batch_size: Option<String>,
    pub max_failures: Option<u32>,
    pub steps: Vec<u32>,
    pub step_duration: Option<Duration>,
    pub manual_promote: bool,
    pub bake_time: Option<Duration>,
    pub min_healthy_time: Option<Duration>,
    pub health_deadline: Option<Duration>,
    pub progress_deadline: Option<Duration>,
    pub max_error_rate: Option<f64>,
    pub max_latency_increase: Option<f64>,
    pub no_auto_rollback: bool,
    pub pause_timeout: Option<Duration>,
    pub analysis_min_requests: Option<u64>,
    pub analysis_warmup: Option<Duration>,
    pub dry_run: bool,
    /// Deploy even when the version is older than the environment's current one.
    pub allow_downgrade: bool,
}

/// Why `deploy create` did not start a deployment. The cases a pipeline
/// acts on are variants of their own, so it matches them instead of
/// reading message text; everything else is the API error it already is.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("environment {environment:?} has no nodes{} to deploy to", scope(*selector))]
    NoNodes { environment: String, selector: bool },
    #[error(
        "no connected node in environment {environment:?}{} to deploy to ({enrolled} enrolled, all disconnected)",
        scope(*selector)
    )]
    AllDisconnected {
        environment: String,
        selector: bool,
        enrolled: usize,
    },
    #[error(
        "deployment {id} of {module}@{version} to {environment} is still {state}; wait for it, or abort it first"
    )]
    AlreadyActive {
        id: String,
        module: String,
        version: String,
        environment: String,
        state: &'static str,
    },
    #[error(transparent)]
    Api(#[from] ApiError),
}

fn scope(selector: bool) -> &'static str {
    if selector {
        " matching the selector"
    } else {
        ""
    }
}

impl From<CreateError> for ApiError {
    fn from(e: CreateError) -> Self {
        match e {
            CreateError::Api(api) => api,
            other => ApiError::FailedPrecondition(other.to_string()),
        }
    }
}

impl From<crate::store::StoreError> for CreateError {
    fn from(e: crate::store::StoreError) -> Self {
        CreateError::Api(e.into())
    }
}

/// A dry run's answer: waves of node names and the gate after each.
#[derive(Clone, Debug, Default)]
pub struct PlanView {
    pub strategy: String,
    pub waves: Vec<(Vec<String>, String)>,
}

pub struct Engine {
    registry: Arc<Registry>,
    settings: Settings,
    /// Records are shared with watchers and readers, never copied for them:
    /// a 10k-node record is megabytes.
    deployments: Mutex<BTreeMap<String, Arc<DeploymentRecord>>>,
    pipelines: Mutex<BTreeMap<String, PipelineRecord>>,
    updates: broadcast::Sender<Arc<DeploymentRecord>>,
    /// When each active deployment was last written by `step_all`.
    persisted_at: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    /// One pipeline pass at a time: `run_pipeline` and the engine loop both
    /// advance pipelines, and two passes working from the same snapshot
    /// would both start a stage's deployment.
    pipeline_pass: Mutex<()>,
    /// The registry's yank generation the last pass checked yanks at
    /// (`u64::MAX` until the first pass, which always checks).
    yanks_checked: std::sync::atomic::AtomicU64,
    /// Nodes to bring to their environment's current version.
    catch_ups: std::sync::Mutex<catch_up::CatchUps>,
}

/// How often active deployments are re-evaluated without any node change
/// (holds, bakes and deadlines are time-driven).
const TICK: Duration = Duration::from_millis(500);

/// Longest a step that only refreshed healthy nodes' last-seen times stays
/// unwritten. After a restart the silence rule may time a node from up to
/// this much earlier than it was really last seen.
const LAST_SEEN_PERSIST_EVERY: Duration = Duration::from_secs(1);

/// Longest a deployment's duration option may be (steps, bake, deadlines):
/// beyond a year a value is a typo or an overflow, and a deadline that far
/// out never makes the deployment terminal.
const MAX_OPTION_DURATION: Duration = Duration::from_secs(366 * 86_400);
/// Highest p99 latency multiple a canary may be allowed: beyond it the
/// latency check could never trip, like NaN.
const MAX_LATENCY_INCREASE: f64 = 1000.0;

fn parse_batch(text: &str) -> Result<BatchSize, ApiError> {
    let bad = || {
        ApiError::InvalidArgument(format!(
            "batch size {text:?} is not N or N% (e.g. 2 or 25%)"
        ))
    };
    match text.strip_suffix('%') {
        Some(p) => p
            .parse()
            .ok()
            .filter(|p| (1..=100).contains(p))
            .map(BatchSize::Percent)
            .ok_or_else(bad),
        None => text
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .map(BatchSize::Count)
            .ok_or_else(bad),
    }
}

impl Engine {
    pub fn new(registry: Arc<Registry>, settings: Settings) -> Result<Arc<Self>, ApiError> {
        let records: Vec<DeploymentRecord> = registry.store().list_deployments()?;
        let pipelines: Vec<PipelineRecord> = registry.store().list_pipelines()?;
        // Deadlines and holds continue from the recorded times, whatever the
        // wall clock did while the control plane was down.
        if let Some(latest) = records.iter().map(|r| r.deployment.latest_ms()).max() {
            crate::clock::raise_floor(latest);
        }
        let (updates, _) = broadcast::channel(1024);
        Ok(Arc::new(Self {
            registry,
            settings,
            deployments: Mutex::new(
                records
                    .into_iter()
                    .map(|r| (r.id.clone(), Arc::new(r)))
                    .collect(),
            ),
            pipelines: Mutex::new(pipelines.into_iter().map(|p| (p.id.clone(), p)).collect()),
            updates,
            persisted_at: std::sync::Mutex::new(HashMap::new()),
            pipeline_pass: Mutex::new(()),
            yanks_checked: std::sync::atomic::AtomicU64::new(u64::MAX),
            catch_ups: std::sync::Mutex::default(),
        }))
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<DeploymentRecord>> {
        self.updates.subscribe()
    }

    pub async fn get(&self, id: &str) -> Result<Arc<DeploymentRecord>, ApiError> {
        self.deployments
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("deployment {id:?} not found")))
    }

    pub async fn list(&self) -> Vec<Arc<DeploymentRecord>> {
        let mut all: Vec<Arc<DeploymentRecord>> =
            self.deployments.lock().await.values().cloned().collect();
        all.sort_by_key(|r| std::cmp::Reverse(r.deployment.created_ms));
        all
    }

    /// Run until shutdown: re-assert desired states, then step on changes and ticks.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        self.reassert().await;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut attaches_seen = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
                // One pass covers every change so far: a wave of N nodes
                // reporting must not cost N full passes.
                _ = self.registry.changed() => {}
            }
            self.step_all().await;
            self.advance_pipelines().await;
            {
                let deployments = self.deployments.lock().await;
                self.registry.metrics().set_deployment_states(
                    deployments.values().map(|r| r.deployment.state.as_str()),
                );
            }
            // Nodes to catch up appear when a session attached (and when a
            // deployment finished, which `commit` notes).
            let attaches = self.registry.attaches();
            if attaches_seen != Some(attaches) {
                attaches_seen = Some(attaches);
                let attached = self.registry.take_attached();
                self.catch_ups().attached(attached);
            }
            self.catch_up().await;
        }
    }

    /// Start a pipeline of `module@version` through the configured
    /// environments, up to and including `to`.
    pub async fn run_pipeline(
        &self,
        module: &str,
        version: &str,
        to: Option<&str>,
        allow_downgrade: bool,
        user: &str,
    ) -> Result<PipelineRecord, ApiError> {
        let artifact = self
            .registry
            .store()
            .get_artifact(module, version)?
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "artifact {module}@{version} not found; push it with `hotswapctl module push` first"
                ))
            })?;
        let order = &self.settings.pipeline;
        let last = match to {
            Some(env) => order.iter().position(|e| e == env).ok_or_else(|| {
                ApiError::InvalidArgument(format!(
                    "--to {env:?} is not in the pipeline ({})",
                    order.join(" -> ")
                ))
            })?,
            None => order.len().saturating_sub(1),
        };
        // Refuse now rather than after the early stages rolled out: every
        // environment on the way must accept the artifact's signatures.
        for env in &order[..=last] {
            let required = self
                .settings
                .environments
                .get(env)
                .map_or(1, |e| e.min_signatures);
            crate::trust::ensure_deployable(
                self.registry.store(),
                &artifact,
                required,
                steady_now_ms(),
            )
            .map_err(|e| ApiError::FailedPrecondition(format!("environment {env}: {e}")))?;
            if !allow_downgrade {
                self.ensure_not_downgrade(module, version, env).await?;
            }
        }
        let record = PipelineRecord {
            id: format!("p-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]),
            module: module.to_string(),
            version: version.to_string(),
            state: PipelineState::Running,
            stages: order[..=last]
                .iter()
                .map(|env| PipelineStage {
                    environment: env.clone(),
                    deployment_id: String::new(),
                    state: StageState::Waiting,
                    reason: String::new(),
                    waiting_since_ms: None,
                })
                .collect(),
            reason: String::new(),
            created_by: user.to_string(),
            created_ms: steady_now_ms(),
            finished_ms: None,
            allow_downgrade,
        };
        self.registry
            .store()
            .put_pipeline(&record.id, &record)
            .await?;
        tracing::info!(pipeline = %record.id, module = %module, version = %version, user = %user, "pipeline started");
        self.pipelines
            .lock()
            .await
            .insert(record.id.clone(), record.clone());
        self.advance_pipelines().await;
        self.get_pipeline(&record.id).await
    }

    pub async fn get_pipeline(&self, id: &str) -> Result<PipelineRecord, ApiError> {
        self.pipelines
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("pipeline {id:?} not found")))
    }

    /// Move each running pipeline along: start the next stage's deployment
    /// when the previous one succeeded, stop at the first that did not.
    async fn advance_pipelines(&self) {
        let _pass = self.pipeline_pass.lock().await;
        let running: Vec<PipelineRecord> = self
            .pipelines
            .lock()
            .await
            .values()
            .filter(|p| p.state == PipelineState::Running)
            .cloned()
            .collect();
        for mut pipeline in running {
            let before = pipeline.clone();
            self.advance_pipeline(&mut pipeline).await;
            if pipeline != before {
                if let Err(e) = self
                    .registry
                    .store()
                    .put_pipeline(&pipeline.id, &pipeline)
                    .await
                {
                    tracing::error!(pipeline = %pipeline.id, error = %e, "cannot persist pipeline");
                    continue;
                }
                self.pipelines
                    .lock()
                    .await
                    .insert(pipeline.id.clone(), pipeline);
            }
        }
    }

    async fn advance_pipeline(&self, pipeline: &mut PipelineRecord) {
        let Some(index) = pipeline
            .stages
            .iter()
            .position(|s| matches!(s.state, StageState::Waiting | StageState::Running))
        else {
            pipeline.state = PipelineState::Succeeded;
            pipeline.reason = format!(
                "{}@{} promoted through {}",
                pipeline.module,
                pipeline.version,
                pipeline
                    .stages
                    .iter()
                    .map(|s| s.environment.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            pipeline.finished_ms = Some(steady_now_ms());
            return;
        };
        let stage = pipeline.stages[index].clone();
        if stage.deployment_id.is_empty() {
            let request = CreateRequest {
                module: pipeline.module.clone(),
                version: pipeline.version.clone(),
                environment: stage.environment.clone(),
                allow_downgrade: pipeline.allow_downgrade,
                ..Default::default()
            };
            match self.create(request, &pipeline.created_by).await {
                Ok((Some(record), _)) => {
                    pipeline.stages[index].deployment_id = record.id.clone();
                    pipeline.stages[index].state = StageState::Running;
                }
                Ok((None, _)) => {}
                // An environment without any node is skipped. One whose nodes
                // are all disconnected right now is waited for: skipping it
                // would promote a version past a stage it never passed.
                Err(e @ CreateError::NoNodes { .. }) => {
                    pipeline.stages[index].state = StageState::Skipped;
                    pipeline.stages[index].reason = e.to_string();
                }
                Err(e @ CreateError::AllDisconnected { .. }) => {
                    let reason = e.to_string();
                    let now = steady_now_ms();
                    let since = *pipeline.stages[index].waiting_since_ms.get_or_insert(now);
                    let limit = self.settings.pipeline_wait_timeout;
                    if now.saturating_sub(since) >= limit.as_millis() as u64 {
                        let waited = hotswap_common::timefmt::human_age(limit.as_millis() as u64);
                        pipeline.stages[index].state = StageState::Failed;
                        pipeline.stages[index].reason =
                            format!("gave up after {waited} (pipeline_wait_timeout): {reason}");
                        pipeline.state = PipelineState::Failed;
                        pipeline.reason = format!(
                            "stopped at {}: no connected node there for {waited} (pipeline_wait_timeout)",
                            stage.environment
                        );
                        pipeline.finished_ms = Some(now);
                    } else {
                        pipeline.stages[index].reason = format!("waiting: {reason}");
                    }
                }
                // Another deployment of the module runs there: wait for it.
                Err(e @ CreateError::AlreadyActive { .. }) => {
                    pipeline.stages[index].reason = e.to_string();
                }
                Err(e) => {
                    pipeline.stages[index].state = StageState::Failed;
                    pipeline.stages[index].reason = e.to_string();
                    pipeline.state = PipelineState::Failed;
                    pipeline.reason = format!("stage {} could not start: {e}", stage.environment);
                    pipeline.finished_ms = Some(steady_now_ms());
                }
            }
            return;
        }
        let Ok(record) = self.get(&stage.deployment_id).await else {
            return;
        };
        match record.deployment.state {
            State::Succeeded => {
                pipeline.stages[index].state = StageState::Succeeded;
                pipeline.stages[index].reason = record.deployment.reason.clone();
            }
            state if state.is_terminal() => {
                pipeline.stages[index].state = StageState::Failed;
                pipeline.stages[index].reason = format!(
                    "deployment {} {}: {}",
                    record.id,
                    state.as_str(),
                    record.deployment.reason
                );
                pipeline.state = PipelineState::Failed;
                pipeline.reason = format!(
                    "stopped at {}: deployment {} {}",
                    stage.environment,
                    record.id,
                    state.as_str()
                );
                pipeline.finished_ms = Some(steady_now_ms());
            }
            _ => {}
        }
    }

    async fn reassert(&self) {
        let active: Vec<Arc<DeploymentRecord>> = self
            .deployments
            .lock()
            .await
            .values()
            .filter(|r| !r.deployment.state.is_terminal())
            .cloned()
            .collect();
        for record in active {
            tracing::info!(deployment = %record.id, state = record.deployment.state.as_str(), "resuming deployment");
            let actions = record.deployment.expected_desired();
            self.execute(&record, &actions).await;
        }
    }

    async fn step_all(&self) {
        let mut deployments = self.deployments.lock().await;
        let now = steady_now_ms();
        let ids: Vec<String> = deployments
            .iter()
            .filter(|(_, r)| !r.deployment.state.is_terminal())
            .map(|(id, _)| id.clone())
            .collect();
        // Yanks live in the artifact records: read them only on the first
        // pass (a yank made before a restart) and after a yank changed.
        let generation = self.registry.yank_generation();
        let check_yanks = self
            .yanks_checked
            .swap(generation, std::sync::atomic::Ordering::SeqCst)
            != generation;
        for id in ids {
            // A step of a large deployment is O(nodes); nothing here copies the
            // record more than the machine's own step does.
            let Some(record) = deployments.get(&id) else {
                continue;
            };
            // A yanked version is known bad: the deployment stops (rolling
            // back what it changed) instead of going on.
            let yank = check_yanks
                .then(|| self.yank_of(&record.deployment))
                .flatten();
            let input = match yank {
                Some(yank) if record.deployment.state != State::RollingBack => {
                    Input::Control(Control::Yanked {
                        by: yank.by,
                        reason: yank.reason,
                    })
                }
                _ => self.observe(&record.deployment),
            };
            let Ok((mut next, actions)) = record.deployment.step(now, &input) else {
                continue;
            };
            drop(input);
            if next == record.deployment {
                continue;
            }
            // Healthy nodes' last-seen times move on every step; writing a
            // 10k-node record for that alone would be most of the engine's
            // work. They are kept in memory and written with the next real
            // change, or at least every LAST_SEEN_PERSIST_EVERY.
            let persist_last_seen = {
                let persisted = self.persisted_at.lock().unwrap_or_else(|p| p.into_inner());
                persisted
                    .get(&id)
                    .is_none_or(|at| at.elapsed() >= LAST_SEEN_PERSIST_EVERY)
            };
            let memory_only = actions.is_empty()
                && !persist_last_seen
                && next.differs_only_in_last_seen(&record.deployment);
            let updated = DeploymentRecord {
                deployment: next,
                id: record.id.clone(),
                environment: record.environment.clone(),
                selector: record.selector.clone(),
                traceparent: record.traceparent.clone(),
            };
            if !memory_only {
                if let Err(e) = self
                    .commit(Some(&record.deployment), &updated, &actions)
                    .await
                {
                    tracing::error!(deployment = %id, error = %e, "cannot persist deployment; its actions are not carried out");
                    continue;
                }
                let mut persisted = self.persisted_at.lock().unwrap_or_else(|p| p.into_inner());
                if updated.deployment.state.is_terminal() {
                    persisted.remove(&id);
                } else {
                    persisted.insert(id.clone(), std::time::Instant::now());
                }
                drop(persisted);
                let updated = Arc::new(updated);
                self.publish(&updated);
                deployments.insert(id, updated);
            } else {
                deployments.insert(id, Arc::new(updated));
            }
        }
    }

    /// The yank of a deployment's version, if it was yanked.
    fn yank_of(&self, deployment: &Deployment) -> Option<crate::store::YankRecord> {
        let spec = &deployment.spec;
        match self
            .registry
            .store()
            .get_artifact(&spec.module, &spec.version)
        {
            Ok(artifact) => artifact.and_then(|a| a.yanked),
            Err(e) => {
                tracing::warn!(module = %spec.module, version = %spec.version, error = %e, "cannot read the artifact record to check for a yank");
                None
            }
        }
    }

    /// Persist, then act (callers then share the record with watchers,
    /// [`Engine::publish`]). The order is the durability contract: the
    /// record, its events and the nodes' new desired states reach the disk
    /// in one flush, and only then is any agent told.
    async fn commit(
        &self,
        previous: Option<&Deployment>,
        record: &DeploymentRecord,
        actions: &[Action],
    ) -> Result<(), ApiError> {
        let metrics = self.registry.metrics();
        let seen = previous.map_or(0, |p| p.analysis.len());
        for verdict in record.deployment.analysis.iter().skip(seen) {
            if verdict.outcome == Outcome::Failed {
                metrics.analysis_failures.inc();
            }
        }
        for event in deployment_events(previous, record, actions) {
            if event.kind == "deployment.rolling_back" {
                metrics.rollbacks.inc();
            }
            self.registry.events().append(event);
        }
        let changes = self.node_changes(record, actions)?;
        let store = self.registry.store();
        store.put_deployment_unflushed(&record.id, record)?;
        let written = self.registry.write_desired(&changes)?;
        store.flush().await?;
        if let Err(e) = self.registry.push_desired(&changes, &written) {
            tracing::warn!(deployment = %record.id, error = %e, "desired states are stored but not all were handed to their sessions");
        }
        if previous.is_none_or(|p| p.state != record.deployment.state) {
            self.catch_ups()
                .deployment_changed(&record.environment, record.deployment.state.is_terminal());
        }
        Ok(())
    }

    /// Tell watchers about a committed record.
    fn publish(&self, record: &Arc<DeploymentRecord>) {
        // No receivers is fine: nobody is watching.
        let _ = self.updates.send(record.clone());
    }

    /// Carry out `actions` again for a stored record (after a restart): the
    /// same write, flush, push as a commit, without rewriting the record.
    async fn execute(&self, record: &DeploymentRecord, actions: &[Action]) {
        let result = async {
            let changes = self.node_changes(record, actions)?;
            if changes.is_empty() {
                return Ok(());
            }
            let written = self.registry.write_desired(&changes)?;
            self.registry.store().flush().await?;
            self.registry.push_desired(&changes, &written)
        };
        if let Err(e) = result.await {
            tracing::warn!(deployment = %record.id, error = %e, "desired-state changes failed");
        }
    }

    /// The desired-state changes `actions` ask for, each node command with
    /// its span; notes are logged. Nodes removed meanwhile are skipped.
    fn node_changes(
        &self,
        record: &DeploymentRecord,
        actions: &[Action],
    ) -> Result<Vec<DesiredChange>, ApiError> {
        let module = &record.deployment.spec.module;
        // Node commands of a wave are children of the wave's span; the others
        // (blue-green staging and switch, rollback, re-assertion after a
        // restart) of the deployment's.
        let parent =
            wave_traceparent(record, actions).unwrap_or_else(|| record.traceparent.clone());
        let mut changes = Vec::new();
        for action in actions {
            match action {
                Action::SetVersion { node, version } => {
                    let desired = (!version.is_empty()).then(|| {
                        self.traced(
                            record,
                            &parent,
                            node,
                            "set_version",
                            DesiredModuleRecord {
                                version: version.clone(),
                                staged_version: String::new(),
                                traceparent: String::new(),
                            },
                        )
                    });
                    changes.push((node.clone(), module.clone(), desired));
                }
                Action::Stage {
                    node,
                    active,
                    staged,
                } => {
                    let desired = self.traced(
                        record,
                        &parent,
                        node,
                        "stage",
                        DesiredModuleRecord {
                            version: active.clone(),
                            staged_version: staged.clone(),
                            traceparent: String::new(),
                        },
                    );
                    changes.push((node.clone(), module.clone(), Some(desired)));
                }
                Action::Note(message) => {
                    tracing::info!(deployment = %record.id, module = %module, "{message}")
                }
            }
        }
        let missing = self.registry.missing_nodes(&changes)?;
        if !missing.is_empty() {
            tracing::warn!(deployment = %record.id, nodes = ?missing, "nodes were removed; skipping their desired-state changes");
            changes.retain(|(node, _, _)| !missing.contains(node));
        }
        Ok(changes)
    }

    /// Give a node command its span, a child of `parent`, and carry the
    /// span's context to the agent in the desired entry. An entry the node
    /// already has (re-assertion after a restart) keeps the context it was
    /// sent with: nothing happens on the node, so no span stands for it.
    fn traced(
        &self,
        record: &DeploymentRecord,
        parent: &str,
        node: &str,
        kind: &str,
        mut desired: DesiredModuleRecord,
    ) -> DesiredModuleRecord {
        if parent.is_empty() {
            return desired;
        }
        let module = &record.deployment.spec.module;
        let current = self
            .registry
            .store()
            .get_desired(node)
            .ok()
            .and_then(|mut d| d.modules.remove(module));
        if let Some(current) = current.filter(|c| c.same_target(&desired)) {
            desired.traceparent = current.traceparent;
            return desired;
        }
        let name = record
            .deployment
            .nodes
            .iter()
            .find(|t| t.node == node)
            .map_or(node, |t| t.name.as_str());
        let span = telemetry::span_with_parent(
            tracing::info_span!(
                target: telemetry::TARGET,
                parent: None,
                "node command",
                deployment = %record.id,
                node = %name,
                node.id = %node,
                module = %module,
                version = %desired.version,
                staged_version = %desired.staged_version,
                kind = kind,
            ),
            parent,
        );
        desired.traceparent = telemetry::traceparent_of(&span);
        desired
    }

    /// Observation of a deployment's nodes, and canary analysis during a hold.
    fn observe(&self, deployment: &Deployment) -> Input {
        let nodes = observe_nodes(&self.registry, deployment);
        let analysis = match (&deployment.spec.strategy, deployment.hold_since_ms) {
            (Strategy::Canary { .. }, Some(since)) if deployment.state == State::Running => {
                Some(self.analyze(deployment, since))
            }
            _ => None,
        };
        Input::Observe { nodes, analysis }
    }

    /// Canary nodes (healthy on the new version) against baseline nodes
    /// (not updated yet), over the reports since the hold began, less its
    /// warm-up.
    fn analyze(&self, deployment: &Deployment, hold_since_ms: u64) -> Analysis {
        analyze(&self.registry, deployment, hold_since_ms, steady_now_ms())
    }

    /// The spec of a deployment `request` asks for, with every option in
    /// its range (the message names the flag) and the rest from the config.
    fn build_spec(&self, request: &CreateRequest, user: &str) -> Result<(Spec, bool), ApiError> {
        let env = self
            .settings
            .environments
            .get(&request.environment)
            .ok_or_else(|| {
                ApiError::InvalidArgument(format!(
                    "unknown environment {:?}; configured: {}",
                    request.environment,
                    self.settings
                        .environments
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        let d = &self.settings.deploy;
        let strategy_name = request
            .strategy
            .clone()
            .unwrap_or_else(|| env.strategy.clone());
        let ms = |v: Option<Duration>, default: Duration| v.unwrap_or(default).as_millis() as u64;
        let strategy = match strategy_name.as_str() {
            "direct" => Strategy::Direct,
            "rolling" => Strategy::Rolling {
                batch: parse_batch(request.batch_size.as_deref().unwrap_or(&d.batch_size))?,
                min_healthy_ms: ms(request.min_healthy_time, d.min_healthy_time),
            },
            "blue-green" => Strategy::BlueGreen {
                bake_ms: ms(request.bake_time, d.bake_time),
            },
            "canary" => {
                let steps = if request.steps.is_empty() {
                    d.steps.clone()
                } else {
                    request.steps.clone()
                };
                if steps.iter().any(|s| *s == 0 || *s > 100)
                    || steps.windows(2).any(|w| w[0] >= w[1])
                {
                    return Err(ApiError::InvalidArgument(format!(
                        "canary steps {steps:?} must be increasing percentages in 1..=100"
                    )));
                }
                Strategy::Canary {
                    steps,
                    step_ms: ms(request.step_duration, d.step_duration),
                    manual_promote: request.manual_promote,
                }
            }
            other => {
                return Err(ApiError::InvalidArgument(format!(
                    "unknown strategy {other:?}: use direct, rolling, blue-green or canary"
                )));
            }
        };
        if request.batch_size.is_some() && !matches!(strategy, Strategy::Rolling { .. }) {
            return Err(ApiError::InvalidArgument(
                "--batch-size applies to the rolling strategy only".into(),
            ));
        }
        if (!request.steps.is_empty() || request.manual_promote || request.step_duration.is_some())
            && !matches!(strategy, Strategy::Canary { .. })
        {
            return Err(ApiError::InvalidArgument(
                "--steps, --step-duration and --manual-promote apply to the canary strategy only"
                    .into(),
            ));
        }
        if (request.analysis_min_requests.is_some() || request.analysis_warmup.is_some())
            && !matches!(strategy, Strategy::Canary { .. })
        {
            return Err(ApiError::InvalidArgument(
                "--analysis-min-requests and --analysis-warmup apply to the canary strategy only"
                    .into(),
            ));
        }
        if let Some(pause) = request.pause_timeout
            && !(Duration::from_secs(1)..=MAX_OPTION_DURATION).contains(&pause)
        {
            return Err(ApiError::InvalidArgument(format!(
                "--pause-timeout {} must be between 1s and 366d",
                hotswap_common::timefmt::human_age(pause.as_millis() as u64)
            )));
        }
        if request
            .analysis_warmup
            .is_some_and(|w| w > Duration::from_secs(86_400))
        {
            return Err(ApiError::InvalidArgument(
                "--analysis-warmup must be at most 24h".into(),
            ));
        }
        if request
            .analysis_min_requests
            .is_some_and(|n| n > 1_000_000_000)
        {
            return Err(ApiError::InvalidArgument(
                "--analysis-min-requests must be at most 1000000000".into(),
            ));
        }
        if request.bake_time.is_some() && !matches!(strategy, Strategy::BlueGreen { .. }) {
            return Err(ApiError::InvalidArgument(
                "--bake-time applies to the blue-green strategy only".into(),
            ));
        }
        let max_error_rate = request.max_error_rate.unwrap_or(d.max_error_rate);
        if !(0.0..=1.0).contains(&max_error_rate) {
            return Err(ApiError::InvalidArgument(format!(
                "--max-error-rate {max_error_rate} is not between 0 and 1"
            )));
        }
        let latency_increase = request.max_latency_increase.unwrap_or(d.latency_increase);
        if !(1.0..=MAX_LATENCY_INCREASE).contains(&latency_increase) {
            return Err(ApiError::InvalidArgument(format!(
                "--max-latency-increase {latency_increase} must be between 1 and {MAX_LATENCY_INCREASE} (a multiple of the baseline)"
            )));
        }
        for (flag, value) in [
            ("--step-duration", request.step_duration),
            ("--bake-time", request.bake_time),
            ("--min-healthy-time", request.min_healthy_time),
            ("--health-deadline", request.health_deadline),
            ("--progress-deadline", request.progress_deadline),
        ] {
            if let Some(value) = value
                && value > MAX_OPTION_DURATION
            {
                return Err(ApiError::InvalidArgument(format!(
                    "{flag} {} is longer than 366d",
                    hotswap_common::timefmt::human_age(
                        u64::try_from(value.as_millis()).unwrap_or(u64::MAX)
                    )
                )));
            }
        }
        let spec = Spec {
            module: request.module.clone(),
            version: request.version.clone(),
            strategy,
            max_failures: request.max_failures.unwrap_or(d.max_failures),
            health_deadline_ms: ms(request.health_deadline, d.health_deadline),
            progress_deadline_ms: ms(request.progress_deadline, d.progress_deadline),
            auto_rollback: !request.no_auto_rollback,
            require_approval: env.require_approval,
            approval_timeout_ms: self.settings.approval_timeout.as_millis() as u64,
            pause_timeout_ms: ms(request.pause_timeout, self.settings.pause_timeout),
            created_by: user.to_string(),
            thresholds: Thresholds {
                max_error_rate,
                error_rate_increase: d.error_rate_increase,
                latency_increase,
                cpu_increase: d.cpu_increase,
                memory_increase: d.memory_increase,
                min_requests: request
                    .analysis_min_requests
                    .unwrap_or(d.analysis_min_requests),
                warmup_ms: request
                    .analysis_warmup
                    .unwrap_or(d.analysis_warmup)
                    .as_millis() as u64,
                ..Thresholds::default()
            },
        };
        Ok((spec, env.require_approval))
    }

    /// Refuse `module@version` in `environment` when it is older than the
    /// environment's current version (SPEC §6: downgrades are deliberate).
    async fn ensure_not_downgrade(
        &self,
        module: &str,
        version: &str,
        environment: &str,
    ) -> Result<(), ApiError> {
        let currents = self.currents().await;
        let current = currents
            .get(&(environment.to_string(), module.to_string()))
            .and_then(|m| m.current.as_ref());
        match current.and_then(|c| downgrade_refusal(module, version, environment, c)) {
            Some(why) => Err(ApiError::FailedPrecondition(why)),
            None => Ok(()),
        }
    }

    /// Whether controlling deployments in `environment` needs the
    /// protected-environment permission.
    pub fn is_protected(&self, environment: &str) -> bool {
        self.settings
            .environments
            .get(environment)
            .is_some_and(|e| e.protected.unwrap_or(e.require_approval))
    }

    /// Create (or, for a dry run, only plan) a deployment.
    pub async fn create(
        &self,
        request: CreateRequest,
        user: &str,
    ) -> Result<(Option<Arc<DeploymentRecord>>, PlanView), CreateError> {
        semver::Version::parse(&request.version).map_err(|e| {
            ApiError::InvalidArgument(format!("version {:?} is not semver: {e}", request.version))
        })?;
        let artifact = self
            .registry
            .store()
            .get_artifact(&request.module, &request.version)?
            .ok_or_else(|| {
                ApiError::NotFound(format!(
                    "artifact {}@{} not found; push it with `hotswapctl module push` first",
                    request.module, request.version
                ))
            })?;
        let (spec, _) = self.build_spec(&request, user)?;
        let required = self
            .settings
            .environments
            .get(&request.environment)
            .map_or(1, |e| e.min_signatures);
        crate::trust::ensure_deployable(
            self.registry.store(),
            &artifact,
            required,
            steady_now_ms(),
        )?;
        if !request.allow_downgrade {
            self.ensure_not_downgrade(&request.module, &request.version, &request.environment)
                .await?;
        }
        let targets: Vec<(String, String, String)> = self
            .registry
            .list(Some(&request.environment))?
            .into_iter()
            .filter(|n| n.connected)
            .filter(|n| {
                request
                    .selector
                    .iter()
                    .all(|(k, v)| n.record.labels.get(k) == Some(v))
            })
            .map(|n| {
                let current = n
                    .desired
                    .modules
                    .get(&request.module)
                    .map(|d| d.version.clone())
                    .filter(|v| !v.is_empty())
                    .or_else(|| {
                        n.modules
                            .iter()
                            .find(|m| m.name == request.module)
                            .map(|m| m.version.clone())
                    })
                    .unwrap_or_default();
                (n.record.id, n.record.name, current)
            })
            .collect();
        if targets.is_empty() {
            let enrolled = self
                .registry
                .list(Some(&request.environment))?
                .iter()
                .filter(|n| {
                    request
                        .selector
                        .iter()
                        .all(|(k, v)| n.record.labels.get(k) == Some(v))
                })
                .count();
            let (environment, selector) =
                (request.environment.clone(), !request.selector.is_empty());
            return Err(if enrolled == 0 {
                CreateError::NoNodes {
                    environment,
                    selector,
                }
            } else {
                CreateError::AllDisconnected {
                    environment,
                    selector,
                    enrolled,
                }
            });
        }
        let now = steady_now_ms();
        let (deployment, actions) = Deployment::new(spec, targets, now);
        let plan = plan_view(&deployment);
        if request.dry_run {
            return Ok((None, plan));
        }
        let mut deployments = self.deployments.lock().await;
        if let Some(active) = deployments.values().find(|r| {
            r.deployment.spec.module == request.module
                && r.environment == request.environment
                && !r.deployment.state.is_terminal()
        }) {
            return Err(CreateError::AlreadyActive {
                id: active.id.clone(),
                module: active.deployment.spec.module.clone(),
                version: active.deployment.spec.version.clone(),
                environment: active.environment.clone(),
                state: active.deployment.state.as_str(),
            });
        }
        let id = format!("d-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        // One trace per deployment. Its root span is a marker that ends at
        // once; what joins the trace is its context, stored with the record.
        let root = tracing::info_span!(
            target: telemetry::TARGET,
            parent: None,
            "deployment",
            id = %id,
            module = %request.module,
            version = %request.version,
            environment = %request.environment,
            strategy = deployment.spec.strategy.name(),
        );
        let traceparent = telemetry::traceparent_of(&root);
        drop(root);
        let record = DeploymentRecord {
            id: id.clone(),
            environment: request.environment.clone(),
            deployment,
            selector: request.selector.clone(),
            traceparent,
        };
        self.commit(None, &record, &actions).await?;
        tracing::info!(deployment = %id, module = %request.module, version = %request.version, environment = %request.environment, strategy = record.deployment.spec.strategy.name(), user = %user, "deployment created");
        let record = Arc::new(record);
        self.publish(&record);
        deployments.insert(id, record.clone());
        Ok((Some(record), plan))
    }

    /// Apply an operator control.
    pub async fn control(
        &self,
        id: &str,
        control: Control,
    ) -> Result<Arc<DeploymentRecord>, ApiError> {
        let mut deployments = self.deployments.lock().await;
        let record = deployments
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("deployment {id:?} not found")))?;
        let (next, actions) = record
            .deployment
            .step(steady_now_ms(), &Input::Control(control))
            .map_err(|e| ApiError::FailedPrecondition(format!("deployment {id}: {e}")))?;
        let updated = DeploymentRecord {
            deployment: next,
            id: record.id.clone(),
            environment: record.environment.clone(),
            selector: record.selector.clone(),
            traceparent: record.traceparent.clone(),
        };
        self.commit(Some(&record.deployment), &updated, &actions)
            .await?;
        let updated = Arc::new(updated);
        self.publish(&updated);
        deployments.insert(id.to_string(), updated.clone());
        Ok(updated)
    }
}

/// When `actions` start a wave: a span for it, a child of the deployment's,
/// and its context.
fn wave_traceparent(record: &DeploymentRecord, actions: &[Action]) -> Option<String> {
    if record.traceparent.is_empty() {
        return None;
    }
    let note = actions.iter().find_map(|action| match action {
        Action::Note(note) if note.starts_with("wave ") => Some(note),
        _ => None,
    })?;
    let nodes = actions
        .iter()
        .filter(|a| matches!(a, Action::SetVersion { .. } | Action::Stage { .. }))
        .count();
    let d = &record.deployment;
    let span = telemetry::span_with_parent(
        tracing::info_span!(
            target: telemetry::TARGET,
            parent: None,
            "wave",
            deployment = %record.id,
            wave = d.wave + 1,
            waves = d.waves,
            nodes = nodes,
            note = %note,
        ),
        &record.traceparent,
    );
    Some(telemetry::traceparent_of(&span))
}

/// What every node of `deployment` reports now, from the registry's memory:
/// the machine's input for one step (the engine's, and the benchmarks').
pub fn observe_nodes(registry: &Registry, deployment: &Deployment) -> Reports {
    let module = &deployment.spec.module;
    // Only the nodes whose reports the step reads: in the middle of a large
    // rollout the waiting waves are skipped.
    let watched: Vec<&str> = deployment
        .nodes
        .iter()
        .filter(|t| t.state.reads_report())
        .map(|t| t.node.as_str())
        .collect();
    let reports = registry.observe(&watched, module, |seen| {
        let current = seen.connected && seen.current;
        match seen.module {
            Some(m) => NodeReport {
                connected: seen.connected,
                current,
                version: m.version.clone(),
                phase: m.phase,
                health: m.health,
                crash_loop: m.crash_loop,
                staged_version: m.staged_version.clone(),
                message: m.message.clone(),
                settling: m.settling.clone(),
                failure: m.failure_kind,
            },
            None => NodeReport {
                connected: seen.connected,
                current,
                ..NodeReport::default()
            },
        }
    });
    watched
        .into_iter()
        .map(str::to_string)
        .zip(reports)
        .collect()
}

/// The events one committed transition stands for.
fn deployment_events(
    previous: Option<&Deployment>,
    record: &DeploymentRecord,
    actions: &[Action],
) -> Vec<Event> {
    let d = &record.deployment;
    let event = |kind: &str, message: String| {
        Event::new(kind, message)
            .deployment(&record.id)
            .module(&d.spec.module, &d.spec.version)
    };
    let mut events = Vec::new();
    let wave_notes = actions.iter().filter_map(|action| match action {
        Action::Note(note) if note.starts_with("wave ") => Some(note.clone()),
        _ => None,
    });
    let Some(previous) = previous else {
        events.push(event(
            "deployment.created",
            format!(
                "{}@{} to {} ({}, {} node(s)) by {}; {}",
                d.spec.module,
                d.spec.version,
                record.environment,
                d.spec.strategy.name(),
                d.nodes.len(),
                d.spec.created_by,
                d.state.as_str()
            ),
        ));
        events.extend(wave_notes.map(|note| event("deployment.step", note)));
        return events;
    };
    for verdict in d.analysis.iter().skip(previous.analysis.len()) {
        events.push(event(
            "deployment.analysis",
            format!(
                "step {}: {} ({})",
                verdict.step + 1,
                verdict.outcome.as_str(),
                verdict.summary
            ),
        ));
    }
    if previous.state != d.state {
        let kind = match (previous.state, d.state) {
            (State::AwaitingApproval, State::Running | State::Succeeded) => "deployment.approved",
            (_, State::Paused) => "deployment.paused",
            (State::Paused, State::Running) => "deployment.resumed",
            (_, State::RollingBack) => "deployment.rolling_back",
            (_, State::RolledBack) => "deployment.rolled_back",
            _ if d.state.is_terminal() => "deployment.finished",
            _ => "deployment.state",
        };
        let message = match kind {
            // The machine's note carries the approver's reason.
            "deployment.approved" => actions
                .iter()
                .find_map(|a| match a {
                    Action::Note(note) if note.starts_with("approved by") => Some(note.clone()),
                    _ => None,
                })
                .unwrap_or_else(|| format!("approved by {}", d.approved_by)),
            _ if d.reason.is_empty() => d.state.as_str().to_string(),
            _ => format!("{}: {}", d.state.as_str(), d.reason),
        };
        events.push(event(kind, message));
    }
    events.extend(wave_notes.map(|note| event("deployment.step", note)));
    events
}

fn plan_view(deployment: &Deployment) -> PlanView {
    let waves = plan_waves(&deployment.spec.strategy, deployment.nodes.len());
    let total = waves.len();
    let strategy = &deployment.spec.strategy;
    let gate = |i: usize| -> String {
        let last = i + 1 == total;
        match strategy {
            Strategy::Direct => "all nodes healthy".to_string(),
            Strategy::Rolling { min_healthy_ms, .. } if !last => {
                format!("wave healthy for {}s", min_healthy_ms / 1000)
            }
            Strategy::Rolling { .. } => "wave healthy".to_string(),
            Strategy::BlueGreen { bake_ms } => format!(
                "all staged, then switched together; healthy through a {}s bake",
                bake_ms / 1000
            ),
            Strategy::Canary {
                step_ms,
                manual_promote,
                ..
            } if !last => format!(
                "healthy and canary analysis passing for {}s{}",
                step_ms / 1000,
                if *manual_promote {
                    ", then deploy promote"
                } else {
                    ""
                }
            ),
            Strategy::Canary { .. } => "all nodes healthy".to_string(),
        }
    };
    PlanView {
        strategy: strategy.name().to_string(),
        waves: waves
            .iter()
            .enumerate()
            .map(|(i, members)| {
                (
                    members
                        .iter()
                        .map(|&n| deployment.nodes[n].name.clone())
                        .collect(),
                    gate(i),
                )
            })
            .collect(),
    }
}

/// Canary analysis of a deployment's step: canary nodes (healthy on the new
/// version) against baseline nodes (not updated yet), over the reports in
/// the window from the hold's start plus the warm-up to `now`. Sample
/// sizes: requests are each node's mean request rate over the window times
/// the window's length (reports repeat a window between scrapes, so summing
/// their counts would count twice); usage samples are reports with usage.
pub fn analyze(
    registry: &Registry,
    deployment: &Deployment,
    hold_since_ms: u64,
    now: u64,
) -> Analysis {
    let module = &deployment.spec.module;
    let from_ms = hold_since_ms.saturating_add(deployment.spec.thresholds.warmup_ms);
    let window_s = now.saturating_sub(from_ms) as f64 / 1000.0;
    let group = |want: NodeState| -> Aggregate {
        let mut aggregate = Aggregate::default();
        let (mut rate_sum, mut errors) = (0.0, 0.0);
        let mut p99s = Vec::new();
        let (mut cpu, mut memory, mut usage_samples) = (0.0, 0.0, 0u32);
        for track in deployment.nodes.iter().filter(|t| t.state == want) {
            aggregate.nodes += 1;
            let history = registry.history(&track.node);
            // The crash-loop flag is current state, not a sample: read it
            // from the latest report whatever the warm-up.
            if let Some(last) = history.last()
                && last.at_ms >= hold_since_ms
                && last
                    .modules
                    .iter()
                    .any(|m| &m.name == module && m.crash_loop)
            {
                aggregate.crash_loops += 1;
            }
            let (mut node_rates, mut node_windows) = (0.0, 0u32);
            for report in history.iter().filter(|r| r.at_ms >= from_ms) {
                if let Some(m) = report.modules.iter().find(|m| &m.name == module)
                    && let Some(w) = m.metrics
                {
                    node_rates += w.request_rate;
                    node_windows += 1;
                    rate_sum += w.request_rate;
                    errors += w.request_rate * w.error_rate;
                    if let Some(p) = w.latency_p99_seconds {
                        p99s.push(p);
                    }
                }
                if let Some(u) = report.usage {
                    cpu += f64::from(u.cpu_percent);
                    memory += f64::from(u.memory_used_kib) * 1024.0;
                    usage_samples += 1;
                }
            }
            if node_windows > 0 {
                aggregate.requests += node_rates / f64::from(node_windows) * window_s;
            }
        }
        if rate_sum > 0.0 {
            aggregate.error_rate = Some(errors / rate_sum);
        }
        if !p99s.is_empty() {
            // The most recent windows are the rank test's samples.
            let keep = p99s.len().saturating_sub(MAX_LATENCY_WINDOWS);
            aggregate.latency_windows = p99s[keep..].to_vec();
            p99s.sort_by(f64::total_cmp);
            // The median of the windows' p99s: robust to one noisy interval.
            aggregate.latency_p99 = Some(p99s[p99s.len() / 2]);
        }
        if usage_samples > 0 {
            aggregate.cpu_percent = Some(cpu / f64::from(usage_samples));
            aggregate.memory_bytes = Some(memory / f64::from(usage_samples));
        }
        aggregate.usage_samples = usage_samples;
        aggregate
    };
    Analysis {
        canary: group(NodeState::Healthy),
        baseline: group(NodeState::Waiting),
    }
}

#[cfg(test)]
mod create_error_tests {
    use super::*;

    #[test]
    fn create_errors_read_as_before_and_are_failed_preconditions() {
        let cases = [
            (
                CreateError::NoNodes {
                    environment: "qa".into(),
                    selector: false,
                },
                "environment \"qa\" has no nodes to deploy to",
            ),
            (
                CreateError::AllDisconnected {
                    environment: "qa".into(),
                    selector: true,
                    enrolled: 3,
                },
                "no connected node in environment \"qa\" matching the selector to deploy to (3 enrolled, all disconnected)",
            ),
            (
                CreateError::AlreadyActive {
                    id: "d-1".into(),
                    module: "web".into(),
                    version: "2.0.0".into(),
                    environment: "qa".into(),
                    state: "running",
                },
                "deployment d-1 of web@2.0.0 to qa is still running; wait for it, or abort it first",
            ),
        ];
        for (error, text) in cases {
            assert_eq!(error.to_string(), text);
            match ApiError::from(error) {
                ApiError::FailedPrecondition(message) => assert_eq!(message, text),
                other => panic!("{text}: mapped to {other:?}"),
            }
        }
        let api = CreateError::from(ApiError::NotFound("artifact web@9.9.9 not found".into()));
        assert!(matches!(ApiError::from(api), ApiError::NotFound(_)));
    }
}

#[cfg(test)]
mod pipeline_record_tests {
    use super::*;

    /// Records stored while the states were strings read the same now.
    #[test]
    fn pipeline_states_keep_their_stored_words() {
        let stored = r#"{"id":"p-1","module":"web","version":"1.0.0","state":"running","stages":[{"environment":"dev","deployment_id":"d-1","state":"succeeded","reason":""},{"environment":"qa","deployment_id":"","state":"skipped","reason":"no nodes"},{"environment":"staging","deployment_id":"","state":"waiting","reason":""}],"reason":"","created_by":"alice","created_ms":1,"finished_ms":null}"#;
        let record: PipelineRecord = serde_json::from_str(stored).expect("an old record");
        assert_eq!(record.state, PipelineState::Running);
        let states: Vec<StageState> = record.stages.iter().map(|s| s.state).collect();
        assert_eq!(
            states,
            [
                StageState::Succeeded,
                StageState::Skipped,
                StageState::Waiting
            ]
        );
        let written = serde_json::to_value(&record).expect("serialize");
        assert_eq!(written["state"], "running");
        assert_eq!(written["stages"][1]["state"], "skipped");
        for state in [
            StageState::Waiting,
            StageState::Running,
            StageState::Succeeded,
            StageState::Failed,
            StageState::Skipped,
        ] {
            assert_eq!(
                serde_json::to_value(state).expect("serialize"),
                state.as_str()
            );
        }
    }
}
