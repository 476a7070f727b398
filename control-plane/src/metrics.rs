//! Prometheus metrics of the control plane, and a tower layer that counts and
//! times every gRPC call by method and status code.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tonic::codegen::http;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: String,
}

/// An HTTP API request: its route template (`/api/v1/deployments/{id}`,
/// or `unmatched`), method and status; every label from a bounded set.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub route: String,
    pub method: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WebhookLabel {
    pub webhook: String,
}

#[derive(Clone)]
pub struct Metrics {
    pub nodes: Family<StatusLabel, Gauge>,
    pub rpc_requests: Family<RpcLabels, Counter>,
    pub rpc_duration: Family<MethodLabel, Histogram>,
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_duration: Family<RouteLabel, Histogram>,
    pub enrollments: Family<ResultLabel, Counter>,
    pub heartbeats: Counter,
    pub reports: Counter,
    pub sessions_opened: Counter,
    /// Session records this replica wrote to etcd (SPEC §7): what sharing
    /// sessions costs the store.
    pub session_records_written: Counter,
    pub storage_bytes: Gauge,
    pub storage_failed: Gauge,
    pub deployments: Family<StateLabel, Gauge>,
    pub rollbacks: Counter,
    pub analysis_failures: Counter,
    /// The deployment engine's passes over its active deployments: observe,
    /// step, commit (a pass with none active is not timed).
    pub engine_pass: Histogram,
    pub events_stored: Gauge,
    pub events_appended: Counter,
    /// Events a node caused beyond its budget (counted, not logged).
    pub events_suppressed: Counter,
    /// Claims dropped from status reports at the edge (`service::convert`).
    pub report_claims_dropped: Counter,
    pub audit_records: Gauge,
    pub tls_dropped: Family<DropReasonLabel, Counter>,
    /// Completed TLS handshakes, `full` or `resumed` (with a session ticket).
    pub tls_handshakes: Family<HandshakeLabel, Counter>,
    /// 1 while this replica leads (runs the engine); always 1 embedded.
    pub leader: Gauge,
    /// The last etcd round trip (a status call), in seconds; etcd only.
    pub etcd_round_trip_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// How many revisions the mirror trails etcd by; etcd only.
    pub etcd_watch_lag_revisions: Gauge,
    /// Events each webhook's receiver accepted.
    pub webhook_deliveries: Family<WebhookLabel, Counter>,
    /// Failed delivery attempts per webhook (each retry counts).
    pub webhook_failures: Family<WebhookLabel, Counter>,
    /// Events each webhook's delivery is behind the log's newest.
    pub webhook_lag: Family<WebhookLabel, Gauge>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

/// Every deployment state, so each appears (at 0) from the first scrape.
pub const DEPLOYMENT_STATES: [&str; 9] = [
    "pending",
    "awaiting_approval",
    "running",
    "paused",
    "succeeded",
    "failed",
    "rolling_back",
    "rolled_back",
    "aborted",
];

impl Metrics {
    /// Create the metrics and a registry exposing them.
    pub fn new() -> (Self, Registry) {
        let metrics = Metrics {
            nodes: Family::default(),
            rpc_requests: Family::default(),
            rpc_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.0005, 2.0, 16))
            }),
            enrollments: Family::default(),
            heartbeats: Counter::default(),
            reports: Counter::default(),
            sessions_opened: Counter::default(),
            session_records_written: Counter::default(),
            storage_bytes: Gauge::default(),
            storage_failed: Gauge::default(),
            deployments: Family::default(),
            rollbacks: Counter::default(),
            analysis_failures: Counter::default(),
            engine_pass: Histogram::new(exponential_buckets(0.0001, 2.0, 18)),
            events_stored: Gauge::default(),
            events_appended: Counter::default(),
            events_suppressed: Counter::default(),
            report_claims_dropped: Counter::default(),
            audit_records: Gauge::default(),
            tls_dropped: Family::default(),
            tls_handshakes: Family::default(),
            leader: Gauge::default(),
            etcd_round_trip_seconds: Gauge::default(),
            etcd_watch_lag_revisions: Gauge::default(),
            webhook_deliveries: Family::default(),
            webhook_failures: Family::default(),
            webhook_lag: Family::default(),
        };
        for state in DEPLOYMENT_STATES {
            metrics
                .deployments
                .get_or_create(&StateLabel { state })
                .set(0);
        }
        let mut registry = Registry::with_prefix("hotswap");
        registry.register(
            "nodes",
            "Enrolled nodes by session status",
            metrics.nodes.clone(),
        );
        registry.register(
            "grpc_requests",
            "gRPC calls by method and status code (the code of streaming calls is their opening status)",
            metrics.rpc_requests.clone(),
        );
        registry.register(
            "grpc_request_duration_seconds",
            "Time to the response headers of gRPC calls, by method",
            metrics.rpc_duration.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP API calls by route template, method and status (each also counted under the gRPC method it makes)",
            metrics.http_requests.clone(),
        );
        registry.register(
            "http_request_duration_seconds",
            "Time to the response headers of HTTP API calls, by route template",
            metrics.http_duration.clone(),
        );
        registry.register(
            "enrollments",
            "Enrollment attempts by result",
            metrics.enrollments.clone(),
        );
        registry.register(
            "heartbeats",
            "Agent heartbeats received",
            metrics.heartbeats.clone(),
        );
        registry.register(
            "reports",
            "Agent status reports received",
            metrics.reports.clone(),
        );
        registry.register(
            "sessions_opened",
            "Agent sessions opened",
            metrics.sessions_opened.clone(),
        );
        registry.register(
            "session_records_written",
            "Session records written to the shared store (etcd only)",
            metrics.session_records_written.clone(),
        );
        registry.register(
            "storage_bytes",
            "Size of the sled database on disk",
            metrics.storage_bytes.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica leads: runs the deployment engine, pipelines, catch-up and retention",
            metrics.leader.clone(),
        );
        registry.register(
            "etcd_round_trip_seconds",
            "Duration of the last etcd status call (replicas on etcd only)",
            metrics.etcd_round_trip_seconds.clone(),
        );
        registry.register(
            "etcd_watch_lag_revisions",
            "Revisions etcd is ahead of this replica's mirror (replicas on etcd only)",
            metrics.etcd_watch_lag_revisions.clone(),
        );
        registry.register(
            "webhook_deliveries",
            "Events a webhook's receiver accepted, by webhook id",
            metrics.webhook_deliveries.clone(),
        );
        registry.register(
            "webhook_failures",
            "Failed webhook delivery attempts (each retry counts), by webhook id",
            metrics.webhook_failures.clone(),
        );
        registry.register(
            "webhook_lag_events",
            "Events of the log a webhook's delivery has not yet processed, by webhook id",
            metrics.webhook_lag.clone(),
        );
        registry.register(
            "storage_failed",
            "1 after a write failed with an I/O error (e.g. a full disk) until the restart that recovers",
            metrics.storage_failed.clone(),
        );
        registry.register(
            "deployments",
            "Deployments by state (kept in memory since the last start)",
            metrics.deployments.clone(),
        );
        registry.register(
            "rollbacks",
            "Deployments that started rolling back (automatic or manual)",
            metrics.rollbacks.clone(),
        );
        registry.register(
            "analysis_failures",
            "Canary analysis verdicts that failed",
            metrics.analysis_failures.clone(),
        );
        registry.register(
            "engine_pass_seconds",
            "Duration of the deployment engine's passes over its active deployments (observe, step, commit)",
            metrics.engine_pass.clone(),
        );
        registry.register(
            "events_stored",
            "Events in the event log (bounded by event_retention)",
            metrics.events_stored.clone(),
        );
        registry.register(
            "events",
            "Events appended to the event log",
            metrics.events_appended.clone(),
        );
        registry.register(
            "events_suppressed",
            "Events nodes caused beyond their per-node budget, counted instead of appended",
            metrics.events_suppressed.clone(),
        );
        registry.register(
            "report_claims_dropped",
            "Module entries, metrics windows, usage and generations dropped from status reports as unbelievable",
            metrics.report_claims_dropped.clone(),
        );
        registry.register(
            "audit_records",
            "Records in the audit log",
            metrics.audit_records.clone(),
        );
        registry.register(
            "tls_connections_dropped",
            "Connections closed before their TLS handshake finished, by reason (address_limit, client_hello_timeout, bad_client_hello, stale, handshake_failed, handshake_timeout, resumed_expired)",
            metrics.tls_dropped.clone(),
        );
        registry.register(
            "tls_handshakes",
            "Completed TLS handshakes by kind: full, or resumed with a session ticket",
            metrics.tls_handshakes.clone(),
        );
        (metrics, registry)
    }

    /// Set the per-state deployment gauge from `(state, count)` pairs.
    pub fn set_deployment_states<'a>(&self, states: impl Iterator<Item = &'a str>) {
        let mut counts: std::collections::BTreeMap<&str, i64> =
            DEPLOYMENT_STATES.iter().map(|s| (*s, 0)).collect();
        for state in states {
            if let Some(n) = counts.get_mut(state) {
                *n += 1;
            }
        }
        for (state, n) in counts {
            self.deployments.get_or_create(&StateLabel { state }).set(n);
        }
    }

    pub fn set_node_counts(&self, connected: i64, total: i64) {
        self.nodes
            .get_or_create(&StatusLabel {
                status: "connected",
            })
            .set(connected);
        self.nodes
            .get_or_create(&StatusLabel {
                status: "disconnected",
            })
            .set(total.saturating_sub(connected));
    }
}

/// Counts and times gRPC calls. Unary errors are trailers-only responses, so
/// their `grpc-status` is in the headers; a call without one is counted `0`.
#[derive(Clone)]
pub struct RpcMetricsLayer {
    metrics: Arc<Metrics>,
}

impl RpcMetricsLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for RpcMetricsLayer {
    type Service = RpcMetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcMetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcMetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// Every method path the server answers: ours (from the compiled
/// descriptors) and the reflection and health services.
static KNOWN_METHODS: std::sync::LazyLock<std::collections::HashSet<String>> =
    std::sync::LazyLock::new(|| {
        let mut known: std::collections::HashSet<String> = [
            "/grpc.health.v1.Health/Check",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ]
        .into_iter()
        .map(String::from)
        .collect();
        known.extend(hotswap_common::rpc_method_paths());
        known
    });

/// Method label: the gRPC path of a method we serve, a fixed word otherwise,
/// so a client sending made-up paths cannot grow the label set.
fn method_label(path: &str) -> String {
    if KNOWN_METHODS.contains(path) {
        path.to_string()
    } else {
        "unknown".to_string()
    }
}

impl<S, B, R> tower::Service<http::Request<B>> for RpcMetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = method_label(request.uri().path());
        let started = Instant::now();
        let future = self.inner.call(request);
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let result = future.await;
            let code = match &result {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("0")
                    .to_string(),
                Err(_) => "transport".to_string(),
            };
            metrics
                .rpc_duration
                .get_or_create(&MethodLabel {
                    method: method.clone(),
                })
                .observe(started.elapsed().as_secs_f64());
            metrics
                .rpc_requests
                .get_or_create(&RpcLabels { method, code })
                .inc();
            result
        })
    }
}

#[cfg(test)]
mod label_tests {
    use super::method_label;

    #[test]
    fn known_methods_only() {
        assert_eq!(
            method_label("/hotswap.v1.Fleet/ListNodes"),
            "/hotswap.v1.Fleet/ListNodes"
        );
        assert_eq!(
            method_label("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        assert_eq!(method_label("/hotswap.v1.Fleet/Made-Up"), "unknown");
        assert_eq!(method_label("/grpc.anything/x"), "unknown");
        assert_eq!(method_label("/"), "unknown");
    }
}
