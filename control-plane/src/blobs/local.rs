//! The local blob store, the default: `DATA_DIR/blobs/sha256/<hex>`.
//! Blobs are written to a temporary file, fsynced, and renamed into place, so
//! a blob that exists under its digest is complete. Uploads in progress live
//! in `blobs/tmp/` and are cleared at start-up.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use hotswap_common::artifact::Digest;
use hotswap_common::fsutil;
use tokio::io::AsyncSeekExt;

use super::{BlobError, BlobReader, BlobStore};

#[derive(Clone, Debug)]
pub struct LocalBlobs {
    root: PathBuf,
}

impl LocalBlobs {
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
    fn fresh_tmp_path(&self, purpose: &str) -> PathBuf {
        self.tmp_dir()
            .join(format!("{purpose}-{}", uuid::Uuid::new_v4()))
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("sha256").join(digest.hex())
    }

    /// Copy `len` bytes at `offset` of `source` into the blob for `digest`,
    /// checking the digest on the way. A blob already present is kept.
    fn copy_in(&self, source: &Path, offset: u64, len: u64, digest: &Digest) -> io::Result<()> {
        let target = self.path(digest);
        if target.is_file() {
            return Ok(());
        }
        let tmp = self.fresh_tmp_path("blob");
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

#[async_trait::async_trait]
impl BlobStore for LocalBlobs {
    fn tmp_path(&self, purpose: &str) -> PathBuf {
        self.fresh_tmp_path(purpose)
    }

    async fn put_from(
        &self,
        source: &Path,
        offset: u64,
        len: u64,
        digest: &Digest,
    ) -> Result<(), BlobError> {
        let store = self.clone();
        let (source, digest) = (source.to_path_buf(), *digest);
        tokio::task::spawn_blocking(move || store.copy_in(&source, offset, len, &digest))
            .await
            .map_err(|e| BlobError::io(format!("storing blob {digest}"), io::Error::other(e)))?
            .map_err(|e| BlobError::io(format!("cannot store blob {digest}"), e))
    }

    async fn contains(&self, digest: &Digest) -> Result<bool, BlobError> {
        Ok(tokio::fs::metadata(self.path(digest))
            .await
            .is_ok_and(|m| m.is_file()))
    }

    async fn size(&self, digest: &Digest) -> Result<u64, BlobError> {
        match tokio::fs::metadata(self.path(digest)).await {
            Ok(meta) => Ok(meta.len()),
            Err(e) => Err(not_found_or(digest, e)),
        }
    }

    async fn read_small(
        &self,
        digest: &Digest,
        max: u64,
    ) -> Result<Option<bytes::Bytes>, BlobError> {
        let path = self.path(digest);
        let loaded = tokio::task::spawn_blocking(move || -> io::Result<Option<Vec<u8>>> {
            let mut file = File::open(&path)?;
            if file.metadata()?.len() > max {
                return Ok(None);
            }
            let mut content = Vec::new();
            // One more byte than allowed: a blob that grew is not returned.
            (&mut file).take(max + 1).read_to_end(&mut content)?;
            Ok((content.len() as u64 <= max).then_some(content))
        })
        .await
        .map_err(|e| BlobError::io(format!("reading {digest}"), io::Error::other(e)))?
        .map_err(|e| not_found_or(digest, e))?;
        Ok(loaded.map(bytes::Bytes::from))
    }

    async fn open(&self, digest: &Digest, offset: u64) -> Result<BlobReader, BlobError> {
        let mut file = tokio::fs::File::open(self.path(digest))
            .await
            .map_err(|e| not_found_or(digest, e))?;
        let size = file
            .metadata()
            .await
            .map_err(|e| BlobError::io(format!("reading {digest}"), e))?
            .len();
        if offset > size {
            return Err(BlobError::PastEnd {
                digest: *digest,
                offset,
                size,
            });
        }
        file.seek(SeekFrom::Start(offset))
            .await
            .map_err(|e| BlobError::io(format!("reading {digest}"), e))?;
        Ok(BlobReader {
            size,
            reader: Box::pin(file),
        })
    }
}

fn not_found_or(digest: &Digest, error: io::Error) -> BlobError {
    if error.kind() == io::ErrorKind::NotFound {
        BlobError::NotFound { digest: *digest }
    } else {
        BlobError::io(format!("reading {digest}"), error)
    }
}
