//! `hotswapctl deploy`: create, watch and control deployments.
//!
//! `--wait` and `deploy watch` follow a deployment to its end: plain
//! timestamped lines (JSON Lines with `-o json`, the last line being the final
//! deployment). Exit codes: 0 succeeded; 3 failed, rolled back or aborted;
//! 4 `--timeout` elapsed (the deployment goes on).

use std::time::Duration;

use clap::{Args, Subcommand};
use hotswap_common::labels::parse_label;
use hotswap_common::model::{DeploymentRequest, DeploymentView};
use hotswap_common::pb;
use hotswap_common::timefmt::{now_ms, parse_duration, rfc3339_from_ms};
use tonic::transport::Channel;

use crate::client::{CliError, Connection, Context};
use crate::output::{self, OutputFormat};

#[derive(Subcommand)]
pub enum DeployCommand {
    /// Start a deployment (or print its plan with --dry-run).
    #[command(
        after_help = "Examples:\n  hotswapctl deploy create hello@1.2.0 --env dev --wait\n  hotswapctl deploy create hello@1.2.0 --env qa --strategy rolling --batch-size 2 --min-healthy-time 30s\n  hotswapctl deploy create hello@1.2.0 --env production --steps 10,50,100 --step-duration 5m --dry-run"
    )]
    Create(Box<CreateArgs>),
    /// List deployments, newest first.
    #[command(
        after_help = "Examples:\n  hotswapctl deploy list\n  hotswapctl deploy list --env production --active\n  hotswapctl -o json deploy list --module hello"
    )]
    List {
        #[arg(long)]
        module: Option<String>,
        #[arg(long)]
        env: Option<String>,
        /// Only deployments that have not ended.
        #[arg(long)]
        active: bool,
    },
    /// Show one deployment.
    #[command(
        after_help = "Examples:\n  hotswapctl deploy get d-0123456789\n  hotswapctl -o json deploy get d-0123456789"
    )]
    Get { id: String },
    /// Follow a deployment until it ends (exit 0, 3 or 4 like --wait).
    #[command(
        after_help = "On a terminal this draws a live view; piped, it prints timestamped lines.\n\nExamples:\n  hotswapctl deploy watch d-0123456789\n  hotswapctl deploy watch d-0123456789 --timeout 10m   # exit 0, 3 or 4\n  hotswapctl -o json deploy watch d-0123456789 | tail -n 1"
    )]
    Watch {
        id: String,
        #[arg(long, value_parser = parse_duration)]
        timeout: Option<Duration>,
    },
    /// Stop advancing to new waves.
    #[command(after_help = "Examples:\n  hotswapctl deploy pause d-0123456789")]
    Pause { id: String },
    /// Continue a paused deployment.
    #[command(after_help = "Examples:\n  hotswapctl deploy resume d-0123456789")]
    Resume { id: String },
    /// Continue a canary held for manual promotion.
    #[command(after_help = "Examples:\n  hotswapctl deploy promote d-0123456789")]
    Promote { id: String },
    /// Stop the deployment where it is, without rolling back.
    #[command(
        after_help = "Examples:\n  hotswapctl deploy abort d-0123456789 --reason \"wrong version\""
    )]
    Abort {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Return every node the deployment changed to its previous version.
    #[command(
        after_help = "Examples:\n  hotswapctl deploy rollback d-0123456789 --reason \"latency regression\""
    )]
    Rollback {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Approve a deployment waiting for a second person (not its creator).
    #[command(
        after_help = "Examples:\n  hotswapctl deploy approve d-1a2b3c\n  hotswapctl deploy approve d-1a2b3c --reason \"canary plan reviewed, change CHG-123\""
    )]
    Approve {
        id: String,
        /// Why (optional); kept in the deployment's events.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Reject a deployment waiting for approval.
    #[command(
        after_help = "Examples:\n  hotswapctl deploy reject d-1a2b3c\n  hotswapctl deploy reject d-1a2b3c --reason \"no change ticket\""
    )]
    Reject {
        id: String,
        /// Why (optional); becomes the deployment's reason, kept in its events.
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Args)]
pub struct CreateArgs {
    /// NAME@VERSION.
    #[arg(
        required_unless_present = "from_history",
        conflicts_with = "from_history"
    )]
    module: Option<String>,
    /// Plan the deployments that would return --env to what it ran at this
    /// RFC 3339 time (from the desired-state history); shown, not started,
    /// unless --yes.
    #[arg(long, value_parser = hotswap_common::timefmt::parse_rfc3339)]
    from_history: Option<u64>,
    /// With --from-history: start the planned deployments.
    #[arg(long, requires = "from_history")]
    yes: bool,
    #[arg(long)]
    env: String,
    /// direct, rolling, blue-green or canary (default: the environment's).
    #[arg(long)]
    strategy: Option<String>,
    /// Only nodes with this label (repeatable).
    #[arg(long = "selector", value_parser = parse_label)]
    selector: Vec<(String, String)>,
    /// Rolling: nodes per batch, N or N%.
    #[arg(long)]
    batch_size: Option<String>,
    /// Node failures tolerated before the deployment fails.
    #[arg(long)]
    max_failures: Option<u32>,
    /// Canary: cumulative percentages, e.g. 10,30,50,100.
    #[arg(long, value_delimiter = ',')]
    steps: Vec<u32>,
    #[arg(long, value_parser = parse_duration)]
    step_duration: Option<Duration>,
    /// Canary: wait for `deploy promote` after each step.
    #[arg(long)]
    manual_promote: bool,
    /// Blue-green: how long to keep the old version ready after the switch.
    #[arg(long, value_parser = parse_duration)]
    bake_time: Option<Duration>,
    /// Rolling: how long a batch must stay healthy before the next.
    #[arg(long, value_parser = parse_duration)]
    min_healthy_time: Option<Duration>,
    /// How long a node has to become healthy on the new version.
    #[arg(long, value_parser = parse_duration)]
    health_deadline: Option<Duration>,
    /// Canary: absolute ceiling for the error rate (0..1).
    #[arg(long)]
    max_error_rate: Option<f64>,
    /// Canary: p99 latency may be at most this multiple of the baseline's.
    #[arg(long)]
    max_latency_increase: Option<f64>,
    /// Canary: requests canary and baseline each need in a step's analysis
    /// window before error rate and latency are judged (default 50); with
    /// fewer the step is held up to 3x --step-duration, then judged on health.
    #[arg(long, value_name = "N")]
    analysis_min_requests: Option<u64>,
    /// Canary: the start of each step's hold left out of its analysis (default 10s).
    #[arg(long, value_parser = parse_duration, value_name = "D")]
    analysis_warmup: Option<Duration>,
    /// How long `paused`, or a wait for `deploy promote`, may last before the
    /// deployment fails (default: the control plane's pause_timeout, 24h).
    #[arg(long, value_parser = parse_duration, value_name = "D")]
    pause_timeout: Option<Duration>,
    #[arg(long)]
    no_auto_rollback: bool,
    /// Deploy a version older (semver) than the environment's current one;
    /// refused without it. Recorded in the audit log.
    #[arg(long)]
    allow_downgrade: bool,
    /// Start even though the environment is frozen (admins only);
    /// recorded in the audit log.
    #[arg(long)]
    override_freeze: bool,
    /// Follow the deployment until it ends.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up waiting after this long (exit 4; the deployment goes on).
    #[arg(long, value_parser = parse_duration, requires = "wait")]
    timeout: Option<Duration>,
    /// Print the plan; create nothing.
    #[arg(long)]
    dry_run: bool,
}

pub(crate) fn convert(d: pb::Deployment) -> Result<DeploymentView, CliError> {
    DeploymentView::try_from(d)
        .map_err(|e| CliError::Other(anyhow::anyhow!("unexpected reply: {e}")))
}

/// Exit codes for a deployment that ended: SPEC §4.
#[derive(Debug)]
pub enum Outcome {
    Done,
    Ended(String),
    TimedOut,
}

pub async fn run(ctx: &Context, command: DeployCommand) -> Result<Outcome, CliError> {
    let conn = ctx.connect()?;
    let mut client = pb::deployments_client::DeploymentsClient::new(conn.channel.clone());
    match command {
        DeployCommand::Create(args) => create(ctx, &conn, &mut client, *args).await,
        DeployCommand::List {
            module,
            env,
            active,
        } => {
            let reply = client
                .list_deployments(pb::ListDeploymentsRequest {
                    module: module.unwrap_or_default(),
                    environment: env.unwrap_or_default(),
                    active_only: active,
                })
                .await
                .map_err(conn.rpc_error("list deployments"))?
                .into_inner();
            let views = reply
                .deployments
                .into_iter()
                .map(convert)
                .collect::<Result<Vec<_>, _>>()?;
            match ctx.output {
                OutputFormat::Json => output::print_json(&views),
                OutputFormat::Table => {
                    let mut table = output::table(&[
                        "ID", "MODULE", "ENV", "STRATEGY", "STATE", "PROGRESS", "AGE",
                    ]);
                    for d in &views {
                        table.add_row(vec![
                            d.id.clone(),
                            format!("{}@{}", d.module, d.version),
                            d.environment.clone(),
                            d.strategy.clone(),
                            d.state.clone(),
                            format!(
                                "{}/{} healthy, {} failed",
                                d.progress.healthy, d.progress.total, d.progress.failed
                            ),
                            age(d.created_at.as_deref()),
                        ]);
                    }
                    output::print_table(&table);
                }
            }
            Ok(Outcome::Done)
        }
        DeployCommand::Get { id } => {
            let d = client
                .get_deployment(pb::GetDeploymentRequest { id: id.clone() })
                .await
                .map_err(conn.rpc_error(&format!("get deployment {id}")))?
                .into_inner();
            let view = convert(d)?;
            match ctx.output {
                OutputFormat::Json => output::print_json(&view),
                OutputFormat::Table => print_deployment(&view),
            }
            Ok(Outcome::Done)
        }
        DeployCommand::Watch { id, timeout } => watch(ctx, &conn, &mut client, &id, timeout).await,
        DeployCommand::Pause { id } => control(ctx, &conn, &mut client, &id, "pause", None).await,
        DeployCommand::Resume { id } => control(ctx, &conn, &mut client, &id, "resume", None).await,
        DeployCommand::Promote { id } => {
            control(ctx, &conn, &mut client, &id, "promote", None).await
        }
        DeployCommand::Abort { id, reason } => {
            control(ctx, &conn, &mut client, &id, "abort", reason).await
        }
        DeployCommand::Rollback { id, reason } => {
            control(ctx, &conn, &mut client, &id, "rollback", reason).await
        }
        DeployCommand::Approve { id, reason } => {
            control(ctx, &conn, &mut client, &id, "approve", reason).await
        }
        DeployCommand::Reject { id, reason } => {
            control(ctx, &conn, &mut client, &id, "reject", reason).await
        }
    }
}

async fn create(
    ctx: &Context,
    conn: &Connection,
    client: &mut pb::deployments_client::DeploymentsClient<Channel>,
    args: CreateArgs,
) -> Result<Outcome, CliError> {
    if let Some(at) = args.from_history {
        crate::history::restore(ctx, conn, client, &args.env, at, args.yes).await?;
        return Ok(Outcome::Done);
    }
    // clap requires one of the two.
    let module_arg = args.module.clone().unwrap_or_default();
    let (module, version) = crate::module::name_at_version(&module_arg)?;
    let request = pb::CreateDeploymentRequest::from(DeploymentRequest {
        module: module.to_string(),
        version: version.to_string(),
        environment: args.env.clone(),
        strategy: args.strategy,
        selector: args.selector.into_iter().collect(),
        batch_size: args.batch_size,
        max_failures: args.max_failures,
        steps: args.steps,
        step_duration: args.step_duration,
        manual_promote: args.manual_promote,
        bake_time: args.bake_time,
        min_healthy_time: args.min_healthy_time,
        health_deadline: args.health_deadline,
        max_error_rate: args.max_error_rate,
        max_latency_increase: args.max_latency_increase,
        analysis_min_requests: args.analysis_min_requests,
        analysis_warmup: args.analysis_warmup,
        pause_timeout: args.pause_timeout,
        no_auto_rollback: args.no_auto_rollback,
        allow_downgrade: args.allow_downgrade,
        override_freeze: args.override_freeze,
        dry_run: args.dry_run,
    });
    let reply = client
        .create_deployment(request)
        .await
        .map_err(conn.rpc_error(&format!("deploy {module_arg}")))?
        .into_inner();
    if args.dry_run {
        let plan = reply.plan.unwrap_or_default();
        match ctx.output {
            OutputFormat::Json => {
                output::print_json(&hotswap_common::model::PlanView::from(plan.clone()));
            }
            OutputFormat::Table => {
                println!(
                    "plan for {} to {} ({}); nothing was created",
                    module_arg, args.env, plan.strategy
                );
                for (i, wave) in plan.waves.iter().enumerate() {
                    println!("  wave {}: {}", i + 1, wave.nodes.join(", "));
                    // Under deployment windows: when it could start.
                    if let Some(at) = &wave.earliest_start {
                        let at = hotswap_common::timefmt::rfc3339_from_ms(
                            hotswap_common::timefmt::ms_from_ts(at),
                        );
                        if wave.window.is_empty() {
                            println!("    starts: {at} at the earliest");
                        } else {
                            println!("    starts: {at} at the earliest ({})", wave.window);
                        }
                    }
                    println!("    then: {}", wave.gate);
                }
            }
        }
        return Ok(Outcome::Done);
    }
    let deployment = convert(
        reply
            .deployment
            .ok_or_else(|| CliError::Other(anyhow::anyhow!("reply has no deployment")))?,
    )?;
    if args.wait {
        return watch(ctx, conn, client, &deployment.id, args.timeout).await;
    }
    match ctx.output {
        OutputFormat::Json => output::print_json(&deployment),
        OutputFormat::Table => {
            println!("{}", deployment.id);
            eprintln!(
                "deployment {} of {}@{} to {} is {}",
                deployment.id,
                deployment.module,
                deployment.version,
                deployment.environment,
                deployment.state
            );
            // Created outside every deployment window: say until when.
            if deployment.state == "paused" && !deployment.reason.is_empty() {
                eprintln!("  waiting: {}", deployment.reason);
            }
        }
    }
    Ok(Outcome::Done)
}

async fn watch(
    ctx: &Context,
    conn: &Connection,
    client: &mut pb::deployments_client::DeploymentsClient<Channel>,
    id: &str,
    timeout: Option<Duration>,
) -> Result<Outcome, CliError> {
    let follow = async {
        let mut stream = client
            .watch_deployment(pb::GetDeploymentRequest { id: id.to_string() })
            .await
            .map_err(conn.rpc_error(&format!("watch deployment {id}")))?
            .into_inner();
        let mut last_line = String::new();
        let mut last: Option<DeploymentView> = None;
        let tty = ctx.output == OutputFormat::Table && crate::live::wanted();
        let mut live: Option<crate::live::LiveView> = None;
        while let Some(update) = stream
            .message()
            .await
            .map_err(conn.rpc_error(&format!("watch deployment {id}")))?
        {
            let view = convert(update)?;
            match ctx.output {
                OutputFormat::Json => output::print_json_line(&view),
                OutputFormat::Table if tty => match live.as_mut() {
                    Some(live) => live.update(&view),
                    None => live = Some(crate::live::LiveView::new(&view)),
                },
                OutputFormat::Table => {
                    let line = summary_line(&view);
                    if line != last_line {
                        println!("{}  {line}", rfc3339_from_ms(now_ms()));
                        last_line = line;
                    }
                }
            }
            let done = view.is_terminal();
            last = Some(view);
            if done {
                break;
            }
        }
        if let Some(live) = live {
            live.finish();
            if let Some(view) = &last {
                println!("{}", summary_line(view));
            }
        }
        Ok::<Option<DeploymentView>, CliError>(last)
    };
    let last = match timeout {
        Some(limit) => match tokio::time::timeout(limit, follow).await {
            Ok(result) => result?,
            Err(_) => {
                eprintln!(
                    "error: timed out after {}s waiting for deployment {id}; it goes on (follow it with `hotswapctl deploy watch {id}`)",
                    limit.as_secs()
                );
                return Ok(Outcome::TimedOut);
            }
        },
        None => follow.await?,
    };
    match last {
        Some(view) if view.state == "succeeded" => Ok(Outcome::Done),
        Some(view) if view.is_terminal() => Ok(Outcome::Ended(format!(
            "deployment {id} {}: {}",
            view.state, view.reason
        ))),
        _ => Err(CliError::Other(anyhow::anyhow!(
            "the control plane ended the watch of {id} before the deployment ended"
        ))),
    }
}

fn summary_line(d: &DeploymentView) -> String {
    let mut line = format!(
        "{} {}@{} {}: wave {}/{}, {}/{} healthy, {} failed",
        d.id,
        d.module,
        d.version,
        d.state,
        (d.wave + 1).min(d.waves.max(1)),
        d.waves.max(1),
        d.progress.healthy,
        d.progress.total,
        d.progress.failed
    );
    if !d.waiting_for.is_empty() {
        line.push_str(&format!("; waiting for {}", d.waiting_for));
    }
    if let Some(v) = d.analysis.last() {
        line.push_str(&format!(
            "; analysis step {} {}: {}",
            v.step,
            output::verdict_word(v),
            v.summary
        ));
    }
    if d.is_terminal() && !d.reason.is_empty() {
        line.push_str(&format!("; {}", d.reason));
    }
    line
}

async fn control(
    ctx: &Context,
    conn: &Connection,
    client: &mut pb::deployments_client::DeploymentsClient<Channel>,
    id: &str,
    action: &str,
    reason: Option<String>,
) -> Result<Outcome, CliError> {
    let d = client
        .control_deployment(pb::ControlDeploymentRequest {
            id: id.to_string(),
            action: action.to_string(),
            reason: reason.unwrap_or_default(),
        })
        .await
        .map_err(conn.rpc_error(&format!("{action} deployment {id}")))?
        .into_inner();
    let view = convert(d)?;
    match ctx.output {
        OutputFormat::Json => output::print_json(&view),
        OutputFormat::Table => println!("{}", summary_line(&view)),
    }
    Ok(Outcome::Done)
}

fn age(rfc3339: Option<&str>) -> String {
    use time::OffsetDateTime;
    use time::format_description::well_known::Rfc3339;
    rfc3339
        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        .map(|t| {
            let ms = (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
            hotswap_common::timefmt::human_age(now_ms().saturating_sub(ms))
        })
        .unwrap_or_else(|| "-".to_string())
}

fn print_deployment(d: &DeploymentView) {
    println!("id:          {}", d.id);
    println!("module:      {}@{}", d.module, d.version);
    println!("environment: {}", d.environment);
    println!("strategy:    {}", d.strategy);
    println!("state:       {}", d.state);
    println!(
        "progress:    {}/{} healthy, {} updated, {} failed",
        d.progress.healthy, d.progress.total, d.progress.updated, d.progress.failed
    );
    println!(
        "created:     {} by {}",
        d.created_at.as_deref().unwrap_or("-"),
        d.created_by
    );
    if !d.approved_by.is_empty() {
        println!("approved by: {}", d.approved_by);
    }
    if !d.waiting_for.is_empty() {
        println!("waiting for: {}", d.waiting_for);
    }
    if !d.reason.is_empty() {
        println!("reason:      {}", d.reason);
    }
    let mut table = output::table(&["NODE", "WAVE", "FROM", "TO", "STATE", "REASON"]);
    for n in &d.nodes {
        table.add_row(vec![
            n.node.clone(),
            (n.wave + 1).to_string(),
            if n.from_version.is_empty() {
                "-".into()
            } else {
                n.from_version.clone()
            },
            n.to_version.clone(),
            match &n.failure_kind {
                Some(kind) => format!("{} ({kind})", n.state),
                None => n.state.clone(),
            },
            n.reason.clone(),
        ]);
    }
    output::print_table(&table);
    for v in &d.analysis {
        println!(
            "analysis step {}: {} ({})",
            v.step,
            output::verdict_word(v),
            v.summary
        );
    }
}
