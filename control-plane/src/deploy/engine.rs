//! The deployment engine: the I/O shell around [`machine`](super::machine).
//!
//! It keeps every deployment in memory and in the store. On each tick and on every
//! node change it builds an observation of each active deployment's nodes
//! from the registry, steps the machine, **persists the new state, then**
//! carries out the actions (desired-state changes pushed to agents). On start
//! it re-asserts the desired state each active deployment expects, so an
//! action lost to a crash between persisting and acting is carried out then;
//! setting an unchanged desired state swaps nothing.
//!
//! Between deployments it brings nodes that attach later to their
//! environment's current version ([`catch_up`]).
//!
//! The decisions are elsewhere and pure: options to a spec ([`spec`]),
//! deployment steps ([`machine`]), pipeline stages ([`pipeline`]), the
//! events of a transition ([`timeline`]), the spans ([`trace`]).
//!
//! [`spec`]: super::spec
//! [`machine`]: super::machine
//! [`pipeline`]: super::pipeline
//! [`timeline`]: super::timeline
//! [`trace`]: super::trace

mod catch_up;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, broadcast};
use tokio_util::sync::CancellationToken;

use super::current::{Downgrade, downgrade_refusal};
use super::error::{ArtifactNotFound, ControlError, CreateError, NotFound, PipelineError};
use super::machine::{
    Action, Analysis, Control, Deployment, Input, Outcome, State, Strategy, Window,
};
use super::pipeline::{Next, StageStart};
use super::spec;
use super::timeline::{Kind, deployment_events};
use super::trace::{self, NodeCommand};
use crate::clock::steady_now_ms;
use crate::config::Settings;
use crate::events::EventLog;
use crate::metrics::Metrics;
use crate::registry::RegistryError;
use crate::registry::{DesiredChange, Registry, Written};
use crate::store::FreezeRecords;
use crate::store::{
    ArtifactRecords, DeploymentRecords, DeploymentRecordsExt, Durability, Store, StoreError,
};
use crate::store::{DesiredModuleRecord, HistoryOrigin};

// Where these lived before the split; services and benchmarks name them here.
pub use super::observe::{Observation, analyze, observe_nodes};
pub use super::pipeline::{PipelineRecord, PipelineStage, PipelineState, StageState};
pub use super::plan::PlanView;
pub use super::record::DeploymentRecord;
pub use super::spec::CreateRequest;

/// What the engine works with, each as narrow as it needs: wired in
/// `server.rs` (and by benchmarks that run the engine in process).
pub struct EngineHandles {
    pub registry: Arc<Registry>,
    /// Where deployment and pipeline records are kept.
    pub records: Arc<dyn DeploymentRecords>,
    /// Artifact records and publisher keys (trust checks).
    pub artifacts: Arc<dyn ArtifactRecords>,
    /// The flush that makes records and desired states durable together.
    pub durability: Arc<dyn Durability>,
    pub events: Arc<EventLog>,
    pub metrics: Arc<Metrics>,
    /// Ad hoc freezes (SPEC §9), checked before anything starts.
    pub freezes: Arc<dyn FreezeRecords>,
}

impl EngineHandles {
    /// The handles over one store.
    pub fn new(
        registry: Arc<Registry>,
        store: &Store,
        events: Arc<EventLog>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            registry,
            records: store.deployments(),
            artifacts: store.artifacts(),
            durability: store.durability(),
            events,
            metrics,
            freezes: store.freezes(),
        }
    }
}

pub struct Engine {
    registry: Arc<Registry>,
    records: Arc<dyn DeploymentRecords>,
    artifacts: Arc<dyn ArtifactRecords>,
    durability: Arc<dyn Durability>,
    events: Arc<EventLog>,
    metrics: Arc<Metrics>,
    settings: Settings,
    /// Records are shared with watchers and readers, never copied for them:
    /// a 10k-node record is megabytes.
    deployments: Mutex<BTreeMap<String, Arc<DeploymentRecord>>>,
    pipelines: Mutex<BTreeMap<String, PipelineRecord>>,
    updates: broadcast::Sender<Arc<DeploymentRecord>>,
    /// When each active deployment was last written by `step_all`.
    persisted_at: std::sync::Mutex<HashMap<String, std::time::Instant>>,
    /// Active deployments whose record in memory is ahead of the stored one
    /// (steps that only moved tracks, not yet written).
    /// The flag: one of them moved more than last-seen times.
    unwritten: std::sync::Mutex<HashMap<String, bool>>,
    /// Each active deployment's observation, kept between passes so a pass
    /// reads only the nodes whose reports changed (`step_all` only).
    observations: std::sync::Mutex<HashMap<String, Observation>>,
    /// One pipeline pass at a time: `run_pipeline` and the engine loop both
    /// advance pipelines, and two passes working from the same snapshot
    /// would both start a stage's deployment.
    pipeline_pass: Mutex<()>,
    /// The registry's yank generation the last pass checked yanks at
    /// (`u64::MAX` until the first pass, which always checks).
    yanks_checked: std::sync::atomic::AtomicU64,
    /// Nodes to bring to their environment's current version.
    catch_ups: std::sync::Mutex<catch_up::CatchUps>,
    freezes: Arc<dyn FreezeRecords>,
    /// Each configured environment's windows and config freezes.
    schedules: BTreeMap<String, crate::schedule::Schedule>,
}

/// How often the leader trims the desired-state history: retention is
/// counted in days, so a few minutes late is nothing, and a trim walks
/// every record.
const HISTORY_TRIM_EVERY: Duration = Duration::from_secs(600);

/// How often active deployments are re-evaluated without any node change
/// (holds, bakes and deadlines are time-driven).
const TICK: Duration = Duration::from_millis(500);

/// Longest a step that only refreshed healthy nodes' last-seen times stays
/// unwritten. After a restart the silence rule may time a node from up to
/// this much earlier than it was really last seen.
const LAST_SEEN_PERSIST_EVERY: Duration = Duration::from_secs(1);

/// Longest a step that only moved tracks (nodes becoming healthy during a
/// wave, with no action and no change of state) stays unwritten. After a
/// crash such a node is judged again from its next report; watchers of the
/// record see its progress at least this often.
const PROGRESS_PERSIST_EVERY: Duration = Duration::from_millis(250);

/// Observes a pass's duration into `hotswap_engine_pass_seconds` when
/// dropped, however the pass ends.
struct PassTimer<'a> {
    started: std::time::Instant,
    histogram: &'a prometheus_client::metrics::histogram::Histogram,
}

impl Drop for PassTimer<'_> {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

impl Engine {
    pub fn new(handles: EngineHandles, settings: Settings) -> Result<Arc<Self>, StoreError> {
        let EngineHandles {
            registry,
            records: stored,
            artifacts,
            durability,
            events,
            metrics,
            freezes,
        } = handles;
        // `Settings::problems` refused bad entries before the engine is
        // built; one that slipped through (settings made in code) is left
        // out with an error rather than stopping the engine.
        let schedules = settings
            .environments
            .iter()
            .filter_map(|(name, env)| match env.schedule() {
                Ok(schedule) => Some((name.clone(), schedule)),
                Err(problems) => {
                    tracing::error!(environment = %name, problems = ?problems, "ignoring the environment's windows and freezes");
                    None
                }
            })
            .collect();
        let records: Vec<DeploymentRecord> = stored.list_deployments()?;
        let pipelines: Vec<PipelineRecord> = stored.list_pipelines()?;
        // Deadlines and holds continue from the recorded times, whatever the
        // wall clock did while the control plane was down.
        if let Some(latest) = records.iter().map(|r| r.deployment.latest_ms()).max() {
            crate::clock::raise_floor(latest);
        }
        let (updates, _) = broadcast::channel(1024);
        Ok(Arc::new(Self {
            registry,
            records: stored,
            artifacts,
            durability,
            events,
            metrics,
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
            unwritten: std::sync::Mutex::new(HashMap::new()),
            observations: std::sync::Mutex::new(HashMap::new()),
            pipeline_pass: Mutex::new(()),
            yanks_checked: std::sync::atomic::AtomicU64::new(u64::MAX),
            catch_ups: std::sync::Mutex::default(),
            freezes,
            schedules,
        }))
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<DeploymentRecord>> {
        self.updates.subscribe()
    }

    pub async fn get(&self, id: &str) -> Result<Arc<DeploymentRecord>, NotFound> {
        self.deployments
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| NotFound {
                kind: "deployment",
                id: id.to_string(),
            })
    }

    pub async fn list(&self) -> Vec<Arc<DeploymentRecord>> {
        let mut all: Vec<Arc<DeploymentRecord>> =
            self.deployments.lock().await.values().cloned().collect();
        all.sort_by_key(|r| std::cmp::Reverse(r.deployment.created_ms));
        all
    }

    /// [`Engine::run`] on a runtime of its own with one worker thread, so
    /// that a burst of agent reports (a wave of a thousand nodes reporting
    /// at once) does not queue the engine's pass behind the session tasks on
    /// the server's workers: the deciding pass then waits for the operating
    /// system's scheduler, not for a run queue of hundreds of tasks. A
    /// multi-threaded runtime, because the etcd store's synchronous calls
    /// hand their worker off (`block_in_place`). The returned task ends when
    /// the engine stops.
    pub fn spawn_on_own_thread(
        self: Arc<Self>,
        shutdown: CancellationToken,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        // The runtime is made, run and dropped on the owner thread: a
        // runtime may not be dropped where the caller's runtime runs.
        let (built, ready) = std::sync::mpsc::sync_channel::<std::io::Result<()>>(1);
        let (stopped, done) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("deploy-engine-owner".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .thread_name("deploy-engine")
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = built.send(Err(e));
                        return;
                    }
                };
                let _ = built.send(Ok(()));
                let engine = runtime.spawn(self.run(shutdown));
                if let Err(e) = runtime.block_on(engine) {
                    tracing::error!(error = %e, "the deployment engine stopped abnormally");
                }
                drop(runtime);
                drop(stopped);
            })?;
        // Building a runtime takes well under a millisecond.
        ready.recv().map_err(|_| {
            std::io::Error::other("the engine's thread ended before its runtime was built")
        })??;
        Ok(tokio::spawn(async move {
            let _stopped = done.await;
        }))
    }

    /// Run until shutdown: re-assert desired states, then step on changes and ticks.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        self.reassert().await;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut attaches_seen = None;
        let mut history_trimmed_at: Option<std::time::Instant> = None;
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
                self.metrics.set_deployment_states(
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
            // A short retention (a test's minute) is trimmed often enough
            // to be kept to within a quarter of it.
            let trim_every = HISTORY_TRIM_EVERY.min(self.settings.history_retention / 4);
            if history_trimmed_at.is_none_or(|at| at.elapsed() >= trim_every) {
                history_trimmed_at = Some(std::time::Instant::now());
                self.trim_history().await;
            }
        }
    }

    /// Drop the desired-state history older than `history_retention`.
    async fn trim_history(&self) {
        let retention =
            u64::try_from(self.settings.history_retention.as_millis()).unwrap_or(u64::MAX);
        let before = steady_now_ms().saturating_sub(retention);
        match self.registry.trim_history(before).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(
                removed,
                "trimmed the desired-state history (history_retention)"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot trim the desired-state history"),
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
        override_freeze: bool,
        user: &str,
    ) -> Result<PipelineRecord, PipelineError> {
        let artifact = self
            .artifacts
            .get_artifact(module, version)?
            .ok_or_else(|| ArtifactNotFound {
                module: module.to_string(),
                version: version.to_string(),
            })?;
        let order = &self.settings.pipeline;
        let last =
            match to {
                Some(env) => order.iter().position(|e| e == env).ok_or_else(|| {
                    PipelineError::NotInPipeline {
                        environment: env.to_string(),
                        order: order.clone(),
                    }
                })?,
                None => order.len().saturating_sub(1),
            };
        // Refuse now rather than after the early stages rolled out: every
        // environment on the way must accept the artifact's signatures.
        for env in &order[..=last] {
            let required = self.settings.min_signatures(env);
            crate::trust::ensure_deployable(&*self.artifacts, &artifact, required, steady_now_ms())
                .map_err(|error| PipelineError::NotDeployable {
                    environment: env.clone(),
                    error,
                })?;
            if !allow_downgrade {
                self.ensure_not_downgrade(module, version, env).await?;
            }
            if !override_freeze && let Some(frozen) = self.frozen(env).await? {
                return Err(frozen.into());
            }
        }
        let mut record = PipelineRecord::new(
            format!("p-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]),
            module,
            version,
            &order[..=last],
            allow_downgrade,
            user,
            steady_now_ms(),
        );
        record.override_freeze = override_freeze;
        self.records.put_pipeline(&record.id, &record).await?;
        tracing::info!(pipeline = %record.id, module = %module, version = %version, user = %user, "pipeline started");
        self.pipelines
            .lock()
            .await
            .insert(record.id.clone(), record.clone());
        self.advance_pipelines().await;
        Ok(self.get_pipeline(&record.id).await?)
    }

    pub async fn get_pipeline(&self, id: &str) -> Result<PipelineRecord, NotFound> {
        self.pipelines
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| NotFound {
                kind: "pipeline",
                id: id.to_string(),
            })
    }

    /// Every pipeline, newest first.
    pub async fn list_pipelines(&self) -> Vec<PipelineRecord> {
        let mut all: Vec<PipelineRecord> = self.pipelines.lock().await.values().cloned().collect();
        all.sort_by_key(|p| std::cmp::Reverse(p.created_ms));
        all
    }

    /// The environment of the stage a running pipeline is at, for deciding
    /// which permission aborting it needs.
    pub async fn pipeline_environment(&self, id: &str) -> Option<String> {
        let pipelines = self.pipelines.lock().await;
        let pipeline = pipelines.get(id)?;
        pipeline
            .stages
            .iter()
            .find(|s| matches!(s.state, StageState::Waiting | StageState::Running))
            .map(|s| s.environment.clone())
    }

    /// Stop a running pipeline (`pipeline abort`): abort the deployment of
    /// the stage it is at, then record the pipeline aborted, so that no
    /// later stage starts. The pipeline pass lock is held throughout, so no
    /// pass starts a stage in between. The deployment goes first: were the
    /// pipeline recorded first and the process to stop before the
    /// deployment is aborted, that deployment would go on.
    pub async fn abort_pipeline(
        &self,
        id: &str,
        reason: &str,
    ) -> Result<PipelineRecord, PipelineError> {
        let _pass = self.pipeline_pass.lock().await;
        let mut pipeline = self.get_pipeline(id).await?;
        if pipeline.state != PipelineState::Running {
            return Err(PipelineError::NotRunning {
                id: id.to_string(),
                state: pipeline.state.as_str(),
            });
        }
        if let Some(deployment) = pipeline.running_deployment().map(str::to_string) {
            let running = self
                .get(&deployment)
                .await
                .is_ok_and(|r| !r.deployment.state.is_terminal());
            if running {
                match self
                    .control(
                        &deployment,
                        Control::Abort {
                            reason: format!("pipeline {id} aborted: {reason}"),
                        },
                    )
                    .await
                {
                    Ok(_) => {}
                    // It ended on its own meanwhile: nothing left to stop.
                    Err(ControlError::Refused { .. }) => {}
                    Err(e) => return Err(PipelineError::Abort(Box::new(e))),
                }
            }
        }
        if !pipeline.abort(reason, steady_now_ms()) {
            // Its last stage had succeeded: it is done, not aborted.
            self.records.put_pipeline(&pipeline.id, &pipeline).await?;
            let state = pipeline.state.as_str();
            self.pipelines
                .lock()
                .await
                .insert(pipeline.id.clone(), pipeline);
            return Err(PipelineError::NotRunning {
                id: id.to_string(),
                state,
            });
        }
        self.records.put_pipeline(&pipeline.id, &pipeline).await?;
        tracing::info!(pipeline = %id, reason = %reason, "pipeline aborted");
        self.pipelines
            .lock()
            .await
            .insert(pipeline.id.clone(), pipeline.clone());
        Ok(pipeline)
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
                if let Err(e) = self.records.put_pipeline(&pipeline.id, &pipeline).await {
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

    /// One pass of one pipeline: the pure pipeline decides, the engine
    /// starts stages' deployments and looks them up.
    async fn advance_pipeline(&self, pipeline: &mut PipelineRecord) {
        match pipeline.next(steady_now_ms()) {
            Next::Nothing => {}
            Next::Start { stage, environment } => {
                let request = CreateRequest {
                    module: pipeline.module.clone(),
                    version: pipeline.version.clone(),
                    environment,
                    allow_downgrade: pipeline.allow_downgrade,
                    override_freeze: pipeline.override_freeze,
                    ..Default::default()
                };
                let start = match self.create(request, &pipeline.created_by).await {
                    Ok((Some(record), _)) => StageStart::Started {
                        deployment_id: record.id.clone(),
                    },
                    Ok((None, _)) => StageStart::Planned,
                    Err(e @ CreateError::NoNodes { .. }) => StageStart::NoNodes {
                        reason: user_text(e),
                    },
                    Err(e @ CreateError::AllDisconnected { .. }) => StageStart::AllDisconnected {
                        reason: user_text(e),
                    },
                    Err(e @ CreateError::AlreadyActive { .. }) => StageStart::Busy {
                        reason: user_text(e),
                    },
                    Err(e) => StageStart::Refused {
                        reason: user_text(e),
                    },
                };
                pipeline.stage_started(
                    stage,
                    start,
                    steady_now_ms(),
                    self.settings.pipeline_wait_timeout,
                );
            }
            Next::Watch {
                stage,
                deployment_id,
            } => {
                let Ok(record) = self.get(&deployment_id).await else {
                    return;
                };
                pipeline.stage_observed(
                    stage,
                    &record.id,
                    record.deployment.state,
                    &record.deployment.reason,
                    steady_now_ms(),
                );
            }
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
        let started = std::time::Instant::now();
        let now = steady_now_ms();
        let ids: Vec<String> = deployments
            .iter()
            .filter(|(_, r)| !r.deployment.state.is_terminal())
            .map(|(id, _)| id.clone())
            .collect();
        let _timed = (!ids.is_empty()).then(|| PassTimer {
            started,
            histogram: &self.metrics.engine_pass,
        });
        // Observations of deployments that ended some other way (a control
        // call) are dropped.
        self.observations().retain(|id, _| ids.contains(id));
        // So are their write times and unwritten marks.
        self.persisted_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| ids.contains(id));
        self.unwritten
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| ids.contains(id));
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
            let mut observation = self.observations().remove(&id).unwrap_or_default();
            let input = match yank {
                Some(yank) if record.deployment.state != State::RollingBack => {
                    Input::Control(Control::Yanked {
                        by: yank.by,
                        reason: yank.reason,
                    })
                }
                _ => self.observe(&mut observation, &record.deployment),
            };
            let window = self.window(&record.environment);
            let stepped = record.deployment.step_in(now, &input, &window);
            if let Input::Observe { nodes, .. } = input {
                observation.restore(nodes);
            }
            let keep = |observation| {
                self.observations().insert(id.clone(), observation);
            };
            let Ok((mut next, actions)) = stepped else {
                keep(observation);
                continue;
            };
            if next.state.is_terminal() {
                drop(observation);
            } else {
                keep(observation);
            }
            // How long since this pass last wrote the record, and whether
            // what is in memory is ahead of what was written.
            let since_written = {
                let persisted = self.persisted_at.lock().unwrap_or_else(|p| p.into_inner());
                persisted.get(&id).map(|at| at.elapsed())
            };
            // Unwritten steps in memory: `Some(true)` when one of them moved
            // more than last-seen times.
            let behind = self
                .unwritten
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&id)
                .copied();
            let due = |every: Duration| since_written.is_none_or(|e| e >= every);
            let every = |progress: bool| {
                if progress {
                    PROGRESS_PERSIST_EVERY
                } else {
                    LAST_SEEN_PERSIST_EVERY
                }
            };
            if next == record.deployment && !behind.is_some_and(|p| due(every(p))) {
                continue;
            }
            // A step that moves tracks (a node became healthy, a healthy
            // node was seen again) and nothing else (no action, same state,
            // counters and verdicts) changes nothing anyone acts on; writing
            // a 10k-node record for each would be most of the engine's work
            // during a large wave. Such steps stay in memory and are written
            // with the next real change, or once PROGRESS_PERSIST_EVERY
            // (LAST_SEEN_PERSIST_EVERY when only last-seen times moved) has
            // passed since the last write, by a later pass even if it
            // changes nothing.
            let progress = behind == Some(true)
                || (next != record.deployment
                    && !next.differs_only_in_last_seen(&record.deployment));
            let memory_only = actions.is_empty()
                && next.differs_only_in_tracks(&record.deployment)
                && !due(every(progress));
            let updated = record.with(next);
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
                self.unwritten
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
                let updated = Arc::new(updated);
                self.publish(&updated);
                deployments.insert(id, updated);
            } else {
                self.unwritten
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(id.clone(), progress);
                deployments.insert(id, Arc::new(updated));
            }
        }
    }

    /// The yank of a deployment's version, if it was yanked.
    fn yank_of(&self, deployment: &Deployment) -> Option<crate::store::YankRecord> {
        let spec = &deployment.spec;
        match self.artifacts.get_artifact(&spec.module, &spec.version) {
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
    ) -> Result<(), RegistryError> {
        let metrics = &self.metrics;
        let seen = previous.map_or(0, |p| p.analysis.len());
        for verdict in record.deployment.analysis.iter().skip(seen) {
            if verdict.outcome == Outcome::Failed {
                metrics.analysis_failures.inc();
            }
        }
        for (kind, event) in deployment_events(previous, record, actions) {
            if kind == Kind::RollingBack {
                metrics.rollbacks.inc();
            }
            self.events.append(event);
        }
        let changes = self.node_changes(record, actions);
        self.records.put_deployment_unflushed(&record.id, record)?;
        let written = self.write_desired(record, changes)?;
        self.durability.flush().await?;
        if let Err(e) = self.registry.push_desired(&written) {
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
            let changes = self.node_changes(record, actions);
            if changes.is_empty() {
                return Ok(());
            }
            let written = self.write_desired(record, changes)?;
            self.durability.flush().await?;
            self.registry.push_desired(&written)?;
            Ok::<(), RegistryError>(())
        };
        if let Err(e) = result.await {
            tracing::warn!(deployment = %record.id, error = %e, "desired-state changes failed");
        }
    }

    /// Write a record's desired-state changes (unflushed); nodes removed
    /// meanwhile are skipped, and logged.
    fn write_desired(
        &self,
        record: &DeploymentRecord,
        changes: Vec<DesiredChange>,
    ) -> Result<Written, RegistryError> {
        let written = self
            .registry
            .write_desired(changes, &history_origin(record))?;
        if !written.missing.is_empty() {
            tracing::warn!(deployment = %record.id, nodes = ?written.missing, "nodes were removed; skipping their desired-state changes");
        }
        Ok(written)
    }

    /// The desired-state changes `actions` ask for, each node command with
    /// its span; notes are logged.
    fn node_changes(&self, record: &DeploymentRecord, actions: &[Action]) -> Vec<DesiredChange> {
        let module = &record.deployment.spec.module;
        // Node commands of a wave are children of the wave's span; the others
        // (blue-green staging and switch, rollback, re-assertion after a
        // restart) of the deployment's.
        let parent = trace::wave(record, actions).unwrap_or_else(|| record.traceparent.clone());
        // Node names for the commands' spans: looked up once per batch, not
        // by a search of every track per command.
        let names: std::collections::HashMap<&str, &str> = if parent.is_empty() {
            std::collections::HashMap::new()
        } else {
            record
                .deployment
                .nodes
                .iter()
                .map(|t| (t.node.as_str(), t.name.as_str()))
                .collect()
        };
        let mut changes = Vec::new();
        for action in actions {
            match action {
                Action::SetVersion { node, version } => {
                    let desired = (!version.is_empty()).then(|| {
                        self.traced(
                            record,
                            &parent,
                            node,
                            names.get(node.as_str()).copied().unwrap_or(node),
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
                        names.get(node.as_str()).copied().unwrap_or(node),
                        "stage",
                        DesiredModuleRecord {
                            version: active.clone(),
                            staged_version: staged.clone(),
                            traceparent: String::new(),
                        },
                    );
                    changes.push((node.clone(), module.clone(), Some(desired)));
                }
                Action::Note(note) => {
                    tracing::info!(deployment = %record.id, module = %module, "{note}")
                }
            }
        }
        changes
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
        name: &str,
        kind: &str,
        mut desired: DesiredModuleRecord,
    ) -> DesiredModuleRecord {
        if parent.is_empty() {
            return desired;
        }
        let module = &record.deployment.spec.module;
        let current = self
            .registry
            .desired_of(node)
            .ok()
            .and_then(|mut d| d.modules.remove(module));
        if let Some(current) = current.filter(|c| c.same_target(&desired)) {
            desired.traceparent = current.traceparent;
            return desired;
        }
        desired.traceparent = trace::node_command(
            record,
            parent,
            &NodeCommand {
                node,
                name,
                kind,
                version: &desired.version,
                staged_version: &desired.staged_version,
            },
        );
        desired
    }

    fn observations(&self) -> std::sync::MutexGuard<'_, HashMap<String, Observation>> {
        // Plain bookkeeping: a panic elsewhere leaves nothing half-done here.
        self.observations.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Observation of a deployment's nodes (brought up to date in
    /// `observation`, which lends its reports to the returned input), and
    /// canary analysis during a hold.
    fn observe(&self, observation: &mut Observation, deployment: &Deployment) -> Input {
        let nodes = observation.refresh(&self.registry, deployment);
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

    /// Refuse `module@version` in `environment` when it is older than the
    /// environment's current version (SPEC §6: downgrades are deliberate).
    async fn ensure_not_downgrade(
        &self,
        module: &str,
        version: &str,
        environment: &str,
    ) -> Result<(), Downgrade> {
        let currents = self.currents().await;
        let current = currents
            .get(&(environment.to_string(), module.to_string()))
            .and_then(|m| m.current.as_ref());
        match current.and_then(|c| downgrade_refusal(module, version, environment, c)) {
            Some(downgrade) => Err(downgrade),
            None => Ok(()),
        }
    }

    /// The freeze covering `environment` now (wall clock), ad hoc or from
    /// the config (SPEC §9).
    pub async fn frozen(
        &self,
        environment: &str,
    ) -> Result<Option<crate::freeze::Frozen>, StoreError> {
        let records = self.freezes.current_freezes().await?;
        Ok(crate::freeze::frozen(
            environment,
            self.schedules.get(environment),
            &records,
            hotswap_common::timefmt::now_ms(),
        ))
    }

    /// Whether waves may begin in `environment` now: its deployment windows
    /// at the wall clock (SPEC §9). The wall clock, not the steady one that
    /// times deployments: windows are hours of the calendar.
    fn window(&self, environment: &str) -> Window {
        match self
            .schedules
            .get(environment)
            .and_then(|s| s.closed_reason(hotswap_common::timefmt::now_ms()))
        {
            Some(reason) => Window::Closed(reason),
            None => Window::Open,
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
        semver::Version::parse(&request.version).map_err(|e| CreateError::InvalidVersion {
            version: request.version.clone(),
            reason: e.to_string(),
        })?;
        let artifact = self
            .artifacts
            .get_artifact(&request.module, &request.version)?
            .ok_or_else(|| ArtifactNotFound {
                module: request.module.clone(),
                version: request.version.clone(),
            })?;
        let spec = spec::build(&request, &self.settings, user)?;
        let required = self.settings.min_signatures(&request.environment);
        crate::trust::ensure_deployable(&*self.artifacts, &artifact, required, steady_now_ms())
            .map_err(CreateError::NotDeployable)?;
        if !request.allow_downgrade {
            self.ensure_not_downgrade(&request.module, &request.version, &request.environment)
                .await?;
        }
        // A dry run shows the plan even in a freeze; it starts nothing.
        if !request.override_freeze
            && !request.dry_run
            && let Some(frozen) = self.frozen(&request.environment).await?
        {
            return Err(frozen.into());
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
        let window = self.window(&request.environment);
        let (deployment, actions) = Deployment::new_in(spec, targets, now, &window);
        let mut plan = super::plan::plan_view(&deployment);
        if let Some(schedule) = self.schedules.get(&request.environment) {
            plan.windows = super::plan::window_starts(
                &deployment,
                schedule,
                hotswap_common::timefmt::now_ms(),
            );
        }
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
        let id = hotswap_common::ids::DeploymentId::generate().into_string();
        // One trace per deployment. Its root span is a marker that ends at
        // once; what joins the trace is its context, stored with the record.
        let traceparent = trace::deployment_root(
            &id,
            &request.module,
            &request.version,
            &request.environment,
            &deployment.spec.strategy,
        );
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
    ) -> Result<Arc<DeploymentRecord>, ControlError> {
        let mut deployments = self.deployments.lock().await;
        let record = deployments.get(id).cloned().ok_or_else(|| NotFound {
            kind: "deployment",
            id: id.to_string(),
        })?;
        let window = self.window(&record.environment);
        let (next, actions) = record
            .deployment
            .step_in(steady_now_ms(), &Input::Control(control), &window)
            .map_err(|refusal| ControlError::Refused {
                id: id.to_string(),
                refusal,
            })?;
        let updated = record.with(next);
        self.commit(Some(&record.deployment), &updated, &actions)
            .await?;
        let updated = Arc::new(updated);
        self.publish(&updated);
        deployments.insert(id.to_string(), updated.clone());
        Ok(updated)
    }
}

/// Whom the desired-state history names for a deployment's changes: the
/// deployment, and the operator who created it.
fn history_origin(record: &DeploymentRecord) -> HistoryOrigin {
    HistoryOrigin::new(
        steady_now_ms(),
        &record.id,
        &record.deployment.spec.created_by,
    )
}

/// A refusal as a pipeline stage records it: the words `deploy create`
/// says, except that an invalid option is named by its configuration key
/// (a stage's options come from the configuration, not from flags).
fn user_text(error: CreateError) -> String {
    error.to_string()
}
