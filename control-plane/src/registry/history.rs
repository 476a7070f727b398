//! The compact report history a session keeps for canary analysis: one
//! [`Sample`] per report, in a ring of [`HISTORY_LEN`] allocated at connect.

use thin_vec::ThinVec;

use super::{MetricsWindow, Report};

/// Reports kept per connected node for analysis: at the default 5 s summary
/// interval plus change-driven reports, a few minutes of history.
pub(super) const HISTORY_LEN: usize = 120;

/// What canary analysis reads of one report: its time and, per module, its
/// crash-loop flag, metrics window and process usage. Only this is kept in
/// a session's history: a whole report (every module's strings) per entry
/// cost more memory per node than its connection.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub at_ms: u64,
    /// Modules with metrics, usage or in a crash loop; a report of bundles
    /// alone has none. One word, not a boxed slice's two: the ring holds
    /// [`HISTORY_LEN`] samples per connected node, so a sample is 16 bytes
    /// instead of 24 (0.9 KiB per node).
    pub modules: ThinVec<ModuleSample>,
}

/// A module process's usage as analysis averages it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UsageSample {
    /// Percent of one core.
    pub cpu_percent: f32,
    pub memory_resident_kib: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModuleSample {
    pub name: String,
    pub crash_loop: bool,
    pub metrics: Option<MetricsWindow>,
    pub usage: Option<UsageSample>,
}

impl Sample {
    pub(super) fn of(report: &Report) -> Self {
        Self {
            at_ms: report.at_ms,
            modules: report
                .modules
                .iter()
                .filter(|m| m.crash_loop || m.metrics.is_some() || m.usage.is_some())
                .map(|m| ModuleSample {
                    name: m.name.clone(),
                    crash_loop: m.crash_loop,
                    metrics: m.metrics,
                    usage: m.usage.map(|u| UsageSample {
                        cpu_percent: u.cpu_percent as f32,
                        memory_resident_kib: u32::try_from(u.memory_resident_bytes / 1024)
                            .unwrap_or(u32::MAX),
                    }),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{ModuleState, NodeUsage};
    use hotswap_common::status::ModuleUsage;

    /// The ring holds `HISTORY_LEN` samples for every connected node, so
    /// their size is per-node memory: 120 × 16 bytes, allocated at connect.
    #[test]
    fn a_sample_is_two_words() {
        assert_eq!(std::mem::size_of::<Sample>(), 16);
        let empty = Sample::of(&Report {
            at_ms: 1,
            observed_generation: 1,
            desired_generation: 1,
            modules: vec![ModuleState {
                name: "static-files".into(),
                ..ModuleState::default()
            }],
            usage: None,
        });
        assert!(empty.modules.is_empty());
        assert_eq!(
            empty.modules.capacity(),
            0,
            "an empty module list allocates nothing"
        );
    }

    /// Analysis evidence is the module's own: its process usage is kept
    /// per module, the node's (every other process of the host in it) is
    /// not kept at all, and a module with nothing to judge costs nothing.
    #[test]
    fn a_sample_keeps_each_modules_own_usage_and_not_the_nodes() {
        let module = |name: &str, usage: Option<ModuleUsage>| ModuleState {
            name: name.into(),
            usage,
            ..ModuleState::default()
        };
        let report = Report {
            at_ms: 7,
            observed_generation: 1,
            desired_generation: 1,
            modules: vec![
                module(
                    "web",
                    Some(ModuleUsage {
                        cpu_percent: 150.5,
                        memory_resident_bytes: 64 << 20,
                    }),
                ),
                module("static-files", None),
            ],
            usage: Some(NodeUsage {
                cpu_percent: 85.0,
                memory_used_bytes: 1 << 30,
                memory_total_bytes: 4 << 30,
            }),
        };
        let sample = Sample::of(&report);
        assert_eq!(sample.at_ms, 7);
        assert_eq!(
            &*sample.modules,
            [ModuleSample {
                name: "web".into(),
                crash_loop: false,
                metrics: None,
                usage: Some(UsageSample {
                    cpu_percent: 150.5,
                    memory_resident_kib: 65_536,
                }),
            }]
        );
    }
}
