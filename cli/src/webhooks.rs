//! `hotswapctl webhooks` (SPEC §9): receivers of the fleet's events.

use std::path::{Path, PathBuf};

use clap::Subcommand;
use comfy_table::Cell;
use hotswap_common::model::{WebhookTestView, WebhookView};
use hotswap_common::pb;

use crate::client::{CliError, Context};
use crate::output::{self, OutputFormat};

#[derive(Subcommand)]
pub enum WebhooksCommand {
    /// POST every matching event from now on to URL, in sequence order, at
    /// least once, signed with the secret when one is given.
    #[command(
        after_help = "Examples:\n  hotswapctl webhooks create --url https://ci.example.com/hotswap --secret-file ./hook.secret\n  hotswapctl webhooks create --url https://hooks.slack.com/services/T/B/X --format slack --kind deployment.finished\n  hotswapctl webhooks create --url https://hooks.internal:8443/in --ca-file ./internal-ca.pem --kind deployment --kind node.disconnected"
    )]
    Create {
        /// The receiver: an http:// or https:// URL (not the control plane's own ports).
        #[arg(long)]
        url: String,
        /// Only events of this kind, or kinds under it (`deployment` matches
        /// `deployment.finished`); repeatable. None: every event.
        #[arg(long = "kind")]
        kinds: Vec<String>,
        /// File holding the HMAC-SHA256 key for `X-Hotswap-Signature` (one
        /// trailing newline is dropped). Without it, deliveries are unsigned.
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// json (the event as `events -o json` prints it) or slack
        /// (`{"text": ...}`).
        #[arg(long, default_value = "json")]
        format: String,
        /// PEM CA certificates to verify an https:// receiver with instead
        /// of the system roots.
        #[arg(long)]
        ca_file: Option<PathBuf>,
    },
    /// Every webhook with its last delivered seq, last error and backlog.
    #[command(
        after_help = "Examples:\n  hotswapctl webhooks list\n  hotswapctl -o json webhooks list"
    )]
    List,
    /// Delete a webhook; its undelivered events are dropped.
    #[command(after_help = "Examples:\n  hotswapctl webhooks delete wh-0123456789")]
    Delete { id: String },
    /// Send one `webhook.test` delivery now; exits 1 unless the receiver
    /// accepts it.
    #[command(after_help = "Examples:\n  hotswapctl webhooks test wh-0123456789")]
    Test { id: String },
}

/// The secret in `path`, less one trailing newline.
fn read_secret(path: &Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read secret file {}: {e}; no webhook was created",
            path.display()
        )
    })?;
    let secret = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(&text)
        .to_string();
    if secret.is_empty() {
        return Err(anyhow::anyhow!(
            "secret file {} is empty; no webhook was created",
            path.display()
        )
        .into());
    }
    Ok(secret)
}

fn read_ca(path: &Path) -> Result<String, CliError> {
    Ok(std::fs::read_to_string(path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read CA file {}: {e}; no webhook was created",
            path.display()
        )
    })?)
}

fn print_one(ctx: &Context, view: &WebhookView) {
    match ctx.output {
        OutputFormat::Json => output::print_json(view),
        OutputFormat::Table => print_table(std::slice::from_ref(view)),
    }
}

fn print_table(views: &[WebhookView]) {
    let mut table = output::table(&[
        "ID",
        "URL",
        "KINDS",
        "FORMAT",
        "DELIVERED",
        "BACKLOG",
        "LAST ERROR",
    ]);
    for view in views {
        table.add_row(vec![
            Cell::new(&view.id),
            Cell::new(&view.url),
            Cell::new(if view.kinds.is_empty() {
                "*".to_string()
            } else {
                view.kinds.join(",")
            }),
            Cell::new(format!(
                "{}{}",
                view.format,
                if view.signed { " signed" } else { "" }
            )),
            Cell::new(
                view.last_delivered_seq
                    .map_or("-".to_string(), |s| s.to_string()),
            ),
            Cell::new(view.backlog),
            Cell::new(view.last_error.as_deref().unwrap_or("-")),
        ]);
    }
    output::print_table(&table);
}

pub async fn run(ctx: &Context, command: WebhooksCommand) -> Result<(), CliError> {
    // Local input first: a missing file changes nothing on the server.
    let create = match &command {
        WebhooksCommand::Create {
            url,
            kinds,
            secret_file,
            format,
            ca_file,
        } => Some(pb::CreateWebhookRequest {
            url: url.clone(),
            kinds: kinds.clone(),
            secret: secret_file
                .as_deref()
                .map(read_secret)
                .transpose()?
                .unwrap_or_default(),
            format: format.clone(),
            ca_pem: ca_file
                .as_deref()
                .map(read_ca)
                .transpose()?
                .unwrap_or_default(),
        }),
        _ => None,
    };
    let conn = ctx.connect()?;
    let mut client = pb::webhooks_client::WebhooksClient::new(conn.channel.clone());
    match command {
        WebhooksCommand::Create { .. } => {
            let Some(request) = create else {
                return Ok(());
            };
            let webhook = client
                .create_webhook(request)
                .await
                .map_err(conn.rpc_error("create webhook"))?
                .into_inner();
            print_one(ctx, &WebhookView::from(webhook));
        }
        WebhooksCommand::List => {
            let reply = client
                .list_webhooks(pb::ListWebhooksRequest {})
                .await
                .map_err(conn.rpc_error("list webhooks"))?
                .into_inner();
            let views: Vec<WebhookView> =
                reply.webhooks.into_iter().map(WebhookView::from).collect();
            match ctx.output {
                OutputFormat::Json => output::print_json(&views),
                OutputFormat::Table => print_table(&views),
            }
        }
        WebhooksCommand::Delete { id } => {
            let webhook = client
                .delete_webhook(pb::DeleteWebhookRequest { id })
                .await
                .map_err(conn.rpc_error("delete webhook"))?
                .into_inner();
            print_one(ctx, &WebhookView::from(webhook));
        }
        WebhooksCommand::Test { id } => {
            let reply = client
                .test_webhook(pb::TestWebhookRequest { id: id.clone() })
                .await
                .map_err(conn.rpc_error("test webhook"))?
                .into_inner();
            let view = WebhookTestView::from_pb(&id, reply);
            match ctx.output {
                OutputFormat::Json => output::print_json(&view),
                OutputFormat::Table if view.delivered => println!(
                    "webhook {id}: delivered (HTTP {})",
                    view.status.unwrap_or_default()
                ),
                OutputFormat::Table => {}
            }
            if !view.delivered {
                return Err(anyhow::anyhow!(
                    "webhook {id}: test delivery failed: {}",
                    view.error.as_deref().unwrap_or("no answer")
                )
                .into());
            }
        }
    }
    Ok(())
}
