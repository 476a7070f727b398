//! Module health: one probe attempt ([`probe_once`]: HTTP(S) GET, TCP
//! connect, or a command), and the threshold logic that turns a stream of
//! probe results into a [`Health`] state ([`HealthTracker`]).
//!
//! It also owns the agent's minimal HTTP/1.1 client ([`http_get`]), shared
//! with the metrics scraper: probes and scrapes only ever need "GET one URL
//! over a fresh connection", which does not justify a full HTTP stack.
//!
//! Probes of one module never overlap, whatever its `timeout` and
//! `interval` (a timeout longer than the interval is valid, as in Docker and
//! Kubernetes). Each prober awaits one probe before it starts the next: the
//! process supervisor's start gate sleeps `interval` after each probe, and its
//! loop probes on a ticker whose missed ticks are delayed, so after a probe
//! slower than the interval the next one starts when it ended; bundles are
//! probed one after another on the reconciler's usage tick. Nothing else
//! probes a process module (the traced `health` step reads the supervisor's
//! verdict instead).

use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hotswap_common::manifest::HealthCheck;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

pub use hotswap_common::status::Health;

/// Threshold logic (pure): consecutive successes/failures move the state.
///
/// From Unknown or Unhealthy, `healthy_threshold` consecutive successes make
/// the module Healthy; from Unknown or Healthy, `unhealthy_threshold`
/// consecutive failures make it Unhealthy. A success resets the failure
/// streak and vice versa, so one flaky probe never flips the state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthTracker {
    healthy_threshold: u32,
    unhealthy_threshold: u32,
    state: Health,
    successes: u32,
    failures: u32,
}

impl HealthTracker {
    /// A tracker in the Unknown state. A threshold of 0 behaves like 1: the
    /// state must never change without at least one probe result behind it.
    pub fn new(healthy_threshold: u32, unhealthy_threshold: u32) -> Self {
        HealthTracker {
            healthy_threshold: healthy_threshold.max(1),
            unhealthy_threshold: unhealthy_threshold.max(1),
            state: Health::Unknown,
            successes: 0,
            failures: 0,
        }
    }

    /// Record one probe result; returns `Some(new)` when the state changed.
    pub fn observe(&mut self, ok: bool) -> Option<Health> {
        let (streak, threshold, target) = if ok {
            self.failures = 0;
            (&mut self.successes, self.healthy_threshold, Health::Healthy)
        } else {
            self.successes = 0;
            (
                &mut self.failures,
                self.unhealthy_threshold,
                Health::Unhealthy,
            )
        };
        // Saturating: a module probed every second for years must not wrap
        // around to a short streak.
        *streak = streak.saturating_add(1);
        if self.state != target && *streak >= threshold {
            self.state = target;
            return Some(target);
        }
        None
    }

    pub fn health(&self) -> Health {
        self.state
    }

    /// Back to Unknown with both streaks at zero (e.g. after a restart or a
    /// swap, when earlier results say nothing about the new process).
    pub fn reset(&mut self) {
        self.state = Health::Unknown;
        self.successes = 0;
        self.failures = 0;
    }
}

/// One probe attempt. `env` is added to the environment of exec probes;
/// `cwd` is their working directory (and the base of a relative `argv[0]`).
/// `timeout` bounds the whole attempt.
pub async fn probe_once(
    check: &HealthCheck,
    timeout: Duration,
    env: &[(String, String)],
    cwd: &Path,
) -> Result<(), String> {
    let started = std::time::Instant::now();
    let (kind, result) = match check {
        HealthCheck::Http(url) => ("http", probe_http(url, timeout).await),
        HealthCheck::Tcp(addr) => ("tcp", probe_tcp(addr, timeout).await),
        HealthCheck::Exec(argv) => ("exec", probe_exec(argv, timeout, env, cwd).await),
    };
    crate::metrics::PROBE_SECONDS
        .get_or_create(&crate::metrics::ProbeLabels {
            kind,
            result: if result.is_ok() { "ok" } else { "fail" },
        })
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn probe_http(url: &str, timeout: Duration) -> Result<(), String> {
    // No body limit: a probe only needs the status line, so it stops reading
    // after the headers and a slow or huge body cannot fail it.
    let (status, _) = get(url, timeout, None)
        .await
        .map_err(|e| format!("http probe {url}: {e}"))?;
    if (200..=399).contains(&status) {
        Ok(())
    } else {
        Err(format!("http probe {url}: status {status}"))
    }
}

async fn probe_tcp(addr: &str, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(e)) => Err(format!("tcp probe {addr}: {}", io_reason(&e))),
        Err(_) => Err(format!(
            "tcp probe {addr}: timed out after {}",
            fmt_duration(timeout)
        )),
    }
}

/// How much of an exec probe's output ends up in the error message: the end
/// is where scripts print why they failed.
const OUTPUT_TAIL: usize = 512;

/// After an exec probe exits, how long to wait for its output pipes to
/// close. A background process it started may hold them open forever.
const OUTPUT_GRACE: Duration = Duration::from_millis(100);

async fn probe_exec(
    argv: &[String],
    timeout: Duration,
    env: &[(String, String)],
    cwd: &Path,
) -> Result<(), String> {
    let what = format!("exec probe {}", argv.join(" "));
    let Some((program, args)) = argv.split_first() else {
        return Err("exec probe: empty command".to_string());
    };
    let program = resolve_program(program, cwd);
    let mut command = Command::new(&program);
    command
        .args(args)
        .current_dir(cwd)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // If the probe future is dropped (agent shutting down, module
        // stopped), the child must not outlive it.
        .kill_on_drop(true)
        // Its own process group, so that on timeout we can kill whatever a
        // probe script started too, not just the shell.
        .process_group(0);
    let mut child = command
        .spawn()
        .map_err(|e| format!("{what}: cannot start {}: {e}", program.display()))?;

    let output = Arc::new(Mutex::new(Vec::new()));
    let mut readers = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        readers.push(tokio::spawn(collect_tail(stdout, output.clone())));
    }
    if let Some(stderr) = child.stderr.take() {
        readers.push(tokio::spawn(collect_tail(stderr, output.clone())));
    }

    let deadline = Instant::now() + timeout;
    let waited = tokio::time::timeout_at(deadline, child.wait()).await;
    let result = match waited {
        Ok(Ok(status)) => {
            let grace = Instant::now() + OUTPUT_GRACE;
            for reader in &mut readers {
                let _ = tokio::time::timeout_at(grace, reader).await;
            }
            if status.success() {
                Ok(())
            } else {
                Err(format!("{what}: {}", describe_exit(status)))
            }
        }
        Ok(Err(e)) => {
            kill_group(&mut child).await;
            Err(format!("{what}: waiting for the command failed: {e}"))
        }
        Err(_) => {
            kill_group(&mut child).await;
            Err(format!(
                "{what}: timed out after {}, killed",
                fmt_duration(timeout)
            ))
        }
    };
    for reader in &readers {
        reader.abort();
    }
    result.map_err(|message| {
        let tail = output.lock().map(|t| tail_text(&t)).unwrap_or_default();
        if tail.is_empty() {
            message
        } else {
            format!("{message}: {tail}")
        }
    })
}

/// A relative `argv[0]` with a slash (`./check.sh`, `bin/check`) means the
/// module's directory; a bare name is looked up in PATH as usual. Resolved
/// here because how `Command` treats a relative program together with
/// `current_dir` is platform-specific.
fn resolve_program(program: &str, cwd: &Path) -> PathBuf {
    let path = Path::new(program);
    if program.contains('/') && path.is_relative() {
        cwd.join(path)
    } else {
        path.to_path_buf()
    }
}

/// Read a pipe to its end, keeping only the last [`OUTPUT_TAIL`] bytes of
/// everything written to `tail` (shared by stdout and stderr, so the tail is
/// in arrival order).
async fn collect_tail<R: AsyncRead + Unpin>(mut pipe: R, tail: Arc<Mutex<Vec<u8>>>) {
    let mut chunk = [0u8; 4096];
    loop {
        match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let Ok(mut tail) = tail.lock() else { return };
                push_tail(&mut tail, &chunk[..n], OUTPUT_TAIL);
            }
        }
    }
}

fn push_tail(tail: &mut Vec<u8>, data: &[u8], limit: usize) {
    tail.extend_from_slice(data);
    if tail.len() > limit {
        let excess = tail.len() - limit;
        tail.drain(..excess);
    }
}

fn tail_text(tail: &[u8]) -> String {
    // Lossy: the cut may fall inside a UTF-8 sequence, and probe output is
    // only for humans anyway.
    String::from_utf8_lossy(tail).trim().to_string()
}

fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with status {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        (None, None) => format!("exited abnormally ({status})"),
    }
}

/// Kill the probe's process group and the process itself, then reap it.
async fn kill_group(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) {
        // SAFETY: kill(2) takes no pointers. The child is not reaped yet, so
        // its pid (= its process group id, from process_group(0)) cannot
        // have been reused by an unrelated process.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.start_kill();
    let _ = child.wait().await;
}

/// Largest response head (status line and headers) we accept.
const MAX_HEAD: usize = 64 * 1024;

/// Largest response body [`http_get`] returns.
pub(crate) const MAX_BODY: usize = 4 * 1024 * 1024;

/// GET `url` (`http://` or `https://`, the latter without certificate
/// verification) over a fresh connection, returning the status and body.
/// `timeout` bounds the whole exchange; bodies over 4 MiB are an error.
pub(crate) async fn http_get(url: &str, timeout: Duration) -> Result<(u16, Vec<u8>), String> {
    get(url, timeout, Some(MAX_BODY)).await
}

/// [`http_get`], reading the body only when `body_limit` is given.
async fn get(
    url: &str,
    timeout: Duration,
    body_limit: Option<usize>,
) -> Result<(u16, Vec<u8>), String> {
    let url = HttpUrl::parse(url)?;
    match tokio::time::timeout(timeout, get_parsed(&url, body_limit)).await {
        Ok(result) => result,
        Err(_) => Err(format!("timed out after {}", fmt_duration(timeout))),
    }
}

async fn get_parsed(url: &HttpUrl, body_limit: Option<usize>) -> Result<(u16, Vec<u8>), String> {
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| io_reason(&e))?;
    // Requests are tiny and written at once; don't let Nagle delay them.
    let _ = tcp.set_nodelay(true);
    let request = url.request();
    if !url.tls {
        return exchange(tcp, request.as_bytes(), body_limit).await;
    }
    let connector = tokio_rustls::TlsConnector::from(tls_config()?);
    let name = ServerName::try_from(url.host.clone())
        .map_err(|e| format!("invalid TLS server name {:?}: {e}", url.host))?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls handshake failed: {e}"))?;
    exchange(tls, request.as_bytes(), body_limit).await
}

/// Send `request`, read the response head and (when `body_limit` is given)
/// the body.
async fn exchange<S>(
    mut stream: S,
    request: &[u8],
    body_limit: Option<usize>,
) -> Result<(u16, Vec<u8>), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(request)
        .await
        .map_err(|e| format!("sending the request failed: {}", io_reason(&e)))?;
    stream
        .flush()
        .await
        .map_err(|e| format!("sending the request failed: {}", io_reason(&e)))?;

    let mut buf = Vec::with_capacity(8192);
    let head = loop {
        if let Some((len, head)) = parse_head(&buf)? {
            buf.drain(..len);
            // Interim responses (100 Continue, 103 Early Hints) precede the
            // real one; 101 would be a protocol switch we never asked for.
            if (100..200).contains(&head.status) && head.status != 101 {
                continue;
            }
            break head;
        }
        if buf.len() > MAX_HEAD {
            return Err("response headers larger than 64 KiB".to_string());
        }
        if read_more(&mut stream, &mut buf).await? == 0 {
            return Err(if buf.is_empty() {
                "connection closed without a response".to_string()
            } else {
                "connection closed in the middle of the response headers".to_string()
            });
        }
    };
    let Some(limit) = body_limit else {
        return Ok((head.status, Vec::new()));
    };
    let body = read_body(&mut stream, buf, head.framing, limit).await?;
    Ok((head.status, body))
}

/// Append what the stream has to `buf`; 0 means end of stream.
async fn read_more<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> Result<usize, String> {
    buf.reserve(16 * 1024);
    match stream.read_buf(buf).await {
        Ok(n) => Ok(n),
        // Many HTTPS servers close without a TLS close_notify. Treat that as
        // a plain end of stream: the body framing still detects truncation
        // where the protocol allows it at all.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
        Err(e) => Err(format!("reading the response failed: {}", io_reason(&e))),
    }
}

async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut buf: Vec<u8>,
    framing: Framing,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let too_large = || format!("response body larger than {}", fmt_bytes(limit));
    match framing {
        Framing::Empty => Ok(Vec::new()),
        Framing::Length(length) => {
            let length = usize::try_from(length)
                .ok()
                .filter(|&n| n <= limit)
                .ok_or_else(too_large)?;
            while buf.len() < length {
                if read_more(stream, &mut buf).await? == 0 {
                    return Err(format!(
                        "connection closed after {} of {length} body bytes",
                        buf.len()
                    ));
                }
            }
            buf.truncate(length);
            Ok(buf)
        }
        Framing::Chunked => {
            // Chunk framing adds a few bytes per chunk; allow for it in the
            // raw size, the decoded size is checked against `limit` exactly.
            let raw_limit = limit.saturating_mul(2).saturating_add(MAX_HEAD);
            loop {
                // A complete chunked body always ends with an empty line, so
                // only then is a (full) decode attempt worth it.
                if buf.ends_with(b"\r\n\r\n")
                    && let Some(body) = decode_chunked(&buf, limit)?
                {
                    return Ok(body);
                }
                if buf.len() > raw_limit {
                    return Err(too_large());
                }
                if read_more(stream, &mut buf).await? == 0 {
                    return decode_chunked(&buf, limit)?.ok_or_else(|| {
                        "connection closed in the middle of a chunked body".to_string()
                    });
                }
            }
        }
        Framing::UntilClose => {
            loop {
                if buf.len() > limit {
                    return Err(too_large());
                }
                if read_more(stream, &mut buf).await? == 0 {
                    break;
                }
            }
            Ok(buf)
        }
    }
}

/// How the response body is delimited (RFC 9112 section 6.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// 1xx, 204 and 304 responses have no body.
    Empty,
    Length(u64),
    Chunked,
    /// Neither length nor chunking: the body ends when the server closes.
    UntilClose,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ResponseHead {
    status: u16,
    framing: Framing,
}

/// Parse a response head from the start of `buf`. `Ok(None)` means it is
/// not complete yet; `Ok(Some((len, head)))` gives its length in bytes.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, ResponseHead)>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end])
        .map_err(|_| "response headers are not valid UTF-8".to_string())?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = parse_status_line(status_line)?;

    let mut content_length: Option<u64> = None;
    let mut transfer_encoding: Option<String> = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(format!("malformed response header {line:?}"));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let length: u64 = value
                .parse()
                .map_err(|_| format!("invalid Content-Length {value:?}"))?;
            // Differing lengths would make the body boundary ambiguous.
            if content_length.is_some_and(|known| known != length) {
                return Err("conflicting Content-Length headers".to_string());
            }
            content_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            let joined = match transfer_encoding.take() {
                Some(earlier) => format!("{earlier}, {value}"),
                None => value.to_string(),
            };
            transfer_encoding = Some(joined);
        }
    }

    let framing = if (100..200).contains(&status) || status == 204 || status == 304 {
        Framing::Empty
    } else if let Some(codings) = transfer_encoding {
        // Transfer-Encoding wins over Content-Length; only a final
        // "chunked" delimits the body, anything else runs until close.
        let last = codings.rsplit(',').next().unwrap_or_default().trim();
        if last.eq_ignore_ascii_case("chunked") {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else if let Some(length) = content_length {
        Framing::Length(length)
    } else {
        Framing::UntilClose
    };
    Ok(Some((end + 4, ResponseHead { status, framing })))
}

fn parse_status_line(line: &str) -> Result<u16, String> {
    let malformed = || format!("malformed status line {line:?}");
    let mut parts = line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(malformed());
    }
    let code = parts.next().ok_or_else(malformed)?;
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed());
    }
    code.parse().map_err(|_| malformed())
}

/// Decode a complete chunked body. `Ok(None)` means more bytes are needed.
fn decode_chunked(raw: &[u8], limit: usize) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let Some(line_len) = find_crlf(&raw[pos..]) else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&raw[pos..pos + line_len])
            .map_err(|_| "malformed chunk size line".to_string())?;
        // Chunk extensions (";name=value") carry nothing we need.
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("malformed chunk size {size_text:?}"))?;
        pos += line_len + 2;
        if size == 0 {
            // Trailer fields, then an empty line.
            loop {
                let Some(len) = find_crlf(&raw[pos..]) else {
                    return Ok(None);
                };
                pos += len + 2;
                if len == 0 {
                    return Ok(Some(body));
                }
            }
        }
        if body.len().saturating_add(size) > limit {
            return Err(format!("response body larger than {}", fmt_bytes(limit)));
        }
        let data_end = pos.saturating_add(size);
        if raw.len() < data_end.saturating_add(2) {
            return Ok(None);
        }
        if &raw[data_end..data_end + 2] != b"\r\n" {
            return Err("chunk data not followed by CRLF".to_string());
        }
        body.extend_from_slice(&raw[pos..data_end]);
        pos = data_end + 2;
    }
}

fn find_crlf(bytes: &[u8]) -> Option<usize> {
    bytes.windows(2).position(|w| w == b"\r\n")
}

/// The parts of an `http://` or `https://` URL a GET needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct HttpUrl {
    pub tls: bool,
    /// Host name or IP address, without the brackets of an IPv6 literal.
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl HttpUrl {
    pub(crate) fn parse(url: &str) -> Result<HttpUrl, String> {
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| format!("invalid URL {url:?}: no scheme"))?;
        let tls = if scheme.eq_ignore_ascii_case("http") {
            false
        } else if scheme.eq_ignore_ascii_case("https") {
            true
        } else {
            return Err(format!("invalid URL {url:?}: scheme must be http or https"));
        };
        // The fragment never goes to the server.
        let rest = rest.split('#').next().unwrap_or_default();
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        if authority.contains('@') {
            return Err(format!(
                "invalid URL {url:?}: credentials in URLs are not supported"
            ));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| format!("invalid URL {url:?}: unclosed '[' in the host"))?;
            let port = match after {
                "" => None,
                _ => Some(after.strip_prefix(':').ok_or_else(|| {
                    format!("invalid URL {url:?}: unexpected text after the IPv6 address")
                })?),
            };
            (host, port)
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        if authority.matches(':').count() > 1 && !authority.starts_with('[') {
            return Err(format!(
                "invalid URL {url:?}: IPv6 addresses must be in brackets"
            ));
        }
        if host.is_empty() {
            return Err(format!("invalid URL {url:?}: no host"));
        }
        let port = match port {
            None | Some("") => default_port,
            Some(text) => text
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| format!("invalid URL {url:?}: invalid port {text:?}"))?,
        };
        let path = if path.is_empty() {
            "/".to_string()
        } else if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        // Whitespace or control characters would break (or inject into) the
        // request line.
        if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!(
                "invalid URL {url:?}: the path contains whitespace or control characters"
            ));
        }
        Ok(HttpUrl {
            tls,
            host: host.to_string(),
            port,
            path,
        })
    }

    /// The Host header value: brackets for IPv6, port only when not the
    /// scheme's default.
    fn host_header(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default_port = if self.tls { 443 } else { 80 };
        if self.port == default_port {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    fn request(&self) -> String {
        format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: hotswap-agent\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            self.path,
            self.host_header()
        )
    }
}

/// The TLS client config for HTTPS probes, built once.
fn tls_config() -> Result<Arc<ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = hotswap_common::tls::provider();
            let mut config = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| format!("tls configuration failed: {e}"))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCert { provider }))
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(config))
        })
        .clone()
}

/// Accepts any server certificate, like Kubernetes HTTPS probes: modules
/// usually serve self-signed certificates the agent has no root for, and a
/// probe checks liveness, not identity. Handshake signatures are still
/// verified, so the server must at least hold the key of the certificate it
/// presents.
#[derive(Debug)]
struct AcceptAnyCert {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The reason of an I/O error, in the words the probe messages use.
fn io_reason(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        io::ErrorKind::ConnectionReset => "connection reset by peer".to_string(),
        io::ErrorKind::TimedOut => "timed out".to_string(),
        _ => e.to_string(),
    }
}

/// `1s`, `200ms`, `1.5s`: short, for error messages.
pub(crate) fn fmt_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d < Duration::from_secs(1) && d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{d:?}")
    }
}

fn fmt_bytes(n: usize) -> String {
    if n >= 1024 * 1024 && n.is_multiple_of(1024 * 1024) {
        format!("{} MiB", n / (1024 * 1024))
    } else {
        format!("{n} bytes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio::net::TcpListener;

    // --- tracker ---------------------------------------------------------

    use Health::{Healthy, Unhealthy, Unknown};

    /// Feed `results` ("S" success, "F" failure) and collect the state
    /// after each one.
    fn run(healthy: u32, unhealthy: u32, results: &str) -> Vec<Health> {
        let mut tracker = HealthTracker::new(healthy, unhealthy);
        results
            .chars()
            .map(|c| {
                let before = tracker.health();
                let change = tracker.observe(c == 'S');
                let after = tracker.health();
                assert_eq!(change.is_some(), before != after, "{results}");
                if let Some(new) = change {
                    assert_eq!(new, after);
                }
                after
            })
            .collect()
    }

    #[test]
    fn tracker_table() {
        let cases: &[(u32, u32, &str, &[Health])] = &[
            (1, 1, "", &[]),
            (1, 1, "S", &[Healthy]),
            (1, 1, "F", &[Unhealthy]),
            (1, 1, "SFS", &[Healthy, Unhealthy, Healthy]),
            (2, 3, "S", &[Unknown]),
            (2, 3, "SS", &[Unknown, Healthy]),
            (2, 3, "SFS", &[Unknown, Unknown, Unknown]),
            (2, 3, "SFSS", &[Unknown, Unknown, Unknown, Healthy]),
            (2, 3, "FF", &[Unknown, Unknown]),
            (2, 3, "FFF", &[Unknown, Unknown, Unhealthy]),
            (
                2,
                3,
                "SSFFSFFF",
                &[
                    Unknown, Healthy, Healthy, Healthy, Healthy, Healthy, Healthy, Unhealthy,
                ],
            ),
            (
                3,
                1,
                "FSSFSSS",
                &[
                    Unhealthy, Unhealthy, Unhealthy, Unhealthy, Unhealthy, Unhealthy, Healthy,
                ],
            ),
            (
                2,
                2,
                "SSSSFSFSFF",
                &[
                    Unknown, Healthy, Healthy, Healthy, Healthy, Healthy, Healthy, Healthy,
                    Healthy, Unhealthy,
                ],
            ),
            // Zero thresholds act like one.
            (0, 0, "SF", &[Healthy, Unhealthy]),
        ];
        for (healthy, unhealthy, results, want) in cases {
            assert_eq!(
                run(*healthy, *unhealthy, results),
                *want,
                "thresholds {healthy}/{unhealthy}, results {results:?}"
            );
        }
    }

    #[test]
    fn tracker_reports_changes_only() {
        let mut tracker = HealthTracker::new(2, 2);
        assert_eq!(tracker.observe(true), None);
        assert_eq!(tracker.observe(true), Some(Healthy));
        assert_eq!(tracker.observe(true), None);
        assert_eq!(tracker.observe(false), None);
        assert_eq!(tracker.observe(false), Some(Unhealthy));
        assert_eq!(tracker.observe(false), None);
    }

    #[test]
    fn tracker_reset() {
        let mut tracker = HealthTracker::new(2, 2);
        tracker.observe(true);
        tracker.observe(true);
        assert_eq!(tracker.health(), Healthy);
        tracker.observe(false);
        tracker.reset();
        assert_eq!(tracker.health(), Unknown);
        // The failure before the reset no longer counts.
        assert_eq!(tracker.observe(false), None);
        assert_eq!(tracker.observe(false), Some(Unhealthy));
        tracker.reset();
        // Neither does the success streak.
        assert_eq!(tracker.observe(true), None);
        assert_eq!(tracker.health(), Unknown);
    }

    #[test]
    fn tracker_long_streak_does_not_wrap() {
        let mut tracker = HealthTracker::new(1, 1);
        tracker.successes = u32::MAX - 1;
        tracker.state = Healthy;
        for _ in 0..3 {
            assert_eq!(tracker.observe(true), None);
        }
        assert_eq!(tracker.health(), Healthy);
    }

    #[test]
    fn health_as_str() {
        assert_eq!(Unknown.as_str(), "unknown");
        assert_eq!(Healthy.as_str(), "healthy");
        assert_eq!(Unhealthy.as_str(), "unhealthy");
        assert_eq!(Healthy.to_string(), "healthy");
    }

    proptest! {
        /// The state changes exactly when a run of identical results reaches
        /// its threshold and the state is not already the target.
        #[test]
        fn tracker_changes_only_at_threshold(
            healthy in 1u32..5,
            unhealthy in 1u32..5,
            results in proptest::collection::vec(any::<bool>(), 0..64),
        ) {
            let mut tracker = HealthTracker::new(healthy, unhealthy);
            let mut run_len = 0u32;
            let mut last: Option<bool> = None;
            for ok in results {
                run_len = if last == Some(ok) { run_len + 1 } else { 1 };
                last = Some(ok);
                let before = tracker.health();
                let change = tracker.observe(ok);
                let (threshold, target) = if ok { (healthy, Healthy) } else { (unhealthy, Unhealthy) };
                let expect = (run_len == threshold && before != target).then_some(target);
                prop_assert_eq!(change, expect);
                prop_assert_eq!(tracker.health(), expect.unwrap_or(before));
            }
        }
    }

    // --- URL and HTTP parsing ----------------------------------------------

    #[test]
    fn url_parsing() {
        let cases = [
            (
                "http://127.0.0.1:8080/healthz",
                false,
                "127.0.0.1",
                8080,
                "/healthz",
            ),
            ("http://example.com", false, "example.com", 80, "/"),
            ("https://example.com", true, "example.com", 443, "/"),
            (
                "HTTPS://example.com:8443/a/b?x=1&y=2",
                true,
                "example.com",
                8443,
                "/a/b?x=1&y=2",
            ),
            ("http://[::1]:8080/ready", false, "::1", 8080, "/ready"),
            ("http://[::1]/", false, "::1", 80, "/"),
            ("http://host?q=1", false, "host", 80, "/?q=1"),
            ("http://host/p#frag", false, "host", 80, "/p"),
            ("http://host:/p", false, "host", 80, "/p"),
        ];
        for (url, tls, host, port, path) in cases {
            let parsed = HttpUrl::parse(url).unwrap();
            assert_eq!(
                parsed,
                HttpUrl {
                    tls,
                    host: host.to_string(),
                    port,
                    path: path.to_string()
                },
                "{url}"
            );
        }
    }

    #[test]
    fn url_errors() {
        let cases = [
            ("127.0.0.1:8080/healthz", "no scheme"),
            ("ftp://host/", "scheme must be http or https"),
            ("http:///path", "no host"),
            ("http://host:99999/", "invalid port"),
            ("http://host:0/", "invalid port"),
            ("http://host:abc/", "invalid port"),
            ("http://[::1/", "unclosed"),
            ("http://[::1]x/", "unexpected text"),
            ("http://::1/", "must be in brackets"),
            ("http://user:pw@host/", "credentials"),
            ("http://host/a b", "whitespace"),
            ("http://host/a\r\nX: y", "whitespace"),
        ];
        for (url, want) in cases {
            let err = HttpUrl::parse(url).unwrap_err();
            assert!(err.contains(want), "{url}: {err}");
        }
    }

    #[test]
    fn host_header() {
        let host = |url: &str| HttpUrl::parse(url).unwrap().host_header();
        assert_eq!(host("http://a:80/"), "a");
        assert_eq!(host("http://a:81/"), "a:81");
        assert_eq!(host("https://a:443/"), "a");
        assert_eq!(host("https://a:80/"), "a:80");
        assert_eq!(host("http://[::1]:8080/"), "[::1]:8080");
        assert_eq!(host("http://[::1]/"), "[::1]");
        let request = HttpUrl::parse("http://a:81/x?y").unwrap().request();
        assert!(request.starts_with("GET /x?y HTTP/1.1\r\nHost: a:81\r\n"));
        assert!(request.contains("Connection: close\r\n"));
        assert!(request.ends_with("\r\n\r\n"));
    }

    #[test]
    fn head_parsing() {
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\nContent-Le"), Ok(None));
        let head = |text: &str| parse_head(text.as_bytes()).unwrap().unwrap().1;
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
            ResponseHead {
                status: 200,
                framing: Framing::Length(5)
            }
        );
        assert_eq!(
            parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
                .unwrap()
                .unwrap()
                .0,
            38
        );
        assert_eq!(head("HTTP/1.0 503 Service Unavailable\r\n\r\n").status, 503);
        assert_eq!(
            head("HTTP/1.0 503 Service Unavailable\r\n\r\n").framing,
            Framing::UntilClose
        );
        assert_eq!(head("HTTP/1.1 204\r\n\r\n").framing, Framing::Empty);
        assert_eq!(
            head("HTTP/1.1 100 Continue\r\n\r\n").framing,
            Framing::Empty
        );
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n")
                .framing,
            Framing::Chunked
        );
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n").framing,
            Framing::UntilClose
        );
        assert_eq!(
            head("HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n").framing,
            Framing::Length(3)
        );
        for bad in [
            "SSH-2.0-OpenSSH\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTP/1.1 abc\r\n\r\n",
            "HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
        ] {
            assert!(parse_head(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn chunked_decoding() {
        let raw = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\n\r\n";
        assert_eq!(
            decode_chunked(raw, 1024).unwrap().unwrap(),
            b"Wikipedia in\r\n\r\nchunks."
        );
        // With trailers.
        let raw = b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n";
        assert_eq!(decode_chunked(raw, 1024).unwrap().unwrap(), b"abc");
        // Incomplete at every cut.
        let full = b"3\r\nabc\r\n0\r\n\r\n";
        for cut in 0..full.len() {
            assert_eq!(decode_chunked(&full[..cut], 1024), Ok(None), "cut {cut}");
        }
        assert!(decode_chunked(b"zz\r\n", 1024).is_err());
        assert!(decode_chunked(b"3\r\nabcd\r\n", 1024).is_err());
        let err = decode_chunked(b"10\r\n", 8).unwrap_err();
        assert!(err.contains("larger than"), "{err}");
    }

    #[test]
    fn output_tail_keeps_the_end() {
        let mut tail = Vec::new();
        push_tail(&mut tail, b"hello ", 8);
        push_tail(&mut tail, b"world", 8);
        assert_eq!(tail, b"lo world");
        push_tail(&mut tail, &[b'x'; 20], 8);
        assert_eq!(tail, b"xxxxxxxx");
    }

    #[test]
    fn durations_format_short() {
        assert_eq!(fmt_duration(Duration::from_secs(1)), "1s");
        assert_eq!(fmt_duration(Duration::from_millis(200)), "200ms");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5s");
    }

    #[test]
    fn relative_programs_resolve_against_cwd() {
        let cwd = Path::new("/srv/module");
        assert_eq!(
            resolve_program("./check.sh", cwd),
            PathBuf::from("/srv/module/./check.sh")
        );
        assert_eq!(
            resolve_program("bin/check", cwd),
            PathBuf::from("/srv/module/bin/check")
        );
        assert_eq!(
            resolve_program("/bin/true", cwd),
            PathBuf::from("/bin/true")
        );
        assert_eq!(resolve_program("true", cwd), PathBuf::from("true"));
    }

    // --- probes against real local servers -----------------------------------

    /// What the test server does with each connection.
    #[derive(Clone, Copy)]
    enum Reply {
        Status(u16),
        /// Accept, read the request, and never answer.
        Silent,
        /// A fixed raw response.
        Raw(&'static str),
    }

    /// An HTTP server on 127.0.0.1 answering every connection with `reply`.
    async fn server(reply: Reply) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !request.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let response = match reply {
                        Reply::Status(status) => format!(
                            "HTTP/1.1 {status} Whatever\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                        ),
                        Reply::Silent => {
                            tokio::time::sleep(Duration::from_secs(30)).await;
                            return;
                        }
                        Reply::Raw(raw) => raw.to_string(),
                    };
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        format!("127.0.0.1:{}", addr.port())
    }

    /// A local port with nothing listening on it.
    async fn closed_port() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        addr.to_string()
    }

    async fn probe(check: HealthCheck, timeout: Duration) -> Result<(), String> {
        probe_once(&check, timeout, &[], Path::new("/")).await
    }

    fn http(addr: &str, path: &str) -> HealthCheck {
        HealthCheck::Http(format!("http://{addr}{path}"))
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn http_probe_healthy_on_2xx_and_3xx() {
        for status in [200, 204, 301, 399] {
            let addr = server(Reply::Status(status)).await;
            probe(http(&addr, "/healthz"), SECOND)
                .await
                .unwrap_or_else(|e| panic!("status {status}: {e}"));
        }
    }

    #[tokio::test]
    async fn http_probe_unhealthy_on_503() {
        let addr = server(Reply::Status(503)).await;
        let err = probe(http(&addr, "/healthz"), SECOND).await.unwrap_err();
        assert_eq!(err, format!("http probe http://{addr}/healthz: status 503"));
        let addr = server(Reply::Status(404)).await;
        let err = probe(http(&addr, "/"), SECOND).await.unwrap_err();
        assert!(err.ends_with("status 404"), "{err}");
    }

    #[tokio::test]
    async fn http_probe_times_out() {
        let addr = server(Reply::Silent).await;
        let started = Instant::now();
        let err = probe(http(&addr, "/healthz"), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            format!("http probe http://{addr}/healthz: timed out after 200ms")
        );
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn http_probe_connection_refused() {
        let addr = closed_port().await;
        let err = probe(http(&addr, "/healthz"), SECOND).await.unwrap_err();
        assert_eq!(
            err,
            format!("http probe http://{addr}/healthz: connection refused")
        );
    }

    #[tokio::test]
    async fn http_probe_garbage_response() {
        let addr = server(Reply::Raw("SSH-2.0-OpenSSH_9.6\r\n\r\n")).await;
        let err = probe(http(&addr, "/"), SECOND).await.unwrap_err();
        assert!(err.contains("malformed status line"), "{err}");
        let addr = server(Reply::Raw("")).await;
        let err = probe(http(&addr, "/"), SECOND).await.unwrap_err();
        assert!(
            err.contains("connection closed without a response"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn http_probe_bad_url() {
        let err = probe(HealthCheck::Http("localhost:8080".into()), SECOND)
            .await
            .unwrap_err();
        assert!(
            err.starts_with("http probe localhost:8080: invalid URL"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn http_get_reads_bodies() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
                &b"hello"[..],
            ),
            (
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi",
                b"hi",
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
                b"abcde",
            ),
            ("HTTP/1.0 200 OK\r\n\r\nuntil close", b"until close"),
            ("HTTP/1.1 204 No Content\r\n\r\n", b""),
        ];
        for (raw, want) in cases {
            let addr = server(Reply::Raw(raw)).await;
            let (status, body) = http_get(&format!("http://{addr}/metrics"), SECOND)
                .await
                .unwrap_or_else(|e| panic!("{raw:?}: {e}"));
            assert_eq!(status, if want.is_empty() { 204 } else { 200 });
            assert_eq!(body, want, "{raw:?}");
        }
    }

    #[tokio::test]
    async fn http_get_detects_truncation_and_oversize() {
        let addr = server(Reply::Raw(
            "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        ))
        .await;
        let err = http_get(&format!("http://{addr}/"), SECOND)
            .await
            .unwrap_err();
        assert!(err.contains("after 3 of 10 body bytes"), "{err}");

        let addr = server(Reply::Raw(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        ))
        .await;
        let err = http_get(&format!("http://{addr}/"), SECOND)
            .await
            .unwrap_err();
        assert!(err.contains("middle of a chunked body"), "{err}");

        let addr = server(Reply::Raw(
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n",
        ))
        .await;
        let err = http_get(&format!("http://{addr}/"), SECOND)
            .await
            .unwrap_err();
        assert_eq!(err, "response body larger than 4 MiB");
    }

    #[tokio::test]
    async fn http_get_caps_bodies_until_close() {
        // A server streaming more than the cap without any framing.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut chunk = [0u8; 1024];
            let _ = stream.read(&mut chunk).await;
            let _ = stream.write_all(b"HTTP/1.0 200 OK\r\n\r\n").await;
            let block = vec![b'x'; 64 * 1024];
            for _ in 0..(MAX_BODY / block.len() + 2) {
                if stream.write_all(&block).await.is_err() {
                    return;
                }
            }
        });
        let err = http_get(&format!("http://{addr}/"), Duration::from_secs(10))
            .await
            .unwrap_err();
        assert_eq!(err, "response body larger than 4 MiB");
    }

    #[tokio::test]
    async fn tcp_probe_ok_and_refused() {
        let addr = server(Reply::Status(200)).await;
        probe(HealthCheck::Tcp(addr), SECOND).await.unwrap();
        let addr = closed_port().await;
        let err = probe(HealthCheck::Tcp(addr.clone()), SECOND)
            .await
            .unwrap_err();
        assert_eq!(err, format!("tcp probe {addr}: connection refused"));
    }

    fn exec(argv: &[&str]) -> HealthCheck {
        HealthCheck::Exec(argv.iter().map(|s| s.to_string()).collect())
    }

    #[tokio::test]
    async fn exec_probe_exit_status() {
        probe(exec(&["true"]), SECOND).await.unwrap();
        let err = probe(exec(&["false"]), SECOND).await.unwrap_err();
        assert_eq!(err, "exec probe false: exited with status 1");
    }

    #[tokio::test]
    async fn exec_probe_reports_output_tail() {
        let script = "echo starting; i=0; while [ $i -lt 200 ]; do echo line $i; i=$((i+1)); done; echo 'db unreachable' >&2; exit 3";
        let err = probe(exec(&["sh", "-c", script]), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(err.contains("exited with status 3: "), "{err}");
        assert!(err.ends_with("db unreachable"), "{err}");
        let (_, output) = err.split_once("exited with status 3: ").unwrap();
        assert!(
            !output.contains("starting"),
            "only the tail is kept: {output}"
        );
        assert!(output.len() <= OUTPUT_TAIL, "{}", output.len());
    }

    #[tokio::test]
    async fn exec_probe_timeout_kills() {
        let started = Instant::now();
        let err = probe(exec(&["sleep", "5"]), Duration::from_millis(200))
            .await
            .unwrap_err();
        assert_eq!(err, "exec probe sleep 5: timed out after 200ms, killed");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    /// Whether a process is gone (or a zombie nobody reaped yet).
    fn is_dead(pid: &str) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        }
    }

    #[tokio::test]
    async fn exec_probe_timeout_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("pid");
        // The shell starts a background `sleep` and records its pid: killing
        // only the shell would leave the sleep running.
        let script = format!("sleep 30 & echo $! > {}; wait", pid_file.display());
        let err = probe(exec(&["sh", "-c", &script]), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(err.ends_with("timed out after 300ms, killed"), "{err}");
        let pid = std::fs::read_to_string(&pid_file).unwrap();
        let pid = pid.trim();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !is_dead(pid) {
            assert!(
                Instant::now() < deadline,
                "background process {pid} survived"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn exec_probe_env_and_cwd() {
        let check = exec(&["sh", "-c", r#"test "$X" = y"#]);
        let env = [("X".to_string(), "y".to_string())];
        probe_once(&check, SECOND, &env, Path::new("/"))
            .await
            .unwrap();
        let env = [("X".to_string(), "z".to_string())];
        probe_once(&check, SECOND, &env, Path::new("/"))
            .await
            .unwrap_err();

        let dir = tempfile::tempdir().unwrap();
        let check = exec(&["sh", "-c", r#"test "$(pwd -P)" = "$1""#, "sh"]);
        let real = dir.path().canonicalize().unwrap();
        let HealthCheck::Exec(mut argv) = check else {
            unreachable!()
        };
        argv.push(real.display().to_string());
        probe_once(&HealthCheck::Exec(argv), SECOND, &[], dir.path())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn exec_probe_relative_program() {
        let dir = tempfile::tempdir().unwrap();
        // A symlink rather than a written script: executing a file another
        // test thread may still hold open for writing fails with ETXTBSY.
        std::os::unix::fs::symlink("/bin/sh", dir.path().join("check")).unwrap();
        let check = exec(&["./check", "-c", "exit 0"]);
        probe_once(&check, SECOND, &[], dir.path()).await.unwrap();

        let check = exec(&["./missing"]);
        let err = probe_once(&check, SECOND, &[], dir.path())
            .await
            .unwrap_err();
        assert!(
            err.starts_with("exec probe ./missing: cannot start"),
            "{err}"
        );

        let err = probe(HealthCheck::Exec(Vec::new()), SECOND)
            .await
            .unwrap_err();
        assert_eq!(err, "exec probe: empty command");
    }

    /// An HTTPS server with a fresh self-signed certificate.
    async fn tls_server(status: u16) -> String {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let config = rustls::ServerConfig::builder_with_provider(hotswap_common::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut request = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !request.ends_with(b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let response =
                        format!("HTTP/1.1 {status} X\r\nContent-Length: 6\r\n\r\nsecure");
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        format!("127.0.0.1:{}", addr.port())
    }

    #[tokio::test]
    async fn https_probe_accepts_self_signed() {
        let addr = tls_server(200).await;
        let url = format!("https://{addr}/healthz");
        probe(HealthCheck::Http(url.clone()), Duration::from_secs(5))
            .await
            .unwrap();
        let (status, body) = http_get(&url, Duration::from_secs(5)).await.unwrap();
        assert_eq!((status, body.as_slice()), (200, &b"secure"[..]));

        // By name too: the certificate is for "localhost" but would be
        // accepted for any name.
        let port = addr.rsplit(':').next().unwrap();
        probe(
            HealthCheck::Http(format!("https://localhost:{port}/")),
            Duration::from_secs(5),
        )
        .await
        .unwrap();

        let addr = tls_server(500).await;
        let err = probe(
            HealthCheck::Http(format!("https://{addr}/")),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(err.ends_with("status 500"), "{err}");
    }

    #[tokio::test]
    async fn https_probe_against_plain_http_fails() {
        // A plain HTTP server that answers at once (a real one would answer
        // the ClientHello with 400 Bad Request).
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let _ = stream
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
            let _ = stream.shutdown().await;
        });
        let err = probe(HealthCheck::Http(format!("https://{addr}/")), SECOND)
            .await
            .unwrap_err();
        assert!(err.contains("tls handshake failed"), "{err}");
    }
}
