//! `Deployments`: create (or plan), list, get, watch and control deployments.

use std::sync::Arc;
use std::time::Duration;

use hotswap_common::labels::validate_labels;
use hotswap_common::pb;
use hotswap_common::timefmt::ts_from_ms;
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

use super::Context;
use super::stream::{ServerStream, spawn_stream};
use crate::auth::Permission;
use crate::deploy::engine::{CreateRequest, DeploymentRecord, Engine, PipelineState, PlanView};
use crate::deploy::machine::{Control, NodeState, Strategy};
use crate::error::ApiError;

pub struct DeploymentsService {
    ctx: Arc<Context>,
    engine: Arc<Engine>,
}

impl DeploymentsService {
    pub fn new(ctx: Arc<Context>, engine: Arc<Engine>) -> Self {
        Self { ctx, engine }
    }
}

fn opt_ms(ms: u64) -> Option<Duration> {
    (ms > 0).then(|| Duration::from_millis(ms))
}

fn create_request(request: pb::CreateDeploymentRequest) -> Result<CreateRequest, ApiError> {
    let o = request.options.unwrap_or_default();
    let selector = o.selector.into_iter().collect();
    validate_labels(&selector).map_err(|e| ApiError::InvalidArgument(format!("selector: {e}")))?;
    if request.module.is_empty() || request.version.is_empty() {
        return Err(ApiError::InvalidArgument(
            "give the module as NAME@VERSION".into(),
        ));
    }
    if request.environment.is_empty() {
        return Err(ApiError::InvalidArgument("--env is required".into()));
    }
    Ok(CreateRequest {
        module: request.module,
        version: request.version,
        environment: request.environment,
        selector,
        strategy: (!o.strategy.is_empty()).then_some(o.strategy),
        batch_size: (!o.batch_size.is_empty()).then_some(o.batch_size),
        // Unset is the default; -1 is how clients from before the field
        // was optional said so.
        max_failures: match o.max_failures {
            None | Some(-1) => None,
            Some(n) => Some(u32::try_from(n).map_err(|_| {
                ApiError::InvalidArgument(format!(
                    "--max-failures {n} is negative (-1 on the wire means the default)"
                ))
            })?),
        },
        steps: o.steps,
        step_duration: opt_ms(o.step_duration_ms),
        manual_promote: o.manual_promote,
        bake_time: opt_ms(o.bake_time_ms),
        min_healthy_time: opt_ms(o.min_healthy_time_ms),
        health_deadline: opt_ms(o.health_deadline_ms),
        progress_deadline: opt_ms(o.progress_deadline_ms),
        // Only unset, or the legacy "unset" values of clients from before
        // these fields were optional (-1, 0, 0), mean the default: any other
        // negative, NaN or infinite value is a mistake the engine refuses,
        // not a silent fall-back (NaN would make the check never trip).
        max_error_rate: o.max_error_rate.filter(|rate| *rate != -1.0),
        max_latency_increase: o.max_latency_increase.filter(|factor| *factor != 0.0),
        no_auto_rollback: o.no_auto_rollback,
        pause_timeout: opt_ms(o.pause_timeout_ms.unwrap_or(0)),
        analysis_min_requests: o.analysis_min_requests,
        analysis_warmup: o.analysis_warmup_ms.map(Duration::from_millis),
        dry_run: request.dry_run,
        allow_downgrade: o.allow_downgrade,
        override_freeze: o.override_freeze,
    })
}

pub fn deployment_to_pb(record: &DeploymentRecord) -> pb::Deployment {
    let d = &record.deployment;
    let count =
        |f: &dyn Fn(NodeState) -> bool| d.nodes.iter().filter(|n| f(n.state)).count() as u32;
    let canary = matches!(d.spec.strategy, Strategy::Canary { .. });
    pb::Deployment {
        id: record.id.clone(),
        module: d.spec.module.clone(),
        version: d.spec.version.clone(),
        environment: record.environment.clone(),
        strategy: d.spec.strategy.name().to_string(),
        state: d.state.as_str().to_string(),
        progress: Some(pb::Progress {
            total: d.nodes.len() as u32,
            updated: count(&|s| {
                matches!(
                    s,
                    NodeState::Updating
                        | NodeState::Healthy
                        | NodeState::Failed
                        | NodeState::RollingBack
                        | NodeState::RolledBack
                )
            }),
            healthy: count(&|s| s == NodeState::Healthy),
            failed: count(&|s| matches!(s, NodeState::Failed | NodeState::Lost)),
        }),
        nodes: d
            .nodes
            .iter()
            .map(|n| pb::DeploymentNode {
                node: n.name.clone(),
                from_version: n.from_version.clone(),
                to_version: d.spec.version.clone(),
                state: n.state.as_str().to_string(),
                reason: n.reason.clone(),
                wave: n.wave as u32,
                // A node still updating or staging is retrying its failure,
                // not failed; one rolled back after failing keeps its kind.
                failure_kind: n
                    .failure_kind
                    .filter(|_| !matches!(n.state, NodeState::Updating | NodeState::Staging))
                    .map(|k| k.as_str().to_string())
                    .unwrap_or_default(),
            })
            .collect(),
        created_by: d.spec.created_by.clone(),
        created_at: Some(ts_from_ms(d.created_ms)),
        finished_at: d.finished_ms.map(ts_from_ms),
        reason: d.reason.clone(),
        wave: d.wave as u32,
        waves: d.waves as u32,
        analysis: d
            .analysis
            .iter()
            .map(|v| pb::AnalysisVerdict {
                time: Some(ts_from_ms(v.at_ms)),
                step: v.step as u32 + 1,
                passed: v.passed,
                summary: v.summary.clone(),
                canary_error_rate: v.analysis.canary.error_rate,
                baseline_error_rate: v.analysis.baseline.error_rate,
                canary_latency_p99: v.analysis.canary.latency_p99,
                baseline_latency_p99: v.analysis.baseline.latency_p99,
                outcome: v.outcome.as_str().to_string(),
                canary_requests: v.analysis.canary.requests,
                baseline_requests: v.analysis.baseline.requests,
                canary_nodes: v.analysis.canary.nodes,
                baseline_nodes: v.analysis.baseline.nodes,
            })
            .collect(),
        approved_by: d.approved_by.clone(),
        waiting_for: d.waiting_for(crate::clock::steady_now_ms()),
        // The dashboard draws these into its canary charts.
        max_error_rate: canary.then_some(d.spec.thresholds.max_error_rate),
        max_latency_increase: canary.then_some(d.spec.thresholds.latency_increase),
    }
}

fn plan_to_pb(plan: &PlanView) -> pb::Plan {
    pb::Plan {
        strategy: plan.strategy.clone(),
        waves: plan
            .waves
            .iter()
            .enumerate()
            .map(|(i, (nodes, gate))| {
                let start = plan.windows.get(i);
                pb::Wave {
                    nodes: nodes.clone(),
                    gate: gate.clone(),
                    earliest_start: start.and_then(|s| s.earliest_ms).map(ts_from_ms),
                    window: start.map(|s| s.wait.clone()).unwrap_or_default(),
                }
            })
            .collect(),
        gates: plan.waves.iter().map(|(_, gate)| gate.clone()).collect(),
    }
}

fn control_of(action: &str, reason: String, user: &str) -> Result<Control, ApiError> {
    let reason_or = |default: &str| {
        if reason.is_empty() {
            default.to_string()
        } else {
            reason.clone()
        }
    };
    Ok(match action {
        "pause" => Control::Pause,
        "resume" => Control::Resume,
        "promote" => Control::Promote,
        "abort" => Control::Abort {
            reason: reason_or(&format!("by {user}")),
        },
        "rollback" => Control::Rollback {
            reason: reason_or(&format!("by {user}")),
        },
        // The reason of an approval or rejection is optional (SPEC §6); the
        // machine leaves it out of its note when it is empty.
        "approve" => Control::Approve {
            by: user.to_string(),
            reason: reason.trim().to_string(),
        },
        "reject" => Control::Reject {
            by: user.to_string(),
            reason: reason.trim().to_string(),
        },
        other => {
            return Err(ApiError::InvalidArgument(format!(
                "unknown control {other:?}: use pause, resume, promote, abort, rollback, approve or reject"
            )));
        }
    })
}

/// `--override-freeze` is for admins (SPEC §9): anyone else is refused,
/// frozen or not, so the flag never works by luck.
fn override_allowed(call: &super::AuditedCall) -> Result<(), ApiError> {
    if call.caller.role == crate::auth::Role::Admin {
        Ok(())
    } else {
        Err(ApiError::PermissionDenied(format!(
            "--override-freeze needs the admin role; {} is {}",
            call.user(),
            call.caller.role.as_str()
        )))
    }
}

type WatchStream = ServerStream<pb::Deployment>;

#[tonic::async_trait]
impl pb::deployments_server::Deployments for DeploymentsService {
    async fn create_deployment(
        &self,
        request: Request<pb::CreateDeploymentRequest>,
    ) -> Result<Response<pb::CreateDeploymentResponse>, Status> {
        let r = request.get_ref();
        // The audit record shows a deliberate downgrade (SPEC §6).
        let downgrade = if r.options.as_ref().is_some_and(|o| o.allow_downgrade) {
            " --allow-downgrade"
        } else {
            ""
        };
        let target = format!(
            "{}@{} env={}{downgrade}{}",
            r.module,
            r.version,
            r.environment,
            if r.dry_run { " (dry run)" } else { "" }
        );
        let mut call = self
            .ctx
            .begin(&request, Permission::Deploy, "deploy.create", target)
            .await?;
        // The audit record says which freeze an override went through.
        let mut overridden = String::new();
        let result = async {
            let create = create_request(request.into_inner())?;
            if create.override_freeze {
                override_allowed(&call)?;
                if let Some(frozen) = self.engine.frozen(&create.environment).await? {
                    overridden = format!(" --override-freeze ({})", frozen.by_whom());
                }
            }
            Ok(self.engine.create(create, call.user()).await?)
        }
        .await;
        if let Ok((Some(record), _)) = &result {
            let t = format!(
                "{} {}@{} env={}{downgrade}{overridden}",
                record.id,
                record.deployment.spec.module,
                record.deployment.spec.version,
                record.environment
            );
            call.set_target(t);
        }
        let (record, plan) = call.finish(&self.ctx, result).await?;
        Ok(Response::new(pb::CreateDeploymentResponse {
            deployment: record.as_deref().map(deployment_to_pb),
            plan: Some(plan_to_pb(&plan)),
        }))
    }

    async fn list_deployments(
        &self,
        request: Request<pb::ListDeploymentsRequest>,
    ) -> Result<Response<pb::ListDeploymentsResponse>, Status> {
        self.ctx.reader(&request)?;
        let filter = request.into_inner();
        let deployments = self
            .engine
            .list()
            .await
            .iter()
            .filter(|r| filter.module.is_empty() || r.deployment.spec.module == filter.module)
            .filter(|r| filter.environment.is_empty() || r.environment == filter.environment)
            .filter(|r| !filter.active_only || !r.deployment.state.is_terminal())
            .map(|r| deployment_to_pb(r))
            .collect();
        Ok(Response::new(pb::ListDeploymentsResponse { deployments }))
    }

    async fn get_deployment(
        &self,
        request: Request<pb::GetDeploymentRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        self.ctx.reader(&request)?;
        Ok(Response::new(deployment_to_pb(
            &*self.engine.get(&request.into_inner().id).await?,
        )))
    }

    type WatchDeploymentStream = WatchStream;

    async fn watch_deployment(
        &self,
        request: Request<pb::GetDeploymentRequest>,
    ) -> Result<Response<Self::WatchDeploymentStream>, Status> {
        self.ctx.reader(&request)?;
        let id = request.into_inner().id;
        // Subscribe first, then read, so no change is missed in between.
        let mut updates = self.engine.subscribe();
        let current = self.engine.get(&id).await?;
        let engine = self.engine.clone();
        Ok(spawn_stream(&self.ctx.shutdown, 64, |sink| async move {
            let mut last = current;
            if !sink.send(deployment_to_pb(&last)).await || last.deployment.state.is_terminal() {
                return;
            }
            // Also re-send every few seconds, so `waiting_for` countdowns stay fresh.
            let mut refresh = tokio::time::interval(Duration::from_secs(2));
            loop {
                // `Ok(None)`: nothing to send this time (another deployment
                // changed); `Err`: the deployment or the engine's channel
                // is gone.
                let next = sink.next(async {
                    tokio::select! {
                        _ = refresh.tick() => engine.get(&id).await.map(Some).map_err(drop),
                        update = updates.recv() => match update {
                            Ok(r) if r.id == id => Ok(Some(r)),
                            Ok(_) => Ok(None),
                            Err(broadcast::error::RecvError::Lagged(_)) => {
                                engine.get(&id).await.map(Some).map_err(drop)
                            }
                            Err(broadcast::error::RecvError::Closed) => Err(()),
                        },
                    }
                });
                last = match next.await {
                    Some(Ok(Some(r))) => r,
                    Some(Ok(None)) => continue,
                    // Shut down, the client gone, the deployment gone or the
                    // engine's channel closed: the stream ends.
                    None | Some(Err(_)) => return,
                };
                if !sink.send(deployment_to_pb(&last)).await || last.deployment.state.is_terminal()
                {
                    return;
                }
            }
        }))
    }

    async fn control_deployment(
        &self,
        request: Request<pb::ControlDeploymentRequest>,
    ) -> Result<Response<pb::Deployment>, Status> {
        let r = request.get_ref();
        let action = match r.action.as_str() {
            "pause" => "deploy.pause",
            "resume" => "deploy.resume",
            "promote" => "deploy.promote",
            "abort" => "deploy.abort",
            "rollback" => "deploy.rollback",
            "approve" => "deploy.approve",
            "reject" => "deploy.reject",
            _ => "deploy.control",
        };
        let permission = match r.action.as_str() {
            "approve" | "reject" => Permission::Approve,
            _ => match self.engine.get(&r.id).await {
                Ok(record) if self.engine.is_protected(&record.environment) => {
                    Permission::ControlProtected
                }
                _ => Permission::Control,
            },
        };
        let target = r.id.clone();
        let call = self.ctx.begin(&request, permission, action, target).await?;
        let request = request.into_inner();
        let result = async {
            let control = control_of(&request.action, request.reason, call.user())?;
            Ok(self.engine.control(&request.id, control).await?)
        }
        .await;
        let record = call.finish(&self.ctx, result).await?;
        tracing::info!(deployment = %request.id, action = %request.action, state = record.deployment.state.as_str(), "deployment control");
        Ok(Response::new(deployment_to_pb(&record)))
    }
}

pub struct PipelinesService {
    ctx: Arc<Context>,
    engine: Arc<Engine>,
}

impl PipelinesService {
    pub fn new(ctx: Arc<Context>, engine: Arc<Engine>) -> Self {
        Self { ctx, engine }
    }
}

fn pipeline_to_pb(p: &crate::deploy::engine::PipelineRecord) -> pb::Pipeline {
    pb::Pipeline {
        id: p.id.clone(),
        module: p.module.clone(),
        version: p.version.clone(),
        state: p.state.as_str().to_string(),
        stages: p
            .stages
            .iter()
            .map(|s| pb::PipelineStage {
                environment: s.environment.clone(),
                deployment_id: s.deployment_id.clone(),
                state: s.state.as_str().to_string(),
                reason: s.reason.clone(),
            })
            .collect(),
        reason: p.reason.clone(),
        created_by: p.created_by.clone(),
        created_at: Some(ts_from_ms(p.created_ms)),
        finished_at: p.finished_ms.map(ts_from_ms),
        target: p.target().to_string(),
    }
}

#[tonic::async_trait]
impl pb::pipelines_server::Pipelines for PipelinesService {
    async fn run_pipeline(
        &self,
        request: Request<pb::RunPipelineRequest>,
    ) -> Result<Response<pb::Pipeline>, Status> {
        let r = request.get_ref();
        let target = format!(
            "{}@{} to={}{}",
            r.module,
            r.version,
            r.to,
            if r.allow_downgrade {
                " --allow-downgrade"
            } else {
                ""
            }
        );
        let mut call = self
            .ctx
            .begin(&request, Permission::Deploy, "pipeline.run", target)
            .await?;
        let request = request.into_inner();
        let mut overridden = String::new();
        let result = async {
            if request.module.is_empty() || request.version.is_empty() {
                return Err(ApiError::InvalidArgument(
                    "give the module as NAME@VERSION".into(),
                ));
            }
            if request.override_freeze {
                override_allowed(&call)?;
                overridden = " --override-freeze".to_string();
            }
            let to = (!request.to.is_empty()).then_some(request.to.as_str());
            Ok(self
                .engine
                .run_pipeline(
                    &request.module,
                    &request.version,
                    to,
                    request.allow_downgrade,
                    request.override_freeze,
                    call.user(),
                )
                .await?)
        }
        .await;
        if let Ok(pipeline) = &result
            && !overridden.is_empty()
        {
            call.set_target(format!(
                "{} {}@{} to={}{overridden}",
                pipeline.id, pipeline.module, pipeline.version, request.to
            ));
        }
        Ok(Response::new(pipeline_to_pb(
            &call.finish(&self.ctx, result).await?,
        )))
    }

    async fn get_pipeline(
        &self,
        request: Request<pb::GetPipelineRequest>,
    ) -> Result<Response<pb::Pipeline>, Status> {
        self.ctx.reader(&request)?;
        Ok(Response::new(pipeline_to_pb(
            &self.engine.get_pipeline(&request.into_inner().id).await?,
        )))
    }

    async fn list_pipelines(
        &self,
        request: Request<pb::ListPipelinesRequest>,
    ) -> Result<Response<pb::ListPipelinesResponse>, Status> {
        self.ctx.reader(&request)?;
        let filter = request.into_inner();
        let pipelines = self
            .engine
            .list_pipelines()
            .await
            .iter()
            .filter(|p| filter.module.is_empty() || p.module == filter.module)
            .filter(|p| !filter.active_only || p.state == PipelineState::Running)
            .map(pipeline_to_pb)
            .collect();
        Ok(Response::new(pb::ListPipelinesResponse { pipelines }))
    }

    async fn abort_pipeline(
        &self,
        request: Request<pb::AbortPipelineRequest>,
    ) -> Result<Response<pb::Pipeline>, Status> {
        let id = request.get_ref().id.clone();
        // The same permission as aborting the running stage's deployment.
        let permission = match self.engine.pipeline_environment(&id).await {
            Some(env) if self.engine.is_protected(&env) => Permission::ControlProtected,
            _ => Permission::Control,
        };
        let call = self
            .ctx
            .begin(&request, permission, "pipeline.abort", id.clone())
            .await?;
        let reason = request.into_inner().reason;
        let reason = if reason.trim().is_empty() {
            format!("by {}", call.user())
        } else {
            reason.trim().to_string()
        };
        let result = async {
            if id.is_empty() {
                return Err(ApiError::InvalidArgument("give the pipeline id".into()));
            }
            Ok(self.engine.abort_pipeline(&id, &reason).await?)
        }
        .await;
        let pipeline = call.finish(&self.ctx, result).await?;
        tracing::info!(pipeline = %id, "pipeline aborted");
        Ok(Response::new(pipeline_to_pb(&pipeline)))
    }
}
