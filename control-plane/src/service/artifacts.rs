//! `Artifacts`: publisher keys, artifact upload and browsing for operators,
//! and artifact description and content streaming for agents.
//!
//! An upload is streamed to a temporary file (never held in memory) with a
//! size limit, then checked off the async runtime: structure, manifest, and
//! signatures against the trusted keys. Only then is the content copied into
//! the blob store and the record written. Versions are immutable.

use hotswap_common::ids::{NameKind, check_name};
use std::collections::BTreeMap;
use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;

use hotswap_common::artifact::format::read_artifact;
use hotswap_common::artifact::keys::{key_id, parse_public_key};
use hotswap_common::artifact::limits::{Limits, module_label};
use hotswap_common::artifact::unpack::{UnpackError, check_artifact};
use hotswap_common::artifact::{ArtifactError, ArtifactInfo, Digest, TrustSet};
use hotswap_common::pb;
use hotswap_common::timefmt::{now_ms, ts_from_ms};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::Context;
use crate::auth::{self, Permission};
use crate::blobs::{BlobError, BlobStore, HotBlobs};
use crate::error::ApiError;
use crate::store::{ArtifactRecord, KeyRecord, SignatureRecord, YankRecord};

/// A yank reason is one line, shown in refusals and listings.
const MAX_YANK_REASON_BYTES: usize = 512;

/// Size of the chunks `FetchArtifact` sends: big enough to amortize framing,
/// small enough to stay well under gRPC's default 4 MiB message limit.
pub const FETCH_CHUNK_BYTES: usize = 256 * 1024;

/// Largest artifact content kept in memory after it was first fetched.
const HOT_BLOB_MAX_BYTES: u64 = 8 * 1024 * 1024;
/// Memory for fetched artifact content, in all.
const HOT_BLOBS_BYTES: u64 = 64 * 1024 * 1024;

pub struct ArtifactsService {
    ctx: Arc<Context>,
    blobs: Arc<dyn BlobStore>,
    hot: HotBlobs,
}

impl ArtifactsService {
    pub fn new(ctx: Arc<Context>, blobs: Arc<dyn BlobStore>) -> Self {
        Self {
            ctx,
            blobs,
            hot: HotBlobs::new(HOT_BLOB_MAX_BYTES, HOT_BLOBS_BYTES),
        }
    }

    fn trust_set(&self) -> Result<TrustSet, ApiError> {
        let mut trust = TrustSet::new();
        for record in self.ctx.store().list_keys()? {
            if record.revoked_at_ms.is_some() {
                continue;
            }
            let key = parse_public_key(&record.public_key_pem).map_err(|e| {
                ApiError::Internal(format!("stored key {:?} is unreadable: {e}", record.name))
            })?;
            trust.add(&record.name, key);
        }
        Ok(trust)
    }

    fn key_names(&self) -> Result<BTreeMap<String, String>, ApiError> {
        Ok(self
            .ctx
            .store()
            .list_keys()?
            .into_iter()
            .map(|k| (k.key_id, k.name))
            .collect())
    }

    async fn receive_upload(
        &self,
        mut stream: Streaming<pb::PushArtifactChunk>,
    ) -> Result<std::path::PathBuf, ApiError> {
        let limit = self.ctx.settings.max_artifact_bytes;
        let idle = self.ctx.settings.upload_idle_timeout;
        let path = self.blobs.tmp_path("upload");
        let mut file =
            std::fs::File::create(&path).map_err(|e| ApiError::io("cannot stage upload", &e))?;
        let mut received: u64 = 0;
        let outcome = async {
            // No total deadline (deadline.rs): a big upload over a slow link
            // takes as long as it takes, but one that stops sending is cut
            // off, so a stalled client cannot hold a stream and a staging
            // file forever.
            loop {
                let next = tokio::time::timeout(idle, stream.message()).await.map_err(|_| {
                    ApiError::DeadlineExceeded(format!(
                        "upload cancelled: no data for {} after {received} bytes (upload_idle_timeout)",
                        hotswap_common::timefmt::human_age(idle.as_millis() as u64)
                    ))
                })?;
                let Some(chunk) = next.map_err(|s| ApiError::InvalidArgument(format!("upload interrupted: {}", s.message())))? else {
                    break;
                };
                received += chunk.data.len() as u64;
                if received > limit {
                    return Err(ApiError::InvalidArgument(format!(
                        "artifact is larger than the upload limit of {limit} bytes (max_artifact_bytes)"
                    )));
                }
                file.write_all(&chunk.data).map_err(|e| ApiError::io("cannot stage upload", &e))?;
            }
            file.sync_all().map_err(|e| ApiError::io("cannot stage upload", &e))?;
            Ok(())
        }
        .await;
        match outcome {
            Ok(()) => Ok(path),
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
        }
    }

    async fn push(
        &self,
        user: &str,
        stream: Streaming<pb::PushArtifactChunk>,
    ) -> Result<pb::ModuleVersion, ApiError> {
        let upload = self.receive_upload(stream).await?;
        let result = self.accept_upload(user, &upload).await;
        let _ = std::fs::remove_file(&upload);
        result
    }

    async fn accept_upload(
        &self,
        user: &str,
        upload: &std::path::Path,
    ) -> Result<pb::ModuleVersion, ApiError> {
        let trust = self.trust_set()?;
        let path = upload.to_path_buf();
        // Hashing, signature checks and the walk of the payload are CPU and
        // disk work: keep them off the runtime threads.
        let (info, verified) = tokio::task::spawn_blocking(move || -> Result<_, ApiError> {
            let info = read_artifact(&path).map_err(artifact_error)?;
            let verified = trust.verify(&info, now_ms()).map_err(artifact_error)?;
            // After the signatures, so only what a trusted publisher signed
            // is ever decompressed here.
            ensure_installable(&path, &info)?;
            Ok((info, verified))
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))??;
        let module = info.module();
        let digest = info.digest;

        let store = self.ctx.store();
        let record = ArtifactRecord {
            name: info.manifest.name.clone(),
            version: info.manifest.version.to_string(),
            digest: digest.to_string(),
            size: info.content_len,
            runtime: info.manifest.runtime.as_str().to_string(),
            manifest: info.manifest_text.clone(),
            signatures: verified_records(&info, &verified),
            pushed_at_ms: now_ms(),
            pushed_by: user.to_string(),
            yanked: None,
        };
        let existing = store.get_artifact(&record.name, &record.version)?;
        if let Some(existing) = &existing
            && existing.digest != record.digest
        {
            return Err(ApiError::AlreadyExists(format!(
                "{module} already exists with digest {} (pushed {}); versions are immutable, publish a new version",
                existing.digest,
                hotswap_common::timefmt::rfc3339_from_ms(existing.pushed_at_ms)
            )));
        }

        self.blobs
            .put_from(upload, info.content_offset, info.content_len, &digest)
            .await
            .map_err(blob_error)?;

        let names = self.key_names()?;
        match existing {
            None => match store.insert_artifact(&record).await? {
                None => {
                    tracing::info!(module = %module, digest = %digest, user = %user, "artifact stored");
                    Ok(version_to_pb(&record, &names, true))
                }
                // Lost a race with an identical push: same check as above.
                Some(raced) if raced.digest == record.digest => {
                    Ok(version_to_pb(&raced, &names, false))
                }
                Some(raced) => Err(ApiError::AlreadyExists(format!(
                    "{module} already exists with digest {}; versions are immutable, publish a new version",
                    raced.digest
                ))),
            },
            Some(existing) => {
                // Same content: keep the record (and any yank of it), add
                // signatures it did not have, in place so a concurrent yank
                // is not overwritten.
                let new: Vec<SignatureRecord> = record
                    .signatures
                    .into_iter()
                    .filter(|s| !existing.signatures.iter().any(|e| e.key_id == s.key_id))
                    .collect();
                if new.is_empty() {
                    return Ok(version_to_pb(&existing, &names, false));
                }
                let merged = store
                    .update_artifact(
                        &existing.name,
                        &existing.version,
                        &|stored: &mut ArtifactRecord| {
                            let before = stored.signatures.len();
                            for signature in &new {
                                if !stored
                                    .signatures
                                    .iter()
                                    .any(|s| s.key_id == signature.key_id)
                                {
                                    stored.signatures.push(signature.clone());
                                }
                            }
                            stored.signatures.len() != before
                        },
                    )
                    .await?
                    .unwrap_or(existing);
                tracing::info!(module = %module, "new signatures merged into an existing artifact");
                Ok(version_to_pb(&merged, &names, false))
            }
        }
    }

    async fn trust_key(
        &self,
        user: &str,
        request: pb::TrustKeyRequest,
    ) -> Result<pb::PublisherKey, ApiError> {
        check_name(NameKind::Key, &request.name)?;
        let key = parse_public_key(&request.public_key_pem).map_err(|e| {
            ApiError::InvalidArgument(format!("public key is not an ed25519 key in PEM form: {e}"))
        })?;
        let id = key_id(&key);
        let store = self.ctx.store();
        if let Some(other) = store.list_keys()?.into_iter().find(|k| k.key_id == id) {
            return Err(ApiError::AlreadyExists(format!(
                "this key is already trusted as {:?} ({id})",
                other.name
            )));
        }
        let record = KeyRecord {
            name: request.name.clone(),
            key_id: id,
            public_key_pem: hotswap_common::artifact::keys::public_key_pem(&key),
            added_at_ms: now_ms(),
            added_by: user.to_string(),
            revoked_at_ms: None,
        };
        if let Some(existing) = store.insert_key(&record).await? {
            return Err(ApiError::AlreadyExists(format!(
                "a key named {:?} already exists ({}); revoked names are kept for history, choose another name",
                existing.name, existing.key_id
            )));
        }
        tracing::info!(user = %user, key = %record.name, key_id = %record.key_id, "publisher key trusted");
        Ok(key_to_pb(&record))
    }

    async fn revoke_key(&self, user: &str, name: &str) -> Result<pb::PublisherKey, ApiError> {
        let store = self.ctx.store();
        let mut record = store
            .get_key(name)?
            .ok_or_else(|| ApiError::NotFound(format!("no publisher key named {name:?}")))?;
        if record.revoked_at_ms.is_some() {
            return Err(ApiError::FailedPrecondition(format!(
                "key {name:?} is already revoked"
            )));
        }
        record.revoked_at_ms = Some(now_ms());
        store.put_key(&record).await?;
        tracing::info!(user = %user, key = %name, "publisher key revoked");
        Ok(key_to_pb(&record))
    }

    /// Yank (`reason` given) or unyank (`None`) one stored version. The
    /// record is changed in place and flushed; the engine sees the yank on
    /// its next pass and stops any running deployment of the version.
    async fn set_yank(
        &self,
        user: &str,
        name: &str,
        version: &str,
        reason: Option<&str>,
    ) -> Result<pb::ModuleVersion, ApiError> {
        if let Some(reason) = reason {
            let reason = reason.trim();
            if reason.is_empty() {
                return Err(ApiError::InvalidArgument(
                    "a yank needs a reason (--reason): it is shown to whoever tries to deploy the version".into(),
                ));
            }
            if reason.len() > MAX_YANK_REASON_BYTES || reason.contains(['\n', '\r']) {
                return Err(ApiError::InvalidArgument(format!(
                    "the yank reason must be one line of at most {MAX_YANK_REASON_BYTES} bytes"
                )));
            }
        }
        let store = self.ctx.store();
        let module = format!("{name}@{version}");
        let existing = store
            .get_artifact(name, version)?
            .ok_or_else(|| ApiError::NotFound(format!("artifact {module} not found")))?;
        match (&existing.yanked, reason) {
            (Some(yank), Some(_)) => {
                return Err(ApiError::FailedPrecondition(format!(
                    "{module} is already yanked (by {} at {}: {})",
                    yank.by,
                    hotswap_common::timefmt::rfc3339_from_ms(yank.at_ms),
                    yank.reason
                )));
            }
            (None, None) => {
                return Err(ApiError::FailedPrecondition(format!(
                    "{module} is not yanked"
                )));
            }
            _ => {}
        }
        let yank = reason.map(|reason| YankRecord {
            at_ms: now_ms(),
            by: user.to_string(),
            reason: reason.trim().to_string(),
        });
        let updated = store
            .update_artifact(name, version, &|record: &mut ArtifactRecord| {
                // A concurrent yank or unyank already did it: keep theirs.
                if record.yanked.is_some() == yank.is_some() {
                    return false;
                }
                record.yanked = yank.clone();
                true
            })
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("artifact {module} not found")))?;
        let event = match &yank {
            Some(yank) => crate::events::Event::new(
                "module.yanked",
                format!("{module} yanked by {user}: {}", yank.reason),
            ),
            None => {
                crate::events::Event::new("module.unyanked", format!("{module} unyanked by {user}"))
            }
        };
        self.ctx.events.append(event.module(name, version));
        tracing::warn!(user = %user, module = %name, version = %version, reason = reason.unwrap_or_default(), yanked = yank.is_some(), "version yank changed");
        self.ctx.registry.yank_changed();
        Ok(version_to_pb(&updated, &self.key_names()?, false))
    }

    fn module(&self, name: &str) -> Result<pb::Module, ApiError> {
        let names = self.key_names()?;
        let mut versions = self.ctx.store().module_versions(name)?;
        if versions.is_empty() {
            return Err(ApiError::NotFound(format!(
                "module {name:?} has no versions; push one with `hotswapctl module push`"
            )));
        }
        sort_newest_first(&mut versions);
        Ok(pb::Module {
            name: name.to_string(),
            versions: versions
                .iter()
                .map(|v| version_to_pb(v, &names, false))
                .collect(),
        })
    }

    fn describe(&self, name: &str, version: &str) -> Result<pb::ArtifactDescriptor, ApiError> {
        let record = self
            .ctx
            .store()
            .get_artifact(name, version)?
            .ok_or_else(|| ApiError::NotFound(format!("artifact {name}@{version} not found")))?;
        let signatures = record
            .signatures
            .iter()
            .map(|s| {
                Ok(pb::ArtifactSignature {
                    key_id: s.key_id.clone(),
                    signed_at_ms: s.signed_at_ms,
                    expires_at_ms: s.expires_at_ms.unwrap_or(0),
                    signature: hex::decode(&s.signature).map_err(|e| {
                        ApiError::Internal(format!("stored signature is corrupt: {e}"))
                    })?,
                })
            })
            .collect::<Result<_, ApiError>>()?;
        // What ListKeys would answer now, less the revoked keys: the agent
        // verifies with the set as of this call, as it did with its own
        // ListKeys right after it, without the round trip.
        let trusted_keys = self
            .ctx
            .store()
            .list_keys()?
            .iter()
            .filter(|k| k.revoked_at_ms.is_none())
            .map(key_to_pb)
            .collect();
        Ok(pb::ArtifactDescriptor {
            name: record.name,
            version: record.version,
            digest: record.digest,
            size: record.size,
            signatures,
            trusted_keys,
            trusted_keys_included: true,
        })
    }
}

/// Refuse what no agent could install, by the agents' own [`Limits`]: a
/// version too long to name a directory, a payload that is not zstd, too
/// many entries, more bytes than an agent unpacks (counted from the declared
/// sizes, decompressed but written nowhere), or an entry the unpack refuses.
/// Accepting such an artifact only moved the failure to every node of a
/// deployment.
fn ensure_installable(path: &std::path::Path, info: &ArtifactInfo) -> Result<(), ApiError> {
    match check_artifact(path, info, &Limits::AGENT) {
        Ok(_) => Ok(()),
        Err(e @ UnpackError::Io { .. }) => Err(ApiError::Internal(e.to_string())),
        Err(e) => Err(ApiError::InvalidArgument(format!(
            "artifact {} cannot be installed by agents: {e}",
            module_label(&info.manifest)
        ))),
    }
}

fn artifact_error(e: ArtifactError) -> ApiError {
    match e {
        ArtifactError::Untrusted { .. } => ApiError::FailedPrecondition(e.to_string()),
        ArtifactError::Read { .. } | ArtifactError::Write { .. } => {
            ApiError::Internal(e.to_string())
        }
        _ => ApiError::InvalidArgument(e.to_string()),
    }
}

fn verified_records(
    info: &ArtifactInfo,
    verified: &[hotswap_common::artifact::keys::VerifiedSignature],
) -> Vec<SignatureRecord> {
    // Keep only signatures that verified against a trusted key.
    info.signatures
        .iter()
        .filter(|s| verified.iter().any(|v| v.key_id == s.key_id))
        .map(|s| SignatureRecord {
            key_id: s.key_id.clone(),
            signed_at_ms: s.signed_at_ms,
            expires_at_ms: s.expires_at_ms,
            signature: hex::encode(s.bytes),
        })
        .collect()
}

fn sort_newest_first(versions: &mut [ArtifactRecord]) {
    versions.sort_by(|a, b| {
        match (
            semver::Version::parse(&a.version),
            semver::Version::parse(&b.version),
        ) {
            (Ok(a), Ok(b)) => b.cmp(&a),
            _ => b.version.cmp(&a.version),
        }
    });
}

fn version_to_pb(
    record: &ArtifactRecord,
    key_names: &BTreeMap<String, String>,
    created: bool,
) -> pb::ModuleVersion {
    pb::ModuleVersion {
        version: record.version.clone(),
        digest: record.digest.clone(),
        size: record.size,
        signed_by: record
            .signatures
            .iter()
            .map(|s| {
                key_names
                    .get(&s.key_id)
                    .cloned()
                    .unwrap_or_else(|| s.key_id.clone())
            })
            .collect(),
        pushed_at: Some(ts_from_ms(record.pushed_at_ms)),
        pushed_by: record.pushed_by.clone(),
        runtime: record.runtime.clone(),
        created,
        name: record.name.clone(),
        yanked_at: record.yanked.as_ref().map(|y| ts_from_ms(y.at_ms)),
        yanked_by: record
            .yanked
            .as_ref()
            .map(|y| y.by.clone())
            .unwrap_or_default(),
        yank_reason: record
            .yanked
            .as_ref()
            .map(|y| y.reason.clone())
            .unwrap_or_default(),
    }
}

fn key_to_pb(record: &KeyRecord) -> pb::PublisherKey {
    pb::PublisherKey {
        name: record.name.clone(),
        key_id: record.key_id.clone(),
        public_key_pem: record.public_key_pem.clone(),
        added_at: Some(ts_from_ms(record.added_at_ms)),
        added_by: record.added_by.clone(),
        revoked_at: record.revoked_at_ms.map(ts_from_ms),
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::ArtifactChunk, Status>> + Send>>;

#[tonic::async_trait]
impl pb::artifacts_server::Artifacts for ArtifactsService {
    async fn push_artifact(
        &self,
        request: Request<Streaming<pb::PushArtifactChunk>>,
    ) -> Result<Response<pb::ModuleVersion>, Status> {
        let mut call = self
            .ctx
            .begin(&request, Permission::Push, "module.push", "")
            .await?;
        let result = self.push(call.user(), request.into_inner()).await;
        if let Ok(version) = &result {
            call.set_target(format!("{}@{}", version.name, version.version));
        }
        Ok(Response::new(call.finish(&self.ctx, result).await?))
    }

    async fn list_modules(
        &self,
        request: Request<pb::ListModulesRequest>,
    ) -> Result<Response<pb::ListModulesResponse>, Status> {
        self.ctx.reader(&request)?;
        let mut names: Vec<String> = self
            .ctx
            .store()
            .list_artifacts()
            .map_err(ApiError::from)?
            .into_iter()
            .map(|a| a.name)
            .collect();
        names.dedup();
        let modules = names
            .iter()
            .map(|n| self.module(n))
            .collect::<Result<_, ApiError>>()?;
        Ok(Response::new(pb::ListModulesResponse { modules }))
    }

    async fn get_module(
        &self,
        request: Request<pb::GetModuleRequest>,
    ) -> Result<Response<pb::Module>, Status> {
        self.ctx.reader(&request)?;
        Ok(Response::new(self.module(&request.into_inner().name)?))
    }

    async fn trust_key(
        &self,
        request: Request<pb::TrustKeyRequest>,
    ) -> Result<Response<pb::PublisherKey>, Status> {
        let name = request.get_ref().name.clone();
        let call = self
            .ctx
            .begin(&request, Permission::Admin, "keys.trust", name)
            .await?;
        let result = self.trust_key(call.user(), request.into_inner()).await;
        Ok(Response::new(call.finish(&self.ctx, result).await?))
    }

    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        // Agents read the trusted set when no keys are pinned locally.
        auth::require_reader_or_node(&request, &self.ctx.registry, &*self.ctx.store).await?;
        let keys = self
            .ctx
            .store()
            .list_keys()
            .map_err(ApiError::from)?
            .iter()
            .map(key_to_pb)
            .collect();
        Ok(Response::new(pb::ListKeysResponse { keys }))
    }

    async fn revoke_key(
        &self,
        request: Request<pb::RevokeKeyRequest>,
    ) -> Result<Response<pb::PublisherKey>, Status> {
        let name = request.get_ref().name.clone();
        let call = self
            .ctx
            .begin(&request, Permission::Admin, "keys.revoke", &name)
            .await?;
        let result = self.revoke_key(call.user(), &name).await;
        Ok(Response::new(call.finish(&self.ctx, result).await?))
    }

    async fn yank_version(
        &self,
        request: Request<pb::YankVersionRequest>,
    ) -> Result<Response<pb::ModuleVersion>, Status> {
        let target = format!("{}@{}", request.get_ref().name, request.get_ref().version);
        // Whoever may publish a version may withdraw it.
        let call = self
            .ctx
            .begin(&request, Permission::Push, "module.yank", target)
            .await?;
        let request = request.into_inner();
        let result = self
            .set_yank(
                call.user(),
                &request.name,
                &request.version,
                Some(&request.reason),
            )
            .await;
        Ok(Response::new(call.finish(&self.ctx, result).await?))
    }

    async fn unyank_version(
        &self,
        request: Request<pb::UnyankVersionRequest>,
    ) -> Result<Response<pb::ModuleVersion>, Status> {
        let target = format!("{}@{}", request.get_ref().name, request.get_ref().version);
        let call = self
            .ctx
            .begin(&request, Permission::Push, "module.unyank", target)
            .await?;
        let request = request.into_inner();
        let result = self
            .set_yank(call.user(), &request.name, &request.version, None)
            .await;
        Ok(Response::new(call.finish(&self.ctx, result).await?))
    }

    async fn describe_artifact(
        &self,
        request: Request<pb::DescribeArtifactRequest>,
    ) -> Result<Response<pb::ArtifactDescriptor>, Status> {
        auth::require_reader_or_node(&request, &self.ctx.registry, &*self.ctx.store).await?;
        let request = request.into_inner();
        Ok(Response::new(
            self.describe(&request.name, &request.version)?,
        ))
    }

    type FetchArtifactStream = ChunkStream;

    async fn fetch_artifact(
        &self,
        request: Request<pb::FetchArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        auth::require_reader_or_node(&request, &self.ctx.registry, &*self.ctx.store).await?;
        let request = request.into_inner();
        let digest = Digest::parse(&request.digest).map_err(ApiError::InvalidArgument)?;
        let not_found = || ApiError::NotFound(format!("no artifact content with digest {digest}"));
        let past_end = |size: u64| {
            ApiError::InvalidArgument(format!(
                "offset {} is past the end of {digest} ({size} bytes)",
                request.offset
            ))
        };
        match self.hot.get(&*self.blobs, &digest).await {
            Ok(Some(content)) => {
                let size = content.len() as u64;
                if request.offset > size {
                    return Err(past_end(size).into());
                }
                // Slices of the one cached buffer: no copy, no disk.
                let start = request.offset as usize;
                let chunks = (start..content.len())
                    .step_by(FETCH_CHUNK_BYTES)
                    .map(move |at| {
                        let end = (at + FETCH_CHUNK_BYTES).min(content.len());
                        Ok(pb::ArtifactChunk {
                            offset: at as u64,
                            data: content.slice(at..end),
                        })
                    });
                return Ok(Response::new(Box::pin(tokio_stream::iter(chunks))));
            }
            Ok(None) => {}
            Err(BlobError::NotFound { .. }) => return Err(not_found().into()),
            Err(e) => return Err(ApiError::Internal(format!("reading {digest}: {e}")).into()),
        }
        // Too big to keep in memory: stream it from the store.
        let blob = match self.blobs.open(&digest, request.offset).await {
            Ok(blob) => blob,
            Err(BlobError::NotFound { .. }) => return Err(not_found().into()),
            Err(BlobError::PastEnd { size, .. }) => return Err(past_end(size).into()),
            Err(e) => return Err(ApiError::Internal(format!("reading {digest}: {e}")).into()),
        };
        let size = blob.size;
        let mut file = blob.reader;
        // Each transfer reads the blob from disk once, one chunk at a time; the
        // channel bounds how far reading runs ahead of a slow receiver.
        let (tx, rx) = mpsc::channel(4);
        let shutdown = self.ctx.shutdown.clone();
        tokio::spawn(async move {
            let mut offset = request.offset;
            loop {
                let want = (size.saturating_sub(offset) as usize).clamp(1, FETCH_CHUNK_BYTES);
                let mut buf = vec![0u8; want];
                let n = match file.read(&mut buf).await {
                    Ok(0) => return,
                    Ok(n) => n,
                    Err(e) => {
                        let _ = tx
                            .send(Err(ApiError::io(&format!("reading {digest}"), &e).into()))
                            .await;
                        return;
                    }
                };
                buf.truncate(n);
                let chunk = pb::ArtifactChunk {
                    offset,
                    data: buf.into(),
                };
                offset += n as u64;
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    sent = tx.send(Ok(chunk)) => if sent.is_err() { return },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A failure to store a blob: a full local disk is `Unavailable` (free space
/// and retry), anything else internal.
fn blob_error(error: BlobError) -> ApiError {
    match error.io_error() {
        Some(io) => ApiError::io(&error.to_string(), io),
        None => ApiError::Internal(error.to_string()),
    }
}
