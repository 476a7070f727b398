//! The one place a failed call becomes an HTTP answer (SPEC §8): the gRPC
//! status the service answered maps to an HTTP status, and the body is
//! `{"error": {"code": "<the gRPC code in snake_case>", "message": "..."}}`.
//! Errors the HTTP layer finds itself (a body that does not decode, a wrong
//! content type) use the same body with the code they would have over gRPC.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tonic::Code;

/// What every error answer carries.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// The gRPC status code's name in snake_case, e.g. `permission_denied`.
    pub code: String,
    /// What went wrong and why; names the field for bad input.
    pub message: String,
}

/// A refused or failed request.
#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    pub code: Code,
    pub message: String,
}

/// The HTTP status for a gRPC code: SPEC §8's table, and the usual
/// meaning for the codes it does not name.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        // The call ran out of time on our side (the request deadline, or a
        // stalled upload): a gateway's timeout to the caller.
        Code::DeadlineExceeded | Code::Cancelled => StatusCode::GATEWAY_TIMEOUT,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unknown | Code::Internal | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The snake_case name of a gRPC code (`FAILED_PRECONDITION` →
/// `failed_precondition`).
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

impl HttpError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            status: http_status(code),
            code,
            message: message.into(),
        }
    }

    /// Bad input the HTTP layer found: 400, naming what.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }

    /// A request with an HTTP status of its own (413, 415) and the gRPC
    /// code it would have had.
    pub fn with_status(status: StatusCode, code: Code, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    /// A reply the views cannot be made from: our own bug, not the caller's.
    pub fn unexpected_reply(error: impl std::fmt::Display) -> Self {
        Self::new(Code::Internal, format!("unexpected reply: {error}"))
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: code_name(self.code).to_string(),
                message: self.message.clone(),
            },
        }
    }
}

impl From<tonic::Status> for HttpError {
    fn from(status: tonic::Status) -> Self {
        Self::new(status.code(), status.message())
    }
}

impl From<hotswap_common::convert::ConvertError> for HttpError {
    fn from(error: hotswap_common::convert::ConvertError) -> Self {
        Self::unexpected_reply(error)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_map_to_the_statuses_of_spec_8() {
        for (code, status, name) in [
            (Code::InvalidArgument, 400, "invalid_argument"),
            (Code::Unauthenticated, 401, "unauthenticated"),
            (Code::PermissionDenied, 403, "permission_denied"),
            (Code::NotFound, 404, "not_found"),
            (Code::AlreadyExists, 409, "already_exists"),
            (Code::Aborted, 409, "aborted"),
            (Code::FailedPrecondition, 412, "failed_precondition"),
            (Code::ResourceExhausted, 429, "resource_exhausted"),
            (Code::Unavailable, 503, "unavailable"),
            (Code::DeadlineExceeded, 504, "deadline_exceeded"),
            (Code::Internal, 500, "internal"),
        ] {
            assert_eq!(http_status(code).as_u16(), status, "{code:?}");
            assert_eq!(code_name(code), name, "{code:?}");
        }
    }

    #[test]
    fn every_code_has_the_snake_case_of_its_grpc_name() {
        for n in 0..=16 {
            let code = Code::from_i32(n);
            // tonic's description is e.g. "Some requested entity was not
            // found"; the canonical name is the enum's, in snake case.
            let debug = format!("{code:?}");
            let mut snake = String::new();
            for (i, c) in debug.chars().enumerate() {
                if c.is_ascii_uppercase() && i > 0 {
                    snake.push('_');
                }
                snake.push(c.to_ascii_lowercase());
            }
            assert_eq!(code_name(code), snake);
        }
    }

    #[tokio::test]
    async fn the_body_names_the_code_and_the_message() {
        let error = HttpError::from(tonic::Status::permission_denied(
            "user \"v\" has role viewer; deploy needs role deployer",
        ));
        let response = error.into_response();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .expect("body");
        let body: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(
            body,
            serde_json::json!({"error": {
                "code": "permission_denied",
                "message": "user \"v\" has role viewer; deploy needs role deployer",
            }})
        );
    }
}
