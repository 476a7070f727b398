//! One request in one fresh instance: the store a component runs in (WASI
//! with nothing but its own environment, WASI HTTP with outgoing requests
//! refused, memory capped, time bounded), and the request statistics canary
//! analysis reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use wasmtime::component::ResourceTable;
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wasi::cli::OutputFile;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView};

use crate::scrape::{Histogram, Sample};

/// What one instance's store holds.
pub struct Host {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    limits: StoreLimits,
    hooks: DenyOutgoing,
}

impl WasiView for Host {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl WasiHttpView for Host {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

/// A component answers requests; it does not make them (SPEC §10: nothing
/// beyond serving WASI HTTP).
struct DenyOutgoing;

type SendFuture = Box<
    dyn Future<
            Output = wasmtime_wasi_http::Result<(
                hyper::Response<WasiBody>,
                Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
            )>,
        > + Send,
>;

impl WasiHttpHooks for DenyOutgoing {
    fn send_request(
        &mut self,
        _request: hyper::Request<WasiBody>,
        _options: Option<wasmtime_wasi_http::RequestOptions>,
        _fut: Box<dyn Future<Output = wasmtime_wasi_http::Result<()>> + Send>,
    ) -> SendFuture {
        Box::new(async { Err(wasmtime_wasi_http::Error::HttpRequestDenied) })
    }
}

/// What a version's instances are given.
pub struct Limits {
    pub max_memory: u64,
    pub request_timeout: Duration,
    /// The manifest's `env`, expanded: the component's whole environment.
    pub env: Vec<(String, String)>,
    /// Where the component's stdout and stderr go (the module's log).
    pub log: Option<OutputFile>,
}

/// The request ran past `request_timeout` and was stopped.
#[derive(Debug, thiserror::Error)]
#[error("the request ran longer than its request_timeout ({0:?}) and was stopped")]
pub struct TimedOut(pub Duration);

/// A new store for one instance of a version.
pub fn store(engine: &wasmtime::Engine, limits: &Limits) -> Store<Host> {
    let mut wasi = WasiCtx::builder();
    wasi.envs(&limits.env);
    if let Some(log) = &limits.log {
        wasi.stdout(log.clone()).stderr(log.clone());
    }
    // No preopened directory, no inherited environment or arguments, no
    // sockets (TCP, UDP and name lookup are off by default): the builder's
    // defaults are the sandbox.
    let host = Host {
        wasi: wasi.build(),
        http: WasiHttpCtx::new(),
        table: ResourceTable::new(),
        limits: StoreLimitsBuilder::new()
            .memory_size(usize::try_from(limits.max_memory).unwrap_or(usize::MAX))
            .build(),
        hooks: DenyOutgoing,
    };
    let mut store = Store::new(engine, host);
    store.limiter(|host| &mut host.limits);
    let timeout = limits.request_timeout;
    let deadline = Instant::now() + timeout;
    // Each epoch tick, a running component yields its thread; past the
    // deadline it is stopped.
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if Instant::now() >= deadline {
            Err(wasmtime::Error::new(TimedOut(timeout)))
        } else {
            Ok(UpdateDeadline::Yield(1))
        }
    });
    store
}

/// How a request ended, for the statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response below 500.
    Ok,
    /// A 5xx response from the component.
    ServerError,
    /// The component trapped, or never set a response.
    Trap,
    TimedOut,
    /// Refused with 503: `max_concurrent_requests` were in flight.
    Overloaded,
}

/// Run one request through a fresh instance of `pre`. The response's body
/// may still stream from the instance after this returns; `on_end` is
/// told how the request ended once it has.
pub async fn handle<B>(
    pre: &ProxyPre<Host>,
    limits: &Limits,
    request: hyper::Request<B>,
    on_end: impl FnOnce(Outcome) + Send + 'static,
) -> hyper::Response<HyperOutgoingBody>
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<wasmtime_wasi_http::Error>,
{
    let mut store = store(pre.engine(), limits);
    let (sender, receiver) = tokio::sync::oneshot::channel();
    let prepared: wasmtime::Result<_> = (|| {
        let req = store
            .data_mut()
            .http()
            .new_incoming_request(Scheme::Http, request)?;
        let out = store.data_mut().http().new_response_outparam(sender)?;
        Ok((req, out))
    })();
    let (req, out) = match prepared {
        Ok(pair) => pair,
        Err(e) => {
            on_end(Outcome::Trap);
            return plain(
                500,
                &format!("cannot pass the request to the component: {e:#}"),
            );
        }
    };
    let pre = pre.clone();
    let timeout = limits.request_timeout;
    let task = tokio::spawn(async move {
        let run = async {
            let proxy = pre.instantiate_async(&mut store).await?;
            proxy
                .wasi_http_incoming_handler()
                .call_handle(&mut store, req, out)
                .await
        };
        // The epoch callback stops a component computing past its deadline;
        // this stops one waiting in a host call (a sleep, a slow body).
        // Dropping the future drops the instance.
        match tokio::time::timeout(timeout, run).await {
            Ok(result) => result,
            Err(_) => Err(wasmtime::Error::new(TimedOut(timeout))),
        }
    });
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Outcome>();
    // Watch the instance to its end (past the response's head, while the
    // body streams) and report how it ended.
    let watcher = tokio::spawn(async move {
        let result = task.await;
        let failure = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(classify(&e)),
            Err(_) => Some(Outcome::Trap),
        };
        let _ = done_tx.send(failure.unwrap_or(Outcome::Ok));
        failure
    });
    match receiver.await {
        Ok(Ok(response)) => {
            let status = response.status().as_u16();
            tokio::spawn(async move {
                let ended = done_rx.await.unwrap_or(Outcome::Trap);
                on_end(match ended {
                    Outcome::Ok if status >= 500 => Outcome::ServerError,
                    other => other,
                });
            });
            response
        }
        Ok(Err(code)) => {
            on_end(Outcome::ServerError);
            plain(500, &format!("the component failed the request: {code:?}"))
        }
        // The outparam was dropped unset: the instance trapped, timed out,
        // or returned without answering.
        Err(_) => {
            let failure = watcher.await.ok().flatten();
            match failure {
                Some(Outcome::TimedOut) => {
                    on_end(Outcome::TimedOut);
                    plain(
                        504,
                        &format!(
                            "the component did not answer within request_timeout ({:?})",
                            limits.request_timeout
                        ),
                    )
                }
                _ => {
                    on_end(Outcome::Trap);
                    plain(500, "the component trapped before it answered")
                }
            }
        }
    }
}

/// A trap or timeout, told apart.
pub fn classify(error: &wasmtime::Error) -> Outcome {
    if error.chain().any(|e| e.is::<TimedOut>()) {
        Outcome::TimedOut
    } else {
        Outcome::Trap
    }
}

/// A short text response of the agent's own.
pub fn plain(status: u16, text: &str) -> hyper::Response<HyperOutgoingBody> {
    let body = http_body_util::Full::new(Bytes::from(format!("{text}\n")))
        .map_err(|never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} })
        .boxed_unsync();
    let mut response = hyper::Response::new(body);
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Upper bounds of the latency histogram, in seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Requests, errors and latency of one version, as a scraped module's
/// `[metrics]` would give them.
#[derive(Default)]
pub struct Stats {
    requests: AtomicU64,
    errors: AtomicU64,
    /// Per bucket of [`LATENCY_BUCKETS`] and one for +Inf; not cumulative.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl Stats {
    pub fn record(&self, outcome: Outcome, latency: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if outcome != Outcome::Ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let seconds = latency.as_secs_f64();
        let bucket = LATENCY_BUCKETS
            .iter()
            .position(|le| seconds <= *le)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Cumulative counters, like one scrape of a Prometheus endpoint.
    pub fn sample(&self) -> Sample {
        let mut cumulative = 0.0;
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS.len() + 1);
        for (i, count) in self.buckets.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed) as f64;
            let le = LATENCY_BUCKETS.get(i).copied().unwrap_or(f64::INFINITY);
            buckets.push((le, cumulative));
        }
        Sample {
            requests_total: self.requests.load(Ordering::Relaxed) as f64,
            errors_total: self.errors.load(Ordering::Relaxed) as f64,
            latency: Histogram {
                buckets,
                count: cumulative,
                sum: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            },
        }
    }
}

/// A request counted once it ends, however it ends.
pub fn recorder(stats: Arc<Stats>, started: Instant) -> impl FnOnce(Outcome) + Send + 'static {
    move |outcome| stats.record(outcome, started.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrape::window;

    #[test]
    fn stats_sample_like_a_scraped_histogram() {
        let stats = Stats::default();
        stats.record(Outcome::Ok, Duration::from_micros(300));
        stats.record(Outcome::Ok, Duration::from_millis(3));
        stats.record(Outcome::ServerError, Duration::from_millis(20));
        stats.record(Outcome::Trap, Duration::from_secs(30));
        stats.record(Outcome::TimedOut, Duration::from_secs(10));
        stats.record(Outcome::Overloaded, Duration::ZERO);
        let sample = stats.sample();
        assert_eq!(sample.requests_total, 6.0);
        assert_eq!(sample.errors_total, 4.0, "5xx, traps, timeouts and 503s");
        assert_eq!(sample.latency.count, 6.0);
        let at = |le: f64| {
            sample
                .latency
                .buckets
                .iter()
                .find(|(b, _)| *b == le)
                .map(|(_, c)| *c)
        };
        assert_eq!(at(0.0005), Some(2.0), "0 and 300 µs");
        assert_eq!(at(0.005), Some(3.0));
        assert_eq!(at(0.025), Some(4.0));
        assert_eq!(at(10.0), Some(5.0), "10 s is in the 10 s bucket");
        assert_eq!(at(f64::INFINITY), Some(6.0));
        assert!(
            (sample.latency.sum - 40.0233).abs() < 1e-6,
            "{}",
            sample.latency.sum
        );
        // Two samples make the window canary analysis compares.
        let before = Stats::default().sample();
        let w = window(&before, &sample, Duration::from_secs(2));
        assert_eq!(w.request_rate, 3.0);
        assert!((w.error_rate - 4.0 / 6.0).abs() < 1e-9);
        assert!(w.latency_p99_seconds.is_some());
    }

    #[test]
    fn timeouts_are_told_from_traps() {
        let timeout = wasmtime::Error::new(TimedOut(Duration::from_secs(1)));
        assert_eq!(classify(&timeout), Outcome::TimedOut);
        assert_eq!(
            classify(&timeout.context("while calling handle")),
            Outcome::TimedOut
        );
        assert_eq!(
            classify(&wasmtime::Error::msg("unreachable")),
            Outcome::Trap
        );
    }
}
