//! `Fleet`: join tokens and the node registry, for operators.

use std::sync::Arc;
use std::time::Duration;

use hotswap_common::labels::{Labels, validate_labels};
use hotswap_common::pb;
use hotswap_common::timefmt::{now_ms, ts_from_ms};
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

use super::Context;
use super::convert::node_to_pb;
use super::enrollment::token_hash;
use super::stream::{ServerStream, spawn_stream};
use crate::auth::Permission;
use crate::error::ApiError;
use crate::registry::NodeChange;
use crate::store::{DesiredModuleRecord, HistoryOrigin, TokenRecord};

/// Most uses one join token may carry.
const MAX_TOKEN_USES: u32 = 100_000;

pub struct FleetService {
    ctx: Arc<Context>,
}

impl FleetService {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }

    async fn create_token(
        &self,
        user: &str,
        request: pb::CreateTokenRequest,
    ) -> Result<pb::Token, ApiError> {
        let settings = &self.ctx.settings;
        let ttl = match request.ttl_seconds {
            0 => settings.token_default_ttl,
            secs => Duration::from_secs(secs),
        };
        if ttl > settings.token_max_ttl {
            return Err(ApiError::InvalidArgument(format!(
                "--ttl {} exceeds the maximum of {} (token_max_ttl)",
                humantime_secs(ttl),
                humantime_secs(settings.token_max_ttl)
            )));
        }
        let uses = if request.uses == 0 { 1 } else { request.uses };
        if uses > MAX_TOKEN_USES {
            return Err(ApiError::InvalidArgument(format!(
                "token uses {uses} exceeds the maximum of {MAX_TOKEN_USES}"
            )));
        }
        let labels: Labels = request.labels.into_iter().collect();
        validate_labels(&labels).map_err(|e| ApiError::InvalidArgument(e.to_string()))?;

        let secret: [u8; 32] = rand::random();
        let token = format!("hsj_{}", hex::encode(secret));
        let now = now_ms();
        let record = TokenRecord {
            created_at_ms: now,
            expires_at_ms: now.saturating_add(ttl.as_millis() as u64),
            uses_total: uses,
            uses_left: uses,
            labels: labels.clone(),
            created_by: user.to_string(),
        };
        self.ctx
            .store()
            .insert_token(&token_hash(&token), &record)
            .await?;
        tracing::info!(user = %user, uses, ttl_secs = ttl.as_secs(), "join token created");
        Ok(pb::Token {
            token,
            ca_fingerprint: self.ctx.ca_fingerprint.clone(),
            expires_at: Some(ts_from_ms(record.expires_at_ms)),
            uses,
            labels: labels.into_iter().collect(),
        })
    }
}

fn humantime_secs(d: Duration) -> String {
    hotswap_common::timefmt::human_age(d.as_millis() as u64)
}

type WatchStream = ServerStream<pb::NodeUpdate>;

impl FleetService {
    async fn set_node_module_inner(
        &self,
        request: pb::SetNodeModuleRequest,
        user: &str,
    ) -> Result<pb::Node, ApiError> {
        let node = self.ctx.registry.find(&request.node)?;
        if request.version.is_empty() && request.staged_version.is_empty() {
            return Err(ApiError::InvalidArgument(
                "give a version to run, a version to stage, or both".into(),
            ));
        }
        for version in [&request.version, &request.staged_version] {
            if version.is_empty() {
                continue;
            }
            semver::Version::parse(version).map_err(|e| {
                ApiError::InvalidArgument(format!("version {version:?} is not semver: {e}"))
            })?;
            let artifact = self
                .ctx
                .store()
                .get_artifact(&request.module, version)?
                .ok_or_else(|| {
                    ApiError::NotFound(format!(
                        "artifact {}@{version} not found; push it with `hotswapctl module push` first",
                        request.module
                    ))
                })?;
            crate::trust::ensure_deployable(&**self.ctx.store(), &artifact, 1, now_ms())?;
        }
        let desired = DesiredModuleRecord {
            version: request.version.clone(),
            staged_version: request.staged_version.clone(),
            // Not part of a deployment: no trace to continue.
            traceparent: String::new(),
        };
        let state = self
            .ctx
            .registry
            .set_desired_module(
                &node.record.id,
                &request.module,
                Some(desired),
                &HistoryOrigin::new(crate::clock::steady_now_ms(), "", user),
            )
            .await?;
        tracing::info!(node = %node.record.name, module = %request.module, version = %request.version, staged = %request.staged_version, generation = state.desired.generation, "desired module set");
        Ok(node_to_pb(&state))
    }

    async fn unset_node_module_inner(
        &self,
        request: pb::UnsetNodeModuleRequest,
        user: &str,
    ) -> Result<pb::Node, ApiError> {
        let node = self.ctx.registry.find(&request.node)?;
        if !node.desired.modules.contains_key(&request.module) {
            return Err(ApiError::NotFound(format!(
                "module {:?} is not desired on node {}",
                request.module, node.record.name
            )));
        }
        let state = self
            .ctx
            .registry
            .set_desired_module(
                &node.record.id,
                &request.module,
                None,
                &HistoryOrigin::new(crate::clock::steady_now_ms(), "", user),
            )
            .await?;
        tracing::info!(node = %node.record.name, module = %request.module, "desired module removed");
        Ok(node_to_pb(&state))
    }
}

#[tonic::async_trait]
impl pb::fleet_server::Fleet for FleetService {
    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::Token>, Status> {
        let call = self
            .ctx
            .begin(&request, Permission::Admin, "tokens.create", "")
            .await?;
        let result = self.create_token(call.user(), request.into_inner()).await;
        Ok(Response::new(call.finish(&self.ctx, result).await?))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.ctx.reader(&request)?;
        let environment = request.into_inner().environment;
        let environment = (!environment.is_empty()).then_some(environment);
        let nodes = self.ctx.registry.list(environment.as_deref())?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: nodes.iter().map(node_to_pb).collect(),
        }))
    }

    async fn get_node(
        &self,
        request: Request<pb::GetNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.ctx.reader(&request)?;
        let state = self.ctx.registry.find(&request.into_inner().node)?;
        Ok(Response::new(node_to_pb(&state)))
    }

    type WatchNodesStream = WatchStream;

    async fn watch_nodes(
        &self,
        request: Request<pb::WatchNodesRequest>,
    ) -> Result<Response<Self::WatchNodesStream>, Status> {
        self.ctx.reader(&request)?;
        // Subscribe before the snapshot so no change falls between the two.
        let mut changes = self.ctx.registry.subscribe();
        let registry = self.ctx.registry.clone();
        Ok(spawn_stream(&self.ctx.shutdown, 256, |sink| async move {
            'resync: loop {
                let snapshot = match registry.list(None) {
                    Ok(nodes) => nodes,
                    Err(e) => return sink.fail(e).await,
                };
                for node in &snapshot {
                    let update = pb::NodeUpdate {
                        node: Some(node_to_pb(node)),
                        snapshot: true,
                        removed: false,
                    };
                    if !sink.send(update).await {
                        return;
                    }
                }
                loop {
                    let Some(change) = sink.next(changes.recv()).await else {
                        return;
                    };
                    let update = match change {
                        Ok(NodeChange::Changed(state)) => pb::NodeUpdate {
                            node: Some(node_to_pb(&state)),
                            snapshot: false,
                            removed: false,
                        },
                        Ok(NodeChange::Removed(state)) => pb::NodeUpdate {
                            node: Some(node_to_pb(&state)),
                            snapshot: false,
                            removed: true,
                        },
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            tracing::debug!(
                                missed,
                                "node watcher fell behind; sending a fresh snapshot"
                            );
                            continue 'resync;
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    if !sink.send(update).await {
                        return;
                    }
                }
            }
        }))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let node = request.get_ref().node.clone();
        let call = self
            .ctx
            .begin(&request, Permission::Admin, "nodes.remove", &node)
            .await?;
        let result = self
            .ctx
            .registry
            .remove(&node, call.user())
            .await
            .map(|state| {
                tracing::info!(node = %state.record.id, name = %state.record.name, "node removed");
                node_to_pb(&state)
            })
            .map_err(ApiError::from);
        Ok(Response::new(call.finish(&self.ctx, result).await?))
    }

    async fn set_node_module(
        &self,
        request: Request<pb::SetNodeModuleRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let r = request.get_ref();
        let target = format!("{}:{}@{}", r.node, r.module, r.version);
        let call = self
            .ctx
            .begin(&request, Permission::Admin, "nodes.set_module", target)
            .await?;
        let result = self
            .set_node_module_inner(request.into_inner(), call.user())
            .await;
        Ok(Response::new(call.finish(&self.ctx, result).await?))
    }

    async fn unset_node_module(
        &self,
        request: Request<pb::UnsetNodeModuleRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let r = request.get_ref();
        let target = format!("{}:{}", r.node, r.module);
        let call = self
            .ctx
            .begin(&request, Permission::Admin, "nodes.unset_module", target)
            .await?;
        let result = self
            .unset_node_module_inner(request.into_inner(), call.user())
            .await;
        Ok(Response::new(call.finish(&self.ctx, result).await?))
    }
}
