//! Streams: the gRPC server streams as Server-Sent Events (one JSON object
//! per `data:` line), and an upload body as the gRPC upload's chunks.
//!
//! The event stream's `id:` is the event's sequence number; a client that
//! reconnects with `Last-Event-ID` gets the events after it, from the store
//! and then live, each once (the Events service's guarantee). The other
//! streams (a deployment, the fleet) send whole states, not changes: their
//! `id:` counts the messages on from the `Last-Event-ID` the client sent,
//! and a resumed stream starts again with the state as it is now, so
//! nothing is missed either.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use hotswap_common::model::EventView;
use hotswap_common::pb;
use serde::Serialize;
use tonic::Streaming;

use super::error::HttpError;

/// A comment line this often on an idle stream, so proxies and load
/// balancers that cut idle connections (often after 30–60 s) leave it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Upload chunks no larger than the gRPC client's (the service takes up to
/// 8 MiB messages; the CLI sends 1 MiB).
const UPLOAD_CHUNK_BYTES: usize = 1024 * 1024;

/// The `Last-Event-ID` header of a reconnecting SSE client.
pub struct LastEventId(pub Option<u64>);

impl<S: Send + Sync> FromRequestParts<S> for LastEventId {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, HttpError> {
        parse_last_event_id(
            parts
                .headers
                .get("last-event-id")
                .map(|v| v.to_str().unwrap_or("\u{fffd}")),
        )
        .map(LastEventId)
    }
}

pub fn parse_last_event_id(value: Option<&str>) -> Result<Option<u64>, HttpError> {
    match value.map(str::trim) {
        None | Some("") => Ok(None),
        Some(text) => text.parse().map(Some).map_err(|_| {
            HttpError::bad_request(format!(
                "Last-Event-ID {text:?}: not a sequence number (the id: of the last event received)"
            ))
        }),
    }
}

fn json_event(id: u64, value: &impl Serialize) -> Event {
    let data = serde_json::to_string(value)
        .unwrap_or_else(|e| format!("{{\"error\": \"cannot render the message: {e}\"}}"));
    Event::default().id(id.to_string()).data(data)
}

/// The last message of a stream that failed: `event: error` with the
/// error body every other answer has.
fn error_event(error: HttpError) -> Event {
    let data = serde_json::to_string(&error.body()).unwrap_or_default();
    Event::default().event("error").data(data)
}

fn sse(stream: impl Stream<Item = Event> + Send + 'static) -> Response {
    Sse::new(stream.map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response()
}

/// `messages` as events; the stream ends after the first error, which it
/// reports as an `error` event.
fn until_error<M, F>(messages: Streaming<M>, to_event: F) -> impl Stream<Item = Event> + Send
where
    M: Send + 'static,
    F: FnMut(M) -> Result<Event, HttpError> + Send + 'static,
{
    futures_util::stream::unfold(Some((messages, to_event)), |state| async move {
        let (mut messages, mut to_event) = state?;
        match messages.message().await {
            Ok(Some(message)) => match to_event(message) {
                Ok(event) => Some((event, Some((messages, to_event)))),
                Err(error) => Some((error_event(error), None)),
            },
            Ok(None) => None,
            Err(status) => Some((error_event(HttpError::from(status)), None)),
        }
    })
}

/// The event log, `id:` its sequence numbers.
pub fn events(events: Streaming<pb::Event>) -> Response {
    sse(until_error(events, |event| {
        let view = EventView::from(event);
        Ok(json_event(view.seq, &view))
    }))
}

/// Whole states (a deployment, node updates) numbered after `last`.
pub fn numbered<M, V, E>(
    messages: Streaming<M>,
    last: LastEventId,
    mut view: impl FnMut(M) -> Result<V, E> + Send + 'static,
) -> Response
where
    M: Send + 'static,
    V: Serialize,
    HttpError: From<E>,
{
    let mut id = last.0.unwrap_or(0);
    sse(until_error(messages, move |message| {
        let view = view(message)?;
        id = id.saturating_add(1);
        Ok(json_event(id, &view))
    }))
}

/// An upload body as the gRPC upload's chunks, and a signal that the body
/// has been read to its end (or as far as it will be).
///
/// A body that fails half-way (the client went away) never ends: the
/// service then cancels the upload after its idle timeout and removes what
/// it staged, instead of judging a truncated artifact as if it were whole.
///
/// When the service refuses the upload before its end (over the size
/// limit), the rest is read and discarded, up to [`body::DRAIN_LIMIT`]
/// bytes, before the answer goes out: a stream whose request body is
/// dropped unread is reset, and the reset can overtake the answer (curl then
/// reports no status at all).
///
/// [`body::DRAIN_LIMIT`]: super::body::DRAIN_LIMIT
pub fn upload_chunks(
    body: axum::body::Body,
) -> (
    impl Stream<Item = pb::PushArtifactChunk> + Send + 'static,
    tokio::sync::oneshot::Receiver<()>,
) {
    let (chunks, received) = tokio::sync::mpsc::channel(4);
    let (read, drained) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut data = body.into_data_stream();
        let mut forwarding = true;
        let mut discarded = 0usize;
        while let Some(frame) = data.next().await {
            match frame {
                Ok(bytes) if forwarding => {
                    for chunk in bytes.chunks(UPLOAD_CHUNK_BYTES) {
                        let chunk = pb::PushArtifactChunk {
                            data: chunk.to_vec(),
                        };
                        if chunks.send(chunk).await.is_err() {
                            // The service stopped reading: it refused.
                            forwarding = false;
                            break;
                        }
                    }
                }
                Ok(bytes) => {
                    discarded += bytes.len();
                    if discarded > super::body::DRAIN_LIMIT {
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "upload body failed; waiting for the idle timeout");
                    chunks.closed().await;
                    break;
                }
            }
        }
        let _ = read.send(());
    });
    (
        tokio_stream::wrappers::ReceiverStream::new(received),
        drained,
    )
}

/// How long an answer to a refused upload waits for the rest of its body
/// to be read (see [`upload_chunks`]).
pub const DRAIN_WAIT: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_event_id_is_a_sequence_number_or_refused_by_name() {
        assert_eq!(parse_last_event_id(None).expect("none"), None);
        assert_eq!(parse_last_event_id(Some("")).expect("empty"), None);
        assert_eq!(parse_last_event_id(Some(" 41 ")).expect("n"), Some(41));
        let refused = parse_last_event_id(Some("abc")).expect_err("refused");
        assert_eq!(refused.status, axum::http::StatusCode::BAD_REQUEST);
        assert!(
            refused.message.starts_with("Last-Event-ID"),
            "{}",
            refused.message
        );
    }
}
