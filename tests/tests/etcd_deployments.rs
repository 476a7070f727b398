//! Deployment records of fleet size on the etcd backend, against a real
//! 3-member etcd started with its DEFAULT flags (`--max-request-bytes`
//! 1.5 MiB, `--max-txn-ops` 128): records of 10k and 50k nodes round-trip;
//! an update rewrites only the track buckets it changed; a writer that
//! stops between its transactions (a leader killed mid-batch) leaves a
//! record a new leader reads whole, old or new; records from before the
//! split still read; and a value too large for one request is refused with
//! its key and size.

use std::collections::BTreeMap;
use std::time::Duration;

use hotswap_common::labels::Labels;
use hotswap_control_plane::deploy::engine::DeploymentRecord;
use hotswap_control_plane::deploy::machine::{
    BatchSize, Deployment, NodeState, Spec, Strategy, Thresholds,
};
use hotswap_control_plane::store::etcd::{ClusterRecord, EtcdStore};
use hotswap_control_plane::store::keys::Keys;
use hotswap_control_plane::store::split::{self, TRACKS_PER_BUCKET};
use hotswap_control_plane::store::{Collection, DeploymentRecords, Store, encode};
use hotswap_etcd::{Client, ClientConfig, TxnOp};
use hotswap_tests::{EtcdCluster, patience};

/// etcd's default `--max-request-bytes`.
const ETCD_DEFAULT_REQUEST_BYTES: usize = 1536 * 1024;

async fn client(endpoints: &str) -> Client {
    let config = ClientConfig::from_list(endpoints).expect("endpoints parse");
    Client::connect(config).await.expect("connect to etcd")
}

async fn init(cluster: &EtcdCluster, prefix: &str) -> Keys {
    let keys = Keys::new(prefix).expect("prefix");
    let record = ClusterRecord {
        id: "test".into(),
        created_at_ms: 1,
    };
    EtcdStore::init(&client(&cluster.endpoints()).await, &keys, &record)
        .await
        .expect("init");
    keys
}

async fn open(cluster: &EtcdCluster, keys: &Keys) -> EtcdStore {
    EtcdStore::open(client(&cluster.endpoints()).await, keys.clone())
        .await
        .expect("open")
}

fn spec() -> Spec {
    Spec {
        module: "sim".into(),
        version: "1.0.0".into(),
        strategy: Strategy::Rolling {
            batch: BatchSize::Percent(10),
            min_healthy_ms: 0,
        },
        max_failures: 0,
        health_deadline_ms: 60_000,
        progress_deadline_ms: 600_000,
        auto_rollback: true,
        require_approval: false,
        approval_timeout_ms: 0,
        pause_timeout_ms: 0,
        created_by: "admin".into(),
        thresholds: Thresholds::default(),
    }
}

/// A fresh rolling deployment over `nodes` nodes, as the engine creates it
/// (first wave updating), with ids and names like the benchmark's.
fn record(nodes: usize) -> DeploymentRecord {
    let targets = (0..nodes)
        .map(|i| {
            (
                format!("6f1c2a9e-{i:08}-4b7d-9c3e-sim"),
                format!("sim-{i:06}"),
                "0.9.0".to_string(),
            )
        })
        .collect();
    let (deployment, _) = Deployment::new(spec(), targets, 1_700_000_000_000);
    DeploymentRecord {
        id: format!("d-{nodes:06}"),
        environment: "prod".into(),
        deployment,
        selector: Labels::new(),
        traceparent: String::new(),
    }
}

/// The next step of a rolling deployment: wave `wave` healthy, every
/// healthy node seen again (its `since_ms` refreshed, as the engine does),
/// and the next wave updating.
fn advance(record: &mut DeploymentRecord, wave: usize, now: u64) {
    let deployment = &mut record.deployment;
    for track in &mut deployment.nodes {
        if track.wave == wave || track.state == NodeState::Healthy {
            track.state = NodeState::Healthy;
            track.since_ms = now;
        } else if track.wave == wave + 1 {
            track.state = NodeState::Updating;
            track.since_ms = now;
            track.touched = true;
        }
    }
    deployment.wave = wave + 1;
    deployment.wave_started_ms = now;
}

/// Poll until `check` holds, failing after `patience()`.
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

/// The bucket keys of one deployment as etcd has them: key → mod revision.
async fn bucket_keys(etcd: &Client, keys: &Keys, id: &str) -> BTreeMap<String, i64> {
    let (_, kvs) = etcd
        .range(keys.deployment_tracks(id).as_bytes())
        .await
        .expect("range tracks");
    kvs.into_iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(&kv.key).into_owned(),
                kv.mod_revision,
            )
        })
        .collect()
}

fn list(store: &Store) -> Result<Vec<DeploymentRecord>, String> {
    store
        .list_deployments::<DeploymentRecord>()
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_and_fifty_thousand_node_deployments_round_trip_on_a_stock_etcd() {
    let cluster = EtcdCluster::start(3);
    let keys = init(&cluster, "/big/").await;
    let leader = Store::etcd(open(&cluster, &keys).await);
    let follower = Store::etcd(open(&cluster, &keys).await);

    let records = [record(10_000), record(50_000)];
    let whole = encode(&records[0]).len();
    assert!(
        whole > ETCD_DEFAULT_REQUEST_BYTES,
        "a 10k record ({whole} bytes) must not fit one default etcd request, or this test proves nothing"
    );
    for record in &records {
        leader
            .put_deployment(&record.id, record)
            .await
            .unwrap_or_else(|e| panic!("store {}: {e}", record.id));
    }
    assert_eq!(list(&leader).expect("leader lists"), records.to_vec());
    // Another replica's mirror follows, and a replica opened afresh (a new
    // leader rebuilding its engine) reads the same.
    eventually("the follower reads both records", || {
        let seen = list(&follower)?;
        (seen == records).then_some(()).ok_or_else(|| {
            format!(
                "{} records: {:?}",
                seen.len(),
                seen.iter()
                    .map(|r| r.deployment.nodes.len())
                    .collect::<Vec<_>>()
            )
        })
    })
    .await;
    let fresh = Store::etcd(open(&cluster, &keys).await);
    assert_eq!(list(&fresh).expect("fresh lists"), records.to_vec());

    // Every value etcd holds for them is far below the request limit.
    let etcd = client(&cluster.endpoints()).await;
    let (_, kvs) = etcd.range(keys.prefix().as_bytes()).await.expect("range");
    let largest = kvs.iter().map(|kv| kv.value.len()).max().unwrap_or(0);
    assert!(
        largest < ETCD_DEFAULT_REQUEST_BYTES / 4,
        "largest value {largest}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_of_a_few_nodes_rewrites_only_their_buckets() {
    let cluster = EtcdCluster::start(3);
    let keys = init(&cluster, "/few/").await;
    let etcd_store = open(&cluster, &keys).await;
    let store = Store::etcd(etcd_store.clone());
    let etcd = client(&cluster.endpoints()).await;

    let mut record = record(10_000);
    store
        .put_deployment(&record.id, &record)
        .await
        .expect("put");
    let before = bucket_keys(&etcd, &keys, &record.id).await;
    assert_eq!(before.len(), 10_000usize.div_ceil(TRACKS_PER_BUCKET));

    // Two nodes far apart change; the header changes too (a reason).
    for i in [5, 9_000] {
        record.deployment.nodes[i].state = NodeState::Failed;
        record.deployment.nodes[i].reason = "crash loop".into();
    }
    record.deployment.reason = "two nodes failed".into();
    let written_before = etcd_store.bytes_written();
    store
        .put_deployment(&record.id, &record)
        .await
        .expect("put");
    let written = etcd_store.bytes_written() - written_before;
    let after = bucket_keys(&etcd, &keys, &record.id).await;

    let changed = [5 / TRACKS_PER_BUCKET, 9_000 / TRACKS_PER_BUCKET];
    let gone: Vec<&String> = before.keys().filter(|k| !after.contains_key(*k)).collect();
    let new: Vec<&String> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    let expected_new: Vec<String> = changed
        .iter()
        .map(|b| keys.deployment_bucket(&record.id, *b, 2))
        .collect();
    let expected_gone: Vec<String> = changed
        .iter()
        .map(|b| keys.deployment_bucket(&record.id, *b, 1))
        .collect();
    assert_eq!(new, expected_new.iter().collect::<Vec<_>>());
    assert_eq!(gone, expected_gone.iter().collect::<Vec<_>>());
    // Every other bucket is untouched: same key, same revision.
    for (key, revision) in &after {
        if let Some(was) = before.get(key) {
            assert_eq!(revision, was, "{key} was rewritten");
        }
    }
    let whole = encode(&record).len() as u64;
    println!(
        "update of 2 nodes in a 10k deployment: {written} bytes written to etcd (the whole record is {whole} bytes)"
    );
    assert!(written * 20 < whole, "{written} bytes written for 2 nodes");
    let fresh = Store::etcd(open(&cluster, &keys).await);
    assert_eq!(list(&fresh).expect("fresh lists"), vec![record]);
}

/// Commit raw operations in transactions of etcd's default limits, as the
/// store would (the test plays a leader that dies part way).
async fn commit_raw(etcd: &Client, ops: Vec<TxnOp>) {
    let mut chunk = Vec::new();
    let mut bytes = 0;
    for op in ops {
        let size = match &op {
            TxnOp::Put { key, value, .. } => key.len() + value.len(),
            TxnOp::Delete { key, .. } | TxnOp::Get { key, .. } => key.len(),
        };
        if !chunk.is_empty() && (chunk.len() >= 100 || bytes + size > 1024 * 1024) {
            etcd.txn(&[], &std::mem::take(&mut chunk), &[])
                .await
                .expect("txn");
            bytes = 0;
        }
        bytes += size;
        chunk.push(op);
    }
    if !chunk.is_empty() {
        etcd.txn(&[], &chunk, &[]).await.expect("txn");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_between_transactions_leaves_a_whole_record() {
    let cluster = EtcdCluster::start(3);
    let keys = init(&cluster, "/killed/").await;
    let store = Store::etcd(open(&cluster, &keys).await);
    let etcd = client(&cluster.endpoints()).await;

    let old = record(10_000);
    store.put_deployment(&old.id, &old).await.expect("put");
    let mut new = old.clone();
    advance(&mut new, 0, 1_700_000_100_000);
    advance(&mut new, 1, 1_700_000_200_000);

    // What the leader would write next, computed from etcd as it stands.
    let header_key = keys.record(Collection::Deployments, &new.id);
    let (_, kvs) = etcd.range(header_key.as_bytes()).await.expect("range");
    let header = kvs
        .iter()
        .find(|kv| kv.key == header_key.as_bytes())
        .expect("header stored");
    let index = split::index_of(&header.value)
        .expect("readable")
        .expect("split header");
    let existing: Vec<(usize, u64)> = bucket_keys(&etcd, &keys, &new.id)
        .await
        .keys()
        .filter_map(|k| keys.bucket_of(&new.id, k))
        .collect();
    let written = split::split(Some(&index), &existing, &new);
    assert!(
        written.puts.len() > 2,
        "{} buckets change",
        written.puts.len()
    );
    let puts: Vec<TxnOp> = written
        .puts
        .iter()
        .map(|(b, g, v)| TxnOp::put(keys.deployment_bucket(&new.id, *b, *g), v.clone()))
        .collect();

    // The leader dies after half its bucket transactions: a new leader
    // reads the old record, whole.
    let half = puts.len() / 2;
    commit_raw(&etcd, puts[..half].to_vec()).await;
    let reader = Store::etcd(open(&cluster, &keys).await);
    assert_eq!(list(&reader).expect("list"), vec![old.clone()]);

    // It dies after the header but before deleting what the header no
    // longer names: the new record, whole.
    let mut rest = puts[half..].to_vec();
    rest.push(TxnOp::put(header_key.clone(), written.header.clone()));
    commit_raw(&etcd, rest).await;
    let reader = Store::etcd(open(&cluster, &keys).await);
    assert_eq!(list(&reader).expect("list"), vec![new.clone()]);

    // A leader that died after half its puts left keys no header names;
    // the next write (the new leader's) deletes them and those it replaced.
    let leftover = bucket_keys(&etcd, &keys, &new.id).await.len();
    assert!(leftover > 10_000usize.div_ceil(TRACKS_PER_BUCKET));
    advance(&mut new, 2, 1_700_000_300_000);
    reader.put_deployment(&new.id, &new).await.expect("put");
    let remaining = bucket_keys(&etcd, &keys, &new.id).await;
    assert_eq!(remaining.len(), 10_000usize.div_ceil(TRACKS_PER_BUCKET));
    let fresh = Store::etcd(open(&cluster, &keys).await);
    assert_eq!(list(&fresh).expect("list"), vec![new]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_from_before_the_split_still_read_and_are_split_on_their_next_write() {
    let cluster = EtcdCluster::start(1);
    let keys = init(&cluster, "/legacy/").await;
    let etcd = client(&cluster.endpoints()).await;
    let mut old = record(500);
    let header_key = keys.record(Collection::Deployments, &old.id);
    etcd.txn(&[], &[TxnOp::put(header_key.clone(), encode(&old))], &[])
        .await
        .expect("write a whole record as the store did before");

    let store = Store::etcd(open(&cluster, &keys).await);
    assert_eq!(list(&store).expect("list"), vec![old.clone()]);

    advance(&mut old, 0, 1_700_000_100_000);
    store.put_deployment(&old.id, &old).await.expect("put");
    let (_, kvs) = etcd.range(header_key.as_bytes()).await.expect("range");
    let value = &kvs.first().expect("header").value;
    assert!(split::is_header(value), "the record was not split");
    assert_eq!(
        bucket_keys(&etcd, &keys, &old.id).await.len(),
        500usize.div_ceil(TRACKS_PER_BUCKET)
    );
    let fresh = Store::etcd(open(&cluster, &keys).await);
    assert_eq!(list(&fresh).expect("list"), vec![old]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_too_large_for_one_request_is_refused_with_its_key_and_size() {
    let cluster = EtcdCluster::start(1);
    let keys = init(&cluster, "/huge/").await;
    let store = open(&cluster, &keys).await;
    let huge = vec![b'x'; 2 * 1024 * 1024];
    let error = store
        .put_pipeline_bytes("p-huge", huge)
        .await
        .expect_err("a 2 MiB value cannot be stored")
        .to_string();
    assert!(
        error.contains("/huge/pipelines/p-huge") && error.contains("2097152 bytes"),
        "{error}"
    );
    // Nothing of it was written, and the store goes on working.
    assert!(store.list_pipeline_bytes().expect("list").is_empty());
    store
        .put_pipeline_bytes("p-small", b"{}".to_vec())
        .await
        .expect("a small record after it");
    assert_eq!(store.list_pipeline_bytes().expect("list").len(), 1);
}

/// Bytes written to etcd per deployment update of a 10k-node rolling
/// deployment, with the record split (etcd's default limits) and as the
/// store wrote it before the split (one whole value per update, on a
/// cluster whose request limit was raised so that it fits). Printed for
/// BENCHMARKS.md; asserts that splitting writes several times less.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_written_per_update_of_a_ten_thousand_node_deployment() {
    let nodes = 10_000;
    let start = 1_700_000_000_000;
    let steps: Vec<DeploymentRecord> = {
        let mut record = record(nodes);
        let mut steps = vec![record.clone()];
        for wave in 0..record.deployment.waves - 1 {
            advance(&mut record, wave, start + 1_000 * (wave as u64 + 1));
            steps.push(record.clone());
        }
        steps
    };

    // Split, on a stock etcd.
    let cluster = EtcdCluster::start(3);
    let keys = init(&cluster, "/measure/").await;
    let store = open(&cluster, &keys).await;
    let received = |cluster: &EtcdCluster| etcd_client_bytes_received(cluster);
    let mut split_bytes = Vec::new();
    let mut split_received = Vec::new();
    for step in &steps {
        let (w0, r0) = (store.bytes_written(), received(&cluster));
        Store::etcd(store.clone())
            .put_deployment(&step.id, step)
            .await
            .expect("put");
        split_bytes.push(store.bytes_written() - w0);
        split_received.push(received(&cluster) - r0);
    }

    // Whole, as before: one value per update, which needs the raised limit.
    let raised = EtcdCluster::start_with_flags(3, &["--max-request-bytes", "8388608"]);
    let etcd = client(&raised.endpoints()).await;
    let key = keys.record(Collection::Deployments, &steps[0].id);
    let mut whole_bytes = Vec::new();
    let mut whole_received = Vec::new();
    for step in &steps {
        let value = encode(step);
        let r0 = received(&raised);
        whole_bytes.push((key.len() + value.len()) as u64);
        etcd.txn(&[], &[TxnOp::put(key.clone(), value)], &[])
            .await
            .expect("whole put on the raised limit");
        whole_received.push(received(&raised) - r0);
    }

    println!("step | whole: payload / etcd grpc received | split: payload / etcd grpc received");
    for i in 0..steps.len() {
        println!(
            "{i} | {} / {} | {} / {}",
            whole_bytes[i], whole_received[i], split_bytes[i], split_received[i]
        );
    }
    let median = |v: &[u64]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v[v.len() / 2]
    };
    let total = |v: &[u64]| v.iter().sum::<u64>();
    println!(
        "median per update: whole {} / {} bytes, split {} / {} bytes; total over {} updates: whole {} / {}, split {} / {}",
        median(&whole_bytes),
        median(&whole_received),
        median(&split_bytes),
        median(&split_received),
        steps.len(),
        total(&whole_bytes),
        total(&whole_received),
        total(&split_bytes),
        total(&split_received)
    );
    assert!(total(&split_bytes) * 3 < total(&whole_bytes));
}

/// `etcd_network_client_grpc_received_bytes_total`, summed over members.
fn etcd_client_bytes_received(cluster: &EtcdCluster) -> u64 {
    let mut sum = 0.0;
    for i in 0..cluster.len() {
        let endpoint = cluster.endpoint(i);
        let addr: std::net::SocketAddr = endpoint
            .strip_prefix("http://")
            .and_then(|a| a.parse().ok())
            .expect("plain endpoint");
        let (status, body) = hotswap_tests::try_http_get(addr, "/metrics").expect("metrics");
        assert_eq!(status, 200, "{body}");
        sum += body
            .lines()
            .find(|l| {
                l.split_whitespace().next() == Some("etcd_network_client_grpc_received_bytes_total")
            })
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    }
    sum as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_is_refused_as_corrupt_and_the_next_write_repairs_it() {
    let cluster = EtcdCluster::start(1);
    let keys = init(&cluster, "/lost/").await;
    let etcd_store = open(&cluster, &keys).await;
    let store = Store::etcd(etcd_store.clone());
    let etcd = client(&cluster.endpoints()).await;
    let mut record = record(1_000);
    store
        .put_deployment(&record.id, &record)
        .await
        .expect("put");

    // A bucket the header names disappears (an operator's stray delete).
    let lost = keys.deployment_bucket(&record.id, 999 / TRACKS_PER_BUCKET, 1);
    let deleted = etcd
        .txn(&[], &[TxnOp::delete(lost.clone())], &[])
        .await
        .expect("delete");
    eventually("the mirror sees the delete", || {
        (etcd_store.revision() >= deleted.revision)
            .then_some(())
            .ok_or_else(|| format!("mirror at {}", etcd_store.revision()))
    })
    .await;
    let error = list(&store).expect_err("a record with a bucket missing");
    assert!(
        error.contains(&lost) && error.contains("missing"),
        "{error}"
    );

    // The next write names no key that is gone: it writes that bucket again.
    record.deployment.nodes[0].state = NodeState::Healthy;
    store
        .put_deployment(&record.id, &record)
        .await
        .expect("put");
    let buckets = bucket_keys(&etcd, &keys, &record.id).await;
    assert_eq!(buckets.len(), 1_000usize.div_ceil(TRACKS_PER_BUCKET));
    let fresh = Store::etcd(open(&cluster, &keys).await);
    assert_eq!(list(&fresh).expect("list"), vec![record]);
}

/// A deployment where every node failed with a long reason of its own (the
/// least compressible record a fleet makes): its buckets add up to several
/// default requests, so its batch commits only because transactions are
/// cut by bytes as well as by keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_one_request_commits_in_several_on_a_stock_etcd() {
    let cluster = EtcdCluster::start(3);
    let keys = init(&cluster, "/bytes/").await;
    let store = Store::etcd(open(&cluster, &keys).await);
    let mut record = record(10_000);
    // A cheap deterministic generator: hex that zstd cannot shrink much.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    for track in &mut record.deployment.nodes {
        track.state = NodeState::Failed;
        track.reason = (0..60)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                format!("{state:016x}")
            })
            .collect();
    }
    store
        .put_deployment(&record.id, &record)
        .await
        .expect("put");

    let etcd = client(&cluster.endpoints()).await;
    let (_, kvs) = etcd
        .range(keys.deployment_tracks(&record.id).as_bytes())
        .await
        .expect("range");
    let stored: usize = kvs.iter().map(|kv| kv.key.len() + kv.value.len()).sum();
    assert!(
        stored > 2 * ETCD_DEFAULT_REQUEST_BYTES,
        "the buckets ({stored} bytes in {} keys) would fit one request: this test proves nothing",
        kvs.len()
    );
    assert!(
        kvs.len() < 120,
        "few enough keys for one transaction by count"
    );
    let fresh = Store::etcd(open(&cluster, &keys).await);
    assert_eq!(list(&fresh).expect("list"), vec![record]);
}
