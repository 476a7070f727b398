//! `hotswapctl history`: what every node of an environment was told to run
//! at a past time or seq, what changed between two points (with the
//! deployment and user of each change), and `deploy create --from-history`,
//! the plan that would return an environment to what it ran then.

use std::collections::BTreeMap;

use clap::{Args, Subcommand};
use hotswap_common::model::{HistoryChangeView, HistoryNodeView, PlanView};
use hotswap_common::pb;
use hotswap_common::timefmt::{parse_rfc3339, rfc3339_from_ms, ts_from_ms};
use serde::Serialize;
use tonic::transport::Channel;

use crate::client::{CliError, Connection, Context};
use crate::output::{self, OutputFormat};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct HistoryArgs {
    #[command(subcommand)]
    command: Option<HistoryCommand>,
    /// The environment.
    #[arg(long, required = true)]
    env: Option<String>,
    /// An RFC 3339 time, e.g. 2026-12-03T07:00:00Z.
    #[arg(long, value_parser = parse_rfc3339, required_unless_present = "seq", conflicts_with = "seq")]
    at: Option<u64>,
    /// A seq (a desired-state revision, as `history diff` shows).
    #[arg(long)]
    seq: Option<u64>,
}

#[derive(Subcommand)]
pub enum HistoryCommand {
    /// The desired-version changes after --from up to --to (default: now).
    #[command(
        after_help = "Examples:\n  hotswapctl history diff --from 2026-12-01T00:00:00Z --env production\n  hotswapctl -o json history diff --from 120 --to 180"
    )]
    Diff {
        /// An RFC 3339 time or a seq.
        #[arg(long, value_parser = parse_point)]
        from: Point,
        /// An RFC 3339 time or a seq; default: now.
        #[arg(long, value_parser = parse_point)]
        to: Option<Point>,
        /// Only this environment.
        #[arg(long)]
        env: Option<String>,
    },
}

/// A point of the history as given on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Point {
    Time(u64),
    Seq(u64),
}

/// A seq (digits) or an RFC 3339 time.
pub fn parse_point(text: &str) -> Result<Point, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map(Point::Seq)
            .map_err(|_| format!("seq {text} is too large"));
    }
    parse_rfc3339(text)
        .map(Point::Time)
        .map_err(|e| format!("{e}, or a seq"))
}

fn wire(point: Point) -> pb::HistoryPoint {
    pb::HistoryPoint {
        point: Some(match point {
            Point::Time(ms) => pb::history_point::Point::Time(ts_from_ms(ms)),
            Point::Seq(seq) => pb::history_point::Point::Seq(seq),
        }),
    }
}

async fn state_at(
    conn: &Connection,
    environment: &str,
    at: Option<Point>,
) -> Result<pb::HistoryState, CliError> {
    let mut client = pb::history_client::HistoryClient::new(conn.channel.clone());
    Ok(client
        .get_history_state(pb::GetHistoryStateRequest {
            environment: environment.to_string(),
            at: at.map(wire),
        })
        .await
        .map_err(conn.rpc_error(&format!("read the history of {environment}")))?
        .into_inner())
}

pub async fn run(ctx: &Context, args: HistoryArgs) -> Result<(), CliError> {
    let conn = ctx.connect()?;
    match args.command {
        Some(HistoryCommand::Diff { from, to, env }) => {
            let mut client = pb::history_client::HistoryClient::new(conn.channel.clone());
            let reply = client
                .diff_history(pb::DiffHistoryRequest {
                    from: Some(wire(from)),
                    to: to.map(wire),
                    environment: env.unwrap_or_default(),
                })
                .await
                .map_err(conn.rpc_error("diff the history"))?
                .into_inner();
            let changes: Vec<HistoryChangeView> = reply
                .changes
                .into_iter()
                .map(HistoryChangeView::from)
                .collect();
            match ctx.output {
                OutputFormat::Json => output::print_json(&changes),
                OutputFormat::Table => {
                    let mut table = output::table(&[
                        "SEQ",
                        "TIME",
                        "NODE",
                        "MODULE",
                        "FROM",
                        "TO",
                        "DEPLOYMENT",
                        "BY",
                    ]);
                    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                    for c in &changes {
                        table.add_row(vec![
                            c.seq.to_string(),
                            c.time.clone().unwrap_or_default(),
                            c.node.clone(),
                            c.module.clone(),
                            dash(&c.from),
                            dash(&c.to),
                            dash(&c.deployment_id),
                            c.by.clone(),
                        ]);
                    }
                    output::print_table(&table);
                }
            }
        }
        None => {
            // clap requires both without a subcommand.
            let env = args.env.unwrap_or_default();
            let at = match (args.at, args.seq) {
                (Some(ms), _) => Point::Time(ms),
                (None, Some(seq)) => Point::Seq(seq),
                (None, None) => {
                    return Err(CliError::Other(anyhow::anyhow!(
                        "give --at TIME or --seq N"
                    )));
                }
            };
            let state = state_at(&conn, &env, Some(at)).await?;
            let nodes: Vec<HistoryNodeView> =
                state.nodes.into_iter().map(HistoryNodeView::from).collect();
            match ctx.output {
                OutputFormat::Json => output::print_json(&nodes),
                OutputFormat::Table => {
                    eprintln!("{env} at seq {}", state.seq);
                    let mut table = output::table(&["NODE", "MODULES"]);
                    for n in &nodes {
                        let modules: Vec<String> = n
                            .modules
                            .iter()
                            .map(|m| format!("{}@{}", m.name, m.version))
                            .collect();
                        table.add_row(vec![n.node.clone(), modules.join(", ")]);
                    }
                    output::print_table(&table);
                }
            }
        }
    }
    Ok(())
}

/// One module's part of a return to the past.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct RestoreStep {
    pub module: String,
    /// The version the environment ran then; null when it did not run it.
    pub version: Option<String>,
    /// `deploy` (a deployment of `version` to the environment), or `skip`
    /// with the reason (nothing to do, or nothing a deployment can do).
    pub action: &'static str,
    pub reason: String,
    /// Nodes whose version would change: `{node, from, to}`.
    pub nodes: Vec<RestoreNode>,
    /// The deployment's plan (waves), for `deploy` steps.
    pub plan: Option<PlanView>,
    /// Set once created (`--yes`).
    pub deployment_id: Option<String>,
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct RestoreNode {
    pub node: String,
    pub from: Option<String>,
    pub to: Option<String>,
}

/// What would return the environment from `now` to `then`, per module.
/// Pure. A deployment moves every node of the environment to one version,
/// so a module whose nodes ran different versions then (a rollout under
/// way), or that was not desired at all then, is a `skip` saying so.
pub fn restore_steps(then: &[HistoryNodeView], now: &[HistoryNodeView]) -> Vec<RestoreStep> {
    let versions = |nodes: &[HistoryNodeView]| {
        let mut by_module: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for n in nodes {
            for m in &n.modules {
                by_module
                    .entry(m.name.clone())
                    .or_default()
                    .insert(n.node.clone(), m.version.clone());
            }
        }
        by_module
    };
    let (then, now) = (versions(then), versions(now));
    let mut modules: Vec<&String> = then.keys().chain(now.keys()).collect();
    modules.sort();
    modules.dedup();
    let empty = BTreeMap::new();
    modules
        .into_iter()
        .map(|module| {
            let was = then.get(module).unwrap_or(&empty);
            let is = now.get(module).unwrap_or(&empty);
            let mut distinct: Vec<&String> = was.values().collect();
            distinct.sort();
            distinct.dedup();
            let step = |action, version: Option<String>, reason: String, nodes| RestoreStep {
                module: module.clone(),
                version,
                action,
                reason,
                nodes,
                plan: None,
                deployment_id: None,
            };
            match distinct.as_slice() {
                [] => step(
                    "skip",
                    None,
                    format!(
                        "{module} was not desired then; remove it with `hotswapctl nodes unset-module` if it should go"
                    ),
                    Vec::new(),
                ),
                [version] => {
                    let changing: Vec<RestoreNode> = is
                        .iter()
                        .filter(|(_, v)| v != version)
                        .map(|(node, v)| RestoreNode {
                            node: node.clone(),
                            from: Some(v.clone()),
                            to: Some((*version).clone()),
                        })
                        .chain(was.keys().filter(|n| !is.contains_key(*n)).map(|node| {
                            RestoreNode {
                                node: node.clone(),
                                from: None,
                                to: Some((*version).clone()),
                            }
                        }))
                        .collect();
                    if changing.is_empty() {
                        step(
                            "skip",
                            Some((*version).clone()),
                            format!("every node runs {module}@{version} already"),
                            Vec::new(),
                        )
                    } else {
                        step(
                            "deploy",
                            Some((*version).clone()),
                            format!("deploy {module}@{version}"),
                            changing,
                        )
                    }
                }
                _ => step(
                    "skip",
                    None,
                    format!(
                        "nodes ran different versions of {module} then ({}): a deployment sets one; deploy the one you want yourself",
                        was.iter()
                            .map(|(n, v)| format!("{n}@{v}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    Vec::new(),
                ),
            }
        })
        .collect()
}

#[derive(Serialize)]
struct RestorePlan {
    environment: String,
    at: String,
    seq: u64,
    executed: bool,
    steps: Vec<RestoreStep>,
}

/// `deploy create --from-history TIME --env E [--yes]`: the plan that
/// returns `environment` to what it ran at `at_ms`, each deployment's
/// waves from a dry run; created only with `yes` (downgrades allowed, as
/// going back usually is one, and audited as such).
pub async fn restore(
    ctx: &Context,
    conn: &Connection,
    client: &mut pb::deployments_client::DeploymentsClient<Channel>,
    environment: &str,
    at_ms: u64,
    yes: bool,
) -> Result<(), CliError> {
    let then = state_at(conn, environment, Some(Point::Time(at_ms))).await?;
    let now = state_at(conn, environment, None).await?;
    let seq = then.seq;
    let to_views = |s: pb::HistoryState| -> Vec<HistoryNodeView> {
        s.nodes.into_iter().map(HistoryNodeView::from).collect()
    };
    let mut steps = restore_steps(&to_views(then), &to_views(now));
    for step in steps.iter_mut().filter(|s| s.action == "deploy") {
        let version = step.version.clone().unwrap_or_default();
        let request = |dry_run| pb::CreateDeploymentRequest {
            module: step.module.clone(),
            version: version.clone(),
            environment: environment.to_string(),
            options: Some(pb::DeploymentOptions {
                allow_downgrade: true,
                ..Default::default()
            }),
            dry_run,
        };
        let what = format!("plan {}@{version} in {environment}", step.module);
        let planned = client
            .create_deployment(request(true))
            .await
            .map_err(conn.rpc_error(&what))?
            .into_inner();
        step.plan = planned.plan.map(PlanView::from);
        if yes {
            let what = format!("deploy {}@{version} to {environment}", step.module);
            let created = client
                .create_deployment(request(false))
                .await
                .map_err(conn.rpc_error(&what))?
                .into_inner();
            step.deployment_id = created.deployment.map(|d| d.id);
        }
    }
    let plan = RestorePlan {
        environment: environment.to_string(),
        at: rfc3339_from_ms(at_ms),
        seq,
        executed: yes,
        steps,
    };
    match ctx.output {
        OutputFormat::Json => output::print_json(&plan),
        OutputFormat::Table => {
            println!(
                "return {} to what it ran at {} (seq {}):",
                plan.environment, plan.at, plan.seq
            );
            for step in &plan.steps {
                match (step.action, &step.deployment_id) {
                    ("deploy", Some(id)) => println!("  {}: started {id}", step.reason),
                    ("deploy", None) => println!("  {}", step.reason),
                    _ => println!("  skip: {}", step.reason),
                }
                for n in &step.nodes {
                    println!(
                        "    {}: {} -> {}",
                        n.node,
                        n.from.as_deref().unwrap_or("-"),
                        n.to.as_deref().unwrap_or("-")
                    );
                }
                if let Some(waves) = step.plan.as_ref().map(|p| &p.waves) {
                    for (i, wave) in waves.iter().enumerate() {
                        println!(
                            "    wave {}: {} ({})",
                            i + 1,
                            wave.nodes.join(", "),
                            wave.gate
                        );
                    }
                }
            }
            if !yes {
                eprintln!("nothing was changed: add --yes to start these deployments");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use hotswap_common::model::HistoryModuleView;

    fn nodes(spec: &[(&str, &[(&str, &str)])]) -> Vec<HistoryNodeView> {
        spec.iter()
            .map(|(node, modules)| HistoryNodeView {
                node: node.to_string(),
                modules: modules
                    .iter()
                    .map(|(name, version)| HistoryModuleView {
                        name: name.to_string(),
                        version: version.to_string(),
                    })
                    .collect(),
            })
            .collect()
    }

    #[test]
    fn points_are_seqs_or_rfc3339_times() {
        assert_eq!(parse_point("42"), Ok(Point::Seq(42)));
        assert_eq!(
            parse_point("2023-11-14T22:13:20.123Z"),
            Ok(Point::Time(1_700_000_000_123))
        );
        let err = parse_point("last tuesday").expect_err("bad");
        assert!(
            err.contains("invalid time") && err.contains("or a seq"),
            "{err}"
        );
    }

    #[test]
    fn restoring_deploys_uniform_versions_and_says_why_it_skips_the_rest() {
        let then = nodes(&[
            ("a", &[("web", "1.0.0"), ("db", "1.0.0")]),
            ("b", &[("web", "1.0.0"), ("db", "2.0.0")]),
        ]);
        let now = nodes(&[
            (
                "a",
                &[("web", "2.0.0"), ("db", "2.0.0"), ("cache", "1.0.0")],
            ),
            ("b", &[("web", "1.0.0"), ("db", "2.0.0")]),
        ]);
        let steps = restore_steps(&then, &now);
        let summary: Vec<(&str, &str, Option<&str>, usize)> = steps
            .iter()
            .map(|s| {
                (
                    s.module.as_str(),
                    s.action,
                    s.version.as_deref(),
                    s.nodes.len(),
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("cache", "skip", None, 0),
                ("db", "skip", None, 0),
                ("web", "deploy", Some("1.0.0"), 1),
            ]
        );
        assert!(
            steps[1].reason.contains("different versions"),
            "{}",
            steps[1].reason
        );
        assert_eq!(
            steps[2].nodes,
            [RestoreNode {
                node: "a".into(),
                from: Some("2.0.0".into()),
                to: Some("1.0.0".into())
            }]
        );
        let same = restore_steps(&then, &then);
        assert!(same.iter().all(|s| s.action == "skip"));
    }
}
