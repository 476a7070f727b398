//! Domain ↔ wire conversions for the control plane's services.

use hotswap_common::pb;
use hotswap_common::timefmt::ts_from_ms;

use crate::registry::{MetricsWindow, ModuleState, NodeState, NodeUsage, Report};
use crate::store::DesiredRecord;

pub fn node_to_pb(state: &NodeState) -> pb::Node {
    let mut modules: Vec<pb::NodeModule> = state
        .modules
        .iter()
        .map(|m| {
            module_to_pb(
                m,
                state
                    .desired
                    .modules
                    .get(&m.name)
                    .map(|d| d.version.as_str()),
            )
        })
        .collect();
    // Desired modules the agent has not reported yet.
    for (name, desired) in &state.desired.modules {
        if !state.modules.iter().any(|m| &m.name == name) {
            modules.push(pb::NodeModule {
                name: name.clone(),
                phase: if state.connected {
                    "installing"
                } else {
                    "stopped"
                }
                .to_string(),
                health: "unknown".to_string(),
                desired_version: desired.version.clone(),
                ..Default::default()
            });
        }
    }
    pb::Node {
        id: state.record.id.clone(),
        name: state.record.name.clone(),
        labels: state.record.labels.clone().into_iter().collect(),
        status: if state.connected {
            "connected"
        } else {
            "disconnected"
        }
        .to_string(),
        last_seen: state.last_seen_ms.map(ts_from_ms),
        modules,
        agent_version: state.record.agent_version.clone(),
        enrolled_at: Some(ts_from_ms(state.record.enrolled_at_ms)),
        usage: state.usage.map(|u| pb::NodeUsageView {
            cpu_percent: u.cpu_percent,
            memory_used_bytes: u.memory_used_bytes,
            memory_total_bytes: u.memory_total_bytes,
        }),
        desired_generation: state.desired.generation,
        observed_generation: state.observed_generation,
    }
}

fn module_to_pb(module: &ModuleState, desired_version: Option<&str>) -> pb::NodeModule {
    pb::NodeModule {
        name: module.name.clone(),
        version: module.version.clone(),
        phase: module.phase.clone(),
        health: module.health.clone(),
        message: module.message.clone(),
        staged_version: module.staged_version.clone(),
        previous_version: module.previous_version.clone(),
        restarts: module.restarts,
        crash_loop: module.crash_loop,
        desired_version: desired_version.unwrap_or_default().to_string(),
        metrics: module.metrics.map(|m| pb::ModuleMetricsView {
            request_rate: m.request_rate,
            error_rate: m.error_rate,
            latency_p99_seconds: m.latency_p99_seconds.unwrap_or(-1.0),
        }),
    }
}

/// A status report from an agent, as the registry keeps it.
pub fn report_from_pb(report: pb::StatusReport) -> Report {
    Report {
        // On the deployment engine's clock: canary windows compare them.
        at_ms: crate::clock::now_ms(),
        observed_generation: report.observed_generation,
        desired_generation: report.desired_generation,
        usage: report.usage.map(|u| NodeUsage {
            cpu_percent: u.cpu_percent,
            memory_used_bytes: u.memory_used_bytes,
            memory_total_bytes: u.memory_total_bytes,
        }),
        modules: report
            .modules
            .into_iter()
            .map(|m| ModuleState {
                name: m.name,
                version: m.version,
                phase: m.phase,
                health: m.health,
                message: m.message,
                staged_version: m.staged_version,
                previous_version: m.previous_version,
                restarts: m.restarts,
                crash_loop: m.crash_loop,
                metrics: m.metrics.map(|w| MetricsWindow {
                    request_rate: w.request_rate,
                    error_rate: w.error_rate,
                    latency_p99_seconds: (w.latency_p99_seconds >= 0.0)
                        .then_some(w.latency_p99_seconds),
                }),
            })
            .collect(),
    }
}

pub fn desired_to_pb(desired: &DesiredRecord) -> pb::DesiredState {
    pb::DesiredState {
        generation: desired.generation,
        modules: desired
            .modules
            .iter()
            .map(|(name, m)| pb::DesiredModule {
                name: name.clone(),
                version: m.version.clone(),
                staged_version: m.staged_version.clone(),
                traceparent: m.traceparent.clone(),
            })
            .collect(),
    }
}
