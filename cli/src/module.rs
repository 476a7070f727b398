//! `hotswapctl module`: build, sign and check artifacts offline; push them to
//! the control plane and browse what it stores.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use hotswap_common::artifact::format::read_artifact;
use hotswap_common::artifact::keys::{self, TrustSet};
use hotswap_common::artifact::limits::{Limits, module_label};
use hotswap_common::artifact::pack::{add_signature, pack_and_sign};
use hotswap_common::artifact::{ArtifactInfo, Signature};
use hotswap_common::model::{ModuleVersionView, ModuleView};
use hotswap_common::pb;
use hotswap_common::timefmt::{now_ms, parse_duration, rfc3339_from_ms};
use serde::Serialize;
use tokio::io::AsyncReadExt;

use crate::client::{CliError, Context};
use crate::output::{self, OutputFormat};

#[derive(Subcommand)]
pub enum ModuleCommand {
    /// Build and sign an artifact from DIR/module.toml and the files beside it.
    #[command(
        after_help = "After `pack`, -o names the artifact file (same as --out); choose the output\nformat with --output json.\n\nExamples:\n  hotswapctl module pack ./hello --key ./ci.key -o hello-1.2.0.hsm"
    )]
    Pack {
        dir: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// Artifact file to write (`-o` works too, see below).
        #[arg(long = "out")]
        out: PathBuf,
    },
    /// Add a signature to an artifact (e.g. a second publisher's).
    #[command(
        after_help = "Examples:\n  hotswapctl module sign hello-1.2.0.hsm --key ./release.key --expires-in 90d"
    )]
    Sign {
        file: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// Make the signature expire after this long.
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<Duration>,
    },
    /// Check an artifact's structure and signatures against public keys.
    #[command(after_help = "Examples:\n  hotswapctl module verify hello-1.2.0.hsm --pub ./ci.pub")]
    Verify {
        file: PathBuf,
        /// Trusted public key (repeatable).
        #[arg(long = "pub", required = true)]
        public_keys: Vec<PathBuf>,
    },
    /// Show an artifact's manifest, digest and signatures (nothing is verified).
    #[command(after_help = "Examples:\n  hotswapctl -o json module inspect hello-1.2.0.hsm")]
    Inspect { file: PathBuf },
    /// Upload an artifact; the control plane verifies it before storing.
    #[command(after_help = "Examples:\n  hotswapctl module push hello-1.2.0.hsm")]
    Push { file: PathBuf },
    /// List modules and their versions.
    #[command(after_help = "Examples:\n  hotswapctl module list\n  hotswapctl -o json module list")]
    List,
    /// Show the versions of one module.
    #[command(after_help = "Examples:\n  hotswapctl module get hello")]
    Get { name: String },
    /// Mark one version as known bad: deployments, pipelines, catch-up and
    /// `nodes set-module` refuse it, and a running deployment of it rolls
    /// back. Needs the permission of a push (deployer or admin).
    #[command(
        after_help = "Examples:\n  hotswapctl module yank hello@1.2.0 --reason \"corrupts the cache on restart\""
    )]
    Yank {
        /// NAME@VERSION.
        module: String,
        /// What is wrong with it; shown to whoever tries to deploy it.
        #[arg(long)]
        reason: String,
    },
    /// Make a yanked version deployable again.
    #[command(after_help = "Examples:\n  hotswapctl module unyank hello@1.2.0")]
    Unyank {
        /// NAME@VERSION.
        module: String,
    },
}

/// `NAME@VERSION`, both parts non-empty.
pub(crate) fn name_at_version(module: &str) -> Result<(String, String), CliError> {
    match module.split_once('@') {
        Some((name, version)) if !name.is_empty() && !version.is_empty() => {
            Ok((name.to_string(), version.to_string()))
        }
        _ => Err(CliError::Other(anyhow::anyhow!(
            "{module:?} is not NAME@VERSION"
        ))),
    }
}

fn print_yank(ctx: &Context, name: &str, version: ModuleVersionView) {
    #[derive(Serialize)]
    struct Changed {
        name: String,
        #[serde(flatten)]
        version: ModuleVersionView,
    }
    let changed = Changed {
        name: name.to_string(),
        version,
    };
    match ctx.output {
        OutputFormat::Json => output::print_json(&changed),
        OutputFormat::Table => match &changed.version.yanked {
            Some(yank) => println!(
                "yanked {}@{} ({}): {}",
                changed.name, changed.version.version, yank.by, yank.reason
            ),
            None => println!(
                "{}@{} is deployable again",
                changed.name, changed.version.version
            ),
        },
    }
}

#[derive(Serialize)]
struct SignatureView {
    key_id: String,
    signed_at: String,
    expires_at: Option<String>,
}

#[derive(Serialize)]
struct ArtifactView {
    file: String,
    name: String,
    version: String,
    runtime: String,
    digest: String,
    size: u64,
    signatures: Vec<SignatureView>,
    manifest: String,
}

fn artifact_view(file: &std::path::Path, info: &ArtifactInfo) -> ArtifactView {
    ArtifactView {
        file: file.display().to_string(),
        name: info.manifest.name.clone(),
        version: info.manifest.version.to_string(),
        runtime: info.manifest.runtime.as_str().to_string(),
        digest: info.digest.to_string(),
        size: info.content_len,
        signatures: info.signatures.iter().map(signature_view).collect(),
        manifest: info.manifest_text.clone(),
    }
}

fn signature_view(s: &Signature) -> SignatureView {
    SignatureView {
        key_id: s.key_id.clone(),
        signed_at: rfc3339_from_ms(s.signed_at_ms),
        expires_at: s.expires_at_ms.map(rfc3339_from_ms),
    }
}

fn print_artifact(ctx: &Context, view: &ArtifactView, headline: &str) {
    match ctx.output {
        OutputFormat::Json => output::print_json(view),
        OutputFormat::Table => {
            println!("{headline}");
            println!("module:  {}@{} ({})", view.name, view.version, view.runtime);
            println!("digest:  {}", view.digest);
            println!("size:    {} bytes", view.size);
            for s in &view.signatures {
                let expiry = s
                    .expires_at
                    .as_deref()
                    .map(|e| format!(", expires {e}"))
                    .unwrap_or_default();
                println!("signed:  {} at {}{expiry}", s.key_id, s.signed_at);
            }
        }
    }
}

fn local<T, E: std::fmt::Display>(result: Result<T, E>) -> Result<T, CliError> {
    result.map_err(|e| CliError::Other(anyhow::anyhow!("{e}")))
}

fn print_module(ctx: &Context, module: &ModuleView) {
    match ctx.output {
        OutputFormat::Json => output::print_json(module),
        OutputFormat::Table => {
            let mut table = output::table(&[
                "VERSION",
                "RUNTIME",
                "DIGEST",
                "SIZE",
                "SIGNED BY",
                "PUSHED",
                "YANKED",
            ]);
            for v in &module.versions {
                table.add_row(vec![
                    v.version.clone(),
                    v.runtime.clone(),
                    v.digest.get(..19).unwrap_or(&v.digest).to_string(),
                    v.size.to_string(),
                    v.signed_by.join(","),
                    v.pushed_at.clone().unwrap_or_default(),
                    yank_cell(v),
                ]);
            }
            output::print_table(&table);
        }
    }
}

/// `by USER: REASON` for a yanked version, empty otherwise.
fn yank_cell(version: &ModuleVersionView) -> String {
    version
        .yanked
        .as_ref()
        .map(|y| format!("by {}: {}", y.by, y.reason))
        .unwrap_or_default()
}

/// Upload chunk size: well below the server's 8 MiB message limit.
const PUSH_CHUNK_BYTES: usize = 1024 * 1024;

pub async fn run(ctx: &Context, command: ModuleCommand) -> Result<(), CliError> {
    match command {
        ModuleCommand::Pack { dir, key, out } => {
            let signing_key = local(keys::load_signing_key(&key))?;
            let info = local(pack_and_sign(&dir, &signing_key, now_ms(), &out))?;
            print_artifact(
                ctx,
                &artifact_view(&out, &info),
                &format!("packed {}", out.display()),
            );
        }
        ModuleCommand::Sign {
            file,
            key,
            expires_in,
        } => {
            let signing_key = local(keys::load_signing_key(&key))?;
            let now = now_ms();
            let expires = expires_in.map(|d| now.saturating_add(d.as_millis() as u64));
            let info = local(add_signature(&file, &signing_key, now, expires))?;
            print_artifact(
                ctx,
                &artifact_view(&file, &info),
                &format!("signed {}", file.display()),
            );
        }
        ModuleCommand::Verify { file, public_keys } => {
            let mut trust = TrustSet::new();
            for path in &public_keys {
                let key = local(keys::load_public_key(path))?;
                let name = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                trust.add(&name, key);
            }
            let info = local(read_artifact(&file))?;
            let verified = local(trust.verify(&info, now_ms()))?;
            #[derive(Serialize)]
            struct Verified {
                module: String,
                digest: String,
                verified_by: Vec<String>,
            }
            let result = Verified {
                module: info.module(),
                digest: info.digest.to_string(),
                verified_by: verified
                    .iter()
                    .map(|v| format!("{} ({})", v.key_name, v.key_id))
                    .collect(),
            };
            match ctx.output {
                OutputFormat::Json => output::print_json(&result),
                OutputFormat::Table => println!(
                    "{}: ok, signed by {}",
                    result.module,
                    result.verified_by.join(", ")
                ),
            }
        }
        ModuleCommand::Inspect { file } => {
            let info = local(read_artifact(&file))?;
            print_artifact(
                ctx,
                &artifact_view(&file, &info),
                &file.display().to_string(),
            );
        }
        ModuleCommand::Push { file } => {
            // Check locally first: a broken file gets a precise error without
            // an upload. The payload is walked by the control plane, which
            // must check it anyway; the version is cheap to check here.
            let info = local(read_artifact(&file))?;
            local(Limits::AGENT.check_manifest(&info.manifest).map_err(|e| {
                format!(
                    "artifact {} cannot be installed by agents: {e}",
                    module_label(&info.manifest)
                )
            }))?;
            let conn = ctx.connect()?;
            let mut client = pb::artifacts_client::ArtifactsClient::new(conn.channel.clone())
                .max_decoding_message_size(8 * 1024 * 1024);
            let mut reader = local(
                tokio::fs::File::open(&file)
                    .await
                    .map_err(|e| format!("cannot read {}: {e}", file.display())),
            )?;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let path = file.display().to_string();
            let reading = tokio::spawn(async move {
                loop {
                    let mut buf = vec![0u8; PUSH_CHUNK_BYTES];
                    let n = reader
                        .read(&mut buf)
                        .await
                        .map_err(|e| format!("cannot read {path}: {e}"))?;
                    if n == 0 {
                        return Ok::<(), String>(());
                    }
                    buf.truncate(n);
                    if tx.send(pb::PushArtifactChunk { data: buf }).await.is_err() {
                        return Ok(());
                    }
                }
            });
            let pushed = client
                .push_artifact(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map_err(conn.rpc_error(&format!("push {}", info.module())));
            if let Ok(Err(e)) = reading.await {
                return Err(CliError::Other(anyhow::anyhow!(e)));
            }
            let version = ModuleVersionView::try_from(pushed?.into_inner())
                .map_err(|e| CliError::Other(anyhow::anyhow!("unexpected reply: {e}")))?;
            #[derive(Serialize)]
            struct Pushed {
                name: String,
                #[serde(flatten)]
                version: ModuleVersionView,
            }
            let pushed = Pushed {
                name: info.manifest.name.clone(),
                version,
            };
            match ctx.output {
                OutputFormat::Json => output::print_json(&pushed),
                OutputFormat::Table => println!(
                    "pushed {}@{} ({}), signed by {}",
                    pushed.name,
                    pushed.version.version,
                    pushed.version.digest,
                    pushed.version.signed_by.join(", ")
                ),
            }
        }
        ModuleCommand::List => {
            let conn = ctx.connect()?;
            let mut client = pb::artifacts_client::ArtifactsClient::new(conn.channel.clone());
            let reply = client
                .list_modules(pb::ListModulesRequest {})
                .await
                .map_err(conn.rpc_error("list modules"))?
                .into_inner();
            let modules = reply
                .modules
                .into_iter()
                .map(ModuleView::try_from)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| CliError::Other(anyhow::anyhow!("unexpected reply: {e}")))?;
            match ctx.output {
                OutputFormat::Json => output::print_json(&modules),
                OutputFormat::Table => {
                    let mut table =
                        output::table(&["MODULE", "LATEST", "VERSIONS", "RUNTIME", "YANKED"]);
                    for m in &modules {
                        let latest = m.versions.first();
                        let yanked: Vec<String> = m
                            .versions
                            .iter()
                            .filter(|v| v.yanked.is_some())
                            .map(|v| format!("{} ({})", v.version, yank_cell(v)))
                            .collect();
                        table.add_row(vec![
                            m.name.clone(),
                            latest.map(|v| v.version.clone()).unwrap_or_default(),
                            m.versions.len().to_string(),
                            latest.map(|v| v.runtime.clone()).unwrap_or_default(),
                            yanked.join(", "),
                        ]);
                    }
                    output::print_table(&table);
                }
            }
        }
        ModuleCommand::Get { name } => {
            let conn = ctx.connect()?;
            let mut client = pb::artifacts_client::ArtifactsClient::new(conn.channel.clone());
            let reply = client
                .get_module(pb::GetModuleRequest { name: name.clone() })
                .await
                .map_err(conn.rpc_error(&format!("get module {name:?}")))?
                .into_inner();
            let module = ModuleView::try_from(reply)
                .map_err(|e| CliError::Other(anyhow::anyhow!("unexpected reply: {e}")))?;
            print_module(ctx, &module);
        }
        ModuleCommand::Yank { module, reason } => {
            let (name, version) = name_at_version(&module)?;
            let conn = ctx.connect()?;
            let mut client = pb::artifacts_client::ArtifactsClient::new(conn.channel.clone());
            let reply = client
                .yank_version(pb::YankVersionRequest {
                    name: name.clone(),
                    version,
                    reason,
                })
                .await
                .map_err(conn.rpc_error(&format!("yank {module}")))?
                .into_inner();
            let view = ModuleVersionView::try_from(reply)
                .map_err(|e| CliError::Other(anyhow::anyhow!("unexpected reply: {e}")))?;
            print_yank(ctx, &name, view);
        }
        ModuleCommand::Unyank { module } => {
            let (name, version) = name_at_version(&module)?;
            let conn = ctx.connect()?;
            let mut client = pb::artifacts_client::ArtifactsClient::new(conn.channel.clone());
            let reply = client
                .unyank_version(pb::UnyankVersionRequest {
                    name: name.clone(),
                    version,
                })
                .await
                .map_err(conn.rpc_error(&format!("unyank {module}")))?
                .into_inner();
            let view = ModuleVersionView::try_from(reply)
                .map_err(|e| CliError::Other(anyhow::anyhow!("unexpected reply: {e}")))?;
            print_yank(ctx, &name, view);
        }
    }
    Ok(())
}
