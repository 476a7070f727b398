//! Wire → domain conversions. Everything that leaves `pb` goes through here,
//! failing with an error that names the field when the message is unusable.

use crate::ids::ModuleName;
use crate::model::{
    AuditRecordView, ClusterCurrentView, ClusterModuleView, ClusterView, DeploymentNodeView,
    DeploymentView, EventView, ModuleVersionView, ModuleView, NodeModuleView, NodeStatus,
    NodeUpdateView, NodeUsageView, NodeView, PipelineStageView, PipelineView, PlanView,
    ProgressView, PublisherKeyView, ServerView, TokenView, UserView, VerdictView, WaveView,
    WebhookRequest, WebhookTestView, WebhookView, YankView,
};
use crate::pb;
use crate::status::{FailureKind, Health, ModuleMetrics, ModuleStatus, ModuleUsage, Phase};
use crate::timefmt::{ms_from_ts, rfc3339_from_ms};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConvertError {
    #[error("{message}: field `{field}` is missing")]
    Missing {
        message: &'static str,
        field: &'static str,
    },
    #[error("{message}: field `{field}` has invalid value {value:?}")]
    Invalid {
        message: &'static str,
        field: &'static str,
        value: String,
    },
}

/// A wire message field whose value is unusable: the field's path inside
/// the message (`modules[2].metrics.error_rate`) and why.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
#[error("{path}: {reason}")]
pub struct FieldError {
    pub path: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        FieldError {
            path: field.into(),
            reason: reason.into(),
        }
    }

    /// The same error seen from the enclosing message: `error_rate` inside
    /// `modules[2].metrics` becomes `modules[2].metrics.error_rate`.
    pub fn within(mut self, parent: impl std::fmt::Display) -> Self {
        self.path = format!("{parent}.{}", self.path);
        self
    }
}

/// Highest request rate believed, per second and module on one node:
/// beyond it a rate is a lie, and huge finite values would turn a cluster's
/// average into infinity.
pub const MAX_REQUEST_RATE: f64 = 1e9;
/// Highest p99 latency believed, in seconds (a day).
pub const MAX_LATENCY_SECONDS: f64 = 86_400.0;
/// Highest CPU believed of one module process, in percent of one core:
/// 1,024 cores busy.
pub const MAX_MODULE_CPU_PERCENT: f64 = 102_400.0;
/// Highest resident memory believed of one module process (16 TiB).
pub const MAX_MODULE_MEMORY_BYTES: u64 = 1 << 44;

/// `value` if it lies in `range` (NaN never does).
fn within_range(
    field: &str,
    value: f64,
    range: std::ops::RangeInclusive<f64>,
) -> Result<f64, FieldError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(FieldError::new(
            field,
            format!(
                "must be within {}..={}, got {value}",
                range.start(),
                range.end()
            ),
        ))
    }
}

/// A module name as a wire message carries it, checked against the module
/// name rule (`field` names it in the error).
pub fn module_name_from_pb(field: &str, name: &str) -> Result<ModuleName, FieldError> {
    ModuleName::parse(name).map_err(|e| FieldError::new(field, e.to_string()))
}

/// A version as a wire message carries it: empty (none) or semver.
pub fn check_version(field: &str, version: &str) -> Result<(), FieldError> {
    if version.is_empty() {
        return Ok(());
    }
    semver::Version::parse(version)
        .map(drop)
        .map_err(|e| FieldError::new(field, format!("{version:?} is not semver: {e}")))
}

/// A value the wire leaves unset when unknown. Senders from before the
/// field was `optional` send a negative value for that; it reads as unset.
fn known(value: Option<f64>) -> Option<f64> {
    value.filter(|v| *v >= 0.0)
}

/// A module's metrics window as an agent reports it: every value finite and
/// within what a module can do, or the window is refused.
impl TryFrom<pb::ModuleMetrics> for ModuleMetrics {
    type Error = FieldError;

    fn try_from(w: pb::ModuleMetrics) -> Result<Self, Self::Error> {
        let request_rate = within_range("request_rate", w.request_rate, 0.0..=MAX_REQUEST_RATE)?;
        let error_rate = within_range("error_rate", w.error_rate, 0.0..=1.0)?;
        let latency_p99_seconds = match w.latency_p99_seconds {
            None => None,
            // An agent from before the field was optional: no requests.
            Some(latency) if latency < 0.0 && latency.is_finite() => None,
            Some(latency) => Some(within_range(
                "latency_p99_seconds",
                latency,
                0.0..=MAX_LATENCY_SECONDS,
            )?),
        };
        Ok(ModuleMetrics {
            request_rate,
            error_rate,
            latency_p99_seconds,
        })
    }
}

/// A module process's usage as an agent reports it: CPU finite and within
/// what 1,024 cores do, memory within what a host holds.
impl TryFrom<pb::ModuleUsage> for ModuleUsage {
    type Error = FieldError;

    fn try_from(u: pb::ModuleUsage) -> Result<Self, Self::Error> {
        let cpu_percent = within_range("cpu_percent", u.cpu_percent, 0.0..=MAX_MODULE_CPU_PERCENT)?;
        if u.memory_resident_bytes > MAX_MODULE_MEMORY_BYTES {
            return Err(FieldError::new(
                "memory_resident_bytes",
                format!(
                    "{} is beyond {MAX_MODULE_MEMORY_BYTES}, more than any host has",
                    u.memory_resident_bytes
                ),
            ));
        }
        Ok(ModuleUsage {
            cpu_percent,
            memory_resident_bytes: u.memory_resident_bytes,
        })
    }
}

impl From<ModuleUsage> for pb::ModuleUsage {
    fn from(u: ModuleUsage) -> Self {
        pb::ModuleUsage {
            cpu_percent: u.cpu_percent,
            memory_resident_bytes: u.memory_resident_bytes,
        }
    }
}

/// A module's status as an agent reports it. The name must be a valid
/// module name and the metrics window believable; the phase, health and
/// failure class are lenient (a word this build does not know reads as
/// unknown or none), so a newer agent is not cut off. Lengths are left to
/// the receiver, which knows what it keeps.
impl TryFrom<pb::ModuleStatus> for ModuleStatus {
    type Error = FieldError;

    fn try_from(m: pb::ModuleStatus) -> Result<Self, Self::Error> {
        module_name_from_pb("name", &m.name)?;
        let metrics = m
            .metrics
            .map(ModuleMetrics::try_from)
            .transpose()
            .map_err(|e| e.within("metrics"))?;
        let usage = m
            .usage
            .map(ModuleUsage::try_from)
            .transpose()
            .map_err(|e| e.within("usage"))?;
        Ok(ModuleStatus {
            name: m.name,
            version: m.version,
            phase: Phase::parse(&m.phase),
            health: Health::parse(&m.health),
            message: m.message,
            staged_version: m.staged_version,
            previous_version: m.previous_version,
            restarts: m.restarts,
            crash_loop: m.crash_loop,
            metrics,
            settling: m.settling_versions,
            failure_kind: FailureKind::parse(&m.failure_kind),
            usage,
        })
    }
}

/// What an agent reports of a module (its process id is the agent's own
/// business and is added by the agent where it has one).
impl From<&ModuleStatus> for pb::ModuleStatus {
    fn from(m: &ModuleStatus) -> Self {
        pb::ModuleStatus {
            name: m.name.clone(),
            version: m.version.clone(),
            phase: m.phase.as_str().to_string(),
            health: m.health.as_str().to_string(),
            message: m.message.clone(),
            staged_version: m.staged_version.clone(),
            previous_version: m.previous_version.clone(),
            restarts: m.restarts,
            crash_loop: m.crash_loop,
            metrics: m.metrics.map(|w| pb::ModuleMetrics {
                request_rate: w.request_rate,
                error_rate: w.error_rate,
                latency_p99_seconds: w.latency_p99_seconds,
                interval_seconds: 0.0,
            }),
            pid: 0,
            settling_versions: m.settling.clone(),
            failure_kind: m
                .failure_kind
                .map(|k| k.as_str().to_string())
                .unwrap_or_default(),
            usage: m.usage.map(pb::ModuleUsage::from),
        }
    }
}

/// A module of a node as the control plane describes it, and the version it
/// is desired at (`""` when not desired).
pub fn node_module_to_pb(m: &ModuleStatus, desired_version: &str) -> pb::NodeModule {
    pb::NodeModule {
        name: m.name.clone(),
        version: m.version.clone(),
        phase: m.phase.as_str().to_string(),
        health: m.health.as_str().to_string(),
        message: m.message.clone(),
        staged_version: m.staged_version.clone(),
        previous_version: m.previous_version.clone(),
        restarts: m.restarts,
        crash_loop: m.crash_loop,
        desired_version: desired_version.to_string(),
        metrics: m.metrics.map(|w| pb::ModuleMetricsView {
            request_rate: w.request_rate,
            error_rate: w.error_rate,
            latency_p99_seconds: w.latency_p99_seconds,
        }),
        settling_versions: m.settling.clone(),
        failure_kind: m
            .failure_kind
            .map(|k| k.as_str().to_string())
            .unwrap_or_default(),
    }
}

/// A node's module as a control plane describes it: lenient, as the
/// control plane screened it already; a word this build does not know
/// reads as unknown (phase, health) or none (failure class).
fn node_module_from_pb(m: pb::NodeModule) -> NodeModuleView {
    let status = ModuleStatus {
        name: m.name,
        version: m.version,
        phase: Phase::parse(&m.phase),
        health: Health::parse(&m.health),
        message: m.message,
        staged_version: m.staged_version,
        previous_version: m.previous_version,
        restarts: m.restarts,
        crash_loop: m.crash_loop,
        metrics: m.metrics.map(|w| ModuleMetrics {
            request_rate: w.request_rate,
            error_rate: w.error_rate,
            latency_p99_seconds: known(w.latency_p99_seconds),
        }),
        settling: m.settling_versions,
        failure_kind: FailureKind::parse(&m.failure_kind),
        usage: None,
    };
    NodeModuleView::from_status(status, m.desired_version)
}

fn rfc3339(ts: Option<&prost_types::Timestamp>) -> Option<String> {
    ts.map(|t| rfc3339_from_ms(ms_from_ts(t)))
}

impl TryFrom<pb::Token> for TokenView {
    type Error = ConvertError;

    fn try_from(token: pb::Token) -> Result<Self, Self::Error> {
        if token.token.is_empty() {
            return Err(ConvertError::Missing {
                message: "Token",
                field: "token",
            });
        }
        Ok(TokenView {
            token: token.token,
            ca_fingerprint: token.ca_fingerprint,
            expires_at: rfc3339(token.expires_at.as_ref()),
            uses: token.uses,
            labels: token.labels.into_iter().collect(),
        })
    }
}

impl TryFrom<pb::Server> for ServerView {
    type Error = ConvertError;

    fn try_from(server: pb::Server) -> Result<Self, Self::Error> {
        if server.name.is_empty() {
            return Err(ConvertError::Missing {
                message: "Server",
                field: "name",
            });
        }
        Ok(ServerView {
            name: server.name,
            endpoint: server.endpoint,
            leader: server.leader,
            ready: server.ready,
            sessions: server.sessions,
            started_at: rfc3339(server.started_at.as_ref()),
            last_seen: rfc3339(server.last_seen.as_ref()),
        })
    }
}

impl TryFrom<pb::Node> for NodeView {
    type Error = ConvertError;

    fn try_from(node: pb::Node) -> Result<Self, Self::Error> {
        if node.id.is_empty() {
            return Err(ConvertError::Missing {
                message: "Node",
                field: "id",
            });
        }
        let status = NodeStatus::parse(&node.status).ok_or_else(|| ConvertError::Invalid {
            message: "Node",
            field: "status",
            value: node.status.clone(),
        })?;
        Ok(NodeView {
            id: node.id,
            name: node.name,
            labels: node.labels.into_iter().collect(),
            status,
            last_seen: rfc3339(node.last_seen.as_ref()),
            modules: node.modules.into_iter().map(node_module_from_pb).collect(),
            agent_version: node.agent_version,
            enrolled_at: rfc3339(node.enrolled_at.as_ref()),
            usage: node.usage.map(|u| NodeUsageView {
                cpu_percent: u.cpu_percent,
                memory_used_bytes: u.memory_used_bytes,
                memory_total_bytes: u.memory_total_bytes,
            }),
            desired_generation: node.desired_generation,
            observed_generation: node.observed_generation,
        })
    }
}

impl TryFrom<pb::NodeUpdate> for NodeUpdateView {
    type Error = ConvertError;

    fn try_from(update: pb::NodeUpdate) -> Result<Self, Self::Error> {
        let node = update.node.ok_or(ConvertError::Missing {
            message: "NodeUpdate",
            field: "node",
        })?;
        let kind = if update.removed {
            "removed"
        } else if update.snapshot {
            "snapshot"
        } else {
            "changed"
        };
        Ok(NodeUpdateView {
            kind: kind.to_string(),
            node: node.try_into()?,
        })
    }
}

impl TryFrom<pb::ModuleVersion> for ModuleVersionView {
    type Error = ConvertError;

    fn try_from(version: pb::ModuleVersion) -> Result<Self, Self::Error> {
        if version.digest.is_empty() {
            return Err(ConvertError::Missing {
                message: "ModuleVersion",
                field: "digest",
            });
        }
        Ok(ModuleVersionView {
            version: version.version,
            digest: version.digest,
            size: version.size,
            signed_by: version.signed_by,
            pushed_at: rfc3339(version.pushed_at.as_ref()),
            pushed_by: version.pushed_by,
            runtime: version.runtime,
            // A yank always has a time; by and reason may be empty.
            yanked: version.yanked_at.as_ref().map(|at| YankView {
                at: rfc3339(Some(at)),
                by: version.yanked_by.clone(),
                reason: version.yank_reason.clone(),
            }),
        })
    }
}

impl TryFrom<pb::ClusterCurrent> for ClusterCurrentView {
    type Error = ConvertError;

    fn try_from(current: pb::ClusterCurrent) -> Result<Self, Self::Error> {
        for (field, value) in [("module", &current.module), ("version", &current.version)] {
            if value.is_empty() {
                return Err(ConvertError::Missing {
                    message: "ClusterCurrent",
                    field,
                });
            }
        }
        Ok(ClusterCurrentView {
            module: current.module,
            version: current.version,
            drift: current.drift,
            deployment_id: current.deployment_id,
        })
    }
}

impl TryFrom<pb::Module> for ModuleView {
    type Error = ConvertError;

    fn try_from(module: pb::Module) -> Result<Self, Self::Error> {
        Ok(ModuleView {
            name: module.name,
            versions: module
                .versions
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
        })
    }
}

impl TryFrom<pb::PublisherKey> for PublisherKeyView {
    type Error = ConvertError;

    fn try_from(key: pb::PublisherKey) -> Result<Self, Self::Error> {
        if key.key_id.is_empty() {
            return Err(ConvertError::Missing {
                message: "PublisherKey",
                field: "key_id",
            });
        }
        Ok(PublisherKeyView {
            status: if key.revoked_at.is_some() {
                "revoked"
            } else {
                "trusted"
            }
            .to_string(),
            name: key.name,
            key_id: key.key_id,
            added_at: rfc3339(key.added_at.as_ref()),
            added_by: key.added_by,
            revoked_at: rfc3339(key.revoked_at.as_ref()),
        })
    }
}

impl TryFrom<pb::Deployment> for DeploymentView {
    type Error = ConvertError;

    fn try_from(d: pb::Deployment) -> Result<Self, Self::Error> {
        if d.id.is_empty() {
            return Err(ConvertError::Missing {
                message: "Deployment",
                field: "id",
            });
        }
        let progress = d.progress.ok_or(ConvertError::Missing {
            message: "Deployment",
            field: "progress",
        })?;
        Ok(DeploymentView {
            id: d.id,
            module: d.module,
            version: d.version,
            environment: d.environment,
            strategy: d.strategy,
            state: d.state,
            progress: ProgressView {
                total: progress.total,
                updated: progress.updated,
                healthy: progress.healthy,
                failed: progress.failed,
            },
            nodes: d
                .nodes
                .into_iter()
                .map(|n| DeploymentNodeView {
                    node: n.node,
                    from_version: n.from_version,
                    to_version: n.to_version,
                    state: n.state,
                    reason: n.reason,
                    wave: n.wave,
                    failure_kind: (!n.failure_kind.is_empty()).then_some(n.failure_kind),
                })
                .collect(),
            created_by: d.created_by,
            created_at: rfc3339(d.created_at.as_ref()),
            finished_at: rfc3339(d.finished_at.as_ref()),
            reason: d.reason,
            wave: d.wave,
            waves: d.waves,
            analysis: d
                .analysis
                .into_iter()
                .map(|v| VerdictView {
                    time: rfc3339(v.time.as_ref()),
                    step: v.step,
                    passed: v.passed,
                    summary: v.summary,
                    canary_error_rate: known(v.canary_error_rate),
                    baseline_error_rate: known(v.baseline_error_rate),
                    canary_latency_p99: known(v.canary_latency_p99),
                    baseline_latency_p99: known(v.baseline_latency_p99),
                    outcome: if v.outcome.is_empty() {
                        if v.passed { "passed" } else { "failed" }.to_string()
                    } else {
                        v.outcome
                    },
                    canary_requests: v.canary_requests,
                    baseline_requests: v.baseline_requests,
                    canary_nodes: v.canary_nodes,
                    baseline_nodes: v.baseline_nodes,
                })
                .collect(),
            approved_by: d.approved_by,
            waiting_for: d.waiting_for,
            max_error_rate: d.max_error_rate.filter(|r| r.is_finite() && *r >= 0.0),
            max_latency_increase: d.max_latency_increase.filter(|f| f.is_finite() && *f > 0.0),
        })
    }
}

/// `None` for the empty string: the wire's "absent".
fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl From<pb::Event> for EventView {
    fn from(e: pb::Event) -> Self {
        EventView {
            seq: e.seq,
            time: rfc3339(e.time.as_ref()),
            kind: e.kind,
            deployment_id: non_empty(e.deployment_id),
            node: non_empty(e.node),
            module: non_empty(e.module),
            version: non_empty(e.version),
            message: e.message,
        }
    }
}

impl From<pb::AuditRecord> for AuditRecordView {
    fn from(r: pb::AuditRecord) -> Self {
        AuditRecordView {
            seq: r.seq,
            time: rfc3339(r.time.as_ref()),
            user: r.user,
            role: r.role,
            action: r.action,
            target: r.target,
            result: r.result,
            detail: r.detail,
            trace_id: r.trace_id,
            peer: r.peer,
            prev_hash: r.prev_hash,
            hash: r.hash,
        }
    }
}

impl From<pb::User> for UserView {
    fn from(u: pb::User) -> Self {
        UserView {
            name: u.name,
            role: u.role,
            revoked: u.revoked,
            created_by: u.created_by,
            created_at: rfc3339(u.created_at.as_ref()),
            cert_expires_at: rfc3339(u.cert_expires_at.as_ref()),
            cert_fingerprint: u.cert_fingerprint,
        }
    }
}

impl TryFrom<pb::Cluster> for ClusterView {
    type Error = ConvertError;

    fn try_from(c: pb::Cluster) -> Result<Self, Self::Error> {
        Ok(ClusterView {
            current: c
                .current
                .into_iter()
                .map(ClusterCurrentView::try_from)
                .collect::<Result<_, _>>()?,
            environment: c.environment,
            nodes: c.nodes,
            connected: c.connected,
            healthy: c.healthy,
            unhealthy: c.unhealthy,
            unknown: c.unknown,
            modules: c
                .modules
                .into_iter()
                .map(|m| ClusterModuleView {
                    name: m.name,
                    version: m.version,
                    nodes: m.nodes,
                    healthy: m.healthy,
                })
                .collect(),
            // Averages are unset when nothing reports, or negative from a
            // control plane before the fields were optional.
            cpu_percent: known(c.cpu_percent),
            memory_used_bytes: known(c.memory_used_bytes),
            request_rate: known(c.request_rate),
            error_rate: known(c.error_rate),
            latency_p99_seconds: known(c.latency_p99_seconds),
            active_deployments: c.active_deployments,
        })
    }
}

impl TryFrom<pb::Pipeline> for PipelineView {
    type Error = ConvertError;

    fn try_from(p: pb::Pipeline) -> Result<Self, Self::Error> {
        if p.id.is_empty() {
            return Err(ConvertError::Missing {
                message: "Pipeline",
                field: "id",
            });
        }
        // A control plane from before `target` was sent: the last stage's.
        let target = if p.target.is_empty() {
            p.stages
                .last()
                .map(|s| s.environment.clone())
                .unwrap_or_default()
        } else {
            p.target
        };
        Ok(PipelineView {
            id: p.id,
            module: p.module,
            version: p.version,
            target,
            state: p.state,
            reason: p.reason,
            created_by: p.created_by,
            created_at: rfc3339(p.created_at.as_ref()),
            finished_at: rfc3339(p.finished_at.as_ref()),
            stages: p
                .stages
                .into_iter()
                .map(|s| PipelineStageView {
                    environment: s.environment,
                    deployment_id: s.deployment_id,
                    state: s.state,
                    reason: s.reason,
                })
                .collect(),
        })
    }
}

impl From<pb::HistoryNode> for crate::model::HistoryNodeView {
    fn from(n: pb::HistoryNode) -> Self {
        crate::model::HistoryNodeView {
            node: n.node,
            modules: n
                .modules
                .into_iter()
                .map(|m| crate::model::HistoryModuleView {
                    name: m.name,
                    version: m.version,
                })
                .collect(),
        }
    }
}

impl From<pb::HistoryChange> for crate::model::HistoryChangeView {
    fn from(c: pb::HistoryChange) -> Self {
        let some = |s: String| (!s.is_empty()).then_some(s);
        crate::model::HistoryChangeView {
            time: rfc3339(c.time.as_ref()),
            node: c.node,
            module: c.module,
            from: some(c.from),
            to: some(c.to),
            deployment_id: some(c.deployment_id),
            by: c.by,
            seq: c.seq,
            environment: c.environment,
        }
    }
}

impl From<pb::Plan> for PlanView {
    fn from(plan: pb::Plan) -> Self {
        PlanView {
            strategy: plan.strategy,
            waves: plan
                .waves
                .into_iter()
                .map(|w| WaveView {
                    nodes: w.nodes,
                    gate: w.gate,
                    earliest_start: rfc3339(w.earliest_start.as_ref()),
                    window: w.window,
                })
                .collect(),
        }
    }
}

impl From<crate::model::DeploymentRequest> for pb::CreateDeploymentRequest {
    fn from(r: crate::model::DeploymentRequest) -> Self {
        // Saturating: a duration beyond u64 milliseconds reaches the control
        // plane as the largest value, which it refuses by name, never as a
        // wrapped-around small one it would accept.
        let millis = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let ms = |d: Option<std::time::Duration>| d.map_or(0, millis);
        pb::CreateDeploymentRequest {
            module: r.module,
            version: r.version,
            environment: r.environment,
            dry_run: r.dry_run,
            options: Some(pb::DeploymentOptions {
                strategy: r.strategy.unwrap_or_default(),
                selector: r.selector.into_iter().collect(),
                batch_size: r.batch_size.unwrap_or_default(),
                max_failures: r.max_failures.map(|n| i32::try_from(n).unwrap_or(i32::MAX)),
                steps: r.steps,
                step_duration_ms: ms(r.step_duration),
                manual_promote: r.manual_promote,
                bake_time_ms: ms(r.bake_time),
                min_healthy_time_ms: ms(r.min_healthy_time),
                health_deadline_ms: ms(r.health_deadline),
                max_error_rate: r.max_error_rate,
                max_latency_increase: r.max_latency_increase,
                no_auto_rollback: r.no_auto_rollback,
                progress_deadline_ms: 0,
                pause_timeout_ms: r.pause_timeout.map(millis),
                analysis_min_requests: r.analysis_min_requests,
                analysis_warmup_ms: r.analysis_warmup.map(millis),
                allow_downgrade: r.allow_downgrade,
                override_freeze: r.override_freeze,
            }),
        }
    }
}

impl From<pb::Freeze> for crate::model::FreezeView {
    fn from(f: pb::Freeze) -> Self {
        crate::model::FreezeView {
            id: f.id,
            environment: f.environment,
            from: rfc3339(f.from.as_ref()),
            until: rfc3339(f.until.as_ref()),
            reason: f.reason,
            created_by: f.created_by,
        }
    }
}

/// The signatures a control plane describes an artifact with, as the
/// artifact format holds them; `what` names the artifact in the error.
pub fn signatures_from_pb(
    signatures: &[pb::ArtifactSignature],
    what: &str,
) -> Result<Vec<crate::artifact::format::Signature>, String> {
    signatures
        .iter()
        .map(|s| {
            Ok(crate::artifact::format::Signature {
                key_id: s.key_id.clone(),
                signed_at_ms: s.signed_at_ms,
                expires_at_ms: (s.expires_at_ms != 0).then_some(s.expires_at_ms),
                bytes: s.signature.as_slice().try_into().map_err(|_| {
                    format!("{what}: signature by {} has the wrong length", s.key_id)
                })?,
            })
        })
        .collect()
}

impl From<pb::Webhook> for WebhookView {
    fn from(w: pb::Webhook) -> Self {
        WebhookView {
            id: w.id,
            url: w.url,
            kinds: w.kinds,
            format: w.format,
            last_delivered_seq: (w.last_delivered_seq > 0).then_some(w.last_delivered_seq),
            last_error: non_empty(w.last_error),
            backlog: w.backlog,
            signed: w.signed,
            custom_ca: w.custom_ca,
            created_by: w.created_by,
            created_at: rfc3339(w.created_at.as_ref()),
        }
    }
}

impl WebhookTestView {
    pub fn from_pb(id: &str, t: pb::TestWebhookResponse) -> Self {
        WebhookTestView {
            id: id.to_string(),
            delivered: t.delivered,
            status: u16::try_from(t.status).ok().filter(|s| *s > 0),
            error: non_empty(t.error),
        }
    }
}

impl From<WebhookRequest> for pb::CreateWebhookRequest {
    fn from(r: WebhookRequest) -> Self {
        pb::CreateWebhookRequest {
            url: r.url,
            kinds: r.kinds,
            secret: r.secret.unwrap_or_default(),
            format: r.format.unwrap_or_default(),
            ca_pem: r.ca_pem.unwrap_or_default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_conversion_checks_fields() {
        let node = pb::Node {
            id: "n1".into(),
            name: "a".into(),
            status: "connected".into(),
            ..Default::default()
        };
        let view = NodeView::try_from(node.clone()).expect("valid");
        assert_eq!(view.status, NodeStatus::Connected);
        assert_eq!(view.last_seen, None);

        let err = NodeView::try_from(pb::Node {
            id: String::new(),
            ..node.clone()
        })
        .expect_err("no id");
        assert_eq!(err.to_string(), "Node: field `id` is missing");
        let err = NodeView::try_from(pb::Node {
            status: "weird".into(),
            ..node
        })
        .expect_err("bad status");
        assert!(
            err.to_string()
                .contains("`status` has invalid value \"weird\"")
        );
    }

    #[test]
    fn server_conversion_and_json_shape() {
        let server = pb::Server {
            name: "cp-a".into(),
            endpoint: "https://cp-a.example:7443".into(),
            leader: true,
            ready: true,
            sessions: 3,
            started_at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            last_seen: Some(prost_types::Timestamp {
                seconds: 1_700_000_060,
                nanos: 0,
            }),
        };
        let view = ServerView::try_from(server.clone()).expect("valid");
        let json = serde_json::to_value(&view).expect("json");
        assert_eq!(
            json,
            serde_json::json!({
                "name": "cp-a",
                "endpoint": "https://cp-a.example:7443",
                "leader": true,
                "ready": true,
                "sessions": 3,
                "started_at": "2023-11-14T22:13:20Z",
                "last_seen": "2023-11-14T22:14:20Z",
            })
        );
        let err = ServerView::try_from(pb::Server {
            name: String::new(),
            ..server
        })
        .expect_err("no name");
        assert_eq!(err.to_string(), "Server: field `name` is missing");
    }

    #[test]
    fn node_json_shape_is_stable() {
        let view = NodeView::try_from(pb::Node {
            id: "n1".into(),
            name: "web-1".into(),
            status: "disconnected".into(),
            last_seen: Some(prost_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 0,
            }),
            labels: [("environment".to_string(), "dev".to_string())].into(),
            ..Default::default()
        })
        .expect("valid");
        let json = serde_json::to_value(&view).expect("json");
        for field in ["id", "name", "labels", "status", "last_seen", "modules"] {
            assert!(json.get(field).is_some(), "node JSON lacks {field}: {json}");
        }
        assert_eq!(json["status"], "disconnected");
        assert_eq!(json["last_seen"], "2023-11-14T22:13:20Z");
        assert_eq!(json["labels"]["environment"], "dev");
    }

    fn metrics(request_rate: f64, error_rate: f64, latency: Option<f64>) -> pb::ModuleMetrics {
        pb::ModuleMetrics {
            request_rate,
            error_rate,
            latency_p99_seconds: latency,
            interval_seconds: 5.0,
        }
    }

    fn status(name: &str) -> pb::ModuleStatus {
        pb::ModuleStatus {
            name: name.into(),
            version: "1.0.0".into(),
            phase: "running".into(),
            health: "healthy".into(),
            ..Default::default()
        }
    }

    #[test]
    fn metrics_errors_name_the_field_and_the_value() {
        let check = |w: pb::ModuleMetrics, expected: &str| {
            let err = ModuleMetrics::try_from(w).expect_err(expected);
            assert_eq!(err.to_string(), expected);
        };
        check(
            metrics(f64::NAN, 0.0, None),
            "request_rate: must be within 0..=1000000000, got NaN",
        );
        check(
            metrics(1.0, f64::NAN, None),
            "error_rate: must be within 0..=1, got NaN",
        );
        check(
            metrics(1.0, 1.5, None),
            "error_rate: must be within 0..=1, got 1.5",
        );
        check(
            metrics(1.0, 0.0, Some(f64::INFINITY)),
            "latency_p99_seconds: must be within 0..=86400, got inf",
        );
        check(
            metrics(1.0, 0.0, Some(f64::NEG_INFINITY)),
            "latency_p99_seconds: must be within 0..=86400, got -inf",
        );
        // Unset, and the negative of agents from before the field was
        // optional, both mean no requests.
        for latency in [None, Some(-1.0)] {
            let w = ModuleMetrics::try_from(metrics(0.0, 0.0, latency)).expect("valid");
            assert_eq!(w.latency_p99_seconds, None);
        }
    }

    #[test]
    fn status_errors_carry_the_path_inside_the_message() {
        let err = ModuleStatus::try_from(status("../../etc")).expect_err("bad name");
        assert_eq!(err.path, "name");
        assert!(
            err.to_string()
                .starts_with("name: module name \"../../etc\" is invalid")
        );
        let mut bad = status("web");
        bad.metrics = Some(metrics(1.0, f64::NAN, None));
        let err = ModuleStatus::try_from(bad)
            .expect_err("bad metrics")
            .within("modules[2]");
        assert_eq!(
            err.to_string(),
            "modules[2].metrics.error_rate: must be within 0..=1, got NaN"
        );
    }

    #[test]
    fn unknown_words_are_lenient() {
        let mut newer = status("web");
        newer.phase = "hibernating".into();
        newer.health = "degraded".into();
        newer.failure_kind = "cosmic-ray".into();
        let m = ModuleStatus::try_from(newer).expect("a newer agent is not cut off");
        assert_eq!(
            (m.phase, m.health, m.failure_kind),
            (Phase::Unknown, Health::Unknown, None)
        );
    }

    #[test]
    fn status_round_trips_through_the_wire() {
        let m = ModuleStatus {
            name: "web".into(),
            version: "1.2.0".into(),
            phase: Phase::Failed,
            health: Health::Unhealthy,
            message: "probe failed".into(),
            staged_version: "1.3.0".into(),
            previous_version: "1.1.0".into(),
            restarts: 3,
            crash_loop: true,
            metrics: Some(ModuleMetrics {
                request_rate: 5.0,
                error_rate: 0.5,
                latency_p99_seconds: None,
            }),
            settling: vec!["1.1.0".into()],
            failure_kind: Some(FailureKind::Release),
            usage: Some(ModuleUsage {
                cpu_percent: 12.5,
                memory_resident_bytes: 48 << 20,
            }),
        };
        assert_eq!(
            ModuleStatus::try_from(pb::ModuleStatus::from(&m)),
            Ok(m.clone())
        );
        let view = node_module_from_pb(node_module_to_pb(&m, "1.2.0"));
        assert_eq!(view, NodeModuleView::from_status(m, "1.2.0".into()));
    }

    #[test]
    fn node_module_json_is_unchanged() {
        // The shape `nodes get -o json` printed before the typed status.
        let view = node_module_from_pb(pb::NodeModule {
            name: "web".into(),
            version: "1.0.0".into(),
            phase: "running".into(),
            health: "healthy".into(),
            desired_version: "1.0.0".into(),
            metrics: Some(pb::ModuleMetricsView {
                request_rate: 2.0,
                error_rate: 0.0,
                // A control plane from before the field was optional.
                latency_p99_seconds: Some(-1.0),
            }),
            failure_kind: "infrastructure".into(),
            ..Default::default()
        });
        assert_eq!(
            serde_json::to_string(&view).expect("json"),
            r#"{"name":"web","version":"1.0.0","phase":"running","health":"healthy","message":"","staged_version":"","previous_version":"","desired_version":"1.0.0","restarts":0,"crash_loop":false,"metrics":{"request_rate":2.0,"error_rate":0.0,"latency_p99_seconds":null},"settling":[],"failure_kind":"infrastructure"}"#
        );
    }

    #[test]
    fn versions_are_empty_or_semver() {
        assert_eq!(check_version("version", ""), Ok(()));
        assert_eq!(check_version("version", "1.2.3-rc.1+b5"), Ok(()));
        let err = check_version("staged_version", "latest").expect_err("not semver");
        assert_eq!(err.path, "staged_version");
        assert!(err.reason.starts_with("\"latest\" is not semver"), "{err}");
    }

    #[test]
    fn module_usage_is_believable_or_refused() {
        let usage = |cpu_percent, memory_resident_bytes| pb::ModuleUsage {
            cpu_percent,
            memory_resident_bytes,
        };
        assert_eq!(
            ModuleUsage::try_from(usage(250.0, 64 << 20)),
            Ok(ModuleUsage {
                cpu_percent: 250.0,
                memory_resident_bytes: 64 << 20
            })
        );
        for (bad, field, reason) in [
            (
                usage(f64::NAN, 0),
                "cpu_percent",
                "must be within 0..=102400, got NaN",
            ),
            (
                usage(-1.0, 0),
                "cpu_percent",
                "must be within 0..=102400, got -1",
            ),
            (
                usage(f64::INFINITY, 0),
                "cpu_percent",
                "must be within 0..=102400, got inf",
            ),
            (
                usage(1.0, u64::MAX),
                "memory_resident_bytes",
                "18446744073709551615 is beyond 17592186044416, more than any host has",
            ),
        ] {
            let err = ModuleUsage::try_from(bad).expect_err(reason);
            assert_eq!((err.path.as_str(), err.reason.as_str()), (field, reason));
        }
        let mut status = pb::ModuleStatus {
            name: "web".into(),
            usage: Some(usage(-3.0, 0)),
            ..Default::default()
        };
        let err = ModuleStatus::try_from(status.clone()).expect_err("bad usage");
        assert_eq!(err.path, "usage.cpu_percent");
        status.usage = Some(usage(3.0, 1024));
        let back = ModuleStatus::try_from(status).expect("good usage");
        assert_eq!(
            pb::ModuleStatus::from(&back).usage,
            Some(usage(3.0, 1024)),
            "round trip"
        );
    }

    proptest::proptest! {
        #[test]
        fn converted_metrics_are_always_believable(
            request_rate in proptest::num::f64::ANY,
            error_rate in proptest::num::f64::ANY,
            latency in proptest::option::of(proptest::num::f64::ANY),
        ) {
            if let Ok(w) = ModuleMetrics::try_from(metrics(request_rate, error_rate, latency)) {
                proptest::prop_assert!((0.0..=MAX_REQUEST_RATE).contains(&w.request_rate));
                proptest::prop_assert!((0.0..=1.0).contains(&w.error_rate));
                if let Some(l) = w.latency_p99_seconds {
                    proptest::prop_assert!((0.0..=MAX_LATENCY_SECONDS).contains(&l));
                }
            }
        }
    }
}
