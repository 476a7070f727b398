//! The etcd backend of the storage port against a real etcd cluster, with
//! two stores standing for two control-plane replicas: records written by
//! one are read by the other; atomic changes decide once between racing
//! replicas; desired-state changes reach the other replica's watch in order;
//! the event log stays gap-free and the audit log one chain while both
//! append; and a fenced leader that lost its leadership changes nothing.

use std::time::Duration;

use hotswap_common::labels::Labels;
use hotswap_control_plane::audit::{AuditEntry, AuditLog};
use hotswap_control_plane::events::{Event, EventLog};
use hotswap_control_plane::store::FreezeRecord;
use hotswap_control_plane::store::etcd::{ClusterRecord, EtcdStore};
use hotswap_control_plane::store::keys::Keys;
use hotswap_control_plane::store::{
    ArtifactRecord, Direction, EnrollError, EnrollRejection, LogName, NodeRecord, SessionRecords,
    Store, TokenRecord, UserRecord,
};
use hotswap_etcd::{Client, ClientConfig};
use hotswap_tests::{EtcdCluster, patience};

async fn client(endpoints: &str) -> Client {
    let config = ClientConfig::from_list(endpoints).expect("endpoints parse");
    Client::connect(config).await.expect("connect to etcd")
}

/// Two replicas' stores on one freshly initialized prefix.
async fn two_replicas(cluster: &EtcdCluster, prefix: &str) -> (Store, Store, EtcdStore) {
    let keys = Keys::new(prefix).expect("prefix");
    let etcd = client(&cluster.endpoints()).await;
    let record = ClusterRecord {
        id: "test".into(),
        created_at_ms: 1,
    };
    EtcdStore::init(&etcd, &keys, &record).await.expect("init");
    let a = EtcdStore::open(client(&cluster.endpoints()).await, keys.clone())
        .await
        .expect("open a");
    let b = EtcdStore::open(client(&cluster.endpoints()).await, keys)
        .await
        .expect("open b");
    (Store::etcd(a.clone()), Store::etcd(b), a)
}

fn token(uses: u32) -> TokenRecord {
    TokenRecord {
        created_at_ms: 0,
        expires_at_ms: u64::MAX,
        uses_total: uses,
        uses_left: uses,
        labels: [("environment".to_string(), "qa".to_string())].into(),
        created_by: "admin".into(),
    }
}

fn node(id: &str, name: &str) -> NodeRecord {
    NodeRecord {
        id: id.into(),
        name: name.into(),
        labels: Labels::new(),
        forced_labels: Labels::new(),
        enrolled_at_ms: 1,
        cert_fingerprint: format!("sha256:{id}"),
        cert_not_after_ms: 2,
        last_seen_ms: None,
        agent_version: "0.1.0".into(),
        previous_cert_fingerprint: None,
        previous_cert_not_after_ms: 0,
        token_hash: String::new(),
        enroll_key: String::new(),
    }
}

/// Poll a check until it holds, failing after `patience()`.
async fn eventually(what: &str, check: impl Fn() -> Result<(), String>) {
    let deadline = tokio::time::Instant::now() + patience();
    let mut last = String::from("never checked");
    while tokio::time::Instant::now() < deadline {
        match check() {
            Ok(()) => return,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}; last observation: {last}");
}

/// As [`eventually`], answering what the check found.
async fn eventually_value<T>(what: &str, check: impl Fn() -> Result<T, String>) -> T {
    let deadline = tokio::time::Instant::now() + patience();
    let mut last = String::from("never checked");
    while tokio::time::Instant::now() < deadline {
        match check() {
            Ok(value) => return value,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}; last observation: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_claims_a_prefix_once_and_open_needs_it() {
    let cluster = EtcdCluster::start(1);
    let etcd = client(&cluster.endpoints()).await;
    let keys = Keys::new("/init-test/").expect("prefix");
    let missing = EtcdStore::open(etcd.clone(), keys.clone()).await;
    let error = missing
        .err()
        .expect("open before init is refused")
        .to_string();
    assert!(
        error.contains("no hotswap cluster under etcd prefix /init-test/"),
        "{error}"
    );

    let record = ClusterRecord {
        id: "c-1".into(),
        created_at_ms: 0,
    };
    EtcdStore::init(&etcd, &keys, &record)
        .await
        .expect("first init");
    let again = EtcdStore::init(&etcd, &keys, &record).await;
    let error = again.expect_err("second init refused").to_string();
    assert!(
        error.contains("already lives under etcd prefix /init-test/"),
        "{error}"
    );
    EtcdStore::open(etcd, keys).await.expect("open after init");
}

/// Records one replica writes are what the other reads; racing
/// enrollments and creations decide once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_shared_and_atomic_changes_decide_once() {
    let cluster = EtcdCluster::start(3);
    let (a, b, _) = two_replicas(&cluster, "/records/").await;

    a.insert_token("t1", &token(1)).await.expect("token");
    eventually("b sees the token", || {
        b.get_token("t1")
            .map_err(|e| e.to_string())?
            .map(|_| ())
            .ok_or_else(|| "not yet".to_string())
    })
    .await;

    // Both replicas enroll with a one-use token at once: exactly one wins,
    // the other is told the uses are gone.
    let (first, second) = tokio::join!(
        a.enroll("t1", 5, node("n-a", "web-a")),
        b.enroll("t1", 5, node("n-b", "web-b"))
    );
    let outcomes = [first, second];
    let won: Vec<&NodeRecord> = outcomes.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(won.len(), 1, "exactly one enrollment wins: {outcomes:?}");
    assert!(
        outcomes
            .iter()
            .any(|r| matches!(r, Err(EnrollError::Rejected(EnrollRejection::UsedUp(1))))),
        "{outcomes:?}"
    );
    let winner = won[0].clone();
    assert_eq!(
        winner.labels.get("environment").map(String::as_str),
        Some("qa")
    );
    eventually("both see the node and its name", || {
        for store in [&a, &b] {
            let by_name = store
                .node_id_by_name(&winner.name)
                .map_err(|e| e.to_string())?;
            if by_name.as_deref() != Some(winner.id.as_str()) {
                return Err(format!("name index {by_name:?}"));
            }
        }
        Ok(())
    })
    .await;
    assert_eq!(
        b.get_token("t1").expect("read").expect("token").uses_left,
        0
    );

    // A name taken through one replica is taken for the other.
    a.insert_token("t2", &token(5)).await.expect("token");
    b.flush().await.expect("flush");
    eventually("b sees t2", || {
        b.get_token("t2")
            .map_err(|e| e.to_string())?
            .map(|_| ())
            .ok_or_else(|| "not yet".into())
    })
    .await;
    let taken = b.enroll("t2", 5, node("n-c", &winner.name)).await;
    assert!(
        matches!(
            taken,
            Err(EnrollError::Rejected(EnrollRejection::NameTaken { .. }))
        ),
        "{taken:?}"
    );

    // Creating the same user on both: one creates, one is told it exists.
    let user = UserRecord {
        name: "ops".into(),
        role: hotswap_control_plane::roles::Role::Deployer,
        created_at_ms: 0,
        created_by: "admin".into(),
        cert_fingerprint: "sha256:x".into(),
        cert_not_after_ms: 1,
        revoked_at_ms: None,
    };
    let (x, y) = tokio::join!(a.create_user(&user), b.create_user(&user));
    let created = [x.expect("create a"), y.expect("create b")];
    assert_eq!(created.iter().filter(|c| **c).count(), 1, "{created:?}");

    // Artifact records: create-only, and a guarded read-modify-write.
    let artifact = ArtifactRecord {
        name: "web".into(),
        version: "1.0.0".into(),
        digest: "sha256:abc".into(),
        size: 3,
        runtime: "file".into(),
        manifest: String::new(),
        signatures: Vec::new(),
        pushed_at_ms: 0,
        pushed_by: "ci".into(),
        yanked: None,
    };
    assert_eq!(a.insert_artifact(&artifact).await.expect("insert"), None);
    let existing = b.insert_artifact(&artifact).await.expect("insert again");
    assert_eq!(
        existing.as_ref().map(|r| r.digest.as_str()),
        Some("sha256:abc")
    );
    let updated = b
        .update_artifact("web", "1.0.0", &|record| {
            record.size = 4;
            true
        })
        .await
        .expect("update")
        .expect("record");
    assert_eq!(updated.size, 4);
    eventually("a sees the update", || {
        match a.get_artifact("web", "1.0.0").map_err(|e| e.to_string())? {
            Some(r) if r.size == 4 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    // Node records changed from both replicas at once (a session's labels
    // on one, a renewal on the other): guarded, so no change is lost.
    let (from_a, from_b) = tokio::join!(
        async {
            for i in 0..15 {
                let key = format!("a{i}");
                a.update_node(&winner.id, &|record| {
                    record.labels.insert(key.clone(), "1".into());
                    true
                })
                .await
                .expect("update from a")
                .expect("node exists");
            }
        },
        async {
            for i in 0..15 {
                let key = format!("b{i}");
                b.update_node(&winner.id, &|record| {
                    record.labels.insert(key.clone(), "1".into());
                    true
                })
                .await
                .expect("update from b")
                .expect("node exists");
            }
        }
    );
    let ((), ()) = (from_a, from_b);
    eventually("both see all 30 label changes", || {
        for store in [&a, &b] {
            let record = store
                .get_node(&winner.id)
                .map_err(|e| e.to_string())?
                .ok_or("node gone")?;
            let ours = record
                .labels
                .keys()
                .filter(|k| k.starts_with('a') || k.starts_with('b'))
                .count();
            if ours != 30 {
                return Err(format!("{ours} of 30: {:?}", record.labels));
            }
        }
        Ok(())
    })
    .await;

    // Removal takes the name with it, and a change from the other replica
    // right after (its view may not have the removal yet) does not bring
    // the node back.
    let removed = b.remove_node(&winner.id).await.expect("remove");
    assert_eq!(removed.map(|n| n.id), Some(winner.id.clone()));
    let late = a
        .update_node(&winner.id, &|record| {
            record.last_seen_ms = Some(99);
            true
        })
        .await
        .expect("update after removal");
    assert!(late.is_none(), "a removed node was written back: {late:?}");
    assert!(!b.has_node(&winner.id).expect("read"), "node revived");
    eventually("a sees the removal", || {
        if a.has_node(&winner.id).map_err(|e| e.to_string())?
            || a.node_id_by_name(&winner.name)
                .map_err(|e| e.to_string())?
                .is_some()
        {
            return Err("still there".into());
        }
        Ok(())
    })
    .await;
}

/// Desired states written by one replica reach the other's watch, many
/// nodes per transaction, in revision and node order, removals included;
/// a second watch from a revision replays only what came after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn desired_changes_reach_the_other_replica_in_order() {
    let cluster = EtcdCluster::start(1);
    let (a, b, _) = two_replicas(&cluster, "/desired/").await;
    let start = b.desired_revision().expect("revision");
    let mut watch = b.watch_desired(start).expect("watch");

    // More nodes than one etcd transaction takes.
    let nodes: Vec<String> = (0..300).map(|i| format!("n-{i:03}")).collect();
    for node in &nodes {
        let record = a
            .update_desired_unflushed(node, &|record| {
                record.modules.entry("web".into()).or_default().version = "2.0.0".into();
                true
            })
            .expect("update");
        assert_eq!(record.generation, 1);
    }
    // Read-your-writes before the flush.
    assert_eq!(
        a.get_desired("n-007").expect("get").modules["web"].version,
        "2.0.0"
    );
    a.flush_desired().await.expect("flush");

    let mut seen = Vec::new();
    let mut last = (0, String::new());
    while seen.len() < nodes.len() {
        let update = tokio::time::timeout(patience(), watch.next())
            .await
            .expect("an update within patience")
            .expect("watch goes on");
        let position = (update.revision, update.node_id.clone());
        assert!(position > last, "{position:?} after {last:?}");
        last = position;
        let record = update.record.expect("a write");
        assert_eq!(record.modules["web"].version, "2.0.0");
        assert_eq!(record.revision, update.revision);
        seen.push(update.node_id);
    }
    seen.sort();
    assert_eq!(seen, nodes);
    let middle = b.get_desired("n-150").expect("get");
    assert_eq!(middle.generation, 1);

    // A later watch from the middle revision gets only what followed.
    let after = b.desired_revision().expect("revision");
    a.remove_desired("n-000").await.expect("remove");
    let update = tokio::time::timeout(patience(), watch.next())
        .await
        .expect("the removal within patience")
        .expect("watch goes on");
    assert_eq!((update.node_id.as_str(), update.record), ("n-000", None));
    let mut later = b.watch_desired(after).expect("watch from the middle");
    a.update_desired("n-001", &|record| {
        record.modules.entry("web".into()).or_default().version = "3.0.0".into();
        true
    })
    .await
    .expect("update");
    let next = tokio::time::timeout(patience(), later.next())
        .await
        .expect("an update within patience")
        .expect("watch goes on");
    assert_eq!(next.node_id, "n-001");
    assert_eq!(next.record.expect("write").generation, 2);
}

/// Session records (SPEC §7): each replica writes under its own lease,
/// the other sees them through its watch and its listing; a removal takes
/// only the record its writer wrote (not one another replica wrote since);
/// and a replica's records vanish when its lease ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_records_live_under_their_replicas_lease() {
    let cluster = EtcdCluster::start(1);
    let keys = Keys::new("/sessions-test/").expect("prefix");
    let etcd = client(&cluster.endpoints()).await;
    let record = ClusterRecord {
        id: "test".into(),
        created_at_ms: 1,
    };
    EtcdStore::init(&etcd, &keys, &record).await.expect("init");
    let a = EtcdStore::open(client(&cluster.endpoints()).await, keys.clone())
        .await
        .expect("open a");
    let b = EtcdStore::open(client(&cluster.endpoints()).await, keys)
        .await
        .expect("open b");
    assert!(
        a.put_sessions(vec![("n1".into(), b"x".to_vec())])
            .await
            .is_err(),
        "no lease, no records"
    );
    let lease_a = etcd.grant(Duration::from_secs(2)).await.expect("grant a");
    let lease_b = etcd.grant(Duration::from_secs(30)).await.expect("grant b");
    a.set_session_lease(lease_a.id);
    b.set_session_lease(lease_b.id);
    let mut watch = b.watch_sessions();

    // More records than one transaction takes.
    let records: Vec<(String, Vec<u8>)> = (0..130)
        .map(|i| (format!("n{i:03}"), format!("a{i}").into_bytes()))
        .collect();
    let written = a.put_sessions(records.clone()).await.expect("put");
    assert_eq!(written.len(), 130);
    let first = tokio::time::timeout(patience(), watch.recv())
        .await
        .expect("within patience")
        .expect("watch");
    assert_eq!(first.node_id, "n000");
    assert_eq!(first.record.as_deref(), Some(&b"a0"[..]));
    eventually("b lists a's records", || {
        let listed = b.list_sessions();
        (listed == records)
            .then_some(())
            .ok_or(format!("{} listed", listed.len()))
    })
    .await;

    // n001 reconnects to b: a's late removal leaves b's record alone.
    let revision_a = written
        .iter()
        .find(|(node, _)| node == "n001")
        .map(|(_, revision)| *revision)
        .expect("n001 written");
    b.put_sessions(vec![("n001".into(), b"b1".to_vec())])
        .await
        .expect("put b");
    assert!(!a.remove_session("n001", revision_a).await.expect("remove"));
    // n000 ends on a: its record goes.
    assert!(a.remove_session("n000", revision_a).await.expect("remove"));
    eventually("n000 removed, n001 b's", || {
        let listed = b.list_sessions();
        let n000 = listed.iter().any(|(node, _)| node == "n000");
        let n001 = listed
            .iter()
            .find(|(node, _)| node == "n001")
            .map(|(_, bytes)| bytes.clone());
        (!n000 && n001.as_deref() == Some(&b"b1"[..]))
            .then_some(())
            .ok_or(format!("n000 listed: {n000}, n001: {n001:?}"))
    })
    .await;

    // a's lease is not kept alive: its records vanish with it; b's stays.
    eventually("a's records vanish with its lease", || {
        let listed = a.list_sessions();
        (listed == vec![("n001".to_string(), b"b1".to_vec())])
            .then_some(())
            .ok_or(format!("{} listed", listed.len()))
    })
    .await;
}

/// Both replicas append events and audit records at once: the event log
/// holds every one under gap-free numbers that match their records, each
/// replica's live stream shows all of them in order, and the audit log is
/// one verifiable chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_stay_gap_free_and_one_chain_with_two_writers() {
    let cluster = EtcdCluster::start(3);
    let (a, b, _) = two_replicas(&cluster, "/logs/").await;
    let events_a = std::sync::Arc::new(EventLog::open(&a, 100_000).expect("events a"));
    let events_b = std::sync::Arc::new(EventLog::open(&b, 100_000).expect("events b"));
    events_a.follow_commits().expect("a shared log");
    events_b.follow_commits().expect("a shared log");
    let mut live = events_b.subscribe();

    let per_replica = 150;
    let write = |log: std::sync::Arc<EventLog>, store: Store, who: &'static str| async move {
        for i in 0..per_replica {
            log.append(Event::new("test.event", format!("{who}-{i}")));
            if i % 10 == 0 {
                store.flush().await.expect("flush");
            }
        }
        store.flush().await.expect("flush");
    };
    tokio::join!(
        write(events_a.clone(), a.clone(), "a"),
        write(events_b.clone(), b.clone(), "b")
    );

    let total = 2 * per_replica as u64;
    let mut heard = Vec::new();
    while heard.len() < total as usize {
        let event = tokio::time::timeout(patience(), live.recv())
            .await
            .expect("a live event within patience")
            .expect("live stream");
        heard.push(event);
    }
    let seqs: Vec<u64> = heard.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=total).collect::<Vec<_>>(),
        "live order, gap-free"
    );
    for (replica, store) in [("a", &a), ("b", &b)] {
        let log = store.log(LogName::Events).expect("log");
        eventually("the replica's mirror holds every event", || {
            let count = log.count().map_err(|e| e.to_string())?;
            (count == total)
                .then_some(())
                .ok_or(format!("{count} events"))
        })
        .await;
        let stored: Vec<(u64, Vec<u8>)> = log
            .range(0, Direction::Forward)
            .collect::<Result<_, _>>()
            .expect("read");
        assert_eq!(stored.len() as u64, total, "replica {replica}");
        for (i, (seq, bytes)) in stored.iter().enumerate() {
            let event: Event = serde_json::from_slice(bytes).expect("event json");
            assert_eq!((*seq, event.seq), (i as u64 + 1, i as u64 + 1));
        }
        let mut messages: Vec<String> = stored
            .iter()
            .map(|(_, b)| serde_json::from_slice::<Event>(b).expect("json").message)
            .collect();
        messages.sort();
        messages.dedup();
        assert_eq!(messages.len() as u64, total, "every event once");
    }

    let audit_a = AuditLog::open(&a).expect("audit a");
    let audit_b = AuditLog::open(&b).expect("audit b");
    let entry = |who: &str, i: usize| AuditEntry {
        user: who.into(),
        role: "admin".into(),
        action: "test".into(),
        target: format!("{who}-{i}"),
        result: "ok",
        detail: String::new(),
        trace_id: String::new(),
        peer: None,
    };
    async fn append_all(log: &AuditLog, entries: Vec<AuditEntry>) {
        for entry in entries {
            log.append(entry).await.expect("audit append");
        }
    }
    tokio::join!(
        append_all(&audit_a, (0..30).map(|i| entry("a", i)).collect()),
        append_all(&audit_b, (0..30).map(|i| entry("b", i)).collect())
    );
    // Each replica's mirror catches up with the other's last append.
    eventually("both replicas hold all 60 audit records", || {
        let lens = (audit_a.len(), audit_b.len());
        (lens == (60, 60)).then_some(()).ok_or(format!("{lens:?}"))
    })
    .await;
    for audit in [&audit_a, &audit_b] {
        let verification = audit.verify().expect("verify");
        assert_eq!(verification.records, 60);
        assert_eq!(verification.broken, None);
    }
}

/// A leader fences its writes with its election key: once its lease is
/// gone, nothing it flushes commits, and the records stay as they were.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_lost_its_lease_changes_nothing() {
    let cluster = EtcdCluster::start(1);
    let (a, b, raw_a) = two_replicas(&cluster, "/fence/").await;
    let etcd = client(&cluster.endpoints()).await;
    let election = hotswap_etcd::Election::new(etcd.clone(), b"/fence/election/".to_vec());
    let lease = etcd.grant(Duration::from_secs(5)).await.expect("grant");
    let leadership = election.campaign(lease.id, b"a").await.expect("lead");
    raw_a.set_fence(Some(leadership.fence()));

    a.update_desired("n-1", &|record| {
        record.modules.entry("web".into()).or_default().version = "1".into();
        true
    })
    .await
    .expect("a fenced write while leading");

    etcd.revoke(lease.id).await.expect("revoke");
    let stale = a
        .update_desired("n-1", &|record| {
            record.modules.entry("web".into()).or_default().version = "2".into();
            true
        })
        .await;
    let error = stale
        .expect_err("a write after the lease is gone")
        .to_string();
    assert!(error.contains("lost its leadership"), "{error}");
    let event = EventLog::open(&a, 10).expect("events");
    event.append(Event::new("test.stale", "from the old leader"));
    assert!(a.flush().await.is_err(), "the stale event is not committed");

    // The other replica sees version 1, and no event.
    eventually("b sees the first write", || {
        let record = b.get_desired("n-1").map_err(|e| e.to_string())?;
        match record.modules.get("web").map(|m| m.version.as_str()) {
            Some("1") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        b.get_desired("n-1").expect("get").modules["web"].version,
        "1"
    );
    assert_eq!(
        b.log(LogName::Events).expect("log").count().expect("count"),
        0
    );
}

/// The replica's own leadership (`replica::lead`), not a fence set by
/// hand: once its keep-alive says the lease is lost, the fence stays on
/// the store, so nothing the old leader still flushes before it restarts
/// commits once its election key is gone. Clearing the fence there made
/// those writes unconditional, so they landed after the next leader's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_lost_its_lease_stays_fenced() {
    let cluster = EtcdCluster::start(1);
    let (a, b, raw_a) = two_replicas(&cluster, "/fence-kept/").await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let mut leading = hotswap_control_plane::replica::lead(
        &raw_a,
        &hotswap_control_plane::store::etcd::Leader {
            name: "a".into(),
            endpoint: None,
        },
        Duration::from_secs(5),
        &shutdown,
    )
    .await
    .expect("campaign")
    .expect("leads");
    a.update_desired("n-1", &|record| {
        record.modules.entry("web".into()).or_default().version = "1".into();
        true
    })
    .await
    .expect("a fenced write while leading");

    // The lease ends in etcd (as when it expires during a partition).
    let etcd = client(&cluster.endpoints()).await;
    let (_, candidates) = etcd
        .range(raw_a.keys().election().as_bytes())
        .await
        .expect("the election");
    for lease in candidates.iter().filter_map(|kv| kv.lease) {
        etcd.revoke(lease).await.expect("revoke");
    }
    let lost = tokio::time::timeout(patience(), leading.lost())
        .await
        .expect("the keep-alive notices the lease is gone");
    eprintln!("lost: {lost}");

    let stale = a
        .update_desired("n-1", &|record| {
            record.modules.entry("web".into()).or_default().version = "2".into();
            true
        })
        .await;
    let error = stale
        .expect_err("a write after the lease was lost")
        .to_string();
    assert!(error.contains("lost its leadership"), "{error}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        b.get_desired("n-1").expect("get").modules["web"].version,
        "1"
    );
}

/// `count` replicas' stores on one freshly initialized prefix.
async fn replicas(cluster: &EtcdCluster, prefix: &str, count: usize) -> Vec<Store> {
    let keys = Keys::new(prefix).expect("prefix");
    let etcd = client(&cluster.endpoints()).await;
    let record = ClusterRecord {
        id: "test".into(),
        created_at_ms: 1,
    };
    EtcdStore::init(&etcd, &keys, &record).await.expect("init");
    let mut stores = Vec::new();
    for _ in 0..count {
        let store = EtcdStore::open(client(&cluster.endpoints()).await, keys.clone())
            .await
            .expect("open");
        stores.push(Store::etcd(store));
    }
    stores
}

/// A node as an agent enrolling with key `key` asks for it.
fn keyed_node(id: &str, name: &str, key: &str) -> NodeRecord {
    NodeRecord {
        enroll_key: key.into(),
        token_hash: "t".into(),
        ..node(id, name)
    }
}

async fn wait_for_token(store: &Store, hash: &str) {
    eventually("the replica sees the token", || {
        store
            .get_token(hash)
            .map_err(|e| e.to_string())?
            .map(|_| ())
            .ok_or_else(|| "not yet".to_string())
    })
    .await;
}

/// 200 agents enrolling with one join token through one replica at once
/// (the bootstrap of a fleet): every one is enrolled, none refused, and
/// the token has spent exactly 200 uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_enrollments_with_one_token_through_one_replica_all_succeed() {
    let cluster = EtcdCluster::start(3);
    let stores = replicas(&cluster, "/enroll-one/", 1).await;
    let store = &stores[0];
    store.insert_token("t", &token(500)).await.expect("token");

    let count = 200;
    let outcomes = futures_util::future::join_all((0..count).map(|i| {
        let store = store.clone();
        async move {
            store
                .enroll(
                    "t",
                    5,
                    keyed_node(&format!("n-{i}"), &format!("web-{i}"), &format!("k-{i}")),
                )
                .await
        }
    }))
    .await;
    let failed: Vec<String> = outcomes
        .iter()
        .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
        .collect();
    assert!(failed.is_empty(), "{} refused: {failed:?}", failed.len());
    for (i, outcome) in outcomes.iter().enumerate() {
        let record = outcome.as_ref().expect("enrolled");
        assert_eq!(record.id, format!("n-{i}"));
        assert_eq!(
            record.labels.get("environment").map(String::as_str),
            Some("qa"),
            "token label forced"
        );
        assert_eq!(
            store
                .node_id_by_name(&format!("web-{i}"))
                .expect("read")
                .as_deref(),
            Some(record.id.as_str())
        );
    }
    assert_eq!(
        store
            .get_token("t")
            .expect("read")
            .expect("token")
            .uses_left,
        300
    );
    assert_eq!(store.list_nodes().expect("list").len(), count);
}

/// A token with 60 uses and 150 agents enrolling with it at once through
/// three replicas: exactly 60 are enrolled, the other 90 are told the uses
/// are gone (no conflict error), and the event log and the audit chain that
/// every enrollment appends to, as the service does, stay gap-free and one
/// chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_spends_exactly_its_uses_across_replicas() {
    let cluster = EtcdCluster::start(3);
    let stores = replicas(&cluster, "/enroll-many/", 3).await;
    let uses = 60;
    stores[0]
        .insert_token("t", &token(uses))
        .await
        .expect("token");
    for store in &stores {
        wait_for_token(store, "t").await;
    }
    let logs: Vec<(std::sync::Arc<EventLog>, AuditLog)> = stores
        .iter()
        .map(|store| {
            let events = std::sync::Arc::new(EventLog::open(store, 100_000).expect("events"));
            events.follow_commits().expect("a shared log");
            (events, AuditLog::open(store).expect("audit"))
        })
        .collect();

    let agents = 150;
    let outcomes = futures_util::future::join_all((0..agents).map(|i| {
        let replica = i % stores.len();
        let store = stores[replica].clone();
        let (events, audit) = &logs[replica];
        async move {
            let name = format!("web-{i}");
            let outcome = store
                .enroll(
                    "t",
                    5,
                    keyed_node(&format!("n-{i}"), &name, &format!("k-{i}")),
                )
                .await;
            // What the enrollment service records for every attempt.
            if let Ok(record) = &outcome {
                events.append(Event::new("node.enrolled", format!("{name} {}", record.id)));
            }
            audit
                .append(AuditEntry {
                    user: "join-token:t".into(),
                    role: "node".into(),
                    action: "nodes.enroll".into(),
                    target: name,
                    result: if outcome.is_ok() { "ok" } else { "denied" },
                    detail: String::new(),
                    trace_id: String::new(),
                    peer: None,
                })
                .await
                .expect("audit append");
            store.flush().await.expect("flush");
            outcome
        }
    }))
    .await;

    let enrolled: Vec<&NodeRecord> = outcomes.iter().filter_map(|r| r.as_ref().ok()).collect();
    let used_up = outcomes
        .iter()
        .filter(|r| {
            matches!(
                r,
                Err(EnrollError::Rejected(EnrollRejection::UsedUp(n))) if *n == uses
            )
        })
        .count();
    let other: Vec<String> = outcomes
        .iter()
        .filter_map(|r| match r {
            Ok(_) | Err(EnrollError::Rejected(EnrollRejection::UsedUp(_))) => None,
            Err(e) => Some(e.to_string()),
        })
        .collect();
    assert!(other.is_empty(), "neither enrolled nor used up: {other:?}");
    assert_eq!(enrolled.len(), uses as usize, "exactly the token's uses");
    assert_eq!(used_up, agents - uses as usize);
    for store in &stores {
        eventually(
            "every replica sees the 60 nodes and the spent token",
            || {
                let nodes = store.list_nodes().map_err(|e| e.to_string())?.len();
                let left = store
                    .get_token("t")
                    .map_err(|e| e.to_string())?
                    .map(|t| t.uses_left);
                (nodes == uses as usize && left == Some(0))
                    .then_some(())
                    .ok_or(format!("{nodes} nodes, {left:?} uses left"))
            },
        )
        .await;
    }

    let total_audit = agents as u64;
    for (store, (_, audit)) in stores.iter().zip(&logs) {
        let log = store.log(LogName::Events).expect("log");
        eventually("the replica's mirror holds every event", || {
            let count = log.count().map_err(|e| e.to_string())?;
            (count == u64::from(uses))
                .then_some(())
                .ok_or(format!("{count} events"))
        })
        .await;
        let seqs: Vec<u64> = log
            .range(0, Direction::Forward)
            .map(|r| r.expect("read").0)
            .collect();
        assert_eq!(seqs, (1..=u64::from(uses)).collect::<Vec<_>>(), "gap-free");
        eventually("the replica holds every audit record", || {
            (audit.len() == total_audit)
                .then_some(())
                .ok_or(format!("{} audit records", audit.len()))
        })
        .await;
        let verification = audit.verify().expect("verify");
        assert_eq!(verification.records, total_audit);
        assert_eq!(verification.broken, None);
    }
}

/// An agent whose enrollment committed but whose answer was lost retries
/// with the same name and key, through the same replica or another one
/// whose view may not show the first yet: it gets the node it created,
/// although the token's one use is spent. Another key, or a node that has
/// connected since, is refused as a taken name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_enrollment_gets_the_node_it_created() {
    let cluster = EtcdCluster::start(3);
    let stores = replicas(&cluster, "/enroll-retry/", 2).await;
    let (a, b) = (&stores[0], &stores[1]);
    a.insert_token("t", &token(1)).await.expect("token");
    wait_for_token(b, "t").await;

    let first = a
        .enroll("t", 5, keyed_node("n-1", "web", "k-1"))
        .await
        .expect("first attempt");
    assert_eq!(first.id, "n-1");
    // The retry through the other replica, at once: its mirror may not hold
    // the first attempt's writes yet; the store reads them from etcd.
    let through_b = b
        .enroll("t", 6, keyed_node("n-2", "web", "k-1"))
        .await
        .expect("retry through b");
    assert_eq!(through_b.id, "n-1", "the node the first attempt created");
    let through_a = a
        .enroll("t", 7, keyed_node("n-3", "web", "k-1"))
        .await
        .expect("retry through a");
    assert_eq!(through_a, first);
    assert_eq!(
        a.get_token("t").expect("read").expect("token").uses_left,
        0,
        "a retry spends nothing"
    );

    // Another key is no retry: the token's one use is spent.
    assert_used_up(b.enroll("t", 8, keyed_node("n-4", "web", "k-2")).await);
    a.insert_token("t2", &token(5)).await.expect("token");
    wait_for_token(b, "t2").await;
    let other_key = b
        .enroll(
            "t2",
            8,
            NodeRecord {
                token_hash: "t2".into(),
                ..keyed_node("n-5", "web", "k-2")
            },
        )
        .await;
    assert!(
        matches!(
            other_key,
            Err(EnrollError::Rejected(EnrollRejection::NameTaken { ref id, .. })) if id == "n-1"
        ),
        "another key is not a retry: {other_key:?}"
    );

    // Once the node has connected it has its certificate: a second
    // enrollment under its name is no retry.
    a.update_node("n-1", &|record| {
        record.last_seen_ms = Some(10);
        true
    })
    .await
    .expect("update")
    .expect("node");
    assert_used_up(a.enroll("t", 9, keyed_node("n-6", "web", "k-1")).await);
    assert_eq!(a.list_nodes().expect("list").len(), 1);
}

fn assert_used_up(outcome: Result<NodeRecord, EnrollError>) {
    assert!(
        matches!(
            outcome,
            Err(EnrollError::Rejected(EnrollRejection::UsedUp(1)))
        ),
        "{outcome:?}"
    );
}

/// A node enrolled through one replica is known to another once that one
/// has caught up, whatever its watch's lag: a session the agent opens there
/// a moment later (the registry catches up before refusing one as not
/// enrolled) is not refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_caught_up_knows_a_node_enrolled_elsewhere() {
    let cluster = EtcdCluster::start(1);
    let (a, b, _) = two_replicas(&cluster, "/catch-up/").await;
    a.insert_token("t", &token(100)).await.expect("token");
    for i in 0..20 {
        let id = format!("n-{i}");
        a.enroll("t", 100, node(&id, &format!("web-{i}")))
            .await
            .expect("enroll");
        b.catch_up().await.expect("catch up");
        assert!(
            b.get_node(&id).expect("read").is_some(),
            "{id} after catching up"
        );
    }
}

/// Ad hoc freezes (SPEC §9): one replica's freeze is seen by the other (the
/// leader's engine checks freezes any replica made), and of two replicas
/// deleting it at once exactly one removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freezes_are_shared_and_removed_once() {
    let cluster = EtcdCluster::start(1);
    let (a, b, _) = two_replicas(&cluster, "/freezes/").await;
    let freeze = FreezeRecord {
        id: "fz-1".into(),
        environment: "production".into(),
        from_ms: 1,
        until_ms: 2,
        reason: "release party".into(),
        created_by: "dan".into(),
    };
    a.put_freeze(&freeze).await.expect("put");
    assert_eq!(
        a.list_freezes().expect("list"),
        std::slice::from_ref(&freeze)
    );
    // What refusals read on another replica holds it at once, without
    // waiting for the watch: acknowledged means enforced everywhere.
    for i in 0..20 {
        let other = FreezeRecord {
            id: format!("fz-at-once-{i}"),
            ..freeze.clone()
        };
        a.put_freeze(&other).await.expect("put");
        let current = b.current_freezes().await.expect("current");
        assert!(current.contains(&other), "{current:?}");
        a.remove_freeze(&other.id).await.expect("remove");
    }
    eventually("b sees the freeze", || {
        match b.list_freezes().map_err(|e| e.to_string())?.as_slice() {
            [seen] if *seen == freeze => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let (x, y) = tokio::join!(a.remove_freeze("fz-1"), b.remove_freeze("fz-1"));
    let removed = [x.expect("remove a"), y.expect("remove b")];
    assert_eq!(
        removed
            .iter()
            .filter(|r| r.as_ref() == Some(&freeze))
            .count(),
        1,
        "{removed:?}"
    );
    assert!(removed.iter().any(Option::is_none), "{removed:?}");
    eventually("both see it gone", || {
        if a.list_freezes().map_err(|e| e.to_string())?.is_empty()
            && b.list_freezes().map_err(|e| e.to_string())?.is_empty()
        {
            Ok(())
        } else {
            Err("still listed".into())
        }
    })
    .await;
}

/// The desired-state history (SPEC §9) written through one replica reads
/// from the other, each record in the same transaction as the desired
/// state it describes (its seq is that state's revision), also when one
/// batch takes more nodes than one etcd transaction; a trim through one
/// replica is seen by the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_written_through_one_replica_reads_from_the_other() {
    use hotswap_control_plane::store::HistoryOrigin;

    let cluster = EtcdCluster::start(1);
    let (a, b, _) = two_replicas(&cluster, "/history/").await;
    let origin = HistoryOrigin::new(1_000, "d-1", "alice");
    let nodes: Vec<String> = (0..300).map(|i| format!("n-{i:03}")).collect();
    for node in &nodes {
        a.update_desired_recorded(
            node,
            &|record| {
                record.modules.entry("web".into()).or_default().version = "2.0.0".into();
                true
            },
            &origin,
        )
        .expect("update");
    }
    a.flush_desired().await.expect("flush");

    let records = eventually_value("b to read every history record", || {
        let records = b.list_history().map_err(|e| e.to_string())?;
        if records.len() < nodes.len() {
            return Err(format!("{} of {}", records.len(), nodes.len()));
        }
        Ok(records)
    })
    .await;
    for record in &records {
        assert_eq!(
            (
                record.deployment_id.as_str(),
                record.by.as_str(),
                record.time_ms
            ),
            ("d-1", "alice", 1_000)
        );
        assert_eq!(record.changes.len(), 1, "{record:?}");
        assert_eq!(record.changes[0].from, None);
        assert_eq!(record.changes[0].to.as_deref(), Some("2.0.0"));
        let desired = b.get_desired(&record.node_id).expect("desired");
        assert_eq!(
            record.seq, desired.revision,
            "{}: history and desired state committed in one transaction",
            record.node_id
        );
    }

    // A second write, then a removal, through b: a reads both.
    let later = HistoryOrigin::new(5_000, "d-2", "bob");
    b.update_desired_recorded(
        "n-001",
        &|record| {
            record.modules.entry("web".into()).or_default().version = "3.0.0".into();
            true
        },
        &later,
    )
    .expect("update");
    b.flush_desired().await.expect("flush");
    b.remove_desired_recorded("n-002", &later)
        .await
        .expect("remove");
    let newest = eventually_value("a to read b's records", || {
        let records = a.list_history().map_err(|e| e.to_string())?;
        match records.len() {
            n if n == nodes.len() + 2 => Ok(records),
            n => Err(format!("{n} records")),
        }
    })
    .await;
    let tail: Vec<(&str, Option<&str>, Option<&str>, bool)> = newest[nodes.len()..]
        .iter()
        .map(|r| {
            (
                r.node_id.as_str(),
                r.changes[0].from.as_deref(),
                r.changes[0].to.as_deref(),
                r.removed,
            )
        })
        .collect();
    assert_eq!(
        tail,
        [
            ("n-001", Some("2.0.0"), Some("3.0.0"), false),
            ("n-002", Some("2.0.0"), None, true),
        ]
    );

    // Trimming through a removes the old records for both, and says so.
    let removed = a.trim_history(2_000).await.expect("trim");
    assert_eq!(removed, nodes.len() as u64);
    let kept = eventually_value("b to see the trim", || {
        let records = b.list_history().map_err(|e| e.to_string())?;
        match records.len() {
            2 => Ok(records),
            n => Err(format!("{n} records")),
        }
    })
    .await;
    assert!(kept.iter().all(|r| r.by == "bob"));
    let trimmed = b.history_trimmed().expect("read").expect("a trim mark");
    assert_eq!(trimmed.before_ms, 2_000);
    assert_eq!(
        trimmed.seq,
        records.iter().map(|r| r.seq).max().unwrap_or(0)
    );
}
