//! `hotswapctl pipeline run|list|get|abort`: promote one version through
//! the environments, and follow or stop such promotions.

use std::time::Duration;

use clap::Subcommand;
use hotswap_common::pb;
use hotswap_common::timefmt::{now_ms, parse_duration, rfc3339_from_ms};

use crate::client::{CliError, Context};
use crate::deploy::Outcome;
use crate::output::{self, OutputFormat};

#[derive(Subcommand)]
pub enum PipelineCommand {
    /// Promote NAME@VERSION through dev, qa, staging and production (each
    /// stage a deployment with that environment's defaults), stopping at the
    /// first failure.
    #[command(
        after_help = "Examples:\n  hotswapctl pipeline run hello@1.2.0 --to staging --wait\n  hotswapctl pipeline run hello@1.2.0"
    )]
    Run {
        module: String,
        /// Last environment to promote to.
        #[arg(long)]
        to: Option<String>,
        /// Follow the pipeline until it ends (exit 0, 3, or 4 on --timeout).
        #[arg(long)]
        wait: bool,
        /// With --wait: give up waiting after this long (exit 4; the pipeline goes on).
        #[arg(long, value_parser = parse_duration, requires = "wait")]
        timeout: Option<Duration>,
        /// Let stages deploy a version older (semver) than their
        /// environment's current one; refused without it. Audited.
        #[arg(long)]
        allow_downgrade: bool,
        /// Start stages in frozen environments (admins only); audited.
        #[arg(long)]
        override_freeze: bool,
    },
    /// Show a pipeline.
    #[command(
        after_help = "Examples:\n  hotswapctl pipeline get p-0123456789\n  hotswapctl -o json pipeline get p-0123456789"
    )]
    Get { id: String },
    /// List pipelines, newest first.
    #[command(
        after_help = "Examples:\n  hotswapctl pipeline list --active\n  hotswapctl -o json pipeline list --module hello"
    )]
    List {
        #[arg(long)]
        module: Option<String>,
        /// Only pipelines that have not ended.
        #[arg(long)]
        active: bool,
    },
    /// Stop a pipeline: its running stage's deployment is aborted and no
    /// later stage starts.
    #[command(
        after_help = "Examples:\n  hotswapctl pipeline abort p-0123456789 --reason \"bad build\""
    )]
    Abort {
        id: String,
        /// Why; recorded in the pipeline, its deployment and the audit log.
        #[arg(long)]
        reason: Option<String>,
    },
}

fn view(p: &pb::Pipeline) -> Result<hotswap_common::model::PipelineView, CliError> {
    Ok(hotswap_common::model::PipelineView::try_from(p.clone())?)
}

/// The stages in order, with their states and deployments.
fn stages_text(p: &pb::Pipeline) -> String {
    let stages: Vec<String> = p
        .stages
        .iter()
        .map(|s| {
            if s.deployment_id.is_empty() {
                format!("{} {}", s.environment, s.state)
            } else {
                format!("{} {} ({})", s.environment, s.state, s.deployment_id)
            }
        })
        .collect();
    stages.join(" -> ")
}

fn line(p: &pb::Pipeline) -> String {
    format!(
        "{} {}@{} {}: {}",
        p.id,
        p.module,
        p.version,
        p.state,
        stages_text(p)
    )
}

pub async fn run(ctx: &Context, command: PipelineCommand) -> Result<Outcome, CliError> {
    let conn = ctx.connect()?;
    let mut client = pb::pipelines_client::PipelinesClient::new(conn.channel.clone());
    let (pipeline, wait, timeout) = match command {
        PipelineCommand::Run {
            module,
            to,
            wait,
            timeout,
            allow_downgrade,
            override_freeze,
        } => {
            let (name, version) = crate::module::name_at_version(&module)?;
            let p = client
                .run_pipeline(pb::RunPipelineRequest {
                    module: name,
                    version,
                    to: to.unwrap_or_default(),
                    allow_downgrade,
                    override_freeze,
                })
                .await
                .map_err(conn.rpc_error(&format!("run pipeline of {module}")))?
                .into_inner();
            (p, wait, timeout)
        }
        PipelineCommand::List { module, active } => {
            let reply = client
                .list_pipelines(pb::ListPipelinesRequest {
                    module: module.unwrap_or_default(),
                    active_only: active,
                })
                .await
                .map_err(conn.rpc_error("list pipelines"))?
                .into_inner();
            let views = reply
                .pipelines
                .iter()
                .map(view)
                .collect::<Result<Vec<_>, _>>()?;
            match ctx.output {
                OutputFormat::Json => output::print_json(&views),
                OutputFormat::Table => {
                    let mut table =
                        output::table(&["ID", "MODULE", "TARGET", "STATE", "STAGES", "CREATED"]);
                    for (p, wire) in views.iter().zip(&reply.pipelines) {
                        table.add_row(vec![
                            p.id.clone(),
                            format!("{}@{}", p.module, p.version),
                            p.target.clone(),
                            p.state.clone(),
                            stages_text(wire),
                            p.created_at.clone().unwrap_or_else(|| "-".into()),
                        ]);
                    }
                    output::print_table(&table);
                }
            }
            return Ok(Outcome::Done);
        }
        PipelineCommand::Abort { id, reason } => {
            let p = client
                .abort_pipeline(pb::AbortPipelineRequest {
                    id: id.clone(),
                    reason: reason.unwrap_or_default(),
                })
                .await
                .map_err(conn.rpc_error(&format!("abort pipeline {id}")))?
                .into_inner();
            (p, false, None)
        }
        PipelineCommand::Get { id } => {
            let p = client
                .get_pipeline(pb::GetPipelineRequest { id: id.clone() })
                .await
                .map_err(conn.rpc_error(&format!("get pipeline {id}")))?
                .into_inner();
            (p, false, None)
        }
    };
    if !wait {
        match ctx.output {
            OutputFormat::Json => output::print_json(&view(&pipeline)?),
            OutputFormat::Table => println!("{}", line(&pipeline)),
        }
        return Ok(Outcome::Done);
    }
    let id = pipeline.id.clone();
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut last_line = String::new();
    let mut current = pipeline;
    let live = (ctx.output == OutputFormat::Table && crate::live::wanted())
        .then(|| crate::live::PipelineView::new(current.stages.len()));
    let mut deployments = pb::deployments_client::DeploymentsClient::new(conn.channel.clone());
    loop {
        match ctx.output {
            OutputFormat::Json => output::print_json_line(&view(&current)?),
            OutputFormat::Table if live.is_some() => {
                let running = current
                    .stages
                    .iter()
                    .find(|s| s.state == "running" && !s.deployment_id.is_empty());
                let deployment = match running {
                    Some(stage) => deployments
                        .get_deployment(pb::GetDeploymentRequest {
                            id: stage.deployment_id.clone(),
                        })
                        .await
                        .ok()
                        .and_then(|r| crate::deploy::convert(r.into_inner()).ok()),
                    None => None,
                };
                let stages: Vec<(String, String, String)> = current
                    .stages
                    .iter()
                    .map(|s| {
                        (
                            s.environment.clone(),
                            s.state.clone(),
                            s.deployment_id.clone(),
                        )
                    })
                    .collect();
                if let Some(live) = &live {
                    live.update(&stages, deployment.as_ref());
                }
            }
            OutputFormat::Table => {
                let text = line(&current);
                if text != last_line {
                    println!("{}  {text}", rfc3339_from_ms(now_ms()));
                    last_line = text;
                }
            }
        }
        if matches!(current.state.as_str(), "succeeded" | "failed" | "aborted") {
            if let Some(live) = live {
                live.finish();
                println!("{}", line(&current));
            }
            return Ok(match current.state.as_str() {
                "succeeded" => Outcome::Done,
                state => Outcome::Ended(format!("pipeline {id} {state}: {}", current.reason)),
            });
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            eprintln!(
                "error: timed out waiting for pipeline {id}; it goes on (see `hotswapctl pipeline get {id}`)"
            );
            return Ok(Outcome::TimedOut);
        }
        // Pipelines move at deployment speed: polling once a second is plenty.
        tokio::time::sleep(Duration::from_secs(1)).await;
        current = client
            .get_pipeline(pb::GetPipelineRequest { id: id.clone() })
            .await
            .map_err(conn.rpc_error(&format!("get pipeline {id}")))?
            .into_inner();
    }
}
