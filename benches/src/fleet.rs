//! `fleet`: many simulated agents (`hotswap-agent simulate`, one mTLS
//! connection each) on one control plane: time to enroll and connect them
//! all, memory per connected agent on both sides, CPU for heartbeats and
//! status reports, time for all of them to be back after a `kill -9` of the
//! control plane, and the control plane's restart time with their records.

use std::time::{Duration, Instant};

use anyhow::bail;
use hotswap_tests::{ControlPlane, Simulator, TestDir, http_get};
use serde_json::json;

use crate::{machine, round, start_control_plane};

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
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
fn cpu_seconds(pid: u32) -> f64 {
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

/// Connected nodes, from the control plane's metrics (cheap at any size).
fn connected(cp: &ControlPlane) -> u64 {
    let Some(admin) = cp.admin else { return 0 };
    let (_, text) = http_get(admin, "/metrics");
    text.lines()
        .find(|l| l.starts_with("hotswap_nodes{status=\"connected\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn wait_connected(cp: &ControlPlane, want: u64, limit: Duration) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        if connected(cp) >= want {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("only {} of {want} connected after {limit:?}", connected(cp));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn fleet(agents: usize, window: Duration) -> anyhow::Result<()> {
    let dir = TestDir::new();
    // Production-like heartbeats; enrollment limits opened for the burst.
    let settings = "heartbeat_interval = \"5s\"\nheartbeat_grace = \"15s\"\nenroll_burst = 1000000\nenroll_per_minute = 1000000\nstorage_cache_bytes = 67108864\n";
    let mut cp = start_control_plane(dir.path(), settings)?;
    std::thread::sleep(Duration::from_secs(1));
    let cp_idle_kib = rss_kib(cp.pid());

    let sources = format!("127.0.0.2-127.0.0.{}", 2 + (agents / 20_000).max(1) * 4);
    let started = Instant::now();
    let sim = Simulator::start(
        &cp,
        "bench",
        agents,
        &["environment=dev"],
        &[
            "--source-addrs",
            &sources,
            "--enroll-concurrency",
            "64",
            "--stats-every",
            "10s",
        ],
    );
    let up = wait_connected(&cp, agents as u64, Duration::from_secs(1800))?;
    let enroll_and_connect = started.elapsed();
    // Let allocations settle, then measure a steady window.
    std::thread::sleep(Duration::from_secs(10));
    let (cp_pid, sim_pid) = (cp.pid(), sim.pid());
    let cp_kib = rss_kib(cp_pid);
    let sim_kib = rss_kib(sim_pid);
    let cpu0 = cpu_seconds(cp_pid);
    let t0 = Instant::now();
    std::thread::sleep(window);
    let cp_cpu = (cpu_seconds(cp_pid) - cpu0) / t0.elapsed().as_secs_f64();
    // Every agent sends a heartbeat and a status report per 5 s interval.
    let messages_per_s = agents as f64 * 2.0 / 5.0;

    // kill -9 and restart: how long until every agent is back.
    cp.kill();
    let restart = Instant::now();
    cp.start();
    let ready = restart.elapsed();
    let back = wait_connected(&cp, agents as u64, Duration::from_secs(600))?;
    let back_total = restart.elapsed();

    let result = json!({
        "benchmark": "fleet",
        "machine": machine(),
        "agents": agents,
        "enroll_and_connect_s": round(enroll_and_connect.as_secs_f64()),
        "connect_wait_s": round(up.as_secs_f64()),
        "control_plane_rss_mib": round(cp_kib as f64 / 1024.0),
        "control_plane_idle_rss_mib": round(cp_idle_kib as f64 / 1024.0),
        "control_plane_kib_per_agent": round((cp_kib.saturating_sub(cp_idle_kib)) as f64 / agents as f64),
        "simulator_kib_per_agent": round(sim_kib as f64 / agents as f64),
        "steady_window_s": window.as_secs(),
        "control_plane_cpu_cores_steady": round(cp_cpu),
        "session_messages_per_s": round(messages_per_s),
        "messages_per_s_per_core": round(if cp_cpu > 0.0 { messages_per_s / cp_cpu } else { 0.0 }),
        "restart_to_listening_ms": round(ready.as_secs_f64() * 1000.0),
        "reconnect_all_s": round(back_total.as_secs_f64()),
        "reconnect_after_listening_s": round(back.as_secs_f64()),
    });
    println!("{result}");
    drop(sim);
    Ok(())
}
