//! Following the fleet: the durable event stream (replay, filters, live
//! follow, survival of kill -9) and per-environment cluster views.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use hotswap_tests::{ControlPlane, Fleet, TestDir, binary, eventually, http_get, patience};
use serde_json::Value;

fn events(fleet: &Fleet, extra: &[&str]) -> Vec<Value> {
    cp_events(&fleet.cp, extra)
}

fn cp_events(cp: &ControlPlane, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["-o", "json", "events"];
    args.extend_from_slice(extra);
    let out = cp.ctl(&args);
    assert_eq!(out.code, 0, "{out:?}");
    out.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn kinds(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| e["kind"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn events_are_durable_replayable_filterable_and_followable() {
    let dir = TestDir::new();
    let (mut fleet, _) = Fleet::start_many(&dir, "dev", &["a", "b"]);
    fleet.push_hello_per_node("1.0.0", "");
    let out = fleet.cp.ctl(&[
        "deploy",
        "create",
        "hello@1.0.0",
        "--env",
        "dev",
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert_eq!(out.code, 0, "{out:?}");

    let all = events(&fleet, &[]);
    let seqs: Vec<u64> = all.iter().map(|e| e["seq"].as_u64().unwrap_or(0)).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "strictly increasing: {seqs:?}"
    );
    let kinds_seen = kinds(&all);
    for kind in [
        "keys.trust",
        "tokens.create",
        "node.enrolled",
        "node.connected",
        "deployment.created",
        "deployment.step",
        "module.phase",
        "module.health",
        "deployment.finished",
    ] {
        assert!(
            kinds_seen.iter().any(|k| k == kind),
            "{kind} missing from {kinds_seen:?}"
        );
    }
    // SPEC's shape: every field present, absent ones null.
    let created = all
        .iter()
        .find(|e| e["kind"] == "deployment.created")
        .expect("created");
    for field in [
        "seq",
        "time",
        "kind",
        "deployment_id",
        "node",
        "module",
        "version",
        "message",
    ] {
        assert!(created.get(field).is_some(), "{field} missing: {created}");
    }
    assert_eq!(created["node"], Value::Null);
    assert_eq!(created["module"], "hello");
    let id = created["deployment_id"].as_str().expect("id").to_string();
    let finished = all
        .iter()
        .find(|e| e["kind"] == "deployment.finished")
        .expect("finished");
    assert!(
        finished["message"]
            .as_str()
            .unwrap_or_default()
            .starts_with("succeeded"),
        "{finished}"
    );
    let health = all
        .iter()
        .find(|e| e["kind"] == "module.health" && e["node"] == "a")
        .expect("health of a");
    assert_eq!(health["version"], "1.0.0");

    // Filters and resuming from a sequence number.
    let only = events(&fleet, &["--deployment", &id]);
    assert!(
        only.iter().all(|e| e["deployment_id"] == id.as_str()),
        "{only:?}"
    );
    assert!(only.len() >= 3, "{only:?}");
    let mid = seqs[seqs.len() / 2];
    let tail = events(&fleet, &["--since", &mid.to_string()]);
    assert_eq!(tail.first().and_then(|e| e["seq"].as_u64()), Some(mid));
    assert_eq!(tail.len(), seqs.iter().filter(|s| **s >= mid).count());
    let nodes_only = events(&fleet, &["--kind", "node."]);
    assert!(kinds(&nodes_only).iter().all(|k| k.starts_with("node.")));

    // Follow from the end: a change made now arrives live.
    let last = *seqs.last().expect("events");
    let mut follower = Command::new(binary("hotswapctl"))
        .arg("--profile")
        .arg(fleet.cp.admin_profile())
        .args([
            "--endpoint",
            &fleet.cp.url(),
            "-o",
            "json",
            "events",
            "--follow",
        ])
        .args(["--since", &(last + 1).to_string(), "--kind", "node."])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn follower");
    let stdout = follower.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    assert_eq!(fleet.cp.ctl(&["nodes", "remove", "b"]).code, 0);
    let removed = loop {
        let line = rx.recv_timeout(patience()).expect("a live event");
        let event: Value = serde_json::from_str(&line).expect("json line");
        assert!(event["seq"].as_u64() > Some(last), "{event}");
        if event["kind"] == "node.removed" {
            break event;
        }
    };
    assert_eq!(removed["node"], "b");
    let _ = follower.kill();
    let _ = follower.wait();

    // kill -9: what was stored is still there, and numbering continues.
    let before = events(&fleet, &[]);
    let max = before.last().and_then(|e| e["seq"].as_u64()).expect("max");
    fleet.cp.kill();
    fleet.cp.start();
    fleet.cp.wait_status("a", "connected");
    let after = events(&fleet, &[]);
    assert_eq!(&after[..before.len()], &before[..], "history unchanged");
    let reconnect = after[before.len()..]
        .iter()
        .find(|e| e["kind"] == "node.connected")
        .expect("a reconnect event after the restart");
    assert!(reconnect["seq"].as_u64() > Some(max));
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events
        .iter()
        .map(|e| e["seq"].as_u64().unwrap_or(0))
        .collect()
}

#[test]
fn events_without_since_show_the_newest_limit_then_follow() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    for _ in 0..6 {
        cp.ctl(&["tokens", "create"]).ok();
    }
    let all = seqs(&cp_events(&cp, &["--since", "0"]));
    assert!(all.len() >= 6, "{all:?}");
    let newest = seqs(&cp_events(&cp, &["--limit", "3"]));
    assert_eq!(
        newest,
        all[all.len() - 3..],
        "the newest three, oldest first"
    );
    let oldest = seqs(&cp_events(&cp, &["--since", "0", "--limit", "3"]));
    assert_eq!(oldest, all[..3], "--since keeps its meaning");
    let from = all[1].to_string();
    let from_second = seqs(&cp_events(&cp, &["--since", &from, "--limit", "2"]));
    assert_eq!(from_second, all[1..3]);
    let tokens = seqs(&cp_events(&cp, &["--kind", "tokens.", "--limit", "2"]));
    assert_eq!(tokens.len(), 2, "{tokens:?}");
    assert_eq!(tokens.last(), all.last(), "filters apply before the limit");

    // --follow without --since: the newest --limit, then live ones.
    let mut follower = Command::new(binary("hotswapctl"))
        .arg("--profile")
        .arg(cp.admin_profile())
        .args(["--endpoint", &cp.url(), "-o", "json", "events", "--follow"])
        .args(["--limit", "2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn follower");
    let stdout = follower.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let next_seq = || {
        let line = rx.recv_timeout(patience()).expect("an event");
        let event: Value = serde_json::from_str(&line).expect("json line");
        event["seq"].as_u64().expect("seq")
    };
    let replayed = [next_seq(), next_seq()];
    assert_eq!(replayed[..], all[all.len() - 2..]);
    cp.ctl(&["tokens", "create"]).ok();
    let live = next_seq();
    assert!(live > replayed[1], "{live} after {replayed:?}");
    let _ = follower.kill();
    let _ = follower.wait();
    cp.stop();
}

#[test]
fn clusters_summarize_environments() {
    let dir = TestDir::new();
    let (fleet, _) = Fleet::start_many(&dir, "dev", &["a", "b"]);
    fleet.push_hello_per_node("1.0.0", "");
    let out = fleet.cp.ctl(&[
        "deploy",
        "create",
        "hello@1.0.0",
        "--env",
        "dev",
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    let dev = eventually("dev to report both instances healthy with metrics", || {
        let out = fleet.cp.ctl(&["-o", "json", "clusters", "get", "dev"]);
        let c: Value = serde_json::from_str(&out.stdout).map_err(|e| format!("{e}: {out:?}"))?;
        if c["healthy"] == 2 && c["cpu_percent"].is_number() {
            Ok(c)
        } else {
            Err(c.to_string())
        }
    });
    assert_eq!(
        (dev["nodes"].as_u64(), dev["connected"].as_u64()),
        (Some(2), Some(2))
    );
    assert_eq!(dev["modules"][0]["name"], "hello");
    assert_eq!(dev["modules"][0]["version"], "1.0.0");
    assert_eq!(dev["modules"][0]["nodes"], 2);
    assert_eq!(dev["active_deployments"], serde_json::json!([]));

    let list = fleet.cp.ctl(&["-o", "json", "clusters", "list"]).json();
    let envs: Vec<&str> = list
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|c| c["environment"].as_str())
        .collect();
    assert_eq!(
        envs,
        ["dev", "production", "qa", "staging"],
        "configured environments, even empty"
    );
    let table = fleet.cp.ctl(&["clusters", "list"]);
    assert!(table.stdout.contains("hello@1.0.0 (2)"), "{table:?}");
    let missing = fleet.cp.ctl(&["clusters", "get", "moon"]);
    assert_eq!(missing.code, 1);
    assert!(
        missing.stderr.contains("no environment \"moon\""),
        "{missing:?}"
    );

    // The control plane's metrics carry the same picture.
    let (code, metrics) = fleet.cp.admin_get("/metrics");
    assert_eq!(code, 200);
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
    };
    assert_eq!(value("hotswap_deployments{state=\"succeeded\"}"), 1.0);
    assert_eq!(value("hotswap_deployments{state=\"running\"}"), 0.0);
    assert_eq!(value("hotswap_rollbacks_total"), 0.0);
    // The engine timed its passes over the deployment while it ran.
    assert!(value("hotswap_engine_pass_seconds_count") >= 1.0);
    assert!(value("hotswap_engine_pass_seconds_sum") > 0.0);
    assert!(value("hotswap_events_stored") >= 10.0);
    assert!(value("hotswap_events_total") >= 10.0);
    assert!(value("hotswap_audit_records") >= 4.0);

    // And each agent's: the swap, its duration, probes, bytes fetched, health.
    let (_, agent) = http_get(fleet.agent.admin(), "/metrics");
    let agent_value = |name: &str| -> f64 {
        agent
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing:\n{agent}"))
    };
    assert_eq!(
        agent_value("hotswap_agent_swaps_total{module=\"hello\",result=\"ok\"}"),
        1.0
    );
    assert_eq!(
        agent_value("hotswap_agent_swap_duration_seconds_count{module=\"hello\"}"),
        1.0
    );
    assert!(agent_value("hotswap_agent_fetched_bytes_total") > 1000.0);
    assert!(
        agent_value("hotswap_agent_probe_duration_seconds_count{kind=\"http\",result=\"ok\"}")
            >= 1.0
    );
    assert_eq!(
        agent_value("hotswap_agent_module_health{module=\"hello\",health=\"healthy\"}"),
        1.0
    );
    let _ = Duration::ZERO;
}
