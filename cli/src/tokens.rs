//! `hotswapctl tokens`.

use std::time::Duration;

use clap::Subcommand;
use hotswap_common::labels::parse_label;
use hotswap_common::model::TokenView;
use hotswap_common::pb;
use hotswap_common::timefmt::parse_duration;

use crate::client::{CliError, Context};
use crate::output::{self, OutputFormat};

#[derive(Subcommand)]
pub enum TokensCommand {
    /// Create a join token; labels given here are forced on nodes that use it.
    #[command(
        after_help = "Examples:\n  hotswapctl tokens create\n  hotswapctl tokens create --ttl 24h --uses 10 --label environment=production"
    )]
    Create {
        /// Lifetime of the token; without it, the control plane's
        /// `token_default_ttl` (1h unless configured).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// How many nodes may enroll with it.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        uses: u32,
        /// Label `key=value` forced on enrolling nodes (repeatable).
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
    },
}

pub async fn run(ctx: &Context, command: TokensCommand) -> Result<(), CliError> {
    match command {
        TokensCommand::Create { ttl, uses, labels } => {
            // The wire counts whole seconds and 0 means "the control plane's
            // default", so a lifetime under a second cannot be sent as what
            // it is: refuse it here rather than round it to 1s or to 1h.
            if let Some(ttl) = ttl
                && ttl < Duration::from_secs(1)
            {
                return Err(CliError::Other(anyhow::anyhow!(
                    "--ttl {}ms is below 1s: a join token must live at least a second",
                    ttl.as_millis()
                )));
            }
            let conn = ctx.connect()?;
            let mut client = pb::fleet_client::FleetClient::new(conn.channel.clone());
            let request = pb::CreateTokenRequest {
                // 0: the control plane's default.
                ttl_seconds: ttl.map_or(0, |ttl| ttl.as_secs()),
                uses,
                labels: labels.into_iter().collect(),
            };
            let token = client
                .create_token(request)
                .await
                .map_err(conn.rpc_error("create token"))?
                .into_inner();
            let view =
                TokenView::try_from(token).map_err(|e| anyhow::anyhow!("unexpected reply: {e}"))?;
            match ctx.output {
                OutputFormat::Json => output::print_json(&view),
                OutputFormat::Table => {
                    println!("token:          {}", view.token);
                    println!("ca fingerprint: {}", view.ca_fingerprint);
                    println!(
                        "expires at:     {}",
                        view.expires_at.as_deref().unwrap_or("-")
                    );
                    println!("uses:           {}", view.uses);
                    let labels: Vec<String> = view
                        .labels
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect();
                    println!(
                        "labels:         {}",
                        if labels.is_empty() {
                            "-".to_string()
                        } else {
                            labels.join(",")
                        }
                    );
                    println!();
                    println!("enroll a node with:");
                    println!(
                        "  HOTSWAP_JOIN_TOKEN={} hotswap-agent run --data-dir DIR --control-plane {} --ca-fingerprint {}",
                        view.token, conn.endpoint, view.ca_fingerprint
                    );
                }
            }
            Ok(())
        }
    }
}
