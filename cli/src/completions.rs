//! `hotswapctl completions`: shell completion scripts, generated from the
//! command-line definition itself so they never drift from it. Needs no
//! profile and no control plane.

use std::io::Write;

use clap::{Args, CommandFactory};
use clap_complete::Shell;

use crate::client::CliError;

#[derive(Args)]
#[command(
    after_help = "The script goes to stdout; install it where your shell looks for completions.\n\nExamples:\n  hotswapctl completions bash > /etc/bash_completion.d/hotswapctl\n  hotswapctl completions zsh > /usr/local/share/zsh/site-functions/_hotswapctl\n  hotswapctl completions fish > ~/.config/fish/completions/hotswapctl.fish\n  source <(hotswapctl completions bash)    # the current bash session only"
)]
pub struct CompletionsArgs {
    /// The shell to write the script for.
    shell: Shell,
}

pub fn run(args: CompletionsArgs) -> Result<(), CliError> {
    let script = script(args.shell);
    let mut out = std::io::stdout().lock();
    match out.write_all(&script).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        // `hotswapctl completions bash | head` is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(anyhow::anyhow!("cannot write the completion script: {e}").into()),
    }
}

/// The whole script, built in memory first: clap_complete panics on a failed
/// write, and a closed stdout must end in an error message, not a panic.
fn script(shell: Shell) -> Vec<u8> {
    let mut command = crate::Cli::command();
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut command, "hotswapctl", &mut script);
    script
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_that_knows_the_commands() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let script = String::from_utf8(script(shell)).expect("utf-8 script");
            assert!(!script.trim().is_empty(), "{shell}: empty script");
            assert!(script.contains("hotswapctl"), "{shell}: no program name");
            // Top-level and nested subcommands, and a global flag.
            for word in ["deploy", "completions", "set-module", "no-color"] {
                assert!(script.contains(word), "{shell}: {word:?} missing");
            }
        }
    }
}
