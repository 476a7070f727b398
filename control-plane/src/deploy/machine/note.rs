//! What the deployment machine tells the engine happened in a step, as
//! typed values: the engine derives stored events (the timeline module)
//! and spans from the variants, and logs their text.
//!
//! The text of each note (its `Display`) is what the events and logs said
//! when notes were strings; tests and users read it.

use std::fmt;

use super::State;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    /// A new deployment in an environment that needs approval waits for it.
    AwaitingApproval,
    /// The deployment has no target nodes and succeeded at once.
    NoTargets,
    /// Blue-green: the new version is staged beside the old on every node.
    Staging {
        version: String,
        nodes: usize,
    },
    /// A wave of nodes was told to move to `version`. `wave` counts from 1.
    WaveStarted {
        wave: usize,
        waves: usize,
        nodes: usize,
        version: String,
    },
    /// Blue-green: every node staged, all switched together.
    Switching {
        nodes: usize,
    },
    /// The deployment reached a terminal `state`.
    Finished {
        state: State,
        reason: String,
    },
    /// A second person approved the deployment (`reason` may be empty).
    Approved {
        by: String,
        reason: String,
    },
    Paused,
    Resumed,
    /// The deployment started putting touched nodes back.
    RollingBack {
        reason: String,
    },
    /// Canary analysis of `step` (counted from 1) passed.
    AnalysisPassed {
        step: usize,
        summary: String,
    },
    /// Canary analysis of `step` had too little traffic; the step is held up
    /// to `up_to_ms` before health alone decides.
    AnalysisHolding {
        step: usize,
        summary: String,
        up_to_ms: u64,
    },
    /// Canary analysis of `step` passed on health alone (too little traffic).
    AnalysisHealthOnly {
        step: usize,
        summary: String,
    },
    /// A canary step is healthy and waits for `deploy promote`.
    AwaitingPromote {
        step: usize,
    },
    /// At a wave boundary outside every deployment window: paused until one
    /// opens (SPEC §9).
    WindowClosed {
        reason: String,
    },
    /// A deployment window opened: the held deployment goes on.
    WindowOpened,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Note::AwaitingApproval => f.write_str("waiting for approval by a second person"),
            Note::NoTargets => f.write_str("no target nodes; nothing to do"),
            Note::Staging { version, nodes } => write!(f, "staging {version} on {nodes} node(s)"),
            Note::WaveStarted {
                wave,
                waves,
                nodes,
                version,
            } => write!(f, "wave {wave}/{waves}: {nodes} node(s) to {version}"),
            Note::Switching { nodes } => {
                write!(f, "all nodes staged; switching {nodes} node(s) at once")
            }
            Note::Finished { state, reason } => {
                write!(f, "deployment {}: {reason}", state.as_str())
            }
            Note::Approved { by, reason } if reason.is_empty() => write!(f, "approved by {by}"),
            Note::Approved { by, reason } => write!(f, "approved by {by}: {reason}"),
            Note::Paused => f.write_str("paused"),
            Note::Resumed => f.write_str("resumed"),
            Note::RollingBack { reason } => write!(f, "rolling back: {reason}"),
            Note::AnalysisPassed { step, summary } => {
                write!(f, "analysis of step {step} passed: {summary}")
            }
            Note::AnalysisHolding {
                step,
                summary,
                up_to_ms,
            } => write!(
                f,
                "analysis of step {step} {summary}; holding the step up to {}",
                hotswap_common::timefmt::human_age(*up_to_ms)
            ),
            Note::AnalysisHealthOnly { step, summary } => {
                write!(
                    f,
                    "analysis of step {step} passed on health alone: {summary}"
                )
            }
            Note::AwaitingPromote { step } => {
                write!(f, "step {step} healthy; waiting for deploy promote")
            }
            Note::WindowClosed { reason } => write!(f, "waiting: {reason}"),
            Note::WindowOpened => f.write_str("deployment window open; going on"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The text of every note reads as the strings it replaced.
    #[test]
    fn notes_read_as_before() {
        let cases = [
            (
                Note::AwaitingApproval,
                "waiting for approval by a second person",
            ),
            (Note::NoTargets, "no target nodes; nothing to do"),
            (
                Note::Staging {
                    version: "2.0.0".into(),
                    nodes: 3,
                },
                "staging 2.0.0 on 3 node(s)",
            ),
            (
                Note::WaveStarted {
                    wave: 1,
                    waves: 4,
                    nodes: 2,
                    version: "2.0.0".into(),
                },
                "wave 1/4: 2 node(s) to 2.0.0",
            ),
            (
                Note::Switching { nodes: 5 },
                "all nodes staged; switching 5 node(s) at once",
            ),
            (
                Note::Finished {
                    state: State::Failed,
                    reason: "too many failures".into(),
                },
                "deployment failed: too many failures",
            ),
            (
                Note::Approved {
                    by: "bob".into(),
                    reason: String::new(),
                },
                "approved by bob",
            ),
            (
                Note::Approved {
                    by: "bob".into(),
                    reason: "ok".into(),
                },
                "approved by bob: ok",
            ),
            (Note::Paused, "paused"),
            (Note::Resumed, "resumed"),
            (
                Note::RollingBack {
                    reason: "node a failed".into(),
                },
                "rolling back: node a failed",
            ),
            (
                Note::AnalysisPassed {
                    step: 2,
                    summary: "error rate 0.1%".into(),
                },
                "analysis of step 2 passed: error rate 0.1%",
            ),
            (
                Note::AnalysisHolding {
                    step: 1,
                    summary: "inconclusive: 3 requests".into(),
                    up_to_ms: 90_000,
                },
                "analysis of step 1 inconclusive: 3 requests; holding the step up to 1m30s",
            ),
            (
                Note::AnalysisHealthOnly {
                    step: 1,
                    summary: "healthy".into(),
                },
                "analysis of step 1 passed on health alone: healthy",
            ),
            (
                Note::AwaitingPromote { step: 2 },
                "step 2 healthy; waiting for deploy promote",
            ),
        ];
        for (note, text) in cases {
            assert_eq!(note.to_string(), text, "{note:?}");
        }
    }
}
