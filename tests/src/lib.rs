//! Integration test harness: starts the real `hotswap-control-plane`,
//! `hotswap-agent` and `hotswapctl` binaries on loopback ports chosen by the
//! OS, each test in its own temporary directory. Children's logs go to files
//! that are printed when a test fails; waits poll a condition until a deadline
//! (`HOTSWAP_TEST_PATIENCE_SECS`, default 30) and fail loudly with the last
//! observation. Every process is stopped when its handle drops.
//!
//! The binaries must be built first (`make test` does `cargo build --bins`).
//!
//! The pieces live in modules by what they drive: `daemon` (spawning,
//! stopping, logs, waits, temp dirs and ports), `control_plane`, `agent`
//! (with `Fleet`), `chaos` (the chaos suites' trials, seeds and
//! reports), `etcd` (a real etcd cluster), `proxy` (fault injection),
//! `load` and `s3` (SeaweedFS as a real S3); everything public is
//! re-exported here, so tests use `hotswap_tests::*`. `wasm_fixtures`
//! builds the wasm runtime's test components.

mod agent;
mod chaos;
mod control_plane;
mod daemon;
mod etcd;
mod load;
pub mod marker;
mod proxy;
mod s3;
pub mod wasm_fixtures;
mod webhook;

pub use agent::*;
pub use chaos::*;
pub use control_plane::*;
pub use daemon::*;
pub use etcd::*;
pub use load::*;
pub use proxy::*;
pub use s3::*;
pub use webhook::*;
