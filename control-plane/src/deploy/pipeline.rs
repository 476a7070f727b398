//! Pipelines: one version promoted through the environments, stage by
//! stage. Pure: the engine asks a running pipeline what it wants
//! ([`PipelineRecord::next`]), does it (starts a stage's deployment, looks
//! a deployment up) and hands back what happened
//! ([`PipelineRecord::stage_started`], [`PipelineRecord::stage_observed`]).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::machine::{Ms, State};

/// Where a pipeline is. Stored as its lowercase word, as the strings it
/// replaced were, so records written before read the same.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PipelineState {
    Running,
    Succeeded,
    Failed,
    /// Stopped by an operator (`pipeline abort`): its running stage's
    /// deployment was aborted and no later stage starts.
    Aborted,
}

impl PipelineState {
    pub fn as_str(self) -> &'static str {
        match self {
            PipelineState::Running => "running",
            PipelineState::Succeeded => "succeeded",
            PipelineState::Failed => "failed",
            PipelineState::Aborted => "aborted",
        }
    }
}

/// Where one stage of a pipeline is (stored as its lowercase word).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StageState {
    /// Not started: an earlier stage runs, or it waits for a connected node
    /// or for another deployment of the module there.
    Waiting,
    Running,
    Succeeded,
    Failed,
    /// The environment has no nodes at all.
    Skipped,
    /// The stage that was running or waiting when the pipeline was aborted.
    Aborted,
}

impl StageState {
    pub fn as_str(self) -> &'static str {
        match self {
            StageState::Waiting => "waiting",
            StageState::Running => "running",
            StageState::Succeeded => "succeeded",
            StageState::Failed => "failed",
            StageState::Skipped => "skipped",
            StageState::Aborted => "aborted",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineStage {
    pub environment: String,
    pub deployment_id: String,
    pub state: StageState,
    pub reason: String,
    /// Since when the stage waits for a connected node in its environment
    /// (bounded by `pipeline_wait_timeout`).
    #[serde(default)]
    pub waiting_since_ms: Option<u64>,
}

/// One version promoted through the environments, stage by stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineRecord {
    pub id: String,
    pub module: String,
    pub version: String,
    pub state: PipelineState,
    pub stages: Vec<PipelineStage>,
    pub reason: String,
    pub created_by: String,
    pub created_ms: u64,
    pub finished_ms: Option<u64>,
    /// Stages may deploy a version older than their environment's current one.
    #[serde(default)]
    pub allow_downgrade: bool,
    /// Stages start in frozen environments (an admin's --override-freeze).
    #[serde(default)]
    pub override_freeze: bool,
}

/// What a running pipeline needs the engine to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing: the pipeline is not running (it may just have succeeded).
    Nothing,
    /// Start the deployment of stage `stage` to `environment`.
    Start { stage: usize, environment: String },
    /// Look up deployment `deployment_id` of stage `stage`.
    Watch { stage: usize, deployment_id: String },
}

/// What became of the engine's attempt to start a stage's deployment.
/// `reason` is the refusal as the user reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StageStart {
    Started {
        deployment_id: String,
    },
    /// Only planned (a dry run): nothing changes.
    Planned,
    /// The environment has no node at all: the stage is skipped.
    NoNodes {
        reason: String,
    },
    /// Every node there is disconnected: the stage waits, up to a limit.
    AllDisconnected {
        reason: String,
    },
    /// Another deployment of the module runs there: the stage waits for it.
    Busy {
        reason: String,
    },
    /// Any other refusal fails the stage and the pipeline.
    Refused {
        reason: String,
    },
}

impl PipelineRecord {
    /// A new pipeline of `module@version` through `environments`, in order.
    pub fn new(
        id: String,
        module: &str,
        version: &str,
        environments: &[String],
        allow_downgrade: bool,
        user: &str,
        now: Ms,
    ) -> Self {
        PipelineRecord {
            id,
            module: module.to_string(),
            version: version.to_string(),
            state: PipelineState::Running,
            stages: environments
                .iter()
                .map(|env| PipelineStage {
                    environment: env.clone(),
                    deployment_id: String::new(),
                    state: StageState::Waiting,
                    reason: String::new(),
                    waiting_since_ms: None,
                })
                .collect(),
            reason: String::new(),
            created_by: user.to_string(),
            created_ms: now,
            finished_ms: None,
            allow_downgrade,
            override_freeze: false,
        }
    }

    /// What the engine should do for the pipeline now. A pipeline whose
    /// stages are all done succeeds here.
    pub fn next(&mut self, now: Ms) -> Next {
        if self.state != PipelineState::Running {
            return Next::Nothing;
        }
        let Some(stage) = self
            .stages
            .iter()
            .position(|s| matches!(s.state, StageState::Waiting | StageState::Running))
        else {
            self.state = PipelineState::Succeeded;
            self.reason = format!(
                "{}@{} promoted through {}",
                self.module,
                self.version,
                self.stages
                    .iter()
                    .map(|s| s.environment.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            self.finished_ms = Some(now);
            return Next::Nothing;
        };
        let current = &self.stages[stage];
        if current.deployment_id.is_empty() {
            Next::Start {
                stage,
                environment: current.environment.clone(),
            }
        } else {
            Next::Watch {
                stage,
                deployment_id: current.deployment_id.clone(),
            }
        }
    }

    /// Take in what starting stage `stage` gave. A stage waiting for a
    /// connected node gives up after `wait_limit`.
    pub fn stage_started(
        &mut self,
        stage: usize,
        start: StageStart,
        now: Ms,
        wait_limit: Duration,
    ) {
        if self.state != PipelineState::Running {
            return;
        }
        let environment = self.stages[stage].environment.clone();
        let current = &mut self.stages[stage];
        match start {
            StageStart::Started { deployment_id } => {
                current.deployment_id = deployment_id;
                current.state = StageState::Running;
            }
            StageStart::Planned => {}
            // An environment without any node is skipped. One whose nodes
            // are all disconnected right now is waited for: skipping it
            // would promote a version past a stage it never passed.
            StageStart::NoNodes { reason } => {
                current.state = StageState::Skipped;
                current.reason = reason;
            }
            StageStart::AllDisconnected { reason } => {
                let since = *current.waiting_since_ms.get_or_insert(now);
                let limit = u64::try_from(wait_limit.as_millis()).unwrap_or(u64::MAX);
                if now.saturating_sub(since) >= limit {
                    let waited = hotswap_common::timefmt::human_age(limit);
                    current.state = StageState::Failed;
                    current.reason =
                        format!("gave up after {waited} (pipeline_wait_timeout): {reason}");
                    self.fail(
                        format!(
                            "stopped at {environment}: no connected node there for {waited} (pipeline_wait_timeout)"
                        ),
                        now,
                    );
                } else {
                    current.reason = format!("waiting: {reason}");
                }
            }
            StageStart::Busy { reason } => current.reason = reason,
            StageStart::Refused { reason } => {
                current.state = StageState::Failed;
                current.reason = reason.clone();
                self.fail(
                    format!("stage {environment} could not start: {reason}"),
                    now,
                );
            }
        }
    }

    /// Take in the state of stage `stage`'s deployment `deployment_id`
    /// (`reason` is the deployment's).
    pub fn stage_observed(
        &mut self,
        stage: usize,
        deployment_id: &str,
        state: State,
        reason: &str,
        now: Ms,
    ) {
        // An ended pipeline (aborted meanwhile) takes in nothing more.
        if self.state != PipelineState::Running {
            return;
        }
        let environment = self.stages[stage].environment.clone();
        let current = &mut self.stages[stage];
        match state {
            State::Succeeded => {
                current.state = StageState::Succeeded;
                current.reason = reason.to_string();
            }
            state if state.is_terminal() => {
                current.state = StageState::Failed;
                current.reason = format!("deployment {deployment_id} {}: {reason}", state.as_str());
                self.fail(
                    format!(
                        "stopped at {environment}: deployment {deployment_id} {}",
                        state.as_str()
                    ),
                    now,
                );
            }
            _ => {}
        }
    }

    /// The last environment the pipeline promotes to (its `--to`).
    pub fn target(&self) -> &str {
        self.stages.last().map_or("", |s| s.environment.as_str())
    }

    /// The deployment an abort must stop first: the one of the stage that
    /// runs now, if it started one. `None` for a pipeline that is not
    /// running, or whose current stage is still waiting to start.
    pub fn running_deployment(&self) -> Option<&str> {
        if self.state != PipelineState::Running {
            return None;
        }
        self.stages
            .iter()
            .find(|s| matches!(s.state, StageState::Waiting | StageState::Running))
            .map(|s| s.deployment_id.as_str())
            .filter(|id| !id.is_empty())
    }

    /// Stop a running pipeline (`pipeline abort`): the current stage is
    /// aborted, later stages stay waiting and never start. Returns false,
    /// changing nothing, when the pipeline is no longer running.
    pub fn abort(&mut self, reason: &str, now: Ms) -> bool {
        if self.state != PipelineState::Running {
            return false;
        }
        let Some(stage) = self
            .stages
            .iter_mut()
            .find(|s| matches!(s.state, StageState::Waiting | StageState::Running))
        else {
            // Every stage is done: it succeeded, whether or not a pass
            // said so yet.
            self.next(now);
            return false;
        };
        stage.state = StageState::Aborted;
        stage.reason = reason.to_string();
        self.reason = format!("aborted at {}: {reason}", stage.environment);
        self.state = PipelineState::Aborted;
        self.finished_ms = Some(now);
        true
    }

    fn fail(&mut self, reason: String, now: Ms) {
        self.state = PipelineState::Failed;
        self.reason = reason;
        self.finished_ms = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::{Just, any, prop, prop_assert, prop_assert_eq, prop_oneof, proptest};
    use proptest::strategy::Strategy as Gen;

    use super::*;

    const WAIT: Duration = Duration::from_secs(60);

    fn pipeline() -> PipelineRecord {
        let envs = ["dev", "qa", "prod"].map(String::from);
        PipelineRecord::new("p-1".into(), "web", "2.0.0", &envs, false, "alice", 0)
    }

    fn start(stage: usize, environment: &str) -> Next {
        Next::Start {
            stage,
            environment: environment.into(),
        }
    }

    #[test]
    fn stages_run_in_order_and_the_pipeline_succeeds() {
        let mut p = pipeline();
        assert_eq!(p.next(1), start(0, "dev"));
        p.stage_started(
            0,
            StageStart::Started {
                deployment_id: "d-1".into(),
            },
            1,
            WAIT,
        );
        assert_eq!(
            p.next(2),
            Next::Watch {
                stage: 0,
                deployment_id: "d-1".into()
            }
        );
        p.stage_observed(0, "d-1", State::Running, "", 2);
        assert_eq!(p.stages[0].state, StageState::Running);
        p.stage_observed(0, "d-1", State::Succeeded, "3 node(s) run 2.0.0", 3);
        assert_eq!(p.stages[0].reason, "3 node(s) run 2.0.0");
        assert_eq!(p.next(4), start(1, "qa"));
        p.stage_started(
            1,
            StageStart::NoNodes {
                reason: "no nodes".into(),
            },
            4,
            WAIT,
        );
        assert_eq!(p.stages[1].state, StageState::Skipped);
        assert_eq!(p.next(5), start(2, "prod"));
        p.stage_started(
            2,
            StageStart::Started {
                deployment_id: "d-2".into(),
            },
            5,
            WAIT,
        );
        p.stage_observed(2, "d-2", State::Succeeded, "ok", 6);
        assert_eq!(p.next(7), Next::Nothing);
        assert_eq!(p.state, PipelineState::Succeeded);
        assert_eq!(p.reason, "web@2.0.0 promoted through dev, qa, prod");
        assert_eq!(p.finished_ms, Some(7));
        assert_eq!(
            p.next(8),
            Next::Nothing,
            "a finished pipeline wants nothing"
        );
    }

    #[test]
    fn a_failed_deployment_stops_the_pipeline() {
        let mut p = pipeline();
        p.next(0);
        p.stage_started(
            0,
            StageStart::Started {
                deployment_id: "d-1".into(),
            },
            0,
            WAIT,
        );
        p.stage_observed(0, "d-1", State::RolledBack, "node a failed", 9);
        assert_eq!(p.stages[0].state, StageState::Failed);
        assert_eq!(
            p.stages[0].reason,
            "deployment d-1 rolled_back: node a failed"
        );
        assert_eq!(p.state, PipelineState::Failed);
        assert_eq!(p.reason, "stopped at dev: deployment d-1 rolled_back");
        assert_eq!(p.finished_ms, Some(9));
        assert_eq!(p.next(10), Next::Nothing);
    }

    #[test]
    fn disconnected_environments_are_waited_for_up_to_the_limit() {
        let mut p = pipeline();
        let reason = || StageStart::AllDisconnected {
            reason: "all gone".into(),
        };
        p.stage_started(0, reason(), 1_000, WAIT);
        assert_eq!(p.stages[0].state, StageState::Waiting);
        assert_eq!(p.stages[0].reason, "waiting: all gone");
        assert_eq!(p.stages[0].waiting_since_ms, Some(1_000));
        p.stage_started(0, reason(), 60_999, WAIT);
        assert_eq!(p.state, PipelineState::Running);
        p.stage_started(0, reason(), 61_000, WAIT);
        assert_eq!(p.stages[0].state, StageState::Failed);
        assert_eq!(
            p.stages[0].reason,
            "gave up after 1m0s (pipeline_wait_timeout): all gone"
        );
        assert_eq!(p.state, PipelineState::Failed);
        assert_eq!(
            p.reason,
            "stopped at dev: no connected node there for 1m0s (pipeline_wait_timeout)"
        );
    }

    #[test]
    fn busy_environments_wait_and_refusals_fail() {
        let mut p = pipeline();
        p.stage_started(
            0,
            StageStart::Busy {
                reason: "still running".into(),
            },
            1,
            WAIT,
        );
        assert_eq!(
            (p.stages[0].state, p.state, p.stages[0].reason.as_str()),
            (StageState::Waiting, PipelineState::Running, "still running")
        );
        p.stage_started(0, StageStart::Planned, 2, WAIT);
        assert_eq!(p.next(2), start(0, "dev"));
        p.stage_started(
            0,
            StageStart::Refused {
                reason: "yanked".into(),
            },
            3,
            WAIT,
        );
        assert_eq!(p.stages[0].state, StageState::Failed);
        assert_eq!(p.reason, "stage dev could not start: yanked");
        assert_eq!(p.state, PipelineState::Failed);
    }

    #[test]
    fn an_aborted_pipeline_starts_no_later_stage() {
        let mut p = pipeline();
        assert_eq!(p.target(), "prod");
        assert_eq!(p.running_deployment(), None, "nothing started yet");
        p.next(1);
        p.stage_started(
            0,
            StageStart::Started {
                deployment_id: "d-1".into(),
            },
            1,
            WAIT,
        );
        assert_eq!(p.running_deployment(), Some("d-1"));
        assert!(p.abort("by alice", 2));
        assert_eq!(p.state, PipelineState::Aborted);
        assert_eq!(p.reason, "aborted at dev: by alice");
        assert_eq!(p.finished_ms, Some(2));
        assert_eq!(p.stages[0].state, StageState::Aborted);
        assert!(p.stages[1..].iter().all(|s| s.state == StageState::Waiting));
        assert_eq!(p.running_deployment(), None);
        // The aborted deployment's end changes nothing, and nothing starts.
        p.stage_observed(0, "d-1", State::Aborted, "by alice", 3);
        assert_eq!(p.next(4), Next::Nothing);
        assert_eq!(p.state, PipelineState::Aborted);
        assert!(
            !p.abort("again", 5),
            "a finished pipeline is not aborted twice"
        );
        assert_eq!(p.finished_ms, Some(2));
    }

    #[test]
    fn a_waiting_stage_is_aborted_without_a_deployment() {
        let mut p = pipeline();
        p.stage_started(
            0,
            StageStart::Busy {
                reason: "still running".into(),
            },
            1,
            WAIT,
        );
        assert_eq!(p.running_deployment(), None);
        assert!(p.abort("no", 2));
        assert_eq!(p.stages[0].state, StageState::Aborted);
        assert_eq!(p.next(3), Next::Nothing);
    }

    fn stage_start() -> impl Gen<Value = StageStart> {
        prop_oneof![
            Just(StageStart::Started {
                deployment_id: "d".into()
            }),
            Just(StageStart::Planned),
            Just(StageStart::NoNodes { reason: "r".into() }),
            Just(StageStart::AllDisconnected { reason: "r".into() }),
            Just(StageStart::Busy { reason: "r".into() }),
            Just(StageStart::Refused { reason: "r".into() }),
        ]
    }

    fn deployment_state() -> impl Gen<Value = State> {
        prop_oneof![
            Just(State::Running),
            Just(State::Paused),
            Just(State::Succeeded),
            Just(State::Failed),
            Just(State::Aborted),
            Just(State::RolledBack),
        ]
    }

    proptest! {
        /// Whatever the stages meet, a pipeline only ever moves forward:
        /// stages finish in order, a finished pipeline stays finished, and
        /// it succeeds exactly when no stage failed.
        #[test]
        fn pipelines_only_move_forward(
            events in prop::collection::vec((stage_start(), deployment_state(), any::<bool>(), 0..20u8), 1..40),
        ) {
            let mut p = pipeline();
            let mut now = 0;
            for (start, state, watch, abort) in events {
                now += 30_000;
                let before = p.clone();
                if abort == 0 {
                    p.abort("stop", now);
                }
                match p.next(now) {
                    Next::Nothing => {}
                    Next::Start { stage, .. } => p.stage_started(stage, start, now, WAIT),
                    Next::Watch { stage, deployment_id } if watch => {
                        p.stage_observed(stage, &deployment_id, state, "", now)
                    }
                    Next::Watch { .. } => {}
                }
                if before.state != PipelineState::Running {
                    prop_assert_eq!(&p, &before);
                }
                let done = p
                    .stages
                    .iter()
                    .take_while(|s| !matches!(s.state, StageState::Waiting | StageState::Running | StageState::Aborted))
                    .count();
                prop_assert!(p.stages[done.min(p.stages.len())..]
                    .iter()
                    .skip(1)
                    .all(|s| s.state == StageState::Waiting && s.deployment_id.is_empty()));
                let failed = p.stages.iter().any(|s| s.state == StageState::Failed);
                prop_assert_eq!(failed, p.state == PipelineState::Failed);
                let aborted = p.stages.iter().any(|s| s.state == StageState::Aborted);
                prop_assert!(!aborted || p.state == PipelineState::Aborted);
                prop_assert_eq!(p.finished_ms.is_some(), p.state != PipelineState::Running);
            }
        }
    }
}
#[cfg(test)]
mod pipeline_record_tests {
    use super::*;

    /// Records stored while the states were strings read the same now.
    #[test]
    fn pipeline_states_keep_their_stored_words() {
        let stored = r#"{"id":"p-1","module":"web","version":"1.0.0","state":"running","stages":[{"environment":"dev","deployment_id":"d-1","state":"succeeded","reason":""},{"environment":"qa","deployment_id":"","state":"skipped","reason":"no nodes"},{"environment":"staging","deployment_id":"","state":"waiting","reason":""}],"reason":"","created_by":"alice","created_ms":1,"finished_ms":null}"#;
        let record: PipelineRecord = serde_json::from_str(stored).expect("an old record");
        assert_eq!(record.state, PipelineState::Running);
        let states: Vec<StageState> = record.stages.iter().map(|s| s.state).collect();
        assert_eq!(
            states,
            [
                StageState::Succeeded,
                StageState::Skipped,
                StageState::Waiting
            ]
        );
        let written = serde_json::to_value(&record).expect("serialize");
        assert_eq!(written["state"], "running");
        assert_eq!(written["stages"][1]["state"], "skipped");
        for state in [
            StageState::Waiting,
            StageState::Running,
            StageState::Succeeded,
            StageState::Failed,
            StageState::Skipped,
        ] {
            assert_eq!(
                serde_json::to_value(state).expect("serialize"),
                state.as_str()
            );
        }
    }
}
