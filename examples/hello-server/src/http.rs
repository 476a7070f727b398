//! A minimal HTTP/1.1 server for one connection: request parsing, routing
//! (`/`, `/healthz`, `/metrics`), keep-alive and draining on shutdown.
//!
//! Hand-written rather than built on hyper because the drain behaviour is
//! the point of this example and is easier to see (and get exactly right)
//! in a page of code:
//! - a request that has started arriving is always answered, with
//!   `Connection: close` once shutdown has begun;
//! - a kept-alive connection idle between requests is closed at shutdown;
//!   its client retries on a new connection, which the successor accepts;
//! - a connection accepted but still waiting for its first request is given
//!   a short grace, because from the client's side that request is in flight;
//! - every close is a half-close followed by draining the client's bytes, so
//!   the kernel never answers unread data with a RST that could destroy the
//!   response just written.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{sleep, timeout};

use crate::metrics::Metrics;

/// Largest request head (request line plus headers) accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Largest request body accepted (and discarded): no route takes a body.
const MAX_BODY: u64 = 1024 * 1024;
/// How long a kept-alive connection may sit idle between requests.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the rest of a request may take once its first byte arrived.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// During shutdown, how long a freshly accepted connection may take to send
/// its first request.
const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);
/// How long to drain a half-closed connection before dropping it.
const LINGER: Duration = Duration::from_secs(1);

/// Behaviour and state shared by every connection.
#[derive(Debug)]
pub struct App {
    pub version: String,
    pub unhealthy: bool,
    pub slow: Duration,
    pub error_rate: f64,
    pub metrics: Metrics,
    /// Requests on `/` so far, for the deterministic error schedule.
    root_seen: AtomicU64,
}

impl App {
    pub fn new(version: String, unhealthy: bool, slow: Duration, error_rate: f64) -> App {
        App {
            version,
            unhealthy,
            slow,
            error_rate,
            metrics: Metrics::default(),
            root_seen: AtomicU64::new(0),
        }
    }
}

/// Whether shutdown has begun; cloned into every connection.
#[derive(Debug, Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    pub fn new(rx: watch::Receiver<bool>) -> Shutdown {
        Shutdown(rx)
    }

    pub fn is_set(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolve once shutdown begins.
    pub async fn wait(&mut self) {
        if self.0.wait_for(|s| *s).await.is_err() {
            // The sender lives as long as main; if it is gone the process is
            // exiting anyway, and returning would make callers spin.
            std::future::pending::<()>().await;
        }
    }
}

/// Serve requests on one connection until the client closes it, it idles
/// out, or shutdown closes it between requests.
pub async fn serve_connection(mut stream: TcpStream, app: Arc<App>, mut shutdown: Shutdown) {
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut served: u64 = 0;
    loop {
        let (head_len, consumed) =
            match read_head(&mut stream, &mut buf, &mut shutdown, served).await {
                Next::Head { head_len, consumed } => (head_len, consumed),
                Next::Close => break,
                Next::Reject(status, why) => {
                    let resp = Response::text(status, format!("{why}\n"));
                    let _ = write_response(&mut stream, &app, &resp, false, false).await;
                    break;
                }
            };
        let parsed = parse_head(&buf[..head_len]);
        buf.drain(..consumed);
        let req = match parsed {
            Ok(req) => req,
            Err((status, why)) => {
                let resp = Response::text(status, format!("{why}\n"));
                let _ = write_response(&mut stream, &app, &resp, false, false).await;
                break;
            }
        };
        if req.content_length > MAX_BODY {
            let resp = Response::text(413, "request body too large\n".into());
            let _ = write_response(&mut stream, &app, &resp, false, false).await;
            break;
        }
        if discard_body(&mut stream, &mut buf, req.content_length)
            .await
            .is_err()
        {
            break;
        }

        let started = Instant::now();
        let resp = route(&app, &req).await;
        if req.path == "/" {
            app.metrics.observe(resp.status, started.elapsed());
        }
        served += 1;

        // Checked after the (possibly slow) handler so a request in flight
        // when shutdown began tells its client to move to a new connection.
        let keep_alive = req.keep_alive && !shutdown.is_set();
        let head_only = req.method == "HEAD";
        if write_response(&mut stream, &app, &resp, keep_alive, head_only)
            .await
            .is_err()
            || !keep_alive
        {
            break;
        }
    }
    linger_close(stream).await;
}

enum Next {
    /// A complete head is in the buffer: its length without the blank line,
    /// and the bytes to consume including it.
    Head { head_len: usize, consumed: usize },
    /// Close quietly: the peer closed, an I/O error, a timeout, or shutdown
    /// while idle.
    Close,
    /// Answer with this status and close.
    Reject(u16, &'static str),
}

async fn read_head(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    shutdown: &mut Shutdown,
    served: u64,
) -> Next {
    loop {
        if let Some((head_len, consumed)) = find_head_end(buf) {
            return Next::Head { head_len, consumed };
        }
        if buf.len() > MAX_HEAD {
            return Next::Reject(431, "request head too large");
        }
        let read = if buf.is_empty() {
            match wait_idle(stream, buf, shutdown, served > 0).await {
                Some(read) => read,
                None => return Next::Close,
            }
        } else {
            match timeout(REQUEST_TIMEOUT, stream.read_buf(buf)).await {
                Ok(read) => read,
                Err(_) => return Next::Close,
            }
        };
        match read {
            Ok(0) | Err(_) => return Next::Close,
            Ok(_) => {}
        }
    }
}

/// Wait for the first bytes of the next request. `None` means close.
async fn wait_idle(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    shutdown: &mut Shutdown,
    reused: bool,
) -> Option<io::Result<usize>> {
    let idle_until = Instant::now() + IDLE_TIMEOUT;
    loop {
        let stopping = shutdown.is_set();
        if stopping && reused {
            // A request whose bytes already arrived is in flight: serve it.
            // Otherwise close; the client's next request goes to a new
            // connection and so to the successor.
            return match stream.try_read_buf(buf) {
                Ok(0) => None,
                Ok(n) => Some(Ok(n)),
                Err(_) => None,
            };
        }
        let limit = if stopping {
            FIRST_REQUEST_GRACE
        } else {
            idle_until.saturating_duration_since(Instant::now())
        };
        tokio::select! {
            // Data first: a request that raced with shutdown is served.
            biased;
            read = stream.read_buf(buf) => return Some(read),
            _ = shutdown.wait(), if !stopping => continue,
            _ = sleep(limit) => return None,
        }
    }
}

/// Read and drop `len` body bytes, starting with those already buffered.
async fn discard_body(stream: &mut TcpStream, buf: &mut Vec<u8>, len: u64) -> io::Result<()> {
    let buffered = usize::try_from(len).unwrap_or(usize::MAX).min(buf.len());
    buf.drain(..buffered);
    let mut left = len - buffered as u64;
    let mut sink = [0u8; 8192];
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(sink.len()).min(sink.len());
        let n = match timeout(REQUEST_TIMEOUT, stream.read(&mut sink[..want])).await {
            Ok(Ok(0)) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::ErrorKind::TimedOut.into()),
        };
        left -= n as u64;
    }
    Ok(())
}

/// Half-close, then drain until the client closes too (or [`LINGER`]).
/// Dropping a socket with unread input makes the kernel send RST, which may
/// discard our last response before the client has read it.
async fn linger_close(mut stream: TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut sink = [0u8; 4096];
    let _ = timeout(LINGER, async {
        loop {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
}

/// Find the blank line ending a request head (CRLF, or bare LF as RFC 9112
/// allows recipients to accept).
fn find_head_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while let Some(off) = buf[i..].iter().position(|&b| b == b'\n') {
        let nl = i + off;
        let rest = &buf[nl + 1..];
        if rest.starts_with(b"\r\n") {
            return Some((nl + 1, nl + 3));
        }
        if rest.starts_with(b"\n") {
            return Some((nl + 1, nl + 2));
        }
        i = nl + 1;
    }
    None
}

#[derive(Debug, PartialEq, Eq)]
struct Request {
    method: String,
    /// The target without its query string.
    path: String,
    keep_alive: bool,
    content_length: u64,
}

fn parse_head(head: &[u8]) -> Result<Request, (u16, &'static str)> {
    let text = std::str::from_utf8(head).map_err(|_| (400, "request head is not utf-8"))?;
    let mut lines = text.split('\n').map(|l| l.trim_end_matches('\r'));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err((400, "malformed request line"));
    };
    if method.is_empty() || !target.starts_with('/') {
        return Err((400, "malformed request line"));
    }
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err((505, "only HTTP/1.0 and HTTP/1.1 are supported")),
    };

    let mut close = false;
    let mut keep_alive_token = false;
    let mut content_length: Option<u64> = None;
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err((400, "malformed header line"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                close |= token.eq_ignore_ascii_case("close");
                keep_alive_token |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let n: u64 = value
                .parse()
                .map_err(|_| (400, "invalid content-length header"))?;
            // Conflicting lengths are a request-smuggling vector.
            if content_length.is_some_and(|old| old != n) {
                return Err((400, "conflicting content-length headers"));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // No route takes a body, so chunked bodies are not worth parsing.
            return Err((501, "transfer-encoding is not supported"));
        }
    }
    Ok(Request {
        method: method.to_string(),
        path: target.split('?').next().unwrap_or(target).to_string(),
        // HTTP/1.1 keeps connections open unless told otherwise; 1.0 only
        // when asked.
        keep_alive: !close && (http11 || keep_alive_token),
        content_length: content_length.unwrap_or(0),
    })
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    allow: Option<&'static str>,
}

impl Response {
    fn text(status: u16, body: String) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body,
            allow: None,
        }
    }
}

async fn route(app: &App, req: &Request) -> Response {
    let readable = req.method == "GET" || req.method == "HEAD";
    match req.path.as_str() {
        "/" | "/healthz" | "/metrics" if !readable => Response {
            allow: Some("GET, HEAD"),
            ..Response::text(405, "method not allowed\n".into())
        },
        "/" => {
            let n = app.root_seen.fetch_add(1, Ordering::Relaxed) + 1;
            if !app.slow.is_zero() {
                sleep(app.slow).await;
            }
            if is_error(n, app.error_rate) {
                Response::text(500, "injected error (--error-rate)\n".into())
            } else {
                Response::text(200, format!("hello from {}\n", app.version))
            }
        }
        "/healthz" if app.unhealthy => Response::text(503, "unhealthy (--unhealthy)\n".into()),
        "/healthz" => Response::text(200, "ok\n".into()),
        "/metrics" => Response {
            content_type: "text/plain; version=0.0.4; charset=utf-8",
            ..Response::text(200, app.metrics.render())
        },
        _ => Response::text(404, "not found\n".into()),
    }
}

/// Whether the `n`th request (from 1) on `/` fails: spreads failures evenly
/// so exactly `floor(n * rate)` of the first `n` requests fail.
fn is_error(n: u64, rate: f64) -> bool {
    let due = |k: u64| (k as f64 * rate).floor();
    due(n) > due(n.saturating_sub(1))
}

async fn write_response(
    stream: &mut TcpStream,
    app: &App,
    resp: &Response,
    keep_alive: bool,
    head_only: bool,
) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: {}\r\ncontent-length: {}\r\nx-hello-version: {}\r\n\
         connection: {}\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len(),
        app.version,
        if keep_alive { "keep-alive" } else { "close" },
    );
    if let Some(allow) = resp.allow {
        out.push_str("allow: ");
        out.push_str(allow);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    if !head_only {
        out.push_str(&resp.body);
    }
    // One write per response: no partial responses interleave with Nagle.
    stream.write_all(out.as_bytes()).await?;
    stream.flush().await
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_end_of_a_head() {
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n"), None);
        assert_eq!(find_head_end(b"GET / HTTP/1.1\r\n\r\n"), Some((16, 18)));
        assert_eq!(
            find_head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nGET"),
            Some((22, 24))
        );
        assert_eq!(find_head_end(b"GET / HTTP/1.1\n\n"), Some((15, 16)));
    }

    #[test]
    fn parses_requests() {
        let req = parse_head(b"GET /?x=1 HTTP/1.1\r\nHost: a\r\n").expect("valid");
        assert_eq!(
            req,
            Request {
                method: "GET".into(),
                path: "/".into(),
                keep_alive: true,
                content_length: 0,
            }
        );
        let close = parse_head(b"GET / HTTP/1.1\r\nConnection: Close\r\n").expect("valid");
        assert!(!close.keep_alive);
        let old = parse_head(b"GET / HTTP/1.0\r\n").expect("valid");
        assert!(!old.keep_alive);
        let old_ka = parse_head(b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n").expect("valid");
        assert!(old_ka.keep_alive);
        let body = parse_head(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n").expect("valid");
        assert_eq!(body.content_length, 5);

        let status = |head: &[u8]| parse_head(head).expect_err("invalid").0;
        assert_eq!(status(b"GET /"), 400);
        assert_eq!(status(b"GET / HTTP/2.0\r\n"), 505);
        assert_eq!(status(b"GET / HTTP/1.1\r\nbroken\r\n"), 400);
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n"),
            400
        );
        assert_eq!(
            status(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n"),
            501
        );
    }

    #[test]
    fn error_schedule_matches_the_rate() {
        let failures = |rate: f64| (1..=100).filter(|&n| is_error(n, rate)).count();
        assert_eq!(failures(0.0), 0);
        assert_eq!(failures(1.0), 100);
        assert_eq!(failures(0.5), 50);
        assert_eq!(failures(0.3), 30);
        // Spread out, not bunched at the start.
        assert!(!is_error(1, 0.5) && is_error(2, 0.5) && !is_error(3, 0.5));
    }
}
