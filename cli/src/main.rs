//! `hotswapctl`: the operator's gRPC client for the hotswap control plane.
//! It owns command-line parsing, profiles, output formatting (tables for
//! people, JSON for scripts) and exit codes; all state lives server-side.
//!
//! Exit codes: 0 success, 1 error, 2 usage, 5 unauthenticated or denied.

mod audit;
mod client;
mod clusters;
mod completions;
mod deploy;
mod events;
mod freeze;
mod history;
mod keys;
mod live;
mod module;
mod nodes;
mod output;
mod pipeline;
mod servers;
mod tokens;
mod ui;
mod users;
mod webhooks;

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ColorChoice, CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::client::CliError;
use crate::output::OutputFormat;

#[derive(Parser)]
#[command(
    name = "hotswapctl",
    version,
    about = "Drive a hotswap control plane",
    after_help = "Examples:\n  hotswapctl --profile ./admin.profile.toml nodes list\n  hotswapctl tokens create --ttl 1h --uses 3 --label environment=dev\n  hotswapctl -o json nodes get web-1\n  hotswapctl servers list"
)]
pub struct Cli {
    /// Profile with endpoint, CA and client credentials.
    #[arg(long, global = true, env = "HOTSWAP_PROFILE")]
    profile: Option<PathBuf>,
    /// Control plane URL, or several comma-separated for replicas (tried from a random one, skipping any that does not answer); overrides the profile's.
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
    #[command(
        subcommand,
        after_help = "Examples:\n  hotswapctl tokens create --ttl 1h --uses 10 --label environment=production\n  hotswapctl -o json tokens create"
    )]
    Tokens(tokens::TokensCommand),
    /// The fleet: list, inspect, watch and remove nodes.
    #[command(
        subcommand,
        after_help = "Examples:\n  hotswapctl nodes list --env production\n  hotswapctl nodes get web-1\n  hotswapctl -o json nodes watch"
    )]
    Nodes(nodes::NodesCommand),
    /// Publisher keys: generate key pairs, manage the trusted set.
    #[command(
        subcommand,
        after_help = "Examples:\n  hotswapctl keys generate --out ./ci\n  hotswapctl keys trust ./ci.pub --name ci\n  hotswapctl keys list"
    )]
    Keys(keys::KeysCommand),
    /// Module artifacts: pack, sign, verify, inspect, push, browse.
    #[command(
        subcommand,
        after_help = "Examples:\n  hotswapctl module pack ./hello --key ./ci.key -o hello-1.2.0.hsm\n  hotswapctl module push hello-1.2.0.hsm\n  hotswapctl module get hello"
    )]
    Module(module::ModuleCommand),
    /// Deployments: create, watch and control.
    #[command(
        subcommand,
        after_help = "Examples:\n  hotswapctl deploy create hello@1.2.0 --env dev --wait\n  hotswapctl deploy list\n  hotswapctl deploy watch d-0123456789\n  hotswapctl deploy rollback d-0123456789"
    )]
    Deploy(deploy::DeployCommand),
    /// Promote a version through the environments.
    #[command(
        subcommand,
        after_help = "Examples:\n  hotswapctl pipeline run hello@1.2.0 --to staging --wait\n  hotswapctl pipeline get p-0123456789"
    )]
    Pipeline(pipeline::PipelineCommand),
    /// Deployment freezes: no deployment starts in a frozen environment.
    #[command(
        subcommand,
        after_help = "Examples:\n  hotswapctl freeze create --env production --for 2h --reason \"incident INC-42\"\n  hotswapctl freeze list\n  hotswapctl freeze delete fz-0123456789"
    )]
    Freeze(freeze::FreezeCommand),
    /// The desired-state history: an environment as it was, and what changed.
    #[command(
        after_help = "Examples:\n  hotswapctl history --env production --at 2026-12-01T12:00:00Z\n  hotswapctl -o json history --env dev --seq 120\n  hotswapctl history diff --from 2026-12-01T12:00:00Z --env production"
    )]
    History(history::HistoryArgs),
    /// Operator credentials and roles.
    #[command(
        subcommand,
        after_help = "Examples:\n  hotswapctl users create alice --role deployer --out alice.profile.toml\n  hotswapctl users list\n  hotswapctl users revoke alice"
    )]
    Users(users::UsersCommand),
    /// The tamper-evident audit log.
    #[command(
        subcommand,
        after_help = "Examples:\n  hotswapctl audit list --user alice --limit 20\n  hotswapctl audit verify"
    )]
    Audit(audit::AuditCommand),
    /// The durable event stream: replay from a sequence number, follow live.
    Events(events::EventsArgs),
    /// Per-environment health, module versions and metric averages.
    #[command(
        subcommand,
        after_help = "Examples:\n  hotswapctl clusters list\n  hotswapctl clusters get production"
    )]
    Clusters(clusters::ClustersCommand),
    /// The control-plane replicas: leader, readiness, agent sessions.
    #[command(
        subcommand,
        after_help = "Examples:\n  hotswapctl servers list\n  hotswapctl -o json servers get cp-a"
    )]
    Servers(servers::ServersCommand),
    /// Webhooks: signed HTTP deliveries of the fleet's events (admin only).
    #[command(
        subcommand,
        after_help = "Examples:\n  hotswapctl webhooks create --url https://ci.example.com/hook --secret-file ./hook.secret --kind deployment\n  hotswapctl webhooks list\n  hotswapctl webhooks test wh-0123456789"
    )]
    Webhooks(webhooks::WebhooksCommand),
    /// The live web dashboard on this machine, acting with your profile.
    Ui(ui::UiArgs),
    /// Print a shell completion script (bash, zsh, fish, ...) to stdout.
    Completions(completions::CompletionsArgs),
}

fn main() -> ExitCode {
    hotswap_common::install_crypto_provider();
    let cli = parse(rewrite_pack_output(std::env::args_os().collect()));
    output::init_color(cli.no_color);
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
            Command::History(args) => done(history::run(&ctx, args).await),
            Command::Users(cmd) => done(users::run(&ctx, cmd).await),
            Command::Freeze(cmd) => done(freeze::run(&ctx, cmd).await),
            Command::Audit(cmd) => done(audit::run(&ctx, cmd).await),
            Command::Events(args) => done(events::run(&ctx, args).await),
            Command::Clusters(cmd) => done(clusters::run(&ctx, cmd).await),
            Command::Servers(cmd) => done(servers::run(&ctx, cmd).await),
            Command::Webhooks(cmd) => done(webhooks::run(&ctx, cmd).await),
            Command::Ui(args) => done(ui::run(&ctx, args).await),
            Command::Completions(args) => done(completions::run(args)),
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => report(&e),
    }
}

/// Parse the command line. clap colours its own help and usage errors on a
/// terminal (and honours NO_COLOR by itself); `--no-color` has to be seen
/// before parsing to turn that off as well.
fn parse(args: Vec<OsString>) -> Cli {
    let no_color = args
        .iter()
        .skip(1)
        .take_while(|a| *a != "--")
        .any(|a| a == "--no-color");
    let color = if no_color {
        ColorChoice::Never
    } else {
        ColorChoice::Auto
    };
    let mut command = Cli::command().color(color);
    let matches = command.clone().get_matches_from(args);
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.format(&mut command).exit())
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
        Cli::command().debug_assert();
    }

    /// Every command's `--help`, with its full command path.
    fn all_commands() -> Vec<(String, clap::Command)> {
        fn walk(path: String, command: &clap::Command, out: &mut Vec<(String, clap::Command)>) {
            for sub in command.get_subcommands().filter(|c| c.get_name() != "help") {
                let sub_path = format!("{path} {}", sub.get_name());
                out.push((sub_path.clone(), sub.clone()));
                walk(sub_path, sub, out);
            }
        }
        let mut out = Vec::new();
        walk("hotswapctl".to_string(), &Cli::command(), &mut out);
        out
    }

    /// The `hotswapctl ...` lines of a help's examples, as argument lists:
    /// shell quotes removed, cut at a pipe, a redirection or a comment.
    fn example_invocations(after_help: &str) -> Vec<Vec<String>> {
        let mut invocations = Vec::new();
        for line in after_help.lines().map(str::trim) {
            if !line.starts_with("hotswapctl ") {
                continue;
            }
            let mut words: Vec<String> = Vec::new();
            let (mut word, mut quote, mut in_word) = (String::new(), None, false);
            for c in line.chars().chain([' ']) {
                match (quote, c) {
                    (Some(q), c) if c == q => quote = None,
                    (Some(_), c) => word.push(c),
                    (None, '"' | '\'') => {
                        quote = Some(c);
                        in_word = true;
                    }
                    (None, ' ') if in_word => {
                        words.push(std::mem::take(&mut word));
                        in_word = false;
                    }
                    (None, ' ') => {}
                    (None, c) => {
                        word.push(c);
                        in_word = true;
                    }
                }
            }
            let end = words
                .iter()
                .position(|w| ["|", ">", ">>", "#"].contains(&w.as_str()) || w.starts_with('#'))
                .unwrap_or(words.len());
            words.truncate(end);
            invocations.push(words);
        }
        invocations
    }

    #[test]
    fn every_command_has_examples() {
        let mut missing = Vec::new();
        for (path, command) in all_commands() {
            let after_help = command.get_after_help().map(|h| h.to_string());
            let has_examples = after_help
                .as_deref()
                .is_some_and(|h| h.contains("Examples:\n") && !example_invocations(h).is_empty());
            if !has_examples {
                missing.push(path);
            }
        }
        assert!(
            missing.is_empty(),
            "no Examples: block in --help of {missing:?}"
        );
    }

    #[test]
    fn every_example_parses() {
        let mut checked = 0;
        for (path, command) in all_commands() {
            let Some(after_help) = command.get_after_help().map(|h| h.to_string()) else {
                continue;
            };
            for words in example_invocations(&after_help) {
                let args = rewrite_pack_output(words.iter().map(OsString::from).collect());
                if let Err(e) = Cli::try_parse_from(args) {
                    panic!("example in `{path} --help` does not parse: {words:?}: {e}");
                }
                checked += 1;
            }
        }
        assert!(checked > 40, "only {checked} examples found");
    }

    #[test]
    fn example_lines_split_like_a_shell() {
        let help = "Examples:\n  hotswapctl deploy approve d-1 --reason \"plan reviewed\"\n  hotswapctl -o json nodes watch | jq .x\n  source <(hotswapctl completions bash)\n  hotswapctl completions zsh > _hotswapctl    # zsh";
        assert_eq!(
            example_invocations(help),
            [
                vec![
                    "hotswapctl",
                    "deploy",
                    "approve",
                    "d-1",
                    "--reason",
                    "plan reviewed"
                ],
                vec!["hotswapctl", "-o", "json", "nodes", "watch"],
                vec!["hotswapctl", "completions", "zsh"],
            ]
        );
    }

    #[test]
    fn no_color_flag_is_seen_before_parsing() {
        // Parsing succeeds with the flag anywhere before `--`, as a global flag.
        let cli = parse(
            ["hotswapctl", "completions", "bash", "--no-color"]
                .map(OsString::from)
                .to_vec(),
        );
        assert!(cli.no_color);
    }
}
