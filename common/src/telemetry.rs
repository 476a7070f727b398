//! Distributed traces: the OTLP exporter behind the log setup
//! (`logging::init`) and the W3C trace-context helpers both daemons use to
//! join one deployment's spans into one trace. This module knows nothing of
//! the log setup; the dependency runs one way, logging to telemetry.
//!
//! Only spans with target [`TARGET`] are exported, so the traces hold exactly
//! the steps of a deployment (control plane: deployment, wave, node command;
//! agent: fetch, verify, unpack, swap, health) and none of the daemons' task
//! spans. The control plane carries a span's context to the agent as a
//! `traceparent` string in the desired state; the agent parents its work to
//! it. Without `OTEL_EXPORTER_OTLP_ENDPOINT` there is no exporter and these
//! spans are ordinary `tracing` spans: the helpers return empty strings and
//! change nothing.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use opentelemetry::context::FutureExt as _;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Status, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Target of the spans that are exported; create them with
/// `tracing::info_span!(target: telemetry::TARGET, "name", ...)`.
pub const TARGET: &str = "hotswap::trace";

/// The variable that turns exporting on (the SDK reads the rest of the
/// standard `OTEL_*` variables itself: `OTEL_BSP_SCHEDULE_DELAY`,
/// `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_TRACES_SAMPLER`, ...).
pub const ENDPOINT_VAR: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

const TRACEPARENT: &str = "traceparent";

/// Bound on flushing what is queued at exit, so an unreachable collector
/// cannot hold up a daemon's shutdown.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Which daemon exports: names the service and picks the sampling policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// Starts traces (one per deployment); samples per `OTEL_TRACES_SAMPLER`.
    ControlPlane,
    /// Only continues traces the control plane started: its spans without a
    /// remote parent (installs outside any deployment) are not recorded.
    Agent,
}

impl Service {
    pub fn name(self) -> &'static str {
        match self {
            Service::ControlPlane => "hotswap-control-plane",
            Service::Agent => "hotswap-agent",
        }
    }
}

/// Whether this process exports traces.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// A running exporter. Dropping it flushes the spans still queued and shuts
/// the exporter down; binaries keep it until after their graceful shutdown.
pub struct Exporter {
    provider: SdkTracerProvider,
    // The tonic channel's connection tasks live on this small runtime of
    // its own, so the exporter works the same before, during and after the
    // daemon's runtime (the batch processor exports from its own thread).
    runtime: Option<tokio::runtime::Runtime>,
}

impl Exporter {
    /// Build the OTLP/gRPC exporter when [`ENDPOINT_VAR`] is set; `Ok(None)`
    /// when it is not.
    pub(crate) fn from_env(service: Service) -> Result<Option<Self>, String> {
        if std::env::var_os(ENDPOINT_VAR).is_none_or(|v| v.is_empty()) {
            return Ok(None);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("otlp-export")
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the trace exporter's runtime: {e}"))?;
        let exporter = runtime
            .block_on(async {
                opentelemetry_otlp::SpanExporter::builder()
                    .with_tonic()
                    .build()
            })
            .map_err(|e| format!("{ENDPOINT_VAR}: cannot build the OTLP exporter: {e}"))?;
        let mut builder = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                Resource::builder()
                    .with_service_name(service.name())
                    .build(),
            );
        if service == Service::Agent {
            builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOff)));
        }
        Ok(Some(Self {
            provider: builder.build(),
            runtime: Some(runtime),
        }))
    }

    pub(crate) fn tracer(&self) -> opentelemetry_sdk::trace::SdkTracer {
        ENABLED.store(true, Ordering::Relaxed);
        self.provider.tracer("hotswap")
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        ENABLED.store(false, Ordering::Relaxed);
        if let Err(e) = self.provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
            eprintln!("warning: flushing traces at exit failed: {e}");
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

/// The W3C `traceparent` of `span` (`00-<trace id>-<span id>-<flags>`), or
/// an empty string when traces are not exported. Starts the span if it was
/// not yet, so set its parent first.
pub fn traceparent_of(span: &tracing::Span) -> String {
    if !enabled() {
        return String::new();
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove(TRACEPARENT).unwrap_or_default()
}

/// The OpenTelemetry context a `traceparent` stands for (empty when it is
/// empty or malformed).
fn remote_context(traceparent: &str) -> opentelemetry::Context {
    if traceparent.is_empty() {
        return opentelemetry::Context::new();
    }
    let carrier = HashMap::from([(TRACEPARENT.to_string(), traceparent.to_string())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// Make `span` a child of the span `traceparent` names (nothing when it is
/// empty or traces are not exported). Call before the span is entered.
pub fn span_with_parent(span: tracing::Span, traceparent: &str) -> tracing::Span {
    if enabled() && !traceparent.is_empty() {
        // Fails only for a span no layer records: nothing to link then.
        let _ = span.set_parent(remote_context(traceparent));
    }
    span
}

/// Run `work` with `traceparent` as the current trace context: spans it
/// creates without a parent of their own become children of that span.
pub async fn in_trace<F: Future>(traceparent: &str, work: F) -> F::Output {
    if !enabled() || traceparent.is_empty() {
        return work.await;
    }
    work.with_context(remote_context(traceparent)).await
}

/// Mark `span` failed with `error` as its status description.
pub fn record_error(span: &tracing::Span, error: impl Display) {
    if enabled() {
        span.set_status(Status::error(error.to_string()));
    }
}

/// Mark `span` failed when `result` is an error; passes `result` through.
pub fn record_result<T, E: Display>(span: &tracing::Span, result: Result<T, E>) -> Result<T, E> {
    if let Err(e) = &result {
        record_error(span, e);
    }
    result
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceContextExt as _;

    use super::*;

    #[test]
    fn disabled_helpers_change_nothing() {
        let span = tracing::info_span!(target: TARGET, "test");
        assert_eq!(traceparent_of(&span), "");
        let span = span_with_parent(
            span,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        record_error(&span, "boom");
        assert!(!remote_context("").span().span_context().is_valid());
    }

    #[test]
    fn traceparent_round_trips_through_the_propagator() {
        let text = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let cx = remote_context(text);
        let span_context = cx.span().span_context().clone();
        assert!(span_context.is_valid());
        assert!(span_context.is_remote());
        assert_eq!(
            span_context.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        let mut carrier = HashMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
        assert_eq!(carrier.get(TRACEPARENT).map(String::as_str), Some(text));
        assert!(!remote_context("garbage").span().span_context().is_valid());
    }
}
