//! Agent configuration, validated before anything connects or binds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use hotswap_common::labels::Labels;
use hotswap_common::tls::Endpoints;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    /// The control plane's replicas (one for a single control plane).
    pub control_plane: Endpoints,
    /// Join token and pinned CA fingerprint, for the first start only.
    pub enrollment: Option<EnrollmentConfig>,
    pub labels: Labels,
    pub name: String,
    pub admin_listen: Option<SocketAddr>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Publisher keys pinned with `--trusted-key`: (name, PEM). When any are
    /// given, only they are trusted, whatever the control plane publishes.
    pub trusted_keys: Vec<(String, String)>,
    /// Compiled wasm components (`--wasm-cache-dir`).
    pub wasm_cache_dir: PathBuf,
}

#[derive(Clone)]
pub struct EnrollmentConfig {
    pub join_token: String,
    pub ca_fingerprint: [u8; 32],
}

impl std::fmt::Debug for EnrollmentConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the token.
        f.debug_struct("EnrollmentConfig")
            .field("join_token", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// This host's name, for the default `--name`.
pub fn hostname() -> String {
    hotswap_common::host::hostname().unwrap_or_else(|| "node".to_string())
}
