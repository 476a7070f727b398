//! `failover` and `capacity`: control-plane replicas of one cluster on a
//! real 3-member etcd with artifacts in SeaweedFS, and simulated agents
//! (`hotswap-agent simulate`, one mTLS session each) that know every
//! replica: agent `i` starts on replica `i mod n` and fails over to the
//! next one when its session breaks.
//!
//! `failover` builds a fresh cluster per run (so every run starts with the
//! agents spread evenly) and measures, in this order:
//!
//! - (b) `kill -9` of a follower holding a third of the agents → every
//!   agent in a session again: the sum of the survivors' own sessions
//!   (`hotswap_nodes{status="connected"}` counts the sessions a replica
//!   holds) is back to N. The dead replica's sessions count only once an
//!   agent opened a new one elsewhere.
//! - (a) `kill -9` of the leader while a rolling deployment is in flight →
//!   the next deployment decision on the wire: a new deployment of another
//!   module is created through a survivor (retried while no replica leads),
//!   and the time is taken when the first simulated agent of its target
//!   has installed it, i.e. when the new leader's first desired-state push
//!   for it reached an agent over its session (the simulator's progress
//!   line, every 100 ms). Also: when a survivor reported itself leader, the
//!   deployment accepted, the in-flight rollout's first wave after the
//!   take-over on the wire (the new leader resumed it), and (b) again for
//!   the agents of the dead leader.
//! - (c) SIGTERM of the leader → another replica leads (`hotswap_leader 1`,
//!   polled every few ms); the old leader's election key is gone then, and
//!   its election lease once it has exited (a revoke of it answers "lease
//!   not found"; an expiry would take the 5 s lease).
//!
//! `capacity` connects N agents through several simulator processes (each
//! under the 20k open-files limit) to R replicas, then measures memory and
//! CPU per agent on each replica and simulator over a steady window.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hotswap_common::artifact::keys;
use hotswap_common::artifact::pack::pack_and_sign;
use hotswap_tests::{
    ControlPlane, EtcdCluster, SeaweedS3, SimCounters, Simulator, TestDir, try_http_get,
    write_module,
};
use serde_json::{Value, json};

use crate::{cpu_seconds, machine, ms, round, rss_kib};

/// Production heartbeats and lease; operator and enrollment limits out of
/// the way of a benchmark that enrolls thousands of agents at once.
const SETTINGS: &str = "heartbeat_interval = \"5s\"\nheartbeat_grace = \"15s\"\nshutdown_timeout = \"5s\"\nleader_lease = \"5s\"\noperator_writes_per_minute = 100000\noperator_writes_burst = 100000\ndeployments_per_minute = 100000\ndeployments_burst = 100000\nenroll_burst = 1000000\nenroll_per_minute = 1000000\n";

/// Each simulator process stays under this many agents (open files: 20k).
const MAX_PER_SIMULATOR: usize = 17_000;

struct Cluster {
    etcd: EtcdCluster,
    _s3: SeaweedS3,
    replicas: Vec<ControlPlane>,
}

/// etcd (3 members), SeaweedFS, `n` replicas (cp-0 leads: it starts first),
/// a trusted publisher key and `modules` pushed at version 1.0.0.
fn start_cluster(dir: &std::path::Path, n: usize, modules: &[&str]) -> anyhow::Result<Cluster> {
    let etcd = EtcdCluster::start(3);
    let s3 = SeaweedS3::start("hotswap-bench-ha");
    let mut first = ControlPlane::init_on_etcd(dir, "cp-0", &etcd.endpoints(), &s3);
    std::fs::write(dir.join("cp.toml"), SETTINGS)?;
    let mut replicas: Vec<ControlPlane> =
        (1..n).map(|i| first.replica(&format!("cp-{i}"))).collect();
    first.start_replica();
    first.wait_serving();
    wait_for("cp-0 to lead", Duration::from_secs(60), || first.leads())?;
    for replica in &mut replicas {
        replica.start_replica();
    }
    for replica in &mut replicas {
        replica.wait_serving();
    }
    replicas.insert(0, first);
    let key = keys::generate()?;
    let (_, public) = keys::write_key_pair(&dir.join("publisher"), &key)?;
    let trusted = replicas[0].ctl(&[
        "keys",
        "trust",
        public.to_str().context("utf8")?,
        "--name",
        "publisher",
    ]);
    if trusted.code != 0 {
        bail!("keys trust failed: {}", trusted.stderr);
    }
    for name in modules {
        let src = dir.join(format!("src-{name}"));
        write_module(&src, name, "1.0.0", name.as_bytes());
        let file = dir.join(format!("{name}.hsm"));
        pack_and_sign(&src, &key, hotswap_common::timefmt::now_ms(), &file)?;
        let pushed = replicas[0].ctl(&["module", "push", file.to_str().context("utf8")?]);
        if pushed.code != 0 {
            bail!("push of {name}@1.0.0 failed: {}", pushed.stderr);
        }
    }
    Ok(Cluster {
        etcd,
        _s3: s3,
        replicas,
    })
}

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > limit {
            bail!("{what}: not after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// A metric of a replica's /metrics; `None` while it cannot be asked.
fn metric(cp: &ControlPlane, name: &str) -> Option<f64> {
    let (code, text) = try_http_get(cp.admin?, "/metrics").ok()?;
    if code != 200 {
        return None;
    }
    text.lines()
        .find(|l| l.rsplit_once(' ').map(|(n, _)| n) == Some(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Agent sessions a replica holds now (0 when it cannot be asked).
fn held(cp: &ControlPlane) -> u64 {
    metric(cp, "hotswap_nodes{status=\"connected\"}").unwrap_or(0.0) as u64
}

fn held_by(replicas: &[ControlPlane], alive: &[usize]) -> u64 {
    alive.iter().map(|&i| held(&replicas[i])).sum()
}

fn leader_of(replicas: &[ControlPlane], alive: &[usize]) -> Option<usize> {
    alive.iter().copied().find(|&i| replicas[i].leads())
}

/// `--control-plane URL` for every replica after `first`, in turn (the
/// harness passes `first` itself), and the simulator's other flags.
fn simulator_args(
    replicas: &[ControlPlane],
    first: usize,
    sources: &str,
    stats_every: &str,
) -> Vec<String> {
    let mut args = Vec::new();
    for k in 1..replicas.len() {
        args.push("--control-plane".to_string());
        args.push(replicas[(first + k) % replicas.len()].url());
    }
    args.extend(
        [
            "--source-addrs",
            sources,
            "--stats-every",
            stats_every,
            "--enroll-concurrency",
            "32",
        ]
        .map(String::from),
    );
    args
}

/// A simulator whose agents enroll through replica `first` (with a token
/// of their own) and open sessions on every replica, agent `i` on the
/// `i mod n`-th counting from `first`.
fn start_simulator(
    replicas: &[ControlPlane],
    first: usize,
    name: &str,
    count: usize,
    label: &str,
    sources: &str,
    stats_every: &str,
) -> Simulator {
    let args = simulator_args(replicas, first, sources, stats_every);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Simulator::start(&replicas[first], name, count, &[label], &args)
}

fn counters(sim: &Simulator) -> SimCounters {
    sim.counters().unwrap_or_default()
}

fn check(sims: &mut [&mut Simulator]) -> anyhow::Result<()> {
    for sim in sims {
        sim.check_running().map_err(anyhow::Error::msg)?;
    }
    Ok(())
}

/// The candidates' keys under the election prefix: (key, create revision,
/// lease), lowest create revision (the leader) first.
fn election_keys(endpoints: &str) -> anyhow::Result<Vec<(Vec<u8>, i64, i64)>> {
    hotswap_tests::runtime().block_on(async {
        let config = hotswap_etcd::ClientConfig::from_list(endpoints)?;
        let client = hotswap_etcd::Client::connect(config).await?;
        let (_, kvs) = client.range(b"/hotswap/election/").await?;
        let mut keys: Vec<(Vec<u8>, i64, i64)> = kvs
            .into_iter()
            .map(|kv| (kv.key, kv.create_revision, kv.lease.map_or(0, |l| l.0)))
            .collect();
        keys.sort_by_key(|k| k.1);
        Ok(keys)
    })
}

/// Whether etcd no longer has `lease` (revoking it answers "not found").
/// A lease that still existed is revoked by this check, so it is made only
/// once the measurement is over.
fn lease_gone(endpoints: &str, lease: i64) -> anyhow::Result<bool> {
    hotswap_tests::runtime().block_on(async {
        let config = hotswap_etcd::ClientConfig::from_list(endpoints)?;
        let client = hotswap_etcd::Client::connect(config).await?;
        match client.revoke(hotswap_etcd::LeaseId(lease)).await {
            Ok(()) => Ok(false),
            Err(hotswap_etcd::Error::LeaseNotFound { .. }) => Ok(true),
            Err(e) => Err(e.into()),
        }
    })
}

/// Counters of the kernel's TCP extension statistics (`/proc/net/netstat`,
/// machine-wide): `ListenOverflows` (connections dropped because a listen
/// queue was full) and `TCPSynRetrans` (SYNs sent again, after 1 s at
/// first), to tell a reconnect that waited on the kernel from one that
/// waited on a replica.
fn tcp_counters() -> Value {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let (Some(names), Some(values)) = (lines.first(), lines.get(1)) else {
        return Value::Null;
    };
    let mut out = serde_json::Map::new();
    for (name, value) in names.split_whitespace().zip(values.split_whitespace()) {
        if name == "ListenOverflows" || name == "TCPSynRetrans" {
            out.insert(name.to_string(), json!(value.parse::<u64>().unwrap_or(0)));
        }
    }
    Value::Object(out)
}

fn tcp_delta(before: &Value, after: &Value) -> Value {
    let get = |v: &Value, k: &str| v[k].as_u64().unwrap_or(0);
    json!({
        "listen_overflows": get(after, "ListenOverflows").saturating_sub(get(before, "ListenOverflows")),
        "syn_retransmits": get(after, "TCPSynRetrans").saturating_sub(get(before, "TCPSynRetrans")),
    })
}

/// CPU seconds of each replica in `alive`.
fn cpu_of(replicas: &[ControlPlane], alive: &[usize]) -> Vec<f64> {
    alive
        .iter()
        .map(|&i| cpu_seconds(replicas[i].pid()))
        .collect()
}

fn cores_between(before: &[f64], after: &[f64], secs: f64) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| round((a - b) / secs.max(0.001)))
        .collect()
}

/// Kill replica `victim`; measure until the survivors hold all `agents`
/// sessions. Returns (seconds, survivors' cores meanwhile, the curve).
fn kill_and_reconnect(
    replicas: &mut [ControlPlane],
    victim: usize,
    agents: u64,
    sims: &mut [&mut Simulator],
) -> anyhow::Result<Value> {
    let survivors: Vec<usize> = (0..replicas.len()).filter(|&i| i != victim).collect();
    let held_before: Vec<u64> = replicas.iter().map(held).collect();
    let cpu0 = cpu_of(replicas, &survivors);
    let tcp0 = tcp_counters();
    let killed = Instant::now();
    replicas[victim].kill();
    let mut curve = Vec::new();
    let mut last_sample = Duration::ZERO;
    let back = loop {
        let n = held_by(replicas, &survivors);
        let t = killed.elapsed();
        if curve.is_empty() || t >= last_sample + Duration::from_millis(250) || n >= agents {
            curve.push(json!([round(t.as_secs_f64()), n]));
            last_sample = t;
        }
        if n >= agents {
            break t;
        }
        check(sims)?;
        if t > Duration::from_secs(300) {
            bail!("only {n} of {agents} sessions back after 300 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let cpu1 = cpu_of(replicas, &survivors);
    let tcp = tcp_delta(&tcp0, &tcp_counters());
    let secs = back.as_secs_f64();
    Ok(json!({
        "killed": replicas[victim].data_dir.file_name().map(|n| n.to_string_lossy().into_owned()),
        "sessions_on_killed": held_before[victim],
        "all_back_ms": round(ms(back)),
        "survivor_cores": cores_between(&cpu0, &cpu1, secs),
        "survivor_cpu_ms_per_moved_agent": round(
            (cpu1.iter().sum::<f64>() - cpu0.iter().sum::<f64>()) * 1000.0
                / held_before[victim].max(1) as f64
        ),
        "curve": curve,
        "tcp_machine_wide": tcp,
    }))
}

fn failover_run(agents: usize, run: usize) -> anyhow::Result<Value> {
    let dir = TestDir::new();
    let mut cluster = start_cluster(dir.path(), 3, &["roll", "fresh"])?;
    let endpoints = cluster.etcd.endpoints();
    let replicas = &mut cluster.replicas;
    let rolling = agents / 2;
    let mut sim_roll = start_simulator(
        replicas,
        0,
        "roll",
        rolling,
        "environment=qa",
        "127.0.1.2-127.0.1.5",
        "100ms",
    );
    let mut sim_fresh = start_simulator(
        replicas,
        0,
        "fresh",
        agents - rolling,
        "environment=staging",
        "127.0.2.2-127.0.2.5",
        "100ms",
    );
    let all: Vec<usize> = (0..replicas.len()).collect();
    let started = Instant::now();
    let (mut best, mut best_at) = (0, Instant::now());
    loop {
        let n = held_by(replicas, &all);
        if n >= agents as u64 {
            break;
        }
        if n > best {
            (best, best_at) = (n, Instant::now());
        }
        check(&mut [&mut sim_roll, &mut sim_fresh])?;
        if best_at.elapsed() > Duration::from_secs(60) {
            bail!(
                "only {n} of {agents} connected, none more for 60 s:\n{}\n{}",
                sim_roll
                    .log()
                    .lines()
                    .filter(|l| !l.starts_with("simulate:"))
                    .take(5)
                    .collect::<Vec<_>>()
                    .join("\n"),
                sim_fresh
                    .log()
                    .lines()
                    .filter(|l| !l.starts_with("simulate:"))
                    .take(5)
                    .collect::<Vec<_>>()
                    .join("\n"),
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let connect_s = started.elapsed().as_secs_f64();
    let spread: Vec<u64> = replicas.iter().map(held).collect();
    eprintln!(
        "failover run {run}: {agents} agents in sessions after {connect_s:.1} s, spread {spread:?}"
    );

    // (b) a follower holding a third of the agents.
    let follower = kill_and_reconnect(
        replicas,
        1,
        agents as u64,
        &mut [&mut sim_roll, &mut sim_fresh],
    )?;
    eprintln!("failover run {run}: follower kill {follower}");
    replicas[1].start_replica();
    replicas[1].wait_serving();

    // (a) the leader, with a rolling deployment in flight: waves of 1/20 of
    // its nodes, 2 s of health between them.
    let batch = (rolling / 20).max(1).to_string();
    let created = replicas[0].ctl(&[
        "-o",
        "json",
        "deploy",
        "create",
        "roll@1.0.0",
        "--env",
        "qa",
        "--strategy",
        "rolling",
        "--batch-size",
        &batch,
        "--min-healthy-time",
        "2s",
    ]);
    if created.code != 0 {
        bail!("deploy create roll: {}", created.stderr);
    }
    let rollout = created.json()["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    wait_for(
        "the rollout's first wave on the agents",
        Duration::from_secs(60),
        || counters(&sim_roll).installs > 0,
    )?;
    let leader = leader_of(replicas, &all).context("a leader")?;
    let survivors: Vec<usize> = all.iter().copied().filter(|&i| i != leader).collect();
    let held_by_leader = held(&replicas[leader]);
    let roll_at_kill = counters(&sim_roll).installs;
    let cpu0 = cpu_of(replicas, &survivors);
    let tcp0 = tcp_counters();
    let killed = Instant::now();
    replicas[leader].kill();
    let replicas_ref: &[ControlPlane] = replicas;
    let (create_ms, on_wire, took_over, all_back, resumed) =
        std::thread::scope(|scope| -> anyhow::Result<_> {
            // The new deployment, through the survivors in turn until one
            // accepts it (a follower answers Unavailable while none leads).
            let creator = scope.spawn(|| -> anyhow::Result<Duration> {
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    let cp = &replicas_ref[survivors[attempt % survivors.len()]];
                    let out = cp.ctl(&[
                        "-o",
                        "json",
                        "deploy",
                        "create",
                        "fresh@1.0.0",
                        "--env",
                        "staging",
                        "--strategy",
                        "direct",
                        "--min-healthy-time",
                        "0s",
                    ]);
                    if out.code == 0 {
                        return Ok(killed.elapsed());
                    }
                    if killed.elapsed() > Duration::from_secs(120) {
                        bail!("deploy create fresh refused for 120 s: {}", out.stderr);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
            let (mut on_wire, mut took_over, mut all_back, mut resumed) = (None, None, None, None);
            let mut roll_at_take_over = 0;
            while on_wire.is_none() || took_over.is_none() || all_back.is_none() {
                let t = killed.elapsed();
                if on_wire.is_none() && counters(&sim_fresh).installs > 0 {
                    on_wire = Some(t);
                }
                if took_over.is_none() && leader_of(replicas_ref, &survivors).is_some() {
                    took_over = Some(t);
                    roll_at_take_over = counters(&sim_roll).installs;
                }
                if all_back.is_none() && held_by(replicas_ref, &survivors) >= agents as u64 {
                    all_back = Some((t, cpu_of(replicas_ref, &survivors), tcp_counters()));
                }
                if t > Duration::from_secs(180) {
                    bail!(
                        "after 180 s: on the wire {on_wire:?}, leader {took_over:?}, all back {:?}",
                        all_back.as_ref().map(|b| b.0)
                    );
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            // The rollout's next wave after the take-over (resumed by the
            // new leader): installs beyond those seen when it took over.
            while resumed.is_none() {
                let t = killed.elapsed();
                if counters(&sim_roll).installs > roll_at_take_over.max(roll_at_kill) {
                    resumed = Some(t);
                }
                if t > Duration::from_secs(180) {
                    bail!("the rollout did not advance after the take-over");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let create_ms = creator
                .join()
                .map_err(|_| anyhow::anyhow!("creator thread panicked"))??;
            Ok((create_ms, on_wire, took_over, all_back, resumed))
        })?;
    let (on_wire, took_over, resumed) = (
        on_wire.context("measured")?,
        took_over.context("measured")?,
        resumed.context("measured")?,
    );
    let (all_back, cpu1, tcp1) = all_back.context("measured")?;
    let leader_kill = json!({
        "decision_on_wire_ms": round(ms(on_wire)),
        "survivor_leads_ms": round(ms(took_over)),
        "deploy_create_accepted_ms": round(ms(create_ms)),
        "rollout_resumed_on_wire_ms": round(ms(resumed)),
        "rollout": rollout,
        "sessions_on_killed": held_by_leader,
        "all_back_ms": round(ms(all_back)),
        "survivor_cores": cores_between(&cpu0, &cpu1, all_back.as_secs_f64()),
        "tcp_machine_wide": tcp_delta(&tcp0, &tcp1),
    });
    eprintln!("failover run {run}: leader kill {leader_kill}");
    replicas[leader].start_replica();
    replicas[leader].wait_serving();

    // (c) SIGTERM of the leader.
    let alive: Vec<usize> = (0..replicas.len()).collect();
    let leader = leader_of(replicas, &alive).context("a leader")?;
    let keys = election_keys(&endpoints)?;
    let (old_key, _, old_lease) = keys.first().cloned().context("an election key")?;
    let others: Vec<usize> = alive.iter().copied().filter(|&i| i != leader).collect();
    let stopping = Instant::now();
    replicas[leader].terminate();
    let handed = loop {
        if let Some(next) = leader_of(replicas, &others) {
            break (next, stopping.elapsed());
        }
        if stopping.elapsed() > Duration::from_secs(30) {
            bail!("no replica leads 30 s after the leader's SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let key_gone = !election_keys(&endpoints)?.iter().any(|k| k.0 == old_key);
    // The resignation deletes the key, then revokes the lease: the lease is
    // checked once the old leader has exited (well within the 5 s an
    // expiry would take).
    replicas[leader].wait_stopped();
    let stop_s = stopping.elapsed().as_secs_f64();
    let resigned = lease_gone(&endpoints, old_lease)?;
    let checked_s = stopping.elapsed().as_secs_f64();
    let handoff = json!({
        "from": format!("cp-{leader}"),
        "to": format!("cp-{}", handed.0),
        "handoff_ms": round(ms(handed.1)),
        "old_election_key_gone": key_gone,
        "old_lease_revoked": resigned,
        "lease_checked_at_s": round(checked_s),
        "leader_exited_s": round(stop_s),
    });
    eprintln!("failover run {run}: graceful hand-off {handoff}");
    drop(sim_roll);
    drop(sim_fresh);
    Ok(json!({
        "connect_s": round(connect_s),
        "spread": spread,
        "follower_kill": follower,
        "leader_kill": leader_kill,
        "graceful": handoff,
    }))
}

fn stats(values: &[f64]) -> Value {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    json!({
        "min": sorted.first().copied().map(round),
        "median": sorted.get(sorted.len() / 2).copied().map(round),
        "max": sorted.last().copied().map(round),
    })
}

pub fn failover(agents: usize, runs: usize) -> anyhow::Result<()> {
    let mut results = Vec::new();
    for run in 1..=runs {
        results.push(failover_run(agents, run)?);
    }
    let pick = |path: &[&str]| -> Vec<f64> {
        results
            .iter()
            .filter_map(|r| path.iter().try_fold(r, |v, p| v.get(*p))?.as_f64())
            .collect()
    };
    let result = json!({
        "benchmark": "failover",
        "machine": machine(),
        "agents": agents,
        "replicas": 3,
        "leader_lease_s": 5,
        "runs": results.len(),
        "leader_kill_to_decision_on_wire_ms": stats(&pick(&["leader_kill", "decision_on_wire_ms"])),
        "leader_kill_to_survivor_leads_ms": stats(&pick(&["leader_kill", "survivor_leads_ms"])),
        "leader_kill_to_rollout_resumed_ms": stats(&pick(&["leader_kill", "rollout_resumed_on_wire_ms"])),
        "leader_kill_all_back_ms": stats(&pick(&["leader_kill", "all_back_ms"])),
        "follower_kill_all_back_ms": stats(&pick(&["follower_kill", "all_back_ms"])),
        "graceful_handoff_ms": stats(&pick(&["graceful", "handoff_ms"])),
        "per_run": results,
    });
    println!("{result}");
    Ok(())
}

pub fn capacity(
    agents: usize,
    replicas_n: usize,
    per_simulator: usize,
    window: Duration,
    connect_limit: Duration,
) -> anyhow::Result<()> {
    if per_simulator > MAX_PER_SIMULATOR {
        bail!(
            "--per-simulator {per_simulator} is over {MAX_PER_SIMULATOR} (open files: 20k per process)"
        );
    }
    let dir = TestDir::new();
    let cluster = start_cluster(dir.path(), replicas_n, &[])?;
    let replicas = &cluster.replicas;
    std::thread::sleep(Duration::from_secs(2));
    let idle_kib: Vec<u64> = replicas.iter().map(|cp| rss_kib(cp.pid())).collect();
    let n_sims = agents.div_ceil(per_simulator);
    let mut sims = Vec::new();
    for k in 0..n_sims {
        let count = agents / n_sims + usize::from(k < agents % n_sims);
        // Eight source addresses of their own per simulator: ~28k ports each.
        let sources = format!("127.0.{}.2-127.0.{}.9", 10 + k, 10 + k);
        // Every simulator enrolls through cp-0: enrollments through several
        // replicas at once contend on the event and audit logs' heads (each
        // enrollment appends to both) and most of them retry.
        sims.push((
            count,
            start_simulator(
                replicas,
                0,
                &format!("cap{k}"),
                count,
                "environment=dev",
                &sources,
                "1s",
            ),
        ));
    }
    let all: Vec<usize> = (0..replicas.len()).collect();
    let started = Instant::now();
    let (mut best, mut best_at) = (0u64, Instant::now());
    let mut printed = Instant::now();
    let mut curve = Vec::new();
    let limited = loop {
        let n = held_by(replicas, &all);
        if n > best {
            (best, best_at) = (n, Instant::now());
        }
        if n >= agents as u64 {
            break None;
        }
        let exited: Vec<String> = sims
            .iter_mut()
            .filter_map(|(_, s)| s.check_running().err())
            .collect();
        if !exited.is_empty() {
            break Some(format!("a simulator exited: {}", exited.join("\n")));
        }
        if best_at.elapsed() > Duration::from_secs(120) {
            break Some(format!("no progress for 120 s at {best}"));
        }
        if started.elapsed() > connect_limit {
            break Some(format!(
                "--connect-limit-s {} reached with {n} in sessions",
                connect_limit.as_secs()
            ));
        }
        if printed.elapsed() > Duration::from_secs(10) {
            printed = Instant::now();
            let per: Vec<u64> = replicas.iter().map(held).collect();
            let enrolled: u64 = sims.iter().map(|(_, s)| counters(s).enrolled).sum();
            let t = started.elapsed().as_secs_f64();
            eprintln!("capacity: {t:.0} s: {n} in sessions {per:?}, {enrolled} enrolled");
            curve.push(json!([t.round(), enrolled, n]));
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let connect_s = started.elapsed().as_secs_f64();
    let connected = held_by(replicas, &all);
    eprintln!("capacity: {connected} of {agents} in sessions after {connect_s:.0} s ({limited:?})");
    // Let allocations settle, then a steady window.
    std::thread::sleep(Duration::from_secs(15));
    let held_now: Vec<u64> = replicas.iter().map(held).collect();
    let rss: Vec<u64> = replicas.iter().map(|cp| rss_kib(cp.pid())).collect();
    let sim_rss: Vec<u64> = sims.iter().map(|(_, s)| rss_kib(s.pid())).collect();
    let cpu0: Vec<f64> = replicas.iter().map(|cp| cpu_seconds(cp.pid())).collect();
    let sim_cpu0: Vec<f64> = sims.iter().map(|(_, s)| cpu_seconds(s.pid())).collect();
    let enrolled0: u64 = sims.iter().map(|(_, s)| counters(s).enrolled).sum();
    let counter = |cp: &ControlPlane, name: &str| metric(cp, name).unwrap_or(0.0);
    let beats0: Vec<f64> = replicas
        .iter()
        .map(|cp| counter(cp, "hotswap_heartbeats_total"))
        .collect();
    let reports0: Vec<f64> = replicas
        .iter()
        .map(|cp| counter(cp, "hotswap_reports_total"))
        .collect();
    let t0 = Instant::now();
    std::thread::sleep(window);
    let secs = t0.elapsed().as_secs_f64();
    let cpu1: Vec<f64> = replicas.iter().map(|cp| cpu_seconds(cp.pid())).collect();
    let sim_cpu1: Vec<f64> = sims.iter().map(|(_, s)| cpu_seconds(s.pid())).collect();
    let per_replica: Vec<Value> = replicas
        .iter()
        .enumerate()
        .map(|(i, cp)| {
            let sessions = held_now[i].max(1) as f64;
            let cores = (cpu1[i] - cpu0[i]) / secs;
            let beats = (counter(cp, "hotswap_heartbeats_total") - beats0[i]) / secs;
            let reports = (counter(cp, "hotswap_reports_total") - reports0[i]) / secs;
            json!({
                "name": format!("cp-{i}"),
                "sessions": held_now[i],
                "rss_mib": round(rss[i] as f64 / 1024.0),
                "idle_rss_mib": round(idle_kib[i] as f64 / 1024.0),
                "kib_per_agent": round(rss[i].saturating_sub(idle_kib[i]) as f64 / sessions),
                "cores": round(cores),
                "cpu_us_per_agent_per_s": round(cores * 1e6 / sessions),
                "heartbeats_per_s": round(beats),
                "reports_per_s": round(reports),
                "leader": cp.leads(),
            })
        })
        .collect();
    let per_sim: Vec<Value> = sims
        .iter()
        .enumerate()
        .map(|(k, (count, s))| {
            let c = counters(s);
            let cores = (sim_cpu1[k] - sim_cpu0[k]) / secs;
            let connected = c.connected.max(1) as f64;
            json!({
                "agents": count,
                "connected": c.connected,
                "rss_mib": round(sim_rss[k] as f64 / 1024.0),
                "kib_per_connected_agent": round(sim_rss[k] as f64 / connected),
                "cores": round(cores),
                "cpu_us_per_connected_agent_per_s": round(cores * 1e6 / connected),
            })
        })
        .collect();
    let result = json!({
        "benchmark": "capacity",
        "machine": machine(),
        "agents": agents,
        "replicas": replicas_n,
        "simulators": n_sims,
        "connected": connected,
        "connect_s": round(connect_s),
        "limited_by": limited,
        "window_s": round(secs),
        // Enrollments still going on in the window (their CPU is in it).
        "enrolled_during_window": sims.iter().map(|(_, s)| counters(s).enrolled).sum::<u64>().saturating_sub(enrolled0),
        // [s, enrolled, in sessions] every 10 s while connecting.
        "connect_curve": curve,
        "lease_losses": replicas
            .iter()
            .map(|cp| cp.log().matches("etcd lease lost").count())
            .collect::<Vec<_>>(),
        "per_replica": per_replica,
        "per_simulator": per_sim,
        "load_average": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
    });
    println!("{result}");
    drop(sims);
    Ok(())
}
