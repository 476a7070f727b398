//! gRPC services only the leading replica can answer: the deployment engine
//! (deployments, pipelines, clusters) lives in the leader alone. On every
//! replica such a service is registered wrapped in [`LeaderOnly`]; the
//! leader installs the real service when it starts leading, and until then
//! (on a follower) a call is answered from [`Unanswered`]: forwarded to the
//! leader (`Forward`, in the `forward` module) or refused ([`Refuse`]).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::http;
use tonic::server::NamedService;
use tower::Service;

/// What a follower does with a call for the leader.
pub trait Unanswered: Send + Sync + 'static {
    /// The response to `request`, which this replica cannot serve because
    /// it does not lead.
    fn respond(
        &self,
        request: http::Request<Body>,
    ) -> Pin<Box<dyn Future<Output = http::Response<Body>> + Send>>;
}

/// Refuse with `Unavailable`, naming the leader when one is known (agent
/// sessions: agents fail over to the leader themselves). Operator calls
/// are forwarded instead (by the `forward` module).
pub struct Refuse {
    pub replica: String,
    pub leader: tokio::sync::watch::Receiver<Option<crate::store::etcd::Leader>>,
}

impl Unanswered for Refuse {
    fn respond(
        &self,
        _request: http::Request<Body>,
    ) -> Pin<Box<dyn Future<Output = http::Response<Body>> + Send>> {
        let message = match self.leader.borrow().as_ref().map(|l| l.name.as_str()) {
            Some(leader) => format!(
                "replica {} does not lead; the leader is {leader}: call it there",
                self.replica
            ),
            None => format!(
                "replica {} does not lead and no leader is elected yet; try again shortly",
                self.replica
            ),
        };
        let response = tonic::Status::unavailable(message).into_http();
        Box::pin(async move { response })
    }
}

/// A service that answers on the leader and is handed to [`Unanswered`]
/// elsewhere.
pub struct LeaderOnly<S> {
    local: Arc<RwLock<Option<S>>>,
    otherwise: Arc<dyn Unanswered>,
}

impl<S> Clone for LeaderOnly<S> {
    fn clone(&self) -> Self {
        Self {
            local: Arc::clone(&self.local),
            otherwise: Arc::clone(&self.otherwise),
        }
    }
}

/// The handle that installs the real service once this replica leads.
pub struct Install<S>(Arc<RwLock<Option<S>>>);

impl<S> Install<S> {
    pub fn install(&self, service: S) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Some(service);
    }
}

impl<S> LeaderOnly<S> {
    /// A service with nothing installed yet, and its installer.
    pub fn new(otherwise: Arc<dyn Unanswered>) -> (Self, Install<S>) {
        let local = Arc::new(RwLock::new(None));
        (
            Self {
                local: Arc::clone(&local),
                otherwise,
            },
            Install(local),
        )
    }
}

impl<S: NamedService> NamedService for LeaderOnly<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for LeaderOnly<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // tonic's generated servers are always ready.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let local = self.local.read().unwrap_or_else(|e| e.into_inner()).clone();
        match local {
            Some(mut service) => Box::pin(service.call(request)),
            None => {
                let response = self.otherwise.respond(request);
                Box::pin(async move { Ok(response.await) })
            }
        }
    }
}
