//! `fanout`: N simulated agents (`hotswap-agent simulate --fetch`, one mTLS
//! connection each) get a new version of a module by a direct deployment;
//! each fetches the artifact over its own connection, checks its digest and
//! verifies its signature against the control plane's keys, then reports the
//! module running. Measured: from `deploy create` to the deployment being
//! `succeeded` (every node reported the version active and healthy).

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hotswap_common::artifact::keys;
use hotswap_common::artifact::pack::pack_and_sign;
use hotswap_tests::{Simulator, TestDir, write_module};
use serde_json::json;

use crate::{cpu_seconds, machine, median, pseudo_random, round, start_control_plane};

pub fn fanout(agents: usize, size_kib: usize, runs: usize) -> anyhow::Result<()> {
    let dir = TestDir::new();
    let settings = "heartbeat_interval = \"5s\"\nheartbeat_grace = \"15s\"\nenroll_burst = 1000000\nenroll_per_minute = 1000000\n";
    let cp = start_control_plane(dir.path(), settings)?;
    let key = keys::generate()?;
    let (_, public) = keys::write_key_pair(&dir.path().join("bench"), &key)?;
    let trusted = cp.ctl(&[
        "keys",
        "trust",
        public.to_str().context("utf8")?,
        "--name",
        "bench",
    ]);
    if trusted.code != 0 {
        bail!("keys trust failed: {}", trusted.stderr);
    }
    let sources = format!("127.0.0.2-127.0.0.{}", 2 + (agents / 20_000).max(1) * 4);
    let mut sim = Simulator::start(
        &cp,
        "fan",
        agents,
        &["environment=dev"],
        &["--fetch", "--source-addrs", &sources],
    );
    let started = Instant::now();
    loop {
        let out = cp.ctl(&["-o", "json", "clusters", "get", "dev"]);
        let connected = if out.code == 0 {
            out.json()["connected"].as_u64().unwrap_or(0)
        } else {
            0
        };
        if connected >= agents as u64 {
            break;
        }
        sim.check_running().map_err(anyhow::Error::msg)?;
        if started.elapsed() > Duration::from_secs(3600) {
            bail!("only {connected} of {agents} agents connected");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "fanout: {agents} agents connected in {:?}",
        started.elapsed()
    );
    std::thread::sleep(Duration::from_secs(5));

    let payload = pseudo_random(size_kib * 1024);
    let mut samples = Vec::new();
    let mut runs_out = Vec::new();
    for run in 0..runs {
        let version = format!("1.0.{run}");
        let src = dir.path().join(format!("src-{run}"));
        // A distinct payload per version, so nothing is cached.
        let mut bytes = payload.clone();
        bytes[..8].copy_from_slice(&(run as u64).to_be_bytes());
        write_module(&src, "fan", &version, &bytes);
        let file = dir.path().join(format!("fan-{run}.hsm"));
        pack_and_sign(&src, &key, hotswap_common::timefmt::now_ms(), &file)?;
        let pushed = cp.ctl(&["module", "push", file.to_str().context("utf8")?]);
        if pushed.code != 0 {
            bail!("push failed: {}", pushed.stderr);
        }
        let spec = format!("fan@{version}");
        let (cp_cpu0, sim_cpu0) = (cpu_seconds(cp.pid()), cpu_seconds(sim.pid()));
        let t0 = Instant::now();
        let out = cp.ctl(&[
            "-o",
            "json",
            "deploy",
            "create",
            &spec,
            "--env",
            "dev",
            "--strategy",
            "direct",
            "--min-healthy-time",
            "0s",
            "--wait",
            "--timeout",
            "600s",
        ]);
        let elapsed = t0.elapsed();
        let cp_cpu = cpu_seconds(cp.pid()) - cp_cpu0;
        let sim_cpu = cpu_seconds(sim.pid()) - sim_cpu0;
        let last = out
            .stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or_default()
            .to_string();
        let state: serde_json::Value = serde_json::from_str(&last).unwrap_or_default();
        if out.code != 0 || state["state"] != "succeeded" {
            bail!(
                "deployment of {spec} did not succeed ({}): {last}",
                out.code
            );
        }
        let healthy = state["progress"]["healthy"].as_u64().unwrap_or(0);
        eprintln!(
            "fanout: run {} {healthy} nodes active in {elapsed:?}; CPU: control plane {cp_cpu:.2} s, agents {sim_cpu:.2} s",
            run + 1
        );
        samples.push(elapsed.as_secs_f64());
        let per_agent_ms = |cpu: f64| round(cpu * 1000.0 / agents as f64);
        runs_out.push(json!({
            "s": round(elapsed.as_secs_f64()),
            "healthy": healthy,
            "control_plane_cpu_s": round(cp_cpu),
            "agents_cpu_s": round(sim_cpu),
            "control_plane_cpu_ms_per_agent": per_agent_ms(cp_cpu),
            "agents_cpu_ms_per_agent": per_agent_ms(sim_cpu),
        }));
        std::thread::sleep(Duration::from_secs(3));
    }
    let result = json!({
        "benchmark": "fanout",
        "machine": machine(),
        "agents": agents,
        "size_kib": size_kib,
        "runs": runs_out,
        "median_s": round(median(samples)),
    });
    println!("{result}");
    Ok(())
}
