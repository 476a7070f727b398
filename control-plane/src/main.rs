//! `hotswap-control-plane`: parse flags, set up logging and signals, and hand
//! over to the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hotswap_common::logging::{self, LogFormat};
use hotswap_common::signals::{cancel_on_signal, fail};
use hotswap_common::telemetry::Service;
use hotswap_control_plane::config::{BlobsSettings, RunConfig, Settings, StoreSettings};
use hotswap_control_plane::replicas::ReplicaIdentity;
use hotswap_control_plane::{init, rotation, server};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "hotswap-control-plane",
    version,
    about = "hotswap control plane: fleet state, enrollment, agent sessions"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        default_value = "text",
        env = "HOTSWAP_LOG_FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a data directory: CA, server certificate, first admin profile.
    #[command(
        after_help = "Example:\n  hotswap-control-plane init --data-dir /var/lib/hotswap --san cp.example.com"
    )]
    Init {
        #[arg(long)]
        data_dir: PathBuf,
        /// Extra DNS name or IP for the server certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
        /// Endpoint written into the admin profile.
        #[arg(long, default_value = "https://127.0.0.1:7443")]
        endpoint: String,
        /// Keep artifact content in `s3://BUCKET[/PREFIX]`: the bucket is
        /// created if it does not exist (credentials from AWS_ACCESS_KEY_ID
        /// and AWS_SECRET_ACCESS_KEY). Give `run` the same flags.
        #[arg(long)]
        blobs: Option<String>,
        /// Endpoint of an S3-compatible store other than AWS.
        #[arg(long, requires = "blobs")]
        s3_endpoint: Option<String>,
        /// Region of the bucket (default us-east-1).
        #[arg(long, requires = "blobs")]
        s3_region: Option<String>,
        /// Keep the records in an etcd cluster instead of DATA_DIR/state:
        /// its client URLs, comma-separated or repeated (SPEC §7).
        #[arg(long, env = "HOTSWAP_ETCD_ENDPOINTS", value_delimiter = ',')]
        etcd_endpoints: Vec<String>,
        /// Key prefix of the cluster's records in etcd (default /hotswap/).
        #[arg(long)]
        etcd_prefix: Option<String>,
    },
    /// Serve the gRPC API and the admin endpoint.
    #[command(
        after_help = "Example:\n  hotswap-control-plane run --data-dir /var/lib/hotswap --listen 0.0.0.0:7443"
    )]
    Run {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:9443")]
        admin_listen: SocketAddr,
        /// TOML file with tunables (heartbeat_interval, heartbeat_grace, ...).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Start although the database is missing or empty next to an existing
        /// CA: create an empty one and re-create the admin user from
        /// DATA_DIR/admin.profile.toml. Everything the lost database held is
        /// gone; without this flag such a start is refused.
        #[arg(long)]
        recover_empty_db: bool,
        /// Where artifact content lives: `s3://BUCKET[/PREFIX]` for an
        /// S3-compatible store (credentials from AWS_ACCESS_KEY_ID and
        /// AWS_SECRET_ACCESS_KEY), or `local` (DATA_DIR/blobs). Overrides the
        /// config file's `[blobs]`.
        #[arg(long)]
        blobs: Option<String>,
        /// Endpoint of an S3-compatible store other than AWS.
        #[arg(long, requires = "blobs")]
        s3_endpoint: Option<String>,
        /// Region of the bucket (default us-east-1).
        #[arg(long, requires = "blobs")]
        s3_region: Option<String>,
        /// Keep the records in an etcd cluster instead of DATA_DIR/state:
        /// its client URLs, comma-separated or repeated (SPEC §7).
        #[arg(long, env = "HOTSWAP_ETCD_ENDPOINTS", value_delimiter = ',')]
        etcd_endpoints: Vec<String>,
        /// Key prefix of the cluster's records in etcd (default /hotswap/).
        #[arg(long)]
        etcd_prefix: Option<String>,
        /// This replica's name in `hotswapctl servers list` (default: the
        /// host name); letters, digits, '-', '_' and '.'.
        #[arg(long)]
        name: Option<String>,
        /// The URL agents and operators reach this replica at, as
        /// `servers list` shows it (default: https:// and the --listen
        /// address it bound).
        #[arg(long, value_name = "URL")]
        advertise: Option<String>,
    },
    /// Issue a new server key and certificate (control plane stopped).
    #[command(
        after_help = "Agents and operators pin the CA, not the server certificate, so nothing else changes.\n\nExample:\n  hotswap-control-plane rotate-server-cert --data-dir /var/lib/hotswap --san cp2.example.com"
    )]
    RotateServerCert {
        #[arg(long)]
        data_dir: PathBuf,
        /// Extra DNS name or IP for the new certificate (repeatable).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
    /// Start a CA rotation (control plane stopped); see docs/operations.md.
    #[command(
        after_help = "Agents keep working and receive the new CA with their next certificate renewal.\nRun finish-ca-rotation after at least one node certificate lifetime.\n\nExample:\n  hotswap-control-plane rotate-ca --data-dir /var/lib/hotswap"
    )]
    RotateCa {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Finish a CA rotation: stop trusting the previous CA (control plane stopped).
    #[command(
        after_help = "Example:\n  hotswap-control-plane finish-ca-rotation --data-dir /var/lib/hotswap"
    )]
    FinishCaRotation {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held to the end of `main`: traces still queued are flushed after the
    // graceful shutdown.
    let log_guard = logging::init(cli.log_format, Service::ControlPlane);
    hotswap_common::install_crypto_provider();
    let open_files = hotswap_common::signals::raise_open_files_limit();
    tracing::debug!(open_files, "open files limit");
    match cli.command {
        Command::Init {
            data_dir,
            sans,
            endpoint,
            blobs,
            s3_endpoint,
            s3_region,
            etcd_endpoints,
            etcd_prefix,
        } => {
            let store = if etcd_endpoints.is_empty() {
                if etcd_prefix.is_some() {
                    return fail(&"--etcd-prefix needs --etcd-endpoints");
                }
                None
            } else {
                if blobs.as_deref().is_none_or(|b| !b.starts_with("s3://")) {
                    return fail(
                        &"--etcd-endpoints needs --blobs s3://BUCKET: every replica must read the same artifacts",
                    );
                }
                match StoreSettings::default().with_flags(&etcd_endpoints, etcd_prefix.as_deref()) {
                    Ok(store) => Some(store),
                    Err(e) => return fail(&e),
                }
            };
            // The bucket first: a refused one leaves no data directory behind.
            if let Some(url) = &blobs {
                let settings = match BlobsSettings::from_flags(
                    url,
                    s3_endpoint.as_deref(),
                    s3_region.as_deref(),
                ) {
                    Ok(settings) => settings,
                    Err(e) => return fail(&e),
                };
                if let Some(s3) = settings.s3()
                    && let Err(e) = create_bucket(&s3)
                {
                    return fail(&e);
                }
            }
            match init::init(&init::InitOptions {
                data_dir: data_dir.clone(),
                sans,
                endpoint,
                store,
            }) {
                Ok(outcome) => {
                    println!("initialized control plane in {}", data_dir.display());
                    println!("ca fingerprint: {}", outcome.ca_fingerprint);
                    println!("admin profile:  {}", outcome.admin_profile.display());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::RotateServerCert { data_dir, sans } => {
            match rotation::rotate_server_cert(&data_dir, &sans) {
                Ok(names) => {
                    println!("new server certificate for {}", names.join(", "));
                    println!("restart the control plane to use it");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::RotateCa { data_dir } => match rotation::rotate_ca(&data_dir) {
            Ok(fingerprint) => {
                println!("new CA fingerprint: {fingerprint}");
                println!(
                    "the previous CA stays trusted until finish-ca-rotation; restart the control plane"
                );
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::FinishCaRotation { data_dir } => match rotation::finish_ca_rotation(&data_dir) {
            Ok(()) => {
                println!("the previous CA is no longer trusted; restart the control plane");
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Run {
            data_dir,
            listen,
            admin_listen,
            config: config_path,
            recover_empty_db,
            blobs,
            s3_endpoint,
            s3_region,
            etcd_endpoints,
            etcd_prefix,
            name,
            advertise,
        } => {
            let replica = match ReplicaIdentity::from_flags(
                name.as_deref(),
                advertise.as_deref(),
                hotswap_common::host::hostname(),
            ) {
                Ok(replica) => replica,
                Err(e) => return fail(&e),
            };
            let mut settings = match config_path.as_deref().map(Settings::load).transpose() {
                Ok(settings) => settings.unwrap_or_default(),
                Err(e) => return fail(&e),
            };
            let blob_flags = BlobFlags {
                blobs,
                s3_endpoint,
                s3_region,
                etcd_endpoints,
                etcd_prefix,
            };
            if !blob_flags.etcd_endpoints.is_empty() {
                match settings.store.with_flags(
                    &blob_flags.etcd_endpoints,
                    blob_flags.etcd_prefix.as_deref(),
                ) {
                    Ok(store) => settings.store = store,
                    Err(e) => return fail(&e),
                }
            } else if blob_flags.etcd_prefix.is_some() {
                return fail(&"--etcd-prefix needs --etcd-endpoints");
            }
            if let Some(url) = &blob_flags.blobs {
                match BlobsSettings::from_flags(
                    url,
                    blob_flags.s3_endpoint.as_deref(),
                    blob_flags.s3_region.as_deref(),
                ) {
                    Ok(from_flags) => settings.blobs = from_flags,
                    Err(e) => return fail(&e),
                }
            }
            // Flags may have changed what the file said: check the whole.
            if let Some(problem) = settings.problems().first() {
                return fail(problem);
            }
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => return fail(&e),
            };
            let config = RunConfig {
                data_dir: data_dir.clone(),
                listen,
                admin_listen,
                settings,
                recover_empty_db,
                replica: replica.clone(),
            };
            let stopped = runtime.block_on(async {
                let shutdown = CancellationToken::new();
                tokio::spawn(cancel_on_signal(shutdown.clone()));
                server::run(config, shutdown).await
            });
            // Sockets, the database and its lock go with the runtime.
            drop(runtime);
            match stopped {
                Ok(server::Stopped::Shutdown) => ExitCode::SUCCESS,
                Ok(server::Stopped::Restart { grpc, admin }) => {
                    drop(log_guard);
                    restart(
                        cli.log_format,
                        &data_dir,
                        grpc,
                        admin,
                        config_path.as_deref(),
                        &blob_flags,
                        &replica,
                    )
                }
                Err(e) => fail(&e),
            }
        }
    }
}

/// Run again in place (same pid, for the service manager): `exec` this
/// binary with the same settings, on the addresses just served, so agents
/// and clients find it where it was. Returns only if `exec` fails.
/// Create the bucket of `s3` unless it exists, saying which happened.
fn create_bucket(s3: &hotswap_control_plane::blobs::S3Config) -> Result<(), String> {
    let credentials =
        hotswap_control_plane::blobs::S3Credentials::from_env().map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let created = runtime
        .block_on(hotswap_control_plane::blobs::create_bucket_if_missing(
            s3,
            &credentials,
        ))
        .map_err(|e| e.to_string())?;
    if created {
        println!("created bucket {}", s3.bucket);
    } else {
        println!("bucket {} exists", s3.bucket);
    }
    Ok(())
}

/// The storage flags of `run`, passed on unchanged when it restarts in place.
struct BlobFlags {
    blobs: Option<String>,
    s3_endpoint: Option<String>,
    s3_region: Option<String>,
    etcd_endpoints: Vec<String>,
    etcd_prefix: Option<String>,
}

fn restart(
    log_format: LogFormat,
    data_dir: &std::path::Path,
    grpc: SocketAddr,
    admin: SocketAddr,
    config: Option<&std::path::Path>,
    blobs: &BlobFlags,
    replica: &ReplicaIdentity,
) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new("/proc/self/exe");
    command
        .arg("--log-format")
        .arg(log_format.as_str())
        .arg("run")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--listen")
        .arg(grpc.to_string())
        .arg("--admin-listen")
        .arg(admin.to_string());
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    if !blobs.etcd_endpoints.is_empty() {
        command
            .arg("--etcd-endpoints")
            .arg(blobs.etcd_endpoints.join(","));
    }
    for (flag, value) in [
        ("--blobs", &blobs.blobs),
        ("--s3-endpoint", &blobs.s3_endpoint),
        ("--s3-region", &blobs.s3_region),
        ("--etcd-prefix", &blobs.etcd_prefix),
    ] {
        if let Some(value) = value {
            command.arg(flag).arg(value);
        }
    }
    // The name as resolved, so a changed host name does not rename a
    // replica that restarts in place.
    command.arg("--name").arg(&replica.name);
    if let Some(url) = &replica.advertise {
        command.arg("--advertise").arg(url);
    }
    let error = command.exec();
    eprintln!("error: cannot restart the control plane: {error}");
    ExitCode::FAILURE
}
