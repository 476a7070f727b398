//! Who is calling, and what they may do. Every RPC but enrollment requires a
//! client certificate issued by our CA (the TLS layer has verified the chain);
//! the identity is the `hotswap://` URI the CA put in it.
//!
//! - Operators (user certificates) are looked up in the user table on every
//!   call: the certificate must be the user's current one, the user must not
//!   be revoked, and the user's role must grant the call's [`Permission`].
//! - Nodes may only call agent RPCs, with their current certificate, and only
//!   for themselves (the session is bound to the certificate's node id).

use std::net::SocketAddr;

use hotswap_common::pki::{self, Principal};
use hotswap_common::timefmt::now_ms;
use tonic::Request;

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
        Self {
            peer_addr: request.remote_addr(),
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

/// The caller's identity, from its client certificate.
pub fn peer<T>(request: &Request<T>) -> Result<Peer, ApiError> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| ApiError::Unauthenticated(NO_CERT.into()))?;
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

/// The user a certificate names, if it is a user certificate (for audit
/// records of refused calls).
pub fn claimed_user<T>(request: &Request<T>) -> String {
    match peer(request).map(|p| p.principal) {
        Ok(Principal::User(name)) => name,
        Ok(Principal::Node(id)) => format!("node:{id}"),
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
    }
}

/// Agent-or-reader calls (artifact download): a node presenting its current
/// certificate, or an operator allowed to read.
pub fn require_reader_or_node<T>(
    request: &Request<T>,
    registry: &crate::registry::Registry,
    users: &dyn UserRecords,
) -> Result<Principal, ApiError> {
    let peer = peer(request)?;
    match &peer.principal {
        Principal::Node(id) => {
            registry.current_record(id, &peer.cert_fingerprint)?;
        }
        Principal::User(_) => {
            authorize_operator(&peer, users, Permission::Read)?;
        }
    }
    Ok(peer.principal)
}

#[cfg(test)]
mod tests {
    use super::*;

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
