//! `hotswapctl nodes`.

use clap::Subcommand;
use comfy_table::Cell;
use hotswap_common::labels::ENVIRONMENT_LABEL;
use hotswap_common::model::{NodeUpdateView, NodeView};
use hotswap_common::pb;
use hotswap_common::timefmt::{human_age, now_ms, rfc3339_from_ms};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::client::{CliError, Context};
use crate::output::{self, OutputFormat};

#[derive(Subcommand)]
pub enum NodesCommand {
    /// List nodes.
    #[command(
        after_help = "Examples:\n  hotswapctl nodes list\n  hotswapctl nodes list --env production -o json"
    )]
    List {
        /// Only nodes of this environment.
        #[arg(long)]
        env: Option<String>,
    },
    /// Show one node by id, name or id prefix.
    #[command(after_help = "Examples:\n  hotswapctl nodes get web-1")]
    Get { node: String },
    /// Follow node changes: a snapshot first, then every change.
    #[command(after_help = "Examples:\n  hotswapctl -o json nodes watch | jq .node.status")]
    Watch,
    /// Remove a node: its certificate is refused from now on and its session ends.
    #[command(after_help = "Examples:\n  hotswapctl nodes remove web-1")]
    Remove { node: String },
    /// Low-level: set the desired version of a module on one node (deployments
    /// do this for you, with strategies and rollback).
    #[command(
        after_help = "Examples:\n  hotswapctl nodes set-module web-1 hello@1.2.0\n  hotswapctl nodes set-module web-1 hello --stage 1.3.0"
    )]
    SetModule {
        node: String,
        /// NAME@VERSION to run, or NAME alone with --stage.
        module: String,
        /// Version to fetch, verify and unpack without activating.
        #[arg(long)]
        stage: Option<String>,
    },
    /// Low-level: stop and remove a module from one node.
    #[command(after_help = "Examples:\n  hotswapctl nodes unset-module web-1 hello")]
    UnsetModule { node: String, module: String },
}

fn convert(node: pb::Node) -> Result<NodeView, CliError> {
    NodeView::try_from(node).map_err(|e| CliError::Other(anyhow::anyhow!("unexpected reply: {e}")))
}

fn age(rfc3339: Option<&str>) -> String {
    rfc3339
        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        .map(|t| {
            let ms = (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
            format!("{} ago", human_age(now_ms().saturating_sub(ms)))
        })
        .unwrap_or_else(|| "never".to_string())
}

fn short_id(id: &str) -> &str {
    id.get(..8).unwrap_or(id)
}

pub async fn run(ctx: &Context, command: NodesCommand) -> Result<(), CliError> {
    let conn = ctx.connect()?;
    let mut client = pb::fleet_client::FleetClient::new(conn.channel.clone());
    match command {
        NodesCommand::List { env } => {
            let request = pb::ListNodesRequest {
                environment: env.unwrap_or_default(),
            };
            let reply = client
                .list_nodes(request)
                .await
                .map_err(conn.rpc_error("list nodes"))?
                .into_inner();
            let nodes = reply
                .nodes
                .into_iter()
                .map(convert)
                .collect::<Result<Vec<_>, _>>()?;
            match ctx.output {
                OutputFormat::Json => output::print_json(&nodes),
                OutputFormat::Table => {
                    let mut table = output::table(&[
                        "NAME",
                        "ID",
                        "STATUS",
                        "ENVIRONMENT",
                        "LAST SEEN",
                        "MODULES",
                    ]);
                    for node in &nodes {
                        table.add_row(vec![
                            Cell::new(&node.name),
                            Cell::new(short_id(&node.id)),
                            output::status_cell(node.status.as_str()),
                            Cell::new(
                                node.labels
                                    .get(ENVIRONMENT_LABEL)
                                    .map(String::as_str)
                                    .unwrap_or("-"),
                            ),
                            Cell::new(age(node.last_seen.as_deref())),
                            Cell::new(node.modules.len()),
                        ]);
                    }
                    output::print_table(&table);
                }
            }
        }
        NodesCommand::Get { node } => {
            let reply = client
                .get_node(pb::GetNodeRequest { node: node.clone() })
                .await
                .map_err(conn.rpc_error(&format!("get node {node:?}")))?
                .into_inner();
            let node = convert(reply)?;
            match ctx.output {
                OutputFormat::Json => output::print_json(&node),
                OutputFormat::Table => print_node(&node),
            }
        }
        NodesCommand::Watch => {
            let mut stream = client
                .watch_nodes(pb::WatchNodesRequest {})
                .await
                .map_err(conn.rpc_error("watch nodes"))?
                .into_inner();
            while let Some(update) = stream
                .message()
                .await
                .map_err(conn.rpc_error("watch nodes"))?
            {
                let update = NodeUpdateView::try_from(update)
                    .map_err(|e| CliError::Other(anyhow::anyhow!("unexpected reply: {e}")))?;
                match ctx.output {
                    OutputFormat::Json => output::print_json_line(&update),
                    OutputFormat::Table => println!(
                        "{}  {:<8}  {:<20}  {:<8}  {}",
                        rfc3339_from_ms(now_ms()),
                        update.kind,
                        update.node.name,
                        short_id(&update.node.id),
                        update.node.status.as_str()
                    ),
                }
            }
        }
        NodesCommand::SetModule {
            node,
            module,
            stage,
        } => {
            let (name, version) = match module.split_once('@') {
                Some((name, version)) => (name.to_string(), version.to_string()),
                None if stage.is_some() => (module.clone(), String::new()),
                None => {
                    return Err(CliError::Other(anyhow::anyhow!(
                        "{module:?} is not NAME@VERSION (give --stage VERSION to only stage)"
                    )));
                }
            };
            let reply = client
                .set_node_module(pb::SetNodeModuleRequest {
                    node: node.clone(),
                    module: name.clone(),
                    version,
                    staged_version: stage.unwrap_or_default(),
                })
                .await
                .map_err(conn.rpc_error(&format!("set module {name:?} on node {node:?}")))?
                .into_inner();
            let node = convert(reply)?;
            match ctx.output {
                OutputFormat::Json => output::print_json(&node),
                OutputFormat::Table => println!(
                    "desired state of {} is now generation {}",
                    node.name, node.desired_generation
                ),
            }
        }
        NodesCommand::UnsetModule { node, module } => {
            let reply = client
                .unset_node_module(pb::UnsetNodeModuleRequest {
                    node: node.clone(),
                    module: module.clone(),
                })
                .await
                .map_err(conn.rpc_error(&format!("unset module {module:?} on node {node:?}")))?
                .into_inner();
            let node = convert(reply)?;
            match ctx.output {
                OutputFormat::Json => output::print_json(&node),
                OutputFormat::Table => println!(
                    "desired state of {} is now generation {}",
                    node.name, node.desired_generation
                ),
            }
        }
        NodesCommand::Remove { node } => {
            let reply = client
                .remove_node(pb::RemoveNodeRequest { node: node.clone() })
                .await
                .map_err(conn.rpc_error(&format!("remove node {node:?}")))?
                .into_inner();
            let node = convert(reply)?;
            match ctx.output {
                OutputFormat::Json => output::print_json(&node),
                OutputFormat::Table => {
                    println!(
                        "removed node {} ({}); its certificate is no longer accepted",
                        node.name, node.id
                    )
                }
            }
        }
    }
    Ok(())
}

fn print_node(node: &NodeView) {
    println!("id:            {}", node.id);
    println!("name:          {}", node.name);
    println!("status:        {}", node.status.as_str());
    println!(
        "last seen:     {} ({})",
        node.last_seen.as_deref().unwrap_or("never"),
        age(node.last_seen.as_deref())
    );
    println!(
        "enrolled at:   {}",
        node.enrolled_at.as_deref().unwrap_or("-")
    );
    println!(
        "agent version: {}",
        if node.agent_version.is_empty() {
            "-"
        } else {
            &node.agent_version
        }
    );
    println!("labels:");
    if node.labels.is_empty() {
        println!("  -");
    }
    for (key, value) in &node.labels {
        println!("  {key}={value}");
    }
    if let Some(usage) = &node.usage {
        println!(
            "usage:         cpu {:.1}%, memory {} / {} MiB",
            usage.cpu_percent,
            usage.memory_used_bytes / (1024 * 1024),
            usage.memory_total_bytes / (1024 * 1024)
        );
    }
    println!(
        "generation:    desired {}, observed {}",
        node.desired_generation, node.observed_generation
    );
    println!("modules:");
    if node.modules.is_empty() {
        println!("  -");
        return;
    }
    let mut table = output::table(&[
        "MODULE", "VERSION", "DESIRED", "PHASE", "HEALTH", "RESTARTS", "REQ/S", "ERR%", "P99",
    ]);
    for m in &node.modules {
        let (rate, errors, p99) = match &m.metrics {
            Some(w) => (
                format!("{:.1}", w.request_rate),
                format!("{:.1}", w.error_rate * 100.0),
                w.latency_p99_seconds
                    .map(|s| format!("{:.0}ms", s * 1000.0))
                    .unwrap_or_else(|| "-".into()),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let dash = |s: &str| {
            if s.is_empty() {
                "-".to_string()
            } else {
                s.to_string()
            }
        };
        table.add_row(vec![
            Cell::new(&m.name),
            Cell::new(dash(&m.version)),
            Cell::new(dash(&m.desired_version)),
            output::status_cell(&m.phase),
            output::status_cell(&m.health),
            Cell::new(m.restarts),
            Cell::new(rate),
            Cell::new(errors),
            Cell::new(p99),
        ]);
    }
    output::print_table(&table);
    for m in node.modules.iter().filter(|m| !m.message.is_empty()) {
        println!("  {}: {}", m.name, m.message);
    }
    for m in node.modules.iter().filter(|m| !m.staged_version.is_empty()) {
        println!("  {}: {} staged", m.name, m.staged_version);
    }
}
