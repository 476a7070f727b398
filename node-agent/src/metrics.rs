//! Prometheus metrics of the agent.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
        (metrics, registry)
    }

    pub fn rpc(&self, method: &'static str, result: &'static str) {
        self.rpc_requests
            .get_or_create(&RpcLabels { method, result })
            .inc();
    }
}
