//! The server-side deadline of gRPC calls: unary calls, and the set-up of
//! streaming ones until their response starts, are cancelled after
//! `request_timeout`; uploads are not bounded in total.
//!
//! An upload's duration is its size over the link's speed: within a 60 s
//! total deadline a 512 MiB module would need about 8.5 MB/s, which a slow
//! but healthy link does not have. So upload methods ([`UPLOAD_METHODS`])
//! get no deadline here, and their handler cancels them when no data arrives
//! for `upload_idle_timeout` instead (`service::artifacts`); so does the
//! HTTP API's upload, which streams into the same handler. A client can
//! still ask for less with `grpc-timeout`, which tonic enforces beneath.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::http;

/// Client-streaming methods that carry a payload of arbitrary size; their
/// handlers enforce an idle timeout of their own.
pub const UPLOAD_METHODS: &[&str] = &["/hotswap.v1.Artifacts/PushArtifact"];

/// Whether `request` is an upload: a gRPC upload method, or the HTTP API's
/// artifact upload.
fn is_upload<B>(request: &http::Request<B>) -> bool {
    let path = request.uri().path();
    UPLOAD_METHODS.contains(&path)
        || (request.method() == http::Method::POST && path == crate::http_api::UPLOAD_PATH)
}

/// [`tower::Layer`] applying `timeout` to every call but uploads.
#[derive(Clone)]
pub struct RequestTimeoutLayer {
    timeout: Duration,
}

impl RequestTimeoutLayer {
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S> tower::Layer<S> for RequestTimeoutLayer {
    type Service = RequestTimeout<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequestTimeout {
            inner,
            timeout: self.timeout,
        }
    }
}

#[derive(Clone)]
pub struct RequestTimeout<S> {
    inner: S,
    timeout: Duration,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B> tower::Service<http::Request<B>> for RequestTimeout<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let deadline = (!is_upload(&request)).then_some(self.timeout);
        let future = self.inner.call(request);
        Box::pin(async move {
            let Some(timeout) = deadline else {
                return future.await.map_err(Into::into);
            };
            match tokio::time::timeout(timeout, future).await {
                Ok(result) => result.map_err(Into::into),
                // What tonic's own `Server::timeout` gives: tonic turns it
                // into `Cancelled` "Timeout expired".
                Err(_) => Err(Box::new(tonic::TimeoutExpired(())) as BoxError),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every method that streams from the client without streaming back is
    /// upload-shaped and must be listed (so it gets an idle timeout, not a
    /// total one), and every listed method exists with that shape.
    #[test]
    fn upload_methods_are_exactly_the_client_streaming_calls() {
        let set = <prost_types::FileDescriptorSet as prost::Message>::decode(
            hotswap_common::pb::FILE_DESCRIPTOR_SET,
        )
        .expect("descriptor set decodes");
        let mut uploads = Vec::new();
        for file in set.file {
            let package = file.package.unwrap_or_default();
            for service in file.service {
                let service_name = service.name.unwrap_or_default();
                for method in service.method {
                    if method.client_streaming() && !method.server_streaming() {
                        uploads.push(format!("/{package}.{service_name}/{}", method.name()));
                    }
                }
            }
        }
        uploads.sort();
        let mut listed: Vec<String> = UPLOAD_METHODS.iter().map(|m| m.to_string()).collect();
        listed.sort();
        assert_eq!(uploads, listed);
    }

    #[tokio::test]
    async fn unary_calls_time_out_and_uploads_do_not() {
        use tower::{Layer, Service, ServiceExt};
        // Each call takes four times the deadline.
        let slow = tower::service_fn(|_request: http::Request<()>| async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            Ok::<_, std::convert::Infallible>("done")
        });
        let mut service = RequestTimeoutLayer::new(Duration::from_millis(50)).layer(slow);
        let unary = http::Request::builder()
            .uri("/hotswap.v1.Fleet/ListNodes")
            .body(())
            .expect("request");
        let err = service
            .ready()
            .await
            .expect("ready")
            .call(unary)
            .await
            .expect_err("unary call cut off");
        assert!(err.is::<tonic::TimeoutExpired>(), "{err}");
        let upload = http::Request::builder()
            .uri(UPLOAD_METHODS[0])
            .body(())
            .expect("request");
        let done = service
            .ready()
            .await
            .expect("ready")
            .call(upload)
            .await
            .expect("an upload has no total deadline");
        assert_eq!(done, "done");
    }
}
