//! The deployment state machine: pure, deterministic, no I/O.
//!
//! A [`Deployment`] moves from state to state on [`Input`]s: a complete
//! observation of the target nodes (level-triggered, taken on every tick and
//! on every node change) or an operator control. Each step returns the new
//! deployment and the [`Action`]s to carry out (set a node's desired version,
//! stage a version). The engine persists the new deployment *before* it acts,
//! so a control plane killed at any point resumes from the stored state and
//! replaying the same input gives the same result.
//!
//! Strategies: direct (one wave), rolling (batches, each healthy for
//! `min_healthy_ms` before the next), blue-green (stage everywhere, switch
//! all, bake), canary (cumulative steps held for `step_ms` while canary nodes
//! are compared with the nodes still on the old version).

use serde::{Deserialize, Serialize};

mod note;

pub use note::Note;

pub type Ms = u64;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchSize {
    Count(u32),
    Percent(u32),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Strategy {
    Direct,
    Rolling {
        batch: BatchSize,
        min_healthy_ms: Ms,
    },
    BlueGreen {
        bake_ms: Ms,
    },
    Canary {
        steps: Vec<u32>,
        step_ms: Ms,
        manual_promote: bool,
    },
}

impl Strategy {
    pub fn name(&self) -> &'static str {
        match self {
            Strategy::Direct => "direct",
            Strategy::Rolling { .. } => "rolling",
            Strategy::BlueGreen { .. } => "blue-green",
            Strategy::Canary { .. } => "canary",
        }
    }
}

/// Canary analysis limits.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Absolute ceiling for the canary error rate (0..1).
    pub max_error_rate: f64,
    /// Canary error rate may exceed the baseline's by this fraction (0.5 = +50 %).
    pub error_rate_increase: f64,
    /// Canary p99 latency may be at most this multiple of the baseline's.
    pub latency_increase: f64,
    /// Canary CPU and memory may exceed the baseline's by this fraction...
    pub cpu_increase: f64,
    pub memory_increase: f64,
    /// ...and, to count as worse, also by these absolute margins: percentage
    /// points of a core, and bytes. A freshly started process uses more of
    /// both than a warm one; small absolute differences are noise.
    #[serde(default = "default_cpu_margin")]
    pub cpu_margin_points: f64,
    #[serde(default = "default_memory_margin")]
    pub memory_margin_bytes: f64,
    /// Requests that canary and baseline each need in the analysis window
    /// before their metrics are judged; fewer make the verdict inconclusive.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// Reports from the first this-many ms of a step's hold are left out
    /// of its analysis (caches filling, JIT, connection set-up).
    #[serde(default)]
    pub warmup_ms: Ms,
}

fn default_cpu_margin() -> f64 {
    10.0
}

fn default_memory_margin() -> f64 {
    64.0 * 1024.0 * 1024.0
}

fn default_min_requests() -> u64 {
    50
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            max_error_rate: 0.05,
            error_rate_increase: 0.5,
            latency_increase: 2.0,
            cpu_increase: 0.3,
            memory_increase: 0.3,
            cpu_margin_points: default_cpu_margin(),
            memory_margin_bytes: default_memory_margin(),
            min_requests: default_min_requests(),
            warmup_ms: 10_000,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    pub module: String,
    pub version: String,
    pub strategy: Strategy,
    pub max_failures: u32,
    /// A node must be healthy on the new version this soon after it was asked to switch.
    pub health_deadline_ms: Ms,
    /// A wave must complete this soon after it started.
    pub progress_deadline_ms: Ms,
    pub auto_rollback: bool,
    pub require_approval: bool,
    /// A deployment awaiting approval is aborted this long after creation
    /// (0: never).
    #[serde(default)]
    pub approval_timeout_ms: Ms,
    /// `paused`, and every wait for `deploy promote`, fail the deployment
    /// after this long (0: never, only in records from before the bound).
    #[serde(default)]
    pub pause_timeout_ms: Ms,
    pub created_by: String,
    pub thresholds: Thresholds,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    Pending,
    AwaitingApproval,
    Running,
    Paused,
    Succeeded,
    Failed,
    RollingBack,
    RolledBack,
    Aborted,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::AwaitingApproval => "awaiting_approval",
            State::Running => "running",
            State::Paused => "paused",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::RollingBack => "rolling_back",
            State::RolledBack => "rolled_back",
            State::Aborted => "aborted",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            State::Succeeded | State::Failed | State::RolledBack | State::Aborted
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Waiting,
    Staging,
    Staged,
    Updating,
    Healthy,
    Failed,
    Lost,
    RollingBack,
    RolledBack,
}

impl NodeState {
    /// Whether a step reads the node's report in this state. Reports of
    /// nodes in other states are never looked at, so the engine does not
    /// gather them (the machine tests check that leaving them out changes
    /// no step).
    pub fn reads_report(self) -> bool {
        matches!(
            self,
            NodeState::Staging | NodeState::Updating | NodeState::Healthy | NodeState::RollingBack
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Waiting => "waiting",
            NodeState::Staging => "staging",
            NodeState::Staged => "staged",
            NodeState::Updating => "updating",
            NodeState::Healthy => "healthy",
            NodeState::Failed => "failed",
            NodeState::Lost => "lost",
            NodeState::RollingBack => "rolling_back",
            NodeState::RolledBack => "rolled_back",
        }
    }

    pub fn is_failure(self) -> bool {
        matches!(self, NodeState::Failed | NodeState::Lost)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeTrack {
    pub node: String,
    pub name: String,
    /// Version before the deployment; empty when the module was not there.
    pub from_version: String,
    pub state: NodeState,
    pub since_ms: Ms,
    pub reason: String,
    pub wave: usize,
    /// The deployment changed this node's desired state (rollback returns it).
    pub touched: bool,
    /// Why the node failed, once it did; while it is still updating, an
    /// infrastructure failure it is retrying.
    #[serde(default)]
    pub failure_kind: Option<FailureKind>,
}

pub use hotswap_common::status::{FailureKind, Health, Phase};

impl NodeTrack {
    /// Failed or lost for a reason that counts against the release. A
    /// failure without a kind comes from a record written before kinds
    /// existed, when every failure counted.
    pub fn counts_as_failure(&self) -> bool {
        self.state.is_failure() && self.failure_kind != Some(FailureKind::Infrastructure)
    }
}

/// What a node reports, as the engine sees it at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub connected: bool,
    /// The agent has received the node's latest desired state; failure
    /// signals from older reports are ignored.
    pub current: bool,
    /// Active version of the module ("" when not installed).
    pub version: String,
    pub phase: Phase,
    pub health: Health,
    pub crash_loop: bool,
    pub staged_version: String,
    pub message: String,
    /// Versions of the module other than `version` that still start, stop
    /// or serve on the node: a candidate inside its health gate, an old
    /// instance draining. A node is not back on a version while another
    /// one is listed here.
    #[serde(default)]
    pub settling: Vec<String>,
    /// The agent's class of the failure it reports (phase `Failed`).
    #[serde(default)]
    pub failure: Option<FailureKind>,
}

/// Request metrics and usage of a group of nodes over the current hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Aggregate {
    pub error_rate: Option<f64>,
    pub latency_p99: Option<f64>,
    pub cpu_percent: Option<f64>,
    pub memory_bytes: Option<f64>,
    pub crash_loops: u32,
    pub nodes: u32,
    /// Requests served in the analysis window (the sample size of the
    /// error rate and latency).
    #[serde(default)]
    pub requests: f64,
    /// Usage reports in the analysis window (the sample size of CPU and
    /// memory).
    #[serde(default)]
    pub usage_samples: u32,
    /// The p99 latency of each metrics window in the analysis window, every
    /// node's together (at most [`MAX_LATENCY_WINDOWS`]): the samples the
    /// rank test compares.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency_windows: Vec<f64>,
}

/// Latency windows kept per group for the rank test: two minutes of 5 s
/// reports from ten nodes.
pub const MAX_LATENCY_WINDOWS: usize = 240;

/// Fewer windows than this on either side and latency is judged on the
/// medians alone: a rank test on three values says nothing.
pub const MIN_RANK_WINDOWS: usize = 4;

/// Fewer reports with usage than this on either side and CPU and memory
/// are not judged: the first readings of a process just started (and of
/// its baseline at that moment) are noise, not a trend.
pub const MIN_USAGE_SAMPLES: u32 = 3;

/// A latency regression must also be significant at this level (one-sided
/// Mann-Whitney U): one slow window on a canary is noise.
pub const LATENCY_SIGNIFICANCE: f64 = 0.01;

/// One-sided Mann-Whitney U test that `canary` values tend to be larger
/// than `baseline` values: the p-value under the normal approximation with
/// tie and continuity corrections, or `None` with fewer than
/// [`MIN_RANK_WINDOWS`] values on either side or a non-finite value. All
/// values tied gives 1 (no evidence of a difference).
///
/// The idea follows Kayenta's use of the test to compare canary and
/// baseline metric distributions; this is our own implementation.
pub fn mann_whitney_greater(canary: &[f64], baseline: &[f64]) -> Option<f64> {
    let (n1, n2) = (canary.len(), baseline.len());
    if n1 < MIN_RANK_WINDOWS
        || n2 < MIN_RANK_WINDOWS
        || canary.iter().chain(baseline).any(|v| !v.is_finite())
    {
        return None;
    }
    let mut all: Vec<(f64, bool)> = canary
        .iter()
        .map(|v| (*v, true))
        .chain(baseline.iter().map(|v| (*v, false)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = all.len();
    // Average ranks over ties, and the tie correction term.
    let (mut rank_sum, mut ties, mut i) = (0.0, 0.0, 0);
    while i < n {
        let mut j = i;
        while j + 1 < n && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let t = (j - i + 1) as f64;
        let average = (i + j) as f64 / 2.0 + 1.0;
        rank_sum += average * all[i..=j].iter().filter(|(_, c)| *c).count() as f64;
        ties += t * t * t - t;
        i = j + 1;
    }
    let (n1, n2, n) = (n1 as f64, n2 as f64, n as f64);
    let u = rank_sum - n1 * (n1 + 1.0) / 2.0;
    let mean = n1 * n2 / 2.0;
    let variance = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if variance <= 0.0 {
        return Some(1.0);
    }
    let z = (u - mean - 0.5) / variance.sqrt();
    Some((1.0 - standard_normal_cdf(z)).clamp(0.0, 1.0))
}

/// Φ(z) from the complementary error function (Abramowitz and Stegun
/// 7.1.26; absolute error below 1.5e-7).
fn standard_normal_cdf(z: f64) -> f64 {
    let x = z.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erfc = poly * (-x * x).exp();
    if z >= 0.0 {
        1.0 - erfc / 2.0
    } else {
        erfc / 2.0
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Analysis {
    pub canary: Aggregate,
    pub baseline: Aggregate,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub at_ms: Ms,
    pub step: usize,
    /// `outcome != Failed`.
    pub passed: bool,
    #[serde(default)]
    pub outcome: Outcome,
    pub summary: String,
    pub analysis: Analysis,
}

/// What a canary verdict concluded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Enough evidence, and none of it worse than the thresholds allow.
    #[default]
    Passed,
    /// Evidence that the canary is worse.
    Failed,
    /// Too little traffic to judge; the step is held longer.
    Inconclusive,
    /// Still too little traffic after three times the step duration:
    /// passed on health alone.
    HealthOnly,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Passed => "passed",
            Outcome::Failed => "failed",
            Outcome::Inconclusive => "inconclusive",
            Outcome::HealthOnly => "health_only",
        }
    }
}

/// An operator's control of a deployment. An approval's or rejection's
/// `reason` is empty when the operator gave none.
#[derive(Clone, Debug, PartialEq)]
pub enum Control {
    Approve {
        by: String,
        reason: String,
    },
    Reject {
        by: String,
        reason: String,
    },
    Pause,
    Resume,
    Promote,
    Abort {
        reason: String,
    },
    Rollback {
        reason: String,
    },
    /// The deployment's version was yanked (`module yank`): it is known bad,
    /// so every node the deployment changed goes back to its previous
    /// version; a deployment that changed none ends aborted.
    Yanked {
        by: String,
        reason: String,
    },
}

/// What every target node reports, by node id. A hash map: the engine builds
/// one per step for every node of a deployment (10k and more), and the
/// machine only looks nodes up in it.
pub type Reports = rustc_hash::FxHashMap<String, NodeReport>;

/// The report of a node that has none (never connected, or gone).
static NO_REPORT: NodeReport = NodeReport {
    connected: false,
    current: false,
    version: String::new(),
    phase: Phase::Unknown,
    health: Health::Unknown,
    crash_loop: false,
    staged_version: String::new(),
    message: String::new(),
    settling: Vec::new(),
    failure: None,
};

// One Input is built per step and dropped after it, never stored in bulk:
// boxing the analysis would only add an allocation per step.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// Every target node's report (absent = unknown) and, for canaries, the analysis.
    Observe {
        nodes: Reports,
        analysis: Option<Analysis>,
    },
    Control(Control),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Desired version of the module on the node ("" removes it).
    SetVersion { node: String, version: String },
    /// Keep the node on `active` and stage `staged` beside it.
    Stage {
        node: String,
        active: String,
        staged: String,
    },
    /// Something worth an event: what happened, typed.
    Note(Note),
}

/// Whether waves may begin now: the environment's deployment windows
/// (SPEC §9) at the wall clock, as the engine reads them. An input like the
/// observation, so the machine stays pure.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Window {
    #[default]
    Open,
    /// Outside every window: why, naming the windows and when the next
    /// opens ("outside deployment window Mon-Thu 09:00-16:00 UTC; next
    /// opens 2026-12-07T09:00:00Z").
    Closed(String),
}

/// What a deployment held at a wave boundary by a closed window does when
/// one opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WindowResume {
    /// Start: stage (blue-green) or begin wave 1.
    Start,
    /// Begin this wave (counted from 0).
    Wave(usize),
}

/// Why the machine refused an operator control.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("cannot {what} a deployment that is {}", state.as_str())]
    WrongState { what: &'static str, state: State },
    #[error(
        "{by} created this deployment and cannot approve it; another person must (two-person rule)"
    )]
    OwnApproval { by: String },
    #[error(
        "nothing to promote: the deployment is {} and not waiting for a promotion",
        state.as_str()
    )]
    NothingToPromote { state: State },
    #[error("no node was changed by this deployment; nothing to roll back")]
    NothingToRollBack,
    #[error(
        "cannot resume: the deployment waits for its deployment window ({reason}); it resumes by itself when one opens"
    )]
    OutsideWindow { reason: String },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Deployment {
    pub spec: Spec,
    pub state: State,
    pub nodes: Vec<NodeTrack>,
    pub waves: usize,
    pub wave: usize,
    pub wave_started_ms: Ms,
    /// When the current wave became fully healthy (start of its hold).
    pub hold_since_ms: Option<Ms>,
    /// Blue-green: whether the switch happened.
    pub switched: bool,
    pub awaiting_promote: bool,
    pub paused_from: Option<State>,
    /// When the current pause, or wait for `deploy promote`, began.
    #[serde(default)]
    pub waiting_since_ms: Option<Ms>,
    /// Paused at a wave boundary outside every deployment window (SPEC §9),
    /// and what to do when one opens. Such a wait does not count against
    /// the pause timeout (`waiting_since_ms` stays unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_wait: Option<WindowResume>,
    pub reason: String,
    pub approved_by: String,
    pub created_ms: Ms,
    pub finished_ms: Option<Ms>,
    pub analysis: Vec<Verdict>,
}

impl Deployment {
    /// The latest time this deployment records.
    pub fn latest_ms(&self) -> Ms {
        let tracks = self.nodes.iter().map(|t| t.since_ms);
        let verdicts = self.analysis.iter().map(|v| v.at_ms);
        [
            self.created_ms,
            self.wave_started_ms,
            self.hold_since_ms.unwrap_or(0),
            self.waiting_since_ms.unwrap_or(0),
            self.finished_ms.unwrap_or(0),
        ]
        .into_iter()
        .chain(tracks)
        .chain(verdicts)
        .max()
        .unwrap_or(0)
    }
}

impl Deployment {
    /// Whether `self`, a step's result, differs from `before` at most in its
    /// tracks' states and times: the same nodes, and every other field
    /// (state, wave, counters, verdicts, reason) equal. Such a step decides
    /// nothing by itself; what it decided comes with actions or a change of
    /// another field.
    pub fn differs_only_in_tracks(&self, before: &Deployment) -> bool {
        // Listed field by field, so a field added later must be named here.
        let Deployment {
            spec,
            state,
            nodes,
            waves,
            wave,
            wave_started_ms,
            hold_since_ms,
            switched,
            awaiting_promote,
            paused_from,
            waiting_since_ms,
            window_wait,
            reason,
            approved_by,
            created_ms,
            finished_ms,
            analysis,
        } = self;
        nodes.len() == before.nodes.len()
            && *state == before.state
            && *waves == before.waves
            && *wave == before.wave
            && *wave_started_ms == before.wave_started_ms
            && *hold_since_ms == before.hold_since_ms
            && *switched == before.switched
            && *awaiting_promote == before.awaiting_promote
            && *paused_from == before.paused_from
            && *waiting_since_ms == before.waiting_since_ms
            && *window_wait == before.window_wait
            && *reason == before.reason
            && *approved_by == before.approved_by
            && *created_ms == before.created_ms
            && *finished_ms == before.finished_ms
            && *analysis == before.analysis
            && *spec == before.spec
            && nodes
                .iter()
                .zip(&before.nodes)
                .all(|(now, was)| now.node == was.node)
    }

    /// Whether `self`, a step's result, differs from `before` only in when
    /// healthy nodes were last seen: the `since_ms` that the silence rule
    /// times from, refreshed on every observation of a connected node. Such
    /// a step need not be persisted at once (it changes nothing anyone acts
    /// on); the engine writes it with the next real change or after a while.
    pub fn differs_only_in_last_seen(&mut self, before: &Deployment) -> bool {
        if self.nodes.len() != before.nodes.len() {
            return false;
        }
        // Compare with the refreshed times put back, then restore them: no
        // copy of a record that can hold tens of thousands of nodes.
        let mut refreshed = Vec::new();
        for (i, (now, was)) in self.nodes.iter_mut().zip(&before.nodes).enumerate() {
            if now.state == NodeState::Healthy
                && was.state == NodeState::Healthy
                && now.since_ms != was.since_ms
            {
                refreshed.push((i, now.since_ms));
                now.since_ms = was.since_ms;
            }
        }
        let only = !refreshed.is_empty() && *self == *before;
        for (i, since_ms) in refreshed {
            self.nodes[i].since_ms = since_ms;
        }
        only
    }
}

/// One node's transition on its report, while the deployment runs.
///
/// A failure the agent classes as infrastructure (fetch, disk) keeps the
/// node updating: the agent retries it with backoff, and only the health
/// deadline ends the wait, with the failure still classed infrastructure.
/// A node that goes silent is lost, also an infrastructure failure. Neither
/// counts against the release.
fn observe_node(node: &mut NodeTrack, report: &NodeReport, target: &str, deadline: Ms, now: Ms) {
    let late = now.saturating_sub(node.since_ms) > deadline;
    let deadline_s = deadline / 1000;
    let fail = |node: &mut NodeTrack, kind: FailureKind, reason: String| {
        node.state = NodeState::Failed;
        node.failure_kind = Some(kind);
        node.reason = reason;
    };
    let lose = |node: &mut NodeTrack, reason: String| {
        node.state = NodeState::Lost;
        node.failure_kind = Some(FailureKind::Infrastructure);
        node.reason = reason;
    };
    // An infrastructure failure of the agent's own, which it is retrying.
    let retrying = report.connected
        && report.current
        && report.phase == Phase::Failed
        && report.failure == Some(FailureKind::Infrastructure);
    match node.state {
        NodeState::Staging => {
            if report.connected && (report.staged_version == target || report.version == target) {
                node.state = NodeState::Staged;
                node.since_ms = now;
                node.failure_kind = None;
            } else if retrying && !late {
                node.failure_kind = Some(FailureKind::Infrastructure);
                node.reason = format!("retrying: {}", report.message);
            } else if report.connected
                && report.current
                && report.phase == Phase::Failed
                && report.staged_version != target
                && report.version != target
                && !retrying
            {
                fail(
                    node,
                    FailureKind::Release,
                    format!("staging failed: {}", report.message),
                );
            } else if late {
                let why = format!("not staged within the {deadline_s}s health deadline");
                if !report.connected {
                    lose(node, why);
                } else if node.failure_kind == Some(FailureKind::Infrastructure) {
                    let last = std::mem::take(&mut node.reason);
                    fail(node, FailureKind::Infrastructure, format!("{why} ({last})"));
                } else {
                    fail(node, FailureKind::Release, why);
                }
            }
        }
        NodeState::Updating => {
            let on_target = report.connected && report.version == target;
            if on_target && report.current && report.crash_loop {
                fail(node, FailureKind::Release, "crash loop".into());
            } else if on_target
                && report.current
                && report.health == Health::Unhealthy
                && report.phase == Phase::Running
            {
                fail(
                    node,
                    FailureKind::Release,
                    format!("unhealthy: {}", report.message),
                );
            } else if on_target && report.phase == Phase::Running {
                node.state = NodeState::Healthy;
                node.since_ms = now;
                node.failure_kind = None;
                node.reason.clear();
            } else if retrying && !late {
                node.failure_kind = Some(FailureKind::Infrastructure);
                node.reason = format!("retrying: {}", report.message);
            } else if report.connected
                && report.current
                && report.phase == Phase::Failed
                && report.version != target
                && !retrying
            {
                let reason = if report.message.is_empty() {
                    "activation failed".into()
                } else {
                    report.message.clone()
                };
                fail(node, FailureKind::Release, reason);
            } else if late {
                if !report.connected {
                    lose(
                        node,
                        format!("silent: no report within the {deadline_s}s health deadline"),
                    );
                } else {
                    let why =
                        format!("not healthy on {target} within the {deadline_s}s health deadline");
                    if node.failure_kind == Some(FailureKind::Infrastructure) {
                        let last = std::mem::take(&mut node.reason);
                        fail(node, FailureKind::Infrastructure, format!("{why} ({last})"));
                    } else {
                        fail(node, FailureKind::Release, why);
                    }
                }
            }
        }
        NodeState::Healthy => {
            // A node that regresses while the deployment watches counts as failed.
            if report.connected
                && report.version == target
                && (report.crash_loop || report.health == Health::Unhealthy)
            {
                let reason = if report.crash_loop {
                    "crash loop".into()
                } else {
                    format!("became unhealthy: {}", report.message)
                };
                fail(node, FailureKind::Release, reason);
            } else if !report.connected && now.saturating_sub(node.since_ms) > deadline {
                lose(node, "went silent after becoming healthy".into());
            } else if report.connected {
                // Last seen: silence is timed from here.
                node.since_ms = now;
            }
        }
        _ => {}
    }
}

/// Split `count` ordered nodes into waves for a strategy.
pub fn plan_waves(strategy: &Strategy, count: usize) -> Vec<Vec<usize>> {
    if count == 0 {
        return Vec::new();
    }
    let all: Vec<usize> = (0..count).collect();
    match strategy {
        Strategy::Direct | Strategy::BlueGreen { .. } => vec![all],
        Strategy::Rolling { batch, .. } => {
            let size = match *batch {
                BatchSize::Count(n) => n.max(1) as usize,
                BatchSize::Percent(p) => (count * p.clamp(1, 100) as usize).div_ceil(100).max(1),
            };
            all.chunks(size).map(<[usize]>::to_vec).collect()
        }
        Strategy::Canary { steps, .. } => {
            let mut cuts: Vec<usize> = steps
                .iter()
                .map(|p| {
                    (count * (*p).clamp(1, 100) as usize)
                        .div_ceil(100)
                        .clamp(1, count)
                })
                .collect();
            cuts.push(count);
            let mut waves = Vec::new();
            let mut done = 0;
            for cut in cuts {
                if cut > done {
                    waves.push((done..cut).collect());
                    done = cut;
                }
            }
            waves
        }
    }
}

/// Judge a canary against its baseline on the evidence the analysis window
/// holds. Crash loops fail at once. CPU and memory of the module's process
/// are evidence of their own (usage is reported whether or not the module
/// serves traffic), judged from [`MIN_USAGE_SAMPLES`] reports on each side,
/// and count as worse only beyond both the relative and the absolute
/// margin. Error
/// rate and latency are judged only once canary and baseline each served
/// `min_requests`; with fewer the verdict is [`Outcome::Inconclusive`]. With
/// no baseline (the last step, 100 %) only the absolute error-rate ceiling
/// applies, on the canary's own sample. The summary always states the
/// sample sizes.
pub fn judge(t: &Thresholds, a: &Analysis) -> (Outcome, String) {
    let (canary, baseline) = (&a.canary, &a.baseline);
    let has_baseline = baseline.nodes > 0;
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let mut usage_notes = Vec::new();
    if canary.crash_loops > 0 {
        problems.push(format!(
            "{} canary node(s) in a crash loop",
            canary.crash_loops
        ));
    }
    if has_baseline
        && canary.usage_samples >= MIN_USAGE_SAMPLES
        && baseline.usage_samples >= MIN_USAGE_SAMPLES
        && let (Some(cc), Some(bc)) = (canary.cpu_percent, baseline.cpu_percent)
    {
        usage_notes.push(format!("cpu {cc:.0}% (baseline {bc:.0}%)"));
        if cc > bc * (1.0 + t.cpu_increase) && cc - bc > t.cpu_margin_points {
            problems.push(format!(
                "cpu {cc:.0}% vs baseline {bc:.0}%: more than +{:.0}% and +{:.0} points",
                t.cpu_increase * 100.0,
                t.cpu_margin_points
            ));
        }
    }
    if has_baseline
        && canary.usage_samples >= MIN_USAGE_SAMPLES
        && baseline.usage_samples >= MIN_USAGE_SAMPLES
        && let (Some(cm), Some(bm)) = (canary.memory_bytes, baseline.memory_bytes)
    {
        usage_notes.push(format!(
            "memory {:.0} MiB (baseline {:.0} MiB)",
            cm / 1048576.0,
            bm / 1048576.0
        ));
        if cm > bm * (1.0 + t.memory_increase) && cm - bm > t.memory_margin_bytes {
            problems.push(format!(
                "memory {:.0} MiB vs baseline {:.0} MiB: more than +{:.0}% and +{:.0} MiB",
                cm / 1048576.0,
                bm / 1048576.0,
                t.memory_increase * 100.0,
                t.memory_margin_bytes / 1048576.0
            ));
        }
    }
    let min = t.min_requests as f64;
    let enough = canary.requests >= min && (!has_baseline || baseline.requests >= min);
    if enough {
        if let Some(ce) = canary.error_rate {
            notes.push(format!(
                "error rate {:.2}% (baseline {})",
                ce * 100.0,
                pct(baseline.error_rate)
            ));
            if ce > t.max_error_rate {
                problems.push(format!(
                    "error rate {:.2}% above the {:.2}% ceiling",
                    ce * 100.0,
                    t.max_error_rate * 100.0
                ));
            } else if has_baseline
                && let Some(be) = baseline.error_rate
                // Small absolute differences near zero are noise, not regressions.
                && ce > be * (1.0 + t.error_rate_increase)
                && ce - be > 0.01
            {
                problems.push(format!(
                    "error rate {:.2}% exceeds baseline {:.2}% by more than {:.0}%",
                    ce * 100.0,
                    be * 100.0,
                    t.error_rate_increase * 100.0
                ));
            }
        }
        if has_baseline && let (Some(cl), Some(bl)) = (canary.latency_p99, baseline.latency_p99) {
            notes.push(format!(
                "p99 {:.0}ms (baseline {:.0}ms)",
                cl * 1000.0,
                bl * 1000.0
            ));
            let rank = mann_whitney_greater(&canary.latency_windows, &baseline.latency_windows);
            if bl > 0.0 && cl > bl * t.latency_increase && cl - bl > 0.005 {
                match rank {
                    Some(p) if p >= LATENCY_SIGNIFICANCE => notes.push(format!(
                        "p99 higher but not significantly (Mann-Whitney p={p:.3} over {} and {} windows)",
                        canary.latency_windows.len(),
                        baseline.latency_windows.len()
                    )),
                    Some(p) => problems.push(format!(
                        "p99 latency {:.0}ms is more than {:.1}x the baseline's {:.0}ms (Mann-Whitney p={p:.4} over {} and {} windows)",
                        cl * 1000.0,
                        t.latency_increase,
                        bl * 1000.0,
                        canary.latency_windows.len(),
                        baseline.latency_windows.len()
                    )),
                    None => problems.push(format!(
                        "p99 latency {:.0}ms is more than {:.1}x the baseline's {:.0}ms",
                        cl * 1000.0,
                        t.latency_increase,
                        bl * 1000.0
                    )),
                }
            }
        }
    }
    notes.extend(usage_notes);
    let sample = if has_baseline {
        format!(
            "sample: canary {:.0} requests, {} usage reports on {} node(s); baseline {:.0} requests, {} usage reports on {} node(s)",
            canary.requests,
            canary.usage_samples,
            canary.nodes,
            baseline.requests,
            baseline.usage_samples,
            baseline.nodes
        )
    } else {
        format!(
            "sample: canary {:.0} requests, {} usage reports on {} node(s); no baseline",
            canary.requests, canary.usage_samples, canary.nodes
        )
    };
    if !problems.is_empty() {
        (
            Outcome::Failed,
            format!("{}; {sample}", problems.join("; ")),
        )
    } else if !enough {
        let short = if canary.requests < min {
            "canary"
        } else {
            "baseline"
        };
        (
            Outcome::Inconclusive,
            format!(
                "inconclusive: {short} served fewer than the {} requests needed; {}{sample}",
                t.min_requests,
                notes.iter().map(|n| format!("{n}; ")).collect::<String>()
            ),
        )
    } else if notes.is_empty() {
        (
            Outcome::Passed,
            format!("no metrics worse than the baseline; {sample}"),
        )
    } else {
        (Outcome::Passed, format!("{}; {sample}", notes.join(", ")))
    }
}

/// "approved by alice: CHG-42 reviewed", or "approved by alice" without a reason.
fn by_with_reason(verb: &str, by: &str, reason: &str) -> String {
    if reason.is_empty() {
        format!("{verb} by {by}")
    } else {
        format!("{verb} by {by}: {reason}")
    }
}

fn pct(rate: Option<f64>) -> String {
    rate.map_or_else(|| "n/a".to_string(), |r| format!("{:.2}%", r * 100.0))
}

impl Deployment {
    /// A new deployment over `targets` (node id, name, current version),
    /// ordered by name. Starts right away unless it needs an approval.
    pub fn new(
        spec: Spec,
        targets: Vec<(String, String, String)>,
        now: Ms,
    ) -> (Deployment, Vec<Action>) {
        Self::new_in(spec, targets, now, &Window::Open)
    }

    /// [`Deployment::new`] under the environment's deployment windows: a
    /// deployment created outside every window is created, and waits
    /// paused before it starts.
    pub fn new_in(
        spec: Spec,
        mut targets: Vec<(String, String, String)>,
        now: Ms,
        window: &Window,
    ) -> (Deployment, Vec<Action>) {
        targets.sort_by(|a, b| a.1.cmp(&b.1).then(a.0.cmp(&b.0)));
        let waves = plan_waves(&spec.strategy, targets.len());
        let mut nodes: Vec<NodeTrack> = targets
            .into_iter()
            .map(|(node, name, from_version)| NodeTrack {
                node,
                name,
                from_version,
                state: NodeState::Waiting,
                since_ms: now,
                reason: String::new(),
                wave: 0,
                touched: false,
                failure_kind: None,
            })
            .collect();
        for (w, members) in waves.iter().enumerate() {
            for &i in members {
                nodes[i].wave = w;
            }
        }
        let deployment = Deployment {
            state: if spec.require_approval {
                State::AwaitingApproval
            } else {
                State::Pending
            },
            spec,
            nodes,
            waves: waves.len(),
            wave: 0,
            wave_started_ms: now,
            hold_since_ms: None,
            switched: false,
            awaiting_promote: false,
            paused_from: None,
            waiting_since_ms: None,
            window_wait: None,
            reason: String::new(),
            approved_by: String::new(),
            created_ms: now,
            finished_ms: None,
            analysis: Vec::new(),
        };
        if deployment.state == State::AwaitingApproval {
            return (deployment, vec![Action::Note(Note::AwaitingApproval)]);
        }
        deployment.start(now, window)
    }

    /// Hold at a wave boundary until a window opens: `paused` with the
    /// reason, not timed by the pause timeout.
    fn hold_for_window(&mut self, resume: WindowResume, reason: &str) -> Vec<Action> {
        self.paused_from = Some(State::Running);
        self.state = State::Paused;
        self.window_wait = Some(resume);
        self.waiting_since_ms = None;
        self.reason = reason.to_string();
        vec![Action::Note(Note::WindowClosed {
            reason: reason.to_string(),
        })]
    }

    fn start(mut self, now: Ms, window: &Window) -> (Deployment, Vec<Action>) {
        if self.nodes.is_empty() {
            self.state = State::Succeeded;
            self.finished_ms = Some(now);
            self.reason = "no target nodes".into();
            return (self, vec![Action::Note(Note::NoTargets)]);
        }
        if let Window::Closed(reason) = window {
            let actions = self.hold_for_window(WindowResume::Start, reason);
            return (self, actions);
        }
        self.state = State::Running;
        let mut actions = Vec::new();
        if matches!(self.spec.strategy, Strategy::BlueGreen { .. }) {
            for node in &mut self.nodes {
                node.state = NodeState::Staging;
                node.since_ms = now;
                node.touched = true;
                actions.push(Action::Stage {
                    node: node.node.clone(),
                    active: node.from_version.clone(),
                    staged: self.spec.version.clone(),
                });
            }
            self.wave_started_ms = now;
            actions.push(Action::Note(Note::Staging {
                version: self.spec.version.clone(),
                nodes: self.nodes.len(),
            }));
        } else {
            actions.extend(self.begin_wave(0, now));
        }
        (self, actions)
    }

    fn begin_wave(&mut self, wave: usize, now: Ms) -> Vec<Action> {
        self.wave = wave;
        self.wave_started_ms = now;
        self.hold_since_ms = None;
        self.awaiting_promote = false;
        let mut actions = Vec::new();
        for node in self
            .nodes
            .iter_mut()
            .filter(|n| n.wave == wave && n.state == NodeState::Waiting)
        {
            node.state = NodeState::Updating;
            node.since_ms = now;
            node.touched = true;
            actions.push(Action::SetVersion {
                node: node.node.clone(),
                version: self.spec.version.clone(),
            });
        }
        actions.push(Action::Note(Note::WaveStarted {
            wave: wave + 1,
            waves: self.waves,
            nodes: actions.len(),
            version: self.spec.version.clone(),
        }));
        actions
    }

    /// Release failures: what counts against `max_failures`.
    pub fn failures(&self) -> u32 {
        self.nodes.iter().filter(|n| n.counts_as_failure()).count() as u32
    }

    /// Nodes that failed for reasons of their own, not the release's.
    pub fn infrastructure_failures(&self) -> u32 {
        self.nodes
            .iter()
            .filter(|n| n.state.is_failure() && n.failure_kind == Some(FailureKind::Infrastructure))
            .count() as u32
    }

    /// In words, what the deployment waits for.
    pub fn waiting_for(&self, now: Ms) -> String {
        match self.state {
            State::AwaitingApproval => "approval by a second person".into(),
            State::Paused if self.window_wait.is_some() => {
                format!("a deployment window: {}", self.reason)
            }
            State::Paused => "resume".into(),
            State::RollingBack => "nodes to return to their previous version".into(),
            State::Running if self.awaiting_promote => "deploy promote".into(),
            State::Running => match (&self.spec.strategy, self.hold_since_ms) {
                (Strategy::BlueGreen { .. }, _) if !self.switched => {
                    "all nodes to stage the new version".into()
                }
                (
                    Strategy::Rolling {
                        min_healthy_ms: hold,
                        ..
                    },
                    Some(since),
                )
                | (Strategy::BlueGreen { bake_ms: hold }, Some(since))
                | (Strategy::Canary { step_ms: hold, .. }, Some(since)) => {
                    format!(
                        "{}s more of healthy wave {}",
                        (since + hold).saturating_sub(now) / 1000,
                        self.wave + 1
                    )
                }
                _ => format!("wave {} to become healthy", self.wave + 1),
            },
            _ => String::new(),
        }
    }

    pub fn step(&self, now: Ms, input: &Input) -> Result<(Deployment, Vec<Action>), Refusal> {
        self.step_in(now, input, &Window::Open)
    }

    /// [`Deployment::step`] under the environment's deployment windows:
    /// outside every window, no wave begins; the deployment waits at the
    /// boundary, paused with the reason, and goes on in the first step
    /// that finds a window open.
    pub fn step_in(
        &self,
        now: Ms,
        input: &Input,
        window: &Window,
    ) -> Result<(Deployment, Vec<Action>), Refusal> {
        let mut next = self.clone();
        let actions = match input {
            Input::Control(control) => next.control(now, control, window)?,
            Input::Observe { nodes, analysis } => {
                next.observe(now, nodes, analysis.as_ref(), window)
            }
        };
        Ok((next, actions))
    }

    fn finish(&mut self, state: State, reason: String, now: Ms) -> Vec<Action> {
        self.window_wait = None;
        self.state = state;
        self.finished_ms = Some(now);
        self.awaiting_promote = false;
        self.waiting_since_ms = None;
        self.reason = reason.clone();
        vec![Action::Note(Note::Finished { state, reason })]
    }

    fn control(
        &mut self,
        now: Ms,
        control: &Control,
        window: &Window,
    ) -> Result<Vec<Action>, Refusal> {
        let state = self.state;
        let refuse = |what: &'static str| Err(Refusal::WrongState { what, state });
        match control {
            Control::Approve { by, reason } => {
                if state != State::AwaitingApproval {
                    return refuse("approve");
                }
                if by == &self.spec.created_by {
                    return Err(Refusal::OwnApproval { by: by.clone() });
                }
                self.approved_by = by.clone();
                let (started, mut actions) = self.clone().start(now, window);
                *self = started;
                actions.insert(
                    0,
                    Action::Note(Note::Approved {
                        by: by.clone(),
                        reason: reason.clone(),
                    }),
                );
                Ok(actions)
            }
            Control::Reject { by, reason } => {
                if state != State::AwaitingApproval {
                    return refuse("reject");
                }
                Ok(self.finish(State::Aborted, by_with_reason("rejected", by, reason), now))
            }
            Control::Pause => {
                if state != State::Running {
                    return refuse("pause");
                }
                self.paused_from = Some(state);
                self.state = State::Paused;
                self.waiting_since_ms = Some(now);
                Ok(vec![Action::Note(Note::Paused)])
            }
            Control::Resume => {
                if state != State::Paused {
                    return refuse("resume");
                }
                if self.window_wait.is_some() {
                    return Err(Refusal::OutsideWindow {
                        reason: self.reason.clone(),
                    });
                }
                self.state = self.paused_from.take().unwrap_or(State::Running);
                // A promote wait that the pause interrupted starts over.
                self.waiting_since_ms = self.awaiting_promote.then_some(now);
                // Deadlines do not count the paused time against the wave.
                self.wave_started_ms = now;
                for node in self
                    .nodes
                    .iter_mut()
                    .filter(|n| n.state == NodeState::Updating || n.state == NodeState::Staging)
                {
                    node.since_ms = now;
                }
                Ok(vec![Action::Note(Note::Resumed)])
            }
            Control::Promote => {
                if state != State::Running || !self.awaiting_promote {
                    return Err(Refusal::NothingToPromote { state });
                }
                self.awaiting_promote = false;
                self.waiting_since_ms = None;
                Ok(self.advance(now, window))
            }
            Control::Abort { reason } => {
                if state.is_terminal() || state == State::RollingBack {
                    return refuse("abort");
                }
                Ok(self.finish(State::Aborted, format!("aborted: {reason}"), now))
            }
            Control::Rollback { reason } => {
                if matches!(
                    state,
                    State::Pending
                        | State::AwaitingApproval
                        | State::RollingBack
                        | State::RolledBack
                ) {
                    return refuse("roll back");
                }
                if !self.nodes.iter().any(|n| n.touched) {
                    return Err(Refusal::NothingToRollBack);
                }
                Ok(self.begin_rollback(format!("manual rollback: {reason}"), now))
            }
            Control::Yanked { by, reason } => {
                if state.is_terminal() || state == State::RollingBack {
                    return refuse("stop");
                }
                let why = format!("version yanked by {by}: {reason}");
                if self.nodes.iter().any(|n| n.touched) {
                    Ok(self.begin_rollback(why, now))
                } else {
                    Ok(self.finish(State::Aborted, format!("aborted: {why}"), now))
                }
            }
        }
    }

    fn begin_rollback(&mut self, reason: String, now: Ms) -> Vec<Action> {
        self.window_wait = None;
        self.state = State::RollingBack;
        self.reason = reason.clone();
        self.awaiting_promote = false;
        self.waiting_since_ms = None;
        self.finished_ms = None;
        let mut actions = vec![Action::Note(Note::RollingBack {
            reason: reason.clone(),
        })];
        for node in self.nodes.iter_mut().filter(|n| n.touched) {
            node.state = NodeState::RollingBack;
            node.since_ms = now;
            actions.push(Action::SetVersion {
                node: node.node.clone(),
                version: node.from_version.clone(),
            });
        }
        actions
    }

    /// Start the next wave, or finish when none is left. Nodes that failed
    /// on infrastructure are left marked; if no node at all runs the new
    /// version, nothing proved the release good or bad: the deployment
    /// fails without a rollback.
    fn advance(&mut self, now: Ms, window: &Window) -> Vec<Action> {
        if self.wave + 1 < self.waves {
            if let Window::Closed(reason) = window {
                return self.hold_for_window(WindowResume::Wave(self.wave + 1), reason);
            }
            return self.begin_wave(self.wave + 1, now);
        }
        let failed = self.failures();
        let infrastructure: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.state.is_failure() && n.failure_kind == Some(FailureKind::Infrastructure))
            .map(|n| format!("{} ({})", n.name, n.reason))
            .collect();
        let healthy = self
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Healthy)
            .count();
        if healthy == 0 && !infrastructure.is_empty() {
            return self.finish(
                State::Failed,
                format!(
                    "infrastructure: no node could be updated to {}: {}",
                    self.spec.version,
                    infrastructure.join(", ")
                ),
                now,
            );
        }
        let mut reason = format!("{healthy} node(s) run {}", self.spec.version);
        if failed == 0 && infrastructure.is_empty() {
            reason = format!("all {} node(s) run {}", self.nodes.len(), self.spec.version);
        }
        if failed > 0 {
            reason.push_str(&format!(
                ", {failed} release failure(s) (within the budget of {})",
                self.spec.max_failures
            ));
        }
        if !infrastructure.is_empty() {
            reason.push_str(&format!(
                ", {} infrastructure failure(s) not counted against the release: {}",
                infrastructure.len(),
                infrastructure.join(", ")
            ));
        }
        self.finish(State::Succeeded, reason, now)
    }

    fn observe(
        &mut self,
        now: Ms,
        reports: &Reports,
        analysis: Option<&Analysis>,
        window: &Window,
    ) -> Vec<Action> {
        let mut actions = Vec::new();
        match self.state {
            State::Running | State::Paused => {}
            State::RollingBack => return self.observe_rollback(now, reports),
            State::AwaitingApproval => {
                let timeout = self.spec.approval_timeout_ms;
                if timeout > 0 && now.saturating_sub(self.created_ms) >= timeout {
                    return self.finish(
                        State::Aborted,
                        format!(
                            "approval expired: nobody approved within {}",
                            hotswap_common::timefmt::human_age(timeout)
                        ),
                        now,
                    );
                }
                return actions;
            }
            _ => return actions,
        }
        let target = self.spec.version.clone();
        let deadline = self.spec.health_deadline_ms;
        for node in &mut self.nodes {
            // Only the states that read a report look one up: in a large
            // rollout most nodes wait, and a lookup was most of the step.
            let report = if node.state.reads_report() {
                reports.get(&node.node).unwrap_or(&NO_REPORT)
            } else {
                &NO_REPORT
            };
            observe_node(node, report, &target, deadline, now);
        }
        let failures = self.failures();
        if failures > self.spec.max_failures {
            let failed: Vec<String> = self
                .nodes
                .iter()
                .filter(|n| n.counts_as_failure())
                .map(|n| format!("{} ({})", n.name, n.reason))
                .collect();
            let reason = format!(
                "{failures} release failure(s), more than the {} allowed: {}",
                self.spec.max_failures,
                failed.join(", ")
            );
            return self.fail(reason, now);
        }
        let timeout = self.spec.pause_timeout_ms;
        if timeout > 0
            && (self.state == State::Paused || self.awaiting_promote)
            && let Some(since) = self.waiting_since_ms
            && now.saturating_sub(since) >= timeout
        {
            let what = if self.state == State::Paused {
                "paused"
            } else {
                "waiting for deploy promote"
            };
            let reason = format!(
                "{what} for longer than the {} pause timeout",
                hotswap_common::timefmt::human_age(timeout)
            );
            return self.fail(reason, now);
        }
        if self.state == State::Paused
            && let Some(resume) = self.window_wait
        {
            return self.window_held(now, resume, window);
        }
        if self.state == State::Paused {
            return actions;
        }
        match self.spec.strategy.clone() {
            Strategy::BlueGreen { bake_ms } => {
                if !self.switched {
                    let pending = self.nodes.iter().any(|n| n.state == NodeState::Staging);
                    if pending {
                        return self.check_progress(now);
                    }
                    self.switched = true;
                    self.wave_started_ms = now;
                    for node in self
                        .nodes
                        .iter_mut()
                        .filter(|n| n.state == NodeState::Staged)
                    {
                        node.state = NodeState::Updating;
                        node.since_ms = now;
                        actions.push(Action::SetVersion {
                            node: node.node.clone(),
                            version: target.clone(),
                        });
                    }
                    actions.push(Action::Note(Note::Switching {
                        nodes: actions.len(),
                    }));
                    return actions;
                }
                if self.nodes.iter().any(|n| n.state == NodeState::Updating) {
                    return self.check_progress(now);
                }
                let since = *self.hold_since_ms.get_or_insert(now);
                if now.saturating_sub(since) >= bake_ms {
                    actions.extend(self.advance(now, window));
                }
            }
            Strategy::Direct | Strategy::Rolling { .. } | Strategy::Canary { .. } => {
                let wave = self.wave;
                if self
                    .nodes
                    .iter()
                    .any(|n| n.wave == wave && n.state == NodeState::Updating)
                {
                    return self.check_progress(now);
                }
                let hold = match &self.spec.strategy {
                    Strategy::Rolling { min_healthy_ms, .. } => *min_healthy_ms,
                    // Every step is held, the last (100 %) one too.
                    Strategy::Canary { step_ms, .. } => *step_ms,
                    _ => 0,
                };
                let since = *self.hold_since_ms.get_or_insert(now);
                let held = now.saturating_sub(since);
                if let (Strategy::Canary { .. }, Some(analysis)) = (&self.spec.strategy, analysis) {
                    let (outcome, summary) = judge(&self.spec.thresholds, analysis);
                    let step = wave + 1;
                    let noted = self
                        .analysis
                        .iter()
                        .any(|v| v.step == wave && v.outcome == Outcome::Inconclusive);
                    let mut record = |outcome: Outcome, summary: String| {
                        self.analysis.push(Verdict {
                            at_ms: now,
                            step: wave,
                            passed: outcome != Outcome::Failed,
                            outcome,
                            summary,
                            analysis: analysis.clone(),
                        });
                    };
                    match outcome {
                        Outcome::Failed => {
                            record(outcome, summary.clone());
                            return self.fail(
                                format!("canary analysis failed at step {step}: {summary}"),
                                now,
                            );
                        }
                        _ if self.awaiting_promote || held < hold => return actions,
                        Outcome::Passed | Outcome::HealthOnly => {
                            record(Outcome::Passed, summary.clone());
                            actions.push(Action::Note(Note::AnalysisPassed { step, summary }));
                        }
                        Outcome::Inconclusive if held < hold.saturating_mul(3) => {
                            if !noted {
                                record(Outcome::Inconclusive, summary.clone());
                                actions.push(Action::Note(Note::AnalysisHolding {
                                    step,
                                    summary,
                                    up_to_ms: hold.saturating_mul(3),
                                }));
                            }
                            return actions;
                        }
                        Outcome::Inconclusive => {
                            let summary = format!(
                                "still too little traffic after {}, judged on health alone: healthy; {}",
                                hotswap_common::timefmt::human_age(held),
                                summary.trim_start_matches("inconclusive: ")
                            );
                            record(Outcome::HealthOnly, summary.clone());
                            actions.push(Action::Note(Note::AnalysisHealthOnly { step, summary }));
                        }
                    }
                }
                if self.awaiting_promote || held < hold {
                    return actions;
                }
                if let Strategy::Canary {
                    manual_promote: true,
                    ..
                } = self.spec.strategy
                    && self.wave + 1 < self.waves
                {
                    self.awaiting_promote = true;
                    self.waiting_since_ms = Some(now);
                    actions.push(Action::Note(Note::AwaitingPromote { step: wave + 1 }));
                    return actions;
                }
                actions.extend(self.advance(now, window));
            }
        }
        actions
    }

    /// A step of a deployment held by a closed window: when a window is
    /// open, carry on where it stopped; while closed, keep the reason
    /// current (the next opening it names may move).
    fn window_held(&mut self, now: Ms, resume: WindowResume, window: &Window) -> Vec<Action> {
        match window {
            Window::Closed(reason) => {
                if self.reason != *reason {
                    self.reason = reason.clone();
                }
                Vec::new()
            }
            Window::Open => {
                self.window_wait = None;
                self.paused_from = None;
                self.state = State::Running;
                self.reason.clear();
                let mut actions = vec![Action::Note(Note::WindowOpened)];
                match resume {
                    WindowResume::Start => {
                        let (started, started_actions) = self.clone().start(now, window);
                        *self = started;
                        actions.extend(started_actions);
                    }
                    WindowResume::Wave(wave) => actions.extend(self.begin_wave(wave, now)),
                }
                actions
            }
        }
    }

    /// The desired state every node should have now, for re-asserting after a
    /// restart (actions lost between the persist and the act). Idempotent.
    pub fn expected_desired(&self) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.state.is_terminal() && self.state != State::RolledBack {
            return actions;
        }
        for node in &self.nodes {
            match node.state {
                NodeState::Staging | NodeState::Staged if !self.switched => {
                    actions.push(Action::Stage {
                        node: node.node.clone(),
                        active: node.from_version.clone(),
                        staged: self.spec.version.clone(),
                    })
                }
                NodeState::Updating | NodeState::Healthy => actions.push(Action::SetVersion {
                    node: node.node.clone(),
                    version: self.spec.version.clone(),
                }),
                NodeState::RollingBack | NodeState::RolledBack => {
                    actions.push(Action::SetVersion {
                        node: node.node.clone(),
                        version: node.from_version.clone(),
                    })
                }
                _ => {}
            }
        }
        actions
    }

    fn check_progress(&mut self, now: Ms) -> Vec<Action> {
        if now.saturating_sub(self.wave_started_ms) > self.spec.progress_deadline_ms {
            let reason = format!(
                "wave {} made no progress within the {}s progress deadline",
                self.wave + 1,
                self.spec.progress_deadline_ms / 1000
            );
            return self.fail(reason, now);
        }
        Vec::new()
    }

    fn fail(&mut self, reason: String, now: Ms) -> Vec<Action> {
        if self.spec.auto_rollback && self.nodes.iter().any(|n| n.touched) {
            self.begin_rollback(reason, now)
        } else {
            self.finish(State::Failed, reason, now)
        }
    }

    fn observe_rollback(&mut self, now: Ms, reports: &Reports) -> Vec<Action> {
        let deadline = self.spec.health_deadline_ms;
        for node in self
            .nodes
            .iter_mut()
            .filter(|n| n.state == NodeState::RollingBack)
        {
            let report = reports.get(&node.node).unwrap_or(&NO_REPORT);
            // Back only once the agent acted on the rollback and no other
            // version of the module (the abandoned one in its health gate,
            // or draining) still starts, stops or serves there.
            let back = report.connected
                && report.current
                && report.settling.is_empty()
                && ((node.from_version.is_empty() && report.version.is_empty())
                    || (report.version == node.from_version && report.phase == Phase::Running));
            if back {
                node.state = NodeState::RolledBack;
                node.since_ms = now;
            } else if now.saturating_sub(node.since_ms) > deadline {
                node.state = NodeState::Lost;
                node.failure_kind = Some(FailureKind::Infrastructure);
                node.reason = format!(
                    "did not return to {:?} within the {}s health deadline",
                    node.from_version,
                    deadline / 1000
                );
            }
        }
        if self.nodes.iter().any(|n| n.state == NodeState::RollingBack) {
            return Vec::new();
        }
        let lost = self
            .nodes
            .iter()
            .filter(|n| n.touched && n.state == NodeState::Lost)
            .count();
        let reason = if lost == 0 {
            self.reason.clone()
        } else {
            format!(
                "{}; {lost} node(s) could not be confirmed back",
                self.reason
            )
        };
        self.finish(State::RolledBack, reason, now)
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "machine_window_tests.rs"]
mod window_tests;
