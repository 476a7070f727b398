//! `hotswapctl users`: operator credentials. The key pair is generated here
//! and never leaves this machine; the control plane signs a CSR and records
//! the role, which it checks on every call.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;
use comfy_table::Cell;
use hotswap_common::pb;
use hotswap_common::pki;
use hotswap_common::profile::Profile;
use hotswap_common::timefmt::parse_duration;
use serde::Serialize;

use crate::client::{CliError, Context};
use crate::output::{self, OutputFormat};

#[derive(Subcommand)]
pub enum UsersCommand {
    /// Issue credentials for a new operator and write them as a profile.
    #[command(
        after_help = "Roles: viewer (read), deployer (push and yank artifacts, deploy, control deployments outside\nprotected environments), approver (approve/reject, control any deployment), admin (everything, users, keys, tokens).\n\nExamples:\n  hotswapctl users create alice --role deployer --out alice.profile.toml\n  hotswapctl users create ci --role deployer --validity 720h --out ci.profile.toml"
    )]
    Create {
        name: String,
        /// viewer, deployer, approver or admin.
        #[arg(long)]
        role: String,
        /// Where to write the profile (0600); must not exist.
        #[arg(long)]
        out: PathBuf,
        /// Certificate lifetime (default: the control plane's user_cert_validity).
        #[arg(long, value_parser = parse_duration)]
        validity: Option<Duration>,
    },
    /// List operators and their roles.
    #[command(after_help = "Examples:\n  hotswapctl users list\n  hotswapctl -o json users list")]
    List,
    /// Change a user's role; takes effect on their next call.
    #[command(after_help = "Examples:\n  hotswapctl users set-role alice approver")]
    SetRole { name: String, role: String },
    /// Revoke a user; their certificate is refused from the next call on.
    #[command(after_help = "Examples:\n  hotswapctl users revoke alice")]
    Revoke { name: String },
}

use hotswap_common::model::UserView;

#[derive(Serialize)]
struct CreatedView {
    user: UserView,
    profile: String,
}

fn print_users(ctx: &Context, users: Vec<UserView>) {
    match ctx.output {
        OutputFormat::Json => output::print_json(&users),
        OutputFormat::Table => {
            let mut table =
                output::table(&["NAME", "ROLE", "STATUS", "CREATED BY", "CERT EXPIRES"]);
            for u in users {
                table.add_row(vec![
                    Cell::new(u.name),
                    Cell::new(u.role),
                    output::status_cell(if u.revoked { "revoked" } else { "active" }),
                    Cell::new(u.created_by),
                    Cell::new(u.cert_expires_at.unwrap_or_else(|| "-".into())),
                ]);
            }
            output::print_table(&table);
        }
    }
}

/// A profile being written: a temporary file next to the destination that
/// holds the private key (0600, fsynced) before the user is created, and
/// becomes the profile by rename once the control plane signed the
/// certificate. Removed if dropped before that.
struct PendingProfile {
    tmp: PathBuf,
    committed: bool,
}

impl PendingProfile {
    fn create(out: &Path, key_pem: &str) -> std::io::Result<Self> {
        use std::io::Write;
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let file_name = out.file_name().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the path has no file name",
            )
        })?;
        let tmp = parent_dir(out).join(format!(
            ".{}.tmp.{}",
            file_name.to_string_lossy(),
            std::process::id()
        ));
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let pending = Self {
            tmp,
            committed: false,
        };
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(key_pem.as_bytes())?;
        file.sync_all()?;
        Ok(pending)
    }

    /// Replace the key with the whole profile, fsync, rename into place.
    fn commit(mut self, profile: &Profile, out: &Path) -> anyhow::Result<()> {
        use std::io::Write;
        let kept = |e: &dyn std::fmt::Display, tmp: &Path| {
            anyhow::anyhow!(
                "could not be written to {}: {e}; its private key is in {}",
                out.display(),
                tmp.display()
            )
        };
        let text = profile.to_toml(out).map_err(|e| kept(&e, &self.tmp))?;
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(&self.tmp)?;
            file.write_all(text.as_bytes())?;
            file.sync_all()?;
            if out.exists() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "the file appeared meanwhile",
                ));
            }
            std::fs::rename(&self.tmp, out)?;
            hotswap_common::fsutil::sync_dir(parent_dir(out))
        };
        match write() {
            Ok(()) => {
                self.committed = true;
                Ok(())
            }
            Err(e) => {
                // Keep the file: it holds the only copy of the key.
                self.committed = true;
                Err(kept(&e, &self.tmp))
            }
        }
    }
}

impl Drop for PendingProfile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

pub async fn run(ctx: &Context, command: UsersCommand) -> Result<(), CliError> {
    let conn = ctx.connect()?;
    let mut client = pb::users_client::UsersClient::new(conn.channel.clone());
    match command {
        UsersCommand::Create {
            name,
            role,
            out,
            validity,
        } => {
            if out.exists() {
                return Err(anyhow::anyhow!(
                    "{} already exists; refusing to overwrite a profile",
                    out.display()
                )
                .into());
            }
            let (csr_pem, key_pem) = pki::generate_csr(&name)
                .map_err(|e| anyhow::anyhow!("cannot generate a key pair: {e}"))?;
            // The key goes to disk before the user exists: a destination
            // that cannot be written stops here, with no user created whose
            // only key would be lost.
            let pending = PendingProfile::create(&out, &key_pem).map_err(|e| {
                anyhow::anyhow!(
                    "cannot write the profile {}: {e}; no user was created",
                    out.display()
                )
            })?;
            let response = client
                .create_user(pb::CreateUserRequest {
                    name: name.clone(),
                    role,
                    csr_pem,
                    validity_seconds: validity.map_or(0, |d| d.as_secs().max(1)),
                })
                .await
                .map_err(conn.rpc_error("create user"))?
                .into_inner();
            let profile = Profile {
                endpoint: conn.endpoint.clone(),
                ca_cert: response.ca_certificate_pem,
                client_cert: response.certificate_pem,
                client_key: key_pem,
            };
            pending
                .commit(&profile, &out)
                .map_err(|e| anyhow::anyhow!("user {name} was created, but its profile {e}"))?;
            let user: UserView = response
                .user
                .ok_or_else(|| anyhow::anyhow!("unexpected reply: no user"))?
                .into();
            match ctx.output {
                OutputFormat::Json => output::print_json(&CreatedView {
                    user,
                    profile: out.display().to_string(),
                }),
                OutputFormat::Table => {
                    println!(
                        "user {} created with role {}; profile written to {} (0600)",
                        user.name,
                        user.role,
                        out.display()
                    );
                    println!(
                        "use it with: hotswapctl --profile {} nodes list",
                        out.display()
                    );
                }
            }
        }
        UsersCommand::List => {
            let users = client
                .list_users(pb::ListUsersRequest {})
                .await
                .map_err(conn.rpc_error("list users"))?
                .into_inner()
                .users;
            print_users(ctx, users.into_iter().map(UserView::from).collect());
        }
        UsersCommand::SetRole { name, role } => {
            let user = client
                .set_user_role(pb::SetUserRoleRequest { name, role })
                .await
                .map_err(conn.rpc_error("set role"))?
                .into_inner();
            print_one(ctx, user.into(), "role changed");
        }
        UsersCommand::Revoke { name } => {
            let user = client
                .revoke_user(pb::RevokeUserRequest { name })
                .await
                .map_err(conn.rpc_error("revoke user"))?
                .into_inner();
            print_one(ctx, user.into(), "revoked");
        }
    }
    Ok(())
}

fn print_one(ctx: &Context, user: UserView, what: &str) {
    match ctx.output {
        OutputFormat::Json => output::print_json(&user),
        OutputFormat::Table => println!("user {}: {what} (role {})", user.name, user.role),
    }
}
