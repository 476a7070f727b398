//! `hotswapctl clusters`: per-environment health, module versions and
//! node metric averages.

use clap::Subcommand;
use hotswap_common::pb;

use crate::client::{CliError, Context};
use crate::output::{self, OutputFormat};

#[derive(Subcommand)]
pub enum ClustersCommand {
    /// Every environment: nodes, health, versions in use.
    #[command(
        after_help = "Examples:\n  hotswapctl clusters list\n  hotswapctl -o json clusters list"
    )]
    List,
    /// One environment in detail, with metric averages.
    #[command(
        after_help = "Examples:\n  hotswapctl clusters get production\n  hotswapctl -o json clusters get dev"
    )]
    Get { environment: String },
}

pub(crate) use hotswap_common::model::ClusterView;

fn versions(c: &ClusterView) -> String {
    if c.modules.is_empty() {
        return "-".into();
    }
    c.modules
        .iter()
        .map(|m| format!("{}@{} ({})", m.name, m.version, m.nodes))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How many nodes are not on some current version of their environment.
fn drifting(c: &ClusterView) -> usize {
    c.current
        .iter()
        .flat_map(|current| current.drift.iter())
        .collect::<std::collections::BTreeSet<_>>()
        .len()
}

/// Drifting nodes, at most a few by name.
fn drift(nodes: &[String]) -> String {
    const SHOWN: usize = 5;
    match nodes.len() {
        0 => "-".into(),
        n if n <= SHOWN => nodes.join(", "),
        n => format!("{} and {} more", nodes[..SHOWN].join(", "), n - SHOWN),
    }
}

fn show(v: Option<f64>, unit: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".into(), unit)
}

pub async fn run(ctx: &Context, command: ClustersCommand) -> Result<(), CliError> {
    let conn = ctx.connect()?;
    let mut client = pb::clusters_client::ClustersClient::new(conn.channel.clone());
    match command {
        ClustersCommand::List => {
            let clusters: Vec<ClusterView> = client
                .list_clusters(pb::ListClustersRequest {})
                .await
                .map_err(conn.rpc_error("list clusters"))?
                .into_inner()
                .clusters
                .into_iter()
                .map(ClusterView::try_from)
                .collect::<Result<_, _>>()?;
            match ctx.output {
                OutputFormat::Json => output::print_json(&clusters),
                OutputFormat::Table => {
                    let mut table = output::table(&[
                        "ENV",
                        "NODES",
                        "HEALTHY",
                        "DEPLOYING",
                        "DRIFT",
                        "VERSIONS",
                    ]);
                    for c in &clusters {
                        table.add_row(vec![
                            c.environment.clone(),
                            format!("{}/{}", c.connected, c.nodes),
                            format!("{}/{}", c.healthy, c.healthy + c.unhealthy + c.unknown),
                            c.active_deployments.len().to_string(),
                            drifting(c).to_string(),
                            versions(c),
                        ]);
                    }
                    output::print_table(&table);
                }
            }
        }
        ClustersCommand::Get { environment } => {
            let c: ClusterView = client
                .get_cluster(pb::GetClusterRequest { environment })
                .await
                .map_err(conn.rpc_error("get cluster"))?
                .into_inner()
                .try_into()?;
            match ctx.output {
                OutputFormat::Json => output::print_json(&c),
                OutputFormat::Table => {
                    println!("environment:  {}", c.environment);
                    println!("nodes:        {} connected of {}", c.connected, c.nodes);
                    println!(
                        "modules:      {} healthy, {} unhealthy, {} unknown",
                        c.healthy, c.unhealthy, c.unknown
                    );
                    println!(
                        "cpu:          {}",
                        show(c.cpu_percent, |v| format!("{v:.1}% (avg per node)"))
                    );
                    println!(
                        "memory:       {}",
                        show(c.memory_used_bytes, |v| format!(
                            "{:.0} MiB (avg per node)",
                            v / 1048576.0
                        ))
                    );
                    println!(
                        "requests:     {}",
                        show(c.request_rate, |v| format!("{v:.1}/s (avg per instance)"))
                    );
                    println!(
                        "errors:       {}",
                        show(c.error_rate, |v| format!("{:.2}%", v * 100.0))
                    );
                    println!(
                        "latency p99:  {}",
                        show(c.latency_p99_seconds, |v| format!("{:.1} ms", v * 1000.0))
                    );
                    println!(
                        "deploying:    {}",
                        if c.active_deployments.is_empty() {
                            "-".to_string()
                        } else {
                            c.active_deployments.join(", ")
                        }
                    );
                    if !c.current.is_empty() {
                        println!();
                        let mut table = output::table(&["MODULE", "CURRENT", "DRIFT"]);
                        for current in &c.current {
                            table.add_row(vec![
                                current.module.clone(),
                                current.version.clone(),
                                drift(&current.drift),
                            ]);
                        }
                        output::print_table(&table);
                    }
                    if !c.modules.is_empty() {
                        println!();
                        let mut table = output::table(&["MODULE", "VERSION", "NODES", "HEALTHY"]);
                        for m in &c.modules {
                            table.add_row(vec![
                                m.name.clone(),
                                m.version.clone(),
                                m.nodes.to_string(),
                                m.healthy.to_string(),
                            ]);
                        }
                        output::print_table(&table);
                    }
                }
            }
        }
    }
    Ok(())
}
