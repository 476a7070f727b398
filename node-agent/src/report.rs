//! What the agent reports to the control plane about its modules and the
//! node: domain types, turned into wire messages by the protocol client.

use hotswap_common::status::{FailureKind, Health, Phase};

use crate::scrape::Window;
use crate::sysinfo::NodeUsage;

/// One module as reported to the control plane.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModuleReport {
    pub name: String,
    pub version: String,
    pub phase: Phase,
    pub health: Health,
    pub message: String,
    pub staged_version: String,
    pub previous_version: String,
    pub restarts: u32,
    pub crash_loop: bool,
    pub pid: u32,
    pub metrics: Option<Window>,
    /// Other versions of the module still starting, stopping or serving:
    /// a candidate inside its health gate or activate hook, an old
    /// instance being stopped, a process a previous agent left behind.
    pub settling: Vec<String>,
    /// The class of the failure this report names, if any.
    pub failure_kind: Option<FailureKind>,
}

/// Everything the agent reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentReport {
    pub modules: Vec<ModuleReport>,
    pub observed_generation: u64,
    pub desired_generation: u64,
    pub usage: Option<NodeUsage>,
}
