//! gRPC services. Handlers authenticate the caller (see [`crate::auth`]),
//! validate input, call the registry, and convert at the edge; errors are
//! [`crate::error::ApiError`] and map to status codes in one place.

pub mod artifacts;
mod convert;
pub mod deployments;
pub mod enrollment;
pub mod fleet;
pub mod session;

use std::sync::Arc;

use hotswap_common::pki::CertificateAuthority;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::registry::Registry;

/// What every handler shares.
pub struct Context {
    pub registry: Arc<Registry>,
    pub ca: CertificateAuthority,
    pub ca_fingerprint: String,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    /// Cancelled when the control plane shuts down; long-lived streams end.
    pub shutdown: CancellationToken,
}
