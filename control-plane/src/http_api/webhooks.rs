//! The webhook resources (SPEC §9) of the HTTP API: `GET|POST webhooks`,
//! `DELETE webhooks/{id}`, `POST webhooks/{id}/test`, each one in-process
//! call of the `Webhooks` gRPC service, like every resource of the API.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hotswap_common::model::{WebhookRequest, WebhookTestView, WebhookView};
use hotswap_common::pb;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::body::JsonBody;
use super::error::{ErrorBody, HttpError};
use super::{ApiState, Call, clients};

type Result<T> = std::result::Result<T, HttpError>;

pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_webhooks, create_webhook))
        .routes(routes!(delete_webhook))
        .routes(routes!(test_webhook))
}

/// Every webhook, with its last delivered seq, last error and backlog.
#[utoipa::path(get, path = "/webhooks", tag = "webhooks",
    responses(
        (status = 200, description = "The webhooks", body = Vec<WebhookView>),
        (status = 403, description = "The role does not allow it (admin only)", body = ErrorBody),
    ))]
async fn list_webhooks(
    State(state): State<ApiState>,
    call: Call,
) -> Result<Json<Vec<WebhookView>>> {
    let reply = clients::webhooks(&state)
        .list_webhooks(call.request(pb::ListWebhooksRequest {}))
        .await?
        .into_inner();
    Ok(Json(
        reply.webhooks.into_iter().map(WebhookView::from).collect(),
    ))
}

/// Create a webhook (`webhooks create`): matching events from now on are
/// POSTed to `url`, signed when a secret is given.
#[utoipa::path(post, path = "/webhooks", tag = "webhooks",
    request_body = WebhookRequest,
    responses(
        (status = 201, description = "Created", body = WebhookView),
        (status = 400, description = "Bad input (url, kind, format, secret or CA), or a url at the control plane's own port", body = ErrorBody),
        (status = 403, description = "The role does not allow it (admin only)", body = ErrorBody),
    ))]
async fn create_webhook(
    State(state): State<ApiState>,
    call: Call,
    JsonBody(body): JsonBody<WebhookRequest>,
) -> Result<Response> {
    let webhook = clients::webhooks(&state)
        .create_webhook(call.request(pb::CreateWebhookRequest::from(body)))
        .await?
        .into_inner();
    Ok((StatusCode::CREATED, Json(WebhookView::from(webhook))).into_response())
}

/// Delete a webhook and its cursor (`webhooks delete`).
#[utoipa::path(delete, path = "/webhooks/{id}", tag = "webhooks",
    params(("id" = String, Path, description = "Webhook id")),
    responses(
        (status = 200, description = "The webhook as it was deleted", body = WebhookView),
        (status = 403, description = "The role does not allow it (admin only)", body = ErrorBody),
        (status = 404, description = "No such webhook", body = ErrorBody),
    ))]
async fn delete_webhook(
    State(state): State<ApiState>,
    call: Call,
    Path(id): Path<String>,
) -> Result<Json<WebhookView>> {
    let webhook = clients::webhooks(&state)
        .delete_webhook(call.request(pb::DeleteWebhookRequest { id }))
        .await?
        .into_inner();
    Ok(Json(WebhookView::from(webhook)))
}

/// Send one `webhook.test` delivery now (`webhooks test`) and report how
/// the receiver answered.
#[utoipa::path(post, path = "/webhooks/{id}/test", tag = "webhooks",
    params(("id" = String, Path, description = "Webhook id")),
    responses(
        (status = 200, description = "What the receiver answered", body = WebhookTestView),
        (status = 403, description = "The role does not allow it (admin only)", body = ErrorBody),
        (status = 404, description = "No such webhook", body = ErrorBody),
    ))]
async fn test_webhook(
    State(state): State<ApiState>,
    call: Call,
    Path(id): Path<String>,
) -> Result<Json<WebhookTestView>> {
    let reply = clients::webhooks(&state)
        .test_webhook(call.request(pb::TestWebhookRequest { id: id.clone() }))
        .await?
        .into_inner();
    Ok(Json(WebhookTestView::from_pb(&id, reply)))
}
