//! Decoding requests: JSON bodies and query strings, refused with 400
//! naming the field and why, before any service is called.
//!
//! Every POST must say `Content-Type: application/json` (uploads:
//! `application/octet-stream`), even with an empty body. A browser holding
//! an operator's client certificate sends it to any page's cross-site
//! form or `no-cors` request, but those can only carry the CORS-safelisted
//! content types (form encodings, `text/plain`), or none; a JSON or binary
//! one needs a preflight this API never grants. So another site cannot make
//! an operator's browser deploy or pause anything.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;
use tonic::Code;

use super::error::HttpError;

/// JSON bodies are small (deployment options, a reason); the same bound
/// as the gRPC operator calls' messages.
pub const JSON_BODY_LIMIT: usize = 256 * 1024;

/// Whether `headers` declare `expected` (parameters such as `charset`
/// allowed); a missing or other content type is refused with 415.
pub fn require_content_type(headers: &HeaderMap, expected: &str) -> Result<(), HttpError> {
    let given = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = given.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case(expected) {
        return Ok(());
    }
    let what = if given.is_empty() {
        "no content-type".to_string()
    } else {
        format!("content-type {given:?}")
    };
    Err(HttpError::with_status(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        Code::InvalidArgument,
        format!("content-type: this request needs {expected}, and it has {what}"),
    ))
}

/// What is read of a body before a refusal that comes ahead of it.
pub const DRAIN_LIMIT: usize = 1024 * 1024;

/// `refused`, once up to [`DRAIN_LIMIT`] bytes of `request`'s body are
/// read: answering before the body and then closing a connection with
/// unread bytes resets it, and the client may lose the answer (curl then
/// reports status 000). A larger body is cut off after that much.
pub async fn refuse_after_reading(request: Request, refused: HttpError) -> HttpError {
    let _ = axum::body::to_bytes(request.into_body(), DRAIN_LIMIT).await;
    refused
}

/// Decode `bytes` as `T`; the error names the field (`steps[2]`,
/// `max_failures`) and what is wrong with it.
pub fn decode_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, HttpError> {
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut deserializer)
        .map_err(|e| naming_the_field("invalid request body", "field", e))
}

/// `error` as a 400 whose message names where it is (`what` then `where_`
/// and the path), when it is inside the value.
fn naming_the_field<E: std::fmt::Display>(
    what: &str,
    where_: &str,
    error: serde_path_to_error::Error<E>,
) -> HttpError {
    let path = error.path().to_string();
    let inner = error.into_inner();
    if path.is_empty() || path == "." {
        HttpError::bad_request(format!("{what}: {inner}"))
    } else {
        HttpError::bad_request(format!("{what}: {where_} {path}: {inner}"))
    }
}

/// A JSON body decoded as `T`; an empty body reads as `{}` (so `T`'s
/// defaults apply, e.g. a control action without a reason).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = HttpError;

    async fn from_request(request: Request, _state: &S) -> Result<Self, Self::Rejection> {
        if let Err(refused) = require_content_type(request.headers(), "application/json") {
            return Err(refuse_after_reading(request, refused).await);
        }
        let bytes = axum::body::to_bytes(request.into_body(), JSON_BODY_LIMIT)
            .await
            .map_err(|e| {
                HttpError::with_status(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    Code::InvalidArgument,
                    format!(
                        "request body: larger than {JSON_BODY_LIMIT} bytes, or not readable: {e}"
                    ),
                )
            })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return decode_json(b"{}").map(JsonBody);
        }
        decode_json(&bytes).map(JsonBody)
    }
}

/// A query string decoded as `T`; the error names the parameter.
pub struct QueryParams<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for QueryParams<T> {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        decode_query(parts.uri.query().unwrap_or("")).map(QueryParams)
    }
}

pub fn decode_query<T: DeserializeOwned>(query: &str) -> Result<T, HttpError> {
    let deserializer =
        serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(deserializer)
        .map_err(|e| naming_the_field("invalid query", "parameter", e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hotswap_common::model::DeploymentRequest;

    fn check_body(body: &str, expected: Result<(), &str>) {
        let got = decode_json::<DeploymentRequest>(body.as_bytes());
        match (got, expected) {
            (Ok(_), Ok(())) => {}
            (Err(e), Err(needle)) => {
                assert_eq!(e.status, StatusCode::BAD_REQUEST, "{body}");
                assert!(e.message.contains(needle), "{body}: {}", e.message);
            }
            (got, expected) => panic!("{body}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn deployment_bodies_are_checked_naming_the_field() {
        let base = r#""module": "hello", "version": "1.0.0", "environment": "dev""#;
        check_body(&format!("{{{base}}}"), Ok(()));
        check_body(
            &format!(
                r#"{{{base}, "strategy": "canary", "steps": [10, 50, 100], "step_duration": "30s", "selector": {{"zone": "a"}}, "max_error_rate": 0.05, "dry_run": true}}"#
            ),
            Ok(()),
        );
        check_body(
            r#"{"version": "1.0.0", "environment": "dev"}"#,
            Err("`module`"),
        );
        check_body(
            &format!(r#"{{{base}, "max_failures": "two"}}"#),
            Err("field max_failures: invalid type: string \"two\""),
        );
        check_body(
            &format!(r#"{{{base}, "max_failures": -1}}"#),
            Err("field max_failures: invalid value: integer `-1`"),
        );
        check_body(
            &format!(r#"{{{base}, "step_duration": "soon"}}"#),
            Err("field step_duration: invalid duration \"soon\""),
        );
        check_body(
            &format!(r#"{{{base}, "steps": [10, "x"]}}"#),
            Err("field steps[1]"),
        );
        check_body(
            &format!(r#"{{{base}, "batchsize": 2}}"#),
            Err("unknown field `batchsize`"),
        );
        check_body("{", Err("invalid request body"));
    }

    #[test]
    fn the_body_becomes_the_same_grpc_request_as_the_cli_flags() {
        let request: DeploymentRequest = decode_json(
            br#"{"module": "hello", "version": "1.2.0", "environment": "prod",
                 "strategy": "rolling", "batch_size": "25%", "max_failures": 1,
                 "min_healthy_time": "10s", "pause_timeout": "1h", "no_auto_rollback": true}"#,
        )
        .expect("decodes");
        let pb = hotswap_common::pb::CreateDeploymentRequest::from(request);
        let options = pb.options.expect("options");
        assert_eq!(
            (
                pb.module.as_str(),
                pb.version.as_str(),
                pb.environment.as_str()
            ),
            ("hello", "1.2.0", "prod")
        );
        assert_eq!(options.strategy, "rolling");
        assert_eq!(options.batch_size, "25%");
        assert_eq!(options.max_failures, Some(1));
        assert_eq!(options.min_healthy_time_ms, 10_000);
        assert_eq!(options.pause_timeout_ms, Some(3_600_000));
        // Unset options are the environment's, as without the CLI flag.
        assert_eq!(options.step_duration_ms, 0);
        assert_eq!(options.max_error_rate, None);
        assert!(options.no_auto_rollback);
        assert!(!pb.dry_run);
    }

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Events {
        since: Option<u64>,
        follow: Option<bool>,
    }

    #[test]
    fn query_parameters_are_checked_naming_the_parameter() {
        let ok: Events = decode_query("since=5&follow=true").expect("decodes");
        assert_eq!((ok.since, ok.follow), (Some(5), Some(true)));
        let error = decode_query::<Events>("since=five").expect_err("refused");
        assert_eq!(error.status, StatusCode::BAD_REQUEST);
        assert!(error.message.contains("since"), "{}", error.message);
    }

    /// A refused content type is answered only after the body was read
    /// (up to the drain limit), so the connection is not reset under the
    /// client before it reads the 415.
    #[tokio::test]
    async fn a_refused_body_is_read_before_the_answer() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};
        let taken = Arc::new(AtomicUsize::new(0));
        let counter = taken.clone();
        let chunks = futures_util::stream::iter((0..4).map(move |_| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"a=1&b=2"))
        }));
        let request = axum::http::Request::post("/api/v1/deployments")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(axum::body::Body::from_stream(chunks))
            .expect("request");
        let refused = JsonBody::<DeploymentRequest>::from_request(request, &())
            .await
            .err()
            .expect("refused");
        assert_eq!(refused.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(taken.load(Ordering::SeqCst), 4, "every chunk read first");
    }

    #[test]
    fn posts_need_their_content_type() {
        let mut headers = HeaderMap::new();
        let refused = require_content_type(&headers, "application/json").expect_err("none");
        assert_eq!(refused.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert!(
            refused.message.contains("no content-type"),
            "{}",
            refused.message
        );
        headers.insert(
            header::CONTENT_TYPE,
            "application/x-www-form-urlencoded".parse().expect("value"),
        );
        assert!(require_content_type(&headers, "application/json").is_err());
        headers.insert(
            header::CONTENT_TYPE,
            "application/json; charset=utf-8".parse().expect("value"),
        );
        assert!(require_content_type(&headers, "application/json").is_ok());
    }
}
