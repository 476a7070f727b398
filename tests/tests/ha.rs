//! High availability on a real 3-member etcd cluster with artifacts in
//! SeaweedFS (SPEC §7): two control-plane replicas of one cluster, one
//! leading; `kill -9` of the leader in the middle of a rolling deployment;
//! the other replica leads within the lease, the deployment finishes, every
//! node activated exactly once, the event log gap-free and the audit chain
//! whole across the two leaders; a graceful stop hands over at once; and
//! canary analysis judges a canary and its baseline held by different
//! replicas on both their metrics.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hotswap_tests::marker::{activations, push_marker};
use hotswap_tests::{
    Agent, CANARY_LOAD_PER_SECOND, ControlPlane, EtcdCluster, Fleet, Load, SeaweedS3, TestDir,
    ctl_offline, eventually, free_port, session_records,
};
use serde_json::Value;

#[test]
fn the_leader_killed_mid_rollout_is_replaced_and_the_rollout_finishes_once() {
    let dir = TestDir::new();
    let etcd = EtcdCluster::start(3);
    let s3 = SeaweedS3::start("hotswap-ha");
    let mut a = ControlPlane::init_on_etcd(dir.path(), "cp-a", &etcd.endpoints(), &s3);
    let mut b = a.replica("cp-b");
    a.start_replica();
    a.wait_serving();
    eventually("cp-a to lead", || {
        let out = a.ctl(&["deploy", "list"]);
        (out.code == 0).then_some(()).ok_or(out.stderr)
    });
    b.start_replica();
    b.wait_serving();
    // The follower answers what the store holds, and sends callers of the
    // engine to the leader.
    let users = b.ctl(&["-o", "json", "users", "list"]);
    assert_eq!(users.code, 0, "{users:?}");
    // Who leads shows in the metrics, with the etcd round trip.
    assert_eq!(a.metric("hotswap_leader"), 1.0);
    assert_eq!(b.metric("hotswap_leader"), 0.0);
    eventually("the etcd round trip measured", || {
        let rtt = a.metric("hotswap_etcd_round_trip_seconds");
        (rtt > 0.0 && rtt < 5.0)
            .then_some(())
            .ok_or(format!("{rtt}"))
    });
    assert!(a.metric("hotswap_etcd_watch_lag_revisions") >= 0.0);
    // (Once it has seen the election: right after its start it may know no
    // leader yet, and says so.)
    let forwarded = eventually("cp-b to forward deploy list", || {
        let out = b.ctl(&["-o", "json", "deploy", "list"]);
        if out.code == 0 {
            Ok(out)
        } else {
            Err(out.stderr)
        }
    });
    assert_eq!(
        forwarded.json(),
        a.ctl(&["-o", "json", "deploy", "list"]).json()
    );

    // Publisher key, three agents that know both replicas.
    let key_base = dir.path().join("publisher");
    ctl_offline(&[
        "keys",
        "generate",
        "--out",
        key_base.to_str().expect("utf8"),
    ])
    .ok();
    let trusted = a.ctl(&[
        "keys",
        "trust",
        dir.path().join("publisher.pub").to_str().expect("utf8"),
        "--name",
        "publisher",
    ]);
    assert_eq!(trusted.code, 0, "{trusted:?}");
    let (token, fp) = a.token(&["--uses", "10", "--label", "environment=qa"]);
    let both = format!("{},{}", a.url(), b.url());
    let mut agents = Vec::new();
    for name in ["n1", "n2", "n3"] {
        let mut agent = Agent::new(dir.path(), name);
        agent.enroll(&both, &token, &fp, &[]);
        a.wait_status(name, "connected");
        agents.push(agent);
    }
    let log = dir.path().join("activations.log");
    push_marker(
        &a,
        dir.path(),
        &dir.path().join("publisher.key"),
        "1.0.0",
        &log,
    );

    // A rolling deployment, one node at a time with a hold between, so the
    // kill lands after the first node and before the last.
    let created = a.ctl(&[
        "-o",
        "json",
        "deploy",
        "create",
        "marker@1.0.0",
        "--env",
        "qa",
        "--strategy",
        "rolling",
        "--batch-size",
        "1",
        "--min-healthy-time",
        "1s",
    ]);
    assert_eq!(created.code, 0, "{created:?}");
    let id = created.json()["id"].as_str().expect("id").to_string();
    eventually("the first node activated", || {
        let done = activations(&log).len();
        (1..3)
            .contains(&done)
            .then_some(())
            .ok_or(format!("{done} nodes"))
    });
    a.kill();
    let killed_at = Instant::now();

    // B leads within the lease (5 s) and a retry, and carries on.
    eventually("cp-b to lead", || {
        if !b.leads() {
            return Err("not leading".into());
        }
        let out = b.ctl(&["deploy", "get", &id]);
        (out.code == 0).then_some(()).ok_or(out.stderr)
    });
    let took = killed_at.elapsed();
    eprintln!("replica b served {took:?} after the leader was killed");
    assert!(took < Duration::from_secs(12), "took {took:?}");
    let watched = b.ctl(&["-o", "json", "deploy", "watch", &id, "--timeout", "90s"]);
    assert_eq!(watched.code, 0, "{watched:?}");
    assert_eq!(
        watched.last_json_line()["state"],
        "succeeded",
        "{watched:?}"
    );
    for agent in &agents {
        b.wait_status(&agent.name, "connected");
    }
    let counts = activations(&log);
    for name in ["n1", "n2", "n3"] {
        assert_eq!(
            counts.get(&(name.to_string(), "1.0.0".to_string())),
            Some(&1),
            "{name} activated exactly once: {counts:?}"
        );
    }

    // One event log, gap-free across both leaders; one audit chain.
    let events = b.ctl(&["-o", "json", "events", "--since", "0", "--limit", "10000"]);
    assert_eq!(events.code, 0, "{events:?}");
    let seqs: Vec<u64> = events
        .stdout
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|e| e["seq"].as_u64())
        .collect();
    assert!(!seqs.is_empty());
    let first = seqs[0];
    assert_eq!(
        seqs,
        (first..first + seqs.len() as u64).collect::<Vec<_>>(),
        "gap-free event numbers"
    );
    let verified = b.ctl(&["-o", "json", "audit", "verify"]);
    assert_eq!(verified.code, 0, "{verified:?}");

    // The killed replica comes back as a follower; a graceful stop of the
    // leader hands over without waiting out the lease.
    a.start_replica();
    a.wait_serving();
    assert_eq!(
        a.metric("hotswap_leader"),
        0.0,
        "the restarted replica follows"
    );
    let stopping = Instant::now();
    b.stop();
    eventually("cp-a to lead again", || {
        let leads = a.metric("hotswap_leader");
        (leads == 1.0).then_some(()).ok_or(format!("{leads}"))
    });
    let handover = stopping.elapsed();
    eprintln!("graceful hand-off took {handover:?}");
    assert!(
        handover < Duration::from_secs(4),
        "a resignation hands over before the 5 s lease runs out: {handover:?}"
    );
    let nodes = a.ctl(&["-o", "json", "nodes", "list"]);
    assert_eq!(nodes.json().as_array().map(Vec::len), Some(3), "{nodes:?}");
}

/// What `nodes list` says that two replicas must agree on.
fn fleet_view(cp: &ControlPlane) -> Vec<Value> {
    cp.nodes()
        .into_iter()
        .map(|n| {
            let modules: Vec<Value> = n["modules"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|m| {
                    serde_json::json!([
                        m["name"],
                        m["version"],
                        m["phase"],
                        m["health"],
                        m["desired_version"]
                    ])
                })
                .collect();
            serde_json::json!({
                "name": n["name"],
                "status": n["status"],
                "desired_generation": n["desired_generation"],
                "observed_generation": n["observed_generation"],
                "modules": modules,
            })
        })
        .collect()
}

/// Agent sessions `servers list` on `cp` says `name` holds.
fn sessions_held(cp: &ControlPlane, name: &str) -> Result<u64, String> {
    let out = cp.ctl(&["-o", "json", "servers", "list"]);
    if out.code != 0 {
        return Err(out.stderr);
    }
    out.json()
        .as_array()
        .and_then(|all| all.iter().find(|s| s["name"] == name))
        .and_then(|s| s["sessions"].as_u64())
        .ok_or(format!("{name} not in {}", out.stdout))
}

/// SPEC §7 "Sessions on any replica": agents pinned to different replicas
/// (n1 to the leader, n2 and n3 to the follower); a rolling deployment the
/// leader runs succeeds with each node activated once; both replicas list
/// the same fleet; `kill -9` of the follower moves its agents to the
/// leader within 5 s, and its session records vanish within the lease
/// (n4, which knows only the follower, shows disconnected then).
#[test]
fn agents_on_every_replica_roll_out_once_and_fail_over_to_the_other() {
    let dir = TestDir::new();
    let etcd = EtcdCluster::start(3);
    let s3 = SeaweedS3::start("hotswap-sessions");
    let mut a = ControlPlane::init_on_etcd(dir.path(), "cp-a", &etcd.endpoints(), &s3);
    let mut b = a.replica("cp-b");
    a.start_replica();
    a.wait_serving();
    eventually("cp-a to lead", || {
        let out = a.ctl(&["deploy", "list"]);
        (out.code == 0).then_some(()).ok_or(out.stderr)
    });
    b.start_replica();
    b.wait_serving();

    let key_base = dir.path().join("publisher");
    ctl_offline(&[
        "keys",
        "generate",
        "--out",
        key_base.to_str().expect("utf8"),
    ])
    .ok();
    let trusted = a.ctl(&[
        "keys",
        "trust",
        dir.path().join("publisher.pub").to_str().expect("utf8"),
        "--name",
        "publisher",
    ]);
    assert_eq!(trusted.code, 0, "{trusted:?}");
    let (token, fp) = a.token(&["--uses", "10", "--label", "environment=qa"]);
    let mut agents = Vec::new();
    for (name, url) in [("n1", a.url()), ("n2", b.url()), ("n3", b.url())] {
        let mut agent = Agent::new(dir.path(), name);
        agent.enroll(&url, &token, &fp, &[]);
        agents.push(agent);
    }
    // Outside the deployment's environment, pinned to the follower for good.
    let (dev_token, _) = a.token(&["--label", "environment=dev"]);
    let mut n4 = Agent::new(dir.path(), "n4");
    n4.enroll(&b.url(), &dev_token, &fp, &[]);
    // Every replica shows every node connected, wherever its session is.
    for cp in [&a, &b] {
        for name in ["n1", "n2", "n3", "n4"] {
            cp.wait_status(name, "connected");
        }
    }
    assert_eq!(sessions_held(&a, "cp-a"), Ok(1));
    assert_eq!(sessions_held(&b, "cp-b"), Ok(3));
    let ids: BTreeMap<String, String> = agents
        .iter()
        .chain([&n4])
        .map(|agent| (agent.node_id(), agent.name.clone()))
        .collect();
    let holders = |records: BTreeMap<String, String>| -> BTreeMap<String, String> {
        records
            .into_iter()
            .filter_map(|(id, replica)| ids.get(&id).map(|name| (name.clone(), replica)))
            .collect()
    };
    eventually("the sessions published by their replicas", || {
        let seen = holders(session_records(&etcd.endpoints()));
        let want: BTreeMap<String, String> = [
            ("n1", "cp-a"),
            ("n2", "cp-b"),
            ("n3", "cp-b"),
            ("n4", "cp-b"),
        ]
        .map(|(n, r)| (n.to_string(), r.to_string()))
        .into();
        (seen == want).then_some(()).ok_or(format!("{seen:?}"))
    });

    // The leader's engine rolls out over nodes connected to both replicas.
    let log = dir.path().join("activations.log");
    push_marker(
        &a,
        dir.path(),
        &dir.path().join("publisher.key"),
        "1.0.0",
        &log,
    );
    let created = a.ctl(&[
        "-o",
        "json",
        "deploy",
        "create",
        "marker@1.0.0",
        "--env",
        "qa",
        "--strategy",
        "rolling",
        "--batch-size",
        "1",
        "--min-healthy-time",
        "1s",
    ]);
    assert_eq!(created.code, 0, "{created:?}");
    let id = created.json()["id"].as_str().expect("id").to_string();
    let started = Instant::now();
    let watched = a.ctl(&["-o", "json", "deploy", "watch", &id, "--timeout", "90s"]);
    assert_eq!(watched.code, 0, "{watched:?}");
    assert_eq!(
        watched.last_json_line()["state"],
        "succeeded",
        "{watched:?}"
    );
    eprintln!(
        "rolling deployment over two replicas took {:?}",
        started.elapsed()
    );
    let counts = activations(&log);
    for name in ["n1", "n2", "n3"] {
        assert_eq!(
            counts.get(&(name.to_string(), "1.0.0".to_string())),
            Some(&1),
            "{name} activated exactly once: {counts:?}"
        );
    }
    // Both replicas list the same fleet: statuses, generations, modules.
    eventually("both replicas to list the same fleet", || {
        let (on_a, on_b) = (fleet_view(&a), fleet_view(&b));
        let settled = on_a.iter().filter(|n| n["name"] != "n4").all(|n| {
            n["modules"]
                .as_array()
                .is_some_and(|m| m.iter().any(|m| m[1] == "1.0.0" && m[3] == "healthy"))
        });
        (settled && on_a == on_b && on_a.len() == 4)
            .then_some(())
            .ok_or(format!("cp-a: {on_a:?}\ncp-b: {on_b:?}"))
    });

    // n2 and n3 learn both replicas, and stay on cp-b: the way to cp-a is
    // cut while they connect.
    let gate = hotswap_tests::PartitionProxy::start(
        a.url()
            .trim_start_matches("https://")
            .parse()
            .expect("cp-a address"),
    );
    gate.partition();
    for agent in agents.iter_mut().filter(|agent| agent.name != "n1") {
        agent.stop();
        agent.start(&format!("{},{}", b.url(), gate.url()), &[]);
    }
    eventually("n2 and n3 on cp-b again", || {
        let held = sessions_held(&b, "cp-b")?;
        (held == 3).then_some(()).ok_or(format!("{held} sessions"))
    });
    for name in ["n2", "n3"] {
        a.wait_status(name, "connected");
    }
    gate.heal();

    b.kill();
    let killed_at = Instant::now();
    eventually("n2 and n3 to reconnect to cp-a", || {
        let held = sessions_held(&a, "cp-a")?;
        (held == 3).then_some(()).ok_or(format!("{held} sessions"))
    });
    let moved = killed_at.elapsed();
    eprintln!("agents of the killed replica connected to the other after {moved:?}");
    assert!(moved < Duration::from_secs(5), "took {moved:?}");
    for name in ["n1", "n2", "n3"] {
        a.wait_status(name, "connected");
    }
    // n4's record was not replaced by a reconnect: it goes with the lease.
    eventually("cp-b's session records to vanish", || {
        let seen = holders(session_records(&etcd.endpoints()));
        let left: Vec<&String> = seen.values().filter(|r| *r == "cp-b").collect();
        (left.is_empty()
            && seen.len() == 3
            && a.node_status("n4").as_deref() == Some("disconnected"))
        .then_some(())
        .ok_or(format!("{seen:?}"))
    });
    let vanished = killed_at.elapsed();
    eprintln!("cp-b's session records were gone {vanished:?} after the kill");
    assert!(
        vanished < Duration::from_secs(7),
        "within the 5 s lease (whole seconds in etcd, plus polling): {vanished:?}"
    );
}

/// SPEC §7: canary analysis works when canary and baseline nodes are
/// connected to different replicas. Each node is pinned to one replica, the
/// deployment is created through the follower, and the leader's verdict
/// needs both metric windows: the failing one counts the minimum sample on
/// each side.
#[test]
fn a_canary_and_its_baseline_on_different_replicas_are_judged_together() {
    let dir = TestDir::new();
    let etcd = EtcdCluster::start(3);
    let s3 = SeaweedS3::start("hotswap-canary");
    let mut a = ControlPlane::init_on_etcd(dir.path(), "cp-a", &etcd.endpoints(), &s3);
    let mut b = a.replica("cp-b");
    a.start_replica();
    a.wait_serving();
    eventually("cp-a to lead", || {
        let out = a.ctl(&["deploy", "list"]);
        (out.code == 0).then_some(()).ok_or(out.stderr)
    });
    b.start_replica();
    b.wait_serving();
    let key_base = dir.path().join("publisher");
    ctl_offline(&[
        "keys",
        "generate",
        "--out",
        key_base.to_str().expect("utf8"),
    ])
    .ok();
    let trusted = a.ctl(&[
        "keys",
        "trust",
        dir.path().join("publisher.pub").to_str().expect("utf8"),
        "--name",
        "publisher",
    ]);
    assert_eq!(trusted.code, 0, "{trusted:?}");
    let (token, fp) = a.token(&["--uses", "2", "--label", "environment=qa"]);
    let mut ports = Vec::new();
    let mut agents = Vec::new();
    for (name, url) in [("n1", a.url()), ("n2", b.url())] {
        let port = free_port();
        let label = format!("port={port}");
        let mut agent = Agent::new(dir.path(), name);
        agent.enroll(&url, &token, &fp, &["--label", &label]);
        agents.push(agent);
        ports.push(port);
    }
    for name in ["n1", "n2"] {
        a.wait_status(name, "connected");
    }
    assert_eq!(sessions_held(&a, "cp-a"), Ok(1));
    assert_eq!(sessions_held(&b, "cp-b"), Ok(1));
    let n2 = agents.pop().expect("n2");
    let n1 = agents.pop().expect("n1");
    let fleet = Fleet::of(
        a,
        n1,
        vec![n2],
        dir.path().join("publisher.key"),
        dir.path(),
    );
    fleet.push_hello_per_node("1.0.0", "");
    fleet.push_hello_per_node("2.0.0", "HELLO_ERROR_RATE = \"0.5\"");
    let first = b.ctl(&["deploy", "create", "hello@1.0.0", "--env", "qa", "--wait"]);
    assert_eq!(first.code, 0, "{first:?}");
    let loads: Vec<Load> = ports
        .iter()
        .map(|p| Load::paced(*p, CANARY_LOAD_PER_SECOND))
        .collect();
    let out = b.ctl(&[
        "-o",
        "json",
        "deploy",
        "create",
        "hello@2.0.0",
        "--env",
        "qa",
        "--strategy",
        "canary",
        "--steps",
        "50,100",
        "--step-duration",
        "30s",
        "--analysis-warmup",
        "1s",
        "--wait",
        "--timeout",
        "120s",
    ]);
    for load in loads {
        let _ = load.finish();
    }
    assert_eq!(out.code, 3, "{out:?}");
    let last = out.last_json_line();
    assert_eq!(last["state"], "rolled_back", "{last}");
    let verdicts = last["analysis"].as_array().cloned().unwrap_or_default();
    let verdict = verdicts.last().cloned().unwrap_or_default();
    assert_eq!(verdict["outcome"], "failed", "{last}");
    for side in ["canary_requests", "baseline_requests"] {
        assert!(
            verdict[side].as_f64() >= Some(50.0),
            "{side}: judged on at least the minimum sample from its replica: {verdict}"
        );
    }
    assert!(
        verdict["canary_error_rate"]
            .as_f64()
            .is_some_and(|e| e > 0.2),
        "{verdict}"
    );
    assert_eq!(
        verdict["baseline_error_rate"].as_f64(),
        Some(0.0),
        "{verdict}"
    );
    for node in ["n1", "n2"] {
        assert_eq!(fleet.version_on(node, "hello"), "1.0.0", "{node}");
    }
}
