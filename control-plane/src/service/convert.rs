//! Domain ↔ wire conversions for the control plane's services.

use hotswap_common::pb;
use hotswap_common::timefmt::ts_from_ms;

use crate::deploy::machine::FailureKind;
use crate::registry::{MetricsWindow, ModuleState, NodeState, NodeUsage, Report};
use crate::store::DesiredRecord;

/// Settling versions read from one module's report; more say nothing more
/// (one is enough to keep a node from counting as settled) and would let
/// an agent grow the control plane's memory.
pub const MAX_SETTLING_VERSIONS: usize = 8;
/// Longest settling version kept, in bytes; a longer one is cut (at a
/// character boundary), never dropped, so it still counts as settling.
pub const MAX_VERSION_BYTES: usize = 128;

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
        settling_versions: module.settling.clone(),
        failure_kind: module
            .failure_kind
            .map(|k| k.as_str().to_string())
            .unwrap_or_default(),
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
                settling: settling_from_pb(m.settling_versions, &m.version),
                failure_kind: failure_kind_from_pb(&m.failure_kind),
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

/// An agent's `failure_kind`: a class this control plane does not know
/// (or none) is no class.
pub fn failure_kind_from_pb(word: &str) -> Option<FailureKind> {
    match word {
        "release" => Some(FailureKind::Release),
        "infrastructure" => Some(FailureKind::Infrastructure),
        _ => None,
    }
}

/// An agent's settling versions: empty entries and the active version
/// itself dropped, duplicates once, at most [`MAX_SETTLING_VERSIONS`] of at
/// most [`MAX_VERSION_BYTES`] each.
pub fn settling_from_pb(versions: Vec<String>, active: &str) -> Vec<String> {
    let mut settling: Vec<String> = Vec::new();
    for mut version in versions {
        if settling.len() == MAX_SETTLING_VERSIONS {
            break;
        }
        if version.len() > MAX_VERSION_BYTES {
            let mut cut = MAX_VERSION_BYTES;
            while !version.is_char_boundary(cut) {
                cut -= 1;
            }
            version.truncate(cut);
        }
        if version.is_empty() || version == active || settling.contains(&version) {
            continue;
        }
        settling.push(version);
    }
    settling
}

/// The desired state for a node whose environment asks for signatures by
/// `min_signatures` distinct trusted keys: its agent enforces that too.
pub fn desired_to_pb(desired: &DesiredRecord, min_signatures: u32) -> pb::DesiredState {
    pb::DesiredState {
        generation: desired.generation,
        min_signatures,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_kinds_from_the_wire() {
        let check = |word: &str, expected: Option<FailureKind>| {
            assert_eq!(failure_kind_from_pb(word), expected, "{word:?}");
        };
        check("release", Some(FailureKind::Release));
        check("infrastructure", Some(FailureKind::Infrastructure));
        check("", None);
        check("Release", None);
        check("disk", None);
        check(&"x".repeat(10_000), None);
    }

    #[test]
    fn settling_versions_are_validated_and_capped() {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let check = |input: &[&str], active: &str, expected: &[&str]| {
            assert_eq!(
                settling_from_pb(strings(input), active),
                strings(expected),
                "{input:?} with {active:?} active"
            );
        };
        check(&[], "1.0.0", &[]);
        check(&["2.0.0"], "1.0.0", &["2.0.0"]);
        // The active version, empty entries and repeats say nothing.
        check(&["1.0.0", "", "2.0.0", "2.0.0"], "1.0.0", &["2.0.0"]);
        let many: Vec<String> = (0..100).map(|i| format!("0.0.{i}")).collect();
        let kept = settling_from_pb(many.clone(), "");
        assert_eq!(kept, many[..MAX_SETTLING_VERSIONS].to_vec());
        // A long version is cut, not dropped: it still settles.
        let long = format!("1.0.0-{}", "é".repeat(200));
        let kept = settling_from_pb(vec![long.clone()], "1.0.0");
        assert_eq!(kept.len(), 1);
        assert!(kept[0].len() <= MAX_VERSION_BYTES && long.starts_with(&kept[0]));
    }
}
