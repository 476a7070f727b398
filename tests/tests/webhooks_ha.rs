//! Webhooks on replicas sharing etcd (SPEC §7, §9): only the leader
//! delivers, so a receiver gets each event once while two replicas run, and
//! the next leader goes on from the stored cursor after a failover.

use hotswap_tests::{
    ControlPlane, EtcdCluster, SeaweedS3, TestDir, WEBHOOK_SECRET, WebhookReceiver, eventually,
};
use serde_json::Value;

fn token_seqs(cp: &ControlPlane) -> Vec<u64> {
    let out = cp.ctl(&["-o", "json", "events", "--kind", "tokens.", "--since", "0"]);
    out.ok();
    out.stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|e| e["seq"].as_u64())
        .collect()
}

#[test]
fn only_the_leader_delivers_and_the_next_one_goes_on_from_the_cursor() {
    let dir = TestDir::new();
    let etcd = EtcdCluster::start(1);
    let s3 = SeaweedS3::start("hotswap-hooks");
    let mut a = ControlPlane::init_on_etcd(dir.path(), "cp-a", &etcd.endpoints(), &s3);
    let settings = dir.path().join("cp.toml");
    let mut text = std::fs::read_to_string(&settings).expect("settings");
    text.push_str("webhook_backoff_max = \"1s\"\n");
    std::fs::write(&settings, text).expect("settings");
    let mut b = a.replica("cp-b");
    a.start_replica();
    a.wait_serving();
    eventually("cp-a to lead", || {
        a.leads().then_some(()).ok_or_else(|| "not yet".to_string())
    });
    b.start_replica();
    b.wait_serving();

    let mut receiver = WebhookReceiver::new(dir.path());
    receiver.start();
    let secret = dir.path().join("hook.secret");
    std::fs::write(&secret, WEBHOOK_SECRET).expect("secret");
    // Created through the follower: the leader picks it up from the store.
    let created = b
        .ctl(&[
            "-o",
            "json",
            "webhooks",
            "create",
            "--url",
            &receiver.url(),
            "--kind",
            "tokens",
            "--secret-file",
            secret.to_str().expect("utf8"),
        ])
        .json();
    let id = created["id"].as_str().expect("id").to_string();
    for _ in 0..3 {
        a.ctl(&["tokens", "create"]).ok();
        b.ctl(&["tokens", "create"]).ok();
    }
    let expected = token_seqs(&a);
    assert_eq!(expected.len(), 6, "{expected:?}");
    eventually("each token event once, in order", || {
        let got = receiver.seqs();
        (got == expected)
            .then_some(())
            .ok_or(format!("{got:?} != {expected:?}"))
    });
    // Nothing more arrives: the follower sends nothing of its own.
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(receiver.seqs(), expected, "delivered by one replica only");
    assert!(
        receiver
            .deliveries()
            .iter()
            .all(|d| d["signature_ok"] == true)
    );

    // The leader stops (resigning); the follower leads and goes on.
    a.stop();
    eventually("cp-b to lead", || {
        b.leads().then_some(()).ok_or_else(|| "not yet".to_string())
    });
    for _ in 0..3 {
        b.ctl(&["tokens", "create"]).ok();
    }
    let all = token_seqs(&b);
    assert_eq!(all.len(), 9, "{all:?}");
    eventually("every token event after the failover", || {
        let mut got = receiver.seqs();
        got.dedup();
        (got == all)
            .then_some(())
            .ok_or(format!("{got:?} != {all:?}"))
    });
    let seqs = receiver.seqs();
    assert!(seqs.windows(2).all(|w| w[0] <= w[1]), "{seqs:?}");
    let list = b.ctl(&["-o", "json", "webhooks", "list"]).json();
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["last_delivered_seq"].as_u64(), all.last().copied());
    assert_eq!(list[0]["backlog"], 0, "{list}");
    b.stop();
}
