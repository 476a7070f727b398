//! The spans of a deployment's trace: a root per deployment, a span per
//! wave and one per node command, each carried on as W3C trace context
//! (stored with the record, sent to agents in desired entries).

use hotswap_common::telemetry;

use super::machine::{Action, Strategy};
use super::record::DeploymentRecord;
use super::timeline::wave_started;

/// The trace context of a new deployment's root span. The span is a marker
/// that ends at once; what joins the trace is its context.
pub fn deployment_root(
    id: &str,
    module: &str,
    version: &str,
    environment: &str,
    strategy: &Strategy,
) -> String {
    let root = tracing::info_span!(
        target: telemetry::TARGET,
        parent: None,
        "deployment",
        id = %id,
        module = %module,
        version = %version,
        environment = %environment,
        strategy = strategy.name(),
    );
    telemetry::traceparent_of(&root)
}

/// When `actions` start a wave: a span for it, a child of the deployment's,
/// and its context.
pub fn wave(record: &DeploymentRecord, actions: &[Action]) -> Option<String> {
    if record.traceparent.is_empty() {
        return None;
    }
    let note = wave_started(actions)?;
    let nodes = actions
        .iter()
        .filter(|a| matches!(a, Action::SetVersion { .. } | Action::Stage { .. }))
        .count();
    let d = &record.deployment;
    let span = telemetry::span_with_parent(
        tracing::info_span!(
            target: telemetry::TARGET,
            parent: None,
            "wave",
            deployment = %record.id,
            wave = d.wave + 1,
            waves = d.waves,
            nodes = nodes,
            note = %note,
        ),
        &record.traceparent,
    );
    Some(telemetry::traceparent_of(&span))
}

/// What a node command sets on `node`.
pub struct NodeCommand<'a> {
    pub node: &'a str,
    /// The node's name (its id when the deployment does not list it).
    pub name: &'a str,
    /// `set_version` or `stage`.
    pub kind: &'a str,
    pub version: &'a str,
    pub staged_version: &'a str,
}

/// A span for one node command, a child of `parent`, and its context.
pub fn node_command(record: &DeploymentRecord, parent: &str, command: &NodeCommand<'_>) -> String {
    let (node, name) = (command.node, command.name);
    let span = telemetry::span_with_parent(
        tracing::info_span!(
            target: telemetry::TARGET,
            parent: None,
            "node command",
            deployment = %record.id,
            node = %name,
            node.id = %node,
            module = %record.deployment.spec.module,
            version = %command.version,
            staged_version = %command.staged_version,
            kind = command.kind,
        ),
        parent,
    );
    telemetry::traceparent_of(&span)
}
