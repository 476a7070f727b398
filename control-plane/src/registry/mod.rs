//! The node registry: durable node records (in the [`Store`]) joined with the
//! live state of agent sessions (in memory). Session state is never persisted
//! as "connected": after a restart every node is disconnected until its agent
//! opens a new session, which is the truth.
//!
//! Every change is published on a broadcast channel for `WatchNodes`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use hotswap_common::labels::{ENVIRONMENT_LABEL, Labels};
use hotswap_common::timefmt::now_ms;
use std::collections::VecDeque;

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::events::{Event, EventBudget, EventLog};
use crate::metrics::Metrics;
mod desired;
mod history;
mod journal;
mod published;
mod remote;
mod transitions;

pub use desired::Written;
use history::HISTORY_LEN;
pub use history::{ModuleSample, Sample, UsageSample};
use published::{Decision, Publication};
use remote::{RemoteSession, Shared};
use transitions::module_transitions;

use crate::store::{
    DesiredModuleRecord, DesiredRecord, EnrollError, NodeRecord, Store, StoreError,
};

/// Why the registry refused or failed a call.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("node id or name must not be empty")]
    EmptyQuery,
    /// Nothing matches what the caller asked for (an id, name or prefix).
    #[error("node {0:?} not found")]
    NotFound(String),
    /// A node named by id in a batch is not enrolled (removed meanwhile).
    #[error("node {0} not found")]
    UnknownNode(String),
    #[error("node id prefix {prefix:?} matches {matches} nodes; give more characters")]
    AmbiguousPrefix { prefix: String, matches: usize },
    /// The node was removed while its session was being opened.
    #[error("node {0} was removed")]
    Removed(String),
    #[error("node {0} is not enrolled (removed or unknown); enroll again with a new join token")]
    NotEnrolled(String),
    #[error(
        "node {0} presented a certificate that is not its current one (replaced by a renewal, or expired)"
    )]
    StaleCertificate(String),
    #[error(transparent)]
    Storage(#[from] StoreError),
}

/// A module's request metrics over one scrape interval (the shared type,
/// under the name the engine and analysis know it by).
pub type MetricsWindow = hotswap_common::status::ModuleMetrics;

/// Status of one module on a node, as last reported by its agent: the
/// shared [`ModuleStatus`](hotswap_common::status::ModuleStatus), screened
/// and capped at the edge (`service::convert`).
pub type ModuleState = hotswap_common::status::ModuleStatus;

/// Node resource usage as last reported.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct NodeUsage {
    pub cpu_percent: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
}

/// One status report as received.
#[derive(Clone, Debug, PartialEq)]
pub struct Report {
    pub at_ms: u64,
    pub observed_generation: u64,
    /// The desired generation the agent was working on when it reported.
    pub desired_generation: u64,
    pub modules: Vec<ModuleState>,
    pub usage: Option<NodeUsage>,
}

/// A node as operators see it: record plus live session state.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeState {
    pub record: NodeRecord,
    pub connected: bool,
    pub last_seen_ms: Option<u64>,
    pub modules: Vec<ModuleState>,
    pub desired: DesiredRecord,
    pub usage: Option<NodeUsage>,
    pub observed_generation: u64,
    /// The desired generation the agent last said it had received.
    pub agent_desired_generation: u64,
}

#[derive(Clone, Debug)]
pub enum NodeChange {
    Changed(NodeState),
    Removed(NodeState),
}

struct LiveSession {
    generation: u64,
    /// The node's name, fixed at enrollment: what its events are told
    /// under, without a storage read per report.
    name: Box<str>,
    last_seen_ms: u64,
    cancel: CancellationToken,
    desired: watch::Sender<DesiredRecord>,
    modules: Vec<ModuleState>,
    usage: Option<NodeUsage>,
    observed_generation: u64,
    agent_desired_generation: u64,
    /// The agent sent a status report in this session (what it runs is known).
    reported: bool,
    /// Reports of this session that changed something besides metrics
    /// (part of its [`Stamp`]).
    changes: u64,
    history: VecDeque<Sample>,
    connected_at_ms: u64,
    /// What of this session was published for the other replicas (etcd).
    publication: Publication,
}

/// A session's claim on its node. Only the newest session of a node is live;
/// an older one sees its token cancelled and its updates ignored.
pub struct SessionHandle {
    pub node_id: String,
    pub generation: u64,
    pub cancel: CancellationToken,
    pub labels: Labels,
    /// The node's desired state; changes whenever an operator or deployment changes it.
    pub desired: watch::Receiver<DesiredRecord>,
}

pub struct Registry {
    store: Store,
    live: Mutex<HashMap<String, LiveSession>>,
    updates: broadcast::Sender<NodeChange>,
    metrics: Arc<Metrics>,
    generations: AtomicU64,
    total_nodes: AtomicU64,
    /// Increases with every session attached (the engine looks for nodes to
    /// catch up then).
    attaches: AtomicU64,
    /// Nodes whose sessions attached since the engine last took them
    /// ([`Registry::take_attached`]), so catch-up looks at those nodes only.
    attached: Mutex<Vec<String>>,
    events: Arc<EventLog>,
    /// Wakes the deployment engine after any node change; changes while it
    /// is busy collapse into one wake-up.
    wake: tokio::sync::Notify,
    /// Increases with every yank or unyank, so the engine reads yanks from
    /// the store only after one (and once after a start), not every pass.
    yanks: AtomicU64,
    /// Node changes announced so far (the engine's wake-ups' cause).
    changes: AtomicU64,
    /// Events each node's sessions may still cause ([`EventBudget`]), by
    /// node id; kept across sessions, dropped with the node. Taken after
    /// `live` when both are held.
    budgets: Mutex<HashMap<String, EventBudget>>,
    /// On etcd: sharing sessions with the other replicas ([`remote`]).
    shared: std::sync::OnceLock<Shared>,
    /// Nodes whose sessions other replicas hold, as published. Taken after
    /// `live` when both are held.
    remote: Mutex<HashMap<String, RemoteSession>>,
    /// The nodes whose [`Stamp`] moved, in order ([`Registry::changed_since`]).
    /// Pushed to under `live`, with the change; taken after `live` when
    /// both are held.
    journal: Mutex<journal::Journal>,
    /// When `hotswap_storage_bytes` was last measured: the size on disk
    /// lists the database's directory, too slow to do on every one of a
    /// reconnect storm's attaches (4 % of the control plane's CPU in one).
    storage_measured: Mutex<Option<std::time::Instant>>,
}

/// `hotswap_storage_bytes` is measured at most this often.
const STORAGE_GAUGE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// One desired-state change: node id, module, and the new entry (`None`
/// removes the module).
pub type DesiredChange = (String, String, Option<DesiredModuleRecord>);

/// What the deployment engine needs of one node, read from memory only.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed<'a> {
    pub connected: bool,
    /// The agent has reported on the node's latest desired generation.
    pub current: bool,
    /// The agent sent a status report in this session.
    pub reported: bool,
    pub module: Option<&'a ModuleState>,
}

/// What an observation of a node connected here depends on: its session,
/// the reports of that session that changed more than metrics, and its
/// desired generation. Two observations under one stamp are equal, so a
/// caller that keeps what it saw reads a node again only when its stamp
/// moved ([`Registry::observe_changed`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    session: u64,
    changes: u64,
    desired_generation: u64,
}

/// Capacity of the change channel; a watcher further behind gets a fresh snapshot.
const UPDATE_CHANNEL_CAPACITY: usize = 4096;

impl Registry {
    /// The registry over `store`'s nodes and desired states, appending to
    /// `events` (wired in `server.rs`, shared with the engine and services).
    pub fn new(
        store: Store,
        events: Arc<EventLog>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, RegistryError> {
        let total = store.list_nodes()?.len() as u64;
        let (updates, _) = broadcast::channel(UPDATE_CHANNEL_CAPACITY);
        let registry = Arc::new(Self {
            store,
            live: Mutex::new(HashMap::new()),
            updates,
            metrics,
            generations: AtomicU64::new(1),
            total_nodes: AtomicU64::new(total),
            attaches: AtomicU64::new(0),
            attached: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            yanks: AtomicU64::new(0),
            changes: AtomicU64::new(0),
            budgets: Mutex::new(HashMap::new()),
            shared: std::sync::OnceLock::new(),
            remote: Mutex::new(HashMap::new()),
            journal: Mutex::new(journal::Journal::new(journal::JOURNAL_CAP)),
            storage_measured: Mutex::new(None),
            events,
        });
        registry.update_gauges(&registry.lock_live());
        Ok(registry)
    }

    fn lock_journal(&self) -> MutexGuard<'_, journal::Journal> {
        self.journal
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `node_id`'s stamp moved (its session, a report that changed more
    /// than metrics, its desired generation). Called under `live`, with
    /// the change, so a reader of the journal that then takes `live` sees it.
    fn stamp_moved(&self, node_id: &str) {
        self.lock_journal().push(node_id);
    }

    /// Where the change journal ends now: pass it to
    /// [`Registry::changed_since`] to hear of the nodes whose stamp moves
    /// from here on. Take it before reading the nodes it is to follow.
    pub fn journal_end(&self) -> u64 {
        self.lock_journal().end()
    }

    /// Calls `each` with every node whose [`Stamp`] moved since `cursor`
    /// (a node as often as it moved), and answers the cursor for next time;
    /// `None` when the journal no longer reaches back that far, and the
    /// caller must look at every node.
    pub fn changed_since(&self, cursor: u64, each: impl FnMut(&str)) -> Option<u64> {
        self.lock_journal().since(cursor, each)
    }

    #[cfg(test)]
    pub fn set_journal_cap(&self, cap: usize) {
        self.lock_journal().set_cap(cap);
    }

    fn lock_live(&self) -> MutexGuard<'_, HashMap<String, LiveSession>> {
        // A panic while holding this lock leaves plain data behind; keep serving.
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_remote(&self) -> MutexGuard<'_, HashMap<String, RemoteSession>> {
        self.remote
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn update_gauges(&self, live: &HashMap<String, LiveSession>) {
        self.metrics.set_node_counts(
            live.len() as i64,
            self.total_nodes.load(Ordering::Relaxed) as i64,
        );
        let mut measured = self
            .storage_measured
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if measured.is_none_or(|at| at.elapsed() >= STORAGE_GAUGE_EVERY) {
            *measured = Some(std::time::Instant::now());
            self.metrics
                .storage_bytes
                .set(self.store.size_on_disk() as i64);
        }
    }

    fn state_of(&self, record: NodeRecord, live: &HashMap<String, LiveSession>) -> NodeState {
        match live.get(&record.id) {
            Some(session) => NodeState {
                last_seen_ms: Some(session.last_seen_ms),
                connected: true,
                modules: session.modules.clone(),
                desired: session.desired.borrow().clone(),
                usage: session.usage,
                observed_generation: session.observed_generation,
                agent_desired_generation: session.agent_desired_generation,
                record,
            },
            None => match self.lock_remote().get(&record.id) {
                // Connected to another replica (etcd): as its record says.
                Some(remote) => NodeState {
                    last_seen_ms: Some(remote.record.last_seen_ms),
                    connected: true,
                    modules: remote.modules.clone(),
                    desired: self.store.get_desired(&record.id).unwrap_or_default(),
                    usage: remote.usage,
                    observed_generation: remote.record.observed_generation,
                    agent_desired_generation: remote.record.agent_desired_generation,
                    record,
                },
                None => self.disconnected_state(record),
            },
        }
    }

    fn disconnected_state(&self, record: NodeRecord) -> NodeState {
        NodeState {
            last_seen_ms: record.last_seen_ms,
            connected: false,
            modules: Vec::new(),
            desired: self.store.get_desired(&record.id).unwrap_or_default(),
            usage: None,
            observed_generation: 0,
            agent_desired_generation: 0,
            record,
        }
    }

    fn publish(&self, change: NodeChange) {
        self.announce(1);
        // No receivers is fine: nobody is watching.
        let _ = self.updates.send(change);
    }

    /// A version was yanked or unyanked: the engine checks its active
    /// deployments against the store at its next pass, which this starts now.
    pub fn yank_changed(&self) {
        self.yanks.fetch_add(1, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// How many yank changes there were since the start.
    pub fn yank_generation(&self) -> u64 {
        self.yanks.load(Ordering::SeqCst)
    }

    /// Count `count` node changes and wake the engine, without building
    /// their states for watchers (see [`Registry::watched`]).
    fn announce(&self, count: u64) {
        self.changes.fetch_add(count, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// One node changed: its state for watchers when [`Registry::watched`]
    /// had it built, else only the count and the engine's wake-up.
    fn changed_node(&self, state: Option<NodeState>) {
        match state {
            Some(state) => self.publish(NodeChange::Changed(state)),
            None => self.announce(1),
        }
    }

    /// Whether anyone follows node changes (`nodes watch`). A node's full
    /// state costs a storage read and copies of its modules and desired
    /// state, so hot paths build it only for watchers.
    fn watched(&self) -> bool {
        self.updates.receiver_count() > 0
    }

    /// Agent sessions connected now (one per node: a newer session of a
    /// node replaces the older one).
    pub fn session_count(&self) -> usize {
        self.lock_live().len()
    }

    /// Follow node changes with their states.
    pub fn subscribe(&self) -> broadcast::Receiver<NodeChange> {
        self.updates.subscribe()
    }

    /// Resolves after a node change (at once if one happened since the last
    /// call returned). For the deployment engine, its only caller: a wave of
    /// N reports wakes it once, however many arrived while it worked.
    pub async fn changed(&self) {
        self.wake.notified().await;
    }

    /// Node changes announced so far.
    pub fn changes_announced(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Every node, optionally only those of one environment, sorted by name.
    pub fn list(&self, environment: Option<&str>) -> Result<Vec<NodeState>, RegistryError> {
        let records = self.store.list_nodes()?;
        let live = self.lock_live();
        let mut nodes: Vec<NodeState> = records
            .into_iter()
            .filter(|r| {
                environment.is_none_or(|env| {
                    r.labels.get(ENVIRONMENT_LABEL).map(String::as_str) == Some(env)
                })
            })
            .map(|r| self.state_of(r, &live))
            .collect();
        nodes.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        Ok(nodes)
    }

    /// A node's desired state as stored (empty when it has none).
    pub fn desired_of(&self, node_id: &str) -> Result<DesiredRecord, RegistryError> {
        Ok(self.store.get_desired(node_id)?)
    }

    /// Find a node by id, name, or unique id prefix (at least 4 characters).
    pub fn find(&self, query: &str) -> Result<NodeState, RegistryError> {
        let query = query.trim();
        if query.is_empty() {
            return Err(RegistryError::EmptyQuery);
        }
        let record = match self.store.get_node(query)? {
            Some(record) => record,
            None => match self.store.node_id_by_name(query)? {
                Some(id) => self
                    .store
                    .get_node(&id)?
                    .ok_or_else(|| RegistryError::NotFound(query.to_string()))?,
                None => self.find_by_prefix(query)?,
            },
        };
        Ok(self.state_of(record, &self.lock_live()))
    }

    fn find_by_prefix(&self, prefix: &str) -> Result<NodeRecord, RegistryError> {
        if prefix.len() < 4 {
            return Err(RegistryError::NotFound(prefix.to_string()));
        }
        let mut matches: Vec<NodeRecord> = self
            .store
            .list_nodes()?
            .into_iter()
            .filter(|r| r.id.starts_with(prefix))
            .collect();
        match matches.len() {
            0 => Err(RegistryError::NotFound(prefix.to_string())),
            1 => Ok(matches.remove(0)),
            n => Err(RegistryError::AmbiguousPrefix {
                prefix: prefix.to_string(),
                matches: n,
            }),
        }
    }

    /// Enroll a node (see [`Store::enroll`]) and announce it; a retry of an
    /// enrollment that committed returns that node (another id than
    /// `record`'s) and announces nothing.
    pub async fn enroll(
        &self,
        token_hash: &str,
        record: NodeRecord,
    ) -> Result<NodeState, EnrollError> {
        let asked = record.id.clone();
        let record = self.store.enroll(token_hash, now_ms(), record).await?;
        if record.id != asked {
            // A retry of an enrollment that committed: the node exists and
            // was announced when it did.
            let live = self.lock_live();
            return Ok(self.state_of(record, &live));
        }
        self.events.append(
            Event::new(
                "node.enrolled",
                format!("node {} enrolled as {}", record.name, record.id),
            )
            .node(&record.name),
        );
        self.total_nodes.fetch_add(1, Ordering::Relaxed);
        let state = {
            let live = self.lock_live();
            self.update_gauges(&live);
            self.state_of(record, &live)
        };
        self.publish(NodeChange::Changed(state.clone()));
        Ok(state)
    }

    /// Start a session for `node_id`, replacing any previous one. The peer must
    /// present the node's current certificate. Labels from the agent's hello
    /// are applied, except those the join token forced.
    pub async fn attach(
        &self,
        node_id: &str,
        cert_fingerprint: &str,
        agent_labels: Labels,
        agent_version: &str,
    ) -> Result<SessionHandle, RegistryError> {
        self.verify_current(node_id, cert_fingerprint).await?;
        let now = now_ms();
        // Guarded: a removal or another replica's write in between is
        // re-read, never overwritten.
        let record = self
            .store
            .update_node(node_id, &|record| {
                let mut labels = agent_labels.clone();
                labels.extend(record.forced_labels.clone());
                record.labels = labels;
                record.agent_version = agent_version.to_string();
                record.last_seen_ms = Some(now);
                true
            })
            .await?
            .ok_or_else(|| RegistryError::Removed(node_id.to_string()))?;
        let connected = Event::new(
            "node.connected",
            format!("{} connected (agent {agent_version})", record.name),
        );
        for event in self.within_budget(node_id, vec![connected], false) {
            self.events.append(event.node(&record.name));
        }

        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        let (desired_rx, state) = {
            let mut live = self.lock_live();
            // Between the check above and here the node may have been removed.
            if self.store.get_node(node_id)?.is_none() {
                return Err(RegistryError::Removed(node_id.to_string()));
            }
            // Read under the lock the desired-state follower hands changes
            // over under (etcd): a change committed elsewhere is either in
            // this read or handed to the session once it is live.
            let (desired_tx, desired_rx) = watch::channel(self.store.get_desired(node_id)?);
            let previous = live.insert(
                node_id.to_string(),
                LiveSession {
                    generation,
                    name: record.name.as_str().into(),
                    last_seen_ms: now,
                    cancel: cancel.clone(),
                    desired: desired_tx,
                    modules: Vec::new(),
                    usage: None,
                    observed_generation: 0,
                    agent_desired_generation: 0,
                    reported: false,
                    changes: 0,
                    // The whole ring at once: a session's memory is what it
                    // is from the start, not something that grows for minutes.
                    history: VecDeque::with_capacity(HISTORY_LEN),
                    connected_at_ms: now,
                    publication: Publication::default(),
                },
            );
            self.stamp_moved(node_id);
            if let Some(previous) = previous {
                tracing::info!(node = %node_id, "new session replaces the previous one");
                previous.cancel.cancel();
            }
            if let Some(session) = live.get_mut(node_id) {
                session.publication.started(now);
                self.queue_record(node_id, session, &[]);
            }
            self.update_gauges(&live);
            (
                desired_rx,
                self.watched().then(|| self.state_of(record.clone(), &live)),
            )
        };
        self.metrics.sessions_opened.inc();
        self.note_attached(node_id);
        self.changed_node(state);
        Ok(SessionHandle {
            node_id: node_id.to_string(),
            generation,
            cancel,
            labels: record.labels,
            desired: desired_rx,
        })
    }

    /// [`Self::current_record`], decided on the cluster's state: a node
    /// refused as not enrolled, or as presenting a superseded certificate,
    /// may have enrolled or renewed through another replica a moment ago,
    /// before this replica's copy held it. The copy is caught up and the
    /// record read again before the refusal stands (an agent takes it as
    /// fatal). Every check of a node's own calls goes through here.
    pub async fn verify_current(
        &self,
        node_id: &str,
        cert_fingerprint: &str,
    ) -> Result<NodeRecord, RegistryError> {
        match self.current_record(node_id, cert_fingerprint) {
            Err(RegistryError::NotEnrolled(_) | RegistryError::StaleCertificate(_)) => {
                self.store.catch_up().await?;
                self.current_record(node_id, cert_fingerprint)
            }
            decided => decided,
        }
    }

    /// The node's record, if `cert_fingerprint` is its current certificate,
    /// as this replica's copy holds it.
    pub fn current_record(
        &self,
        node_id: &str,
        cert_fingerprint: &str,
    ) -> Result<NodeRecord, RegistryError> {
        let record = self
            .store
            .get_node(node_id)?
            .ok_or_else(|| RegistryError::NotEnrolled(node_id.to_string()))?;
        if !record.accepts_certificate(cert_fingerprint, now_ms()) {
            return Err(RegistryError::StaleCertificate(node_id.to_string()));
        }
        Ok(record)
    }

    /// Record a renewed certificate for a node that presented
    /// `presented_fingerprint`: the new one becomes current and the one the
    /// node used stays valid until it expires, so the open session survives.
    pub async fn renew_certificate(
        &self,
        node_id: &str,
        presented_fingerprint: &str,
        new_fingerprint: String,
        new_not_after_ms: u64,
    ) -> Result<(), RegistryError> {
        self.current_record(node_id, presented_fingerprint)?;
        // Decided on the record as it stands when written (guarded), so a
        // concurrent change is neither lost nor a removed node revived.
        self.store
            .update_node(node_id, &|record| {
                let (previous, previous_not_after) =
                    if presented_fingerprint == record.cert_fingerprint {
                        (record.cert_fingerprint.clone(), record.cert_not_after_ms)
                    } else {
                        (
                            presented_fingerprint.to_string(),
                            record.previous_cert_not_after_ms,
                        )
                    };
                record.previous_cert_fingerprint = Some(previous);
                record.previous_cert_not_after_ms = previous_not_after;
                record.cert_fingerprint = new_fingerprint.clone();
                record.cert_not_after_ms = new_not_after_ms;
                true
            })
            .await?
            .ok_or_else(|| RegistryError::Removed(node_id.to_string()))?;
        Ok(())
    }

    /// Record a heartbeat; false when the session is no longer the live one.
    pub fn heartbeat(&self, handle: &SessionHandle) -> bool {
        self.metrics.heartbeats.inc();
        let mut live = self.lock_live();
        match live.get_mut(&handle.node_id) {
            Some(session) if session.generation == handle.generation => {
                session.last_seen_ms = now_ms();
                true
            }
            _ => false,
        }
    }

    /// Record a status report: it replaces the node's module statuses and is
    /// appended to its recent history. Watchers hear of it when something
    /// other than the metrics changed.
    pub fn report(&self, handle: &SessionHandle, report: Report) {
        self.metrics.reports.inc();
        let (state, events, changed) = {
            let mut live = self.lock_live();
            let Some(session) = live.get_mut(&handle.node_id) else {
                return;
            };
            if session.generation != handle.generation {
                return;
            }
            // Metrics move on every report; only the rest is a change.
            let changed = session.modules.len() != report.modules.len()
                || session
                    .modules
                    .iter()
                    .zip(&report.modules)
                    .any(|(a, b)| !a.same_but_metrics(b))
                || session.observed_generation != report.observed_generation
                || session.agent_desired_generation != report.desired_generation;
            let transitions = if changed {
                module_transitions(&session.modules, &report.modules)
            } else {
                Vec::new()
            };
            // Through the node's budget even when empty: a summary of what
            // it suppressed may be due.
            let transitions = self.within_budget(&handle.node_id, transitions, false);
            if session.history.len() == HISTORY_LEN {
                session.history.pop_front();
            }
            let sample = Sample::of(&report);
            session.history.push_back(sample.clone());
            let first = !session.reported;
            session.modules = report.modules;
            session.usage = report.usage;
            session.observed_generation = report.observed_generation;
            session.agent_desired_generation = report.desired_generation;
            session.last_seen_ms = report.at_ms;
            // The first report of a session is a change: catch-up waits for it.
            let changed = changed || first;
            session.reported = true;
            if changed {
                session.changes += 1;
                self.stamp_moved(&handle.node_id);
            }
            if self.shared.get().is_some()
                && let Decision::Publish(samples) =
                    session.publication.on_report(report.at_ms, changed, sample)
            {
                self.queue_record(&handle.node_id, session, &samples);
            }
            if !changed && transitions.is_empty() {
                return;
            }
            let events: Vec<Event> = transitions
                .into_iter()
                .map(|event| event.node(&session.name))
                .collect();
            // The node's full state (a storage read) only for `nodes watch`.
            let state = if changed && self.watched() {
                match self.store.get_node(&handle.node_id) {
                    Ok(Some(record)) => Some(self.state_of(record, &live)),
                    _ => None,
                }
            } else {
                None
            };
            (state, events, changed)
        };
        // Appended outside the sessions' lock, which the engine's
        // observation takes: a session's reports come one at a time, so
        // its events keep their order.
        for event in events {
            self.events.append(event);
        }
        if !changed {
            return;
        }
        self.changed_node(state);
    }

    /// A session of `node_id` attached (here, or on another replica).
    /// On a follower nobody takes the list until it leads, so it is kept
    /// to each node's oldest entry once it holds many repeats.
    fn note_attached(&self, node_id: &str) {
        let mut attached = self
            .attached
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        attached.push(node_id.to_string());
        let bound = 2 * self.total_nodes.load(Ordering::Relaxed) as usize + 1024;
        if attached.len() > bound {
            let mut seen = std::collections::HashSet::new();
            attached.retain(|node| seen.insert(node.clone()));
        }
        drop(attached);
        self.attaches.fetch_add(1, Ordering::Relaxed);
    }

    /// How many sessions were attached so far.
    pub fn attaches(&self) -> u64 {
        self.attaches.load(Ordering::Relaxed)
    }

    /// The nodes whose sessions attached since the last call, oldest first
    /// (a node that attached twice is listed twice).
    pub fn take_attached(&self) -> Vec<String> {
        std::mem::take(
            &mut *self
                .attached
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        )
    }

    /// The live state of `module` on each of `nodes`, from memory under one
    /// lock: no storage reads, so the engine can observe large fleets often.
    /// `view` sees each node's state in place and keeps what it needs, so
    /// nothing is copied that the caller does not use.
    pub fn observe<T>(
        &self,
        nodes: &[&str],
        module: &str,
        mut view: impl FnMut(Observed<'_>) -> T,
    ) -> Vec<T> {
        let mut seen = Vec::with_capacity(nodes.len());
        self.observe_changed(nodes, module, |_, _| false, |_, _, o| seen.push(view(o)));
        seen
    }

    /// As [`Registry::observe`], for a caller that keeps what it saw.
    /// For each node connected here, `unchanged(i, stamp)` is asked first
    /// with the [`Stamp`] of what it would see; when it answers true, the
    /// node is skipped. Every other node is passed to `view(i, stamp,
    /// observed)`, with no stamp for nodes not connected here (connected
    /// to another replica, or not at all): those are always viewed.
    pub fn observe_changed(
        &self,
        nodes: &[&str],
        module: &str,
        mut unchanged: impl FnMut(usize, Stamp) -> bool,
        mut view: impl FnMut(usize, Option<Stamp>, Observed<'_>),
    ) {
        let live = self.lock_live();
        let remote = self.shared.get().map(|_| self.lock_remote());
        for (i, id) in nodes.iter().enumerate() {
            match live.get(*id) {
                Some(session) => {
                    let desired_generation = session.desired.borrow().generation;
                    let stamp = Stamp {
                        session: session.generation,
                        changes: session.changes,
                        desired_generation,
                    };
                    if unchanged(i, stamp) {
                        continue;
                    }
                    view(
                        i,
                        Some(stamp),
                        Observed {
                            connected: true,
                            current: session.agent_desired_generation >= desired_generation,
                            reported: session.reported,
                            module: session.modules.iter().find(|m| m.name == module),
                        },
                    );
                }
                None => match remote.as_ref().and_then(|r| r.get(*id)) {
                    Some(known) => view(
                        i,
                        None,
                        Observed {
                            connected: true,
                            current: known.record.agent_desired_generation
                                >= known.desired_generation,
                            reported: known.record.reported,
                            module: known.modules.iter().find(|m| m.name == module),
                        },
                    ),
                    None => view(i, None, Observed::default()),
                },
            }
        }
    }

    /// Recent reports of a connected node, oldest first. For a node
    /// connected to another replica: the samples its records carried, its
    /// last one extended to now (see [`published::extend_history`]).
    pub fn history(&self, node_id: &str) -> Vec<Sample> {
        let live = self.lock_live();
        if let Some(session) = live.get(node_id) {
            return session.history.iter().cloned().collect();
        }
        let remote = self.lock_remote();
        remote
            .get(node_id)
            .map(|known| published::extend_history(&known.history, now_ms()))
            .unwrap_or_default()
    }

    /// End a session. Only the live session of a node marks it disconnected.
    pub async fn detach(&self, handle: &SessionHandle) {
        let last_seen = {
            let mut live = self.lock_live();
            match live.get(&handle.node_id) {
                Some(session) if session.generation == handle.generation => {
                    let last_seen = session.last_seen_ms;
                    live.remove(&handle.node_id);
                    self.stamp_moved(&handle.node_id);
                    self.queue_removal(&handle.node_id, handle.generation);
                    self.update_gauges(&live);
                    last_seen
                }
                _ => return,
            }
        };
        let written = self
            .store
            .update_node(&handle.node_id, &|record| {
                record.last_seen_ms = Some(last_seen);
                true
            })
            .await;
        let record = match written {
            Ok(record) => Ok(record),
            Err(e) => {
                tracing::warn!(node = %handle.node_id, error = %e, "could not persist last-seen time");
                self.store.get_node(&handle.node_id)
            }
        };
        match record {
            Ok(Some(record)) => {
                let disconnected =
                    Event::new("node.disconnected", format!("{} disconnected", record.name));
                for event in self.within_budget(&handle.node_id, vec![disconnected], true) {
                    self.events.append(event.node(&record.name));
                }
                let state = self
                    .watched()
                    .then(|| self.state_of(record, &self.lock_live()));
                self.changed_node(state);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(node = %handle.node_id, error = %e, "could not read node record")
            }
        }
    }

    /// Remove a node: delete its record (its certificate is refused from now
    /// on) and end its session at once.
    pub async fn remove(&self, query: &str, by: &str) -> Result<NodeState, RegistryError> {
        let state = self.find(query)?;
        let id = state.record.id.clone();
        let Some(removed_record) = self.store.remove_node(&id).await? else {
            return Err(RegistryError::NotFound(query.to_string()));
        };
        self.events.append(
            Event::new(
                "node.removed",
                format!(
                    "{} removed; its certificate is refused",
                    removed_record.name
                ),
            )
            .node(&removed_record.name),
        );
        if !removed_record.token_hash.is_empty() {
            self.store.exhaust_token(&removed_record.token_hash).await?;
        }
        let origin = crate::store::HistoryOrigin::new(crate::clock::steady_now_ms(), "", by);
        self.store.remove_desired_recorded(&id, &origin).await?;
        self.budgets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&id);
        self.total_nodes.fetch_sub(1, Ordering::Relaxed);
        {
            let mut live = self.lock_live();
            if let Some(session) = live.remove(&id) {
                self.stamp_moved(&id);
                session.cancel.cancel();
                self.queue_removal(&id, session.generation);
            }
            self.update_gauges(&live);
        }
        let removed = NodeState {
            connected: false,
            modules: Vec::new(),
            ..state
        };
        self.publish(NodeChange::Removed(removed.clone()));
        Ok(removed)
    }

    /// Whether a node still exists (a cancelled session uses it to tell
    /// "removed" from "replaced").
    pub fn exists(&self, node_id: &str) -> bool {
        matches!(self.store.get_node(node_id), Ok(Some(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hotswap_common::status::{FailureKind, Health, ModuleUsage, Phase};

    #[tokio::test]
    async fn node_changes_wake_the_engine_once_and_build_states_only_for_watchers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db"), 1 << 20).expect("open");
        let (metrics, _) = Metrics::new();
        let events = Arc::new(EventLog::open(&store, 1000).expect("events"));
        let registry = Registry::new(store, events, Arc::new(metrics)).expect("registry");
        let change = |node: &str| (node.to_string(), "web".to_string(), None);
        let quiet = std::time::Duration::from_millis(50);

        // Nobody watching: counted, one wake-up for two changes.
        assert!(!registry.watched());
        registry
            .push_desired(&Written::of(
                vec![change("a"), change("b")],
                vec![DesiredRecord::default(); 2],
            ))
            .expect("push");
        assert_eq!(registry.changes_announced(), 2);
        tokio::time::timeout(quiet, registry.changed())
            .await
            .expect("a change wakes the engine");
        assert!(
            tokio::time::timeout(quiet, registry.changed())
                .await
                .is_err(),
            "changes made while it was awake are one wake-up"
        );

        // With a watcher, states are built from the node records: a node
        // that is not enrolled has none, so nothing is told.
        let mut watcher = registry.subscribe();
        assert!(registry.watched());
        registry
            .push_desired(&Written::of(
                vec![change("a")],
                vec![DesiredRecord::default()],
            ))
            .expect("push");
        assert_eq!(registry.changes_announced(), 2);
        assert!(watcher.try_recv().is_err());
    }

    /// A batch's changes of nodes that are not enrolled (removed while a
    /// deployment ran) are left out and named; the others are written,
    /// with their history naming the node and its environment.
    #[tokio::test]
    async fn desired_writes_skip_and_name_nodes_that_are_not_enrolled() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db"), 1 << 20).expect("open");
        let mut node = NodeRecord::for_tests("n-1", "web-1");
        node.labels.insert("environment".into(), "prod".into());
        store.put_node(&node).await.expect("node");
        let (metrics, _) = Metrics::new();
        let events = Arc::new(EventLog::open(&store, 1000).expect("events"));
        let registry = Registry::new(store.clone(), events, Arc::new(metrics)).expect("registry");
        let set = |node: &str| {
            (
                node.to_string(),
                "web".to_string(),
                Some(DesiredModuleRecord {
                    version: "2.0.0".into(),
                    ..Default::default()
                }),
            )
        };
        let origin = crate::store::HistoryOrigin::new(5, "d-1", "alice");
        let written = registry
            .write_desired(vec![set("gone"), set("n-1"), set("gone-too")], &origin)
            .expect("write");
        assert_eq!(written.missing, ["gone", "gone-too"]);
        assert_eq!(written.len(), 1);
        assert_eq!(
            store.get_desired("gone").expect("desired"),
            DesiredRecord::default()
        );
        assert_eq!(
            store.get_desired("n-1").expect("desired").modules["web"].version,
            "2.0.0"
        );
        let history = store.list_history().expect("history");
        let named: Vec<(&str, &str, &str)> = history
            .iter()
            .map(|r| (r.node_id.as_str(), r.node.as_str(), r.environment.as_str()))
            .collect();
        assert_eq!(named, [("n-1", "web-1", "prod")]);
    }

    /// A batch large enough to be written as one desired run (a wave)
    /// reads back node by node, through the registry and after a restart,
    /// and a later single write of one of its nodes wins over it.
    #[tokio::test]
    async fn a_large_desired_batch_reads_back_node_by_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let nodes: Vec<String> = (0..40).map(|i| format!("n-{i:02}")).collect();
        let set = |node: &str, version: &str| {
            (
                node.to_string(),
                "web".to_string(),
                Some(DesiredModuleRecord {
                    version: version.into(),
                    ..Default::default()
                }),
            )
        };
        // Every node ends on the wave's 3.0.0 but n-07, written singly after.
        let want = |node: &str| if node == "n-07" { "4.0.0" } else { "3.0.0" };
        let origin = crate::store::HistoryOrigin::new(5, "d-1", "alice");
        {
            let store = Store::open(&path, 1 << 20).expect("open");
            for node in &nodes {
                store
                    .put_node(&NodeRecord::for_tests(node, node))
                    .await
                    .expect("node");
            }
            let (metrics, _) = Metrics::new();
            let events = Arc::new(EventLog::open(&store, 1000).expect("events"));
            let registry =
                Registry::new(store.clone(), events, Arc::new(metrics)).expect("registry");
            let changes: Vec<DesiredChange> = nodes.iter().map(|n| set(n, "2.0.0")).collect();
            registry
                .set_desired_modules(&changes, &origin)
                .await
                .expect("set");
            let written = registry
                .write_desired(nodes.iter().map(|n| set(n, "3.0.0")).collect(), &origin)
                .expect("write");
            store.flush().await.expect("flush");
            registry.push_desired(&written).expect("push");
            registry
                .set_desired_module("n-07", "web", set("n-07", "4.0.0").2, &origin)
                .await
                .expect("single");
            for node in &nodes {
                assert_eq!(
                    registry.desired_of(node).expect("desired").modules["web"].version,
                    want(node),
                    "{node}"
                );
            }
        }
        let store = crate::store::reopen_for_tests(&path).await;
        for node in &nodes {
            assert_eq!(
                store.get_desired(node).expect("desired").modules["web"].version,
                want(node),
                "{node} after a restart"
            );
        }
        assert_eq!(store.list_history().expect("history").len(), 81);
    }

    fn module() -> ModuleState {
        ModuleState {
            name: "web".into(),
            version: "1.0.0".into(),
            phase: Phase::Running,
            health: Health::Healthy,
            message: String::new(),
            staged_version: String::new(),
            previous_version: "0.9.0".into(),
            restarts: 0,
            crash_loop: false,
            metrics: None,
            settling: Vec::new(),
            failure_kind: None,
            usage: None,
        }
    }

    #[test]
    fn a_report_that_only_moves_metrics_is_not_a_change() {
        let base = module();
        let mut metrics_only = module();
        metrics_only.metrics = Some(MetricsWindow {
            request_rate: 10.0,
            error_rate: 0.5,
            latency_p99_seconds: Some(0.2),
        });
        metrics_only.usage = Some(ModuleUsage {
            cpu_percent: 40.0,
            memory_resident_bytes: 1 << 20,
        });
        assert!(base.same_but_metrics(&metrics_only));
        assert!(metrics_only.same_but_metrics(&base));

        type Edit = fn(&mut ModuleState);
        let edits: [(&str, Edit); 11] = [
            ("name", |m| m.name.push('x')),
            ("version", |m| m.version = "1.0.1".into()),
            ("phase", |m| m.phase = Phase::Stopping),
            ("health", |m| m.health = Health::Unhealthy),
            ("message", |m| m.message = "probe failed".into()),
            ("staged", |m| m.staged_version = "2.0.0".into()),
            ("previous", |m| m.previous_version.clear()),
            ("restarts", |m| m.restarts += 1),
            ("crash loop", |m| m.crash_loop = true),
            ("settling", |m| m.settling = vec!["1.1.0".into()]),
            ("failure kind", |m| {
                m.failure_kind = Some(FailureKind::Infrastructure)
            }),
        ];
        for (field, edit) in edits {
            let mut other = module();
            edit(&mut other);
            assert!(!base.same_but_metrics(&other), "{field} is a change");
            assert!(!other.same_but_metrics(&base), "{field} is a change");
        }
    }
}
