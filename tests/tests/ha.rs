//! High availability on a real 3-member etcd cluster with artifacts in
//! SeaweedFS (SPEC §7): two control-plane replicas of one cluster, one
//! leading; `kill -9` of the leader in the middle of a rolling deployment;
//! the other replica leads within the lease, the deployment finishes, every
//! node activated exactly once, the event log gap-free and the audit chain
//! whole across the two leaders; a graceful stop hands over at once.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use hotswap_tests::{
    Agent, ControlPlane, EtcdCluster, SeaweedS3, TestDir, ctl_offline, eventually,
};
use serde_json::Value;

/// Push `marker@version`: a bundle whose activate hook appends
/// `<node> <version>` to `log`.
fn push_marker(cp: &ControlPlane, work: &Path, key: &Path, version: &str, log: &Path) {
    let src = work.join(format!("src-marker-{version}"));
    std::fs::create_dir_all(src.join("bin")).expect("module dir");
    let script = src.join("bin/activate.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$HOTSWAP_NODE $HOTSWAP_VERSION\" >> '{}'\n",
            log.display()
        ),
    )
    .expect("hook");
    let mut permissions = std::fs::metadata(&script).expect("hook").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&script, permissions).expect("chmod");
    std::fs::write(
        src.join("module.toml"),
        format!(
            "name = \"marker\"\nversion = \"{version}\"\nruntime = \"bundle\"\n\n[bundle]\nactivate = [\"bin/activate.sh\"]\n"
        ),
    )
    .expect("manifest");
    let out = work.join(format!("marker-{version}.hsm"));
    let packed = ctl_offline(&[
        "module",
        "pack",
        src.to_str().expect("utf8"),
        "--key",
        key.to_str().expect("utf8"),
        "-o",
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(packed.code, 0, "{packed:?}");
    let pushed = cp.ctl(&["module", "push", out.to_str().expect("utf8")]);
    assert_eq!(pushed.code, 0, "{pushed:?}");
}

fn activations(log: &Path) -> BTreeMap<(String, String), usize> {
    let mut counts = BTreeMap::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines() {
        if let [node, version] = line.split_whitespace().collect::<Vec<_>>()[..] {
            *counts
                .entry((node.to_string(), version.to_string()))
                .or_insert(0) += 1;
        }
    }
    counts
}

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
    let refused = b.ctl(&["deploy", "list"]);
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(
        refused
            .stderr
            .contains("replica cp-b does not lead; the leader is cp-a"),
        "{refused:?}"
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
    let follows = a.ctl(&["deploy", "list"]);
    assert!(follows.stderr.contains("the leader is cp-b"), "{follows:?}");
    let stopping = Instant::now();
    b.stop();
    eventually("cp-a to lead again", || {
        let out = a.ctl(&["deploy", "list"]);
        (out.code == 0).then_some(()).ok_or(out.stderr)
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
