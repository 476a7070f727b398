//! Content-addressed blob storage on disk: `DATA_DIR/blobs/sha256/<hex>`.
//! Blobs are written to a temporary file, fsynced, and renamed into place, so
//! a blob that exists under its digest is complete. Uploads in progress live
//! in `blobs/tmp/` and are cleared at start-up.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use hotswap_common::artifact::Digest;
use hotswap_common::fsutil;

#[derive(Clone, Debug)]
pub struct BlobStore {
    root: PathBuf,
}

impl BlobStore {
    /// Open (creating the directories) and remove leftovers of interrupted uploads.
    pub fn open(root: &Path) -> io::Result<Self> {
        let store = Self {
            root: root.to_path_buf(),
        };
        fsutil::create_private_dir(&store.root.join("sha256"))?;
        let tmp = store.tmp_dir();
        if tmp.exists() {
            fs::remove_dir_all(&tmp)?;
        }
        fsutil::create_private_dir(&tmp)?;
        Ok(store)
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A fresh temporary path for an upload.
    pub fn tmp_path(&self, purpose: &str) -> PathBuf {
        self.tmp_dir()
            .join(format!("{purpose}-{}", uuid::Uuid::new_v4()))
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("sha256").join(digest.hex())
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Copy `len` bytes at `offset` of `source` into the blob for `digest`,
    /// checking the digest on the way. A blob already present is kept.
    pub fn put_from(
        &self,
        source: &Path,
        offset: u64,
        len: u64,
        digest: &Digest,
    ) -> io::Result<()> {
        let target = self.path(digest);
        if target.is_file() {
            return Ok(());
        }
        let tmp = self.tmp_path("blob");
        let result = (|| {
            let mut input = File::open(source)?;
            input.seek(SeekFrom::Start(offset))?;
            let mut input = input.take(len);
            let mut output = File::create(&tmp)?;
            let mut hasher = sha2::Sha256::default();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let n = input.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                sha2::Digest::update(&mut hasher, &buf[..n]);
                output.write_all(&buf[..n])?;
            }
            let written = Digest(sha2::Digest::finalize(hasher).into());
            if written != *digest {
                return Err(io::Error::other(format!(
                    "blob digest changed while copying: {written} != {digest}"
                )));
            }
            output.sync_all()?;
            fs::rename(&tmp, &target)?;
            fsutil::sync_dir(&self.root.join("sha256"))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
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
    /// miss; `Ok(None)` when the blob is too big to cache (stream it from
    /// disk). `NotFound` when there is no such blob.
    pub async fn get(
        &self,
        store: &BlobStore,
        digest: &Digest,
    ) -> io::Result<Option<bytes::Bytes>> {
        if let Some(bytes) = self.cached(digest) {
            return Ok(Some(bytes));
        }
        let _loading = self.loading.lock().await;
        if let Some(bytes) = self.cached(digest) {
            return Ok(Some(bytes));
        }
        let path = store.path(digest);
        let max_blob = self.max_blob;
        let loaded = tokio::task::spawn_blocking(move || -> io::Result<Option<Vec<u8>>> {
            let mut file = File::open(&path)?;
            if file.metadata()?.len() > max_blob {
                return Ok(None);
            }
            let mut content = Vec::new();
            // One more byte than allowed: a blob that grew is not cached.
            (&mut file).take(max_blob + 1).read_to_end(&mut content)?;
            Ok((content.len() as u64 <= max_blob).then_some(content))
        })
        .await
        .map_err(io::Error::other)??;
        let Some(content) = loaded else {
            return Ok(None);
        };
        let bytes = bytes::Bytes::from(content);
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

    /// A blob of `len` bytes of `fill` in `store`, returned by digest.
    fn blob(store: &BlobStore, dir: &Path, fill: u8, len: usize) -> Digest {
        let content = vec![fill; len];
        let source = dir.join(format!("src-{fill}"));
        fs::write(&source, &content).expect("write source");
        let digest = Digest::of(&content);
        store
            .put_from(&source, 0, len as u64, &digest)
            .expect("put blob");
        digest
    }

    #[tokio::test]
    async fn hot_blobs_serve_from_memory_evict_the_least_recent_and_skip_big_ones() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let store = BlobStore::open(&tmp.path().join("blobs")).expect("open");
        let hot = HotBlobs::new(1000, 2500);
        let a = blob(&store, tmp.path(), 1, 1000);
        let b = blob(&store, tmp.path(), 2, 1000);
        let c = blob(&store, tmp.path(), 3, 1000);
        let big = blob(&store, tmp.path(), 4, 1001);

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
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(hot.get(&store, &a).await.expect("a").is_some());

        // Too big to keep: the caller streams it from disk.
        assert_eq!(hot.get(&store, &big).await.expect("big"), None);
        assert_eq!(hot.size(), 2000);
        // No such blob at all.
        let missing = Digest::of(b"nothing");
        let err = hot.get(&store, &missing).await.expect_err("missing");
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
