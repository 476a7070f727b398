//! The resources of SPEC §8. Each handler is one in-process gRPC call (see
//! the module above) and the SPEC §4 view of its answer; streams are in
//! [`super::stream`].

use axum::Json;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use hotswap_common::model::{
    AuditRecordView, ClusterView, DeploymentRequest, DeploymentView, EventView, HistoryChangeView,
    HistoryNodeView, ModuleVersionView, ModuleView, NodeUpdateView, NodeView, PipelineView,
    PlanView, ServerView, UserView,
};
use hotswap_common::pb;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::body::{self, JsonBody, QueryParams, require_content_type};
use super::error::{ErrorBody, HttpError};
use super::stream::{self, LastEventId};
use super::{ApiState, Call, clients};

type Result<T> = std::result::Result<T, HttpError>;

pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_nodes))
        .routes(routes!(get_node, remove_node))
        .routes(routes!(list_modules, push_module))
        .routes(routes!(get_module))
        .routes(routes!(list_deployments, create_deployment))
        .routes(routes!(get_deployment))
        .routes(routes!(control_deployment))
        .routes(routes!(list_pipelines, run_pipeline))
        .routes(routes!(get_pipeline))
        .routes(routes!(abort_pipeline))
        .routes(routes!(history_state))
        .routes(routes!(history_diff))
        .routes(routes!(list_clusters))
        .routes(routes!(get_cluster))
        .routes(routes!(list_events))
        .routes(routes!(list_audit))
        .routes(routes!(list_users))
        .routes(routes!(list_servers))
        .routes(routes!(openapi_document))
        .merge(super::freezes::routes())
}

/// A view of each message of a list.
fn views<M, V>(messages: Vec<M>) -> Result<Vec<V>>
where
    V: TryFrom<M>,
    HttpError: From<V::Error>,
{
    messages
        .into_iter()
        .map(|m| V::try_from(m).map_err(HttpError::from))
        .collect()
}

/// Unset query parameters are the gRPC request's empty values.
fn or_empty(value: Option<String>) -> String {
    value.unwrap_or_default()
}

// ---------------------------------------------------------------- nodes

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct NodesQuery {
    /// Only nodes whose `environment` label is this.
    environment: Option<String>,
    /// Follow the fleet as Server-Sent Events: a snapshot of every node,
    /// then each change (`kind`: `snapshot`, `changed`, `removed`).
    #[serde(default)]
    watch: bool,
}

/// The fleet.
#[utoipa::path(get, path = "/nodes", tag = "nodes", params(NodesQuery),
    responses(
        (status = 200, description = "The nodes; with `watch=true`, a stream of node updates",
            content((Vec<NodeView> = "application/json"), (NodeUpdateView = "text/event-stream"))),
        (status = 401, description = "No or unknown client certificate", body = ErrorBody),
        (status = 403, description = "The role does not allow it", body = ErrorBody),
    ))]
async fn list_nodes(
    State(state): State<ApiState>,
    call: Call,
    last_event_id: LastEventId,
    QueryParams(query): QueryParams<NodesQuery>,
) -> Result<Response> {
    if query.watch {
        let updates = clients::fleet(&state)
            .watch_nodes(call.request(pb::WatchNodesRequest {}))
            .await?
            .into_inner();
        return Ok(stream::numbered(
            updates,
            last_event_id,
            NodeUpdateView::try_from,
        ));
    }
    let reply = clients::fleet(&state)
        .list_nodes(call.request(pb::ListNodesRequest {
            environment: or_empty(query.environment),
        }))
        .await?
        .into_inner();
    Ok(Json(views::<_, NodeView>(reply.nodes)?).into_response())
}

/// One node, by id or name.
#[utoipa::path(get, path = "/nodes/{node}", tag = "nodes",
    params(("node" = String, Path, description = "Node id or name")),
    responses(
        (status = 200, description = "The node", body = NodeView),
        (status = 404, description = "No such node", body = ErrorBody),
    ))]
async fn get_node(
    State(state): State<ApiState>,
    call: Call,
    Path(node): Path<String>,
) -> Result<Json<NodeView>> {
    let node = clients::fleet(&state)
        .get_node(call.request(pb::GetNodeRequest { node }))
        .await?
        .into_inner();
    Ok(Json(NodeView::try_from(node)?))
}

/// Remove a node and revoke its certificate (`nodes remove`).
#[utoipa::path(delete, path = "/nodes/{node}", tag = "nodes",
    params(("node" = String, Path, description = "Node id or name")),
    responses(
        (status = 200, description = "The node as it was removed", body = NodeView),
        (status = 403, description = "The role does not allow it", body = ErrorBody),
        (status = 404, description = "No such node", body = ErrorBody),
    ))]
async fn remove_node(
    State(state): State<ApiState>,
    call: Call,
    Path(node): Path<String>,
) -> Result<Json<NodeView>> {
    let node = clients::fleet(&state)
        .remove_node(call.request(pb::RemoveNodeRequest { node }))
        .await?
        .into_inner();
    Ok(Json(NodeView::try_from(node)?))
}

// ---------------------------------------------------------------- modules

/// Every module and its stored versions.
#[utoipa::path(get, path = "/modules", tag = "modules",
    responses((status = 200, description = "The modules", body = Vec<ModuleView>)))]
async fn list_modules(State(state): State<ApiState>, call: Call) -> Result<Json<Vec<ModuleView>>> {
    let reply = clients::artifacts(&state)
        .list_modules(call.request(pb::ListModulesRequest {}))
        .await?
        .into_inner();
    Ok(Json(views(reply.modules)?))
}

/// One module's versions, newest first.
#[utoipa::path(get, path = "/modules/{name}", tag = "modules",
    params(("name" = String, Path, description = "Module name")),
    responses(
        (status = 200, description = "The module", body = ModuleView),
        (status = 404, description = "No such module", body = ErrorBody),
    ))]
async fn get_module(
    State(state): State<ApiState>,
    call: Call,
    Path(name): Path<String>,
) -> Result<Json<ModuleView>> {
    let module = clients::artifacts(&state)
        .get_module(call.request(pb::GetModuleRequest { name }))
        .await?
        .into_inner();
    Ok(Json(ModuleView::try_from(module)?))
}

/// Upload a signed `.hsm` artifact (`module push`). It streams to the
/// control plane's staging area as it arrives, bounded by
/// `max_artifact_bytes`, and is verified against the trusted publisher
/// keys before anything is stored.
#[utoipa::path(post, path = "/modules", tag = "modules",
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "The .hsm file"),
    responses(
        (status = 201, description = "Stored", body = ModuleVersionView),
        (status = 200, description = "The same artifact was stored already (new signatures merged)", body = ModuleVersionView),
        (status = 400, description = "Not a valid artifact, no trusted signature, or larger than the upload limit", body = ErrorBody),
        (status = 415, description = "Not application/octet-stream", body = ErrorBody),
    ))]
async fn push_module(
    State(state): State<ApiState>,
    call: Call,
    headers: HeaderMap,
    request: Request,
) -> Result<Response> {
    if let Err(refused) = require_content_type(&headers, "application/octet-stream") {
        return Err(body::refuse_after_reading(request, refused).await);
    }
    let (chunks, drained) = stream::upload_chunks(request.into_body());
    let pushed = clients::artifacts(&state)
        .push_artifact(call.request(chunks))
        .await;
    if pushed.is_err() {
        // Refused before the end of the body: read the rest first.
        let _ = tokio::time::timeout(stream::DRAIN_WAIT, drained).await;
    }
    let version = pushed?.into_inner();
    let status = if version.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(ModuleVersionView::try_from(version)?)).into_response())
}

// ---------------------------------------------------------------- deployments

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeploymentsQuery {
    module: Option<String>,
    environment: Option<String>,
    /// Only deployments that have not ended.
    #[serde(default)]
    active: bool,
}

/// Deployments, newest first.
#[utoipa::path(get, path = "/deployments", tag = "deployments", params(DeploymentsQuery),
    responses((status = 200, description = "The deployments", body = Vec<DeploymentView>)))]
async fn list_deployments(
    State(state): State<ApiState>,
    call: Call,
    QueryParams(query): QueryParams<DeploymentsQuery>,
) -> Result<Json<Vec<DeploymentView>>> {
    let reply = clients::deployments(&state)
        .list_deployments(call.request(pb::ListDeploymentsRequest {
            module: or_empty(query.module),
            environment: or_empty(query.environment),
            active_only: query.active,
        }))
        .await?
        .into_inner();
    Ok(Json(views(reply.deployments)?))
}

/// Start a deployment (`deploy create`), or with `dry_run` answer its plan.
#[utoipa::path(post, path = "/deployments", tag = "deployments",
    request_body = DeploymentRequest,
    responses(
        (status = 201, description = "Started", body = DeploymentView),
        (status = 200, description = "The plan of a dry run; nothing was created", body = PlanView),
        (status = 400, description = "Bad input; the message names the field", body = ErrorBody),
        (status = 403, description = "The role does not allow it", body = ErrorBody),
        (status = 404, description = "No such module version", body = ErrorBody),
        (status = 409, description = "Another deployment of the module to the environment is still active", body = ErrorBody),
        (status = 412, description = "Not deployable now: no nodes, a yanked version, a frozen environment", body = ErrorBody),
        (status = 429, description = "Rate limited", body = ErrorBody),
    ))]
async fn create_deployment(
    State(state): State<ApiState>,
    call: Call,
    JsonBody(body): JsonBody<DeploymentRequest>,
) -> Result<Response> {
    let dry_run = body.dry_run;
    let reply = clients::deployments(&state)
        .create_deployment(call.request(pb::CreateDeploymentRequest::from(body)))
        .await?
        .into_inner();
    if dry_run {
        let plan = PlanView::from(reply.plan.unwrap_or_default());
        return Ok(Json(plan).into_response());
    }
    let deployment = reply
        .deployment
        .ok_or_else(|| HttpError::unexpected_reply("no deployment in the reply"))?;
    Ok((
        StatusCode::CREATED,
        Json(DeploymentView::try_from(deployment)?),
    )
        .into_response())
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct DeploymentQuery {
    /// Follow the deployment as Server-Sent Events: it now, then again on
    /// every change, until it ends.
    #[serde(default)]
    watch: bool,
}

/// One deployment.
#[utoipa::path(get, path = "/deployments/{id}", tag = "deployments",
    params(("id" = String, Path, description = "Deployment id"), DeploymentQuery),
    responses(
        (status = 200, description = "The deployment; with `watch=true`, a stream of it",
            content((DeploymentView = "application/json"), (DeploymentView = "text/event-stream"))),
        (status = 404, description = "No such deployment", body = ErrorBody),
    ))]
async fn get_deployment(
    State(state): State<ApiState>,
    call: Call,
    last_event_id: LastEventId,
    Path(id): Path<String>,
    QueryParams(query): QueryParams<DeploymentQuery>,
) -> Result<Response> {
    let mut client = clients::deployments(&state);
    if query.watch {
        let updates = client
            .watch_deployment(call.request(pb::GetDeploymentRequest { id }))
            .await?
            .into_inner();
        return Ok(stream::numbered(
            updates,
            last_event_id,
            DeploymentView::try_from,
        ));
    }
    let deployment = client
        .get_deployment(call.request(pb::GetDeploymentRequest { id }))
        .await?
        .into_inner();
    Ok(Json(DeploymentView::try_from(deployment)?).into_response())
}

/// What to control.
#[derive(Clone, Copy, Debug, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Pause,
    Resume,
    Promote,
    Abort,
    Rollback,
    Approve,
    Reject,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Promote => "promote",
            Action::Abort => "abort",
            Action::Rollback => "rollback",
            Action::Approve => "approve",
            Action::Reject => "reject",
        }
    }
}

/// The body of a control action.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    /// Why; recorded in the deployment and the audit log.
    #[serde(default)]
    reason: Option<String>,
}

/// Pause, resume, promote, abort, roll back, approve or reject a
/// deployment (`deploy pause|...|reject`).
#[utoipa::path(post, path = "/deployments/{id}/{action}", tag = "deployments",
    params(
        ("id" = String, Path, description = "Deployment id"),
        ("action" = Action, Path, description = "What to do"),
    ),
    request_body(content = ControlRequest, description = "Optional; an empty body has no reason"),
    responses(
        (status = 200, description = "The deployment after the action", body = DeploymentView),
        (status = 400, description = "No such action", body = ErrorBody),
        (status = 403, description = "The role does not allow it", body = ErrorBody),
        (status = 404, description = "No such deployment", body = ErrorBody),
        (status = 412, description = "Not possible in the deployment's state", body = ErrorBody),
    ))]
async fn control_deployment(
    State(state): State<ApiState>,
    call: Call,
    Path((id, action)): Path<(String, String)>,
    JsonBody(body): JsonBody<ControlRequest>,
) -> Result<Json<DeploymentView>> {
    let action: Action = serde_json::from_value(serde_json::Value::String(action.clone()))
        .map_err(|_| {
            HttpError::bad_request(format!(
                "action {action:?}: not one of pause, resume, promote, abort, rollback, approve, reject"
            ))
        })?;
    let deployment = clients::deployments(&state)
        .control_deployment(call.request(pb::ControlDeploymentRequest {
            id,
            action: action.as_str().to_string(),
            reason: or_empty(body.reason),
        }))
        .await?
        .into_inner();
    Ok(Json(DeploymentView::try_from(deployment)?))
}

// ---------------------------------------------------------------- pipelines

/// A version to promote through the environments (`pipeline run`).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PipelineRequest {
    module: String,
    version: String,
    /// The last environment to promote to; unset: all.
    #[serde(default)]
    to: Option<String>,
    /// Let stages deploy a version older than their environment's current one.
    #[serde(default)]
    allow_downgrade: bool,
    /// Start in frozen environments (admins only; audited).
    #[serde(default)]
    override_freeze: bool,
}

/// Start a pipeline.
#[utoipa::path(post, path = "/pipelines", tag = "pipelines",
    request_body = PipelineRequest,
    responses(
        (status = 201, description = "Started", body = PipelineView),
        (status = 400, description = "Bad input; the message names the field", body = ErrorBody),
        (status = 403, description = "The role does not allow it", body = ErrorBody),
        (status = 404, description = "No such module version", body = ErrorBody),
        (status = 412, description = "Not deployable", body = ErrorBody),
    ))]
async fn run_pipeline(
    State(state): State<ApiState>,
    call: Call,
    JsonBody(body): JsonBody<PipelineRequest>,
) -> Result<Response> {
    let pipeline = clients::pipelines(&state)
        .run_pipeline(call.request(pb::RunPipelineRequest {
            module: body.module,
            version: body.version,
            to: or_empty(body.to),
            allow_downgrade: body.allow_downgrade,
            override_freeze: body.override_freeze,
        }))
        .await?
        .into_inner();
    Ok((StatusCode::CREATED, Json(PipelineView::try_from(pipeline)?)).into_response())
}

/// One pipeline.
#[utoipa::path(get, path = "/pipelines/{id}", tag = "pipelines",
    params(("id" = String, Path, description = "Pipeline id")),
    responses(
        (status = 200, description = "The pipeline", body = PipelineView),
        (status = 404, description = "No such pipeline", body = ErrorBody),
    ))]
async fn get_pipeline(
    State(state): State<ApiState>,
    call: Call,
    Path(id): Path<String>,
) -> Result<Json<PipelineView>> {
    let pipeline = clients::pipelines(&state)
        .get_pipeline(call.request(pb::GetPipelineRequest { id }))
        .await?
        .into_inner();
    Ok(Json(PipelineView::try_from(pipeline)?))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct PipelinesQuery {
    module: Option<String>,
    /// Only pipelines that have not ended.
    #[serde(default)]
    active: bool,
}

/// Pipelines, newest first (`pipeline list`).
#[utoipa::path(get, path = "/pipelines", tag = "pipelines", params(PipelinesQuery),
    responses((status = 200, description = "The pipelines", body = Vec<PipelineView>)))]
async fn list_pipelines(
    State(state): State<ApiState>,
    call: Call,
    QueryParams(query): QueryParams<PipelinesQuery>,
) -> Result<Json<Vec<PipelineView>>> {
    let reply = clients::pipelines(&state)
        .list_pipelines(call.request(pb::ListPipelinesRequest {
            module: or_empty(query.module),
            active_only: query.active,
        }))
        .await?
        .into_inner();
    Ok(Json(views(reply.pipelines)?))
}

/// Abort a pipeline (`pipeline abort`): its running stage's deployment is
/// aborted and no later stage starts.
#[utoipa::path(post, path = "/pipelines/{id}/abort", tag = "pipelines",
    params(("id" = String, Path, description = "Pipeline id")),
    request_body(content = ControlRequest, description = "Optional; an empty body has no reason"),
    responses(
        (status = 200, description = "The pipeline, aborted", body = PipelineView),
        (status = 403, description = "The role does not allow it", body = ErrorBody),
        (status = 404, description = "No such pipeline", body = ErrorBody),
        (status = 412, description = "The pipeline has ended", body = ErrorBody),
    ))]
async fn abort_pipeline(
    State(state): State<ApiState>,
    call: Call,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ControlRequest>,
) -> Result<Json<PipelineView>> {
    let pipeline = clients::pipelines(&state)
        .abort_pipeline(call.request(pb::AbortPipelineRequest {
            id,
            reason: or_empty(body.reason),
        }))
        .await?
        .into_inner();
    Ok(Json(PipelineView::try_from(pipeline)?))
}

// ---------------------------------------------------------------- history

/// A point of the history from a query parameter: an RFC 3339 time or a
/// seq (digits).
fn history_point(name: &str, text: &str) -> Result<pb::HistoryPoint> {
    let point = if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        let seq = text
            .parse()
            .map_err(|_| HttpError::bad_request(format!("{name}: seq {text} is too large")))?;
        pb::history_point::Point::Seq(seq)
    } else {
        let ms = hotswap_common::timefmt::parse_rfc3339(text)
            .map_err(|e| HttpError::bad_request(format!("{name}: {e}")))?;
        pb::history_point::Point::Time(hotswap_common::timefmt::ts_from_ms(ms))
    };
    Ok(pb::HistoryPoint { point: Some(point) })
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    environment: String,
    /// An RFC 3339 time; unset (and no `seq`): now.
    at: Option<String>,
    /// A seq (desired-state revision), instead of `at`.
    seq: Option<u64>,
}

/// Every node's desired module versions in an environment as they were at
/// a time or seq (`history --env E --at T|--seq N`).
#[utoipa::path(get, path = "/history", tag = "history", params(HistoryQuery),
    responses(
        (status = 200, description = "The nodes, by name", body = Vec<HistoryNodeView>),
        (status = 400, description = "A bad time, or both `at` and `seq`", body = ErrorBody),
        (status = 404, description = "No such environment", body = ErrorBody),
        (status = 412, description = "That point is older than the history kept", body = ErrorBody),
    ))]
async fn history_state(
    State(state): State<ApiState>,
    call: Call,
    QueryParams(query): QueryParams<HistoryQuery>,
) -> Result<Json<Vec<HistoryNodeView>>> {
    let at = match (query.at, query.seq) {
        (Some(_), Some(_)) => {
            return Err(HttpError::bad_request("give either at or seq, not both"));
        }
        (Some(at), None) => Some(history_point("at", &at)?),
        (None, Some(seq)) => Some(pb::HistoryPoint {
            point: Some(pb::history_point::Point::Seq(seq)),
        }),
        (None, None) => None,
    };
    let reply = clients::history(&state)
        .get_history_state(call.request(pb::GetHistoryStateRequest {
            environment: query.environment,
            at,
        }))
        .await?
        .into_inner();
    Ok(Json(
        reply.nodes.into_iter().map(HistoryNodeView::from).collect(),
    ))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HistoryDiffQuery {
    /// An RFC 3339 time or a seq.
    from: String,
    /// An RFC 3339 time or a seq; unset: now.
    to: Option<String>,
    environment: Option<String>,
}

/// The desired-version changes after `from` up to `to`, oldest first, each
/// with its deployment and user (`history diff`).
#[utoipa::path(get, path = "/history/diff", tag = "history", params(HistoryDiffQuery),
    responses(
        (status = 200, description = "The changes", body = Vec<HistoryChangeView>),
        (status = 400, description = "A bad point, or `from` after `to`", body = ErrorBody),
        (status = 404, description = "No such environment", body = ErrorBody),
        (status = 412, description = "A point older than the history kept", body = ErrorBody),
    ))]
async fn history_diff(
    State(state): State<ApiState>,
    call: Call,
    QueryParams(query): QueryParams<HistoryDiffQuery>,
) -> Result<Json<Vec<HistoryChangeView>>> {
    let from = Some(history_point("from", &query.from)?);
    let to = query.to.map(|to| history_point("to", &to)).transpose()?;
    let reply = clients::history(&state)
        .diff_history(call.request(pb::DiffHistoryRequest {
            from,
            to,
            environment: or_empty(query.environment),
        }))
        .await?
        .into_inner();
    Ok(Json(
        reply
            .changes
            .into_iter()
            .map(HistoryChangeView::from)
            .collect(),
    ))
}

// ---------------------------------------------------------------- clusters

/// Every environment: nodes, health, versions in use, drift.
#[utoipa::path(get, path = "/clusters", tag = "clusters",
    responses((status = 200, description = "The environments", body = Vec<ClusterView>)))]
async fn list_clusters(
    State(state): State<ApiState>,
    call: Call,
) -> Result<Json<Vec<ClusterView>>> {
    let reply = clients::clusters(&state)
        .list_clusters(call.request(pb::ListClustersRequest {}))
        .await?
        .into_inner();
    Ok(Json(views(reply.clusters)?))
}

/// One environment in detail, with metric averages.
#[utoipa::path(get, path = "/clusters/{env}", tag = "clusters",
    params(("env" = String, Path, description = "Environment")),
    responses(
        (status = 200, description = "The environment", body = ClusterView),
        (status = 404, description = "No such environment", body = ErrorBody),
    ))]
async fn get_cluster(
    State(state): State<ApiState>,
    call: Call,
    Path(environment): Path<String>,
) -> Result<Json<ClusterView>> {
    let cluster = clients::clusters(&state)
        .get_cluster(call.request(pb::GetClusterRequest { environment }))
        .await?
        .into_inner();
    Ok(Json(ClusterView::try_from(cluster)?))
}

// ---------------------------------------------------------------- events

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    /// First sequence number wanted (0: the oldest kept). Without it: the
    /// newest `limit` events.
    since: Option<u64>,
    /// A kind, or a prefix ending in `.` (`deployment.`); several separated
    /// by commas.
    kind: Option<String>,
    deployment: Option<String>,
    node: Option<String>,
    module: Option<String>,
    /// At most this many stored events (default 1000).
    limit: Option<u32>,
    /// Keep following new events, as Server-Sent Events whose `id:` is the
    /// event's sequence number; a client that reconnects with
    /// `Last-Event-ID` resumes after it, missing and repeating nothing.
    #[serde(default)]
    follow: bool,
}

/// The durable event stream.
#[utoipa::path(get, path = "/events", tag = "events",
    params(EventsQuery,
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume a stream after this sequence number (overrides `since`)")),
    responses(
        (status = 200, description = "Events, oldest first; with `follow=true`, a stream of them",
            content((Vec<EventView> = "application/json"), (EventView = "text/event-stream"))),
        (status = 400, description = "A bad parameter, named", body = ErrorBody),
    ))]
async fn list_events(
    State(state): State<ApiState>,
    call: Call,
    last_event_id: LastEventId,
    QueryParams(query): QueryParams<EventsQuery>,
) -> Result<Response> {
    // A resumed stream starts after the last event its client saw.
    let since = match last_event_id.0 {
        Some(seen) => Some(seen.saturating_add(1)),
        None => query.since,
    };
    let request = pb::WatchEventsRequest {
        since: since.unwrap_or(0),
        newest: since.is_none(),
        follow: query.follow,
        kinds: query
            .kind
            .map(|kinds| {
                kinds
                    .split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default(),
        deployment_id: or_empty(query.deployment),
        node: or_empty(query.node),
        module: or_empty(query.module),
        limit: query.limit.unwrap_or(1000),
    };
    let events = clients::events(&state)
        .watch_events(call.request(request))
        .await?
        .into_inner();
    if query.follow {
        return Ok(stream::events(events));
    }
    let events: Vec<EventView> = events
        .map(|event| event.map(EventView::from))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<std::result::Result<_, _>>()?;
    Ok(Json(events).into_response())
}

// ---------------------------------------------------------------- audit, users, servers

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only records with this sequence number or later.
    since: Option<u64>,
    /// At most this many records, the newest (default 100).
    limit: Option<u32>,
    user: Option<String>,
    /// An action (`deploy.create`) or a prefix ending in `.` (`deploy.`).
    action: Option<String>,
    /// ok, denied, rate_limited or error.
    result: Option<String>,
}

/// The tamper-evident audit log, oldest first.
#[utoipa::path(get, path = "/audit", tag = "audit", params(AuditQuery),
    responses(
        (status = 200, description = "The records", body = Vec<AuditRecordView>),
        (status = 403, description = "The role does not allow it", body = ErrorBody),
    ))]
async fn list_audit(
    State(state): State<ApiState>,
    call: Call,
    QueryParams(query): QueryParams<AuditQuery>,
) -> Result<Json<Vec<AuditRecordView>>> {
    let reply = clients::audit(&state)
        .list_audit(call.request(pb::ListAuditRequest {
            since: query.since.unwrap_or(0),
            limit: query.limit.unwrap_or(100),
            user: or_empty(query.user),
            action: or_empty(query.action),
            result: or_empty(query.result),
        }))
        .await?
        .into_inner();
    Ok(Json(
        reply
            .records
            .into_iter()
            .map(AuditRecordView::from)
            .collect(),
    ))
}

/// Operators and their roles.
#[utoipa::path(get, path = "/users", tag = "users",
    responses(
        (status = 200, description = "The users", body = Vec<UserView>),
        (status = 403, description = "The role does not allow it", body = ErrorBody),
    ))]
async fn list_users(State(state): State<ApiState>, call: Call) -> Result<Json<Vec<UserView>>> {
    let reply = clients::users(&state)
        .list_users(call.request(pb::ListUsersRequest {}))
        .await?
        .into_inner();
    Ok(Json(reply.users.into_iter().map(UserView::from).collect()))
}

/// The control-plane replicas.
#[utoipa::path(get, path = "/servers", tag = "servers",
    responses((status = 200, description = "The replicas", body = Vec<ServerView>)))]
async fn list_servers(State(state): State<ApiState>, call: Call) -> Result<Json<Vec<ServerView>>> {
    let reply = clients::servers(&state)
        .list_servers(call.request(pb::ListServersRequest {}))
        .await?
        .into_inner();
    Ok(Json(views(reply.servers)?))
}

/// This document. It needs no client certificate: like gRPC reflection, it
/// tells only what the public API is.
#[utoipa::path(get, path = "/openapi.json", tag = "meta", security(()),
    responses((status = 200, description = "The OpenAPI 3.1 document",
        content_type = "application/json", body = std::collections::BTreeMap<String, serde_json::Value>)))]
async fn openapi_document(State(state): State<ApiState>) -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        state.openapi.as_str().to_string(),
    )
        .into_response()
}
