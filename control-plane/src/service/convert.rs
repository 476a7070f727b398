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

/// Modules a report may name beyond the node's desired state: the ones its
/// agent is still stopping and removing, or holds from an older desired
/// state. A node is asked to run what its desired state lists, so anything
/// further is at most a handful; a compromised node naming thousands of
/// made-up modules would otherwise fill the control plane's memory and,
/// through their transitions, the event log.
pub const MAX_UNDESIRED_MODULES: usize = 16;
/// Longest module message kept, in bytes (an agent's error text); longer
/// ones are cut at a character boundary.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Longest phase or health word kept, in bytes (the known ones are short
/// words; a newer agent's word is kept if it is short too).
pub const MAX_WORD_BYTES: usize = 32;
/// Highest request rate believed, per second and module on one node:
/// beyond it a rate is a lie, and huge finite values would turn a cluster's
/// average into infinity.
pub const MAX_REQUEST_RATE: f64 = 1e9;
/// Highest p99 latency believed, in seconds (a day).
pub const MAX_LATENCY_SECONDS: f64 = 86_400.0;
/// Most memory a node may claim to have (1 PiB, beyond any host Linux runs on).
pub const MAX_MEMORY_BYTES: u64 = 1 << 50;
/// Problems named in one report's screening; further ones are only counted.
const MAX_PROBLEMS_NAMED: usize = 8;

/// A status report as the registry keeps it, and what screening it at the
/// edge took out.
#[derive(Debug)]
pub struct ScreenedReport {
    pub report: Report,
    /// What was dropped, at most [`MAX_PROBLEMS_NAMED`] descriptions
    /// (`module web: metrics dropped (error rate NaN outside 0..=1)`).
    pub problems: Vec<String>,
    /// Problems beyond those named.
    pub more_problems: usize,
    /// Claims dropped: module entries, metrics windows, usage, generations.
    pub dropped_claims: u64,
}

impl ScreenedReport {
    fn problem(&mut self, claims: u64, problem: impl FnOnce() -> String) {
        self.dropped_claims += claims;
        if self.problems.len() < MAX_PROBLEMS_NAMED {
            self.problems.push(problem());
        } else {
            self.more_problems += 1;
        }
    }

    /// Whether anything was dropped.
    pub fn clean(&self) -> bool {
        self.problems.is_empty() && self.more_problems == 0
    }
}

/// Cut `text` to at most `max` bytes, at a character boundary.
fn cut(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// A status report from an agent, screened against what the node may claim
/// (`desired`: the node's desired state as the control plane last handed it
/// to this session). A compromised node can still lie about its own
/// modules, but only within these bounds:
/// - modules: each name once; every module of the desired state, plus at
///   most [`MAX_UNDESIRED_MODULES`] others with valid module names; the
///   rest are dropped;
/// - strings: versions cut to [`MAX_VERSION_BYTES`], messages to
///   [`MAX_MESSAGE_BYTES`], phase and health to [`MAX_WORD_BYTES`];
/// - a metrics window with a non-finite or out-of-range value (request rate
///   outside 0..=[`MAX_REQUEST_RATE`], error rate outside 0..=1, latency not
///   finite or above [`MAX_LATENCY_SECONDS`]) is dropped whole: no metrics
///   is what analysis already handles, a wrong number is not;
/// - node usage with CPU outside 0..=100 %, used memory beyond the total or
///   a total beyond [`MAX_MEMORY_BYTES`] is dropped whole;
/// - a desired generation beyond the one the control plane sent, or an
///   observed generation beyond the desired one, reads as 0 (nothing seen,
///   nothing converged): it cannot make the engine believe a node took a
///   desired state it never received.
pub fn report_from_pb(report: pb::StatusReport, desired: &DesiredRecord) -> ScreenedReport {
    let mut screened = ScreenedReport {
        report: Report {
            // On the deployment engine's clock: canary windows compare them.
            at_ms: crate::clock::steady_now_ms(),
            observed_generation: report.observed_generation,
            desired_generation: report.desired_generation,
            usage: None,
            modules: Vec::new(),
        },
        problems: Vec::new(),
        more_problems: 0,
        dropped_claims: 0,
    };
    if report.desired_generation > desired.generation {
        screened.problem(1, || {
            format!(
                "desired generation {} is beyond {}, the newest the control plane sent; read as 0",
                report.desired_generation, desired.generation
            )
        });
        screened.report.desired_generation = 0;
    }
    let claimed_desired = screened.report.desired_generation;
    if report.observed_generation > claimed_desired {
        screened.problem(1, || {
            format!(
                "observed generation {} is beyond the desired generation {claimed_desired}; read as 0",
                report.observed_generation
            )
        });
        screened.report.observed_generation = 0;
    }
    screened.report.usage = report.usage.and_then(|u| match usage_from_pb(&u) {
        Ok(usage) => Some(usage),
        Err(reason) => {
            screened.problem(1, || format!("node usage dropped ({reason})"));
            None
        }
    });
    let mut undesired = 0usize;
    let (mut duplicates, mut unknown) = (0usize, 0usize);
    for m in report.modules {
        if screened
            .report
            .modules
            .iter()
            .any(|kept| kept.name == m.name)
        {
            duplicates += 1;
            continue;
        }
        if !desired.modules.contains_key(&m.name) {
            if undesired == MAX_UNDESIRED_MODULES
                || !hotswap_common::manifest::valid_module_name(&m.name)
            {
                unknown += 1;
                continue;
            }
            undesired += 1;
        }
        let metrics = m.metrics.and_then(|w| match metrics_from_pb(&w) {
            Ok(window) => Some(window),
            Err(reason) => {
                let name = &m.name;
                screened.problem(1, || format!("module {name}: metrics dropped ({reason})"));
                None
            }
        });
        screened.report.modules.push(ModuleState {
            settling: settling_from_pb(m.settling_versions, &m.version),
            failure_kind: failure_kind_from_pb(&m.failure_kind),
            name: m.name,
            version: cut(m.version, MAX_VERSION_BYTES),
            phase: cut(m.phase, MAX_WORD_BYTES),
            health: cut(m.health, MAX_WORD_BYTES),
            message: cut(m.message, MAX_MESSAGE_BYTES),
            staged_version: cut(m.staged_version, MAX_VERSION_BYTES),
            previous_version: cut(m.previous_version, MAX_VERSION_BYTES),
            restarts: m.restarts,
            crash_loop: m.crash_loop,
            metrics,
        });
    }
    if duplicates > 0 {
        screened.problem(duplicates as u64, || {
            format!("{duplicates} repeated module entries dropped")
        });
    }
    if unknown > 0 {
        screened.problem(unknown as u64, || {
            format!(
                "{unknown} modules dropped: not in the desired state, and beyond the \
                 {MAX_UNDESIRED_MODULES} others a node may report or not a valid module name"
            )
        });
    }
    screened
}

/// A module's metrics window, if every value in it is believable.
fn metrics_from_pb(w: &pb::ModuleMetrics) -> Result<MetricsWindow, String> {
    if !(0.0..=MAX_REQUEST_RATE).contains(&w.request_rate) {
        return Err(format!(
            "request rate {} outside 0..={MAX_REQUEST_RATE}",
            w.request_rate
        ));
    }
    if !(0.0..=1.0).contains(&w.error_rate) {
        return Err(format!("error rate {} outside 0..=1", w.error_rate));
    }
    // Negative (finite) means no requests in the window, so no latency.
    let latency = w.latency_p99_seconds;
    if !latency.is_finite() || latency > MAX_LATENCY_SECONDS {
        return Err(format!(
            "p99 latency {latency}s outside 0..={MAX_LATENCY_SECONDS}"
        ));
    }
    Ok(MetricsWindow {
        request_rate: w.request_rate,
        error_rate: w.error_rate,
        latency_p99_seconds: (latency >= 0.0).then_some(latency),
    })
}

/// A node's usage, if it is believable.
fn usage_from_pb(u: &pb::NodeUsage) -> Result<NodeUsage, String> {
    if !(0.0..=100.0).contains(&u.cpu_percent) {
        return Err(format!("CPU {}% outside 0..=100", u.cpu_percent));
    }
    if u.memory_total_bytes > MAX_MEMORY_BYTES {
        return Err(format!(
            "memory total {} bytes beyond {MAX_MEMORY_BYTES}",
            u.memory_total_bytes
        ));
    }
    if u.memory_used_bytes > u.memory_total_bytes {
        return Err(format!(
            "memory used {} bytes beyond the node's total of {}",
            u.memory_used_bytes, u.memory_total_bytes
        ));
    }
    Ok(NodeUsage {
        cpu_percent: u.cpu_percent,
        memory_used_bytes: u.memory_used_bytes,
        memory_total_bytes: u.memory_total_bytes,
    })
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
    for version in versions {
        if settling.len() == MAX_SETTLING_VERSIONS {
            break;
        }
        let version = cut(version, MAX_VERSION_BYTES);
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

    fn desired(generation: u64, modules: &[&str]) -> DesiredRecord {
        DesiredRecord {
            generation,
            revision: generation,
            modules: modules
                .iter()
                .map(|m| (m.to_string(), crate::store::DesiredModuleRecord::default()))
                .collect(),
        }
    }

    fn status(name: &str) -> pb::ModuleStatus {
        pb::ModuleStatus {
            name: name.into(),
            version: "1.0.0".into(),
            phase: "running".into(),
            health: "healthy".into(),
            ..Default::default()
        }
    }

    fn names(report: &Report) -> Vec<&str> {
        report.modules.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn a_report_names_desired_modules_and_a_few_others_once_each() {
        let mut modules: Vec<pb::ModuleStatus> =
            (0..20_000).map(|i| status(&format!("fake-{i}"))).collect();
        modules.insert(5_000, status("web"));
        modules.push(status("web"));
        modules.push(status("../../etc"));
        let screened = report_from_pb(
            pb::StatusReport {
                modules,
                ..Default::default()
            },
            &desired(3, &["web", "db"]),
        );
        let kept = names(&screened.report);
        assert_eq!(kept.len(), MAX_UNDESIRED_MODULES + 1, "{kept:?}");
        assert_eq!(&kept[..2], ["fake-0", "fake-1"]);
        assert!(kept.contains(&"web"), "a desired module is never dropped");
        assert_eq!(screened.dropped_claims, 20_000 - 16 + 1 + 1);
        assert!(!screened.clean());
        assert!(
            screened
                .problems
                .iter()
                .any(|p| p.contains("19985 modules dropped")),
            "{:?}",
            screened.problems
        );

        // An honest report is untouched.
        let honest = report_from_pb(
            pb::StatusReport {
                modules: vec![status("web"), status("old-module")],
                observed_generation: 3,
                desired_generation: 3,
                usage: Some(pb::NodeUsage {
                    cpu_percent: 12.5,
                    memory_used_bytes: 1 << 30,
                    memory_total_bytes: 4 << 30,
                }),
            },
            &desired(3, &["web"]),
        );
        assert!(honest.clean(), "{:?}", honest.problems);
        assert_eq!(names(&honest.report), ["web", "old-module"]);
        assert_eq!(honest.report.observed_generation, 3);
        assert!(honest.report.usage.is_some());
    }

    #[test]
    fn strings_in_a_report_are_cut() {
        let mut m = status("web");
        m.version = "1".repeat(10_000);
        m.message = "é".repeat(10_000);
        m.phase = "p".repeat(1_000);
        m.health = "h".repeat(1_000);
        m.previous_version = "2".repeat(10_000);
        m.staged_version = "3".repeat(10_000);
        let screened = report_from_pb(
            pb::StatusReport {
                modules: vec![m],
                ..Default::default()
            },
            &desired(1, &["web"]),
        );
        let m = &screened.report.modules[0];
        assert_eq!(m.version.len(), MAX_VERSION_BYTES);
        assert_eq!(m.previous_version.len(), MAX_VERSION_BYTES);
        assert_eq!(m.staged_version.len(), MAX_VERSION_BYTES);
        assert!(m.message.len() <= MAX_MESSAGE_BYTES && m.message.starts_with('é'));
        assert_eq!(
            (m.phase.len(), m.health.len()),
            (MAX_WORD_BYTES, MAX_WORD_BYTES)
        );
    }

    #[test]
    fn unbelievable_metrics_are_dropped_whole() {
        let window = |request_rate, error_rate, latency_p99_seconds| pb::ModuleMetrics {
            request_rate,
            error_rate,
            latency_p99_seconds,
            interval_seconds: 5.0,
        };
        let check = |w: pb::ModuleMetrics, expected: Option<MetricsWindow>| {
            let mut m = status("web");
            m.metrics = Some(w);
            let screened = report_from_pb(
                pb::StatusReport {
                    modules: vec![m],
                    ..Default::default()
                },
                &desired(1, &["web"]),
            );
            assert_eq!(screened.report.modules[0].metrics, expected, "{w:?}");
            assert_eq!(screened.clean(), expected.is_some(), "{w:?}");
        };
        let kept = |r, e, l| {
            Some(MetricsWindow {
                request_rate: r,
                error_rate: e,
                latency_p99_seconds: l,
            })
        };
        check(window(10.0, 0.01, 0.2), kept(10.0, 0.01, Some(0.2)));
        check(window(0.0, 0.0, -1.0), kept(0.0, 0.0, None));
        check(window(10.0, 1.0, 0.0), kept(10.0, 1.0, Some(0.0)));
        let (nan, inf) = (f64::NAN, f64::INFINITY);
        for bad in [
            window(nan, 0.0, 0.1),
            window(inf, 0.0, 0.1),
            window(-1.0, 0.0, 0.1),
            window(1e12, 0.0, 0.1),
            window(10.0, nan, 0.1),
            window(10.0, inf, 0.1),
            window(10.0, -0.1, 0.1),
            window(10.0, 1.5, 0.1),
            window(10.0, 0.0, nan),
            window(10.0, 0.0, inf),
            window(10.0, 0.0, -inf),
            window(10.0, 0.0, 1e9),
        ] {
            check(bad, None);
        }
    }

    #[test]
    fn unbelievable_usage_and_generations_are_dropped() {
        let usage = |cpu_percent, memory_used_bytes, memory_total_bytes| {
            report_from_pb(
                pb::StatusReport {
                    usage: Some(pb::NodeUsage {
                        cpu_percent,
                        memory_used_bytes,
                        memory_total_bytes,
                    }),
                    ..Default::default()
                },
                &desired(0, &[]),
            )
            .report
            .usage
        };
        assert!(usage(50.0, 1 << 30, 8 << 30).is_some());
        assert!(usage(100.0, 0, 0).is_some());
        assert!(usage(f64::NAN, 1, 2).is_none());
        assert!(usage(f64::INFINITY, 1, 2).is_none());
        assert!(usage(-1.0, 1, 2).is_none());
        assert!(usage(101.0, 1, 2).is_none());
        assert!(usage(1.0, 3, 2).is_none(), "more used than the node has");
        assert!(usage(1.0, u64::MAX / 2, u64::MAX).is_none());

        let generations = |observed_generation, desired_generation, sent| {
            let r = report_from_pb(
                pb::StatusReport {
                    observed_generation,
                    desired_generation,
                    ..Default::default()
                },
                &desired(sent, &[]),
            );
            (r.report.observed_generation, r.report.desired_generation)
        };
        assert_eq!(generations(4, 5, 5), (4, 5));
        assert_eq!(generations(5, 5, 7), (5, 5), "not yet received 6 and 7");
        assert_eq!(generations(u64::MAX, u64::MAX, 5), (0, 0));
        assert_eq!(generations(6, 5, 5), (0, 5), "observed beyond desired");
        assert_eq!(generations(5, 6, 5), (0, 0), "a generation never sent");
    }
}
