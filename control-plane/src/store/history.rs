//! The desired-state history (SPEC §9 "History"): one record per
//! desired-state write, saying what changed on which node, when, through
//! which deployment and by whom. Both backends write it in the same
//! transaction as the desired state it describes (see
//! [`super::DesiredRecords::update_desired_recorded`]); it is trimmed by age
//! (`history_retention`), independently of the event log. Pure: the
//! record, and the comparison of two desired states that makes it.

use hotswap_common::labels::Labels;
use serde::{Deserialize, Serialize};

use super::DesiredRecord;

/// Who and what a desired-state write is for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistoryOrigin {
    /// When (milliseconds since 1970, the control plane's steady clock).
    pub time_ms: u64,
    /// The deployment that made the change; empty for none (`nodes
    /// set-module`, a node's removal).
    pub deployment_id: String,
    /// The operator, or what acted for one (`catch-up`).
    pub by: String,
}

impl HistoryOrigin {
    pub fn new(time_ms: u64, deployment_id: &str, by: &str) -> Self {
        Self {
            time_ms,
            deployment_id: deployment_id.to_string(),
            by: by.to_string(),
        }
    }
}

/// One module's change within one write: its desired version before and
/// after (`None`: not desired), and its staged version when that changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleChange {
    pub module: String,
    pub from: Option<String>,
    pub to: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub staged_from: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub staged_to: String,
}

/// One desired-state write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRecord {
    /// The write's store-wide revision (the desired record's): the
    /// embedded store's counter, etcd's mod revision. Several records may
    /// share one on etcd (one transaction); `generation` orders a node's.
    #[serde(default)]
    pub seq: u64,
    pub node_id: String,
    /// The node's name and environment when it was written.
    pub node: String,
    pub environment: String,
    /// The node's desired generation this write made.
    pub generation: u64,
    pub time_ms: u64,
    pub deployment_id: String,
    pub by: String,
    pub changes: Vec<ModuleChange>,
    /// The node was removed (its desired state deleted).
    #[serde(default)]
    pub removed: bool,
}

/// The label that places a node in an environment.
const ENVIRONMENT_LABEL: &str = "environment";

/// What a history record says about its node: its name and labels when
/// written. Decodes from a stored node record's JSON without the rest of
/// it (a wave's writes read one per node).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct NodeNaming {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
}

/// A desired version as history shows it: an empty one ("keep whatever
/// is active") is none.
fn version(record: Option<&DesiredRecord>, module: &str) -> Option<String> {
    record
        .and_then(|r| r.modules.get(module))
        .map(|m| m.version.clone())
        .filter(|v| !v.is_empty())
}

fn staged(record: Option<&DesiredRecord>, module: &str) -> String {
    record
        .and_then(|r| r.modules.get(module))
        .map(|m| m.staged_version.clone())
        .unwrap_or_default()
}

/// The history record of a write that turned `before` into `after`
/// (`None`: removed) on `node_id`; `None` when it changed no module's
/// versions (a trace context only).
pub fn record_of(
    node_id: &str,
    node: Option<&NodeNaming>,
    before: &DesiredRecord,
    after: Option<&DesiredRecord>,
    origin: &HistoryOrigin,
) -> Option<HistoryRecord> {
    let mut modules: Vec<&String> = before.modules.keys().collect();
    if let Some(after) = after {
        modules.extend(after.modules.keys());
    }
    modules.sort();
    modules.dedup();
    let changes: Vec<ModuleChange> = modules
        .into_iter()
        .filter_map(|module| {
            let change = ModuleChange {
                module: module.clone(),
                from: version(Some(before), module),
                to: version(after, module),
                staged_from: staged(Some(before), module),
                staged_to: staged(after, module),
            };
            let present =
                |r: Option<&DesiredRecord>| r.is_some_and(|r| r.modules.contains_key(module));
            let same = change.from == change.to
                && change.staged_from == change.staged_to
                && present(Some(before)) == present(after);
            (!same).then_some(change)
        })
        .collect();
    if changes.is_empty() && after.is_some() {
        return None;
    }
    Some(HistoryRecord {
        seq: after.map_or(0, |a| a.revision),
        node_id: node_id.to_string(),
        node: node.map_or_else(|| node_id.to_string(), |n| n.name.clone()),
        environment: node
            .and_then(|n| n.labels.get(ENVIRONMENT_LABEL).cloned())
            .unwrap_or_default(),
        generation: after.map_or(before.generation + 1, |a| a.generation),
        time_ms: origin.time_ms,
        deployment_id: origin.deployment_id.clone(),
        by: origin.by.clone(),
        changes,
        removed: after.is_none(),
    })
}

/// Where history was trimmed up to: nothing at or before this is kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryTrimmed {
    /// The highest seq removed.
    pub seq: u64,
    /// Records older than this were removed.
    pub before_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::DesiredModuleRecord;

    fn desired(modules: &[(&str, &str)], generation: u64) -> DesiredRecord {
        DesiredRecord {
            generation,
            revision: generation,
            modules: modules
                .iter()
                .map(|(m, v)| {
                    (
                        m.to_string(),
                        DesiredModuleRecord {
                            version: v.to_string(),
                            ..Default::default()
                        },
                    )
                })
                .collect(),
        }
    }

    /// The naming read from a stored node record's JSON is the record's
    /// name and labels, whatever else the record holds.
    #[test]
    fn a_node_naming_decodes_from_a_stored_node_record() {
        let mut node = crate::store::NodeRecord::for_tests("n-1", "web-1");
        node.labels.insert("environment".into(), "prod".into());
        let naming: NodeNaming =
            serde_json::from_slice(&crate::store::encode(&node)).expect("naming");
        assert_eq!(naming.name, "web-1");
        assert_eq!(naming.labels, node.labels);
        let origin = HistoryOrigin::new(5, "d-1", "alice");
        let after = desired(&[("web", "1.0.0")], 1);
        let record = record_of(
            "n-1",
            Some(&naming),
            &DesiredRecord::default(),
            Some(&after),
            &origin,
        )
        .expect("a change");
        assert_eq!(
            (record.node.as_str(), record.environment.as_str()),
            ("web-1", "prod")
        );
    }

    #[test]
    fn a_write_records_only_the_modules_it_changed() {
        let origin = HistoryOrigin::new(5, "d-1", "alice");
        let before = desired(&[("web", "1.0.0"), ("db", "3.0.0")], 1);
        let after = desired(&[("web", "2.0.0"), ("db", "3.0.0"), ("new", "0.1.0")], 2);
        let record = record_of("n-1", None, &before, Some(&after), &origin).expect("a change");
        let changes: Vec<(&str, Option<&str>, Option<&str>)> = record
            .changes
            .iter()
            .map(|c| (c.module.as_str(), c.from.as_deref(), c.to.as_deref()))
            .collect();
        assert_eq!(
            changes,
            [
                ("new", None, Some("0.1.0")),
                ("web", Some("1.0.0"), Some("2.0.0"))
            ]
        );
        assert_eq!((record.seq, record.generation, record.time_ms), (2, 2, 5));
        assert_eq!(
            (record.deployment_id.as_str(), record.by.as_str()),
            ("d-1", "alice")
        );
        assert!(record_of("n-1", None, &after, Some(&after), &origin).is_none());
        let removed = record_of("n-1", None, &after, None, &origin).expect("removal");
        assert!(removed.removed);
        assert_eq!(removed.changes.len(), 3);
        assert!(removed.changes.iter().all(|c| c.to.is_none()));
    }
}
