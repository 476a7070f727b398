//! Sessions on every replica (SPEC §7, etcd only): this replica publishes
//! the sessions it holds ([`Registry::run_publisher`], records of
//! [`super::published`] under its lease), follows what the others publish
//! ([`Registry::follow_remote`]) into a view of the nodes connected
//! elsewhere, and hands the sessions it holds the desired states any
//! replica commits ([`Registry::follow_desired`]). The embedded store never
//! starts any of it: there the registry is exactly what it was.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::history::{HISTORY_LEN, Sample};
use super::published::{ModuleRecord, SessionRecord, UsageRecord};
use super::{LiveSession, ModuleState, NodeChange, NodeUsage, Registry};
use crate::store::{SessionRecords, WatchError};

/// How often queued session records are written: changes within one
/// interval (the phases of one swap, many nodes' reports) share one
/// transaction per 120 nodes, and a node's later record replaces its
/// earlier one.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);

/// What this replica shares with the others.
pub(super) struct Shared {
    /// `run --name`: this replica's records say so, and readers skip them.
    pub replica: String,
    pub store: Arc<dyn SessionRecords>,
    /// The newest write per node not yet committed (later ones replace
    /// earlier ones).
    outbox: std::sync::Mutex<HashMap<String, Outgoing>>,
}

/// A queued write of one node's record.
#[derive(Clone, Debug)]
enum Outgoing {
    Put { session: u64, bytes: Vec<u8> },
    Remove { session: u64 },
}

/// A node whose session another replica holds, as its records say.
pub(super) struct RemoteSession {
    pub record: SessionRecord,
    pub modules: Vec<ModuleState>,
    pub usage: Option<NodeUsage>,
    /// The samples its records carried, oldest first.
    pub history: VecDeque<Sample>,
    /// The node's desired generation as this replica last saw it stored.
    pub desired_generation: u64,
}

impl Shared {
    pub(super) fn new(replica: String, store: Arc<dyn SessionRecords>) -> Self {
        Self {
            replica,
            store,
            outbox: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, HashMap<String, Outgoing>> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Registry {
    /// Share sessions with the other replicas through `store` (etcd), as
    /// replica `replica`, and start the tasks that do it; they end with
    /// `shutdown`. Once per registry; the embedded mode never calls it.
    pub fn share_sessions(
        self: &Arc<Self>,
        replica: String,
        store: Arc<dyn SessionRecords>,
        shutdown: CancellationToken,
    ) {
        if self.shared.set(Shared::new(replica, store)).is_err() {
            return;
        }
        let tasks = [
            (
                "session publisher",
                tokio::spawn(self.clone().run_publisher(shutdown.clone())),
            ),
            (
                "remote sessions",
                tokio::spawn(self.clone().follow_remote(shutdown.clone())),
            ),
            (
                "desired-state follower",
                tokio::spawn(self.clone().follow_desired(shutdown)),
            ),
        ];
        for (name, task) in tasks {
            tokio::spawn(async move {
                if let Err(e) = task.await
                    && e.is_panic()
                {
                    tracing::error!(task = name, "session sharing task panicked");
                }
            });
        }
    }

    /// Queue the record of a live session (under the `live` lock).
    pub(super) fn queue_record(&self, node_id: &str, session: &LiveSession, samples: &[Sample]) {
        let Some(shared) = self.shared.get() else {
            return;
        };
        let record = SessionRecord {
            replica: shared.replica.clone(),
            session: session.generation,
            connected_at_ms: session.connected_at_ms,
            last_seen_ms: session.last_seen_ms,
            reported: session.reported,
            observed_generation: session.observed_generation,
            agent_desired_generation: session.agent_desired_generation,
            modules: session.modules.iter().map(ModuleRecord::from).collect(),
            usage: session.usage.as_ref().map(UsageRecord::from),
            samples: samples.iter().map(Into::into).collect(),
        };
        shared.outbox().insert(
            node_id.to_string(),
            Outgoing::Put {
                session: session.generation,
                bytes: record.encode(),
            },
        );
    }

    /// Queue the removal of a session's record: it ended here.
    pub(super) fn queue_removal(&self, node_id: &str, session: u64) {
        if let Some(shared) = self.shared.get() {
            shared
                .outbox()
                .insert(node_id.to_string(), Outgoing::Remove { session });
        }
    }

    /// Write queued records every [`PUBLISH_EVERY`]. Removals delete only
    /// the record this replica wrote (by its revision): a node that
    /// reconnected to another replica keeps that one's record.
    async fn run_publisher(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(shared) = self.shared.get() else {
            return;
        };
        // node -> (session, revision) of the record of ours etcd holds.
        let mut written: HashMap<String, (u64, i64)> = HashMap::new();
        let mut failures = 0u32;
        loop {
            let pause = PUBLISH_EVERY * 2u32.pow(failures.min(3));
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = shutdown.cancelled() => return,
            }
            let queued = std::mem::take(&mut *shared.outbox());
            if queued.is_empty() {
                continue;
            }
            let mut puts = Vec::new();
            let mut sessions = HashMap::new();
            let mut removals = Vec::new();
            for (node, outgoing) in &queued {
                match outgoing {
                    Outgoing::Put { session, bytes } => {
                        sessions.insert(node.clone(), *session);
                        puts.push((node.clone(), bytes.clone()));
                    }
                    Outgoing::Remove { session } => removals.push((node.clone(), *session)),
                }
            }
            let mut failed = false;
            match shared.store.put_sessions(puts).await {
                Ok(done) => {
                    self.metrics
                        .session_records_written
                        .inc_by(done.len() as u64);
                    for (node, revision) in done {
                        if let Some(session) = sessions.get(&node) {
                            written.insert(node, (*session, revision));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not publish session records; retrying");
                    failed = true;
                }
            }
            for (node, session) in removals {
                let Some((held, revision)) = written.get(&node).copied() else {
                    continue;
                };
                if held != session {
                    // A later session of ours wrote it: not this one's.
                    continue;
                }
                match shared.store.remove_session(&node, revision).await {
                    Ok(_) => {
                        written.remove(&node);
                    }
                    Err(e) => {
                        tracing::warn!(node = %node, error = %e, "could not remove a session record; retrying");
                        failed = true;
                        shared
                            .outbox()
                            .entry(node)
                            .or_insert(Outgoing::Remove { session });
                    }
                }
            }
            if failed {
                // Put back what nothing newer replaced meanwhile.
                let mut outbox = shared.outbox();
                for (node, outgoing) in queued {
                    if matches!(outgoing, Outgoing::Put { .. }) {
                        outbox.entry(node).or_insert(outgoing);
                    }
                }
                failures += 1;
            } else {
                failures = 0;
            }
        }
    }

    /// Keep the view of remote sessions current: list what is published,
    /// then follow changes; list again when behind.
    async fn follow_remote(self: Arc<Self>, shutdown: CancellationToken) {
        let Some(shared) = self.shared.get() else {
            return;
        };
        loop {
            // Subscribe first, then list: nothing falls in between (a
            // change in both is applied twice, which changes nothing).
            let mut changes = shared.store.watch_sessions();
            let listed = shared.store.list_sessions();
            self.relist_remote(listed);
            loop {
                let change = tokio::select! {
                    change = changes.recv() => change,
                    _ = shutdown.cancelled() => return,
                };
                match change {
                    Ok(update) => self.apply_remote(&update.node_id, update.record.as_deref()),
                    Err(RecvError::Lagged(missed)) => {
                        tracing::warn!(
                            missed,
                            "fell behind the published sessions; listing them again"
                        );
                        break;
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        }
    }

    /// Replace the remote view with `listed`.
    fn relist_remote(&self, listed: Vec<(String, Vec<u8>)>) {
        let present: std::collections::HashSet<&str> =
            listed.iter().map(|(node, _)| node.as_str()).collect();
        let gone: Vec<String> = self
            .lock_remote()
            .keys()
            .filter(|node| !present.contains(node.as_str()))
            .cloned()
            .collect();
        for node in gone {
            self.apply_remote(&node, None);
        }
        for (node, bytes) in &listed {
            self.apply_remote(node, Some(bytes));
        }
    }

    /// One published record changed (`None`: deleted).
    fn apply_remote(&self, node_id: &str, bytes: Option<&[u8]>) {
        let Some(shared) = self.shared.get() else {
            return;
        };
        let record = match bytes.map(SessionRecord::decode) {
            None => None,
            Some(Ok(record)) => Some(record),
            Some(Err(e)) => {
                tracing::warn!(node = %node_id, error = %e, "skipping an unreadable session record");
                return;
            }
        };
        // Our own records (also those of this replica before a restart in
        // place) describe nothing remote: the live map is the truth here.
        let ours = record.as_ref().is_some_and(|r| r.replica == shared.replica);
        if !ours {
            self.defend_record(node_id, record.as_ref());
        }
        let record = record.filter(|_| !ours);
        let mut attached = false;
        let changed = {
            let mut remote = self.lock_remote();
            match record {
                None => remote.remove(node_id).is_some(),
                Some(record) => {
                    let same_session = remote.get(node_id).is_some_and(|known| {
                        known.record.replica == record.replica
                            && known.record.session == record.session
                    });
                    if !same_session {
                        attached = true;
                        let desired_generation = self
                            .store
                            .get_desired(node_id)
                            .map(|d| d.generation)
                            .unwrap_or_default();
                        remote.insert(
                            node_id.to_string(),
                            RemoteSession {
                                record: record.clone(),
                                modules: Vec::new(),
                                usage: None,
                                history: VecDeque::with_capacity(HISTORY_LEN),
                                desired_generation,
                            },
                        );
                    }
                    match remote.get_mut(node_id) {
                        Some(known) => {
                            let newest = known.history.back().map_or(0, |s| s.at_ms);
                            for sample in record.samples.iter().filter(|s| s.at_ms > newest) {
                                if known.history.len() == HISTORY_LEN {
                                    known.history.pop_front();
                                }
                                known.history.push_back(Sample::from(sample));
                            }
                            known.modules = record.modules.iter().map(ModuleState::from).collect();
                            known.usage = record.usage.as_ref().map(NodeUsage::from);
                            known.record = record;
                            true
                        }
                        None => false,
                    }
                }
            }
        };
        if attached {
            // Catch-up looks at nodes that attached anywhere (the leader's
            // engine reads this), once they reported.
            self.note_attached(node_id);
        }
        if !changed {
            return;
        }
        let state = if self.watched() {
            match self.store.get_node(node_id) {
                Ok(Some(record)) => Some(self.state_of(record, &self.lock_live())),
                _ => None,
            }
        } else {
            None
        };
        match state {
            Some(state) => self.publish(NodeChange::Changed(state)),
            None => self.announce(1),
        }
    }

    /// A node held here got another replica's record, or its record was
    /// deleted: an older session elsewhere (the agent moved here before
    /// that replica noticed) wrote or removed it last. The newer session
    /// writes its record again, so every replica sees where the node is.
    fn defend_record(&self, node_id: &str, record: Option<&SessionRecord>) {
        let live = self.lock_live();
        if let Some(session) = live.get(node_id)
            && record.is_none_or(|r| session.connected_at_ms >= r.connected_at_ms)
        {
            self.queue_record(node_id, session, &[]);
        }
    }

    /// Hand the sessions held here every desired state any replica
    /// commits, in revision order, resuming from the last revision seen;
    /// after a lag, the current desired state of every node held here.
    /// A generation a session already has is not sent again.
    async fn follow_desired(self: Arc<Self>, shutdown: CancellationToken) {
        let mut after = self.store.desired_revision().unwrap_or_default();
        loop {
            let mut watch = match self.store.watch_desired(after) {
                Ok(watch) => watch,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot follow desired states; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        _ = shutdown.cancelled() => return,
                    }
                }
            };
            loop {
                let next = tokio::select! {
                    next = watch.next() => next,
                    _ = shutdown.cancelled() => return,
                };
                match next {
                    Ok(update) => {
                        after = after.max(update.revision);
                        match update.record {
                            Some(record) => self.desired_committed(&update.node_id, &record),
                            None => self.desired_removed(&update.node_id),
                        }
                    }
                    Err(WatchError::Lagged(seen)) => {
                        tracing::warn!(
                            revision = seen,
                            "fell behind desired-state changes; handing every session held here its current one"
                        );
                        // Watch from now first, then re-list: what changes
                        // after comes through the new watch.
                        after = self.store.desired_revision().unwrap_or(seen);
                        self.relist_desired();
                        break;
                    }
                    Err(WatchError::Closed) => return,
                }
            }
        }
    }

    /// A desired state committed by any replica.
    fn desired_committed(&self, node_id: &str, record: &crate::store::DesiredRecord) {
        let live = self.lock_live();
        if let Some(session) = live.get(node_id) {
            if hand_over(session, record) {
                self.stamp_moved(node_id);
            }
            return;
        }
        drop(live);
        if let Some(known) = self.lock_remote().get_mut(node_id) {
            known.desired_generation = known.desired_generation.max(record.generation);
        }
    }

    /// A node's desired state was deleted: it was removed (perhaps through
    /// another replica). Its session here ends.
    fn desired_removed(&self, node_id: &str) {
        if self.exists(node_id) {
            return;
        }
        let live = self.lock_live();
        if let Some(session) = live.get(node_id) {
            session.cancel.cancel();
        }
    }

    /// Every session held here gets its node's current desired state.
    fn relist_desired(&self) {
        let live = self.lock_live();
        for (node_id, session) in live.iter() {
            match self.store.get_desired(node_id) {
                Ok(record) => {
                    if hand_over(session, &record) {
                        self.stamp_moved(node_id);
                    }
                }
                Err(e) => {
                    tracing::warn!(node = %node_id, error = %e, "cannot read a desired state")
                }
            }
        }
    }
}

/// Give a live session `record` unless it has that generation or a newer
/// one already: the same change may come from this replica's own write and
/// from the watch, in either order. True when it was handed over (the
/// session's [`Stamp`](super::Stamp) moved).
pub(super) fn hand_over(session: &LiveSession, record: &crate::store::DesiredRecord) -> bool {
    session.desired.send_if_modified(|current| {
        if record.generation <= current.generation {
            return false;
        }
        *current = record.clone();
        true
    })
}

#[cfg(test)]
mod tests {
    use super::super::published::{ModuleRecord, SampleRecord, SessionRecord};
    use super::*;
    use crate::events::EventLog;
    use crate::metrics::Metrics;
    use crate::store::{DesiredModuleRecord, NodeRecord, SessionUpdate, Store, StoreError};
    use hotswap_common::status::{Health, Phase};

    /// Session records of "other replicas", fed by the test.
    struct FakeSessions {
        changes: tokio::sync::broadcast::Sender<SessionUpdate>,
    }

    #[async_trait::async_trait]
    impl SessionRecords for FakeSessions {
        async fn put_sessions(
            &self,
            records: Vec<(String, Vec<u8>)>,
        ) -> Result<Vec<(String, i64)>, StoreError> {
            Ok(records.into_iter().map(|(node, _)| (node, 1)).collect())
        }
        async fn remove_session(&self, _: &str, _: i64) -> Result<bool, StoreError> {
            Ok(true)
        }
        fn list_sessions(&self) -> Vec<(String, Vec<u8>)> {
            Vec::new()
        }
        fn watch_sessions(&self) -> tokio::sync::broadcast::Receiver<SessionUpdate> {
            self.changes.subscribe()
        }
    }

    fn node(id: &str) -> NodeRecord {
        NodeRecord {
            id: id.into(),
            name: format!("name-{id}"),
            labels: Default::default(),
            forced_labels: Default::default(),
            enrolled_at_ms: 1,
            cert_fingerprint: "sha256:x".into(),
            cert_not_after_ms: u64::MAX,
            last_seen_ms: None,
            agent_version: "0.1.0".into(),
            previous_cert_fingerprint: None,
            previous_cert_not_after_ms: 0,
            token_hash: String::new(),
            enroll_key: String::new(),
        }
    }

    fn record(replica: &str, at_ms: u64, agent_desired_generation: u64) -> SessionRecord {
        SessionRecord {
            replica: replica.into(),
            session: 1,
            connected_at_ms: 1,
            last_seen_ms: at_ms,
            reported: true,
            observed_generation: agent_desired_generation,
            agent_desired_generation,
            modules: vec![ModuleRecord::from(&ModuleState {
                name: "web".into(),
                version: "1.0.0".into(),
                phase: Phase::Running,
                health: Health::Healthy,
                ..ModuleState::default()
            })],
            usage: None,
            samples: vec![SampleRecord {
                at_ms,
                modules: Vec::new(),
            }],
        }
    }

    async fn settled(what: &str, check: impl Fn() -> bool) {
        for _ in 0..200 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("timed out waiting for {what}");
    }

    #[tokio::test]
    async fn nodes_held_elsewhere_are_seen_from_their_records() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db"), 1 << 20).expect("open");
        store.put_node(&node("n2")).await.expect("node");
        let (metrics, _) = Metrics::new();
        let events = Arc::new(EventLog::open(&store, 1000).expect("events"));
        let registry = Registry::new(store, events, Arc::new(metrics)).expect("registry");
        let (changes, _) = tokio::sync::broadcast::channel(64);
        let shutdown = CancellationToken::new();
        registry.share_sessions(
            "cp-a".into(),
            Arc::new(FakeSessions {
                changes: changes.clone(),
            }),
            shutdown.clone(),
        );
        let send = |node: &str, record: Option<&SessionRecord>| {
            let _ = changes.send(SessionUpdate {
                node_id: node.into(),
                record: record.map(SessionRecord::encode),
            });
        };
        let observe = |registry: &Registry| {
            registry.observe(&["n2"], "web", |o| {
                (o.connected, o.current, o.module.map(|m| m.version.clone()))
            })[0]
                .clone()
        };
        settled("the follower subscribed", || changes.receiver_count() > 0).await;

        // A record under this replica's own name describes nothing remote.
        let t0 = hotswap_common::timefmt::now_ms();
        send("n2", Some(&record("cp-a", t0, 0)));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(observe(&registry), (false, false, None));

        // Another replica's record: connected, its modules, current.
        send("n2", Some(&record("cp-b", t0, 0)));
        settled("the remote record applied", || observe(&registry).0).await;
        assert_eq!(observe(&registry), (true, true, Some("1.0.0".to_string())));
        let listed = registry.list(None).expect("list");
        assert!(listed[0].connected);
        assert_eq!(listed[0].modules.len(), 1);
        assert_eq!(registry.take_attached(), vec!["n2".to_string()]);

        // This replica writes a new desired state: the node's last report
        // does not answer it until its agent says it has it.
        let want = DesiredModuleRecord {
            version: "2.0.0".into(),
            ..DesiredModuleRecord::default()
        };
        registry
            .set_desired_module(
                "n2",
                "web",
                Some(want),
                &crate::store::HistoryOrigin::default(),
            )
            .await
            .expect("desired");
        assert_eq!(observe(&registry), (true, false, Some("1.0.0".to_string())));
        send("n2", Some(&record("cp-b", t0 + 1, 1)));
        settled("the new report applied", || observe(&registry).1).await;
        // The same session: history grows, no second attach.
        assert!(registry.take_attached().is_empty());
        let history = registry.history("n2");
        let times: Vec<u64> = history.iter().map(|s| s.at_ms).collect();
        assert_eq!(times.get(..2), Some(&[t0, t0 + 1][..]));

        // The record goes (session ended, or its replica's lease expired).
        send("n2", None);
        settled("the record removed", || !observe(&registry).0).await;
        assert!(!registry.list(None).expect("list")[0].connected);
        assert!(registry.history("n2").is_empty());
        shutdown.cancel();
    }
}
