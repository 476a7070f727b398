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
                d.state.as_str()
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
