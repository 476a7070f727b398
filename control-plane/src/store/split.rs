//! Deployment records split for a backend that limits the size of one
//! request (etcd: `--max-request-bytes`, 1.5 MiB by default). A 10k-node
//! record is about 1.9 MB of JSON, so it cannot be one value there. Pure:
//! the replicated backend feeds it the current header and the bucket keys
//! that exist, and writes what it returns.
//!
//! The form:
//! - the **header**, under the deployment's own key: the record without its
//!   per-node tracks (spec, state, waves, verdicts), and an [`Index`] of the
//!   track buckets that make up this version of the record;
//! - the **tracks** in buckets of [`TRACKS_PER_BUCKET`] consecutive tracks
//!   of the record's node list (which is fixed at creation and in wave
//!   order, so one wave's nodes share few buckets), each a zstd-compressed
//!   JSON array under a key of its own that names its bucket and the
//!   generation that wrote it.
//!
//! **Invariant: a header only ever names bucket values written whole before
//! it, and those are never overwritten while a header names them.** A write
//! puts changed buckets (and any whose key is gone) under keys of a new
//! generation, above that of every key that exists, so never on a key a
//! header names; then the header; then it deletes the keys the new header
//! no longer names. The backend commits in that order, so a reader
//! at any revision, including one after a writer died between two
//! transactions, assembles exactly one version that was written whole: the
//! old one (new buckets are not named yet) or the new one (old buckets are
//! deleted only after it). Each bucket's digest in the index is checked on
//! reading, so a mixed record is refused as corrupt instead of being acted
//! on. Keys named by no header (a dead writer's) are deleted by the next
//! write.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::DeploymentDocument;

/// Tracks per bucket. A track is about 185 bytes of JSON and at most about
/// 1.5 KB (a failure reason quotes an agent message of at most 1 KiB), so a
/// bucket's JSON stays under 200 KB before compression: far below the
/// per-request budget however the reasons read, and small enough that an
/// update touching a few nodes rewrites little.
pub const TRACKS_PER_BUCKET: usize = 128;

/// How a header begins: serde writes [`Header`]'s fields in order, and a
/// whole record (the embedded form, and etcd's before the split) begins
/// with its `id`.
const MARKER: &[u8] = b"{\"split\":";

/// The most a bucket's JSON may be when decompressed: a bound for reading,
/// far above what [`TRACKS_PER_BUCKET`] tracks can be.
const MAX_BUCKET_JSON: usize = 64 * 1024 * 1024;

/// zstd level: the default, fast and about 10x on track JSON.
const ZSTD_LEVEL: i32 = 3;

/// Which buckets make up one version of a record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    /// The version of the record: every write takes the next.
    pub generation: u64,
    /// Tracks in the record.
    pub tracks: usize,
    /// Tracks per bucket (the last bucket may hold fewer).
    pub per_bucket: usize,
    /// Bucket `i` holds tracks `i * per_bucket ..`.
    pub buckets: Vec<BucketRef>,
}

/// One bucket as a header names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketRef {
    /// The generation that wrote it: part of its key.
    pub generation: u64,
    /// SHA-256 of its JSON (before compression), hex: tells a write whether
    /// the bucket changed, and a read that it is the one the header names.
    pub digest: String,
}

/// A header as stored.
#[derive(Serialize, Deserialize)]
struct Header {
    split: Index,
    /// The record without its tracks, as the engine encoded it.
    record: serde_json::Value,
}

/// Just the index of a header (the record is skipped).
#[derive(Deserialize)]
struct HeaderIndex {
    split: Index,
}

/// What one write of a record stores, in the order it must commit.
#[derive(Debug, PartialEq, Eq)]
pub struct Written {
    /// New buckets: (bucket, generation, compressed JSON). First.
    pub puts: Vec<(usize, u64, Vec<u8>)>,
    /// The header's value, once every put is committed.
    pub header: Vec<u8>,
    /// Bucket keys (bucket, generation) the header no longer names: last.
    pub deletes: Vec<(usize, u64)>,
    /// The new version's index.
    pub index: Index,
}

/// Why a stored record cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    #[error("header is not a readable split record: {0}")]
    Header(String),
    #[error("track bucket {bucket} (generation {generation}) {why}")]
    Bucket {
        bucket: usize,
        generation: u64,
        why: String,
    },
}

/// Whether a stored value is a split header (else it is a whole record).
pub fn is_header(value: &[u8]) -> bool {
    value.starts_with(MARKER)
}

/// The index of a split header; `None` for a whole record.
pub fn index_of(value: &[u8]) -> Result<Option<Index>, SplitError> {
    if !is_header(value) {
        return Ok(None);
    }
    let header: HeaderIndex =
        serde_json::from_slice(value).map_err(|e| SplitError::Header(e.to_string()))?;
    check_index(&header.split)?;
    Ok(Some(header.split))
}

/// A split header's index and the record's header bytes (what
/// [`DeploymentDocument::header`] wrote); `None` for a whole record.
pub fn open_header(value: &[u8]) -> Result<Option<(Index, Vec<u8>)>, SplitError> {
    if !is_header(value) {
        return Ok(None);
    }
    let header: Header =
        serde_json::from_slice(value).map_err(|e| SplitError::Header(e.to_string()))?;
    check_index(&header.split)?;
    let record =
        serde_json::to_vec(&header.record).map_err(|e| SplitError::Header(e.to_string()))?;
    Ok(Some((header.split, record)))
}

fn check_index(index: &Index) -> Result<(), SplitError> {
    let expected = if index.per_bucket == 0 {
        None
    } else {
        Some(index.tracks.div_ceil(index.per_bucket))
    };
    if expected != Some(index.buckets.len()) {
        return Err(SplitError::Header(format!(
            "{} tracks in buckets of {} cannot be {} buckets",
            index.tracks,
            index.per_bucket,
            index.buckets.len()
        )));
    }
    Ok(())
}

/// A bucket's JSON from its stored value: decompressed and checked
/// against the digest the header names.
pub fn open_bucket(index: &Index, bucket: usize, value: &[u8]) -> Result<Vec<u8>, SplitError> {
    let Some(named) = index.buckets.get(bucket) else {
        return Err(SplitError::Bucket {
            bucket,
            generation: 0,
            why: format!("is beyond the header's {} buckets", index.buckets.len()),
        });
    };
    let error = |why: String| SplitError::Bucket {
        bucket,
        generation: named.generation,
        why,
    };
    let json = zstd::bulk::decompress(value, MAX_BUCKET_JSON)
        .map_err(|e| error(format!("does not decompress: {e}")))?;
    let digest = digest(&json);
    if digest != named.digest {
        return Err(error(format!(
            "holds content with digest {digest}, not the {} its header names",
            named.digest
        )));
    }
    Ok(json)
}

/// The tracks of bucket `bucket` in a record of `tracks` tracks.
pub fn bucket_range(bucket: usize, per_bucket: usize, tracks: usize) -> Range<usize> {
    let start = (bucket * per_bucket).min(tracks);
    start..(start + per_bucket).min(tracks)
}

/// What storing `record` writes, given the current header's index
/// (`None`: a new record, or a whole one from before the split) and the
/// bucket keys that exist for it (bucket, generation), committed or queued.
/// Unchanged buckets stay where they are, if their key exists; changed
/// ones (and any whose key is gone) get keys of a new generation; keys the
/// new header does not name are deleted. So the header never names a key
/// that neither exists nor is written with it.
pub fn split(
    previous: Option<&Index>,
    existing: &[(usize, u64)],
    record: &dyn DeploymentDocument,
) -> Written {
    // Above every generation in sight, so a put never lands on a key that
    // exists (not even one no header names: a dead writer's).
    let generation = existing
        .iter()
        .map(|(_, g)| *g)
        .chain(previous.map(|p| p.generation))
        .max()
        .unwrap_or(0)
        + 1;
    let tracks = record.track_count();
    let per_bucket = TRACKS_PER_BUCKET;
    // A previous index with another layout names nothing reusable.
    let reusable = previous.filter(|p| p.per_bucket == per_bucket);
    let present: std::collections::HashSet<(usize, u64)> = existing.iter().copied().collect();
    let mut buckets = Vec::with_capacity(tracks.div_ceil(per_bucket));
    let mut puts = Vec::new();
    for bucket in 0..tracks.div_ceil(per_bucket) {
        let json = record.tracks(bucket_range(bucket, per_bucket, tracks));
        let digest = digest(&json);
        match reusable.and_then(|p| p.buckets.get(bucket)) {
            Some(old) if old.digest == digest && present.contains(&(bucket, old.generation)) => {
                buckets.push(old.clone())
            }
            _ => {
                // Compressing our own bytes in memory cannot fail; should it,
                // the bucket is stored as it is and fails its digest check
                // on reading, loudly.
                let compressed = zstd::bulk::compress(&json, ZSTD_LEVEL).unwrap_or(json);
                puts.push((bucket, generation, compressed));
                buckets.push(BucketRef { generation, digest });
            }
        }
    }
    let index = Index {
        generation,
        tracks,
        per_bucket,
        buckets,
    };
    let named = |key: &(usize, u64)| {
        index
            .buckets
            .get(key.0)
            .is_some_and(|b| b.generation == key.1)
    };
    let mut deletes: Vec<(usize, u64)> = existing.iter().copied().filter(|k| !named(k)).collect();
    deletes.sort_unstable();
    deletes.dedup();
    let header = Header {
        split: index.clone(),
        record: serde_json::from_slice(&record.header()).unwrap_or(serde_json::Value::Null),
    };
    Written {
        puts,
        header: serde_json::to_vec(&header).unwrap_or_default(),
        deletes,
        index,
    }
}

/// A bucket's digest: SHA-256 of its JSON, hex.
fn digest(json: &[u8]) -> String {
    hex::encode(Sha256::digest(json))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// A record of a header and string items, standing for a deployment.
    #[derive(Clone, Debug, PartialEq)]
    struct Doc {
        header: String,
        items: Vec<String>,
    }

    impl DeploymentDocument for Doc {
        fn whole(&self) -> Vec<u8> {
            serde_json::to_vec(&(&self.header, &self.items)).unwrap_or_default()
        }
        fn header(&self) -> Vec<u8> {
            serde_json::to_vec(&self.header).unwrap_or_default()
        }
        fn track_count(&self) -> usize {
            self.items.len()
        }
        fn tracks(&self, range: Range<usize>) -> Vec<u8> {
            serde_json::to_vec(&self.items[range]).unwrap_or_default()
        }
    }

    /// A key space holding one record: its header and its bucket keys.
    #[derive(Clone, Default)]
    struct Space {
        header: Option<Vec<u8>>,
        buckets: BTreeMap<(usize, u64), Vec<u8>>,
    }

    /// One write of a split record, as the backend commits it in order.
    #[derive(Clone, Debug)]
    enum Op {
        Put(usize, u64, Vec<u8>),
        Header(Vec<u8>),
        Delete(usize, u64),
    }

    impl Space {
        fn existing(&self) -> Vec<(usize, u64)> {
            self.buckets.keys().copied().collect()
        }

        fn write(&mut self, doc: &Doc) -> Vec<Op> {
            let previous = self
                .header
                .as_deref()
                .map(|h| index_of(h).expect("readable").expect("split"));
            let written = split(previous.as_ref(), &self.existing(), doc);
            let mut ops: Vec<Op> = written
                .puts
                .into_iter()
                .map(|(b, g, v)| Op::Put(b, g, v))
                .collect();
            ops.push(Op::Header(written.header));
            ops.extend(written.deletes.into_iter().map(|(b, g)| Op::Delete(b, g)));
            ops
        }

        fn apply(&mut self, op: &Op) {
            match op {
                Op::Put(b, g, v) => {
                    self.buckets.insert((*b, *g), v.clone());
                }
                Op::Header(h) => self.header = Some(h.clone()),
                Op::Delete(b, g) => {
                    self.buckets.remove(&(*b, *g));
                }
            }
        }

        fn read(&self) -> Result<Doc, String> {
            let header = self.header.as_deref().ok_or("no header")?;
            let (index, record) = open_header(header)
                .map_err(|e| e.to_string())?
                .ok_or("not split")?;
            let mut items = Vec::new();
            for (i, named) in index.buckets.iter().enumerate() {
                let value = self
                    .buckets
                    .get(&(i, named.generation))
                    .ok_or(format!("bucket {i} missing"))?;
                let json = open_bucket(&index, i, value).map_err(|e| e.to_string())?;
                let part: Vec<String> = serde_json::from_slice(&json).map_err(|e| e.to_string())?;
                items.extend(part);
            }
            if items.len() != index.tracks {
                return Err(format!(
                    "{} items, header says {}",
                    items.len(),
                    index.tracks
                ));
            }
            Ok(Doc {
                header: serde_json::from_slice(&record).map_err(|e| e.to_string())?,
                items,
            })
        }
    }

    fn doc(items: usize) -> Doc {
        Doc {
            header: "h".into(),
            items: (0..items).map(|i| format!("node-{i:05} waiting")).collect(),
        }
    }

    #[test]
    fn a_change_of_one_item_rewrites_one_bucket_and_deletes_the_one_it_replaces() {
        let mut space = Space::default();
        let first = doc(1000);
        for op in space.write(&first) {
            space.apply(&op);
        }
        assert_eq!(space.buckets.len(), 1000usize.div_ceil(TRACKS_PER_BUCKET));
        let mut second = first.clone();
        second.items[300] = "node-00300 healthy".into();
        let ops = space.write(&second);
        let puts: Vec<(usize, u64)> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Put(b, g, _) => Some((*b, *g)),
                _ => None,
            })
            .collect();
        let deletes: Vec<(usize, u64)> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Delete(b, g) => Some((*b, *g)),
                _ => None,
            })
            .collect();
        assert_eq!(puts, vec![(300 / TRACKS_PER_BUCKET, 2)]);
        assert!(matches!(ops[1], Op::Header(_)), "{ops:?}");
        assert_eq!(deletes, vec![(300 / TRACKS_PER_BUCKET, 1)]);
        for op in &ops {
            space.apply(op);
        }
        assert_eq!(space.read(), Ok(second.clone()));
        // Writing the same record again writes only the header.
        let again = space.write(&second);
        assert_eq!(again.len(), 1, "{again:?}");
    }

    #[test]
    fn a_bucket_whose_key_is_gone_is_written_again() {
        let mut space = Space::default();
        let record = doc(500);
        for op in space.write(&record) {
            space.apply(&op);
        }
        let lost = *space.buckets.keys().nth(2).expect("a third bucket");
        space.buckets.remove(&lost);
        assert!(space.read().is_err(), "a named bucket is missing");
        let ops = space.write(&record);
        let puts: Vec<usize> = ops
            .iter()
            .filter_map(|op| match op {
                Op::Put(b, _, _) => Some(*b),
                _ => None,
            })
            .collect();
        assert_eq!(puts, vec![lost.0]);
        for op in &ops {
            space.apply(op);
        }
        assert_eq!(space.read(), Ok(record));
    }

    #[test]
    fn whole_records_are_not_headers_and_a_mixed_record_is_refused() {
        assert_eq!(index_of(br#"{"id":"d-1","nodes":[]}"#), Ok(None));
        let mut space = Space::default();
        for op in space.write(&doc(300)) {
            space.apply(&op);
        }
        // A bucket value replaced under the header (what the write order
        // rules out) is caught by its digest.
        let key = *space.buckets.keys().next().expect("a bucket");
        let other = zstd::bulk::compress(b"[\"x\"]", 3).expect("compress");
        space.buckets.insert(key, other);
        let error = space.read().expect_err("mixed record refused");
        assert!(error.contains("digest"), "{error}");
    }

    fn docs() -> impl Strategy<Value = (Doc, Doc)> {
        (0usize..700).prop_flat_map(|n| {
            let first = proptest::collection::vec("[a-z]{0,12}", n);
            (first, any::<String>(), any::<String>())
                .prop_flat_map(move |(items, h1, h2)| {
                    let changes =
                        proptest::collection::vec((0usize..n.max(1), "[a-z]{0,12}"), 0..20);
                    let resize = 0usize..800;
                    (Just(items), Just(h1), Just(h2), changes, resize)
                })
                .prop_map(|(items, h1, h2, changes, resize)| {
                    let first = Doc {
                        header: h1,
                        items: items.clone(),
                    };
                    let mut next = items;
                    for (i, value) in changes {
                        if let Some(slot) = next.get_mut(i) {
                            *slot = value;
                        }
                    }
                    // Now and then the node list changes length too.
                    if resize % 5 == 0 {
                        next.resize(resize, "new".into());
                    }
                    (
                        first,
                        Doc {
                            header: h2,
                            items: next,
                        },
                    )
                })
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Split then assemble gives the record back; and a writer that
        /// stops after any of its operations (a leader killed between
        /// transactions) leaves exactly the old or the new record, never a
        /// mix, and the next write from there is whole again.
        #[test]
        fn split_records_assemble_whole_at_every_point_of_a_write((first, second) in docs(), cut in 0usize..1000) {
            let mut space = Space::default();
            for op in space.write(&first) {
                space.apply(&op);
            }
            prop_assert_eq!(space.read(), Ok(first.clone()));

            let ops = space.write(&second);
            let cut = cut % (ops.len() + 1);
            let mut stopped = space.clone();
            for op in &ops[..cut] {
                stopped.apply(op);
            }
            let seen = stopped.read();
            prop_assert!(seen == Ok(first.clone()) || seen == Ok(second.clone()), "{:?}", seen);
            let header_at = ops.iter().position(|op| matches!(op, Op::Header(_))).expect("a header");
            if first != second {
                prop_assert_eq!(seen == Ok(second.clone()), cut > header_at);
            }

            // The next writer starts from what it finds and cleans up.
            for op in stopped.write(&second) {
                stopped.apply(&op);
            }
            prop_assert_eq!(stopped.read(), Ok(second.clone()));
            let index = index_of(stopped.header.as_deref().expect("header")).expect("ok").expect("split");
            let named: Vec<(usize, u64)> = index.buckets.iter().enumerate().map(|(i, b)| (i, b.generation)).collect();
            prop_assert_eq!(stopped.existing(), named);
        }
    }
}
