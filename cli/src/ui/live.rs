//! The dashboard's live streams: Server-Sent Events made by following the
//! control plane's gRPC streams. A `patch` event carries a re-rendered
//! fragment (`{target, html}`) that the page puts in place; an `append`
//! event carries a new row of a list (`{target, html, at}`, with `id:` the
//! event's sequence number so a reconnecting browser resumes after it).
//!
//! Each stream's tasks end when the browser goes away (the channel to it
//! closes) or when the control plane's stream fails (a `problem` event says
//! so; the browser then reconnects and everything starts over).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use hotswap_common::model::NodeView;
use hotswap_common::pb;
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;

use super::Ui;
use super::pages;
use crate::client::CliError;
use crate::events::EventView;

/// Changes that arrive together (a snapshot of many nodes, a burst of
/// events) are rendered once: the first starts this wait, and everything
/// that arrives within it is folded into one render.
const COALESCE: Duration = Duration::from_millis(100);

type Tx = mpsc::Sender<Event>;

fn stream(rx: mpsc::Receiver<Event>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    Sse::new(ReceiverStream::new(rx).map(Ok)).keep_alive(KeepAlive::default())
}

fn patch(target: &str, html: &str) -> Event {
    let data = serde_json::json!({ "target": target, "html": html });
    Event::default().event("patch").data(data.to_string())
}

fn append(target: &str, html: &str, seq: u64, at_ms: u64) -> Event {
    let data = serde_json::json!({ "target": target, "html": html, "at": at_ms });
    Event::default()
        .event("append")
        .id(seq.to_string())
        .data(data.to_string())
}

fn problem(error: &CliError) -> Event {
    let data = serde_json::json!({ "message": error.to_string() });
    Event::default().event("problem").data(data.to_string())
}

/// Where to resume a list: after the browser's `Last-Event-ID` when it
/// reconnects, else the page's `since`.
fn resume_from(headers: &HeaderMap, since: Option<u64>) -> u64 {
    headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|id| id + 1)
        .or(since)
        .unwrap_or(0)
}

#[derive(Deserialize)]
pub struct Since {
    since: Option<u64>,
}

/// Send `event`; false once the browser has gone.
async fn send(tx: &Tx, event: Event) -> bool {
    tx.send(event).await.is_ok()
}

/// Run one stream's pump in a task of its own; if it fails, the browser
/// gets a `problem` event saying why (and reconnects).
fn spawn_reported(
    tx: Tx,
    pump: impl std::future::Future<Output = Result<(), CliError>> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(e) = pump.await {
            let _ = tx.send(problem(&e)).await;
        }
    });
}

/// The stream's next message, or `None` once it has ended or the browser
/// has gone.
async fn next_or_gone<M>(
    tx: &Tx,
    stream: &mut tonic::Streaming<M>,
    ui: &Ui,
    what: &str,
) -> Result<Option<M>, CliError> {
    tokio::select! {
        next = stream.message() => next.map_err(ui.conn.rpc_error(what)),
        () = tx.closed() => Ok(None),
    }
}

/// Follow stored-then-live events matching `request` from `since`, each
/// appended to `target` rendered by `render`.
async fn follow_events(
    ui: Arc<Ui>,
    tx: Tx,
    mut request: pb::WatchEventsRequest,
    target: &'static str,
    render: fn(&EventView) -> String,
) -> Result<(), CliError> {
    request.follow = true;
    let mut client = pb::events_client::EventsClient::new(ui.channel());
    let mut events = client
        .watch_events(request)
        .await
        .map_err(ui.conn.rpc_error("follow events"))?
        .into_inner();
    while let Some(event) = next_or_gone(&tx, &mut events, &ui, "follow events").await? {
        let (seq, at) = (event.seq, pages::event_ms(&event));
        let html = render(&EventView::from(event));
        if !send(&tx, append(target, &html, seq, at)).await {
            break;
        }
    }
    Ok(())
}

pub async fn deployment(
    State(ui): State<Arc<Ui>>,
    Path(id): Path<String>,
    Query(since): Query<Since>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel(64);
    let since = resume_from(&headers, since.since);
    let timeline = pb::WatchEventsRequest {
        since,
        deployment_id: id.clone(),
        ..Default::default()
    };
    spawn_reported(
        tx.clone(),
        follow_events(
            ui.clone(),
            tx.clone(),
            timeline,
            "timeline",
            pages::timeline_item,
        ),
    );
    spawn_reported(tx.clone(), async move {
        let what = format!("watch deployment {id}");
        let mut client = pb::deployments_client::DeploymentsClient::new(ui.channel());
        let mut updates = client
            .watch_deployment(pb::GetDeploymentRequest { id: id.clone() })
            .await
            .map_err(ui.conn.rpc_error(&what))?
            .into_inner();
        let mut last = String::new();
        // The watch ends with the deployment; the timeline goes on.
        while let Some(d) = next_or_gone(&tx, &mut updates, &ui, &what).await? {
            let html = pages::deployment_live(&ui, &crate::deploy::convert(d)?);
            if html != last {
                if !send(&tx, patch("deployment-live", &html)).await {
                    break;
                }
                last = html;
            }
        }
        Ok(())
    });
    stream(rx)
}

pub async fn events(
    State(ui): State<Arc<Ui>>,
    Query(since): Query<Since>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel(64);
    let since = resume_from(&headers, since.since);
    let request = pb::WatchEventsRequest {
        since,
        ..Default::default()
    };
    spawn_reported(
        tx.clone(),
        follow_events(ui, tx, request, "events-rows", pages::event_row),
    );
    stream(rx)
}

pub async fn fleet(
    State(ui): State<Arc<Ui>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel(16);
    spawn_reported(tx.clone(), async move {
        let mut client = pb::fleet_client::FleetClient::new(ui.channel());
        let mut updates = client
            .watch_nodes(pb::WatchNodesRequest {})
            .await
            .map_err(ui.conn.rpc_error("watch nodes"))?
            .into_inner();
        let mut nodes: BTreeMap<String, NodeView> = BTreeMap::new();
        let mut last = String::new();
        while let Some(first) = next_or_gone(&tx, &mut updates, &ui, "watch nodes").await? {
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + COALESCE;
            while let Ok(next) = tokio::time::timeout_at(deadline, updates.message()).await {
                match next.map_err(ui.conn.rpc_error("watch nodes"))? {
                    Some(update) => batch.push(update),
                    None => break,
                }
            }
            for update in batch {
                let Some(node) = update.node else { continue };
                let view = NodeView::try_from(node)
                    .map_err(|e| CliError::Other(anyhow::anyhow!("unexpected reply: {e}")))?;
                if update.removed {
                    nodes.remove(&view.id);
                } else {
                    nodes.insert(view.id.clone(), view);
                }
            }
            let mut list: Vec<NodeView> = nodes.values().cloned().collect();
            list.sort_by(|a, b| a.name.cmp(&b.name));
            let html = pages::fleet_rows(&list);
            if html != last {
                if !send(&tx, patch("fleet-rows", &html)).await {
                    break;
                }
                last = html;
            }
        }
        Ok(())
    });
    stream(rx)
}

/// Re-render a whole fragment whenever something it shows may have
/// changed: on any event, and (for environments) on any node update.
#[derive(Clone, Copy)]
enum Fragment {
    Environments,
    Deployments,
}

async fn render(ui: &Ui, fragment: Fragment) -> Result<(&'static str, String), CliError> {
    match fragment {
        Fragment::Environments => Ok((
            "environments",
            pages::environments_body(&pages::list_clusters(ui).await?),
        )),
        Fragment::Deployments => Ok((
            "deployments-rows",
            pages::deployments_rows(&pages::list_deployments(ui).await?),
        )),
    }
}

/// Poke once per message of `stream`, until it ends or nobody listens.
async fn poke_per_message<M>(
    poke: &mpsc::Sender<()>,
    mut stream: tonic::Streaming<M>,
    ui: &Ui,
    what: &str,
) -> Result<(), CliError> {
    while stream
        .message()
        .await
        .map_err(ui.conn.rpc_error(what))?
        .is_some()
    {
        if poke.send(()).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// Send `()` on `poke` for every event (and node update, when `nodes`)
/// the control plane streams.
async fn poke_on_changes(ui: Arc<Ui>, poke: mpsc::Sender<()>, kinds: Vec<String>, nodes: bool) {
    let events = async {
        let mut client = pb::events_client::EventsClient::new(ui.channel());
        let stream = client
            .watch_events(pb::WatchEventsRequest {
                follow: true,
                newest: true,
                limit: 1,
                kinds,
                ..Default::default()
            })
            .await
            .map_err(ui.conn.rpc_error("follow events"))?
            .into_inner();
        poke_per_message(&poke, stream, &ui, "follow events").await
    };
    let node_updates = async {
        if !nodes {
            return std::future::pending::<Result<(), CliError>>().await;
        }
        let mut client = pb::fleet_client::FleetClient::new(ui.channel());
        let stream = client
            .watch_nodes(pb::WatchNodesRequest {})
            .await
            .map_err(ui.conn.rpc_error("watch nodes"))?
            .into_inner();
        poke_per_message(&poke, stream, &ui, "watch nodes").await
    };
    // Either ending (the browser gone, or a stream failed) ends both; the
    // renderer sees the poke channel close.
    tokio::select! {
        _ = events => {}
        _ = node_updates => {}
        () = poke.closed() => {}
    }
}

fn rerender_on_changes(
    ui: Arc<Ui>,
    fragment: Fragment,
    kinds: Vec<String>,
    nodes: bool,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel(16);
    let (poke, mut poked) = mpsc::channel(256);
    tokio::spawn(poke_on_changes(ui.clone(), poke, kinds, nodes));
    tokio::spawn(async move {
        let mut last = String::new();
        loop {
            let first = tokio::select! {
                p = poked.recv() => p,
                () = tx.closed() => return,
            };
            if first.is_none() {
                return;
            }
            let deadline = tokio::time::Instant::now() + COALESCE;
            while let Ok(Some(())) = tokio::time::timeout_at(deadline, poked.recv()).await {}
            match render(&ui, fragment).await {
                Ok((target, html)) => {
                    if html != last {
                        if !send(&tx, patch(target, &html)).await {
                            return;
                        }
                        last = html;
                    }
                }
                Err(e) => {
                    let _ = tx.send(problem(&e)).await;
                    return;
                }
            }
        }
    });
    stream(rx)
}

pub async fn environments(
    State(ui): State<Arc<Ui>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    rerender_on_changes(ui, Fragment::Environments, Vec::new(), true)
}

pub async fn deployments(
    State(ui): State<Arc<Ui>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    rerender_on_changes(ui, Fragment::Deployments, vec!["deployment.".into()], false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn a_reconnecting_browser_resumes_after_its_last_event() {
        let mut headers = HeaderMap::new();
        assert_eq!(resume_from(&headers, Some(7)), 7);
        assert_eq!(resume_from(&headers, None), 0);
        headers.insert("last-event-id", HeaderValue::from_static("41"));
        assert_eq!(resume_from(&headers, Some(7)), 42);
    }
}
