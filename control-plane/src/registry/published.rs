//! What a replica publishes of each agent session it holds (on etcd, under
//! `sessions/<node_id>` with the replica's lease) and when: the record's
//! format, and the filter that decides which reports are worth a write.
//! Pure: no I/O, no clock reads; the registry feeds it times.
//!
//! A replica does not write every report. It writes when a session starts,
//! when a report shows a transition (a module's phase, health, version,
//! settling versions, restarts, crash loop or failure; the generations the
//! agent has seen), and when the node's metrics or usage moved
//! *materially* since the last sample it published, at most once per
//! [`METRICS_EVERY_MS`]. Each write carries every sample since the previous
//! one, so a reader's history of the node is complete up to the write.
//! Between writes the holder's promise is: every report since the last
//! published sample was within the thresholds of [`moved_materially`] of
//! it (or moved at most [`METRICS_EVERY_MS`] ago), so a reader may extend
//! the last sample until the next write ([`extend_history`]).

use std::collections::VecDeque;

use hotswap_common::status::{FailureKind, Health, Phase};
use serde::{Deserialize, Serialize};

use super::history::{HISTORY_LEN, ModuleSample, Sample, UsageSample};
use super::{MetricsWindow, ModuleState, NodeUsage};

/// The least time between two writes caused by metrics alone, per node:
/// at 50k nodes, at most 5k writes a second even if every node's metrics
/// moved all the time (see ARCHITECTURE.md, "Sessions on every replica").
pub const METRICS_EVERY_MS: u64 = 10_000;

/// Samples one record carries at most (two minutes of 5 s reports): a
/// holder that could not write for longer sends the newest.
pub const SAMPLES_PER_RECORD: usize = 24;

/// The report interval a reader assumes when it extends a node's last
/// published sample: the agent's periodic summary (`report_interval`,
/// 5 s by default).
pub const ASSUMED_REPORT_EVERY_MS: u64 = 5_000;

/// One session as its replica publishes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The replica holding the session (`run --name`).
    pub replica: String,
    /// The session's number on that replica: a new one is a new session.
    pub session: u64,
    pub connected_at_ms: u64,
    /// The time of the newest report or session event this record shows.
    pub last_seen_ms: u64,
    /// The agent sent a status report in this session.
    pub reported: bool,
    pub observed_generation: u64,
    pub agent_desired_generation: u64,
    #[serde(default)]
    pub modules: Vec<ModuleRecord>,
    #[serde(default)]
    pub usage: Option<UsageRecord>,
    /// Samples since the previous record of this session, oldest first.
    #[serde(default)]
    pub samples: Vec<SampleRecord>,
}

/// A module's status as published: the report's fields, metrics included.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModuleRecord {
    pub name: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub phase: Phase,
    #[serde(default)]
    pub health: Health,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub staged_version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub previous_version: String,
    #[serde(default)]
    pub restarts: u32,
    #[serde(default)]
    pub crash_loop: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsRecord>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub settling: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_kind: Option<FailureKind>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetricsRecord {
    pub request_rate: f64,
    pub error_rate: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_p99_seconds: Option<f64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub cpu_percent: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
}

/// One [`Sample`] as published.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SampleRecord {
    pub at_ms: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub modules: Vec<ModuleSampleRecord>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModuleSampleRecord {
    pub name: String,
    #[serde(default)]
    pub crash_loop: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsRecord>,
    /// The module process's CPU, percent of one core.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_percent: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_resident_kib: Option<u32>,
}

impl From<&MetricsWindow> for MetricsRecord {
    fn from(w: &MetricsWindow) -> Self {
        Self {
            request_rate: w.request_rate,
            error_rate: w.error_rate,
            latency_p99_seconds: w.latency_p99_seconds,
        }
    }
}

impl From<&MetricsRecord> for MetricsWindow {
    fn from(w: &MetricsRecord) -> Self {
        Self {
            request_rate: w.request_rate,
            error_rate: w.error_rate,
            latency_p99_seconds: w.latency_p99_seconds,
        }
    }
}

impl From<&ModuleState> for ModuleRecord {
    fn from(m: &ModuleState) -> Self {
        Self {
            name: m.name.clone(),
            version: m.version.clone(),
            phase: m.phase,
            health: m.health,
            message: m.message.clone(),
            staged_version: m.staged_version.clone(),
            previous_version: m.previous_version.clone(),
            restarts: m.restarts,
            crash_loop: m.crash_loop,
            metrics: m.metrics.as_ref().map(MetricsRecord::from),
            settling: m.settling.clone(),
            failure_kind: m.failure_kind,
        }
    }
}

impl From<&ModuleRecord> for ModuleState {
    fn from(m: &ModuleRecord) -> Self {
        Self {
            name: m.name.clone(),
            version: m.version.clone(),
            phase: m.phase,
            health: m.health,
            message: m.message.clone(),
            staged_version: m.staged_version.clone(),
            previous_version: m.previous_version.clone(),
            restarts: m.restarts,
            crash_loop: m.crash_loop,
            metrics: m.metrics.as_ref().map(MetricsWindow::from),
            settling: m.settling.clone(),
            failure_kind: m.failure_kind,
            // Usage is analysis evidence: published in the samples only.
            usage: None,
        }
    }
}

impl From<&NodeUsage> for UsageRecord {
    fn from(u: &NodeUsage) -> Self {
        Self {
            cpu_percent: u.cpu_percent,
            memory_used_bytes: u.memory_used_bytes,
            memory_total_bytes: u.memory_total_bytes,
        }
    }
}

impl From<&UsageRecord> for NodeUsage {
    fn from(u: &UsageRecord) -> Self {
        Self {
            cpu_percent: u.cpu_percent,
            memory_used_bytes: u.memory_used_bytes,
            memory_total_bytes: u.memory_total_bytes,
        }
    }
}

impl From<&Sample> for SampleRecord {
    fn from(s: &Sample) -> Self {
        Self {
            at_ms: s.at_ms,
            modules: s
                .modules
                .iter()
                .map(|m| ModuleSampleRecord {
                    name: m.name.clone(),
                    crash_loop: m.crash_loop,
                    metrics: m.metrics.as_ref().map(MetricsRecord::from),
                    cpu_percent: m.usage.map(|u| u.cpu_percent),
                    memory_resident_kib: m.usage.map(|u| u.memory_resident_kib),
                })
                .collect(),
        }
    }
}

impl From<&SampleRecord> for Sample {
    fn from(s: &SampleRecord) -> Self {
        Self {
            at_ms: s.at_ms,
            modules: s
                .modules
                .iter()
                .map(|m| ModuleSample {
                    name: m.name.clone(),
                    crash_loop: m.crash_loop,
                    metrics: m.metrics.as_ref().map(MetricsWindow::from),
                    usage: match (m.cpu_percent, m.memory_resident_kib) {
                        (Some(cpu_percent), Some(memory_resident_kib)) => Some(UsageSample {
                            cpu_percent,
                            memory_resident_kib,
                        }),
                        _ => None,
                    },
                })
                .collect(),
        }
    }
}

impl SessionRecord {
    pub fn encode(&self) -> Vec<u8> {
        crate::store::encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// Whether the metrics or usage of `now` differ from `published` enough to
/// be worth a write: a module's metrics appearing or going, its request
/// rate moving by more than 20% (and 0.1/s), its error rate by more than
/// half a percentage point, its p99 by more than 10%, a crash loop
/// starting or ending; its process's CPU moving by 10 points or memory by
/// 10%.
pub fn moved_materially(published: &Sample, now: &Sample) -> bool {
    fn relative(a: f64, b: f64, share: f64, floor: f64) -> bool {
        let d = (a - b).abs();
        d > floor && d > share * a.abs().max(b.abs())
    }
    let modules_moved = |from: &Sample, to: &Sample| {
        to.modules.iter().any(|m| {
            let Some(old) = from.modules.iter().find(|o| o.name == m.name) else {
                return true;
            };
            if old.crash_loop != m.crash_loop {
                return true;
            }
            let metrics_moved = match (&old.metrics, &m.metrics) {
                (None, None) => false,
                (Some(a), Some(b)) => {
                    relative(a.request_rate, b.request_rate, 0.2, 0.1)
                        || (a.error_rate - b.error_rate).abs() > 0.005
                        || match (a.latency_p99_seconds, b.latency_p99_seconds) {
                            (Some(x), Some(y)) => relative(x, y, 0.1, 0.0),
                            (None, None) => false,
                            _ => true,
                        }
                }
                _ => true,
            };
            let usage_moved = match (old.usage, m.usage) {
                (None, None) => false,
                (Some(a), Some(b)) => {
                    (a.cpu_percent - b.cpu_percent).abs() > 10.0
                        || relative(
                            f64::from(a.memory_resident_kib),
                            f64::from(b.memory_resident_kib),
                            0.1,
                            0.0,
                        )
                }
                _ => true,
            };
            metrics_moved || usage_moved
        })
    };
    modules_moved(published, now) || modules_moved(now, published)
}

/// What the holder of a session remembers about what it published of it.
#[derive(Clone, Debug, Default)]
pub struct Publication {
    /// When the last record was queued (`None`: none yet).
    last_at_ms: Option<u64>,
    /// The newest sample of the last record: what readers extend.
    last_sample: Option<Sample>,
    /// Samples since the last record, oldest first.
    unpublished: VecDeque<Sample>,
    /// A sample since the last record moved materially: write once
    /// [`METRICS_EVERY_MS`] passed.
    moved: bool,
}

/// Whether a report is written now.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Write a record with these samples (oldest first).
    Publish(Vec<Sample>),
    Hold,
}

impl Publication {
    /// A session started: its record is written now, without samples.
    pub fn started(&mut self, now_ms: u64) {
        self.last_at_ms = Some(now_ms);
    }

    /// A report arrived at `now_ms` with `sample`; `transition` when it
    /// changed something other than metrics and usage (or is the session's
    /// first).
    pub fn on_report(&mut self, now_ms: u64, transition: bool, sample: Sample) -> Decision {
        let moved = self
            .last_sample
            .as_ref()
            .is_none_or(|last| moved_materially(last, &sample));
        self.moved |= moved;
        if self.unpublished.len() == SAMPLES_PER_RECORD {
            self.unpublished.pop_front();
        }
        self.unpublished.push_back(sample);
        let due = self
            .last_at_ms
            .is_none_or(|at| now_ms.saturating_sub(at) >= METRICS_EVERY_MS);
        if !(transition || (self.moved && due)) {
            return Decision::Hold;
        }
        self.last_at_ms = Some(now_ms);
        self.moved = false;
        let samples: Vec<Sample> = self.unpublished.drain(..).collect();
        self.last_sample = samples.last().cloned();
        Decision::Publish(samples)
    }
}

/// A remote node's history for analysis: the samples its records carried,
/// then its last published sample repeated every
/// [`ASSUMED_REPORT_EVERY_MS`] up to `now_ms` (what the holder promises:
/// reports since were within the thresholds of that sample), at most
/// [`HISTORY_LEN`] in all, oldest first.
pub fn extend_history(published: &VecDeque<Sample>, now_ms: u64) -> Vec<Sample> {
    let mut history: Vec<Sample> = published.iter().cloned().collect();
    if let Some(last) = published.back() {
        // Only the newest HISTORY_LEN steps can be kept: start there, so a
        // long silence costs no more than a short one.
        let steps = now_ms.saturating_sub(last.at_ms) / ASSUMED_REPORT_EVERY_MS;
        let first = steps.saturating_sub(HISTORY_LEN as u64).max(1);
        for step in first..=steps {
            history.push(Sample {
                at_ms: last.at_ms + step * ASSUMED_REPORT_EVERY_MS,
                ..last.clone()
            });
        }
    }
    let keep = history.len().saturating_sub(HISTORY_LEN);
    history.drain(..keep);
    history
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at_ms: u64, rate: f64, error_rate: f64, p99: Option<f64>) -> Sample {
        Sample {
            at_ms,
            modules: vec![ModuleSample {
                name: "web".into(),
                crash_loop: false,
                metrics: Some(MetricsWindow {
                    request_rate: rate,
                    error_rate,
                    latency_p99_seconds: p99,
                }),
                usage: Some(UsageSample {
                    cpu_percent: 20.0,
                    memory_resident_kib: 100_000,
                }),
            }]
            .into(),
        }
    }

    #[test]
    fn material_moves_are_the_ones_analysis_would_notice() {
        let base = sample(0, 100.0, 0.01, Some(0.2));
        let check = |now: Sample, expected: bool, what: &str| {
            assert_eq!(moved_materially(&base, &now), expected, "{what}");
            assert_eq!(moved_materially(&now, &base), expected, "{what} (reversed)");
        };
        check(sample(5, 100.0, 0.01, Some(0.2)), false, "same");
        check(sample(5, 110.0, 0.012, Some(0.21)), false, "noise");
        check(sample(5, 130.0, 0.01, Some(0.2)), true, "rate +30%");
        check(sample(5, 100.0, 0.02, Some(0.2)), true, "errors +1pp");
        check(sample(5, 100.0, 0.01, Some(0.25)), true, "p99 +25%");
        check(sample(5, 100.0, 0.01, None), true, "p99 gone");
        let mut looping = sample(5, 100.0, 0.01, Some(0.2));
        looping.modules = vec![ModuleSample {
            crash_loop: true,
            ..looping.modules[0].clone()
        }]
        .into();
        check(looping, true, "crash loop");
        let mut no_module = sample(5, 100.0, 0.01, Some(0.2));
        no_module.modules = Vec::new().into();
        check(no_module, true, "module gone");
        let with_usage = |cpu_percent, memory_resident_kib| {
            let mut s = sample(5, 100.0, 0.01, Some(0.2));
            s.modules = vec![ModuleSample {
                usage: Some(UsageSample {
                    cpu_percent,
                    memory_resident_kib,
                }),
                ..s.modules[0].clone()
            }]
            .into();
            s
        };
        check(with_usage(25.0, 105_000), false, "usage noise");
        check(with_usage(45.0, 100_000), true, "cpu +25 points");
        check(with_usage(22.0, 130_000), true, "memory +30%");
        let mut no_usage = sample(5, 100.0, 0.01, Some(0.2));
        no_usage.modules = vec![ModuleSample {
            usage: None,
            ..no_usage.modules[0].clone()
        }]
        .into();
        check(no_usage, true, "usage gone");
        // Tiny rates do not count as moves.
        assert!(!moved_materially(
            &sample(0, 0.05, 0.0, None),
            &sample(5, 0.1, 0.0, None)
        ));
    }

    #[test]
    fn transitions_publish_at_once_and_metrics_at_most_every_interval() {
        let mut p = Publication::default();
        p.started(0);
        // First report: a transition (the session's first).
        let first = p.on_report(1_000, true, sample(1_000, 100.0, 0.0, Some(0.2)));
        assert_eq!(
            first,
            Decision::Publish(vec![sample(1_000, 100.0, 0.0, Some(0.2))])
        );
        // Steady metrics: nothing, however long.
        for i in 1..=20 {
            let at = 1_000 + i * 5_000;
            assert_eq!(
                p.on_report(at, false, sample(at, 101.0, 0.0, Some(0.2))),
                Decision::Hold,
                "steady at {at}"
            );
        }
        // A move is written, with every sample since the last record
        // (capped).
        let at = 106_000;
        match p.on_report(at, false, sample(at, 200.0, 0.0, Some(0.2))) {
            Decision::Publish(samples) => {
                assert_eq!(samples.len(), 21);
                assert_eq!(samples.last().map(|s| s.at_ms), Some(at));
            }
            Decision::Hold => panic!("a material move past the interval is written"),
        }
        // Another move 5 s later waits for the interval ...
        assert_eq!(
            p.on_report(111_000, false, sample(111_000, 400.0, 0.0, Some(0.2))),
            Decision::Hold
        );
        // ... and goes out with the next report after it, even if that one
        // is back to normal.
        assert_eq!(
            p.on_report(116_000, false, sample(116_000, 200.0, 0.0, Some(0.2))),
            Decision::Publish(vec![
                sample(111_000, 400.0, 0.0, Some(0.2)),
                sample(116_000, 200.0, 0.0, Some(0.2))
            ])
        );
        // A transition is written at once, inside the interval.
        assert!(matches!(
            p.on_report(117_000, true, sample(117_000, 200.0, 0.0, Some(0.2))),
            Decision::Publish(_)
        ));
    }

    #[test]
    fn unpublished_samples_are_capped() {
        let mut p = Publication::default();
        p.started(0);
        assert!(matches!(
            p.on_report(1, true, sample(1, 1.0, 0.0, None)),
            Decision::Publish(_)
        ));
        for i in 0..100u64 {
            let _ = p.on_report(2 + i, false, sample(2 + i, 1.0, 0.0, None));
        }
        match p.on_report(200, true, sample(200, 1.0, 0.0, None)) {
            Decision::Publish(samples) => {
                assert_eq!(samples.len(), SAMPLES_PER_RECORD);
                assert_eq!(samples.last().map(|s| s.at_ms), Some(200));
            }
            Decision::Hold => panic!("transition"),
        }
    }

    #[test]
    fn readers_extend_the_last_sample_until_now() {
        let published: VecDeque<Sample> = [
            sample(1_000, 100.0, 0.0, Some(0.2)),
            sample(6_000, 150.0, 0.0, Some(0.3)),
        ]
        .into();
        let history = extend_history(&published, 21_500);
        let times: Vec<u64> = history.iter().map(|s| s.at_ms).collect();
        assert_eq!(times, vec![1_000, 6_000, 11_000, 16_000, 21_000]);
        assert_eq!(history[4].modules, published[1].modules);
        assert!(extend_history(&VecDeque::new(), 50_000).is_empty());
        // Long silences keep the newest HISTORY_LEN.
        let long = extend_history(&published, 10_000_000);
        assert_eq!(long.len(), HISTORY_LEN);
        assert!(long.windows(2).all(|w| w[0].at_ms < w[1].at_ms));
    }

    #[test]
    fn the_record_format_round_trips_and_reads_what_older_writers_left_out() {
        let module = ModuleState {
            name: "web".into(),
            version: "1.0.0".into(),
            phase: Phase::Running,
            health: Health::Healthy,
            message: String::new(),
            staged_version: String::new(),
            previous_version: "0.9.0".into(),
            restarts: 2,
            crash_loop: false,
            metrics: Some(MetricsWindow {
                request_rate: 5.0,
                error_rate: 0.1,
                latency_p99_seconds: None,
            }),
            settling: vec!["1.1.0".into()],
            failure_kind: Some(FailureKind::Release),
            usage: None,
        };
        let record = SessionRecord {
            replica: "cp-b".into(),
            session: 7,
            connected_at_ms: 10,
            last_seen_ms: 20,
            reported: true,
            observed_generation: 3,
            agent_desired_generation: 4,
            modules: vec![ModuleRecord::from(&module)],
            usage: Some(UsageRecord::from(&NodeUsage {
                cpu_percent: 1.5,
                memory_used_bytes: 1 << 20,
                memory_total_bytes: 1 << 30,
            })),
            samples: vec![SampleRecord::from(&sample(20, 5.0, 0.1, Some(0.2)))],
        };
        let decoded = SessionRecord::decode(&record.encode()).expect("decodes");
        assert_eq!(decoded, record);
        assert_eq!(ModuleState::from(&decoded.modules[0]), module);
        assert_eq!(
            Sample::from(&decoded.samples[0]),
            sample(20, 5.0, 0.1, Some(0.2))
        );
        let minimal = br#"{"replica":"cp-a","session":1,"connected_at_ms":1,"last_seen_ms":1,"reported":false,"observed_generation":0,"agent_desired_generation":0}"#;
        let read = SessionRecord::decode(minimal).expect("minimal record");
        assert!(read.modules.is_empty() && read.samples.is_empty() && read.usage.is_none());
        assert!(SessionRecord::decode(b"{not json").is_err());
    }
}
