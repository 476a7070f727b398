//! `hotswap-bench`: reproducible benchmarks against the real binaries on
//! loopback. Results go to stdout as one JSON object per benchmark, with the
//! machine facts needed to compare runs; BENCHMARKS.md records them.
//!
//! Run with `cargo run --release -p hotswap-bench -- <benchmark>` after
//! `cargo build --release --workspace --bins` (see BENCHMARKS.md).

mod artifact;
mod etcd;
mod fanout;
mod fleet;
mod ha;
mod large;
mod load;
mod swap;
mod wasm;

use std::path::Path;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use hotswap_tests::ControlPlane;
use serde_json::{Value, json};

#[derive(Parser)]
#[command(
    name = "hotswap-bench",
    about = "hotswap benchmarks (real binaries, loopback, temp dirs)"
)]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// Artifact push and fan-out of one artifact to N agents over mTLS,
    /// against the machine's SHA-256 + AES-GCM floor.
    Artifact {
        #[arg(long, default_value_t = 50)]
        agents: usize,
        #[arg(long, default_value_t = 1)]
        size_mib: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// One big module through pack, sign, push, a deployment to N real
    /// agents and a rollback to it: time of each step and peak memory of
    /// every process (CLI, control plane, agents).
    LargeArtifact {
        /// Size of the module's files (agents unpack at most 1 GiB).
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
        #[arg(long, default_value_t = 3)]
        agents: usize,
    },
    /// Hot swaps on one real agent: alternate the desired version A→B→A…
    /// and time each swap; for the process runtime, under continuous HTTP
    /// load on the module's port, counting failed requests.
    Swap {
        #[arg(long, default_value_t = 1000)]
        swaps: usize,
        #[arg(long, value_enum, default_value_t = RuntimeChoice::Both)]
        runtime: RuntimeChoice,
    },
    /// The wasm runtime in process on a real socket: compile and cache
    /// load, requests per CPU-second against hello-server as a process,
    /// instantiation per request, and N swaps under load (switch time,
    /// rollback time, failed requests).
    Wasm {
        #[arg(long, default_value_t = 1000)]
        swaps: usize,
        /// Seconds of each throughput window.
        #[arg(long, default_value_t = 10)]
        window_s: u64,
    },
    /// N simulated agents (one mTLS session each) on one control plane:
    /// connect time, memory per agent, CPU for the session traffic, and
    /// the time for all to be back after kill -9 of the control plane.
    Fleet {
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
        /// Steady-state window for the CPU measurement, in seconds.
        #[arg(long, default_value_t = 30)]
        window_s: u64,
        /// Each agent sends a status report this often (the real agent: 5s).
        #[arg(long, default_value = "5s")]
        report_every: String,
        /// Soak: sample memory and CPU every 10 s for this long after the
        /// steady window, and report the growth.
        #[arg(long, default_value_t = 0)]
        soak_s: u64,
        /// Skip the kill -9 and reconnect measurement.
        #[arg(long)]
        no_restart: bool,
    },
    /// Replicas on a 3-member etcd with SeaweedFS, N simulated agents spread
    /// over three replicas (a fresh cluster per run): kill -9 of a follower
    /// → all agents back in sessions; kill -9 of the leader with a rollout
    /// in flight → the next deployment decision on an agent's session, and
    /// the rollout resumed; SIGTERM of the leader → another leads, the old
    /// election lease revoked.
    Failover {
        #[arg(long, default_value_t = 1000)]
        agents: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// N simulated agents over R replicas on a 3-member etcd, through
    /// several simulator processes (each under the 20k open-files limit):
    /// connect them all, then memory and CPU per agent on every replica
    /// and simulator over a steady window.
    Capacity {
        #[arg(long, default_value_t = 50_000)]
        agents: usize,
        #[arg(long, default_value_t = 3)]
        replicas: usize,
        /// Agents per simulator process (at most 17,000).
        #[arg(long, default_value_t = 12_500)]
        per_simulator: usize,
        /// Steady-state window for the CPU measurement, in seconds.
        #[arg(long, default_value_t = 30)]
        window_s: u64,
        /// Measure with the agents connected by then if not all are.
        #[arg(long, default_value_t = 1800)]
        connect_limit_s: u64,
    },
    /// A new version of a module to N simulated agents that really fetch
    /// and verify it (each over its own mTLS connection) and report it
    /// active: `deploy create` to `succeeded`.
    Fanout {
        #[arg(long, default_value_t = 10_000)]
        agents: usize,
        #[arg(long, default_value_t = 64)]
        size_kib: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Store backends, comma-separated; with more than one, each has
        /// its fleet and the runs alternate between them.
        #[arg(long, value_delimiter = ',', default_value = "sled")]
        backends: Vec<StoreChoice>,
        /// etcd's `--max-request-bytes` for the etcd backend (default:
        /// etcd's own, 1.5 MiB, which split deployment records fit; for
        /// experiments only).
        #[arg(long)]
        etcd_max_request_bytes: Option<u64>,
    },
    /// etcd beside `fleet`: N lease keep-alive streams, each on its own
    /// mTLS connection (needs scripts/bench-deps.sh).
    EtcdLeases {
        #[arg(long, default_value_t = 10_000)]
        streams: usize,
        /// Keep-alive period of each stream, in seconds.
        #[arg(long, default_value_t = 5)]
        keepalive_s: u64,
        #[arg(long, default_value_t = 30)]
        window_s: u64,
    },
    /// etcd beside `fanout`: one put delivered to N watchers, each on its
    /// own mTLS connection (needs scripts/bench-deps.sh).
    EtcdFanout {
        #[arg(long, default_value_t = 10_000)]
        watchers: usize,
        #[arg(long, default_value_t = 64)]
        value_kib: usize,
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StoreChoice {
    Sled,
    Etcd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuntimeChoice {
    Process,
    Bundle,
    Both,
}

fn main() -> anyhow::Result<()> {
    hotswap_common::install_crypto_provider();
    match Cli::parse().bench {
        Bench::Artifact {
            agents,
            size_mib,
            runs,
        } => artifact::artifact(agents, size_mib, runs),
        Bench::LargeArtifact { size_mib, agents } => large::large_artifact(size_mib, agents),
        Bench::Swap { swaps, runtime } => swap::swap(swaps, runtime),
        Bench::Wasm { swaps, window_s } => {
            println!("{}", wasm::run(swaps, Duration::from_secs(window_s))?);
            Ok(())
        }
        Bench::Fleet {
            agents,
            window_s,
            report_every,
            soak_s,
            no_restart,
        } => fleet::fleet(fleet::FleetOptions {
            agents,
            window: Duration::from_secs(window_s),
            report_every,
            soak: Duration::from_secs(soak_s),
            restart: !no_restart,
        }),
        Bench::Failover { agents, runs } => ha::failover(agents, runs),
        Bench::Capacity {
            agents,
            replicas,
            per_simulator,
            window_s,
            connect_limit_s,
        } => ha::capacity(
            agents,
            replicas,
            per_simulator,
            Duration::from_secs(window_s),
            Duration::from_secs(connect_limit_s),
        ),
        Bench::Fanout {
            agents,
            size_kib,
            runs,
            mut backends,
            etcd_max_request_bytes,
        } => {
            let mut seen = Vec::new();
            backends.retain(|b| {
                let new = !seen.contains(b);
                seen.push(*b);
                new
            });
            fanout::fanout(agents, size_kib, runs, &backends, etcd_max_request_bytes)
        }
        Bench::EtcdLeases {
            streams,
            keepalive_s,
            window_s,
        } => etcd::leases(
            streams,
            Duration::from_secs(keepalive_s),
            Duration::from_secs(window_s),
        ),
        Bench::EtcdFanout {
            watchers,
            value_kib,
            runs,
        } => etcd::fanout(watchers, value_kib, runs),
    }
}

/// Start a control plane whose settings file holds exactly `settings`.
///
/// `ControlPlane::init_with_settings` appends its extra lines to the
/// harness's fast test settings, so giving it a `heartbeat_interval` again
/// would be a duplicate TOML key; the settings file is rewritten instead.
pub fn start_control_plane(work: &Path, settings: &str) -> anyhow::Result<ControlPlane> {
    let mut cp = ControlPlane::init_with_settings(work, "");
    std::fs::write(work.join("cp.toml"), settings)?;
    cp.start();
    Ok(cp)
}

/// Machine facts included in every result.
pub fn machine() -> Value {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    json!({
        "date": hotswap_common::timefmt::rfc3339_from_ms(hotswap_common::timefmt::now_ms()),
        "cores": cores,
        "cpu_model": cpu_model,
        "kernel": kernel,
    })
}

pub fn cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

pub fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[samples.len() / 2]
}

/// Nearest-rank percentile of sorted samples (`p` in 0..=1).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// `{p50, p90, p99, max}` of samples, rounded to 0.01.
pub fn summary(samples: &[f64]) -> Value {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    json!({
        "p50": round(percentile(&sorted, 0.50)),
        "p90": round(percentile(&sorted, 0.90)),
        "p99": round(percentile(&sorted, 0.99)),
        "max": round(sorted.last().copied().unwrap_or(f64::NAN)),
    })
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / elapsed.as_secs_f64()
}

pub fn pseudo_random(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

pub fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// Rounded to 0.0001, for ratios.
pub fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// `VmRSS` of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU time of a process, in seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the parenthesized command name; utime, stime are 14 and 15.
            let rest = s.rsplit_once(')')?.1;
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .unwrap_or(0.0)
}
