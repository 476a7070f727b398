//! `Events` (the durable event stream, replayed then followed) and
//! `Clusters` (per-environment health, versions and metric averages).

use std::collections::BTreeMap;
use std::sync::Arc;

use hotswap_common::labels::ENVIRONMENT_LABEL;
use hotswap_common::pb;
use hotswap_common::status::Health;
use hotswap_common::timefmt::ts_from_ms;
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

use super::Context;
use super::stream::{ServerStream, spawn_stream};
use crate::deploy::current::Currents;
use crate::deploy::engine::Engine;
use crate::error::ApiError;
use crate::events::{Event, EventFilter};
use crate::registry::NodeState;

/// Stored events read per page while replaying.
const PAGE: usize = 1000;

pub struct EventsService {
    ctx: Arc<Context>,
}

impl EventsService {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }
}

pub fn event_to_pb(e: Event) -> pb::Event {
    pb::Event {
        seq: e.seq,
        time: Some(ts_from_ms(e.time_ms)),
        kind: e.kind,
        deployment_id: e.deployment_id.unwrap_or_default(),
        node: e.node.unwrap_or_default(),
        module: e.module.unwrap_or_default(),
        version: e.version.unwrap_or_default(),
        message: e.message,
    }
}

type EventStream = ServerStream<pb::Event>;

#[tonic::async_trait]
impl pb::events_server::Events for EventsService {
    type WatchEventsStream = EventStream;

    async fn watch_events(
        &self,
        request: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.ctx.reader(&request)?;
        let r = request.into_inner();
        let filter = EventFilter {
            kinds: r.kinds,
            deployment_id: r.deployment_id,
            node: r.node,
            module: r.module,
        };
        let limit = if r.limit == 0 { 1000 } else { r.limit as usize };
        let follow = r.follow;
        let newest = r.newest;
        let events = self.ctx.events.clone();
        // Subscribe before reading, so nothing falls between replay and live.
        let mut live = events.subscribe();
        Ok(spawn_stream(&self.ctx.shutdown, 256, |sink| async move {
            let log = &*events;
            let mut next = r.since;
            // The newest `limit`: find where they start, then replay from
            // there as usual (events appended meanwhile come after them, and
            // with follow they are sent too).
            if newest {
                match log.newest_start(next, &filter, limit) {
                    Ok(start) => next = start,
                    Err(e) => return sink.fail(e).await,
                }
            }
            let mut sent = 0usize;
            // Replay (and catch up after lagging) page by page.
            let catch_up = |next: &mut u64, sent: &mut usize| -> Result<Vec<Event>, ApiError> {
                let want = if follow {
                    PAGE
                } else {
                    (limit - *sent).min(PAGE)
                };
                let page = log.read(*next, &filter, want)?;
                if let Some(last) = page.last() {
                    *next = last.seq + 1;
                }
                *sent += page.len();
                Ok(page)
            };
            loop {
                let page = match catch_up(&mut next, &mut sent) {
                    Ok(page) => page,
                    Err(e) => return sink.fail(e).await,
                };
                let done = page.len() < PAGE || (!follow && sent >= limit);
                for event in page {
                    if !sink.send(event_to_pb(event)).await {
                        return;
                    }
                }
                if done {
                    break;
                }
            }
            if !follow {
                return;
            }
            loop {
                let Some(event) = sink.next(live.recv()).await else {
                    return;
                };
                match event {
                    Ok(event) if event.seq < next => {}
                    Ok(event) => {
                        next = event.seq + 1;
                        if filter.matches(&event) && !sink.send(event_to_pb(event)).await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => loop {
                        let page = match catch_up(&mut next, &mut sent) {
                            Ok(page) => page,
                            Err(e) => return sink.fail(e).await,
                        };
                        let done = page.len() < PAGE;
                        for event in page {
                            if !sink.send(event_to_pb(event)).await {
                                return;
                            }
                        }
                        if done {
                            break;
                        }
                    },
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }))
    }
}

pub struct ClustersService {
    ctx: Arc<Context>,
    engine: Arc<Engine>,
}

impl ClustersService {
    pub fn new(ctx: Arc<Context>, engine: Arc<Engine>) -> Self {
        Self { ctx, engine }
    }

    async fn clusters(&self) -> Result<BTreeMap<String, pb::Cluster>, ApiError> {
        let nodes = self.ctx.registry.list(None)?;
        let mut by_env: BTreeMap<String, Vec<NodeState>> = self
            .ctx
            .settings
            .environments
            .keys()
            .map(|e| (e.clone(), Vec::new()))
            .collect();
        for node in nodes {
            if let Some(env) = node.record.labels.get(ENVIRONMENT_LABEL) {
                by_env.entry(env.clone()).or_default().push(node);
            }
        }
        let deployments = self.engine.list().await;
        let currents = self.engine.currents().await;
        Ok(by_env
            .into_iter()
            .map(|(env, nodes)| {
                let mut cluster = summarize(&env, &nodes);
                cluster.current = current_versions(&env, &nodes, &currents);
                cluster.active_deployments = deployments
                    .iter()
                    .filter(|d| d.environment == env && !d.deployment.state.is_terminal())
                    .map(|d| d.id.clone())
                    .collect();
                (env, cluster)
            })
            .collect())
    }
}

/// The mean, `None` when nothing reports.
fn average(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

/// One environment's view of its nodes.
pub fn summarize(environment: &str, nodes: &[NodeState]) -> pb::Cluster {
    let connected: Vec<&NodeState> = nodes.iter().filter(|n| n.connected).collect();
    let mut modules: BTreeMap<(String, String), (u32, u32)> = BTreeMap::new();
    let (mut healthy, mut unhealthy, mut unknown) = (0, 0, 0);
    let (mut rate, mut errors, mut p99) = (Vec::new(), Vec::new(), Vec::new());
    for node in &connected {
        for m in &node.modules {
            let entry = modules
                .entry((m.name.clone(), m.version.clone()))
                .or_default();
            entry.0 += 1;
            match m.health {
                Health::Healthy => {
                    healthy += 1;
                    entry.1 += 1;
                }
                Health::Unhealthy => unhealthy += 1,
                Health::Unknown => unknown += 1,
            }
            if let Some(w) = m.metrics {
                rate.push(w.request_rate);
                errors.push(w.error_rate);
                if let Some(l) = w.latency_p99_seconds {
                    p99.push(l);
                }
            }
        }
    }
    let cpu: Vec<f64> = connected
        .iter()
        .filter_map(|n| n.usage.map(|u| u.cpu_percent))
        .collect();
    let memory: Vec<f64> = connected
        .iter()
        .filter_map(|n| n.usage.map(|u| u.memory_used_bytes as f64))
        .collect();
    pb::Cluster {
        environment: environment.to_string(),
        nodes: nodes.len() as u32,
        connected: connected.len() as u32,
        healthy,
        unhealthy,
        unknown,
        modules: modules
            .into_iter()
            .map(|((name, version), (count, healthy))| pb::ClusterModule {
                name,
                version,
                nodes: count,
                healthy,
            })
            .collect(),
        cpu_percent: average(&cpu),
        memory_used_bytes: average(&memory),
        request_rate: average(&rate),
        error_rate: average(&errors),
        latency_p99_seconds: average(&p99),
        active_deployments: Vec::new(),
        current: Vec::new(),
    }
}

/// Whether `node` is on `module@version`: a connected node by what it
/// reports, a disconnected one by what it was last asked to run.
fn on_version(node: &NodeState, module: &str, version: &str) -> bool {
    if node.connected {
        node.modules
            .iter()
            .any(|m| m.name == module && m.version == version)
    } else {
        node.desired
            .modules
            .get(module)
            .is_some_and(|d| d.version == version)
    }
}

/// The environment's current version of each module, with the names of
/// its nodes not on it.
pub fn current_versions(
    environment: &str,
    nodes: &[NodeState],
    currents: &Currents,
) -> Vec<pb::ClusterCurrent> {
    currents
        .range((environment.to_string(), String::new())..)
        .take_while(|((env, _), _)| env == environment)
        .filter_map(|((_, module), in_env)| {
            let current = in_env.current.as_ref()?;
            Some(pb::ClusterCurrent {
                module: module.clone(),
                version: current.version.clone(),
                drift: nodes
                    .iter()
                    .filter(|n| !on_version(n, module, &current.version))
                    .map(|n| n.record.name.clone())
                    .collect(),
                deployment_id: current.deployment_id.clone(),
            })
        })
        .collect()
}

#[tonic::async_trait]
impl pb::clusters_server::Clusters for ClustersService {
    async fn list_clusters(
        &self,
        request: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ListClustersResponse>, Status> {
        self.ctx.reader(&request)?;
        Ok(Response::new(pb::ListClustersResponse {
            clusters: self.clusters().await?.into_values().collect(),
        }))
    }

    async fn get_cluster(
        &self,
        request: Request<pb::GetClusterRequest>,
    ) -> Result<Response<pb::Cluster>, Status> {
        self.ctx.reader(&request)?;
        let env = request.into_inner().environment;
        let mut all = self.clusters().await?;
        let known: Vec<String> = all.keys().cloned().collect();
        all.remove(&env).map(Response::new).ok_or_else(|| {
            ApiError::NotFound(format!(
                "no environment {env:?}; known: {}",
                known.join(", ")
            ))
            .into()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{MetricsWindow, ModuleState, NodeUsage};
    use crate::store::NodeRecord;

    fn node(connected: bool, modules: &[(&str, &str, &str, Option<f64>)], cpu: f64) -> NodeState {
        NodeState {
            record: NodeRecord {
                id: "n".into(),
                name: "n".into(),
                labels: Default::default(),
                forced_labels: Default::default(),
                enrolled_at_ms: 0,
                cert_fingerprint: String::new(),
                cert_not_after_ms: 0,
                last_seen_ms: None,
                agent_version: String::new(),
                previous_cert_fingerprint: None,
                previous_cert_not_after_ms: 0,
                token_hash: String::new(),
                enroll_key: String::new(),
            },
            connected,
            last_seen_ms: None,
            modules: modules
                .iter()
                .map(|(name, version, health, rate)| ModuleState {
                    name: name.to_string(),
                    version: version.to_string(),
                    phase: hotswap_common::status::Phase::Running,
                    health: Health::parse(health),
                    message: String::new(),
                    staged_version: String::new(),
                    previous_version: String::new(),
                    restarts: 0,
                    crash_loop: false,
                    metrics: rate.map(|r| MetricsWindow {
                        request_rate: r,
                        error_rate: 0.01,
                        latency_p99_seconds: Some(0.2),
                    }),
                    settling: Vec::new(),
                    failure_kind: None,
                    usage: None,
                })
                .collect(),
            desired: Default::default(),
            usage: Some(NodeUsage {
                cpu_percent: cpu,
                memory_used_bytes: 100,
                memory_total_bytes: 1000,
            }),
            observed_generation: 0,
            agent_desired_generation: 0,
        }
    }

    #[test]
    fn counts_versions_health_and_averages_over_connected_nodes() {
        let nodes = [
            node(true, &[("web", "1.0.0", "healthy", Some(10.0))], 20.0),
            node(true, &[("web", "1.1.0", "unhealthy", Some(30.0))], 40.0),
            node(true, &[("web", "1.1.0", "healthy", None)], 60.0),
            // Disconnected nodes count as nodes but not in health or averages.
            node(false, &[("web", "1.1.0", "healthy", Some(1000.0))], 99.0),
        ];
        let c = summarize("dev", &nodes);
        assert_eq!((c.nodes, c.connected), (4, 3));
        assert_eq!((c.healthy, c.unhealthy, c.unknown), (2, 1, 0));
        let versions: Vec<(String, u32, u32)> = c
            .modules
            .iter()
            .map(|m| (m.version.clone(), m.nodes, m.healthy))
            .collect();
        assert_eq!(versions, [("1.0.0".into(), 1, 1), ("1.1.0".into(), 2, 1)]);
        assert_eq!(c.cpu_percent, Some(40.0));
        assert_eq!(c.request_rate, Some(20.0));
        let empty = summarize("qa", &[]);
        assert_eq!((empty.nodes, empty.request_rate), (0, None));
    }

    #[test]
    fn drift_names_the_nodes_not_on_the_current_version() {
        use crate::deploy::current::{Current, ModuleInEnvironment};
        use crate::store::DesiredModuleRecord;

        let named = |name: &str, mut n: NodeState, desired: Option<&str>| {
            n.record.name = name.into();
            if let Some(version) = desired {
                n.desired.modules.insert(
                    "web".into(),
                    DesiredModuleRecord {
                        version: version.into(),
                        staged_version: String::new(),
                        traceparent: String::new(),
                    },
                );
            }
            n
        };
        let nodes = [
            named(
                "a",
                node(true, &[("web", "2.0.0", "healthy", None)], 1.0),
                None,
            ),
            named(
                "b",
                node(true, &[("web", "1.0.0", "healthy", None)], 1.0),
                Some("2.0.0"),
            ),
            named("c", node(false, &[], 1.0), Some("1.0.0")),
            named("d", node(false, &[], 1.0), Some("2.0.0")),
            named("e", node(true, &[], 1.0), None),
        ];
        let current = |version: &str| ModuleInEnvironment {
            current: Some(Current {
                version: version.into(),
                deployment_id: "d-1".into(),
                created_ms: 1,
                health_deadline_ms: 1000,
            }),
            ..Default::default()
        };
        let mut currents = Currents::new();
        currents.insert(("dev".into(), "web".into()), current("2.0.0"));
        currents.insert(("qa".into(), "web".into()), current("9.0.0"));
        // Only an active deployment, nothing succeeded: no current version.
        currents.insert(
            ("dev".into(), "api".into()),
            ModuleInEnvironment {
                active: Some("d-2".into()),
                ..Default::default()
            },
        );
        let got = current_versions("dev", &nodes, &currents);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(
            (got[0].module.as_str(), got[0].version.as_str()),
            ("web", "2.0.0")
        );
        // b desires it but still runs 1.0.0; c was last asked for 1.0.0; e
        // does not run the module at all.
        assert_eq!(got[0].drift, ["b", "c", "e"]);
        assert!(current_versions("prod", &nodes, &currents).is_empty());
    }
}
