//! The tamper-evident audit log: one record per mutating call (who, role,
//! what, target, result, time, trace id, peer address), appended to its own
//! sequence log of the store under a strictly increasing sequence number and flushed before
//! the call is answered.
//!
//! Records form a hash chain: each carries the SHA-256 of the previous
//! record and its own hash over all its fields and that link. Editing,
//! inserting or deleting a record in the middle breaks the chain at that
//! point, which [`AuditLog::verify`] reports. Truncating the tail cannot be
//! detected from the log alone; `audit verify` prints the head hash so it can
//! be noted elsewhere and compared later.
//!
//! Retention (`audit_retention`) removes the oldest records, always a
//! prefix, and first appends an [`Anchor`]: a record, in the chain like any
//! other, whose detail names the first record kept and that record's link,
//! signed with the CA's key. Verification of a trimmed log starts from the
//! anchor's link after checking its signature against the CA certificate,
//! so records removed from the start without an anchor still show as
//! deleted.

use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use hotswap_common::pki::{CertificateAuthority, verify_signed_by};

use crate::store::{Direction, LogName, SeqLog, Store, StoreError};

/// `prev_hash` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditRecord {
    pub seq: u64,
    pub time_ms: u64,
    pub user: String,
    pub role: String,
    pub action: String,
    pub target: String,
    /// ok, denied or error.
    pub result: String,
    /// The error message for a refused or failed call.
    pub detail: String,
    pub trace_id: String,
    pub peer: String,
    pub prev_hash: String,
    pub hash: String,
}

/// What a caller supplies; the log adds the sequence number, time and links.
#[derive(Clone, Debug, Default)]
pub struct AuditEntry {
    pub user: String,
    pub role: String,
    pub action: String,
    pub target: String,
    pub result: &'static str,
    pub detail: String,
    pub trace_id: String,
    pub peer: Option<SocketAddr>,
}

/// The hash of a record: SHA-256 over a fixed-order JSON array of every
/// field but the hash itself (JSON escaping makes the encoding unambiguous).
pub fn record_hash(r: &AuditRecord) -> String {
    let canonical = serde_json::json!([
        r.seq,
        r.time_ms,
        r.user,
        r.role,
        r.action,
        r.target,
        r.result,
        r.detail,
        r.trace_id,
        r.peer,
        r.prev_hash,
    ]);
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

/// The action of the records that anchor a trimmed chain.
pub const ANCHOR_ACTION: &str = "audit.anchor";

/// Records removed by one trim at most: a large backlog goes over several
/// passes, each a bounded delete.
pub const TRIM_BATCH: usize = 10_000;

/// What the retention trim appends before it removes records: signed by
/// the CA, it vouches for the link of the first record kept, so the chain
/// from there verifies without the records before it. Stored as the JSON
/// detail of an [`ANCHOR_ACTION`] record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Anchor {
    /// The first record kept; every record before it was removed.
    pub first_kept: u64,
    /// That record's `prev_hash`: the hash of the last record removed.
    pub prev_hash: String,
    /// Records older than this (ms since the epoch) were removed.
    pub cutoff_ms: u64,
    /// `sha256:` fingerprint of the CA whose key signed.
    pub signer: String,
    /// Hex of the signature over [`Anchor::signed_bytes`].
    pub signature: String,
}

impl Anchor {
    /// What the CA signs: every field but the signature, in a fixed order.
    pub fn signed_bytes(&self) -> Vec<u8> {
        format!(
            "hotswap audit anchor v1\n{}\n{}\n{}\n{}\n",
            self.first_kept, self.prev_hash, self.cutoff_ms, self.signer
        )
        .into_bytes()
    }
}

/// The keys of retention anchors: the CA that signs new ones, and the CA
/// certificates whose anchors verify (the current one, and mid-rotation
/// the previous one).
#[derive(Clone)]
pub struct AnchorKeys {
    pub ca: Arc<CertificateAuthority>,
    pub trusted: Vec<String>,
}

/// Filters for [`AuditLog::list`].
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub since: u64,
    pub limit: usize,
    pub user: String,
    /// Exact action, or a prefix ending in '.'.
    pub action: String,
    pub result: String,
}

impl AuditFilter {
    fn matches(&self, r: &AuditRecord) -> bool {
        r.seq >= self.since
            && (self.user.is_empty() || r.user == self.user)
            && (self.result.is_empty() || r.result == self.result)
            && (self.action.is_empty()
                || r.action == self.action
                || (self.action.ends_with('.') && r.action.starts_with(&self.action)))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verification {
    pub records: u64,
    pub head_hash: String,
    /// The first broken record and what is wrong with it.
    pub broken: Option<(u64, String)>,
    /// Where a trimmed chain starts, and the fingerprint of the CA that
    /// signed the anchor vouching for it; `None` for a chain from genesis.
    pub anchored: Option<(u64, String)>,
}

pub struct AuditLog {
    log: Arc<dyn SeqLog>,
    store: Store,
    /// Sequence number and hash of the last record; appends are serialized
    /// by this lock so the chain has one order.
    head: tokio::sync::Mutex<(u64, String)>,
    /// Entries waiting for the holder of `head` to append them (group
    /// commit: whoever takes the lock appends everything queued so far in
    /// one write, so one record per call does not mean one round trip per
    /// call, and replicas sharing the chain race for its head far less).
    waiting: std::sync::Mutex<Vec<Waiting>>,
    /// Signs retention anchors and checks them; without it the log is
    /// never trimmed and a trimmed log cannot verify.
    anchors: Option<AnchorKeys>,
}

/// An entry queued for the next append, with its time and where its record
/// (or why it failed) goes.
struct Waiting {
    entry: AuditEntry,
    time_ms: u64,
    reply: tokio::sync::oneshot::Sender<Result<AuditRecord, String>>,
}

/// Records appended in one write at most: a replicated backend commits them
/// in one transaction, under its per-transaction limits.
const APPEND_GROUP: usize = 64;

/// How long an append keeps trying while other replicas keep taking the
/// next number first (each of them appends a record per call they serve,
/// so under load a replica may lose many races in a row), and the tries it
/// makes at least, however slow etcd answers.
const APPEND_BUDGET: std::time::Duration = std::time::Duration::from_secs(10);
const APPEND_MIN_ATTEMPTS: u32 = 32;

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("audit record {key} is unreadable: {reason}")]
    Corrupt { key: String, reason: String },
    #[error(
        "audit log: other replicas took the next number {0} times in a row over {1}s; try again"
    )]
    Contended(u32, u64),
    #[error("audit anchor: {0}")]
    Anchor(String),
}

fn decode(key: &[u8], value: &[u8]) -> Result<AuditRecord, AuditError> {
    serde_json::from_slice(value).map_err(|e| AuditError::Corrupt {
        key: hex::encode(key),
        reason: e.to_string(),
    })
}

impl AuditLog {
    pub fn open(store: &Store) -> Result<Self, AuditError> {
        let log = store.log(LogName::Audit)?;
        let head = Self::head_of(&*log)?;
        Ok(Self {
            log,
            store: store.clone(),
            head: tokio::sync::Mutex::new(head),
            waiting: std::sync::Mutex::new(Vec::new()),
            anchors: None,
        })
    }

    /// With the keys that sign and check retention anchors.
    pub fn with_anchors(mut self, anchors: AnchorKeys) -> Self {
        self.anchors = Some(anchors);
        self
    }

    /// Remove the oldest records, those before the first at or after
    /// `cutoff_ms` (at most [`TRIM_BATCH`] a pass), after appending the
    /// signed [`Anchor`] that vouches for the first record kept. Returns the
    /// anchor and how many records went, or `None` when nothing was old
    /// enough. A trim interrupted
    /// between its anchor and its delete leaves the old records in place;
    /// the next one removes them.
    pub async fn trim_older_than(
        &self,
        cutoff_ms: u64,
    ) -> Result<Option<(Anchor, u64)>, AuditError> {
        let Some(keys) = &self.anchors else {
            return Ok(None);
        };
        let Some(first) = self.log.first_seq()? else {
            return Ok(None);
        };
        let mut last_removed: Option<(u64, String)> = None;
        for (count, entry) in self.log.range(first, Direction::Forward).enumerate() {
            let (seq, value) = entry?;
            let record = decode(&seq.to_be_bytes(), &value)?;
            if record.time_ms >= cutoff_ms || count == TRIM_BATCH {
                break;
            }
            last_removed = Some((seq, record.hash));
        }
        let Some((through, prev_hash)) = last_removed else {
            return Ok(None);
        };
        let mut anchor = Anchor {
            first_kept: through + 1,
            prev_hash,
            cutoff_ms,
            signer: keys
                .ca
                .fingerprint()
                .map_err(|e| AuditError::Anchor(e.to_string()))?,
            signature: String::new(),
        };
        anchor.signature = hex::encode(
            keys.ca
                .sign(&anchor.signed_bytes())
                .map_err(|e| AuditError::Anchor(e.to_string()))?,
        );
        let detail =
            serde_json::to_string(&anchor).map_err(|e| AuditError::Anchor(e.to_string()))?;
        self.append(AuditEntry {
            user: "control-plane".into(),
            role: "system".into(),
            action: ANCHOR_ACTION.into(),
            target: format!("records {first}..={through}"),
            result: "ok",
            detail,
            ..AuditEntry::default()
        })
        .await?;
        // The anchor is durable (append flushes) before anything goes.
        self.log.remove_through(through)?;
        self.store.flush().await?;
        tracing::info!(
            first,
            through,
            "audit records past retention removed, anchored"
        );
        Ok(Some((anchor, through + 1 - first)))
    }

    /// The anchors in the log that vouch for a record at or above `first`,
    /// lowest first record kept first.
    fn anchors_from(&self, first: u64) -> Result<Vec<Anchor>, AuditError> {
        let mut found = Vec::new();
        for entry in self.log.range(first, Direction::Forward) {
            let (_, value) = entry?;
            let Ok(record) = serde_json::from_slice::<AuditRecord>(&value) else {
                continue;
            };
            if record.action != ANCHOR_ACTION {
                continue;
            }
            if let Ok(anchor) = serde_json::from_str::<Anchor>(&record.detail)
                && anchor.first_kept >= first
                && anchor.first_kept <= record.seq
            {
                found.push(anchor);
            }
        }
        found.sort_by_key(|a| a.first_kept);
        Ok(found)
    }

    /// Sign again, with the current CA, the anchor a trimmed chain starts
    /// from when only a previous CA signed it: mid-rotation both are
    /// trusted, and once the rotation finishes the old one is not, while
    /// the chain must still verify. True when an anchor was appended.
    pub async fn reanchor_for_rotation(&self) -> Result<bool, AuditError> {
        let Some(keys) = &self.anchors else {
            return Ok(false);
        };
        let Some(first) = self.log.first_seq()?.filter(|first| *first > 1) else {
            return Ok(false);
        };
        let current = keys
            .ca
            .fingerprint()
            .map_err(|e| AuditError::Anchor(e.to_string()))?;
        let anchors = self.anchors_from(first)?;
        let Some(lowest) = anchors.first().map(|a| a.first_kept) else {
            return Ok(false);
        };
        let vouching: Vec<&Anchor> = anchors
            .iter()
            .filter(|a| a.first_kept == lowest && self.check_anchor(a).is_ok())
            .collect();
        if vouching.iter().any(|a| a.signer == current) {
            return Ok(false);
        }
        // Only what a trusted CA signed is signed again.
        let Some(old) = vouching.first() else {
            return Ok(false);
        };
        let mut fresh = Anchor {
            signer: current,
            signature: String::new(),
            ..(*old).clone()
        };
        fresh.signature = hex::encode(
            keys.ca
                .sign(&fresh.signed_bytes())
                .map_err(|e| AuditError::Anchor(e.to_string()))?,
        );
        let detail =
            serde_json::to_string(&fresh).map_err(|e| AuditError::Anchor(e.to_string()))?;
        self.append(AuditEntry {
            user: "control-plane".into(),
            role: "system".into(),
            action: ANCHOR_ACTION.into(),
            target: format!("record {lowest}, signed again by the new CA"),
            result: "ok",
            detail,
            ..AuditEntry::default()
        })
        .await?;
        tracing::info!(
            first_kept = lowest,
            "audit anchor signed again by the current CA"
        );
        Ok(true)
    }

    /// Whether `anchor` is signed by a trusted CA.
    fn check_anchor(&self, anchor: &Anchor) -> Result<(), String> {
        let keys = self
            .anchors
            .as_ref()
            .ok_or("this control plane has no CA to check it with")?;
        let signature =
            hex::decode(&anchor.signature).map_err(|e| format!("its signature is not hex: {e}"))?;
        let bytes = anchor.signed_bytes();
        if keys
            .trusted
            .iter()
            .any(|pem| verify_signed_by(pem, &bytes, &signature).is_ok())
        {
            Ok(())
        } else {
            Err(format!(
                "its signature does not verify with the CA certificate (it names signer {})",
                anchor.signer
            ))
        }
    }

    /// Append a record and make it durable before returning it. Where other
    /// replicas append to the same chain, a record that lost the race for
    /// its number is built again on top of the winner, so the chain stays
    /// one chain. Concurrent appends are written together (see
    /// [`AuditLog::waiting`]), in the order they were queued.
    pub async fn append(&self, entry: AuditEntry) -> Result<AuditRecord, AuditError> {
        let time_ms = hotswap_common::timefmt::now_ms();
        let queue = |entry: AuditEntry| {
            let (reply, answer) = tokio::sync::oneshot::channel();
            self.waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Waiting {
                    entry,
                    time_ms,
                    reply,
                });
            answer
        };
        let mut answer = queue(entry.clone());
        loop {
            let mut head = self.head.lock().await;
            // Whoever held the lock before may have appended this entry.
            match answer.try_recv() {
                Ok(Ok(record)) => return Ok(record),
                Ok(Err(why)) => return Err(AuditError::Store(StoreError::Backend(why))),
                Err(tokio::sync::oneshot::error::TryRecvError::Closed) => {
                    // The call that took it was cancelled mid-append (its
                    // client went away): queue it again. If that append had
                    // committed, the chain holds this entry twice, which
                    // beats losing it.
                    answer = queue(entry.clone());
                }
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => {}
            }
            let group: Vec<Waiting> = {
                let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
                let take = waiting.len().min(APPEND_GROUP);
                waiting.drain(..take).collect()
            };
            if group.is_empty() {
                // Taken by a group still in flight: its holder answers.
                drop(head);
                match (&mut answer).await {
                    Ok(Ok(record)) => return Ok(record),
                    Ok(Err(why)) => return Err(AuditError::Store(StoreError::Backend(why))),
                    Err(_) => {
                        answer = queue(entry.clone());
                        continue;
                    }
                }
            }
            let outcome = self.append_group(&mut head, &group).await;
            drop(head);
            let outcome = match outcome {
                Ok(records) => self
                    .store
                    .flush()
                    .await
                    .map(|()| records)
                    .map_err(AuditError::from),
                Err(e) => Err(e),
            };
            match outcome {
                Ok(records) => {
                    for (waiting, record) in group.into_iter().zip(records) {
                        let _gone = waiting.reply.send(Ok(record));
                    }
                }
                Err(e) => {
                    let why = e.to_string();
                    for waiting in group {
                        let _gone = waiting.reply.send(Err(why.clone()));
                    }
                }
            }
            // Ours was in this group or an earlier one: answered now (or
            // its holder was cancelled, which the next turn sees).
            if let Ok(result) = answer.try_recv() {
                return result.map_err(|why| AuditError::Store(StoreError::Backend(why)));
            }
        }
    }

    /// Chain a group of entries on the head and store them in one write,
    /// again on the winner's record when another replica took the number.
    async fn append_group(
        &self,
        head: &mut (u64, String),
        group: &[Waiting],
    ) -> Result<Vec<AuditRecord>, AuditError> {
        let deadline = tokio::time::Instant::now() + APPEND_BUDGET;
        let mut attempt: u32 = 0;
        while attempt < APPEND_MIN_ATTEMPTS || tokio::time::Instant::now() < deadline {
            let mut records = Vec::with_capacity(group.len());
            let (mut seq, mut prev_hash) = head.clone();
            for waiting in group {
                let entry = &waiting.entry;
                seq += 1;
                let mut record = AuditRecord {
                    seq,
                    time_ms: waiting.time_ms,
                    user: entry.user.clone(),
                    role: entry.role.clone(),
                    action: entry.action.clone(),
                    target: entry.target.clone(),
                    result: entry.result.to_string(),
                    detail: entry.detail.clone(),
                    trace_id: entry.trace_id.clone(),
                    peer: entry.peer.map(|a| a.to_string()).unwrap_or_default(),
                    prev_hash,
                    hash: String::new(),
                };
                record.hash = record_hash(&record);
                prev_hash = record.hash.clone();
                records.push(record);
            }
            let values: Vec<Vec<u8>> = records
                .iter()
                .map(|r| serde_json::to_vec(r).unwrap_or_default())
                .collect();
            if self.log.append_exact(head.0 + 1, values).await? {
                *head = (seq, prev_hash);
                return Ok(records);
            }
            // Another replica took the number: chain on from its record,
            // after a random pause that grows, so two busy replicas do not
            // keep meeting at the same number.
            *head = Self::head_of(&*self.log)?;
            let ceiling_ms = 1u64 << attempt.min(6);
            let pause = rand::random_range(0..=ceiling_ms);
            tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
            attempt += 1;
        }
        Err(AuditError::Contended(attempt, APPEND_BUDGET.as_secs()))
    }

    fn head_of(log: &dyn SeqLog) -> Result<(u64, String), AuditError> {
        Ok(match log.last()? {
            Some((seq, value)) => {
                let record = decode(&seq.to_be_bytes(), &value)?;
                (record.seq, record.hash)
            }
            None => (0, GENESIS.to_string()),
        })
    }

    /// Matching records in sequence order: the newest `limit` of them.
    pub fn list(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, AuditError> {
        let limit = if filter.limit == 0 {
            1000
        } else {
            filter.limit
        };
        let mut out = Vec::new();
        for entry in self.log.range(filter.since, Direction::Backward) {
            let (seq, value) = entry?;
            let record = decode(&seq.to_be_bytes(), &value)?;
            if filter.matches(&record) {
                out.push(record);
                if out.len() == limit {
                    break;
                }
            }
        }
        out.reverse();
        Ok(out)
    }

    /// Records appended so far (the last sequence number).
    pub fn len(&self) -> u64 {
        match self.log.last() {
            Ok(Some((seq, _))) => seq,
            Ok(None) => 0,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the audit log's head");
                0
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Walk the chain from the first record; stop at the first broken link.
    /// A trimmed chain (its first record is not 1) starts from the anchor
    /// that vouches for its first record, once the anchor's signature
    /// checks; records below that anchor's `first_kept` (left by a trim
    /// interrupted before its delete) are not walked.
    pub fn verify(&self) -> Result<Verification, AuditError> {
        let first = self.log.first_seq()?.unwrap_or(1);
        if first <= 1 {
            return verify_records(self.log.range(0, Direction::Forward).map(|entry| {
                let (seq, value) = entry?;
                Ok((seq.to_be_bytes().to_vec(), value))
            }));
        }
        let broken = |seq: u64, problem: String| Verification {
            records: 0,
            head_hash: GENESIS.to_string(),
            broken: Some((seq, problem)),
            anchored: None,
        };
        // The anchors of the trim that removed the records before the
        // log's first: the lowest first record kept at or above it (more
        // than one when a rotation signed it again).
        let anchors = self.anchors_from(first)?;
        let Some(lowest) = anchors.first().map(|a| a.first_kept) else {
            return Ok(broken(
                first,
                format!(
                    "records before {first} are gone and no retention anchor vouches for record {first}: they were deleted"
                ),
            ));
        };
        let mut why = String::new();
        let mut valid = None;
        for candidate in anchors.into_iter().filter(|a| a.first_kept == lowest) {
            match self.check_anchor(&candidate) {
                Ok(()) => {
                    valid = Some(candidate);
                    break;
                }
                Err(e) => why = e,
            }
        }
        let Some(anchor) = valid else {
            return Ok(broken(
                lowest,
                format!("the retention anchor for record {lowest} is not valid: {why}"),
            ));
        };
        let mut v = verify_chain(
            self.log
                .range(anchor.first_kept, Direction::Forward)
                .map(|entry| {
                    let (seq, value) = entry?;
                    Ok((seq.to_be_bytes().to_vec(), value))
                }),
            anchor.first_kept,
            anchor.prev_hash.clone(),
        )?;
        v.anchored = Some((anchor.first_kept, anchor.signer));
        Ok(v)
    }
}

/// The chain check over raw `(key, value)` pairs in key order, from the
/// first record.
pub fn verify_records(
    entries: impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), AuditError>>,
) -> Result<Verification, AuditError> {
    verify_chain(entries, 1, GENESIS.to_string())
}

/// The chain check from record `first`, whose `prev_hash` must be `prev`.
fn verify_chain(
    entries: impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), AuditError>>,
    first: u64,
    mut prev: String,
) -> Result<Verification, AuditError> {
    let mut records = 0;
    for (expected_seq, entry) in (first..).zip(entries) {
        let (key, value) = entry?;
        let broken = |problem: String| {
            Ok(Verification {
                records,
                head_hash: prev.clone(),
                broken: Some((expected_seq, problem)),
                anchored: None,
            })
        };
        let key_seq = <[u8; 8]>::try_from(key.as_slice())
            .ok()
            .map(u64::from_be_bytes);
        if key_seq != Some(expected_seq) {
            return broken(format!(
                "expected record {expected_seq}, found key {}: a record was deleted or inserted",
                hex::encode(&key)
            ));
        }
        let record: AuditRecord = match serde_json::from_slice(&value) {
            Ok(record) => record,
            Err(e) => return broken(format!("record is not readable: {e}")),
        };
        if record.seq != expected_seq {
            return broken(format!(
                "record stored under {expected_seq} says it is {}",
                record.seq
            ));
        }
        if record.prev_hash != prev {
            return broken(format!(
                "link to the previous record is broken (prev_hash {} but the previous record hashes to {prev})",
                record.prev_hash
            ));
        }
        let actual = record_hash(&record);
        if actual != record.hash {
            return broken(format!(
                "record was modified: its content hashes to {actual}, not the stored {}",
                record.hash
            ));
        }
        prev = record.hash;
        records += 1;
    }
    Ok(Verification {
        records,
        head_hash: prev,
        broken: None,
        anchored: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(i: usize) -> AuditEntry {
        AuditEntry {
            user: format!("user{i}"),
            role: "admin".into(),
            action: "tokens.create".into(),
            target: format!("t{i}"),
            result: "ok",
            detail: String::new(),
            trace_id: "ab".repeat(16),
            peer: Some("127.0.0.1:5000".parse().unwrap()),
        }
    }

    async fn log_with(n: usize) -> (tempfile::TempDir, Store, AuditLog) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), 1 << 20).unwrap();
        let log = AuditLog::open(&store).unwrap();
        for i in 0..n {
            log.append(entry(i)).await.unwrap();
        }
        (dir, store, log)
    }

    #[tokio::test]
    async fn chain_verifies_and_survives_reopen() {
        let (_dir, store, log) = log_with(5).await;
        let v = log.verify().unwrap();
        assert_eq!(v.records, 5);
        assert_eq!(v.broken, None);
        drop(log);
        let log = AuditLog::open(&store).unwrap();
        let next = log.append(entry(9)).await.unwrap();
        assert_eq!(next.seq, 6);
        assert_eq!(next.prev_hash, v.head_hash);
        assert_eq!(log.verify().unwrap().records, 6);
    }

    /// Many calls appending at once are written in groups, one chain in
    /// the order queued; calls whose task is cancelled mid-append (a client
    /// that went away) lose nobody else's record.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_are_grouped_into_one_chain() {
        let (_dir, _store, log) = log_with(0).await;
        let log = Arc::new(log);
        let tasks: Vec<_> = (0..300)
            .map(|i| {
                let log = Arc::clone(&log);
                tokio::spawn(async move { log.append(entry(i)).await })
            })
            .collect();
        for task in tasks.iter().skip(3).step_by(11) {
            task.abort();
        }
        let mut answered = Vec::new();
        for (i, task) in tasks.into_iter().enumerate() {
            match task.await {
                Ok(result) => answered.push((i, result.expect("append"))),
                Err(e) if e.is_cancelled() => {}
                Err(e) => panic!("append task {i}: {e}"),
            }
        }
        assert!(answered.len() >= 300 - 28, "{} answered", answered.len());
        let v = log.verify().expect("verify");
        assert_eq!(v.broken, None);
        let stored: Vec<AuditRecord> = log
            .list(&AuditFilter {
                limit: 1000,
                ..Default::default()
            })
            .expect("list");
        assert_eq!(stored.len() as u64, v.records);
        for (i, record) in &answered {
            assert_eq!(record.target, format!("t{i}"));
            assert_eq!(
                stored.get(record.seq as usize - 1),
                Some(record),
                "answered record {i} is stored under its number"
            );
        }
    }

    #[tokio::test]
    async fn edited_record_is_caught_at_its_seq() {
        let (_dir, store, log) = log_with(5).await;
        let tree = store.log(LogName::Audit).unwrap();
        let (_, bytes) = tree.range(3, Direction::Forward).next().unwrap().unwrap();
        let mut record: AuditRecord = serde_json::from_slice(&bytes).unwrap();
        record.user = "mallory".into();
        tree.overwrite(3, &serde_json::to_vec(&record).unwrap())
            .unwrap();
        let v = log.verify().unwrap();
        assert_eq!(v.records, 2);
        let (seq, problem) = v.broken.unwrap();
        assert_eq!(seq, 3);
        assert!(problem.contains("modified"), "{problem}");

        // Re-hashing the edited record moves the break to the next link.
        record.hash = record_hash(&record);
        tree.overwrite(3, &serde_json::to_vec(&record).unwrap())
            .unwrap();
        let (seq, problem) = log.verify().unwrap().broken.unwrap();
        assert_eq!(seq, 4);
        assert!(problem.contains("link"), "{problem}");
    }

    /// A CA, its certificate and key.
    fn new_ca(name: &str) -> (Arc<CertificateAuthority>, String) {
        let (ca, pems) = CertificateAuthority::generate(name).expect("ca");
        (Arc::new(ca), pems.cert_pem)
    }

    fn keys_of(ca: &(Arc<CertificateAuthority>, String)) -> AnchorKeys {
        AnchorKeys {
            ca: ca.0.clone(),
            trusted: vec![ca.1.clone()],
        }
    }

    /// Three records, then (after the cutoff) two more.
    async fn trimmable(
        ca: &(Arc<CertificateAuthority>, String),
    ) -> (tempfile::TempDir, Store, AuditLog, u64) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), 1 << 20).unwrap();
        let log = AuditLog::open(&store).unwrap().with_anchors(keys_of(ca));
        for i in 0..3 {
            log.append(entry(i)).await.unwrap();
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        let cutoff = hotswap_common::timefmt::now_ms();
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        for i in 3..5 {
            log.append(entry(i)).await.unwrap();
        }
        (dir, store, log, cutoff)
    }

    /// Retention removes the oldest records behind an anchor the CA signed:
    /// the rest of the chain verifies from it, keeps growing, and survives
    /// a reopen; nothing newer than the cutoff goes.
    #[tokio::test]
    async fn a_trimmed_chain_verifies_from_its_signed_anchor() {
        let ca = new_ca("audit CA");
        let (_dir, store, log, cutoff) = trimmable(&ca).await;
        let before = log.verify().unwrap();
        let (anchor, removed) = log.trim_older_than(cutoff).await.unwrap().expect("trimmed");
        assert_eq!(removed, 3);
        assert_eq!(anchor.first_kept, 4);
        let kept = log
            .list(&AuditFilter {
                limit: 100,
                ..AuditFilter::default()
            })
            .unwrap();
        assert_eq!(anchor.prev_hash, kept[0].prev_hash, "record 4's link");
        assert_eq!(anchor.signer, ca.0.fingerprint().unwrap());
        let log_seqs: Vec<u64> = log
            .list(&AuditFilter {
                limit: 100,
                ..AuditFilter::default()
            })
            .unwrap()
            .iter()
            .map(|r| r.seq)
            .collect();
        assert_eq!(log_seqs, [4, 5, 6], "the anchor is record 6");
        let v = log.verify().unwrap();
        assert_eq!(v.broken, None, "{v:?}");
        assert_eq!(v.records, 3);
        assert_eq!(v.anchored, Some((4, anchor.signer.clone())));
        assert_ne!(v.head_hash, before.head_hash, "the anchor is chained on");
        // Nothing more is old enough.
        assert!(log.trim_older_than(cutoff).await.unwrap().is_none());
        log.append(entry(7)).await.unwrap();
        drop(log);
        let log = AuditLog::open(&store).unwrap().with_anchors(keys_of(&ca));
        let v = log.verify().unwrap();
        assert_eq!((v.records, v.broken.clone()), (4, None), "{v:?}");
    }

    /// Records removed from the start without an anchor are deleted, not
    /// trimmed; an anchor no trusted CA signed vouches for nothing; a log
    /// with no CA to sign is never trimmed.
    #[tokio::test]
    async fn only_a_trusted_anchor_vouches_for_a_trimmed_chain() {
        let ca = new_ca("audit CA");
        let (_dir, store, log, cutoff) = trimmable(&ca).await;
        store
            .log(LogName::Audit)
            .unwrap()
            .remove_through(2)
            .unwrap();
        let (seq, problem) = log.verify().unwrap().broken.expect("broken");
        assert_eq!(seq, 3);
        assert!(problem.contains("no retention anchor"), "{problem}");

        let (_dir, store, log, cutoff2) = trimmable(&ca).await;
        log.trim_older_than(cutoff2)
            .await
            .unwrap()
            .expect("trimmed");
        let stranger = new_ca("another CA");
        let elsewhere = AuditLog::open(&store)
            .unwrap()
            .with_anchors(keys_of(&stranger));
        let (seq, problem) = elsewhere.verify().unwrap().broken.expect("broken");
        assert_eq!(seq, 4);
        assert!(
            problem.contains("does not verify with the CA certificate"),
            "{problem}"
        );
        let keyless = AuditLog::open(&store).unwrap();
        let (_, problem) = keyless.verify().unwrap().broken.expect("broken");
        assert!(problem.contains("no CA"), "{problem}");
        assert!(
            keyless.trim_older_than(u64::MAX).await.unwrap().is_none(),
            "never trims"
        );
        let _ = cutoff;
    }

    /// A CA rotation: mid-rotation (both CAs trusted) the trim signs the
    /// anchor again with the new CA, so once only the new CA is trusted the
    /// chain still verifies; without that it would not.
    #[tokio::test]
    async fn a_ca_rotation_signs_the_anchor_again() {
        let old = new_ca("old CA");
        let new = new_ca("new CA");
        let (_dir, store, log, cutoff) = trimmable(&old).await;
        log.trim_older_than(cutoff).await.unwrap().expect("trimmed");
        let only_new = || {
            AuditLog::open(&store).unwrap().with_anchors(AnchorKeys {
                ca: new.0.clone(),
                trusted: vec![new.1.clone()],
            })
        };
        assert!(
            only_new().verify().unwrap().broken.is_some(),
            "old anchor alone"
        );
        let rotating = AuditLog::open(&store).unwrap().with_anchors(AnchorKeys {
            ca: new.0.clone(),
            trusted: vec![new.1.clone(), old.1.clone()],
        });
        assert!(rotating.reanchor_for_rotation().await.unwrap());
        assert!(!rotating.reanchor_for_rotation().await.unwrap(), "once");
        let v = only_new().verify().unwrap();
        assert_eq!(v.broken, None, "{v:?}");
        assert_eq!(v.anchored, Some((4, new.0.fingerprint().unwrap())));
        // A stranger's CA finds nothing it may sign again.
        let stranger = new_ca("stranger");
        let elsewhere = AuditLog::open(&store)
            .unwrap()
            .with_anchors(keys_of(&stranger));
        assert!(!elsewhere.reanchor_for_rotation().await.unwrap());
    }

    #[tokio::test]
    async fn deleted_record_is_caught() {
        let (_dir, store, log) = log_with(4).await;
        store.log(LogName::Audit).unwrap().remove(2).unwrap();
        let (seq, problem) = log.verify().unwrap().broken.unwrap();
        assert_eq!(seq, 2);
        assert!(problem.contains("deleted"), "{problem}");
    }

    #[tokio::test]
    async fn list_filters_and_limits() {
        let (_dir, _store, log) = log_with(6).await;
        let all = log.list(&AuditFilter::default()).unwrap();
        assert_eq!(
            all.iter().map(|r| r.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6]
        );
        let newest = log
            .list(&AuditFilter {
                limit: 2,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(newest.iter().map(|r| r.seq).collect::<Vec<_>>(), [5, 6]);
        let by_user = log
            .list(&AuditFilter {
                user: "user2".into(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(by_user.len(), 1);
        let by_prefix = log
            .list(&AuditFilter {
                action: "tokens.".into(),
                since: 4,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(by_prefix.len(), 3);
        let none = log
            .list(&AuditFilter {
                action: "tokens".into(),
                ..Default::default()
            })
            .unwrap();
        assert!(none.is_empty());
    }

    fn chain(n: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut prev = GENESIS.to_string();
        (1..=n as u64)
            .map(|seq| {
                let mut r = AuditRecord {
                    seq,
                    time_ms: seq * 1000,
                    user: format!("u{seq}"),
                    role: "deployer".into(),
                    action: "deploy.create".into(),
                    target: "m@1".into(),
                    result: "ok".into(),
                    detail: String::new(),
                    trace_id: String::new(),
                    peer: String::new(),
                    prev_hash: prev.clone(),
                    hash: String::new(),
                };
                r.hash = record_hash(&r);
                prev = r.hash.clone();
                (seq.to_be_bytes().to_vec(), serde_json::to_vec(&r).unwrap())
            })
            .collect()
    }

    proptest! {
        /// Any single-bit change anywhere in any stored record is reported
        /// at exactly that record.
        #[test]
        fn any_bit_flip_is_caught_at_its_record(
            n in 1usize..8,
            pick in any::<prop::sample::Index>(),
            offset in any::<prop::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut entries = chain(n);
            let i = pick.index(n);
            let o = offset.index(entries[i].1.len());
            entries[i].1[o] ^= 1 << bit;
            let v = verify_records(entries.into_iter().map(Ok)).unwrap();
            prop_assert_eq!(v.broken.map(|b| b.0), Some(i as u64 + 1));
            prop_assert_eq!(v.records, i as u64);
        }
    }
}
