//! Certificate renewal. Node certificates are short-lived (a day by
//! default); two thirds into a certificate's lifetime the agent generates a
//! new key, sends a CSR over its current mTLS channel, and stores the new
//! pair. The session then moves to a connection made with the new
//! certificate, opened before the old one is closed, so the control plane
//! replaces one session with the other and never sees the node leave; it
//! keeps accepting the previous certificate until it expires meanwhile.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hotswap_common::pki;
use hotswap_common::timefmt::now_ms;
use hotswap_common::tls;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::control_plane::Connection;
use crate::identity::{Identity, IdentityError};
use crate::metrics::Metrics;

/// Retry a failed renewal after this long (or sooner near expiry).
const RETRY: Duration = Duration::from_secs(30);

/// Why a renewal did not happen; every one is retried after [`RETRY`].
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("cannot generate a key: {0}")]
    KeyPair(String),
    #[error("control plane refused: {0}")]
    Refused(String),
    #[error("control plane sent an invalid certificate: {0}")]
    InvalidCertificate(String),
    #[error("control plane sent a certificate for {principal}, not for node {node_id}")]
    WrongPrincipal { principal: String, node_id: String },
    #[error("control plane sent an unusable CA certificate: {0}")]
    UnusableCa(String),
    #[error("CA certificate unreadable: {0}")]
    UnreadableCa(String),
    #[error(transparent)]
    Save(#[from] IdentityError),
    /// The certificate's expiry cannot be read.
    #[error("{0}")]
    Expiry(String),
    /// The task saving the new identity stopped.
    #[error("{0}")]
    Stopped(String),
}

/// The identity the agent uses, replaced in place by renewals.
pub type SharedIdentity = Arc<RwLock<Identity>>;

pub fn current(identity: &SharedIdentity) -> Identity {
    identity.read().unwrap_or_else(|e| e.into_inner()).clone()
}

fn due_ms(identity: &Identity) -> u64 {
    pki::first_cert_der(&identity.cert_pem)
        .and_then(|der| pki::renewal_due_ms(der.as_ref()))
        // An unreadable certificate was refused at load; renew at once if so.
        .unwrap_or(0)
}

/// Renew whenever due, using the session's channel; runs until shutdown.
pub async fn run(
    data_dir: PathBuf,
    identity: SharedIdentity,
    mut channel: watch::Receiver<Option<Connection>>,
    renewed: watch::Sender<u64>,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    loop {
        let due = due_ms(&current(&identity));
        let wait = Duration::from_millis(due.saturating_sub(now_ms()));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        // Renewal needs a live session channel: wait for one.
        let live = loop {
            if let Some(live) = channel.borrow_and_update().clone() {
                break live;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = channel.changed() => if changed.is_err() { return },
            }
        };
        match renew_once(&data_dir, &identity, live).await {
            Ok(not_after) => {
                metrics.rpc("renew_certificate", "ok");
                // The session moves to the new certificate (see session.rs).
                renewed.send_modify(|n| *n += 1);
                tracing::info!(
                    not_after = %hotswap_common::timefmt::rfc3339_from_ms(not_after),
                    "node certificate renewed"
                );
            }
            Err(reason) => {
                metrics.rpc("renew_certificate", "error");
                tracing::warn!(reason = %reason, retry_in_secs = RETRY.as_secs(), "certificate renewal failed");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RETRY) => {}
                }
            }
        }
    }
}

/// One renewal: new key and CSR, the call, checks, then durable storage
/// before the new identity is used. Returns the new certificate's expiry.
async fn renew_once(
    data_dir: &std::path::Path,
    identity: &SharedIdentity,
    connection: Connection,
) -> Result<u64, RenewError> {
    let old = current(identity);
    let (csr_pem, key_pem) =
        pki::generate_csr(&old.info.name).map_err(|e| RenewError::KeyPair(e.to_string()))?;
    let response = connection
        .renew_certificate(csr_pem)
        .await
        .map_err(|e| RenewError::Refused(e.message))?;
    let der = pki::first_cert_der(&response.certificate_pem)
        .map_err(|e| RenewError::InvalidCertificate(e.to_string()))?;
    match pki::principal_of(der.as_ref()) {
        Ok(pki::Principal::Node(id)) if id == old.info.node_id => {}
        other => {
            return Err(RenewError::WrongPrincipal {
                principal: format!("{other:?}"),
                node_id: old.info.node_id.clone(),
            });
        }
    }
    // A new CA arrives here during a CA rotation. It comes over a connection
    // authenticated by the CA this node trusts, like the first one did at
    // enrollment, so it replaces that one.
    let ca_pem = match (
        pki::pem_fingerprint(&response.ca_certificate_pem),
        pki::pem_fingerprint(&old.ca_pem),
    ) {
        (Ok(new), Ok(current)) if new == current => old.ca_pem.clone(),
        (Ok(new), Ok(current)) => {
            tls::roots_from_pem(&response.ca_certificate_pem)
                .map_err(|e| RenewError::UnusableCa(e.to_string()))?;
            tracing::info!(from = %current, to = %new, "control plane CA rotated; trusting the new CA");
            response.ca_certificate_pem.clone()
        }
        (Err(e), _) | (_, Err(e)) => return Err(RenewError::UnreadableCa(e.to_string())),
    };
    let not_after =
        pki::not_after_ms(der.as_ref()).map_err(|e| RenewError::Expiry(e.to_string()))?;
    let renewed = Identity {
        info: old.info.clone(),
        cert_pem: response.certificate_pem,
        key_pem,
        ca_pem,
    };
    let dir = data_dir.to_path_buf();
    let to_save = renewed.clone();
    tokio::task::spawn_blocking(move || to_save.save_renewed(&dir))
        .await
        .map_err(|e| RenewError::Stopped(e.to_string()))??;
    *identity.write().unwrap_or_else(|e| e.into_inner()) = renewed;
    Ok(not_after)
}
