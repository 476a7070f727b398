//! `hotswapctl`: the operator's gRPC client for the hotswap control plane.
//! It owns command-line parsing, profiles, output formatting (tables for
//! people, JSON for scripts) and exit codes; all state lives server-side.
//!
//! Exit codes: 0 success, 1 error, 2 usage, 5 unauthenticated or denied.

mod audit;
mod client;
mod clusters;
mod deploy;
mod events;
mod keys;
mod live;
mod module;
mod nodes;
mod output;
mod pipeline;
mod tokens;
mod users;

use std::ffi::OsString;
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
    /// Publisher keys: generate key pairs, manage the trusted set.
    #[command(subcommand)]
    Keys(keys::KeysCommand),
    /// Module artifacts: pack, sign, verify, inspect, push, browse.
    #[command(subcommand)]
    Module(module::ModuleCommand),
    /// Deployments: create, watch and control.
    #[command(subcommand)]
    Deploy(deploy::DeployCommand),
    /// Promote a version through the environments.
    #[command(subcommand)]
    Pipeline(pipeline::PipelineCommand),
    /// Operator credentials and roles.
    #[command(subcommand)]
    Users(users::UsersCommand),
    /// The tamper-evident audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// The durable event stream: replay from a sequence number, follow live.
    Events(events::EventsArgs),
    /// Per-environment health, module versions and metric averages.
    #[command(subcommand)]
    Clusters(clusters::ClustersCommand),
}

fn main() -> ExitCode {
    hotswap_common::install_crypto_provider();
    let cli = Cli::parse_from(rewrite_pack_output(std::env::args_os().collect()));
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
        let done = |r: Result<(), CliError>| r.map(|()| ExitCode::SUCCESS);
        match cli.command {
            Command::Tokens(cmd) => done(tokens::run(&ctx, cmd).await),
            Command::Nodes(cmd) => done(nodes::run(&ctx, cmd).await),
            Command::Keys(cmd) => done(keys::run(&ctx, cmd).await),
            Command::Module(cmd) => done(module::run(&ctx, cmd).await),
            Command::Deploy(cmd) => outcome(deploy::run(&ctx, cmd).await),
            Command::Pipeline(cmd) => outcome(pipeline::run(&ctx, cmd).await),
            Command::Users(cmd) => done(users::run(&ctx, cmd).await),
            Command::Audit(cmd) => done(audit::run(&ctx, cmd).await),
            Command::Events(args) => done(events::run(&ctx, args).await),
            Command::Clusters(cmd) => done(clusters::run(&ctx, cmd).await),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => report(&e),
    }
}

/// Exit codes of commands that follow a deployment or pipeline (SPEC §4).
fn outcome(result: Result<deploy::Outcome, CliError>) -> Result<ExitCode, CliError> {
    match result {
        Ok(deploy::Outcome::Done) => Ok(ExitCode::SUCCESS),
        Ok(deploy::Outcome::Ended(message)) => {
            eprintln!("{message}");
            Ok(ExitCode::from(3))
        }
        Ok(deploy::Outcome::TimedOut) => Ok(ExitCode::from(4)),
        Err(e) => Err(e),
    }
}

/// SPEC gives both the global `-o table|json` and `module pack DIR -o FILE`.
/// After `module pack`, `-o` is the artifact file, so it is rewritten to
/// `--out` before clap sees it; `--output` still selects the format there.
fn rewrite_pack_output(args: Vec<OsString>) -> Vec<OsString> {
    let words: Vec<Option<&str>> = args.iter().map(|a| a.to_str()).collect();
    let pack_at = words
        .windows(2)
        .position(|w| w[0] == Some("module") && w[1] == Some("pack"))
        .map(|i| i + 1);
    let Some(pack_at) = pack_at else { return args };
    args.iter()
        .enumerate()
        .map(|(i, arg)| match (i > pack_at, arg.to_str()) {
            (true, Some("-o")) => OsString::from("--out"),
            (true, Some(a)) if a.starts_with("-o") && a.len() > 2 => {
                OsString::from(format!("--out={}", a[2..].trim_start_matches('=')))
            }
            _ => arg.clone(),
        })
        .collect()
}

fn report(error: &CliError) -> ExitCode {
    eprintln!("error: {error}");
    ExitCode::from(error.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewrite(args: &[&str]) -> Vec<String> {
        rewrite_pack_output(args.iter().map(OsString::from).collect())
            .into_iter()
            .map(|a| a.into_string().unwrap_or_default())
            .collect()
    }

    #[test]
    fn pack_output_flag_names_the_file() {
        assert_eq!(
            rewrite(&[
                "hotswapctl",
                "-o",
                "json",
                "module",
                "pack",
                "d",
                "--key",
                "k",
                "-o",
                "f.hsm"
            ]),
            [
                "hotswapctl",
                "-o",
                "json",
                "module",
                "pack",
                "d",
                "--key",
                "k",
                "--out",
                "f.hsm"
            ]
        );
        assert_eq!(
            rewrite(&["hotswapctl", "module", "pack", "d", "-of.hsm"]),
            ["hotswapctl", "module", "pack", "d", "--out=f.hsm"]
        );
        assert_eq!(
            rewrite(&["hotswapctl", "module", "pack", "d", "-o=f.hsm"]),
            ["hotswapctl", "module", "pack", "d", "--out=f.hsm"]
        );
        // Other commands keep -o as the output format.
        assert_eq!(
            rewrite(&["hotswapctl", "module", "push", "f", "-o", "json"]),
            ["hotswapctl", "module", "push", "f", "-o", "json"]
        );
        assert_eq!(
            rewrite(&["hotswapctl", "nodes", "list", "-o", "json"]),
            ["hotswapctl", "nodes", "list", "-o", "json"]
        );
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
