//! Domain ↔ wire conversions for the control plane's services. What an
//! agent sends is converted with `TryFrom` (the shared ones in
//! [`hotswap_common::convert`], the control plane's own here); an error
//! names the field path and why (`modules[2].metrics.error_rate: must be
//! within 0..=1, got NaN`).
//!
//! What a bad message costs: a hello that does not convert ends the session
//! before it starts, with `InvalidArgument` naming the field. A status
//! report never ends the session (it carries no more than the node's own
//! claims, and cutting the session would only make a broken agent
//! reconnect in a loop): each part that does not convert (a module entry,
//! a metrics window, the node usage, a generation) is dropped, counted in
//! `report_claims_dropped` and logged with its field path, and the rest of
//! the report is kept ([`report_from_pb`]).

use hotswap_common::convert::{FieldError, node_module_to_pb};
use hotswap_common::labels::{Labels, validate_labels};
use hotswap_common::model::NodeStatus;
use hotswap_common::pb;
use hotswap_common::status::{Health, ModuleMetrics, ModuleStatus, ModuleUsage, Phase};
use hotswap_common::timefmt::ts_from_ms;

use crate::registry::{NodeState, NodeUsage, Report};
use crate::replicas::ReplicaInfo;
use crate::store::DesiredRecord;

/// Settling versions read from one module's report; more say nothing more
/// (one is enough to keep a node from counting as settled) and would let
/// an agent grow the control plane's memory.
pub const MAX_SETTLING_VERSIONS: usize = 8;
/// Longest settling version kept, in bytes; a longer one is cut (at a
/// character boundary), never dropped, so it still counts as settling.
pub const MAX_VERSION_BYTES: usize = 128;

pub fn server_to_pb(replica: &ReplicaInfo) -> pb::Server {
    pb::Server {
        name: replica.name.clone(),
        endpoint: replica.endpoint.clone(),
        leader: replica.leader,
        ready: replica.ready,
        sessions: replica.sessions,
        started_at: Some(ts_from_ms(replica.started_at_ms)),
        last_seen: Some(ts_from_ms(replica.last_seen_ms)),
    }
}

pub fn node_to_pb(state: &NodeState) -> pb::Node {
    let desired_version = |name: &str| {
        state
            .desired
            .modules
            .get(name)
            .map_or("", |d| d.version.as_str())
    };
    let mut modules: Vec<pb::NodeModule> = state
        .modules
        .iter()
        .map(|m| node_module_to_pb(m, desired_version(&m.name)))
        .collect();
    // Desired modules the agent has not reported yet.
    for (name, desired) in &state.desired.modules {
        if !state.modules.iter().any(|m| &m.name == name) {
            let pending = ModuleStatus {
                name: name.clone(),
                phase: if state.connected {
                    Phase::Installing
                } else {
                    Phase::Stopped
                },
                health: Health::Unknown,
                ..Default::default()
            };
            modules.push(node_module_to_pb(&pending, &desired.version));
        }
    }
    let status = if state.connected {
        NodeStatus::Connected
    } else {
        NodeStatus::Disconnected
    };
    pb::Node {
        id: state.record.id.clone(),
        name: state.record.name.clone(),
        labels: state.record.labels.clone().into_iter().collect(),
        status: status.as_str().to_string(),
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

/// The first message of a session, converted.
#[derive(Clone, Debug, PartialEq)]
pub struct Hello {
    pub node_id: String,
    pub name: String,
    pub labels: Labels,
    pub agent_version: String,
}

impl TryFrom<pb::Hello> for Hello {
    type Error = FieldError;

    fn try_from(hello: pb::Hello) -> Result<Self, Self::Error> {
        let labels: Labels = hello.labels.into_iter().collect();
        validate_labels(&labels)
            .map_err(|e| FieldError::new("labels", e.to_string()).within("hello"))?;
        Ok(Hello {
            node_id: hello.node_id,
            name: hello.name,
            labels,
            agent_version: hello.agent_version,
        })
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
    /// (`modules[2].metrics.error_rate: must be within 0..=1, got NaN;
    /// metrics dropped`).
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
///   most [`MAX_UNDESIRED_MODULES`] others; an entry that does not convert
///   (an invalid module name) and the rest are dropped;
/// - strings: versions cut to [`MAX_VERSION_BYTES`], messages to
///   [`MAX_MESSAGE_BYTES`]; phase, health and failure class are typed (a
///   word this build does not know reads as unknown or none);
/// - a metrics window that does not convert (request rate outside
///   0..=[`MAX_REQUEST_RATE`](hotswap_common::convert::MAX_REQUEST_RATE), error rate outside 0..=1, latency not finite
///   or above
///   [`MAX_LATENCY_SECONDS`](hotswap_common::convert::MAX_LATENCY_SECONDS)) is dropped whole: no metrics is what
///   analysis already handles, a wrong number is not;
/// - node usage with CPU outside 0..=100 %, used memory beyond the total or
///   a total beyond [`MAX_MEMORY_BYTES`] is dropped whole;
/// - a desired generation beyond the one the control plane sent, or an
///   observed generation beyond the desired one, reads as 0 (nothing seen,
///   nothing converged): it cannot make the engine believe a node took a
///   desired state it never received.
///
/// Each drop is a problem naming the field path (`modules[2].name: ...`).
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
            FieldError::new(
                "desired_generation",
                format!(
                    "{} is beyond {}, the newest the control plane sent; read as 0",
                    report.desired_generation, desired.generation
                ),
            )
            .to_string()
        });
        screened.report.desired_generation = 0;
    }
    let claimed_desired = screened.report.desired_generation;
    if report.observed_generation > claimed_desired {
        screened.problem(1, || {
            FieldError::new(
                "observed_generation",
                format!(
                    "{} is beyond the desired generation {claimed_desired}; read as 0",
                    report.observed_generation
                ),
            )
            .to_string()
        });
        screened.report.observed_generation = 0;
    }
    screened.report.usage = report.usage.and_then(|u| match NodeUsage::try_from(u) {
        Ok(usage) => Some(usage),
        Err(e) => {
            screened.problem(1, || format!("{}; node usage dropped", e.within("usage")));
            None
        }
    });
    let mut undesired = 0usize;
    let (mut duplicates, mut unknown) = (0usize, 0usize);
    for (index, mut m) in report.modules.into_iter().enumerate() {
        if screened
            .report
            .modules
            .iter()
            .any(|kept| kept.name == m.name)
        {
            duplicates += 1;
            continue;
        }
        let is_desired = desired.modules.contains_key(&m.name);
        if !is_desired && undesired == MAX_UNDESIRED_MODULES {
            unknown += 1;
            continue;
        }
        let entry = format!("modules[{index}]");
        // The window and the usage convert on their own: a bad one costs
        // itself, not the module's status.
        let window = m.metrics.take();
        let usage = m.usage.take();
        let mut status = match ModuleStatus::try_from(m) {
            Ok(status) => status,
            Err(e) => {
                screened.problem(1, || format!("{}; entry dropped", e.within(&entry)));
                continue;
            }
        };
        if !is_desired {
            undesired += 1;
        }
        status.metrics = window.and_then(|w| match ModuleMetrics::try_from(w) {
            Ok(window) => Some(window),
            Err(e) => {
                screened.problem(1, || {
                    format!("{}; metrics dropped", e.within(format!("{entry}.metrics")))
                });
                None
            }
        });
        status.usage = usage.and_then(|u| match ModuleUsage::try_from(u) {
            Ok(usage) => Some(usage),
            Err(e) => {
                screened.problem(1, || {
                    format!("{}; usage dropped", e.within(format!("{entry}.usage")))
                });
                None
            }
        });
        status.settling = settling_from_pb(std::mem::take(&mut status.settling), &status.version);
        for (text, max) in [
            (&mut status.version, MAX_VERSION_BYTES),
            (&mut status.message, MAX_MESSAGE_BYTES),
            (&mut status.staged_version, MAX_VERSION_BYTES),
            (&mut status.previous_version, MAX_VERSION_BYTES),
        ] {
            *text = cut(std::mem::take(text), max);
        }
        screened.report.modules.push(status);
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
                 {MAX_UNDESIRED_MODULES} others a node may report"
            )
        });
    }
    screened
}

/// A node's usage, if it is believable.
impl TryFrom<pb::NodeUsage> for NodeUsage {
    type Error = FieldError;

    fn try_from(u: pb::NodeUsage) -> Result<Self, Self::Error> {
        if !(0.0..=100.0).contains(&u.cpu_percent) {
            return Err(FieldError::new(
                "cpu_percent",
                format!("must be within 0..=100, got {}", u.cpu_percent),
            ));
        }
        if u.memory_total_bytes > MAX_MEMORY_BYTES {
            return Err(FieldError::new(
                "memory_total_bytes",
                format!(
                    "{} is beyond {MAX_MEMORY_BYTES}, more than any host has",
                    u.memory_total_bytes
                ),
            ));
        }
        if u.memory_used_bytes > u.memory_total_bytes {
            return Err(FieldError::new(
                "memory_used_bytes",
                format!(
                    "{} is beyond the node's total of {}",
                    u.memory_used_bytes, u.memory_total_bytes
                ),
            ));
        }
        Ok(NodeUsage {
            cpu_percent: u.cpu_percent,
            memory_used_bytes: u.memory_used_bytes,
            memory_total_bytes: u.memory_total_bytes,
        })
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
    use crate::registry::MetricsWindow;

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
        // Words this build does not know are typed as unknown, whatever their length.
        assert_eq!((m.phase, m.health), (Phase::Unknown, Health::Unknown));
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
        check(window(10.0, 0.01, Some(0.2)), kept(10.0, 0.01, Some(0.2)));
        check(window(0.0, 0.0, None), kept(0.0, 0.0, None));
        // An agent from before the field was optional: negative is none.
        check(window(0.0, 0.0, Some(-1.0)), kept(0.0, 0.0, None));
        check(window(10.0, 1.0, Some(0.0)), kept(10.0, 1.0, Some(0.0)));
        let (nan, inf) = (f64::NAN, f64::INFINITY);
        for bad in [
            window(nan, 0.0, Some(0.1)),
            window(inf, 0.0, Some(0.1)),
            window(-1.0, 0.0, Some(0.1)),
            window(1e12, 0.0, Some(0.1)),
            window(10.0, nan, Some(0.1)),
            window(10.0, inf, Some(0.1)),
            window(10.0, -0.1, Some(0.1)),
            window(10.0, 1.5, Some(0.1)),
            window(10.0, 0.0, Some(nan)),
            window(10.0, 0.0, Some(inf)),
            window(10.0, 0.0, Some(-inf)),
            window(10.0, 0.0, Some(1e9)),
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

    #[test]
    fn dropped_claims_name_their_field_path() {
        let mut bad_metrics = status("web");
        bad_metrics.metrics = Some(pb::ModuleMetrics {
            request_rate: 1.0,
            error_rate: f64::NAN,
            latency_p99_seconds: None,
            interval_seconds: 5.0,
        });
        let mut bad_usage = status("db");
        bad_usage.usage = Some(pb::ModuleUsage {
            cpu_percent: -5.0,
            memory_resident_bytes: 1 << 20,
        });
        let screened = report_from_pb(
            pb::StatusReport {
                modules: vec![bad_usage, status("../../etc"), bad_metrics],
                usage: Some(pb::NodeUsage {
                    cpu_percent: 101.0,
                    memory_used_bytes: 0,
                    memory_total_bytes: 0,
                }),
                desired_generation: 9,
                ..Default::default()
            },
            &desired(1, &["web", "db"]),
        );
        let expected = [
            "desired_generation: 9 is beyond 1, the newest the control plane sent; read as 0",
            "usage.cpu_percent: must be within 0..=100, got 101; node usage dropped",
            "modules[0].usage.cpu_percent: must be within 0..=102400, got -5; usage dropped",
            "modules[1].name: module name \"../../etc\" is invalid: 2 to 63 characters of \
             lowercase letters, digits and '-', starting with a letter or digit; entry dropped",
            "modules[2].metrics.error_rate: must be within 0..=1, got NaN; metrics dropped",
        ];
        assert_eq!(screened.problems, expected);
        assert_eq!(screened.dropped_claims, 5);
        assert_eq!(names(&screened.report), ["db", "web"]);
        assert_eq!(screened.report.modules[0].usage, None, "the status stays");
        assert_eq!(screened.report.modules[1].metrics, None);
    }

    #[test]
    fn usage_errors_name_the_field() {
        let check = |cpu_percent, memory_used_bytes, memory_total_bytes, expected: &str| {
            let err = NodeUsage::try_from(pb::NodeUsage {
                cpu_percent,
                memory_used_bytes,
                memory_total_bytes,
            })
            .expect_err(expected);
            assert_eq!(err.to_string(), expected);
        };
        check(
            f64::NAN,
            0,
            0,
            "cpu_percent: must be within 0..=100, got NaN",
        );
        check(
            1.0,
            3,
            2,
            "memory_used_bytes: 3 is beyond the node's total of 2",
        );
        check(
            1.0,
            0,
            u64::MAX,
            "memory_total_bytes: 18446744073709551615 is beyond 1125899906842624, more than any host has",
        );
    }

    #[test]
    fn a_hello_with_bad_labels_names_the_field() {
        let hello = |labels: &[(&str, &str)]| pb::Hello {
            node_id: "n1".into(),
            name: "web-1".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            agent_version: "0.1.0".into(),
        };
        let ok = Hello::try_from(hello(&[("environment", "dev")])).expect("valid");
        assert_eq!(
            ok.labels.get("environment").map(String::as_str),
            Some("dev")
        );
        let err = Hello::try_from(hello(&[("bad key!", "x")])).expect_err("invalid label");
        assert_eq!(err.path, "hello.labels");
        assert!(err.to_string().starts_with("hello.labels: "), "{err}");
    }

    #[test]
    fn pending_desired_modules_show_as_installing_or_stopped() {
        let mut state = crate::registry::NodeState {
            record: crate::store::NodeRecord {
                id: "n".into(),
                name: "n".into(),
                labels: Default::default(),
                forced_labels: Default::default(),
                enrolled_at_ms: 0,
                cert_fingerprint: String::new(),
                cert_not_after_ms: 0,
                last_seen_ms: None,
                agent_version: String::new(),
                previous_cert_fingerprint: None,
                previous_cert_not_after_ms: 0,
                token_hash: String::new(),
                enroll_key: String::new(),
            },
            connected: true,
            last_seen_ms: None,
            modules: Vec::new(),
            desired: desired(1, &["web"]),
            usage: None,
            observed_generation: 0,
            agent_desired_generation: 0,
        };
        let module = |state: &NodeState| node_to_pb(state).modules[0].clone();
        let m = module(&state);
        assert_eq!(
            (m.phase.as_str(), m.health.as_str()),
            ("installing", "unknown")
        );
        assert_eq!(node_to_pb(&state).status, "connected");
        state.connected = false;
        assert_eq!(module(&state).phase, "stopped");
        assert_eq!(node_to_pb(&state).status, "disconnected");
    }
}
