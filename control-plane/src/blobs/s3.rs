//! The S3 blob store (SPEC §7 `[blobs] backend = "s3"`): each blob is one
//! object `<prefix>/sha256/<hex>` in a bucket of an S3-compatible store
//! (AWS S3, MinIO, Ceph, SeaweedFS, Garage), through `object_store`.
//!
//! - **Writes** are create-only (`If-None-Match: *`): an object already there
//!   under the digest is success, after a size check. Content above
//!   `SINGLE_PUT_MAX_BYTES` goes up in a multipart upload, which S3 cannot
//!   make conditional here; the key is checked first, and a racing writer
//!   writes the same verified bytes, so the result is the same.
//! - **Reads** check the SHA-256 of every object against its name: a whole
//!   read (`read_small`) fails before returning anything, a streamed read
//!   (`open`) holds back its last chunk until the digest checks, so a corrupt
//!   object never reaches a client whole. A streamed read always reads the
//!   object from its start (the bytes before the offset are hashed, not sent).
//! - **Credentials** come from `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`
//!   and `AWS_SESSION_TOKEN` (`S3Credentials::from_env`).
//! - **Buckets**: `create_bucket_if_missing` sends a signed `CreateBucket`
//!   (signed by `rusty-s3`; `object_store` has no bucket operations).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use hotswap_common::artifact::Digest;
use hotswap_common::fsutil;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use serde::Deserialize;
use sha2::Digest as _;
use tokio::io::AsyncReadExt;

use super::{BlobError, BlobReader, BlobStore};

/// Content up to this size is put in one conditional request from memory.
const SINGLE_PUT_MAX_BYTES: u64 = 16 * 1024 * 1024;
/// Part size of multipart uploads (S3's minimum is 5 MiB).
const PART_BYTES: usize = 8 * 1024 * 1024;
/// Parts in flight at once in a multipart upload.
const PART_CONCURRENCY: usize = 2;
/// Chunk of a staged file read at a time while hashing and uploading.
const READ_BYTES: usize = 1024 * 1024;

/// `[blobs]` settings for the S3 backend (SPEC §7).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket; empty for none.
    #[serde(default)]
    pub prefix: String,
    /// Endpoint URL of a store other than AWS, e.g. `http://127.0.0.1:8333`;
    /// requests then use path-style addressing (`ENDPOINT/BUCKET/KEY`).
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
}

fn default_region() -> String {
    "us-east-1".to_string()
}

/// S3 credentials. `Debug` does not show the secret.
#[derive(Clone)]
pub struct S3Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
}

impl std::fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

impl S3Credentials {
    /// From `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and the optional
    /// `AWS_SESSION_TOKEN`.
    pub fn from_env() -> Result<Self, BlobError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let missing = |name: &str| {
            BlobError::Config(format!(
                "{name} is not set; the s3 blob backend takes its credentials from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ))
        };
        Ok(Self {
            access_key_id: var("AWS_ACCESS_KEY_ID").ok_or_else(|| missing("AWS_ACCESS_KEY_ID"))?,
            secret_access_key: var("AWS_SECRET_ACCESS_KEY")
                .ok_or_else(|| missing("AWS_SECRET_ACCESS_KEY"))?,
            session_token: var("AWS_SESSION_TOKEN"),
        })
    }
}

/// The object key of `digest` under `prefix`: `<prefix>/sha256/<hex>`, or
/// `sha256/<hex>` without a prefix. Slashes around the prefix are ignored.
pub fn object_key(prefix: &str, digest: &Digest) -> String {
    let prefix = prefix.trim_matches('/');
    if prefix.is_empty() {
        format!("sha256/{}", digest.hex())
    } else {
        format!("{prefix}/sha256/{}", digest.hex())
    }
}

/// Blobs in an S3 bucket, with uploads staged in a local directory.
#[derive(Clone, Debug)]
pub struct S3Blobs {
    store: Arc<AmazonS3>,
    config: S3Config,
    staging: PathBuf,
}

impl S3Blobs {
    /// A store for `config`, staging uploads in `staging` (created, and
    /// cleared of leftovers of interrupted uploads). Makes no request.
    pub fn open(
        config: &S3Config,
        credentials: &S3Credentials,
        staging: &Path,
    ) -> Result<Self, BlobError> {
        // reqwest's rustls uses the process's provider (ring).
        hotswap_common::install_crypto_provider();
        if config.bucket.is_empty() {
            return Err(BlobError::Config("[blobs] bucket is empty".to_string()));
        }
        if object_store::path::Path::parse(config.prefix.trim_matches('/')).is_err() {
            return Err(BlobError::Config(format!(
                "[blobs] prefix {:?} is not a valid object key prefix",
                config.prefix
            )));
        }
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&credentials.access_key_id)
            .with_secret_access_key(&credentials.secret_access_key);
        if let Some(token) = &credentials.session_token {
            builder = builder.with_token(token);
        }
        if let Some(endpoint) = &config.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"));
        }
        let store = builder
            .build()
            .map_err(|e| BlobError::Config(format!("s3 bucket {:?}: {e}", config.bucket)))?;
        if staging.exists() {
            std::fs::remove_dir_all(staging)
                .map_err(|e| BlobError::io(format!("clearing {}", staging.display()), e))?;
        }
        fsutil::create_private_dir(staging)
            .map_err(|e| BlobError::io(format!("creating {}", staging.display()), e))?;
        Ok(Self {
            store: Arc::new(store),
            config: config.clone(),
            staging: staging.to_path_buf(),
        })
    }

    pub fn config(&self) -> &S3Config {
        &self.config
    }

    fn key(&self, digest: &Digest) -> ObjectPath {
        ObjectPath::from(object_key(&self.config.prefix, digest))
    }

    /// Our error for a failed `operation` on the blob `digest`.
    fn error(&self, operation: &str, digest: &Digest, error: object_store::Error) -> BlobError {
        let operation = format!("{operation} of {digest}");
        match error {
            object_store::Error::NotFound { .. } => BlobError::NotFound { digest: *digest },
            object_store::Error::PermissionDenied { .. }
            | object_store::Error::Unauthenticated { .. } => BlobError::Denied {
                operation,
                bucket: self.config.bucket.clone(),
                detail: error.to_string(),
            },
            other => {
                let detail = other.to_string();
                // Some stores answer a bad key or signature with a plain 403.
                if detail.contains("403")
                    || detail.contains("AccessDenied")
                    || detail.contains("InvalidAccessKeyId")
                    || detail.contains("SignatureDoesNotMatch")
                {
                    BlobError::Denied {
                        operation,
                        bucket: self.config.bucket.clone(),
                        detail,
                    }
                } else {
                    BlobError::Remote {
                        operation,
                        bucket: self.config.bucket.clone(),
                        detail,
                    }
                }
            }
        }
    }

    /// Size of the object under `digest`, `None` when there is none.
    async fn head(&self, digest: &Digest) -> Result<Option<u64>, BlobError> {
        match self.store.head(&self.key(digest)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("head", digest, e)),
        }
    }

    /// An object already under `digest` (we lost a race, or the put is a
    /// repeat) is accepted when its size is right; its bytes are checked on
    /// every read.
    async fn accept_existing(&self, digest: &Digest, len: u64) -> Result<(), BlobError> {
        match self.head(digest).await? {
            Some(size) if size == len => Ok(()),
            Some(size) => Err(BlobError::Corrupt {
                digest: *digest,
                detail: format!("the stored object has {size} bytes, the content has {len}"),
            }),
            None => Err(BlobError::Remote {
                operation: format!("put of {digest}"),
                bucket: self.config.bucket.clone(),
                detail: "the store reported the object as existing, then not found".to_string(),
            }),
        }
    }

    async fn put_single(
        &self,
        source: &Path,
        offset: u64,
        len: u64,
        digest: &Digest,
    ) -> Result<(), BlobError> {
        let mut content = Vec::with_capacity(len as usize);
        let mut hasher = sha2::Sha256::default();
        let mut range = StagedRange::open(source, offset, len).await?;
        while let Some(chunk) = range.next().await? {
            hasher.update(chunk);
            content.extend_from_slice(chunk);
        }
        check_digest(digest, hasher)?;
        let payload = PutPayload::from(Bytes::from(content));
        match self
            .store
            .put_opts(
                &self.key(digest),
                payload,
                PutOptions::from(PutMode::Create),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => self.accept_existing(digest, len).await,
            Err(e) => Err(self.error("put", digest, e)),
        }
    }

    async fn put_multipart(
        &self,
        source: &Path,
        offset: u64,
        len: u64,
        digest: &Digest,
    ) -> Result<(), BlobError> {
        let upload = self
            .store
            .put_multipart(&self.key(digest))
            .await
            .map_err(|e| self.error("multipart upload", digest, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
        let mut hasher = sha2::Sha256::default();
        let written = async {
            let mut range = StagedRange::open(source, offset, len).await?;
            while let Some(chunk) = range.next().await? {
                hasher.update(chunk);
                writer.write(chunk);
                // Bounded memory: wait while too many parts are in flight.
                writer
                    .wait_for_capacity(PART_CONCURRENCY)
                    .await
                    .map_err(|e| self.error("multipart upload", digest, e))?;
            }
            Ok::<(), BlobError>(())
        }
        .await;
        // A digest that does not check is never completed.
        let checked = written.and_then(|()| check_digest(digest, hasher));
        if let Err(e) = checked {
            let _ = writer.abort().await;
            return Err(e);
        }
        writer
            .finish()
            .await
            .map_err(|e| self.error("multipart upload", digest, e))?;
        Ok(())
    }
}

/// Fail unless `hasher` saw exactly the bytes `digest` names.
fn check_digest(digest: &Digest, hasher: sha2::Sha256) -> Result<(), BlobError> {
    let got = Digest(hasher.finalize().into());
    if got == *digest {
        Ok(())
    } else {
        Err(BlobError::Corrupt {
            digest: *digest,
            detail: format!("the content hashes to {got}"),
        })
    }
}

/// `len` bytes at `offset` of a staged file, read a chunk at a time.
struct StagedRange {
    source: PathBuf,
    file: tokio::io::Take<tokio::fs::File>,
    buf: Vec<u8>,
    len: u64,
    read: u64,
}

impl StagedRange {
    async fn open(source: &Path, offset: u64, len: u64) -> Result<Self, BlobError> {
        let context = || format!("reading staged upload {}", source.display());
        let mut file = tokio::fs::File::open(source)
            .await
            .map_err(|e| BlobError::io(context(), e))?;
        tokio::io::AsyncSeekExt::seek(&mut file, io::SeekFrom::Start(offset))
            .await
            .map_err(|e| BlobError::io(context(), e))?;
        Ok(Self {
            source: source.to_path_buf(),
            file: file.take(len),
            buf: vec![0u8; READ_BYTES],
            len,
            read: 0,
        })
    }

    /// The next chunk, `None` at the end of the range.
    async fn next(&mut self) -> Result<Option<&[u8]>, BlobError> {
        let context = || format!("reading staged upload {}", self.source.display());
        let n = self
            .file
            .read(&mut self.buf)
            .await
            .map_err(|e| BlobError::io(context(), e))?;
        if n == 0 {
            if self.read != self.len {
                return Err(BlobError::io(
                    context(),
                    io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{} of {} bytes", self.read, self.len),
                    ),
                ));
            }
            return Ok(None);
        }
        self.read += n as u64;
        Ok(Some(&self.buf[..n]))
    }
}

#[async_trait::async_trait]
impl BlobStore for S3Blobs {
    fn tmp_path(&self, purpose: &str) -> PathBuf {
        self.staging
            .join(format!("{purpose}-{}", uuid::Uuid::new_v4()))
    }

    async fn put_from(
        &self,
        source: &Path,
        offset: u64,
        len: u64,
        digest: &Digest,
    ) -> Result<(), BlobError> {
        if self.head(digest).await?.is_some() {
            return self.accept_existing(digest, len).await;
        }
        if len <= SINGLE_PUT_MAX_BYTES {
            self.put_single(source, offset, len, digest).await
        } else {
            self.put_multipart(source, offset, len, digest).await
        }
    }

    async fn contains(&self, digest: &Digest) -> Result<bool, BlobError> {
        Ok(self.head(digest).await?.is_some())
    }

    async fn size(&self, digest: &Digest) -> Result<u64, BlobError> {
        self.head(digest)
            .await?
            .ok_or(BlobError::NotFound { digest: *digest })
    }

    async fn read_small(&self, digest: &Digest, max: u64) -> Result<Option<Bytes>, BlobError> {
        let result = self
            .store
            .get(&self.key(digest))
            .await
            .map_err(|e| self.error("get", digest, e))?;
        if result.meta.size > max {
            return Ok(None);
        }
        let content = result
            .bytes()
            .await
            .map_err(|e| self.error("get", digest, e))?;
        let mut hasher = sha2::Sha256::default();
        hasher.update(&content);
        check_digest(digest, hasher)?;
        Ok(Some(content))
    }

    async fn open(&self, digest: &Digest, offset: u64) -> Result<BlobReader, BlobError> {
        let result = self
            .store
            .get(&self.key(digest))
            .await
            .map_err(|e| self.error("get", digest, e))?;
        let size = result.meta.size;
        if offset > size {
            return Err(BlobError::PastEnd {
                digest: *digest,
                offset,
                size,
            });
        }
        let bucket = self.config.bucket.clone();
        let verified = Verified {
            digest: *digest,
            bucket,
            size,
            skip: offset,
            seen: 0,
            hasher: sha2::Sha256::default(),
            held: None,
            source: Some(result.into_stream()),
        };
        let stream = futures_util::stream::unfold(verified, |mut v| async move {
            v.next().await.map(|item| (item, v))
        });
        Ok(BlobReader {
            size,
            reader: Box::pin(tokio_util::io::StreamReader::new(stream)),
        })
    }
}

/// An object's bytes from an offset on, checked against its digest: the
/// chunk before the end is held back until the whole object hashed right.
struct Verified {
    digest: Digest,
    bucket: String,
    size: u64,
    /// Bytes at the start still to hash without returning.
    skip: u64,
    seen: u64,
    hasher: sha2::Sha256,
    held: Option<Bytes>,
    /// `None` once the object was read to its end (or failed).
    source: Option<BoxStream<'static, object_store::Result<Bytes>>>,
}

impl Verified {
    fn fail(&mut self, message: String) -> io::Result<Bytes> {
        self.source = None;
        self.held = None;
        Err(io::Error::other(message))
    }

    async fn next(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            let Some(source) = self.source.as_mut() else {
                return self.held.take().map(Ok);
            };
            match source.next().await {
                Some(Ok(mut chunk)) => {
                    self.hasher.update(&chunk);
                    self.seen += chunk.len() as u64;
                    if self.seen > self.size {
                        let digest = self.digest;
                        return Some(self.fail(format!(
                            "blob {digest} in bucket {:?} is longer than its listed {} bytes",
                            self.bucket, self.size
                        )));
                    }
                    if self.skip > 0 {
                        let drop = self.skip.min(chunk.len() as u64);
                        self.skip -= drop;
                        let _ = chunk.split_to(drop as usize);
                    }
                    if chunk.is_empty() {
                        continue;
                    }
                    if let Some(previous) = self.held.replace(chunk) {
                        return Some(Ok(previous));
                    }
                }
                Some(Err(e)) => {
                    let digest = self.digest;
                    return Some(self.fail(format!(
                        "reading blob {digest} from bucket {:?}: {e}",
                        self.bucket
                    )));
                }
                None => {
                    self.source = None;
                    let hasher = std::mem::take(&mut self.hasher);
                    let got = Digest(hasher.finalize().into());
                    if self.seen != self.size || got != self.digest {
                        let digest = self.digest;
                        return Some(self.fail(format!(
                            "blob {digest} is corrupt in bucket {:?}: its {} bytes hash to {got}; not served",
                            self.bucket, self.seen
                        )));
                    }
                    // Checked: hand out the last chunk, then end.
                }
            }
        }
    }
}

/// Create `config.bucket` unless it exists already (and is ours). Returns
/// whether it was created.
pub async fn create_bucket_if_missing(
    config: &S3Config,
    credentials: &S3Credentials,
) -> Result<bool, BlobError> {
    hotswap_common::install_crypto_provider();
    let endpoint = match &config.endpoint {
        Some(endpoint) => endpoint.clone(),
        None => format!("https://s3.{}.amazonaws.com", config.region),
    };
    let url = reqwest::Url::parse(&endpoint)
        .map_err(|e| BlobError::Config(format!("s3 endpoint {endpoint:?}: {e}")))?;
    let style = if config.endpoint.is_some() {
        rusty_s3::UrlStyle::Path
    } else {
        rusty_s3::UrlStyle::VirtualHost
    };
    let bucket = rusty_s3::Bucket::new(url, style, config.bucket.clone(), config.region.clone())
        .map_err(|e| BlobError::Config(format!("s3 bucket {:?}: {e}", config.bucket)))?;
    let keys = match &credentials.session_token {
        Some(token) => rusty_s3::Credentials::new_with_token(
            &credentials.access_key_id,
            &credentials.secret_access_key,
            token,
        ),
        None => {
            rusty_s3::Credentials::new(&credentials.access_key_id, &credentials.secret_access_key)
        }
    };
    let action = bucket.create_bucket(&keys);
    let body = action.body();
    let signed = rusty_s3::S3Action::sign(&action, std::time::Duration::from_secs(60));
    let remote = |detail: String| BlobError::Remote {
        operation: "create bucket".to_string(),
        bucket: config.bucket.clone(),
        detail,
    };
    let client = reqwest::Client::builder()
        .build()
        .map_err(|e| remote(format!("building the HTTP client: {e}")))?;
    let response = client
        .put(signed)
        .body(body)
        .send()
        .await
        .map_err(|e| remote(format!("request to {endpoint}: {e}")))?;
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    if status.is_success() {
        return Ok(true);
    }
    if text.contains("BucketAlreadyOwnedByYou") {
        return Ok(false);
    }
    if status.as_u16() == 403
        || text.contains("AccessDenied")
        || text.contains("InvalidAccessKeyId")
    {
        return Err(BlobError::Denied {
            operation: "create bucket".to_string(),
            bucket: config.bucket.clone(),
            detail: format!("{status}: {text}"),
        });
    }
    Err(remote(format!("{status}: {text}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_the_digest_under_the_prefix() {
        let digest = Digest::of(b"content");
        let hex = digest.hex();
        assert_eq!(object_key("", &digest), format!("sha256/{hex}"));
        assert_eq!(
            object_key("hotswap", &digest),
            format!("hotswap/sha256/{hex}")
        );
        assert_eq!(object_key("/a/b/", &digest), format!("a/b/sha256/{hex}"));
        assert_eq!(
            ObjectPath::from(object_key("a/b", &digest)).as_ref(),
            format!("a/b/sha256/{hex}")
        );
    }

    #[test]
    fn config_reads_from_toml_with_a_default_region() {
        let config: S3Config = toml::from_str(
            "bucket = \"artifacts\"\nprefix = \"prod\"\nendpoint = \"http://127.0.0.1:8333\"\n",
        )
        .expect("parse");
        assert_eq!(config.bucket, "artifacts");
        assert_eq!(config.prefix, "prod");
        assert_eq!(config.endpoint.as_deref(), Some("http://127.0.0.1:8333"));
        assert_eq!(config.region, "us-east-1");
    }

    #[test]
    fn credentials_do_not_show_the_secret() {
        let credentials = S3Credentials {
            access_key_id: "AKID".to_string(),
            secret_access_key: "very-secret".to_string(),
            session_token: None,
        };
        let shown = format!("{credentials:?}");
        assert!(
            shown.contains("AKID") && !shown.contains("very-secret"),
            "{shown}"
        );
    }
}
