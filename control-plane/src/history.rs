//! Time travel over the desired-state history (SPEC §9): what each node of
//! an environment was told to run at a past point, and what changed
//! between two points. Pure: the store's records in, answers out.
//!
//! A past state is the present one with every later change undone, newest
//! first (each record keeps a module's version before and after). So no
//! baseline is kept and trimming old records loses nothing newer: only
//! points before the trim ([`HistoryTrimmed`]) are refused.

use std::collections::BTreeMap;

use crate::store::{HistoryRecord, HistoryTrimmed};

/// A point in the history.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    /// Milliseconds since 1970: every change made at or before it.
    Time(u64),
    /// Every change with this seq or a lower one.
    Seq(u64),
    Now,
}

/// Why a question about the history has no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HistoryError {
    #[error(
        "history before {} (seq {seq}) is no longer kept (history_retention); ask about a later point",
        hotswap_common::timefmt::rfc3339_from_ms(*before_ms)
    )]
    Trimmed { before_ms: u64, seq: u64 },
    #[error("unknown environment {environment:?}; the environments are {}", known.join(", "))]
    UnknownEnvironment {
        environment: String,
        known: Vec<String>,
    },
    #[error("--from {from} is after --to {to}")]
    Reversed { from: u64, to: u64 },
}

/// One node as it is now: its name, environment and desired versions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeNow {
    pub node_id: String,
    pub name: String,
    pub environment: String,
    pub modules: BTreeMap<String, String>,
}

/// One node's desired versions at a point.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAt {
    pub name: String,
    pub environment: String,
    pub modules: BTreeMap<String, String>,
}

/// One module's change, as `history diff` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChangeRow {
    pub seq: u64,
    pub time_ms: u64,
    pub node: String,
    pub environment: String,
    pub module: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub deployment_id: String,
    pub by: String,
}

/// The seq a point stands for. `records` in seq order.
pub fn resolve(
    point: Point,
    records: &[HistoryRecord],
    trimmed: Option<HistoryTrimmed>,
) -> Result<u64, HistoryError> {
    let newest = records.last().map_or(0, |r| r.seq);
    let floor = trimmed.map_or(0, |t| t.seq);
    let refuse = |t: HistoryTrimmed| HistoryError::Trimmed {
        before_ms: t.before_ms,
        seq: t.seq,
    };
    match point {
        Point::Now => Ok(newest.max(floor)),
        Point::Seq(seq) => match trimmed {
            Some(t) if seq < t.seq => Err(refuse(t)),
            _ => Ok(seq),
        },
        Point::Time(ms) => {
            if let Some(t) = trimmed
                && ms < t.before_ms
            {
                return Err(refuse(t));
            }
            let at = records
                .iter()
                .filter(|r| r.time_ms <= ms)
                .map(|r| r.seq)
                .max()
                .unwrap_or(0);
            Ok(at.max(floor))
        }
    }
}

/// Every node's desired versions at `seq`: the present state with every
/// record after `seq` undone, newest first. Nodes with nothing desired
/// then are left out. Keyed by node id.
pub fn state_at(
    current: &[NodeNow],
    records: &[HistoryRecord],
    seq: u64,
) -> BTreeMap<String, NodeAt> {
    let mut nodes: BTreeMap<String, NodeAt> = current
        .iter()
        .map(|n| {
            (
                n.node_id.clone(),
                NodeAt {
                    name: n.name.clone(),
                    environment: n.environment.clone(),
                    modules: n.modules.clone(),
                },
            )
        })
        .collect();
    for record in records.iter().rev().filter(|r| r.seq > seq) {
        let node = nodes.entry(record.node_id.clone()).or_default();
        if node.name.is_empty() {
            node.name = record.node.clone();
        }
        // The environment the node was in when this was written.
        if !record.environment.is_empty() {
            node.environment = record.environment.clone();
        }
        for change in &record.changes {
            match &change.from {
                Some(version) => {
                    node.modules.insert(change.module.clone(), version.clone());
                }
                None => {
                    node.modules.remove(&change.module);
                }
            }
        }
    }
    nodes.retain(|_, n| !n.modules.is_empty());
    nodes
}

/// The state after applying `records` (in order) to nothing: what
/// [`state_at`] must agree with.
#[cfg(test)]
fn replay(records: &[HistoryRecord]) -> BTreeMap<String, NodeAt> {
    let mut nodes: BTreeMap<String, NodeAt> = BTreeMap::new();
    for record in records {
        let node = nodes.entry(record.node_id.clone()).or_default();
        node.name = record.node.clone();
        node.environment = record.environment.clone();
        for change in &record.changes {
            match &change.to {
                Some(version) => {
                    node.modules.insert(change.module.clone(), version.clone());
                }
                None => {
                    node.modules.remove(&change.module);
                }
            }
        }
    }
    nodes.retain(|_, n| !n.modules.is_empty());
    nodes
}

/// The version changes after `from` up to and including `to`, oldest
/// first, of `environment` (all when `None`). Writes that changed only a
/// staged version are left out: the running version did not move.
pub fn diff(
    records: &[HistoryRecord],
    from: u64,
    to: u64,
    environment: Option<&str>,
) -> Vec<ChangeRow> {
    records
        .iter()
        .filter(|r| r.seq > from && r.seq <= to)
        .filter(|r| environment.is_none_or(|e| r.environment == e))
        .flat_map(|r| {
            r.changes
                .iter()
                .filter(|c| c.from != c.to)
                .map(move |c| ChangeRow {
                    seq: r.seq,
                    time_ms: r.time_ms,
                    node: r.node.clone(),
                    environment: r.environment.clone(),
                    module: c.module.clone(),
                    from: c.from.clone(),
                    to: c.to.clone(),
                    deployment_id: r.deployment_id.clone(),
                    by: r.by.clone(),
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::{prop, prop_assert_eq, proptest};

    use super::*;
    use crate::store::history::ModuleChange;

    /// Records from a run of (node, module, version-or-removal) writes,
    /// each with the version it replaced, as the store writes them.
    fn simulate(writes: &[(u8, u8, Option<u8>, u8)]) -> (Vec<HistoryRecord>, Vec<NodeNow>) {
        let mut state: BTreeMap<String, NodeNow> = BTreeMap::new();
        let mut records = Vec::new();
        for (i, (node, module, version, env)) in writes.iter().enumerate() {
            let node_id = format!("n-{node}");
            let now = state.entry(node_id.clone()).or_insert_with(|| NodeNow {
                node_id: node_id.clone(),
                name: format!("node-{node}"),
                ..NodeNow::default()
            });
            now.environment = format!("env-{}", env % 2);
            let module = format!("m{module}");
            let to = version.map(|v| format!("1.{v}.0"));
            let from = match &to {
                Some(v) => now.modules.insert(module.clone(), v.clone()),
                None => now.modules.remove(&module),
            };
            records.push(HistoryRecord {
                seq: i as u64 + 1,
                node_id,
                node: now.name.clone(),
                environment: now.environment.clone(),
                generation: i as u64 + 1,
                time_ms: 1000 * (i as u64 + 1),
                deployment_id: format!("d-{i}"),
                by: "alice".into(),
                changes: vec![ModuleChange {
                    module,
                    from,
                    to,
                    staged_from: String::new(),
                    staged_to: String::new(),
                }],
                removed: false,
            });
        }
        (records, state.into_values().collect())
    }

    proptest! {
        /// Undoing the changes after seq N from the present state gives
        /// the state that replaying the changes up to N builds, for every N.
        #[test]
        fn undoing_later_changes_equals_replaying_up_to_the_seq(
            writes in prop::collection::vec(
                (0..4u8, 0..3u8, prop::option::of(0..5u8), 0..2u8),
                0..40,
            ),
        ) {
            let (records, current) = simulate(&writes);
            for n in 0..=records.len() {
                let at = state_at(&current, &records, n as u64);
                let replayed = replay(&records[..n]);
                prop_assert_eq!(
                    at.iter().map(|(k, v)| (k, &v.modules)).collect::<Vec<_>>(),
                    replayed.iter().map(|(k, v)| (k, &v.modules)).collect::<Vec<_>>()
                );
            }
        }
    }

    #[test]
    fn times_resolve_to_the_last_seq_at_or_before_them() {
        let (records, _) = simulate(&[(0, 0, Some(1), 0), (0, 0, Some(2), 0)]);
        assert_eq!(resolve(Point::Time(999), &records, None), Ok(0));
        assert_eq!(resolve(Point::Time(1000), &records, None), Ok(1));
        assert_eq!(resolve(Point::Time(1500), &records, None), Ok(1));
        assert_eq!(resolve(Point::Time(9000), &records, None), Ok(2));
        assert_eq!(resolve(Point::Now, &records, None), Ok(2));
        let trimmed = Some(HistoryTrimmed {
            seq: 1,
            before_ms: 1500,
        });
        assert!(matches!(
            resolve(Point::Time(1400), &records[1..], trimmed),
            Err(HistoryError::Trimmed { seq: 1, .. })
        ));
        assert_eq!(resolve(Point::Time(1600), &records[1..], trimmed), Ok(1));
        assert!(resolve(Point::Seq(0), &records[1..], trimmed).is_err());
        assert_eq!(resolve(Point::Seq(1), &records[1..], trimmed), Ok(1));
    }

    #[test]
    fn a_diff_lists_the_changes_in_between_with_who_and_which_deployment() {
        let (records, current) = simulate(&[
            (0, 0, Some(1), 0),
            (1, 0, Some(1), 1),
            (0, 0, Some(2), 0),
            (0, 0, None, 0),
        ]);
        let rows = diff(&records, 1, 3, Some("env-0"));
        assert_eq!(rows.len(), 1, "{rows:?}");
        assert_eq!(
            (
                rows[0].from.as_deref(),
                rows[0].to.as_deref(),
                rows[0].deployment_id.as_str(),
                rows[0].by.as_str()
            ),
            (Some("1.1.0"), Some("1.2.0"), "d-2", "alice")
        );
        assert_eq!(diff(&records, 0, 4, None).len(), 4);
        // The node's module was removed at the end: it had 1.2.0 at seq 3.
        let at = state_at(&current, &records, 3);
        assert_eq!(at["n-0"].modules["m0"], "1.2.0");
        assert!(!state_at(&current, &records, 4).contains_key("n-0"));
    }
}
