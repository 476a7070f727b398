//! The replicated backend: every record under one key prefix of an etcd v3
//! cluster, so several control-plane replicas share one state.
//!
//! - **Reads** answer from a [`MirrorHandle`]: the whole prefix listed at one
//!   revision and kept current by a watch from that revision (resumed after
//!   a dropped connection; after a compaction, re-listed and compared, so no
//!   change is missed). Over the mirror lie this replica's own writes not yet
//!   in it, so a caller reads what it wrote.
//! - **Writes** made without a flush (desired states, deployments, events)
//!   gather in a pending batch that the next [`Durability::flush`] commits
//!   (group commit: whoever flushes commits everyone's writes so far).
//!   Read-modify-write changes record the revision they read and commit only
//!   if the key is unchanged ("guarded by compare on revision"); a batch
//!   larger than etcd's per-transaction limits (operations, and bytes
//!   under `--max-request-bytes`) commits in several transactions, each
//!   atomic and each guarded; a value too large for any request is refused
//!   with its key and size before anything of its batch is sent.
//! - **Deployment records** are split ([`super::split`]): a header under
//!   the deployment's key and its node tracks in buckets of their own, so a
//!   50k-node deployment fits etcd's default limits and an update rewrites
//!   only the buckets it changed. A batch commits new buckets first, then
//!   everything else (headers among it), then the deletes of buckets no
//!   header names any more, so a reader at any revision assembles one
//!   whole version of each record.
//! - Changes that must be atomic across keys or decide on what exists
//!   (creating users and keys, storing artifact records) commit at once in
//!   one transaction and re-decide on a conflict, with a random pause, for
//!   up to the request timeout.
//! - **Enrollments** with one join token queue per token and commit in
//!   groups, one transaction spending the token's uses for every node of
//!   the group (see [`enroll`]): a replica's own enrollments never race
//!   each other for the token's record.
//! - **Sequence logs** keep their head (`meta/head/<log>`) next to their
//!   records: a commit compares the head with the numbers it proposes and
//!   advances it in the same transaction, so numbers are gap-free whoever
//!   writes; an event that lost its number to another replica is numbered
//!   again after the winner.
//! - **Fencing**: while this replica leads, every commit also compares the
//!   election key's create revision ([`EtcdStore::set_fence`]), so a leader
//!   that lost its lease (paused, partitioned) changes nothing.

mod enroll;
mod webhooks;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use hotswap_etcd::{Client, Compare, CompareOp, TxnOp};
use serde::de::DeserializeOwned;
use tokio::sync::broadcast;
use tokio_stream::StreamExt;

use super::history::{self, HistoryOrigin, HistoryRecord, HistoryTrimmed};
use super::keys::Keys;
use super::mirror::{Change as MirrorChange, Mirror, MirrorHandle, Versioned};
use super::split;
use super::{
    ArtifactRecord, ArtifactRecords, Change, Collection, DeploymentDocument, DeploymentRecords,
    DesiredRecord, DesiredRecords, DesiredUpdate, DesiredWatch, Direction, Durability, Encode,
    EnrollError, Failure, KeyRecord, LogIter, LogName, NodeRecord, NodeRecords, Revision, SeqLog,
    SessionRecords, SessionUpdate, Storage, StoreError, StoredDeployment, TokenRecord, UserRecord,
    UserRecords, decode, encode,
};
use super::{FreezeRecord, FreezeRecords};

/// Operations per transaction: etcd refuses more than `--max-txn-ops`
/// (128 by default) in either branch; a few are kept for the head of a log.
const OPS_PER_TXN: usize = 120;
/// Operations a transaction may grow to so as to keep history records
/// with their desired states (etcd's `--max-txn-ops` is 128).
const TIED_OPS_PER_TXN: usize = 126;
/// Bytes a transaction may grow by for the same reason.
const TIED_EXTRA_BYTES: usize = 128 * 1024;
/// Attempts at a guarded change before the request deadline may end it
/// (a slow etcd must not turn the first conflict into a refusal).
const MIN_ATTEMPTS: u32 = 4;
/// Bytes of keys, values and compares in one transaction. etcd refuses a
/// request larger than `--max-request-bytes` (1.5 MiB by default) with
/// "request is too large"; this leaves a third of that for the request's
/// own framing, so batches commit on a stock etcd.
const TXN_BYTES: usize = 1024 * 1024;
/// What one operation or compare adds to a request beyond its key and
/// value (protobuf tags, lengths, revisions), counted generously.
const OP_OVERHEAD: usize = 32;
/// How often unflushed writes with nobody flushing them (a module's health
/// event) are committed anyway.
const BACKGROUND_FLUSH: Duration = Duration::from_millis(250);
/// Buffered changes for desired-state watchers and log followers.
const CHANNEL_CAPACITY: usize = 16 * 1024;

/// What the cluster record under the prefix holds (written by `init`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ClusterRecord {
    pub id: String,
    pub created_at_ms: u64,
}

/// A read's base revision, for guarding the write that follows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Base {
    /// The key's mod revision when read (0: it did not exist).
    Revision(i64),
    /// The key was last written by an earlier batch of ours still being
    /// committed; its revision is known by the time this batch commits.
    InFlight,
}

/// A batch's writes: the final value of every key (`None`: deleted).
type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Writes not yet committed.
#[derive(Default)]
struct Batch {
    /// The final value of every key written (`None`: deleted).
    writes: Writes,
    /// What read-modify-write changes read: the commit requires each key
    /// to be as it was.
    guards: BTreeMap<Vec<u8>, Base>,
    /// Log records proposed, in order.
    appends: Vec<(LogName, u64, Encode)>,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.writes.is_empty() && self.appends.is_empty()
    }
}

struct Layers {
    pending: Batch,
    /// The number of the pending batch; each commit takes the pending batch
    /// and starts the next number.
    generation: u64,
    /// Batches being committed, oldest first: still read over the mirror
    /// until it holds them.
    in_flight: VecDeque<(u64, Arc<Writes>)>,
    /// Keys our commits wrote, at the revision they were written, until the
    /// mirror holds that revision.
    written_at: HashMap<Vec<u8>, i64>,
}

/// Outcomes of recent commits, for flushers that waited while another
/// committed their writes.
struct Commits {
    /// Every batch up to this number is committed or failed.
    done_through: u64,
    /// Failed batches (number, why), the newest few.
    failed: VecDeque<(u64, String)>,
}

/// Why a commit did not go through.
#[derive(Debug)]
enum CommitError {
    /// This replica's leadership is gone: the fence failed.
    Fenced,
    /// A guarded key changed since it was read.
    Conflict(String),
    /// A value too large for any one request.
    TooLarge {
        key: String,
        bytes: usize,
    },
    /// A deployment header names a track bucket that is neither in its
    /// batch nor committed (it was computed over an earlier batch of ours
    /// that failed).
    Unwritten {
        key: String,
    },
    Etcd(hotswap_etcd::Error),
}

impl From<hotswap_etcd::Error> for CommitError {
    fn from(error: hotswap_etcd::Error) -> Self {
        CommitError::Etcd(error)
    }
}

impl From<CommitError> for StoreError {
    fn from(error: CommitError) -> Self {
        match error {
            CommitError::Fenced => StoreError::Backend(
                "this replica lost its leadership (its etcd lease ended), so it may not change anything; the new leader carries on".into(),
            ),
            CommitError::Conflict(key) => StoreError::Backend(format!(
                "record {key} was changed by another replica at the same time; try again"
            )),
            CommitError::TooLarge { key, bytes } => too_large(&key, bytes),
            CommitError::Unwritten { key } => StoreError::Backend(format!(
                "a deployment header names track bucket {key}, which an earlier commit that failed was to write; nothing of this batch was written, and the next write of the record starts from what etcd holds"
            )),
            CommitError::Etcd(e) => StoreError::Backend(e.to_string()),
        }
    }
}

struct Inner {
    client: Client,
    keys: Keys,
    mirror: MirrorHandle,
    layers: Mutex<Layers>,
    /// Held while a batch commits: commits go one at a time, in order.
    committing: tokio::sync::Mutex<Commits>,
    fence: RwLock<Option<Compare>>,
    /// Whether the watch that feeds the mirror is connected.
    connected: tokio::sync::watch::Sender<bool>,
    desired_changes: broadcast::Sender<DesiredUpdate>,
    events: broadcast::Sender<(u64, Vec<u8>)>,
    audit: broadcast::Sender<(u64, Vec<u8>)>,
    /// Published session records, from every replica.
    sessions: broadcast::Sender<SessionUpdate>,
    /// The lease this replica's session records are written under.
    session_lease: RwLock<Option<hotswap_etcd::LeaseId>>,
    runtime: tokio::runtime::Handle,
    request_timeout: Duration,
    /// Enrollments waiting for their join token's committer.
    enrollments: enroll::Queues,
    /// Bytes of keys and values committed by batches (see
    /// [`EtcdStore::bytes_written`]).
    bytes_written: AtomicU64,
}

/// The etcd backend (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
    _tasks: Arc<Tasks>,
}

/// The mirror's watch and the background flush, stopped with the last
/// handle.
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// The refusal of a value no etcd request can carry.
fn too_large(key: &str, bytes: usize) -> StoreError {
    StoreError::Backend(format!(
        "record {key} is {bytes} bytes: more than one etcd request may carry (the store keeps requests under {TXN_BYTES} bytes for etcd's default --max-request-bytes of 1.5 MiB), so it was not stored"
    ))
}

/// What a write adds to a transaction request.
fn op_bytes(key: &[u8], value: Option<&[u8]>) -> usize {
    key.len() + value.map_or(0, <[u8]>::len) + OP_OVERHEAD
}

fn backend(e: hotswap_etcd::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl EtcdStore {
    /// Create the cluster record under the prefix; refuses if one is there
    /// (another cluster lives under it).
    pub async fn init(
        client: &Client,
        keys: &Keys,
        record: &ClusterRecord,
    ) -> Result<(), StoreError> {
        let key = keys.cluster();
        let result = client
            .txn(
                &[Compare::absent(key.clone())],
                &[TxnOp::put(key.clone(), encode(record))],
                &[TxnOp::get(key.clone())],
            )
            .await
            .map_err(backend)?;
        if result.succeeded {
            return Ok(());
        }
        let existing = match result.responses.first() {
            Some(hotswap_etcd::TxnOpResult::Get { kvs }) => kvs
                .first()
                .and_then(|kv| serde_json::from_slice::<ClusterRecord>(&kv.value).ok()),
            _ => None,
        };
        Err(StoreError::Backend(match existing {
            Some(cluster) => format!(
                "a hotswap cluster ({}, created {}) already lives under etcd prefix {}; choose another --etcd-prefix, or run the replicas against it without init",
                cluster.id,
                hotswap_common::timefmt::rfc3339_from_ms(cluster.created_at_ms),
                keys.prefix()
            ),
            None => format!(
                "etcd prefix {} already holds a cluster record; choose another --etcd-prefix",
                keys.prefix()
            ),
        }))
    }

    /// Open the store under `keys`' prefix: list it, start following it,
    /// and start the background flush. Fails when no cluster was
    /// initialized there.
    pub async fn open(client: Client, keys: Keys) -> Result<Self, StoreError> {
        let (revision, kvs) = client
            .range(keys.prefix().as_bytes())
            .await
            .map_err(backend)?;
        let mirror = Mirror::from_listing(
            kvs.into_iter().map(|kv| (kv.key.clone(), versioned(&kv))),
            revision,
        );
        if mirror.get(keys.cluster().as_bytes()).is_none() {
            return Err(StoreError::Backend(format!(
                "no hotswap cluster under etcd prefix {}: run `hotswap-control-plane init --etcd-endpoints ... --etcd-prefix {}` first",
                keys.prefix(),
                keys.prefix()
            )));
        }
        let request_timeout = client.config().request_timeout;
        let (connected, _) = tokio::sync::watch::channel(true);
        let inner = Arc::new(Inner {
            client,
            keys,
            mirror: MirrorHandle::new(mirror),
            layers: Mutex::new(Layers {
                pending: Batch::default(),
                generation: 1,
                in_flight: VecDeque::new(),
                written_at: HashMap::new(),
            }),
            committing: tokio::sync::Mutex::new(Commits {
                done_through: 0,
                failed: VecDeque::new(),
            }),
            fence: RwLock::new(None),
            connected,
            desired_changes: broadcast::channel(CHANNEL_CAPACITY).0,
            events: broadcast::channel(CHANNEL_CAPACITY).0,
            audit: broadcast::channel(CHANNEL_CAPACITY).0,
            sessions: broadcast::channel(CHANNEL_CAPACITY).0,
            session_lease: RwLock::new(None),
            runtime: tokio::runtime::Handle::current(),
            request_timeout,
            enrollments: enroll::Queues::default(),
            bytes_written: AtomicU64::new(0),
        });
        let follow = tokio::spawn(follow(Arc::clone(&inner)));
        let flush = tokio::spawn({
            let inner = Arc::downgrade(&inner);
            async move {
                loop {
                    tokio::time::sleep(BACKGROUND_FLUSH).await;
                    let Some(inner) = inner.upgrade() else { return };
                    let has_writes = !inner.layers().pending.is_empty();
                    if has_writes && let Err(e) = inner.flush().await {
                        tracing::warn!(error = %e, "background commit to etcd failed");
                    }
                }
            }
        });
        Ok(Self {
            inner,
            _tasks: Arc::new(Tasks(vec![follow, flush])),
        })
    }

    /// Fence every later commit with `fence` (this replica leads), or stop
    /// fencing (`None`: it follows). Set before the leader's first write.
    pub fn set_fence(&self, fence: Option<Compare>) {
        *self.inner.fence.write().unwrap_or_else(|e| e.into_inner()) = fence;
    }

    /// Write this replica's session records under `lease` (kept alive by
    /// the caller: when it ends, they vanish).
    pub fn set_session_lease(&self, lease: hotswap_etcd::LeaseId) {
        *self
            .inner
            .session_lease
            .write()
            .unwrap_or_else(|e| e.into_inner()) = Some(lease);
    }

    /// Follow whether the mirror's watch is connected.
    pub fn connection(&self) -> tokio::sync::watch::Receiver<bool> {
        self.inner.connected.subscribe()
    }

    /// Whether the mirror's watch is connected now: while it is not, the
    /// mirror may be stale.
    pub fn is_connected(&self) -> bool {
        *self.inner.connected.borrow()
    }

    /// The values under `replicas/` as the mirror holds them: every live
    /// replica's record (the list `servers list` shows).
    pub fn replica_records(&self) -> Vec<Vec<u8>> {
        let prefix = self.inner.keys.replicas();
        self.inner.mirror.read(|m| {
            m.under(prefix.as_bytes(), prefix.as_bytes())
                .map(|(_, v)| v.value.clone())
                .collect()
        })
    }

    /// The revision the mirror holds.
    pub fn revision(&self) -> i64 {
        self.inner.mirror.read(Mirror::revision)
    }

    /// Who leads, as the mirror sees the election: what the candidate with
    /// the lowest create revision campaigned with.
    pub fn leader(&self) -> Option<Leader> {
        let prefix = self.inner.keys.election();
        self.inner.mirror.read(|m| {
            m.under(prefix.as_bytes(), prefix.as_bytes())
                .min_by_key(|(_, v)| v.create_revision)
                .map(|(_, v)| Leader::decode(&v.value))
        })
    }

    /// Bytes of keys and values this store has committed through its
    /// batches' writes (what waits for a flush: deployment records, desired
    /// states, trims; not log records nor immediate changes), since it
    /// opened. For measurements and tests.
    pub fn bytes_written(&self) -> u64 {
        self.inner.bytes_written.load(Ordering::Relaxed)
    }

    /// The client, for the replica's own records (sessions, election).
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    pub fn keys(&self) -> &Keys {
        &self.inner.keys
    }
}

fn versioned(kv: &hotswap_etcd::KeyValue) -> Versioned {
    Versioned {
        value: kv.value.clone(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
    }
}

/// Keep the mirror current: watch from its revision, apply each revision
/// whole, tell desired-state watchers and log followers; re-list after a
/// compaction or a broken watch.
async fn follow(inner: Arc<Inner>) {
    let prefix = inner.keys.prefix().as_bytes().to_vec();
    loop {
        let from = inner.mirror.read(Mirror::revision);
        let mut batches = inner.client.watch_prefix_batches(&prefix, from);
        let _ = inner.connected.send_replace(true);
        let error = loop {
            match batches.next().await {
                Some(Ok(batch)) => inner.apply_watched(batch),
                Some(Err(e)) => break e,
                None => return,
            }
        };
        if error.is_compacted() {
            tracing::info!(error = %error, "etcd compacted the history the mirror needed; re-listing");
        } else {
            tracing::warn!(error = %error, "the etcd watch stopped; re-listing");
            let _ = inner.connected.send_replace(false);
        }
        // Re-list until etcd answers; the mirror keeps serving what it has.
        let mut delay = Duration::from_millis(100);
        loop {
            match inner.client.range(&prefix).await {
                Ok((revision, kvs)) => {
                    inner.relisted(revision, kvs);
                    break;
                }
                Err(e) => {
                    let _ = inner.connected.send_replace(false);
                    tracing::warn!(error = %e, "cannot re-list from etcd; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

impl Inner {
    fn layers(&self) -> std::sync::MutexGuard<'_, Layers> {
        self.layers.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fence(&self) -> Option<Compare> {
        self.fence.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn log_sender(&self, log: LogName) -> &broadcast::Sender<(u64, Vec<u8>)> {
        match log {
            LogName::Events => &self.events,
            LogName::Audit => &self.audit,
        }
    }

    fn desired_prefix(&self) -> String {
        self.keys.collection(Collection::Desired)
    }

    fn apply_watched(&self, batch: hotswap_etcd::WatchBatch) {
        let changes: Vec<MirrorChange> = batch
            .events
            .iter()
            .map(|event| match event.kind {
                hotswap_etcd::WatchEventKind::Put => MirrorChange::Put {
                    key: event.kv.key.clone(),
                    value: versioned(&event.kv),
                },
                hotswap_etcd::WatchEventKind::Delete => MirrorChange::Delete {
                    key: event.kv.key.clone(),
                    revision: event.revision,
                },
            })
            .collect();
        match self.mirror.apply(batch.revision, &changes) {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                tracing::error!(error = %e, "etcd watch out of order; the mirror skips it");
                return;
            }
        }
        self.forget_written(batch.revision);
        for change in &changes {
            let (key, value) = match change {
                MirrorChange::Put { key, value } => (key, Some(&value.value)),
                MirrorChange::Delete { key, .. } => (key, None),
            };
            self.announce(key, value.map(Vec::as_slice), batch.revision);
        }
    }

    /// Tell watchers about one changed key.
    fn announce(&self, key: &[u8], value: Option<&[u8]>, revision: i64) {
        let Ok(key) = std::str::from_utf8(key) else {
            return;
        };
        if let Some(node_id) = key.strip_prefix(&self.desired_prefix()) {
            let record = match value {
                Some(bytes) => {
                    match decode::<DesiredRecord>(Collection::Desired, key.as_bytes(), bytes) {
                        Ok(mut record) => {
                            record.revision = revision as u64;
                            Some(record)
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "skipping an unreadable desired state");
                            return;
                        }
                    }
                }
                None => None,
            };
            let _no_watchers = self.desired_changes.send(DesiredUpdate {
                node_id: node_id.to_string(),
                record,
                revision: revision as u64,
            });
            return;
        }
        if let Some(node_id) = key.strip_prefix(&self.keys.sessions()) {
            let _no_watchers = self.sessions.send(SessionUpdate {
                node_id: node_id.to_string(),
                record: value.map(<[u8]>::to_vec),
            });
            return;
        }
        for log in [LogName::Events, LogName::Audit] {
            if let (Some(seq), Some(bytes)) = (self.keys.seq_of(log, key), value) {
                let _no_followers = self.log_sender(log).send((seq, bytes.to_vec()));
            }
        }
    }

    /// After a re-list: replace the mirror and tell watchers what changed
    /// since the old one, removals included.
    fn relisted(&self, revision: i64, kvs: Vec<hotswap_etcd::KeyValue>) {
        let fresh = Mirror::from_listing(
            kvs.into_iter().map(|kv| (kv.key.clone(), versioned(&kv))),
            revision,
        );
        let old = self.mirror.read(|m| m.records().clone());
        let old_revision = self.mirror.read(Mirror::revision);
        let mut changed: Vec<(Vec<u8>, Option<Vec<u8>>, i64)> = Vec::new();
        for (key, value) in fresh.records() {
            if value.mod_revision > old_revision
                || old.get(key).map(|v| v.mod_revision) != Some(value.mod_revision)
            {
                changed.push((key.clone(), Some(value.value.clone()), value.mod_revision));
            }
        }
        for key in old.keys() {
            if fresh.get(key).is_none() {
                changed.push((key.clone(), None, revision));
            }
        }
        changed.sort_by(|a, b| (a.2, &a.0).cmp(&(b.2, &b.0)));
        self.mirror.reset(fresh);
        self.forget_written(revision);
        for (key, value, at) in changed {
            self.announce(&key, value.as_deref(), at);
        }
    }

    fn forget_written(&self, revision: i64) {
        let mut layers = self.layers();
        if !layers.written_at.is_empty() {
            layers.written_at.retain(|_, at| *at > revision);
        }
    }

    /// A key's value as this replica sees it: its own pending and in-flight
    /// writes over the mirror.
    fn value(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.read(key).0
    }

    /// A key's value and the base a guarded write on it would compare.
    fn read(&self, key: &[u8]) -> (Option<Vec<u8>>, Base) {
        let layers = self.layers();
        if let Some(value) = layers.pending.writes.get(key) {
            let base = layers
                .pending
                .guards
                .get(key)
                .copied()
                .unwrap_or(Base::InFlight);
            return (value.clone(), base);
        }
        for (_, batch) in layers.in_flight.iter().rev() {
            if let Some(value) = batch.get(key) {
                return (value.clone(), Base::InFlight);
            }
        }
        let written = layers.written_at.get(key).copied();
        drop(layers);
        self.mirror.read(|m| match m.get(key) {
            Some(v) => (
                Some(v.value.clone()),
                Base::Revision(written.unwrap_or(0).max(v.mod_revision)),
            ),
            None => (None, Base::Revision(written.unwrap_or(0))),
        })
    }

    /// Keys under `prefix` with this replica's writes laid over the mirror.
    fn scan(&self, prefix: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = self.mirror.read(|m| {
            m.under(prefix, prefix)
                .map(|(k, v)| (k.clone(), Some(v.value.clone())))
                .collect()
        });
        let layers = self.layers();
        for (_, batch) in &layers.in_flight {
            for (key, value) in batch.iter().filter(|(k, _)| k.starts_with(prefix)) {
                merged.insert(key.clone(), value.clone());
            }
        }
        for (key, value) in layers
            .pending
            .writes
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
        {
            merged.insert(key.clone(), value.clone());
        }
        drop(layers);
        merged
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .collect()
    }

    fn get<T: DeserializeOwned>(
        &self,
        collection: Collection,
        id: &str,
    ) -> Result<Option<T>, StoreError> {
        let key = self.keys.record(collection, id);
        self.value(key.as_bytes())
            .map(|bytes| decode(collection, key.as_bytes(), &bytes))
            .transpose()
    }

    fn list<T: DeserializeOwned>(&self, collection: Collection) -> Result<Vec<T>, StoreError> {
        self.scan(self.keys.collection(collection).as_bytes())
            .iter()
            .map(|(key, value)| decode(collection, key, value))
            .collect()
    }

    fn list_bytes(&self, collection: Collection) -> Vec<(String, Vec<u8>)> {
        let prefix = self.keys.collection(collection);
        self.scan(prefix.as_bytes())
            .into_iter()
            .map(|(key, value)| {
                let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                (id, value)
            })
            .collect()
    }

    /// Queue a write for the next commit.
    fn write(&self, key: String, value: Option<Vec<u8>>) {
        self.layers().pending.writes.insert(key.into_bytes(), value);
    }

    /// Queue several writes for the next commit, together: no flush takes
    /// some of them without the others.
    fn write_all(&self, writes: Vec<(String, Option<Vec<u8>>)>) {
        let mut layers = self.layers();
        for (key, value) in writes {
            layers.pending.writes.insert(key.into_bytes(), value);
        }
    }

    /// Refuse, before queuing it, a value no request can carry.
    fn check_fits(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let fence = self.fence().map_or(0, |f| f.key().len() + OP_OVERHEAD);
        if fence + op_bytes(key.as_bytes(), Some(value)) > TXN_BYTES {
            return Err(too_large(key, value.len()));
        }
        Ok(())
    }

    /// The keys under `prefix` with this replica's writes laid over the
    /// mirror, without their values.
    fn keys_under(&self, prefix: &[u8]) -> Vec<Vec<u8>> {
        let mut merged: BTreeMap<Vec<u8>, bool> = self.mirror.read(|m| {
            m.under(prefix, prefix)
                .map(|(k, _)| (k.clone(), true))
                .collect()
        });
        let layers = self.layers();
        let batches = layers
            .in_flight
            .iter()
            .map(|(_, batch)| &**batch)
            .chain(std::iter::once(&layers.pending.writes));
        for batch in batches {
            for (key, value) in batch
                .range::<[u8], _>((
                    std::ops::Bound::Included(prefix),
                    std::ops::Bound::Unbounded,
                ))
                .take_while(|(k, _)| k.starts_with(prefix))
            {
                merged.insert(key.clone(), value.is_some());
            }
        }
        drop(layers);
        merged
            .into_iter()
            .filter_map(|(key, present)| present.then_some(key))
            .collect()
    }

    /// A stored deployment from its header's value: whole, or assembled
    /// from the buckets its header names (see [`super::split`]).
    fn assemble(&self, id: &str, header: Vec<u8>) -> Result<StoredDeployment, StoreError> {
        let header_key = self.keys.record(Collection::Deployments, id);
        let corrupt = |key: &str, reason: String| StoreError::Corrupt {
            tree: Collection::Deployments.as_str(),
            key: key.to_string(),
            reason,
        };
        let mut value = header;
        loop {
            let Some((index, record)) =
                split::open_header(&value).map_err(|e| corrupt(&header_key, e.to_string()))?
            else {
                return Ok(StoredDeployment::Whole(value));
            };
            let mut buckets = Vec::with_capacity(index.buckets.len());
            let mut missing = None;
            for (i, named) in index.buckets.iter().enumerate() {
                let key = self.keys.deployment_bucket(id, i, named.generation);
                let Some(stored) = self.value(key.as_bytes()) else {
                    missing = Some(key);
                    break;
                };
                buckets.push(
                    split::open_bucket(&index, i, &stored)
                        .map_err(|e| corrupt(&key, e.to_string()))?,
                );
            }
            let Some(key) = missing else {
                return Ok(StoredDeployment::Split {
                    header: record,
                    tracks: index.tracks,
                    buckets,
                });
            };
            // A bucket goes only after a newer header stopped naming it: if
            // the mirror moved on while this read, read the newer one.
            match self.value(header_key.as_bytes()) {
                Some(newer) if newer != value => value = newer,
                _ => {
                    return Err(corrupt(
                        &key,
                        "a track bucket its deployment's header names is missing".into(),
                    ));
                }
            }
        }
    }

    /// Commit every write queued so far (see [`Durability::flush`]).
    async fn flush(&self) -> Result<(), StoreError> {
        let mine = self.layers().generation;
        let mut commits = self.committing.lock().await;
        if commits.done_through >= mine {
            return match commits
                .failed
                .iter()
                .find(|(generation, _)| *generation == mine)
            {
                Some((_, why)) => Err(StoreError::Backend(why.clone())),
                None => Ok(()),
            };
        }
        let (generation, batch, overlay) = {
            let mut layers = self.layers();
            let batch = std::mem::take(&mut layers.pending);
            let generation = layers.generation;
            layers.generation += 1;
            let overlay = Arc::new(batch.writes.clone());
            layers
                .in_flight
                .push_back((generation, Arc::clone(&overlay)));
            (generation, batch, overlay)
        };
        let result = self.commit(batch).await;
        {
            let mut layers = self.layers();
            layers.in_flight.retain(|(g, _)| *g != generation);
        }
        drop(overlay);
        commits.done_through = generation;
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                let error = StoreError::from(e);
                commits.failed.push_back((generation, error.to_string()));
                while commits.failed.len() > 64 {
                    commits.failed.pop_front();
                }
                Err(error)
            }
        }
    }

    /// The order a batch's writes commit in: new deployment track buckets
    /// first, then every other write in key order (deployment headers among
    /// them, ahead of the desired states they lead to), then the deletes of
    /// buckets: a header never commits before the buckets it names, nor a
    /// bucket's delete before the header that stopped naming it.
    fn commit_order(&self, writes: Writes) -> Vec<(Vec<u8>, Option<Vec<u8>>)> {
        let tracks = self.keys.all_deployment_tracks();
        let phase = |key: &[u8], value: &Option<Vec<u8>>| match (
            key.starts_with(tracks.as_bytes()),
            value.is_some(),
        ) {
            (true, true) => 0,
            (false, _) => 1,
            (true, false) => 2,
        };
        let mut writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = writes.into_iter().collect();
        // Stable: key order within each phase, except that a node's history
        // records follow its desired state (see [`Inner::tied`]).
        writes.sort_by_cached_key(|(key, value)| (phase(key, value), self.order_key(key)));
        writes
    }

    /// Where a key sorts within its phase: its own bytes, except a history
    /// record `history/<node>/<generation>`, which sorts right after
    /// `desired/<node>` (node ids hold no `/` nor NUL), so that
    /// [`Inner::chunks`] can keep the two in one transaction.
    fn order_key(&self, key: &[u8]) -> Vec<u8> {
        let history = self.keys.collection(Collection::History);
        match key.strip_prefix(history.as_bytes()) {
            Some(rest) => {
                let mut order = self.desired_prefix().into_bytes();
                match rest.iter().position(|b| *b == b'/') {
                    Some(slash) => {
                        order.extend_from_slice(&rest[..slash]);
                        order.push(0);
                        order.extend_from_slice(&rest[slash + 1..]);
                    }
                    None => order.extend_from_slice(rest),
                }
                order
            }
            None => key.to_vec(),
        }
    }

    /// Whether a write must commit in the same transaction as the one
    /// before it: a history record with the desired state it describes.
    fn tied(&self, key: &[u8]) -> bool {
        key.starts_with(self.keys.collection(Collection::History).as_bytes())
    }

    /// Refuse a batch, before anything is sent, if a deployment header in it
    /// names a track bucket that is neither written by the batch nor
    /// committed. A write computed over an earlier batch of ours still in
    /// flight names that batch's buckets; if that batch failed, committing
    /// the header would leave a record that cannot be read.
    fn check_headers(&self, writes: &[(Vec<u8>, Option<Vec<u8>>)]) -> Result<(), CommitError> {
        let headers = self.keys.collection(Collection::Deployments);
        let puts: std::collections::HashSet<&[u8]> = writes
            .iter()
            .filter(|(_, value)| value.is_some())
            .map(|(key, _)| key.as_slice())
            .collect();
        for (key, value) in writes {
            let (Some(id), Some(value)) = (key.strip_prefix(headers.as_bytes()), value) else {
                continue;
            };
            // A whole record, or an unreadable one, names no bucket.
            let Ok(Some(index)) = split::index_of(value) else {
                continue;
            };
            let id = String::from_utf8_lossy(id);
            for (i, named) in index.buckets.iter().enumerate() {
                let bucket = self.keys.deployment_bucket(&id, i, named.generation);
                let bucket = bucket.as_bytes();
                // Our commits put a named key (they never delete one a
                // later header names); the mirror may not have caught up.
                let present = puts.contains(bucket)
                    || self.layers().written_at.contains_key(bucket)
                    || self.mirror.read(|m| m.get(bucket).is_some());
                if !present {
                    return Err(CommitError::Unwritten {
                        key: String::from_utf8_lossy(bucket).into_owned(),
                    });
                }
            }
        }
        Ok(())
    }

    /// Split a batch's writes into transactions of at most [`OPS_PER_TXN`]
    /// keys and [`TXN_BYTES`] bytes, in order; refuses the batch, before
    /// anything is sent, if one write alone cannot fit.
    fn chunks(
        &self,
        writes: &[(Vec<u8>, Option<Vec<u8>>)],
        guards: &BTreeMap<Vec<u8>, Base>,
    ) -> Result<Vec<std::ops::Range<usize>>, CommitError> {
        let fence = self.fence().map_or(0, |f| f.key().len() + OP_OVERHEAD);
        let mut chunks = Vec::new();
        let (mut start, mut bytes) = (0, fence);
        for (i, (key, value)) in writes.iter().enumerate() {
            let guard = if guards.contains_key(key) {
                key.len() + OP_OVERHEAD
            } else {
                0
            };
            let size = op_bytes(key, value.as_deref()) + guard;
            if fence + size > TXN_BYTES {
                return Err(CommitError::TooLarge {
                    key: String::from_utf8_lossy(key).into_owned(),
                    bytes: value.as_ref().map_or(0, Vec::len),
                });
            }
            // A history record stays with its desired state: past the
            // usual limits, up to etcd's own (128 operations; 1.5 MiB,
            // of which TXN_BYTES keeps a third spare).
            let keep_tied = self.tied(key)
                && i - start < TIED_OPS_PER_TXN
                && bytes + size <= TXN_BYTES + TIED_EXTRA_BYTES;
            if i > start && !keep_tied && (i - start >= OPS_PER_TXN || bytes + size > TXN_BYTES) {
                chunks.push(start..i);
                (start, bytes) = (i, fence);
            }
            bytes += size;
        }
        if start < writes.len() {
            chunks.push(start..writes.len());
        }
        Ok(chunks)
    }

    /// Commit one batch: its writes in [`Inner::commit_order`], in
    /// transactions within etcd's limits ([`Inner::chunks`], each with the
    /// fence and its keys' guards), then its log records numbered after
    /// each log's head. Returns once the mirror holds the last transaction
    /// (or the request deadline passed: the writes are committed either
    /// way).
    async fn commit(&self, batch: Batch) -> Result<(), CommitError> {
        let Batch {
            writes,
            guards,
            appends,
        } = batch;
        let mut last_revision = 0;
        let writes = self.commit_order(writes);
        self.check_headers(&writes)?;
        for range in self.chunks(&writes, &guards)? {
            let chunk = &writes[range];
            let mut compares: Vec<Compare> = self.fence().into_iter().collect();
            for (key, _) in chunk {
                match guards.get(key) {
                    Some(Base::Revision(revision)) => compares.push(Compare::mod_revision(
                        key.clone(),
                        CompareOp::Equal,
                        *revision,
                    )),
                    Some(Base::InFlight) => {
                        // The earlier batch of ours that wrote it has
                        // committed by now (commits go in order).
                        if let Some(at) = self.layers().written_at.get(key).copied() {
                            compares.push(Compare::mod_revision(key.clone(), CompareOp::Equal, at));
                        }
                    }
                    None => {}
                }
            }
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(key, value)| match value {
                    Some(value) => TxnOp::put(key.clone(), value.clone()),
                    None => TxnOp::delete(key.clone()),
                })
                .collect();
            let result = self.client.txn(&compares, &ops, &[]).await?;
            if !result.succeeded {
                return Err(self.why_failed(&compares).await);
            }
            last_revision = result.revision;
            let bytes: usize = chunk
                .iter()
                .map(|(key, value)| key.len() + value.as_ref().map_or(0, Vec::len))
                .sum();
            self.bytes_written
                .fetch_add(bytes as u64, Ordering::Relaxed);
            let mut layers = self.layers();
            for (key, _) in chunk {
                layers.written_at.insert(key.clone(), result.revision);
            }
        }
        for log in [LogName::Events, LogName::Audit] {
            let records: Vec<&Encode> = appends
                .iter()
                .filter(|(name, _, _)| *name == log)
                .map(|(_, _, encode)| encode)
                .collect();
            for chunk in records.chunks(OPS_PER_TXN) {
                last_revision = self.append_chunk(log, chunk).await?;
            }
        }
        if last_revision > 0 {
            let caught_up = self.mirror.caught_up(last_revision);
            if tokio::time::timeout(self.request_timeout, caught_up)
                .await
                .is_err()
            {
                tracing::warn!(
                    revision = last_revision,
                    "committed to etcd, but the mirror has not seen it yet"
                );
            }
        }
        Ok(())
    }

    /// The head of a log as etcd has it (0: empty).
    fn head_from(&self, value: Option<&[u8]>) -> u64 {
        value
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// The compare that holds while a log's head is `head`.
    fn head_is(&self, log: LogName, head: u64) -> Compare {
        let key = self.keys.log_head(log);
        if head == 0 {
            Compare::absent(key)
        } else {
            Compare::value(key, CompareOp::Equal, head.to_string())
        }
    }

    /// Append records after the log's head in one transaction, numbering
    /// them again when another writer moved the head first.
    async fn append_chunk(&self, log: LogName, records: &[&Encode]) -> Result<i64, CommitError> {
        let head_key = self.keys.log_head(log);
        let mut head = self.head_from(
            self.mirror
                .read(|m| m.get(head_key.as_bytes()).map(|v| v.value.clone()))
                .as_deref(),
        );
        // Other writers may keep winning while they are busy too: go on
        // until the request deadline (and a few times at least, however
        // slowly etcd answers), with a growing random pause, rather than
        // drop records that lost a race.
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let mut attempt: u32 = 0;
        while attempt < MIN_ATTEMPTS || tokio::time::Instant::now() < deadline {
            attempt += 1;
            let mut compares: Vec<Compare> = self.fence().into_iter().collect();
            compares.push(self.head_is(log, head));
            let mut ops: Vec<TxnOp> = records
                .iter()
                .enumerate()
                .map(|(i, encode)| {
                    let seq = head + 1 + i as u64;
                    TxnOp::put(self.keys.log_record(log, seq), encode(seq))
                })
                .collect();
            let new_head = head + records.len() as u64;
            ops.push(TxnOp::put(head_key.clone(), new_head.to_string()));
            let result = self
                .client
                .txn(&compares, &ops, &[TxnOp::get(head_key.clone())])
                .await?;
            if result.succeeded {
                return Ok(result.revision);
            }
            if let Some(fence) = self.fence()
                && !self.holds(&fence).await?
            {
                return Err(CommitError::Fenced);
            }
            head = match result.responses.first() {
                Some(hotswap_etcd::TxnOpResult::Get { kvs }) => {
                    self.head_from(kvs.first().map(|kv| kv.value.as_slice()))
                }
                _ => head,
            };
            if attempt > 2 {
                let ceiling_ms = 1u64 << attempt.min(6);
                let pause = rand::random_range(0..=ceiling_ms);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
        }
        Err(CommitError::Conflict(head_key))
    }

    /// Whether a compare holds now (read from etcd itself).
    async fn holds(&self, compare: &Compare) -> Result<bool, CommitError> {
        let result = self
            .client
            .txn(std::slice::from_ref(compare), &[], &[])
            .await?;
        Ok(result.succeeded)
    }

    /// Why a guarded transaction failed: the fence, or which guard.
    async fn why_failed(&self, compares: &[Compare]) -> CommitError {
        for compare in compares {
            match self.holds(compare).await {
                Ok(true) => continue,
                Ok(false) => {
                    if Some(compare) == self.fence().as_ref() {
                        return CommitError::Fenced;
                    }
                    return CommitError::Conflict(
                        String::from_utf8_lossy(compare.key()).into_owned(),
                    );
                }
                Err(e) => return e,
            }
        }
        CommitError::Conflict("(a key changed and changed back)".into())
    }

    /// Commit guarded writes at once, in one transaction (flushing what is
    /// pending first, so the reads behind them saw everything of ours).
    /// The caller re-decides on [`CommitError::Conflict`].
    async fn commit_now(
        &self,
        guards: &[(String, Base)],
        writes: &[(String, Option<Vec<u8>>)],
    ) -> Result<i64, CommitError> {
        let mut compares: Vec<Compare> = self.fence().into_iter().collect();
        for (key, base) in guards {
            if let Base::Revision(revision) = base {
                compares.push(Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    *revision,
                ));
            }
        }
        let ops: Vec<TxnOp> = writes
            .iter()
            .map(|(key, value)| match value {
                Some(value) => TxnOp::put(key.clone(), value.clone()),
                None => TxnOp::delete(key.clone()),
            })
            .collect();
        let result = self.client.txn(&compares, &ops, &[]).await?;
        if !result.succeeded {
            return Err(self.why_failed(&compares).await);
        }
        {
            let mut layers = self.layers();
            for (key, _) in writes {
                layers
                    .written_at
                    .insert(key.clone().into_bytes(), result.revision);
            }
        }
        let caught_up = self.mirror.caught_up(result.revision);
        let _ = tokio::time::timeout(self.request_timeout, caught_up).await;
        Ok(result.revision)
    }

    /// Run a guarded change until it commits or is refused: `decide` reads
    /// (through [`Inner::read`]) and returns the guards, the writes and its
    /// answer, or an error that refuses the change.
    async fn change<T, E>(
        &self,
        decide: impl Fn(&Self) -> Result<(Vec<(String, Base)>, Vec<(String, Option<Vec<u8>>)>, T), E>,
    ) -> Result<T, E>
    where
        E: From<StoreError>,
    {
        self.flush().await.map_err(E::from)?;
        // Other writers may keep winning while they are busy: go on until
        // the request deadline (and at least a few times), with a growing
        // random pause, rather than refuse after a fixed number of tries.
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let mut attempt: u32 = 0;
        loop {
            attempt += 1;
            let (guards, writes, answer) = decide(self)?;
            if writes.is_empty() {
                return Ok(answer);
            }
            match self.commit_now(&guards, &writes).await {
                Ok(_) => return Ok(answer),
                Err(CommitError::Conflict(key)) => {
                    tracing::debug!(key, attempt, "a concurrent change won; deciding again");
                    if attempt >= MIN_ATTEMPTS && tokio::time::Instant::now() >= deadline {
                        return Err(E::from(StoreError::Backend(format!(
                            "other replicas kept changing record {key} for {}s ({attempt} tries); try again",
                            self.request_timeout.as_secs()
                        ))));
                    }
                    // Let the mirror catch up with whoever won.
                    if let Ok(status) = self.client.status().await {
                        let caught_up = self.mirror.caught_up(status.revision);
                        let _ = tokio::time::timeout(self.request_timeout, caught_up).await;
                    }
                    if attempt > 1 {
                        let ceiling_ms = 1u64 << attempt.min(6);
                        let pause = rand::random_range(0..=ceiling_ms);
                        tokio::time::sleep(Duration::from_millis(pause)).await;
                    }
                }
                Err(e) => return Err(E::from(StoreError::from(e))),
            }
        }
    }

    fn block_on<T>(&self, future: impl std::future::Future<Output = T>) -> T {
        match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::block_in_place(|| self.runtime.block_on(future)),
            Err(_) => self.runtime.block_on(future),
        }
    }
}

fn base_of(read: &(Option<Vec<u8>>, Base)) -> Base {
    read.1
}

#[async_trait]
impl Durability for EtcdStore {
    /// Wait until the mirror holds etcd's current revision, read
    /// linearizably (the cluster record's key: any key would do).
    async fn catch_up(&self) -> Result<(), StoreError> {
        let revision = self
            .inner
            .client
            .current_revision(self.inner.keys.cluster())
            .await
            .map_err(|e| {
                StoreError::Backend(format!(
                    "etcd's current revision, to catch up with the cluster: {e}"
                ))
            })?;
        tokio::time::timeout(
            self.inner.request_timeout,
            self.inner.mirror.caught_up(revision),
        )
        .await
        .map_err(|_| {
            StoreError::Backend(format!(
                "this replica's copy did not reach etcd's revision {revision} within {}s",
                self.inner.request_timeout.as_secs()
            ))
        })
    }

    async fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }

    fn flush_blocking(&self) -> Result<(), StoreError> {
        self.inner.block_on(self.inner.flush())
    }

    fn failure(&self) -> Option<Failure> {
        None
    }

    fn check_identity(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn size_on_disk(&self) -> u64 {
        0
    }
}

#[async_trait]
impl NodeRecords for EtcdStore {
    async fn insert_token(&self, hash: &str, record: &TokenRecord) -> Result<(), StoreError> {
        self.inner.write(
            self.inner.keys.record(Collection::Tokens, hash),
            Some(encode(record)),
        );
        self.inner.flush().await
    }

    fn get_token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.inner.get(Collection::Tokens, hash)
    }

    async fn enroll(
        &self,
        token_hash: &str,
        now_ms: u64,
        node: NodeRecord,
    ) -> Result<NodeRecord, EnrollError> {
        enroll::enroll(&self.inner, token_hash, now_ms, node).await
    }

    fn get_node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError> {
        self.inner.get(Collection::Nodes, id)
    }

    fn has_node(&self, id: &str) -> Result<bool, StoreError> {
        let key = self.inner.keys.record(Collection::Nodes, id);
        Ok(self.inner.value(key.as_bytes()).is_some())
    }

    fn node_id_by_name(&self, name: &str) -> Result<Option<String>, StoreError> {
        let key = self.inner.keys.record(Collection::NodeNames, name);
        Ok(self
            .inner
            .value(key.as_bytes())
            .map(|id| String::from_utf8_lossy(&id).into_owned()))
    }

    fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.inner.list(Collection::Nodes)
    }

    async fn put_node(&self, record: &NodeRecord) -> Result<(), StoreError> {
        self.inner.write(
            self.inner.keys.record(Collection::Nodes, &record.id),
            Some(encode(record)),
        );
        self.inner.flush().await
    }

    async fn update_node(
        &self,
        id: &str,
        change: Change<'_, NodeRecord>,
    ) -> Result<Option<NodeRecord>, StoreError> {
        let key = self.inner.keys.record(Collection::Nodes, id);
        self.inner
            .change(|inner| {
                let read = inner.read(key.as_bytes());
                let Some(bytes) = &read.0 else {
                    return Ok((Vec::new(), Vec::new(), None));
                };
                let mut record: NodeRecord = decode(Collection::Nodes, key.as_bytes(), bytes)?;
                if !change(&mut record) {
                    return Ok((Vec::new(), Vec::new(), Some(record)));
                }
                Ok::<_, StoreError>((
                    vec![(key.clone(), base_of(&read))],
                    vec![(key.clone(), Some(encode(&record)))],
                    Some(record),
                ))
            })
            .await
    }

    async fn exhaust_token(&self, hash: &str) -> Result<(), StoreError> {
        let key = self.inner.keys.record(Collection::Tokens, hash);
        self.inner
            .change(|inner| {
                let read = inner.read(key.as_bytes());
                let Some(bytes) = &read.0 else {
                    return Ok((Vec::new(), Vec::new(), ()));
                };
                let mut token: TokenRecord = decode(Collection::Tokens, key.as_bytes(), bytes)?;
                if token.uses_left == 0 {
                    return Ok((Vec::new(), Vec::new(), ()));
                }
                token.uses_left = 0;
                Ok::<_, StoreError>((
                    vec![(key.clone(), base_of(&read))],
                    vec![(key.clone(), Some(encode(&token)))],
                    (),
                ))
            })
            .await
    }

    async fn remove_node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError> {
        let keys = &self.inner.keys;
        let node_key = keys.record(Collection::Nodes, id);
        self.inner
            .change(|inner| {
                let read = inner.read(node_key.as_bytes());
                let Some(bytes) = &read.0 else {
                    return Ok((Vec::new(), Vec::new(), None));
                };
                let record: NodeRecord = decode(Collection::Nodes, node_key.as_bytes(), bytes)?;
                let name_key = keys.record(Collection::NodeNames, &record.name);
                Ok::<_, StoreError>((
                    vec![(node_key.clone(), base_of(&read))],
                    vec![(node_key.clone(), None), (name_key, None)],
                    Some(record),
                ))
            })
            .await
    }
}

#[async_trait]
impl UserRecords for EtcdStore {
    fn get_user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        self.inner.get(Collection::Users, name)
    }

    fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        self.inner.list(Collection::Users)
    }

    async fn put_user(&self, record: &UserRecord) -> Result<(), StoreError> {
        self.inner.write(
            self.inner.keys.record(Collection::Users, &record.name),
            Some(encode(record)),
        );
        self.inner.flush().await
    }

    fn put_user_blocking(&self, record: &UserRecord) -> Result<(), StoreError> {
        self.inner.write(
            self.inner.keys.record(Collection::Users, &record.name),
            Some(encode(record)),
        );
        self.inner.block_on(self.inner.flush())
    }

    async fn create_user(&self, record: &UserRecord) -> Result<bool, StoreError> {
        let key = self.inner.keys.record(Collection::Users, &record.name);
        self.inner
            .change(|inner| {
                let read = inner.read(key.as_bytes());
                if read.0.is_some() {
                    return Ok((Vec::new(), Vec::new(), false));
                }
                Ok::<_, StoreError>((
                    vec![(key.clone(), base_of(&read))],
                    vec![(key.clone(), Some(encode(record)))],
                    true,
                ))
            })
            .await
    }
}

#[async_trait]
impl ArtifactRecords for EtcdStore {
    fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.inner.list(Collection::Keys)
    }

    fn get_key(&self, name: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.inner.get(Collection::Keys, name)
    }

    async fn insert_key(&self, record: &KeyRecord) -> Result<Option<KeyRecord>, StoreError> {
        let key = self.inner.keys.record(Collection::Keys, &record.name);
        self.inner
            .change(|inner| {
                let read = inner.read(key.as_bytes());
                if let Some(bytes) = &read.0 {
                    let existing: KeyRecord = decode(Collection::Keys, key.as_bytes(), bytes)?;
                    return Ok((Vec::new(), Vec::new(), Some(existing)));
                }
                Ok::<_, StoreError>((
                    vec![(key.clone(), base_of(&read))],
                    vec![(key.clone(), Some(encode(record)))],
                    None,
                ))
            })
            .await
    }

    async fn put_key(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.inner.write(
            self.inner.keys.record(Collection::Keys, &record.name),
            Some(encode(record)),
        );
        self.inner.flush().await
    }

    fn get_artifact(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Option<ArtifactRecord>, StoreError> {
        let key = self.inner.keys.artifact(name, version);
        self.inner
            .value(key.as_bytes())
            .map(|bytes| decode(Collection::Artifacts, key.as_bytes(), &bytes))
            .transpose()
    }

    fn module_versions(&self, name: &str) -> Result<Vec<ArtifactRecord>, StoreError> {
        self.inner
            .scan(self.inner.keys.module_versions(name).as_bytes())
            .iter()
            .map(|(key, value)| decode(Collection::Artifacts, key, value))
            .collect()
    }

    fn list_artifacts(&self) -> Result<Vec<ArtifactRecord>, StoreError> {
        self.inner.list(Collection::Artifacts)
    }

    async fn insert_artifact(
        &self,
        record: &ArtifactRecord,
    ) -> Result<Option<ArtifactRecord>, StoreError> {
        let key = self.inner.keys.artifact(&record.name, &record.version);
        self.inner
            .change(|inner| {
                let read = inner.read(key.as_bytes());
                if let Some(bytes) = &read.0 {
                    let existing: ArtifactRecord =
                        decode(Collection::Artifacts, key.as_bytes(), bytes)?;
                    return Ok((Vec::new(), Vec::new(), Some(existing)));
                }
                Ok::<_, StoreError>((
                    vec![(key.clone(), base_of(&read))],
                    vec![(key.clone(), Some(encode(record)))],
                    None,
                ))
            })
            .await
    }

    async fn update_artifact(
        &self,
        name: &str,
        version: &str,
        change: Change<'_, ArtifactRecord>,
    ) -> Result<Option<ArtifactRecord>, StoreError> {
        let key = self.inner.keys.artifact(name, version);
        self.inner
            .change(|inner| {
                let read = inner.read(key.as_bytes());
                let Some(bytes) = &read.0 else {
                    return Ok((Vec::new(), Vec::new(), None));
                };
                let mut record: ArtifactRecord =
                    decode(Collection::Artifacts, key.as_bytes(), bytes)?;
                if !change(&mut record) {
                    return Ok((Vec::new(), Vec::new(), Some(record)));
                }
                Ok::<_, StoreError>((
                    vec![(key.clone(), base_of(&read))],
                    vec![(key.clone(), Some(encode(&record)))],
                    Some(record),
                ))
            })
            .await
    }
}

#[async_trait]
impl DesiredRecords for EtcdStore {
    fn get_desired(&self, node_id: &str) -> Result<DesiredRecord, StoreError> {
        let key = self.inner.keys.record(Collection::Desired, node_id);
        let (value, base) = self.inner.read(key.as_bytes());
        let Some(bytes) = value else {
            return Ok(DesiredRecord::default());
        };
        let mut record: DesiredRecord = decode(Collection::Desired, key.as_bytes(), &bytes)?;
        if let Base::Revision(revision) = base {
            record.revision = revision as u64;
        }
        Ok(record)
    }

    /// The change is applied to what this replica sees and committed with
    /// the next flush, guarded: if another replica changed the node's
    /// desired state meanwhile, the flush fails instead of overwriting it.
    /// The returned record's revision is the one it was read at (its own
    /// revision is known once committed). Its history record is queued with
    /// it, under the same lock, and commits in the same transaction (see
    /// [`Inner::tied`]).
    fn update_desired_recorded(
        &self,
        node_id: &str,
        change: Change<'_, DesiredRecord>,
        origin: &HistoryOrigin,
    ) -> Result<DesiredRecord, StoreError> {
        let key = self.inner.keys.record(Collection::Desired, node_id);
        let (value, base) = self.inner.read(key.as_bytes());
        let before: DesiredRecord = match &value {
            Some(bytes) => decode(Collection::Desired, key.as_bytes(), bytes)?,
            None => DesiredRecord::default(),
        };
        let mut record = before.clone();
        if !change(&mut record) {
            return Ok(record);
        }
        record.generation += 1;
        let stored = DesiredRecord {
            revision: 0,
            ..record.clone()
        };
        let node: Option<history::NodeNaming> =
            self.inner.get(Collection::Nodes, node_id).ok().flatten();
        let entry = history::record_of(node_id, node.as_ref(), &before, Some(&stored), origin).map(
            |entry| {
                (
                    self.inner.keys.history(node_id, record.generation),
                    encode(&entry),
                )
            },
        );
        let mut layers = self.inner.layers();
        let key = key.into_bytes();
        layers.pending.guards.entry(key.clone()).or_insert(base);
        layers.pending.writes.insert(key, Some(encode(&stored)));
        if let Some((history_key, value)) = entry {
            layers
                .pending
                .writes
                .insert(history_key.into_bytes(), Some(value));
        }
        Ok(record)
    }

    async fn remove_desired_recorded(
        &self,
        node_id: &str,
        origin: &HistoryOrigin,
    ) -> Result<(), StoreError> {
        let key = self.inner.keys.record(Collection::Desired, node_id);
        if let Some(bytes) = self.inner.value(key.as_bytes()) {
            let before: DesiredRecord = decode(Collection::Desired, key.as_bytes(), &bytes)?;
            let node: Option<history::NodeNaming> =
                self.inner.get(Collection::Nodes, node_id).ok().flatten();
            let mut writes = vec![(key, None)];
            if let Some(entry) = history::record_of(node_id, node.as_ref(), &before, None, origin) {
                writes.push((
                    self.inner.keys.history(node_id, entry.generation),
                    Some(encode(&entry)),
                ));
            }
            self.inner.write_all(writes);
        }
        self.inner.flush().await
    }

    /// Committed records, from the mirror; each one's seq is its key's mod
    /// revision, the revision of the transaction that wrote it and its
    /// desired state.
    fn list_history(&self) -> Result<Vec<HistoryRecord>, StoreError> {
        let prefix = self.inner.keys.collection(Collection::History);
        let listed: Vec<(Vec<u8>, Versioned)> = self.inner.mirror.read(|m| {
            m.under(prefix.as_bytes(), prefix.as_bytes())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        });
        let mut records = Vec::with_capacity(listed.len());
        for (key, value) in listed {
            let mut record: HistoryRecord = decode(Collection::History, &key, &value.value)?;
            record.seq = value.mod_revision as u64;
            records.push(record);
        }
        records.sort_by(|a, b| {
            (a.seq, &a.node_id, a.generation).cmp(&(b.seq, &b.node_id, b.generation))
        });
        Ok(records)
    }

    async fn trim_history(&self, before_ms: u64) -> Result<u64, StoreError> {
        let old: Vec<HistoryRecord> = self
            .list_history()?
            .into_iter()
            .filter(|r| r.time_ms < before_ms)
            .collect();
        if old.is_empty() {
            return Ok(0);
        }
        let mut trimmed = self.history_trimmed()?.unwrap_or_default();
        trimmed.before_ms = trimmed.before_ms.max(before_ms);
        let mut writes: Vec<(String, Option<Vec<u8>>)> = Vec::with_capacity(old.len() + 1);
        for record in &old {
            trimmed.seq = trimmed.seq.max(record.seq);
            writes.push((
                self.inner.keys.history(&record.node_id, record.generation),
                None,
            ));
        }
        writes.push((self.inner.keys.history_trimmed(), Some(encode(&trimmed))));
        self.inner.write_all(writes);
        self.inner.flush().await?;
        Ok(old.len() as u64)
    }

    fn history_trimmed(&self) -> Result<Option<HistoryTrimmed>, StoreError> {
        let key = self.inner.keys.history_trimmed();
        self.inner
            .value(key.as_bytes())
            .map(|bytes| decode(Collection::History, key.as_bytes(), &bytes))
            .transpose()
    }

    async fn flush_desired(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }

    fn desired_revision(&self) -> Result<Revision, StoreError> {
        Ok(self.inner.mirror.read(Mirror::revision) as Revision)
    }

    fn watch_desired(&self, after: Revision) -> Result<DesiredWatch, StoreError> {
        // Subscribe first: whatever the mirror applies from now on comes
        // live, and the backlog read next holds everything before (the
        // watch skips what both hold).
        let live = self.inner.desired_changes.subscribe();
        let prefix = self.inner.desired_prefix();
        let mut backlog = Vec::new();
        let listed: Vec<(Vec<u8>, Versioned)> = self.inner.mirror.read(|m| {
            m.under(prefix.as_bytes(), prefix.as_bytes())
                .filter(|(_, v)| v.mod_revision as u64 > after)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        });
        for (key, value) in listed {
            let mut record: DesiredRecord = decode(Collection::Desired, &key, &value.value)?;
            record.revision = value.mod_revision as u64;
            backlog.push(DesiredUpdate {
                node_id: String::from_utf8_lossy(&key[prefix.len()..]).into_owned(),
                revision: record.revision,
                record: Some(record),
            });
        }
        backlog.sort_by(|a, b| (a.revision, &a.node_id).cmp(&(b.revision, &b.node_id)));
        Ok(DesiredWatch::new(backlog, live, after))
    }
}

/// Session records are this replica's own, under its lease: written
/// straight to etcd (not through the pending batch, whose writes carry no
/// lease and the leader's fence), read from the mirror.
#[async_trait]
impl SessionRecords for EtcdStore {
    async fn put_sessions(
        &self,
        records: Vec<(String, Vec<u8>)>,
    ) -> Result<Vec<(String, i64)>, StoreError> {
        let lease = (*self
            .inner
            .session_lease
            .read()
            .unwrap_or_else(|e| e.into_inner()))
        .ok_or_else(|| {
            StoreError::Backend("this replica has no lease for its session records yet".into())
        })?;
        let mut written = Vec::with_capacity(records.len());
        for chunk in records.chunks(OPS_PER_TXN) {
            let ops: Vec<TxnOp> = chunk
                .iter()
                .map(|(node_id, bytes)| {
                    TxnOp::put_with_lease(self.inner.keys.session(node_id), bytes.clone(), lease)
                })
                .collect();
            let result = self
                .inner
                .client
                .txn(&[], &ops, &[])
                .await
                .map_err(backend)?;
            written.extend(
                chunk
                    .iter()
                    .map(|(node_id, _)| (node_id.clone(), result.revision)),
            );
        }
        Ok(written)
    }

    async fn remove_session(&self, node_id: &str, revision: i64) -> Result<bool, StoreError> {
        let key = self.inner.keys.session(node_id);
        let result = self
            .inner
            .client
            .txn(
                &[Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    revision,
                )],
                &[TxnOp::delete(key)],
                &[],
            )
            .await
            .map_err(backend)?;
        Ok(result.succeeded)
    }

    fn list_sessions(&self) -> Vec<(String, Vec<u8>)> {
        let prefix = self.inner.keys.sessions();
        self.inner.mirror.read(|m| {
            m.under(prefix.as_bytes(), prefix.as_bytes())
                .map(|(key, value)| {
                    (
                        String::from_utf8_lossy(&key[prefix.len()..]).into_owned(),
                        value.value.clone(),
                    )
                })
                .collect()
        })
    }

    fn watch_sessions(&self) -> broadcast::Receiver<SessionUpdate> {
        self.inner.sessions.subscribe()
    }
}

#[async_trait]
impl DeploymentRecords for EtcdStore {
    /// Split (see [`super::split`]): the buckets that changed since the
    /// record as this replica sees it (its own queued writes included), the
    /// header, and the deletes of buckets the header no longer names, all
    /// queued together.
    fn put_deployment_unflushed(
        &self,
        id: &str,
        record: &dyn DeploymentDocument,
    ) -> Result<(), StoreError> {
        let keys = &self.inner.keys;
        let header_key = keys.record(Collection::Deployments, id);
        let previous = match self.inner.value(header_key.as_bytes()) {
            Some(bytes) => split::index_of(&bytes).unwrap_or_else(|e| {
                // Rewriting it whole repairs it; no bucket it named is reused.
                tracing::warn!(deployment = id, error = %e, "the stored deployment header is unreadable; writing the record whole again");
                None
            }),
            None => None,
        };
        let existing: Vec<(usize, u64)> = self
            .inner
            .keys_under(keys.deployment_tracks(id).as_bytes())
            .iter()
            .filter_map(|key| keys.bucket_of(id, std::str::from_utf8(key).ok()?))
            .collect();
        let written = split::split(previous.as_ref(), &existing, record);
        let mut writes = Vec::with_capacity(written.puts.len() + 1 + written.deletes.len());
        for (bucket, generation, value) in written.puts {
            let key = keys.deployment_bucket(id, bucket, generation);
            self.inner.check_fits(&key, &value)?;
            writes.push((key, Some(value)));
        }
        self.inner.check_fits(&header_key, &written.header)?;
        writes.push((header_key, Some(written.header)));
        for (bucket, generation) in written.deletes {
            writes.push((keys.deployment_bucket(id, bucket, generation), None));
        }
        self.inner.write_all(writes);
        Ok(())
    }

    fn list_stored_deployments(&self) -> Result<Vec<(String, StoredDeployment)>, StoreError> {
        self.inner
            .list_bytes(Collection::Deployments)
            .into_iter()
            .map(|(id, header)| {
                let stored = self.inner.assemble(&id, header)?;
                Ok((id, stored))
            })
            .collect()
    }

    async fn put_pipeline_bytes(&self, id: &str, record: Vec<u8>) -> Result<(), StoreError> {
        let key = self.inner.keys.record(Collection::Pipelines, id);
        self.inner.check_fits(&key, &record)?;
        self.inner.write(key, Some(record));
        self.inner.flush().await
    }

    fn list_pipeline_bytes(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(self.inner.list_bytes(Collection::Pipelines))
    }

    async fn flush_deployments(&self) -> Result<(), StoreError> {
        self.inner.flush().await
    }
}

#[async_trait]
impl FreezeRecords for EtcdStore {
    async fn put_freeze(&self, record: &FreezeRecord) -> Result<(), StoreError> {
        self.inner.write(
            self.inner.keys.record(Collection::Freezes, &record.id),
            Some(encode(record)),
        );
        self.inner.flush().await
    }

    fn list_freezes(&self) -> Result<Vec<FreezeRecord>, StoreError> {
        self.inner.list(Collection::Freezes)
    }

    /// Caught up with the cluster's revision first: the leader refuses a
    /// deployment into a freeze a follower acknowledged a moment ago.
    async fn current_freezes(&self) -> Result<Vec<FreezeRecord>, StoreError> {
        self.catch_up().await?;
        self.list_freezes()
    }

    /// Read and delete in one guarded transaction, as `remove_node` does:
    /// two replicas deleting the same freeze agree on who removed it.
    async fn remove_freeze(&self, id: &str) -> Result<Option<FreezeRecord>, StoreError> {
        let key = self.inner.keys.record(Collection::Freezes, id);
        self.inner
            .change(|inner| {
                let read = inner.read(key.as_bytes());
                let Some(bytes) = &read.0 else {
                    return Ok((Vec::new(), Vec::new(), None));
                };
                let record: FreezeRecord = decode(Collection::Freezes, key.as_bytes(), bytes)?;
                Ok::<_, StoreError>((
                    vec![(key.clone(), base_of(&read))],
                    vec![(key.clone(), None)],
                    Some(record),
                ))
            })
            .await
    }
}

impl Storage for EtcdStore {
    fn log(&self, name: LogName) -> Result<Arc<dyn SeqLog>, StoreError> {
        Ok(Arc::new(EtcdLog {
            inner: Arc::clone(&self.inner),
            name,
        }))
    }
}

/// A sequence log under `<prefix><log>/`, with its head at
/// `meta/head/<log>`.
struct EtcdLog {
    inner: Arc<Inner>,
    name: LogName,
}

impl EtcdLog {
    fn prefix(&self) -> String {
        self.inner.keys.log(self.name)
    }

    fn records_from(&self, from: u64, direction: Direction) -> Vec<(u64, Vec<u8>)> {
        let prefix = self.prefix();
        let start = self.inner.keys.log_record(self.name, from);
        let keys = &self.inner.keys;
        let name = self.name;
        self.inner.mirror.read(|m| {
            let range = m.under(prefix.as_bytes(), start.as_bytes());
            let entry = |(key, value): (&Vec<u8>, &Versioned)| {
                let key = std::str::from_utf8(key).ok()?;
                Some((keys.seq_of(name, key)?, value.value.clone()))
            };
            match direction {
                Direction::Forward => range.filter_map(entry).collect(),
                Direction::Backward => range.rev().filter_map(entry).collect(),
            }
        })
    }
}

#[async_trait]
impl SeqLog for EtcdLog {
    fn append(&self, seq: u64, encode: Encode) -> Result<(), StoreError> {
        self.inner
            .layers()
            .pending
            .appends
            .push((self.name, seq, encode));
        Ok(())
    }

    async fn append_exact(&self, seq: u64, records: Vec<Vec<u8>>) -> Result<bool, StoreError> {
        if records.is_empty() {
            return Ok(true);
        }
        let head = seq.saturating_sub(1);
        let head_key = self.inner.keys.log_head(self.name);
        let mut compares: Vec<Compare> = self.inner.fence().into_iter().collect();
        compares.push(self.inner.head_is(self.name, head));
        let last = head + records.len() as u64;
        let mut ops: Vec<TxnOp> = records
            .into_iter()
            .enumerate()
            .map(|(i, record)| {
                TxnOp::put(
                    self.inner.keys.log_record(self.name, seq + i as u64),
                    record,
                )
            })
            .collect();
        ops.push(TxnOp::put(head_key.clone(), last.to_string()));
        let result = self
            .inner
            .client
            .txn(&compares, &ops, &[TxnOp::get(head_key)])
            .await
            .map_err(backend)?;
        if !result.succeeded
            && let Some(fence) = self.inner.fence()
            && !self.inner.holds(&fence).await.map_err(StoreError::from)?
        {
            return Err(StoreError::from(CommitError::Fenced));
        }
        // Either way, wait until the mirror shows the log as etcd has it,
        // so `last` answers with the winner's record.
        let caught_up = self.inner.mirror.caught_up(result.revision);
        let _ = tokio::time::timeout(self.inner.request_timeout, caught_up).await;
        Ok(result.succeeded)
    }

    fn follow(&self) -> Option<broadcast::Receiver<(u64, Vec<u8>)>> {
        Some(self.inner.log_sender(self.name).subscribe())
    }

    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        let prefix = self.prefix();
        let keys = &self.inner.keys;
        Ok(self.inner.mirror.read(|m| {
            let (key, value) = m.last_under(prefix.as_bytes())?;
            let seq = keys.seq_of(self.name, std::str::from_utf8(key).ok()?)?;
            Some((seq, value.value.clone()))
        }))
    }

    fn first_seq(&self) -> Result<Option<u64>, StoreError> {
        Ok(self
            .records_from(0, Direction::Forward)
            .first()
            .map(|(seq, _)| *seq))
    }

    fn count(&self) -> Result<u64, StoreError> {
        let prefix = self.prefix();
        Ok(self
            .inner
            .mirror
            .read(|m| m.under(prefix.as_bytes(), prefix.as_bytes()).count()) as u64)
    }

    fn range(&self, from: u64, direction: Direction) -> LogIter<'_> {
        Box::new(self.records_from(from, direction).into_iter().map(Ok))
    }

    fn remove_through(&self, seq: u64) -> Result<u64, StoreError> {
        let old: Vec<u64> = self
            .records_from(0, Direction::Forward)
            .into_iter()
            .map(|(s, _)| s)
            .take_while(|s| *s <= seq)
            .collect();
        for s in &old {
            self.inner
                .write(self.inner.keys.log_record(self.name, *s), None);
        }
        Ok(old.len() as u64)
    }

    #[cfg(test)]
    fn overwrite(&self, seq: u64, record: &[u8]) -> Result<(), StoreError> {
        self.inner.write(
            self.inner.keys.log_record(self.name, seq),
            Some(record.to_vec()),
        );
        self.inner.block_on(self.inner.flush())
    }

    #[cfg(test)]
    fn remove(&self, seq: u64) -> Result<(), StoreError> {
        self.inner
            .write(self.inner.keys.log_record(self.name, seq), None);
        self.inner.block_on(self.inner.flush())
    }
}

/// What a replica campaigns with: its name, and the URL it serves at, so
/// followers can forward the leader's calls there.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Leader {
    pub name: String,
    /// `None` from a replica of a version that campaigned with its bare
    /// name (it cannot be forwarded to).
    pub endpoint: Option<String>,
}

impl Leader {
    /// The election value: `{"name":..,"endpoint":..}`.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_else(|_| self.name.clone().into_bytes())
    }

    /// An election value: JSON, or a bare name (older replicas).
    pub fn decode(value: &[u8]) -> Leader {
        serde_json::from_slice(value).unwrap_or_else(|_| Leader {
            name: String::from_utf8_lossy(value).into_owned(),
            endpoint: None,
        })
    }
}

#[cfg(test)]
mod leader_tests {
    use super::Leader;

    #[test]
    fn election_values_carry_name_and_endpoint_and_bare_names_still_read() {
        let leader = Leader {
            name: "cp-a".into(),
            endpoint: Some("https://10.0.0.1:7443".into()),
        };
        assert_eq!(
            String::from_utf8(leader.encode()).expect("utf-8"),
            r#"{"name":"cp-a","endpoint":"https://10.0.0.1:7443"}"#
        );
        assert_eq!(Leader::decode(&leader.encode()), leader);
        assert_eq!(
            Leader::decode(b"cp-old"),
            Leader {
                name: "cp-old".into(),
                endpoint: None
            }
        );
    }
}
