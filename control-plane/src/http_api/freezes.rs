//! `/api/v1/freezes` (SPEC §9 over the §8 pattern): each handler is the
//! `Freezes` gRPC call `hotswapctl freeze` makes, in process.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use hotswap_common::model::FreezeView;
use hotswap_common::pb;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::body::{JsonBody, QueryParams};
use super::error::{ErrorBody, HttpError};
use super::{ApiState, Call, clients};

type Result<T> = std::result::Result<T, HttpError>;

pub fn routes() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new()
        .routes(routes!(list_freezes, create_freeze))
        .routes(routes!(delete_freeze))
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct FreezesQuery {
    /// Only this environment's freezes.
    environment: Option<String>,
}

/// Freezes in force, newest first; expired ones drop out (`freeze list`).
#[utoipa::path(get, path = "/freezes", tag = "freezes", params(FreezesQuery),
    responses(
        (status = 200, description = "The freezes in force", body = Vec<FreezeView>),
        (status = 403, description = "The role does not allow it", body = ErrorBody),
    ))]
async fn list_freezes(
    State(state): State<ApiState>,
    call: Call,
    QueryParams(query): QueryParams<FreezesQuery>,
) -> Result<Json<Vec<FreezeView>>> {
    let reply = clients::freezes(&state)
        .list_freezes(call.request(pb::ListFreezesRequest {
            environment: query.environment.unwrap_or_default(),
        }))
        .await?
        .into_inner();
    Ok(Json(
        reply.freezes.into_iter().map(FreezeView::from).collect(),
    ))
}

/// A freeze to create (`freeze create`): exactly one of `until` and `for`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FreezeRequest {
    environment: String,
    /// RFC 3339, in the future.
    #[serde(default)]
    #[schema(example = "2026-12-24T08:00:00Z")]
    until: Option<String>,
    /// A duration from now, e.g. `2h` or `3d`.
    #[serde(default, rename = "for")]
    #[schema(example = "2h")]
    for_duration: Option<String>,
    /// Why; shown in every refusal it causes.
    reason: String,
}

/// Freeze an environment: no deployment or pipeline starts there until it
/// ends, unless an admin overrides it.
#[utoipa::path(post, path = "/freezes", tag = "freezes",
    request_body = FreezeRequest,
    responses(
        (status = 201, description = "Created", body = FreezeView),
        (status = 400, description = "Bad input; the message names the field", body = ErrorBody),
        (status = 403, description = "The role does not allow it", body = ErrorBody),
    ))]
async fn create_freeze(
    State(state): State<ApiState>,
    call: Call,
    JsonBody(body): JsonBody<FreezeRequest>,
) -> Result<Response> {
    let until = match &body.until {
        Some(text) => {
            let at: jiff::Timestamp = text.parse().map_err(|e| {
                HttpError::bad_request(format!("until {text:?}: not an RFC 3339 time: {e}"))
            })?;
            Some(prost_types::Timestamp {
                seconds: at.as_second(),
                nanos: at.subsec_nanosecond(),
            })
        }
        None => None,
    };
    let for_ms = match &body.for_duration {
        Some(text) => {
            let d = hotswap_common::timefmt::parse_duration(text)
                .map_err(|e| HttpError::bad_request(format!("for {text:?}: {e}")))?;
            if d.is_zero() {
                return Err(HttpError::bad_request(format!(
                    "for {text:?}: must be longer than zero"
                )));
            }
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
        }
        None => 0,
    };
    let freeze = clients::freezes(&state)
        .create_freeze(call.request(pb::CreateFreezeRequest {
            environment: body.environment,
            until,
            for_ms,
            reason: body.reason,
        }))
        .await?
        .into_inner();
    Ok((StatusCode::CREATED, Json(FreezeView::from(freeze))).into_response())
}

/// Lift a freeze (`freeze delete`): its creator or an admin.
#[utoipa::path(delete, path = "/freezes/{id}", tag = "freezes",
    params(("id" = String, Path, description = "Freeze id")),
    responses(
        (status = 200, description = "The freeze deleted", body = FreezeView),
        (status = 403, description = "Neither its creator nor an admin", body = ErrorBody),
        (status = 404, description = "No such freeze in force", body = ErrorBody),
    ))]
async fn delete_freeze(
    State(state): State<ApiState>,
    call: Call,
    Path(id): Path<String>,
) -> Result<Json<FreezeView>> {
    let freeze = clients::freezes(&state)
        .delete_freeze(call.request(pb::DeleteFreezeRequest { id }))
        .await?
        .into_inner();
    Ok(Json(FreezeView::from(freeze)))
}
