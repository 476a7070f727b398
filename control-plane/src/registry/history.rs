//! The compact report history a session keeps for canary analysis: one
//! [`Sample`] per report, in a ring of [`HISTORY_LEN`] allocated at connect.

use super::{MetricsWindow, Report};

/// Reports kept per connected node for analysis: at the default 5 s summary
/// interval plus change-driven reports, a few minutes of history.
pub(super) const HISTORY_LEN: usize = 120;

/// What canary analysis reads of one report: its time, the node's usage, and
/// per module its crash-loop flag and metrics window. Only this is kept in a
/// session's history: a whole report (every module's strings) per entry cost
/// more memory per node than its connection.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub at_ms: u64,
    pub usage: Option<UsageSample>,
    /// Modules with metrics or in a crash loop; most reports have none.
    pub modules: Box<[ModuleSample]>,
}

/// Node usage as analysis averages it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct UsageSample {
    pub cpu_percent: f32,
    pub memory_used_kib: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModuleSample {
    pub name: String,
    pub crash_loop: bool,
    pub metrics: Option<MetricsWindow>,
}

impl Sample {
    pub(super) fn of(report: &Report) -> Self {
        Self {
            at_ms: report.at_ms,
            usage: report.usage.map(|u| UsageSample {
                cpu_percent: u.cpu_percent as f32,
                memory_used_kib: u32::try_from(u.memory_used_bytes / 1024).unwrap_or(u32::MAX),
            }),
            modules: report
                .modules
                .iter()
                .filter(|m| m.crash_loop || m.metrics.is_some())
                .map(|m| ModuleSample {
                    name: m.name.clone(),
                    crash_loop: m.crash_loop,
                    metrics: m.metrics,
                })
                .collect(),
        }
    }
}
