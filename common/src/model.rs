//! Domain types shown to users: what `hotswapctl -o json` prints and what
//! scripts rely on (SPEC §4). Field names are snake_case and only ever added.

use serde::{Deserialize, Serialize};

use crate::labels::Labels;
use crate::status::{ModuleMetrics, ModuleStatus};

/// A join token as returned once at creation.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenView {
    pub token: String,
    pub ca_fingerprint: String,
    /// RFC 3339.
    pub expires_at: Option<String>,
    pub uses: u32,
    #[cfg_attr(feature = "openapi", schema(value_type = std::collections::HashMap<String, String>))]
    pub labels: Labels,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeUsageView {
    pub cpu_percent: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeView {
    pub id: String,
    pub name: String,
    #[cfg_attr(feature = "openapi", schema(value_type = std::collections::HashMap<String, String>))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeUpdateView {
    /// `snapshot`, `changed` or `removed`.
    pub kind: String,
    pub node: NodeView,
}

/// A control-plane replica as `servers list` and `servers get` show it
/// (SPEC §7).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct YankView {
    pub at: Option<String>,
    pub by: String,
    pub reason: String,
}

/// `module get` / `module list` entries.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ModuleView {
    pub name: String,
    pub versions: Vec<ModuleVersionView>,
}

/// An environment's current version of a module (`clusters get`): the
/// version of its newest succeeded environment-wide deployment, and the
/// names of the environment's nodes not on it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClusterCurrentView {
    pub module: String,
    pub version: String,
    pub drift: Vec<String>,
    /// The deployment that made `version` current.
    pub deployment_id: String,
}

/// A publisher key as `keys list` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProgressView {
    pub total: u32,
    pub updated: u32,
    pub healthy: u32,
    pub failed: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

/// One event of the durable stream (SPEC §4); absent fields are null.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventView {
    pub seq: u64,
    pub time: Option<String>,
    pub kind: String,
    pub deployment_id: Option<String>,
    pub node: Option<String>,
    pub module: Option<String>,
    pub version: Option<String>,
    pub message: String,
}

/// One record of the tamper-evident audit log.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditRecordView {
    pub seq: u64,
    pub time: Option<String>,
    pub user: String,
    pub role: String,
    pub action: String,
    pub target: String,
    /// ok, denied, rate_limited or error.
    pub result: String,
    pub detail: String,
    pub trace_id: String,
    /// The caller's address.
    pub peer: String,
    pub prev_hash: String,
    pub hash: String,
}

/// An operator as `users list` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UserView {
    pub name: String,
    /// viewer, deployer, approver or admin.
    pub role: String,
    pub revoked: bool,
    pub created_by: String,
    pub created_at: Option<String>,
    pub cert_expires_at: Option<String>,
    pub cert_fingerprint: String,
}

/// A module version in use in an environment, with its instance counts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClusterModuleView {
    pub name: String,
    pub version: String,
    pub nodes: u32,
    pub healthy: u32,
}

/// An environment's health, versions and metric averages (`clusters get`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ClusterView {
    pub environment: String,
    pub nodes: u32,
    pub connected: u32,
    pub healthy: u32,
    pub unhealthy: u32,
    pub unknown: u32,
    pub modules: Vec<ClusterModuleView>,
    pub cpu_percent: Option<f64>,
    pub memory_used_bytes: Option<f64>,
    pub request_rate: Option<f64>,
    pub error_rate: Option<f64>,
    pub latency_p99_seconds: Option<f64>,
    pub active_deployments: Vec<String>,
    /// The environment's current version of each module, with its drift.
    pub current: Vec<ClusterCurrentView>,
}

/// One environment of a pipeline.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PipelineStageView {
    pub environment: String,
    pub deployment_id: String,
    /// waiting, running, succeeded, failed, skipped or aborted.
    pub state: String,
    pub reason: String,
}

/// A version promoted through the environments in order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PipelineView {
    pub id: String,
    pub module: String,
    pub version: String,
    /// The last environment it promotes to.
    pub target: String,
    /// running, succeeded, failed or aborted.
    pub state: String,
    pub stages: Vec<PipelineStageView>,
    pub created_by: String,
    pub created_at: Option<String>,
    pub finished_at: Option<String>,
    pub reason: String,
}

/// One module's desired version on a node at a point of the history.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistoryModuleView {
    pub name: String,
    pub version: String,
}

/// A node's desired module versions at a point (`history --at|--seq`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistoryNodeView {
    pub node: String,
    pub modules: Vec<HistoryModuleView>,
}

/// One module's change on one node (`history diff`). `from`/`to` are null
/// when the module was not desired.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HistoryChangeView {
    pub node: String,
    pub module: String,
    pub from: Option<String>,
    pub to: Option<String>,
    pub deployment_id: Option<String>,
    pub by: String,
    pub time: Option<String>,
    pub seq: u64,
    pub environment: String,
}

/// One wave of a dry run's plan, and what must hold before the next.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WaveView {
    pub nodes: Vec<String>,
    pub gate: String,
    /// Under the environment's deployment windows: the earliest the wave
    /// could start (if the waves before it took no time); absent without
    /// windows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub earliest_start: Option<String>,
    /// The wait for a window before it, in words; empty when none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub window: String,
}

/// What `deploy create --dry-run` would do; nothing is created.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlanView {
    pub strategy: String,
    pub waves: Vec<WaveView>,
}

/// A deployment to start: `deploy create`'s argument and flags, and the
/// body of `POST /api/v1/deployments` (SPEC §8), with the same names (in
/// snake_case) and defaults. Unset options take the environment's.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct DeploymentRequest {
    pub module: String,
    pub version: String,
    pub environment: String,
    /// direct, rolling, blue-green or canary (default: the environment's).
    #[serde(default)]
    pub strategy: Option<String>,
    /// Only nodes with these labels.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = std::collections::HashMap<String, String>))]
    pub selector: Labels,
    /// Rolling: nodes per batch, `N` or `N%`.
    #[serde(default)]
    pub batch_size: Option<String>,
    /// Node failures tolerated before the deployment fails.
    #[serde(default)]
    pub max_failures: Option<u32>,
    /// Canary: cumulative percentages, e.g. `[10, 30, 50, 100]`.
    #[serde(default)]
    pub steps: Vec<u32>,
    #[serde(default, with = "crate::timefmt::optional_duration_text")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "30s"))]
    pub step_duration: Option<std::time::Duration>,
    /// Canary: wait for `promote` after each step.
    #[serde(default)]
    pub manual_promote: bool,
    /// Blue-green: how long to keep the old version ready after the switch.
    #[serde(default, with = "crate::timefmt::optional_duration_text")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "5m"))]
    pub bake_time: Option<std::time::Duration>,
    /// Rolling: how long a batch must stay healthy before the next.
    #[serde(default, with = "crate::timefmt::optional_duration_text")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "10s"))]
    pub min_healthy_time: Option<std::time::Duration>,
    /// How long a node has to become healthy on the new version.
    #[serde(default, with = "crate::timefmt::optional_duration_text")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "2m"))]
    pub health_deadline: Option<std::time::Duration>,
    /// Canary: absolute ceiling for the error rate (0..1).
    #[serde(default)]
    pub max_error_rate: Option<f64>,
    /// Canary: p99 latency may be at most this multiple of the baseline's.
    #[serde(default)]
    pub max_latency_increase: Option<f64>,
    /// Canary: requests canary and baseline each need in a step's analysis
    /// window before error rate and latency are judged.
    #[serde(default)]
    pub analysis_min_requests: Option<u64>,
    /// Canary: the start of each step's hold left out of its analysis.
    #[serde(default, with = "crate::timefmt::optional_duration_text")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "10s"))]
    pub analysis_warmup: Option<std::time::Duration>,
    /// How long `paused`, or a wait for `promote`, may last before the
    /// deployment fails.
    #[serde(default, with = "crate::timefmt::optional_duration_text")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>, example = "24h"))]
    pub pause_timeout: Option<std::time::Duration>,
    #[serde(default)]
    pub no_auto_rollback: bool,
    /// Deploy a version older (semver) than the environment's current one.
    #[serde(default)]
    pub allow_downgrade: bool,
    /// Start in a frozen environment (SPEC §9); admins only, audited.
    #[serde(default)]
    pub override_freeze: bool,
    /// Answer the plan; create nothing.
    #[serde(default)]
    pub dry_run: bool,
}

/// An ad hoc deployment freeze (SPEC §9), as `freeze list` shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FreezeView {
    pub id: String,
    pub environment: String,
    pub from: Option<String>,
    pub until: Option<String>,
    pub reason: String,
    pub created_by: String,
}

/// A webhook as `webhooks list` shows it (SPEC §9). The secret is never
/// shown back: `signed` only says whether there is one.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WebhookView {
    pub id: String,
    pub url: String,
    /// Event kinds or kind prefixes; empty: every event.
    pub kinds: Vec<String>,
    /// json or slack.
    pub format: String,
    /// The last event delivered (null: none yet).
    pub last_delivered_seq: Option<u64>,
    /// The last delivery error (null: none).
    pub last_error: Option<String>,
    /// Matching events not yet delivered.
    pub backlog: u64,
    pub signed: bool,
    /// Whether HTTPS is verified against a CA of its own (`--ca-file`).
    pub custom_ca: bool,
    pub created_by: String,
    pub created_at: Option<String>,
}

/// What `webhooks test` reports.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WebhookTestView {
    pub id: String,
    pub delivered: bool,
    /// The receiver's HTTP status (null: no answer).
    pub status: Option<u16>,
    pub error: Option<String>,
}

/// The body of `POST /api/v1/webhooks` (`webhooks create`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct WebhookRequest {
    pub url: String,
    #[serde(default)]
    pub kinds: Vec<String>,
    /// The HMAC-SHA256 key; unset: deliveries are not signed.
    #[serde(default)]
    pub secret: Option<String>,
    /// json (default) or slack.
    #[serde(default)]
    pub format: Option<String>,
    /// PEM CA certificates to verify an https:// receiver with.
    #[serde(default)]
    pub ca_pem: Option<String>,
}
