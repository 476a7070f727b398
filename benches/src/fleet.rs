//! `fleet`: many simulated agents (`hotswap-agent simulate`, one mTLS
//! connection each) on one control plane: time to enroll and connect them
//! all, memory per connected agent on both sides, CPU for heartbeats and
//! status reports (the ingest rate per core), optionally a soak with memory
//! and CPU sampled every 10 s, then the time for all of them to be back
//! after a `kill -9` of the control plane.

use std::time::{Duration, Instant};

use anyhow::bail;
use hotswap_tests::{ControlPlane, Simulator, TestDir, http_get};
use serde_json::{Value, json};

use crate::{cpu_seconds, machine, round, rss_kib, start_control_plane};

pub struct FleetOptions {
    pub agents: usize,
    pub window: Duration,
    /// `--report-every` for the simulator.
    pub report_every: String,
    pub soak: Duration,
    pub restart: bool,
}

/// (steal, total) jiffies of the whole machine, from /proc/stat.
fn steal_and_total() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    (
        fields.get(7).copied().unwrap_or(0),
        fields.iter().take(8).sum(),
    )
}

/// A metric's value from the control plane's /metrics (cheap at any size).
fn metric(cp: &ControlPlane, line_prefix: &str) -> f64 {
    let Some(admin) = cp.admin else { return 0.0 };
    let (_, text) = http_get(admin, "/metrics");
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn connected(cp: &ControlPlane) -> u64 {
    metric(cp, "hotswap_nodes{status=\"connected\"}") as u64
}

fn wait_connected(
    cp: &ControlPlane,
    sim: &mut Simulator,
    want: u64,
    limit: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if connected(cp) >= want {
            return Ok(started.elapsed());
        }
        sim.check_running().map_err(anyhow::Error::msg)?;
        if started.elapsed() > limit {
            bail!("only {} of {want} connected after {limit:?}", connected(cp));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CPU (cores) of `pid` and messages per second the control plane took in
/// (heartbeats + reports, from its counters) over `window`.
fn measure(cp: &ControlPlane, pid: u32, sim_pid: u32, window: Duration) -> Value {
    let (cpu0, sim0) = (cpu_seconds(pid), cpu_seconds(sim_pid));
    let beats0 = metric(cp, "hotswap_heartbeats_total");
    let reports0 = metric(cp, "hotswap_reports_total");
    let (steal0, total0) = steal_and_total();
    let t0 = Instant::now();
    std::thread::sleep(window);
    let secs = t0.elapsed().as_secs_f64();
    let cores = (cpu_seconds(pid) - cpu0) / secs;
    let sim_cores = (cpu_seconds(sim_pid) - sim0) / secs;
    let beats = (metric(cp, "hotswap_heartbeats_total") - beats0) / secs;
    let reports = (metric(cp, "hotswap_reports_total") - reports0) / secs;
    let (steal1, total1) = steal_and_total();
    let steal = (steal1 - steal0) as f64 / (total1 - total0).max(1) as f64;
    json!({
        "window_s": round(secs),
        "control_plane_cores": round(cpu_cores_floor(cores)),
        "simulator_cores": round(sim_cores),
        "heartbeats_per_s": round(beats),
        "reports_per_s": round(reports),
        "messages_per_s_per_core": round((beats + reports) / cpu_cores_floor(cores)),
        "reports_per_s_per_core": round(reports / cpu_cores_floor(cores)),
        "steal_pct": round(steal * 100.0),
    })
}

fn cpu_cores_floor(cores: f64) -> f64 {
    cores.max(0.001)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

pub fn fleet(options: FleetOptions) -> anyhow::Result<()> {
    let agents = options.agents;
    let dir = TestDir::new();
    // Production-like heartbeats; enrollment limits opened for the burst.
    let settings = "heartbeat_interval = \"5s\"\nheartbeat_grace = \"15s\"\nenroll_burst = 1000000\nenroll_per_minute = 1000000\nstorage_cache_bytes = 67108864\n";
    let mut cp = start_control_plane(dir.path(), settings)?;
    std::thread::sleep(Duration::from_secs(1));
    let cp_idle_kib = rss_kib(cp.pid());

    // Each source address has ~28k ephemeral ports: one per 20k agents, at
    // least four.
    let sources = format!("127.0.0.2-127.0.0.{}", 2 + (agents / 20_000).max(1) * 4);
    let started = Instant::now();
    let mut sim = Simulator::start(
        &cp,
        "bench",
        agents,
        &["environment=dev"],
        &[
            "--source-addrs",
            &sources,
            "--enroll-concurrency",
            "64",
            "--report-every",
            &options.report_every,
        ],
    );
    let up = wait_connected(&cp, &mut sim, agents as u64, Duration::from_secs(3600))?;
    let enroll_and_connect = started.elapsed();
    eprintln!("fleet: {agents} agents connected in {enroll_and_connect:?}");
    // Let allocations settle, then measure a steady window.
    std::thread::sleep(Duration::from_secs(10));
    let (cp_pid, sim_pid) = (cp.pid(), sim.pid());
    let cp_kib = rss_kib(cp_pid);
    let sim_kib = rss_kib(sim_pid);
    let steady = measure(&cp, cp_pid, sim_pid, options.window);
    eprintln!("fleet: steady {steady}");

    let soak = if options.soak.is_zero() {
        Value::Null
    } else {
        let mut samples = Vec::new();
        let t0 = Instant::now();
        while t0.elapsed() < options.soak {
            let window = measure(&cp, cp_pid, sim_pid, Duration::from_secs(10));
            let sample = json!({
                "t_s": t0.elapsed().as_secs(),
                "control_plane_rss_mib": round(rss_kib(cp_pid) as f64 / 1024.0),
                "simulator_rss_mib": round(rss_kib(sim_pid) as f64 / 1024.0),
                "control_plane_cores": window["control_plane_cores"],
                "connected": connected(&cp),
                "steal_pct": window["steal_pct"],
            });
            eprintln!("fleet: soak {sample}");
            samples.push(sample);
        }
        let rss: Vec<f64> = samples
            .iter()
            .filter_map(|s| s["control_plane_rss_mib"].as_f64())
            .collect();
        let third = (rss.len() / 3).max(1);
        let first = median(rss[..third.min(rss.len())].to_vec());
        let last = median(rss[rss.len().saturating_sub(third)..].to_vec());
        let cores: Vec<f64> = samples
            .iter()
            .filter_map(|s| s["control_plane_cores"].as_f64())
            .collect();
        // The same over the second half only: after every bounded structure
        // (report histories, caches) had the first half to fill.
        let half = &rss[rss.len() / 2..];
        let half_third = (half.len() / 3).max(1);
        let half_first = median(half[..half_third.min(half.len())].to_vec());
        let half_last = median(half[half.len().saturating_sub(half_third)..].to_vec());
        json!({
            "duration_s": options.soak.as_secs(),
            "rss_growth_second_half_pct": round((half_last - half_first) / half_first.max(0.001) * 100.0),
            "rss_first_third_median_mib": round(first),
            "rss_last_third_median_mib": round(last),
            "rss_growth_pct": round((last - first) / first.max(0.001) * 100.0),
            "rss_max_mib": round(rss.iter().copied().fold(0.0, f64::max)),
            "cores_median": round(median(cores)),
            "min_connected": samples.iter().filter_map(|s| s["connected"].as_u64()).min(),
            "samples": samples,
        })
    };

    let restart = if options.restart {
        // kill -9 and restart: how long until every agent is back.
        cp.kill();
        let restart = Instant::now();
        let sim_cpu0 = cpu_seconds(sim.pid());
        cp.start();
        let ready = restart.elapsed();
        // The reconnect curve, to tell backoff from CPU.
        let mut curve = Vec::new();
        let back = loop {
            let n = connected(&cp);
            curve.push(json!([round(restart.elapsed().as_secs_f64()), n]));
            if n >= agents as u64 {
                break restart.elapsed();
            }
            sim.check_running().map_err(anyhow::Error::msg)?;
            if restart.elapsed() > Duration::from_secs(600) {
                bail!("only {n} of {agents} back after 600 s");
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        json!({
            "restart_to_listening_ms": round(ready.as_secs_f64() * 1000.0),
            "reconnect_all_s": round(back.as_secs_f64()),
            "control_plane_cpu_s": round(cpu_seconds(cp.pid())),
            "control_plane_cpu_ms_per_agent": round(cpu_seconds(cp.pid()) * 1000.0 / agents as f64),
            "simulator_cpu_s": round(cpu_seconds(sim.pid()) - sim_cpu0),
            // Builds before session tickets print 0 for both.
            "tls_full_handshakes": metric(&cp, "hotswap_tls_handshakes_total{kind=\"full\"}"),
            "tls_resumed_handshakes": metric(&cp, "hotswap_tls_handshakes_total{kind=\"resumed\"}"),
            "curve": curve,
        })
    } else {
        Value::Null
    };

    let result = json!({
        "benchmark": "fleet",
        "machine": machine(),
        "agents": agents,
        "report_every": options.report_every,
        "enroll_and_connect_s": round(enroll_and_connect.as_secs_f64()),
        "connect_wait_s": round(up.as_secs_f64()),
        "control_plane_rss_mib": round(cp_kib as f64 / 1024.0),
        "control_plane_idle_rss_mib": round(cp_idle_kib as f64 / 1024.0),
        "control_plane_kib_per_agent": round((cp_kib.saturating_sub(cp_idle_kib)) as f64 / agents as f64),
        "simulator_kib_per_agent": round(sim_kib as f64 / agents as f64),
        "steady": steady,
        "soak": soak,
        "restart": restart,
    });
    println!("{result}");
    drop(sim);
    Ok(())
}
