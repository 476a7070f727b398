//! Prefix watches: a stream of typed changes that resumes from the last
//! revision seen when its connection drops, and ends with
//! [`Error::Compacted`] when the history it needs is gone.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tracing::Instrument;

use crate::client::Client;
use crate::error::Error;
use crate::kv::KeyValue;
use crate::lease::require_leader;
use crate::pb;
use crate::pb::watch_client::WatchClient;
use crate::prefix_end;

/// Whether a key was written or deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEventKind {
    Put,
    Delete,
}

/// One change under the watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: WatchEventKind,
    /// For a put the key as written; for a delete the key, with an empty
    /// value and the revision of the delete.
    pub kv: KeyValue,
    /// The revision of the change (`kv.mod_revision`).
    pub revision: i64,
}

/// Every change of one revision (one transaction) under the prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchBatch {
    pub revision: i64,
    pub events: Vec<WatchEvent>,
}

/// Changes under a prefix in revision order, one revision at a time;
/// yields an error once (a compaction, a cancel by etcd, or a
/// non-transient failure) and then ends. Dropping it cancels the watch.
pub struct WatchBatches {
    batches: mpsc::Receiver<Result<WatchBatch, Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl Stream for WatchBatches {
    type Item = Result<WatchBatch, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.batches.poll_recv(cx)
    }
}

impl Drop for WatchBatches {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Changes under a prefix in revision order, one event at a time (the
/// events of [`WatchBatches`], flattened).
pub struct WatchStream {
    batches: WatchBatches,
    ready: std::collections::VecDeque<WatchEvent>,
}

impl Stream for WatchStream {
    type Item = Result<WatchEvent, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(event) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            match Pin::new(&mut self.batches).poll_next(cx) {
                Poll::Ready(Some(Ok(batch))) => self.ready.extend(batch.events),
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Client {
    /// Watch every key under `prefix`, delivering each change with a
    /// revision greater than `after_revision` (pass the revision of a
    /// [`Client::range`] to follow on from it). A dropped connection is
    /// resumed, on another endpoint if need be, after the last revision
    /// delivered; if etcd has compacted that history, the stream yields
    /// [`Error::Compacted`] and the caller must re-list.
    pub fn watch_prefix(&self, prefix: &[u8], after_revision: i64) -> WatchStream {
        WatchStream {
            batches: self.watch_prefix_batches(prefix, after_revision),
            ready: std::collections::VecDeque::new(),
        }
    }

    /// As [`Client::watch_prefix`], delivering each revision's changes
    /// together, so a mirror applies a transaction whole.
    pub fn watch_prefix_batches(&self, prefix: &[u8], after_revision: i64) -> WatchBatches {
        // A little room so a burst does not stall the reader task; the
        // consumer's pace still bounds memory.
        let (sender, batches) = mpsc::channel(256);
        let client = self.clone();
        let prefix = prefix.to_vec();
        let span = tracing::info_span!("etcd watch", prefix = %String::from_utf8_lossy(&prefix));
        let task = tokio::spawn(
            async move {
                if let Err(error) = client.follow(&prefix, after_revision, &sender).await {
                    let _ = sender.send(Err(error)).await;
                }
            }
            .instrument(span),
        );
        WatchBatches { batches, task }
    }

    /// Deliver changes until the receiver goes away (`Ok`) or the watch
    /// cannot go on (`Err`).
    async fn follow(
        &self,
        prefix: &[u8],
        after_revision: i64,
        sender: &mpsc::Sender<Result<WatchBatch, Error>>,
    ) -> Result<(), Error> {
        let mut next = after_revision + 1;
        let mut failures: u32 = 0;
        loop {
            if failures > 0 {
                // 100 ms doubling to 2 s between reconnects.
                let backoff =
                    Duration::from_millis(100 << failures.min(5)).min(Duration::from_secs(2));
                tokio::time::sleep(backoff).await;
            }
            failures += 1;
            let (index, channel) = match self.channel("watch").await {
                Ok(connected) => connected,
                Err(e) if e.is_transient() => {
                    tracing::debug!(error = %e, "etcd watch cannot connect; retrying");
                    continue;
                }
                Err(e) => return Err(e),
            };
            let (requests, receiver) = mpsc::channel(1);
            let create = pb::WatchRequest {
                request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                    pb::WatchCreateRequest {
                        key: prefix.to_vec(),
                        range_end: prefix_end(prefix),
                        start_revision: next,
                    },
                )),
            };
            if requests.send(create).await.is_err() {
                continue;
            }
            let mut request = tonic::Request::new(ReceiverStream::new(receiver));
            require_leader(&mut request);
            let timeout = self.config().request_timeout;
            let opened =
                tokio::time::timeout(timeout, WatchClient::new(channel).watch(request)).await;
            let mut responses = match opened {
                Ok(Ok(response)) => response.into_inner(),
                Ok(Err(status)) => {
                    let error = Error::from_status("watch", &status, next);
                    if !error.is_transient() {
                        return Err(error);
                    }
                    self.forget(index).await;
                    continue;
                }
                Err(_) => {
                    self.forget(index).await;
                    continue;
                }
            };
            loop {
                match responses.message().await {
                    Ok(Some(response)) => {
                        if response.compact_revision > 0 {
                            return Err(Error::Compacted {
                                op: "watch",
                                revision: next,
                                compact_revision: Some(response.compact_revision),
                            });
                        }
                        if response.canceled {
                            return Err(Error::WatchCanceled {
                                prefix: String::from_utf8_lossy(prefix).into_owned(),
                                reason: response.cancel_reason,
                            });
                        }
                        failures = 0;
                        // A response holds whole revisions (no fragments
                        // were asked for), in order.
                        let mut batch: Option<WatchBatch> = None;
                        for event in response.events {
                            let event = WatchEvent::from_pb(event)?;
                            match &mut batch {
                                Some(open) if open.revision == event.revision => {
                                    open.events.push(event);
                                    continue;
                                }
                                _ => {}
                            }
                            let revision = event.revision;
                            if let Some(done) = batch.replace(WatchBatch {
                                revision,
                                events: vec![event],
                            }) {
                                next = done.revision + 1;
                                if sender.send(Ok(done)).await.is_err() {
                                    return Ok(());
                                }
                            }
                        }
                        if let Some(done) = batch {
                            next = done.revision + 1;
                            if sender.send(Ok(done)).await.is_err() {
                                return Ok(());
                            }
                        }
                    }
                    Ok(None) => {
                        tracing::debug!(next, "etcd watch stream ended; resuming");
                        break;
                    }
                    Err(status) => {
                        tracing::debug!(next, code = ?status.code(), message = status.message(), "etcd watch broke; resuming");
                        break;
                    }
                }
            }
            drop(requests);
            self.forget(index).await;
        }
    }
}

impl WatchEvent {
    fn from_pb(event: pb::Event) -> Result<Self, Error> {
        let kind = match pb::event::EventType::try_from(event.r#type) {
            Ok(pb::event::EventType::Put) => WatchEventKind::Put,
            Ok(pb::event::EventType::Delete) => WatchEventKind::Delete,
            Err(_) => {
                return Err(Error::Malformed {
                    op: "watch",
                    what: "unknown event type",
                });
            }
        };
        let kv = event.kv.map(KeyValue::from_pb).ok_or(Error::Malformed {
            op: "watch",
            what: "event without a key",
        })?;
        Ok(Self {
            kind,
            revision: kv.mod_revision,
            kv,
        })
    }
}
