//! The storage port: what the control plane keeps and the operations it
//! needs on it, as traits of our own, so no code outside this module knows
//! which database holds the records. [`sled`] (embedded, one process, the
//! default) is the first backend; a replicated one implements the same
//! traits.
//!
//! The shape follows what a replicated key-value store offers:
//! - reads are synchronous and answer from the backend's local state (sled's
//!   pages here; a replicated backend answers from a mirror kept current by a
//!   watch, consistent to its revision);
//! - every multi-record change is one atomic operation (enrollment spends a
//!   token and creates a node and its name together), and read-modify-write
//!   changes take a closure the backend applies with compare-and-swap,
//!   retrying it on a concurrent write;
//! - writes a caller acknowledges are made durable first ([`Durability::flush`],
//!   a group commit), and batches write unflushed and flush once;
//! - desired states carry a store-wide revision, and
//!   [`DesiredRecords::watch_desired`] follows their changes from any
//!   revision, so whoever holds a node's session can catch up on what it
//!   missed;
//! - the event log and the audit chain are sequence logs ([`SeqLog`]):
//!   records under strictly increasing sequence numbers, read forwards or
//!   backwards from a sequence number, trimmed from the front.
//!
//! Record types live in [`records`]; the formats of events and audit records
//! belong to their own modules, which store them as bytes.

pub mod etcd;
pub mod history;
pub mod keys;
pub mod mirror;
mod records;
pub mod sled;
pub mod split;
mod webhooks;

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub use self::history::{HistoryOrigin, HistoryRecord, HistoryTrimmed};
pub use self::sled::SledStore;
pub use records::*;
pub use webhooks::{WebhookCursor, WebhookRecord, WebhookRecords};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A local I/O error of the backend (a full disk, a failing device): an
    /// outage the operator fixes and the caller retries after.
    #[error("storage I/O error: {0}")]
    Io(String),
    /// Any other error the backend reports.
    #[error("{0}")]
    Backend(String),
    /// The database hit an I/O error earlier (see [`Durability::failure`]).
    #[error(
        "control plane storage failed ({0}); changes are refused until the control plane restarts, which it does by itself once its data directory has room again"
    )]
    Failed(String),
    /// The database's directory or main file is no longer the one opened
    /// (deleted, moved or replaced while running); see [`Failure::Replaced`].
    #[error(
        "control plane storage failed: {0}; changes are refused and nothing more is acknowledged: stop the control plane and restore its data directory from a backup"
    )]
    Replaced(String),
    #[error("record {key:?} in {tree} is corrupt: {reason}")]
    Corrupt {
        tree: &'static str,
        key: String,
        reason: String,
    },
}

/// Why the database can take no more writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// A write hit an I/O error (a full disk, a failing device), with the
    /// OS's reason. Reopening the database recovers everything flushed, so
    /// the control plane restarts once its data directory has room.
    Io(String),
    /// The database directory or its main file is not the one opened: it
    /// was deleted, moved or replaced under the running process. sled still
    /// writes into the files it holds open, so writes would "succeed" into
    /// files nobody can open again; a restart would not help either.
    Replaced(String),
}

impl Failure {
    /// Whether reopening the database, once there is room, recovers.
    pub fn recovers_on_restart(&self) -> bool {
        matches!(self, Failure::Io(_))
    }

    fn error(&self) -> StoreError {
        match self {
            Failure::Io(reason) => StoreError::Failed(reason.clone()),
            Failure::Replaced(reason) => StoreError::Replaced(reason.clone()),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Io(reason) | Failure::Replaced(reason) => f.write_str(reason),
        }
    }
}

/// A store-wide revision of desired states: every desired-state write gets
/// the next one, so "everything after revision r" is well defined.
pub type Revision = u64;

/// One desired-state change as a watch delivers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredUpdate {
    pub node_id: String,
    /// `None` when the node's desired state was removed.
    pub record: Option<DesiredRecord>,
    pub revision: Revision,
}

/// A change function for read-modify-write updates: it may run more than
/// once (a backend retries it on a concurrent write) and returns false for
/// "no change".
pub type Change<'a, T> = &'a (dyn Fn(&mut T) -> bool + Send + Sync);

/// Durability and health of the storage.
#[async_trait]
pub trait Durability: Send + Sync {
    /// Make every write so far durable (group commit: concurrent callers
    /// share one flush).
    async fn flush(&self) -> Result<(), StoreError>;
    /// Make every write so far durable, from synchronous code (`init`).
    fn flush_blocking(&self) -> Result<(), StoreError>;
    /// Bring this process's view up to every change acknowledged anywhere
    /// before the call: a replicated backend catches its copy up with the
    /// cluster; the embedded one is the only writer and current already.
    async fn catch_up(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Why the storage takes no more writes, once it failed.
    fn failure(&self) -> Option<Failure>;
    /// Refuse a change up front once the storage has failed, so it is not
    /// half applied in memory and then lost.
    fn ensure_writable(&self) -> Result<(), StoreError> {
        match self.failure() {
            Some(failure) => Err(failure.error()),
            None => Ok(()),
        }
    }
    /// Check that the database is still the one opened (not deleted or
    /// replaced under the process); marks the storage failed if not.
    fn check_identity(&self) -> Result<(), StoreError>;
    /// Bytes the database occupies on disk (0 when not local).
    fn size_on_disk(&self) -> u64;
}

/// Join tokens, nodes and the node-name index.
#[async_trait]
pub trait NodeRecords: Send + Sync {
    async fn insert_token(&self, hash: &str, record: &TokenRecord) -> Result<(), StoreError>;
    fn get_token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Consume one use of the token and create the node with its name,
    /// atomically: all of it or none. Token labels override the node's own.
    /// When the name belongs to a node this enrollment retries (the same
    /// token and key, never connected: see [`NodeRecord::is_retried_by`]),
    /// returns that node as stored and spends nothing: its id differs from
    /// `node`'s, which tells the caller it answers a retry.
    async fn enroll(
        &self,
        token_hash: &str,
        now_ms: u64,
        node: NodeRecord,
    ) -> Result<NodeRecord, EnrollError>;
    fn get_node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError>;
    /// Whether a node record exists (no decoding).
    fn has_node(&self, id: &str) -> Result<bool, StoreError>;
    fn node_id_by_name(&self, name: &str) -> Result<Option<String>, StoreError>;
    fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// Overwrite a node record (labels, last seen, agent version). The name
    /// index is unchanged: names are fixed at enrollment.
    async fn put_node(&self, record: &NodeRecord) -> Result<(), StoreError>;
    /// Change a node record where it stands, guarded against other writers
    /// (another replica's session of the node, a removal): `change` may run
    /// more than once, on the record as it is then, and says whether it
    /// changed anything. `None` when the node does not exist: a removed node
    /// is never written back. The name index is unchanged.
    async fn update_node(
        &self,
        id: &str,
        change: Change<'_, NodeRecord>,
    ) -> Result<Option<NodeRecord>, StoreError>;
    /// Spend whatever uses a join token has left (a removed node must not
    /// come back with the token it enrolled with).
    async fn exhaust_token(&self, hash: &str) -> Result<(), StoreError>;
    /// Delete a node and its name, atomically; returns the record if it
    /// existed.
    async fn remove_node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError>;
}

/// Operators.
#[async_trait]
pub trait UserRecords: Send + Sync {
    fn get_user(&self, name: &str) -> Result<Option<UserRecord>, StoreError>;
    fn list_users(&self) -> Result<Vec<UserRecord>, StoreError>;
    async fn put_user(&self, record: &UserRecord) -> Result<(), StoreError>;
    /// Write a user and flush, from synchronous code (`init`).
    fn put_user_blocking(&self, record: &UserRecord) -> Result<(), StoreError>;
    /// Create a user unless the name is taken; false if it was.
    async fn create_user(&self, record: &UserRecord) -> Result<bool, StoreError>;
}

/// Publisher keys and artifact records (the content is a blob).
#[async_trait]
pub trait ArtifactRecords: Send + Sync {
    fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError>;
    fn get_key(&self, name: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// Insert a key if its name is free; the existing record otherwise.
    async fn insert_key(&self, record: &KeyRecord) -> Result<Option<KeyRecord>, StoreError>;
    async fn put_key(&self, record: &KeyRecord) -> Result<(), StoreError>;
    fn get_artifact(&self, name: &str, version: &str)
    -> Result<Option<ArtifactRecord>, StoreError>;
    /// Every version of one module, in key order.
    fn module_versions(&self, name: &str) -> Result<Vec<ArtifactRecord>, StoreError>;
    fn list_artifacts(&self) -> Result<Vec<ArtifactRecord>, StoreError>;
    /// Whether any stored artifact has this digest.
    fn has_digest(&self, digest: &str) -> Result<bool, StoreError> {
        Ok(self.list_artifacts()?.iter().any(|a| a.digest == digest))
    }
    /// Store an artifact record unless `name@version` exists; the existing
    /// record when it does (the caller decides what that means).
    async fn insert_artifact(
        &self,
        record: &ArtifactRecord,
    ) -> Result<Option<ArtifactRecord>, StoreError>;
    /// Change a stored artifact record with compare-and-swap, and flush.
    /// `None` when `name@version` is not stored; otherwise the record as
    /// stored after the change.
    async fn update_artifact(
        &self,
        name: &str,
        version: &str,
        change: Change<'_, ArtifactRecord>,
    ) -> Result<Option<ArtifactRecord>, StoreError>;
}

/// The desired state of every node, with a store-wide revision.
#[async_trait]
pub trait DesiredRecords: Send + Sync {
    /// A node's desired state (empty, generation 0, when it has none).
    fn get_desired(&self, node_id: &str) -> Result<DesiredRecord, StoreError>;
    /// Apply `change` to a node's desired state, bump its generation and
    /// give it the next revision, atomically, and flush; returns the new
    /// record. A "no change" leaves the record untouched.
    async fn update_desired(
        &self,
        node_id: &str,
        change: Change<'_, DesiredRecord>,
    ) -> Result<DesiredRecord, StoreError> {
        let record = self.update_desired_unflushed(node_id, change)?;
        self.flush_desired().await?;
        Ok(record)
    }
    /// As [`DesiredRecords::update_desired`] without the flush: callers that
    /// change many nodes flush once, before acknowledging any of them.
    /// The history names no deployment or user for it.
    fn update_desired_unflushed(
        &self,
        node_id: &str,
        change: Change<'_, DesiredRecord>,
    ) -> Result<DesiredRecord, StoreError> {
        let origin = HistoryOrigin::new(crate::clock::steady_now_ms(), "", "");
        self.update_desired_recorded(node_id, change, &origin)
    }
    /// As [`DesiredRecords::update_desired_unflushed`], and record the
    /// change in the history with `origin`, in the same transaction as the
    /// desired state (a write that changes no version records nothing).
    fn update_desired_recorded(
        &self,
        node_id: &str,
        change: Change<'_, DesiredRecord>,
        origin: &HistoryOrigin,
    ) -> Result<DesiredRecord, StoreError>;
    async fn remove_desired(&self, node_id: &str) -> Result<(), StoreError> {
        let origin = HistoryOrigin::new(crate::clock::steady_now_ms(), "", "");
        self.remove_desired_recorded(node_id, &origin).await
    }
    /// Remove a node's desired state, recording the removal in the history
    /// in the same transaction, and flush.
    async fn remove_desired_recorded(
        &self,
        node_id: &str,
        origin: &HistoryOrigin,
    ) -> Result<(), StoreError>;
    /// Every history record kept, committed ones only, in (seq, node,
    /// generation) order.
    fn list_history(&self) -> Result<Vec<HistoryRecord>, StoreError>;
    /// Remove the history records older than `before_ms`, note the trim
    /// ([`DesiredRecords::history_trimmed`]) and flush; returns how many
    /// were removed.
    async fn trim_history(&self, before_ms: u64) -> Result<u64, StoreError>;
    /// Where history was last trimmed: nothing at or before it is kept.
    fn history_trimmed(&self) -> Result<Option<HistoryTrimmed>, StoreError>;
    /// Make desired-state writes durable.
    async fn flush_desired(&self) -> Result<(), StoreError>;
    /// The revision of the newest desired-state write.
    fn desired_revision(&self) -> Result<Revision, StoreError>;
    /// Every desired state written after revision `after`, in revision
    /// order (node order within one revision), then every later change as it happens: the stream never
    /// misses a change made after `after`. A removal made before the watch
    /// started is not replayed (the record is gone); callers that need
    /// removals re-list.
    fn watch_desired(&self, after: Revision) -> Result<DesiredWatch, StoreError>;
}

/// A stream of desired-state changes (see [`DesiredRecords::watch_desired`]).
pub struct DesiredWatch {
    /// Changes that happened before the watch started, oldest first.
    backlog: std::collections::VecDeque<DesiredUpdate>,
    live: tokio::sync::broadcast::Receiver<DesiredUpdate>,
    /// The position of the last change delivered: its revision and node
    /// (one revision may change many nodes, delivered in node order).
    seen: (Revision, String),
}

/// Why a watch stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WatchError {
    /// The watcher fell too far behind the live changes; re-list from the
    /// revision it saw and watch again.
    #[error("desired-state watch fell behind after revision {0}; re-list and watch again")]
    Lagged(Revision),
    /// The store is closed.
    #[error("desired-state watch closed")]
    Closed,
}

impl DesiredWatch {
    pub fn new(
        backlog: Vec<DesiredUpdate>,
        live: tokio::sync::broadcast::Receiver<DesiredUpdate>,
        after: Revision,
    ) -> Self {
        Self {
            backlog: backlog.into(),
            live,
            seen: (after, String::new()),
        }
    }

    /// The next change, in revision order.
    pub async fn next(&mut self) -> Result<DesiredUpdate, WatchError> {
        loop {
            let change = match self.backlog.pop_front() {
                Some(change) => change,
                None => match self.live.recv().await {
                    Ok(change) => change,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        return Err(WatchError::Lagged(self.seen.0));
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        return Err(WatchError::Closed);
                    }
                },
            };
            // The live channel was subscribed before the backlog was read,
            // so it repeats what the backlog held: skip what was delivered.
            let position = (change.revision, change.node_id.as_str());
            if position > (self.seen.0, self.seen.1.as_str()) {
                self.seen = (change.revision, change.node_id.clone());
                return Ok(change);
            }
        }
    }
}

/// One change of a published session record, as the store saw it commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionUpdate {
    pub node_id: String,
    /// The record's bytes; `None` when it was deleted (its session ended,
    /// or its replica's lease expired).
    pub record: Option<Vec<u8>>,
}

/// The agent sessions replicas publish so that every replica sees every
/// node's live state (a replicated backend only; the embedded store has
/// one process, which holds every session). Each replica writes the
/// records of the sessions it holds under a lease of its own, so they
/// vanish with it. The registry owns the records' format; the store keeps
/// bytes.
#[async_trait]
pub trait SessionRecords: Send + Sync {
    /// Write these records (node id, bytes) under this replica's lease, in
    /// as few transactions as allowed; returns each node with the revision
    /// its record was written at. Unfenced: a follower holds sessions too.
    async fn put_sessions(
        &self,
        records: Vec<(String, Vec<u8>)>,
    ) -> Result<Vec<(String, i64)>, StoreError>;
    /// Delete a node's record if it is still the one written at
    /// `revision`; false when another replica's record replaced it since
    /// (the node reconnected there), which then stays.
    async fn remove_session(&self, node_id: &str, revision: i64) -> Result<bool, StoreError>;
    /// Every published record, from local state.
    fn list_sessions(&self) -> Vec<(String, Vec<u8>)>;
    /// Follow record changes from every replica, in commit order; on
    /// `Lagged`, list again.
    fn watch_sessions(&self) -> tokio::sync::broadcast::Receiver<SessionUpdate>;
}

/// A deployment record as the engine hands it to the store: a small header
/// (everything but the per-node tracks) and the tracks, which are most of
/// it (a 10k-node record is about 1.9 MB). A backend that keeps a record as
/// one value stores [`DeploymentDocument::whole`]; one that limits the size
/// of a request (etcd) stores the header and the tracks in buckets of
/// their own ([`split`]). The engine owns the encoding; the store only
/// decides where the bytes go.
pub trait DeploymentDocument: Sync {
    /// The whole record, encoded.
    fn whole(&self) -> Vec<u8>;
    /// The record without its tracks, encoded (JSON).
    fn header(&self) -> Vec<u8>;
    /// How many tracks the record holds.
    fn track_count(&self) -> usize;
    /// The tracks in `range`, encoded as one JSON array.
    fn tracks(&self, range: std::ops::Range<usize>) -> Vec<u8>;
}

/// A deployment record as a backend returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoredDeployment {
    /// What [`DeploymentDocument::whole`] wrote (the embedded store, and
    /// etcd's records from before the split).
    Whole(Vec<u8>),
    /// What [`DeploymentDocument::header`] wrote and the tracks, as JSON
    /// arrays in order, of one version of the record (never a mix of two).
    Split {
        header: Vec<u8>,
        tracks: usize,
        buckets: Vec<Vec<u8>>,
    },
}

/// A deployment record type the store can give back.
pub trait FromStoredDeployment: Sized {
    /// The record stored under `id`, or a `Corrupt` error naming it.
    fn from_stored(id: &str, stored: StoredDeployment) -> Result<Self, StoreError>;
}

/// Deployment and pipeline records, stored as the engine encodes them.
#[async_trait]
pub trait DeploymentRecords: Send + Sync {
    /// Store a deployment under its id, unflushed; durable with the next
    /// flush. Refused, with nothing queued, when a part of it is too large
    /// for the backend.
    fn put_deployment_unflushed(
        &self,
        id: &str,
        record: &dyn DeploymentDocument,
    ) -> Result<(), StoreError>;
    /// Every deployment's record, in id order.
    fn list_stored_deployments(&self) -> Result<Vec<(String, StoredDeployment)>, StoreError>;
    /// Store a pipeline's encoded record under its id, durably.
    async fn put_pipeline_bytes(&self, id: &str, record: Vec<u8>) -> Result<(), StoreError>;
    fn list_pipeline_bytes(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    async fn flush_deployments(&self) -> Result<(), StoreError>;
}

/// Typed access to deployment and pipeline records: the engine owns their
/// form, the store only keeps them.
#[async_trait]
pub trait DeploymentRecordsExt: DeploymentRecords {
    /// Store a deployment under its id, durably.
    async fn put_deployment<T: DeploymentDocument>(
        &self,
        id: &str,
        deployment: &T,
    ) -> Result<(), StoreError> {
        self.put_deployment_unflushed(id, deployment)?;
        self.flush_deployments().await
    }

    fn list_deployments<T: FromStoredDeployment>(&self) -> Result<Vec<T>, StoreError> {
        self.list_stored_deployments()?
            .into_iter()
            .map(|(id, stored)| T::from_stored(&id, stored))
            .collect()
    }

    async fn put_pipeline<T: Serialize + Sync>(
        &self,
        id: &str,
        pipeline: &T,
    ) -> Result<(), StoreError> {
        self.put_pipeline_bytes(id, encode(pipeline)).await
    }

    fn list_pipelines<T: DeserializeOwned>(&self) -> Result<Vec<T>, StoreError> {
        decode_all(Collection::Pipelines, self.list_pipeline_bytes()?)
    }
}

impl<S: DeploymentRecords + ?Sized> DeploymentRecordsExt for S {}

/// The sequence logs the store keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogName {
    /// The event log (the events module owns its format).
    Events,
    /// The audit chain (the audit module owns its format).
    Audit,
}

impl LogName {
    pub fn as_str(self) -> &'static str {
        match self {
            LogName::Events => "events",
            LogName::Audit => "audit",
        }
    }
}

/// Which way a log is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Forward,
    Backward,
}

/// Makes a log record for the sequence number it is stored under.
pub type Encode = Box<dyn Fn(u64) -> Vec<u8> + Send + Sync>;

/// Records under strictly increasing, gap-free sequence numbers. The owner
/// of a log proposes the numbers (its next, under its own lock) and encodes
/// the records. Where several processes append to one log (replicas on
/// etcd), the backend allocates the final number in the same atomic write
/// as the record, so numbers stay gap-free whoever writes.
#[async_trait]
pub trait SeqLog: Send + Sync {
    /// Store a record, unflushed (durable with the next flush), under `seq`
    /// if it is still free when the write commits. A backend another
    /// process appended to meanwhile stores it under the next free number
    /// instead, encoded again by `encode`, and tells the owner through
    /// [`SeqLog::follow`].
    fn append(&self, seq: u64, encode: Encode) -> Result<(), StoreError>;
    /// Store `records` under exactly `seq`, `seq + 1`, ..., all or nothing:
    /// false when `seq` is not the log's next number because another writer
    /// appended first (then [`SeqLog::last`] already shows that writer's
    /// record, so the owner can build again). For chained records, whose
    /// content depends on the one before (the audit chain). A replicated
    /// backend commits them at once, in one transaction (the owner keeps a
    /// group within its limits); the embedded one with the next flush,
    /// which the owner does before acknowledging anything.
    async fn append_exact(&self, seq: u64, records: Vec<Vec<u8>>) -> Result<bool, StoreError>;
    /// Every record as it commits, from any writer, for an owner that
    /// publishes a live stream; `None` when this process is the only writer
    /// (its own appends are the stream, in order).
    fn follow(&self) -> Option<tokio::sync::broadcast::Receiver<(u64, Vec<u8>)>>;
    /// The record with the highest sequence number.
    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError>;
    /// The lowest sequence number stored.
    fn first_seq(&self) -> Result<Option<u64>, StoreError>;
    /// Records stored (may walk the log: callers keep their own count).
    fn count(&self) -> Result<u64, StoreError>;
    /// Records from `from` (inclusive) onwards, or from the end down to
    /// `from` when backwards.
    fn range(&self, from: u64, direction: Direction) -> LogIter<'_>;
    /// Remove every record with a sequence number up to `seq` (inclusive);
    /// returns how many were removed.
    fn remove_through(&self, seq: u64) -> Result<u64, StoreError>;
    /// Overwrite one record in place. Only for tests that tamper with the
    /// audit chain to see that verification notices.
    #[cfg(test)]
    fn overwrite(&self, seq: u64, record: &[u8]) -> Result<(), StoreError>;
    /// Remove one record. Only for tests, as [`SeqLog::overwrite`].
    #[cfg(test)]
    fn remove(&self, seq: u64) -> Result<(), StoreError>;
}

/// Records of a log in the order asked for.
pub type LogIter<'a> = Box<dyn Iterator<Item = Result<(u64, Vec<u8>), StoreError>> + Send + 'a>;

/// Ad hoc deployment freezes (SPEC §9). Operator writes: flushed before
/// they are acknowledged, from any replica.
#[async_trait]
pub trait FreezeRecords: Send + Sync {
    async fn put_freeze(&self, record: &FreezeRecord) -> Result<(), StoreError>;
    fn list_freezes(&self) -> Result<Vec<FreezeRecord>, StoreError>;
    /// Every freeze acknowledged anywhere before this call: what a refusal
    /// is decided on. A replicated backend first catches its copy up with
    /// the cluster (a freeze just made through another replica counts).
    async fn current_freezes(&self) -> Result<Vec<FreezeRecord>, StoreError> {
        self.list_freezes()
    }
    /// Remove a freeze; the record removed, `None` when there was none.
    async fn remove_freeze(&self, id: &str) -> Result<Option<FreezeRecord>, StoreError>;
}

/// Every record family the control plane keeps.
pub trait Storage:
    Durability
    + NodeRecords
    + UserRecords
    + ArtifactRecords
    + DesiredRecords
    + DeploymentRecords
    + FreezeRecords
    + WebhookRecords
{
    /// One of the sequence logs.
    fn log(&self, name: LogName) -> Result<Arc<dyn SeqLog>, StoreError>;

    /// One desired-state change per entry of `changes`, in order, each as
    /// [`DesiredRecords::update_desired_recorded`] makes it (without
    /// flushing); a node changed twice sees its first change. Entries of
    /// nodes that are not enrolled change nothing and are answered `None`.
    /// The embedded store writes the batch with one revision-counter write,
    /// the history records as one value and the desired states as one value
    /// too when they are many (a desired run, folded into one key per node
    /// by [`Storage::fold_desired`]) or else as one sled batch, and reads no
    /// node twice.
    fn update_desired_batch(
        &self,
        changes: &[(&str, Change<'_, DesiredRecord>)],
        origin: &HistoryOrigin,
    ) -> Result<Vec<Option<DesiredRecord>>, StoreError> {
        changes
            .iter()
            .map(|&(node_id, change)| {
                if !self.has_node(node_id)? {
                    return Ok(None);
                }
                self.update_desired_recorded(node_id, change, origin)
                    .map(Some)
            })
            .collect()
    }
    /// Finish writing what [`Storage::update_desired_batch`] wrote in a
    /// form that is durable but not yet in its final place (the embedded
    /// store's desired runs), without flushing. Call it once the batch is
    /// flushed and handed over: it is off the decision's path. Skipping it
    /// loses nothing; the next desired write does it first.
    fn fold_desired(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Open again, in a test, an embedded database just closed in this
/// process. sled's flusher thread (or a fold still on its blocking thread)
/// may hold the file lock for a moment after the last handle is dropped; a
/// new process would not wait: retry briefly.
#[cfg(test)]
pub(crate) async fn reopen_for_tests(path: &std::path::Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match Store::open(path, 1 << 20) {
            Ok(store) => return store,
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(e) => panic!("reopen: {e}"),
        }
    }
}

/// The control plane's storage: a cheap handle to one backend, shared by
/// everything wired in `server.rs`. Components that need only part of it
/// take the narrow handle ([`Store::artifacts`], [`Store::deployments`], [`Store::durability`]; the engine's `EngineHandles`).
#[derive(Clone)]
pub struct Store(Arc<dyn Storage>);

impl std::ops::Deref for Store {
    type Target = dyn Storage;

    fn deref(&self) -> &Self::Target {
        &*self.0
    }
}

impl Store {
    /// Open (or create) the embedded database at `path`. Fails if another
    /// process has it open.
    pub fn open(path: &std::path::Path, cache_bytes: u64) -> Result<Self, StoreError> {
        Ok(Self(Arc::new(SledStore::open(path, cache_bytes)?)))
    }

    /// The replicated backend, opened by the caller.
    pub fn etcd(store: etcd::EtcdStore) -> Self {
        Self(Arc::new(store))
    }

    pub fn durability(&self) -> Arc<dyn Durability> {
        self.0.clone()
    }

    pub fn artifacts(&self) -> Arc<dyn ArtifactRecords> {
        self.0.clone()
    }

    pub fn deployments(&self) -> Arc<dyn DeploymentRecords> {
        self.0.clone()
    }

    pub fn freezes(&self) -> Arc<dyn FreezeRecords> {
        self.0.clone()
    }

    /// Store a deployment under its id, durably.
    pub async fn put_deployment<T: DeploymentDocument>(
        &self,
        id: &str,
        deployment: &T,
    ) -> Result<(), StoreError> {
        DeploymentRecordsExt::put_deployment(&*self.0, id, deployment).await
    }

    /// Store a deployment without flushing; durable with the next flush.
    pub fn put_deployment_unflushed<T: DeploymentDocument>(
        &self,
        id: &str,
        deployment: &T,
    ) -> Result<(), StoreError> {
        self.0.put_deployment_unflushed(id, deployment)
    }

    pub fn list_deployments<T: FromStoredDeployment>(&self) -> Result<Vec<T>, StoreError> {
        DeploymentRecordsExt::list_deployments(&*self.0)
    }

    pub async fn put_pipeline<T: Serialize + Sync>(
        &self,
        id: &str,
        pipeline: &T,
    ) -> Result<(), StoreError> {
        DeploymentRecordsExt::put_pipeline(&*self.0, id, pipeline).await
    }

    pub fn list_pipelines<T: DeserializeOwned>(&self) -> Result<Vec<T>, StoreError> {
        DeploymentRecordsExt::list_pipelines(&*self.0)
    }
}

/// The record families, for error messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collection {
    Tokens,
    Nodes,
    NodeNames,
    Keys,
    Artifacts,
    Desired,
    Deployments,
    Pipelines,
    Users,
    Events,
    Audit,
    Freezes,
    Webhooks,
    WebhookCursors,
    History,
}

impl Collection {
    /// The collection's name (sled's tree, a key prefix elsewhere).
    pub fn as_str(self) -> &'static str {
        match self {
            Collection::Tokens => "tokens",
            Collection::Nodes => "nodes",
            Collection::NodeNames => "node_names",
            Collection::Keys => "publisher_keys",
            Collection::Artifacts => "artifacts",
            Collection::Desired => "desired",
            Collection::Deployments => "deployments",
            Collection::Pipelines => "pipelines",
            Collection::Users => "users",
            Collection::Events => "events",
            Collection::Audit => "audit",
            Collection::Freezes => "freezes",
            Collection::Webhooks => "webhooks",
            Collection::WebhookCursors => "webhook_cursors",
            Collection::History => "history",
        }
    }
}

/// A record's JSON.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own plain structs to JSON cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// A record from its JSON, or a `Corrupt` error naming where it was.
pub fn decode<T: DeserializeOwned>(
    collection: Collection,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        tree: collection.as_str(),
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

fn decode_all<T: DeserializeOwned>(
    collection: Collection,
    records: Vec<(String, Vec<u8>)>,
) -> Result<Vec<T>, StoreError> {
    records
        .iter()
        .map(|(key, bytes)| decode(collection, key.as_bytes(), bytes))
        .collect()
}
