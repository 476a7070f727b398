//! `hotswap-control-plane run`: open the data directory, bind the gRPC and
//! admin listeners, serve until the shutdown token is cancelled, then drain
//! within the configured bound.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hotswap_common::admin::{self, Readiness};
use hotswap_common::fsutil;
use hotswap_common::pb;
use hotswap_common::pki::CertificateAuthority;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::audit::AuditLog;
use crate::blobs::{BlobError, BlobStore, LocalBlobs, S3Blobs, S3Credentials};
use crate::config::RunConfig;
use crate::config::StoreBackend;
use crate::deadline::RequestTimeoutLayer;
use crate::deploy::engine::{Engine, EngineHandles};
use crate::events::EventLog;
use crate::leader_only::{Install, LeaderOnly};
use crate::metrics::{Metrics, RpcMetricsLayer};
use crate::registry::Registry;
use crate::replicas::{Claim, EmbeddedReplicas, EtcdReplicas, Replicas, ThisReplica};
use crate::run_to_end::RunToEndLayer;
use crate::service::Context;
use crate::service::artifacts::ArtifactsService;
use crate::service::audit::AuditService;
use crate::service::deployments::{DeploymentsService, PipelinesService};
use crate::service::enrollment::EnrollmentService;
use crate::service::fleet::FleetService;
use crate::service::observe::{ClustersService, EventsService};
use crate::service::servers::ServersService;
use crate::service::session::SessionService;
use crate::service::users::UsersService;
use crate::service::webhooks::WebhooksService;
use crate::store::Store;
use crate::store::etcd::{EtcdStore, Leader};
use crate::tls_accept;

pub use crate::data_dir::DataDir;

/// What `run` publishes in `run/addresses.json` once it listens, so scripts
/// and tests that asked for port 0 learn the real ports.
#[derive(Debug, Serialize, Deserialize)]
pub struct Addresses {
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    pub pid: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "data dir {0} is not initialized: run `hotswap-control-plane init --data-dir {0}` first"
    )]
    NotInitialized(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid key material in the data dir: {0}")]
    Pki(#[from] hotswap_common::pki::PkiError),
    #[error("invalid TLS material in the data dir: {0}")]
    Tls(#[from] hotswap_common::tls::TlsError),
    #[error("TLS session tickets: {0}")]
    Tickets(String),
    #[error(
        "cannot open the database at {path} (is another control plane using this data dir?): {source}"
    )]
    Store {
        path: PathBuf,
        source: crate::store::StoreError,
    },
    #[error(
        "the database {} is {what}, but {} holds the CA that issued this control plane's certificates: refusing to start on a fresh database that knows none of its nodes, users or keys; restore {} from a backup, or, to start over, run once with --recover-empty-db, which creates an empty database and re-creates the admin user from {} (nodes then enroll again, keys are trusted again, modules pushed again)",
        state.display(), data_dir.display(), state.display(), profile.display()
    )]
    DatabaseMissing {
        what: &'static str,
        state: PathBuf,
        data_dir: PathBuf,
        profile: PathBuf,
    },
    #[error(
        "--recover-empty-db is only for a missing or empty database, and {} holds {users} users: start without it",
        state.display()
    )]
    RecoverNotEmpty { state: PathBuf, users: usize },
    #[error(
        "--recover-empty-db: cannot re-create the admin user from {}: {reason}",
        profile.display()
    )]
    Recover { profile: PathBuf, reason: String },
    #[error("artifact storage: {0}")]
    Blobs(#[from] BlobError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("{0}")]
    Registry(#[from] crate::registry::RegistryError),
    #[error("{0}")]
    Storage(#[from] crate::store::StoreError),
    #[error("cannot start the deployment engine's thread: {0}")]
    Engine(std::io::Error),
    #[error("etcd: {0}")]
    Etcd(String),
    #[error("{0}")]
    ReplicaName(#[from] crate::replicas::ClaimError),
    #[error("cannot open the audit log: {0}")]
    Audit(String),
    #[error("cannot complete an interrupted certificate rotation: {0}")]
    Rotation(String),
    #[error("cannot build the gRPC reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

/// Requests to operator services and enrollment are small: a CSR, a name,
/// deployment options.
const SMALL_MESSAGE_BYTES: usize = 256 * 1024;
/// Agent session messages carry status reports for every module of a node.
const SESSION_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Fully qualified names of the services our protos define; `run` serves
/// every one of them, so the health service reports each.
fn hotswap_service_names() -> Vec<String> {
    let set = <prost_types::FileDescriptorSet as prost::Message>::decode(pb::FILE_DESCRIPTOR_SET)
        .unwrap_or_default();
    set.file
        .iter()
        .flat_map(|file| {
            file.service
                .iter()
                .map(move |service| format!("{}.{}", file.package(), service.name()))
        })
        .collect()
}

fn read(path: &Path) -> Result<String, RunError> {
    std::fs::read_to_string(path).map_err(|source| RunError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// `--recover-empty-db`: put the user of the data dir's admin profile back
/// into an empty database as an admin, so someone can administer the
/// control plane again. The profile's certificate must be one our CA issued
/// and still valid. Returns the user's name.
async fn recover_admin(store: &Store, layout: &DataDir, ca_pem: &str) -> Result<String, RunError> {
    use hotswap_common::pki::{self, Principal};
    let profile_path = layout.admin_profile();
    let failed = |reason: String| RunError::Recover {
        profile: profile_path.clone(),
        reason,
    };
    let profile =
        hotswap_common::profile::Profile::load(&profile_path).map_err(|e| failed(e.to_string()))?;
    let now = hotswap_common::timefmt::now_ms();
    pki::check_certificate(&profile.client_cert, ca_pem, now).map_err(|e| failed(e.to_string()))?;
    let der = pki::first_cert_der(&profile.client_cert).map_err(|e| failed(e.to_string()))?;
    let name = match pki::principal_of(der.as_ref()).map_err(|e| failed(e.to_string()))? {
        Principal::User(name) => name,
        Principal::Node(id) => {
            return Err(failed(format!(
                "its certificate belongs to node {id}, not to a user"
            )));
        }
        Principal::Replica(name) => {
            return Err(failed(format!(
                "its certificate belongs to replica {name}, not to a user"
            )));
        }
    };
    let record = crate::store::UserRecord {
        name: name.clone(),
        role: crate::auth::Role::Admin,
        created_at_ms: now,
        created_by: "recover-empty-db".into(),
        cert_fingerprint: pki::der_fingerprint(der.as_ref()),
        cert_not_after_ms: pki::not_after_ms(der.as_ref()).map_err(|e| failed(e.to_string()))?,
        revoked_at_ms: None,
    };
    store
        .put_user(&record)
        .await
        .map_err(|source| RunError::Store {
            path: layout.state(),
            source,
        })?;
    tracing::warn!(
        user = %name,
        profile = %profile_path.display(),
        state = %layout.state().display(),
        "RECOVERY: --recover-empty-db started this control plane on an EMPTY database next to its existing CA; every node, user, publisher key, artifact record, deployment, event and audit record it held before is gone; user {name} was re-created as an admin from the admin profile; nodes must enroll again with new join tokens"
    );
    Ok(name)
}

/// How [`run`] ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Asked to stop (a signal, or the shutdown token).
    Shutdown,
    /// The storage failed and has room again: run again in a fresh process
    /// (`exec`), which reopens the database, on the addresses it was serving
    /// (see [`crate::storage`]).
    Restart {
        grpc: std::net::SocketAddr,
        admin: std::net::SocketAddr,
    },
}

/// What the leader builds when it starts leading: the engine, from the
/// records as they are then, and the services that need it.
struct EngineServices {
    ctx: Arc<Context>,
    store: Store,
    events: Arc<EventLog>,
    metrics: Arc<Metrics>,
    settings: crate::config::Settings,
    deployments: Install<pb::deployments_server::DeploymentsServer<DeploymentsService>>,
    pipelines: Install<pb::pipelines_server::PipelinesServer<PipelinesService>>,
    clusters: Install<pb::clusters_server::ClustersServer<ClustersService>>,
    /// This replica's listeners, which webhook deliveries never reach.
    own_ports: crate::webhooks::OwnPorts,
}

impl EngineServices {
    /// Build the engine, install its services and start it; the returned
    /// task ends when the engine stops (with the shutdown).
    fn lead(&self) -> Result<tokio::task::JoinHandle<()>, RunError> {
        let engine = Engine::new(
            EngineHandles::new(
                self.ctx.registry.clone(),
                &self.store,
                self.events.clone(),
                self.metrics.clone(),
            ),
            self.settings.clone(),
        )?;
        self.deployments.install(
            pb::deployments_server::DeploymentsServer::new(DeploymentsService::new(
                self.ctx.clone(),
                engine.clone(),
            ))
            .max_decoding_message_size(SMALL_MESSAGE_BYTES),
        );
        self.pipelines.install(
            pb::pipelines_server::PipelinesServer::new(PipelinesService::new(
                self.ctx.clone(),
                engine.clone(),
            ))
            .max_decoding_message_size(SMALL_MESSAGE_BYTES),
        );
        self.clusters.install(
            pb::clusters_server::ClustersServer::new(ClustersService::new(
                self.ctx.clone(),
                engine.clone(),
            ))
            .max_decoding_message_size(SMALL_MESSAGE_BYTES),
        );
        // Webhook deliveries run where the engine runs: on the leader.
        let webhooks = tokio::spawn(
            crate::webhooks::dispatch::Dispatcher {
                store: self.store.clone(),
                events: self.events.clone(),
                metrics: self.metrics.clone(),
                own: self.own_ports,
                retry_for: self.settings.webhook_retry_for,
                backoff_max: self.settings.webhook_backoff_max,
            }
            .run(self.ctx.shutdown.clone()),
        );
        let engine = engine
            .spawn_on_own_thread(self.ctx.shutdown.clone())
            .map_err(RunError::Engine)?;
        Ok(tokio::spawn(async move {
            let _ = engine.await;
            let _ = webhooks.await;
        }))
    }
}

/// A replica's part in the election (etcd only).
struct Leadership {
    etcd: EtcdStore,
    name: String,
    lease: std::time::Duration,
    services: EngineServices,
    /// Where this replica serves, campaigned with so followers can
    /// forward the leader's calls to it.
    endpoint: String,
    /// Who leads now, for a follower's forwarding and refusals.
    leader: tokio::sync::watch::Sender<Option<Leader>>,
    restart: Arc<std::sync::atomic::AtomicBool>,
    shutdown: CancellationToken,
}

/// Campaign; once elected, build and run the engine until the lease is
/// lost (then restart in place: nothing of this leadership's memory may
/// outlive it) or the shutdown (then resign once the engine stopped).
/// How often the audit log is trimmed to `audit_retention`: a tenth of it,
/// between once a second and once every ten minutes.
fn audit_trim_every(retention: std::time::Duration) -> std::time::Duration {
    (retention / 10).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(600),
    )
}

/// Remove audit records past `retention` behind a signed anchor, now and
/// then periodically; mid CA rotation, sign the anchor again with the new
/// CA. Every replica trims (two at once at worst anchor the
/// same record twice); a failure is logged and tried again next time.
async fn trim_audit(
    audit: Arc<AuditLog>,
    retention: std::time::Duration,
    shutdown: CancellationToken,
) {
    let every = audit_trim_every(retention);
    loop {
        let now = hotswap_common::timefmt::now_ms();
        let cutoff = now.saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        // Batches: a backlog goes in several passes, one after the other.
        loop {
            match audit.trim_older_than(cutoff).await {
                Ok(Some((_, removed))) if removed == crate::audit::TRIM_BATCH as u64 => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot trim the audit log");
                    break;
                }
            }
        }
        if let Err(e) = audit.reanchor_for_rotation().await {
            tracing::warn!(error = %e, "cannot sign the audit anchor again with the current CA");
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

async fn lead_while_elected(leadership: Leadership) {
    let Leadership {
        etcd,
        name,
        endpoint,
        lease,
        services,
        leader,
        restart,
        shutdown,
    } = leadership;
    let restart_now = |why: String| {
        tracing::error!(reason = %why, "restarting to campaign again");
        restart.store(true, std::sync::atomic::Ordering::SeqCst);
        shutdown.cancel();
    };
    let follow_leader = tokio::spawn({
        let etcd = etcd.clone();
        let shutdown = shutdown.clone();
        async move {
            loop {
                let now = etcd.leader();
                leader.send_if_modified(|known| {
                    let changed = *known != now;
                    *known = now.clone();
                    changed
                });
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        }
    });
    let candidate = Leader {
        name,
        endpoint: Some(endpoint),
    };
    let mut leading = match crate::replica::lead(&etcd, &candidate, lease, &shutdown).await {
        Ok(Some(leading)) => leading,
        Ok(None) => return,
        Err(e) => return restart_now(format!("campaign failed: {e}")),
    };
    services.metrics.leader.set(1);
    let engine = match services.lead() {
        Ok(engine) => engine,
        Err(e) => {
            leading.resign().await;
            return restart_now(format!("cannot start the engine: {e}"));
        }
    };
    tokio::select! {
        lost = leading.lost() => {
            services.metrics.leader.set(0);
            restart_now(format!("lost leadership: {lost}"));
        }
        _ = shutdown.cancelled() => {
            let _ = engine.await;
            leading.resign().await;
        }
    }
    follow_leader.abort();
}

/// Grant this replica's session lease, claim its name under it (its
/// record `replicas/<name>`; refused when another live replica has the
/// name, see `replicas::claim`), keep it alive, and start sharing the
/// registry's sessions under it (SPEC §7 "Sessions on any replica").
/// When the lease is lost, the replica restarts in place.
async fn share_sessions(
    etcd: &EtcdStore,
    this: &ThisReplica,
    ttl: std::time::Duration,
    restart: Arc<std::sync::atomic::AtomicBool>,
    shutdown: CancellationToken,
) -> Result<hotswap_etcd::LeaseId, RunError> {
    let registry = &this.registry;
    let name = this.name.as_str();
    let lease = etcd
        .client()
        .grant(ttl)
        .await
        .map_err(|e| RunError::Etcd(format!("cannot grant the session lease: {e}")))?;
    match crate::replicas::claim_name(
        etcd,
        &this.info(false, hotswap_common::timefmt::now_ms()),
        lease.id,
        ttl,
    )
    .await
    {
        Ok(Claim::Restart) => tracing::info!(
            "took over this replica's record from its previous run (same name and endpoint; its old lease had not expired)"
        ),
        Ok(_) => {}
        Err(e) => {
            // Nothing of this start stays behind.
            let _ = etcd.client().revoke(lease.id).await;
            return Err(e.into());
        }
    }
    let mut keep_alive = etcd.client().keep_alive(lease);
    etcd.set_session_lease(lease.id);
    tracing::info!(lease = %lease.id, ttl = ?lease.ttl, "publishing sessions under this lease");
    registry.share_sessions(name.to_string(), Arc::new(etcd.clone()), shutdown.clone());
    tokio::spawn(async move {
        tokio::select! {
            lost = keep_alive.lost() => {
                tracing::error!(reason = %lost, "lost the session lease; restarting so every session is published again");
                restart.store(true, std::sync::atomic::Ordering::SeqCst);
                shutdown.cancel();
            }
            _ = shutdown.cancelled() => {}
        }
    });
    Ok(lease.id)
}

/// The replicas' client certificate lives a year when `run` has to issue
/// it (see [`forwarding_tls`]); a restart issues another.
const REPLICA_CERT_FALLBACK_VALIDITY: std::time::Duration =
    std::time::Duration::from_secs(365 * 86_400);

/// The TLS client config a follower forwards to the leader with: it trusts
/// the cluster's CA (and the previous one during a rotation) and presents
/// the replicas' certificate from the data dir (`init` and `rotate-ca`
/// issue it). A data dir made before forwarding existed has none: then one
/// is issued from the CA in the data dir for this process.
fn forwarding_tls(
    layout: &DataDir,
    ca_pem: &str,
    previous_ca: &str,
) -> Result<Arc<rustls::ClientConfig>, RunError> {
    use hotswap_common::pki::{self, Principal};
    use hotswap_common::tls::{self, ClientIdentity, ServerTrust};
    let stored = match (
        std::fs::read_to_string(layout.replica_cert()),
        std::fs::read_to_string(layout.replica_key()),
    ) {
        (Ok(cert), Ok(key)) => {
            match pki::check_certificate(&cert, ca_pem, hotswap_common::timefmt::now_ms()) {
                Ok(()) => Some((cert, key)),
                Err(problem) => {
                    tracing::warn!(
                        path = %layout.replica_cert().display(),
                        problem = %problem,
                        "the replica certificate is not usable; issuing one from the CA for this process"
                    );
                    None
                }
            }
        }
        _ => {
            tracing::warn!(
                path = %layout.replica_cert().display(),
                "no replica certificate in the data dir (made before replicas forwarded calls); issuing one from the CA for this process"
            );
            None
        }
    };
    let (cert, key) = match stored {
        Some(pair) => pair,
        None => {
            let ca = CertificateAuthority::from_pem(ca_pem, &read(&layout.ca_key())?)?;
            let issued = ca.issue_client_with_new_key(
                &Principal::Replica(crate::auth::REPLICA_IDENTITY.into()),
                REPLICA_CERT_FALLBACK_VALIDITY,
            )?;
            (issued.cert_pem, issued.key_pem)
        }
    };
    Ok(tls::client_config(
        ServerTrust::Ca(format!("{ca_pem}{previous_ca}")),
        Some(ClientIdentity {
            cert_pem: &cert,
            key_pem: &key,
        }),
    )?)
}

/// Open the records on etcd (SPEC §7): what `run` does for `[store]
/// backend = "etcd"` (the decision benchmark opens its store through it).
pub async fn open_etcd(settings: &crate::config::StoreSettings) -> Result<EtcdStore, RunError> {
    let client = crate::replica::etcd_client(settings)
        .await
        .map_err(|e| RunError::Etcd(e.to_string()))?;
    let keys = settings.keys().map_err(RunError::Etcd)?;
    EtcdStore::open(client, keys)
        .await
        .map_err(|e| RunError::Etcd(e.to_string()))
}

/// Serve until `shutdown` is cancelled.
pub async fn run(config: RunConfig, shutdown: CancellationToken) -> Result<Stopped, RunError> {
    let started_at_ms = hotswap_common::timefmt::now_ms();
    let layout = DataDir::new(&config.data_dir);
    if !layout.ca_key().exists() {
        return Err(RunError::NotInitialized(
            config.data_dir.display().to_string(),
        ));
    }
    crate::rotation::recover(&config.data_dir).map_err(|e| RunError::Rotation(e.to_string()))?;
    let ca_pem = read(&layout.ca_cert())?;
    let ca = CertificateAuthority::from_pem(&ca_pem, &read(&layout.ca_key())?)?;
    let ca_fingerprint = ca.fingerprint()?;
    // Mid-rotation, clients of the old CA are still accepted and the server
    // also sends the new CA as certified by the old one.
    let read_optional = |path: PathBuf| -> Result<String, RunError> {
        if path.exists() {
            read(&path)
        } else {
            Ok(String::new())
        }
    };
    let previous_ca = read_optional(layout.ca_previous())?;
    let cross = read_optional(layout.ca_cross())?;
    if !previous_ca.is_empty() {
        tracing::warn!(
            "CA rotation in progress: the previous CA is still trusted; run `finish-ca-rotation` once every node has renewed"
        );
    }
    let client_roots = format!("{ca_pem}{previous_ca}");
    let tickets: Option<Arc<dyn rustls::server::ProducesTickets>> =
        if config.settings.tls_ticket_rotation.is_zero() {
            None
        } else {
            let keys = crate::tickets::TicketKeys::open(
                &layout.tls_tickets(),
                config.settings.tls_ticket_rotation,
                &client_roots,
                hotswap_common::timefmt::now_ms(),
            )
            .map_err(|e| RunError::Tickets(e.to_string()))?;
            Some(Arc::new(keys))
        };
    let tls_config = tls_accept::server_config(
        &client_roots,
        &format!("{}{ca_pem}{cross}", read(&layout.server_cert())?),
        &read(&layout.server_key())?,
        tickets,
    )?;

    let state_path = layout.state();
    let missing = |what: &'static str| RunError::DatabaseMissing {
        what,
        state: state_path.clone(),
        data_dir: config.data_dir.clone(),
        profile: layout.admin_profile(),
    };
    let (store, etcd) = match config.settings.store.backend {
        StoreBackend::Sled => {
            // `init` writes the CA and a database holding the admin user
            // together, so a CA without a database means the database was
            // lost: opening would silently create an empty one. Check
            // before sled creates anything.
            if !state_path.join("db").exists() && !config.recover_empty_db {
                return Err(missing("missing"));
            }
            let store = Store::open(&state_path, config.settings.storage_cache_bytes).map_err(
                |source| RunError::Store {
                    path: state_path.clone(),
                    source,
                },
            )?;
            (store, None)
        }
        StoreBackend::Etcd => {
            if config.recover_empty_db {
                return Err(RunError::Etcd(
                    "--recover-empty-db is for the embedded database; on etcd, restore the cluster from an etcd snapshot".into(),
                ));
            }
            let etcd = open_etcd(&config.settings.store).await?;
            (Store::etcd(etcd.clone()), Some(etcd))
        }
    };
    let users = store.list_users().map_err(|source| RunError::Store {
        path: state_path.clone(),
        source,
    })?;
    let recovered_admin = match (users.is_empty(), config.recover_empty_db) {
        (true, false) if etcd.is_some() => {
            return Err(RunError::Etcd(format!(
                "the cluster under etcd prefix {} has no users: run `hotswap-control-plane init --etcd-endpoints ...` for it first",
                config.settings.store.prefix
            )));
        }
        (true, false) => return Err(missing("empty (it has no users)")),
        (true, true) => Some(recover_admin(&store, &layout, &ca_pem).await?),
        (false, true) => {
            return Err(RunError::RecoverNotEmpty {
                state: state_path.clone(),
                users: users.len(),
            });
        }
        (false, false) => None,
    };
    let blobs_path = layout.blobs();
    let blobs: Arc<dyn BlobStore> = match config.settings.blobs.s3() {
        None => Arc::new(
            LocalBlobs::open(&blobs_path).map_err(|source| RunError::Write {
                path: blobs_path,
                source,
            })?,
        ),
        // Uploads are still staged on local disk, in the same place.
        Some(s3) => Arc::new(S3Blobs::open(
            &s3,
            &S3Credentials::from_env()?,
            &blobs_path.join("tmp"),
        )?),
    };
    let (metrics, prometheus) = Metrics::new();
    let metrics = Arc::new(metrics);
    let events = Arc::new(
        EventLog::open(&store, config.settings.event_retention)?.counting(
            metrics.events_appended.clone(),
            metrics.events_stored.clone(),
        ),
    );
    let registry = Registry::new(store.clone(), events.clone(), metrics.clone())?;
    let restart = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let admin_listener = tokio::net::TcpListener::bind(config.admin_listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: config.admin_listen,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| RunError::Bind {
            addr: config.admin_listen,
            source,
        })?;

    let readiness = Readiness::default();
    let admin_shutdown = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(
        admin_listener,
        Arc::new(prometheus),
        readiness.clone(),
        admin_shutdown.clone(),
    ));

    if let Some(task) = events.follow_commits() {
        // Publishes what any replica commits to this one's live followers,
        // for as long as the store lives.
        drop(task);
    }
    let grpc_listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| RunError::Bind {
            addr: config.listen,
            source,
        })?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| RunError::Bind {
            addr: config.listen,
            source,
        })?;
    let endpoint = config
        .replica
        .endpoint(grpc_addr, hotswap_common::host::hostname().as_deref());
    let this = ThisReplica {
        name: config.replica.name.clone(),
        endpoint: endpoint.clone(),
        started_at_ms,
        readiness: readiness.clone(),
        registry: registry.clone(),
    };
    // On etcd, this replica's sessions and its own record are published
    // under a lease of its own, granted before it serves one (and its name
    // claimed under it: a second live replica of the same name is refused
    // here, before it changes anything); losing the lease (cut off from
    // etcd past the TTL) restarts the replica in place, like losing
    // leadership, so its agents reconnect and every session is published
    // again.
    let session_lease = match &etcd {
        Some(etcd) => Some(
            share_sessions(
                etcd,
                &this,
                config.settings.leader_lease,
                restart.clone(),
                shutdown.clone(),
            )
            .await?,
        ),
        None => None,
    };
    // The record is kept current until the very end (through the drain it
    // says not ready), then deleted.
    let stop_publishing = CancellationToken::new();
    if let (Some(etcd), Some(lease)) = (&etcd, session_lease) {
        tokio::spawn(crate::replicas::publish(
            this.clone(),
            etcd.clone(),
            lease,
            stop_publishing.clone(),
        ));
    }
    let audit = Arc::new(
        AuditLog::open(&store)
            .map_err(|e| RunError::Audit(e.to_string()))?
            .with_anchors(crate::audit::AnchorKeys {
                ca: Arc::new(CertificateAuthority::from_pem(
                    &ca_pem,
                    &read(&layout.ca_key())?,
                )?),
                // Mid-rotation, anchors the previous CA signed still verify.
                trusted: [ca_pem.clone(), previous_ca.clone()]
                    .into_iter()
                    .filter(|pem| !pem.is_empty())
                    .collect(),
            }),
    );
    if let Some(admin) = &recovered_admin {
        audit
            .append(crate::audit::AuditEntry {
                user: admin.clone(),
                role: "admin".into(),
                action: "control-plane.recover-empty-db".into(),
                target: state_path.display().to_string(),
                result: "ok",
                detail: format!(
                    "started on an empty database; user {admin} re-created from {}",
                    layout.admin_profile().display()
                ),
                trace_id: String::new(),
                peer: None,
            })
            .await
            .map_err(|e| RunError::Audit(e.to_string()))?;
    }
    tracing::info!(name = %config.replica.name, endpoint = %endpoint, "serving as this replica");
    let replicas: Arc<dyn Replicas> = match &etcd {
        None => Arc::new(EmbeddedReplicas { this }),
        Some(etcd) => Arc::new(EtcdReplicas {
            this,
            etcd: etcd.clone(),
        }),
    };
    let ctx = Arc::new(Context {
        registry,
        store: store.clone(),
        events: events.clone(),
        ca,
        ca_fingerprint: ca_fingerprint.clone(),
        settings: config.settings.clone(),
        metrics: metrics.clone(),
        audit: audit.clone(),
        shutdown: shutdown.clone(),
        limits: crate::service::OperatorLimits::new(&config.settings),
        replicas,
    });
    tokio::spawn(trim_audit(
        audit,
        config.settings.audit_retention,
        shutdown.clone(),
    ));
    // The engine runs in the leader alone: on the embedded store that is
    // this process from the start; on etcd, whichever replica wins the
    // election builds it then, from the records as they are.
    let (leader_tx, leader_rx) = tokio::sync::watch::channel(None::<Leader>);
    let refuse: Arc<dyn crate::leader_only::Unanswered> = Arc::new(crate::leader_only::Refuse {
        replica: config.replica.name.clone(),
        leader: leader_rx.clone(),
    });
    // A follower forwards the engine's operator calls to the leader on
    // behalf of their callers. (The embedded store serves them itself from
    // the start, so it needs no replica certificate.)
    let forward: Arc<dyn crate::leader_only::Unanswered> = match &etcd {
        None => refuse.clone(),
        Some(_) => Arc::new(crate::forward::Forward::new(
            config.replica.name.clone(),
            leader_rx,
            forwarding_tls(&layout, &ca_pem, &previous_ca)?,
        )),
    };
    let (deployments_service, install_deployments) = LeaderOnly::new(forward.clone());
    let (pipelines_service, install_pipelines) = LeaderOnly::new(forward.clone());
    let (clusters_service, install_clusters) = LeaderOnly::new(forward.clone());
    let engine_services = EngineServices {
        ctx: ctx.clone(),
        store: store.clone(),
        events: events.clone(),
        metrics: metrics.clone(),
        settings: config.settings.clone(),
        deployments: install_deployments,
        pipelines: install_pipelines,
        clusters: install_clusters,
        own_ports: crate::webhooks::OwnPorts {
            grpc: grpc_addr,
            admin: admin_addr,
        },
    };
    // The embedded store: this process leads from the start, before it
    // serves a call.
    let (embedded_engine, engine_services) = match &etcd {
        None => (Some(engine_services.lead()?), None),
        Some(_) => (None, Some(engine_services)),
    };
    let incoming =
        tls_accept::incoming(grpc_listener, tls_config, metrics.clone(), shutdown.clone());
    // gRPC conventions: server reflection (v1 and v1alpha) and
    // grpc.health.v1.Health. No handler of ours sits behind them, so they
    // check no client certificate: any TLS client that trusts our CA can list
    // the API (the protos are public) and ask whether we serve, as load
    // balancers and probes need. See SECURITY.md.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()?
        .max_decoding_message_size(SMALL_MESSAGE_BYTES);
    let reflection_v1alpha = reflection()
        .build_v1alpha()?
        .max_decoding_message_size(SMALL_MESSAGE_BYTES);
    let (mut health, health_service) = tonic_health::server::health_reporter();
    let health_service = health_service.max_decoding_message_size(SMALL_MESSAGE_BYTES);
    let mut health_names = hotswap_service_names();
    health_names.push(String::new());
    health
        .set_service_status("", tonic_health::ServingStatus::NotServing)
        .await;
    // gRPC by content type, the HTTP/JSON API (SPEC §8) for the rest, on
    // one listener; the API calls the same services in process (see
    // http_api).
    let grpc_routes = tonic::service::Routes::builder()
        .routes()
        .add_service(
            pb::enrollment_server::EnrollmentServer::new(EnrollmentService::new(ctx.clone()))
                .max_decoding_message_size(SMALL_MESSAGE_BYTES),
        )
        // Every replica holds agent sessions (SPEC §7): on etcd each
        // publishes its sessions and follows the others' (registry::remote).
        .add_service(
            pb::agent_session_server::AgentSessionServer::new(SessionService::new(ctx.clone()))
                .max_decoding_message_size(SESSION_MESSAGE_BYTES),
        )
        .add_service(
            pb::fleet_server::FleetServer::new(FleetService::new(ctx.clone()))
                .max_decoding_message_size(SMALL_MESSAGE_BYTES),
        )
        .add_service(deployments_service)
        .add_service(pipelines_service)
        .add_service(
            pb::users_server::UsersServer::new(UsersService::new(ctx.clone()))
                .max_decoding_message_size(SMALL_MESSAGE_BYTES),
        )
        .add_service(
            pb::freezes_server::FreezesServer::new(crate::service::freezes::FreezesService::new(
                ctx.clone(),
            ))
            .max_decoding_message_size(SMALL_MESSAGE_BYTES),
        )
        .add_service(
            pb::audit_server::AuditServer::new(AuditService::new(ctx.clone()))
                .max_decoding_message_size(SMALL_MESSAGE_BYTES),
        )
        .add_service(
            pb::history_server::HistoryServer::new(crate::service::history::HistoryService::new(
                ctx.clone(),
            ))
            .max_decoding_message_size(SMALL_MESSAGE_BYTES),
        )
        .add_service(
            pb::events_server::EventsServer::new(EventsService::new(ctx.clone()))
                .max_decoding_message_size(SMALL_MESSAGE_BYTES),
        )
        .add_service(
            pb::servers_server::ServersServer::new(ServersService::new(ctx.clone()))
                .max_decoding_message_size(SMALL_MESSAGE_BYTES),
        )
        .add_service(clusters_service)
        .add_service(
            pb::webhooks_server::WebhooksServer::new(WebhooksService::new(
                ctx.clone(),
                crate::webhooks::OwnPorts {
                    grpc: grpc_addr,
                    admin: admin_addr,
                },
            ))
            .max_decoding_message_size(SMALL_MESSAGE_BYTES),
        )
        // Upload chunks are at most 1 MiB; leave headroom for framing.
        .add_service(
            pb::artifacts_server::ArtifactsServer::new(ArtifactsService::new(ctx.clone(), blobs))
                .max_decoding_message_size(8 * 1024 * 1024),
        )
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    // The RPC metrics sit right on the services, under the run-to-end layer,
    // so the HTTP API's in-process calls count too, and the HTTP requests
    // themselves (no gRPC method) do not.
    let grpc_services = crate::http_api::GrpcServices::new(tower::Layer::layer(
        &RpcMetricsLayer::new(metrics.clone()),
        grpc_routes.prepare(),
    ));
    let service = crate::http_api::ByContentType::new(grpc_services, metrics.clone());
    let grpc = tonic::transport::Server::builder()
        // HTTP/1.1 for the JSON API's plain HTTP clients; gRPC is HTTP/2.
        .accept_http1(true)
        // Unary calls and stream set-up are bounded by request_timeout, but
        // not uploads: they are cut off when idle (see deadline.rs). A client
        // can also ask for less with grpc-timeout.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(20)))
        .tcp_keepalive(Some(std::time::Duration::from_secs(60)))
        .max_concurrent_streams(Some(256))
        .http2_max_header_list_size(Some(64 * 1024))
        .layer(RequestTimeoutLayer::new(config.settings.request_timeout))
        // Innermost: a caller that goes away or runs out of time stops
        // waiting for the answer, not the handler (see run_to_end.rs).
        .layer(RunToEndLayer)
        .add_routes(tonic::service::Routes::from(
            axum::Router::new().fallback_service(service),
        ))
        .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned());
    let grpc_task = tokio::spawn(grpc);

    let addresses = Addresses {
        grpc: grpc_addr,
        admin: admin_addr,
        pid: std::process::id(),
    };
    let addresses_path = layout.addresses();
    if let Some(run_dir) = addresses_path.parent() {
        fsutil::create_private_dir(run_dir).map_err(|source| RunError::Write {
            path: run_dir.to_path_buf(),
            source,
        })?;
    }
    let json = serde_json::to_vec_pretty(&addresses).unwrap_or_default();
    fsutil::write_atomic(&addresses_path, &json, fsutil::PUBLIC_FILE_MODE).map_err(|source| {
        RunError::Write {
            path: addresses_path.clone(),
            source,
        }
    })?;
    readiness.set(true);
    // On etcd: the round trip and how far the mirror trails, every 5 s.
    if let Some(etcd) = &etcd {
        let etcd = etcd.clone();
        let metrics = metrics.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let started = std::time::Instant::now();
                if let Ok(status) = etcd.client().status().await {
                    metrics
                        .etcd_round_trip_seconds
                        .set(started.elapsed().as_secs_f64());
                    metrics
                        .etcd_watch_lag_revisions
                        .set((status.revision - etcd.revision()).max(0));
                }
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
        });
    }
    // On etcd, ready only while the mirror's watch is connected: a replica
    // cut off from etcd cannot answer truthfully.
    if let Some(etcd) = &etcd {
        let mut connection = etcd.connection();
        let readiness = readiness.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                readiness.set(*connection.borrow_and_update());
                tokio::select! {
                    changed = connection.changed() => if changed.is_err() { return },
                    _ = shutdown.cancelled() => return,
                }
            }
        });
    }
    for name in &health_names {
        health
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
    }
    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, ca_fingerprint = %ca_fingerprint, "control plane serving");
    let leadership = match (&etcd, embedded_engine, engine_services) {
        (Some(etcd), _, Some(services)) => tokio::spawn(lead_while_elected(Leadership {
            etcd: etcd.clone(),
            name: config.replica.name.clone(),
            endpoint: endpoint.clone(),
            lease: config.settings.leader_lease,
            services,
            leader: leader_tx,
            restart: restart.clone(),
            shutdown: shutdown.clone(),
        })),
        (_, Some(engine), _) => {
            metrics.leader.set(1);
            tokio::spawn(async move {
                let _ = engine.await;
            })
        }
        _ => tokio::spawn(async {}),
    };
    let storage_task = tokio::spawn(crate::storage::watch(crate::storage::Watch {
        store: store.clone(),
        data_dir: config.data_dir.clone(),
        min_free_bytes: config.settings.storage_min_free_bytes,
        readiness: readiness.clone(),
        metrics: metrics.clone(),
        restart: restart.clone(),
        shutdown: shutdown.clone(),
    }));

    shutdown.cancelled().await;
    readiness.set(false);
    // The engine stops with the shutdown: this process no longer leads.
    metrics.leader.set(0);
    // The engine stops with the shutdown and leadership is handed over
    // now, so the next replica does not wait out the lease while this one
    // drains.
    let _ = leadership.await;
    // Watchers see NOT_SERVING, then their streams end so they do not hold
    // up the drain.
    for name in &health_names {
        health
            .set_service_status(name, tonic_health::ServingStatus::NotServing)
            .await;
        health.clear_service_status(name).await;
    }
    tracing::info!(
        timeout_secs = config.settings.shutdown_timeout.as_secs(),
        "shutting down: draining connections"
    );
    let drained = tokio::time::timeout(config.settings.shutdown_timeout, grpc_task).await;
    match drained {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server ended with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "gRPC server task failed"),
        Err(_) => tracing::warn!(
            timeout_secs = config.settings.shutdown_timeout.as_secs(),
            "drain did not finish in time; exiting with connections still open"
        ),
    }
    let _ = storage_task.await;
    stop_publishing.cancel();
    if let (Some(etcd), Some(lease)) = (&etcd, session_lease) {
        crate::replicas::unpublish(etcd, &config.replica.name, lease).await;
        // The sessions ended with the drain; their records go at once
        // instead of when the lease runs out.
        if let Err(e) = etcd.client().revoke(lease).await {
            tracing::warn!(error = %e, "could not revoke the session lease; its records vanish when it expires");
        }
    }
    admin_shutdown.cancel();
    let _ = admin_task.await;
    if let Err(e) = store.flush().await {
        tracing::warn!(error = %e, "final database flush failed");
    }
    let _ = std::fs::remove_file(&addresses_path);
    if restart.load(std::sync::atomic::Ordering::SeqCst) {
        tracing::info!("control plane stopped for a restart");
        return Ok(Stopped::Restart {
            grpc: grpc_addr,
            admin: admin_addr,
        });
    }
    tracing::info!("control plane stopped");
    Ok(Stopped::Shutdown)
}
