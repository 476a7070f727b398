//! `fanout`: N simulated agents (`hotswap-agent simulate --fetch`, one mTLS
//! connection each) get a new version of a module by a direct deployment;
//! each fetches the artifact over its own connection, checks its digest and
//! verifies its signature against the control plane's keys, then reports the
//! module running. Measured: from `deploy create` to the deployment being
//! `succeeded` (every node reported the version active and healthy).
//!
//! `--backends sled,etcd` sets up one fleet per backend (sled in the data
//! dir; or a 3-member etcd 3.4 on loopback with artifacts in SeaweedFS, the
//! control plane `init`ed on it and run as a replica that leads) and
//! alternates the runs between them, sled, etcd, sled, etcd, ..., so the
//! ratio is of one sitting. The other fleet stays connected and idle
//! (heartbeats only) while one is measured.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hotswap_common::artifact::keys;
use hotswap_common::artifact::pack::pack_and_sign;
use hotswap_tests::{ControlPlane, EtcdCluster, SeaweedS3, Simulator, TestDir, write_module};
use serde_json::{Value, json};

use crate::{
    StoreChoice, cpu_seconds, machine, median, pseudo_random, round, round4, start_control_plane,
};

const SETTINGS: &str = "heartbeat_interval = \"5s\"\nheartbeat_grace = \"15s\"\nenroll_burst = 1000000\nenroll_per_minute = 1000000\n";

/// One backend's fleet: its control plane, agents and (on etcd) the
/// cluster and blob store under it. Fields drop in order: the agents and
/// the control plane stop before etcd and SeaweedFS.
struct Side {
    kind: StoreChoice,
    sim: Simulator,
    cp: ControlPlane,
    key: ed25519_dalek::SigningKey,
    etcd: Option<EtcdCluster>,
    _s3: Option<SeaweedS3>,
    samples: Vec<f64>,
    runs: Vec<Value>,
    dir: TestDir,
}

impl StoreChoice {
    pub fn name(self) -> &'static str {
        match self {
            StoreChoice::Sled => "sled",
            StoreChoice::Etcd => "etcd",
        }
    }
}

/// etcd's CPU and commit counters, summed over the members.
#[derive(Clone, Copy, Default)]
struct EtcdCounters {
    cpu_s: f64,
    proposals: f64,
    fsyncs: f64,
    fsync_s: f64,
}

fn etcd_counters(cluster: &EtcdCluster) -> EtcdCounters {
    let mut c = EtcdCounters::default();
    for i in 0..cluster.len() {
        if let Some(pid) = cluster.pid(i) {
            c.cpu_s += cpu_seconds(pid);
        }
        let Some(addr) = cluster
            .endpoint(i)
            .strip_prefix("http://")
            .and_then(|a| a.parse().ok())
        else {
            continue;
        };
        let Ok((200, body)) = hotswap_tests::try_http_get(addr, "/metrics") else {
            continue;
        };
        c.proposals = c
            .proposals
            .max(metric(&body, "etcd_server_proposals_committed_total"));
        c.fsyncs += metric(&body, "etcd_disk_wal_fsync_duration_seconds_count");
        c.fsync_s += metric(&body, "etcd_disk_wal_fsync_duration_seconds_sum");
    }
    c
}

/// `hotswap_engine_pass_seconds`: its count and sum (zero on a build
/// without it).
fn engine_passes(cp: &ControlPlane) -> (f64, f64) {
    let Some(admin) = cp.admin else {
        return (0.0, 0.0);
    };
    let (_, body) = hotswap_tests::http_get(admin, "/metrics");
    (
        metric(&body, "hotswap_engine_pass_seconds_count"),
        metric(&body, "hotswap_engine_pass_seconds_sum"),
    )
}

/// The value of an unlabelled Prometheus sample.
fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn start_side(
    kind: StoreChoice,
    agents: usize,
    max_request_bytes: Option<u64>,
) -> anyhow::Result<Side> {
    let dir = TestDir::new();
    let (cp, etcd, s3) = match kind {
        StoreChoice::Sled => (start_control_plane(dir.path(), SETTINGS)?, None, None),
        StoreChoice::Etcd => {
            let cluster = match max_request_bytes {
                Some(bytes) => {
                    EtcdCluster::start_with_flags(3, &["--max-request-bytes", &bytes.to_string()])
                }
                None => EtcdCluster::start(3),
            };
            let s3 = SeaweedS3::start("fanout");
            let mut cp = ControlPlane::init_on_etcd(dir.path(), "cp-a", &cluster.endpoints(), &s3);
            std::fs::write(dir.path().join("cp.toml"), SETTINGS)?;
            cp.start_replica();
            cp.wait_serving();
            let started = Instant::now();
            while !cp.leads() {
                if started.elapsed() > Duration::from_secs(60) {
                    bail!("the control plane on etcd did not lead within 60 s");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (cp, Some(cluster), Some(s3))
        }
    };
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
    let connected_in = started.elapsed();
    let counters = sim.counters().unwrap_or_default();
    // What the control plane refused (the agents retried those).
    let refused = cp.log().matches("enrollment refused").count();
    eprintln!(
        "fanout {}: {agents} agents connected in {connected_in:?}; enrollment attempts failed {} (rate-limited {}), refused by the control plane {refused}",
        kind.name(),
        counters.enroll_failed,
        counters.enroll_rate_limited,
    );
    Ok(Side {
        kind,
        sim,
        cp,
        key,
        etcd,
        _s3: s3,
        samples: Vec::new(),
        runs: Vec::new(),
        dir,
    })
}

pub fn fanout(
    agents: usize,
    size_kib: usize,
    runs: usize,
    backends: &[StoreChoice],
    etcd_max_request_bytes: Option<u64>,
) -> anyhow::Result<()> {
    let mut sides = Vec::new();
    for &kind in backends {
        sides.push(start_side(kind, agents, etcd_max_request_bytes)?);
    }
    std::thread::sleep(Duration::from_secs(5));

    let payload = pseudo_random(size_kib * 1024);
    for run in 0..runs {
        for side in &mut sides {
            let out = deploy_once(side, run, agents, &payload)?;
            side.runs.push(out);
            std::thread::sleep(Duration::from_secs(3));
        }
    }
    let mut results = Vec::new();
    for side in &mut sides {
        let cp_cpu: Vec<f64> = side
            .runs
            .iter()
            .filter_map(|r| r["control_plane_cpu_s"].as_f64())
            .collect();
        let mut result = json!({
            "benchmark": "fanout",
            "backend": side.kind.name(),
            "machine": machine(),
            "agents": agents,
            "size_kib": size_kib,
            "runs": side.runs,
            "median_s": round(median(side.samples.clone())),
            "median_control_plane_cpu_s": round(median(cp_cpu)),
        });
        if side.etcd.is_some() {
            let etcd_cpu: Vec<f64> = side
                .runs
                .iter()
                .filter_map(|r| r["etcd_cpu_s"].as_f64())
                .collect();
            result["median_etcd_cpu_s"] = json!(round(median(etcd_cpu)));
        }
        results.push(result);
    }
    if results.len() == 1 {
        println!("{}", results[0]);
        return Ok(());
    }
    let find = |name: &str| results.iter().find(|r| r["backend"] == name);
    let ratio = |key: &str| match (find("sled"), find("etcd")) {
        (Some(sled), Some(etcd)) => match (sled[key].as_f64(), etcd[key].as_f64()) {
            (Some(a), Some(b)) if a > 0.0 => json!(round4(b / a)),
            _ => Value::Null,
        },
        _ => Value::Null,
    };
    let summary = json!({
        "benchmark": "fanout, backends alternated",
        "backends": backends.iter().map(|b| b.name()).collect::<Vec<_>>(),
        "order": "run 1 on every backend in this order, then run 2, ...",
        "etcd_over_sled": {
            "median_s": ratio("median_s"),
            "median_control_plane_cpu_s": ratio("median_control_plane_cpu_s"),
        },
        "results": results,
    });
    println!("{summary}");
    Ok(())
}

/// Push version `1.0.<run>` and deploy it to every agent of `side`.
fn deploy_once(
    side: &mut Side,
    run: usize,
    agents: usize,
    payload: &[u8],
) -> anyhow::Result<Value> {
    let dir = side.dir.path();
    let cp = &side.cp;
    let version = format!("1.0.{run}");
    let src = dir.join(format!("src-{run}"));
    // A distinct payload per version, so nothing is cached.
    let mut bytes = payload.to_vec();
    bytes[..8].copy_from_slice(&(run as u64).to_be_bytes());
    write_module(&src, "fan", &version, &bytes);
    let file = dir.join(format!("fan-{run}.hsm"));
    pack_and_sign(&src, &side.key, hotswap_common::timefmt::now_ms(), &file)?;
    let pushed = cp.ctl(&["module", "push", file.to_str().context("utf8")?]);
    if pushed.code != 0 {
        bail!("push failed: {}", pushed.stderr);
    }
    let spec = format!("fan@{version}");
    let (cp_cpu0, sim_cpu0) = (cpu_seconds(cp.pid()), cpu_seconds(side.sim.pid()));
    let passes0 = engine_passes(cp);
    let etcd0 = side.etcd.as_ref().map(etcd_counters);
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
    let sim_cpu = cpu_seconds(side.sim.pid()) - sim_cpu0;
    let passes1 = engine_passes(cp);
    let etcd1 = side.etcd.as_ref().map(etcd_counters);
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
            "deployment of {spec} on {} did not succeed ({}): {last}",
            side.kind.name(),
            out.code
        );
    }
    let healthy = state["progress"]["healthy"].as_u64().unwrap_or(0);
    eprintln!(
        "fanout {}: run {} {healthy} nodes active in {elapsed:?}; CPU: control plane {cp_cpu:.2} s, agents {sim_cpu:.2} s",
        side.kind.name(),
        run + 1
    );
    side.samples.push(elapsed.as_secs_f64());
    let per_agent_ms = |cpu: f64| round(cpu * 1000.0 / agents as f64);
    let mut result = json!({
        "s": round(elapsed.as_secs_f64()),
        "healthy": healthy,
        "control_plane_cpu_s": round(cp_cpu),
        "agents_cpu_s": round(sim_cpu),
        "control_plane_cpu_ms_per_agent": per_agent_ms(cp_cpu),
        "agents_cpu_ms_per_agent": per_agent_ms(sim_cpu),
        // The engine's passes over the deployment while it ran, and their
        // time in all (`hotswap_engine_pass_seconds`).
        "engine_passes": passes1.0 - passes0.0,
        "engine_pass_s": round(passes1.1 - passes0.1),
    });
    if let (Some(a), Some(b)) = (etcd0, etcd1) {
        let fsyncs = b.fsyncs - a.fsyncs;
        result["etcd_cpu_s"] = json!(round(b.cpu_s - a.cpu_s));
        result["etcd_proposals_committed"] = json!(b.proposals - a.proposals);
        result["etcd_wal_fsyncs_all_members"] = json!(fsyncs);
        result["etcd_wal_fsync_mean_ms"] = json!(if fsyncs > 0.0 {
            round((b.fsync_s - a.fsync_s) * 1e3 / fsyncs)
        } else {
            0.0
        });
        if let Some(admin) = cp.admin
            && let Ok((200, body)) = hotswap_tests::try_http_get(admin, "/metrics")
        {
            result["hotswap_etcd_round_trip_ms"] = json!(round(
                metric(&body, "hotswap_etcd_round_trip_seconds") * 1e3
            ));
        }
    }
    Ok(result)
}
