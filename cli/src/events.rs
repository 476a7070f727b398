//! `hotswapctl events`: the durable event stream, replayed from a sequence
//! number and optionally followed live.

use clap::Args;
use hotswap_common::pb;

use crate::client::{CliError, Context};
use crate::output::{self, OutputFormat};

#[derive(Args)]
#[command(
    after_help = "Without --since, prints the newest --limit stored events (oldest first); with --since, the stored events from that sequence number on. --follow then keeps printing new ones.\nResume a stream where it stopped with --since (the last seq seen + 1).\n\nExamples:\n  hotswapctl events\n  hotswapctl events --limit 20 --kind deployment.\n  hotswapctl events --follow --kind deployment.\n  hotswapctl -o json events --since 1200 --deployment d-1a2b3c\n  hotswapctl events --follow --node web-1 --kind module.health"
)]
pub struct EventsArgs {
    /// Keep following new events.
    #[arg(long, short = 'f')]
    follow: bool,
    /// First sequence number to show (0: the oldest kept). Without it: the
    /// newest --limit events.
    #[arg(long)]
    since: Option<u64>,
    /// Only this kind, or a prefix ending in '.' (repeatable).
    #[arg(long = "kind")]
    kinds: Vec<String>,
    #[arg(long)]
    deployment: Option<String>,
    #[arg(long)]
    node: Option<String>,
    #[arg(long)]
    module: Option<String>,
    /// At most this many stored events: the newest without --since, the
    /// first from --since on (with --follow and --since: no limit).
    #[arg(long, default_value_t = 1000)]
    limit: u32,
}

pub use hotswap_common::model::EventView;

/// One line for people: time, seq, kind, what it is about, message.
pub fn line(e: &EventView) -> String {
    let mut about = Vec::new();
    if let Some(d) = &e.deployment_id {
        about.push(d.clone());
    }
    if let Some(n) = &e.node {
        about.push(n.clone());
    }
    match (&e.module, &e.version) {
        (Some(m), Some(v)) => about.push(format!("{m}@{v}")),
        (Some(m), None) => about.push(m.clone()),
        _ => {}
    }
    format!(
        "{}  #{:<6} {:<22} {}{}",
        e.time.as_deref().unwrap_or("-"),
        e.seq,
        e.kind,
        if about.is_empty() {
            String::new()
        } else {
            format!("[{}] ", about.join(" "))
        },
        e.message
    )
}

pub async fn run(ctx: &Context, args: EventsArgs) -> Result<(), CliError> {
    let conn = ctx.connect()?;
    let mut client = pb::events_client::EventsClient::new(conn.channel.clone());
    let mut stream = client
        .watch_events(pb::WatchEventsRequest {
            since: args.since.unwrap_or(0),
            newest: args.since.is_none(),
            follow: args.follow,
            kinds: args.kinds,
            deployment_id: args.deployment.unwrap_or_default(),
            node: args.node.unwrap_or_default(),
            module: args.module.unwrap_or_default(),
            limit: args.limit,
        })
        .await
        .map_err(conn.rpc_error("watch events"))?
        .into_inner();
    while let Some(event) = stream
        .message()
        .await
        .map_err(conn.rpc_error("watch events"))?
    {
        let view = EventView::from(event);
        match ctx.output {
            OutputFormat::Json => output::print_json_line(&view),
            OutputFormat::Table => println!("{}", line(&view)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_name_what_an_event_is_about() {
        let view = EventView::from(pb::Event {
            seq: 7,
            time: Some(hotswap_common::timefmt::ts_from_ms(0)),
            kind: "module.health".into(),
            deployment_id: String::new(),
            node: "web-1".into(),
            module: "hello".into(),
            version: "1.2.0".into(),
            message: "hello 1.2.0: healthy -> unhealthy".into(),
        });
        assert_eq!(view.deployment_id, None);
        let text = line(&view);
        assert!(text.contains("#7"), "{text}");
        assert!(text.contains("[web-1 hello@1.2.0] hello 1.2.0"), "{text}");
        let json = serde_json::to_value(&view).unwrap_or_default();
        assert_eq!(json["deployment_id"], serde_json::Value::Null);
        assert_eq!(json["time"], "1970-01-01T00:00:00Z");
    }
}
