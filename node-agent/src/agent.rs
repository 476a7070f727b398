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

use crate::artifacts::TrustSource;
use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::control_plane::EnrollmentKey;
use crate::identity::{Identity, IdentityError, enroll_once};
use crate::metrics::Metrics;
use crate::reconciler::{AgentReport, Reconciler, ReconcilerConfig, ReconcilerLinks};
use crate::renewal::{self, SharedIdentity};
use crate::session::{self, SessionEnd, SessionParams};
use hotswap_common::artifact::unpack::Limits;
use tokio::sync::watch;

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
    Enrollment(crate::control_plane::EnrollError),
    #[error("{0}")]
    Refused(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the reconciler: {0}")]
    Reconciler(crate::reconciler::ReconcilerError),
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
            // One key for every attempt: a retry of an attempt that
            // committed is answered with the node it created.
            let key = EnrollmentKey::generate(&config.name).map_err(AgentError::Enrollment)?;
            loop {
                match enroll_once(
                    config.control_plane.pick(),
                    &key,
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
                    Err(error) if !error.is_transient() => {
                        return Err(AgentError::Enrollment(error));
                    }
                    Err(reason) => {
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

    // The reconciler starts before any session: with the control plane down
    // it still converges to the last desired state it stored.
    let (desired_tx, desired_rx) = watch::channel(None);
    let (channel_tx, channel_rx) = watch::channel(None);
    let (report_tx, report_rx) = watch::channel(AgentReport::default());
    let trust = if config.trusted_keys.is_empty() {
        TrustSource::ControlPlane
    } else {
        TrustSource::Pinned(config.trusted_keys.clone())
    };
    let reconciler = Reconciler::new(
        ReconcilerConfig {
            data_dir: config.data_dir.clone(),
            node_name: identity.info.name.clone(),
            labels: labels.clone(),
            trust,
            limits: Limits::default(),
            wasm_cache_dir: config.wasm_cache_dir.clone(),
        },
        shutdown.clone(),
    )
    .map_err(AgentError::Reconciler)?;
    let reconciler_task = tokio::spawn(reconciler.run(ReconcilerLinks {
        desired: desired_rx,
        channel: channel_rx,
        report: report_tx,
    }));
    let identity: SharedIdentity = Arc::new(std::sync::RwLock::new(identity));
    let (renewed_tx, _) = watch::channel(0u64);
    let renewal_task = tokio::spawn(renewal::run(
        config.data_dir.clone(),
        identity.clone(),
        channel_tx.subscribe(),
        renewed_tx.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let result = session_loop(
        config,
        &identity,
        &renewed_tx,
        &labels,
        metrics,
        readiness,
        shutdown,
        &desired_tx,
        &channel_tx,
        &report_rx,
        &mut backoff,
    )
    .await;
    // The reconciler stops with the shutdown token; module processes stay up.
    shutdown.cancel();
    let _ = reconciler_task.await;
    let _ = renewal_task.await;
    result
}

#[allow(clippy::too_many_arguments)]
async fn session_loop(
    config: &AgentConfig,
    identity: &SharedIdentity,
    renewed: &watch::Sender<u64>,
    labels: &hotswap_common::labels::Labels,
    metrics: &Metrics,
    readiness: &Readiness,
    shutdown: &CancellationToken,
    desired_tx: &watch::Sender<Option<crate::state::Desired>>,
    channel_tx: &watch::Sender<Option<crate::control_plane::Connection>>,
    report_rx: &watch::Receiver<AgentReport>,
    backoff: &mut Backoff,
) -> Result<(), AgentError> {
    let mut first = true;
    let mut previous = None;
    let mut tls = session::ClientTls::default();
    loop {
        if !first && previous.is_none() {
            metrics.reconnects.inc();
        }
        first = false;
        // Each connection uses the newest certificate. Subscribe before
        // reading it, so a renewal in between still triggers a handover.
        let renewed = renewed.subscribe();
        let identity = renewal::current(identity);
        let end = session::run_once(SessionParams {
            url: config.control_plane.pick(),
            identity: &identity,
            labels,
            metrics,
            readiness,
            shutdown,
            desired: desired_tx,
            channel: channel_tx,
            reports: report_rx.clone(),
            renewed,
            previous: previous.take(),
            tls: &mut tls,
        })
        .await;
        match end {
            SessionEnd::Shutdown => return Ok(()),
            SessionEnd::Handover(handover) => {
                previous = Some(*handover);
                continue;
            }
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
