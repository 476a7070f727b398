//! The durable event stream: every state change (nodes joining and leaving,
//! module phase and health, deployment progress, approvals, key, token and
//! user changes) as a record with a strictly increasing sequence number, in
//! its own sequence log of the store, plus a broadcast for live followers.
//!
//! An event is inserted before the change it describes is acknowledged and
//! rides on that change's flush (every acknowledged write is flushed); events
//! with no acknowledged write behind them (a module's health changing, a
//! session ending) reach disk with the store's background flush (the
//! embedded store's: within half a second). Retention is a bound on the number of events: the oldest are
//! trimmed as new ones arrive.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::store::{Collection, Direction, LogName, SeqLog, Store, StoreError};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub seq: u64,
    pub time_ms: u64,
    /// Dotted kind, e.g. `node.connected`, `deployment.finished`.
    pub kind: String,
    pub deployment_id: Option<String>,
    pub node: Option<String>,
    pub module: Option<String>,
    pub version: Option<String>,
    pub message: String,
}

impl Event {
    /// A new event of `kind`; the log fills in `seq` and `time_ms`.
    pub fn new(kind: &str, message: impl Into<String>) -> Self {
        Self {
            kind: kind.to_string(),
            message: message.into(),
            ..Self::default()
        }
    }
    pub fn deployment(mut self, id: &str) -> Self {
        self.deployment_id = Some(id.to_string());
        self
    }
    pub fn node(mut self, name: &str) -> Self {
        self.node = Some(name.to_string());
        self
    }
    pub fn module(mut self, name: &str, version: &str) -> Self {
        self.module = Some(name.to_string());
        if !version.is_empty() {
            self.version = Some(version.to_string());
        }
        self
    }
}

/// Which events a follower wants.
#[derive(Clone, Debug, Default)]
pub struct EventFilter {
    /// Exact kinds, or prefixes ending in '.'; empty for all.
    pub kinds: Vec<String>,
    pub deployment_id: String,
    pub node: String,
    pub module: String,
}

impl EventFilter {
    pub fn matches(&self, e: &Event) -> bool {
        let field =
            |want: &str, have: &Option<String>| want.is_empty() || have.as_deref() == Some(want);
        (self.kinds.is_empty()
            || self
                .kinds
                .iter()
                .any(|k| *k == e.kind || (k.ends_with('.') && e.kind.starts_with(k.as_str()))))
            && field(&self.deployment_id, &e.deployment_id)
            && field(&self.node, &e.node)
            && field(&self.module, &e.module)
    }
}

/// Capacity of the live channel; a follower further behind re-reads the log.
const LIVE_CAPACITY: usize = 4096;
/// Trim in batches, not on every append.
const TRIM_EVERY: u64 = 256;

pub struct EventLog {
    log: Arc<dyn SeqLog>,
    /// Whether other processes append to the log too: then the live stream
    /// is fed by what commits ([`EventLog::follow_commits`]).
    shared: bool,
    /// Held while a sequence number is assigned and its record inserted, so
    /// records land in sequence order.
    next: Mutex<u64>,
    live: broadcast::Sender<Event>,
    retention: AtomicU64,
    /// Events stored now (counting the log may walk it; this does not).
    stored: AtomicU64,
    appended: Option<prometheus_client::metrics::counter::Counter>,
    /// Gauge of the events stored, kept current by append and trim.
    stored_gauge: Option<prometheus_client::metrics::gauge::Gauge>,
}

fn decode(value: &[u8]) -> Result<Event, StoreError> {
    serde_json::from_slice(value).map_err(|e| StoreError::Corrupt {
        tree: Collection::Events.as_str(),
        key: String::new(),
        reason: e.to_string(),
    })
}

impl EventLog {
    pub fn open(store: &Store, retention: u64) -> Result<Self, StoreError> {
        let log = store.log(LogName::Events)?;
        let next = match log.last()? {
            Some((_, value)) => decode(&value)?.seq + 1,
            None => 1,
        };
        let (live, _) = broadcast::channel(LIVE_CAPACITY);
        let stored = AtomicU64::new(log.count()?);
        let shared = log.follow().is_some();
        Ok(Self {
            shared,
            log,
            next: Mutex::new(next),
            live,
            retention: AtomicU64::new(retention.max(1)),
            stored,
            appended: None,
            stored_gauge: None,
        })
    }

    /// Count appends in a Prometheus counter and keep `stored` equal to the
    /// number of events held, whatever else happens in the process.
    pub fn counting(
        mut self,
        counter: prometheus_client::metrics::counter::Counter,
        stored: prometheus_client::metrics::gauge::Gauge,
    ) -> Self {
        stored.set(self.len() as i64);
        self.appended = Some(counter);
        self.stored_gauge = Some(stored);
        self
    }

    fn publish_stored(&self) {
        if let Some(gauge) = &self.stored_gauge {
            gauge.set(self.len() as i64);
        }
    }

    pub fn set_retention(&self, events: u64) {
        self.retention.store(events.max(1), Ordering::Relaxed);
    }

    /// Append an event (not flushed: see the module docs) and publish it.
    /// A storage failure is logged, never returned: losing an event must not
    /// fail the change it describes.
    ///
    /// Where other processes append to the same log (replicas on etcd), the
    /// number given here is a proposal: the store may commit the event under
    /// a later one, and live followers hear it from [`EventLog::follow_commits`]
    /// as committed, not from here.
    pub fn append(&self, mut event: Event) -> Option<Event> {
        let seq = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            event.seq = *next;
            event.time_ms = hotswap_common::timefmt::now_ms();
            let template = event.clone();
            let encode: crate::store::Encode = Box::new(move |seq| {
                let mut event = template.clone();
                event.seq = seq;
                serde_json::to_vec(&event).unwrap_or_default()
            });
            if let Err(e) = self.log.append(event.seq, encode) {
                tracing::error!(error = %e, kind = %event.kind, "cannot append to the event log");
                return None;
            }
            *next += 1;
            event.seq
        };
        self.stored.fetch_add(1, Ordering::Relaxed);
        if let Some(counter) = &self.appended {
            counter.inc();
        }
        if seq % TRIM_EVERY == 0 {
            self.trim(seq);
        }
        self.publish_stored();
        if !self.shared {
            let _ = self.live.send(event.clone());
        }
        Some(event)
    }

    /// Publish what other writers commit to a shared log (replicas on
    /// etcd): every committed event, whoever appended it, goes to the live
    /// followers in sequence order, and this process's next proposal moves
    /// past it. Runs until the store closes; a no-op for a log only this
    /// process writes.
    pub fn follow_commits(self: &Arc<Self>) -> Option<tokio::task::JoinHandle<()>> {
        let mut commits = self.log.follow()?;
        let log = Arc::clone(self);
        Some(tokio::spawn(async move {
            loop {
                match commits.recv().await {
                    Ok((seq, bytes)) => {
                        {
                            let mut next = log.next.lock().unwrap_or_else(|e| e.into_inner());
                            *next = (*next).max(seq + 1);
                        }
                        match decode(&bytes) {
                            Ok(event) => {
                                let _ = log.live.send(event);
                            }
                            Err(e) => {
                                tracing::warn!(seq, error = %e, "skipping an unreadable event")
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        // Live followers re-read the log when they lag too;
                        // nothing is lost, only not pushed.
                        tracing::warn!(missed, "event publisher fell behind the store");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }))
    }

    fn trim(&self, last: u64) {
        let keep = self.retention.load(Ordering::Relaxed);
        let Some(first_kept) = last.checked_sub(keep) else {
            return;
        };
        match self.log.remove_through(first_kept) {
            Ok(removed) => {
                self.stored.fetch_sub(removed, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "cannot trim the event log"),
        }
    }

    /// Live events from now on; subscribe before reading the log so nothing
    /// falls in between.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.live.subscribe()
    }

    /// Stored events with `seq >= since` matching `filter`, at most `limit`.
    pub fn read(
        &self,
        since: u64,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let mut out = Vec::new();
        for entry in self.log.range(since, Direction::Forward) {
            let (_, value) = entry?;
            let event = decode(&value)?;
            if filter.matches(&event) {
                out.push(event);
                if out.len() == limit {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Where to start reading so that the newest `limit` stored events with
    /// `seq >= since` matching `filter` come first: the sequence number of
    /// the `limit`-th newest match, or `since` when fewer match. Walks the
    /// log backwards from its end, so it holds no events in memory.
    pub fn newest_start(
        &self,
        since: u64,
        filter: &EventFilter,
        limit: usize,
    ) -> Result<u64, StoreError> {
        if limit == 0 {
            return Ok(*self.next.lock().unwrap_or_else(|e| e.into_inner()));
        }
        let mut matched = 0;
        for entry in self.log.range(since, Direction::Backward) {
            let (_, value) = entry?;
            let event = decode(&value)?;
            if filter.matches(&event) {
                matched += 1;
                if matched == limit {
                    return Ok(event.seq);
                }
            }
        }
        Ok(since)
    }

    /// Sequence number of the newest event this process knows of (0 when
    /// none): its own appends and, on a shared log, what it saw commit.
    pub fn last_seq(&self) -> u64 {
        self.next
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_sub(1)
    }

    /// Sequence number of the oldest stored event (0 when empty).
    pub fn first_seq(&self) -> u64 {
        self.log.first_seq().ok().flatten().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.stored.load(Ordering::Relaxed) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How many events one node may cause: a token bucket, kept per node for
/// as long as the node is enrolled (not per session, so reconnecting does
/// not refill it). The log's retention is a count, so a node that could
/// append without bound would push every deployment event out of it; with
/// this, one node adds at most [`EventBudget::BURST`] events at once and
/// [`EventBudget::PER_SECOND`] a second after that, which at the default
/// retention of 100,000 takes more than a day of nonstop lying. Events
/// beyond the budget are counted, and the count goes into one
/// `node.events_suppressed` event at most every
/// [`EventBudget::SUMMARY_EVERY`] (and when the session ends).
#[derive(Clone, Debug)]
pub struct EventBudget {
    tokens: f64,
    refilled: std::time::Instant,
    /// Events refused since the last summary.
    suppressed: u64,
    /// When the last summary went out (or the budget was created).
    summarized: std::time::Instant,
}

/// Events refused by an [`EventBudget`], to be told in one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Suppressed {
    pub events: u64,
    pub over: std::time::Duration,
}

impl EventBudget {
    /// Events a node may cause at once: a node attaching with a few dozen
    /// modules in flux (phase and health of each) fits in it.
    pub const BURST: f64 = 120.0;
    /// Events a node may cause per second once the burst is spent.
    pub const PER_SECOND: f64 = 1.0;
    /// Least time between two summaries of one node.
    pub const SUMMARY_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

    pub fn new(now: std::time::Instant) -> Self {
        Self {
            tokens: Self::BURST,
            refilled: now,
            suppressed: 0,
            summarized: now,
        }
    }

    /// Take tokens for `wanted` events; returns how many may be appended
    /// (the first ones), and counts the rest as suppressed.
    pub fn take(&mut self, now: std::time::Instant, wanted: usize) -> usize {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * Self::PER_SECOND).min(Self::BURST);
        self.refilled = self.refilled.max(now);
        let allowed = (self.tokens.floor() as usize).min(wanted);
        self.tokens -= allowed as f64;
        self.suppressed += (wanted - allowed) as u64;
        allowed
    }

    /// The events suppressed since the last summary, when a summary is due:
    /// [`EventBudget::SUMMARY_EVERY`] after the previous one, or at once
    /// with `now_or_never` (the session ends). Summaries take no tokens:
    /// they are at most one per interval.
    pub fn summary(&mut self, now: std::time::Instant, now_or_never: bool) -> Option<Suppressed> {
        let over = now.saturating_duration_since(self.summarized);
        if self.suppressed == 0 || (!now_or_never && over < Self::SUMMARY_EVERY) {
            return None;
        }
        let events = std::mem::take(&mut self.suppressed);
        self.summarized = now;
        Some(Suppressed { events, over })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> (tempfile::TempDir, Store, EventLog) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), 1 << 20).unwrap();
        let log = EventLog::open(&store, 1000).unwrap();
        (dir, store, log)
    }

    #[test]
    fn sequence_is_strictly_increasing_and_survives_reopen() {
        let (_dir, store, log) = log();
        let a = log
            .append(Event::new("node.connected", "a").node("web-1"))
            .unwrap();
        let b = log
            .append(Event::new("node.connected", "b").node("web-2"))
            .unwrap();
        assert_eq!((a.seq, b.seq), (1, 2));
        drop(log);
        let log = EventLog::open(&store, 1000).unwrap();
        let c = log.append(Event::new("node.disconnected", "c")).unwrap();
        assert_eq!(c.seq, 3);
        assert!(c.time_ms >= b.time_ms);
    }

    #[test]
    fn read_filters_and_resumes_from_a_sequence_number() {
        let (_dir, _store, log) = log();
        log.append(Event::new("node.connected", "").node("a"));
        log.append(Event::new("deployment.created", "").deployment("d-1"));
        log.append(Event::new("deployment.finished", "").deployment("d-1"));
        log.append(Event::new("deployment.created", "").deployment("d-2"));
        let all = log.read(0, &EventFilter::default(), 100).unwrap();
        assert_eq!(all.len(), 4);
        let d1 = EventFilter {
            deployment_id: "d-1".into(),
            ..Default::default()
        };
        assert_eq!(log.read(0, &d1, 100).unwrap().len(), 2);
        let kinds = EventFilter {
            kinds: vec!["deployment.".into()],
            ..Default::default()
        };
        let from3: Vec<u64> = log
            .read(3, &kinds, 100)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect();
        assert_eq!(from3, [3, 4]);
        let exact = EventFilter {
            kinds: vec!["deployment.created".into()],
            ..Default::default()
        };
        assert_eq!(log.read(0, &exact, 1).unwrap().len(), 1);
    }

    #[test]
    fn newest_start_leaves_the_newest_matches_to_read() {
        let (_dir, _store, log) = log();
        for i in 1..=10u64 {
            let kind = if i % 2 == 0 {
                "deployment.step"
            } else {
                "node.connected"
            };
            log.append(Event::new(kind, i.to_string()));
        }
        let all = EventFilter::default();
        let steps = EventFilter {
            kinds: vec!["deployment.".into()],
            ..Default::default()
        };
        let newest = |since, filter: &EventFilter, limit| {
            let start = log.newest_start(since, filter, limit).unwrap();
            log.read(start, filter, limit)
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect::<Vec<_>>()
        };
        assert_eq!(newest(0, &all, 3), [8, 9, 10]);
        assert_eq!(newest(0, &steps, 2), [8, 10]);
        assert_eq!(newest(0, &all, 100), (1..=10).collect::<Vec<_>>());
        assert_eq!(newest(9, &all, 5), [9, 10], "since still bounds it");
        assert_eq!(newest(0, &all, 0), Vec::<u64>::new());
        assert_eq!(log.newest_start(0, &all, 0).unwrap(), 11, "past the end");
    }

    #[test]
    fn retention_trims_the_oldest() {
        let (_dir, _store, log) = log();
        log.set_retention(100);
        for i in 0..(TRIM_EVERY * 2) {
            log.append(Event::new("x", i.to_string()));
        }
        let first = log.first_seq();
        assert!(first > 1, "trimmed");
        assert!(log.len() as u64 <= 100 + TRIM_EVERY, "{}", log.len());
        // Sequence numbers are never reused.
        let next = log.append(Event::new("x", "")).unwrap();
        assert_eq!(next.seq, TRIM_EVERY * 2 + 1);
    }

    #[tokio::test]
    async fn followers_get_live_events() {
        let (_dir, _store, log) = log();
        let mut rx = log.subscribe();
        log.append(Event::new("node.connected", "hi"));
        let e = rx.recv().await.unwrap();
        assert_eq!((e.seq, e.kind.as_str()), (1, "node.connected"));
    }

    #[test]
    fn a_node_s_event_budget_allows_a_burst_then_a_trickle_and_summarizes_the_rest() {
        use std::time::{Duration, Instant};
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut budget = EventBudget::new(start);
        let burst = EventBudget::BURST as usize;
        assert_eq!(budget.take(start, 10), 10);
        assert_eq!(budget.take(start, burst), burst - 10, "the burst is spent");
        assert_eq!(budget.take(start, 5), 0);
        assert_eq!(budget.summary(at(1), false), None, "not yet due");
        // One token a second comes back, never more than the burst.
        assert_eq!(budget.take(at(2_500), 10), 2);
        assert_eq!(
            budget.summary(at(10_000), false),
            Some(Suppressed {
                events: 10 + 5 + 8,
                over: Duration::from_secs(10)
            })
        );
        assert_eq!(budget.summary(at(10_001), true), None, "nothing to tell");
        // Half a token left at 2.5 s, plus 8.5 s of refill.
        assert_eq!(budget.take(at(11_000), 20), 9);
        assert_eq!(
            budget.summary(at(11_000), true),
            Some(Suppressed {
                events: 11,
                over: Duration::from_secs(1)
            }),
            "a session ending tells at once"
        );
        assert_eq!(budget.take(at(1_000_000), 1_000), burst);
        // A clock read out of order takes nothing back.
        assert_eq!(budget.take(at(0), 1), 0);
    }
}
