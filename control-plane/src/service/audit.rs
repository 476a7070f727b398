//! `Audit`: read and verify the audit log (see [`crate::audit`]).

use std::sync::Arc;

use hotswap_common::pb;
use hotswap_common::timefmt::ts_from_ms;
use tonic::{Request, Response, Status};

use super::Context;
use crate::audit::{AuditFilter, AuditRecord};
use crate::error::ApiError;

/// Most records one `ListAudit` returns.
const MAX_LIST: u32 = 10_000;

pub struct AuditService {
    ctx: Arc<Context>,
}

impl AuditService {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }
}

fn record_to_pb(r: AuditRecord) -> pb::AuditRecord {
    pb::AuditRecord {
        seq: r.seq,
        time: Some(ts_from_ms(r.time_ms)),
        user: r.user,
        role: r.role,
        action: r.action,
        target: r.target,
        result: r.result,
        detail: r.detail,
        trace_id: r.trace_id,
        peer: r.peer,
        prev_hash: r.prev_hash,
        hash: r.hash,
    }
}

fn audit_error(e: crate::audit::AuditError) -> ApiError {
    ApiError::Internal(format!("audit log: {e}"))
}

#[tonic::async_trait]
impl pb::audit_server::Audit for AuditService {
    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<pb::ListAuditResponse>, Status> {
        self.ctx.reader(&request)?;
        let r = request.into_inner();
        if r.limit > MAX_LIST {
            return Err(ApiError::InvalidArgument(format!(
                "--limit {} exceeds the maximum of {MAX_LIST}",
                r.limit
            ))
            .into());
        }
        if !["", "ok", "denied", "rate_limited", "error"].contains(&r.result.as_str()) {
            return Err(ApiError::InvalidArgument(format!(
                "--result {:?} is not ok, denied, rate_limited or error",
                r.result
            ))
            .into());
        }
        let filter = AuditFilter {
            since: r.since,
            limit: r.limit as usize,
            user: r.user,
            action: r.action,
            result: r.result,
        };
        let audit = self.ctx.audit.clone();
        let records = tokio::task::spawn_blocking(move || audit.list(&filter))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(audit_error)?;
        Ok(Response::new(pb::ListAuditResponse {
            records: records.into_iter().map(record_to_pb).collect(),
        }))
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        self.ctx.reader(&request)?;
        let audit = self.ctx.audit.clone();
        let v = tokio::task::spawn_blocking(move || audit.verify())
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?
            .map_err(audit_error)?;
        let (broken_seq, problem) = v.broken.unwrap_or_default();
        let (first_seq, anchor_signer) = v.anchored.unwrap_or((1, String::new()));
        Ok(Response::new(pb::VerifyAuditResponse {
            intact: broken_seq == 0,
            records: v.records,
            head_hash: v.head_hash,
            broken_seq,
            problem,
            first_seq,
            anchor_signer,
        }))
    }
}
