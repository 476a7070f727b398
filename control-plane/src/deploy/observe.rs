//! What the engine reads from the registry's memory for one step of a
//! deployment: the nodes' reports, and the canary analysis during a hold.

use super::machine::{
    Aggregate, Analysis, Deployment, MAX_LATENCY_WINDOWS, NodeReport, NodeState, Reports,
};
use crate::registry::Registry;

/// What every node of `deployment` reports now, from the registry's memory:
/// the machine's input for one step (the engine's, and the benchmarks').
pub fn observe_nodes(registry: &Registry, deployment: &Deployment) -> Reports {
    let module = &deployment.spec.module;
    // Only the nodes whose reports the step reads: in the middle of a large
    // rollout the waiting waves are skipped.
    let watched: Vec<&str> = deployment
        .nodes
        .iter()
        .filter(|t| t.state.reads_report())
        .map(|t| t.node.as_str())
        .collect();
    let reports = registry.observe(&watched, module, |seen| {
        let current = seen.connected && seen.current;
        match seen.module {
            Some(m) => NodeReport {
                connected: seen.connected,
                current,
                version: m.version.clone(),
                phase: m.phase,
                health: m.health,
                crash_loop: m.crash_loop,
                staged_version: m.staged_version.clone(),
                message: m.message.clone(),
                settling: m.settling.clone(),
                failure: m.failure_kind,
            },
            None => NodeReport {
                connected: seen.connected,
                current,
                ..NodeReport::default()
            },
        }
    });
    watched
        .into_iter()
        .map(str::to_string)
        .zip(reports)
        .collect()
}

/// Canary analysis of a deployment's step: canary nodes (healthy on the new
/// version) against baseline nodes (not updated yet), over the reports in
/// the window from the hold's start plus the warm-up to `now`. Sample
/// sizes: requests are each node's mean request rate over the window times
/// the window's length (reports repeat a window between scrapes, so summing
/// their counts would count twice); usage samples are reports with the
/// module process's usage.
pub fn analyze(
    registry: &Registry,
    deployment: &Deployment,
    hold_since_ms: u64,
    now: u64,
) -> Analysis {
    let module = &deployment.spec.module;
    let from_ms = hold_since_ms.saturating_add(deployment.spec.thresholds.warmup_ms);
    let window_s = now.saturating_sub(from_ms) as f64 / 1000.0;
    let group = |want: NodeState| -> Aggregate {
        let mut aggregate = Aggregate::default();
        let (mut rate_sum, mut errors) = (0.0, 0.0);
        let mut p99s = Vec::new();
        let (mut cpu, mut memory, mut usage_samples) = (0.0, 0.0, 0u32);
        for track in deployment.nodes.iter().filter(|t| t.state == want) {
            aggregate.nodes += 1;
            let history = registry.history(&track.node);
            // The crash-loop flag is current state, not a sample: read it
            // from the latest report whatever the warm-up.
            if let Some(last) = history.last()
                && last.at_ms >= hold_since_ms
                && last
                    .modules
                    .iter()
                    .any(|m| &m.name == module && m.crash_loop)
            {
                aggregate.crash_loops += 1;
            }
            let (mut node_rates, mut node_windows) = (0.0, 0u32);
            for report in history.iter().filter(|r| r.at_ms >= from_ms) {
                let Some(m) = report.modules.iter().find(|m| &m.name == module) else {
                    continue;
                };
                if let Some(w) = m.metrics {
                    node_rates += w.request_rate;
                    node_windows += 1;
                    rate_sum += w.request_rate;
                    errors += w.request_rate * w.error_rate;
                    if let Some(p) = w.latency_p99_seconds {
                        p99s.push(p);
                    }
                }
                // The module's own process, not the node: on a shared host
                // the node's CPU is every other module's too.
                if let Some(u) = m.usage {
                    cpu += f64::from(u.cpu_percent);
                    memory += f64::from(u.memory_resident_kib) * 1024.0;
                    usage_samples += 1;
                }
            }
            if node_windows > 0 {
                aggregate.requests += node_rates / f64::from(node_windows) * window_s;
            }
        }
        if rate_sum > 0.0 {
            aggregate.error_rate = Some(errors / rate_sum);
        }
        if !p99s.is_empty() {
            // The most recent windows are the rank test's samples.
            let keep = p99s.len().saturating_sub(MAX_LATENCY_WINDOWS);
            aggregate.latency_windows = p99s[keep..].to_vec();
            p99s.sort_by(f64::total_cmp);
            // The median of the windows' p99s: robust to one noisy interval.
            aggregate.latency_p99 = Some(p99s[p99s.len() / 2]);
        }
        if usage_samples > 0 {
            aggregate.cpu_percent = Some(cpu / f64::from(usage_samples));
            aggregate.memory_bytes = Some(memory / f64::from(usage_samples));
        }
        aggregate.usage_samples = usage_samples;
        aggregate
    };
    Analysis {
        canary: group(NodeState::Healthy),
        baseline: group(NodeState::Waiting),
    }
}
