//! Every gRPC call the server accepted runs to its end: its handler runs in
//! a task of its own, so a caller that goes away does not stop it half-way.
//!
//! hyper drops a call's future when its stream is reset or its connection
//! closes, and a deadline ([`crate::deadline`], `grpc-timeout`) drops it
//! when it expires. A handler dropped at an `.await` between two of its
//! steps leaves the first done and the second not: the deployment engine,
//! stopped while `deploy create` waited for its group commit, had its
//! record and the first wave's desired states written (and flushed by the
//! next commit) but neither the in-memory deployment nor the audit record,
//! so a node activated a version of a deployment nobody listed or advanced.
//! The chaos suite found it by killing a follower while it forwarded
//! `deploy create` to the leader (tests/tests/chaos_ha.rs). With this
//! layer innermost, what goes away is only the wait for the answer.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// [`tower::Layer`] running each call's handler in its own task.
#[derive(Clone, Copy, Default)]
pub struct RunToEndLayer;

impl<S> tower::Layer<S> for RunToEndLayer {
    type Service = RunToEnd<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RunToEnd { inner }
    }
}

#[derive(Clone)]
pub struct RunToEnd<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for RunToEnd<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    S::Error: Into<BoxError> + Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // Dropping the handle detaches the task; it is not aborted.
        let task = tokio::spawn(self.inner.call(request));
        Box::pin(async move {
            match task.await {
                Ok(result) => result.map_err(Into::into),
                // A handler's panic stays a panic, as without this layer.
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => Err(Box::new(e) as BoxError),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower::{Layer, Service, ServiceExt};

    use super::*;

    /// A handler of two steps with a wait between, like a write, a group
    /// commit, then the in-memory state: the caller that stops waiting
    /// after the first step does not stop the second.
    #[tokio::test]
    async fn a_call_whose_caller_goes_away_still_finishes() {
        let (steps_tx, mut steps) = tokio::sync::watch::channel(0u32);
        let handler = tower::service_fn(move |_request: http::Request<()>| {
            let steps = steps_tx.clone();
            async move {
                steps.send_modify(|n| *n += 1);
                tokio::time::sleep(Duration::from_millis(100)).await;
                steps.send_modify(|n| *n += 1);
                Ok::<_, std::convert::Infallible>("done")
            }
        });
        let mut service = RunToEndLayer.layer(handler);
        let request = http::Request::builder()
            .uri("/hotswap.v1.Deployments/CreateDeployment")
            .body(())
            .expect("request");
        let call = service.ready().await.expect("ready").call(request);
        // The caller gives up (drops the call) once the handler is between
        // its steps.
        tokio::time::timeout(Duration::from_secs(5), async {
            tokio::select! {
                _ = call => panic!("the call answered before its caller gave up"),
                _ = steps.wait_for(|n| *n == 1) => {}
            }
        })
        .await
        .expect("the handler started");
        // The handler, detached, takes its second step anyway.
        tokio::time::timeout(Duration::from_secs(5), steps.wait_for(|n| *n == 2))
            .await
            .expect("the handler finished after its caller left")
            .expect("the handler's channel");
    }

    #[tokio::test]
    async fn answers_and_errors_come_through() {
        let mut service = RunToEndLayer.layer(tower::service_fn(
            |request: http::Request<&'static str>| async move {
                match *request.body() {
                    "fail" => Err(std::io::Error::other("refused")),
                    body => Ok(body),
                }
            },
        ));
        let ok = service
            .ready()
            .await
            .expect("ready")
            .call(http::Request::new("hello"))
            .await
            .expect("answer");
        assert_eq!(ok, "hello");
        let err = service
            .ready()
            .await
            .expect("ready")
            .call(http::Request::new("fail"))
            .await
            .expect_err("error");
        assert_eq!(err.to_string(), "refused");
    }
}
