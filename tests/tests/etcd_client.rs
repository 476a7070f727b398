//! The etcd client (`hotswap-etcd`) against a real 3-member etcd cluster:
//! compare-and-swap, paged ranges at a revision, watches from the past and
//! after compaction, leases with and without keep-alive, and failover when
//! a member dies; and against a 1-member cluster with mutual TLS on its
//! client port: calls over TLS, a member the client's CA did not sign, and a
//! client without a certificate. Each test has its own cluster, so killing
//! members in one does not disturb the others.

use std::time::Duration;

use hotswap_etcd::{
    Client, ClientConfig, Compare, CompareOp, Error, EtcdTls, LeaseLost, TxnOp, WatchEvent,
    WatchEventKind, WatchStream,
};
use hotswap_tests::{EtcdCluster, patience};
use tokio_stream::StreamExt;

async fn client(endpoints: &str) -> Client {
    let config = ClientConfig::from_list(endpoints).expect("endpoints parse");
    Client::connect(config).await.expect("connect to etcd")
}

/// The next item of a watch, failing the test after `patience()`.
async fn next_event(watch: &mut WatchStream) -> Result<WatchEvent, Error> {
    tokio::time::timeout(patience(), watch.next())
        .await
        .expect("a watch event within patience")
        .expect("the watch stream goes on")
}

/// Poll an async check until it holds, failing after `patience()`.
async fn eventually_async<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + patience();
    let mut last = String::from("never checked");
    while tokio::time::Instant::now() < deadline {
        match check().await {
            Ok(()) => return,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}; last observation: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cas_range_paging_watch_and_compaction() {
    let cluster = EtcdCluster::start(3);
    let etcd = client(&cluster.endpoints()).await;
    let other = client(&cluster.endpoints()).await;

    // Two writers race on one key, each guarding its write with the mod
    // revision it read: in every round exactly one wins.
    let key = b"/t/cas".to_vec();
    etcd.put(key.clone(), "start").await.expect("put");
    for round in 0..5 {
        let seen = etcd
            .get(key.clone())
            .await
            .expect("get")
            .expect("key exists");
        let attempt = |client: Client, value: String| {
            let key = key.clone();
            async move {
                client
                    .txn(
                        &[Compare::mod_revision(
                            key.clone(),
                            CompareOp::Equal,
                            seen.mod_revision,
                        )],
                        &[TxnOp::put(key.clone(), value)],
                        &[TxnOp::get(key)],
                    )
                    .await
                    .expect("txn")
            }
        };
        let (a, b) = tokio::join!(
            attempt(etcd.clone(), format!("a{round}")),
            attempt(other.clone(), format!("b{round}"))
        );
        assert!(
            a.succeeded != b.succeeded,
            "round {round}: exactly one writer wins: {a:?} {b:?}"
        );
        let winner = if a.succeeded { "a" } else { "b" };
        let now = etcd
            .get(key.clone())
            .await
            .expect("get")
            .expect("key exists");
        assert_eq!(now.value, format!("{winner}{round}").into_bytes());
    }
    // Compares on value, version and create revision, and on absence.
    let cas = etcd
        .get(key.clone())
        .await
        .expect("get")
        .expect("key exists");
    let txn = etcd
        .txn(
            &[
                Compare::value(key.clone(), CompareOp::Equal, cas.value.clone()),
                Compare::version(key.clone(), CompareOp::Equal, cas.version),
                Compare::create_revision(key.clone(), CompareOp::Equal, cas.create_revision),
                Compare::absent(b"/t/cas-missing".to_vec()),
            ],
            &[TxnOp::put(b"/t/cas-missing".to_vec(), "made")],
            &[],
        )
        .await
        .expect("txn");
    assert!(txn.succeeded, "every compare holds: {txn:?}");
    let txn = etcd
        .txn(&[Compare::absent(b"/t/cas-missing".to_vec())], &[], &[])
        .await
        .expect("txn");
    assert!(!txn.succeeded, "the key exists now");

    // Range paging: every page read at the first page's revision shows
    // that snapshot, whatever was written in between.
    for i in 0..25 {
        etcd.put(format!("/t/page/k{i:02}"), format!("v{i}"))
            .await
            .expect("put");
    }
    let first = etcd
        .range_page(b"/t/page/", None, 0, 10)
        .await
        .expect("first page");
    assert_eq!(first.kvs.len(), 10);
    assert!(first.more);
    etcd.put("/t/page/k15", "changed").await.expect("put");
    etcd.put("/t/page/k99", "new").await.expect("put");
    let second = etcd
        .range_page(b"/t/page/", Some(&first.kvs[9].key), first.revision, 10)
        .await
        .expect("second page");
    let keys: Vec<String> = second
        .kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
        .collect();
    assert_eq!(keys.first().map(String::as_str), Some("/t/page/k10"));
    assert_eq!(
        second.kvs[5].value, b"v15",
        "k15 as of the first page's revision"
    );
    let third = etcd
        .range_page(b"/t/page/", Some(&second.kvs[9].key), first.revision, 10)
        .await
        .expect("third page");
    assert_eq!(third.kvs.len(), 5, "k99 came after the snapshot");
    assert!(!third.more);
    let mut small_pages = ClientConfig::from_list(&cluster.endpoints()).expect("endpoints");
    small_pages.page_size = 7;
    let paged = Client::connect(small_pages).await.expect("connect");
    let (revision, all) = paged.range(b"/t/page/").await.expect("range");
    assert_eq!(all.len(), 26);
    assert!(revision > first.revision);
    assert!(all.windows(2).all(|w| w[0].key < w[1].key), "key order");

    // A watch from a past revision delivers exactly the changes after it,
    // in order, and nothing outside the prefix.
    let from = etcd.put("/t/w/a", "1").await.expect("put");
    etcd.put("/t/w/b", "1").await.expect("put");
    etcd.put("/t/x", "outside").await.expect("put");
    etcd.put("/t/w/a", "2").await.expect("put");
    etcd.delete("/t/w/b").await.expect("delete");
    etcd.txn(
        &[],
        &[TxnOp::put("/t/w/c", "1"), TxnOp::put("/t/w/d", "1")],
        &[],
    )
    .await
    .expect("txn");
    let mut watch = etcd.watch_prefix(b"/t/w/", from);
    let expected = [
        (WatchEventKind::Put, "/t/w/b", "1"),
        (WatchEventKind::Put, "/t/w/a", "2"),
        (WatchEventKind::Delete, "/t/w/b", ""),
        (WatchEventKind::Put, "/t/w/c", "1"),
        (WatchEventKind::Put, "/t/w/d", "1"),
    ];
    let mut last_revision = from;
    for (kind, key, value) in expected {
        let event = next_event(&mut watch).await.expect("an event");
        assert_eq!(
            (
                event.kind,
                event.kv.key.as_slice(),
                event.kv.value.as_slice()
            ),
            (kind, key.as_bytes(), value.as_bytes()),
            "{event:?}"
        );
        assert!(event.revision >= last_revision, "revision order");
        last_revision = event.revision;
    }
    let quiet = tokio::time::timeout(Duration::from_millis(300), watch.next()).await;
    assert!(quiet.is_err(), "no more events: {quiet:?}");
    // Live changes follow.
    let live = etcd.put("/t/w/e", "1").await.expect("put");
    let event = next_event(&mut watch).await.expect("an event");
    assert_eq!(
        (event.kv.key.as_slice(), event.revision),
        (b"/t/w/e".as_slice(), live)
    );
    drop(watch);

    // After compaction, history before it is gone: a watch or a read from
    // an older revision fails with the typed compacted error.
    etcd.compact(live).await.expect("compact");
    let mut stale = etcd.watch_prefix(b"/t/w/", from);
    match next_event(&mut stale).await {
        Err(Error::Compacted {
            compact_revision, ..
        }) => assert_eq!(compact_revision, Some(live)),
        other => panic!("expected the compacted error, got {other:?}"),
    }
    let read = etcd.range_page(b"/t/w/", None, from, 0).await;
    assert!(
        matches!(&read, Err(e) if e.is_compacted() && !e.is_transient()),
        "{read:?}"
    );
    // A watch from the compaction point on still works.
    let mut fresh = etcd.watch_prefix(b"/t/w/", live);
    let after = etcd.put("/t/w/f", "1").await.expect("put");
    assert_eq!(next_event(&mut fresh).await.expect("event").revision, after);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_expire_without_keep_alive_and_live_with_it() {
    let cluster = EtcdCluster::start(3);
    let etcd = client(&cluster.endpoints()).await;
    let ttl = Duration::from_secs(2);

    let abandoned = etcd.grant(ttl).await.expect("grant");
    let kept = etcd.grant(ttl).await.expect("grant");
    etcd.put_with_lease("/t/lease/abandoned", "x", abandoned.id)
        .await
        .expect("put");
    etcd.put_with_lease("/t/lease/kept", "x", kept.id)
        .await
        .expect("put");
    let held = etcd.get("/t/lease/kept").await.expect("get").expect("key");
    assert_eq!(held.lease, Some(kept.id));
    let keep_alive = etcd.keep_alive(kept);

    // Past twice the TTL: the abandoned lease's key is gone, the kept one
    // is still there.
    tokio::time::sleep(ttl * 2 + Duration::from_millis(500)).await;
    eventually_async("the abandoned lease's key to vanish", || async {
        match etcd.get("/t/lease/abandoned").await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(
        etcd.get("/t/lease/kept").await.expect("get").is_some(),
        "keep-alive keeps the key beyond the ttl"
    );
    assert_eq!(keep_alive.is_lost(), None);

    // Stop renewing: the key goes within the TTL (and etcd's slack).
    drop(keep_alive);
    eventually_async("the kept key to vanish once keep-alive stops", || async {
        match etcd.get("/t/lease/kept").await {
            Ok(None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Revoking deletes at once, and a keep-alive on it reports the loss.
    let revoked = etcd.grant(Duration::from_secs(30)).await.expect("grant");
    etcd.put_with_lease("/t/lease/revoked", "x", revoked.id)
        .await
        .expect("put");
    let mut watcher = etcd.keep_alive(revoked);
    etcd.revoke(revoked.id).await.expect("revoke");
    assert_eq!(etcd.get("/t/lease/revoked").await.expect("get"), None);
    let lost = tokio::time::timeout(patience(), watcher.lost())
        .await
        .expect("loss reported");
    assert_eq!(lost, LeaseLost::Expired(revoked.id));
    let again = etcd.revoke(revoked.id).await;
    assert!(
        matches!(again, Err(Error::LeaseNotFound { .. })),
        "{again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_member_is_failed_over_and_rejoins_after_restart() {
    let mut cluster = EtcdCluster::start(3);
    let etcd = client(&cluster.endpoints()).await;
    let before = etcd.put("/t/f/before", "1").await.expect("put");
    let mut watch = etcd.watch_prefix(b"/t/f/", before);
    let lease = etcd.grant(Duration::from_secs(3)).await.expect("grant");
    let keep_alive = etcd.keep_alive(lease);

    let used = etcd.current_endpoint().await.expect("connected");
    let killed = cluster.index_of(used.url()).expect("a member's endpoint");
    cluster.kill(killed);

    // Writes go on through another member. One may meet the election that
    // follows when the killed member led; such errors are transient.
    let deadline = tokio::time::Instant::now() + patience();
    let written = loop {
        match etcd.put("/t/f/after", "2").await {
            Ok(revision) => break revision,
            Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                eprintln!("put during failover: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("put after killing member {killed}: {e}"),
        }
    };
    let now = etcd.current_endpoint().await.expect("connected");
    assert_ne!(now, used, "the client moved off the killed member");

    // The watch resumed on another member without losing or repeating.
    let event = next_event(&mut watch).await.expect("event after failover");
    assert_eq!(
        (event.kv.key.as_slice(), event.revision),
        (b"/t/f/after".as_slice(), written)
    );
    // The keep-alive moved too: the lease outlives its TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(keep_alive.is_lost(), None, "lease kept through failover");

    // The restarted member rejoins and serves what was written while it
    // was down (a linearizable read through it alone).
    cluster.restart(killed);
    let only_it = client(&cluster.endpoint(killed)).await;
    let value = only_it.get("/t/f/after").await.expect("get").expect("key");
    assert_eq!(value.mod_revision, written);
    let status = only_it.status().await.expect("status");
    assert_ne!(status.leader, 0, "the rejoined member sees a leader");
    only_it
        .put("/t/f/rejoined", "3")
        .await
        .expect("put via rejoined member");
}

/// Leader election (the pattern the HA control plane leads with): the
/// first candidate leads, the others wait in create-revision order; a
/// resignation hands over at once, an expired lease after its TTL; and a
/// leader that lost its key can no longer commit a fenced write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_leader_at_a_time_and_old_leaders_are_fenced() {
    let cluster = EtcdCluster::start(3);
    let etcd = client(&cluster.endpoints()).await;
    let election = hotswap_etcd::Election::new(etcd.clone(), b"/t/election/".to_vec());
    let ttl = Duration::from_secs(2);

    let first = etcd.grant(ttl).await.expect("grant");
    let first_alive = etcd.keep_alive(first);
    let a = tokio::time::timeout(patience(), election.campaign(first.id, b"a"))
        .await
        .expect("the only candidate leads at once")
        .expect("campaign");

    // Two more candidates wait behind it, in the order they joined.
    let second = etcd.grant(ttl).await.expect("grant");
    let second_alive = etcd.keep_alive(second);
    let b_campaign = tokio::spawn({
        let election = election.clone();
        async move { election.campaign(second.id, b"b").await }
    });
    eventually_async("b is a candidate", || {
        let etcd = etcd.clone();
        let key = election.key_of(second.id);
        async move {
            match etcd.get(key).await {
                Ok(Some(_)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    let third = etcd.grant(ttl).await.expect("grant");
    let third_alive = etcd.keep_alive(third);
    let c_campaign = tokio::spawn({
        let election = election.clone();
        async move { election.campaign(third.id, b"c").await }
    });
    let leader = election
        .leader()
        .await
        .expect("leader")
        .expect("someone leads");
    assert_eq!(leader.value, b"a");
    assert!(!b_campaign.is_finished() && !c_campaign.is_finished());

    // The leader's fenced write commits.
    let fenced = |l: &hotswap_etcd::Leadership, value: &str| {
        (
            vec![l.fence()],
            vec![TxnOp::put(b"/t/owned".to_vec(), value.to_string())],
        )
    };
    let (compares, ops) = fenced(&a, "by a");
    assert!(etcd.txn(&compares, &ops, &[]).await.expect("txn").succeeded);

    // A resigns: B leads at once, and A's writes no longer commit.
    election.resign(&a).await.expect("resign");
    let b = tokio::time::timeout(patience(), b_campaign)
        .await
        .expect("b leads after the resignation")
        .expect("task")
        .expect("campaign");
    assert!(
        !etcd.txn(&compares, &ops, &[]).await.expect("txn").succeeded,
        "a is fenced"
    );
    let (compares, ops) = fenced(&b, "by b");
    assert!(etcd.txn(&compares, &ops, &[]).await.expect("txn").succeeded);
    assert!(!c_campaign.is_finished(), "c still waits behind b");
    drop(first_alive);

    // B stops renewing (a paused process): after its TTL, C leads, and
    // B's write, however late it comes, changes nothing.
    drop(second_alive);
    let c = tokio::time::timeout(patience(), c_campaign)
        .await
        .expect("c leads once b's lease expired")
        .expect("task")
        .expect("campaign");
    assert!(
        !etcd.txn(&compares, &ops, &[]).await.expect("txn").succeeded,
        "b is fenced"
    );
    let owned = etcd
        .get(b"/t/owned".to_vec())
        .await
        .expect("get")
        .expect("owned");
    assert_eq!(owned.value, b"by b");
    assert_eq!(
        election.leader().await.expect("leader").map(|kv| kv.value),
        Some(b"c".to_vec())
    );
    assert_eq!(c.lease, third.id);
    drop(third_alive);
}

/// A client for a TLS cluster, with the cluster's CA and, if `with_cert`,
/// its client certificate, all read from the cluster's files.
fn tls_config(cluster: &EtcdCluster, with_cert: bool) -> ClientConfig {
    let files = cluster.tls().expect("a TLS cluster");
    let tls = if with_cert {
        EtcdTls::from_files(
            &files.ca_file,
            Some(&files.client_cert_file),
            Some(&files.client_key_file),
        )
    } else {
        EtcdTls::from_files(&files.ca_file, None, None)
    }
    .expect("the cluster's TLS files load");
    ClientConfig::from_list(&cluster.endpoints())
        .expect("endpoints parse")
        .with_tls(tls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_get_and_watch_over_mutual_tls() {
    let cluster = EtcdCluster::start_tls(1, true);
    let etcd = Client::connect(tls_config(&cluster, true))
        .await
        .expect("connect over mutual TLS");
    let from = etcd.put("/t/tls/a", "1").await.expect("put");
    let read = etcd
        .get("/t/tls/a")
        .await
        .expect("get")
        .expect("the key exists");
    assert_eq!(read.value, b"1");
    let mut watch = etcd.watch_prefix(b"/t/tls/", from);
    let written = etcd.put("/t/tls/b", "2").await.expect("put");
    let event = next_event(&mut watch).await.expect("an event");
    assert_eq!(
        (event.kind, event.kv.key.as_slice(), event.revision),
        (WatchEventKind::Put, b"/t/tls/b".as_slice(), written)
    );
    // Neither this client nor etcd's own gateway (which dials the client
    // port with the server certificate) was turned away.
    let log = cluster.log(0);
    assert!(
        !log.contains("rejected connection"),
        "the member rejected a connection:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_signed_by_another_ca_is_refused() {
    let cluster = EtcdCluster::start_tls(1, true);
    let files = cluster.tls().expect("a TLS cluster");
    let stranger = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
        .expect("generate a certificate")
        .cert
        .pem();
    // The client certificate is right; only the CA it trusts is wrong.
    let client_cert = std::fs::read_to_string(&files.client_cert_file).expect("read the cert");
    let client_key = std::fs::read_to_string(&files.client_key_file).expect("read the key");
    let tls = EtcdTls::from_pem(&stranger, Some((&client_cert, &client_key))).expect("valid PEM");
    let config = ClientConfig::from_list(&cluster.endpoints())
        .expect("endpoints parse")
        .with_tls(tls);
    let error = Client::connect(config)
        .await
        .expect_err("a member whose certificate the client cannot verify is refused")
        .to_string();
    assert!(
        error.contains("invalid peer certificate") && error.contains(&cluster.endpoint(0)),
        "the error names the endpoint and says its certificate is the problem: {error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused_by_client_cert_auth() {
    let cluster = EtcdCluster::start_tls(1, true);
    // With TLS 1.3 the client finishes its handshake before the member has
    // checked the (missing) client certificate, so the refusal comes at the
    // first call. The member sends an alert ("bad certificate") and closes,
    // but the client may see only the close (a closed connection, a broken
    // pipe or a reset, depending on which side of the socket loses the
    // race), so the call's error says the connection broke, and the
    // member's log says why.
    let etcd = Client::connect(tls_config(&cluster, false))
        .await
        .expect("the TLS 1.3 handshake completes before the member checks");
    let refused = etcd
        .put("/t/tls/no-cert", "1")
        .await
        .expect_err("a write without a client certificate is refused");
    assert!(
        matches!(
            &refused,
            Error::Status {
                code: tonic::Code::Unavailable | tonic::Code::Cancelled,
                message,
                ..
            } if message.contains("transport error")
        ),
        "the call fails as a refused connection: {refused}"
    );
    let read = etcd.get("/t/tls/no-cert").await;
    assert!(read.is_err(), "reads are refused too: {read:?}");
    eventually_async("the member logs why it refused the client", || async {
        let log = cluster.log(0);
        if log.contains("client didn't provide a certificate") {
            Ok(())
        } else {
            Err(format!("no such line in its log:\n{log}"))
        }
    })
    .await;
    // Nothing was written: a client with a certificate sees no key.
    let etcd = Client::connect(tls_config(&cluster, true))
        .await
        .expect("connect over mutual TLS");
    assert_eq!(etcd.get("/t/tls/no-cert").await.expect("get"), None);
}
