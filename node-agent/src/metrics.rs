//! Prometheus metrics of the agent. Session metrics live in [`Metrics`],
//! passed to the session code; the module lifecycle metrics (swaps, probes,
//! fetches, module health) are process-wide statics, recorded where the work
//! happens deep in the reconciler and runtimes, and registered here.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SwapLabels {
    pub module: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModuleLabel {
    pub module: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub kind: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HealthLabels {
    pub module: String,
    pub health: &'static str,
}

fn seconds_histogram() -> Histogram {
    // 1 ms .. ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Activations (swaps) by module and result.
pub static SWAPS: LazyLock<Family<SwapLabels, Counter>> = LazyLock::new(Family::default);
/// Time from "activating" to "active" (or failure), by module.
pub static SWAP_SECONDS: LazyLock<Family<ModuleLabel, Histogram>> =
    LazyLock::new(|| Family::new_with_constructor(seconds_histogram));
/// Health probe durations by probe kind and result.
pub static PROBE_SECONDS: LazyLock<Family<ProbeLabels, Histogram>> =
    LazyLock::new(|| Family::new_with_constructor(seconds_histogram));
/// Artifact bytes downloaded from the control plane.
pub static FETCHED_BYTES: LazyLock<Counter> = LazyLock::new(Counter::default);
/// 1 for each module's current health, 0 for the others.
pub static MODULE_HEALTH: LazyLock<Family<HealthLabels, Gauge>> = LazyLock::new(Family::default);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CompileLabels {
    pub module: String,
    /// `hit` (loaded from the on-disk cache) or `miss` (compiled).
    pub cache: &'static str,
}

fn micro_histogram() -> Histogram {
    // 1 µs .. ~65 ms.
    Histogram::new(exponential_buckets(1e-6, 2.0, 17))
}

/// The pointer switch of a wasm swap, by module (SPEC §10: microseconds).
pub static WASM_SWITCH_SECONDS: LazyLock<Family<ModuleLabel, Histogram>> =
    LazyLock::new(|| Family::new_with_constructor(micro_histogram));
/// Compiling (or loading from the cache) a wasm component, by module and cache outcome.
pub static WASM_COMPILE_SECONDS: LazyLock<Family<CompileLabels, Histogram>> =
    LazyLock::new(|| Family::new_with_constructor(seconds_histogram));

/// Record one wasm swap's switch.
pub fn record_wasm_switch(module: &str, switch: std::time::Duration) {
    WASM_SWITCH_SECONDS
        .get_or_create(&ModuleLabel {
            module: module.to_string(),
        })
        .observe(switch.as_secs_f64());
}

/// Record what preparing a wasm version cost: a compile, or a load of the
/// compiled code from the cache.
pub fn record_wasm_compile(module: &str, compile: std::time::Duration, cache_hit: bool) {
    WASM_COMPILE_SECONDS
        .get_or_create(&CompileLabels {
            module: module.to_string(),
            cache: if cache_hit { "hit" } else { "miss" },
        })
        .observe(compile.as_secs_f64());
}

/// Record a module's health in [`MODULE_HEALTH`].
pub fn set_module_health(module: &str, health: &'static str) {
    for h in ["healthy", "unhealthy", "unknown"] {
        MODULE_HEALTH
            .get_or_create(&HealthLabels {
                module: module.to_string(),
                health: h,
            })
            .set(i64::from(h == health));
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Default)]
pub struct Metrics {
    pub connected: Gauge,
    pub rpc_requests: Family<RpcLabels, Counter>,
    pub heartbeats_sent: Counter,
    pub reconnects: Counter,
}

impl Metrics {
    pub fn new() -> (Self, Registry) {
        let metrics = Metrics::default();
        let mut registry = Registry::with_prefix("hotswap_agent");
        registry.register(
            "connected",
            "1 while the session to the control plane is up",
            metrics.connected.clone(),
        );
        registry.register(
            "rpc_requests",
            "Calls to the control plane by method and result",
            metrics.rpc_requests.clone(),
        );
        registry.register(
            "heartbeats_sent",
            "Heartbeats sent on the session",
            metrics.heartbeats_sent.clone(),
        );
        registry.register(
            "reconnects",
            "Session attempts after the first",
            metrics.reconnects.clone(),
        );
        registry.register(
            "swaps",
            "Module activations (swaps) by module and result",
            SWAPS.clone(),
        );
        registry.register(
            "swap_duration_seconds",
            "Time to activate a module version, from the start of the swap to serving",
            SWAP_SECONDS.clone(),
        );
        registry.register(
            "probe_duration_seconds",
            "Health probe durations by kind and result",
            PROBE_SECONDS.clone(),
        );
        registry.register(
            "fetched_bytes",
            "Artifact bytes downloaded from the control plane",
            FETCHED_BYTES.clone(),
        );
        registry.register(
            "module_health",
            "1 for the current health of each module",
            MODULE_HEALTH.clone(),
        );
        registry.register(
            "wasm_switch_seconds",
            "The pointer switch of wasm swaps, by module",
            WASM_SWITCH_SECONDS.clone(),
        );
        registry.register(
            "wasm_compile_seconds",
            "Compiling or loading a wasm component, by module and cache outcome (hit or miss)",
            WASM_COMPILE_SECONDS.clone(),
        );
        (metrics, registry)
    }

    pub fn rpc(&self, method: &'static str, result: &'static str) {
        self.rpc_requests
            .get_or_create(&RpcLabels { method, result })
            .inc();
    }
}
