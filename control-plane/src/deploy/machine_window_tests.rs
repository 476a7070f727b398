//! The machine under deployment windows (SPEC §9): no wave begins while the
//! window input is closed; the deployment waits at the boundary, paused
//! with the reason, untimed by the pause timeout, and goes on by itself.

use proptest::prelude::{ProptestConfig, any, prop_assert, prop_assert_eq, proptest};

use super::*;

const T0: Ms = 1_700_000_000_000;
const TARGET: &str = "2.0.0";
const CLOSED: &str =
    "outside deployment window Mon-Thu 09:00-16:00 UTC; next opens 2026-12-07T09:00:00Z";

fn closed() -> Window {
    Window::Closed(CLOSED.into())
}

fn spec(strategy: Strategy, require_approval: bool) -> Spec {
    Spec {
        module: "web".into(),
        version: TARGET.into(),
        strategy,
        max_failures: 0,
        health_deadline_ms: 10_000,
        progress_deadline_ms: 60_000,
        auto_rollback: true,
        require_approval,
        approval_timeout_ms: 0,
        // Short: a window wait longer than this must not fail the deployment.
        pause_timeout_ms: 1_000,
        created_by: "alice".into(),
        thresholds: Thresholds::default(),
    }
}

fn rolling(min_healthy_ms: Ms) -> Strategy {
    Strategy::Rolling {
        batch: BatchSize::Count(1),
        min_healthy_ms,
    }
}

fn targets(n: usize) -> Vec<(String, String, String)> {
    (0..n)
        .map(|i| (format!("id-{i}"), format!("node-{i}"), "1.0.0".to_string()))
        .collect()
}

/// Every node reports `version` running and healthy.
fn all_on(n: usize, version: &str) -> Input {
    Input::Observe {
        nodes: (0..n)
            .map(|i| {
                (
                    format!("id-{i}"),
                    NodeReport {
                        connected: true,
                        current: true,
                        version: version.into(),
                        phase: Phase::Running,
                        health: Health::Healthy,
                        ..NodeReport::default()
                    },
                )
            })
            .collect(),
        analysis: None,
    }
}

/// Nodes told to move to the target version by these actions.
fn moved(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SetVersion { node, version } if version == TARGET => Some(node.clone()),
            Action::Stage { node, .. } => Some(node.clone()),
            _ => None,
        })
        .collect()
}

fn step(d: &Deployment, now: Ms, input: &Input, window: &Window) -> (Deployment, Vec<Action>) {
    let result = d.step_in(now, input, window).expect("step");
    // Pure: the persisted form replays to the same result.
    let restored: Deployment =
        serde_json::from_str(&serde_json::to_string(d).expect("json")).expect("round trip");
    assert_eq!(
        restored.step_in(now, input, window).expect("replay"),
        result
    );
    result
}

#[test]
fn created_outside_a_window_it_waits_paused_before_wave_one_and_starts_when_one_opens() {
    let (d, actions) = Deployment::new_in(spec(rolling(0), false), targets(2), T0, &closed());
    assert_eq!(d.state, State::Paused);
    assert_eq!(d.reason, CLOSED);
    assert_eq!(d.window_wait, Some(WindowResume::Start));
    assert!(moved(&actions).is_empty(), "{actions:?}");
    assert_eq!(d.waiting_for(T0), format!("a deployment window: {CLOSED}"));
    // Much longer than the pause timeout, still closed: still waiting.
    let (d, actions) = step(&d, T0 + 3_600_000, &all_on(2, "1.0.0"), &closed());
    assert_eq!((d.state, moved(&actions).len()), (State::Paused, 0));
    // An operator cannot resume it into a closed window.
    let refused = d
        .step_in(T0 + 3_600_000, &Input::Control(Control::Resume), &closed())
        .expect_err("resume refused");
    assert_eq!(
        refused,
        Refusal::OutsideWindow {
            reason: CLOSED.into()
        }
    );
    assert!(
        refused.to_string().contains("resumes by itself"),
        "{refused}"
    );
    // The window opens: wave 1 begins.
    let (d, actions) = step(&d, T0 + 3_700_000, &all_on(2, "1.0.0"), &Window::Open);
    assert_eq!(d.state, State::Running);
    assert_eq!(d.reason, "");
    assert_eq!(d.window_wait, None);
    assert_eq!(moved(&actions), ["id-0"]);
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Note(Note::WindowOpened)))
    );
    assert_eq!(d.wave_started_ms, T0 + 3_700_000);
}

#[test]
fn a_running_deployment_waits_at_its_next_wave_boundary_and_goes_on_by_itself() {
    let (d, actions) =
        Deployment::new_in(spec(rolling(1_000), false), targets(2), T0, &Window::Open);
    assert_eq!(moved(&actions), ["id-0"]);
    // Wave 1 healthy, the window closes during its hold: the hold ends at
    // the boundary, and wave 2 does not begin.
    let input = Input::Observe {
        nodes: [(
            "id-0".to_string(),
            NodeReport {
                connected: true,
                current: true,
                version: TARGET.into(),
                phase: Phase::Running,
                health: Health::Healthy,
                ..NodeReport::default()
            },
        )]
        .into_iter()
        .collect(),
        analysis: None,
    };
    let (d, _) = step(&d, T0 + 500, &input, &Window::Open);
    assert_eq!(d.hold_since_ms, Some(T0 + 500));
    // Still holding: a closed window changes nothing before the boundary.
    let (d, actions) = step(&d, T0 + 1_000, &input, &closed());
    assert_eq!((d.state, moved(&actions).len()), (State::Running, 0));
    let (d, actions) = step(&d, T0 + 1_600, &input, &closed());
    assert_eq!(d.state, State::Paused, "{}", d.reason);
    assert_eq!(d.reason, CLOSED);
    assert_eq!(d.window_wait, Some(WindowResume::Wave(1)));
    assert!(moved(&actions).is_empty());
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Note(n) if n.to_string() == format!("waiting: {CLOSED}")))
    );
    // Hours later (far past the 1s pause timeout), still closed: waiting.
    let (d, _) = step(&d, T0 + 7_200_000, &input, &closed());
    assert_eq!(d.state, State::Paused);
    // A new reason (the next opening moved) is kept current.
    let later = Window::Closed("outside deployment window X; next opens later".into());
    let (d, actions) = step(&d, T0 + 7_200_500, &input, &later);
    assert_eq!(
        (d.state, d.reason.as_str(), actions.len()),
        (
            State::Paused,
            "outside deployment window X; next opens later",
            0
        )
    );
    // Open: wave 2 begins, and the deployment succeeds as usual.
    let (d, actions) = step(&d, T0 + 7_201_000, &input, &Window::Open);
    assert_eq!((d.state, d.wave), (State::Running, 1));
    assert_eq!(moved(&actions), ["id-1"]);
    let (d, _) = step(&d, T0 + 7_201_500, &all_on(2, TARGET), &Window::Open);
    let (d, _) = step(&d, T0 + 7_203_000, &all_on(2, TARGET), &Window::Open);
    assert_eq!(d.state, State::Succeeded, "{}", d.reason);
}

#[test]
fn aborting_or_approving_outside_a_window() {
    let (d, _) = Deployment::new_in(spec(rolling(0), false), targets(1), T0, &closed());
    let (aborted, _) = step(
        &d,
        T0 + 10,
        &Input::Control(Control::Abort {
            reason: "not today".into(),
        }),
        &closed(),
    );
    assert_eq!(aborted.state, State::Aborted);
    assert_eq!(aborted.window_wait, None);
    // An approval outside a window starts nothing: it waits.
    let (d, _) = Deployment::new_in(spec(rolling(0), true), targets(1), T0, &closed());
    assert_eq!(d.state, State::AwaitingApproval);
    let (d, actions) = step(
        &d,
        T0 + 10,
        &Input::Control(Control::Approve {
            by: "bob".into(),
            reason: String::new(),
        }),
        &closed(),
    );
    assert_eq!((d.state, d.approved_by.as_str()), (State::Paused, "bob"));
    assert!(moved(&actions).is_empty());
    let (d, actions) = step(&d, T0 + 20, &all_on(1, "1.0.0"), &Window::Open);
    assert_eq!(
        (d.state, moved(&actions)),
        (State::Running, vec!["id-0".to_string()])
    );
}

#[test]
fn blue_green_stages_only_inside_a_window() {
    let (d, actions) = Deployment::new_in(
        spec(Strategy::BlueGreen { bake_ms: 0 }, false),
        targets(2),
        T0,
        &closed(),
    );
    assert_eq!((d.state, moved(&actions).len()), (State::Paused, 0));
    let (d, actions) = step(&d, T0 + 10, &all_on(2, "1.0.0"), &Window::Open);
    assert_eq!(d.state, State::Running);
    assert_eq!(moved(&actions).len(), 2, "staged everywhere: {actions:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the windows do, no node is moved in a step whose window is
    /// closed, the deployment never fails on its pause timeout while it
    /// waits for one, and with the window open long enough it succeeds.
    #[test]
    fn no_wave_begins_while_the_window_is_closed(
        nodes in 1usize..5,
        min_healthy in 0u64..2_000,
        windows in proptest::collection::vec(any::<bool>(), 1..120),
    ) {
        let (mut d, actions) =
            Deployment::new_in(spec(rolling(min_healthy), false), targets(nodes), T0, &closed());
        prop_assert!(moved(&actions).is_empty());
        let mut now = T0;
        for open in windows.iter().copied().chain(std::iter::repeat_n(true, 200)) {
            now += 500;
            let window = if open { Window::Open } else { closed() };
            let (next, actions) = d.step_in(now, &all_on(nodes, TARGET), &window).expect("step");
            if !open {
                prop_assert!(moved(&actions).is_empty(), "moved while closed: {:?}", actions);
            }
            prop_assert!(
                next.state != State::Failed,
                "failed: {}", next.reason
            );
            d = next;
            if d.state.is_terminal() {
                break;
            }
        }
        prop_assert_eq!(d.state, State::Succeeded, "{}", d.reason);
    }
}
