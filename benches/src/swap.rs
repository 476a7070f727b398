//! `swap`: hot swaps on one real agent. Two versions of a module are pushed
//! and the node's desired version alternates A→B→A… through
//! `hotswapctl nodes set-module`; each swap is timed from the command
//! returning to the node reporting the new version running with its
//! observed generation caught up (polled with `hotswapctl nodes get` every
//! 10 ms, so the figure includes up to one poll round of lag). A
//! `hotswapctl nodes watch` stream running alongside gives a second figure
//! without the polling cadence, from issuing `set-module` to the update
//! arriving.
//!
//! For the process runtime (the `hello-server` example, socket-activated,
//! `swap = "start-first"`) two client threads put continuous HTTP load on
//! the module's port the whole time (see `load.rs`); the goal is zero
//! failed requests. The bundle runtime (the `bundle-config` example, a
//! shell activate hook) is timed without load.

use std::io::{BufRead as _, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hotswap_common::artifact::keys;
use hotswap_common::artifact::pack::pack_and_sign;
use hotswap_tests::{Agent, ControlPlane, TestDir, binary};
use serde_json::{Value, json};

use crate::load::{Load, max_gap_us};
use crate::{RuntimeChoice, machine, median, ms, round, start_control_plane, summary};

const NODE: &str = "bench-node";
const PROCESS_MODULE: &str = "hello";
const BUNDLE_MODULE: &str = "greeting-config";
const VERSIONS: [&str; 2] = ["1.0.0", "1.0.1"];
/// A swap not observed within this long aborts the benchmark.
const SWAP_DEADLINE: Duration = Duration::from_secs(60);
/// Pause between two `nodes get` polls.
const POLL_PAUSE: Duration = Duration::from_millis(10);
/// Load without swaps before the first swap, for the baseline gap.
const QUIET: Duration = Duration::from_secs(5);
/// `nodes get` calls timed before any load, for the CLI overhead.
const IDLE_CLI_CALLS: usize = 30;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            // std::fs::copy keeps the permission bits (hooks stay executable).
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The hello process module at `version`, listening on `port`, with a
/// fast health gate so swaps are not dominated by probe intervals. The
/// manifest requires `timeout <= interval`, hence 50 ms for both.
fn hello_manifest(version: &str, port: u16) -> String {
    format!(
        r#"name = "{PROCESS_MODULE}"
version = "{version}"
runtime = "process"
description = "hello-server, benchmark build"

[process]
command = ["bin/hello-server"]
swap = "start-first"
stop_signal = "SIGTERM"
stop_timeout = "10s"
[[process.sockets]]
name = "http"
listen = "127.0.0.1:{port}"

[health]
http = "http://127.0.0.1:{port}/healthz"
interval = "50ms"
timeout = "50ms"
healthy_threshold = 1
unhealthy_threshold = 3
start_timeout = "20s"

[metrics]
prometheus = "http://127.0.0.1:{port}/metrics"
"#
    )
}

/// Run `hotswapctl`, failing on a non-zero exit; with `-o json` first, the
/// parsed output (otherwise null).
fn ctl_ok(cp: &ControlPlane, args: &[&str]) -> anyhow::Result<Value> {
    let out = cp.ctl(args);
    if out.code != 0 {
        bail!(
            "hotswapctl {} failed ({}): {}",
            args.join(" "),
            out.code,
            out.stderr.trim()
        );
    }
    if args.first() != Some(&"-o") {
        return Ok(Value::Null);
    }
    serde_json::from_str(&out.stdout)
        .with_context(|| format!("hotswapctl {} printed no JSON", args.join(" ")))
}

/// Push a packed artifact.
fn push(cp: &ControlPlane, artifact: &Path) -> anyhow::Result<()> {
    let file = artifact.to_str().context("utf8 path")?;
    ctl_ok(cp, &["module", "push", file])?;
    Ok(())
}

fn module_state<'a>(node: &'a Value, module: &str) -> Option<&'a Value> {
    node["modules"]
        .as_array()?
        .iter()
        .find(|m| m["name"] == module)
}

/// Whether `node` (a `nodes get` answer) shows `module` at `version`,
/// running, with the observed generation caught up with `generation`.
fn converged(node: &Value, module: &str, version: &str, generation: u64) -> bool {
    node["observed_generation"].as_u64().unwrap_or(0) >= generation
        && module_state(node, module)
            .is_some_and(|m| m["version"] == version && m["phase"] == "running")
}

#[derive(Default)]
struct Timings {
    /// Per swap: (issued, set-module returned, seen done by polling), as Instants.
    swaps: Vec<(Instant, Instant, Instant)>,
    /// Per swap: when the `nodes watch` stream showed it done, if it did.
    watched: Vec<Option<Instant>>,
    /// Per swap: the desired generation `set-module` created.
    generations: Vec<u64>,
    set_module_ms: Vec<f64>,
    poll_ms: Vec<f64>,
    polls: Vec<f64>,
}

/// A `hotswapctl -o json nodes watch` process: every change of the node,
/// stamped when its line arrived. Gives swap completion times without the
/// polling cadence (and without a process spawn per observation).
struct Watcher {
    child: Child,
    updates: Receiver<(Instant, Value)>,
}

impl Watcher {
    fn start(cp: &ControlPlane) -> anyhow::Result<Watcher> {
        let mut child = Command::new(binary("hotswapctl"))
            .arg("--profile")
            .arg(cp.admin_profile())
            .args(["--endpoint", &cp.url(), "-o", "json", "nodes", "watch"])
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn hotswapctl nodes watch")?;
        let stdout = child.stdout.take().context("watch stdout")?;
        let (tx, updates) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let at = Instant::now();
                let Ok(update) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if update["node"]["name"] == NODE && tx.send((at, update["node"].clone())).is_err()
                {
                    return;
                }
            }
        });
        Ok(Watcher { child, updates })
    }

    /// Arrival time of the first update showing `module@version` done at
    /// `generation`; older updates are skipped.
    fn done(&self, module: &str, version: &str, generation: u64) -> Option<Instant> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let (at, node) = self.updates.recv_timeout(left).ok()?;
            if converged(&node, module, version, generation) {
                return Some(at);
            }
        }
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Set `module@version` and poll until the node runs it; record when the
/// swap was issued, when `set-module` returned, when polling saw it done
/// and when the watch stream did.
fn swap_once(
    cp: &ControlPlane,
    watcher: &Watcher,
    module: &str,
    version: &str,
    timings: &mut Timings,
) -> anyhow::Result<()> {
    let target = format!("{module}@{version}");
    let issued = Instant::now();
    let set = ctl_ok(cp, &["-o", "json", "nodes", "set-module", NODE, &target])?;
    let returned = Instant::now();
    let generation = set["desired_generation"]
        .as_u64()
        .context("set-module answered without desired_generation")?;
    let mut polls = 0;
    loop {
        let started = Instant::now();
        let node = ctl_ok(cp, &["-o", "json", "nodes", "get", NODE])?;
        let seen = Instant::now();
        polls += 1;
        timings.poll_ms.push(ms(seen - started));
        if converged(&node, module, version, generation) {
            timings.swaps.push((issued, returned, seen));
            timings.generations.push(generation);
            timings
                .watched
                .push(watcher.done(module, version, generation));
            timings.set_module_ms.push(ms(returned - issued));
            timings.polls.push(polls as f64);
            return Ok(());
        }
        if returned.elapsed() > SWAP_DEADLINE {
            bail!(
                "{target} (generation {generation}) not running after {SWAP_DEADLINE:?}; node: {}",
                serde_json::to_string(&node).unwrap_or_default()
            );
        }
        std::thread::sleep(POLL_PAUSE);
    }
}

fn swap_loop(
    cp: &ControlPlane,
    watcher: &Watcher,
    module: &str,
    swaps: usize,
    timings: &mut Timings,
) -> anyhow::Result<()> {
    // The module runs VERSIONS[0]; swap i goes to VERSIONS[(i + 1) % 2].
    for i in 0..swaps {
        swap_once(cp, watcher, module, VERSIONS[(i + 1) % 2], timings)?;
        if (i + 1) % 100 == 0 {
            eprintln!("hotswap-bench: {module}: {} swaps done", i + 1);
        }
    }
    Ok(())
}

fn swap_ms(timings: &Timings) -> Vec<f64> {
    timings
        .swaps
        .iter()
        .map(|(_, returned, done)| ms(*done - *returned))
        .collect()
}

fn common_fields(
    runtime: &str,
    swaps: usize,
    timings: &Timings,
    idle_cli: &[f64],
    cold: &Cold,
    agent_log: &str,
) -> Value {
    let watched: Vec<f64> = timings
        .swaps
        .iter()
        .zip(&timings.watched)
        .filter_map(|((issued, _, _), done)| done.map(|d| ms(d - *issued)))
        .collect();
    // Negative when the update arrived before the CLI process had exited.
    let watched_from_return: Vec<f64> = timings
        .swaps
        .iter()
        .zip(&timings.watched)
        .filter_map(|((_, returned, _), done)| {
            done.map(|d| match d.checked_duration_since(*returned) {
                Some(after) => ms(after),
                None => -ms(*returned - d),
            })
        })
        .collect();
    json!({
        "benchmark": "swap",
        "runtime": runtime,
        "machine": machine(),
        "swaps": swaps,
        "swap_ms": summary(&swap_ms(timings)),
        "swap_ms_watch_from_issue": summary(&watched),
        "swap_ms_watch_from_return": summary(&watched_from_return),
        "swaps_missing_from_watch": timings.watched.iter().filter(|w| w.is_none()).count(),
        "cold_first_activation_ms": {
            "version_a_fetch_install_start": round(cold.first_a_ms),
            "version_b_fetch_install_swap": round(cold.first_b_ms),
        },
        "swap_including_set_module_cli_ms": summary(
            &timings.swaps.iter().map(|(issued, _, done)| ms(*done - *issued)).collect::<Vec<_>>()
        ),
        "polls_per_swap_p50": median(timings.polls.clone()),
        "agent_log_phases_ms": agent_phases(agent_log, &timings.generations),
        "cli_overhead_ms": {
            "nodes_get_p50_idle": round(median(idle_cli.to_vec())),
            "nodes_get_p50_during_swaps": round(median(timings.poll_ms.clone())),
            "set_module_p50_during_swaps": round(median(timings.set_module_ms.clone())),
        },
    })
}

fn process_bench(
    cp: &ControlPlane,
    watcher: &Watcher,
    port: u16,
    swaps: usize,
    idle_cli: &[f64],
    cold: &Cold,
) -> anyhow::Result<Value> {
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let base = Instant::now();
    let load = Load::start(addr, base);
    let quiet_from = base.elapsed();
    std::thread::sleep(QUIET);
    let quiet_to = base.elapsed();

    let mut timings = Timings::default();
    let swapped = swap_loop(cp, watcher, PROCESS_MODULE, swaps, &mut timings);
    let load_time = base.elapsed();
    let clients = load.stop();
    swapped?;

    let mut ok_at: Vec<u64> = Vec::new();
    let mut latency: Vec<f64> = Vec::new();
    let mut per_client = serde_json::Map::new();
    let (mut requests, mut failures, mut retried) = (0u64, 0u64, 0u64);
    let mut by_version = std::collections::BTreeMap::<String, u64>::new();
    let mut failure_samples = Vec::new();
    for (kind, stats) in &clients {
        requests += stats.requests;
        failures += stats.failures;
        retried += stats.retried_idle_close;
        ok_at.extend_from_slice(&stats.ok_at_us);
        latency.extend(stats.latency_us.iter().map(|&us| us as f64 / 1000.0));
        for (version, n) in &stats.by_version {
            *by_version.entry(version.clone()).or_default() += n;
        }
        for (at_us, message) in &stats.failure_samples {
            failure_samples.push(json!({
                "client": kind.name(),
                "at_s": round(*at_us as f64 / 1e6),
                "error": message,
            }));
        }
        let mut client_latency: Vec<f64> = stats
            .latency_us
            .iter()
            .map(|&us| us as f64 / 1000.0)
            .collect();
        client_latency.sort_by(|a, b| a.total_cmp(b));
        per_client.insert(
            kind.name().to_string(),
            json!({
                "requests": stats.requests,
                "failures": stats.failures,
                "retried_idle_close": stats.retried_idle_close,
                "connections": stats.connections,
                "requests_per_s": round(stats.requests as f64 / load_time.as_secs_f64()),
                "latency_ms": summary(&client_latency),
            }),
        );
    }
    ok_at.sort_unstable();

    // Per swap: the longest stretch without a successful response, from
    // issuing set-module to seeing the swap done.
    let us = |i: Instant| (i - base).as_micros() as u64;
    let gaps: Vec<f64> = timings
        .swaps
        .iter()
        .map(|(issued, _, done)| max_gap_us(&ok_at, us(*issued), us(*done)) as f64 / 1000.0)
        .collect();
    // Baseline: the same measure over windows of the median swap length
    // during the quiet period before the first swap.
    let window = median(
        timings
            .swaps
            .iter()
            .map(|(issued, _, done)| (*done - *issued).as_micros() as f64)
            .collect(),
    ) as u64;
    let (q_from, q_to) = (quiet_from.as_micros() as u64, quiet_to.as_micros() as u64);
    let mut quiet_gaps = Vec::new();
    let mut at = q_from + 500_000; // let the clients warm up
    while window > 0 && at + window <= q_to {
        quiet_gaps.push(max_gap_us(&ok_at, at, at + window) as f64 / 1000.0);
        at += window;
    }

    let log = read_agent_log(cp);
    let mut result = common_fields("process", swaps, &timings, idle_cli, cold, &log);
    // How the replaced versions ended (warm-up swaps included): anything
    // but "exit code 0" means the graceful drain did not happen.
    let mut endings = std::collections::BTreeMap::<String, u64>::new();
    for line in log.lines() {
        if line.contains("runtime::process: old version stopped ")
            && let Some(ended) = line.split(" ended=").nth(1)
        {
            *endings.entry(ended.trim().to_string()).or_default() += 1;
        }
    }
    let extra = json!({
        "load": {
            "clients": clients.len(),
            "seconds": round(load_time.as_secs_f64()),
            "requests": requests,
            "failures": failures,
            "retried_idle_close": retried,
            "requests_per_s": round(requests as f64 / load_time.as_secs_f64()),
            "latency_ms": summary(&latency),
            "per_client": per_client,
            "responses_by_version": by_version,
            "failure_samples": failure_samples,
        },
        "old_version_endings": endings,
        "gap_ms": summary(&gaps),
        "quiet_gap_ms": {
            "window_ms": round(window as f64 / 1000.0),
            "windows": quiet_gaps.len(),
            "p50_p90_p99_max": summary(&quiet_gaps),
        },
    });
    merge(&mut result, extra);
    Ok(result)
}

fn bundle_bench(
    cp: &ControlPlane,
    watcher: &Watcher,
    swaps: usize,
    idle_cli: &[f64],
    cold: &Cold,
) -> anyhow::Result<Value> {
    let mut timings = Timings::default();
    swap_loop(cp, watcher, BUNDLE_MODULE, swaps, &mut timings)?;
    let log = read_agent_log(cp);
    Ok(common_fields(
        "bundle", swaps, &timings, idle_cli, cold, &log,
    ))
}

/// The untimed warm-up: A, B and A again, so both versions are fetched
/// and unpacked before the timed swaps. The first two are reported apart.
struct Cold {
    first_a_ms: f64,
    first_b_ms: f64,
}

fn warm_up(cp: &ControlPlane, watcher: &Watcher, module: &str) -> anyhow::Result<Cold> {
    let mut timings = Timings::default();
    for version in [VERSIONS[0], VERSIONS[1], VERSIONS[0]] {
        swap_once(cp, watcher, module, version, &mut timings)?;
    }
    let polled = swap_ms(&timings);
    Ok(Cold {
        first_a_ms: polled[0],
        first_b_ms: polled[1],
    })
}

/// The agent's log (the harness writes it next to the control plane's
/// data dir as `agent-NAME-1.log`).
fn read_agent_log(cp: &ControlPlane) -> String {
    let work = cp
        .data_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    std::fs::read_to_string(work.join(format!("agent-{NODE}-1.log"))).unwrap_or_default()
}

/// Seconds since midnight UTC of a log line's RFC 3339 timestamp
/// (`2026-01-02T03:04:05.678901Z ...`).
fn log_seconds(line: &str) -> Option<f64> {
    let time = line.get(11..)?.split(['Z', ' ']).next()?;
    let mut parts = time.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// When the agent logged each step of applying one desired generation.
#[derive(Default, Clone, Copy)]
struct Steps {
    received: Option<f64>,
    activating: Option<f64>,
    started: Option<f64>,
    old_stopped: Option<f64>,
    active: Option<f64>,
}

/// The agent's own view of each swap, from its log: desired state
/// received → `activating` (install check, pre-check) → new process
/// `started` → `old version stopped` (health gate plus the old version's
/// drain) → `active` (state persisted). p50 and p99 over the given
/// generations, in ms.
fn agent_phases(log: &str, generations: &[u64]) -> Value {
    let mut steps = std::collections::BTreeMap::<u64, Steps>::new();
    let mut current = None;
    let mut day_offset = 0.0;
    let mut last = 0.0;
    for line in log.lines() {
        let Some(mut t) = log_seconds(line) else {
            continue;
        };
        if t + day_offset < last - 43_200.0 {
            day_offset += 86_400.0; // crossed midnight
        }
        t += day_offset;
        last = t;
        if let Some(rest) = line.split("desired state received generation=").nth(1) {
            current = rest.split_whitespace().next().and_then(|g| g.parse().ok());
            if let Some(g) = current {
                steps.entry(g).or_default().received = Some(t);
            }
            continue;
        }
        let Some(entry) = current.and_then(|g| steps.get_mut(&g)) else {
            continue;
        };
        if line.contains("hotswap_agent::reconciler: activating ") {
            entry.activating.get_or_insert(t);
        } else if line.contains("runtime::process: started ") {
            entry.started.get_or_insert(t);
        } else if line.contains("runtime::process: old version stopped ") {
            entry.old_stopped.get_or_insert(t);
        } else if line.contains("hotswap_agent::reconciler: active ") {
            entry.active.get_or_insert(t);
        }
    }
    let phase = |from: fn(&Steps) -> Option<f64>, to: fn(&Steps) -> Option<f64>| {
        let mut samples: Vec<f64> = generations
            .iter()
            .filter_map(|g| steps.get(g))
            .filter_map(|s| Some((to(s)? - from(s)?) * 1000.0))
            .collect();
        samples.sort_by(|a, b| a.total_cmp(b));
        json!({
            "samples": samples.len(),
            "p50": round(crate::percentile(&samples, 0.5)),
            "p99": round(crate::percentile(&samples, 0.99)),
        })
    };
    let mut out = json!({
        "received_to_active": phase(|s| s.received, |s| s.active),
        "received_to_activating": phase(|s| s.received, |s| s.activating),
        "activating_to_active": phase(|s| s.activating, |s| s.active),
    });
    let process = generations
        .iter()
        .any(|g| steps.get(g).is_some_and(|s| s.started.is_some()));
    if process {
        merge(
            &mut out,
            json!({
                "activating_to_started": phase(|s| s.activating, |s| s.started),
                "started_to_old_stopped": phase(|s| s.started, |s| s.old_stopped),
                "old_stopped_to_active": phase(|s| s.old_stopped, |s| s.active),
            }),
        );
    }
    out
}

fn merge(into: &mut Value, from: Value) {
    if let (Value::Object(into), Value::Object(from)) = (into, from) {
        into.extend(from);
    }
}

/// Remove the benchmark's modules from the node (process modules outlive
/// the agent by design, so they must be stopped through it).
fn cleanup(cp: &ControlPlane, modules: &[&str]) {
    for module in modules {
        if let Err(e) = ctl_ok(cp, &["nodes", "unset-module", NODE, module]) {
            eprintln!("hotswap-bench: cleanup: {e:#}");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        match ctl_ok(cp, &["-o", "json", "nodes", "get", NODE]) {
            Ok(node)
                if node["modules"].as_array().is_some_and(|m| m.is_empty())
                    && node["observed_generation"] == node["desired_generation"] =>
            {
                return;
            }
            Ok(_) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => {
                eprintln!("hotswap-bench: cleanup: {e:#}");
                return;
            }
        }
    }
    eprintln!("hotswap-bench: cleanup: modules still present after 30s");
}

pub fn swap(swaps: usize, runtime: RuntimeChoice) -> anyhow::Result<()> {
    let with_process = matches!(runtime, RuntimeChoice::Process | RuntimeChoice::Both);
    let with_bundle = matches!(runtime, RuntimeChoice::Bundle | RuntimeChoice::Both);
    let dir = TestDir::new();
    let work = dir.path();
    let mut cp = start_control_plane(
        work,
        "heartbeat_interval = \"1s\"\nheartbeat_grace = \"5s\"\n",
    )?;
    let key = keys::generate()?;
    let (_, public) = keys::write_key_pair(&work.join("bench"), &key)?;
    ctl_ok(
        &cp,
        &[
            "keys",
            "trust",
            public.to_str().context("utf8 path")?,
            "--name",
            "bench",
        ],
    )?;

    // Two versions of each module.
    let port = free_port()?;
    let mut modules = Vec::new();
    for version in VERSIONS {
        if with_process {
            let src = work.join(format!("hello-{version}"));
            copy_dir(&examples_dir().join("hello-process"), &src)?;
            std::fs::create_dir_all(src.join("bin"))?;
            std::fs::copy(binary("hello-server"), src.join("bin/hello-server"))?;
            std::fs::write(src.join("module.toml"), hello_manifest(version, port))?;
            let artifact = work.join(format!("hello-{version}.hsm"));
            pack_and_sign(&src, &key, hotswap_common::timefmt::now_ms(), &artifact)?;
            push(&cp, &artifact)?;
        }
        if with_bundle {
            let src = work.join(format!("bundle-{version}"));
            copy_dir(&examples_dir().join("bundle-config"), &src)?;
            let manifest = std::fs::read_to_string(src.join("module.toml"))?;
            let manifest = manifest.replacen(
                "version = \"1.0.0\"",
                &format!("version = \"{version}\""),
                1,
            );
            std::fs::write(src.join("module.toml"), manifest)?;
            let artifact = work.join(format!("bundle-{version}.hsm"));
            pack_and_sign(&src, &key, hotswap_common::timefmt::now_ms(), &artifact)?;
            push(&cp, &artifact)?;
        }
    }
    if with_process {
        modules.push(PROCESS_MODULE);
    }
    if with_bundle {
        modules.push(BUNDLE_MODULE);
    }

    // One real agent.
    let (token, fingerprint) = cp.token(&[]);
    let mut agent = Agent::new(work, NODE);
    agent.enroll(&cp.url(), &token, &fingerprint, &[]);
    cp.wait_status(NODE, "connected");

    let outcome = (|| -> anyhow::Result<Vec<Value>> {
        let watcher = Watcher::start(&cp)?;
        let mut cold = Vec::new();
        for module in &modules {
            cold.push(warm_up(&cp, &watcher, module)?);
        }
        // CLI overhead with nothing else running.
        let mut idle_cli = Vec::new();
        for _ in 0..IDLE_CLI_CALLS {
            let started = Instant::now();
            ctl_ok(&cp, &["-o", "json", "nodes", "get", NODE])?;
            idle_cli.push(ms(started.elapsed()));
        }
        let mut results = Vec::new();
        let mut cold = cold.iter();
        if with_process {
            let cold = cold.next().context("warm-up")?;
            results.push(process_bench(&cp, &watcher, port, swaps, &idle_cli, cold)?);
        }
        if with_bundle {
            let cold = cold.next().context("warm-up")?;
            results.push(bundle_bench(&cp, &watcher, swaps, &idle_cli, cold)?);
        }
        Ok(results)
    })();
    cleanup(&cp, &modules);
    let agent_log = read_agent_log(&cp);
    let status = agent.stop();
    if !status.success() {
        eprintln!("hotswap-bench: agent exited with {status}");
    }
    cp.stop();
    let results = match outcome {
        Ok(results) => results,
        Err(e) => {
            eprintln!(
                "hotswap-bench: last agent log lines:\n{}",
                tail(&agent_log, 40)
            );
            return Err(e);
        }
    };
    for result in results {
        println!("{}", serde_json::to_string_pretty(&result)?);
    }
    Ok(())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
