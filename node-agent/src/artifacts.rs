//! The agent's artifact store: fetching signed artifacts from the control
//! plane, verifying them, caching them by digest, and unpacking them into
//! versioned module directories.
//!
//! Layout under `DATA_DIR/artifacts/`:
//! - `partial/<hex>.hsm-part`: the artifact file being written while its
//!   content arrives (header, then content); a broken transfer resumes from
//!   its length. Signatures and the trailer are appended once the content is
//!   complete, and the file is renamed into `cache/` once it checks out.
//! - `cache/<hex>.hsm`: verified artifacts (content + signatures), by digest.
//! - `index.json`: `name@version` → digest, so installs work offline.
//! - `trusted-keys.json`: the last trust set used, for offline verification.
//! - `modules/<name>/<version>/`: unpacked modules (renamed into place whole).
//!
//! Nothing is unpacked before its digest and signatures check out, and an
//! artifact is verified again every time it is installed from the cache.
//! An install also needs valid signatures by as many distinct trusted keys
//! as the node's environment asks for (`min_signatures`, carried by the
//! desired state): the agent enforces it itself, whatever the control plane
//! let through; above one, a version already unpacked is checked again
//! before it runs.
//!
//! A download touches each content byte once: it is hashed for the digest
//! (which the file's trailer covers instead of the bytes, format version 2)
//! as it is appended to the partial file, and the signatures are checked
//! against that digest without reading the file back. An install reads the
//! cached file once, hashing it once. One fsync of the file and one of
//! `cache/` make it durable.
//!
//! The steps run in spans `fetch`, `verify` and `unpack` (target
//! [`telemetry::TARGET`]), children of whatever trace context the caller runs
//! them in (see [`telemetry::in_trace`]).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hotswap_common::artifact::format::Signature;
use hotswap_common::artifact::format::{ArtifactWriter, read_artifact};
use hotswap_common::artifact::keys::{self, TrustSet};
use hotswap_common::artifact::unpack::{Limits, UnpackError, unpack_artifact};
use hotswap_common::artifact::{ArtifactInfo, Digest};
use hotswap_common::fsutil::{self, PUBLIC_FILE_MODE};
use hotswap_common::telemetry;
use hotswap_common::timefmt::now_ms;
use serde::{Deserialize, Serialize};
use tokio_util::bytes::Bytes;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Why an artifact could not be made available.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// Network or control plane trouble; retrying later can succeed. Any
    /// partial download is kept and resumed.
    #[error("{0}")]
    Transient(String),
    /// The artifact itself is unacceptable (unknown, altered, unsigned).
    #[error("{0}")]
    Rejected(String),
    /// Local disk trouble.
    #[error("{0}")]
    Local(String),
    /// The caller stopped wanting it while it downloaded; the partial
    /// download is kept, to resume.
    #[error("{0}")]
    Abandoned(String),
}

/// A failed request to an [`ArtifactSource`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The source refuses the request (unknown artifact, not allowed):
    /// asking again cannot help.
    #[error("{message}")]
    Refused { message: String },
    /// No answer, or a failure on the source's side: it may clear up.
    #[error("{code}: {message}")]
    Unavailable { code: String, message: String },
    /// The answer is unusable (say, a malformed digest).
    #[error("{0}")]
    Invalid(String),
}

impl SourceError {
    /// Asking again later can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, SourceError::Unavailable { .. })
    }

    /// The source's own words, without the status code.
    pub fn message(&self) -> &str {
        match self {
            SourceError::Refused { message } | SourceError::Unavailable { message, .. } => message,
            SourceError::Invalid(message) => message,
        }
    }

    /// This failure as a fetch error, `what` saying what was asked for.
    fn fetching(self, what: &str) -> FetchError {
        match self {
            SourceError::Invalid(message) => FetchError::Rejected(message),
            e if e.is_transient() => FetchError::Transient(format!("{what}: {e}")),
            e => FetchError::Rejected(format!("{what}: {e}")),
        }
    }
}

/// What a source says an artifact version is.
#[derive(Clone, Debug)]
pub struct ArtifactDescriptor {
    pub digest: Digest,
    /// Content bytes.
    pub size: u64,
    /// Publisher signatures over the digest; an unreadable one only matters
    /// when the artifact must be downloaded.
    pub signatures: Result<Vec<Signature>, String>,
    /// The keys the source trusts, when it sent them with the descriptor
    /// (`None`: ask [`ArtifactSource::trusted_keys`]).
    pub trusted_keys: Option<Vec<TrustedKey>>,
}

/// A publisher key a source trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedKey {
    pub name: String,
    pub public_key_pem: String,
}

/// A piece of artifact content at `offset`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Chunk {
    pub offset: u64,
    pub data: Bytes,
}

/// Artifact content as it arrives.
pub trait ContentStream: Send {
    /// The next chunk; `None` at the end.
    fn next_chunk(&mut self) -> impl Future<Output = Result<Option<Chunk>, SourceError>> + Send;
}

/// Where artifacts come from: the control plane (the protocol client's
/// `Connection`), or memory in tests.
pub trait ArtifactSource: Sync {
    type Content: ContentStream;

    fn describe(
        &self,
        name: &str,
        version: &str,
    ) -> impl Future<Output = Result<ArtifactDescriptor, SourceError>> + Send;

    /// The non-revoked publisher keys.
    fn trusted_keys(&self) -> impl Future<Output = Result<Vec<TrustedKey>, SourceError>> + Send;

    /// The content of `digest` from byte `offset` on.
    fn content(
        &self,
        digest: &Digest,
        offset: u64,
    ) -> impl Future<Output = Result<Self::Content, SourceError>> + Send;
}

impl FetchError {
    /// Trying again later can succeed (a partial download is resumed).
    pub fn is_transient(&self) -> bool {
        matches!(self, FetchError::Transient(_))
    }
}

/// Where an agent's trust in publisher keys comes from.
#[derive(Clone, Debug)]
pub enum TrustSource {
    /// Keys pinned on the command line (`--trusted-key`): the control plane's
    /// set is ignored, so a compromised control plane cannot add keys.
    Pinned(Vec<(String, String)>),
    /// The set the control plane publishes (non-revoked keys).
    ControlPlane,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Index {
    /// `name@version` → digest.
    artifacts: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct StoredTrust {
    /// (name, public key PEM).
    keys: Vec<(String, String)>,
}

/// A verified artifact in the cache.
#[derive(Clone, Debug)]
pub struct Cached {
    pub path: PathBuf,
    pub info: ArtifactInfo,
    /// Content bytes downloaded by this call (0 when it was cached already).
    pub downloaded: u64,
}

/// Cheap to clone: clones share the index lock, so file work can move to
/// blocking threads.
#[derive(Clone)]
pub struct ArtifactStore {
    root: PathBuf,
    /// Serializes read-modify-write of `index.json`.
    index_lock: Arc<Mutex<()>>,
    trust: TrustSource,
    limits: Limits,
    /// This node's name, for the spans of each step.
    node: String,
}

/// What the download step of [`ArtifactStore::fetch`] leaves for the verify step.
struct Fetched {
    digest: Digest,
    trust: TrustSet,
    /// The complete file in `partial/`, unless the artifact was cached already.
    downloaded: Option<Downloaded>,
}

/// A complete artifact file written by a download, not yet verified.
struct Downloaded {
    info: ArtifactInfo,
    file: fs::File,
    /// Content bytes that came over the network in this call.
    bytes: u64,
}

fn local<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> FetchError + '_ {
    move |e| FetchError::Local(format!("{what}: {e}"))
}

impl ArtifactStore {
    pub fn open(data_dir: &Path, trust: TrustSource, limits: Limits) -> Result<Self, FetchError> {
        let root = data_dir.join("artifacts");
        for dir in ["partial", "cache", "modules", "tmp"] {
            fsutil::create_private_dir(&root.join(dir))
                .map_err(local("cannot create the artifact store"))?;
        }
        // Leftovers of an interrupted unpack or cache write are never complete.
        let tmp = root.join("tmp");
        let _ = fs::remove_dir_all(&tmp);
        fsutil::create_private_dir(&tmp).map_err(local("cannot create the artifact store"))?;
        // Partial downloads of earlier versions held bare content (`.part`);
        // they cannot be resumed into the current layout.
        if let Ok(entries) = fs::read_dir(root.join("partial")) {
            for entry in entries.filter_map(Result::ok) {
                if entry.path().extension().is_some_and(|e| e == "part") {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(Self {
            root,
            index_lock: Arc::default(),
            trust,
            limits,
            node: String::new(),
        })
    }

    /// Name this node in the spans of fetches, verifications and unpacks.
    pub fn with_node_name(mut self, node: &str) -> Self {
        self.node = node.to_string();
        self
    }

    fn cache_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("cache")
            .join(format!("{}.hsm", digest.hex()))
    }

    fn partial_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("partial")
            .join(format!("{}.hsm-part", digest.hex()))
    }

    /// Directory a module version is unpacked into.
    pub fn module_dir(&self, name: &str, version: &str) -> PathBuf {
        self.root.join("modules").join(name).join(version)
    }

    fn read_index(&self) -> Index {
        fs::read(self.root.join("index.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    fn record(&self, name: &str, version: &str, digest: &Digest) -> Result<(), FetchError> {
        let _guard = self
            .index_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut index = self.read_index();
        let entry = digest.to_string();
        if index.artifacts.get(&format!("{name}@{version}")) == Some(&entry) {
            return Ok(());
        }
        index.artifacts.insert(format!("{name}@{version}"), entry);
        let bytes = serde_json::to_vec_pretty(&index).unwrap_or_default();
        fsutil::write_atomic(&self.root.join("index.json"), &bytes, PUBLIC_FILE_MODE)
            .map_err(local("cannot write the artifact index"))
    }

    /// Digest of a cached `name@version`, if any.
    pub fn cached_digest(&self, name: &str, version: &str) -> Option<Digest> {
        let index = self.read_index();
        let digest = Digest::parse(index.artifacts.get(&format!("{name}@{version}"))?).ok()?;
        self.cache_path(&digest).is_file().then_some(digest)
    }

    /// The trust set to verify with: pinned keys, or the control plane's set
    /// as `source` lists it now (stored for offline use). `sent` is the set
    /// the source sent with the artifact's descriptor, if it did: then no
    /// separate call asks for it.
    pub async fn trust_set<S: ArtifactSource>(
        &self,
        source: &S,
        sent: Option<Vec<TrustedKey>>,
    ) -> Result<TrustSet, FetchError> {
        let keys = match &self.trust {
            TrustSource::Pinned(keys) => keys.clone(),
            TrustSource::ControlPlane => {
                let listed = match sent {
                    Some(keys) => keys,
                    None => source
                        .trusted_keys()
                        .await
                        .map_err(|e| e.fetching("cannot read the trusted keys"))?,
                };
                let keys: Vec<(String, String)> = listed
                    .into_iter()
                    .map(|k| (k.name, k.public_key_pem))
                    .collect();
                let stored = serde_json::to_vec_pretty(&StoredTrust { keys: keys.clone() })
                    .unwrap_or_default();
                let path = self.root.join("trusted-keys.json");
                // Rewritten (and fsynced) only when the set changed.
                if fs::read(&path).ok().as_deref() != Some(stored.as_slice()) {
                    fsutil::write_atomic(&path, &stored, PUBLIC_FILE_MODE)
                        .map_err(local("cannot store the trusted keys"))?;
                }
                keys
            }
        };
        trust_set_of(keys)
    }

    /// The trust set to verify with offline: pinned keys, or the last set
    /// the control plane listed.
    pub fn stored_trust_set(&self) -> Result<TrustSet, FetchError> {
        let keys = match &self.trust {
            TrustSource::Pinned(keys) => keys.clone(),
            TrustSource::ControlPlane => fs::read(self.root.join("trusted-keys.json"))
                .ok()
                .and_then(|bytes| serde_json::from_slice::<StoredTrust>(&bytes).ok())
                .map(|t| t.keys)
                .unwrap_or_default(),
        };
        trust_set_of(keys)
    }

    /// Make `name@version` available in the cache, verified: from the cache if
    /// present, else downloaded (resuming any partial transfer).
    pub async fn fetch<S: ArtifactSource>(
        &self,
        source: &S,
        name: &str,
        version: &str,
    ) -> Result<Cached, FetchError> {
        self.fetch_until(source, name, version, &CancellationToken::new())
            .await
    }

    /// [`ArtifactStore::fetch`], abandoned with [`FetchError::Abandoned`] if
    /// `abandon` is cancelled while the content downloads. Only the network
    /// part is cut short: it leaves a partial file to resume, while the
    /// verification that renames into `cache/` always runs to its end.
    pub async fn fetch_until<S: ArtifactSource>(
        &self,
        source: &S,
        name: &str,
        version: &str,
        abandon: &CancellationToken,
    ) -> Result<Cached, FetchError> {
        let what = format!("artifact {name}@{version}");
        let span = tracing::info_span!(
            target: telemetry::TARGET,
            "fetch",
            module = %name,
            version = %version,
            node = %self.node,
            bytes = tracing::field::Empty,
        );
        let fetched = tokio::select! {
            biased;
            _ = abandon.cancelled() => Err(FetchError::Abandoned(format!(
                "{what}: download abandoned, no longer desired"
            ))),
            fetched = self
                .fetch_content(source, name, version, &what)
                .instrument(span.clone()) => fetched,
        };
        if let Ok(Fetched {
            downloaded: Some(downloaded),
            ..
        }) = &fetched
        {
            span.record("bytes", downloaded.bytes);
        }
        let fetched = telemetry::record_result(&span, fetched)?;
        drop(span);
        let source = match fetched.downloaded {
            Some(_) => "download",
            None => "cache",
        };
        let span = tracing::info_span!(
            target: telemetry::TARGET,
            "verify",
            module = %name,
            version = %version,
            node = %self.node,
            source = source,
        );
        // Hashing a cached file, fsyncs and renames: off the async workers,
        // so concurrent fetches wait on the disk together, not in turn.
        let store = self.clone();
        let (name, version) = (name.to_string(), version.to_string());
        tokio::task::spawn_blocking(move || {
            let verified = span.in_scope(|| store.verify_fetched(fetched, &name, &version, &what));
            telemetry::record_result(&span, verified)
        })
        .await
        .map_err(|e| FetchError::Local(format!("verification stopped: {e}")))?
    }

    /// The network part of [`ArtifactStore::fetch`]: what the control plane
    /// says the artifact is, its trust set, and the content unless cached.
    async fn fetch_content<S: ArtifactSource>(
        &self,
        source: &S,
        name: &str,
        version: &str,
        what: &str,
    ) -> Result<Fetched, FetchError> {
        let descriptor = source
            .describe(name, version)
            .await
            .map_err(|e| e.fetching(what))?;
        let digest = descriptor.digest;
        let trust = self.trust_set(source, descriptor.trusted_keys).await?;
        let downloaded = if self.cache_path(&digest).is_file() {
            None
        } else {
            let signatures = descriptor.signatures.map_err(FetchError::Rejected)?;
            Some(
                self.download(source, &digest, descriptor.size, signatures, what)
                    .await?,
            )
        };
        Ok(Fetched {
            digest,
            trust,
            downloaded,
        })
    }

    /// The checking part of [`ArtifactStore::fetch`]: digest, name and
    /// signatures, then into the cache.
    fn verify_fetched(
        &self,
        fetched: Fetched,
        name: &str,
        version: &str,
        what: &str,
    ) -> Result<Cached, FetchError> {
        let Fetched {
            digest,
            trust,
            downloaded,
        } = fetched;
        let cached = self.cache_path(&digest);
        let Some(Downloaded { info, file, bytes }) = downloaded else {
            let info = self.verify_cached(&cached, name, version, &trust)?;
            self.record(name, version, &digest)?;
            return Ok(Cached {
                path: cached,
                info,
                downloaded: 0,
            });
        };
        let partial = self.partial_path(&digest);
        let reject = |reason: String| {
            let _ = fs::remove_file(&partial);
            FetchError::Rejected(reason)
        };
        // The digest was computed as the content arrived.
        if info.digest != digest {
            if bytes < info.content_len {
                // Resumed: the prefix kept on disk may be what is wrong (a
                // crash can leave unwritten blocks). Start over next time.
                let _ = fs::remove_file(&partial);
                return Err(FetchError::Transient(format!(
                    "{what}: resumed content does not match digest {digest}; downloading it again"
                )));
            }
            return Err(reject(format!(
                "{what}: downloaded content does not match digest {digest}"
            )));
        }
        check_identity(&info, name, version).map_err(|e| reject(e.to_string()))?;
        trust
            .verify(&info, now_ms())
            .map_err(|e| reject(e.to_string()))?;
        file.sync_all().map_err(local("cannot write the cache"))?;
        drop(file);
        fs::rename(&partial, &cached).map_err(local("cannot move into the cache"))?;
        fsutil::sync_dir(&self.root.join("cache")).map_err(local("cannot write the cache"))?;
        self.record(name, version, &digest)?;
        crate::metrics::FETCHED_BYTES.inc_by(bytes);
        tracing::info!(module = %name, version = %version, digest = %digest, bytes, "artifact fetched and verified");
        Ok(Cached {
            path: cached,
            info,
            downloaded: bytes,
        })
    }

    /// Write the artifact file for `digest` in `partial/`: header and content
    /// as it arrives (after whatever an interrupted transfer left), then
    /// `signatures` and the trailer. Not synced and not verified yet.
    async fn download<S: ArtifactSource>(
        &self,
        source: &S,
        digest: &Digest,
        size: u64,
        signatures: Vec<Signature>,
        what: &str,
    ) -> Result<Downloaded, FetchError> {
        let partial = self.partial_path(digest);
        let mut writer =
            open_partial(&partial, size).map_err(local("cannot write the download"))?;
        let start = writer.content_written();
        let mut offset = start;
        if offset < size {
            if offset > 0 {
                tracing::info!(digest = %digest, offset, size, "resuming an interrupted download");
            }
            let mut stream = source
                .content(digest, offset)
                .await
                .map_err(|e| e.fetching(what))?;
            loop {
                let chunk = match stream.next_chunk().await {
                    Ok(Some(chunk)) => chunk,
                    Ok(None) => break,
                    Err(error) => {
                        // Keep what arrived for the next attempt to resume.
                        let out = writer.output();
                        if out.flush().is_ok() {
                            let _ = out.get_ref().sync_all();
                        }
                        return Err(error
                            .fetching(&format!("{what}: transfer interrupted at byte {offset}")));
                    }
                };
                if chunk.offset != offset {
                    return Err(FetchError::Transient(format!(
                        "{what}: chunk at offset {} where {offset} was expected",
                        chunk.offset
                    )));
                }
                if offset + chunk.data.len() as u64 > size {
                    let _ = fs::remove_file(&partial);
                    return Err(FetchError::Rejected(format!(
                        "{what}: control plane sent more than the announced {size} bytes"
                    )));
                }
                writer
                    .write_content(&chunk.data)
                    .map_err(local("cannot write the download"))?;
                offset += chunk.data.len() as u64;
            }
        }
        if offset != size {
            return Err(FetchError::Transient(format!(
                "{what}: transfer ended at byte {offset} of {size}"
            )));
        }
        let (file, info) = writer.finish(signatures).map_err(|e| {
            let _ = fs::remove_file(&partial);
            FetchError::Rejected(format!("{what}: {e}"))
        })?;
        let file = file
            .into_inner()
            .map_err(|e| FetchError::Local(format!("cannot write the download: {}", e.error())))?;
        Ok(Downloaded {
            info,
            file,
            bytes: offset - start,
        })
    }

    fn verify_cached(
        &self,
        path: &Path,
        name: &str,
        version: &str,
        trust: &TrustSet,
    ) -> Result<ArtifactInfo, FetchError> {
        self.verify_cached_by(path, name, version, trust, 1)
    }

    /// [`ArtifactStore::verify_cached`], also requiring valid signatures by
    /// `required` distinct trusted keys.
    fn verify_cached_by(
        &self,
        path: &Path,
        name: &str,
        version: &str,
        trust: &TrustSet,
        required: u32,
    ) -> Result<ArtifactInfo, FetchError> {
        let info = read_artifact(path).map_err(|e| match e {
            // The cache file cannot be read: the disk's trouble, not the artifact's.
            hotswap_common::artifact::ArtifactError::Read { .. } => {
                FetchError::Local(format!("artifact {name}@{version}: {e}"))
            }
            e => FetchError::Rejected(format!("artifact {name}@{version}: {e}")),
        })?;
        check_identity(&info, name, version).map_err(|e| FetchError::Rejected(e.to_string()))?;
        let verified = trust
            .verify(&info, now_ms())
            .map_err(|e| FetchError::Rejected(e.to_string()))?;
        ensure_signers(&format!("{name}@{version}"), &verified, required)
            .map_err(|e| FetchError::Rejected(e.to_string()))?;
        Ok(info)
    }

    /// Unpack a cached, verified artifact into its module directory (once).
    /// Works with the control plane down: the trust set used is the pinned or
    /// last stored one, and the artifact is verified again before unpacking,
    /// needing valid signatures by `required` distinct trusted keys (the
    /// node's environment's `min_signatures`). Above one, a version already
    /// unpacked is verified again too: it may have been installed under a
    /// weaker requirement.
    pub async fn install(
        &self,
        name: &str,
        version: &str,
        required: u32,
    ) -> Result<PathBuf, FetchError> {
        let dir = self.module_dir(name, version);
        if dir.is_dir() && required <= 1 {
            return Ok(dir);
        }
        let digest = self.cached_digest(name, version).ok_or_else(|| {
            FetchError::Transient(format!("artifact {name}@{version} is not in the cache yet"))
        })?;
        let trust = self.stored_trust_set()?;
        let path = self.cache_path(&digest);
        let span = tracing::info_span!(
            target: telemetry::TARGET,
            "verify",
            module = %name,
            version = %version,
            node = %self.node,
            source = "cache",
        );
        let (store, owned) = (self.clone(), (name.to_string(), version.to_string()));
        let cache = path.clone();
        let info = tokio::task::spawn_blocking(move || {
            let verified = span
                .in_scope(|| store.verify_cached_by(&cache, &owned.0, &owned.1, &trust, required));
            telemetry::record_result(&span, verified)
        })
        .await
        .map_err(|e| FetchError::Local(format!("verification stopped: {e}")))??;
        if dir.is_dir() {
            return Ok(dir);
        }
        let span = tracing::info_span!(
            target: telemetry::TARGET,
            "unpack",
            module = %name,
            version = %version,
            node = %self.node,
        );
        let unpacked = self
            .unpack(name, version, &path, info, &dir)
            .instrument(span.clone())
            .await;
        telemetry::record_result(&span, unpacked)
    }

    /// Unpack a verified artifact next to `dir`, then rename it into place.
    async fn unpack(
        &self,
        name: &str,
        version: &str,
        path: &Path,
        info: ArtifactInfo,
        dir: &Path,
    ) -> Result<PathBuf, FetchError> {
        let tmp = self
            .root
            .join("tmp")
            .join(format!("{name}-{version}-{}", uuid_like()));
        let limits = self.limits;
        let (path_clone, tmp_clone) = (path.to_path_buf(), tmp.clone());
        tokio::task::spawn_blocking(move || {
            unpack_artifact(&path_clone, &info, &tmp_clone, &limits)
        })
        .await
        .map_err(|e| FetchError::Local(e.to_string()))?
        .map_err(|e| match e {
            // Writing the files failed (a full disk): the node's trouble.
            UnpackError::Io { .. } => FetchError::Local(format!("artifact {name}@{version}: {e}")),
            e => FetchError::Rejected(format!("artifact {name}@{version}: {e}")),
        })?;
        let parent = dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.root.join("modules"));
        fs::create_dir_all(&parent).map_err(local("cannot create the module directory"))?;
        fs::rename(&tmp, dir).map_err(local("cannot move the unpacked module into place"))?;
        let _ = fsutil::sync_dir(&parent);
        Ok(dir.to_path_buf())
    }
}

fn trust_set_of(keys: Vec<(String, String)>) -> Result<TrustSet, FetchError> {
    let mut trust = TrustSet::new();
    for (name, pem) in keys {
        let key = keys::parse_public_key(&pem).map_err(|e| {
            FetchError::Rejected(format!("trusted key {name:?} is unreadable: {e}"))
        })?;
        trust.add(&name, key);
    }
    Ok(trust)
}

/// At least `required` distinct trusted keys hold valid signatures among
/// `verified` (those [`TrustSet::verify`] accepted).
fn ensure_signers(
    module: &str,
    verified: &[keys::VerifiedSignature],
    required: u32,
) -> Result<(), TooFewSigners> {
    let mut signers: Vec<&keys::VerifiedSignature> = Vec::new();
    for signature in verified {
        if !signers.iter().any(|s| s.key_id == signature.key_id) {
            signers.push(signature);
        }
    }
    let required = required.max(1) as usize;
    if signers.len() >= required {
        return Ok(());
    }
    Err(TooFewSigners {
        module: module.to_string(),
        required,
        signers: signers.iter().map(|s| s.key_name.clone()).collect(),
    })
}

/// An artifact without valid signatures by as many distinct trusted keys as
/// the node's environment requires.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "artifact {module}: this node's environment requires valid signatures by {required} distinct trusted keys (min_signatures) and it has {}{}; refusing to install it",
    signers.len(),
    signer_list(signers)
)]
pub struct TooFewSigners {
    pub module: String,
    pub required: usize,
    /// Names of the distinct trusted keys that did sign.
    pub signers: Vec<String>,
}

fn signer_list(signers: &[String]) -> String {
    if signers.is_empty() {
        return String::new();
    }
    let names: Vec<String> = signers.iter().map(|name| format!("{name:?}")).collect();
    format!(" ({})", names.join(", "))
}

/// The artifact is another module version than the one asked for.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("asked for {asked} but the artifact is {found}")]
pub struct WrongArtifact {
    pub asked: String,
    pub found: String,
}

/// The artifact is the module version that was asked for.
pub fn check_identity(info: &ArtifactInfo, name: &str, version: &str) -> Result<(), WrongArtifact> {
    if info.manifest.name != name || info.manifest.version.to_string() != version {
        return Err(WrongArtifact {
            asked: format!("{name}@{version}"),
            found: info.module(),
        });
    }
    Ok(())
}

/// A writer appending to the partial file at `path`: continuing what an
/// interrupted transfer of the same artifact left, or from scratch.
fn open_partial(
    path: &Path,
    size: u64,
) -> std::io::Result<ArtifactWriter<std::io::BufWriter<fs::File>>> {
    const BUFFER: usize = 256 * 1024;
    if let Ok(existing) = fs::File::open(path) {
        let append = fs::OpenOptions::new().append(true).open(path)?;
        let resumed = ArtifactWriter::resume(
            std::io::BufWriter::with_capacity(BUFFER, append),
            std::io::BufReader::new(existing),
            size,
        )?;
        if let Some(writer) = resumed {
            return Ok(writer);
        }
        // Not a prefix of this artifact (or already complete and then cut
        // before the rename): start over.
    }
    let file = fs::File::create(path)?;
    ArtifactWriter::new(std::io::BufWriter::with_capacity(BUFFER, file), size)
}

fn uuid_like() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hotswap_common::artifact::keys::VerifiedSignature;

    fn by(key: &str) -> VerifiedSignature {
        VerifiedSignature {
            key_name: key.into(),
            key_id: format!("ed25519:{key}"),
            signed_at_ms: 0,
            expires_at_ms: None,
        }
    }

    #[test]
    fn installs_need_enough_distinct_signers() {
        let check = |verified: &[VerifiedSignature], required: u32, ok: bool| {
            let result = ensure_signers("m@1.0.0", verified, required);
            assert_eq!(result.is_ok(), ok, "{required} of {verified:?}: {result:?}");
        };
        check(&[by("ci")], 0, true);
        check(&[by("ci")], 1, true);
        check(&[by("ci")], 2, false);
        // The same key twice is one signer.
        check(&[by("ci"), by("ci")], 2, false);
        check(&[by("ci"), by("release")], 2, true);
        check(&[by("ci"), by("release")], 3, false);
        let refusal = ensure_signers("m@1.0.0", &[by("ci")], 2)
            .expect_err("refused")
            .to_string();
        assert_eq!(
            refusal,
            "artifact m@1.0.0: this node's environment requires valid signatures by 2 \
             distinct trusted keys (min_signatures) and it has 1 (\"ci\"); refusing to install it"
        );
    }
}

/// The cache against an artifact source in memory: no control plane, no
/// network.
#[cfg(test)]
mod source_tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use hotswap_common::artifact::format::read_content;
    use hotswap_common::artifact::pack::pack_and_sign;

    use super::*;

    const MANIFEST: &str = "name = \"hello\"\nversion = \"1.0.0\"\nruntime = \"bundle\"\n";

    /// An artifact source serving one artifact from memory, with faults to
    /// order.
    struct MemorySource {
        descriptor: ArtifactDescriptor,
        content: Vec<u8>,
        keys: Vec<TrustedKey>,
        /// Answer to the next describe calls instead of the descriptor.
        describe_faults: Mutex<VecDeque<SourceError>>,
        /// Cut the next content streams after this many bytes.
        cuts: Mutex<VecDeque<usize>>,
        /// Offsets the content was asked from.
        asked: Mutex<Vec<u64>>,
    }

    struct MemoryContent(VecDeque<Result<Chunk, SourceError>>);

    impl ContentStream for MemoryContent {
        async fn next_chunk(&mut self) -> Result<Option<Chunk>, SourceError> {
            self.0.pop_front().transpose()
        }
    }

    impl ArtifactSource for MemorySource {
        type Content = MemoryContent;

        async fn describe(
            &self,
            _name: &str,
            _version: &str,
        ) -> Result<ArtifactDescriptor, SourceError> {
            match self.describe_faults.lock().expect("lock").pop_front() {
                Some(fault) => Err(fault),
                None => Ok(self.descriptor.clone()),
            }
        }

        async fn trusted_keys(&self) -> Result<Vec<TrustedKey>, SourceError> {
            Ok(self.keys.clone())
        }

        async fn content(
            &self,
            _digest: &Digest,
            offset: u64,
        ) -> Result<MemoryContent, SourceError> {
            self.asked.lock().expect("lock").push(offset);
            let cut = self.cuts.lock().expect("lock").pop_front();
            let mut chunks = VecDeque::new();
            let mut at = offset as usize;
            let end = cut.map_or(self.content.len(), |c| c.min(self.content.len()));
            while at < end {
                let next = (at + 100).min(end);
                chunks.push_back(Ok(Chunk {
                    offset: at as u64,
                    data: Bytes::copy_from_slice(&self.content[at..next]),
                }));
                at = next;
            }
            if cut.is_some() {
                chunks.push_back(Err(SourceError::Unavailable {
                    code: "Service was not ready".into(),
                    message: "connection reset".into(),
                }));
            }
            Ok(MemoryContent(chunks))
        }
    }

    struct Fixture {
        _tmp: tempfile::TempDir,
        data_dir: PathBuf,
        source: MemorySource,
    }

    /// `hello@1.0.0` signed by a key called "ci", which the source trusts.
    fn fixture() -> Fixture {
        let tmp = tempfile::tempdir().expect("tempdir");
        let module = tmp.path().join("hello");
        fs::create_dir_all(&module).expect("mkdir");
        fs::write(module.join("module.toml"), MANIFEST).expect("manifest");
        // Enough content for several chunks.
        let filler: String = (0..400).map(|i| format!("line {i}\n")).collect();
        fs::write(module.join("data.txt"), filler).expect("data");
        let key = keys::generate().expect("key");
        let packed = tmp.path().join("hello.hsm");
        let info = pack_and_sign(&module, &key, now_ms(), &packed).expect("pack");
        let content = read_content(&packed, &info).expect("content");
        let data_dir = tmp.path().join("node");
        fs::create_dir_all(&data_dir).expect("mkdir");
        let source = MemorySource {
            descriptor: ArtifactDescriptor {
                digest: info.digest,
                size: content.len() as u64,
                signatures: Ok(info.signatures.clone()),
                trusted_keys: None,
            },
            content,
            keys: vec![TrustedKey {
                name: "ci".into(),
                public_key_pem: keys::public_key_pem(&key.verifying_key()),
            }],
            describe_faults: Mutex::default(),
            cuts: Mutex::default(),
            asked: Mutex::default(),
        };
        Fixture {
            _tmp: tmp,
            data_dir,
            source,
        }
    }

    fn store(f: &Fixture) -> ArtifactStore {
        ArtifactStore::open(&f.data_dir, TrustSource::ControlPlane, Limits::default())
            .expect("open")
    }

    fn partial_files(f: &Fixture) -> usize {
        fs::read_dir(f.data_dir.join("artifacts/partial"))
            .expect("partial dir")
            .count()
    }

    #[tokio::test]
    async fn fetches_verifies_caches_and_installs_offline() {
        let f = fixture();
        let store = store(&f);
        let fetched = store
            .fetch(&f.source, "hello", "1.0.0")
            .await
            .expect("fetch");
        assert_eq!(fetched.downloaded, f.source.content.len() as u64);
        assert_eq!(fetched.info.module(), "hello@1.0.0");
        let again = store
            .fetch(&f.source, "hello", "1.0.0")
            .await
            .expect("again");
        assert_eq!(again.downloaded, 0, "the second fetch comes from the cache");
        assert_eq!(*f.source.asked.lock().expect("lock"), [0]);
        // Installing needs no source: the trust set was stored.
        let dir = store.install("hello", "1.0.0", 1).await.expect("install");
        assert!(dir.join("data.txt").is_file());
        assert_eq!(partial_files(&f), 0);
    }

    #[tokio::test]
    async fn content_that_does_not_match_its_digest_is_rejected_and_dropped() {
        let mut f = fixture();
        let last = f.source.content.len() - 1;
        f.source.content[last] ^= 0xff;
        let err = store(&f)
            .fetch(&f.source, "hello", "1.0.0")
            .await
            .expect_err("altered");
        assert!(matches!(err, FetchError::Rejected(_)), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("artifact hello@1.0.0: downloaded content does not match digest"),
            "{err}"
        );
        assert_eq!(partial_files(&f), 0, "nothing kept to resume");
    }

    /// Keys the source sent with the descriptor are the trust set: the
    /// source's own list is not asked for, so a descriptor that trusts no
    /// key refuses the artifact even though the list would trust it.
    #[tokio::test]
    async fn keys_sent_with_the_descriptor_are_the_trust_set() {
        let mut f = fixture();
        let trusted = std::mem::take(&mut f.source.keys);
        f.source.descriptor.trusted_keys = Some(trusted);
        store(&f)
            .fetch(&f.source, "hello", "1.0.0")
            .await
            .expect("verified with the keys sent along");

        let mut f = fixture();
        f.source.descriptor.trusted_keys = Some(Vec::new());
        let err = store(&f)
            .fetch(&f.source, "hello", "1.0.0")
            .await
            .expect_err("no key sent along is trusted");
        assert!(matches!(err, FetchError::Rejected(_)), "{err:?}");
    }

    #[tokio::test]
    async fn a_signature_by_an_untrusted_key_is_rejected() {
        let mut f = fixture();
        let other = keys::generate().expect("key");
        f.source.keys = vec![TrustedKey {
            name: "other".into(),
            public_key_pem: keys::public_key_pem(&other.verifying_key()),
        }];
        let store = store(&f);
        let err = store
            .fetch(&f.source, "hello", "1.0.0")
            .await
            .expect_err("untrusted");
        assert!(matches!(err, FetchError::Rejected(_)), "{err:?}");
        assert!(store.cached_digest("hello", "1.0.0").is_none());
        assert_eq!(partial_files(&f), 0);
    }

    #[tokio::test]
    async fn an_unreadable_signature_is_rejected() {
        let mut f = fixture();
        f.source.descriptor.signatures =
            Err("artifact hello@1.0.0: signature by k has the wrong length".into());
        let err = store(&f)
            .fetch(&f.source, "hello", "1.0.0")
            .await
            .expect_err("bad signature");
        assert!(matches!(err, FetchError::Rejected(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "artifact hello@1.0.0: signature by k has the wrong length"
        );
    }

    #[tokio::test]
    async fn source_failures_are_sorted_into_transient_and_rejected() {
        let f = fixture();
        let store = store(&f);
        f.source.describe_faults.lock().expect("lock").extend([
            SourceError::Unavailable {
                code: "Service was not ready".into(),
                message: "down".into(),
            },
            SourceError::Refused {
                message: "no such artifact".into(),
            },
        ]);
        let err = store
            .fetch(&f.source, "hello", "1.0.0")
            .await
            .expect_err("unavailable");
        assert!(matches!(err, FetchError::Transient(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "artifact hello@1.0.0: Service was not ready: down"
        );
        let err = store
            .fetch(&f.source, "hello", "1.0.0")
            .await
            .expect_err("refused");
        assert!(matches!(err, FetchError::Rejected(_)), "{err:?}");
        assert_eq!(err.to_string(), "artifact hello@1.0.0: no such artifact");
        // The faults are gone: the next attempt succeeds.
        store
            .fetch(&f.source, "hello", "1.0.0")
            .await
            .expect("fetch");
    }

    #[tokio::test]
    async fn an_interrupted_transfer_resumes_where_it_stopped() {
        let f = fixture();
        let store = store(&f);
        f.source.cuts.lock().expect("lock").push_back(250);
        let err = store
            .fetch(&f.source, "hello", "1.0.0")
            .await
            .expect_err("cut");
        assert!(matches!(err, FetchError::Transient(_)), "{err:?}");
        assert!(
            err.to_string()
                .starts_with("artifact hello@1.0.0: transfer interrupted at byte 250: "),
            "{err}"
        );
        assert_eq!(partial_files(&f), 1, "the prefix is kept");
        let fetched = store
            .fetch(&f.source, "hello", "1.0.0")
            .await
            .expect("resume");
        assert_eq!(*f.source.asked.lock().expect("lock"), [0, 250]);
        assert_eq!(fetched.downloaded, f.source.content.len() as u64 - 250);
    }

    #[tokio::test]
    async fn more_content_than_announced_is_rejected() {
        let mut f = fixture();
        f.source.descriptor.size -= 10;
        let err = store(&f)
            .fetch(&f.source, "hello", "1.0.0")
            .await
            .expect_err("too long");
        assert!(matches!(err, FetchError::Rejected(_)), "{err:?}");
        assert!(err.to_string().contains("more than the announced"), "{err}");
    }

    #[tokio::test]
    async fn an_abandoned_fetch_says_so() {
        let f = fixture();
        let abandon = CancellationToken::new();
        abandon.cancel();
        let err = store(&f)
            .fetch_until(&f.source, "hello", "1.0.0", &abandon)
            .await
            .expect_err("abandoned");
        assert!(matches!(err, FetchError::Abandoned(_)), "{err:?}");
    }
}
