//! The plan of a deployment as a dry run shows it: its waves of node
//! names and the gate after each. Pure.

use super::machine::{Deployment, Strategy, plan_waves};

/// A dry run's answer: waves of node names and the gate after each.
#[derive(Clone, Debug, Default)]
pub struct PlanView {
    pub strategy: String,
    pub waves: Vec<(Vec<String>, String)>,
}

pub fn plan_view(deployment: &Deployment) -> PlanView {
    let waves = plan_waves(&deployment.spec.strategy, deployment.nodes.len());
    let total = waves.len();
    let strategy = &deployment.spec.strategy;
    let gate = |i: usize| -> String {
        let last = i + 1 == total;
        match strategy {
            Strategy::Direct => "all nodes healthy".to_string(),
            Strategy::Rolling { min_healthy_ms, .. } if !last => {
                format!("wave healthy for {}s", min_healthy_ms / 1000)
            }
            Strategy::Rolling { .. } => "wave healthy".to_string(),
            Strategy::BlueGreen { bake_ms } => format!(
                "all staged, then switched together; healthy through a {}s bake",
                bake_ms / 1000
            ),
            Strategy::Canary {
                step_ms,
                manual_promote,
                ..
            } if !last => format!(
                "healthy and canary analysis passing for {}s{}",
                step_ms / 1000,
                if *manual_promote {
                    ", then deploy promote"
                } else {
                    ""
                }
            ),
            Strategy::Canary { .. } => "all nodes healthy".to_string(),
        }
    };
    PlanView {
        strategy: strategy.name().to_string(),
        waves: waves
            .iter()
            .enumerate()
            .map(|(i, members)| {
                (
                    members
                        .iter()
                        .map(|&n| deployment.nodes[n].name.clone())
                        .collect(),
                    gate(i),
                )
            })
            .collect(),
    }
}
