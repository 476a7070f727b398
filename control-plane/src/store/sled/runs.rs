//! Desired runs: the desired states of one large batch (a wave, a
//! rollback, `nodes set-module` over a selector) written as one sled value
//! instead of one key per node.
//!
//! sled's cost is per key: a thousand desired-state keys took longer than
//! everything else on a deployment decision's path. So a batch of at least
//! [`RUN_MIN`] changed nodes is written as one value of the `desired_runs`
//! tree, under the batch's first revision, and kept in memory as the
//! *pending run* until it is folded into the `desired` tree, one key per
//! node, off the decision's path ([`SledStore::fold_desired_run`], which the
//! registry calls once the batch is flushed and handed to the sessions).
//!
//! Invariants:
//! - At most one run is pending. Every other desired write (a single write,
//!   a removal, the next batch) folds the pending run first, under the
//!   revision lock, so nothing is ever written over a node's pending record.
//! - A fold writes the run's records into `desired`, then forgets the
//!   pending run, then removes the run's value, in that order: a reader that
//!   finds no pending record finds it in `desired`, and sled recovers a
//!   prefix of its log, so the run's value outlives its fold on disk.
//! - At open, every run still stored is folded again (a record whose node
//!   has a newer one in `desired` is skipped), before the history check of
//!   [`SledStore::drop_unwritten_history`] reads `desired`.

use std::collections::HashMap;

use super::{Collection, DesiredRecord, SledStore, StoreError, decode};
use crate::store::Revision;

/// The fewest changed nodes a batch writes as a run; smaller batches write
/// one key per node, as single writes do.
pub(super) const RUN_MIN: usize = 32;

/// The run written last and not folded yet.
pub(super) struct PendingRun {
    /// Its key in `desired_runs`: the first revision of its batch.
    key: [u8; 8],
    /// Each node's record as stored in the run (JSON, as `desired` holds it).
    records: HashMap<String, Vec<u8>>,
}

impl PendingRun {
    /// The run of a batch whose first revision is `first`.
    pub(super) fn new(first: Revision, records: HashMap<String, Vec<u8>>) -> Self {
        Self {
            key: first.to_be_bytes(),
            records,
        }
    }

    pub(super) fn key(&self) -> [u8; 8] {
        self.key
    }

    /// The run's value: a JSON array of `[node, record]` pairs, made from
    /// the records' own bytes so each is encoded once.
    pub(super) fn value(&self) -> Vec<u8> {
        let size: usize = self
            .records
            .iter()
            .map(|(node, record)| node.len() + record.len() + 8)
            .sum();
        let mut value = Vec::with_capacity(size + 2);
        value.push(b'[');
        for (i, (node, record)) in self.records.iter().enumerate() {
            if i > 0 {
                value.push(b',');
            }
            value.push(b'[');
            // A string always serializes.
            let _ = serde_json::to_writer(&mut value, node);
            value.push(b',');
            value.extend_from_slice(record);
            value.push(b']');
        }
        value.push(b']');
        value
    }
}

impl SledStore {
    /// A node's desired record: the pending run's if it has one there,
    /// else the one in `desired`.
    pub(super) fn desired_of(&self, node_id: &str) -> Result<Option<DesiredRecord>, StoreError> {
        let pending = self
            .lock_pending()
            .as_ref()
            .and_then(|run| run.records.get(node_id).cloned());
        match pending {
            Some(bytes) => decode(Collection::Desired, node_id.as_bytes(), &bytes).map(Some),
            None => super::get(&self.desired, Collection::Desired, node_id.as_bytes()),
        }
    }

    /// Every record of the pending run, decoded (for a listing that then
    /// reads `desired`: taken first, so a fold in between loses nothing).
    pub(super) fn pending_records(&self) -> Result<Vec<(String, DesiredRecord)>, StoreError> {
        let pending = self.lock_pending();
        let Some(run) = pending.as_ref() else {
            return Ok(Vec::new());
        };
        run.records
            .iter()
            .map(|(node, bytes)| {
                decode(Collection::Desired, node.as_bytes(), bytes).map(|r| (node.clone(), r))
            })
            .collect()
    }

    pub(super) fn lock_pending(&self) -> std::sync::MutexGuard<'_, Option<PendingRun>> {
        // Plain data: a panic elsewhere leaves nothing half-written here.
        self.pending_run.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fold the pending run, if any, into `desired`: its records as one
    /// sled batch, then the run's value removed, without flushing (the run
    /// itself is durable; a crash before the next flush folds it again at
    /// open). Called with the revision lock held, so no write comes between.
    pub(super) fn fold_locked(&self) -> Result<(), StoreError> {
        let (key, batch) = {
            let pending = self.lock_pending();
            let Some(run) = pending.as_ref() else {
                return Ok(());
            };
            let mut batch = sled::Batch::default();
            for (node, record) in &run.records {
                batch.insert(node.as_bytes(), record.as_slice());
            }
            (run.key(), batch)
        };
        self.desired
            .apply_batch(batch)
            .map_err(|e| self.observe(e))?;
        *self.lock_pending() = None;
        self.desired_runs.remove(key).map_err(|e| self.observe(e))?;
        Ok(())
    }

    /// Fold every run still stored (a crash came before its fold reached
    /// the disk), oldest first; a record older than its node's record in
    /// `desired` is skipped. Flushes when it changed anything.
    pub(super) fn fold_stored_runs(&self) -> Result<(), StoreError> {
        let mut folded = 0usize;
        while let Some((key, value)) = self.desired_runs.first()? {
            let records: Vec<(String, DesiredRecord)> =
                serde_json::from_slice(&value).map_err(|e| StoreError::Corrupt {
                    tree: "desired_runs",
                    key: super::counter(Some(&key)).to_string(),
                    reason: format!("a desired run (the batch of desired states written at this revision) cannot be read: {e}"),
                })?;
            let mut batch = sled::Batch::default();
            for (node, record) in &records {
                let stored: Option<DesiredRecord> =
                    super::get(&self.desired, Collection::Desired, node.as_bytes())?;
                if stored.is_none_or(|s| s.revision < record.revision) {
                    batch.insert(node.as_bytes(), super::encode(record));
                }
            }
            self.desired.apply_batch(batch)?;
            self.desired_runs.remove(key)?;
            tracing::info!(
                records = records.len(),
                "folded a desired run written before a restart"
            );
            folded += 1;
        }
        if folded > 0 {
            self.db.flush()?;
        }
        Ok(())
    }
}
