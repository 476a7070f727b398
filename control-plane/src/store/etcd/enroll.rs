//! Enrollment on etcd, committed in groups per join token.
//!
//! Every enrollment with one token changes that token's record (its uses
//! left), so enrollments with one token are a queue by nature. Run as
//! independent guarded read-modify-writes, a replica's own concurrent
//! enrollments would keep invalidating each other's reads of the token.
//! Instead each replica keeps one queue per token and one committer task
//! per non-empty queue: the committer takes what is queued (up to
//! [`ENROLLMENTS_PER_TXN`]), decides all of it against the token as read,
//! and commits the token's new use count with every accepted node and name
//! in one transaction guarded by the revisions it read. Within a replica
//! nothing conflicts any more; between replicas a guard that lost is read
//! again from etcd in the same round trip (the transaction's failure
//! branch) and the group is decided again, with a short random pause, for
//! up to the request timeout. Uses stay exact: each transaction spends the
//! uses it accepted against the count it compared.
//!
//! An agent whose enrollment committed but whose answer was lost (a timeout,
//! a dropped connection, a replica that died after committing) retries with
//! the same name and key: the decision answers it with the node it created
//! ([`NodeRecord::is_retried_by`]) instead of refusing the name.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hotswap_etcd::{Compare, CompareOp, TxnOp, TxnOpResult};
use tokio::sync::oneshot;

use super::{Base, CommitError, Inner, Mirror};
use crate::store::{
    Collection, EnrollError, EnrollRejection, NodeRecord, StoreError, TokenRecord, decode, encode,
};

/// Enrollments committed in one transaction. Each adds two compares (its
/// name and node keys are still as read) and two puts to the token's own
/// compare and put and the leader's fence; etcd refuses more than
/// `--max-txn-ops` (128 by default) compares or operations, and the failure
/// branch reads every guarded key back. 40 keeps every branch under 90.
pub(super) const ENROLLMENTS_PER_TXN: usize = 40;

/// The longest random pause between two attempts of a group that lost a
/// race with another replica.
const MAX_PAUSE: Duration = Duration::from_millis(50);

/// One enrollment waiting for its token's committer.
pub(super) struct Waiting {
    now_ms: u64,
    node: NodeRecord,
    reply: oneshot::Sender<Result<NodeRecord, EnrollError>>,
}

/// The enrollments waiting, per token hash. A token has an entry exactly
/// while a committer task runs for it.
#[derive(Default)]
pub(super) struct Queues(std::sync::Mutex<HashMap<String, Vec<Waiting>>>);

impl Queues {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Waiting>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Queue an enrollment with its token's committer (starting one if none
/// runs) and wait for its answer.
pub(super) async fn enroll(
    inner: &Arc<Inner>,
    token_hash: &str,
    now_ms: u64,
    node: NodeRecord,
) -> Result<NodeRecord, EnrollError> {
    let (reply, answer) = oneshot::channel();
    let waiting = Waiting {
        now_ms,
        node,
        reply,
    };
    let start = {
        let mut queues = inner.enrollments.lock();
        match queues.get_mut(token_hash) {
            Some(queue) => {
                queue.push(waiting);
                false
            }
            None => {
                queues.insert(token_hash.to_string(), vec![waiting]);
                true
            }
        }
    };
    if start {
        // A task of its own, so a caller that gives up (its request was
        // cancelled) does not strand the enrollments queued behind it.
        tokio::spawn(commit_queue(Arc::clone(inner), token_hash.to_string()));
    }
    answer.await.unwrap_or_else(|_| {
        Err(EnrollError::Store(StoreError::Backend(
            "the enrollment was dropped before it was decided (the store is closing); try again"
                .into(),
        )))
    })
}

/// Commit a token's queue, a group at a time, until it is empty.
async fn commit_queue(inner: Arc<Inner>, token_hash: String) {
    loop {
        let group: Vec<Waiting> = {
            let mut queues = inner.enrollments.lock();
            let Some(queue) = queues.get_mut(&token_hash) else {
                return;
            };
            if queue.is_empty() {
                queues.remove(&token_hash);
                return;
            }
            let take = queue.len().min(ENROLLMENTS_PER_TXN);
            queue.drain(..take).collect()
        };
        let requests: Vec<(u64, &NodeRecord)> = group.iter().map(|w| (w.now_ms, &w.node)).collect();
        let outcome = commit_group(&inner, &token_hash, &requests).await;
        drop(requests);
        match outcome {
            Ok(answers) => {
                for (waiting, answer) in group.into_iter().zip(answers) {
                    let _gone = waiting.reply.send(answer.map_err(EnrollError::Rejected));
                }
            }
            Err(error) => {
                let message = error.to_string();
                for waiting in group {
                    let _gone = waiting
                        .reply
                        .send(Err(EnrollError::Store(StoreError::Backend(
                            message.clone(),
                        ))));
                }
            }
        }
    }
}

/// A key's value and mod revision as read from etcd itself (0: absent).
type Fresh = HashMap<Vec<u8>, (Option<Vec<u8>>, i64)>;

/// What one decision of a group came to.
struct Decision {
    answers: Vec<Result<NodeRecord, EnrollRejection>>,
    /// Keys the transaction requires unchanged, with the revision read.
    guards: Vec<(String, Base)>,
    writes: Vec<(String, Vec<u8>)>,
    /// Keys to read from etcd before this decision may stand: node records
    /// that taken names point at and that neither this replica's view nor
    /// etcd's answers so far hold (one may be the node a retry asks for),
    /// and keys this replica's view holds an old value of.
    unseen: Vec<String>,
}

/// Decide a group and commit it, again on a lost race, until it commits or
/// the request timeout has passed. Returns each request's answer.
async fn commit_group(
    inner: &Inner,
    token_hash: &str,
    requests: &[(u64, &NodeRecord)],
) -> Result<Vec<Result<NodeRecord, EnrollRejection>>, StoreError> {
    // What this replica queued before (the token's own creation, say) is
    // committed first, so the reads below see it.
    inner.flush().await?;
    let mut fresh = Fresh::new();
    let deadline = tokio::time::Instant::now() + inner.request_timeout;
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        let decision = decide(inner, token_hash, requests, &fresh)?;
        if !decision.unseen.is_empty() {
            let keys: Vec<&String> = decision.unseen.iter().collect();
            read_fresh(inner, &keys, &mut fresh).await?;
            continue;
        }
        if decision.writes.is_empty() {
            return Ok(decision.answers);
        }
        // A key written by a batch of ours still committing has no revision
        // to compare yet: read it from etcd and decide again.
        let unknown: Vec<&String> = decision
            .guards
            .iter()
            .filter(|(_, base)| *base == Base::InFlight)
            .map(|(key, _)| key)
            .collect();
        if !unknown.is_empty() {
            read_fresh(inner, &unknown, &mut fresh).await?;
            continue;
        }
        let mut compares: Vec<Compare> = inner.fence().into_iter().collect();
        for (key, base) in &decision.guards {
            if let Base::Revision(revision) = base {
                compares.push(Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    *revision,
                ));
            }
        }
        let success: Vec<TxnOp> = decision
            .writes
            .iter()
            .map(|(key, value)| TxnOp::put(key.clone(), value.clone()))
            .collect();
        let failure: Vec<TxnOp> = decision
            .guards
            .iter()
            .map(|(key, _)| TxnOp::get(key.clone()))
            .collect();
        match inner.client.txn(&compares, &success, &failure).await {
            Ok(result) if result.succeeded => {
                {
                    let mut layers = inner.layers();
                    for (key, _) in &decision.writes {
                        layers
                            .written_at
                            .insert(key.clone().into_bytes(), result.revision);
                    }
                }
                let caught_up = inner.mirror.caught_up(result.revision);
                let _ = tokio::time::timeout(inner.request_timeout, caught_up).await;
                return Ok(decision.answers);
            }
            Ok(result) => {
                let mut changed = false;
                for ((key, base), response) in decision.guards.iter().zip(&result.responses) {
                    if let Some(now) = read_back(response) {
                        changed |= *base != Base::Revision(now.1);
                        fresh.insert(key.clone().into_bytes(), now);
                    }
                }
                if !changed
                    && let Some(fence) = inner.fence()
                    && !inner.holds(&fence).await.map_err(StoreError::from)?
                {
                    return Err(StoreError::from(CommitError::Fenced));
                }
                tracing::debug!(
                    attempt,
                    enrollments = requests.len(),
                    "another replica changed the join token first; deciding again"
                );
            }
            // The transaction may or may not have committed. Read the keys
            // again and decide again: a group that did commit finds its
            // nodes under its own ids and answers with them.
            Err(e) if e.is_transient() => {
                tracing::debug!(error = %e, attempt, "enrollment transaction failed; reading back and deciding again");
                let keys: Vec<&String> = decision.guards.iter().map(|(key, _)| key).collect();
                // The read-back fails too while etcd is away: deciding
                // again then reads what this replica saw, and the guards
                // keep a stale decision from committing.
                if read_fresh(inner, &keys, &mut fresh).await.is_err() {
                    fresh.clear();
                }
            }
            Err(e) => return Err(StoreError::from(CommitError::from(e))),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StoreError::Backend(format!(
                "enrollment: the join token's record kept changing under this replica for {}s (other replicas enrolling with it) or etcd did not answer; try again",
                inner.request_timeout.as_secs()
            )));
        }
        // A random pause that grows, so replicas that lost to each other
        // do not meet again at once.
        let ceiling = (1u64 << attempt.min(6)).min(MAX_PAUSE.as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..=ceiling))).await;
    }
}

/// Read keys from etcd itself, in one round trip, into `fresh`.
async fn read_fresh(inner: &Inner, keys: &[&String], fresh: &mut Fresh) -> Result<(), StoreError> {
    let gets: Vec<TxnOp> = keys.iter().map(|key| TxnOp::get((*key).clone())).collect();
    let result = inner
        .client
        .txn(&[], &gets, &[])
        .await
        .map_err(|e| StoreError::from(CommitError::from(e)))?;
    for (key, response) in keys.iter().zip(&result.responses) {
        if let Some(now) = read_back(response) {
            fresh.insert((*key).clone().into_bytes(), now);
        }
    }
    Ok(())
}

/// A key's value and mod revision (0: absent) from a get's answer.
fn read_back(response: &TxnOpResult) -> Option<(Option<Vec<u8>>, i64)> {
    let TxnOpResult::Get { kvs } = response else {
        return None;
    };
    Some(match kvs.first() {
        Some(kv) => (Some(kv.value.clone()), kv.mod_revision),
        None => (None, 0),
    })
}

/// Decide every request of a group in order against the token as read
/// (`fresh` over this replica's view), spending one use per accepted node.
fn decide(
    inner: &Inner,
    token_hash: &str,
    requests: &[(u64, &NodeRecord)],
    fresh: &Fresh,
) -> Result<Decision, StoreError> {
    // Keys this replica wrote at a revision its mirror does not hold yet
    // (the mirror lagged past the wait after a commit): the view has an
    // old value for them, so they are read from etcd before deciding.
    let behind = std::cell::RefCell::new(Vec::new());
    let mirror_revision = inner.mirror.read(Mirror::revision);
    let read = |key: &str| -> (Option<Vec<u8>>, Base) {
        if let Some((value, revision)) = fresh.get(key.as_bytes()) {
            return (value.clone(), Base::Revision(*revision));
        }
        let written = inner.layers().written_at.get(key.as_bytes()).copied();
        if written.is_some_and(|at| at > mirror_revision) {
            behind.borrow_mut().push(key.to_string());
        }
        inner.read(key.as_bytes())
    };
    let keys = &inner.keys;
    let token_key = keys.record(Collection::Tokens, token_hash);
    let (token_value, token_base) = read(&token_key);
    let Some(token_bytes) = token_value else {
        if !behind.borrow().is_empty() {
            return Ok(Decision {
                answers: Vec::new(),
                guards: Vec::new(),
                writes: Vec::new(),
                unseen: behind.into_inner(),
            });
        }
        return Ok(Decision {
            answers: requests
                .iter()
                .map(|_| Err(EnrollRejection::UnknownToken))
                .collect(),
            guards: Vec::new(),
            writes: Vec::new(),
            unseen: Vec::new(),
        });
    };
    let mut token: TokenRecord = decode(Collection::Tokens, token_key.as_bytes(), &token_bytes)?;
    let mut answers = Vec::with_capacity(requests.len());
    let mut guards = Vec::new();
    let mut writes = Vec::new();
    // Names this group creates, with the answer that created them.
    let mut created: HashMap<&str, usize> = HashMap::new();
    let mut unseen = Vec::new();
    for (now_ms, node) in requests {
        let name_key = keys.record(Collection::NodeNames, &node.name);
        let (name_value, name_base) = read(&name_key);
        let existing = match &name_value {
            Some(id) => {
                let id = String::from_utf8_lossy(id).into_owned();
                let node_key = keys.record(Collection::Nodes, &id);
                let record = match read(&node_key).0 {
                    Some(bytes) => Some(decode::<NodeRecord>(
                        Collection::Nodes,
                        node_key.as_bytes(),
                        &bytes,
                    )?),
                    None => None,
                };
                // A name another replica just wrote (read from etcd) may
                // point at a record this replica's mirror does not hold yet.
                if record.is_none() && !fresh.contains_key(node_key.as_bytes()) {
                    unseen.push(node_key);
                }
                Some((id, record))
            }
            None => None,
        };
        // A retry of an enrollment that committed (ours, in an attempt
        // whose answer was lost, or the agent's earlier request) is
        // answered with its node, whatever the token has left now.
        if let Some((_, Some(record))) = &existing
            && (record.id == node.id
                || record.is_retried_by(token_hash, &node.name, &node.enroll_key))
        {
            answers.push(Ok(record.clone()));
            continue;
        }
        // The same name twice in one group: the second is a retry of the
        // first (answered alike) or refused as taken.
        if let Some(&earlier) = created.get(node.name.as_str())
            && let Some(Ok(record)) = answers.get(earlier)
        {
            let answer = if record.is_retried_by(token_hash, &node.name, &node.enroll_key) {
                Ok(record.clone())
            } else {
                Err(EnrollRejection::NameTaken {
                    name: node.name.clone(),
                    id: record.id.clone(),
                })
            };
            answers.push(answer);
            continue;
        }
        if *now_ms >= token.expires_at_ms {
            answers.push(Err(EnrollRejection::Expired(
                hotswap_common::timefmt::rfc3339_from_ms(token.expires_at_ms),
            )));
            continue;
        }
        if token.uses_left == 0 {
            answers.push(Err(EnrollRejection::UsedUp(token.uses_total)));
            continue;
        }
        if let Some((id, _)) = existing {
            answers.push(Err(EnrollRejection::NameTaken {
                name: node.name.clone(),
                id,
            }));
            continue;
        }
        token.uses_left -= 1;
        let mut record = (*node).clone();
        record.forced_labels = token.labels.clone();
        record.labels.extend(token.labels.clone());
        let node_key = keys.record(Collection::Nodes, &record.id);
        let node_base = read(&node_key).1;
        guards.push((name_key.clone(), name_base));
        guards.push((node_key.clone(), node_base));
        writes.push((node_key, encode(&record)));
        writes.push((name_key, record.id.clone().into_bytes()));
        created.insert(node.name.as_str(), answers.len());
        answers.push(Ok(record));
    }
    if !writes.is_empty() {
        guards.push((token_key.clone(), token_base));
        writes.push((token_key, encode(&token)));
    }
    unseen.extend(behind.into_inner());
    Ok(Decision {
        answers,
        guards,
        writes,
        unseen,
    })
}
