//! `hotswap-agent simulate`: simulated agents enroll with their own
//! certificates, keep real mTLS sessions from several source addresses, and
//! take part in deployments like real agents — including failing ones.

use std::path::Path;

use hotswap_tests::{
    ControlPlane, DelayProxy, EtcdCluster, SeaweedS3, Simulator, TestDir, ctl_offline, eventually,
    write_module,
};
use serde_json::Value;

fn p(path: &Path) -> &str {
    path.to_str().expect("utf8")
}

fn connected_in(cp: &ControlPlane, env: &str) -> usize {
    let nodes = cp
        .ctl(&["-o", "json", "nodes", "list", "--env", env])
        .json();
    nodes.as_array().map_or(0, |n| {
        n.iter().filter(|n| n["status"] == "connected").count()
    })
}

#[test]
fn simulated_agents_enroll_connect_and_deploy() {
    let dir = TestDir::new();
    let mut cp = ControlPlane::init(dir.path());
    cp.start();
    let key = dir.path().join("k");
    ctl_offline(&["keys", "generate", "--out", p(&key)]).ok();
    cp.ctl(&["keys", "trust", p(&dir.path().join("k.pub")), "--name", "k"])
        .ok();
    let src = dir.path().join("src");
    write_module(&src, "sim-mod", "1.0.0", b"payload");
    let artifact = dir.path().join("sim-mod.hsm");
    ctl_offline(&[
        "module",
        "pack",
        p(&src),
        "--key",
        p(&dir.path().join("k.key")),
        "-o",
        p(&artifact),
    ])
    .ok();
    cp.ctl(&["module", "push", p(&artifact)]).ok();

    let mut good = Simulator::start(
        &cp,
        "good",
        40,
        &["environment=qa"],
        &[
            "--source-addrs",
            "127.0.0.2-127.0.0.5",
            "--install-latency",
            "100ms",
        ],
    );
    let mut bad = Simulator::start(
        &cp,
        "bad",
        4,
        &["environment=dev"],
        &["--failure-rate", "1"],
    );
    eventually("44 simulated nodes connected", || {
        let (qa, dev) = (connected_in(&cp, "qa"), connected_in(&cp, "dev"));
        if (qa, dev) == (40, 4) {
            Ok(())
        } else {
            Err(format!("qa {qa}, dev {dev}"))
        }
    });
    // Every node has its own identity.
    let nodes = cp.ctl(&["-o", "json", "nodes", "list"]).json();
    let mut ids: Vec<&str> = nodes
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 44);

    let out = cp.ctl(&[
        "-o",
        "json",
        "deploy",
        "create",
        "sim-mod@1.0.0",
        "--env",
        "qa",
        "--batch-size",
        "25%",
        "--min-healthy-time",
        "200ms",
        "--wait",
        "--timeout",
        "120s",
    ]);
    assert_eq!(out.code, 0, "{out:?}");
    let last: Value = serde_json::from_str(out.stdout.lines().last().expect("line")).expect("json");
    assert_eq!(last["state"], "succeeded");
    assert_eq!(last["progress"]["healthy"], 40);
    assert_eq!(last["waves"], 4);

    // Simulated failures are caught like real ones.
    let out = cp.ctl(&[
        "deploy",
        "create",
        "sim-mod@1.0.0",
        "--env",
        "dev",
        "--health-deadline",
        "3s",
        "--wait",
        "--timeout",
        "60s",
    ]);
    assert_eq!(out.code, 3, "{out:?}");

    // Connections came from the requested source addresses.
    let enrolls = cp
        .ctl(&[
            "-o",
            "json",
            "audit",
            "list",
            "--action",
            "nodes.enroll",
            "--limit",
            "100",
        ])
        .json();
    let mut sources: Vec<String> = enrolls
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|r| r["peer"].as_str())
        .filter_map(|peer| peer.rsplit_once(':').map(|(ip, _)| ip.to_string()))
        .collect();
    sources.sort();
    sources.dedup();
    for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        assert!(
            sources.iter().any(|s| s == ip),
            "{ip} not among {sources:?}"
        );
    }
    let log = good.log();
    assert!(log.contains("connected 40"), "{log}");
    assert!(good.stop().success());
    assert!(bad.stop().success());
    eventually("simulated nodes to disconnect", || {
        match connected_in(&cp, "qa") {
            0 => Ok(()),
            n => Err(format!("{n} still connected")),
        }
    });
}

/// (enrolled, failed, rate-limited) from the last stats line of a
/// simulator's log: "enrolled N (failed N, rate-limited N), ...".
fn enroll_counts(log: &str) -> Option<(u64, u64, u64)> {
    let line = log.lines().rev().find(|l| l.contains("enrolled "))?;
    let rest = &line[line.find("enrolled ")? + "enrolled ".len()..];
    let (enrolled, rest) = rest.split_once(" (failed ")?;
    let (failed, rest) = rest.split_once(", rate-limited ")?;
    let (limited, _) = rest.split_once(')')?;
    Some((
        enrolled.parse().ok()?,
        failed.parse().ok()?,
        limited.parse().ok()?,
    ))
}

#[test]
fn rate_limited_enrollment_backs_off_and_is_counted_apart() {
    let dir = TestDir::new();
    // One enrollment per 5 s per source address, and no burst beyond one.
    let mut cp =
        ControlPlane::init_with_settings(dir.path(), "enroll_per_minute = 12\nenroll_burst = 1\n");
    cp.start();
    let mut sim = Simulator::start(&cp, "limited", 3, &["environment=dev"], &[]);
    // The first agent takes the one token; the second gets the next one, 5 s
    // later. Retrying every 500 ms, the two waiting agents were refused 20
    // times by then; backing off (250-500 ms, doubling), at most 6 times each
    // until the retry that lands after 5 s.
    let (enrolled, failed, limited) = eventually("a second simulated agent enrolled", || {
        sim.check_running()?;
        let log = sim.log();
        match enroll_counts(&log) {
            Some(counts) if counts.0 >= 2 => Ok(counts),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(sim.stop().success());
    let log = sim.log();
    let last = enroll_counts(&log).expect("a final stats line");
    assert!(
        log.lines()
            .any(|l| l.contains("simulate: stopped; enrolled")),
        "{log}"
    );
    assert_eq!((failed, last.1), (0, 0), "refusals are not failures: {log}");
    assert!(enrolled >= 2 && limited >= 2, "{enrolled} {limited}: {log}");
    assert!(
        last.2 <= 16,
        "{} rate-limited attempts: no backoff?\n{log}",
        last.2
    );
}

/// Sessions held by `cp` itself (`hotswap_nodes{status="connected"}`
/// counts the sessions a replica holds).
fn held(cp: &ControlPlane) -> f64 {
    cp.metric("hotswap_nodes{status=\"connected\"}")
}

/// With several replicas, simulated agents enroll through the first and
/// open their sessions spread evenly over all of them (agent `i` on the
/// `i mod n`-th); `kill -9` of one moves its agents to their next replica,
/// and all of them are in sessions again, counted once each.
#[test]
fn simulated_agents_spread_over_replicas_and_fail_over() {
    let dir = TestDir::new();
    let etcd = EtcdCluster::start(3);
    let s3 = SeaweedS3::start("hotswap-sim-replicas");
    let mut a = ControlPlane::init_on_etcd(dir.path(), "cp-a", &etcd.endpoints(), &s3);
    let mut b = a.replica("cp-b");
    let mut c = a.replica("cp-c");
    for cp in [&mut a, &mut b, &mut c] {
        cp.start_replica();
        cp.wait_serving();
    }
    let mut sim = Simulator::start(
        &a,
        "spread",
        9,
        &["environment=qa"],
        &[
            "--control-plane",
            &b.url(),
            "--control-plane",
            &c.url(),
            "--stats-every",
            "100ms",
        ],
    );
    eventually("three sessions on each replica", || {
        sim.check_running()?;
        let spread = [held(&a), held(&b), held(&c)];
        (spread == [3.0; 3])
            .then_some(())
            .ok_or(format!("{spread:?}"))
    });
    b.kill();
    eventually("b's agents on c, their next replica", || {
        sim.check_running()?;
        let spread = [held(&a), held(&c)];
        (spread == [3.0, 6.0])
            .then_some(())
            .ok_or(format!("{spread:?}"))
    });
    // Its progress line: nine enrolled, nine sessions open, twelve opened.
    eventually("the simulator counting nine open sessions", || {
        let counters = sim.counters().unwrap_or_default();
        (counters.enrolled == 9 && counters.connected == 9 && counters.sessions == 12)
            .then_some(())
            .ok_or(format!("{counters:?}"))
    });
}

/// A node enrolled through one replica and opening its session on another a
/// moment later is admitted even though the other's copy of the cluster has
/// not seen the enrollment yet: the refusal "not enrolled" is decided on
/// etcd's state, not on the lag (an agent takes it as fatal). `cp-b` reads
/// etcd through a proxy that hands it everything 500 ms late, so its copy
/// lags for sure; agents 1 and 3 enroll through `cp-a` and open their first
/// session on `cp-b` within milliseconds.
#[test]
fn a_replica_whose_copy_lags_admits_nodes_enrolled_through_another() {
    let dir = TestDir::new();
    let etcd = EtcdCluster::start(1);
    let s3 = SeaweedS3::start("hotswap-sim-lagging");
    let member: std::net::SocketAddr = etcd
        .endpoint(0)
        .trim_start_matches("http://")
        .parse()
        .expect("etcd member address");
    let lagging = DelayProxy::start(member, std::time::Duration::from_millis(500));
    let mut a = ControlPlane::init_on_etcd(dir.path(), "cp-a", &etcd.endpoints(), &s3);
    let mut b = a.replica("cp-b");
    b.set_etcd_endpoints(&format!("http://{}", lagging.addr));
    for cp in [&mut a, &mut b] {
        cp.start_replica();
        cp.wait_serving();
    }
    let mut sim = Simulator::start(
        &a,
        "lagging",
        4,
        &["environment=qa"],
        &["--control-plane", &b.url(), "--stats-every", "100ms"],
    );
    eventually("two sessions on each replica", || {
        sim.check_running()?;
        let spread = [held(&a), held(&b)];
        (spread == [2.0; 2])
            .then_some(())
            .ok_or(format!("{spread:?}"))
    });
    eventually("each node admitted by its first replica", || {
        let counters = sim.counters().unwrap_or_default();
        ((counters.enrolled, counters.connected, counters.sessions) == (4, 4, 4))
            .then_some(())
            .ok_or(format!("{counters:?}"))
    });
}
