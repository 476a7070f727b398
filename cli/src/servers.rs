//! `hotswapctl servers`: the control-plane replicas serving this fleet.

use clap::Subcommand;
use comfy_table::Cell;
use hotswap_common::model::ServerView;
use hotswap_common::pb;
use hotswap_common::timefmt::{human_age, now_ms};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::client::{CliError, Context};
use crate::output::{self, OutputFormat};

#[derive(Subcommand)]
pub enum ServersCommand {
    /// List the control-plane replicas: which leads, which are ready, how
    /// many agent sessions each holds.
    #[command(
        after_help = "Examples:\n  hotswapctl servers list\n  hotswapctl -o json servers list"
    )]
    List,
    /// Show one replica by its name (`hotswap-control-plane run --name`).
    #[command(
        after_help = "Examples:\n  hotswapctl servers get cp-a\n  hotswapctl -o json servers get cp-a"
    )]
    Get { name: String },
}

fn convert(server: pb::Server) -> Result<ServerView, CliError> {
    ServerView::try_from(server)
        .map_err(|e| CliError::Other(anyhow::anyhow!("unexpected reply: {e}")))
}

/// `leader` or `follower`.
fn role(server: &ServerView) -> &'static str {
    if server.leader { "leader" } else { "follower" }
}

/// `ready` or `not_ready`, as `/readyz` would say.
fn readiness(server: &ServerView) -> &'static str {
    if server.ready { "ready" } else { "not_ready" }
}

/// How long before `now_ms` an RFC 3339 time was, for people (`5m`); `-`
/// without one.
fn since(rfc3339: Option<&str>, now_ms: u64) -> String {
    rfc3339
        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok())
        .map(|t| {
            let ms = (t.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
            human_age(now_ms.saturating_sub(ms))
        })
        .unwrap_or_else(|| "-".to_string())
}

fn ago(rfc3339: Option<&str>, now_ms: u64) -> String {
    match since(rfc3339, now_ms) {
        dash if dash == "-" => dash,
        age => format!("{age} ago"),
    }
}

/// The table's rows, one per replica, in the order given. The last-seen
/// time is left to `servers get`: a live replica's is seconds old (a stale
/// one's record goes with its lease), and without it the table fits 80
/// columns with a full endpoint.
fn rows(servers: &[ServerView], now_ms: u64) -> Vec<[String; 6]> {
    servers
        .iter()
        .map(|s| {
            [
                s.name.clone(),
                s.endpoint.clone(),
                role(s).to_string(),
                readiness(s).to_string(),
                s.sessions.to_string(),
                since(s.started_at.as_deref(), now_ms),
            ]
        })
        .collect()
}

pub async fn run(ctx: &Context, command: ServersCommand) -> Result<(), CliError> {
    let conn = ctx.connect()?;
    let mut client = pb::servers_client::ServersClient::new(conn.channel.clone());
    match command {
        ServersCommand::List => {
            let reply = client
                .list_servers(pb::ListServersRequest {})
                .await
                .map_err(conn.rpc_error("list servers"))?
                .into_inner();
            let servers = reply
                .servers
                .into_iter()
                .map(convert)
                .collect::<Result<Vec<_>, _>>()?;
            match ctx.output {
                OutputFormat::Json => output::print_json(&servers),
                OutputFormat::Table => {
                    let mut table =
                        output::table(&["NAME", "ENDPOINT", "ROLE", "STATUS", "SESSIONS", "UP"]);
                    for [name, endpoint, role, status, sessions, up] in rows(&servers, now_ms()) {
                        table.add_row(vec![
                            Cell::new(name),
                            Cell::new(endpoint),
                            Cell::new(role),
                            output::status_cell(&status),
                            Cell::new(sessions),
                            Cell::new(up),
                        ]);
                    }
                    output::print_table(&table);
                }
            }
        }
        ServersCommand::Get { name } => {
            let reply = client
                .get_server(pb::GetServerRequest { name: name.clone() })
                .await
                .map_err(conn.rpc_error(&format!("get server {name:?}")))?
                .into_inner();
            let server = convert(reply)?;
            match ctx.output {
                OutputFormat::Json => output::print_json(&server),
                OutputFormat::Table => print_server(&server, now_ms()),
            }
        }
    }
    Ok(())
}

fn print_server(server: &ServerView, now_ms: u64) {
    let time = |t: &Option<String>| {
        format!(
            "{} ({})",
            t.as_deref().unwrap_or("-"),
            ago(t.as_deref(), now_ms)
        )
    };
    println!("name:       {}", server.name);
    println!("endpoint:   {}", server.endpoint);
    println!("role:       {}", role(server));
    println!("status:     {}", readiness(server));
    println!("sessions:   {}", server.sessions);
    println!("started at: {}", time(&server.started_at));
    println!("last seen:  {}", time(&server.last_seen));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(name: &str, leader: bool, ready: bool) -> ServerView {
        ServerView {
            name: name.into(),
            endpoint: format!("https://{name}:7443"),
            leader,
            ready,
            sessions: 2,
            started_at: Some("2024-01-01T00:00:00Z".into()),
            last_seen: None,
        }
    }

    #[test]
    fn rows_say_role_status_and_uptime() {
        // 2024-01-01T01:30:00Z.
        let now = 1_704_072_600_000;
        let up = human_age(90 * 60 * 1000);
        assert_eq!(
            rows(
                &[server("cp-a", true, true), server("cp-b", false, false)],
                now
            ),
            [
                ["cp-a", "https://cp-a:7443", "leader", "ready", "2", &up].map(String::from),
                [
                    "cp-b",
                    "https://cp-b:7443",
                    "follower",
                    "not_ready",
                    "2",
                    &up
                ]
                .map(String::from),
            ]
        );
        assert_eq!(since(Some("not a time"), now), "-");
        assert_eq!(ago(None, now), "-");
        assert_eq!(
            ago(Some("2024-01-01T01:29:00Z"), now),
            format!("{} ago", human_age(60_000))
        );
    }
}
