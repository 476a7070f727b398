//! The embedded backend: every record in one sled database in the data
//! directory, one tree per [`Collection`], records as JSON, plus `meta`
//! (counters and marks) and `desired_runs` (large desired batches as one
//! value until folded, see `runs`). The only module that knows sled.
//!
//! Writes that a caller acknowledges are flushed first, because sled
//! otherwise persists on a timer; flushes are a group commit. sled makes the
//! first I/O error of a write permanent for the open database, so the first
//! one is remembered as the storage's [`Failure`], and so is the database
//! directory found deleted or replaced under the running process.

mod runs;
mod webhooks;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};
use tokio::sync::broadcast;

use super::history::{self, HistoryOrigin, HistoryRecord, HistoryTrimmed};
use super::{
    ArtifactRecord, ArtifactRecords, Change, Collection, DeploymentDocument, DeploymentRecords,
    DesiredRecord, DesiredRecords, DesiredUpdate, DesiredWatch, Direction, Durability, Encode,
    EnrollError, EnrollRejection, Failure, KeyRecord, LogIter, LogName, NodeRecord, NodeRecords,
    Revision, SeqLog, Storage, StoreError, StoredDeployment, TokenRecord, UserRecord, UserRecords,
    decode, encode,
};
use super::{FreezeRecord, FreezeRecords};

/// Device and inode of a file: what makes it the same file when its name
/// may since point to another one, or to nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// The database directory and its main file as they were at open.
struct Identity {
    dir: PathBuf,
    dir_id: FileId,
    file: PathBuf,
    file_id: FileId,
}

impl Identity {
    /// sled keeps its pages in `db` inside the directory.
    fn record(dir: &Path) -> std::io::Result<Self> {
        let file = dir.join("db");
        Ok(Self {
            dir: dir.to_path_buf(),
            dir_id: FileId::of(dir)?,
            file_id: FileId::of(&file)?,
            file,
        })
    }

    /// `None` while both names still lead to the files opened; otherwise
    /// what changed, in words.
    fn check(&self) -> Option<String> {
        for (path, id, what) in [
            (&self.dir, self.dir_id, "database directory"),
            (&self.file, self.file_id, "database file"),
        ] {
            match FileId::of(path) {
                Ok(now) if now == id => {}
                Ok(_) => {
                    return Some(format!(
                        "the {what} {} was replaced while running (another file now has its name)",
                        path.display()
                    ));
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Some(format!(
                        "the {what} {} was deleted while running",
                        path.display()
                    ));
                }
                Err(e) => {
                    return Some(format!("cannot stat the {what} {}: {e}", path.display()));
                }
            }
        }
        None
    }
}

/// Tickets of [`SledStore`]'s group commit.
#[derive(Default)]
struct GroupCommit {
    /// Tickets handed out.
    requested: AtomicU64,
    /// Every ticket up to this one is durable.
    completed: AtomicU64,
    /// Held by the one caller flushing.
    turn: tokio::sync::Mutex<()>,
}

/// sled's error in words an operator can act on. sled re-wraps I/O errors
/// with their debug text, so an out-of-space error is named by its kind.
impl From<sled::Error> for StoreError {
    fn from(error: sled::Error) -> Self {
        match error {
            sled::Error::Io(io) => StoreError::Io(describe_io(&io)),
            other => StoreError::Backend(format!("sled: {other}")),
        }
    }
}

fn describe_io(error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::StorageFull => "No space left on device".to_string(),
        std::io::ErrorKind::QuotaExceeded => "disk quota exceeded".to_string(),
        std::io::ErrorKind::ReadOnlyFilesystem => "read-only file system".to_string(),
        _ => error.to_string(),
    }
}

/// The control plane's database.
/// Capacity of the desired-state change channel; a watcher further behind
/// re-lists (see [`super::WatchError::Lagged`]).
const DESIRED_CHANNEL: usize = 4096;

/// The embedded database.
pub struct SledStore {
    db: sled::Db,
    /// The first I/O error a write hit, or the database found deleted or
    /// replaced. sled fails every later write of an open database after an
    /// I/O error (a full disk, a failing device), and only reopening the
    /// database clears it.
    failure: OnceLock<Failure>,
    /// Device and inode of the directory and its main file at open, checked
    /// after every flush and by the storage watcher.
    identity: Identity,
    /// Group commit: one flush at a time serves every caller that asked
    /// before it started (see [`Durability::flush`]).
    commits: GroupCommit,
    tokens: sled::Tree,
    nodes: sled::Tree,
    node_names: sled::Tree,
    keys: sled::Tree,
    artifacts: sled::Tree,
    desired: sled::Tree,
    deployments: sled::Tree,
    pipelines: sled::Tree,
    users: sled::Tree,
    freezes: sled::Tree,
    /// The desired-state history, keyed by the big-endian revision of the
    /// write each record describes (one node per revision here), so key
    /// order is seq order.
    history: sled::Tree,
    /// The revision of the newest desired-state write, held while one is
    /// written. Each write stores the new revision in `meta` before the
    /// record that carries it (sled recovers a prefix of its log), so after
    /// a crash the stored counter is never behind a stored record and
    /// counting resumes from it at open without reading the records.
    desired_revision: std::sync::Mutex<Revision>,
    /// Desired runs (`runs`): the desired states of a large batch as one
    /// value under the batch's first revision, until folded into `desired`.
    desired_runs: sled::Tree,
    /// The run written last and not folded yet (see `runs`).
    pending_run: std::sync::Mutex<Option<runs::PendingRun>>,
    /// The fewest changed nodes a batch writes as a run (`runs::RUN_MIN`;
    /// tests lower it).
    run_min: usize,
    meta: sled::Tree,
    events: Arc<SledLog>,
    audit: Arc<SledLog>,
    /// Desired-state changes as they are written, for watchers.
    desired_changes: broadcast::Sender<DesiredUpdate>,
}

/// Key in the `meta` tree of the desired-state revision counter.
const DESIRED_REVISION: &[u8] = b"desired_revision";
/// Key in the `meta` tree of where history was last trimmed.
const HISTORY_TRIMMED: &[u8] = b"history_trimmed";

/// Key of an artifact record: `name` NUL `version`, so one module's versions
/// are contiguous and a prefix scan lists them.
fn artifact_key(name: &str, version: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(name.len() + version.len() + 1);
    key.extend_from_slice(name.as_bytes());
    key.push(0);
    key.extend_from_slice(version.as_bytes());
    key
}

/// Every record of a tree, decoded, in key order.
fn scan<T: DeserializeOwned>(tree: &sled::Tree, name: Collection) -> Result<Vec<T>, StoreError> {
    tree.iter()
        .map(|entry| {
            let (key, value) = entry?;
            decode(name, &key, &value)
        })
        .collect()
}

/// The history records of one value of the history tree: a single record
/// (`{...}`, one desired write), or a run of records (`[...]`, the writes of
/// one [`Storage::update_desired_batch`], consecutive seqs, stored under
/// the first one's).
fn decode_history(key: &[u8], value: &[u8]) -> Result<Vec<HistoryRecord>, StoreError> {
    if value.first() == Some(&b'[') {
        decode(Collection::History, key, value)
    } else {
        Ok(vec![decode(Collection::History, key, value)?])
    }
}

/// The value [`decode_history`] reads: one record as itself, several as a
/// run; `None` for none.
fn encode_history(records: &[HistoryRecord]) -> Option<Vec<u8>> {
    match records {
        [] => None,
        [one] => Some(encode(one)),
        run => Some(encode(&run)),
    }
}

/// Every record of a tree as raw bytes, keys as text, in key order.
fn scan_bytes(tree: &sled::Tree) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    tree.iter()
        .map(|entry| {
            let (key, value) = entry?;
            Ok((String::from_utf8_lossy(&key).into_owned(), value.to_vec()))
        })
        .collect()
}

fn get<T: DeserializeOwned>(
    tree: &sled::Tree,
    name: Collection,
    key: &[u8],
) -> Result<Option<T>, StoreError> {
    tree.get(key)?
        .map(|bytes| decode(name, key, &bytes))
        .transpose()
}

fn counter(bytes: Option<&[u8]>) -> u64 {
    bytes
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_be_bytes)
}

impl SledStore {
    /// Open (or create) the database at `path`. Fails if another process has it open.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let identity = Identity::record(path).map_err(|e| StoreError::Io(describe_io(&e)))?;
        let tree = |c: Collection| db.open_tree(c.as_str());
        let meta = db.open_tree("meta")?;
        let newest = counter(meta.get(DESIRED_REVISION)?.as_deref());
        let store = Self {
            desired_revision: std::sync::Mutex::new(newest),
            desired_runs: db.open_tree("desired_runs")?,
            pending_run: std::sync::Mutex::new(None),
            run_min: runs::RUN_MIN,
            meta,
            identity,
            tokens: tree(Collection::Tokens)?,
            nodes: tree(Collection::Nodes)?,
            node_names: tree(Collection::NodeNames)?,
            keys: tree(Collection::Keys)?,
            artifacts: tree(Collection::Artifacts)?,
            desired: tree(Collection::Desired)?,
            deployments: tree(Collection::Deployments)?,
            pipelines: tree(Collection::Pipelines)?,
            users: tree(Collection::Users)?,
            freezes: tree(Collection::Freezes)?,
            history: tree(Collection::History)?,
            events: Arc::new(SledLog {
                tree: tree(Collection::Events)?,
            }),
            audit: Arc::new(SledLog {
                tree: tree(Collection::Audit)?,
            }),
            desired_changes: broadcast::channel(DESIRED_CHANNEL).0,
            db,
            failure: OnceLock::new(),
            commits: GroupCommit::default(),
        };
        // Runs first: the history check reads `desired`.
        store.fold_stored_runs()?;
        store.drop_unwritten_history()?;
        Ok(store)
    }

    /// Write a desired state (or remove it: `None`) under revision `next`,
    /// the revision counter and its history record, as one unit: in the
    /// order counter, history record, desired state, without flushing.
    /// sled recovers a prefix of its log, so after a crash either the
    /// desired state is there with its history record, or neither is, or
    /// (the crash fell between the two) only the history record, the
    /// newest one, which [`SledStore::drop_unwritten_history`] removes at
    /// open. A sled transaction over the three trees would say the same;
    /// it made each desired write eight times slower (a 200-node wave's
    /// writes: 5 ms before history, 43-78 ms in a transaction, 17 ms so;
    /// debug build, BENCHMARKS.md), and desired writes are on every
    /// deployment decision's path.
    fn write_desired_with_history(
        &self,
        node_id: &str,
        next: Revision,
        record: Option<&DesiredRecord>,
        entry: Option<&HistoryRecord>,
    ) -> Result<(), StoreError> {
        let key = node_id.as_bytes();
        let value = record.map(encode);
        let entry = entry.map(encode);
        self.meta
            .insert(DESIRED_REVISION, &next.to_be_bytes())
            .map_err(|e| self.observe(e))?;
        if let Some(entry) = entry {
            self.history
                .insert(next.to_be_bytes(), entry)
                .map_err(|e| self.observe(e))?;
        }
        match value {
            Some(value) => self.desired.insert(key, value),
            None => self.desired.remove(key),
        }
        .map_err(|e| self.observe(e))?;
        Ok(())
    }

    /// Remove the newest history records whose desired-state writes did not
    /// reach the disk (see [`SledStore::write_desired_with_history`] and
    /// [`Storage::update_desired_batch`]): each one's node's desired state is
    /// older than it, or, for a removal, still there and older. A batch's
    /// records are all newer than any written record, so the walk from the
    /// newest stops at the first record that was written; a run of records
    /// is cut back to its written ones (all or none, as a desired batch
    /// lands whole).
    fn drop_unwritten_history(&self) -> Result<(), StoreError> {
        let mut dropped = 0u64;
        while let Some((key, value)) = self.history.last()? {
            let mut records = decode_history(&key, &value)?;
            let had = records.len();
            while let Some(record) = records.last() {
                if self.history_written(record)? {
                    break;
                }
                tracing::warn!(node = %record.node_id, seq = record.seq, "dropping the history record of a desired-state write lost in a crash");
                records.pop();
            }
            if records.len() == had {
                break;
            }
            dropped += (had - records.len()) as u64;
            match encode_history(&records) {
                None => {
                    self.history.remove(key)?;
                }
                Some(value) => {
                    self.history.insert(key, value)?;
                    break;
                }
            }
        }
        if dropped > 0 {
            self.db.flush()?;
        }
        Ok(())
    }

    /// Whether the desired-state write a history record describes is in
    /// the desired tree (or was overtaken by a later write).
    fn history_written(&self, record: &HistoryRecord) -> Result<bool, StoreError> {
        let desired: Option<DesiredRecord> = get(
            &self.desired,
            Collection::Desired,
            record.node_id.as_bytes(),
        )?;
        Ok(match (&desired, record.removed) {
            (Some(d), false) => d.revision >= record.seq,
            (None, false) => false,
            (Some(d), true) => d.revision > record.seq,
            (None, true) => true,
        })
    }

    /// A node's record for its history entry (its name and environment).
    fn node_for_history(&self, node_id: &str) -> Option<history::NodeNaming> {
        get(&self.nodes, Collection::Nodes, node_id.as_bytes())
            .ok()
            .flatten()
    }

    /// Note the storage's failure (the first one wins).
    fn fail(&self, failure: Failure) {
        let mut first = false;
        let failure = self.failure.get_or_init(|| {
            first = true;
            failure
        });
        if first {
            tracing::error!(error = %failure, "storage failed: refusing changes");
        }
    }

    /// Note an I/O error as the storage's failure (the first one wins).
    fn observe(&self, error: sled::Error) -> StoreError {
        if let sled::Error::Io(io) = &error {
            self.fail(Failure::Io(describe_io(io)));
        }
        error.into()
    }

    fn insert_token_unflushed(&self, hash: &str, record: &TokenRecord) -> Result<(), StoreError> {
        self.tokens.insert(hash.as_bytes(), encode(record))?;
        Ok(())
    }
}

#[async_trait]
impl Durability for SledStore {
    /// Group commit: callers take a ticket; one of them at a time flushes,
    /// covering every ticket taken before its flush started, and the others
    /// return as soon as a flush that covers theirs has finished. Besides
    /// saving work under load, this keeps at most one flush in sled's small
    /// I/O thread pool: many concurrent `flush_async` calls fill that pool
    /// with flushes that wait for a log write queued behind them in the same
    /// pool, and every write of the process stops (seen with 64 agents
    /// enrolling at once).
    async fn flush(&self) -> Result<(), StoreError> {
        let commits = &self.commits;
        let ticket = commits.requested.fetch_add(1, Ordering::SeqCst) + 1;
        let _turn = commits.turn.lock().await;
        if commits.completed.load(Ordering::SeqCst) >= ticket {
            // A flush that started after this caller's writes has finished.
            return self.ensure_writable();
        }
        let target = commits.requested.load(Ordering::SeqCst);
        self.db.flush_async().await.map_err(|e| self.observe(e))?;
        // A flush into files whose names are gone (`rm -rf state`) or now
        // name other files succeeds, and is lost at the next start: check
        // after it, before any caller it covers hears "done".
        self.check_identity()?;
        commits.completed.fetch_max(target, Ordering::SeqCst);
        Ok(())
    }

    fn flush_blocking(&self) -> Result<(), StoreError> {
        self.db.flush().map_err(|e| self.observe(e))?;
        Ok(())
    }

    fn failure(&self) -> Option<Failure> {
        self.failure.get().cloned()
    }

    fn check_identity(&self) -> Result<(), StoreError> {
        if let Some(reason) = self.identity.check() {
            self.fail(Failure::Replaced(reason));
        }
        self.ensure_writable()
    }

    fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }
}

#[async_trait]
impl NodeRecords for SledStore {
    async fn insert_token(&self, hash: &str, record: &TokenRecord) -> Result<(), StoreError> {
        self.insert_token_unflushed(hash, record)?;
        self.flush().await
    }

    fn get_token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        get(&self.tokens, Collection::Tokens, hash.as_bytes())
    }

    async fn enroll(
        &self,
        token_hash: &str,
        now_ms: u64,
        node: NodeRecord,
    ) -> Result<NodeRecord, EnrollError> {
        let result =
            (&self.tokens, &self.nodes, &self.node_names).transaction(|(tokens, nodes, names)| {
                let abort = |r: EnrollRejection| {
                    ConflictableTransactionError::Abort(EnrollError::Rejected(r))
                };
                let storage =
                    |e: StoreError| ConflictableTransactionError::Abort(EnrollError::Store(e));
                let Some(bytes) = tokens.get(token_hash.as_bytes())? else {
                    return Err(abort(EnrollRejection::UnknownToken));
                };
                let mut token: TokenRecord =
                    decode(Collection::Tokens, token_hash.as_bytes(), &bytes).map_err(storage)?;
                // An agent retrying an enrollment that committed gets the
                // node it created, whatever uses the token has left now.
                let taken = names.get(node.name.as_bytes())?;
                if let Some(existing_id) = &taken
                    && let Some(existing) = nodes.get(existing_id)?
                {
                    let existing: NodeRecord =
                        decode(Collection::Nodes, existing_id, &existing).map_err(storage)?;
                    if existing.is_retried_by(token_hash, &node.name, &node.enroll_key) {
                        return Ok(existing);
                    }
                }
                if now_ms >= token.expires_at_ms {
                    return Err(abort(EnrollRejection::Expired(
                        hotswap_common::timefmt::rfc3339_from_ms(token.expires_at_ms),
                    )));
                }
                if token.uses_left == 0 {
                    return Err(abort(EnrollRejection::UsedUp(token.uses_total)));
                }
                if let Some(existing) = taken {
                    return Err(abort(EnrollRejection::NameTaken {
                        name: node.name.clone(),
                        id: String::from_utf8_lossy(&existing).into_owned(),
                    }));
                }
                token.uses_left -= 1;
                let mut record = node.clone();
                record.forced_labels = token.labels.clone();
                record.labels.extend(token.labels.clone());
                tokens.insert(token_hash.as_bytes(), encode(&token))?;
                nodes.insert(record.id.as_bytes(), encode(&record))?;
                names.insert(record.name.as_bytes(), record.id.as_bytes())?;
                Ok(record)
            });
        let node = match result {
            Ok(record) => record,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(EnrollError::Store(e.into())),
        };
        self.flush().await?;
        Ok(node)
    }

    fn get_node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError> {
        get(&self.nodes, Collection::Nodes, id.as_bytes())
    }

    fn has_node(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.nodes.contains_key(id.as_bytes())?)
    }

    fn node_id_by_name(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .node_names
            .get(name.as_bytes())?
            .map(|id| String::from_utf8_lossy(&id).into_owned()))
    }

    fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        scan(&self.nodes, Collection::Nodes)
    }

    async fn put_node(&self, record: &NodeRecord) -> Result<(), StoreError> {
        self.nodes.insert(record.id.as_bytes(), encode(record))?;
        self.flush().await
    }

    async fn update_node(
        &self,
        id: &str,
        change: Change<'_, NodeRecord>,
    ) -> Result<Option<NodeRecord>, StoreError> {
        let key = id.as_bytes();
        let mut corrupt = None;
        let updated = self.nodes.update_and_fetch(key, |old| {
            let old = old?;
            match decode::<NodeRecord>(Collection::Nodes, key, old) {
                Ok(mut record) => {
                    if change(&mut record) {
                        Some(encode(&record))
                    } else {
                        Some(old.to_vec())
                    }
                }
                // Leave what is there; the error is reported below.
                Err(e) => {
                    corrupt = Some(e);
                    Some(old.to_vec())
                }
            }
        })?;
        if let Some(e) = corrupt {
            return Err(e);
        }
        let Some(bytes) = updated else {
            return Ok(None);
        };
        self.flush().await?;
        decode(Collection::Nodes, key, &bytes).map(Some)
    }

    async fn exhaust_token(&self, hash: &str) -> Result<(), StoreError> {
        if let Some(mut token) = self.get_token(hash)?
            && token.uses_left > 0
        {
            token.uses_left = 0;
            self.insert_token(hash, &token).await?;
        }
        Ok(())
    }

    async fn remove_node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError> {
        let result = (&self.nodes, &self.node_names).transaction(|(nodes, names)| {
            let Some(bytes) = nodes.remove(id.as_bytes())? else {
                return Ok(None);
            };
            let record: NodeRecord = decode(Collection::Nodes, id.as_bytes(), &bytes)
                .map_err(ConflictableTransactionError::Abort)?;
            names.remove(record.name.as_bytes())?;
            Ok(Some(record))
        });
        let removed = match result {
            Ok(removed) => removed,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(e.into()),
        };
        self.flush().await?;
        Ok(removed)
    }
}

#[async_trait]
impl UserRecords for SledStore {
    fn get_user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        get(&self.users, Collection::Users, name.as_bytes())
    }

    fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        scan(&self.users, Collection::Users)
    }

    async fn put_user(&self, record: &UserRecord) -> Result<(), StoreError> {
        self.users.insert(record.name.as_bytes(), encode(record))?;
        self.flush().await
    }

    fn put_user_blocking(&self, record: &UserRecord) -> Result<(), StoreError> {
        self.users.insert(record.name.as_bytes(), encode(record))?;
        self.flush_blocking()
    }

    async fn create_user(&self, record: &UserRecord) -> Result<bool, StoreError> {
        let created = self
            .users
            .compare_and_swap(record.name.as_bytes(), None::<&[u8]>, Some(encode(record)))?
            .is_ok();
        self.flush().await?;
        Ok(created)
    }
}

#[async_trait]
impl ArtifactRecords for SledStore {
    fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        scan(&self.keys, Collection::Keys)
    }

    fn get_key(&self, name: &str) -> Result<Option<KeyRecord>, StoreError> {
        get(&self.keys, Collection::Keys, name.as_bytes())
    }

    async fn insert_key(&self, record: &KeyRecord) -> Result<Option<KeyRecord>, StoreError> {
        let previous = self.keys.compare_and_swap(
            record.name.as_bytes(),
            None as Option<&[u8]>,
            Some(encode(record)),
        )?;
        match previous {
            Ok(()) => {
                self.flush().await?;
                Ok(None)
            }
            Err(current) => current
                .current
                .map(|bytes| decode(Collection::Keys, record.name.as_bytes(), &bytes))
                .transpose(),
        }
    }

    async fn put_key(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.keys.insert(record.name.as_bytes(), encode(record))?;
        self.flush().await
    }

    fn get_artifact(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Option<ArtifactRecord>, StoreError> {
        get(
            &self.artifacts,
            Collection::Artifacts,
            &artifact_key(name, version),
        )
    }

    fn module_versions(&self, name: &str) -> Result<Vec<ArtifactRecord>, StoreError> {
        let mut prefix = name.as_bytes().to_vec();
        prefix.push(0);
        self.artifacts
            .scan_prefix(&prefix)
            .map(|entry| {
                let (key, value) = entry?;
                decode(Collection::Artifacts, &key, &value)
            })
            .collect()
    }

    fn list_artifacts(&self) -> Result<Vec<ArtifactRecord>, StoreError> {
        scan(&self.artifacts, Collection::Artifacts)
    }

    async fn insert_artifact(
        &self,
        record: &ArtifactRecord,
    ) -> Result<Option<ArtifactRecord>, StoreError> {
        let key = artifact_key(&record.name, &record.version);
        let previous =
            self.artifacts
                .compare_and_swap(&key, None as Option<&[u8]>, Some(encode(record)))?;
        match previous {
            Ok(()) => {
                self.flush().await?;
                Ok(None)
            }
            Err(current) => current
                .current
                .map(|bytes| decode(Collection::Artifacts, &key, &bytes))
                .transpose(),
        }
    }

    async fn update_artifact(
        &self,
        name: &str,
        version: &str,
        change: Change<'_, ArtifactRecord>,
    ) -> Result<Option<ArtifactRecord>, StoreError> {
        let key = artifact_key(name, version);
        let mut corrupt = None;
        let updated = self.artifacts.update_and_fetch(&key, |old| {
            let old = old?;
            match decode::<ArtifactRecord>(Collection::Artifacts, &key, old) {
                Ok(mut record) => {
                    if change(&mut record) {
                        Some(encode(&record))
                    } else {
                        Some(old.to_vec())
                    }
                }
                // Leave what is there; the error is reported below.
                Err(e) => {
                    corrupt = Some(e);
                    Some(old.to_vec())
                }
            }
        })?;
        if let Some(e) = corrupt {
            return Err(e);
        }
        let Some(bytes) = updated else {
            return Ok(None);
        };
        self.flush().await?;
        decode(Collection::Artifacts, &key, &bytes).map(Some)
    }
}

#[async_trait]
impl DesiredRecords for SledStore {
    fn get_desired(&self, node_id: &str) -> Result<DesiredRecord, StoreError> {
        Ok(self.desired_of(node_id)?.unwrap_or_default())
    }

    /// Desired-state writes are serialized by the revision lock, so each
    /// gets the next revision and watchers hear them in revision order.
    fn update_desired_recorded(
        &self,
        node_id: &str,
        change: Change<'_, DesiredRecord>,
        origin: &HistoryOrigin,
    ) -> Result<DesiredRecord, StoreError> {
        let key = node_id.as_bytes();
        let mut revision = self
            .desired_revision
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.fold_locked()?;
        let before: DesiredRecord =
            get(&self.desired, Collection::Desired, key)?.unwrap_or_default();
        let mut record = before.clone();
        if !change(&mut record) {
            return Ok(record);
        }
        let next = *revision + 1;
        record.generation += 1;
        record.revision = next;
        let node = self.node_for_history(node_id);
        let entry = history::record_of(node_id, node.as_ref(), &before, Some(&record), origin);
        self.write_desired_with_history(node_id, next, Some(&record), entry.as_ref())?;
        *revision = next;
        if self.desired_changes.receiver_count() > 0 {
            let _gone_meanwhile = self.desired_changes.send(DesiredUpdate {
                node_id: node_id.to_string(),
                revision: record.revision,
                record: Some(record.clone()),
            });
        }
        Ok(record)
    }

    async fn remove_desired_recorded(
        &self,
        node_id: &str,
        origin: &HistoryOrigin,
    ) -> Result<(), StoreError> {
        {
            let mut revision = self
                .desired_revision
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.fold_locked()?;
            let before: Option<DesiredRecord> =
                get(&self.desired, Collection::Desired, node_id.as_bytes())?;
            if let Some(before) = before {
                let removed_at = *revision + 1;
                let node = self.node_for_history(node_id);
                let entry = history::record_of(node_id, node.as_ref(), &before, None, origin).map(
                    |entry| HistoryRecord {
                        seq: removed_at,
                        ..entry
                    },
                );
                self.write_desired_with_history(node_id, removed_at, None, entry.as_ref())?;
                *revision = removed_at;
                let _no_watchers = self.desired_changes.send(DesiredUpdate {
                    node_id: node_id.to_string(),
                    record: None,
                    revision: removed_at,
                });
            }
        }
        self.flush().await
    }

    fn list_history(&self) -> Result<Vec<HistoryRecord>, StoreError> {
        let mut records = Vec::new();
        for entry in self.history.iter() {
            let (key, value) = entry?;
            records.extend(decode_history(&key, &value)?);
        }
        Ok(records)
    }

    async fn trim_history(&self, before_ms: u64) -> Result<u64, StoreError> {
        let mut removed = 0;
        let mut trimmed = self.history_trimmed()?.unwrap_or_default();
        for entry in self.history.iter() {
            let (key, value) = entry?;
            let records = decode_history(&key, &value)?;
            // Seq order is time order on one steady clock: the first
            // record young enough ends the trim. A run goes whole, once its
            // newest record is old enough.
            let Some(newest) = records.last() else {
                continue;
            };
            if records.iter().any(|r| r.time_ms >= before_ms) {
                break;
            }
            self.history.remove(key).map_err(|e| self.observe(e))?;
            trimmed.seq = trimmed.seq.max(newest.seq);
            removed += records.len() as u64;
        }
        if removed > 0 {
            trimmed.before_ms = trimmed.before_ms.max(before_ms);
            self.meta
                .insert(HISTORY_TRIMMED, encode(&trimmed))
                .map_err(|e| self.observe(e))?;
            self.flush().await?;
        }
        Ok(removed)
    }

    fn history_trimmed(&self) -> Result<Option<HistoryTrimmed>, StoreError> {
        get(&self.meta, Collection::History, HISTORY_TRIMMED)
    }

    async fn flush_desired(&self) -> Result<(), StoreError> {
        self.flush().await
    }

    fn desired_revision(&self) -> Result<Revision, StoreError> {
        Ok(*self
            .desired_revision
            .lock()
            .unwrap_or_else(|e| e.into_inner()))
    }

    fn watch_desired(&self, after: Revision) -> Result<DesiredWatch, StoreError> {
        // Subscribe under the write lock: every change up to now is in the
        // backlog and every later one comes live.
        let live = {
            let _writes = self
                .desired_revision
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.desired_changes.subscribe()
        };
        // The pending run before `desired`: a fold in between moves its
        // records there, so each is seen at least once; a node seen twice
        // keeps its newer record.
        let mut newest: std::collections::HashMap<String, DesiredRecord> =
            self.pending_records()?.into_iter().collect();
        for entry in self.desired.iter() {
            let (key, value) = entry?;
            let record: DesiredRecord = decode(Collection::Desired, &key, &value)?;
            let node_id = String::from_utf8_lossy(&key).into_owned();
            if newest
                .get(&node_id)
                .is_none_or(|seen| seen.revision < record.revision)
            {
                newest.insert(node_id, record);
            }
        }
        let mut backlog: Vec<DesiredUpdate> = newest
            .into_iter()
            .filter(|(_, record)| record.revision > after)
            .map(|(node_id, record)| DesiredUpdate {
                node_id,
                revision: record.revision,
                record: Some(record),
            })
            .collect();
        backlog.sort_by_key(|change| change.revision);
        Ok(DesiredWatch::new(backlog, live, after))
    }
}

#[async_trait]
impl DeploymentRecords for SledStore {
    /// One value per deployment, the whole record, as always: sled has no
    /// request limit to split for.
    fn put_deployment_unflushed(
        &self,
        id: &str,
        record: &dyn DeploymentDocument,
    ) -> Result<(), StoreError> {
        self.deployments.insert(id.as_bytes(), record.whole())?;
        Ok(())
    }

    fn list_stored_deployments(&self) -> Result<Vec<(String, StoredDeployment)>, StoreError> {
        Ok(scan_bytes(&self.deployments)?
            .into_iter()
            .map(|(id, bytes)| (id, StoredDeployment::Whole(bytes)))
            .collect())
    }

    async fn put_pipeline_bytes(&self, id: &str, record: Vec<u8>) -> Result<(), StoreError> {
        self.pipelines.insert(id.as_bytes(), record)?;
        self.flush().await
    }

    fn list_pipeline_bytes(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        scan_bytes(&self.pipelines)
    }

    async fn flush_deployments(&self) -> Result<(), StoreError> {
        self.flush().await
    }
}

#[async_trait]
impl FreezeRecords for SledStore {
    async fn put_freeze(&self, record: &FreezeRecord) -> Result<(), StoreError> {
        self.freezes.insert(record.id.as_bytes(), encode(record))?;
        self.flush().await
    }

    fn list_freezes(&self) -> Result<Vec<FreezeRecord>, StoreError> {
        scan(&self.freezes, Collection::Freezes)
    }

    async fn remove_freeze(&self, id: &str) -> Result<Option<FreezeRecord>, StoreError> {
        let removed = self
            .freezes
            .remove(id.as_bytes())?
            .map(|bytes| decode(Collection::Freezes, id.as_bytes(), &bytes))
            .transpose()?;
        self.flush().await?;
        Ok(removed)
    }
}

impl Storage for SledStore {
    fn log(&self, name: LogName) -> Result<Arc<dyn SeqLog>, StoreError> {
        Ok(match name {
            LogName::Events => self.events.clone(),
            LogName::Audit => self.audit.clone(),
        })
    }

    /// Everything is read and decided first, so a failed read changes
    /// nothing; then the counter, the history records as one run (one
    /// value, under the first record's seq) and the desired states (one
    /// desired run when they are many, see `runs`, else one sled batch) are
    /// written in that order, the order of
    /// [`SledStore::write_desired_with_history`] (the run and the batch are
    /// each atomic in sled, and [`SledStore::drop_unwritten_history`] drops
    /// the run of a desired batch a crash lost).
    fn update_desired_batch(
        &self,
        changes: &[(&str, Change<'_, DesiredRecord>)],
        origin: &HistoryOrigin,
    ) -> Result<Vec<Option<DesiredRecord>>, StoreError> {
        let mut revision = self
            .desired_revision
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Nothing is written over a pending run: it is folded first (the
        // registry folds each run once it is handed over, so there is
        // normally none).
        self.fold_locked()?;
        let mut next = *revision;
        let mut answers: Vec<Option<DesiredRecord>> = Vec::with_capacity(changes.len());
        // Where each node's newest record in `answers` is, for a node
        // changed twice.
        let mut newest: std::collections::HashMap<&str, usize> =
            std::collections::HashMap::with_capacity(changes.len());
        // Each changed node's newest record, encoded once.
        let mut desired: std::collections::HashMap<String, Vec<u8>> =
            std::collections::HashMap::new();
        let mut entries: Vec<HistoryRecord> = Vec::new();
        let mut updates = Vec::new();
        for &(node_id, change) in changes {
            let key = node_id.as_bytes();
            // The node record, read once: whether the node is enrolled, and
            // its name and environment for the history.
            let Some(node) = self.nodes.get(key).map_err(|e| self.observe(e))? else {
                answers.push(None);
                continue;
            };
            let naming: Option<history::NodeNaming> = serde_json::from_slice(&node).ok();
            let before = match newest.get(node_id).and_then(|&i| answers[i].clone()) {
                Some(record) => record,
                None => get(&self.desired, Collection::Desired, key)?.unwrap_or_default(),
            };
            let mut record = before.clone();
            if change(&mut record) {
                next += 1;
                record.generation += 1;
                record.revision = next;
                if let Some(entry) =
                    history::record_of(node_id, naming.as_ref(), &before, Some(&record), origin)
                {
                    entries.push(entry);
                }
                desired.insert(node_id.to_string(), encode(&record));
                updates.push(DesiredUpdate {
                    node_id: node_id.to_string(),
                    revision: next,
                    record: Some(record.clone()),
                });
            }
            newest.insert(node_id, answers.len());
            answers.push(Some(record));
        }
        if next == *revision {
            return Ok(answers);
        }
        self.meta
            .insert(DESIRED_REVISION, &next.to_be_bytes())
            .map_err(|e| self.observe(e))?;
        // The batch's history as one value: a sled insert costs about as
        // much as the record it writes, and a wave writes a thousand.
        if let (Some(first), Some(run)) = (entries.first(), encode_history(&entries)) {
            self.history
                .insert(first.seq.to_be_bytes(), run)
                .map_err(|e| self.observe(e))?;
        }
        if desired.len() >= self.run_min {
            // One value for the lot (see `runs`): a sled insert costs about
            // as much per key as the record it writes.
            let run = runs::PendingRun::new(*revision + 1, desired);
            self.desired_runs
                .insert(run.key(), run.value())
                .map_err(|e| self.observe(e))?;
            *self.lock_pending() = Some(run);
        } else {
            let mut batch = sled::Batch::default();
            for (node_id, record) in desired {
                batch.insert(node_id.as_bytes(), record);
            }
            self.desired
                .apply_batch(batch)
                .map_err(|e| self.observe(e))?;
        }
        *revision = next;
        if self.desired_changes.receiver_count() > 0 {
            for update in updates {
                let _gone_meanwhile = self.desired_changes.send(update);
            }
        }
        Ok(answers)
    }

    fn fold_desired(&self) -> Result<(), StoreError> {
        let _writes = self
            .desired_revision
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        self.fold_locked()
    }
}

/// A sequence log in a tree keyed by the big-endian sequence number, so key
/// order is sequence order.
struct SledLog {
    tree: sled::Tree,
}

fn seq_of(key: &[u8]) -> u64 {
    counter(Some(key))
}

/// The only writer is this process, and the owner numbers under its lock:
/// a proposed number is always the one stored.
#[async_trait]
impl SeqLog for SledLog {
    fn append(&self, seq: u64, encode: Encode) -> Result<(), StoreError> {
        self.tree.insert(seq.to_be_bytes(), encode(seq))?;
        Ok(())
    }

    async fn append_exact(&self, seq: u64, records: Vec<Vec<u8>>) -> Result<bool, StoreError> {
        let stored = self.tree.transaction(|tree| {
            for (i, record) in records.iter().enumerate() {
                let key = (seq + i as u64).to_be_bytes();
                if tree.get(key)?.is_some() {
                    return Err(ConflictableTransactionError::Abort(()));
                }
                tree.insert(key.to_vec(), record.clone())?;
            }
            Ok(())
        });
        match stored {
            Ok(()) => Ok(true),
            Err(TransactionError::Abort(())) => Ok(false),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    fn follow(&self) -> Option<tokio::sync::broadcast::Receiver<(u64, Vec<u8>)>> {
        None
    }

    fn last(&self) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        Ok(self
            .tree
            .last()?
            .map(|(key, value)| (seq_of(&key), value.to_vec())))
    }

    fn first_seq(&self) -> Result<Option<u64>, StoreError> {
        Ok(self.tree.first()?.map(|(key, _)| seq_of(&key)))
    }

    fn count(&self) -> Result<u64, StoreError> {
        Ok(self.tree.len() as u64)
    }

    fn range(&self, from: u64, direction: Direction) -> LogIter<'_> {
        let range = self.tree.range(from.to_be_bytes()..);
        let entry = |entry: sled::Result<(sled::IVec, sled::IVec)>| {
            entry
                .map(|(key, value)| (seq_of(&key), value.to_vec()))
                .map_err(StoreError::from)
        };
        match direction {
            Direction::Forward => Box::new(range.map(entry)),
            Direction::Backward => Box::new(range.rev().map(entry)),
        }
    }

    fn remove_through(&self, seq: u64) -> Result<u64, StoreError> {
        let old: Vec<_> = self
            .tree
            .range(..=seq.to_be_bytes())
            .keys()
            .collect::<Result<_, _>>()?;
        let mut removed = 0;
        for key in old {
            if self.tree.remove(key)?.is_some() {
                removed += 1;
            }
        }
        Ok(removed)
    }

    #[cfg(test)]
    fn overwrite(&self, seq: u64, record: &[u8]) -> Result<(), StoreError> {
        self.tree.insert(seq.to_be_bytes(), record)?;
        Ok(())
    }

    #[cfg(test)]
    fn remove(&self, seq: u64) -> Result<(), StoreError> {
        self.tree.remove(seq.to_be_bytes())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;
    use crate::store::reopen_for_tests as reopen;

    /// Ad hoc freezes survive a reopen, and removing one says whether it was there.
    #[tokio::test]
    async fn freezes_are_kept_listed_and_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state");
        let freeze = FreezeRecord {
            id: "fz-1".into(),
            environment: "qa".into(),
            from_ms: 1,
            until_ms: 2,
            reason: "release party".into(),
            created_by: "dan".into(),
        };
        {
            let store = Store::open(&path, 1 << 20).expect("open");
            store.put_freeze(&freeze).await.expect("put");
        }
        let store = Store::open(&path, 1 << 20).expect("reopen");
        assert_eq!(
            store.list_freezes().expect("list"),
            std::slice::from_ref(&freeze)
        );
        assert_eq!(
            store.remove_freeze("fz-1").await.expect("remove"),
            Some(freeze)
        );
        assert_eq!(
            store.remove_freeze("fz-1").await.expect("remove again"),
            None
        );
        assert!(store.list_freezes().expect("list").is_empty());
    }

    /// The flush of a write made after the database directory was deleted
    /// fails, so no caller acknowledges it; so does every later change.
    #[tokio::test]
    async fn a_write_after_the_database_was_deleted_is_never_acknowledged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state");
        let store = Store::open(&path, 1 << 20).expect("open");
        store
            .insert_token("a", &token(1, u64::MAX))
            .await
            .expect("before");
        std::fs::remove_dir_all(&path).expect("rm -rf");
        let err = store
            .insert_token("b", &token(1, u64::MAX))
            .await
            .expect_err("acknowledged into a deleted database");
        assert!(matches!(err, StoreError::Replaced(_)), "{err}");
        assert!(
            err.to_string().contains("was deleted while running"),
            "{err}"
        );
        assert!(matches!(
            store.ensure_writable(),
            Err(StoreError::Replaced(_))
        ));
        assert!(!store.failure().is_some_and(|f| f.recovers_on_restart()));
    }

    /// A directory put back in place (a restore under a running process)
    /// is another directory: the open database is not the one on disk.
    #[tokio::test]
    async fn a_replaced_database_directory_is_noticed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state");
        let store = Store::open(&path, 1 << 20).expect("open");
        std::fs::rename(&path, dir.path().join("moved")).expect("move");
        std::fs::create_dir(&path).expect("new dir");
        std::fs::write(path.join("db"), b"").expect("new file");
        let err = store.check_identity().expect_err("replaced");
        assert!(
            err.to_string().contains("was replaced while running"),
            "{err}"
        );
    }

    fn set_version(version: &str) -> impl Fn(&mut DesiredRecord) -> bool + Send + Sync + '_ {
        move |record: &mut DesiredRecord| {
            let entry = record.modules.entry("hello".into()).or_default();
            if entry.version == version {
                return false;
            }
            entry.version = version.to_string();
            true
        }
    }

    /// Each desired write records its history entry under its own
    /// revision, with who and which deployment; a no-op records nothing;
    /// removals are recorded; a trim removes the old entries and notes
    /// itself; all of it survives a reopen.
    #[tokio::test]
    async fn desired_writes_record_their_history_durably() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state");
        let origin = |ms, by: &str| HistoryOrigin::new(ms, "d-1", by);
        {
            let store = Store::open(&path, 1 << 20).expect("open");
            let first = store
                .update_desired_recorded("a", &set_version("1.0.0"), &origin(10, "alice"))
                .expect("a");
            store
                .update_desired_recorded("a", &set_version("1.0.0"), &origin(11, "alice"))
                .expect("no-op");
            let second = store
                .update_desired_recorded("a", &set_version("2.0.0"), &origin(20, "bob"))
                .expect("a again");
            store
                .remove_desired_recorded("a", &origin(30, "carol"))
                .await
                .expect("remove");
            let history = store.list_history().expect("history");
            type Summary<'a> = (u64, Option<&'a str>, Option<&'a str>, &'a str, bool);
            let summary: Vec<Summary> = history
                .iter()
                .map(|r| {
                    (
                        r.seq,
                        r.changes[0].from.as_deref(),
                        r.changes[0].to.as_deref(),
                        r.by.as_str(),
                        r.removed,
                    )
                })
                .collect();
            assert_eq!(
                summary,
                [
                    (first.revision, None, Some("1.0.0"), "alice", false),
                    (second.revision, Some("1.0.0"), Some("2.0.0"), "bob", false),
                    (second.revision + 1, Some("2.0.0"), None, "carol", true),
                ]
            );
            assert_eq!(store.trim_history(15).await.expect("trim"), 1);
            assert_eq!(
                store.history_trimmed().expect("mark"),
                Some(HistoryTrimmed {
                    seq: first.revision,
                    before_ms: 15
                })
            );
        }
        let store = reopen(&path).await;
        assert_eq!(store.list_history().expect("history").len(), 2);
        assert!(store.history_trimmed().expect("mark").is_some());
    }

    /// A crash between history records and the desired states they
    /// describe (one write, or a batch) leaves the records alone on disk:
    /// the next open drops all of them, and keeps records whose writes did
    /// land.
    #[tokio::test]
    async fn a_history_record_whose_desired_write_was_lost_is_dropped_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state");
        {
            let store = SledStore::open(&path, 1 << 20).expect("open");
            let origin = HistoryOrigin::new(1, "d-1", "alice");
            let kept = store
                .update_desired_recorded("a", &set_version("1.0.0"), &origin)
                .expect("a");
            // What a crash after a batch's history records leaves: the
            // counter and the records of revisions + 1 and + 2 (nodes a and
            // b), no desired state for either.
            let first = store.list_history().expect("history")[0].clone();
            let lost = [
                HistoryRecord {
                    seq: kept.revision + 1,
                    generation: 2,
                    ..first.clone()
                },
                HistoryRecord {
                    seq: kept.revision + 2,
                    node_id: "b".into(),
                    node: "b".into(),
                    ..first
                },
            ];
            store
                .meta
                .insert(DESIRED_REVISION, &(kept.revision + 2).to_be_bytes())
                .expect("counter");
            for record in &lost {
                store
                    .history
                    .insert(record.seq.to_be_bytes(), encode(record))
                    .expect("orphan");
            }
            store.flush().await.expect("flush");
            assert_eq!(store.list_history().expect("history").len(), 3);
        }
        let store = reopen(&path).await;
        let history = store.list_history().expect("history");
        assert_eq!(history.len(), 1, "{history:?}");
        assert_eq!(history[0].generation, 1);
    }

    /// A batch's history is one value of the history tree (a run, under
    /// its first seq) that reads back as its records; a crash that lost
    /// the batch's desired states drops the run at the next open, and the
    /// records of earlier writes stay.
    #[tokio::test]
    async fn a_batch_writes_its_history_as_one_run_that_a_crash_drops_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state");
        let origin = HistoryOrigin::new(1, "d-1", "alice");
        let first = batch_change(0);
        let second = batch_change(1);
        {
            let store = enrolled_store(&path);
            let batch: Vec<(&str, Change<'_, DesiredRecord>)> =
                vec![("n0", &first), ("n1", &first), ("n2", &first)];
            store.update_desired_batch(&batch, &origin).expect("batch");
            let batch: Vec<(&str, Change<'_, DesiredRecord>)> =
                vec![("n0", &second), ("n1", &second), ("n3", &second)];
            let lost = store.update_desired_batch(&batch, &origin).expect("batch");
            assert_eq!(store.history.len(), 2, "one value per batch");
            let history = store.list_history().expect("history");
            let seqs: Vec<u64> = history.iter().map(|r| r.seq).collect();
            assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
            assert_eq!(history[3].node, "node-0");
            assert_eq!(history[5].environment, "env-1");
            // What a crash after the second run and before its desired
            // batch leaves: the desired states of the first batch.
            for (node, record) in [("n0", 1), ("n1", 2)] {
                let mut before = lost[0].clone().expect("n0");
                before.generation = 1;
                before.revision = record;
                before.modules.insert(
                    "web".into(),
                    crate::store::DesiredModuleRecord {
                        version: "1.0.0".into(),
                        ..Default::default()
                    },
                );
                store
                    .desired
                    .insert(node.as_bytes(), encode(&before))
                    .expect("old state");
            }
            store.desired.remove("n3").expect("old state");
            store.flush().await.expect("flush");
        }
        let store = reopen(&path).await;
        let history = store.list_history().expect("history");
        let seqs: Vec<u64> = history.iter().map(|r| r.seq).collect();
        assert_eq!(seqs, [1, 2, 3], "{history:?}");
    }

    /// The seqs of the stored history, in order.
    fn history_seqs<S: DesiredRecords + ?Sized>(store: &S) -> Vec<u64> {
        let history = store.list_history().expect("history");
        history.iter().map(|r| r.seq).collect()
    }

    /// The desired record of each of `nodes`, by version of module "web".
    fn web_versions<S: DesiredRecords + ?Sized>(store: &S, nodes: &[&str]) -> Vec<String> {
        nodes
            .iter()
            .map(|n| {
                let record = store.get_desired(n).expect("get");
                record
                    .modules
                    .get("web")
                    .map_or_else(String::new, |m| m.version.clone())
            })
            .collect()
    }

    /// What `desired` itself holds for `node` (no pending run).
    fn in_tree(store: &SledStore, node: &str) -> Option<DesiredRecord> {
        get(&store.desired, Collection::Desired, node.as_bytes()).expect("get")
    }

    /// A batch of at least the run size is one value of `desired_runs` and
    /// a pending run that every read sees; the fold moves it into one key
    /// per node and removes the value. A smaller batch writes its keys.
    #[tokio::test]
    async fn a_large_batch_is_one_run_until_it_is_folded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = enrolled_store(&dir.path().join("state"));
        store.run_min = 3;
        let origin = HistoryOrigin::new(10, "d-1", "alice");
        let change = batch_change(0);
        let small: Vec<(&str, Change<'_, DesiredRecord>)> = vec![("n0", &change), ("n1", &change)];
        store.update_desired_batch(&small, &origin).expect("batch");
        assert!(store.desired_runs.is_empty());
        assert!(in_tree(&store, "n1").is_some());

        let change = batch_change(1);
        let large: Vec<(&str, Change<'_, DesiredRecord>)> = vec![
            ("n0", &change),
            ("n1", &change),
            ("n2", &change),
            ("n4", &change),
        ];
        let answers = store.update_desired_batch(&large, &origin).expect("batch");
        assert!(answers[3].is_none(), "n4 is not enrolled");
        assert_eq!(store.desired_runs.len(), 1);
        assert_eq!(
            store.desired_runs.first().expect("runs").expect("a run").0,
            answers[0].as_ref().expect("n0").revision.to_be_bytes(),
            "keyed by the batch's first revision"
        );
        // `desired` still has the first batch; every read has the second.
        let old = in_tree(&store, "n0").expect("n0");
        assert_eq!(old.modules["web"].version, "1.0.0");
        assert!(in_tree(&store, "n2").is_none());
        assert_eq!(
            web_versions(&store, &["n0", "n1", "n2", "n3"]),
            ["2.0.0", "2.0.0", "2.0.0", ""]
        );
        let mut watch = store.watch_desired(old.revision).expect("watch");
        let mut backlog: Vec<(String, u64)> = Vec::new();
        for _ in 0..3 {
            let update = watch.next().await.expect("update");
            backlog.push((update.node_id, update.revision));
        }
        let more = tokio::time::timeout(std::time::Duration::from_millis(20), watch.next()).await;
        assert!(more.is_err(), "nothing after the backlog: {more:?}");
        let revisions: Vec<u64> = answers[..3]
            .iter()
            .map(|a| a.as_ref().expect("enrolled").revision)
            .collect();
        assert_eq!(
            backlog,
            [
                ("n0".to_string(), revisions[0]),
                ("n1".to_string(), revisions[1]),
                ("n2".to_string(), revisions[2]),
            ],
            "each pending record once, in revision order"
        );
        assert_eq!(store.list_history().expect("history").len(), 5);

        store.fold_desired().expect("fold");
        assert!(store.desired_runs.is_empty());
        assert!(store.lock_pending().is_none());
        for (node, revision) in ["n0", "n1", "n2"].iter().zip(&revisions) {
            let record = in_tree(&store, node).expect("folded");
            assert_eq!(record.revision, *revision);
            assert_eq!(record.modules["web"].version, "2.0.0");
        }
        store
            .fold_desired()
            .expect("a second fold has nothing to do");
    }

    /// A crash after a run was flushed and before its fold reached the
    /// disk: the next open folds it, and its history records stay.
    #[tokio::test]
    async fn a_run_not_folded_before_a_crash_is_folded_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state");
        let written = {
            let mut store = enrolled_store(&path);
            store.run_min = 2;
            let change = batch_change(0);
            let batch: Vec<(&str, Change<'_, DesiredRecord>)> =
                vec![("n0", &change), ("n1", &change), ("n2", &change)];
            let written = store
                .update_desired_batch(&batch, &HistoryOrigin::new(10, "d-1", "alice"))
                .expect("batch");
            store.flush().await.expect("flush");
            assert!(in_tree(&store, "n0").is_none(), "not folded");
            written
        };
        let store = reopen(&path).await;
        for (node, answer) in ["n0", "n1", "n2"].iter().zip(&written) {
            let record = store.get_desired(node).expect("get");
            assert_eq!(Some(&record), answer.as_ref(), "{node}");
        }
        let seqs = history_seqs(&*store);
        assert_eq!(
            seqs,
            [1, 2, 3],
            "the run's history is kept: its writes landed"
        );
        assert_eq!(store.desired_revision().expect("revision"), 3);
    }

    /// A run that cannot be read stops the open with an error naming its
    /// tree and revision.
    #[tokio::test]
    async fn an_unreadable_run_is_refused_at_open_by_its_revision() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state");
        {
            let store = enrolled_store(&path);
            store
                .desired_runs
                .insert(42u64.to_be_bytes(), b"[[\"n0\",{not json".as_slice())
                .expect("run");
            store.flush().await.expect("flush");
        }
        // The lock of the database just closed may be held for a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let (tree, key, reason) = loop {
            match SledStore::open(&path, 1 << 20) {
                Err(StoreError::Corrupt { tree, key, reason }) => break (tree, key, reason),
                Err(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("unexpected error: {e}"),
                Ok(_) => panic!("a corrupt run was accepted"),
            }
        };
        assert_eq!((tree, key.as_str()), ("desired_runs", "42"));
        assert!(reason.contains("desired run"), "{reason}");
    }

    /// Every other desired write folds the pending run first, so neither a
    /// later single write nor a removal of one of its nodes is undone by
    /// the run, now or after a restart; a run stored with a record older
    /// than its node's is not folded over it at open.
    #[tokio::test]
    async fn later_writes_are_not_undone_by_a_pending_run() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state");
        {
            let mut store = enrolled_store(&path);
            store.run_min = 2;
            let change = batch_change(0);
            let batch: Vec<(&str, Change<'_, DesiredRecord>)> =
                vec![("n0", &change), ("n1", &change), ("n2", &change)];
            let origin = HistoryOrigin::new(10, "d-1", "alice");
            store.update_desired_batch(&batch, &origin).expect("batch");
            store
                .remove_desired_recorded("n1", &origin)
                .await
                .expect("remove");
            assert!(store.lock_pending().is_none(), "folded by the removal");
            assert!(in_tree(&store, "n1").is_none());
            assert!(in_tree(&store, "n0").is_some());

            store.update_desired_batch(&batch, &origin).expect("batch");
            assert_eq!(
                store.lock_pending().as_ref().map(|run| run.key()),
                None,
                "n0 and n2 are unchanged: only n1, below the run size"
            );
            let change = batch_change(1);
            let batch: Vec<(&str, Change<'_, DesiredRecord>)> =
                vec![("n0", &change), ("n1", &change), ("n2", &change)];
            store.update_desired_batch(&batch, &origin).expect("batch");
            assert!(store.lock_pending().is_some());
            let single = store
                .update_desired_recorded("n2", &set_version("9.9.9"), &origin)
                .expect("single");
            assert!(store.lock_pending().is_none(), "folded by the single write");
            assert_eq!(store.get_desired("n2").expect("n2"), single);
            // A run stored again as if its fold were lost: it is older
            // than n2's record and must not win at open.
            let stale: Vec<(String, DesiredRecord)> = ["n0", "n2"]
                .iter()
                .map(|n| (n.to_string(), DesiredRecord::default()))
                .collect();
            store
                .desired_runs
                .insert(1u64.to_be_bytes(), encode(&stale))
                .expect("stale run");
            store.flush().await.expect("flush");
        }
        let store = reopen(&path).await;
        assert_eq!(
            store.get_desired("n2").expect("n2").modules["hello"].version,
            "9.9.9"
        );
        assert_eq!(
            web_versions(&*store, &["n0", "n1", "n2"]),
            ["2.0.0", "2.0.0", "2.0.0"]
        );
    }

    /// A run is trimmed whole once its newest record is older than the
    /// cut, and kept whole while any of its records is not.
    #[tokio::test]
    async fn history_runs_are_trimmed_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = enrolled_store(&dir.path().join("state"));
        let change = batch_change(0);
        let other = batch_change(3);
        let batch: Vec<(&str, Change<'_, DesiredRecord>)> = vec![("n0", &change), ("n1", &change)];
        store
            .update_desired_batch(&batch, &HistoryOrigin::new(10, "d-1", "alice"))
            .expect("batch");
        let batch: Vec<(&str, Change<'_, DesiredRecord>)> = vec![("n0", &other), ("n2", &other)];
        store
            .update_desired_batch(&batch, &HistoryOrigin::new(20, "d-2", "alice"))
            .expect("batch");
        assert_eq!(store.trim_history(10).await.expect("trim"), 0);
        assert_eq!(store.trim_history(15).await.expect("trim"), 2);
        let mark = store.history_trimmed().expect("mark").expect("a mark");
        assert_eq!(mark.seq, 2);
        let seqs = history_seqs(&store);
        assert_eq!(seqs, [3, 4]);
        assert_eq!(store.trim_history(21).await.expect("trim"), 2);
        assert!(store.list_history().expect("history").is_empty());
    }

    /// One change of a batch: which node (4 and 5 are not enrolled) and
    /// what it does to its desired state.
    fn batch_change(action: u8) -> impl Fn(&mut DesiredRecord) -> bool + Send + Sync {
        move |record: &mut DesiredRecord| {
            let (module, version) = match action {
                0 => ("web", Some("1.0.0")),
                1 => ("web", Some("2.0.0")),
                2 => ("web", None),
                _ => ("db", Some("3.0.0")),
            };
            match version {
                None => record.modules.remove(module).is_some(),
                Some(v) if record.modules.get(module).is_some_and(|m| m.version == v) => false,
                Some(v) => {
                    record.modules.insert(
                        module.into(),
                        crate::store::DesiredModuleRecord {
                            version: v.into(),
                            ..Default::default()
                        },
                    );
                    true
                }
            }
        }
    }

    fn enrolled_store(path: &Path) -> SledStore {
        let store = SledStore::open(path, 1 << 20).expect("open");
        for i in 0..4 {
            let id = format!("n{i}");
            let mut record = node(&id, &format!("node-{i}"));
            record
                .labels
                .insert("environment".into(), format!("env-{}", i % 2));
            store
                .nodes
                .insert(id.as_bytes(), encode(&record))
                .expect("node");
        }
        store
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        /// A batch writes what the same changes written one at a time
        /// write (nodes that are not enrolled skipped): the same answers,
        /// desired states, history and revision, also after a reopen.
        #[test]
        fn a_desired_batch_writes_what_one_write_at_a_time_writes(
            batches in proptest::collection::vec(
                proptest::collection::vec((0u8..6, 0u8..4), 0..8),
                1..5,
            ),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let batched = enrolled_store(&dir.path().join("batched"));
            let single = enrolled_store(&dir.path().join("single"));
            for (b, batch) in batches.iter().enumerate() {
                let origin = HistoryOrigin::new(b as u64, "d-1", "alice");
                let ids: Vec<String> = batch.iter().map(|(n, _)| format!("n{n}")).collect();
                let closures: Vec<_> = batch.iter().map(|&(_, a)| batch_change(a)).collect();
                let changes: Vec<(&str, Change<'_, DesiredRecord>)> = ids
                    .iter()
                    .zip(&closures)
                    .map(|(id, f)| (id.as_str(), f as Change<'_, DesiredRecord>))
                    .collect();
                let answers = batched.update_desired_batch(&changes, &origin).expect("batch");
                let expected: Vec<Option<DesiredRecord>> = changes
                    .iter()
                    .map(|&(id, f)| {
                        single
                            .has_node(id)
                            .expect("has")
                            .then(|| single.update_desired_recorded(id, f, &origin).expect("one"))
                    })
                    .collect();
                proptest::prop_assert_eq!(answers, expected);
            }
            let state = |store: &dyn Storage| {
                let desired: Vec<DesiredRecord> = (0..6)
                    .map(|i| store.get_desired(&format!("n{i}")).expect("desired"))
                    .collect();
                (
                    desired,
                    store.list_history().expect("history"),
                    store.desired_revision().expect("revision"),
                )
            };
            let written = state(&batched);
            proptest::prop_assert_eq!(&written, &state(&single));
            batched.db.flush().expect("flush");
            drop(batched);
            // sled's flusher thread may hold the file lock for a moment
            // after the handle is dropped (see `reopen`).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let reopened = loop {
                match SledStore::open(&dir.path().join("batched"), 1 << 20) {
                    Ok(store) => break store,
                    Err(_) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_millis(20));
                    }
                    Err(e) => panic!("reopen: {e}"),
                }
            };
            proptest::prop_assert_eq!(state(&reopened), written);
        }
    }

    /// Every desired-state write gets the next store-wide revision; a
    /// write that changes nothing gets none.
    #[tokio::test]
    async fn desired_writes_get_increasing_revisions_that_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state");
        {
            let store = Store::open(&path, 1 << 20).expect("open");
            let a = store
                .update_desired("a", &set_version("1.0.0"))
                .await
                .expect("a");
            let b = store
                .update_desired("b", &set_version("1.0.0"))
                .await
                .expect("b");
            let again = store
                .update_desired("a", &set_version("1.0.0"))
                .await
                .expect("same");
            let a2 = store
                .update_desired("a", &set_version("2.0.0"))
                .await
                .expect("a2");
            assert_eq!(
                (a.revision, b.revision, again.revision, a2.revision),
                (1, 2, 1, 3)
            );
            assert_eq!((a.generation, a2.generation), (1, 2));
            assert_eq!(store.desired_revision().expect("revision"), 3);
        }
        let store = reopen(&path).await;
        assert_eq!(store.desired_revision().expect("revision"), 3);
        let c = store
            .update_desired("c", &set_version("1.0.0"))
            .await
            .expect("c");
        assert_eq!(c.revision, 4);
    }

    /// A watch from revision r delivers every change after r exactly once,
    /// in revision order: first what was already written, then live ones.
    #[tokio::test]
    async fn a_desired_watch_resumes_from_a_revision_without_gaps_or_repeats() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("state"), 1 << 20).expect("open");
        for (node, version) in [("a", "1"), ("b", "1"), ("c", "1"), ("a", "2")] {
            store
                .update_desired(node, &set_version(version))
                .await
                .expect("write");
        }
        // Revisions: a=1 (then 4), b=2, c=3. After 2: c@3 and a@4.
        let mut watch = store.watch_desired(2).expect("watch");
        let writer = store.clone();
        let live = tokio::spawn(async move {
            writer
                .update_desired("b", &set_version("2"))
                .await
                .expect("b2");
            writer.remove_desired("c").await.expect("remove c");
        });
        let mut seen = Vec::new();
        for _ in 0..4 {
            let change = tokio::time::timeout(std::time::Duration::from_secs(5), watch.next())
                .await
                .expect("a change within 5 s")
                .expect("watch open");
            let version = change
                .record
                .as_ref()
                .map(|r| r.modules["hello"].version.clone());
            seen.push((change.node_id, change.revision, version));
        }
        live.await.expect("writer");
        assert_eq!(
            seen,
            vec![
                ("c".to_string(), 3, Some("1".to_string())),
                ("a".to_string(), 4, Some("2".to_string())),
                ("b".to_string(), 5, Some("2".to_string())),
                ("c".to_string(), 6, None),
            ]
        );
    }

    fn token(uses: u32, expires_at_ms: u64) -> TokenRecord {
        TokenRecord {
            created_at_ms: 0,
            expires_at_ms,
            uses_total: uses,
            uses_left: uses,
            labels: [("environment".to_string(), "qa".to_string())].into(),
            created_by: "admin".into(),
        }
    }

    fn node(id: &str, name: &str) -> NodeRecord {
        let mut record = NodeRecord::for_tests(id, name);
        record.labels = [
            ("environment".to_string(), "dev".to_string()),
            ("zone".to_string(), "a".to_string()),
        ]
        .into();
        record.cert_not_after_ms = 2;
        record.agent_version = "0.1.0".into();
        record
    }

    /// Many callers flushing at once while enrollments run transactions: the
    /// load under which concurrent `flush_async` calls once filled sled's I/O
    /// pool and stopped every write. Every call must finish.
    #[test]
    fn concurrent_flushes_and_transactions_all_finish() {
        // On a thread of its own: a deadlock blocks the runtime's threads,
        // so only a watcher outside it can fail the test instead of hanging.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            let nodes = runtime.block_on(async {
                let dir = tempfile::tempdir().expect("tempdir");
                let store = Store::open(&dir.path().join("db"), 1 << 20).expect("open");
                store
                    .insert_token("h", &token(10_000, u64::MAX))
                    .await
                    .expect("token");
                let mut tasks = tokio::task::JoinSet::new();
                for i in 0..400 {
                    let store = store.clone();
                    tasks.spawn(async move {
                        if i % 2 == 0 {
                            store
                                .enroll("h", 10, node(&format!("n{i}"), &format!("web-{i}")))
                                .await
                                .map(|_| ())
                                .map_err(|e| e.to_string())
                        } else {
                            store
                                .put_node(&node(&format!("m{i}"), &format!("db-{i}")))
                                .await
                                .map_err(|e| e.to_string())
                        }
                    });
                }
                while let Some(result) = tasks.join_next().await {
                    result.expect("task").expect("write");
                }
                store.list_nodes().expect("list").len()
            });
            let _ = done.send(nodes);
        });
        let nodes = finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("every write finishes (a timeout here is the storage deadlocked)");
        assert_eq!(nodes, 400);
    }

    #[tokio::test]
    async fn enrollment_consumes_uses_and_forces_labels() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db"), 1 << 20).expect("open");
        store
            .insert_token("h", &token(2, 1000))
            .await
            .expect("token");

        let first = store
            .enroll("h", 10, node("n1", "web-1"))
            .await
            .expect("first use");
        assert_eq!(
            first.labels.get("environment").map(String::as_str),
            Some("qa"),
            "token label wins"
        );
        assert_eq!(
            first.labels.get("zone").map(String::as_str),
            Some("a"),
            "own label kept"
        );

        let taken = store
            .enroll("h", 10, node("n2", "web-1"))
            .await
            .expect_err("same name");
        assert!(
            matches!(
                taken,
                EnrollError::Rejected(EnrollRejection::NameTaken { .. })
            ),
            "{taken}"
        );
        assert_eq!(
            store
                .get_token("h")
                .expect("get")
                .expect("exists")
                .uses_left,
            1,
            "refusal consumed nothing"
        );

        store
            .enroll("h", 10, node("n3", "web-3"))
            .await
            .expect("second use");
        let used_up = store
            .enroll("h", 10, node("n4", "web-4"))
            .await
            .expect_err("used up");
        assert_eq!(
            used_up.to_string(),
            "join token rejected: all 2 uses are used up"
        );
        assert!(
            store.get_node("n4").expect("get").is_none(),
            "nothing created on refusal"
        );
    }

    /// An agent retrying an enrollment that committed (same name, token and
    /// key; never connected) gets the node it created, even with the
    /// token's uses spent; another key, or the same once the node has
    /// connected, is no retry (and the token's one use is spent).
    #[tokio::test]
    async fn a_retried_enrollment_gets_the_node_it_created() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db"), 1 << 20).expect("open");
        store
            .insert_token("h", &token(1, 1000))
            .await
            .expect("token");
        let keyed = |id: &str, key: &str| NodeRecord {
            enroll_key: key.into(),
            token_hash: "h".into(),
            ..node(id, "web-1")
        };
        let first = store
            .enroll("h", 10, keyed("n1", "k1"))
            .await
            .expect("first");
        let retried = store
            .enroll("h", 11, keyed("n2", "k1"))
            .await
            .expect("a retry with the same key");
        assert_eq!(retried, first, "the node the first attempt created");
        assert!(store.get_node("n2").expect("get").is_none());
        assert_eq!(
            store.get_token("h").expect("get").expect("token").uses_left,
            0
        );
        let other = store
            .enroll("h", 11, keyed("n3", "k2"))
            .await
            .expect_err("another key");
        assert!(
            matches!(other, EnrollError::Rejected(EnrollRejection::UsedUp(1))),
            "{other}"
        );
        store
            .update_node("n1", &|record| {
                record.last_seen_ms = Some(12);
                true
            })
            .await
            .expect("update")
            .expect("node");
        let connected = store
            .enroll("h", 13, keyed("n4", "k1"))
            .await
            .expect_err("connected since");
        assert!(
            matches!(connected, EnrollError::Rejected(EnrollRejection::UsedUp(1))),
            "{connected}"
        );
    }

    #[tokio::test]
    async fn unknown_and_expired_tokens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db"), 1 << 20).expect("open");
        store
            .insert_token("h", &token(5, 1000))
            .await
            .expect("token");
        let err = store
            .enroll("nope", 10, node("n1", "a"))
            .await
            .expect_err("unknown");
        assert_eq!(err.to_string(), "join token rejected: unknown token");
        let err = store
            .enroll("h", 1000, node("n1", "a"))
            .await
            .expect_err("expired");
        assert!(
            err.to_string()
                .starts_with("join token rejected: expired at 1970-01-01T00:00:01"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn remove_frees_the_name_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        {
            let store = Store::open(&path, 1 << 20).expect("open");
            store
                .insert_token("h", &token(3, u64::MAX))
                .await
                .expect("token");
            store
                .enroll("h", 10, node("n1", "a"))
                .await
                .expect("enroll");
            store
                .enroll("h", 10, node("n2", "b"))
                .await
                .expect("enroll");
            let removed = store
                .remove_node("n1")
                .await
                .expect("remove")
                .expect("existed");
            assert_eq!(removed.name, "a");
        }
        let store = reopen(&path).await;
        assert!(store.get_node("n1").expect("get").is_none());
        assert_eq!(
            store.node_id_by_name("b").expect("name"),
            Some("n2".to_string())
        );
        store
            .enroll("h", 10, node("n3", "a"))
            .await
            .expect("name is free again");
    }

    #[tokio::test]
    async fn update_node_changes_in_place_and_never_revives_a_removed_node() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        let store = Store::open(&path, 1 << 20).expect("open");
        assert!(
            store
                .update_node("nobody", &|_| true)
                .await
                .expect("update")
                .is_none(),
            "an update does not create a node"
        );
        store
            .insert_token("h", &token(3, u64::MAX))
            .await
            .expect("token");
        store
            .enroll("h", 10, node("n1", "a"))
            .await
            .expect("enroll");
        let updated = store
            .update_node("n1", &|record| {
                record.last_seen_ms = Some(42);
                true
            })
            .await
            .expect("update")
            .expect("exists");
        assert_eq!(updated.last_seen_ms, Some(42));
        let unchanged = store
            .update_node("n1", &|record| {
                record.last_seen_ms = Some(7);
                false
            })
            .await
            .expect("update")
            .expect("exists");
        assert_eq!(
            unchanged.last_seen_ms,
            Some(42),
            "a declined change is not written"
        );
        // Many concurrent writers of different fields: none is lost.
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..40 {
            let store = store.clone();
            tasks.spawn(async move {
                store
                    .update_node("n1", &|record| {
                        record.labels.insert(format!("k{i}"), "v".into());
                        true
                    })
                    .await
                    .map(|r| r.is_some())
            });
        }
        while let Some(done) = tasks.join_next().await {
            assert!(done.expect("task").expect("update"), "the node exists");
        }
        let record = store.get_node("n1").expect("get").expect("exists");
        assert_eq!(
            record.labels.keys().filter(|k| k.starts_with('k')).count(),
            40,
            "{:?}",
            record.labels
        );
        store.remove_node("n1").await.expect("remove");
        assert!(
            store
                .update_node("n1", &|_| true)
                .await
                .expect("update")
                .is_none()
        );
        drop(store);
        let store = reopen(&path).await;
        assert!(store.get_node("n1").expect("get").is_none(), "not revived");
    }
}
