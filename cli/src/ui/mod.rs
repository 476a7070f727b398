//! `hotswapctl ui`: the live web dashboard (SPEC §8), served on the
//! operator's machine by a local HTTP server that holds the profile's
//! credentials and talks to the control plane over gRPC with them, so the
//! browser never sees a key and sees exactly what the operator's role allows.
//!
//! Pages are server-rendered HTML; one small embedded script patches them
//! from Server-Sent Events that the local server produces by following the
//! control plane's gRPC streams (deployment watch, events, node updates).
//! Controls are plain forms with a confirmation page and a form token.
//!
//! Access: a random token printed in the URL is traded on the first visit
//! for an HttpOnly SameSite=Strict session cookie (and a redirect that drops
//! it from the address bar); any request with neither gets 401.

mod auth;
mod charts;
mod html;
mod live;
mod pages;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::routing::{get, post};
use clap::Args;
use hotswap_common::pb;
use hotswap_common::pki::{self, Principal};
use tonic::transport::Channel;

use crate::client::{CliError, Connection, Context};
use crate::output::OutputFormat;

#[derive(Args)]
#[command(
    after_help = "Prints `dashboard: http://127.0.0.1:PORT/?token=...`; the token is the only key to the dashboard, which acts with your profile's credentials.\n\nExamples:\n  hotswapctl ui\n  hotswapctl --profile ./approver.profile.toml ui --listen 127.0.0.1:8080 --no-open"
)]
pub struct UiArgs {
    /// Address to serve on; loopback only (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Do not open a browser.
    #[arg(long)]
    no_open: bool,
}

/// What every handler shares: the gRPC channel with the operator's
/// identity, the secrets that guard the dashboard, and who the operator is.
pub struct Ui {
    conn: Connection,
    /// The token printed in the URL; traded for the session cookie.
    login_token: String,
    /// The session cookie's value.
    session: String,
    /// The form token every control POST must carry (with the SameSite
    /// cookie: a page on another site can neither send the cookie nor
    /// read this token).
    csrf: String,
    /// The user name in the profile's certificate.
    user: String,
    /// The user's role as the control plane has it, refreshed on page
    /// loads; `None` when it cannot be read (then no controls are shown).
    role: RwLock<Option<String>>,
}

impl Ui {
    fn channel(&self) -> Channel {
        self.conn.channel.clone()
    }

    pub(crate) fn role(&self) -> Option<String> {
        self.role.read().ok().and_then(|r| r.clone())
    }

    /// Ask the control plane for this user's role again: a role change or
    /// revocation takes effect there at once, and the controls follow it
    /// on the next page load.
    async fn refresh_role(&self) {
        let mut client = pb::users_client::UsersClient::new(self.channel());
        let role = match client.list_users(pb::ListUsersRequest {}).await {
            Ok(reply) => reply
                .into_inner()
                .users
                .into_iter()
                .find(|u| u.name == self.user && !u.revoked)
                .map(|u| u.role),
            Err(_) => None,
        };
        if let Ok(mut slot) = self.role.write() {
            *slot = role;
        }
    }
}

/// 32 random bytes as hex.
fn random_secret() -> Result<String, CliError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("cannot draw a random token from the OS: {e}"))?;
    Ok(hex::encode(bytes))
}

/// The user a profile's certificate names.
fn user_of(ctx: &Context) -> Result<String, CliError> {
    let (profile, path) = ctx.profile()?;
    let der = pki::first_cert_der(&profile.client_cert)
        .map_err(|e| anyhow::anyhow!("profile {}: {e}", path.display()))?;
    match pki::principal_of(der.as_ref()) {
        Ok(Principal::User(name)) => Ok(name),
        Ok(other) => Err(CliError::Other(anyhow::anyhow!(
            "profile {}: the certificate belongs to {other}, not an operator",
            path.display()
        ))),
        Err(e) => Err(CliError::Other(anyhow::anyhow!(
            "profile {}: {e}",
            path.display()
        ))),
    }
}

/// The dashboard is refused on anything but loopback: it acts with the
/// operator's credentials over plain HTTP, so on a network anyone who saw
/// the URL (or sniffed the cookie) would act as the operator. To reach it
/// from elsewhere, forward the port over SSH.
fn check_listen(addr: &SocketAddr) -> Result<(), CliError> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    Err(CliError::Other(anyhow::anyhow!(
        "--listen {addr}: the dashboard serves only on loopback (127.0.0.1 or ::1): it acts with your credentials over plain HTTP; to use it from another machine, forward the port (ssh -L 8080:127.0.0.1:8080 ...)"
    )))
}

pub fn router(ui: Arc<Ui>) -> Router {
    Router::new()
        .route("/", get(pages::fleet))
        .route("/environments", get(pages::environments))
        .route("/deployments", get(pages::deployments))
        .route("/deployments/{id}", get(pages::deployment))
        .route("/deployments/{id}/confirm", get(pages::confirm))
        .route("/deployments/{id}/control", post(pages::control))
        .route("/events", get(pages::events))
        .route("/audit", get(pages::audit))
        .route("/assets/app.js", get(pages::script))
        .route("/assets/app.css", get(pages::stylesheet))
        .route("/live/fleet", get(live::fleet))
        .route("/live/environments", get(live::environments))
        .route("/live/deployments", get(live::deployments))
        .route("/live/deployments/{id}", get(live::deployment))
        .route("/live/events", get(live::events))
        .layer(axum::middleware::from_fn_with_state(
            ui.clone(),
            auth::require_session,
        ))
        .with_state(ui)
}

pub async fn run(ctx: &Context, args: UiArgs) -> Result<(), CliError> {
    check_listen(&args.listen)?;
    let user = user_of(ctx)?;
    let conn = ctx.connect()?;
    let ui = Arc::new(Ui {
        conn,
        login_token: random_secret()?,
        session: random_secret()?,
        csrf: random_secret()?,
        user,
        role: RwLock::new(None),
    });
    // A first call now, so an unreachable control plane or a refused
    // certificate is reported here instead of on the first page.
    let mut users = pb::users_client::UsersClient::new(ui.channel());
    users
        .list_users(pb::ListUsersRequest {})
        .await
        .map_err(ui.conn.rpc_error("read your role"))?;
    ui.refresh_role().await;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener
        .local_addr()
        .map_err(|e| anyhow::anyhow!("cannot read the listening address: {e}"))?;
    let url = format!("http://{addr}/?token={}", ui.login_token);
    match ctx.output {
        OutputFormat::Json => crate::output::print_json_line(&serde_json::json!({ "url": url })),
        OutputFormat::Table => {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "dashboard: {url}");
            let _ = out.flush();
        }
    }
    eprintln!(
        "serving the dashboard as {} ({}); Ctrl-C to stop",
        ui.user,
        ui.role().unwrap_or_else(|| "role unknown".into())
    );
    if !args.no_open {
        open_browser(&url);
    }
    let app = router(ui);
    tokio::select! {
        served = axum::serve(listener, app) => {
            served.map_err(|e| anyhow::anyhow!("dashboard server: {e}"))?;
        }
        () = stop_signal() => {}
    }
    Ok(())
}

/// SIGINT or SIGTERM. Open event streams would hold a graceful shutdown
/// forever, and nothing here needs draining, so the server just stops.
async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `$BROWSER`, else `xdg-open`; not being able to is a warning, the URL
/// is on stdout.
fn open_browser(url: &str) {
    let program = std::env::var("BROWSER")
        .ok()
        .filter(|b| !b.trim().is_empty())
        .unwrap_or_else(|| "xdg-open".to_string());
    let spawned = std::process::Command::new(&program)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn();
    match spawned {
        // Reap it when it exits, off the async runtime; xdg-open without a
        // desktop exits non-zero, which is worth a word.
        Ok(mut child) => {
            std::thread::spawn(move || {
                if let Ok(status) = child.wait()
                    && !status.success()
                {
                    eprintln!(
                        "warning: {program} could not open a browser ({status}); open the URL above"
                    );
                }
            });
        }
        Err(e) => {
            eprintln!("warning: cannot open a browser with {program}: {e}; open the URL above")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_is_served() {
        for ok in ["127.0.0.1:0", "127.0.0.2:8080", "[::1]:0"] {
            assert!(check_listen(&ok.parse().expect("addr")).is_ok(), "{ok}");
        }
        for refused in ["0.0.0.0:8080", "192.168.1.5:80", "[::]:0"] {
            let error = check_listen(&refused.parse().expect("addr")).expect_err(refused);
            assert!(error.to_string().contains("loopback"), "{error}");
        }
    }

    #[test]
    fn secrets_are_random_and_long() {
        let (a, b) = (
            random_secret().expect("random"),
            random_secret().expect("random"),
        );
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
