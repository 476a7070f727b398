//! The HTTP/JSON API of SPEC §8, on the gRPC listener: same port, TLS and
//! client certificates.
//!
//! [`ByContentType`] sends `application/grpc*` requests to the tonic
//! services and everything else to the axum router of this module, whose
//! resources live under `/api/v1/`.
//!
//! There is no second implementation of any call. Each handler builds the
//! gRPC request the CLI would send and makes it **in process**, through the
//! very services the gRPC listener serves ([`GrpcServices`]; so a follower
//! replica forwards the engine's calls to the leader exactly as it does for
//! gRPC, and the RPC metrics count them), with tonic's TLS connection info
//! of the HTTP request, whose peer certificates `auth::peer` reads. Authorization
//! (`auth::Permission`), rate limits and audit records are therefore those
//! of the gRPC call. The answer becomes the SPEC §4 view of
//! `hotswap_common::model`, as `hotswapctl -o json` prints it; a refusal
//! becomes an HTTP status in one place ([`error`]).
//!
//! The OpenAPI 3.1 document (`GET /api/v1/openapi.json`, checked in as
//! docs/openapi.json) is generated from the handlers' `#[utoipa::path]`
//! attributes, which also register the routes, so the two cannot differ.

pub mod body;
pub mod error;
mod freezes;
mod resources;
mod stream;
mod webhooks;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::metadata::{MetadataMap, MetadataValue};
use tower::Service;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use self::error::HttpError;

/// Where the resources are.
pub const PREFIX: &str = "/api/v1";

/// The artifact upload: a body of any size, bounded by `max_artifact_bytes`
/// while it streams and cut off when idle (like the gRPC upload, it has no
/// total deadline; see `deadline.rs`).
pub const UPLOAD_PATH: &str = "/api/v1/modules";

/// Responses from in-process calls: a node list of a large fleet is
/// bigger than tonic's default 4 MiB, and nothing crosses a network here.
const IN_PROCESS_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// The gRPC services as the listener serves them, behind the RPC metrics:
/// gRPC clients reach them through [`ByContentType`], the HTTP API's
/// handlers in process, so a call counts under its gRPC method and status
/// either way.
pub type GrpcServices =
    tower::util::BoxCloneSyncService<http::Request<Body>, http::Response<Body>, Infallible>;

/// What the handlers share: the gRPC services, as the listener serves them.
#[derive(Clone)]
pub struct ApiState {
    grpc: GrpcServices,
    openapi: Arc<String>,
}

/// The caller of an HTTP request as the gRPC services see callers: tonic's
/// connection info (the TLS peer's certificates and address, which
/// `auth::peer` and the audit log read) and the trace context. Nothing else
/// of the HTTP request is passed on: in particular not the forwarding
/// headers a replica sets, which the services would ignore from an
/// operator anyway.
pub struct Call {
    extensions: http::Extensions,
    metadata: MetadataMap,
}

impl<S: Send + Sync> FromRequestParts<S> for Call {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Infallible> {
        let mut metadata = MetadataMap::new();
        if let Some(value) = parts
            .headers
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| MetadataValue::try_from(v).ok())
        {
            metadata.insert("traceparent", value);
        }
        let mut extensions = http::Extensions::new();
        if let Some(connection) = crate::auth::Connection::of(&parts.extensions) {
            extensions.insert(connection.clone());
        }
        Ok(Call {
            extensions,
            metadata,
        })
    }
}

impl Call {
    /// `message` as a gRPC request from this caller.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        tonic::Request::from_parts(self.metadata.clone(), self.extensions.clone(), message)
    }
}

impl ApiState {
    fn grpc(&self) -> GrpcServices {
        self.grpc.clone()
    }
}

/// Generated clients over the in-process services.
macro_rules! in_process_client {
    ($name:ident, $client:path) => {
        pub fn $name(state: &ApiState) -> $client {
            <$client>::new(state.grpc())
                .max_decoding_message_size(IN_PROCESS_MESSAGE_BYTES)
                .max_encoding_message_size(IN_PROCESS_MESSAGE_BYTES)
        }
    };
}

mod clients {
    use super::*;
    use hotswap_common::pb;

    in_process_client!(fleet, pb::fleet_client::FleetClient<GrpcServices>);
    in_process_client!(
        artifacts,
        pb::artifacts_client::ArtifactsClient<GrpcServices>
    );
    in_process_client!(
        deployments,
        pb::deployments_client::DeploymentsClient<GrpcServices>
    );
    in_process_client!(
        pipelines,
        pb::pipelines_client::PipelinesClient<GrpcServices>
    );
    in_process_client!(clusters, pb::clusters_client::ClustersClient<GrpcServices>);
    in_process_client!(events, pb::events_client::EventsClient<GrpcServices>);
    in_process_client!(audit, pb::audit_client::AuditClient<GrpcServices>);
    in_process_client!(history, pb::history_client::HistoryClient<GrpcServices>);
    in_process_client!(users, pb::users_client::UsersClient<GrpcServices>);
    in_process_client!(servers, pb::servers_client::ServersClient<GrpcServices>);
    in_process_client!(freezes, pb::freezes_client::FreezesClient<GrpcServices>);
    in_process_client!(webhooks, pb::webhooks_client::WebhooksClient<GrpcServices>);
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hotswap control plane",
        description = "The HTTP/JSON API of the hotswap control plane (SPEC §8). It is served on the gRPC port, with the same TLS, client certificates, roles and audit log; every call needs a client certificate from an operator profile (`hotswapctl users create`). Errors answer `{\"error\": {\"code\", \"message\"}}` with the gRPC code's snake_case name. Streams (`follow=true`, `watch=true`) are Server-Sent Events with one JSON object per `data:` line, resumable with `Last-Event-ID`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    modifiers(&MutualTls),
    security(("client_certificate" = [])),
    components(schemas(error::ErrorBody, error::ErrorDetail, resources::Action)),
)]
struct ApiDoc;

/// Every call authenticates with the operator's client certificate.
struct MutualTls;

impl utoipa::Modify for MutualTls {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "client_certificate",
            utoipa::openapi::security::SecurityScheme::MutualTls {
                description: Some(
                    "The client certificate and key of an operator profile, issued by the control plane's CA".into(),
                ),
                deprecated: None,
                extensions: None,
            },
        );
    }
}

/// The routes and their OpenAPI document, from the same attributes.
fn documented() -> (axum::Router<ApiState>, utoipa::openapi::OpenApi) {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    OpenApiRouter::with_openapi(doc)
        .nest(PREFIX, resources::routes().merge(webhooks::routes()))
        .split_for_parts()
}

/// The OpenAPI document, as `GET /api/v1/openapi.json` serves it.
pub fn openapi() -> utoipa::openapi::OpenApi {
    documented().1
}

/// The document as served and checked in: pretty JSON, with a final newline.
pub fn openapi_json() -> String {
    let mut text = openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"cannot render the document: {e}\"}}"));
    text.push('\n');
    text
}

/// The API's router over `grpc`, the services the gRPC listener serves,
/// counting and timing each request in `metrics`.
pub fn router(grpc: GrpcServices, metrics: Arc<crate::metrics::Metrics>) -> axum::Router {
    let (routes, _) = documented();
    let state = ApiState {
        grpc,
        openapi: Arc::new(openapi_json()),
    };
    routes
        .fallback(no_such_resource)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(metrics, count_request))
}

/// Count and time one request under its route template (axum's matched
/// path; `unmatched` for anything else), so made-up paths and methods
/// cannot grow the label set.
async fn count_request(
    axum::extract::State(metrics): axum::extract::State<Arc<crate::metrics::Metrics>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |path| path.as_str())
        .to_string();
    let method = match *request.method() {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    metrics
        .http_duration
        .get_or_create(&crate::metrics::RouteLabel {
            route: route.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    metrics
        .http_requests
        .get_or_create(&crate::metrics::HttpLabels {
            route,
            method: method.to_string(),
            status: response.status().as_u16().to_string(),
        })
        .inc();
    response
}

async fn no_such_resource(method: http::Method, uri: http::Uri) -> HttpError {
    HttpError::new(
        tonic::Code::NotFound,
        format!(
            "no such resource: {method} {}; the API is described at {PREFIX}/openapi.json",
            uri.path()
        ),
    )
}

async fn method_not_allowed(method: http::Method, uri: http::Uri) -> HttpError {
    HttpError::with_status(
        http::StatusCode::METHOD_NOT_ALLOWED,
        tonic::Code::Unimplemented,
        format!(
            "{method} is not allowed on {}; the API is described at {PREFIX}/openapi.json",
            uri.path()
        ),
    )
}

/// One service for the listener: gRPC by content type, the rest to the
/// HTTP API.
#[derive(Clone)]
pub struct ByContentType {
    grpc: GrpcServices,
    http: axum::Router,
}

impl ByContentType {
    pub fn new(grpc: GrpcServices, metrics: Arc<crate::metrics::Metrics>) -> Self {
        let http = router(grpc.clone(), metrics);
        Self { grpc, http }
    }
}

/// Whether a request is gRPC: `application/grpc`, `application/grpc+proto`
/// and the like.
fn is_grpc<B>(request: &http::Request<B>) -> bool {
    request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

impl<B> Service<http::Request<B>> for ByContentType
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError>,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Both sides are axum routers underneath (tonic's `Routes` is one),
        // which are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if is_grpc(&request) {
            Box::pin(self.grpc.call(request.map(Body::new)))
        } else {
            let future = self.http.call(request.map(axum::body::Body::new));
            Box::pin(async move {
                let response = match future.await {
                    Ok(response) => response,
                    Err(never) => match never {},
                };
                Ok(response.map(Body::new))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    /// Where the document is checked in.
    fn checked_in_path() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json")
    }

    /// The generated document is the checked-in one. After changing the
    /// API, regenerate it with
    /// `HOTSWAP_WRITE_OPENAPI=1 cargo test -p hotswap-control-plane --lib openapi`.
    #[test]
    fn openapi_document_is_the_checked_in_one() {
        let generated = openapi_json();
        let path = checked_in_path();
        if std::env::var_os("HOTSWAP_WRITE_OPENAPI").is_some() {
            std::fs::write(&path, &generated).expect("write docs/openapi.json");
            return;
        }
        let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            checked_in == generated,
            "{} differs from the document the code generates; regenerate it with \
             HOTSWAP_WRITE_OPENAPI=1 cargo test -p hotswap-control-plane --lib openapi",
            path.display()
        );
    }

    /// The operations of the document, as (METHOD, path).
    fn documented_operations() -> Vec<(http::Method, String)> {
        let doc = openapi();
        let mut operations = Vec::new();
        for (path, item) in &doc.paths.paths {
            for (method, operation) in [
                (http::Method::GET, &item.get),
                (http::Method::POST, &item.post),
                (http::Method::PUT, &item.put),
                (http::Method::DELETE, &item.delete),
                (http::Method::PATCH, &item.patch),
            ] {
                if operation.is_some() {
                    operations.push((method, path.clone()));
                }
            }
        }
        operations
    }

    #[test]
    fn openapi_document_is_3_1_and_names_every_resource_of_spec_8() {
        let doc = serde_json::to_value(openapi()).expect("json");
        assert!(
            doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1")),
            "{}",
            doc["openapi"]
        );
        let operations = documented_operations();
        let spec = [
            ("GET", "/api/v1/nodes"),
            ("GET", "/api/v1/nodes/{node}"),
            ("DELETE", "/api/v1/nodes/{node}"),
            ("GET", "/api/v1/modules"),
            ("GET", "/api/v1/modules/{name}"),
            ("POST", "/api/v1/modules"),
            ("GET", "/api/v1/deployments"),
            ("POST", "/api/v1/deployments"),
            ("GET", "/api/v1/deployments/{id}"),
            ("POST", "/api/v1/deployments/{id}/{action}"),
            ("POST", "/api/v1/pipelines"),
            ("GET", "/api/v1/pipelines"),
            ("GET", "/api/v1/pipelines/{id}"),
            ("POST", "/api/v1/pipelines/{id}/abort"),
            ("GET", "/api/v1/clusters"),
            ("GET", "/api/v1/clusters/{env}"),
            ("GET", "/api/v1/history"),
            ("GET", "/api/v1/history/diff"),
            ("GET", "/api/v1/events"),
            ("GET", "/api/v1/audit"),
            ("GET", "/api/v1/users"),
            ("GET", "/api/v1/servers"),
            ("GET", "/api/v1/openapi.json"),
            // SPEC §9: freezes.
            ("GET", "/api/v1/freezes"),
            ("POST", "/api/v1/freezes"),
            ("DELETE", "/api/v1/freezes/{id}"),
            // SPEC §9.
            ("GET", "/api/v1/webhooks"),
            ("POST", "/api/v1/webhooks"),
            ("DELETE", "/api/v1/webhooks/{id}"),
            ("POST", "/api/v1/webhooks/{id}/test"),
        ];
        for (method, path) in spec {
            assert!(
                operations
                    .iter()
                    .any(|(m, p)| m.as_str() == method && p == path),
                "SPEC §8's {method} {path} is not in the document"
            );
        }
        assert_eq!(
            operations.len(),
            spec.len(),
            "the document has operations SPEC §8 does not list: {operations:?}"
        );
    }

    /// Each documented operation is served by a handler of the router (not
    /// its fallbacks), and a request for anything else gets the fallback:
    /// routes and document are one.
    #[tokio::test]
    async fn every_documented_operation_is_routed_and_nothing_else() {
        // No services behind: a handler that is reached calls in process
        // and gets `unimplemented`, and answers 501 (or refuses the
        // request's form first, or serves the document).
        let (metrics, registry) = crate::metrics::Metrics::new();
        let metrics = Arc::new(metrics);
        let router = router(
            GrpcServices::new(tonic::service::Routes::default()),
            metrics.clone(),
        );
        for (method, path) in documented_operations() {
            let concrete = path
                .replace("{node}", "n")
                .replace("{name}", "m")
                .replace("{id}", "d-1")
                .replace("{action}", "pause")
                .replace("{env}", "dev");
            let request = http::Request::builder()
                .method(method.clone())
                .uri(&concrete)
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(axum::body::Body::from("{}"))
                .expect("request");
            let response = router.clone().oneshot(request).await.expect("infallible");
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                .await
                .expect("body");
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                status != http::StatusCode::NOT_FOUND
                    && status != http::StatusCode::METHOD_NOT_ALLOWED,
                "{method} {concrete} is documented but not routed: {status} {text}"
            );
        }
        for (method, path) in [
            ("GET", "/api/v1/nothing"),
            ("PUT", "/api/v1/nodes"),
            ("GET", "/api/v2/nodes"),
        ] {
            let request = http::Request::builder()
                .method(method)
                .uri(path)
                .body(axum::body::Body::empty())
                .expect("request");
            let response = router.clone().oneshot(request).await.expect("infallible");
            assert!(
                matches!(response.status().as_u16(), 404 | 405),
                "{method} {path}: {}",
                response.status()
            );
        }
        // Counted by route template, never by the concrete path.
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains(
                r#"hotswap_http_requests_total{route="/api/v1/deployments/{id}",method="GET""#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"hotswap_http_requests_total{route="unmatched",method="GET",status="404"} 2"#
            ),
            "{text}"
        );
        assert!(!text.contains("d-1"), "no concrete path is a label: {text}");
        assert!(
            text.contains(r#"hotswap_http_request_duration_seconds_count{route="/api/v1/nodes"}"#),
            "{text}"
        );
    }
}
