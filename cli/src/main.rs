//! `hotswapctl`: the operator's gRPC client for the hotswap control plane.
//! It owns command-line parsing, profiles, output formatting (tables for
//! people, JSON for scripts) and exit codes; all state lives server-side.
//!
//! Exit codes: 0 success, 1 error, 2 usage, 5 unauthenticated or denied.

mod client;
mod nodes;
mod output;
mod tokens;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::client::CliError;
use crate::output::OutputFormat;

#[derive(Parser)]
#[command(
    name = "hotswapctl",
    version,
    about = "Drive a hotswap control plane",
    after_help = "Examples:\n  hotswapctl --profile ./admin.profile.toml nodes list\n  hotswapctl tokens create --ttl 1h --uses 3 --label environment=dev\n  hotswapctl -o json nodes get web-1"
)]
pub struct Cli {
    /// Profile with endpoint, CA and client credentials.
    #[arg(long, global = true, env = "HOTSWAP_PROFILE")]
    profile: Option<PathBuf>,
    /// Control plane URL; overrides the profile's.
    #[arg(long, global = true, env = "HOTSWAP_ENDPOINT")]
    endpoint: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, default_value = "table")]
    output: OutputFormat,
    /// Never use colour (also when NO_COLOR is set).
    #[arg(long, global = true)]
    no_color: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join tokens for enrolling nodes.
    #[command(subcommand)]
    Tokens(tokens::TokensCommand),
    /// The fleet: list, inspect, watch and remove nodes.
    #[command(subcommand)]
    Nodes(nodes::NodesCommand),
}

fn main() -> ExitCode {
    hotswap_common::install_crypto_provider();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            return report(&CliError::Other(anyhow::anyhow!(
                "cannot start the async runtime: {e}"
            )));
        }
    };
    let result = runtime.block_on(async {
        let ctx = client::Context::new(cli.profile.clone(), cli.endpoint.clone(), cli.output);
        match cli.command {
            Command::Tokens(cmd) => tokens::run(&ctx, cmd).await,
            Command::Nodes(cmd) => nodes::run(&ctx, cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => report(&e),
    }
}

fn report(error: &CliError) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(error.exit_code())
}
