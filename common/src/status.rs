//! The words a module's state is told in, shared by the agent that reports
//! it and the control plane that acts on it: [`Phase`], [`Health`] and
//! [`FailureKind`], and the one status type built of them,
//! [`ModuleStatus`]. On the wire they are the lowercase words of SPEC §4
//! (`as_str` / `parse`); in stored records their serde form is the variant
//! name, as the records written before this module existed have it. The
//! wire conversions are in `convert`.

use serde::{Deserialize, Serialize};

/// Lifecycle phase of a module on a node (SPEC §4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Not reported: no report yet, or a word this build does not know (a
    /// newer agent). Agents never report it.
    #[default]
    Unknown,
    Installing,
    Staged,
    Starting,
    Running,
    Stopping,
    Stopped,
    Failed,
}

impl Phase {
    /// Every phase an agent reports, in lifecycle order.
    pub const REPORTED: [Phase; 7] = [
        Phase::Installing,
        Phase::Staged,
        Phase::Starting,
        Phase::Running,
        Phase::Stopping,
        Phase::Stopped,
        Phase::Failed,
    ];

    /// The wire word; `""` for [`Phase::Unknown`].
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Unknown => "",
            Phase::Installing => "installing",
            Phase::Staged => "staged",
            Phase::Starting => "starting",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
            Phase::Failed => "failed",
        }
    }

    /// The phase a wire word names; [`Phase::Unknown`] for any other word,
    /// so a newer agent's new phase reads as "not known" rather than as a
    /// broken report.
    pub fn parse(word: &str) -> Phase {
        Phase::REPORTED
            .into_iter()
            .find(|phase| phase.as_str() == word)
            .unwrap_or(Phase::Unknown)
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Unknown => "unknown",
            other => other.as_str(),
        })
    }
}

/// A module's health as its agent's probes judge it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Health {
    /// Not enough probe results yet (just started, or reset).
    #[default]
    Unknown,
    Healthy,
    Unhealthy,
}

impl Health {
    /// The wire word (`healthy|unhealthy|unknown`).
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
        }
    }

    /// The health a wire word names; [`Health::Unknown`] for any other word.
    pub fn parse(word: &str) -> Health {
        match word {
            "healthy" => Health::Healthy,
            "unhealthy" => Health::Unhealthy,
            _ => Health::Unknown,
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whose fault a failure is. Only release failures count against a
/// deployment's `max_failures`: an infrastructure failure says nothing about
/// the version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FailureKind {
    /// The version itself: rejected artifact (bad or missing signatures),
    /// failing pre-check, health gate, hook or canary analysis, crash loop.
    Release,
    /// The node or the way to it: artifact fetch, disk full, local I/O, a
    /// lost connection, an agent restarted mid-swap.
    Infrastructure,
}

impl FailureKind {
    /// The wire word (`ModuleStatus.failure_kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Release => "release",
            FailureKind::Infrastructure => "infrastructure",
        }
    }

    /// The kind a wire word names; `None` for `""` (no failure) and for any
    /// word this build does not know.
    pub fn parse(word: &str) -> Option<FailureKind> {
        match word {
            "release" => Some(FailureKind::Release),
            "infrastructure" => Some(FailureKind::Infrastructure),
            _ => None,
        }
    }
}

impl std::fmt::Display for FailureKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A module's request metrics over one scrape interval.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModuleMetrics {
    /// Requests per second.
    pub request_rate: f64,
    /// Share of requests that failed, 0..=1.
    pub error_rate: f64,
    /// `None` when there were no requests in the interval.
    pub latency_p99_seconds: Option<f64>,
}

/// What a module's own processes use, as its agent measures it from
/// `/proc`: the evidence canary analysis compares for CPU and memory. Node
/// usage would not do: every other module and process of the host is in it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ModuleUsage {
    /// CPU time since the agent's previous sample, in percent of one core
    /// (a process busy on two cores reads 200).
    pub cpu_percent: f64,
    /// Resident memory now.
    pub memory_resident_bytes: u64,
}

/// Status of one module on a node, as its agent reports it (SPEC §4). The
/// control plane keeps the last one per module; users see it as
/// `NodeModuleView` (`model`), built from it in one place.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModuleStatus {
    pub name: String,
    /// The active version (`""` when none is active).
    pub version: String,
    pub phase: Phase,
    pub health: Health,
    pub message: String,
    /// A version fetched, verified and unpacked but not active.
    pub staged_version: String,
    /// The version active before this one (kept for rollback).
    pub previous_version: String,
    pub restarts: u32,
    pub crash_loop: bool,
    pub metrics: Option<ModuleMetrics>,
    /// Other versions the agent says still start, stop or serve (a
    /// candidate in its health gate, an old instance draining).
    pub settling: Vec<String>,
    /// The agent's class of the failure it reports; `None` without one or
    /// for a class this build does not know.
    pub failure_kind: Option<FailureKind>,
    /// What the module's process uses; `None` for a module without one
    /// (a bundle) and until the agent has sampled it twice.
    pub usage: Option<ModuleUsage>,
}

impl ModuleStatus {
    /// Equal in everything but the metrics window and the usage sample (a
    /// new sample alone is no change worth announcing).
    pub fn same_but_metrics(&self, other: &ModuleStatus) -> bool {
        let ModuleStatus {
            name,
            version,
            phase,
            health,
            message,
            staged_version,
            previous_version,
            restarts,
            crash_loop,
            metrics: _,
            settling,
            failure_kind,
            usage: _,
        } = self;
        *name == other.name
            && *version == other.version
            && *phase == other.phase
            && *health == other.health
            && *message == other.message
            && *staged_version == other.staged_version
            && *previous_version == other.previous_version
            && *restarts == other.restarts
            && *crash_loop == other.crash_loop
            && *settling == other.settling
            && *failure_kind == other.failure_kind
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_words_round_trip() {
        for phase in Phase::REPORTED {
            assert_eq!(Phase::parse(phase.as_str()), phase);
        }
        assert_eq!(Phase::parse("hibernating"), Phase::Unknown);
        assert_eq!(Phase::parse(""), Phase::Unknown);
        for health in [Health::Unknown, Health::Healthy, Health::Unhealthy] {
            assert_eq!(Health::parse(health.as_str()), health);
        }
        assert_eq!(Health::parse("HEALTHY"), Health::Unknown);
        for kind in [FailureKind::Release, FailureKind::Infrastructure] {
            assert_eq!(FailureKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(FailureKind::parse(""), None);
    }

    #[test]
    fn stored_form_is_the_variant_name() {
        // Deployment records written before this module hold these words.
        assert_eq!(
            serde_json::to_string(&FailureKind::Infrastructure).unwrap(),
            "\"Infrastructure\""
        );
        assert_eq!(
            serde_json::to_string(&Phase::Running).unwrap(),
            "\"Running\""
        );
        assert_eq!(
            serde_json::from_str::<Health>("\"Unhealthy\"").unwrap(),
            Health::Unhealthy
        );
    }
}
