//! Domain types shown to users: what `hotswapctl -o json` prints and what
//! scripts rely on (SPEC §4). Field names are snake_case and only ever added.

use serde::{Deserialize, Serialize};

use crate::labels::Labels;
use crate::status::{ModuleMetrics, ModuleStatus};

/// A join token as returned once at creation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenView {
    pub token: String,
    pub ca_fingerprint: String,
    /// RFC 3339.
    pub expires_at: Option<String>,
    pub uses: u32,
    pub labels: Labels,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NodeStatus {
    Connected,
    Disconnected,
}

impl NodeStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Connected => "connected",
            NodeStatus::Disconnected => "disconnected",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "connected" => Some(NodeStatus::Connected),
            "disconnected" => Some(NodeStatus::Disconnected),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeModuleView {
    pub name: String,
    pub version: String,
    pub phase: String,
    pub health: String,
    pub message: String,
    pub staged_version: String,
    pub previous_version: String,
    pub desired_version: String,
    pub restarts: u32,
    pub crash_loop: bool,
    /// Request metrics over the last scrape interval, when the module has them.
    pub metrics: Option<ModuleMetricsView>,
    /// Other versions still starting, stopping or serving on the node (a
    /// candidate in its health gate, an old instance draining); empty once
    /// the module runs `version` alone.
    #[serde(default)]
    pub settling: Vec<String>,
    /// `release` or `infrastructure` when the agent reports a failure.
    #[serde(default)]
    pub failure_kind: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ModuleMetricsView {
    pub request_rate: f64,
    pub error_rate: f64,
    pub latency_p99_seconds: Option<f64>,
}

impl NodeModuleView {
    /// The one place a module's status becomes what users see: the typed
    /// words as their wire words, `desired_version` as the control plane
    /// has it (`""` when not desired).
    pub fn from_status(status: ModuleStatus, desired_version: String) -> Self {
        NodeModuleView {
            name: status.name,
            version: status.version,
            phase: status.phase.as_str().to_string(),
            health: status.health.as_str().to_string(),
            message: status.message,
            staged_version: status.staged_version,
            previous_version: status.previous_version,
            desired_version,
            restarts: status.restarts,
            crash_loop: status.crash_loop,
            metrics: status.metrics.map(ModuleMetricsView::from),
            settling: status.settling,
            failure_kind: status.failure_kind.map(|k| k.as_str().to_string()),
        }
    }
}

impl From<ModuleMetrics> for ModuleMetricsView {
    fn from(m: ModuleMetrics) -> Self {
        ModuleMetricsView {
            request_rate: m.request_rate,
            error_rate: m.error_rate,
            latency_p99_seconds: m.latency_p99_seconds,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeUsageView {
    pub cpu_percent: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeView {
    pub id: String,
    pub name: String,
    pub labels: Labels,
    pub status: NodeStatus,
    /// RFC 3339; null when the node never connected.
    pub last_seen: Option<String>,
    pub modules: Vec<NodeModuleView>,
    pub agent_version: String,
    pub enrolled_at: Option<String>,
    pub usage: Option<NodeUsageView>,
    pub desired_generation: u64,
    pub observed_generation: u64,
}

/// One line of `nodes watch -o json`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct NodeUpdateView {
    /// `snapshot`, `changed` or `removed`.
    pub kind: String,
    pub node: NodeView,
}

/// A control-plane replica as `servers list` and `servers get` show it
/// (SPEC §7).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerView {
    pub name: String,
    /// The URL agents and operators reach it at.
    pub endpoint: String,
    /// Runs the deployment engine, pipelines, catch-up and retention.
    pub leader: bool,
    /// What its `/readyz` says.
    pub ready: bool,
    /// Agent sessions connected to it now.
    pub sessions: u64,
    /// RFC 3339.
    pub started_at: Option<String>,
    /// RFC 3339: when it last said it was alive.
    pub last_seen: Option<String>,
}

/// One stored version of a module.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ModuleVersionView {
    pub version: String,
    pub digest: String,
    pub size: u64,
    pub signed_by: Vec<String>,
    pub pushed_at: Option<String>,
    pub pushed_by: String,
    pub runtime: String,
    /// Set while the version is yanked (known bad, undeployable).
    pub yanked: Option<YankView>,
}

/// Who yanked a version, when and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct YankView {
    pub at: Option<String>,
    pub by: String,
    pub reason: String,
}

/// `module get` / `module list` entries.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ModuleView {
    pub name: String,
    pub versions: Vec<ModuleVersionView>,
}

/// An environment's current version of a module (`clusters get`): the
/// version of its newest succeeded environment-wide deployment, and the
/// names of the environment's nodes not on it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterCurrentView {
    pub module: String,
    pub version: String,
    pub drift: Vec<String>,
    /// The deployment that made `version` current.
    pub deployment_id: String,
}

/// A publisher key as `keys list` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PublisherKeyView {
    pub name: String,
    pub key_id: String,
    /// `trusted` or `revoked`.
    pub status: String,
    pub added_at: Option<String>,
    pub added_by: String,
    pub revoked_at: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProgressView {
    pub total: u32,
    pub updated: u32,
    pub healthy: u32,
    pub failed: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeploymentNodeView {
    pub node: String,
    pub from_version: String,
    pub to_version: String,
    pub state: String,
    pub reason: String,
    pub wave: u32,
    /// `release` or `infrastructure` once the node failed; null otherwise.
    pub failure_kind: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VerdictView {
    pub time: Option<String>,
    pub step: u32,
    pub passed: bool,
    pub summary: String,
    pub canary_error_rate: Option<f64>,
    pub baseline_error_rate: Option<f64>,
    pub canary_latency_p99: Option<f64>,
    pub baseline_latency_p99: Option<f64>,
    /// passed, failed, inconclusive or health_only.
    pub outcome: String,
    pub canary_requests: f64,
    pub baseline_requests: f64,
    pub canary_nodes: u32,
    pub baseline_nodes: u32,
}

/// A deployment as `deploy get -o json` prints it (SPEC §4).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DeploymentView {
    pub id: String,
    pub module: String,
    pub version: String,
    pub environment: String,
    pub strategy: String,
    pub state: String,
    pub progress: ProgressView,
    pub nodes: Vec<DeploymentNodeView>,
    pub created_by: String,
    pub created_at: Option<String>,
    pub finished_at: Option<String>,
    pub reason: String,
    pub wave: u32,
    pub waves: u32,
    pub analysis: Vec<VerdictView>,
    pub approved_by: String,
    pub waiting_for: String,
    /// A canary's error-rate ceiling (0..1); null for other strategies.
    #[serde(default)]
    pub max_error_rate: Option<f64>,
    /// A canary's limit on p99 latency as a multiple of the baseline's.
    #[serde(default)]
    pub max_latency_increase: Option<f64>,
}

impl DeploymentView {
    pub fn is_terminal(&self) -> bool {
        matches!(
            self.state.as_str(),
            "succeeded" | "failed" | "rolled_back" | "aborted"
        )
    }
}
