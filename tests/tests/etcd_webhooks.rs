//! Webhooks on the etcd backend against a real etcd: records and cursors
//! shared between two replicas' stores, created and deleted together, a
//! cursor never written back for a deleted webhook nor by a leader that
//! lost its lease, and the delivery task sending, in order, what another
//! replica appended to the shared event log.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hotswap_control_plane::events::{Event, EventLog};
use hotswap_control_plane::metrics::Metrics;
use hotswap_control_plane::store::etcd::{ClusterRecord, EtcdStore};
use hotswap_control_plane::store::keys::Keys;
use hotswap_control_plane::store::{Store, WebhookCursor, WebhookRecord};
use hotswap_control_plane::webhooks::OwnPorts;
use hotswap_control_plane::webhooks::dispatch::Dispatcher;
use hotswap_etcd::{Client, ClientConfig};
use hotswap_tests::{EtcdCluster, patience};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

async fn client(endpoints: &str) -> Client {
    let config = ClientConfig::from_list(endpoints).expect("endpoints parse");
    Client::connect(config).await.expect("connect to etcd")
}

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

fn record(id: &str, url: &str) -> WebhookRecord {
    WebhookRecord {
        id: id.into(),
        url: url.into(),
        kinds: vec!["deployment".into()],
        format: "json".into(),
        secret: "k".into(),
        ca_pem: String::new(),
        created_by: "admin".into(),
        created_at_ms: 1,
    }
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_and_cursors_are_shared_and_change_together() {
    let cluster = EtcdCluster::start(1);
    let (a, b, _) = two_replicas(&cluster, "/hooks/").await;
    let hook = record("wh-1", "http://192.0.2.1/hook");
    let cursor = WebhookCursor {
        processed_seq: 5,
        ..WebhookCursor::default()
    };
    assert!(a.create_webhook(&hook, &cursor).await.expect("create"));
    assert!(
        !b.create_webhook(&hook, &cursor)
            .await
            .expect("create again"),
        "the id is taken, whichever replica asks"
    );
    eventually("b sees the webhook and its cursor", || {
        match (b.get_webhook("wh-1"), b.get_webhook_cursor("wh-1")) {
            (Ok(Some(h)), Ok(Some(c))) if h == hook && c == cursor => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let moved = WebhookCursor {
        processed_seq: 9,
        last_delivered_seq: 9,
        delivered: 1,
        ..WebhookCursor::default()
    };
    assert!(a.put_webhook_cursor("wh-1", &moved).await.expect("cursor"));
    eventually("b sees the moved cursor", || {
        match b.get_webhook_cursor("wh-1") {
            Ok(Some(c)) if c == moved => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(
        b.delete_webhook("wh-1").await.expect("delete"),
        Some(hook.clone())
    );
    eventually("a sees the deletion", || match a.get_webhook("wh-1") {
        Ok(None) => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .await;
    assert!(
        !a.put_webhook_cursor("wh-1", &moved).await.expect("cursor"),
        "a deleted webhook's cursor is not written back"
    );
    assert_eq!(a.get_webhook_cursor("wh-1").expect("get"), None);
    assert_eq!(b.get_webhook_cursor("wh-1").expect("get"), None);
    assert!(b.list_webhooks().expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_lost_its_lease_writes_no_cursor() {
    let cluster = EtcdCluster::start(1);
    let (a, b, raw_a) = two_replicas(&cluster, "/hookfence/").await;
    let hook = record("wh-2", "http://192.0.2.1/hook");
    assert!(
        b.create_webhook(&hook, &WebhookCursor::default())
            .await
            .expect("create")
    );
    let etcd = client(&cluster.endpoints()).await;
    let election = hotswap_etcd::Election::new(etcd.clone(), b"/hookfence/election/".to_vec());
    let lease = etcd.grant(Duration::from_secs(5)).await.expect("grant");
    let leadership = election.campaign(lease.id, b"a").await.expect("lead");
    raw_a.set_fence(Some(leadership.fence()));
    eventually("a sees the webhook", || match a.get_webhook("wh-2") {
        Ok(Some(_)) => Ok(()),
        other => Err(format!("{other:?}")),
    })
    .await;
    let first = WebhookCursor {
        processed_seq: 3,
        ..WebhookCursor::default()
    };
    assert!(a.put_webhook_cursor("wh-2", &first).await.expect("leading"));
    etcd.revoke(lease.id).await.expect("revoke");
    let stale = WebhookCursor {
        processed_seq: 4,
        ..WebhookCursor::default()
    };
    assert!(
        a.put_webhook_cursor("wh-2", &stale).await.is_err(),
        "the old leader's cursor write is refused"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(b.get_webhook_cursor("wh-2").expect("get"), Some(first));
}

/// A minimal HTTP/1.1 receiver: records each request's X-Hotswap-Delivery
/// and answers 200, one request per connection.
async fn receiver() -> (String, Arc<Mutex<Vec<u64>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut reader = BufReader::new(stream);
                let (mut length, mut seq) = (0usize, None);
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let line = line.trim_end();
                    if line.is_empty() {
                        break;
                    }
                    if let Some((name, value)) = line.split_once(':') {
                        match name.to_ascii_lowercase().as_str() {
                            "content-length" => length = value.trim().parse().unwrap_or(0),
                            "x-hotswap-delivery" => seq = value.trim().parse().ok(),
                            _ => {}
                        }
                    }
                }
                let mut body = vec![0; length];
                if reader.read_exact(&mut body).await.is_err() {
                    return;
                }
                if let Some(seq) = seq {
                    record.lock().expect("lock").push(seq);
                }
                let _ = reader
                    .get_mut()
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_delivers_what_another_replica_appended_in_order() {
    let cluster = EtcdCluster::start(1);
    let (a, b, _) = two_replicas(&cluster, "/hookdeliver/").await;
    let (url, seen) = receiver().await;
    let hook = record("wh-3", &url);
    assert!(
        a.create_webhook(&hook, &WebhookCursor::default())
            .await
            .expect("create")
    );
    let events_a = Arc::new(EventLog::open(&a, 10_000).expect("events a"));
    let _follow = events_a.follow_commits();
    let events_b = EventLog::open(&b, 10_000).expect("events b");
    let shutdown = CancellationToken::new();
    let dispatcher = tokio::spawn(
        Dispatcher {
            store: a.clone(),
            events: events_a.clone(),
            metrics: Arc::new(Metrics::new().0),
            own: OwnPorts {
                grpc: "127.0.0.1:1".parse().expect("addr"),
                admin: "127.0.0.1:2".parse().expect("addr"),
            },
            retry_for: Duration::from_secs(3600),
            backoff_max: Duration::from_secs(1),
        }
        .run(shutdown.clone()),
    );
    // Replica b appends; a's task delivers the matching ones.
    for i in 0..12 {
        let kind = if i % 3 == 0 {
            "node.connected"
        } else {
            "deployment.step"
        };
        events_b.append(Event::new(kind, format!("event {i}")));
        b.flush().await.expect("flush b");
    }
    let expected: Vec<u64> = (1..=12).filter(|seq| (seq - 1) % 3 != 0).collect();
    eventually("every matching event, in order", || {
        let got = seen.lock().expect("lock").clone();
        (got == expected)
            .then_some(())
            .ok_or(format!("{got:?} != {expected:?}"))
    })
    .await;
    eventually("the cursor at the end of the log", || {
        match b.get_webhook_cursor("wh-3") {
            Ok(Some(c))
                if c.processed_seq == 12 && c.last_delivered_seq == 12 && c.delivered == 8 =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    shutdown.cancel();
    dispatcher.await.expect("dispatcher");
}
