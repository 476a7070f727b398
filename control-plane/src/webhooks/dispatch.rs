//! Delivery: one task per webhook, on the leader, driven by the event log
//! from the webhook's persisted cursor.
//!
//! - **At least once, in order.** A task reads the log after its cursor's
//!   `processed_seq`, sends each matching event, and stores the cursor
//!   after each acceptance (durably, before the next event). A restart
//!   resumes from the stored cursor, so an event whose acceptance was not
//!   yet stored is sent again, never skipped; events are sent one at a
//!   time, in sequence order.
//! - **Only durable events.** The store is flushed before a batch read
//!   from the log is delivered: on the embedded store an appended event
//!   reaches disk with the next flush, and a receiver must never hear of
//!   an event a crash could still take back (its number would be reused).
//!   On etcd the log holds only committed events.
//! - **Retries.** A failed attempt is retried after [`super::backoff_delay`]
//!   (doubling from 500 ms up to `webhook_backoff_max`, with jitter). The
//!   first failure's time is stored in the cursor, so `webhook_retry_for`
//!   counts across restarts; once it has passed, the event is skipped and
//!   the error kept in `last_error`. Events trimmed from the log before
//!   they could be sent (`event_retention`) are skipped the same way.
//! - **Isolation.** Each webhook has its own task and HTTP client; an
//!   attempt is bounded by the client's timeouts; nothing here holds a
//!   lock another task or the control plane waits on.
//! - **The leader alone** runs this (`server.rs` starts it with the
//!   engine), so replicas on etcd do not send each event once each; the
//!   cursor writes carry the leader's fence.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::client::Receiver;
use super::{OwnPorts, backoff_delay, kind_matches};
use crate::events::{Event, EventFilter, EventLog};
use crate::metrics::{Metrics, WebhookLabel};
use crate::store::{Store, StoreError, WebhookCursor, WebhookRecord};

/// How often the set of webhooks is read again (creations and deletions
/// through any replica show up within this).
const RESCAN: Duration = Duration::from_secs(1);
/// How long a task with nothing to send waits before looking at the log
/// again without being woken (a shared log's commits wake it too).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Events read from the log at once.
const BATCH: usize = 256;
/// Least time between two cursor writes that only skip non-matching
/// events: a busy log with a narrow filter must not turn every event into
/// a store write per webhook. (Skipping them again after a restart is
/// harmless.)
const SKIP_WRITE_EVERY: Duration = Duration::from_secs(1);
/// How long a stopping dispatcher waits for its tasks.
const STOP_WAIT: Duration = Duration::from_secs(5);

/// What every delivery task shares.
pub struct Dispatcher {
    pub store: Store,
    pub events: Arc<EventLog>,
    pub metrics: Arc<Metrics>,
    pub own: OwnPorts,
    pub retry_for: Duration,
    pub backoff_max: Duration,
}

impl Dispatcher {
    /// Run until `shutdown`: a task per stored webhook, started and stopped
    /// as webhooks are created and deleted.
    pub async fn run(self, shutdown: CancellationToken) {
        let shared = Arc::new(self);
        let mut tasks: HashMap<String, (CancellationToken, tokio::task::JoinHandle<()>)> =
            HashMap::new();
        loop {
            match shared.store.list_webhooks() {
                Ok(hooks) => {
                    tasks.retain(|id, (stop, _)| {
                        let keep = hooks.iter().any(|h| &h.id == id);
                        if !keep {
                            stop.cancel();
                            shared.forget_metrics(id);
                        }
                        keep
                    });
                    for hook in hooks {
                        if tasks
                            .get(&hook.id)
                            .is_some_and(|(_, task)| !task.is_finished())
                        {
                            continue;
                        }
                        let stop = shutdown.child_token();
                        let span = tracing::info_span!("webhook", id = %hook.id);
                        let id = hook.id.clone();
                        let task = tokio::spawn(tracing::Instrument::instrument(
                            deliver_loop(shared.clone(), hook, stop.clone()),
                            span,
                        ));
                        tasks.insert(id, (stop, task));
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot list webhooks"),
            }
            tokio::select! {
                _ = tokio::time::sleep(RESCAN) => {}
                _ = shutdown.cancelled() => break,
            }
        }
        for (_, (stop, task)) in tasks {
            stop.cancel();
            if tokio::time::timeout(STOP_WAIT, task).await.is_err() {
                tracing::warn!("a webhook delivery task did not stop in time");
            }
        }
    }

    fn label(id: &str) -> WebhookLabel {
        WebhookLabel {
            webhook: id.to_string(),
        }
    }

    fn forget_metrics(&self, id: &str) {
        let label = Self::label(id);
        self.metrics.webhook_deliveries.remove(&label);
        self.metrics.webhook_failures.remove(&label);
        self.metrics.webhook_lag.remove(&label);
    }
}

/// Why a task stops.
enum Stop {
    /// Shutdown, or the webhook was deleted.
    Now,
}

/// The stored cursor, and whether the webhook still exists.
async fn store_cursor(shared: &Dispatcher, id: &str, cursor: &WebhookCursor) -> Result<(), Stop> {
    match shared.store.put_webhook_cursor(id, cursor).await {
        Ok(true) => Ok(()),
        Ok(false) => Err(Stop::Now),
        // The stored cursor stays behind the one in memory: after a
        // restart, those events are sent again (at least once).
        Err(e) => {
            tracing::warn!(error = %e, "cannot store the webhook's cursor");
            Ok(())
        }
    }
}

async fn deliver_loop(shared: Arc<Dispatcher>, record: WebhookRecord, stop: CancellationToken) {
    let _ = run_webhook(&shared, &record, &stop).await;
}

async fn pause(stop: &CancellationToken, duration: Duration) -> Result<(), Stop> {
    tokio::select! {
        _ = tokio::time::sleep(duration) => Ok(()),
        _ = stop.cancelled() => Err(Stop::Now),
    }
}

async fn run_webhook(
    shared: &Dispatcher,
    record: &WebhookRecord,
    stop: &CancellationToken,
) -> Result<(), Stop> {
    let id = record.id.as_str();
    let label = Dispatcher::label(id);
    let deliveries = shared
        .metrics
        .webhook_deliveries
        .get_or_create(&label)
        .clone();
    let failures = shared
        .metrics
        .webhook_failures
        .get_or_create(&label)
        .clone();
    let lag = shared.metrics.webhook_lag.get_or_create(&label).clone();
    let mut cursor = loop {
        match shared.store.get_webhook_cursor(id) {
            Ok(Some(cursor)) => break cursor,
            Ok(None) => return Err(Stop::Now),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the webhook's cursor");
                pause(stop, IDLE_POLL).await?;
            }
        }
    };
    let receiver = match Receiver::new(record, shared.own) {
        Ok(receiver) => receiver,
        Err(e) => {
            // Validated at creation; only a record written by hand gets here.
            cursor.last_error = Some(format!("cannot deliver: {e}"));
            cursor.last_error_at_ms = Some(hotswap_common::timefmt::now_ms());
            store_cursor(shared, id, &cursor).await?;
            stop.cancelled().await;
            return Err(Stop::Now);
        }
    };
    // Subscribed before the first read, so no append falls in between.
    let mut live = shared.events.subscribe();
    let mut attempt: u32 = 0;
    let mut skipped_unstored = false;
    let mut last_write = Instant::now();
    loop {
        if stop.is_cancelled() {
            if skipped_unstored {
                store_cursor(shared, id, &cursor).await?;
            }
            return Err(Stop::Now);
        }
        let first = shared.events.first_seq();
        if first > cursor.processed_seq + 1 {
            let error = format!(
                "events {}..{} were trimmed from the log (event_retention) before they could be delivered; skipped",
                cursor.processed_seq + 1,
                first - 1
            );
            tracing::warn!(%error, "webhook fell behind the event log");
            cursor.last_error = Some(error);
            cursor.last_error_at_ms = Some(hotswap_common::timefmt::now_ms());
            cursor.processed_seq = first - 1;
            cursor.failing_since_ms = None;
            store_cursor(shared, id, &cursor).await?;
        }
        let batch =
            match shared
                .events
                .read(cursor.processed_seq + 1, &EventFilter::default(), BATCH)
            {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the event log");
                    pause(stop, IDLE_POLL).await?;
                    continue;
                }
            };
        lag.set(
            shared
                .events
                .last_seq()
                .saturating_sub(cursor.processed_seq) as i64,
        );
        if batch.is_empty() {
            if skipped_unstored {
                store_cursor(shared, id, &cursor).await?;
                skipped_unstored = false;
                last_write = Instant::now();
            }
            tokio::select! {
                _ = live.recv() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
                _ = stop.cancelled() => {}
            }
            continue;
        }
        if let Err(e) = flush(shared).await {
            tracing::warn!(error = %e, "cannot make events durable before delivering them");
            pause(stop, IDLE_POLL).await?;
            continue;
        }
        for event in batch {
            if !kind_matches(&record.kinds, &event.kind) {
                cursor.processed_seq = event.seq;
                skipped_unstored = true;
                continue;
            }
            deliver_one(
                shared,
                id,
                &receiver,
                &event,
                &mut cursor,
                &mut attempt,
                stop,
                (&deliveries, &failures),
            )
            .await?;
            skipped_unstored = false;
            last_write = Instant::now();
            lag.set(
                shared
                    .events
                    .last_seq()
                    .saturating_sub(cursor.processed_seq) as i64,
            );
        }
        if skipped_unstored && last_write.elapsed() >= SKIP_WRITE_EVERY {
            store_cursor(shared, id, &cursor).await?;
            skipped_unstored = false;
            last_write = Instant::now();
        }
    }
}

async fn flush(shared: &Dispatcher) -> Result<(), StoreError> {
    shared.store.flush().await
}

type Counters<'a> = (
    &'a prometheus_client::metrics::counter::Counter,
    &'a prometheus_client::metrics::counter::Counter,
);

/// Send one event until the receiver accepts it or `retry_for` has passed
/// since its first failure; the cursor is stored after either.
#[allow(clippy::too_many_arguments)]
async fn deliver_one(
    shared: &Dispatcher,
    id: &str,
    receiver: &Receiver,
    event: &Event,
    cursor: &mut WebhookCursor,
    attempt: &mut u32,
    stop: &CancellationToken,
    (deliveries, failures): Counters<'_>,
) -> Result<(), Stop> {
    loop {
        let outcome = tokio::select! {
            outcome = receiver.deliver(event) => outcome,
            // An attempt cut short is sent again after the restart.
            _ = stop.cancelled() => return Err(Stop::Now),
        };
        let now = hotswap_common::timefmt::now_ms();
        match outcome {
            Ok(status) => {
                tracing::debug!(seq = event.seq, kind = %event.kind, status, "delivered");
                deliveries.inc();
                *attempt = 0;
                cursor.processed_seq = event.seq;
                cursor.last_delivered_seq = event.seq;
                cursor.delivered += 1;
                cursor.failing_since_ms = None;
                return store_cursor(shared, id, cursor).await;
            }
            Err(error) => {
                failures.inc();
                *attempt = attempt.saturating_add(1);
                let since = *cursor.failing_since_ms.get_or_insert(now);
                let failing_for = Duration::from_millis(now.saturating_sub(since));
                cursor.last_error_at_ms = Some(now);
                if failing_for >= shared.retry_for {
                    let message = format!(
                        "gave up on event {} ({}) after retrying for {}: {error}",
                        event.seq,
                        event.kind,
                        hotswap_common::timefmt::human_age(failing_for.as_millis() as u64)
                    );
                    tracing::warn!(seq = event.seq, error = %message, "webhook delivery skipped");
                    cursor.last_error = Some(message);
                    cursor.processed_seq = event.seq;
                    cursor.failing_since_ms = None;
                    *attempt = 0;
                    return store_cursor(shared, id, cursor).await;
                }
                tracing::info!(seq = event.seq, attempt = *attempt, error = %error, "webhook delivery failed; retrying");
                cursor.last_error = Some(format!("event {}: {error}", event.seq));
                store_cursor(shared, id, cursor).await?;
                let delay = backoff_delay(*attempt, shared.backoff_max, rand::random::<f64>());
                pause(stop, delay).await?;
            }
        }
    }
}

/// Matching events after the cursor: what `webhooks list` calls the
/// backlog. Walks the log from the cursor in batches.
pub fn backlog(
    events: &EventLog,
    record: &WebhookRecord,
    cursor: &WebhookCursor,
) -> Result<u64, StoreError> {
    let mut count = 0;
    let mut from = cursor.processed_seq + 1;
    loop {
        let batch = events.read(from, &EventFilter::default(), 4096)?;
        let Some(last) = batch.last() else {
            return Ok(count);
        };
        from = last.seq + 1;
        count += batch
            .iter()
            .filter(|e| kind_matches(&record.kinds, &e.kind))
            .count() as u64;
    }
}
