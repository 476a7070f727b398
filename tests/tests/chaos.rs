//! The chaos suite: faults injected into real processes at random moments,
//! checked against the promises of SPEC §5.
//!
//! - the control plane killed with SIGKILL at random points of many
//!   deployments (also while `deploy create` is in flight): every deployment
//!   ends terminal, none acknowledged is lost, no node activates a version
//!   twice, and every node ends on the version its deployment's outcome says;
//! - an agent killed with SIGKILL at random points of a process swap: after
//!   its restart the module runs the desired version, in exactly one
//!   process, the one the agent's state records;
//! - an agent partitioned from the control plane at a random point of a
//!   rolling deployment (a proxy that silently drops every byte): the node is
//!   marked disconnected, the deployment ends without hanging, and it counts
//!   the node healthy only if the node had reported the new version healthy
//!   (otherwise the node is lost, an infrastructure failure that does not
//!   roll back the release); once the partition heals the node converges to
//!   what the deployment left;
//! - the control plane's data directory out of space (a small tmpfs): each
//!   write is acknowledged (and kept) or refused with the reason, after the
//!   first refusal every change is refused while reads answer, and once
//!   space is back the control plane restarts itself in place and works;
//!   nothing acknowledged is lost, also across a later `kill -9`;
//! - the control plane's wall clock stepped hours forward and backward
//!   mid-deployment (libfaketime): deployments neither fail nor stall.
//!
//! `HOTSWAP_CHAOS_TRIALS` sets the trials per scenario (default 2, the short
//! run inside `make test`; `make chaos` runs more) and `HOTSWAP_CHAOS_SEED`
//! the random seed (printed, so a failure can be replayed). Each scenario
//! prints one `CHAOS {json}` line with its trials and outcomes;
//! docs/reliability.md records them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hotswap_tests::{
    Chaos, ControlPlane, Fleet, Load, PartitionProxy, SmallDisk, TestDir, can_mount, eventually,
    free_port, http_get, send_kill, try_http_get,
};

use hotswap_tests::marker::{activations, write_marker};
use rand::Rng;
use serde_json::{Value, json};

/// Push `marker@version` (see `hotswap_tests::marker`), failing its
/// activation when `fail` is set.
fn push_marker(fleet: &Fleet, version: &str, log: &Path, fail: bool) {
    fleet.push("marker", version, |dir| {
        write_marker(dir, version, log, fail)
    });
}

/// The version a node's bundle `current` link names, on disk.
fn current_on_disk(data_dir: &Path, module: &str) -> Option<String> {
    std::fs::read_link(
        data_dir
            .join("artifacts/modules")
            .join(module)
            .join("current"),
    )
    .ok()
    .map(|t| t.to_string_lossy().into_owned())
}

/// Wait until every node of the fleet runs `version` of `module`, on disk
/// and as reported to the control plane.
fn wait_fleet_on(fleet: &Fleet, module: &str, version: &str) {
    eventually(&format!("every node on {module}@{version}"), || {
        for agent in fleet.agents() {
            let disk = current_on_disk(&agent.data_dir, module);
            if disk.as_deref() != Some(version) {
                return Err(format!("{} has {disk:?} on disk", agent.name));
            }
            let reported = fleet.version_on(&agent.name, module);
            if reported != version {
                return Err(format!("{} reports {reported:?}", agent.name));
            }
        }
        Ok(())
    });
}

fn deployment_of(fleet: &Fleet, module: &str, version: &str) -> Option<Value> {
    let list = fleet.cp.ctl(&["-o", "json", "deploy", "list"]).json();
    list.as_array()?
        .iter()
        .find(|d| d["module"] == module && d["version"] == version)
        .cloned()
}

/// Follow deployment `id` to its end; its final state.
fn watch_to_end(fleet: &Fleet, id: &str) -> Value {
    let out = fleet
        .cp
        .ctl(&["-o", "json", "deploy", "watch", id, "--timeout", "90s"]);
    assert!(
        out.code == 0 || out.code == 3,
        "deployment {id} did not end: {out:?}"
    );
    out.last_json_line()
}

#[test]
fn control_plane_killed_at_random_points_of_deployments() {
    let mut chaos = Chaos::new("control-plane-kill");
    let dir = TestDir::new();
    let (mut fleet, _) = Fleet::start_many(&dir, "qa", &["a", "b", "c"]);
    let log = dir.path().join("activations.log");
    push_marker(&fleet, "1.0.0", &log, false);
    let first = fleet.cp.ctl(&[
        "deploy",
        "create",
        "marker@1.0.0",
        "--env",
        "qa",
        "--strategy",
        "direct",
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert_eq!(first.code, 0, "{first:?}");
    wait_fleet_on(&fleet, "marker", "1.0.0");

    let mut current = "1.0.0".to_string();
    let mut outcomes = Vec::new();
    for trial in 1..=chaos.trials {
        let version = format!("1.{trial}.0");
        let bad = chaos.rng.random_bool(0.3);
        push_marker(&fleet, &version, &log, bad);
        let before = activations(&log);
        // A quarter of the kills land while `deploy create` is in flight.
        let kill_after = if chaos.rng.random_bool(0.25) {
            chaos.millis(0..150)
        } else {
            chaos.millis(150..2500)
        };
        let second_kill = chaos.rng.random_bool(0.3).then(|| chaos.millis(0..800));

        // The create call runs while the kill lands: before, during or
        // after its answer.
        let pid = fleet.cp.pid();
        let spec = format!("marker@{version}");
        let created = std::thread::scope(|scope| {
            let call = scope.spawn(|| {
                fleet.cp.ctl(&[
                    "-o",
                    "json",
                    "deploy",
                    "create",
                    &spec,
                    "--env",
                    "qa",
                    "--strategy",
                    "rolling",
                    "--batch-size",
                    "1",
                    "--min-healthy-time",
                    "300ms",
                    "--health-deadline",
                    "15s",
                ])
            });
            std::thread::sleep(kill_after);
            send_kill(pid);
            call.join().expect("create thread")
        });
        fleet.cp.kill();
        fleet.cp.start();
        if let Some(delay) = second_kill {
            // Again while it resumes.
            std::thread::sleep(delay);
            fleet.cp.kill();
            fleet.cp.start();
        }

        let acknowledged = created.code == 0;
        let found = deployment_of(&fleet, "marker", &version);
        let (state, expected) = match &found {
            None => {
                assert!(
                    !acknowledged,
                    "trial {trial}: deployment of {version} acknowledged ({created:?}) but lost"
                );
                ("never created".to_string(), current.clone())
            }
            Some(d) => {
                let id = d["id"].as_str().expect("id");
                if acknowledged {
                    assert_eq!(created.json()["id"], id, "trial {trial}");
                }
                let end = watch_to_end(&fleet, id);
                let state = end["state"].as_str().unwrap_or_default().to_string();
                let expected = match (bad, state.as_str()) {
                    (false, "succeeded") => version.clone(),
                    (true, "rolled_back") => current.clone(),
                    _ => panic!(
                        "trial {trial}: {} version {version} ended {state}: {end}",
                        if bad { "bad" } else { "good" }
                    ),
                };
                (state, expected)
            }
        };
        wait_fleet_on(&fleet, "marker", &expected);

        // No node activated anything twice in this trial, and only what
        // the outcome explains.
        let after = activations(&log);
        for ((node, v), count) in &after {
            let new = count - before.get(&(node.clone(), v.clone())).copied().unwrap_or(0);
            assert!(
                new <= 1,
                "trial {trial}: node {node} activated {v} {new} times"
            );
            if new == 1 {
                assert!(
                    *v == version && state == "succeeded",
                    "trial {trial}: node {node} activated {v} although the outcome was {state}"
                );
            }
        }
        if state == "succeeded" {
            for agent in fleet.agents() {
                let key = (agent.name.clone(), version.clone());
                assert_eq!(
                    after.get(&key).copied().unwrap_or(0),
                    1,
                    "trial {trial}: {} activated {version} once",
                    agent.name
                );
            }
        }
        outcomes.push(json!({
            "trial": trial,
            "version": version,
            "bad": bad,
            "kill_after_ms": kill_after.as_millis() as u64,
            "second_kill_after_ms": second_kill.map(|d| d.as_millis() as u64),
            "create_acknowledged": acknowledged,
            "outcome": state,
        }));
        current = expected;
    }
    chaos.report(json!(outcomes));
}

/// Pids of every live process whose executable lies under `dir`.
fn processes_under(dir: &Path) -> Vec<u32> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(exe) = std::fs::read_link(entry.path().join("exe")) else {
            continue;
        };
        // A zombie has no exe; a process still alive has.
        if exe.starts_with(&dir) {
            pids.push(pid);
        }
    }
    pids.sort();
    pids
}

/// `HOTSWAP_VERSION` in a process's environment.
fn version_of_process(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .find_map(|kv| kv.strip_prefix(b"HOTSWAP_VERSION="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

#[test]
fn agent_killed_mid_swap_comes_back_on_a_known_version() {
    let mut chaos = Chaos::new("agent-kill-mid-swap");
    let dir = TestDir::new();
    let mut fleet = Fleet::start(&dir, &[]);
    let port = free_port();
    // A start delay widens the swap: the new process is up for a while
    // before it passes its health gate and the old one is stopped.
    for version in ["1.0.0", "2.0.0"] {
        fleet.push_hello(version, port, "HELLO_START_DELAY_MS = \"400\"", "10s");
    }
    fleet.set("node-1", "hello@1.0.0", &[]);
    fleet.wait_running("hello", "1.0.0");
    let modules = fleet.agent.data_dir.join("artifacts/modules/hello");
    let url = fleet.cp.url();

    let mut outcomes = Vec::new();
    let mut current = "1.0.0";
    let (mut requests, mut failures) = (0, Vec::new());
    for trial in 1..=chaos.trials {
        let load = Load::start(port);
        let target = if current == "1.0.0" { "2.0.0" } else { "1.0.0" };
        // The swap takes a few hundred ms from the desired state's arrival:
        // both versions up, then the new one re-checked alone.
        let kill_after = chaos.millis(0..700);
        let down_for = chaos.millis(0..500);
        fleet.set("node-1", &format!("hello@{target}"), &[]);
        std::thread::sleep(kill_after);
        let during = processes_under(&modules).len();
        fleet.agent.kill();
        std::thread::sleep(down_for);
        fleet.agent.start(&url, &[]);
        let m = fleet.wait_running("hello", target);
        assert_eq!(m["health"], "healthy", "trial {trial}: {m}");

        // Exactly one process serves the module: the desired version, the
        // one the agent's state records.
        let pids = eventually("one module process", || {
            let pids = processes_under(&modules);
            if pids.len() == 1 {
                Ok(pids)
            } else {
                Err(format!(
                    "processes {pids:?} with versions {:?}",
                    pids.iter()
                        .map(|p| version_of_process(*p))
                        .collect::<Vec<_>>()
                ))
            }
        });
        assert_eq!(version_of_process(pids[0]), target, "trial {trial}");
        assert_eq!(fleet.agent.module_pids(), pids, "trial {trial}");
        let (code, body) = http_get(format!("127.0.0.1:{port}").parse().expect("addr"), "/");
        assert_eq!(code, 200, "trial {trial}");
        assert!(body.contains(target), "trial {trial}: {body}");
        let stats = load.finish();
        requests += stats.ok;
        failures.extend(stats.failures.iter().map(|f| format!("trial {trial}: {f}")));
        outcomes.push(json!({
            "trial": trial,
            "to": target,
            "kill_after_ms": kill_after.as_millis() as u64,
            "agent_down_ms": down_for.as_millis() as u64,
            "module_processes_at_kill": during,
            "readopted": fleet.agent.log().contains("re-adopted running instance"),
            "left_behind_stopped": fleet.agent.log().matches("left-behind process stopped").count(),
            "failed_requests": stats.failures.len(),
        }));
        current = target;
    }
    chaos.report(json!({
        "trials": outcomes,
        "requests": requests,
        "failed_requests": failures.len(),
        "failures_sample": failures.iter().take(5).collect::<Vec<_>>(),
    }));
    // The listening socket belongs to the agent and is handed to every
    // version, so even an agent killed mid-swap drops no connection.
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
}

#[test]
fn agent_partitioned_mid_rollout_is_lost_and_never_counted_healthy() {
    let mut chaos = Chaos::new("agent-partition");
    let dir = TestDir::new();
    let (mut fleet, _) = Fleet::start_many(&dir, "qa", &["a", "b"]);
    let grpc = fleet.cp.grpc.expect("grpc address");
    let proxy = PartitionProxy::start(grpc);
    // Node c reaches the control plane only through the proxy.
    let (token, fp) = fleet.cp.token(&[]);
    let mut c = hotswap_tests::Agent::new(dir.path(), "c");
    c.enroll(&proxy.url(), &token, &fp, &["--label", "environment=qa"]);
    fleet.cp.wait_status("c", "connected");
    fleet.others.push(c);

    let log = dir.path().join("activations.log");
    push_marker(&fleet, "1.0.0", &log, false);
    let first = fleet.cp.ctl(&[
        "deploy",
        "create",
        "marker@1.0.0",
        "--env",
        "qa",
        "--strategy",
        "direct",
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert_eq!(first.code, 0, "{first:?}");
    wait_fleet_on(&fleet, "marker", "1.0.0");

    let mut current = "1.0.0".to_string();
    let mut outcomes = Vec::new();
    for trial in 1..=chaos.trials {
        let version = format!("1.{trial}.0");
        push_marker(&fleet, &version, &log, false);
        let before = activations(&log);
        let cut_after = chaos.millis(0..2000);
        let created = fleet
            .cp
            .ctl(&[
                "-o",
                "json",
                "deploy",
                "create",
                &format!("marker@{version}"),
                "--env",
                "qa",
                "--strategy",
                "rolling",
                "--batch-size",
                "1",
                "--min-healthy-time",
                "500ms",
                "--health-deadline",
                "4s",
            ])
            .json();
        let id = created["id"].as_str().expect("id").to_string();
        std::thread::sleep(cut_after);
        proxy.partition();
        let cut_at = Instant::now();
        // What the control plane knew of c at the cut.
        let seen = fleet.cp.ctl(&["-o", "json", "deploy", "get", &id]).json();
        let c_state_at_cut = seen["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["node"] == "c"))
            .map(|n| n["state"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default();

        let end = watch_to_end(&fleet, &id);
        let ended_after = cut_at.elapsed();
        let state = end["state"].as_str().unwrap_or_default().to_string();
        let c_track = end["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["node"] == "c"))
            .cloned()
            .unwrap_or(Value::Null);
        // Whether a report of c's ever said the new version runs, from the
        // events the control plane derived from c's reports.
        let events = fleet.cp.ctl(&[
            "-o", "json", "events", "--node", "c", "--module", "marker", "--limit", "100000",
        ]);
        assert_eq!(events.code, 0, "{events:?}");
        let c_reported_new = events.stdout.lines().any(|l| {
            serde_json::from_str::<Value>(l).is_ok_and(|e| {
                let message = e["message"].as_str().unwrap_or_default();
                e["node"] == "c"
                    && e["version"] == version.as_str()
                    && ((e["kind"] == "module.phase" && message.ends_with("-> running"))
                        || (e["kind"] == "module.health" && message.ends_with("-> healthy")))
            })
        });
        fleet.cp.wait_status("c", "disconnected");
        // c is counted healthy only on its own report of the new version;
        // otherwise it is marked lost, an infrastructure failure that does
        // not count against the release (SPEC §6).
        let c_infrastructure = c_track["failure_kind"] == "infrastructure";
        if c_track["state"] == "lost" {
            assert!(
                c_infrastructure,
                "trial {trial}: c lost but not classed infrastructure: {end}"
            );
        }
        match state.as_str() {
            "succeeded" => assert!(
                c_reported_new || c_infrastructure,
                "trial {trial}: succeeded without c reporting {version} healthy or being marked: {end}"
            ),
            "rolled_back" | "failed" => {}
            other => panic!("trial {trial}: deployment ended {other}: {end}"),
        }

        // Heal; c notices its silent session by itself, reconnects, and
        // converges to what the deployment left.
        // c noticed the silence itself (every heartbeat is acknowledged),
        // not through the connection's far slower keepalive.
        let c_log = || {
            fleet
                .others
                .iter()
                .find(|a| a.name == "c")
                .map(|a| a.log())
                .unwrap_or_default()
        };
        eventually("c to notice its silent session", || {
            let noticed = c_log().matches("control plane silent for").count();
            if noticed >= trial {
                Ok(())
            } else {
                Err(format!("noticed {noticed} times in {trial} trials"))
            }
        });
        let healed_at = Instant::now();
        proxy.heal();
        fleet.cp.wait_status("c", "connected");
        let back_after_heal = healed_at.elapsed();
        let expected = if state == "succeeded" {
            version.clone()
        } else {
            current.clone()
        };
        wait_fleet_on(&fleet, "marker", &expected);
        let after = activations(&log);
        for ((node, v), count) in &after {
            let new = count - before.get(&(node.clone(), v.clone())).copied().unwrap_or(0);
            assert!(
                new <= 1,
                "trial {trial}: node {node} activated {v} {new} times"
            );
        }
        outcomes.push(json!({
            "trial": trial,
            "cut_after_ms": cut_after.as_millis() as u64,
            "c_at_cut": c_state_at_cut,
            "outcome": state,
            "c_track": c_track["state"],
            "c_reported_new_version": c_reported_new,
            "ended_after_cut_ms": ended_after.as_millis() as u64,
            "c_back_after_heal_ms": back_after_heal.as_millis() as u64,
        }));
        current = expected;
    }
    chaos.report(json!(outcomes));
}

#[test]
fn control_plane_out_of_disk_space_refuses_cleanly_and_recovers() {
    if !can_mount() {
        eprintln!(
            "SKIPPED: needs root to mount a small tmpfs for the control plane's data directory \
             (CI runs as root)"
        );
        return;
    }
    let chaos = Chaos::new("control-plane-disk-full");
    let dir = TestDir::new();
    // The control plane's data directory (`<work>/cp`) is a small file
    // system of its own; agents and the test's files stay on the big one.
    let disk = SmallDisk::mount(&dir.path().join("cp"), "64m");
    let (mut fleet, _) = Fleet::start_many(&dir, "dev", &["a"]);
    let pid = fleet.cp.pid();
    let admin = fleet.cp.admin.expect("admin address");
    let log = dir.path().join("activations.log");
    push_marker(&fleet, "1.0.0", &log, false);
    push_marker(&fleet, "2.0.0", &log, false);
    let ok = fleet.cp.ctl(&[
        "deploy",
        "create",
        "marker@1.0.0",
        "--env",
        "dev",
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert_eq!(ok.code, 0, "{ok:?}");
    // Pack while there is room; push when there is none.
    let packed = pack_marker(&fleet, "3.0.0", &log, dir.path());
    let filler = disk.fill();

    // An upload needs room for its blob at once.
    let push = fleet
        .cp
        .ctl(&["module", "push", packed.to_str().expect("utf8")]);
    assert_eq!(push.code, 1, "{push:?}");
    assert!(push.stderr.contains("No space left"), "{push:?}");

    // Small writes go on while the database's current segment has room;
    // each is either acknowledged (and must survive) or refused with the
    // reason, and after the first refusal every change is refused.
    let mut acknowledged = 0;
    let refusal = loop {
        let out = fleet.cp.ctl(&["tokens", "create"]);
        match out.code {
            0 => acknowledged += 1,
            1 => break out,
            _ => panic!("tokens create: {out:?}"),
        }
        assert!(acknowledged < 5000, "the database never ran out of space");
    };
    assert!(refusal.stderr.contains("No space left"), "{refusal:?}");
    eventually("the storage failure to be noticed", || {
        let (code, _) = http_get(admin, "/readyz");
        if code == 503 {
            Ok(())
        } else {
            Err(format!("readyz {code}"))
        }
    });
    let mut refused = Vec::new();
    for (what, args) in [
        ("tokens create", vec!["tokens", "create"]),
        (
            "deploy create",
            vec!["deploy", "create", "marker@2.0.0", "--env", "dev"],
        ),
        ("keys revoke", vec!["keys", "revoke", "publisher"]),
    ] {
        let out = fleet.cp.ctl(&args);
        assert_eq!(out.code, 1, "{what} with a failed storage: {out:?}");
        assert!(
            out.stderr.contains("storage failed") && out.stderr.contains("No space left"),
            "{what}: the error says what and why: {out:?}"
        );
        refused.push(json!({ "call": what, "error": out.stderr.trim() }));
    }
    // Reads still answer; nothing refused was applied.
    let versions = |fleet: &Fleet| {
        let out = fleet.cp.ctl(&["-o", "json", "module", "get", "marker"]);
        assert_eq!(out.code, 0, "{out:?}");
        out.json()["versions"].as_array().map_or(0, Vec::len)
    };
    let deployments = |fleet: &Fleet| {
        let out = fleet.cp.ctl(&["-o", "json", "deploy", "list"]);
        assert_eq!(out.code, 0, "{out:?}");
        out.json().as_array().map_or(0, Vec::len)
    };
    let tokens_created = |fleet: &Fleet| {
        let out = fleet.cp.ctl(&[
            "-o",
            "json",
            "audit",
            "list",
            "--action",
            "tokens.create",
            "--limit",
            "10000",
        ]);
        assert_eq!(out.code, 0, "{out:?}");
        out.json()
            .as_array()
            .map_or(0, |a| a.iter().filter(|r| r["result"] == "ok").count())
    };
    assert_eq!(versions(&fleet), 2);
    assert_eq!(deployments(&fleet), 1);
    assert_eq!(fleet.cp.ctl(&["nodes", "list"]).code, 0);
    let (_, metrics) = http_get(admin, "/metrics");
    assert!(metrics.contains("hotswap_storage_failed 1"), "{metrics}");

    // Space comes back: the control plane restarts by itself, in place.
    std::fs::remove_file(&filler).expect("free space");
    eventually(
        "the control plane to restart and be ready",
        || match try_http_get(admin, "/readyz")? {
            (200, _) => Ok(()),
            (code, _) => Err(format!("readyz {code}")),
        },
    );
    assert_eq!(fleet.cp.pid(), pid, "restarted in place (exec)");
    assert!(fleet.cp.log().contains("restarting to reopen the database"));
    fleet.cp.wait_status("a", "connected");
    // Every change acknowledged before the failure is there (plus the two
    // tokens the fleet's agents enrolled with, before the disk filled up).
    assert_eq!(tokens_created(&fleet), acknowledged + 2);
    let pushed = fleet
        .cp
        .ctl(&["module", "push", packed.to_str().expect("utf8")]);
    assert_eq!(pushed.code, 0, "{pushed:?}");
    let deployed = fleet.cp.ctl(&[
        "deploy",
        "create",
        "marker@3.0.0",
        "--env",
        "dev",
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert_eq!(deployed.code, 0, "{deployed:?}");
    wait_fleet_on(&fleet, "marker", "3.0.0");

    // Nothing acknowledged was lost or damaged: kill -9 and look again.
    fleet.cp.kill();
    fleet.cp.start();
    let verify = fleet.cp.ctl(&["audit", "verify"]);
    assert_eq!(verify.code, 0, "{verify:?}");
    assert_eq!(versions(&fleet), 3);
    assert_eq!(deployments(&fleet), 2);
    assert_eq!(tokens_created(&fleet), acknowledged + 2);
    fleet.cp.wait_status("a", "connected");
    chaos.report(json!({
        "writes_acknowledged_on_a_full_disk": acknowledged,
        "first_refusal": refusal.stderr.trim(),
        "refused_after_failure": refused,
        "recovered": "restart in place once space was back",
    }));
}

/// Pack `marker@version` into `out_dir` without pushing it.
fn pack_marker(fleet: &Fleet, version: &str, log: &Path, out_dir: &Path) -> PathBuf {
    let src = out_dir.join(format!("marker-src-{version}"));
    std::fs::create_dir_all(src.join("bin")).expect("src");
    std::fs::write(
        src.join("bin/activate.sh"),
        format!(
            "#!/bin/sh\necho \"$HOTSWAP_NODE $HOTSWAP_VERSION ok\" >> '{}'\n",
            log.display()
        ),
    )
    .expect("hook");
    let mut permissions = std::fs::metadata(src.join("bin/activate.sh"))
        .expect("hook")
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(src.join("bin/activate.sh"), permissions).expect("chmod");
    std::fs::write(
        src.join("module.toml"),
        format!(
            "name = \"marker\"\nversion = \"{version}\"\nruntime = \"bundle\"\n\n[bundle]\nactivate = [\"bin/activate.sh\"]\n"
        ),
    )
    .expect("manifest");
    let out = out_dir.join(format!("marker-{version}.hsm"));
    let packed = hotswap_tests::ctl_offline(&[
        "module",
        "pack",
        src.to_str().expect("utf8"),
        "--key",
        fleet.key.to_str().expect("utf8"),
        "-o",
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(packed.code, 0, "{packed:?}");
    out
}

/// libfaketime's preload library, installed by scripts/ci-deps.sh.
fn libfaketime() -> Option<PathBuf> {
    [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ]
    .iter()
    .map(PathBuf::from)
    .find(|p| p.exists())
}

#[test]
fn wall_clock_jumps_neither_fail_nor_stall_deployments() {
    let library = libfaketime().unwrap_or_else(|| {
        panic!(
            "libfaketime is missing: run scripts/ci-deps.sh as root (it installs Debian's faketime; `make test` does when run as root)"
        )
    });
    let mut chaos = Chaos::new("clock-jump");
    let dir = TestDir::new();
    let (mut fleet, _) = Fleet::start_many(&dir, "qa", &["a", "b", "c"]);
    // The control plane's wall clock follows an offset in a file we change
    // mid-deployment; its monotonic clock is left alone, as an NTP step
    // leaves it.
    let offset = dir.path().join("clock-offset");
    std::fs::write(&offset, "+0\n").expect("offset file");
    fleet.cp.follow_clock_offset(&library, &offset);
    fleet.cp.kill();
    fleet.cp.start();
    for agent in fleet.agents() {
        fleet.cp.wait_status(&agent.name, "connected");
    }
    let log = dir.path().join("activations.log");
    push_marker(&fleet, "1.0.0", &log, false);

    let mut outcomes = Vec::new();
    // Backward steps stay within the hour certificates are backdated by
    // (`pki::BACKDATE`): beyond it, certificates issued just before would
    // not be valid yet, which is X.509, not ours to change.
    let jumps = ["+3h", "-45m", "+90m", "-20m"];
    for trial in 1..=chaos.trials.max(2) {
        let version = format!("1.{trial}.0");
        push_marker(&fleet, &version, &log, false);
        // Alternate forward and backward steps, landing mid-rollout.
        let jump = jumps[(trial - 1) % jumps.len()];
        let jump_after = chaos.millis(100..1500);
        let started = Instant::now();
        let created = fleet
            .cp
            .ctl(&[
                "-o",
                "json",
                "deploy",
                "create",
                &format!("marker@{version}"),
                "--env",
                "qa",
                "--strategy",
                "rolling",
                "--batch-size",
                "1",
                "--min-healthy-time",
                "1s",
                "--health-deadline",
                "20s",
            ])
            .json();
        let id = created["id"].as_str().expect("id").to_string();
        std::thread::sleep(jump_after);
        std::fs::write(&offset, format!("{jump}\n")).expect("jump");
        let end = watch_to_end(&fleet, &id);
        let took = started.elapsed();
        assert_eq!(
            end["state"], "succeeded",
            "trial {trial}: clock step {jump} after {jump_after:?}: {end}"
        );
        // Three waves of at least 1 s each: a stall would show as hours.
        assert!(
            took < Duration::from_secs(90),
            "trial {trial}: took {took:?} after a {jump} step"
        );
        wait_fleet_on(&fleet, "marker", &version);
        // Back to true time, for the next trial to step from.
        std::fs::write(&offset, "+0\n").expect("reset");
        outcomes.push(json!({
            "trial": trial,
            "step": jump,
            "step_after_ms": jump_after.as_millis() as u64,
            "outcome": end["state"],
            "deployment_ms": took.as_millis() as u64,
        }));
    }
    chaos.report(json!(outcomes));
}

/// `rm -rf DATA/state` under a running control plane. sled keeps writing
/// into the files it holds open, so before the fix every call was
/// acknowledged, `/readyz` stayed 200, and the next start came up on a
/// fresh database that knew not even the admin.
#[test]
fn deleted_database_is_noticed_refused_and_recovered_only_on_request() {
    let chaos = Chaos::new("control-plane-database-deleted");
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let admin = cp.admin.expect("admin address");
    cp.ctl(&["tokens", "create"]).ok();
    assert_eq!(http_get(admin, "/readyz").0, 200);

    let state = cp.data_dir.join("state");
    std::fs::remove_dir_all(&state).expect("rm -rf state");
    // The very next change is refused, whether the watcher or the flush of
    // that change notices first: nothing is acknowledged into deleted files.
    let refused = cp.ctl(&["tokens", "create"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("storage failed")
            && refused.stderr.contains("was deleted while running")
            && refused.stderr.contains(state.to_str().expect("utf8")),
        "the refusal says what and why: {refused:?}"
    );
    eventually("the control plane to turn not ready", || {
        match http_get(admin, "/readyz").0 {
            503 => Ok(()),
            code => Err(format!("readyz {code}")),
        }
    });
    let (_, metrics) = http_get(admin, "/metrics");
    assert!(metrics.contains("hotswap_storage_failed 1"), "{metrics}");
    let again = cp.ctl(&["keys", "revoke", "nobody"]);
    assert_eq!(again.code, 1, "{again:?}");
    assert!(
        again.stderr.contains("was deleted while running"),
        "{again:?}"
    );
    // Reads still answer from what the process holds.
    cp.ctl(&["nodes", "list"]).ok();
    // No restart in place: a restart would find no database.
    std::thread::sleep(Duration::from_secs(2));
    assert!(!cp.log().contains("restarting to reopen the database"));
    cp.stop();

    // A start next to the CA without the database is refused, and creates
    // nothing.
    let (status, log) = cp.start_refused(&[]);
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("is missing")
            && log.contains(state.to_str().expect("utf8"))
            && log.contains("restore")
            && log.contains("--recover-empty-db"),
        "the refusal names the path and what to do: {log}"
    );
    assert!(
        !state.exists(),
        "a refused start created {}",
        state.display()
    );

    // Explicit recovery: an empty database with the admin of the data dir's
    // profile, logged loudly and audited.
    cp.start_with_args(&["--recover-empty-db"]);
    assert!(
        cp.log().contains("WARN") && cp.log().contains("RECOVERY"),
        "{}",
        cp.log()
    );
    cp.ctl(&["tokens", "create"]).ok();
    let users = cp.ctl(&["-o", "json", "users", "list"]).json();
    assert_eq!(users.as_array().map(Vec::len), Some(1), "{users}");
    let audit = cp.ctl(&["-o", "json", "audit", "list"]).json();
    assert!(
        audit.as_array().is_some_and(|a| a
            .iter()
            .any(|r| r["action"] == "control-plane.recover-empty-db")),
        "{audit}"
    );
    cp.stop();
    // The flag is for one start: on a database with users it is refused,
    // and without it the recovered database starts as any other.
    let (status, log) = cp.start_refused(&["--recover-empty-db"]);
    assert!(!status.success(), "{log}");
    assert!(
        log.contains("only for a missing or empty database"),
        "{log}"
    );
    cp.start();
    cp.ctl(&["audit", "verify"]).ok();
    cp.stop();
    chaos.report(json!({
        "refused_after_delete": refused.stderr.trim(),
        "restart_refused": true,
        "recovered": "--recover-empty-db re-created the admin from admin.profile.toml",
    }));
}
