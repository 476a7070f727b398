//! A local copy of a replicated key space, kept current by its watch: what
//! lets a replicated backend answer the port's synchronous reads (see the
//! module docs of [`super`]). Pure: the backend feeds it a listing and then
//! the watch's events; it never does I/O.
//!
//! Consistency: the mirror is always the key space as of one revision
//! ([`Mirror::revision`]). Events arrive in revision order; a watch that
//! resumes after a dropped connection may deliver again what was already
//! applied, so anything at or below the mirror's revision is skipped. A
//! writer that committed at revision `r` waits for [`Mirror::revision`] to
//! reach `r` before it answers ([`MirrorHandle::caught_up`]), so its caller's
//! next read sees its own write.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, RwLock};

/// One key's value with the revisions a compare-and-swap checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned {
    pub value: Vec<u8>,
    /// Revision of the write that created the key (since its last delete).
    pub create_revision: i64,
    /// Revision of the key's last write.
    pub mod_revision: i64,
    /// Writes since the key was created (1 for a new key).
    pub version: i64,
}

/// A change the watch reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Put { key: Vec<u8>, value: Versioned },
    Delete { key: Vec<u8>, revision: i64 },
}

impl Change {
    fn revision(&self) -> i64 {
        match self {
            Change::Put { value, .. } => value.mod_revision,
            Change::Delete { revision, .. } => *revision,
        }
    }
}

/// Why the mirror refused a change.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MirrorError {
    /// The watch skipped revisions the mirror never saw applied (a bug in
    /// the feed, or a compaction the backend did not answer with a re-list).
    #[error("watch jumped from revision {have} to {got} out of order; re-list")]
    OutOfOrder { have: i64, got: i64 },
}

/// The key space as of one revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mirror {
    revision: i64,
    records: BTreeMap<Vec<u8>, Versioned>,
}

impl Mirror {
    /// A mirror of a listing taken at `revision`.
    pub fn from_listing(
        records: impl IntoIterator<Item = (Vec<u8>, Versioned)>,
        revision: i64,
    ) -> Self {
        Self {
            revision,
            records: records.into_iter().collect(),
        }
    }

    /// The revision the mirror is current to.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Apply one batch of changes of one revision (etcd reports a
    /// transaction's changes together, all at the transaction's revision).
    /// A batch at or below the mirror's revision was applied already and is
    /// skipped; returns whether it was applied.
    pub fn apply(&mut self, revision: i64, changes: &[Change]) -> Result<bool, MirrorError> {
        if revision <= self.revision {
            return Ok(false);
        }
        if let Some(change) = changes.iter().find(|c| c.revision() != revision) {
            return Err(MirrorError::OutOfOrder {
                have: revision,
                got: change.revision(),
            });
        }
        for change in changes {
            match change {
                Change::Put { key, value } => {
                    self.records.insert(key.clone(), value.clone());
                }
                Change::Delete { key, .. } => {
                    self.records.remove(key);
                }
            }
        }
        self.revision = revision;
        Ok(true)
    }

    pub fn get(&self, key: &[u8]) -> Option<&Versioned> {
        self.records.get(key)
    }

    /// Every key starting with `prefix`, in key order.
    pub fn range<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> impl Iterator<Item = (&'a [u8], &'a Versioned)> + 'a {
        self.records
            .range::<[u8], _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(move |(key, _)| key.starts_with(prefix))
            .map(|(key, value)| (key.as_slice(), value))
    }

    /// The last key under `prefix` (the highest), without walking the rest.
    pub fn last_under(&self, prefix: &[u8]) -> Option<(&[u8], &Versioned)> {
        self.under(prefix, prefix)
            .next_back()
            .map(|(key, value)| (key.as_slice(), value))
    }

    /// Keys under `prefix` from `start` (inclusive) on, in key order, and
    /// backwards with `.rev()`.
    pub fn under<'a>(
        &'a self,
        prefix: &[u8],
        start: &[u8],
    ) -> std::collections::btree_map::Range<'a, Vec<u8>, Versioned> {
        let start = if start < prefix { prefix } else { start };
        match prefix_end(prefix) {
            Some(end) => self
                .records
                .range::<[u8], _>((Bound::Included(start), Bound::Excluded(end.as_slice()))),
            None => self
                .records
                .range::<[u8], _>((Bound::Included(start), Bound::Unbounded)),
        }
    }

    /// Every record, for comparing two listings after a re-list.
    pub fn records(&self) -> &BTreeMap<Vec<u8>, Versioned> {
        &self.records
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }
}

/// A mirror shared by the readers and the task that feeds it, with a way
/// for writers to wait until it has caught up with their write.
#[derive(Clone)]
pub struct MirrorHandle {
    mirror: Arc<RwLock<Mirror>>,
    revision: tokio::sync::watch::Sender<i64>,
}

impl MirrorHandle {
    pub fn new(mirror: Mirror) -> Self {
        let (revision, _) = tokio::sync::watch::channel(mirror.revision());
        Self {
            mirror: Arc::new(RwLock::new(mirror)),
            revision,
        }
    }

    /// Read the mirror (a consistent view of one revision).
    pub fn read<T>(&self, f: impl FnOnce(&Mirror) -> T) -> T {
        f(&self.mirror.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Apply a batch from the watch and wake writers waiting for it.
    pub fn apply(&self, revision: i64, changes: &[Change]) -> Result<bool, MirrorError> {
        let applied = self
            .mirror
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .apply(revision, changes)?;
        if applied {
            self.revision.send_replace(revision);
        }
        Ok(applied)
    }

    /// Replace the mirror with a fresh listing (after a compaction).
    pub fn reset(&self, mirror: Mirror) {
        let revision = mirror.revision();
        *self.mirror.write().unwrap_or_else(|e| e.into_inner()) = mirror;
        self.revision.send_replace(revision);
    }

    /// Wait until the mirror is current to at least `revision`.
    pub async fn caught_up(&self, revision: i64) {
        let mut seen = self.revision.subscribe();
        // The sender lives in `self`, so the channel cannot close here.
        let _ = seen.wait_for(|current| *current >= revision).await;
    }
}

/// The first key after every key that starts with `prefix`; `None` when
/// no key is (the prefix is empty or all 0xff).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn put(key: &str, value: &str, revision: i64) -> Change {
        Change::Put {
            key: key.as_bytes().to_vec(),
            value: Versioned {
                value: value.as_bytes().to_vec(),
                create_revision: revision,
                mod_revision: revision,
                version: 1,
            },
        }
    }

    #[test]
    fn batches_apply_in_order_and_repeats_are_skipped() {
        let mut mirror = Mirror::default();
        assert_eq!(
            mirror.apply(2, &[put("/a", "1", 2), put("/b", "1", 2)]),
            Ok(true)
        );
        assert_eq!(
            mirror.apply(
                3,
                &[Change::Delete {
                    key: b"/a".to_vec(),
                    revision: 3
                }]
            ),
            Ok(true)
        );
        // A resumed watch repeats revision 3: nothing changes.
        assert_eq!(mirror.apply(3, &[put("/a", "again", 3)]), Ok(false));
        assert_eq!(mirror.revision(), 3);
        assert!(mirror.get(b"/a").is_none());
        assert_eq!(
            mirror.get(b"/b").map(|v| v.value.as_slice()),
            Some(&b"1"[..])
        );
        assert_eq!(
            mirror.apply(5, &[put("/c", "1", 4)]),
            Err(MirrorError::OutOfOrder { have: 5, got: 4 })
        );
    }

    #[test]
    fn range_lists_one_prefix_in_key_order() {
        let mirror = Mirror::from_listing(
            [
                (b"/n/2".to_vec(), version(1)),
                (b"/n/1".to_vec(), version(1)),
                (b"/nodes".to_vec(), version(1)),
                (b"/m/1".to_vec(), version(1)),
            ],
            7,
        );
        let keys: Vec<&[u8]> = mirror.range(b"/n/").map(|(k, _)| k).collect();
        assert_eq!(keys, vec![&b"/n/1"[..], &b"/n/2"[..]]);
        let backwards: Vec<&[u8]> = mirror
            .under(b"/n/", b"/n/")
            .rev()
            .map(|(k, _)| k.as_slice())
            .collect();
        assert_eq!(backwards, vec![&b"/n/2"[..], &b"/n/1"[..]]);
        assert_eq!(
            mirror.last_under(b"/n/").map(|(k, _)| k),
            Some(&b"/n/2"[..])
        );
        assert_eq!(mirror.under(b"/n/", b"/n/2").count(), 1);
        assert!(mirror.last_under(b"/x/").is_none());
    }

    fn version(revision: i64) -> Versioned {
        Versioned {
            value: Vec::new(),
            create_revision: revision,
            mod_revision: revision,
            version: 1,
        }
    }

    #[tokio::test]
    async fn a_writer_waits_until_the_mirror_holds_its_write() {
        let handle = MirrorHandle::new(Mirror::default());
        let feeder = handle.clone();
        let waiter = tokio::spawn({
            let handle = handle.clone();
            async move {
                handle.caught_up(4).await;
                handle.read(|m| m.get(b"/k").map(|v| v.value.clone()))
            }
        });
        feeder.apply(3, &[put("/x", "1", 3)]).expect("3");
        feeder.apply(4, &[put("/k", "mine", 4)]).expect("4");
        let seen = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("caught up")
            .expect("task");
        assert_eq!(seen, Some(b"mine".to_vec()));
    }

    proptest! {
        /// Feeding a history in order, with any batch repeated (a resumed
        /// watch), ends where a plain map of the same history ends; so does
        /// a listing taken at any point followed by the rest.
        #[test]
        fn the_mirror_matches_the_history_it_was_fed(
            ops in proptest::collection::vec((0u8..6, any::<bool>(), any::<u8>()), 1..60),
            repeat_every in 1usize..5,
            cut in 0usize..60,
        ) {
            let mut model: BTreeMap<Vec<u8>, Versioned> = BTreeMap::new();
            let mut batches = Vec::new();
            for (i, (key, is_put, value)) in ops.iter().enumerate() {
                let revision = i as i64 + 2;
                let key = vec![b'/', b'a' + key];
                let change = if *is_put {
                    let v = Versioned {
                        value: vec![*value],
                        create_revision: model.get(&key).map_or(revision, |v| v.create_revision),
                        mod_revision: revision,
                        version: model.get(&key).map_or(1, |v| v.version + 1),
                    };
                    model.insert(key.clone(), v.clone());
                    Change::Put { key, value: v }
                } else {
                    model.remove(&key);
                    Change::Delete { key, revision }
                };
                batches.push((revision, vec![change]));
            }
            let last = batches.last().map_or(1, |(r, _)| *r);

            let mut fed = Mirror::from_listing([], 1);
            for (i, (revision, changes)) in batches.iter().enumerate() {
                fed.apply(*revision, changes).expect("in order");
                if i % repeat_every == 0 {
                    prop_assert_eq!(fed.apply(*revision, changes), Ok(false));
                }
            }
            prop_assert_eq!(fed.revision(), last);
            prop_assert_eq!(&fed.records, &model);

            // A listing at some revision, then the rest of the watch.
            let cut = cut.min(batches.len());
            let mut listed = Mirror::from_listing([], 1);
            for (revision, changes) in &batches[..cut] {
                listed.apply(*revision, changes).expect("in order");
            }
            let mut resumed = Mirror::from_listing(listed.records.clone(), listed.revision());
            for (revision, changes) in &batches {
                resumed.apply(*revision, changes).expect("in order or repeated");
            }
            prop_assert_eq!(&resumed.records, &model);
        }
    }
}
