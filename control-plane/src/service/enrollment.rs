//! `Enrollment.Enroll`: the one call served without a client certificate.
//! The join token authorizes it; the CA signs the node's CSR with the node id
//! it assigns, and the node record and token use are written atomically.

use hotswap_common::ids::{NameKind, check_name};
use std::sync::Arc;

use hotswap_common::labels::{Labels, validate_labels};
use hotswap_common::pb;
use hotswap_common::pki::{self, Principal};
use hotswap_common::timefmt::now_ms;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use super::Context;
use crate::audit::AuditEntry;
use crate::auth::RequestInfo;
use crate::error::ApiError;
use crate::metrics::ResultLabel;
use crate::ratelimit::RateLimiter;
use crate::store::{EnrollError, EnrollRejection, NodeRecord};

/// Limits on enrollment input; a CSR for a P-256 or RSA-4096 key is far below.
const MAX_CSR_BYTES: usize = 16 * 1024;
const MAX_TOKEN_BYTES: usize = 256;

pub struct EnrollmentService {
    ctx: Arc<Context>,
    limiter: RateLimiter,
}

impl EnrollmentService {
    pub fn new(ctx: Arc<Context>) -> Self {
        let limiter = RateLimiter::new(ctx.settings.enroll_per_minute, ctx.settings.enroll_burst);
        Self { ctx, limiter }
    }
}

/// The stored form of a join token: its SHA-256. Tokens carry 256 random
/// bits, so a fast hash is enough; the secret itself is never stored.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl EnrollmentService {
    async fn enroll_inner(
        &self,
        request: pb::EnrollRequest,
    ) -> Result<pb::EnrollResponse, ApiError> {
        // Unavailable, not a refusal: the agent retries until storage is back.
        self.ctx.store().ensure_writable()?;
        if request.join_token.is_empty() || request.join_token.len() > MAX_TOKEN_BYTES {
            return Err(ApiError::Unauthenticated(
                "join token rejected: missing or malformed token".into(),
            ));
        }
        if request.csr_pem.len() > MAX_CSR_BYTES {
            return Err(ApiError::InvalidArgument(format!(
                "certificate signing request is {} bytes; the limit is {MAX_CSR_BYTES}",
                request.csr_pem.len()
            )));
        }
        check_name(NameKind::Node, &request.name)?;
        let labels: Labels = request.labels.into_iter().collect();
        validate_labels(&labels).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;

        let enroll_key = pki::csr_key_fingerprint(&request.csr_pem)
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let hash = token_hash(&request.join_token);

        // An agent retrying an enrollment that committed although its answer
        // was lost (same name, token and key; the node never connected) is
        // answered with that node, even if the token has no uses left now.
        if let Some(existing_id) = self.ctx.store().node_id_by_name(&request.name)?
            && let Some(existing) = self.ctx.store().get_node(&existing_id)?
            && existing.is_retried_by(&hash, &request.name, &enroll_key)
        {
            return self.answer_retry(existing, &hash, &request.csr_pem).await;
        }

        // Refuse unknown, expired and used-up tokens before spending a
        // signature on the CSR; the transaction below checks again.
        match self.ctx.store().get_token(&hash)? {
            None => {
                return Err(ApiError::Unauthenticated(
                    EnrollRejection::UnknownToken.to_string(),
                ));
            }
            Some(t) if now_ms() >= t.expires_at_ms => {
                return Err(ApiError::Unauthenticated(
                    EnrollRejection::Expired(hotswap_common::timefmt::rfc3339_from_ms(
                        t.expires_at_ms,
                    ))
                    .to_string(),
                ));
            }
            Some(t) if t.uses_left == 0 => {
                return Err(ApiError::Unauthenticated(
                    EnrollRejection::UsedUp(t.uses_total).to_string(),
                ));
            }
            Some(_) => {}
        }
        let node_id = hotswap_common::ids::NodeId::generate().into_string();
        let settings = &self.ctx.settings;
        let cert_pem = self
            .ctx
            .ca
            .sign_csr(
                &request.csr_pem,
                &Principal::Node(node_id.clone()),
                settings.node_cert_validity,
            )
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let der = pki::first_cert_der(&cert_pem).map_err(|e| ApiError::Internal(e.to_string()))?;
        let record = NodeRecord {
            id: node_id.clone(),
            name: request.name.clone(),
            labels,
            forced_labels: Labels::new(),
            enrolled_at_ms: now_ms(),
            cert_fingerprint: pki::der_fingerprint(der.as_ref()),
            cert_not_after_ms: pki::not_after_ms(der.as_ref())
                .map_err(|e| ApiError::Internal(e.to_string()))?,
            last_seen_ms: None,
            agent_version: request.agent_version,
            previous_cert_fingerprint: None,
            previous_cert_not_after_ms: 0,
            token_hash: hash.clone(),
            enroll_key,
        };
        let state = self
            .ctx
            .registry
            .enroll(&hash, record)
            .await
            .map_err(|e| match e {
                EnrollError::Rejected(
                    rejection @ crate::store::EnrollRejection::NameTaken { .. },
                ) => ApiError::AlreadyExists(rejection.to_string()),
                EnrollError::Rejected(rejection) => {
                    ApiError::Unauthenticated(rejection.to_string())
                }
                EnrollError::Store(e) => ApiError::Storage(e),
            })?;
        if state.record.id != node_id {
            // The store found this enrollment committed before (an earlier
            // attempt through another replica, or one whose answer was lost
            // while this replica's view did not show it yet).
            return self
                .answer_retry(state.record, &hash, &request.csr_pem)
                .await;
        }
        tracing::info!(node = %node_id, name = %request.name, "node enrolled");
        Ok(pb::EnrollResponse {
            node_id,
            certificate_pem: cert_pem,
            ca_certificate_pem: self.ctx.ca.cert_pem().to_string(),
            labels: state.record.labels.into_iter().collect(),
        })
    }
}

impl EnrollmentService {
    /// Answer a retried enrollment with the node it created: a certificate
    /// for that node and the same key, which becomes the node's current
    /// one (the first was never delivered: the node never connected).
    async fn answer_retry(
        &self,
        existing: NodeRecord,
        hash: &str,
        csr_pem: &str,
    ) -> Result<pb::EnrollResponse, ApiError> {
        let cert_pem = self
            .ctx
            .ca
            .sign_csr(
                csr_pem,
                &Principal::Node(existing.id.clone()),
                self.ctx.settings.node_cert_validity,
            )
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let der = pki::first_cert_der(&cert_pem).map_err(|e| ApiError::Internal(e.to_string()))?;
        let fingerprint = pki::der_fingerprint(der.as_ref());
        let not_after_ms =
            pki::not_after_ms(der.as_ref()).map_err(|e| ApiError::Internal(e.to_string()))?;
        let (name, key) = (existing.name.clone(), existing.enroll_key.clone());
        // Guarded: if the node connected or was removed meanwhile, this is
        // no retry any more and the name is taken.
        let updated = self
            .ctx
            .store()
            .update_node(&existing.id, &|record| {
                if !record.is_retried_by(hash, &name, &key) {
                    return false;
                }
                record.cert_fingerprint = fingerprint.clone();
                record.cert_not_after_ms = not_after_ms;
                true
            })
            .await?;
        let record = match updated {
            Some(record) if record.cert_fingerprint == fingerprint => record,
            _ => {
                return Err(ApiError::AlreadyExists(
                    EnrollRejection::NameTaken {
                        name: existing.name,
                        id: existing.id,
                    }
                    .to_string(),
                ));
            }
        };
        tracing::info!(node = %record.id, name = %record.name, "retried enrollment answered with the node it created");
        Ok(pb::EnrollResponse {
            node_id: record.id,
            certificate_pem: cert_pem,
            ca_certificate_pem: self.ctx.ca.cert_pem().to_string(),
            labels: record.labels.into_iter().collect(),
        })
    }
}

#[tonic::async_trait]
impl pb::enrollment_server::Enrollment for EnrollmentService {
    async fn enroll(
        &self,
        request: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let info = RequestInfo::of(&request);
        let peer = info.peer_addr;
        if let Some(addr) = peer
            && let Err(wait) = self.limiter.check(addr.ip(), std::time::Instant::now())
        {
            self.ctx
                .metrics
                .enrollments
                .get_or_create(&ResultLabel {
                    result: "rate_limited",
                })
                .inc();
            tracing::warn!(peer = %addr, "enrollment attempt rate-limited");
            return Err(ApiError::ResourceExhausted(format!(
                "too many enrollment attempts from {}; retry in {}s",
                addr.ip(),
                wait.as_secs().max(1)
            ))
            .into());
        }
        let request = request.into_inner();
        let who = if request.join_token.is_empty() {
            "join-token:none".to_string()
        } else {
            // A prefix of the token's hash identifies it in the audit log
            // without revealing it.
            format!("join-token:{}", &token_hash(&request.join_token)[..12])
        };
        let name = request.name.clone();
        let result = self.enroll_inner(request).await;
        let outcome = match &result {
            Ok(_) => "enrolled",
            Err(ApiError::Unauthenticated(_)) => "token_rejected",
            Err(ApiError::InvalidArgument(_) | ApiError::AlreadyExists(_)) => "invalid",
            Err(_) => "error",
        };
        self.ctx
            .metrics
            .enrollments
            .get_or_create(&ResultLabel { result: outcome })
            .inc();
        if let Err(e) = &result {
            // The token itself is never logged.
            tracing::warn!(peer = ?peer, error = %e, "enrollment refused");
        }
        let (result_text, detail, target) = match &result {
            Ok(r) => ("ok", String::new(), format!("{name} {}", r.node_id)),
            Err(e @ ApiError::Unauthenticated(_)) => ("denied", e.to_string(), name),
            Err(e) => ("error", e.to_string(), name),
        };
        self.ctx
            .record(AuditEntry {
                user: who,
                role: "node".into(),
                action: "nodes.enroll".into(),
                target,
                result: result_text,
                detail,
                trace_id: info.trace_id,
                peer,
            })
            .await?;
        result.map(Response::new).map_err(Status::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names() {
        for ok in ["web-1", "a", "Host_2.example"] {
            assert!(check_name(NameKind::Node, ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a b", "a/b", &"x".repeat(64)] {
            assert!(check_name(NameKind::Node, bad).is_err(), "{bad:?}");
        }
    }
}
