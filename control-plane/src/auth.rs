//! Who is calling. Every RPC but enrollment requires a client certificate
//! issued by our CA (the TLS layer has verified the chain already); the
//! identity is the `hotswap://` URI the CA put in it. Operators (user
//! certificates) may call the operator API; node certificates only the agent
//! session, and only for themselves.

use hotswap_common::pki::{self, Principal};
use tonic::Request;

use crate::error::ApiError;

/// The verified peer: its identity and the fingerprint of the certificate it
/// presented (the registry compares it to the node's current certificate).
#[derive(Clone, Debug)]
pub struct Peer {
    pub principal: Principal,
    pub cert_fingerprint: String,
}

/// The caller's identity, from its client certificate.
pub fn peer<T>(request: &Request<T>) -> Result<Peer, ApiError> {
    let certs = request.peer_certs().ok_or_else(|| {
        ApiError::Unauthenticated(
            "this call requires a client certificate issued by the control plane".into(),
        )
    })?;
    let leaf = certs.first().ok_or_else(|| {
        ApiError::Unauthenticated(
            "this call requires a client certificate issued by the control plane".into(),
        )
    })?;
    let principal = pki::principal_of(leaf.as_ref())
        .map_err(|e| ApiError::Unauthenticated(format!("client certificate not usable: {e}")))?;
    Ok(Peer {
        principal,
        cert_fingerprint: pki::der_fingerprint(leaf.as_ref()),
    })
}

/// Require an operator certificate; returns the user name.
pub fn require_operator<T>(request: &Request<T>) -> Result<String, ApiError> {
    match peer(request)?.principal {
        Principal::User(name) => Ok(name),
        Principal::Node(id) => Err(ApiError::PermissionDenied(format!(
            "node {id} is not allowed to call the operator API; node certificates may only call agent RPCs"
        ))),
    }
}

/// Require a node certificate; returns the peer (node id and fingerprint).
pub fn require_node<T>(request: &Request<T>) -> Result<(String, Peer), ApiError> {
    let peer = peer(request)?;
    match &peer.principal {
        Principal::Node(id) => Ok((id.clone(), peer)),
        Principal::User(name) => Err(ApiError::PermissionDenied(format!(
            "user {name} cannot open an agent session; only node certificates can"
        ))),
    }
}

/// Any valid caller: an operator, or a node presenting its current
/// certificate. Returns the principal for logging.
pub fn require_operator_or_node<T>(
    request: &Request<T>,
    registry: &crate::registry::Registry,
) -> Result<Principal, ApiError> {
    let peer = peer(request)?;
    if let Principal::Node(id) = &peer.principal {
        registry.current_record(id, &peer.cert_fingerprint)?;
    }
    Ok(peer.principal)
}
