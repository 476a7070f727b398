//! What the agent reports to the control plane about its modules and the
//! node: domain types, turned into wire messages by the protocol client.

use hotswap_common::status::ModuleStatus;

use crate::sysinfo::NodeUsage;

/// One module as reported to the control plane: the shared
/// [`ModuleStatus`] plus the process id of a process module's instance
/// (the agent's own business; 0 otherwise).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModuleReport {
    pub status: ModuleStatus,
    pub pid: u32,
}

impl std::ops::Deref for ModuleReport {
    type Target = ModuleStatus;

    fn deref(&self) -> &ModuleStatus {
        &self.status
    }
}

impl std::ops::DerefMut for ModuleReport {
    fn deref_mut(&mut self) -> &mut ModuleStatus {
        &mut self.status
    }
}

/// Everything the agent reports.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentReport {
    pub modules: Vec<ModuleReport>,
    pub observed_generation: u64,
    pub desired_generation: u64,
    pub usage: Option<NodeUsage>,
}
