//! Log setup for the daemons: `tracing` to stderr, filtered by `RUST_LOG`
//! (default `info`), as text or one JSON object per line; plus, when
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set, the spans of [`telemetry::TARGET`]
//! exported over OTLP/gRPC (see [`telemetry`]).

use std::str::FromStr;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::telemetry::{self, Exporter, Service};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl LogFormat {
    /// The flag value that parses back to this format.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!(
                "unknown log format {other:?}: expected text or json"
            )),
        }
    }
}

/// Keeps the trace exporter (if any) alive; dropping it flushes the spans
/// still queued. Hold it until the daemon has shut down.
#[must_use = "dropping the guard stops exporting traces"]
pub struct LogGuard {
    _exporter: Option<Exporter>,
}

/// Install the global subscriber. Call once, first thing in `main`, and keep
/// the guard until the end of `main`.
pub fn init(format: LogFormat, service: Service) -> LogGuard {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Each layer has its own filter: `RUST_LOG` decides what is logged, not
    // what is traced.
    let fmt_layer = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            // Colour only for a person at a terminal: never in files,
            // journald or pipes, and never with NO_COLOR set.
            .with_ansi(
                std::io::IsTerminal::is_terminal(&std::io::stderr())
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
            )
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_filter(filter)
            .boxed(),
    };
    let (exporter, problem) = match Exporter::from_env(service) {
        Ok(exporter) => (exporter, None),
        Err(problem) => (None, Some(problem)),
    };
    let trace_layer = exporter.as_ref().map(|exporter| {
        tracing_opentelemetry::layer()
            .with_tracer(exporter.tracer())
            // Spans carry their step's own fields and code location only.
            .with_target(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(Targets::new().with_target(telemetry::TARGET, tracing::Level::TRACE))
    });
    tracing_subscriber::registry()
        .with(fmt_layer as Box<dyn Layer<Registry> + Send + Sync>)
        .with(trace_layer)
        .init();
    if let Some(problem) = problem {
        // Traces are an aid, not a dependency: run without them.
        tracing::warn!(error = %problem, "not exporting traces");
    }
    LogGuard {
        _exporter: exporter,
    }
}
