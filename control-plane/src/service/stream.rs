//! Server-streaming responses (the watches): one task produces the items,
//! a bounded channel carries them to the client, and the task stops when
//! the client goes away or the control plane shuts down. The plumbing is
//! here once; each watch only says what it sends.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Response, Status};

/// What a server-streaming handler returns.
pub type ServerStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The producing end of one server-streaming response.
pub struct StreamSink<T> {
    tx: mpsc::Sender<Result<T, Status>>,
    shutdown: CancellationToken,
}

impl<T> StreamSink<T> {
    /// Send one item, waiting while the client is `buffer` items behind;
    /// `false` when the client is gone and producing should stop.
    pub async fn send(&self, item: T) -> bool {
        self.tx.send(Ok(item)).await.is_ok()
    }

    /// End the stream with an error.
    pub async fn fail(&self, status: impl Into<Status>) {
        let _ = self.tx.send(Err(status.into())).await;
    }

    /// Wait for `next` (the next change to send), unless the control plane
    /// shuts down or the client goes away first; `None` means stop.
    pub async fn next<F: Future>(&self, next: F) -> Option<F::Output> {
        tokio::select! {
            _ = self.shutdown.cancelled() => None,
            _ = self.tx.closed() => None,
            out = next => Some(out),
        }
    }
}

/// Start a server-streaming response: `produce` runs in a task of its own
/// with the sink, at most `buffer` items ahead of the client, and the
/// stream ends when it returns.
pub fn spawn_stream<T, F, Fut>(
    shutdown: &CancellationToken,
    buffer: usize,
    produce: F,
) -> Response<ServerStream<T>>
where
    T: Send + 'static,
    F: FnOnce(StreamSink<T>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(buffer);
    let sink = StreamSink {
        tx,
        shutdown: shutdown.clone(),
    };
    tokio::spawn(produce(sink));
    Response::new(Box::pin(ReceiverStream::new(rx)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn a_stream_carries_items_and_errors_and_stops_on_shutdown() {
        let shutdown = CancellationToken::new();
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let response = spawn_stream(&shutdown, 4, |sink: StreamSink<u32>| async move {
            assert!(sink.send(1).await);
            sink.fail(Status::not_found("gone")).await;
            let _ = go.send(());
            // Nothing else comes: the shutdown below ends the wait.
            assert!(sink.next(std::future::pending::<()>()).await.is_none());
        });
        let mut stream = response.into_inner();
        assert_eq!(stream.next().await.map(|r| r.ok()), Some(Some(1)));
        let err = stream.next().await.and_then(|r| r.err()).expect("error");
        assert_eq!(err.code(), tonic::Code::NotFound);
        wait.await.expect("producer ran");
        shutdown.cancel();
        assert!(stream.next().await.is_none(), "the stream ends");
    }

    #[tokio::test]
    async fn a_producer_stops_when_the_client_goes_away() {
        let shutdown = CancellationToken::new();
        let (done, stopped) = tokio::sync::oneshot::channel::<bool>();
        let response = spawn_stream(&shutdown, 1, |sink: StreamSink<u32>| async move {
            let gone = sink.next(std::future::pending::<()>()).await.is_none();
            let _ = done.send(gone && !sink.send(2).await);
        });
        drop(response);
        assert!(stopped.await.expect("producer ended"));
    }
}
