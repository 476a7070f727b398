//! The agent's main loop: lock the data directory, obtain an identity
//! (loading it, or enrolling on first start), serve the admin endpoint, and
//! keep a session to the control plane open forever, reconnecting with
//! backoff, until shutdown or a fatal refusal.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hotswap_common::admin::{self, Readiness};
use hotswap_common::fsutil;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::identity::{EnrollFailure, Identity, IdentityError, enroll_once};
use crate::metrics::Metrics;
use crate::session::{self, SessionEnd, SessionParams};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot use data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("data dir {0} is in use by another agent")]
    Locked(PathBuf),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(
        "this node is not enrolled yet: pass --join-token and --ca-fingerprint (from `hotswapctl tokens create`)"
    )]
    NotEnrolled,
    #[error("enrollment failed: {0}")]
    Enrollment(String),
    #[error("{0}")]
    Refused(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Published in `DATA_DIR/run/addresses.json` once the agent listens.
#[derive(Debug, Serialize, Deserialize)]
pub struct Addresses {
    pub admin: Option<SocketAddr>,
    pub pid: u32,
}

/// An exclusive lock on the data directory for the life of the process.
struct DirLock {
    _file: File,
}

fn lock_data_dir(dir: &Path) -> Result<DirLock, AgentError> {
    let io = |source| AgentError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    fsutil::create_private_dir(dir).map_err(io)?;
    let file = File::create(dir.join("agent.lock")).map_err(io)?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(AgentError::Locked(dir.to_path_buf()));
    }
    Ok(DirLock { _file: file })
}

pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), AgentError> {
    let _lock = lock_data_dir(&config.data_dir)?;
    let (metrics, prometheus) = Metrics::new();
    let readiness = Readiness::default();

    let admin_shutdown = CancellationToken::new();
    let mut admin_addr = None;
    let admin_task = match config.admin_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::Bind { addr, source })?;
            admin_addr = Some(
                listener
                    .local_addr()
                    .map_err(|source| AgentError::Bind { addr, source })?,
            );
            Some(tokio::spawn(admin::serve(
                listener,
                Arc::new(prometheus),
                readiness.clone(),
                admin_shutdown.clone(),
            )))
        }
        None => None,
    };
    let run_dir = config.data_dir.join("run");
    fsutil::create_private_dir(&run_dir).map_err(|source| AgentError::DataDir {
        path: run_dir.clone(),
        source,
    })?;
    let addresses = serde_json::to_vec_pretty(&Addresses {
        admin: admin_addr,
        pid: std::process::id(),
    })
    .unwrap_or_default();
    fsutil::write_atomic(
        &run_dir.join("addresses.json"),
        &addresses,
        fsutil::PUBLIC_FILE_MODE,
    )
    .map_err(|source| AgentError::DataDir {
        path: run_dir.clone(),
        source,
    })?;

    let result = run_sessions(&config, &metrics, &readiness, &shutdown).await;

    admin_shutdown.cancel();
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    let _ = std::fs::remove_file(run_dir.join("addresses.json"));
    result
}

async fn run_sessions(
    config: &AgentConfig,
    metrics: &Metrics,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> Result<(), AgentError> {
    let mut backoff = Backoff::new(config.backoff_base, config.backoff_max);
    let identity = match Identity::load(&config.data_dir)? {
        Some(identity) => {
            if config.enrollment.is_some() {
                tracing::info!(node = %identity.info.node_id, "already enrolled; ignoring --join-token");
            }
            identity
        }
        None => {
            let Some(enrollment) = &config.enrollment else {
                return Err(AgentError::NotEnrolled);
            };
            loop {
                match enroll_once(
                    &config.control_plane,
                    enrollment,
                    &config.name,
                    &config.labels,
                    metrics,
                )
                .await
                {
                    Ok(identity) => {
                        identity.save(&config.data_dir)?;
                        tracing::info!(node = %identity.info.node_id, name = %identity.info.name, "enrolled");
                        break identity;
                    }
                    Err(EnrollFailure::Fatal(reason)) => {
                        return Err(AgentError::Enrollment(reason));
                    }
                    Err(EnrollFailure::Retry(reason)) => {
                        let delay = backoff.next_delay(rand::random());
                        tracing::warn!(reason = %reason, retry_in_ms = delay.as_millis() as u64, "enrollment attempt failed");
                        tokio::select! {
                            _ = shutdown.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                }
            }
        }
    };
    backoff.reset();
    // Labels given now are what the agent asks for; the control plane keeps
    // the ones its join token forced.
    let mut labels = identity.info.labels.clone();
    labels.extend(config.labels.clone());

    let mut first = true;
    loop {
        if !first {
            metrics.reconnects.inc();
        }
        first = false;
        let end = session::run_once(SessionParams {
            url: &config.control_plane,
            identity: &identity,
            labels: &labels,
            metrics,
            readiness,
            shutdown,
        })
        .await;
        match end {
            SessionEnd::Shutdown => return Ok(()),
            SessionEnd::Fatal(reason) => return Err(AgentError::Refused(reason)),
            SessionEnd::Retry {
                reason,
                established,
            } => {
                if established {
                    backoff.reset();
                }
                let delay = backoff.next_delay(rand::random());
                tracing::warn!(reason = %reason, retry_in_ms = delay.as_millis() as u64, "session ended; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}
