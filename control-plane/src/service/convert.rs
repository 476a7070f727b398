//! Domain → wire conversions for responses.

use hotswap_common::pb;
use hotswap_common::timefmt::ts_from_ms;

use crate::registry::{ModuleState, NodeState};

pub fn node_to_pb(state: &NodeState) -> pb::Node {
    pb::Node {
        id: state.record.id.clone(),
        name: state.record.name.clone(),
        labels: state.record.labels.clone().into_iter().collect(),
        status: if state.connected {
            "connected"
        } else {
            "disconnected"
        }
        .to_string(),
        last_seen: state.last_seen_ms.map(ts_from_ms),
        modules: state.modules.iter().map(module_to_pb).collect(),
        agent_version: state.record.agent_version.clone(),
        enrolled_at: Some(ts_from_ms(state.record.enrolled_at_ms)),
    }
}

fn module_to_pb(module: &ModuleState) -> pb::NodeModule {
    pb::NodeModule {
        name: module.name.clone(),
        version: module.version.clone(),
        phase: module.phase.clone(),
        health: module.health.clone(),
    }
}

pub fn module_from_pb(status: pb::ModuleStatus) -> ModuleState {
    ModuleState {
        name: status.name,
        version: status.version,
        phase: status.phase,
        health: status.health,
    }
}
