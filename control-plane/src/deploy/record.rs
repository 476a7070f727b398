//! A deployment as stored: its identity beside the machine's state, and
//! how it splits into a header and node tracks for a store that keeps
//! them apart (see `store::split`).

use std::ops::Range;

use hotswap_common::labels::Labels;
use serde::{Deserialize, Serialize};

use super::machine::{Deployment, NodeTrack};
use crate::store::{
    Collection, DeploymentDocument, FromStoredDeployment, StoreError, StoredDeployment, decode,
    encode,
};

/// A deployment as stored: identity plus the machine's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeploymentRecord {
    pub id: String,
    pub environment: String,
    pub deployment: Deployment,
    /// Labels narrowing the environment; empty for an environment-wide deployment.
    #[serde(default)]
    pub selector: Labels,
    /// W3C trace context of the deployment's root span: waves and node
    /// commands, also after a restart, join this one trace. Empty when
    /// traces were not exported at creation.
    #[serde(default)]
    pub traceparent: String,
}

impl DeploymentRecord {
    /// The same deployment in its next state.
    pub fn with(&self, deployment: Deployment) -> Self {
        Self {
            deployment,
            id: self.id.clone(),
            environment: self.environment.clone(),
            selector: self.selector.clone(),
            traceparent: self.traceparent.clone(),
        }
    }
}

/// How the store keeps a record: whole, or (on etcd) its header apart from
/// its node tracks, which are most of a large deployment's bytes.
impl DeploymentDocument for DeploymentRecord {
    fn whole(&self) -> Vec<u8> {
        encode(self)
    }

    fn header(&self) -> Vec<u8> {
        // Every field but the tracks, spelled out: a field added to the
        // machine's state must be added here too, or this does not compile.
        let d = &self.deployment;
        let deployment = Deployment {
            spec: d.spec.clone(),
            state: d.state,
            nodes: Vec::new(),
            waves: d.waves,
            wave: d.wave,
            wave_started_ms: d.wave_started_ms,
            hold_since_ms: d.hold_since_ms,
            switched: d.switched,
            awaiting_promote: d.awaiting_promote,
            paused_from: d.paused_from,
            waiting_since_ms: d.waiting_since_ms,
            window_wait: d.window_wait,
            reason: d.reason.clone(),
            approved_by: d.approved_by.clone(),
            created_ms: d.created_ms,
            finished_ms: d.finished_ms,
            analysis: d.analysis.clone(),
        };
        encode(&self.with(deployment))
    }

    fn track_count(&self) -> usize {
        self.deployment.nodes.len()
    }

    fn tracks(&self, range: Range<usize>) -> Vec<u8> {
        let nodes = &self.deployment.nodes;
        let range = range.start.min(nodes.len())..range.end.min(nodes.len());
        encode(&&nodes[range])
    }
}

impl FromStoredDeployment for DeploymentRecord {
    fn from_stored(id: &str, stored: StoredDeployment) -> Result<Self, StoreError> {
        let corrupt = |reason: String| StoreError::Corrupt {
            tree: Collection::Deployments.as_str(),
            key: id.to_string(),
            reason,
        };
        match stored {
            StoredDeployment::Whole(bytes) => {
                decode(Collection::Deployments, id.as_bytes(), &bytes)
            }
            StoredDeployment::Split {
                header,
                tracks,
                buckets,
            } => {
                let mut record: DeploymentRecord =
                    decode(Collection::Deployments, id.as_bytes(), &header)?;
                if !record.deployment.nodes.is_empty() {
                    return Err(corrupt("its header holds node tracks".into()));
                }
                let mut nodes = Vec::with_capacity(tracks);
                for (i, bucket) in buckets.iter().enumerate() {
                    let part: Vec<NodeTrack> = serde_json::from_slice(bucket)
                        .map_err(|e| corrupt(format!("track bucket {i}: {e}")))?;
                    nodes.extend(part);
                }
                if nodes.len() != tracks {
                    return Err(corrupt(format!(
                        "its buckets hold {} node tracks, its header says {tracks}",
                        nodes.len()
                    )));
                }
                record.deployment.nodes = nodes;
                Ok(record)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::deploy::machine::{BatchSize, NodeState, Spec, Strategy, Thresholds};
    use crate::store::split;

    fn record(nodes: usize, seed: &[(usize, u8, String)]) -> DeploymentRecord {
        let spec = Spec {
            module: "web".into(),
            version: "2.0.0".into(),
            strategy: Strategy::Rolling {
                batch: BatchSize::Percent(20),
                min_healthy_ms: 0,
            },
            max_failures: 1,
            health_deadline_ms: 30_000,
            progress_deadline_ms: 60_000,
            auto_rollback: true,
            require_approval: false,
            approval_timeout_ms: 0,
            pause_timeout_ms: 0,
            created_by: "alice".into(),
            thresholds: Thresholds::default(),
        };
        let targets = (0..nodes)
            .map(|i| (format!("id-{i}"), format!("node-{i:05}"), "1.0.0".into()))
            .collect();
        let (mut deployment, _) = Deployment::new(spec, targets, 1_000);
        let states = [
            NodeState::Waiting,
            NodeState::Updating,
            NodeState::Healthy,
            NodeState::Failed,
            NodeState::Lost,
            NodeState::RolledBack,
        ];
        for (i, state, reason) in seed {
            if let Some(track) = deployment.nodes.get_mut(*i) {
                track.state = states[*state as usize % states.len()];
                track.reason = reason.clone();
                track.since_ms += *i as u64;
            }
        }
        DeploymentRecord {
            id: "d-1".into(),
            environment: "prod".into(),
            deployment,
            selector: [("tier".to_string(), "web".to_string())].into(),
            traceparent: String::new(),
        }
    }

    /// A key space of one record: its header and its buckets by (bucket,
    /// generation).
    type Space = (Option<Vec<u8>>, BTreeMap<(usize, u64), Vec<u8>>);

    /// Store `record` in a key space of header and bucket values, as the
    /// etcd backend does, and read it back.
    fn through_split(
        space: &mut Space,
        record: &DeploymentRecord,
    ) -> Result<DeploymentRecord, StoreError> {
        let previous = space
            .0
            .as_deref()
            .and_then(|h| split::index_of(h).ok().flatten());
        let existing: Vec<(usize, u64)> = space.1.keys().copied().collect();
        let written = split::split(previous.as_ref(), &existing, record);
        for (b, g, v) in written.puts {
            space.1.insert((b, g), v);
        }
        space.0 = Some(written.header);
        for key in written.deletes {
            space.1.remove(&key);
        }
        let (index, header) = split::open_header(space.0.as_deref().unwrap_or_default())
            .map_err(|e| StoreError::Backend(e.to_string()))?
            .ok_or_else(|| StoreError::Backend("not split".into()))?;
        let buckets = index
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let value = space.1.get(&(i, b.generation)).cloned().unwrap_or_default();
                split::open_bucket(&index, i, &value)
                    .map_err(|e| StoreError::Backend(e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        DeploymentRecord::from_stored(
            "d-1",
            StoredDeployment::Split {
                header,
                tracks: index.tracks,
                buckets,
            },
        )
    }

    #[test]
    fn whole_records_decode_as_before() {
        let record = record(40, &[(3, 3, "crash loop".into())]);
        let back = DeploymentRecord::from_stored("d-1", StoredDeployment::Whole(record.whole()))
            .expect("decodes");
        assert_eq!(back, record);
        assert_eq!(record.whole(), encode(&record), "sled keeps the same bytes");
    }

    #[test]
    fn a_header_with_tracks_or_a_short_bucket_is_corrupt() {
        let record = record(10, &[]);
        let error = DeploymentRecord::from_stored(
            "d-1",
            StoredDeployment::Split {
                header: record.whole(),
                tracks: 10,
                buckets: Vec::new(),
            },
        )
        .expect_err("tracks in the header");
        assert!(
            error.to_string().contains("header holds node tracks"),
            "{error}"
        );
        let error = DeploymentRecord::from_stored(
            "d-1",
            StoredDeployment::Split {
                header: record.header(),
                tracks: 10,
                buckets: vec![record.tracks(0..4)],
            },
        )
        .expect_err("short");
        assert!(
            error
                .to_string()
                .contains("hold 4 node tracks, its header says 10"),
            "{error}"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// A deployment record split into header and buckets and assembled
        /// again is the record, through any sequence of updates.
        #[test]
        fn deployment_records_round_trip_through_split_and_assemble(
            nodes in 0usize..600,
            updates in proptest::collection::vec(
                proptest::collection::vec((0usize..600, any::<u8>(), ".{0,40}"), 0..30),
                1..4,
            ),
        ) {
            let mut space = (None, BTreeMap::new());
            let mut seed = Vec::new();
            for update in updates {
                seed.extend(update);
                let record = record(nodes, &seed);
                let back = through_split(&mut space, &record);
                prop_assert_eq!(back.ok(), Some(record));
            }
        }
    }
}
