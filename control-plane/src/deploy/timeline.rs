//! The stored and streamed events ([`crate::events::Event`]) one committed
//! transition of a deployment stands for: their kinds and messages, derived
//! from the state change and the machine's typed [`Note`]s. Pure.

use super::machine::{Action, Deployment, Note, State};
use super::record::DeploymentRecord;
use crate::events::Event;

/// The kind of a deployment event (its stored, dotted word).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Created,
    Step,
    Analysis,
    Approved,
    Paused,
    Resumed,
    RollingBack,
    RolledBack,
    Finished,
    State,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Created => "deployment.created",
            Kind::Step => "deployment.step",
            Kind::Analysis => "deployment.analysis",
            Kind::Approved => "deployment.approved",
            Kind::Paused => "deployment.paused",
            Kind::Resumed => "deployment.resumed",
            Kind::RollingBack => "deployment.rolling_back",
            Kind::RolledBack => "deployment.rolled_back",
            Kind::Finished => "deployment.finished",
            Kind::State => "deployment.state",
        }
    }

    /// The kind of a move from `from` to `to` (they differ).
    fn of_change(from: State, to: State) -> Kind {
        match (from, to) {
            (State::AwaitingApproval, State::Running | State::Succeeded) => Kind::Approved,
            (_, State::Paused) => Kind::Paused,
            (State::Paused, State::Running) => Kind::Resumed,
            (_, State::RollingBack) => Kind::RollingBack,
            (_, State::RolledBack) => Kind::RolledBack,
            _ if to.is_terminal() => Kind::Finished,
            _ => Kind::State,
        }
    }
}

/// The first wave note among `actions`: the wave they start.
pub fn wave_started(actions: &[Action]) -> Option<&Note> {
    actions.iter().find_map(|action| match action {
        Action::Note(note @ Note::WaveStarted { .. }) => Some(note),
        _ => None,
    })
}

/// The events one committed transition from `previous` (none for a new
/// deployment) to `record` with `actions` stands for, each with its kind.
pub fn deployment_events(
    previous: Option<&Deployment>,
    record: &DeploymentRecord,
    actions: &[Action],
) -> Vec<(Kind, Event)> {
    let d = &record.deployment;
    let event = |kind: Kind, message: String| {
        (
            kind,
            Event::new(kind.as_str(), message)
                .deployment(&record.id)
                .module(&d.spec.module, &d.spec.version),
        )
    };
    let mut events = Vec::new();
    let wave_notes = actions.iter().filter_map(|action| match action {
        Action::Note(note @ Note::WaveStarted { .. }) => Some(note.to_string()),
        _ => None,
    });
    let Some(previous) = previous else {
        events.push(event(
            Kind::Created,
            format!(
                "{}@{} to {} ({}, {} node(s)) by {}; {}",
                d.spec.module,
                d.spec.version,
                record.environment,
                d.spec.strategy.name(),
                d.nodes.len(),
                d.spec.created_by,
                // Created outside every deployment window: say why it waits.
                if d.state == State::Paused && !d.reason.is_empty() {
                    format!("paused: {}", d.reason)
                } else {
                    d.state.as_str().to_string()
                }
            ),
        ));
        events.extend(wave_notes.map(|note| event(Kind::Step, note)));
        return events;
    };
    for verdict in d.analysis.iter().skip(previous.analysis.len()) {
        events.push(event(
            Kind::Analysis,
            format!(
                "step {}: {} ({})",
                verdict.step + 1,
                verdict.outcome.as_str(),
                verdict.summary
            ),
        ));
    }
    if previous.state != d.state {
        let kind = Kind::of_change(previous.state, d.state);
        let message = match kind {
            // The machine's note carries the approver's reason.
            Kind::Approved => actions
                .iter()
                .find_map(|a| match a {
                    Action::Note(note @ Note::Approved { .. }) => Some(note.to_string()),
                    _ => None,
                })
                .unwrap_or_else(|| format!("approved by {}", d.approved_by)),
            _ if d.reason.is_empty() => d.state.as_str().to_string(),
            _ => format!("{}: {}", d.state.as_str(), d.reason),
        };
        events.push(event(kind, message));
    }
    events.extend(wave_notes.map(|note| event(Kind::Step, note)));
    events
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Settings;
    use crate::deploy::machine::{Control, Input};
    use crate::deploy::spec::{CreateRequest, build};

    fn record(environment: &str) -> (DeploymentRecord, Vec<Action>) {
        let request = CreateRequest {
            module: "web".into(),
            version: "2.0.0".into(),
            environment: environment.into(),
            ..CreateRequest::default()
        };
        let spec = build(&request, &Settings::default(), "alice").expect("a valid spec");
        let targets = vec![
            ("n1".to_string(), "a".to_string(), "1.0.0".to_string()),
            ("n2".to_string(), "b".to_string(), "1.0.0".to_string()),
        ];
        let (deployment, actions) = Deployment::new(spec, targets, 1_000);
        let record = DeploymentRecord {
            id: "d-1".into(),
            environment: environment.into(),
            deployment,
            selector: Default::default(),
            traceparent: String::new(),
        };
        (record, actions)
    }

    fn kinds_and_messages(events: &[(Kind, Event)]) -> Vec<(&'static str, &str)> {
        events
            .iter()
            .map(|(kind, event)| {
                assert_eq!(kind.as_str(), event.kind);
                (kind.as_str(), event.message.as_str())
            })
            .collect()
    }

    #[test]
    fn a_new_deployment_is_created_and_starts_its_first_wave() {
        let (record, actions) = record("dev");
        let events = deployment_events(None, &record, &actions);
        assert_eq!(
            kinds_and_messages(&events),
            [
                (
                    "deployment.created",
                    "web@2.0.0 to dev (direct, 2 node(s)) by alice; running"
                ),
                ("deployment.step", "wave 1/1: 2 node(s) to 2.0.0"),
            ]
        );
        let (_, event) = &events[0];
        assert_eq!(event.deployment_id.as_deref(), Some("d-1"));
        assert_eq!(event.module.as_deref(), Some("web"));
        assert_eq!(event.version.as_deref(), Some("2.0.0"));
        assert!(wave_started(&actions).is_some());
    }

    #[test]
    fn approval_carries_the_approvers_reason_and_pause_its_state() {
        let (waiting, actions) = record("production");
        assert_eq!(waiting.deployment.state, State::AwaitingApproval);
        let events = deployment_events(None, &waiting, &actions);
        assert_eq!(events.len(), 1, "no wave before the approval");
        let approve = Input::Control(Control::Approve {
            by: "bob".into(),
            reason: "looks fine".into(),
        });
        let (approved, actions) = waiting.deployment.step(2_000, &approve).expect("approve");
        let next = waiting.with(approved);
        let events = deployment_events(Some(&waiting.deployment), &next, &actions);
        assert_eq!(events[0].0, Kind::Approved);
        assert_eq!(events[0].1.message, "approved by bob: looks fine");
        assert!(events[1..].iter().all(|(kind, _)| *kind == Kind::Step));
        let (paused, actions) = next
            .deployment
            .step(3_000, &Input::Control(Control::Pause))
            .expect("pause");
        let paused = next.with(paused);
        let events = deployment_events(Some(&next.deployment), &paused, &actions);
        assert_eq!(
            kinds_and_messages(&events),
            [("deployment.paused", "paused")]
        );
    }

    #[test]
    fn a_rollback_is_its_own_kind() {
        let (running, _) = record("dev");
        let rollback = Input::Control(Control::Rollback {
            reason: "by alice".into(),
        });
        let (rolling, actions) = running.deployment.step(2_000, &rollback).expect("rollback");
        let rolling = running.with(rolling);
        let events = deployment_events(Some(&running.deployment), &rolling, &actions);
        assert_eq!(
            kinds_and_messages(&events),
            [(
                "deployment.rolling_back",
                "rolling_back: manual rollback: by alice"
            )]
        );
    }
}
