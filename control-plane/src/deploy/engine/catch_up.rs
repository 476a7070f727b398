//! Catch-up: nodes of an environment that are not on its current version
//! (see [`crate::deploy::current`]) are brought to it when they attach (newly
//! enrolled or back from an outage) and when a deployment there finishes
//! (nodes that came back during it, nodes it failed on). Each move goes
//! through the same trust checks as a deployment, and ends in an event:
//! `node.caught_up` once the node reports the version running, or
//! `node.catch_up_failed` with the reason.
//!
//! Nothing here is durable by itself: the current version comes from stored
//! deployments, the moves are stored desired states, and after a restart
//! every node attaches again and is looked at afresh. The work is driven by
//! attaches and finished deployments, never by a scan of the fleet per tick.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use hotswap_common::labels::ENVIRONMENT_LABEL;

use super::{DeploymentRecord, Engine};
use crate::clock::steady_now_ms;
use crate::deploy::current::{Currents, Target, derive};
use crate::deploy::machine::{Health, NodeState, Phase};
use crate::events::Event;
use crate::registry::DesiredChange;
use crate::store::DesiredModuleRecord;

/// Catch-up's bookkeeping, in memory only.
#[derive(Default)]
pub(super) struct CatchUps {
    /// Nodes to look at once their session has reported what they run.
    examine: HashSet<String>,
    /// Environments where a deployment just finished: each of their
    /// connected nodes is looked at.
    finished: BTreeSet<String>,
    /// Nodes on their way to a current version, by (node id, module).
    pending: HashMap<(String, String), Pending>,
    /// The derivation over the deployments, until one is created or changes state.
    currents: Option<Arc<Currents>>,
}

#[derive(Clone, Debug)]
struct Pending {
    name: String,
    environment: String,
    version: String,
    deployment_id: String,
    deadline_ms: u64,
}

impl CatchUps {
    /// A deployment was created or changed state: the derivation is stale,
    /// and a finished one sends catch-up over its environment.
    pub(super) fn deployment_changed(&mut self, environment: &str, finished: bool) {
        self.currents = None;
        if finished {
            self.finished.insert(environment.to_string());
        }
    }

    pub(super) fn attached(&mut self, nodes: Vec<String>) {
        self.examine.extend(nodes);
    }
}

/// What one look at a node decided for one module.
enum Decision {
    /// Set the desired version and wait for the node to run it.
    Move,
    /// The node already desires the version: only wait for it.
    Watch,
    Refuse(String),
}

impl Engine {
    pub(super) fn catch_ups(&self) -> std::sync::MutexGuard<'_, CatchUps> {
        // Plain bookkeeping: a panic elsewhere leaves nothing half-done here.
        self.catch_ups.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current version of every module in every environment, derived
    /// from the deployments (cached until one is created or changes state).
    pub async fn currents(&self) -> Arc<Currents> {
        if let Some(currents) = self.catch_ups().currents.clone() {
            return currents;
        }
        // Derived and cached under the deployments lock: every change that
        // makes it stale is committed under that lock too.
        let deployments = self.deployments.lock().await;
        let currents = Arc::new(derive(deployments.values().map(|r| &**r)));
        self.catch_ups().currents = Some(currents.clone());
        currents
    }

    /// One catch-up pass: settle the nodes on their way, then look at the
    /// nodes that attached or whose environment's deployment finished.
    pub(super) async fn catch_up(&self) {
        let finished = std::mem::take(&mut self.catch_ups().finished);
        for environment in finished {
            match self.registry.list(Some(&environment)) {
                Ok(nodes) => self.catch_ups().examine.extend(
                    nodes
                        .into_iter()
                        .filter(|n| n.connected)
                        .map(|n| n.record.id),
                ),
                Err(e) => {
                    tracing::warn!(environment = %environment, error = %e, "cannot list the environment's nodes for catch-up")
                }
            }
        }
        let (has_pending, has_examine) = {
            let c = self.catch_ups();
            (!c.pending.is_empty(), !c.examine.is_empty())
        };
        if !has_pending && !has_examine {
            return;
        }
        let currents = self.currents().await;
        if has_pending {
            self.settle_pending(&currents);
        }
        if has_examine {
            self.examine(&currents).await;
        }
    }

    /// End the catch-ups whose node now runs the version (or failed to).
    fn settle_pending(&self, currents: &Currents) {
        // By module: one look at the registry's memory per module.
        let mut by_module: BTreeMap<String, Vec<(String, Pending)>> = BTreeMap::new();
        for ((node, module), p) in &self.catch_ups().pending {
            by_module
                .entry(module.clone())
                .or_default()
                .push((node.clone(), p.clone()));
        }
        let now = steady_now_ms();
        let mut done = Vec::new();
        for (module, pending) in by_module {
            let ids: Vec<&str> = pending.iter().map(|(n, _)| n.as_str()).collect();
            let outcomes = self.registry.observe(&ids, &module, |seen| {
                let m = seen.module?;
                if !(seen.connected && seen.current) {
                    return None;
                }
                let phase = m.phase;
                if phase == Phase::Running && m.health != Health::Unhealthy {
                    return Some(Ok(m.version.clone()));
                }
                if phase == Phase::Failed || m.crash_loop {
                    return Some(Err(if m.message.is_empty() {
                        "the agent reports it failed".to_string()
                    } else {
                        m.message.clone()
                    }));
                }
                None
            });
            for ((node, p), outcome) in pending.into_iter().zip(outcomes) {
                let in_env = currents.get(&(p.environment.clone(), module.clone()));
                if let Some(active) = in_env.and_then(|m| m.active.as_deref()) {
                    tracing::info!(node = %p.name, module = %module, deployment = %active, "a deployment took over the node's catch-up");
                    done.push((node, module.clone()));
                    continue;
                }
                let Some(current) = in_env
                    .and_then(|m| m.current.as_ref())
                    .filter(|c| c.version == p.version)
                else {
                    tracing::info!(node = %p.name, module = %module, version = %p.version, "the version is no longer current; catch-up ends");
                    done.push((node, module.clone()));
                    continue;
                };
                let outcome = match outcome {
                    Some(Ok(version)) if version == p.version => Ok(()),
                    Some(Err(why)) => Err(why),
                    // Running another version: still on its way.
                    Some(Ok(_)) | None if now < p.deadline_ms => continue,
                    Some(Ok(_)) | None => Err(format!(
                        "it did not report the version running within its health deadline ({}s)",
                        current.health_deadline_ms / 1000
                    )),
                };
                let event = match outcome {
                    Ok(()) => Event::new(
                        "node.caught_up",
                        format!(
                            "{} caught up to {module}@{}, the current version of {} (deployment {})",
                            p.name, p.version, p.environment, p.deployment_id
                        ),
                    ),
                    Err(why) => Event::new(
                        "node.catch_up_failed",
                        format!(
                            "{} did not catch up to {module}@{}, the current version of {}: {why}",
                            p.name, p.version, p.environment
                        ),
                    ),
                };
                tracing::info!(node = %p.name, module = %module, version = %p.version, kind = %event.kind, "{}", event.message);
                self.events
                    .append(event.node(&p.name).module(&module, &p.version));
                done.push((node, module.clone()));
            }
        }
        let mut c = self.catch_ups();
        for key in done {
            c.pending.remove(&key);
        }
    }

    /// Look at the nodes waiting to be examined that have reported, and move
    /// those not on their environment's current version.
    async fn examine(&self, currents: &Currents) {
        let waiting: Vec<String> = self.catch_ups().examine.iter().cloned().collect();
        let ids: Vec<&str> = waiting.iter().map(String::as_str).collect();
        let seen = self
            .registry
            .observe(&ids, "", |o| (o.connected, o.reported));
        let mut ready = Vec::new();
        {
            let mut c = self.catch_ups();
            for (id, (connected, reported)) in waiting.iter().zip(seen) {
                // A node that left again is looked at when it attaches again.
                if !connected {
                    c.examine.remove(id);
                } else if reported {
                    c.examine.remove(id);
                    ready.push(id.clone());
                }
            }
        }
        if ready.is_empty() {
            return;
        }
        let now = steady_now_ms();
        let mut changes: Vec<DesiredChange> = Vec::new();
        let mut started: Vec<((String, String), Pending)> = Vec::new();
        let mut refusals: Vec<Event> = Vec::new();
        // One trust check per environment and version, however many nodes.
        let mut checked: HashMap<(String, String, String), Result<(), String>> = HashMap::new();
        // The deployments that define current versions (a few records), and
        // per deployment the nodes it counted healthy, built when first needed.
        let defining: HashMap<String, Arc<DeploymentRecord>> = {
            let deployments = self.deployments.lock().await;
            currents
                .values()
                .filter_map(|m| m.current.as_ref())
                .filter_map(|c| {
                    deployments
                        .get(&c.deployment_id)
                        .map(|r| (c.deployment_id.clone(), r.clone()))
                })
                .collect()
        };
        let mut counted_healthy: HashMap<String, HashSet<String>> = HashMap::new();
        for id in ready {
            let Ok(node) = self.registry.find(&id) else {
                continue;
            };
            let Some(environment) = node.record.labels.get(ENVIRONMENT_LABEL) else {
                continue;
            };
            let modules = currents
                .range((environment.clone(), String::new())..)
                .take_while(|((env, _), _)| env == environment);
            for ((_, module), in_env) in modules {
                let Target::Version(current) = in_env.target_for(&id, &node.record.labels) else {
                    continue;
                };
                let key = (id.clone(), module.clone());
                {
                    let mut c = self.catch_ups();
                    if let Some(p) = c.pending.get_mut(&key)
                        && p.version == current.version
                    {
                        // Back again while on its way: its deadline starts over.
                        p.deadline_ms = now + current.health_deadline_ms;
                        continue;
                    }
                }
                // Starting counts: an agent that restarted re-adopts what it ran.
                let runs = node.modules.iter().any(|m| {
                    m.name == *module && m.version == current.version && m.phase != Phase::Failed
                });
                if runs {
                    continue;
                }
                let desires = node
                    .desired
                    .modules
                    .get(module)
                    .is_some_and(|d| d.version == current.version);
                if desires {
                    // A node the deployment counted healthy converges by
                    // itself (an agent restarting): nothing to report.
                    let healthy = counted_healthy
                        .entry(current.deployment_id.clone())
                        .or_insert_with(|| {
                            defining
                                .get(&current.deployment_id)
                                .map(|r| {
                                    r.deployment
                                        .nodes
                                        .iter()
                                        .filter(|t| t.state == NodeState::Healthy)
                                        .map(|t| t.node.clone())
                                        .collect()
                                })
                                .unwrap_or_default()
                        });
                    if healthy.contains(&id) {
                        continue;
                    }
                }
                let have = node
                    .modules
                    .iter()
                    .find(|m| m.name == *module)
                    .map_or_else(|| "nothing".to_string(), |m| m.version.clone());
                let decision = match checked
                    .entry((environment.clone(), module.clone(), current.version.clone()))
                    .or_insert_with(|| self.deployable(environment, module, &current.version))
                {
                    Err(why) => Decision::Refuse(why.clone()),
                    Ok(()) if desires => Decision::Watch,
                    Ok(()) => Decision::Move,
                };
                let name = node.record.name.clone();
                match decision {
                    Decision::Refuse(why) => {
                        tracing::warn!(node = %name, module = %module, version = %current.version, reason = %why, "catch-up refused; the node is left alone");
                        refusals.push(
                            Event::new(
                                "node.catch_up_failed",
                                format!(
                                    "{name} stays on {have}, not caught up to {module}@{}, the current version of {environment}: {why}",
                                    current.version
                                ),
                            )
                            .node(&name)
                            .module(module, &current.version),
                        );
                        continue;
                    }
                    Decision::Move => {
                        tracing::info!(node = %name, module = %module, from = %have, version = %current.version, deployment = %current.deployment_id, "bringing the node to its environment's current version");
                        changes.push((
                            id.clone(),
                            module.clone(),
                            Some(DesiredModuleRecord {
                                version: current.version.clone(),
                                staged_version: String::new(),
                                // Not a step of a deployment: no trace to join.
                                traceparent: String::new(),
                            }),
                        ));
                    }
                    Decision::Watch => {
                        tracing::info!(node = %name, module = %module, version = %current.version, "the node desires its environment's current version but does not run it; watching it");
                    }
                }
                started.push((
                    key,
                    Pending {
                        name,
                        environment: environment.clone(),
                        version: current.version.clone(),
                        deployment_id: current.deployment_id.clone(),
                        deadline_ms: now + current.health_deadline_ms,
                    },
                ));
            }
        }
        for event in refusals {
            self.events.append(event);
        }
        if let Err(e) = self.move_nodes(&changes).await {
            tracing::error!(error = %e, nodes = changes.len(), "cannot store catch-up desired states; they are tried again when the nodes attach");
            let moved: HashSet<&str> = changes.iter().map(|(n, _, _)| n.as_str()).collect();
            started.retain(|((node, _), _)| !moved.contains(node.as_str()));
        }
        self.catch_ups().pending.extend(started);
    }

    /// Whether `module@version` may be deployed to `environment` today.
    fn deployable(&self, environment: &str, module: &str, version: &str) -> Result<(), String> {
        let artifact = self
            .artifacts
            .get_artifact(module, version)
            .map_err(|e| format!("cannot read artifact {module}@{version}: {e}"))?
            .ok_or_else(|| format!("artifact {module}@{version} is no longer stored"))?;
        let required = self.settings.min_signatures(environment);
        crate::trust::ensure_deployable(&*self.artifacts, &artifact, required, steady_now_ms())
            .map_err(|e| e.to_string())
    }

    /// Store the catch-up desired states in one flush, then hand them out.
    async fn move_nodes(
        &self,
        changes: &[DesiredChange],
    ) -> Result<(), crate::registry::RegistryError> {
        if changes.is_empty() {
            return Ok(());
        }
        // Catch-up acts for no operator and no deployment of its own; nodes
        // removed meanwhile are left out.
        let origin =
            crate::store::HistoryOrigin::new(crate::clock::steady_now_ms(), "", "catch-up");
        let written = self.registry.write_desired(changes.to_vec(), &origin)?;
        self.durability.flush().await?;
        self.registry.push_desired(&written)
    }
}
