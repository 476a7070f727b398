//! Leader election with etcd's lease pattern: each candidate puts a key of
//! its own under the election prefix, attached to its lease; the candidate
//! whose key has the lowest create revision leads, and the others wait for
//! the key just before theirs to go (a resignation, or a lease that
//! expired). A leader fences every write it makes with
//! [`Leadership::fence`], a compare on its key's create revision: once its
//! key is gone (lease lost while it was paused or cut off), no write of
//! the old leader can commit, whatever it still believes.

use tokio_stream::StreamExt;

use crate::{
    Client, Compare, CompareOp, Error, KeyValue, LeaseId, TxnOp, TxnOpResult, WatchEventKind,
};

/// One election: candidates under `prefix`.
#[derive(Clone)]
pub struct Election {
    client: Client,
    prefix: Vec<u8>,
}

/// Won leadership: valid while the candidate's key exists with this create
/// revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leadership {
    pub key: Vec<u8>,
    pub create_revision: i64,
    pub lease: LeaseId,
}

impl Leadership {
    /// The compare that makes a transaction commit only while this
    /// leadership holds.
    pub fn fence(&self) -> Compare {
        Compare::create_revision(self.key.clone(), CompareOp::Equal, self.create_revision)
    }
}

impl Election {
    pub fn new(client: Client, prefix: impl Into<Vec<u8>>) -> Self {
        Self {
            client,
            prefix: prefix.into(),
        }
    }

    /// The candidate key of `lease`.
    pub fn key_of(&self, lease: LeaseId) -> Vec<u8> {
        let mut key = self.prefix.clone();
        key.extend_from_slice(format!("{:016x}", lease.0).as_bytes());
        key
    }

    /// Become a candidate under `lease` (kept alive by the caller while it
    /// campaigns) with `value` (who it is), and return once this candidate
    /// leads. Campaigning again with the same lease resumes the same
    /// candidacy.
    pub async fn campaign(&self, lease: LeaseId, value: &[u8]) -> Result<Leadership, Error> {
        let key = self.key_of(lease);
        let created = self
            .client
            .txn(
                &[Compare::absent(key.clone())],
                &[TxnOp::put_with_lease(key.clone(), value.to_vec(), lease)],
                &[TxnOp::get(key.clone())],
            )
            .await?;
        let create_revision = if created.succeeded {
            created.revision
        } else {
            match created.responses.first() {
                Some(TxnOpResult::Get { kvs }) => kvs
                    .first()
                    .map_or(created.revision, |kv| kv.create_revision),
                _ => created.revision,
            }
        };
        let leadership = Leadership {
            key,
            create_revision,
            lease,
        };
        loop {
            let (revision, candidates) = self.client.range(&self.prefix).await?;
            if !candidates.iter().any(|kv| kv.key == leadership.key) {
                // Our key is gone: the lease expired while we waited.
                return Err(Error::LeaseNotFound { lease: lease.0 });
            }
            let Some(predecessor) = candidates
                .iter()
                .filter(|kv| kv.create_revision < leadership.create_revision)
                .max_by_key(|kv| kv.create_revision)
            else {
                return Ok(leadership);
            };
            self.wait_deleted(&predecessor.key, revision).await?;
        }
    }

    /// Wait until `key` is deleted after `revision`.
    async fn wait_deleted(&self, key: &[u8], revision: i64) -> Result<(), Error> {
        let mut watch = self.client.watch_prefix(key, revision);
        while let Some(event) = watch.next().await {
            let event = event?;
            if event.kind == WatchEventKind::Delete && event.kv.key == key {
                return Ok(());
            }
        }
        Err(Error::Malformed {
            op: "campaign",
            what: "the watch on the predecessor ended without an error",
        })
    }

    /// The current leader's key and value, if any candidate exists.
    pub async fn leader(&self) -> Result<Option<KeyValue>, Error> {
        let (_, candidates) = self.client.range(&self.prefix).await?;
        Ok(candidates.into_iter().min_by_key(|kv| kv.create_revision))
    }

    /// Give up leadership (or candidacy) at once, so the next candidate
    /// leads without waiting for the lease to expire.
    pub async fn resign(&self, leadership: &Leadership) -> Result<(), Error> {
        self.client
            .txn(
                &[leadership.fence()],
                &[TxnOp::delete(leadership.key.clone())],
                &[],
            )
            .await?;
        Ok(())
    }
}
