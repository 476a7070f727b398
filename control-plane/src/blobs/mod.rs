//! Artifact content, named by its SHA-256 digest, behind a port of our own
//! (`BlobStore`). Two backends: `local` (files under the data directory, the
//! default) and `s3` (an S3-compatible object store, SPEC §7). Uploads are
//! always staged in a local temporary file and verified before they are put;
//! `HotBlobs` keeps small blobs in memory in front of either.

pub mod local;
pub mod s3;

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use hotswap_common::artifact::Digest;
use tokio::io::AsyncRead;

pub use local::LocalBlobs;
pub use s3::{S3Blobs, S3Config, S3Credentials, create_bucket_if_missing};

/// Why a blob operation failed; every variant names the blob or the store.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("no blob with digest {digest}")]
    NotFound { digest: Digest },
    #[error("offset {offset} is past the end of {digest} ({size} bytes)")]
    PastEnd {
        digest: Digest,
        offset: u64,
        size: u64,
    },
    /// The bytes stored under a digest are not the bytes it names: never
    /// served.
    #[error("blob {digest} is corrupt in the store: {detail}")]
    Corrupt { digest: Digest, detail: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The object store refused our credentials.
    #[error(
        "object store refused {operation} in bucket {bucket:?} (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): {detail}"
    )]
    Denied {
        operation: String,
        bucket: String,
        detail: String,
    },
    #[error("object store {operation} in bucket {bucket:?} failed: {detail}")]
    Remote {
        operation: String,
        bucket: String,
        detail: String,
    },
    #[error("blob store configuration: {0}")]
    Config(String),
}

impl BlobError {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        BlobError::Io {
            context: context.into(),
            source,
        }
    }

    /// The underlying I/O error, when the failure was local disk I/O (for
    /// telling a full disk from other failures).
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            BlobError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A blob's bytes from some offset on, with its total size.
pub struct BlobReader {
    /// Size of the whole blob, not of what is left after the offset.
    pub size: u64,
    /// The bytes from the requested offset to the end. A backend that checks
    /// digests on read fails the read (an `io::Error` naming the digest)
    /// before the last byte of a corrupt blob is returned.
    pub reader: Pin<Box<dyn AsyncRead + Send>>,
}

/// Where artifact content lives. Blobs are immutable and named by digest, so
/// putting one twice is harmless and a copy is never stale.
#[async_trait::async_trait]
pub trait BlobStore: Send + Sync + 'static {
    /// A fresh path in a local directory for staging an upload; the caller
    /// removes the file when done. Leftovers are cleared when the store opens.
    fn tmp_path(&self, purpose: &str) -> PathBuf;

    /// Store `len` bytes at `offset` of the local file `source` as the blob
    /// `digest`, checking the digest on the way. A blob already present is
    /// kept and the call succeeds.
    async fn put_from(
        &self,
        source: &Path,
        offset: u64,
        len: u64,
        digest: &Digest,
    ) -> Result<(), BlobError>;

    /// Whether the blob exists.
    async fn contains(&self, digest: &Digest) -> Result<bool, BlobError>;

    /// Size of the blob in bytes.
    async fn size(&self, digest: &Digest) -> Result<u64, BlobError>;

    /// The whole blob when it is at most `max` bytes long, `None` when it is
    /// longer.
    async fn read_small(
        &self,
        digest: &Digest,
        max: u64,
    ) -> Result<Option<bytes::Bytes>, BlobError>;

    /// The blob's bytes from `offset` on (agents resume interrupted
    /// fetches). `PastEnd` when `offset` is beyond its size.
    async fn open(&self, digest: &Digest, offset: u64) -> Result<BlobReader, BlobError>;
}

/// Small blobs kept in memory after their first fetch. A deployment sends the
/// same artifact to every node of a wave; reading it from disk per node
/// (open, seek and reads on the blocking pool, a fresh buffer per read) was a
/// fifth of the control plane's CPU when 10k agents fetched one 64 KiB
/// artifact. Blobs are immutable and named by their digest, so a cached copy
/// is never stale; agents check the digest of whatever they receive anyway.
pub struct HotBlobs {
    entries: std::sync::Mutex<HotEntries>,
    /// One load at a time: a wave of fetches for a blob not cached yet reads
    /// it once, not once per node.
    loading: tokio::sync::Mutex<()>,
    max_blob: u64,
    capacity: u64,
}

#[derive(Default)]
struct HotEntries {
    blobs: std::collections::HashMap<Digest, (bytes::Bytes, u64)>,
    total: u64,
    clock: u64,
}

impl HotEntries {
    fn get(&mut self, digest: &Digest) -> Option<bytes::Bytes> {
        self.clock += 1;
        let clock = self.clock;
        self.blobs.get_mut(digest).map(|(bytes, used)| {
            *used = clock;
            bytes.clone()
        })
    }

    /// Insert, then drop the least recently used blobs over `capacity`.
    fn insert(&mut self, digest: Digest, bytes: bytes::Bytes, capacity: u64) {
        self.clock += 1;
        self.total += bytes.len() as u64;
        if let Some((old, _)) = self.blobs.insert(digest, (bytes, self.clock)) {
            self.total -= old.len() as u64;
        }
        while self.total > capacity {
            let Some(oldest) = self
                .blobs
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(d, _)| *d)
            else {
                break;
            };
            if let Some((gone, _)) = self.blobs.remove(&oldest) {
                self.total -= gone.len() as u64;
            }
        }
    }
}

impl HotBlobs {
    /// Blobs up to `max_blob` bytes, `capacity` bytes in all.
    pub fn new(max_blob: u64, capacity: u64) -> Self {
        Self {
            entries: std::sync::Mutex::new(HotEntries::default()),
            loading: tokio::sync::Mutex::new(()),
            max_blob: max_blob.min(capacity),
            capacity,
        }
    }

    fn cached(&self, digest: &Digest) -> Option<bytes::Bytes> {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
    }

    /// The whole content of `digest` from memory, read from `store` on a
    /// miss; `Ok(None)` when the blob is too big to cache (stream it with
    /// `BlobStore::open`). `BlobError::NotFound` when there is no such blob.
    pub async fn get(
        &self,
        store: &dyn BlobStore,
        digest: &Digest,
    ) -> Result<Option<bytes::Bytes>, BlobError> {
        if let Some(bytes) = self.cached(digest) {
            return Ok(Some(bytes));
        }
        let _loading = self.loading.lock().await;
        if let Some(bytes) = self.cached(digest) {
            return Ok(Some(bytes));
        }
        let Some(bytes) = store.read_small(digest, self.max_blob).await? else {
            return Ok(None);
        };
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(*digest, bytes.clone(), self.capacity);
        Ok(Some(bytes))
    }

    /// Bytes held now.
    pub fn size(&self) -> u64 {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A blob of `len` bytes of `fill` in `store`, returned by digest.
    async fn blob(store: &LocalBlobs, dir: &Path, fill: u8, len: usize) -> Digest {
        let content = vec![fill; len];
        let source = dir.join(format!("src-{fill}"));
        fs::write(&source, &content).expect("write source");
        let digest = Digest::of(&content);
        store
            .put_from(&source, 0, len as u64, &digest)
            .await
            .expect("put blob");
        digest
    }

    #[tokio::test]
    async fn hot_blobs_serve_from_memory_evict_the_least_recent_and_skip_big_ones() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = LocalBlobs::open(&tmp.path().join("blobs")).expect("open");
        let hot = HotBlobs::new(1000, 2500);
        let a = blob(&store, tmp.path(), 1, 1000).await;
        let b = blob(&store, tmp.path(), 2, 1000).await;
        let c = blob(&store, tmp.path(), 3, 1000).await;
        let big = blob(&store, tmp.path(), 4, 1001).await;

        let got = hot.get(&store, &a).await.expect("get a").expect("cached");
        assert_eq!(&got[..], &[1u8; 1000][..]);
        // Served from memory: the file is gone and it still answers.
        fs::remove_file(store.path(&a)).expect("remove a");
        assert_eq!(hot.get(&store, &a).await.expect("a again"), Some(got));
        hot.get(&store, &b).await.expect("get b");
        assert_eq!(hot.size(), 2000);
        // Use `a` again, so `b` is the least recently used.
        hot.get(&store, &a).await.expect("touch a");
        // A third blob goes over 2500: the least recently used (`b`) goes.
        hot.get(&store, &c).await.expect("get c");
        assert_eq!(hot.size(), 2000);
        fs::remove_file(store.path(&b)).expect("remove b");
        let err = hot.get(&store, &b).await.expect_err("b was evicted");
        assert!(matches!(err, BlobError::NotFound { .. }), "{err}");
        assert!(hot.get(&store, &a).await.expect("a").is_some());

        // Too big to keep: the caller streams it from disk.
        assert_eq!(hot.get(&store, &big).await.expect("big"), None);
        assert_eq!(hot.size(), 2000);
        // No such blob at all.
        let missing = Digest::of(b"nothing");
        let err = hot.get(&store, &missing).await.expect_err("missing");
        assert!(matches!(err, BlobError::NotFound { .. }), "{err}");
    }
}
