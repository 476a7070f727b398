//! The hotswap control plane. It owns the desired state of the fleet: the
//! certificate authority and enrollment of nodes, the node registry (durable
//! in the store, live status in memory), the agent sessions, and the operator gRPC
//! API with its HTTP/JSON face ([`http_api`]). Later layers (artifacts, deployments, events) plug into the same
//! store and server.
//!
//! Entry points: [`init::init`] creates a data directory, [`server::run`]
//! serves it until the shutdown token is cancelled.

pub mod audit;
pub mod auth;
pub mod blobs;
pub mod clock;
pub mod config;
pub mod data_dir;
pub mod deadline;
pub mod deploy;
pub mod error;
pub mod events;
pub mod forward;
pub mod freeze;
pub mod history;
pub mod http_api;
pub mod init;
pub mod leader_only;
pub mod metrics;
pub mod ratelimit;
pub mod registry;
pub mod replica;
pub mod replicas;
pub use hotswap_common::roles;
pub mod rotation;
pub mod run_to_end;
pub mod schedule;
pub mod server;
pub mod service;
pub mod storage;
pub mod store;
pub mod tickets;
pub mod tls_accept;
pub mod trust;
pub mod webhooks;
