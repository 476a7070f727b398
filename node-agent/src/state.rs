//! What the agent persists about its modules (`DATA_DIR/state.json`),
//! written atomically after every step, so an agent killed at any point
//! restarts knowing what is installed, what is active, which processes it
//! started, and what it was asked to run even if the control plane is down.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hotswap_common::fsutil;
use serde::{Deserialize, Serialize};

use crate::runtime::process::InstanceRecord;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DesiredModule {
    pub version: String,
    pub staged_version: String,
    /// W3C trace context of the control plane's span that asked for this
    /// entry: the work done for it is traced as its children.
    #[serde(default)]
    pub traceparent: String,
}

/// The last desired state received from the control plane.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Desired {
    pub generation: u64,
    pub modules: BTreeMap<String, DesiredModule>,
    /// Distinct trusted keys whose valid signatures an artifact needs
    /// before this node unpacks or runs it (its environment's
    /// `min_signatures`); 0 from a control plane that does not send it.
    #[serde(default)]
    pub min_signatures: u32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ModuleRecord {
    /// `bundle` or `process`, of the active version.
    pub runtime: String,
    pub active: Option<String>,
    pub previous: Option<String>,
    pub staged: Option<String>,
    /// The running instance of a process module, for re-adoption.
    pub instance: Option<InstanceRecord>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AgentState {
    pub desired: Option<Desired>,
    pub observed_generation: u64,
    pub modules: BTreeMap<String, ModuleRecord>,
}

/// Why `state.json` could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{} is corrupt: {source}", path.display())]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Encode(serde_json::Error),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl AgentState {
    pub fn load(data_dir: &Path) -> Result<Self, StateError> {
        let path = data_dir.join("state.json");
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| StateError::Corrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(StateError::Read { path, source }),
        }
    }

    pub fn save(&self, data_dir: &Path) -> Result<(), StateError> {
        let path = data_dir.join("state.json");
        let bytes = serde_json::to_vec_pretty(self).map_err(StateError::Encode)?;
        fsutil::write_atomic(&path, &bytes, fsutil::PUBLIC_FILE_MODE)
            .map_err(|source| StateError::Write { path, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            AgentState::load(dir.path()).expect("missing"),
            AgentState::default()
        );
        let mut state = AgentState::default();
        state.modules.insert(
            "hello".into(),
            ModuleRecord {
                runtime: "process".into(),
                active: Some("1.0.0".into()),
                instance: Some(InstanceRecord {
                    version: "1.0.0".into(),
                    pid: 42,
                    start_ticks: 7,
                }),
                ..Default::default()
            },
        );
        state.save(dir.path()).expect("save");
        assert_eq!(AgentState::load(dir.path()).expect("load"), state);
        std::fs::write(dir.path().join("state.json"), "{").expect("corrupt");
        assert!(
            AgentState::load(dir.path())
                .expect_err("corrupt")
                .to_string()
                .contains("corrupt")
        );
    }
}
