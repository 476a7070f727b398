//! Who is calling, and what they may do. Every RPC but enrollment requires a
//! client certificate issued by our CA (the TLS layer has verified the chain);
//! the identity is the `hotswap://` URI the CA put in it.
//!
//! - Operators (user certificates) are looked up in the user table on every
//!   call: the certificate must be the user's current one, the user must not
//!   be revoked, and the user's role must grant the call's [`Permission`].
//! - Nodes may only call agent RPCs, with their current certificate, and only
//!   for themselves (the session is bound to the certificate's node id).
//! - A follower replica forwards the engine's operator calls to the leader
//!   with the replicas' certificate (`hotswap://replica/...`) and names the
//!   operator in [`ON_BEHALF_OF`] and [`ON_BEHALF_OF_CERT`]. Only a peer
//!   presenting that certificate may speak for someone else: the leader then
//!   authorizes the named user exactly as if the user had called (the same
//!   user record, certificate, revocation and role checks), and the audit
//!   log gets the user's own address from [`FORWARDED_FOR`]. From any other
//!   peer those headers are ignored.

use std::net::SocketAddr;
use std::sync::Arc;

use hotswap_common::pki::{self, Principal};
use hotswap_common::timefmt::now_ms;
use rustls::pki_types::CertificateDer;
use tonic::Request;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::error::ApiError;
use crate::store::UserRecords;

/// The verified peer: its identity and the fingerprint of the certificate it
/// presented (the registry compares it to the node's current certificate).
#[derive(Clone, Debug)]
pub struct Peer {
    pub principal: Principal,
    pub cert_fingerprint: String,
}

pub use crate::roles::{Permission, Role};

/// The name in the replicas' certificate (`hotswap://replica/cluster`):
/// every replica of a cluster holds the same one.
pub const REPLICA_IDENTITY: &str = "cluster";

/// The replica that forwarded a call (its `--name`). A follower never
/// forwards a call that already carries it, so a call is forwarded at most
/// once.
pub const FORWARDED_BY: &str = "x-hotswap-forwarded-by";
/// The user a forwarded call is made for.
pub const ON_BEHALF_OF: &str = "x-hotswap-on-behalf-of";
/// The fingerprint of the certificate that user presented to the follower,
/// checked against the user record as a direct call's certificate is.
pub const ON_BEHALF_OF_CERT: &str = "x-hotswap-on-behalf-of-cert";
/// The address the user called the follower from, for the audit log.
pub const FORWARDED_FOR: &str = "x-hotswap-forwarded-for";

/// Every header that only a forwarding replica may set; a follower removes
/// what a client sent of them before it sets its own.
pub const FORWARDING_HEADERS: [&str; 4] =
    [FORWARDED_BY, ON_BEHALF_OF, ON_BEHALF_OF_CERT, FORWARDED_FOR];

/// Who a forwarded call is made for, as its headers say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delegation {
    pub user: String,
    pub cert_fingerprint: String,
    pub peer_addr: Option<SocketAddr>,
}

/// The delegation `header` finds (`None` when the call names nobody), or
/// what is wrong with it. Only meaningful from a replica's peer.
pub fn delegation<'a>(
    header: impl Fn(&str) -> Option<&'a str>,
) -> Result<Option<Delegation>, String> {
    let Some(user) = header(ON_BEHALF_OF) else {
        return Ok(None);
    };
    if user.is_empty() {
        return Err(format!("{ON_BEHALF_OF} is empty"));
    }
    let cert_fingerprint = header(ON_BEHALF_OF_CERT)
        .filter(|f| f.starts_with("sha256:"))
        .ok_or_else(|| {
            format!("{ON_BEHALF_OF} names user {user:?} but {ON_BEHALF_OF_CERT} gives no sha256: fingerprint of their certificate")
        })?;
    let peer_addr = header(FORWARDED_FOR)
        .map(|addr| {
            addr.parse::<SocketAddr>()
                .map_err(|e| format!("{FORWARDED_FOR} {addr:?} is not an address: {e}"))
        })
        .transpose()?;
    Ok(Some(Delegation {
        user: user.to_string(),
        cert_fingerprint: cert_fingerprint.to_string(),
        peer_addr,
    }))
}

/// The delegation of a call whose TLS peer is a replica; `None` for any
/// other peer, whatever headers it sent.
fn delegation_of<T>(request: &Request<T>) -> Option<Result<Option<Delegation>, String>> {
    let direct = connection_peer(request.extensions()).ok()?;
    matches!(direct.principal, Principal::Replica(_))
        .then(|| delegation(|name| request.metadata().get(name)?.to_str().ok()))
}

/// An authorized operator call.
#[derive(Clone, Debug)]
pub struct Caller {
    pub user: String,
    pub role: Role,
}

/// The request's context, for the audit log.
#[derive(Clone, Debug, Default)]
pub struct RequestInfo {
    pub peer_addr: Option<SocketAddr>,
    /// From a W3C `traceparent` header when the client sent one, else fresh.
    pub trace_id: String,
}

impl RequestInfo {
    pub fn of<T>(request: &Request<T>) -> Self {
        let trace_id = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(trace_id_from_traceparent)
            .unwrap_or_else(|| hex::encode(rand::random::<[u8; 16]>()));
        // A forwarded call: the user's own address, which the follower saw.
        let forwarded_for = match delegation_of(request) {
            Some(Ok(Some(delegation))) => delegation.peer_addr,
            _ => None,
        };
        Self {
            peer_addr: forwarded_for.or_else(|| remote_addr(request.extensions())),
            trace_id,
        }
    }
}

/// The trace id of a `traceparent` value (`00-<32 hex>-<16 hex>-<2 hex>`).
pub fn trace_id_from_traceparent(value: &str) -> Option<String> {
    let mut parts = value.split('-');
    let _version = parts.next()?;
    let trace_id = parts.next()?;
    let valid = trace_id.len() == 32
        && trace_id.bytes().all(|b| b.is_ascii_hexdigit())
        && trace_id.bytes().any(|b| b != b'0');
    valid.then(|| trace_id.to_ascii_lowercase())
}

const NO_CERT: &str = "this call requires a client certificate issued by the control plane";

/// What every request on one connection carries about it: the TLS
/// connection (addresses, certificate chain) and the identity its client
/// certificate names, read once when the connection was accepted rather
/// than parsed again on each call (an agent makes several per deployment).
/// It is the `tonic::transport::server::Connected` info of the streams the
/// TLS listener accepts.
#[derive(Clone, Debug)]
pub struct Connection {
    tls: TlsConnectInfo<TcpConnectInfo>,
    /// The direct peer, or why its certificate is not usable.
    peer: Arc<Result<Peer, String>>,
}

impl Connection {
    pub fn new(tls: TlsConnectInfo<TcpConnectInfo>) -> Self {
        let peer = direct_peer(tls.peer_certs()).map_err(|e| match e {
            ApiError::Unauthenticated(reason) => reason,
            other => other.to_string(),
        });
        Self {
            tls,
            peer: Arc::new(peer),
        }
    }

    /// The connection a request came on (`None` for a request that did not
    /// come through our TLS listener, such as one built in a test).
    pub fn of(extensions: &tonic::codegen::http::Extensions) -> Option<&Self> {
        extensions.get::<Self>()
    }

    pub fn remote_addr(&self) -> Option<SocketAddr> {
        self.tls.get_ref().remote_addr()
    }

    /// The client certificate's identity, as read at accept.
    pub fn peer(&self) -> Result<Peer, ApiError> {
        match &*self.peer {
            Ok(peer) => Ok(peer.clone()),
            Err(reason) => Err(ApiError::Unauthenticated(reason.clone())),
        }
    }
}

/// The identity of the client certificate a request's connection presented.
pub fn connection_peer(extensions: &tonic::codegen::http::Extensions) -> Result<Peer, ApiError> {
    match Connection::of(extensions) {
        Some(connection) => connection.peer(),
        None => Err(ApiError::Unauthenticated(NO_CERT.into())),
    }
}

/// The address a request came from.
pub fn remote_addr(extensions: &tonic::codegen::http::Extensions) -> Option<SocketAddr> {
    Connection::of(extensions).and_then(Connection::remote_addr)
}

/// The identity of the client certificate the TLS peer presented (the TLS
/// layer verified its chain to our CA).
pub fn direct_peer(certs: Option<Arc<Vec<CertificateDer<'static>>>>) -> Result<Peer, ApiError> {
    let certs = certs.ok_or_else(|| ApiError::Unauthenticated(NO_CERT.into()))?;
    let leaf = certs
        .first()
        .ok_or_else(|| ApiError::Unauthenticated(NO_CERT.into()))?;
    let principal = pki::principal_of(leaf.as_ref())
        .map_err(|e| ApiError::Unauthenticated(format!("client certificate not usable: {e}")))?;
    Ok(Peer {
        principal,
        cert_fingerprint: pki::der_fingerprint(leaf.as_ref()),
    })
}

/// The caller's identity: its client certificate's, or, for a call a
/// replica forwarded, the user's it names with the certificate that user
/// presented to the replica.
pub fn peer<T>(request: &Request<T>) -> Result<Peer, ApiError> {
    let direct = connection_peer(request.extensions())?;
    let Principal::Replica(replica) = &direct.principal else {
        // Only a replica may speak for someone else: anyone else's
        // forwarding headers are ignored.
        return Ok(direct);
    };
    match delegation(|name| request.metadata().get(name)?.to_str().ok()) {
        Ok(Some(delegation)) => Ok(Peer {
            principal: Principal::User(delegation.user),
            cert_fingerprint: delegation.cert_fingerprint,
        }),
        Ok(None) => Err(ApiError::Unauthenticated(format!(
            "the certificate of replica {replica:?} only forwards calls on behalf of an operator, and this call names none ({ON_BEHALF_OF})"
        ))),
        Err(reason) => Err(ApiError::Unauthenticated(format!(
            "call forwarded with the certificate of replica {replica:?} is malformed: {reason}"
        ))),
    }
}

/// The user a certificate names, if it is a user certificate (for audit
/// records of refused calls).
pub fn claimed_user<T>(request: &Request<T>) -> String {
    let claimed = peer(request).or_else(|_| connection_peer(request.extensions()));
    match claimed.map(|p| p.principal) {
        Ok(Principal::User(name)) => name,
        Ok(Principal::Node(id)) => format!("node:{id}"),
        Ok(Principal::Replica(name)) => format!("replica:{name}"),
        Err(_) => "anonymous".into(),
    }
}

/// Check an operator's certificate and role against `permission`.
pub fn authorize_operator(
    peer: &Peer,
    store: &dyn UserRecords,
    permission: Permission,
) -> Result<Caller, ApiError> {
    let name = match &peer.principal {
        Principal::User(name) => name,
        Principal::Node(id) => {
            return Err(ApiError::PermissionDenied(format!(
                "node {id} is not allowed to call the operator API; node certificates may only call agent RPCs"
            )));
        }
        Principal::Replica(name) => {
            return Err(ApiError::PermissionDenied(format!(
                "replica {name} may call the operator API only on behalf of an operator"
            )));
        }
    };
    let user = store.get_user(name)?.ok_or_else(|| {
        ApiError::Unauthenticated(format!(
            "user {name:?} is not known to this control plane; ask an admin for `hotswapctl users create`"
        ))
    })?;
    if user.revoked_at_ms.is_some() {
        return Err(ApiError::Unauthenticated(format!(
            "user {name:?} has been revoked"
        )));
    }
    if user.cert_fingerprint != peer.cert_fingerprint {
        return Err(ApiError::Unauthenticated(format!(
            "this certificate for user {name:?} has been replaced; use the profile from the latest `users create`"
        )));
    }
    if user.cert_not_after_ms <= now_ms() {
        return Err(ApiError::Unauthenticated(format!(
            "the certificate of user {name:?} has expired"
        )));
    }
    if !user.role.allows(permission) {
        return Err(ApiError::PermissionDenied(format!(
            "user {name:?} has role {}; {} needs role {}",
            user.role.as_str(),
            permission.describe(),
            permission.roles().join(" or ")
        )));
    }
    Ok(Caller {
        user: user.name,
        role: user.role,
    })
}

/// Require a node certificate; returns the peer (node id and fingerprint).
pub fn require_node<T>(request: &Request<T>) -> Result<(String, Peer), ApiError> {
    let peer = peer(request)?;
    match &peer.principal {
        Principal::Node(id) => Ok((id.clone(), peer)),
        Principal::User(name) => Err(ApiError::PermissionDenied(format!(
            "user {name} cannot call agent RPCs; only node certificates can"
        ))),
        Principal::Replica(name) => Err(ApiError::PermissionDenied(format!(
            "replica {name} cannot call agent RPCs; only node certificates can"
        ))),
    }
}

/// Agent-or-reader calls (artifact download): a node presenting its current
/// certificate, or an operator allowed to read.
pub async fn require_reader_or_node<T>(
    request: &Request<T>,
    registry: &crate::registry::Registry,
    users: &dyn UserRecords,
) -> Result<Principal, ApiError> {
    let peer = peer(request)?;
    match &peer.principal {
        Principal::Node(id) => {
            registry.verify_current(id, &peer.cert_fingerprint).await?;
        }
        Principal::User(_) | Principal::Replica(_) => {
            authorize_operator(&peer, users, Permission::Read)?;
        }
    }
    Ok(peer.principal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_delegation(headers: &[(&str, &str)], expected: Result<Option<Delegation>, &str>) {
        let got = delegation(|name| {
            headers
                .iter()
                .find(|(header, _)| *header == name)
                .map(|(_, value)| *value)
        });
        match (got, expected) {
            (Ok(got), Ok(expected)) => assert_eq!(got, expected, "{headers:?}"),
            (Err(got), Err(expected)) => {
                assert!(got.contains(expected), "{headers:?}: {got}")
            }
            (got, expected) => panic!("{headers:?}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn delegation_headers() {
        let fingerprint = "sha256:00ff";
        check_delegation(&[], Ok(None));
        // The address alone names nobody.
        check_delegation(&[(FORWARDED_FOR, "10.0.0.1:5000")], Ok(None));
        check_delegation(
            &[(ON_BEHALF_OF, "alice"), (ON_BEHALF_OF_CERT, fingerprint)],
            Ok(Some(Delegation {
                user: "alice".into(),
                cert_fingerprint: fingerprint.into(),
                peer_addr: None,
            })),
        );
        check_delegation(
            &[
                (ON_BEHALF_OF, "alice"),
                (ON_BEHALF_OF_CERT, fingerprint),
                (FORWARDED_FOR, "[::1]:7000"),
            ],
            Ok(Some(Delegation {
                user: "alice".into(),
                cert_fingerprint: fingerprint.into(),
                peer_addr: Some("[::1]:7000".parse().expect("address")),
            })),
        );
        check_delegation(
            &[(ON_BEHALF_OF, "alice")],
            Err("gives no sha256: fingerprint"),
        );
        check_delegation(
            &[(ON_BEHALF_OF, "alice"), (ON_BEHALF_OF_CERT, "00ff")],
            Err("gives no sha256: fingerprint"),
        );
        check_delegation(
            &[(ON_BEHALF_OF, ""), (ON_BEHALF_OF_CERT, fingerprint)],
            Err("is empty"),
        );
        check_delegation(
            &[
                (ON_BEHALF_OF, "alice"),
                (ON_BEHALF_OF_CERT, fingerprint),
                (FORWARDED_FOR, "somewhere"),
            ],
            Err("is not an address"),
        );
    }

    #[test]
    fn traceparent() {
        assert_eq!(
            trace_id_from_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
                .as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        for bad in [
            "",
            "00",
            "00-xyz-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id_from_traceparent(bad), None, "{bad}");
        }
    }
}
