//! `Freezes`: ad hoc deployment freezes (SPEC §9): create, list, delete.
//!
//! Creating and deleting need the deploy permission (deployers and admins):
//! a freeze only stops things, and the people who deploy are the ones who
//! know when not to. A deployer may delete only the freezes they created;
//! lifting someone else's is for an admin, as overriding one is.

use std::sync::Arc;
use std::time::Duration;

use hotswap_common::pb;

use hotswap_common::timefmt::{ms_from_ts, now_ms, rfc3339_from_ms, ts_from_ms};
use tonic::{Request, Response, Status};

use super::Context;
use crate::auth::{Permission, Role};
use crate::error::ApiError;
use crate::freeze::in_force;
use crate::store::FreezeRecord;

/// Longest freeze `freeze create` accepts: beyond a year it is a typo, or a
/// freeze that belongs in the config file.
pub const MAX_FREEZE: Duration = Duration::from_secs(366 * 86_400);

pub struct FreezesService {
    ctx: Arc<Context>,
}

impl FreezesService {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }
}

pub fn freeze_to_pb(f: &FreezeRecord) -> pb::Freeze {
    pb::Freeze {
        id: f.id.clone(),
        environment: f.environment.clone(),
        from: Some(ts_from_ms(f.from_ms)),
        until: Some(ts_from_ms(f.until_ms)),
        reason: f.reason.clone(),
        created_by: f.created_by.clone(),
    }
}

/// The freeze a create request asks for, checked whole: a known
/// environment, a reason, and an end in the future within [`MAX_FREEZE`].
fn new_freeze(
    request: &pb::CreateFreezeRequest,
    environments: &[&str],
    user: &str,
    now: u64,
) -> Result<FreezeRecord, ApiError> {
    let bad = |m: String| Err(ApiError::InvalidArgument(m));
    if request.environment.is_empty() {
        return bad("--env is required".into());
    }
    if !environments.contains(&request.environment.as_str()) {
        return bad(format!(
            "--env {:?}: unknown environment (configured: {})",
            request.environment,
            environments.join(", ")
        ));
    }
    let reason = request.reason.trim();
    if reason.is_empty() {
        return bad("--reason must say why the environment is frozen".into());
    }
    if reason.len() > 1024 {
        return bad("--reason is longer than 1024 bytes".into());
    }
    let max_ms = MAX_FREEZE.as_millis() as u64;
    let until = match (&request.until, request.for_ms) {
        (Some(_), ms) if ms > 0 => return bad("give --until or --for, not both".into()),
        (None, 0) => return bad("give --until TIME or --for DURATION".into()),
        (Some(ts), _) => {
            if ts.seconds < 0 {
                return bad("--until is before 1970".into());
            }
            let until = ms_from_ts(ts);
            if until <= now {
                return bad(format!(
                    "--until {} is not in the future (now is {})",
                    rfc3339_from_ms(until),
                    rfc3339_from_ms(now)
                ));
            }
            until
        }
        (None, ms) => now.saturating_add(ms),
    };
    if until - now > max_ms {
        return bad(format!(
            "a freeze may last at most 366 days (until {}); put longer ones in the config file",
            rfc3339_from_ms(now + max_ms)
        ));
    }
    Ok(FreezeRecord {
        id: format!("fz-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]),
        environment: request.environment.clone(),
        from_ms: now,
        until_ms: until,
        reason: reason.to_string(),
        created_by: user.to_string(),
    })
}

#[tonic::async_trait]
impl pb::freezes_server::Freezes for FreezesService {
    async fn create_freeze(
        &self,
        request: Request<pb::CreateFreezeRequest>,
    ) -> Result<Response<pb::Freeze>, Status> {
        let r = request.get_ref();
        let target = format!("env={} reason={:?}", r.environment, r.reason.trim());
        let mut call = self
            .ctx
            .begin(&request, Permission::Deploy, "freeze.create", target)
            .await?;
        let result = async {
            let environments: Vec<&str> = self
                .ctx
                .settings
                .environments
                .keys()
                .map(String::as_str)
                .collect();
            let now = now_ms();
            let record = new_freeze(request.get_ref(), &environments, call.user(), now)?;
            let store = self.ctx.store();
            store.put_freeze(&record).await?;
            // Expired freezes are of no further use: drop them now.
            for old in store.list_freezes()? {
                if old.until_ms <= now {
                    store.remove_freeze(&old.id).await?;
                }
            }
            Ok(record)
        }
        .await;
        if let Ok(record) = &result {
            call.set_target(format!(
                "{} env={} until={} reason={:?}",
                record.id,
                record.environment,
                rfc3339_from_ms(record.until_ms),
                record.reason
            ));
        }
        let record = call.finish(&self.ctx, result).await?;
        tracing::info!(freeze = %record.id, environment = %record.environment, until = %rfc3339_from_ms(record.until_ms), "freeze created");
        Ok(Response::new(freeze_to_pb(&record)))
    }

    async fn list_freezes(
        &self,
        request: Request<pb::ListFreezesRequest>,
    ) -> Result<Response<pb::ListFreezesResponse>, Status> {
        self.ctx.reader(&request)?;
        let filter = request.into_inner();
        let now = now_ms();
        let mut freezes: Vec<FreezeRecord> = self
            .ctx
            .store()
            .list_freezes()
            .map_err(ApiError::from)?
            .into_iter()
            // Expired freezes drop out; ones set to begin later cannot be
            // made, but would show.
            .filter(|f| f.until_ms > now)
            .filter(|f| filter.environment.is_empty() || f.environment == filter.environment)
            .collect();
        freezes.sort_by(|a, b| b.from_ms.cmp(&a.from_ms).then(a.id.cmp(&b.id)));
        Ok(Response::new(pb::ListFreezesResponse {
            freezes: freezes.iter().map(freeze_to_pb).collect(),
        }))
    }

    async fn delete_freeze(
        &self,
        request: Request<pb::DeleteFreezeRequest>,
    ) -> Result<Response<pb::Freeze>, Status> {
        let target = request.get_ref().id.clone();
        let call = self
            .ctx
            .begin(&request, Permission::Deploy, "freeze.delete", target)
            .await?;
        let id = request.into_inner().id;
        let result = async {
            let store = self.ctx.store();
            let existing = store
                .list_freezes()?
                .into_iter()
                .find(|f| f.id == id && in_force(f, now_ms()))
                .ok_or_else(|| ApiError::NotFound(format!("freeze {id:?} not found")))?;
            if call.caller.role != Role::Admin && existing.created_by != call.user() {
                return Err(ApiError::PermissionDenied(format!(
                    "freeze {id} was created by {}; only they or an admin can delete it",
                    existing.created_by
                )));
            }
            store
                .remove_freeze(&id)
                .await?
                .ok_or_else(|| ApiError::NotFound(format!("freeze {id:?} not found")))
        }
        .await;
        let record = call.finish(&self.ctx, result).await?;
        tracing::info!(freeze = %record.id, environment = %record.environment, "freeze deleted");
        Ok(Response::new(freeze_to_pb(&record)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(
        env: &str,
        until: Option<u64>,
        for_ms: u64,
        reason: &str,
    ) -> pb::CreateFreezeRequest {
        pb::CreateFreezeRequest {
            environment: env.into(),
            until: until.map(ts_from_ms),
            for_ms,
            reason: reason.into(),
        }
    }

    #[test]
    fn bad_freezes_are_refused_by_name() {
        let envs = ["dev", "qa"];
        let now = 1_800_000_000_000;
        for (r, says) in [
            (request("", None, 1000, "x"), "--env is required"),
            (
                request("prod", None, 1000, "x"),
                "--env \"prod\": unknown environment (configured: dev, qa)",
            ),
            (request("qa", None, 1000, "  "), "--reason must say why"),
            (
                request("qa", None, 0, "x"),
                "give --until TIME or --for DURATION",
            ),
            (request("qa", Some(now + 10), 1000, "x"), "not both"),
            (
                request("qa", Some(now - 10), 0, "x"),
                "is not in the future",
            ),
            (request("qa", Some(now), 0, "x"), "is not in the future"),
            (
                request("qa", None, 400 * 86_400_000, "x"),
                "at most 366 days",
            ),
        ] {
            let err = new_freeze(&r, &envs, "alice", now)
                .expect_err(says)
                .to_string();
            assert!(err.contains(says), "{says}: {err}");
        }
        let ok = new_freeze(
            &request("qa", None, 3_600_000, " release "),
            &envs,
            "alice",
            now,
        )
        .expect("valid");
        assert_eq!(
            (
                ok.environment.as_str(),
                ok.from_ms,
                ok.until_ms,
                ok.reason.as_str(),
                ok.created_by.as_str()
            ),
            ("qa", now, now + 3_600_000, "release", "alice")
        );
        assert!(ok.id.starts_with("fz-"));
        let until = new_freeze(&request("dev", Some(now + 5000), 0, "x"), &envs, "bob", now)
            .expect("until");
        assert_eq!(until.until_ms, now + 5000);
    }
}
