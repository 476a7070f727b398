//! `hotswapctl keys`: publisher key pairs (offline) and the control plane's
//! trusted set.

use std::path::PathBuf;

use clap::Subcommand;
use comfy_table::Cell;
use hotswap_common::artifact::keys;
use hotswap_common::model::PublisherKeyView;
use hotswap_common::pb;
use serde::Serialize;

use crate::client::{CliError, Context};
use crate::output::{self, OutputFormat};

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Generate an ed25519 key pair: PATH.key (0600) and PATH.pub.
    #[command(after_help = "Examples:\n  hotswapctl keys generate --out ./ci")]
    Generate {
        #[arg(long)]
        out: PathBuf,
    },
    /// Trust a public key on the control plane: artifacts it signs can be pushed.
    #[command(after_help = "Examples:\n  hotswapctl keys trust ./ci.pub --name ci")]
    Trust {
        public_key: PathBuf,
        #[arg(long)]
        name: String,
    },
    /// List trusted and revoked publisher keys.
    #[command(after_help = "Examples:\n  hotswapctl keys list\n  hotswapctl -o json keys list")]
    List,
    /// Revoke a key: artifacts signed only by it can no longer be pushed.
    #[command(after_help = "Examples:\n  hotswapctl keys revoke ci")]
    Revoke { name: String },
}

#[derive(Serialize)]
struct GeneratedKey {
    private_key: String,
    public_key: String,
    key_id: String,
}

fn convert(key: pb::PublisherKey) -> Result<PublisherKeyView, CliError> {
    PublisherKeyView::try_from(key)
        .map_err(|e| CliError::Other(anyhow::anyhow!("unexpected reply: {e}")))
}

fn print_keys(ctx: &Context, keys: &[PublisherKeyView]) {
    match ctx.output {
        OutputFormat::Json => output::print_json(&keys),
        OutputFormat::Table => {
            let mut table = output::table(&["NAME", "KEY ID", "STATUS", "ADDED BY"]);
            for key in keys {
                table.add_row(vec![
                    Cell::new(&key.name),
                    Cell::new(&key.key_id),
                    output::status_cell(&key.status),
                    Cell::new(&key.added_by),
                ]);
            }
            output::print_table(&table);
        }
    }
}

pub async fn run(ctx: &Context, command: KeysCommand) -> Result<(), CliError> {
    match command {
        KeysCommand::Generate { out } => {
            let key = keys::generate().map_err(|e| anyhow::anyhow!("{e}"))?;
            let (key_path, pub_path) =
                keys::write_key_pair(&out, &key).map_err(|e| anyhow::anyhow!("{e}"))?;
            let generated = GeneratedKey {
                private_key: key_path.display().to_string(),
                public_key: pub_path.display().to_string(),
                key_id: keys::key_id(&key.verifying_key()),
            };
            match ctx.output {
                OutputFormat::Json => output::print_json(&generated),
                OutputFormat::Table => {
                    println!("private key: {} (keep it secret)", generated.private_key);
                    println!("public key:  {}", generated.public_key);
                    println!("key id:      {}", generated.key_id);
                }
            }
        }
        KeysCommand::Trust { public_key, name } => {
            let pem = std::fs::read_to_string(&public_key).map_err(|e| {
                anyhow::anyhow!("cannot read public key {}: {e}", public_key.display())
            })?;
            keys::parse_public_key(&pem).map_err(|e| {
                anyhow::anyhow!(
                    "{} is not an ed25519 public key in PEM form: {e}",
                    public_key.display()
                )
            })?;
            let conn = ctx.connect()?;
            let mut client = pb::artifacts_client::ArtifactsClient::new(conn.channel.clone());
            let key = client
                .trust_key(pb::TrustKeyRequest {
                    name: name.clone(),
                    public_key_pem: pem,
                })
                .await
                .map_err(conn.rpc_error(&format!("trust key {name:?}")))?
                .into_inner();
            let view = convert(key)?;
            match ctx.output {
                OutputFormat::Json => output::print_json(&view),
                OutputFormat::Table => println!("trusted key {} ({})", view.name, view.key_id),
            }
        }
        KeysCommand::List => {
            let conn = ctx.connect()?;
            let mut client = pb::artifacts_client::ArtifactsClient::new(conn.channel.clone());
            let reply = client
                .list_keys(pb::ListKeysRequest {})
                .await
                .map_err(conn.rpc_error("list keys"))?
                .into_inner();
            let keys = reply
                .keys
                .into_iter()
                .map(convert)
                .collect::<Result<Vec<_>, _>>()?;
            print_keys(ctx, &keys);
        }
        KeysCommand::Revoke { name } => {
            let conn = ctx.connect()?;
            let mut client = pb::artifacts_client::ArtifactsClient::new(conn.channel.clone());
            let key = client
                .revoke_key(pb::RevokeKeyRequest { name: name.clone() })
                .await
                .map_err(conn.rpc_error(&format!("revoke key {name:?}")))?
                .into_inner();
            let view = convert(key)?;
            match ctx.output {
                OutputFormat::Json => output::print_json(&view),
                OutputFormat::Table => println!("revoked key {} ({})", view.name, view.key_id),
            }
        }
    }
    Ok(())
}
