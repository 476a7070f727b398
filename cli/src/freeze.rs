//! `hotswapctl freeze`: ad hoc deployment freezes (SPEC §9).

use std::time::Duration;

use clap::Subcommand;
use comfy_table::Cell;
use hotswap_common::model::FreezeView;
use hotswap_common::pb;
use hotswap_common::timefmt::parse_duration;

use crate::client::{CliError, Context};
use crate::output::{self, OutputFormat};

#[derive(Subcommand)]
pub enum FreezeCommand {
    /// Freeze an environment: no deployment or pipeline starts there until
    /// the freeze ends, unless an admin passes --override-freeze.
    #[command(
        after_help = "Examples:\n  hotswapctl freeze create --env production --for 2h --reason \"incident INC-42\"\n  hotswapctl freeze create --env production --until 2026-12-28T08:00:00Z --reason \"holidays\""
    )]
    Create {
        /// The environment to freeze.
        #[arg(long)]
        env: String,
        /// When the freeze ends, RFC 3339 (e.g. 2026-12-28T08:00:00Z).
        #[arg(long, value_parser = parse_until, conflicts_with = "for_duration", required_unless_present = "for_duration")]
        until: Option<prost_types::Timestamp>,
        /// How long the freeze lasts from now (e.g. 2h, 3d).
        #[arg(long = "for", id = "for_duration", value_parser = parse_positive_duration, value_name = "D")]
        for_duration: Option<Duration>,
        /// Why: every refusal the freeze causes quotes it.
        #[arg(long)]
        reason: String,
    },
    /// The freezes in force (expired ones drop out), newest first.
    #[command(
        after_help = "Examples:\n  hotswapctl freeze list\n  hotswapctl -o json freeze list --env production"
    )]
    List {
        /// Only this environment's freezes.
        #[arg(long)]
        env: Option<String>,
    },
    /// Lift a freeze (its creator or an admin).
    #[command(after_help = "Examples:\n  hotswapctl freeze delete fz-0123456789")]
    Delete { id: String },
}

fn parse_until(text: &str) -> Result<prost_types::Timestamp, String> {
    let at = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            format!("{text:?} is not an RFC 3339 time (e.g. 2026-12-28T08:00:00Z): {e}")
        })?;
    Ok(prost_types::Timestamp {
        seconds: at.unix_timestamp(),
        nanos: at.nanosecond() as i32,
    })
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d.is_zero() {
        return Err(format!("{text:?}: a freeze must last longer than zero"));
    }
    Ok(d)
}

fn print(views: &[FreezeView]) {
    let mut table = output::table(&["ID", "ENVIRONMENT", "FROM", "UNTIL", "CREATED BY", "REASON"]);
    for f in views {
        table.add_row(vec![
            Cell::new(&f.id),
            Cell::new(&f.environment),
            Cell::new(f.from.as_deref().unwrap_or("-")),
            Cell::new(f.until.as_deref().unwrap_or("-")),
            Cell::new(&f.created_by),
            Cell::new(&f.reason),
        ]);
    }
    output::print_table(&table);
}

pub async fn run(ctx: &Context, command: FreezeCommand) -> Result<(), CliError> {
    let conn = ctx.connect()?;
    let mut client = pb::freezes_client::FreezesClient::new(conn.channel.clone());
    match command {
        FreezeCommand::Create {
            env,
            until,
            for_duration,
            reason,
        } => {
            let freeze = client
                .create_freeze(pb::CreateFreezeRequest {
                    environment: env.clone(),
                    until,
                    for_ms: for_duration
                        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                    reason,
                })
                .await
                .map_err(conn.rpc_error(&format!("freeze {env}")))?
                .into_inner();
            let view = FreezeView::from(freeze);
            match ctx.output {
                OutputFormat::Json => output::print_json(&view),
                OutputFormat::Table => {
                    println!("{}", view.id);
                    eprintln!(
                        "{} frozen until {}",
                        view.environment,
                        view.until.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        FreezeCommand::List { env } => {
            let reply = client
                .list_freezes(pb::ListFreezesRequest {
                    environment: env.unwrap_or_default(),
                })
                .await
                .map_err(conn.rpc_error("list freezes"))?
                .into_inner();
            let views: Vec<FreezeView> = reply.freezes.into_iter().map(FreezeView::from).collect();
            match ctx.output {
                OutputFormat::Json => output::print_json(&views),
                OutputFormat::Table => print(&views),
            }
        }
        FreezeCommand::Delete { id } => {
            let freeze = client
                .delete_freeze(pb::DeleteFreezeRequest { id: id.clone() })
                .await
                .map_err(conn.rpc_error(&format!("delete freeze {id}")))?
                .into_inner();
            let view = FreezeView::from(freeze);
            match ctx.output {
                OutputFormat::Json => output::print_json(&view),
                OutputFormat::Table => println!("deleted {} ({})", view.id, view.environment),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn until_and_for_are_checked_before_anything_is_sent() {
        assert_eq!(
            parse_until("2026-12-28T08:00:00Z").expect("valid").seconds,
            1_798_444_800
        );
        assert!(
            parse_until("tomorrow")
                .expect_err("bad")
                .contains("not an RFC 3339 time")
        );
        assert!(
            parse_positive_duration("0s")
                .expect_err("zero")
                .contains("longer than zero")
        );
        assert!(parse_positive_duration("-1h").is_err());
        assert_eq!(parse_positive_duration("2h"), Ok(Duration::from_secs(7200)));
    }
}
