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
