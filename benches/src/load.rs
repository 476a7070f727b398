//! Continuous HTTP/1.1 load for the swap benchmark, with blocking sockets
//! and one thread per client so the measurement has no runtime of its own
//! in the way:
//! - `new-connection`: one TCP connection per request (`Connection: close`);
//! - `keep-alive`: one persistent connection, reopened whenever the server
//!   closes it.
//!
//! A request on a *reused* keep-alive connection that fails before a single
//! byte of response arrived is the legal HTTP keep-alive race (the server
//! closed the idle connection while the request was on its way; RFC 9112
//! §9.3.1 lets the client retry it): it is retried once on a new
//! connection and counted as `retried_idle_close`, not as a failure. Every
//! other error (connect error, reset, partial response, non-200, no answer
//! within 5 s) is a failure.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A request that takes longer than this is a failure.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How many failure messages to keep, for the report.
const KEEP_FAILURES: usize = 20;

#[derive(Clone, Copy, Debug)]
pub enum ClientKind {
    NewConnection,
    KeepAlive,
}

impl ClientKind {
    pub fn name(self) -> &'static str {
        match self {
            ClientKind::NewConnection => "new-connection",
            ClientKind::KeepAlive => "keep-alive",
        }
    }
}

/// What one client thread observed.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub requests: u64,
    pub failures: u64,
    pub retried_idle_close: u64,
    pub connections: u64,
    /// Completion time of every successful request, µs since the shared base.
    pub ok_at_us: Vec<u64>,
    /// Latency of every successful request, µs (a retried request counts
    /// from its first attempt).
    pub latency_us: Vec<u32>,
    /// (µs since base, message) of the first failures.
    pub failure_samples: Vec<(u64, String)>,
    pub by_version: BTreeMap<String, u64>,
    /// CPU this client thread used (user + system), so a benchmark can take
    /// the load's own cost out of its process's CPU.
    pub cpu_seconds: f64,
}

pub struct Client {
    pub kind: ClientKind,
    handle: JoinHandle<ClientStats>,
}

/// Running load: stop it to get the statistics.
pub struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<Client>,
}

impl Load {
    pub fn start(addr: SocketAddr, base: Instant) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = [ClientKind::NewConnection, ClientKind::KeepAlive]
            .into_iter()
            .map(|kind| {
                let stop = stop.clone();
                let handle = std::thread::Builder::new()
                    .name(kind.name().to_string())
                    .spawn(move || run_client(kind, addr, base, &stop))
                    .expect("spawn load thread");
                Client { kind, handle }
            })
            .collect();
        Load { stop, clients }
    }

    pub fn stop(self) -> Vec<(ClientKind, ClientStats)> {
        self.stop.store(true, Ordering::Relaxed);
        self.clients
            .into_iter()
            .map(|c| (c.kind, c.handle.join().expect("load thread panicked")))
            .collect()
    }
}

struct Response {
    status: u16,
    close: bool,
    version: String,
}

/// A failed exchange: whether any response byte had arrived, and why.
struct ExchangeError {
    got_bytes: bool,
    message: String,
}

fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT)?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Send one request and read one whole response (head plus
/// `content-length` bytes of body).
fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> Result<Response, ExchangeError> {
    let fail = |got_bytes: bool, message: String| ExchangeError { got_bytes, message };
    stream
        .write_all(request)
        .map_err(|e| fail(false, format!("write: {e}")))?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(fail(
                    !buf.is_empty(),
                    format!("connection closed after {} response bytes", buf.len()),
                ));
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(fail(!buf.is_empty(), format!("read: {e}"))),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let mut content_length = 0usize;
    let mut close = false;
    let mut version = String::new();
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            match name.trim() {
                "content-length" => content_length = value.parse().unwrap_or(0),
                "connection" => close = value == "close",
                "x-hello-version" => version = value.to_string(),
                _ => {}
            }
        }
    }
    while buf.len() < head_end + content_length {
        match stream.read(&mut chunk) {
            Ok(0) => return Err(fail(true, "connection closed inside the body".into())),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(fail(true, format!("read body: {e}"))),
        }
    }
    Ok(Response {
        status,
        close,
        version,
    })
}

fn run_client(kind: ClientKind, addr: SocketAddr, base: Instant, stop: &AtomicBool) -> ClientStats {
    let close_request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let keep_request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let mut stats = ClientStats {
        ok_at_us: Vec::with_capacity(1 << 20),
        latency_us: Vec::with_capacity(1 << 20),
        ..Default::default()
    };
    let mut buf = Vec::with_capacity(4096);
    // Keep-alive state: the open connection and whether it already
    // carried a response (a reused connection).
    let mut conn: Option<TcpStream> = None;
    let mut reused = false;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        let outcome = match kind {
            ClientKind::NewConnection => match connect(addr) {
                Err(e) => Err(format!("connect: {e}")),
                Ok(mut stream) => {
                    stats.connections += 1;
                    exchange(&mut stream, close_request.as_bytes(), &mut buf).map_err(|e| e.message)
                }
            },
            ClientKind::KeepAlive => {
                let mut retried = false;
                loop {
                    if conn.is_none() {
                        match connect(addr) {
                            Ok(stream) => {
                                stats.connections += 1;
                                conn = Some(stream);
                                reused = false;
                            }
                            Err(e) => break Err(format!("connect: {e}")),
                        }
                    }
                    let stream = conn.as_mut().expect("connected");
                    match exchange(stream, keep_request.as_bytes(), &mut buf) {
                        Ok(resp) => {
                            if resp.close {
                                conn = None;
                            } else {
                                reused = true;
                            }
                            break Ok(resp);
                        }
                        Err(e) => {
                            conn = None;
                            if reused && !e.got_bytes && !retried {
                                retried = true;
                                stats.retried_idle_close += 1;
                                continue;
                            }
                            break Err(format!(
                                "{} (on a {} connection{})",
                                e.message,
                                if reused { "reused" } else { "new" },
                                if retried { ", after a retry" } else { "" }
                            ));
                        }
                    }
                }
            }
        };
        let elapsed = started.elapsed();
        let done_us = base.elapsed().as_micros() as u64;
        stats.requests += 1;
        let failure = match outcome {
            Ok(resp) if resp.status != 200 => Some(format!("status {}", resp.status)),
            Ok(_) if elapsed > REQUEST_TIMEOUT => {
                Some(format!("answered after {} ms", elapsed.as_millis()))
            }
            Ok(resp) => {
                stats.ok_at_us.push(done_us);
                stats
                    .latency_us
                    .push(elapsed.as_micros().min(u32::MAX as u128) as u32);
                *stats.by_version.entry(resp.version).or_default() += 1;
                None
            }
            Err(message) => Some(message),
        };
        if let Some(message) = failure {
            stats.failures += 1;
            if stats.failure_samples.len() < KEEP_FAILURES {
                stats.failure_samples.push((done_us, message));
            }
        }
    }
    stats.cpu_seconds = thread_cpu_seconds();
    stats
}

/// CPU seconds of the calling thread (`/proc/thread-self/stat`).
fn thread_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/thread-self/stat") else {
        return 0.0;
    };
    let Some((_, after)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / 100.0
}

/// Longest interval inside `[from, to]` (µs) without a successful
/// completion in `sorted` (µs, ascending), counting the window's edges.
pub fn max_gap_us(sorted: &[u64], from: u64, to: u64) -> u64 {
    let mut prev = from;
    let mut gap = 0;
    let start = sorted.partition_point(|&t| t < from);
    for &t in &sorted[start..] {
        if t > to {
            break;
        }
        gap = gap.max(t - prev);
        prev = t;
    }
    gap.max(to - prev)
}
