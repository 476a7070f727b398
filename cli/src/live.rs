//! The live view of a deployment on a terminal: one bar for the whole
//! deployment, one per wave with its nodes' states, and a line printed above
//! them for each state change and analysis verdict. It draws on stderr, so
//! stdout keeps only the final summary line; without a terminal the plain
//! timestamped lines are used instead (see `deploy::watch`).

use std::io::IsTerminal;

use hotswap_common::model::DeploymentView;
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Whether to draw the live view: both streams on a terminal.
pub fn wanted() -> bool {
    std::io::stdout().is_terminal() && std::io::stderr().is_terminal()
}

pub struct LiveView {
    multi: MultiProgress,
    overall: ProgressBar,
    waves: Vec<ProgressBar>,
    verdicts_shown: usize,
    state: String,
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ")
}

/// The message of wave `wave`'s bar: its nodes and their states.
pub fn wave_message(view: &DeploymentView, wave: u32) -> String {
    let nodes: Vec<String> = view
        .nodes
        .iter()
        .filter(|n| n.wave == wave)
        .map(|n| format!("{} {}", n.node, n.state))
        .collect();
    let status = if wave < view.wave {
        "done"
    } else if wave == view.wave && !view.is_terminal() {
        "current"
    } else if view.is_terminal() && wave <= view.wave {
        "ended"
    } else {
        "waiting"
    };
    format!("{status:<7} {}", nodes.join(", "))
}

/// The message of the overall bar: state and what it waits for.
pub fn overall_message(view: &DeploymentView) -> String {
    let mut text = format!(
        "{} {}@{} -> {} ({}) {}",
        view.id, view.module, view.version, view.environment, view.strategy, view.state
    );
    if !view.waiting_for.is_empty() {
        text.push_str(&format!(", waiting for {}", view.waiting_for));
    }
    text
}

fn healthy_in(view: &DeploymentView, wave: u32) -> (u64, u64) {
    let nodes = view.nodes.iter().filter(|n| n.wave == wave);
    let total = nodes.clone().count() as u64;
    let healthy = nodes.filter(|n| n.state == "healthy").count() as u64;
    (healthy, total)
}

impl LiveView {
    pub fn new(view: &DeploymentView) -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let overall = multi.add(
            ProgressBar::new(u64::from(view.progress.total))
                .with_style(style("{spinner} [{bar:30}] {pos}/{len} healthy  {msg}")),
        );
        overall.enable_steady_tick(std::time::Duration::from_millis(200));
        let waves = (0..view.waves.max(1))
            .map(|w| {
                let (_, total) = healthy_in(view, w);
                multi.add(ProgressBar::new(total).with_style(style(&format!(
                    "  wave {}/{} [{{bar:20}}] {{pos}}/{{len}}  {{msg}}",
                    w + 1,
                    view.waves.max(1)
                ))))
            })
            .collect();
        let mut live = Self {
            multi,
            overall,
            waves,
            verdicts_shown: 0,
            state: String::new(),
        };
        live.update(view);
        live
    }

    pub fn update(&mut self, view: &DeploymentView) {
        if view.state != self.state {
            if !self.state.is_empty() {
                let _ = self
                    .multi
                    .println(format!("state: {} -> {}", self.state, view.state));
            }
            self.state = view.state.clone();
        }
        for verdict in view.analysis.iter().skip(self.verdicts_shown) {
            let _ = self.multi.println(format!(
                "analysis step {}: {}: {}",
                verdict.step,
                crate::output::verdict_word(verdict),
                verdict.summary
            ));
        }
        self.verdicts_shown = view.analysis.len();
        self.overall
            .set_length(u64::from(view.progress.total.max(1)));
        self.overall.set_position(u64::from(view.progress.healthy));
        self.overall.set_message(overall_message(view));
        for (w, bar) in self.waves.iter().enumerate() {
            let (healthy, total) = healthy_in(view, w as u32);
            bar.set_length(total.max(1));
            bar.set_position(healthy);
            bar.set_message(wave_message(view, w as u32));
        }
    }

    /// Leave the bars on screen as they ended.
    pub fn finish(self) {
        self.overall.finish();
        for bar in self.waves {
            bar.finish();
        }
    }
}

/// The live view of a pipeline: one line per stage, the running stage with
/// its deployment's progress.
pub struct PipelineView {
    _multi: MultiProgress,
    stages: Vec<ProgressBar>,
}

/// A stage's line: environment, state, and for the running one its
/// deployment's wave and health.
pub fn stage_message(
    environment: &str,
    state: &str,
    deployment_id: &str,
    deployment: Option<&DeploymentView>,
) -> String {
    let mut text = format!("{environment:<12} {state}");
    if !deployment_id.is_empty() {
        text.push_str(&format!(" ({deployment_id})"));
    }
    if let Some(d) = deployment.filter(|d| d.id == deployment_id) {
        text.push_str(&format!(
            ": {} wave {}/{}, {}/{} healthy",
            d.state,
            (d.wave + 1).min(d.waves.max(1)),
            d.waves.max(1),
            d.progress.healthy,
            d.progress.total
        ));
        if !d.waiting_for.is_empty() {
            text.push_str(&format!(", waiting for {}", d.waiting_for));
        }
    }
    text
}

impl PipelineView {
    pub fn new(stages: usize) -> Self {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let stages = (0..stages)
            .map(|_| {
                let bar = multi.add(
                    ProgressBar::new_spinner().with_style(
                        ProgressStyle::with_template("{spinner} {msg}")
                            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                    ),
                );
                bar.enable_steady_tick(std::time::Duration::from_millis(200));
                bar
            })
            .collect();
        Self {
            _multi: multi,
            stages,
        }
    }

    /// Set each stage's line; `(environment, state, deployment id)`.
    pub fn update(&self, stages: &[(String, String, String)], running: Option<&DeploymentView>) {
        for (bar, (env, state, id)) in self.stages.iter().zip(stages) {
            bar.set_message(stage_message(env, state, id, running));
            if matches!(
                state.as_str(),
                "succeeded" | "failed" | "skipped" | "rolled_back" | "aborted"
            ) {
                bar.finish();
            }
        }
    }

    pub fn finish(self) {
        for bar in self.stages {
            bar.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hotswap_common::model::{DeploymentNodeView, ProgressView};

    fn view(state: &str, wave: u32, nodes: &[(&str, u32, &str)]) -> DeploymentView {
        DeploymentView {
            id: "d-1".into(),
            module: "web".into(),
            version: "2.0.0".into(),
            environment: "prod".into(),
            strategy: "canary".into(),
            state: state.into(),
            progress: ProgressView {
                total: nodes.len() as u32,
                updated: 0,
                healthy: 0,
                failed: 0,
            },
            nodes: nodes
                .iter()
                .map(|(n, w, s)| DeploymentNodeView {
                    node: n.to_string(),
                    from_version: "1.0.0".into(),
                    to_version: "2.0.0".into(),
                    state: s.to_string(),
                    reason: String::new(),
                    wave: *w,
                    failure_kind: None,
                })
                .collect(),
            created_by: "alice".into(),
            created_at: None,
            finished_at: None,
            reason: String::new(),
            wave,
            waves: 2,
            analysis: Vec::new(),
            approved_by: String::new(),
            waiting_for: "wave 2 to become healthy".into(),
            max_error_rate: None,
            max_latency_increase: None,
        }
    }

    #[test]
    fn pipeline_stages_show_the_running_deployment() {
        let d = view("running", 0, &[("a", 0, "updating"), ("b", 1, "waiting")]);
        assert_eq!(
            stage_message("dev", "succeeded", "d-0", Some(&d)),
            "dev          succeeded (d-0)"
        );
        assert_eq!(
            stage_message("qa", "running", "d-1", Some(&d)),
            "qa           running (d-1): running wave 1/2, 0/2 healthy, waiting for wave 2 to become healthy"
        );
        assert_eq!(
            stage_message("prod", "waiting", "", None),
            "prod         waiting"
        );
    }

    #[test]
    fn waves_show_their_nodes_and_where_the_deployment_is() {
        let v = view(
            "running",
            1,
            &[
                ("a", 0, "healthy"),
                ("b", 1, "updating"),
                ("c", 1, "healthy"),
            ],
        );
        assert_eq!(wave_message(&v, 0), "done    a healthy");
        assert_eq!(wave_message(&v, 1), "current b updating, c healthy");
        assert_eq!(healthy_in(&v, 1), (1, 2));
        assert_eq!(
            overall_message(&v),
            "d-1 web@2.0.0 -> prod (canary) running, waiting for wave 2 to become healthy"
        );
        let ended = view(
            "rolled_back",
            0,
            &[("a", 0, "rolled_back"), ("b", 1, "waiting")],
        );
        assert_eq!(wave_message(&ended, 0), "ended   a rolled_back");
        assert_eq!(wave_message(&ended, 1), "waiting b waiting");
    }
}
