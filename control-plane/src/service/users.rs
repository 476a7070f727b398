//! `Users`: operator identities. The client generates the key and sends a
//! CSR; the control plane signs it for `hotswap://user/<name>` and records
//! the user's role and the certificate's fingerprint. Only that certificate
//! is accepted for the user, so re-creating a revoked name never revives an
//! old certificate.

use hotswap_common::ids::{NameKind, check_name};
use std::sync::Arc;
use std::time::Duration;

use hotswap_common::pb;
use hotswap_common::pki::{self, Principal};
use hotswap_common::timefmt::{now_ms, ts_from_ms};
use tonic::{Request, Response, Status};

use super::Context;
use crate::auth::{Permission, Role};
use crate::error::ApiError;
use crate::store::UserRecord;

const MAX_CSR_BYTES: usize = 16 * 1024;

pub struct UsersService {
    ctx: Arc<Context>,
}

impl UsersService {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }
}

pub fn user_to_pb(record: &UserRecord) -> pb::User {
    pb::User {
        name: record.name.clone(),
        role: record.role.as_str().to_string(),
        revoked: record.revoked_at_ms.is_some(),
        created_by: record.created_by.clone(),
        created_at: Some(ts_from_ms(record.created_at_ms)),
        cert_expires_at: Some(ts_from_ms(record.cert_not_after_ms)),
        cert_fingerprint: record.cert_fingerprint.clone(),
    }
}

impl UsersService {
    async fn create(
        &self,
        by: &str,
        request: pb::CreateUserRequest,
    ) -> Result<pb::CreateUserResponse, ApiError> {
        check_name(NameKind::User, &request.name)?;
        let role = Role::parse(&request.role)?;
        if request.csr_pem.len() > MAX_CSR_BYTES {
            return Err(ApiError::InvalidArgument(format!(
                "certificate signing request is {} bytes; the limit is {MAX_CSR_BYTES}",
                request.csr_pem.len()
            )));
        }
        let max = self.ctx.settings.user_cert_validity;
        let validity = match request.validity_seconds {
            0 => max,
            secs => Duration::from_secs(secs),
        };
        if validity > max || validity < Duration::from_secs(60) {
            return Err(ApiError::InvalidArgument(format!(
                "certificate validity must be between 1m and {} (user_cert_validity)",
                hotswap_common::timefmt::human_age(max.as_millis() as u64)
            )));
        }
        if let Some(existing) = self.ctx.store().get_user(&request.name)?
            && existing.revoked_at_ms.is_none()
        {
            return Err(ApiError::AlreadyExists(format!(
                "user {:?} already exists with role {}; revoke it first to issue new credentials",
                request.name,
                existing.role.as_str()
            )));
        }
        let cert_pem = self
            .ctx
            .ca
            .sign_csr(
                &request.csr_pem,
                &Principal::User(request.name.clone()),
                validity,
            )
            .map_err(|e| ApiError::InvalidArgument(e.to_string()))?;
        let der = pki::first_cert_der(&cert_pem).map_err(|e| ApiError::Internal(e.to_string()))?;
        let record = UserRecord {
            name: request.name.clone(),
            role,
            created_at_ms: now_ms(),
            created_by: by.to_string(),
            cert_fingerprint: pki::der_fingerprint(der.as_ref()),
            cert_not_after_ms: pki::not_after_ms(der.as_ref())
                .map_err(|e| ApiError::Internal(e.to_string()))?,
            revoked_at_ms: None,
        };
        let store = self.ctx.store();
        match store.get_user(&record.name)? {
            // A revoked user may be issued new credentials under the same name.
            Some(_) => store.put_user(&record).await?,
            None => {
                if !store.create_user(&record).await? {
                    return Err(ApiError::AlreadyExists(format!(
                        "user {:?} was created concurrently",
                        record.name
                    )));
                }
            }
        }
        tracing::info!(user = %record.name, role = role.as_str(), by = %by, "user created");
        Ok(pb::CreateUserResponse {
            user: Some(user_to_pb(&record)),
            certificate_pem: cert_pem,
            ca_certificate_pem: self.ctx.ca.cert_pem().to_string(),
        })
    }

    fn existing(&self, name: &str) -> Result<UserRecord, ApiError> {
        self.ctx
            .store()
            .get_user(name)?
            .ok_or_else(|| ApiError::NotFound(format!("no user named {name:?}")))
    }

    async fn set_role(&self, by: &str, name: &str, role: &str) -> Result<pb::User, ApiError> {
        let role = Role::parse(role)?;
        let mut record = self.existing(name)?;
        if record.revoked_at_ms.is_some() {
            return Err(ApiError::FailedPrecondition(format!(
                "user {name:?} is revoked; create it again instead"
            )));
        }
        if name == by && role != Role::Admin {
            return Err(ApiError::FailedPrecondition(
                "admins cannot take their own admin role away; ask another admin".into(),
            ));
        }
        record.role = role;
        self.ctx.store().put_user(&record).await?;
        tracing::info!(user = %name, role = role.as_str(), by = %by, "user role changed");
        Ok(user_to_pb(&record))
    }

    async fn revoke(&self, by: &str, name: &str) -> Result<pb::User, ApiError> {
        let mut record = self.existing(name)?;
        if record.revoked_at_ms.is_some() {
            return Err(ApiError::FailedPrecondition(format!(
                "user {name:?} is already revoked"
            )));
        }
        if name == by {
            return Err(ApiError::FailedPrecondition(
                "admins cannot revoke themselves; ask another admin".into(),
            ));
        }
        record.revoked_at_ms = Some(now_ms());
        self.ctx.store().put_user(&record).await?;
        tracing::info!(user = %name, by = %by, "user revoked");
        Ok(user_to_pb(&record))
    }
}

#[tonic::async_trait]
impl pb::users_server::Users for UsersService {
    async fn create_user(
        &self,
        request: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::CreateUserResponse>, Status> {
        let r = request.get_ref();
        let target = format!("{} role={}", r.name, r.role);
        let call = self
            .ctx
            .begin(&request, Permission::Admin, "users.create", target)
            .await?;
        let result = self.create(call.user(), request.into_inner()).await;
        Ok(Response::new(call.finish(&self.ctx, result).await?))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        self.ctx.reader(&request)?;
        let users = self
            .ctx
            .store()
            .list_users()
            .map_err(ApiError::from)?
            .iter()
            .map(user_to_pb)
            .collect();
        Ok(Response::new(pb::ListUsersResponse { users }))
    }

    async fn set_user_role(
        &self,
        request: Request<pb::SetUserRoleRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let r = request.get_ref().clone();
        let target = format!("{} role={}", r.name, r.role);
        let call = self
            .ctx
            .begin(&request, Permission::Admin, "users.set_role", target)
            .await?;
        let result = self.set_role(call.user(), &r.name, &r.role).await;
        Ok(Response::new(call.finish(&self.ctx, result).await?))
    }

    async fn revoke_user(
        &self,
        request: Request<pb::RevokeUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let name = request.get_ref().name.clone();
        let call = self
            .ctx
            .begin(&request, Permission::Admin, "users.revoke", &name)
            .await?;
        let result = self.revoke(call.user(), &name).await;
        Ok(Response::new(call.finish(&self.ctx, result).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names() {
        for ok in ["alice", "bob.smith", "ci-bot_2", "a@example.com"] {
            assert!(check_name(NameKind::User, ok).is_ok(), "{ok}");
        }
        for bad in ["", "-x", "a b", "a/b", "ä", &"x".repeat(65)] {
            assert!(check_name(NameKind::User, bad).is_err(), "{bad:?}");
        }
    }
}
