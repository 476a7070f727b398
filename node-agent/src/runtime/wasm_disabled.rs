//! The `wasm` runtime's place in an agent built without the `wasm` feature:
//! the same types, and a clear refusal of every wasm module at stage time.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hotswap_common::manifest::{HealthCheck, HealthSpec};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::ActivateError;
use super::listeners::ListenerBook;
use super::process::ProcessStatus;

const REFUSAL: &str = "this agent was built without the wasm runtime (cargo feature `wasm`); \
                       run an agent built with default features to serve wasm modules";

pub mod engine {
    use std::path::PathBuf;

    #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
    pub struct Budget {
        pub max_memory: u64,
        pub max_concurrent_requests: u32,
    }

    #[derive(Clone)]
    pub struct Engines;

    impl Engines {
        pub fn new(_cache_dir: PathBuf) -> Self {
            Engines
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct WasmSpec {
    pub version: String,
    pub component: PathBuf,
    pub budget: engine::Budget,
    pub request_timeout: Duration,
    pub env: Vec<(String, String)>,
    pub sockets: Vec<(String, SocketAddr)>,
    pub health: Option<(HealthCheck, HealthSpec)>,
    pub dir: PathBuf,
}

pub struct WasmHost {
    status: watch::Sender<ProcessStatus>,
}

impl WasmHost {
    pub fn new(_: &str, _: ListenerBook, _: engine::Engines, _: PathBuf) -> Self {
        let (status, _) = watch::channel(ProcessStatus {
            version: None,
            phase: hotswap_common::status::Phase::Stopped,
            health: hotswap_common::status::Health::Unknown,
            message: String::new(),
            restarts: 0,
            crash_loop: false,
            instance: None,
            metrics: None,
            settling: Vec::new(),
        });
        Self { status }
    }

    pub fn status(&self) -> watch::Receiver<ProcessStatus> {
        self.status.subscribe()
    }

    pub fn current(&self) -> Option<String> {
        None
    }

    pub async fn stage(&mut self, _: WasmSpec) -> Result<(), ActivateError> {
        Err(ActivateError::Release(REFUSAL.to_string()))
    }

    pub async fn activate(
        &mut self,
        _: WasmSpec,
        _: &CancellationToken,
    ) -> Result<std::convert::Infallible, ActivateError> {
        Err(ActivateError::Release(REFUSAL.to_string()))
    }

    pub fn stop(&mut self) {}
}

pub fn component_path(dir: &Path, component: &str) -> Result<PathBuf, String> {
    Ok(dir.join(component))
}
