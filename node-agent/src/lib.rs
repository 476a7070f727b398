//! The hotswap node agent. It owns the node's side of the fleet: its identity
//! (key pair generated here, certificate from enrollment, CA pinned by
//! fingerprint), the one long-lived mTLS session to the control plane with
//! heartbeats and reconnection (exponential backoff with jitter, forever),
//! and the agent's admin endpoint. Module runtimes plug into the session.
//!
//! Entry point: [`agent::run`].

pub mod agent;
pub mod artifacts;
pub mod backoff;
pub mod config;
pub mod control_plane;
pub mod health;
pub mod http_client;
pub mod identity;
pub mod metrics;
pub mod reconciler;
pub mod renewal;
pub mod report;
pub mod runtime;
pub mod scrape;
pub mod session;
pub mod simulate;
pub mod state;
pub mod sysinfo;
