//! A follower's answer to the engine's operator calls (deployments,
//! pipelines, clusters): forward them to the leader, as a transparent HTTP/2
//! proxy of the gRPC request, so every replica serves every operator call
//! (SPEC §7).
//!
//! The request goes out unchanged (path, messages, `grpc-timeout`, trace
//! context) over a channel to the leader's advertised endpoint, one per
//! leader URL, and the leader's response (unary, or a server stream such as
//! `deploy watch`) comes back as it is. The follower authenticates with the
//! replicas' client certificate and names the caller in the headers of
//! [`crate::auth`] ([`auth::ON_BEHALF_OF`], the fingerprint of the
//! certificate the caller presented, and the caller's address), after
//! removing whatever the client sent of them; the leader authorizes the
//! named user as if the user had called it.
//!
//! A call is forwarded at most once: one that arrives already forwarded
//! ([`auth::FORWARDED_BY`]) and finds no leader's service here (the
//! leadership moved meanwhile) is refused, as is one when no leader is
//! known or the leader cannot be reached: `Unavailable`, naming the leader,
//! so the caller retries (the CLI tries the next replica).

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use hotswap_common::pki::Principal;
use hotswap_common::tls::{self, ChannelOptions, ControlPlaneUrl};
use tokio::sync::watch;
use tonic::body::Body;
use tonic::codegen::http;
use tonic::codegen::http::header::{HeaderMap, HeaderValue};
use tonic::transport::Channel;
use tower::{Service, ServiceExt};

use crate::auth::{self, Peer};
use crate::leader_only::Unanswered;
use crate::store::etcd::Leader;

/// Where a call this replica cannot serve goes, or why nowhere.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    /// To the leader, at its endpoint.
    Leader { name: String, endpoint: String },
    /// Refused with `Unavailable` and this message.
    Refuse(String),
}

/// Decide where a call goes: `this` is this replica's name, `leader` who
/// leads as far as it knows, `forwarded_by` the replica that forwarded the
/// call here, if one did.
pub fn route(this: &str, leader: Option<&Leader>, forwarded_by: Option<&str>) -> Route {
    if let Some(by) = forwarded_by {
        return Route::Refuse(format!(
            "replica {this} does not lead either: replica {by} forwarded this call here, and a call is forwarded only once (the leadership is changing); try again shortly"
        ));
    }
    match leader {
        None => Route::Refuse(format!(
            "replica {this} does not lead and no leader is elected yet; try again shortly"
        )),
        // Elected, but its services are not installed yet.
        Some(leader) if leader.name == this => Route::Refuse(format!(
            "replica {this} is taking over as the leader; try again shortly"
        )),
        Some(Leader {
            name,
            endpoint: None,
        }) => Route::Refuse(format!(
            "replica {this} does not lead; the leader is {name}, which does not say where it serves (an older version): call it there"
        )),
        Some(Leader {
            name,
            endpoint: Some(endpoint),
        }) => Route::Leader {
            name: name.clone(),
            endpoint: endpoint.clone(),
        },
    }
}

/// Why a caller's call is not forwarded, whoever leads: the caller may not
/// make it (`PermissionDenied`).
#[derive(Debug, PartialEq, Eq)]
pub struct NotForwarded(pub String);

/// Replace the forwarding headers of `headers` with this replica's: whom
/// the call is for (`caller`, an operator) and from where.
pub fn set_forwarding_headers(
    headers: &mut HeaderMap,
    this: &str,
    caller: &Peer,
    caller_addr: Option<SocketAddr>,
) -> Result<(), NotForwarded> {
    for name in auth::FORWARDING_HEADERS {
        headers.remove(name);
    }
    let user = match &caller.principal {
        Principal::User(name) => name,
        Principal::Node(id) => {
            return Err(NotForwarded(format!(
                "node {id} is not allowed to call the operator API; node certificates may only call agent RPCs"
            )));
        }
        Principal::Replica(name) => {
            return Err(NotForwarded(format!(
                "replica {name} may call the operator API only on behalf of an operator"
            )));
        }
    };
    let value = |what: &str, text: &str| {
        HeaderValue::from_str(text).map_err(|_| {
            NotForwarded(format!(
                "cannot forward the call: {what} {text:?} is not a valid header value"
            ))
        })
    };
    let mut set = vec![
        (auth::FORWARDED_BY, value("replica name", this)?),
        (auth::ON_BEHALF_OF, value("user name", user)?),
        (
            auth::ON_BEHALF_OF_CERT,
            value("certificate fingerprint", &caller.cert_fingerprint)?,
        ),
    ];
    if let Some(addr) = caller_addr {
        set.push((auth::FORWARDED_FOR, value("address", &addr.to_string())?));
    }
    for (name, value) in set {
        headers.insert(name, value);
    }
    Ok(())
}

/// Forward to the leader (see the module's documentation).
pub struct Forward {
    replica: String,
    leader: watch::Receiver<Option<Leader>>,
    /// Trusts the cluster's CA and presents the replicas' certificate.
    tls: Arc<rustls::ClientConfig>,
    /// One channel per leader URL; a channel reconnects by itself.
    channels: Mutex<HashMap<String, Channel>>,
}

impl Forward {
    pub fn new(
        replica: String,
        leader: watch::Receiver<Option<Leader>>,
        tls: Arc<rustls::ClientConfig>,
    ) -> Self {
        Self {
            replica,
            leader,
            tls,
            channels: Mutex::new(HashMap::new()),
        }
    }

    fn channel(&self, endpoint: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(channel) = channels.get(endpoint) {
            return Ok(channel.clone());
        }
        let url = ControlPlaneUrl::parse(endpoint).map_err(|e| e.to_string())?;
        // Connects on first use; bounded by the connect timeout of the
        // options (5 s) and the caller's deadline around the whole call.
        let channel = tls::connect_lazy(&url, self.tls.clone(), &ChannelOptions::default())
            .map_err(|e| error_chain(&e))?;
        // Leaders come and go rarely; keep only the current one's.
        channels.clear();
        channels.insert(endpoint.to_string(), channel.clone());
        Ok(channel)
    }

    /// The request ready to go and where, or the response that refuses it.
    // The refusal is answered at once, never kept or passed along, so its
    // size costs one move.
    #[allow(clippy::result_large_err)]
    fn prepare(
        &self,
        mut request: http::Request<Body>,
    ) -> Result<(Channel, http::Request<Body>, String, String), http::Response<Body>> {
        let refuse = |message: String| tonic::Status::unavailable(message).into_http();
        let forwarded_by = request
            .headers()
            .get(auth::FORWARDED_BY)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let leader = self.leader.borrow().clone();
        let (name, endpoint) = match route(&self.replica, leader.as_ref(), forwarded_by.as_deref())
        {
            Route::Leader { name, endpoint } => (name, endpoint),
            Route::Refuse(message) => return Err(refuse(message)),
        };
        let caller = auth::connection_peer(request.extensions())
            .map_err(|e| tonic::Status::unauthenticated(e.to_string()).into_http())?;
        let caller_addr = auth::remote_addr(request.extensions());
        set_forwarding_headers(request.headers_mut(), &self.replica, &caller, caller_addr)
            .map_err(|NotForwarded(why)| tonic::Status::permission_denied(why).into_http())?;
        let channel = self.channel(&endpoint).map_err(|e| {
            refuse(format!(
                "replica {} does not lead; the leader is {name}, but its endpoint {endpoint} is not usable: {e}",
                self.replica
            ))
        })?;
        Ok((channel, request, name, endpoint))
    }
}

impl Unanswered for Forward {
    fn respond(
        &self,
        request: http::Request<Body>,
    ) -> Pin<Box<dyn Future<Output = http::Response<Body>> + Send>> {
        let path = request.uri().path().to_string();
        let (mut channel, request, leader, endpoint) = match self.prepare(request) {
            Ok(prepared) => prepared,
            Err(refusal) => return Box::pin(async move { refusal }),
        };
        let replica = self.replica.clone();
        Box::pin(async move {
            let sent = async {
                channel.ready().await?;
                channel.call(request).await
            };
            match sent.await {
                Ok(response) => response,
                Err(e) => {
                    let reason = error_chain(&e);
                    tracing::warn!(%path, %leader, %endpoint, error = %reason, "cannot forward a call to the leader");
                    tonic::Status::unavailable(format!(
                        "replica {replica} does not lead and cannot reach the leader {leader} at {endpoint}: {reason}; try again shortly"
                    ))
                    .into_http()
                }
            }
        })
    }
}

/// An error and its sources, `: `-separated (tonic's transport errors say
/// little at the top).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leader(name: &str, endpoint: Option<&str>) -> Leader {
        Leader {
            name: name.into(),
            endpoint: endpoint.map(Into::into),
        }
    }

    #[test]
    fn routes() {
        let a = leader("cp-a", Some("https://127.0.0.1:7443"));
        let cases = [
            (
                Some(a.clone()),
                None,
                Ok::<&str, &str>("https://127.0.0.1:7443"),
            ),
            (
                None,
                None,
                Err("replica cp-b does not lead and no leader is elected yet; try again shortly"),
            ),
            (
                Some(leader("cp-b", Some("https://127.0.0.1:1"))),
                None,
                Err("replica cp-b is taking over as the leader; try again shortly"),
            ),
            (
                Some(leader("cp-a", None)),
                None,
                Err(
                    "replica cp-b does not lead; the leader is cp-a, which does not say where it serves",
                ),
            ),
            // Loop protection: even with a leader known, never twice.
            (
                Some(a),
                Some("cp-c"),
                Err("replica cp-b does not lead either: replica cp-c forwarded this call here"),
            ),
        ];
        for (known, forwarded_by, expected) in cases {
            let got = route("cp-b", known.as_ref(), forwarded_by);
            match (&got, expected) {
                (Route::Leader { name, endpoint }, Ok(expected)) => {
                    assert_eq!((name.as_str(), endpoint.as_str()), ("cp-a", expected));
                }
                (Route::Refuse(message), Err(expected)) => {
                    assert!(message.starts_with(expected), "{message}");
                }
                _ => panic!("{known:?} {forwarded_by:?}: {got:?}"),
            }
        }
    }

    #[test]
    fn forwarding_headers_name_the_caller_and_replace_what_the_client_sent() {
        let mut headers = HeaderMap::new();
        headers.insert(auth::ON_BEHALF_OF, HeaderValue::from_static("admin"));
        headers.insert(
            auth::ON_BEHALF_OF_CERT,
            HeaderValue::from_static("sha256:0"),
        );
        headers.insert(auth::FORWARDED_FOR, HeaderValue::from_static("10.9.9.9:1"));
        headers.insert("grpc-timeout", HeaderValue::from_static("5S"));
        let alice = Peer {
            principal: Principal::User("alice".into()),
            cert_fingerprint: "sha256:abcd".into(),
        };
        let from: SocketAddr = "127.0.0.1:40000".parse().expect("address");
        set_forwarding_headers(&mut headers, "cp-b", &alice, Some(from)).expect("forwarded");
        let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        assert_eq!(get(auth::FORWARDED_BY), Some("cp-b"));
        assert_eq!(get(auth::ON_BEHALF_OF), Some("alice"));
        assert_eq!(get(auth::ON_BEHALF_OF_CERT), Some("sha256:abcd"));
        assert_eq!(get(auth::FORWARDED_FOR), Some("127.0.0.1:40000"));
        assert_eq!(
            get("grpc-timeout"),
            Some("5S"),
            "the deadline passes through"
        );
        // What the leader reads back is exactly the caller.
        let delegation = auth::delegation(get).expect("valid").expect("present");
        assert_eq!(delegation.user, "alice");
        assert_eq!(delegation.cert_fingerprint, "sha256:abcd");
        assert_eq!(delegation.peer_addr, Some(from));

        // Without an address, a stale one a client sent does not survive.
        set_forwarding_headers(&mut headers, "cp-b", &alice, None).expect("forwarded");
        assert_eq!(
            headers.get(auth::FORWARDED_FOR),
            None,
            "the client's own header is removed"
        );

        for principal in [Principal::Node("n1".into()), Principal::Replica("x".into())] {
            let peer = Peer {
                principal,
                cert_fingerprint: "sha256:1".into(),
            };
            assert!(matches!(
                set_forwarding_headers(&mut HeaderMap::new(), "cp-b", &peer, None),
                Err(NotForwarded(_))
            ));
        }
    }
}
