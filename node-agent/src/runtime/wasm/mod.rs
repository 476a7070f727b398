//! The `wasm` runtime (SPEC §10): the agent serves HTTP/1.1 on a module's
//! agent-owned sockets and answers each request in a fresh instance of the
//! module's WebAssembly component (the `wasi:http/proxy` world), in process.
//!
//! A swap compiles and pre-instantiates the new version off the request
//! path ([`engine`]), instantiates it once on trial, runs the manifest's
//! health probe through it, then switches one pointer: a request reads the
//! version once, when it starts, so requests in flight finish on the version
//! they started on and nothing is dropped. The previous version stays
//! compiled and pre-instantiated, so a rollback is the same switch.
//! Requests, errors (5xx, traps, timeouts, 503s) and latency are counted
//! per version ([`serve::Stats`]) and reported like scraped metrics.

pub mod engine;
pub mod serve;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use hotswap_common::manifest::{HealthCheck, HealthSpec};
use hotswap_common::status::{Health, Phase};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use wasmtime::component::Linker;
use wasmtime_wasi_http::p2::bindings::ProxyPre;

use self::engine::{Budget, Engines};
use self::serve::{Host, Limits, Outcome, Stats};
use super::ActivateError;
use super::listeners::{ListenerBook, conflict_message};
use super::os;
use super::process::ProcessStatus;
use crate::scrape::{Sample, window};

/// How often the running version's statistics become a metrics window.
const METRICS_INTERVAL: Duration = Duration::from_secs(5);
/// Without a `[health]` section, how often the running version is checked
/// to answer at all (any response below 500 is fine).
const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// What the runtime needs of one version, variables expanded.
#[derive(Clone, Debug, PartialEq)]
pub struct WasmSpec {
    pub version: String,
    /// The component file inside the version's directory.
    pub component: PathBuf,
    pub budget: Budget,
    pub request_timeout: Duration,
    pub env: Vec<(String, String)>,
    pub sockets: Vec<(String, SocketAddr)>,
    pub health: Option<(HealthCheck, HealthSpec)>,
    /// The version's directory (health `exec` commands run there).
    pub dir: PathBuf,
}

/// One compiled, pre-instantiated version.
pub struct Version {
    pub spec: WasmSpec,
    pre: ProxyPre<Host>,
    limits: Limits,
    stats: Arc<Stats>,
    in_flight: Arc<Semaphore>,
}

/// What preparing a version cost.
#[derive(Clone, Copy, Debug)]
pub struct Prepared {
    pub compile_time: Duration,
    pub cache_hit: bool,
}

/// What one activation took.
#[derive(Clone, Copy, Debug)]
pub struct Activation {
    /// The pointer switch alone.
    pub switch: Duration,
    /// Everything: preparing (unless kept or staged), the health gate, the
    /// listeners and the switch. For a rollback, the health gate and switch.
    pub total: Duration,
    /// `Some` when the version was prepared by this activation.
    pub prepared: Option<Prepared>,
}

/// What the running version serves from, shared with the accept loops.
struct Serving {
    module: String,
    current: ArcSwapOption<Version>,
}

/// One wasm module of the node: its listeners, the version serving, the
/// previous one (kept for a rollback) and a staged one.
pub struct WasmHost {
    module: String,
    serving: Arc<Serving>,
    previous: Option<Arc<Version>>,
    staged: Option<(Arc<Version>, Prepared)>,
    listeners: Vec<(SocketAddr, CancellationToken)>,
    book: ListenerBook,
    engines: Engines,
    log_path: PathBuf,
    status: watch::Sender<ProcessStatus>,
    monitor: CancellationToken,
}

impl WasmHost {
    pub fn new(module: &str, book: ListenerBook, engines: Engines, log_path: PathBuf) -> Self {
        let (status, _) = watch::channel(ProcessStatus {
            version: None,
            phase: Phase::Stopped,
            health: Health::Unknown,
            message: String::new(),
            restarts: 0,
            crash_loop: false,
            instance: None,
            metrics: None,
            settling: Vec::new(),
        });
        let serving = Arc::new(Serving {
            module: module.to_string(),
            current: ArcSwapOption::empty(),
        });
        let monitor = CancellationToken::new();
        tokio::spawn(monitor_loop(
            serving.clone(),
            status.clone(),
            monitor.clone(),
        ));
        Self {
            module: module.to_string(),
            serving,
            previous: None,
            staged: None,
            listeners: Vec::new(),
            book,
            engines,
            log_path,
            status,
            monitor,
        }
    }

    pub fn status(&self) -> watch::Receiver<ProcessStatus> {
        self.status.subscribe()
    }

    /// The version serving now.
    pub fn current(&self) -> Option<String> {
        self.serving
            .current
            .load()
            .as_ref()
            .map(|v| v.spec.version.clone())
    }

    /// Prepare `spec` without serving it (blue-green staging): a bad
    /// component fails here, and the activation later is only the switch.
    pub async fn stage(&mut self, spec: WasmSpec) -> Result<Prepared, ActivateError> {
        if let Some((staged, prepared)) = &self.staged
            && staged.spec == spec
        {
            return Ok(*prepared);
        }
        let (version, prepared) = self.prepare(spec).await?;
        self.staged = Some((version, prepared));
        Ok(prepared)
    }

    /// Make `spec` the version serving: prepared (or the one kept), checked
    /// through the runtime, then switched to between two requests.
    pub async fn activate(
        &mut self,
        spec: WasmSpec,
        preempt: &CancellationToken,
    ) -> Result<Activation, ActivateError> {
        let began = Instant::now();
        if let Some(current) = self.serving.current.load_full()
            && current.spec == spec
        {
            return Ok(Activation {
                switch: Duration::ZERO,
                total: began.elapsed(),
                prepared: None,
            });
        }
        let mut prepared_now = None;
        let kept = |v: &Option<Arc<Version>>| v.as_ref().filter(|v| v.spec == spec).cloned();
        // The previous version (a rollback) or the staged one: the switch
        // alone. Anything else is prepared now.
        let candidate = if let Some(previous) = kept(&self.previous) {
            previous
        } else if let Some((staged, _)) = self.staged.take().filter(|(v, _)| v.spec == spec) {
            staged
        } else {
            self.publish(|s| s.settling = vec![spec.version.clone()]);
            let prepared = tokio::select! {
                prepared = self.prepare(spec.clone()) => prepared,
                () = preempt.cancelled() => Err(ActivateError::Preempted(format!(
                    "activation of {} preempted while it compiled", spec.version
                ))),
            };
            match prepared {
                Ok((version, prepared)) => {
                    prepared_now = Some(prepared);
                    version
                }
                Err(e) => {
                    self.publish(|s| s.settling.clear());
                    return Err(e);
                }
            }
        };
        let gate = tokio::select! {
            gate = health_gate(&candidate) => gate,
            () = preempt.cancelled() => Err(ActivateError::Preempted(format!(
                "activation of {} preempted in its health gate", spec.version
            ))),
        };
        if let Err(e) = gate {
            self.publish(|s| s.settling.clear());
            return Err(e);
        }
        if let Err(e) = self.ensure_listeners(&spec) {
            self.publish(|s| s.settling.clear());
            return Err(e);
        }
        // The switch: one pointer, read once by each request as it starts.
        let started = Instant::now();
        let old = self.serving.current.swap(Some(candidate));
        let switch = started.elapsed();
        if let Some(old) = old {
            self.previous = Some(old);
        }
        self.prune_listeners(&spec);
        crate::metrics::record_wasm_switch(&self.module, switch);
        tracing::info!(
            module = %self.module,
            version = %spec.version,
            switch_us = switch.as_secs_f64() * 1e6,
            "wasm version serving"
        );
        let healthy = if spec.health.is_some() {
            Health::Healthy
        } else {
            Health::Unknown
        };
        self.publish(|s| {
            s.version = Some(spec.version.clone());
            s.phase = Phase::Running;
            s.health = healthy;
            s.message.clear();
            s.metrics = None;
            s.settling.clear();
        });
        Ok(Activation {
            switch,
            total: began.elapsed(),
            prepared: prepared_now,
        })
    }

    /// Instantiate the serving version once in a fresh store, as every
    /// request does, and return how long that took (diagnostics and the
    /// benchmark's per-request instantiation cost).
    pub async fn instantiate_once(&self) -> Result<Duration, String> {
        let version = self
            .serving
            .current
            .load_full()
            .ok_or("no version is serving")?;
        let started = Instant::now();
        let mut store = serve::store(version.pre.engine(), &version.limits);
        version
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| format!("{e:#}"))?;
        Ok(started.elapsed())
    }

    /// Stop serving: listeners closed, claims released, versions dropped
    /// (requests in flight finish on the instance they hold).
    pub fn stop(&mut self) {
        for (_, cancel) in self.listeners.drain(..) {
            cancel.cancel();
        }
        self.book.release_unless(&self.module, |_| false);
        self.serving.current.store(None);
        self.previous = None;
        self.staged = None;
        self.publish(|s| {
            s.version = None;
            s.phase = Phase::Stopped;
            s.health = Health::Unknown;
            s.metrics = None;
            s.settling.clear();
        });
    }

    fn publish(&self, change: impl FnOnce(&mut ProcessStatus)) {
        self.status.send_modify(change);
    }

    /// Compile (or load), link, pre-instantiate and instantiate once.
    async fn prepare(&self, spec: WasmSpec) -> Result<(Arc<Version>, Prepared), ActivateError> {
        let file = spec
            .component
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = tokio::fs::read(&spec.component).await.map_err(|e| {
            ActivateError::Release(format!(
                "cannot read the component {}: {e}",
                spec.component.display()
            ))
        })?;
        let engine = self
            .engines
            .engine(spec.budget)
            .map_err(ActivateError::Infrastructure)?;
        let compiled = self
            .engines
            .compile(&engine, bytes)
            .await
            .map_err(|e| ActivateError::Release(format!("component {file}: {e}")))?;
        let mut linker: Linker<Host> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .and_then(|()| wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker))
            .map_err(|e| {
                ActivateError::Infrastructure(format!("cannot set up the WASI host: {e:#}"))
            })?;
        let pre = linker.instantiate_pre(&compiled.component).map_err(|e| {
            ActivateError::Release(format!(
                "component {file} imports what a wasi:http/proxy component cannot have: {e:#}"
            ))
        })?;
        let pre = ProxyPre::new(pre).map_err(|e| {
            ActivateError::Release(format!(
                "component {file} is not a wasi:http/proxy component (it must export \
                 wasi:http/incoming-handler): {e:#}"
            ))
        })?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .map(wasmtime_wasi::cli::OutputFile::new)
            .map_err(|e| tracing::warn!(path = %self.log_path.display(), error = %e, "no log for the component's output"))
            .ok();
        let limits = Limits {
            max_memory: spec.budget.max_memory,
            request_timeout: spec.request_timeout,
            env: spec.env.clone(),
            log,
        };
        // Once on trial: a component that traps while it starts, or needs
        // more memory than it may have, fails here, not on a request.
        let mut store = serve::store(&engine, &limits);
        if let Err(e) = pre.instantiate_async(&mut store).await {
            let why = match serve::classify(&e) {
                Outcome::TimedOut => "ran past request_timeout while it started".to_string(),
                _ => format!("trapped while it was instantiated: {e:#}"),
            };
            return Err(ActivateError::Release(format!("component {file} {why}")));
        }
        drop(store);
        crate::metrics::record_wasm_compile(
            &self.module,
            compiled.compile_time,
            compiled.cache_hit,
        );
        tracing::info!(
            module = %self.module,
            version = %spec.version,
            compile_ms = compiled.compile_time.as_secs_f64() * 1e3,
            cache_hit = compiled.cache_hit,
            "wasm version prepared"
        );
        let in_flight = Arc::new(Semaphore::new(
            usize::try_from(spec.budget.max_concurrent_requests).unwrap_or(1),
        ));
        let version = Version {
            spec,
            pre,
            limits,
            stats: Arc::default(),
            in_flight,
        };
        Ok((
            Arc::new(version),
            Prepared {
                compile_time: compiled.compile_time,
                cache_hit: compiled.cache_hit,
            },
        ))
    }

    /// Bind the sockets `spec` names that are not open yet.
    fn ensure_listeners(&mut self, spec: &WasmSpec) -> Result<(), ActivateError> {
        for (name, addr) in &spec.sockets {
            if self.listeners.iter().any(|(a, _)| a == addr) {
                continue;
            }
            self.book.claim(&self.module, *addr).map_err(|taken| {
                ActivateError::Release(conflict_message(&self.module, name, *addr, &taken))
            })?;
            let listener = os::bind_listener(*addr)
                .map(std::net::TcpListener::from)
                .and_then(|l| {
                    l.set_nonblocking(true)?;
                    tokio::net::TcpListener::from_std(l)
                });
            let listener = match listener {
                Ok(listener) => listener,
                Err(e) => {
                    self.release_unheld();
                    return Err(ActivateError::Infrastructure(format!(
                        "cannot listen on {addr} for socket {name:?}: {e}"
                    )));
                }
            };
            let cancel = CancellationToken::new();
            tokio::spawn(accept_loop(listener, self.serving.clone(), cancel.clone()));
            self.listeners.push((*addr, cancel));
        }
        Ok(())
    }

    fn prune_listeners(&mut self, spec: &WasmSpec) {
        self.listeners.retain(|(addr, cancel)| {
            let keep = spec.sockets.iter().any(|(_, a)| a == addr);
            if !keep {
                cancel.cancel();
            }
            keep
        });
        self.release_unheld();
    }

    fn release_unheld(&self) {
        let held: Vec<SocketAddr> = self.listeners.iter().map(|(a, _)| *a).collect();
        self.book
            .release_unless(&self.module, |addr| held.contains(&addr));
    }
}

impl Drop for WasmHost {
    fn drop(&mut self) {
        self.monitor.cancel();
        for (_, cancel) in &self.listeners {
            cancel.cancel();
        }
    }
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    serving: Arc<Serving>,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = cancel.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: the next accept may work.
                tracing::warn!(module = %serving.module, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let serving = serving.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let serving = serving.clone();
                async move { Ok::<_, std::convert::Infallible>(serving.serve(request).await) }
            });
            // A client that goes away mid-request is no failure of ours.
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

impl Serving {
    async fn serve<B>(
        &self,
        request: hyper::Request<B>,
    ) -> hyper::Response<wasmtime_wasi_http::p2::body::HyperOutgoingBody>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<wasmtime_wasi_http::Error>,
    {
        // Read once: the version this request runs on, whatever switches next.
        let Some(version) = self.current.load_full() else {
            return serve::plain(503, "no version of this module is serving");
        };
        let started = Instant::now();
        let Ok(permit) = version.in_flight.clone().try_acquire_owned() else {
            version.stats.record(Outcome::Overloaded, started.elapsed());
            return serve::plain(
                503,
                &format!(
                    "{} requests are in flight (max_concurrent_requests)",
                    version.spec.budget.max_concurrent_requests
                ),
            );
        };
        let stats = version.stats.clone();
        serve::handle(&version.pre, &version.limits, request, move |outcome| {
            drop(permit);
            stats.record(outcome, started.elapsed());
        })
        .await
    }
}

/// Run the manifest's health check against a version before it serves: an
/// `http` check goes through the runtime to the candidate itself (its
/// sockets still serve the running version), `exec` runs as it would for
/// any module, and `tcp` is the agent's own listener (nothing to learn).
async fn health_gate(version: &Version) -> Result<(), ActivateError> {
    let Some((check, spec)) = &version.spec.health else {
        return Ok(());
    };
    let deadline = Instant::now() + spec.start_timeout;
    let mut passes = 0;
    let mut last_error = String::new();
    loop {
        match probe(version, check, spec).await {
            Ok(()) => {
                passes += 1;
                if passes >= spec.healthy_threshold {
                    return Ok(());
                }
            }
            Err(e) => {
                passes = 0;
                last_error = e;
            }
        }
        if Instant::now() + spec.interval > deadline {
            return Err(ActivateError::Release(format!(
                "did not become healthy within {:?}: {last_error}",
                spec.start_timeout
            )));
        }
        tokio::time::sleep(spec.interval).await;
    }
}

/// One probe of `version`.
async fn probe(version: &Version, check: &HealthCheck, spec: &HealthSpec) -> Result<(), String> {
    match check {
        HealthCheck::Http(url) => probe_http(version, url, spec.timeout).await,
        HealthCheck::Exec(_) => {
            crate::health::probe_once(check, spec.timeout, &version.spec.env, &version.spec.dir)
                .await
                .map_err(|e| e.to_string())
        }
        HealthCheck::Tcp(_) => Ok(()),
    }
}

/// GET the path and query of `url` from the version in process; 2xx is
/// healthy.
async fn probe_http(version: &Version, url: &str, timeout: Duration) -> Result<(), String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("health URL {url:?}: {e}"))?;
    let path = uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    let request = hyper::Request::get(&path)
        .header(
            hyper::header::HOST,
            uri.authority().map_or("localhost", |a| a.as_str()),
        )
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| format!("health request: {e}"))?;
    let limits = Limits {
        max_memory: version.limits.max_memory,
        request_timeout: timeout.min(version.limits.request_timeout),
        env: version.limits.env.clone(),
        log: version.limits.log.clone(),
    };
    let response = serve::handle(&version.pre, &limits, request, |_| {}).await;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        use http_body_util::BodyExt;
        let body = tokio::time::timeout(timeout, response.into_body().collect())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim().to_string())
            .unwrap_or_default();
        Err(format!(
            "GET {path} through the runtime answered {status}: {body}"
        ))
    }
}

/// Health of the running version on its interval, and its metrics window
/// every [`METRICS_INTERVAL`], until `stop`.
async fn monitor_loop(
    serving: Arc<Serving>,
    status: watch::Sender<ProcessStatus>,
    stop: CancellationToken,
) {
    let mut metrics_tick = tokio::time::interval(METRICS_INTERVAL);
    let mut last: Option<(String, Instant, Sample)> = None;
    let mut next_probe = tokio::time::Instant::now() + DEFAULT_PROBE_INTERVAL;
    let (mut passes, mut failures) = (0u32, 0u32);
    let mut probed_version = String::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = metrics_tick.tick() => {
                let Some(version) = serving.current.load_full() else {
                    last = None;
                    continue;
                };
                let now = Instant::now();
                let sample = version.stats.sample();
                if let Some((v, at, previous)) = &last
                    && *v == version.spec.version
                {
                    let w = window(previous, &sample, now.duration_since(*at));
                    status.send_modify(|s| s.metrics = Some(w));
                }
                last = Some((version.spec.version.clone(), now, sample));
            }
            () = tokio::time::sleep_until(next_probe) => {
                let Some(version) = serving.current.load_full() else {
                    next_probe = tokio::time::Instant::now() + DEFAULT_PROBE_INTERVAL;
                    continue;
                };
                if probed_version != version.spec.version {
                    probed_version = version.spec.version.clone();
                    (passes, failures) = (0, 0);
                }
                let Some((check, spec)) = version.spec.health.clone() else {
                    next_probe = tokio::time::Instant::now() + DEFAULT_PROBE_INTERVAL;
                    continue;
                };
                next_probe = tokio::time::Instant::now() + spec.interval;
                match probe(&version, &check, &spec).await {
                    Ok(()) => {
                        (passes, failures) = (passes + 1, 0);
                        if passes >= spec.healthy_threshold {
                            status.send_if_modified(|s| {
                                let changed = s.health != Health::Healthy || !s.message.is_empty();
                                s.health = Health::Healthy;
                                s.message.clear();
                                changed
                            });
                        }
                    }
                    Err(e) => {
                        (passes, failures) = (0, failures + 1);
                        if failures >= spec.unhealthy_threshold {
                            status.send_if_modified(|s| {
                                let changed = s.health != Health::Unhealthy;
                                s.health = Health::Unhealthy;
                                s.message = format!("health check failing: {e}");
                                changed
                            });
                        }
                    }
                }
            }
        }
    }
}

/// The component path of a version, checked to stay inside its directory
/// (the manifest refuses `..`; a symlink could still point out).
pub fn component_path(dir: &Path, component: &str) -> Result<PathBuf, String> {
    let path = dir.join(component);
    let resolved = path
        .canonicalize()
        .map_err(|e| format!("component {component}: {e}"))?;
    let root = dir
        .canonicalize()
        .map_err(|e| format!("module dir {}: {e}", dir.display()))?;
    if !resolved.starts_with(&root) {
        return Err(format!(
            "component {component} resolves to {}, outside the module dir",
            resolved.display()
        ));
    }
    if !resolved.is_file() {
        return Err(format!("component {component} is not a file"));
    }
    Ok(resolved)
}
