//! The current version of each module in each environment, derived from the
//! stored deployments alone, and which nodes catch-up may bring to it.
//!
//! The rule (SPEC §6, "Nodes that were offline catch up"):
//!
//! - The **current version** of a module in an environment is the version of
//!   its newest *succeeded environment-wide* deployment (empty selector).
//!   A newer deployment that failed, was aborted or rolled back changes
//!   nothing. A manual `deploy rollback` of the succeeded deployment takes it
//!   out of the rule (it ends `rolled_back`), so the current version goes
//!   back to that of the succeeded deployment before it, or to none.
//! - While a deployment of the module in the environment is not finished,
//!   catch-up leaves the environment's module alone: that deployment owns
//!   its nodes.
//! - Nodes a newer deployment left on its version on purpose are exempt:
//!   those a failed or aborted deployment touched without rolling back (the
//!   operator asked for `--no-auto-rollback` or an abort to inspect them), and
//!   nodes matching the selector of a newer succeeded selector-narrowed
//!   deployment (a deliberately narrower version).
//!
//! Everything here is pure: the engine calls [`derive`] over its records.

use std::collections::{BTreeMap, HashSet};

use hotswap_common::labels::Labels;

use super::machine::State;
use super::record::DeploymentRecord;

/// The succeeded deployment that defines a module's current version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Current {
    pub version: String,
    pub deployment_id: String,
    pub created_ms: u64,
    /// The deployment's `--health-deadline`: how long a catching-up node has
    /// to report the version running.
    pub health_deadline_ms: u64,
}

/// What catch-up knows of one module in one environment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModuleInEnvironment {
    pub current: Option<Current>,
    /// Id of a deployment of the module there that is not finished.
    pub active: Option<String>,
    /// Nodes a newer failed or aborted deployment touched and left on its version.
    pub left_by_newer: HashSet<String>,
    /// Selectors of newer succeeded selector-narrowed deployments.
    pub narrowed: Vec<Labels>,
}

/// Where catch-up should take one node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// No succeeded environment-wide deployment: no current version.
    NoCurrent,
    /// A deployment of the module there is still going: it owns the nodes.
    Busy(&'a str),
    /// A newer deployment left the node where it is on purpose.
    Exempt,
    Version(&'a Current),
}

impl ModuleInEnvironment {
    /// The version catch-up should bring a node with `node_id` and `labels` to.
    pub fn target_for(&self, node_id: &str, labels: &Labels) -> Target<'_> {
        if let Some(active) = &self.active {
            return Target::Busy(active);
        }
        let Some(current) = &self.current else {
            return Target::NoCurrent;
        };
        let narrowed = self
            .narrowed
            .iter()
            .any(|selector| selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
        if narrowed || self.left_by_newer.contains(node_id) {
            return Target::Exempt;
        }
        Target::Version(current)
    }
}

/// (environment, module) → what catch-up knows of it.
pub type Currents = BTreeMap<(String, String), ModuleInEnvironment>;

fn order(record: &DeploymentRecord) -> (u64, &str) {
    (record.deployment.created_ms, record.id.as_str())
}

/// The current versions (and their exemptions) of every module and
/// environment that has deployments.
pub fn derive<'a, I>(records: I) -> Currents
where
    I: Iterator<Item = &'a DeploymentRecord> + Clone,
{
    let mut currents = Currents::new();
    let mut defining: BTreeMap<(String, String), &DeploymentRecord> = BTreeMap::new();
    for record in records.clone() {
        let key = (
            record.environment.clone(),
            record.deployment.spec.module.clone(),
        );
        let entry = currents.entry(key.clone()).or_default();
        let state = record.deployment.state;
        if !state.is_terminal() {
            entry.active = Some(record.id.clone());
        }
        if state == State::Succeeded
            && record.selector.is_empty()
            && defining
                .get(&key)
                .is_none_or(|best| order(best) < order(record))
        {
            defining.insert(key, record);
        }
    }
    for (key, record) in &defining {
        if let Some(entry) = currents.get_mut(key) {
            entry.current = Some(Current {
                version: record.deployment.spec.version.clone(),
                deployment_id: record.id.clone(),
                created_ms: record.deployment.created_ms,
                health_deadline_ms: record.deployment.spec.health_deadline_ms,
            });
        }
    }
    // Only deployments newer than the current one can exempt nodes from it.
    for record in records {
        let key = (
            record.environment.clone(),
            record.deployment.spec.module.clone(),
        );
        let Some(current) = defining.get(&key) else {
            continue;
        };
        if order(record) <= order(current) {
            continue;
        }
        let Some(entry) = currents.get_mut(&key) else {
            continue;
        };
        match record.deployment.state {
            State::Succeeded if !record.selector.is_empty() => {
                entry.narrowed.push(record.selector.clone());
            }
            State::Failed | State::Aborted => entry.left_by_newer.extend(
                record
                    .deployment
                    .nodes
                    .iter()
                    .filter(|t| t.touched)
                    .map(|t| t.node.clone()),
            ),
            _ => {}
        }
    }
    currents
}

/// Why deploying `module@version` to `environment`, whose current version
/// of it is `current`, is a downgrade to refuse; `None` when it is not one
/// (or when either version is not semver, which deployments never are).
pub fn downgrade_refusal(
    module: &str,
    version: &str,
    environment: &str,
    current: &Current,
) -> Option<Downgrade> {
    let new = semver::Version::parse(version).ok()?;
    let old = semver::Version::parse(&current.version).ok()?;
    (new < old).then(|| Downgrade {
        module: module.to_string(),
        version: version.to_string(),
        environment: environment.to_string(),
        current: current.version.clone(),
        deployment_id: current.deployment_id.clone(),
    })
}

/// A version older than its environment's current one, refused unless the
/// caller allows downgrades (the API edge says how).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "{module}@{version} is a downgrade: the current version of {module} in {environment} is {current} (deployment {deployment_id})"
)]
pub struct Downgrade {
    pub module: String,
    pub version: String,
    pub environment: String,
    /// The environment's current version.
    pub current: String,
    /// The deployment that made it current.
    pub deployment_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::machine::{Deployment, Spec, Strategy, Thresholds};

    fn record(
        id: &str,
        env: &str,
        version: &str,
        created_ms: u64,
        state: State,
        selector: &[(&str, &str)],
        touched: &[&str],
    ) -> DeploymentRecord {
        let spec = Spec {
            module: "web".into(),
            version: version.into(),
            strategy: Strategy::Direct,
            max_failures: 0,
            health_deadline_ms: 30_000,
            progress_deadline_ms: 60_000,
            auto_rollback: true,
            require_approval: false,
            approval_timeout_ms: 0,
            pause_timeout_ms: 0,
            created_by: "alice".into(),
            thresholds: Thresholds::default(),
        };
        let targets = ["n1", "n2", "n3"]
            .iter()
            .map(|n| (n.to_string(), n.to_string(), "0.9.0".to_string()))
            .collect();
        let (mut deployment, _) = Deployment::new(spec, targets, created_ms);
        deployment.state = state;
        for track in &mut deployment.nodes {
            track.touched = touched.contains(&track.node.as_str());
        }
        DeploymentRecord {
            id: id.into(),
            environment: env.into(),
            deployment,
            selector: selector
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            traceparent: String::new(),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The target of node `n1` (no labels) for `web` in `dev`, as a word.
    fn target_of(records: &[DeploymentRecord], node: &str, node_labels: &[(&str, &str)]) -> String {
        let currents = derive(records.iter());
        match currents
            .get(&("dev".to_string(), "web".to_string()))
            .map(|m| m.target_for(node, &labels(node_labels)))
        {
            None | Some(Target::NoCurrent) => "none".into(),
            Some(Target::Busy(id)) => format!("busy {id}"),
            Some(Target::Exempt) => "exempt".into(),
            Some(Target::Version(c)) => format!("{} ({})", c.version, c.deployment_id),
        }
    }

    #[test]
    fn the_current_version_is_the_newest_succeeded_environment_wide_deployment() {
        use State::*;
        let ok1 = record("d1", "dev", "1.0.0", 10, Succeeded, &[], &["n1"]);
        let ok2 = record("d2", "dev", "1.1.0", 20, Succeeded, &[], &["n1"]);
        let cases: Vec<(&str, Vec<DeploymentRecord>, &str)> = vec![
            ("nothing deployed", vec![], "none"),
            ("one success", vec![ok1.clone()], "1.0.0 (d1)"),
            (
                "the newest success wins, whatever the map order",
                vec![ok2.clone(), ok1.clone()],
                "1.1.0 (d2)",
            ),
            (
                "a newer rolled back deployment changes nothing",
                vec![
                    ok1.clone(),
                    record("d3", "dev", "2.0.0", 30, RolledBack, &[], &["n1"]),
                ],
                "1.0.0 (d1)",
            ),
            (
                "a manual rollback of the newest success goes back to the one before",
                vec![
                    ok1.clone(),
                    record("d2", "dev", "1.1.0", 20, RolledBack, &[], &["n1"]),
                ],
                "1.0.0 (d1)",
            ),
            (
                "rolling back the only success leaves no current version",
                vec![record("d1", "dev", "1.0.0", 10, RolledBack, &[], &["n1"])],
                "none",
            ),
            (
                "a selector-narrowed success does not define the environment's version",
                vec![record(
                    "d1",
                    "dev",
                    "1.0.0",
                    10,
                    Succeeded,
                    &[("tier", "edge")],
                    &[],
                )],
                "none",
            ),
            (
                "another environment's success is not this one's",
                vec![record("d1", "qa", "1.0.0", 10, Succeeded, &[], &["n1"])],
                "none",
            ),
            (
                "an active deployment owns the environment's module",
                vec![
                    ok1.clone(),
                    record("d4", "dev", "1.2.0", 40, Running, &[], &[]),
                ],
                "busy d4",
            ),
            (
                "also while it rolls back",
                vec![
                    ok1.clone(),
                    record("d4", "dev", "1.2.0", 40, RollingBack, &[], &[]),
                ],
                "busy d4",
            ),
            (
                "a newer failure without rollback leaves the nodes it touched alone",
                vec![
                    ok1.clone(),
                    record("d5", "dev", "2.0.0", 50, Failed, &[], &["n1"]),
                ],
                "exempt",
            ),
            (
                "and so does an abort",
                vec![
                    ok1.clone(),
                    record("d5", "dev", "2.0.0", 50, Aborted, &[], &["n1"]),
                ],
                "exempt",
            ),
            (
                "an older failure does not",
                vec![
                    record("d0", "dev", "0.5.0", 5, Failed, &[], &["n1"]),
                    ok1.clone(),
                ],
                "1.0.0 (d1)",
            ),
        ];
        for (what, records, expected) in cases {
            assert_eq!(target_of(&records, "n1", &[]), expected, "{what}");
        }
    }

    #[test]
    fn only_a_lower_semver_version_is_a_downgrade() {
        let current = Current {
            version: "1.10.0".into(),
            deployment_id: "d-1".into(),
            created_ms: 1,
            health_deadline_ms: 1,
        };
        let cases = [
            ("1.10.0", false),
            ("1.10.1", false),
            ("2.0.0", false),
            // Semver order, not string order.
            ("1.9.0", true),
            ("1.10.0-rc.1", true),
            ("0.1.0", true),
        ];
        for (version, refused) in cases {
            let why = downgrade_refusal("web", version, "dev", &current);
            assert_eq!(why.is_some(), refused, "{version}: {why:?}");
            if let Some(why) = why {
                assert_eq!(
                    why.to_string(),
                    format!(
                        "web@{version} is a downgrade: the current version of web in dev is 1.10.0 (deployment {})",
                        current.deployment_id
                    )
                );
            }
        }
    }

    #[test]
    fn exemptions_are_per_node() {
        use State::*;
        let records = vec![
            record("d1", "dev", "1.0.0", 10, Succeeded, &[], &["n1", "n2"]),
            record("d2", "dev", "2.0.0", 20, Failed, &[], &["n2"]),
            record(
                "d3",
                "dev",
                "1.5.0",
                30,
                Succeeded,
                &[("tier", "edge")],
                &[],
            ),
            // An older narrowed success is overruled by the newer environment-wide one.
            record("d0", "dev", "0.1.0", 1, Succeeded, &[("zone", "b")], &[]),
        ];
        let cases = [
            ("n1", vec![], "1.0.0 (d1)"),
            ("n2", vec![], "exempt"),
            ("n3", vec![("tier", "edge")], "exempt"),
            ("n3", vec![("tier", "core")], "1.0.0 (d1)"),
            ("n3", vec![("zone", "b")], "1.0.0 (d1)"),
        ];
        for (node, node_labels, expected) in cases {
            assert_eq!(
                target_of(&records, node, &node_labels),
                expected,
                "{node} {node_labels:?}"
            );
        }
    }
}
