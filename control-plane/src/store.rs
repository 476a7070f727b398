//! Durable state in sled, behind typed methods: join tokens (by hash), node
//! records and the node-name index. Writes that a caller acknowledges are
//! flushed first (`flush`), because sled otherwise persists on a timer.
//!
//! Records are JSON: readable with any sled dump, and new fields can be added
//! with `#[serde(default)]` without a migration.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use hotswap_common::labels::Labels;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sled::Transactional;
use sled::transaction::{ConflictableTransactionError, TransactionError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{}", describe_sled(.0))]
    Sled(#[from] sled::Error),
    /// The database hit an I/O error earlier (see [`Store::failure`]).
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

/// Tickets of [`Store::flush`]'s group commit.
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
fn describe_sled(error: &sled::Error) -> String {
    match error {
        sled::Error::Io(io) => format!("storage I/O error: {}", describe_io(io)),
        other => format!("sled: {other}"),
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

/// Why an enrollment was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EnrollRejection {
    #[error("join token rejected: unknown token")]
    UnknownToken,
    #[error("join token rejected: expired at {0}")]
    Expired(String),
    #[error("join token rejected: all {0} uses are used up")]
    UsedUp(u32),
    #[error(
        "node name {name:?} is already enrolled as node {id}; remove that node first or choose another --name"
    )]
    NameTaken { name: String, id: String },
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Rejected(#[from] EnrollRejection),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub uses_total: u32,
    pub uses_left: u32,
    /// Labels forced on every node that enrolls with this token.
    pub labels: Labels,
    pub created_by: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: String,
    pub name: String,
    /// Effective labels: what the agent asked for, overridden by `forced_labels`.
    pub labels: Labels,
    /// Labels from the join token; the agent cannot change these.
    pub forced_labels: Labels,
    pub enrolled_at_ms: u64,
    /// Fingerprint of the node's current certificate; any other is refused.
    pub cert_fingerprint: String,
    pub cert_not_after_ms: u64,
    pub last_seen_ms: Option<u64>,
    pub agent_version: String,
    /// The certificate replaced by the last renewal: still accepted until it
    /// expires (or the next renewal), so connections opened with it survive.
    #[serde(default)]
    pub previous_cert_fingerprint: Option<String>,
    #[serde(default)]
    pub previous_cert_not_after_ms: u64,
    /// Hash of the join token the node enrolled with; removing the node
    /// spends what is left of it.
    #[serde(default)]
    pub token_hash: String,
}

impl NodeRecord {
    /// Whether `fingerprint` is a certificate this node may use at `now_ms`.
    pub fn accepts_certificate(&self, fingerprint: &str, now_ms: u64) -> bool {
        (fingerprint == self.cert_fingerprint && now_ms < self.cert_not_after_ms)
            || (self.previous_cert_fingerprint.as_deref() == Some(fingerprint)
                && now_ms < self.previous_cert_not_after_ms)
    }
}

/// An operator. The certificate says who the caller is; the role here says
/// what they may do, so changing it or revoking takes effect on the next call.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserRecord {
    pub name: String,
    pub role: crate::auth::Role,
    pub created_at_ms: u64,
    pub created_by: String,
    /// Only this certificate is accepted for the user.
    pub cert_fingerprint: String,
    pub cert_not_after_ms: u64,
    pub revoked_at_ms: Option<u64>,
}

/// The control plane's database.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    /// The first I/O error a write hit, or the database found deleted or
    /// replaced. sled fails every later write of an open database after an
    /// I/O error (a full disk, a failing device), and only reopening the
    /// database clears it.
    failure: Arc<OnceLock<Failure>>,
    /// Device and inode of the directory and its main file at open, checked
    /// after every flush and by the storage watcher.
    identity: Arc<Identity>,
    /// Group commit: one flush at a time serves every caller that asked
    /// before it started (see [`Store::flush`]).
    commits: Arc<GroupCommit>,
    tokens: sled::Tree,
    nodes: sled::Tree,
    node_names: sled::Tree,
    keys: sled::Tree,
    artifacts: sled::Tree,
    desired: sled::Tree,
    deployments: sled::Tree,
    pipelines: sled::Tree,
    users: sled::Tree,
}

/// What one module should be on one node.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DesiredModuleRecord {
    /// Version to run; empty keeps whatever is active.
    pub version: String,
    /// Version to stage without activating; empty for none.
    #[serde(default)]
    pub staged_version: String,
    /// W3C trace context of the deployment's "node command" span that set
    /// this entry, sent to the agent; empty when not traced.
    #[serde(default)]
    pub traceparent: String,
}

impl DesiredModuleRecord {
    /// Whether both ask the node for the same thing (trace context aside):
    /// setting an entry that only differs in it changes nothing.
    pub fn same_target(&self, other: &Self) -> bool {
        self.version == other.version && self.staged_version == other.staged_version
    }
}

/// The desired state of one node. `generation` increases with every change.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DesiredRecord {
    pub generation: u64,
    pub modules: std::collections::BTreeMap<String, DesiredModuleRecord>,
}

const TOKENS: &str = "tokens";
const NODES: &str = "nodes";
const NODE_NAMES: &str = "node_names";
const KEYS: &str = "publisher_keys";
const DESIRED: &str = "desired";
const DEPLOYMENTS: &str = "deployments";
const PIPELINES: &str = "pipelines";
const ARTIFACTS: &str = "artifacts";
const USERS: &str = "users";
/// The audit log's tree; [`crate::audit`] owns its format.
pub const AUDIT: &str = "audit";
/// The event log's tree; [`crate::events`] owns its format.
pub const EVENTS: &str = "events";

/// A publisher key the control plane trusts (or trusted, once revoked).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyRecord {
    pub name: String,
    pub key_id: String,
    pub public_key_pem: String,
    pub added_at_ms: u64,
    pub added_by: String,
    pub revoked_at_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SignatureRecord {
    pub key_id: String,
    pub signed_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    /// Hex of the 64 signature bytes.
    pub signature: String,
}

/// One stored module version. The content itself is a blob named by `digest`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArtifactRecord {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub size: u64,
    pub runtime: String,
    pub manifest: String,
    pub signatures: Vec<SignatureRecord>,
    pub pushed_at_ms: u64,
    pub pushed_by: String,
    /// Set by `module yank`: the version is known bad and may not be
    /// deployed, caught up to or set on a node (history stays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yanked: Option<YankRecord>,
}

/// Who marked a version undeployable, when and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct YankRecord {
    pub at_ms: u64,
    pub by: String,
    pub reason: String,
}

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
fn scan<T: DeserializeOwned>(tree: &sled::Tree, name: &'static str) -> Result<Vec<T>, StoreError> {
    tree.iter()
        .map(|entry| {
            let (key, value) = entry?;
            decode(name, &key, &value)
        })
        .collect()
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing our own plain structs to JSON cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(
    tree: &'static str,
    key: &[u8],
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        tree,
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}

impl Store {
    /// Open (or create) the database at `path`. Fails if another process has it open.
    pub fn open(path: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(cache_bytes)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let identity = Identity::record(path).map_err(sled::Error::Io)?;
        Ok(Self {
            identity: Arc::new(identity),
            tokens: db.open_tree(TOKENS)?,
            nodes: db.open_tree(NODES)?,
            node_names: db.open_tree(NODE_NAMES)?,
            keys: db.open_tree(KEYS)?,
            artifacts: db.open_tree(ARTIFACTS)?,
            desired: db.open_tree(DESIRED)?,
            deployments: db.open_tree(DEPLOYMENTS)?,
            pipelines: db.open_tree(PIPELINES)?,
            users: db.open_tree(USERS)?,
            db,
            failure: Arc::default(),
            commits: Arc::default(),
        })
    }

    /// Make every write so far durable.
    ///
    /// Group commit: callers take a ticket; one of them at a time flushes,
    /// covering every ticket taken before its flush started, and the others
    /// return as soon as a flush that covers theirs has finished. Besides
    /// saving work under load, this keeps at most one flush in sled's small
    /// I/O thread pool: many concurrent `flush_async` calls fill that pool
    /// with flushes that wait for a log write queued behind them in the same
    /// pool, and every write of the process stops (seen with 64 agents
    /// enrolling at once).
    pub async fn flush(&self) -> Result<(), StoreError> {
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

    /// Mark the storage failed if the database directory or its main file
    /// is no longer the one opened (device and inode recorded at open).
    pub fn check_identity(&self) -> Result<(), StoreError> {
        if let Some(reason) = self.identity.check() {
            self.fail(Failure::Replaced(reason));
        }
        self.ensure_writable()
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

    /// Why the database can take no more writes, once an I/O error made it
    /// fail: from then on nothing written is durable, whatever sled accepts
    /// in memory.
    pub fn failure(&self) -> Option<&Failure> {
        self.failure.get()
    }

    /// Refuse a change up front once the storage has failed, so it is not
    /// half applied in memory and then lost.
    pub fn ensure_writable(&self) -> Result<(), StoreError> {
        match self.failure() {
            Some(failure) => Err(failure.error()),
            None => Ok(()),
        }
    }

    /// Note an I/O error as the storage's failure (the first one wins).
    fn observe(&self, error: sled::Error) -> StoreError {
        if let sled::Error::Io(io) = &error {
            self.fail(Failure::Io(describe_io(io)));
        }
        StoreError::Sled(error)
    }

    /// A tree by name, for modules that own their format (the audit log).
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// Bytes the database occupies on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    pub async fn insert_token(&self, hash: &str, record: &TokenRecord) -> Result<(), StoreError> {
        self.tokens.insert(hash.as_bytes(), encode(record))?;
        self.flush().await
    }

    pub fn get_token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.tokens
            .get(hash.as_bytes())?
            .map(|bytes| decode(TOKENS, hash.as_bytes(), &bytes))
            .transpose()
    }

    /// Consume one use of the token and create the node, atomically: either
    /// both happen or neither. Token labels override the node's own.
    pub async fn enroll(
        &self,
        token_hash: &str,
        now_ms: u64,
        mut node: NodeRecord,
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
                    decode(TOKENS, token_hash.as_bytes(), &bytes).map_err(storage)?;
                if now_ms >= token.expires_at_ms {
                    return Err(abort(EnrollRejection::Expired(
                        hotswap_common::timefmt::rfc3339_from_ms(token.expires_at_ms),
                    )));
                }
                if token.uses_left == 0 {
                    return Err(abort(EnrollRejection::UsedUp(token.uses_total)));
                }
                if let Some(existing) = names.get(node.name.as_bytes())? {
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
        node = match result {
            Ok(record) => record,
            Err(TransactionError::Abort(e)) => return Err(e),
            Err(TransactionError::Storage(e)) => return Err(EnrollError::Store(e.into())),
        };
        self.flush().await?;
        Ok(node)
    }

    pub fn get_node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError> {
        self.nodes
            .get(id.as_bytes())?
            .map(|bytes| decode(NODES, id.as_bytes(), &bytes))
            .transpose()
    }

    /// Whether a node record exists (no decoding).
    pub fn has_node(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.nodes.contains_key(id.as_bytes())?)
    }

    pub fn node_id_by_name(&self, name: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .node_names
            .get(name.as_bytes())?
            .map(|id| String::from_utf8_lossy(&id).into_owned()))
    }

    pub fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        scan(&self.nodes, NODES)
    }

    /// Overwrite a node record (labels, last seen, agent version). The name
    /// index is unchanged: names are fixed at enrollment.
    pub async fn put_node(&self, record: &NodeRecord) -> Result<(), StoreError> {
        self.nodes.insert(record.id.as_bytes(), encode(record))?;
        self.flush().await
    }

    /// Spend whatever uses a join token has left (a removed node must not
    /// come back with the token it enrolled with).
    pub async fn exhaust_token(&self, hash: &str) -> Result<(), StoreError> {
        if let Some(mut token) = self.get_token(hash)?
            && token.uses_left > 0
        {
            token.uses_left = 0;
            self.insert_token(hash, &token).await?;
        }
        Ok(())
    }

    pub fn get_user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        self.users
            .get(name.as_bytes())?
            .map(|bytes| decode(USERS, name.as_bytes(), &bytes))
            .transpose()
    }

    pub fn list_users(&self) -> Result<Vec<UserRecord>, StoreError> {
        scan(&self.users, USERS)
    }

    pub async fn put_user(&self, record: &UserRecord) -> Result<(), StoreError> {
        self.users.insert(record.name.as_bytes(), encode(record))?;
        self.flush().await
    }

    /// Write a user and flush, from synchronous code (`init`).
    pub fn put_user_blocking(&self, record: &UserRecord) -> Result<(), StoreError> {
        self.users.insert(record.name.as_bytes(), encode(record))?;
        self.db.flush()?;
        Ok(())
    }

    /// Create a user unless the name is taken; returns false if it was.
    pub async fn create_user(&self, record: &UserRecord) -> Result<bool, StoreError> {
        let created = self
            .users
            .compare_and_swap(record.name.as_bytes(), None::<&[u8]>, Some(encode(record)))?
            .is_ok();
        self.flush().await?;
        Ok(created)
    }

    /// Delete a node and its name; returns the record if it existed.
    pub async fn remove_node(&self, id: &str) -> Result<Option<NodeRecord>, StoreError> {
        let result = (&self.nodes, &self.node_names).transaction(|(nodes, names)| {
            let Some(bytes) = nodes.remove(id.as_bytes())? else {
                return Ok(None);
            };
            let record: NodeRecord = decode(NODES, id.as_bytes(), &bytes)
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

impl Store {
    pub fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        scan(&self.keys, KEYS)
    }

    pub fn get_key(&self, name: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.keys
            .get(name.as_bytes())?
            .map(|bytes| decode(KEYS, name.as_bytes(), &bytes))
            .transpose()
    }

    /// Insert a key if its name is free; returns the existing record otherwise.
    pub async fn insert_key(&self, record: &KeyRecord) -> Result<Option<KeyRecord>, StoreError> {
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
                .map(|bytes| decode(KEYS, record.name.as_bytes(), &bytes))
                .transpose(),
        }
    }

    pub async fn put_key(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.keys.insert(record.name.as_bytes(), encode(record))?;
        self.flush().await
    }

    pub fn get_artifact(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Option<ArtifactRecord>, StoreError> {
        let key = artifact_key(name, version);
        self.artifacts
            .get(&key)?
            .map(|bytes| decode(ARTIFACTS, &key, &bytes))
            .transpose()
    }

    /// Every version of one module, in key order.
    pub fn module_versions(&self, name: &str) -> Result<Vec<ArtifactRecord>, StoreError> {
        let mut prefix = name.as_bytes().to_vec();
        prefix.push(0);
        self.artifacts
            .scan_prefix(&prefix)
            .map(|entry| {
                let (key, value) = entry?;
                decode(ARTIFACTS, &key, &value)
            })
            .collect()
    }

    pub fn list_artifacts(&self) -> Result<Vec<ArtifactRecord>, StoreError> {
        scan(&self.artifacts, ARTIFACTS)
    }

    /// Whether any stored artifact has this digest.
    pub fn has_digest(&self, digest: &str) -> Result<bool, StoreError> {
        Ok(self.list_artifacts()?.iter().any(|a| a.digest == digest))
    }

    /// Store an artifact record unless `name@version` exists. Returns the
    /// existing record when it does (the caller decides what that means).
    pub async fn insert_artifact(
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
                .map(|bytes| decode(ARTIFACTS, &key, &bytes))
                .transpose(),
        }
    }

    pub fn get_desired(&self, node_id: &str) -> Result<DesiredRecord, StoreError> {
        Ok(self
            .desired
            .get(node_id.as_bytes())?
            .map(|bytes| decode(DESIRED, node_id.as_bytes(), &bytes))
            .transpose()?
            .unwrap_or_default())
    }

    /// Apply `change` to a node's desired state and bump its generation,
    /// atomically; returns the new record. `change` returns false for "no
    /// change", which leaves the record (and generation) untouched.
    /// Apply `change` to a node's desired state and bump its generation,
    /// atomically; returns the new record. `change` returns false for "no
    /// change", which leaves the record (and generation) untouched.
    pub async fn update_desired(
        &self,
        node_id: &str,
        change: impl Fn(&mut DesiredRecord) -> bool,
    ) -> Result<DesiredRecord, StoreError> {
        let record = self.update_desired_unflushed(node_id, change)?;
        self.flush().await?;
        Ok(record)
    }

    /// As [`Store::update_desired`] without the flush: callers that change
    /// many nodes flush once, before acknowledging any of them.
    pub fn update_desired_unflushed(
        &self,
        node_id: &str,
        change: impl Fn(&mut DesiredRecord) -> bool,
    ) -> Result<DesiredRecord, StoreError> {
        let mut result = None;
        let mut decode_error = None;
        self.desired.update_and_fetch(node_id.as_bytes(), |old| {
            let mut record: DesiredRecord = match old
                .map(|b| decode(DESIRED, node_id.as_bytes(), b))
                .transpose()
            {
                Ok(record) => record.unwrap_or_default(),
                Err(e) => {
                    decode_error = Some(e);
                    return old.map(<[u8]>::to_vec);
                }
            };
            if change(&mut record) {
                record.generation += 1;
            }
            let bytes = encode(&record);
            result = Some(record);
            Some(bytes)
        })?;
        if let Some(e) = decode_error {
            return Err(e);
        }
        Ok(result.unwrap_or_default())
    }

    /// Store a deployment (any serializable form) under its id, durably.
    pub async fn put_deployment<T: Serialize>(
        &self,
        id: &str,
        deployment: &T,
    ) -> Result<(), StoreError> {
        self.put_deployment_unflushed(id, deployment)?;
        self.flush().await
    }

    /// Store a deployment without flushing; durable with the next flush.
    pub fn put_deployment_unflushed<T: Serialize>(
        &self,
        id: &str,
        deployment: &T,
    ) -> Result<(), StoreError> {
        self.deployments.insert(id.as_bytes(), encode(deployment))?;
        Ok(())
    }

    pub fn list_deployments<T: DeserializeOwned>(&self) -> Result<Vec<T>, StoreError> {
        scan(&self.deployments, DEPLOYMENTS)
    }

    pub async fn put_pipeline<T: Serialize>(
        &self,
        id: &str,
        pipeline: &T,
    ) -> Result<(), StoreError> {
        self.pipelines.insert(id.as_bytes(), encode(pipeline))?;
        self.flush().await
    }

    pub fn list_pipelines<T: DeserializeOwned>(&self) -> Result<Vec<T>, StoreError> {
        scan(&self.pipelines, PIPELINES)
    }

    pub async fn remove_desired(&self, node_id: &str) -> Result<(), StoreError> {
        self.desired.remove(node_id.as_bytes())?;
        self.flush().await
    }

    /// Change a stored artifact record in place, atomically (sled retries
    /// `change` on a concurrent write, so it may run more than once), and
    /// flush. `None` when `name@version` is not stored; otherwise the record
    /// as stored after the change. `change` returns false for "no change".
    pub async fn update_artifact(
        &self,
        name: &str,
        version: &str,
        change: impl Fn(&mut ArtifactRecord) -> bool,
    ) -> Result<Option<ArtifactRecord>, StoreError> {
        let key = artifact_key(name, version);
        let mut corrupt = None;
        let updated = self.artifacts.update_and_fetch(&key, |old| {
            let old = old?;
            match decode::<ArtifactRecord>(ARTIFACTS, &key, old) {
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
        decode(ARTIFACTS, &key, &bytes).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert!(!store.failure().is_some_and(Failure::recovers_on_restart));
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
        NodeRecord {
            id: id.into(),
            name: name.into(),
            labels: [
                ("environment".to_string(), "dev".to_string()),
                ("zone".to_string(), "a".to_string()),
            ]
            .into(),
            forced_labels: Labels::new(),
            enrolled_at_ms: 1,
            cert_fingerprint: format!("sha256:{id}"),
            cert_not_after_ms: 2,
            last_seen_ms: None,
            agent_version: "0.1.0".into(),
            previous_cert_fingerprint: None,
            previous_cert_not_after_ms: 0,
            token_hash: String::new(),
        }
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
        // sled's flusher thread may hold the file lock for a moment after
        // the handle is dropped (a new process would not wait): retry briefly.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let store = loop {
            match Store::open(&path, 1 << 20) {
                Ok(store) => break store,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
                Err(e) => panic!("reopen: {e}"),
            }
        };
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
}
