//! `wasm`: the wasm runtime (SPEC §10) in this process, on a real socket,
//! with the agent's own [`WasmHost`] and the componentize-py handler of
//! the tests (a whole CPython per instance):
//! - compile (cache miss) and load (cache hit) of the component;
//! - requests per CPU-second of the serving side, the load clients' own
//!   thread CPU taken out, against the `hello-server` example as a process
//!   module under the same load (a native Rust handler: the peer a process
//!   module would be);
//! - per-request instantiation cost;
//! - `swaps` alternations A→B→A… under continuous load: the switch alone,
//!   the whole activation (a rollback: health probe through the runtime and
//!   the switch), and failed requests.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use hotswap_agent::runtime::listeners::ListenerBook;
use hotswap_agent::runtime::wasm::engine::{Budget, Engines};
use hotswap_agent::runtime::wasm::{WasmHost, WasmSpec};
use hotswap_common::manifest::{HealthCheck, HealthSpec};
use hotswap_tests::{TestDir, binary, wasm_fixtures};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::load::{ClientStats, Load};
use crate::{machine, round, summary};

/// Alternations of the wasm and process throughput windows.
const ROUNDS: usize = 3;

fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn spec(component: &Path, version: &str, addr: SocketAddr, dir: &Path) -> WasmSpec {
    WasmSpec {
        version: version.to_string(),
        component: component.to_path_buf(),
        budget: Budget {
            max_memory: 128 << 20,
            max_concurrent_requests: 200,
        },
        request_timeout: Duration::from_secs(10),
        env: vec![("HANDLER_VERSION".to_string(), version.to_string())],
        sockets: vec![("http".to_string(), addr)],
        health: Some((
            HealthCheck::Http(format!("http://{addr}/healthz")),
            HealthSpec {
                check: HealthCheck::Http(format!("http://{addr}/healthz")),
                interval: Duration::from_millis(100),
                timeout: Duration::from_secs(2),
                healthy_threshold: 1,
                unhealthy_threshold: 3,
                start_timeout: Duration::from_secs(60),
            },
        )),
        dir: dir.to_path_buf(),
    }
}

/// CPU seconds (user + system) of this process so far.
fn own_cpu() -> f64 {
    process_cpu("self").unwrap_or(0.0)
}

/// CPU seconds of `/proc/<pid>` (`self` for this process).
fn process_cpu(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// Minor page faults of this process so far.
fn own_minor_faults() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            let after = stat.rsplit_once(')')?.1.to_string();
            after.split_whitespace().nth(7)?.parse().ok()
        })
        .unwrap_or(0.0)
}

/// Requests of a load window, and the clients' own CPU in it.
fn ok_requests(stats: &[(crate::load::ClientKind, ClientStats)]) -> (u64, u64) {
    let ok = stats.iter().map(|(_, s)| s.requests - s.failures).sum();
    let failed = stats.iter().map(|(_, s)| s.failures).sum();
    (ok, failed)
}

/// Thread CPU of the load clients, summed (they run in this process).
fn clients_cpu(stats: &[(crate::load::ClientKind, ClientStats)]) -> f64 {
    stats.iter().map(|(_, s)| s.cpu_seconds).sum()
}

pub fn run(swaps: usize, window: Duration) -> anyhow::Result<Value> {
    let dir = TestDir::new();
    let component = wasm_fixtures::handler_component();
    let size = std::fs::metadata(&component)?.len();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let addr = free_addr()?;
    let module_dir = dir.path().to_path_buf();
    let a = spec(&component, "1.0.0", addr, &module_dir);
    let b = spec(&component, "1.0.1", addr, &module_dir);
    let preempt = CancellationToken::new();

    let mut host = runtime.block_on(async {
        WasmHost::new(
            "bench",
            ListenerBook::default(),
            Engines::new(dir.path().join("cache")),
            dir.path().join("bench.log"),
        )
    });
    let first = runtime
        .block_on(host.activate(a.clone(), &preempt))
        .map_err(|e| anyhow!("{e}"))?;
    let cold = first.prepared.context("first activation prepares")?;
    let second = runtime
        .block_on(host.activate(b.clone(), &preempt))
        .map_err(|e| anyhow!("{e}"))?;
    let warm = second.prepared.context("second activation prepares")?;

    // Throughput without swaps, the serving side's CPU per request: the
    // wasm runtime and hello-server as a process, alternately, `ROUNDS`
    // times (the machine is shared: a ratio within one round means more
    // than either figure alone).
    let hello_addr = free_addr()?;
    let mut hello = Command::new(binary("hello-server"))
        .args(["--listen", &hello_addr.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start hello-server")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(hello_addr).is_err() {
        anyhow::ensure!(Instant::now() < deadline, "hello-server did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid = hello.id().to_string();
    let mut rounds = Vec::new();
    let mut ratios = Vec::new();
    let mut failed = 0;
    for _ in 0..ROUNDS {
        let cpu_before = own_cpu();
        let faults_before = own_minor_faults();
        let load = Load::start(addr, Instant::now());
        std::thread::sleep(window);
        let stats = load.stop();
        let cpu = own_cpu() - cpu_before - clients_cpu(&stats);
        let faults = own_minor_faults() - faults_before;
        let (ok, round_failed) = ok_requests(&stats);
        failed += round_failed;
        let wasm_per_cpu_s = ok as f64 / cpu.max(1e-9);

        let hello_cpu_before = process_cpu(&pid).unwrap_or(0.0);
        let load = Load::start(hello_addr, Instant::now());
        std::thread::sleep(window);
        let hello_stats = load.stop();
        let hello_cpu = process_cpu(&pid).unwrap_or(0.0) - hello_cpu_before;
        let (hello_ok, _) = ok_requests(&hello_stats);
        let hello_per_cpu_s = hello_ok as f64 / hello_cpu.max(1e-9);
        ratios.push(wasm_per_cpu_s / hello_per_cpu_s.max(1e-9));
        rounds.push(json!({
            "wasm": {"requests_per_s": round(ok as f64 / window.as_secs_f64()),
                     "requests_per_cpu_s": round(wasm_per_cpu_s), "serving_cpu_s": round(cpu),
                     "minor_faults_per_request": round(faults / (ok.max(1) as f64))},
            "process_hello_server": {"requests_per_s": round(hello_ok as f64 / window.as_secs_f64()),
                                     "requests_per_cpu_s": round(hello_per_cpu_s),
                                     "serving_cpu_s": round(hello_cpu)},
        }));
    }
    let _ = hello.kill();
    let _ = hello.wait();

    // Instantiation per request.
    let mut instantiate_us = Vec::new();
    for _ in 0..200 {
        let took = runtime
            .block_on(host.instantiate_once())
            .map_err(|e| anyhow!(e))?;
        instantiate_us.push(took.as_secs_f64() * 1e6);
    }

    // Swaps under load: both versions are prepared, so each activation is
    // what a rollback is (health probe through the runtime, then the switch).
    let load = Load::start(addr, Instant::now());
    let mut switch_us = Vec::with_capacity(swaps);
    let mut activation_ms = Vec::with_capacity(swaps);
    for i in 0..swaps {
        let next = if i % 2 == 0 { a.clone() } else { b.clone() };
        let done = runtime
            .block_on(host.activate(next, &preempt))
            .map_err(|e| anyhow!("{e}"))?;
        anyhow::ensure!(done.prepared.is_none(), "swap {i} compiled again");
        switch_us.push(done.switch.as_secs_f64() * 1e6);
        activation_ms.push(done.total.as_secs_f64() * 1e3);
    }
    let swap_stats = load.stop();
    let (swap_ok, swap_failed) = ok_requests(&swap_stats);
    let samples: Vec<Value> = swap_stats
        .iter()
        .flat_map(|(_, s)| s.failure_samples.iter().map(|(_, m)| json!(m)))
        .take(5)
        .collect();
    host.stop();

    Ok(json!({
        "benchmark": "wasm",
        "machine": machine(),
        "component": {"bytes": size, "built_by": "componentize-py 0.25.0 (CPython)"},
        "compile_ms": {"cache_miss": round(cold.compile_time.as_secs_f64() * 1e3),
                       "cache_hit": round(warm.compile_time.as_secs_f64() * 1e3),
                       "second_was_hit": warm.cache_hit},
        "throughput": {
            "window_s": window.as_secs_f64(),
            "rounds": rounds,
            "wasm_failed": failed,
            "wasm_over_process_per_cpu_s": {"per_round": ratios.iter().map(|r| crate::round4(*r)).collect::<Vec<_>>(),
                                            "median": crate::round4(crate::median(ratios.clone()))},
        },
        "instantiate_us": summary(&instantiate_us),
        "swaps": {
            "count": swaps,
            "switch_us": summary(&switch_us),
            "activation_ms": summary(&activation_ms),
            "requests_ok": swap_ok,
            "requests_failed": swap_failed,
            "failure_samples": samples,
        },
    }))
}
