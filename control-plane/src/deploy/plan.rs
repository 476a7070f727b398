//! The plan of a deployment as a dry run shows it: its waves of node
//! names and the gate after each. Pure.

use super::machine::{Deployment, Strategy, plan_waves};

/// A dry run's answer: waves of node names and the gate after each.
#[derive(Clone, Debug, Default)]
pub struct PlanView {
    pub strategy: String,
    pub waves: Vec<(Vec<String>, String)>,
    /// Per wave, under the environment's deployment windows: the earliest
    /// it could start and the wait in words ([`window_starts`]); empty
    /// without windows.
    pub windows: Vec<WaveStart>,
}

/// When a wave could start under the windows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WaveStart {
    /// `None` when no window opens within two weeks.
    pub earliest_ms: Option<u64>,
    /// Why it waits ("outside deployment window ...; next opens ..."), or
    /// empty when it could start as soon as the wave before is done.
    pub wait: String,
}

/// The shortest time a wave holds before the next may begin.
fn min_hold_ms(strategy: &Strategy) -> u64 {
    match strategy {
        Strategy::Direct => 0,
        Strategy::Rolling { min_healthy_ms, .. } => *min_healthy_ms,
        Strategy::BlueGreen { bake_ms } => *bake_ms,
        Strategy::Canary { step_ms, .. } => *step_ms,
    }
}

/// When each wave of `deployment` could start at the earliest, from
/// `now_ms` (wall clock), if every wave were healthy at once and then held
/// for its gate: a wave ready outside every window starts when the next
/// one opens (SPEC §9). Empty when the schedule has no windows.
pub fn window_starts(
    deployment: &Deployment,
    schedule: &crate::schedule::Schedule,
    now_ms: u64,
) -> Vec<WaveStart> {
    if schedule.windows.is_empty() {
        return Vec::new();
    }
    let hold = min_hold_ms(&deployment.spec.strategy);
    let mut starts = Vec::with_capacity(deployment.waves);
    let mut ready = Some(now_ms);
    for i in 0..deployment.waves.max(1) {
        if i > 0 {
            ready = ready.map(|r| r.saturating_add(hold));
        }
        let start = match ready {
            Some(r) => WaveStart {
                earliest_ms: schedule.next_open(r),
                wait: schedule.closed_reason(r).unwrap_or_default(),
            },
            None => WaveStart::default(),
        };
        ready = start.earliest_ms;
        starts.push(start);
    }
    starts
}

pub fn plan_view(deployment: &Deployment) -> PlanView {
    let waves = plan_waves(&deployment.spec.strategy, deployment.nodes.len());
    let total = waves.len();
    let strategy = &deployment.spec.strategy;
    let gate = |i: usize| -> String {
        let last = i + 1 == total;
        match strategy {
            Strategy::Direct => "all nodes healthy".to_string(),
            Strategy::Rolling { min_healthy_ms, .. } if !last => {
                format!("wave healthy for {}s", min_healthy_ms / 1000)
            }
            Strategy::Rolling { .. } => "wave healthy".to_string(),
            Strategy::BlueGreen { bake_ms } => format!(
                "all staged, then switched together; healthy through a {}s bake",
                bake_ms / 1000
            ),
            Strategy::Canary {
                step_ms,
                manual_promote,
                ..
            } if !last => format!(
                "healthy and canary analysis passing for {}s{}",
                step_ms / 1000,
                if *manual_promote {
                    ", then deploy promote"
                } else {
                    ""
                }
            ),
            Strategy::Canary { .. } => "all nodes healthy".to_string(),
        }
    };
    PlanView {
        strategy: strategy.name().to_string(),
        waves: waves
            .iter()
            .enumerate()
            .map(|(i, members)| {
                (
                    members
                        .iter()
                        .map(|&n| deployment.nodes[n].name.clone())
                        .collect(),
                    gate(i),
                )
            })
            .collect(),
        windows: Vec::new(),
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;
    use crate::deploy::machine::{Spec, Thresholds};

    fn rolling(nodes: usize, min_healthy_ms: u64) -> Deployment {
        let spec = Spec {
            module: "web".into(),
            version: "1.0.0".into(),
            strategy: Strategy::Rolling {
                batch: crate::deploy::machine::BatchSize::Count(1),
                min_healthy_ms,
            },
            max_failures: 0,
            health_deadline_ms: 60_000,
            progress_deadline_ms: 600_000,
            auto_rollback: true,
            require_approval: false,
            approval_timeout_ms: 0,
            pause_timeout_ms: 0,
            created_by: "alice".into(),
            thresholds: Thresholds::default(),
        };
        let targets = (0..nodes)
            .map(|i| (format!("n-{i}"), format!("node-{i}"), "0.9.0".to_string()))
            .collect();
        Deployment::new(spec, targets, 0).0
    }

    fn at(text: &str) -> u64 {
        text.parse::<jiff::Timestamp>()
            .expect("ts")
            .as_millisecond() as u64
    }

    #[test]
    fn waves_wait_for_the_window_in_a_dry_run() {
        let schedule = crate::schedule::Schedule::parse(&["Mon-Thu 09:00-16:00 UTC".into()], &[])
            .expect("schedule");
        let deployment = rolling(3, 3_600_000);
        // Thursday 14:30: wave 1 now, wave 2 at 15:30, wave 3 (16:30) waits
        // for Monday.
        let starts = window_starts(&deployment, &schedule, at("2026-12-10T14:30:00Z"));
        let text = |s: &WaveStart| s.earliest_ms.map(hotswap_common::timefmt::rfc3339_from_ms);
        assert_eq!(starts.len(), 3);
        assert_eq!(text(&starts[0]).as_deref(), Some("2026-12-10T14:30:00Z"));
        assert_eq!(starts[0].wait, "");
        assert_eq!(text(&starts[1]).as_deref(), Some("2026-12-10T15:30:00Z"));
        assert_eq!(text(&starts[2]).as_deref(), Some("2026-12-14T09:00:00Z"));
        assert_eq!(
            starts[2].wait,
            "outside deployment window Mon-Thu 09:00-16:00 UTC; next opens 2026-12-14T09:00:00Z"
        );
        let none = crate::schedule::Schedule::default();
        assert!(window_starts(&deployment, &none, 0).is_empty());
    }
}
