//! gRPC services. Handlers authenticate the caller (see [`crate::auth`]),
//! validate input, call the registry, and convert at the edge; errors are
//! [`crate::error::ApiError`] and map to status codes in one place.

pub mod artifacts;
pub mod audit;
mod convert;
pub mod deployments;
pub mod enrollment;
pub mod fleet;
pub mod freezes;
pub mod history;
pub mod observe;
pub mod servers;
pub mod session;
mod stream;
pub mod users;
pub mod webhooks;

use std::sync::Arc;

use hotswap_common::pki::CertificateAuthority;
use tokio_util::sync::CancellationToken;
use tonic::Request;

use crate::audit::{AuditEntry, AuditError, AuditLog};
use crate::auth::{self, Caller, Permission, RequestInfo};
use crate::config::Settings;
use crate::error::ApiError;
use crate::events::EventLog;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::replicas::Replicas;
use crate::store::Store;

/// What every handler shares.
pub struct Context {
    pub registry: Arc<Registry>,
    /// The store, for the records services read and write themselves
    /// (tokens, users, keys, artifacts); nodes and desired states go
    /// through the registry.
    pub store: Store,
    pub events: Arc<EventLog>,
    pub ca: CertificateAuthority,
    pub ca_fingerprint: String,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub audit: Arc<AuditLog>,
    /// Cancelled when the control plane shuts down; long-lived streams end.
    pub shutdown: CancellationToken,
    /// Per-operator budgets for mutating calls (see [`OperatorLimits`]).
    pub limits: OperatorLimits,
    /// The control-plane replicas, for `servers list|get`.
    pub replicas: Arc<dyn Replicas>,
}

/// Token buckets per operator for mutating calls, and a smaller one for
/// starting deployments and pipelines: a runaway script or a stolen profile
/// cannot flood the audit log, the event log or the fleet with changes.
pub struct OperatorLimits {
    writes: crate::ratelimit::RateLimiter<String>,
    deployments: crate::ratelimit::RateLimiter<String>,
}

impl OperatorLimits {
    pub fn new(settings: &Settings) -> Self {
        Self {
            writes: crate::ratelimit::RateLimiter::new(
                settings.operator_writes_per_minute,
                settings.operator_writes_burst,
            ),
            deployments: crate::ratelimit::RateLimiter::new(
                settings.deployments_per_minute,
                settings.deployments_burst,
            ),
        }
    }

    /// Take one call of `action` by `user`; the refusal says which limit
    /// and when to retry.
    pub fn check(&self, user: &str, action: &str) -> Result<(), String> {
        let now = std::time::Instant::now();
        let refusal = |limiter: &crate::ratelimit::RateLimiter<String>,
                       what: &str,
                       key: &str,
                       wait: std::time::Duration| {
            format!(
                "rate limited: {user} made more than {:.0} {what} per minute ({key}); retry in {}s",
                limiter.per_minute(),
                wait.as_secs().max(1)
            )
        };
        let deploys = matches!(action, "deploy.create" | "pipeline.run");
        // A deployment the deployment budget refuses spends no change.
        if deploys && let Err(wait) = self.deployments.peek(&user.to_string(), now) {
            return Err(refusal(
                &self.deployments,
                "deployments",
                "deployments_per_minute",
                wait,
            ));
        }
        if let Err(wait) = self.writes.check(user.to_string(), now) {
            return Err(refusal(
                &self.writes,
                "changes",
                "operator_writes_per_minute",
                wait,
            ));
        }
        if deploys && let Err(wait) = self.deployments.check(user.to_string(), now) {
            // Only a concurrent call of the same operator gets here.
            return Err(refusal(
                &self.deployments,
                "deployments",
                "deployments_per_minute",
                wait,
            ));
        }
        Ok(())
    }
}

impl Context {
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Authorize a read-only call (not audited).
    pub fn reader<T>(&self, request: &Request<T>) -> Result<Caller, ApiError> {
        let peer = auth::peer(request)?;
        auth::authorize_operator(&peer, &**self.store(), Permission::Read)
    }

    /// Authorize a mutating call. A refusal is written to the audit log
    /// before it is returned; an allowed call must be finished with
    /// [`AuditedCall::finish`], which records its result.
    pub async fn begin<T>(
        &self,
        request: &Request<T>,
        permission: Permission,
        action: &'static str,
        target: impl Into<String>,
    ) -> Result<AuditedCall, ApiError> {
        // A failed storage would neither keep the change nor its audit record.
        self.store().ensure_writable()?;
        let info = RequestInfo::of(request);
        let target = target.into();
        let authorized = auth::peer(request)
            .and_then(|p| auth::authorize_operator(&p, &**self.store(), permission));
        // A caller over its budget is refused like an unauthorized one:
        // recorded, nothing changed.
        let authorized = authorized.and_then(|caller| {
            self.limits
                .check(&caller.user, action)
                .map(|()| caller)
                .map_err(ApiError::ResourceExhausted)
        });
        match authorized {
            Ok(caller) => Ok(AuditedCall {
                caller,
                action,
                target,
                info,
            }),
            Err(refusal) => {
                let entry = AuditEntry {
                    user: auth::claimed_user(request),
                    role: String::new(),
                    action: action.to_string(),
                    target,
                    result: if matches!(refusal, ApiError::ResourceExhausted(_)) {
                        "rate_limited"
                    } else {
                        "denied"
                    },
                    detail: refusal.to_string(),
                    trace_id: info.trace_id,
                    peer: info.peer_addr,
                };
                self.record(entry).await?;
                Err(refusal)
            }
        }
    }

    /// Append to the audit log. The caller's change is already applied, so a
    /// failure here is reported as an internal error that says so.
    pub async fn record(&self, entry: AuditEntry) -> Result<(), ApiError> {
        let record = self.audit.append(entry).await.map_err(|e| match e {
            AuditError::Store(store) => ApiError::Storage(store),
            other => ApiError::Internal(format!("could not append to the audit log: {other}")),
        })?;
        self.metrics.audit_records.set(record.seq as i64);
        Ok(())
    }
}

/// Actions whose handlers append their own, richer events (`module.yanked`
/// with the reason) instead of the generic one named after the action.
const OWN_EVENTS: &[&str] = &["module.yank", "module.unyank"];

/// A mutating call that passed authorization; see [`Context::begin`].
pub struct AuditedCall {
    pub caller: Caller,
    action: &'static str,
    target: String,
    info: RequestInfo,
}

impl AuditedCall {
    pub fn user(&self) -> &str {
        &self.caller.user
    }

    /// Set the target once it is known (streamed uploads learn it late).
    pub fn set_target(&mut self, target: impl Into<String>) {
        self.target = target.into();
    }

    /// Record the call's result in the audit log, then return it.
    /// Audit the outcome (and, for successful calls without events of
    /// their own, append the generic event) before answering.
    pub async fn finish<T>(
        self,
        ctx: &Context,
        result: Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let (outcome, detail) = match &result {
            Ok(_) => ("ok", String::new()),
            Err(e @ (ApiError::PermissionDenied(_) | ApiError::Unauthenticated(_))) => {
                ("denied", e.to_string())
            }
            Err(e) => ("error", e.to_string()),
        };
        // Deployments and pipelines report their own, richer events.
        if result.is_ok()
            && !self.action.starts_with("deploy.")
            && !self.action.starts_with("pipeline.")
            && !OWN_EVENTS.contains(&self.action)
        {
            let message = if self.target.is_empty() {
                format!("by {}", self.caller.user)
            } else {
                format!("{} by {}", self.target, self.caller.user)
            };
            ctx.events
                .append(crate::events::Event::new(self.action, message));
        }
        ctx.record(AuditEntry {
            user: self.caller.user,
            role: self.caller.role.as_str().to_string(),
            action: self.action.to_string(),
            target: self.target,
            result: outcome,
            detail,
            trace_id: self.info.trace_id,
            peer: self.info.peer_addr,
        })
        .await?;
        result
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn each_operator_has_its_own_budgets() {
        let settings = Settings {
            operator_writes_per_minute: 60,
            operator_writes_burst: 4,
            deployments_per_minute: 1,
            deployments_burst: 2,
            ..Settings::default()
        };
        let limits = OperatorLimits::new(&settings);
        assert!(limits.check("alice", "deploy.create").is_ok());
        assert!(limits.check("alice", "pipeline.run").is_ok());
        let refused = limits.check("alice", "deploy.create").unwrap_err();
        assert!(
            refused.starts_with("rate limited: alice made more than 1 deployments per minute (deployments_per_minute); retry in "),
            "{refused}"
        );
        // The refused deployment spent no change: two are left.
        assert!(limits.check("alice", "tokens.create").is_ok());
        assert!(limits.check("alice", "users.create").is_ok());
        let refused = limits.check("alice", "keys.trust").unwrap_err();
        assert!(
            refused.contains("60 changes per minute (operator_writes_per_minute)"),
            "{refused}"
        );
        // Another operator is unaffected.
        assert!(limits.check("bob", "deploy.create").is_ok());
    }
}
