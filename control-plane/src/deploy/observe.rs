//! What the engine reads from the registry's memory for one step of a
//! deployment: the nodes' reports, and the canary analysis during a hold.

use std::collections::HashMap;

use super::machine::{
    Aggregate, Analysis, Deployment, MAX_LATENCY_WINDOWS, NodeReport, NodeState, Reports,
};
use crate::registry::{Observed, Registry, Stamp};

/// A node's report as the machine reads it, from what the registry holds.
fn report_of(seen: Observed<'_>) -> NodeReport {
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
}

/// The nodes whose reports the step reads: in the middle of a large rollout
/// the waiting waves are skipped.
fn watched(deployment: &Deployment) -> Vec<&str> {
    deployment
        .nodes
        .iter()
        .filter(|t| t.state.reads_report())
        .map(|t| t.node.as_str())
        .collect()
}

/// The engine's observation of one deployment, kept from one pass to the
/// next. The first pass reads every watched node. Later passes read again
/// only the nodes the registry's change journal names since the last pass
/// (a report that changed more than metrics, a new or ended session, a new
/// desired state), the nodes that became watched, and those with no stamp
/// (connected to another replica, or not at all), so a pass over a 10k-node
/// deployment costs what changed, not a lookup of every node. When the
/// journal no longer reaches back to the last pass, the pass reads every
/// watched node again, skipping those whose [`Stamp`] did not move.
#[derive(Default)]
pub struct Observation {
    reports: Reports,
    /// The stamp each report in `reports` was read under (nodes connected here).
    stamps: HashMap<String, Stamp>,
    /// Where the registry's change journal stood when the last pass began;
    /// `None` before the first.
    cursor: Option<u64>,
    /// Track index of each node of the deployment (its tracks keep their order).
    index: HashMap<String, usize>,
    /// By track index: `reports` holds what the node reports now, as far as
    /// the journal tells. Cleared for a node read with no stamp (read again
    /// every pass) and for a node that changed while it was not watched.
    fresh: Vec<bool>,
}

impl Observation {
    /// The reports of the nodes `deployment` watches now, brought up to
    /// date. What [`observe_nodes`] would answer, except that nodes no
    /// longer watched may keep their last report: the machine does not
    /// read reports of nodes in states that do not read one.
    pub fn refresh(&mut self, registry: &Registry, deployment: &Deployment) -> Reports {
        let tracks = &deployment.nodes;
        if self.fresh.len() != tracks.len() {
            self.index = tracks
                .iter()
                .enumerate()
                .map(|(i, t)| (t.node.clone(), i))
                .collect();
            self.fresh = vec![false; tracks.len()];
            self.cursor = None;
        }
        // Taken before any node is read: what changes from here on is in
        // the journal for the next pass, even if this one already sees it.
        let start = registry.journal_end();
        let changed = self.cursor.and_then(|cursor| {
            let (index, fresh) = (&self.index, &mut self.fresh);
            registry.changed_since(cursor, |node| {
                if let Some(&i) = index.get(node) {
                    fresh[i] = false;
                }
            })
        });
        if changed.is_none() {
            // First pass, or the journal moved on without us: everything.
            self.fresh.iter_mut().for_each(|f| *f = false);
        }
        let picked: Vec<usize> = (0..tracks.len())
            .filter(|&i| tracks[i].state.reads_report() && !self.fresh[i])
            .collect();
        let candidates: Vec<&str> = picked.iter().map(|&i| tracks[i].node.as_str()).collect();
        let stamps = &mut self.stamps;
        let mut read = Vec::new();
        registry.observe_changed(
            &candidates,
            &deployment.spec.module,
            |i, stamp| stamps.get(candidates[i]) == Some(&stamp),
            |i, stamp, seen| read.push((i, stamp, report_of(seen))),
        );
        for &t in &picked {
            self.fresh[t] = true;
        }
        for (i, stamp, report) in read {
            let node = candidates[i];
            match stamp {
                Some(stamp) => {
                    stamps.insert(node.to_string(), stamp);
                }
                None => {
                    stamps.remove(node);
                    // Not followed by the journal: read again every pass.
                    self.fresh[picked[i]] = false;
                }
            }
            self.reports.insert(node.to_string(), report);
        }
        self.cursor = Some(start);
        std::mem::take(&mut self.reports)
    }

    /// Hand back the reports [`Observation::refresh`] lent for a step.
    pub fn restore(&mut self, reports: Reports) {
        self.reports = reports;
    }
}

/// What every node of `deployment` reports now, from the registry's memory:
/// the machine's input for one step (the engine's, and the benchmarks').
pub fn observe_nodes(registry: &Registry, deployment: &Deployment) -> Reports {
    let module = &deployment.spec.module;
    let watched = watched(deployment);
    let reports = registry.observe(&watched, module, report_of);
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use hotswap_common::labels::Labels;
    use hotswap_common::status::{Health, Phase};
    use proptest::prelude::*;

    use super::*;
    use crate::deploy::machine::{Spec, Strategy as Rollout, Thresholds};
    use crate::events::EventLog;
    use crate::metrics::Metrics;
    use crate::registry::{ModuleState, Report, SessionHandle, Written};
    use crate::store::{DesiredRecord, NodeRecord, Store};

    const NODES: usize = 4;

    #[derive(Clone, Debug)]
    enum Op {
        /// A report of node `.0`: phase, version and health picked by the
        /// numbers; `metrics_only` repeats the last one with new metrics.
        Report {
            node: usize,
            phase: u8,
            version: u8,
            health: u8,
            metrics_only: bool,
        },
        /// A new desired state handed to node `.0`'s session.
        Push(usize),
        Detach(usize),
        Attach(usize),
        /// The deployment stops (or starts) watching node `.0`.
        Watch(usize, bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        let node = 0..NODES;
        prop_oneof![
            4 => (node.clone(), 0u8..3, 0u8..2, 0u8..2, any::<bool>()).prop_map(
                |(node, phase, version, health, metrics_only)| Op::Report {
                    node,
                    phase,
                    version,
                    health,
                    metrics_only,
                }
            ),
            1 => node.clone().prop_map(Op::Push),
            1 => node.clone().prop_map(Op::Detach),
            1 => node.clone().prop_map(Op::Attach),
            1 => (node, any::<bool>()).prop_map(|(n, w)| Op::Watch(n, w)),
        ]
    }

    fn id(i: usize) -> String {
        format!("node-{i}")
    }

    /// What a report says of the module, picked by small numbers.
    fn module(phase: u8, version: u8, health: u8, metrics: f64) -> ModuleState {
        ModuleState {
            name: "web".into(),
            version: ["1.0.0", "2.0.0"][usize::from(version)].into(),
            phase: [Phase::Running, Phase::Starting, Phase::Failed][usize::from(phase)],
            health: [Health::Healthy, Health::Unhealthy][usize::from(health)],
            message: format!("phase {phase}"),
            metrics: Some(crate::registry::MetricsWindow {
                request_rate: metrics,
                error_rate: 0.0,
                latency_p99_seconds: None,
            }),
            ..ModuleState::default()
        }
    }

    async fn run(ops: Vec<(Op, bool)>, journal_cap: Option<usize>) -> Result<(), TestCaseError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db"), 1 << 20).expect("open");
        for i in 0..NODES {
            store
                .put_node(&NodeRecord::for_tests(&id(i), &format!("n{i}")))
                .await
                .expect("node");
        }
        let events = Arc::new(EventLog::open(&store, 1000).expect("events"));
        let registry = Registry::new(store, events, Arc::new(Metrics::new().0)).expect("registry");
        if let Some(cap) = journal_cap {
            registry.set_journal_cap(cap);
        }
        let spec = Spec {
            module: "web".into(),
            version: "2.0.0".into(),
            strategy: Rollout::Direct,
            max_failures: 0,
            health_deadline_ms: 10_000,
            progress_deadline_ms: 60_000,
            auto_rollback: true,
            require_approval: false,
            approval_timeout_ms: 0,
            pause_timeout_ms: 0,
            created_by: "alice".into(),
            thresholds: Thresholds::default(),
        };
        let targets = (0..NODES)
            .map(|i| (id(i), format!("n{i}"), "1.0.0".to_string()))
            .collect();
        let (mut deployment, _) = Deployment::new(spec, targets, 1);
        for track in &mut deployment.nodes {
            track.state = NodeState::Updating;
        }
        let mut sessions: Vec<Option<SessionHandle>> = Vec::new();
        for i in 0..NODES {
            let handle = registry
                .attach(&id(i), &format!("sha256:{}", id(i)), Labels::new(), "test")
                .await
                .expect("attach");
            sessions.push(Some(handle));
        }
        let mut last: Vec<ModuleState> = vec![module(0, 0, 0, 0.0); NODES];
        let mut generation = [0u64; NODES];
        let mut observation = Observation::default();
        let steps = ops.len();
        for (step, (op, pass)) in ops.into_iter().enumerate() {
            match op {
                Op::Report {
                    node,
                    phase,
                    version,
                    health,
                    metrics_only,
                } => {
                    let mut m = if metrics_only {
                        last[node].clone()
                    } else {
                        module(phase, version, health, 0.0)
                    };
                    m.metrics = module(0, 0, 0, step as f64).metrics;
                    last[node] = m.clone();
                    if let Some(handle) = &sessions[node] {
                        registry.report(
                            handle,
                            Report {
                                at_ms: step as u64,
                                observed_generation: generation[node],
                                desired_generation: generation[node],
                                modules: vec![m],
                                usage: None,
                            },
                        );
                    }
                }
                Op::Push(node) => {
                    generation[node] += 1;
                    let record = DesiredRecord {
                        generation: generation[node],
                        ..DesiredRecord::default()
                    };
                    registry
                        .push_desired(&Written::of(
                            vec![(id(node), "web".into(), None)],
                            vec![record],
                        ))
                        .expect("push");
                }
                Op::Detach(node) => {
                    if let Some(handle) = sessions[node].take() {
                        registry.detach(&handle).await;
                    }
                }
                Op::Attach(node) => {
                    let handle = registry
                        .attach(
                            &id(node),
                            &format!("sha256:{}", id(node)),
                            Labels::new(),
                            "test",
                        )
                        .await
                        .expect("attach");
                    sessions[node] = Some(handle);
                }
                Op::Watch(node, watch) => {
                    deployment.nodes[node].state = if watch {
                        NodeState::Updating
                    } else {
                        NodeState::Waiting
                    };
                }
            }
            // Passes do not follow every change: several may come between two.
            if !pass && step + 1 < steps {
                continue;
            }
            let fresh = observe_nodes(&registry, &deployment);
            let kept = observation.refresh(&registry, &deployment);
            for (node, report) in &fresh {
                prop_assert_eq!(kept.get(node), Some(report), "step {}: {:?}", step, node);
            }
            observation.restore(kept);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The kept observation answers what a fresh one would, for every
        /// watched node, whatever reports, pushes, reconnects and changes
        /// of the watched set came in between; also when the change
        /// journal is so short that it drops changes between two passes.
        #[test]
        fn a_kept_observation_equals_a_fresh_one(
            ops in proptest::collection::vec((op(), proptest::bool::weighted(0.6)), 1..40),
            journal_cap in proptest::option::of(1usize..4),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            runtime.block_on(run(ops, journal_cap))?;
        }
    }
}
