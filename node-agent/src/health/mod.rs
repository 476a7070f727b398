//! Module health: one probe attempt ([`probe_once`], in [`probe`]) and the
//! threshold logic that turns a stream of probe results into a [`Health`]
//! state ([`HealthTracker`], in [`tracker`]). HTTP probes go through the
//! agent's own client ([`crate::http_client`]).
//!
//! Probes of one module never overlap, whatever its `timeout` and
//! `interval` (a timeout longer than the interval is valid, as in Docker and
//! Kubernetes). Each prober awaits one probe before it starts the next: the
//! process supervisor's start gate sleeps `interval` after each probe, and its
//! loop probes on a ticker whose missed ticks are delayed, so after a probe
//! slower than the interval the next one starts when it ended; bundles are
//! probed one after another on the reconciler's usage tick. Nothing else
//! probes a process module (the traced `health` step reads the supervisor's
//! verdict instead).

pub mod probe;
pub mod tracker;

pub use hotswap_common::status::Health;
pub use probe::{ProbeError, probe_once};
pub use tracker::HealthTracker;
