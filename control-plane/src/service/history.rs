//! `History`: the desired-state history (SPEC §9), read from the store on
//! any replica (see [`crate::history`] for the reconstruction).

use std::collections::BTreeSet;
use std::sync::Arc;

use hotswap_common::pb;
use hotswap_common::timefmt::{ms_from_ts, ts_from_ms};
use tonic::{Request, Response, Status};

use super::Context;
use crate::error::ApiError;
use crate::history::{self, HistoryError, NodeNow, Point};
use crate::store::HistoryRecord;

pub struct HistoryService {
    ctx: Arc<Context>,
}

impl HistoryService {
    pub fn new(ctx: Arc<Context>) -> Self {
        Self { ctx }
    }

    /// Every node as it is now: name, environment, desired versions.
    fn current(&self) -> Result<Vec<NodeNow>, ApiError> {
        let store = self.ctx.store();
        let mut nodes = Vec::new();
        for record in store.list_nodes()? {
            let desired = store.get_desired(&record.id)?;
            nodes.push(NodeNow {
                environment: record
                    .labels
                    .get("environment")
                    .cloned()
                    .unwrap_or_default(),
                name: record.name.clone(),
                node_id: record.id.clone(),
                modules: desired
                    .modules
                    .into_iter()
                    .filter(|(_, m)| !m.version.is_empty())
                    .map(|(name, m)| (name, m.version))
                    .collect(),
            });
        }
        Ok(nodes)
    }

    /// Refuse an environment that neither the configuration, a node nor
    /// the history knows.
    fn check_environment(
        &self,
        environment: &str,
        current: &[NodeNow],
        records: &[HistoryRecord],
    ) -> Result<(), ApiError> {
        let mut known: BTreeSet<String> = self.ctx.settings.environments.keys().cloned().collect();
        known.extend(current.iter().map(|n| n.environment.clone()));
        known.extend(records.iter().map(|r| r.environment.clone()));
        known.remove("");
        if known.contains(environment) {
            return Ok(());
        }
        Err(HistoryError::UnknownEnvironment {
            environment: environment.to_string(),
            known: known.into_iter().collect(),
        }
        .into())
    }
}

fn point(point: Option<pb::HistoryPoint>) -> Point {
    match point.and_then(|p| p.point) {
        Some(pb::history_point::Point::Time(t)) => Point::Time(ms_from_ts(&t)),
        Some(pb::history_point::Point::Seq(seq)) => Point::Seq(seq),
        None => Point::Now,
    }
}

#[tonic::async_trait]
impl pb::history_server::History for HistoryService {
    async fn get_history_state(
        &self,
        request: Request<pb::GetHistoryStateRequest>,
    ) -> Result<Response<pb::HistoryState>, Status> {
        self.ctx.reader(&request)?;
        let request = request.into_inner();
        let result = (|| {
            if request.environment.is_empty() {
                return Err(ApiError::InvalidArgument("--env is required".into()));
            }
            let store = self.ctx.store();
            let records = store.list_history()?;
            let current = self.current()?;
            self.check_environment(&request.environment, &current, &records)?;
            let seq = history::resolve(point(request.at), &records, store.history_trimmed()?)?;
            let mut nodes: Vec<pb::HistoryNode> = history::state_at(&current, &records, seq)
                .into_values()
                .filter(|n| n.environment == request.environment)
                .map(|n| pb::HistoryNode {
                    node: n.name,
                    modules: n
                        .modules
                        .into_iter()
                        .map(|(name, version)| pb::HistoryModule { name, version })
                        .collect(),
                })
                .collect();
            nodes.sort_by(|a, b| a.node.cmp(&b.node));
            Ok(pb::HistoryState {
                environment: request.environment.clone(),
                seq,
                nodes,
            })
        })();
        Ok(Response::new(result?))
    }

    async fn diff_history(
        &self,
        request: Request<pb::DiffHistoryRequest>,
    ) -> Result<Response<pb::HistoryDiff>, Status> {
        self.ctx.reader(&request)?;
        let request = request.into_inner();
        let result = (|| {
            let store = self.ctx.store();
            let records = store.list_history()?;
            let environment =
                (!request.environment.is_empty()).then_some(request.environment.as_str());
            if let Some(environment) = environment {
                self.check_environment(environment, &self.current()?, &records)?;
            }
            let trimmed = store.history_trimmed()?;
            let from = match point(request.from) {
                Point::Now => {
                    return Err(ApiError::InvalidArgument(
                        "--from is required (a time or a seq)".into(),
                    ));
                }
                from => history::resolve(from, &records, trimmed)?,
            };
            let to = history::resolve(point(request.to), &records, trimmed)?;
            if from > to {
                return Err(HistoryError::Reversed { from, to }.into());
            }
            let changes = history::diff(&records, from, to, environment)
                .into_iter()
                .map(|c| pb::HistoryChange {
                    seq: c.seq,
                    time: Some(ts_from_ms(c.time_ms)),
                    node: c.node,
                    environment: c.environment,
                    module: c.module,
                    from: c.from.unwrap_or_default(),
                    to: c.to.unwrap_or_default(),
                    deployment_id: c.deployment_id,
                    by: c.by,
                })
                .collect();
            Ok(pb::HistoryDiff {
                from_seq: from,
                to_seq: to,
                changes,
            })
        })();
        Ok(Response::new(result?))
    }
}
