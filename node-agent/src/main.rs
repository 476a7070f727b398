//! `hotswap-agent`: parse flags, set up logging and signals, and hand over to
//! the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use hotswap_agent::config::{AgentConfig, EnrollmentConfig, hostname};
use hotswap_agent::{agent, simulate};
use hotswap_common::logging::{self, LogFormat};
use hotswap_common::signals::{cancel_on_signal, fail};
use hotswap_common::telemetry::Service;
use hotswap_common::{labels, pki, timefmt, tls};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "hotswap-agent",
    version,
    about = "hotswap node agent: enrolls, keeps a session, runs modules"
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
    /// Run the agent (enrolls on first start).
    #[command(
        after_help = "Examples:\n  hotswap-agent run --data-dir /var/lib/hotswap-agent --control-plane https://cp:7443 \\\n      --join-token hsj_... --ca-fingerprint sha256:... --label environment=dev\n  hotswap-agent run --data-dir /var/lib/hotswap-agent --control-plane https://cp:7443"
    )]
    Run(RunArgs),
    /// Many simulated agents in one process, for scale tests and benchmarks.
    #[command(
        after_help = "Each simulated agent enrolls with its own key and certificate and keeps its own mTLS\nsession; modules install instantly (or after --install-latency) and report healthy.\nThe token needs at least --count uses. Enrollments the control plane refuses\nfor its enroll_per_minute limit are retried with backoff and counted as rate-limited.\n\nExamples:\n  hotswap-agent simulate --count 1000 --control-plane https://127.0.0.1:7443 \\\n      --join-token hsj_... --ca-fingerprint sha256:... --label environment=dev \\\n      --source-addrs 127.0.0.2-127.0.0.20\n  hotswap-agent simulate --count 50 ... --failure-rate 0.1 --flap-every 30s --churn-every 60s"
    )]
    Simulate(SimulateArgs),
}

#[derive(clap::Args)]
struct SimulateArgs {
    /// How many agents.
    #[arg(long)]
    count: usize,
    /// Control plane URL; repeat it or separate with commas for replicas:
    /// agents enroll through the first, agent i opens its first session on
    /// the (i mod n)-th and moves to the next after each session.
    #[arg(long, env = "HOTSWAP_CONTROL_PLANE", required = true)]
    control_plane: Vec<String>,
    #[arg(long, env = "HOTSWAP_JOIN_TOKEN", hide_env_values = true)]
    join_token: String,
    #[arg(long, env = "HOTSWAP_CA_FINGERPRINT")]
    ca_fingerprint: String,
    /// Label `key=value` for every simulated node (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Node names are PREFIX-00000, PREFIX-00001, ...
    #[arg(long, default_value = "sim")]
    name_prefix: String,
    /// Source addresses to spread connections over: a list or ranges, e.g.
    /// 127.0.0.2-127.0.0.40 (each address has its own ~28k ephemeral ports).
    #[arg(long)]
    source_addrs: Option<String>,
    /// Enrollments in flight at once.
    #[arg(long, default_value_t = 64)]
    enroll_concurrency: usize,
    /// Fraction of simulated installs that fail.
    #[arg(long, default_value_t = 0.0)]
    failure_rate: f64,
    /// Time a simulated install takes.
    #[arg(long, default_value = "0s", value_parser = timefmt::parse_duration)]
    install_latency: Duration,
    /// Toggle module health this often.
    #[arg(long, value_parser = timefmt::parse_duration)]
    flap_every: Option<Duration>,
    /// Each agent drops and re-opens its session after about this long.
    #[arg(long, value_parser = timefmt::parse_duration)]
    churn_every: Option<Duration>,
    /// Error rate healthy simulated modules report.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// p99 latency healthy simulated modules report.
    #[arg(long, default_value = "20ms", value_parser = timefmt::parse_duration)]
    latency_p99: Duration,
    /// Fetch each artifact for real and verify it (in memory) on install.
    #[arg(long)]
    fetch: bool,
    /// Send a status report this often even without a change.
    #[arg(long, default_value = "5s", value_parser = timefmt::parse_duration)]
    report_every: Duration,
    /// Print a progress line this often.
    #[arg(long, default_value = "5s", value_parser = timefmt::parse_duration)]
    stats_every: Duration,
}

#[derive(clap::Args)]
struct RunArgs {
    #[arg(long)]
    data_dir: PathBuf,
    /// Control plane URL, e.g. https://cp.example:7443; repeat it or separate
    /// with commas for replicas (tried in turn from a random one, failing over).
    #[arg(long, env = "HOTSWAP_CONTROL_PLANE", required = true)]
    control_plane: Vec<String>,
    /// Join token for the first start (prefer the env var: it stays out of `ps`).
    #[arg(long, env = "HOTSWAP_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// SHA-256 fingerprint of the control plane's CA, `sha256:HEX`.
    #[arg(long, env = "HOTSWAP_CA_FINGERPRINT")]
    ca_fingerprint: Option<String>,
    /// Node label `key=value` (repeatable).
    #[arg(long = "label")]
    labels: Vec<String>,
    /// Node name (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Admin HTTP address for /healthz, /readyz, /metrics.
    #[arg(long, default_value = "127.0.0.1:9444")]
    admin_listen: SocketAddr,
    /// First reconnect delay; doubles per failed attempt, with jitter.
    #[arg(long, default_value = "250ms", value_parser = timefmt::parse_duration)]
    reconnect_base: Duration,
    /// Pin a publisher key (PEM public key file, repeatable): only pinned
    /// keys are trusted, whatever the control plane publishes.
    #[arg(long = "trusted-key")]
    trusted_keys: Vec<PathBuf>,
    /// Longest reconnect delay.
    #[arg(long, default_value = "15s", value_parser = timefmt::parse_duration)]
    reconnect_max: Duration,
    /// Where compiled wasm components are kept, by content digest and
    /// wasmtime version (default: DATA_DIR/wasm-cache). Agents of one host
    /// may share it.
    #[arg(long, env = "HOTSWAP_WASM_CACHE_DIR")]
    wasm_cache_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Held to the end of `main`: traces still queued are flushed after the
    // graceful shutdown.
    let _log_guard = logging::init(cli.log_format, Service::Agent);
    hotswap_common::install_crypto_provider();
    let open_files = hotswap_common::signals::raise_open_files_limit();
    tracing::debug!(open_files, "open files limit");
    let args = match cli.command {
        Command::Run(args) => args,
        Command::Simulate(args) => return simulate(args),
    };
    let config = match config_from(args) {
        Ok(config) => config,
        Err(problems) => {
            for problem in &problems {
                eprintln!("error: {problem}");
            }
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        match agent::run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail(&e),
        }
    })
}

fn simulate(args: SimulateArgs) -> ExitCode {
    let mut problems = Vec::new();
    let control_plane = tls::Endpoints::parse(&args.control_plane)
        .map_err(|e| problems.push(e.to_string()))
        .ok();
    let labels = labels::parse_labels(&args.labels)
        .map_err(|e| problems.push(format!("--label: {e}")))
        .ok();
    let fingerprint = pki::parse_fingerprint(&args.ca_fingerprint)
        .map_err(|e| problems.push(format!("--ca-fingerprint: {e}")))
        .ok();
    let source_addrs = simulate::parse_source_addrs(args.source_addrs.as_deref().unwrap_or(""))
        .map_err(|e| problems.push(format!("--source-addrs: {e}")))
        .unwrap_or_default();
    if args.count == 0 {
        problems.push("--count must be at least 1".into());
    }
    if args.report_every < Duration::from_millis(10) {
        problems.push("--report-every must be at least 10ms".into());
    }
    for (flag, every) in [
        ("--flap-every", args.flap_every),
        ("--churn-every", args.churn_every),
    ] {
        if every.is_some_and(|d| d < Duration::from_millis(10)) {
            problems.push(format!("{flag} must be at least 10ms"));
        }
    }
    for (flag, rate) in [
        ("--failure-rate", args.failure_rate),
        ("--error-rate", args.error_rate),
    ] {
        if !(0.0..=1.0).contains(&rate) {
            problems.push(format!("{flag} {rate} is not between 0 and 1"));
        }
    }
    let (Some(control_plane), Some(labels), Some(ca_fingerprint), true) =
        (control_plane, labels, fingerprint, problems.is_empty())
    else {
        for problem in &problems {
            eprintln!("error: {problem}");
        }
        return ExitCode::from(2);
    };
    let config = simulate::SimConfig {
        count: args.count,
        control_plane,
        join_token: args.join_token,
        ca_fingerprint,
        labels,
        name_prefix: args.name_prefix,
        source_addrs,
        enroll_concurrency: args.enroll_concurrency,
        failure_rate: args.failure_rate,
        install_latency: args.install_latency,
        flap_every: args.flap_every,
        churn_every: args.churn_every,
        error_rate: args.error_rate,
        latency_p99: args.latency_p99,
        report_every: args.report_every,
        fetch: args.fetch,
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => return fail(&e),
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(cancel_on_signal(shutdown.clone()));
        let stats = std::sync::Arc::new(simulate::SimStats::default());
        let reporter = {
            let stats = stats.clone();
            let shutdown = shutdown.clone();
            let every = args.stats_every.max(Duration::from_millis(100));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tick.tick() => eprintln!("simulate: {}", stats.line()),
                    }
                }
            })
        };
        simulate::run(config, stats.clone(), shutdown).await;
        reporter.abort();
        eprintln!("simulate: stopped; {}", stats.line());
        ExitCode::SUCCESS
    })
}

/// Validate every flag, reporting all problems at once.
fn config_from(args: RunArgs) -> Result<AgentConfig, Vec<String>> {
    let mut problems = Vec::new();
    let control_plane = tls::Endpoints::parse(&args.control_plane)
        .map_err(|e| problems.push(e.to_string()))
        .ok();
    let labels = labels::parse_labels(&args.labels)
        .map_err(|e| problems.push(format!("--label: {e}")))
        .ok();
    let enrollment = match (args.join_token, args.ca_fingerprint) {
        (Some(join_token), Some(fp)) => match pki::parse_fingerprint(&fp) {
            Ok(ca_fingerprint) => Some(EnrollmentConfig {
                join_token,
                ca_fingerprint,
            }),
            Err(e) => {
                problems.push(format!("--ca-fingerprint: {e}"));
                None
            }
        },
        (Some(_), None) => {
            problems.push(
                "--join-token needs --ca-fingerprint: the agent pins the control plane's CA by it"
                    .into(),
            );
            None
        }
        (None, Some(_)) | (None, None) => None,
    };
    let mut trusted_keys = Vec::new();
    for path in &args.trusted_keys {
        match std::fs::read_to_string(path) {
            Ok(pem) => match hotswap_common::artifact::keys::parse_public_key(&pem) {
                Ok(_) => {
                    let name = path
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    trusted_keys.push((name, pem));
                }
                Err(e) => problems.push(format!(
                    "--trusted-key {}: not an ed25519 public key in PEM form: {e}",
                    path.display()
                )),
            },
            Err(e) => problems.push(format!("--trusted-key {}: {e}", path.display())),
        }
    }
    if args.reconnect_base.is_zero() || args.reconnect_base > args.reconnect_max {
        problems.push("--reconnect-base must be positive and not above --reconnect-max".into());
    }
    let wasm_cache_dir = args
        .wasm_cache_dir
        .clone()
        .unwrap_or_else(|| args.data_dir.join("wasm-cache"));
    match (control_plane, labels, problems.is_empty()) {
        (Some(control_plane), Some(labels), true) => Ok(AgentConfig {
            wasm_cache_dir: std::path::absolute(&wasm_cache_dir).unwrap_or(wasm_cache_dir),
            // Absolute, because module processes run with their own working directory.
            data_dir: std::path::absolute(&args.data_dir).unwrap_or(args.data_dir),
            control_plane,
            enrollment,
            labels,
            name: args.name.unwrap_or_else(hostname),
            admin_listen: Some(args.admin_listen),
            backoff_base: args.reconnect_base,
            backoff_max: args.reconnect_max,
            trusted_keys,
        }),
        _ => Err(problems),
    }
}
