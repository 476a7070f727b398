//! What a node's reports cause in the event log: the module transitions a
//! report shows, and the per-node budget those events are appended within.

use crate::events::{Event, EventBudget};

use super::{ModuleState, Registry};

/// Events for modules whose phase or health changed between two reports.
pub(super) fn module_transitions(before: &[ModuleState], after: &[ModuleState]) -> Vec<Event> {
    let mut events = Vec::new();
    for m in after {
        let old = before.iter().find(|b| b.name == m.name);
        let (old_phase, old_health, old_version) = old.map_or(("none", "unknown", ""), |o| {
            (o.phase.as_str(), o.health.as_str(), o.version.as_str())
        });
        let (phase, health) = (m.phase.as_str(), m.health.as_str());
        if old_phase != phase || old_version != m.version {
            let mut message = format!("{} {}: {old_phase} -> {phase}", m.name, m.version);
            if !m.message.is_empty() {
                message.push_str(&format!(" ({})", m.message));
            }
            events.push(Event::new("module.phase", message).module(&m.name, &m.version));
        }
        if old_health != health {
            events.push(
                Event::new(
                    "module.health",
                    format!("{} {}: {old_health} -> {health}", m.name, m.version),
                )
                .module(&m.name, &m.version),
            );
        }
    }
    for m in before {
        if !after.iter().any(|a| a.name == m.name) {
            events.push(
                Event::new(
                    "module.removed",
                    format!("{} {} removed", m.name, m.version),
                )
                .module(&m.name, &m.version),
            );
        }
    }
    events
}

impl Registry {
    /// The events of `events` a node's session may append now, within the
    /// node's [`EventBudget`], plus a `node.events_suppressed` summary when
    /// one is due (`session_ends` makes it due at once). The caller names
    /// the node in each and appends them.
    pub(super) fn within_budget(
        &self,
        node_id: &str,
        mut events: Vec<Event>,
        session_ends: bool,
    ) -> Vec<Event> {
        let now = std::time::Instant::now();
        let (allowed, summary) = {
            let mut budgets = self
                .budgets
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let budget = budgets
                .entry(node_id.to_string())
                .or_insert_with(|| EventBudget::new(now));
            let allowed = budget.take(now, events.len());
            (allowed, budget.summary(now, session_ends))
        };
        let refused = events.len() - allowed;
        if refused > 0 {
            self.metrics.events_suppressed.inc_by(refused as u64);
        }
        events.truncate(allowed);
        if let Some(summary) = summary {
            tracing::warn!(
                node = %node_id,
                suppressed = summary.events,
                seconds = summary.over.as_secs(),
                "node caused more events than its budget; the rest were counted, not logged"
            );
            events.push(Event::new(
                "node.events_suppressed",
                format!(
                    "{} events of this node suppressed over {}s: a node may cause {} events at once and {} a second",
                    summary.events,
                    summary.over.as_secs(),
                    EventBudget::BURST,
                    EventBudget::PER_SECOND
                ),
            ));
        }
        events
    }
}
