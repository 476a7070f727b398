//! A deployment as stored: its identity beside the machine's state.

use hotswap_common::labels::Labels;
use serde::{Deserialize, Serialize};

use super::machine::Deployment;

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
