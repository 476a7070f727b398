//! The agent's minimal HTTP/1.1 client ([`http_get`]), shared by health
//! probes and the metrics scraper: both only ever need "GET one URL over a
//! fresh connection", which does not justify a full HTTP stack. HTTPS goes
//! through the agent's one TLS client config for modules ([`AcceptAnyCert`]).

use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// Why a GET did not produce a response.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    InvalidUrl(String),
    #[error("timed out after {0}")]
    Timeout(String),
    /// The connection could not be made (the reason in the probe's words).
    #[error("{0}")]
    Connect(String),
    #[error("{0}")]
    Tls(String),
    #[error("sending the request failed: {0}")]
    Send(String),
    #[error("reading the response failed: {0}")]
    Read(String),
    /// The server closed the connection before the response was complete.
    #[error("{0}")]
    Closed(String),
    /// The response breaks HTTP/1.1.
    #[error("{0}")]
    Malformed(String),
    #[error("{0}")]
    TooLarge(String),
}

impl HttpError {
    /// Asking again can get an answer: the server was slow, unreachable or
    /// went away, rather than answering wrongly.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            HttpError::Timeout(_)
                | HttpError::Connect(_)
                | HttpError::Send(_)
                | HttpError::Read(_)
                | HttpError::Closed(_)
        )
    }
}

/// Largest response head (status line and headers) we accept.
const MAX_HEAD: usize = 64 * 1024;

/// Largest response body [`http_get`] returns.
pub(crate) const MAX_BODY: usize = 4 * 1024 * 1024;

/// GET `url` (`http://` or `https://`, the latter without certificate
/// verification) over a fresh connection, returning the status and body.
/// `timeout` bounds the whole exchange; bodies over 4 MiB are an error.
pub(crate) async fn http_get(url: &str, timeout: Duration) -> Result<(u16, Vec<u8>), HttpError> {
    get(url, timeout, Some(MAX_BODY)).await
}

/// [`http_get`], reading the body only when `body_limit` is given.
pub(crate) async fn get(
    url: &str,
    timeout: Duration,
    body_limit: Option<usize>,
) -> Result<(u16, Vec<u8>), HttpError> {
    let url = HttpUrl::parse(url)?;
    match tokio::time::timeout(timeout, get_parsed(&url, body_limit)).await {
        Ok(result) => result,
        Err(_) => Err(HttpError::Timeout(fmt_duration(timeout))),
    }
}

async fn get_parsed(url: &HttpUrl, body_limit: Option<usize>) -> Result<(u16, Vec<u8>), HttpError> {
    let tcp = TcpStream::connect((url.host.as_str(), url.port))
        .await
        .map_err(|e| HttpError::Connect(io_reason(&e)))?;
    // Requests are tiny and written at once; don't let Nagle delay them.
    let _ = tcp.set_nodelay(true);
    let request = url.request();
    if !url.tls {
        return exchange(tcp, request.as_bytes(), body_limit).await;
    }
    let connector = tokio_rustls::TlsConnector::from(tls_config()?);
    let name = ServerName::try_from(url.host.clone())
        .map_err(|e| HttpError::Tls(format!("invalid TLS server name {:?}: {e}", url.host)))?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| HttpError::Tls(format!("tls handshake failed: {e}")))?;
    exchange(tls, request.as_bytes(), body_limit).await
}

/// Send `request`, read the response head and (when `body_limit` is given)
/// the body.
async fn exchange<S>(
    mut stream: S,
    request: &[u8],
    body_limit: Option<usize>,
) -> Result<(u16, Vec<u8>), HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(request)
        .await
        .map_err(|e| HttpError::Send(io_reason(&e)))?;
    stream
        .flush()
        .await
        .map_err(|e| HttpError::Send(io_reason(&e)))?;

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
            return Err(HttpError::TooLarge(
                "response headers larger than 64 KiB".to_string(),
            ));
        }
        if read_more(&mut stream, &mut buf).await? == 0 {
            return Err(HttpError::Closed(if buf.is_empty() {
                "connection closed without a response".to_string()
            } else {
                "connection closed in the middle of the response headers".to_string()
            }));
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
) -> Result<usize, HttpError> {
    buf.reserve(16 * 1024);
    match stream.read_buf(buf).await {
        Ok(n) => Ok(n),
        // Many HTTPS servers close without a TLS close_notify. Treat that as
        // a plain end of stream: the body framing still detects truncation
        // where the protocol allows it at all.
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(0),
        Err(e) => Err(HttpError::Read(io_reason(&e))),
    }
}

async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    mut buf: Vec<u8>,
    framing: Framing,
    limit: usize,
) -> Result<Vec<u8>, HttpError> {
    let too_large =
        || HttpError::TooLarge(format!("response body larger than {}", fmt_bytes(limit)));
    match framing {
        Framing::Empty => Ok(Vec::new()),
        Framing::Length(length) => {
            let length = usize::try_from(length)
                .ok()
                .filter(|&n| n <= limit)
                .ok_or_else(too_large)?;
            while buf.len() < length {
                if read_more(stream, &mut buf).await? == 0 {
                    return Err(HttpError::Closed(format!(
                        "connection closed after {} of {length} body bytes",
                        buf.len()
                    )));
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
                        HttpError::Closed(
                            "connection closed in the middle of a chunked body".to_string(),
                        )
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
fn parse_head(buf: &[u8]) -> Result<Option<(usize, ResponseHead)>, HttpError> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end])
        .map_err(|_| HttpError::Malformed("response headers are not valid UTF-8".to_string()))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = parse_status_line(status_line)?;

    let mut content_length: Option<u64> = None;
    let mut transfer_encoding: Option<String> = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::Malformed(format!(
                "malformed response header {line:?}"
            )));
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let length: u64 = value
                .parse()
                .map_err(|_| HttpError::Malformed(format!("invalid Content-Length {value:?}")))?;
            // Differing lengths would make the body boundary ambiguous.
            if content_length.is_some_and(|known| known != length) {
                return Err(HttpError::Malformed(
                    "conflicting Content-Length headers".to_string(),
                ));
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

fn parse_status_line(line: &str) -> Result<u16, HttpError> {
    let malformed = || HttpError::Malformed(format!("malformed status line {line:?}"));
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
fn decode_chunked(raw: &[u8], limit: usize) -> Result<Option<Vec<u8>>, HttpError> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let Some(line_len) = find_crlf(&raw[pos..]) else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&raw[pos..pos + line_len])
            .map_err(|_| HttpError::Malformed("malformed chunk size line".to_string()))?;
        // Chunk extensions (";name=value") carry nothing we need.
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| HttpError::Malformed(format!("malformed chunk size {size_text:?}")))?;
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
            return Err(HttpError::TooLarge(format!(
                "response body larger than {}",
                fmt_bytes(limit)
            )));
        }
        let data_end = pos.saturating_add(size);
        if raw.len() < data_end.saturating_add(2) {
            return Ok(None);
        }
        if &raw[data_end..data_end + 2] != b"\r\n" {
            return Err(HttpError::Malformed(
                "chunk data not followed by CRLF".to_string(),
            ));
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
    pub(crate) fn parse(url: &str) -> Result<HttpUrl, HttpError> {
        Self::parse_text(url).map_err(HttpError::InvalidUrl)
    }

    fn parse_text(url: &str) -> Result<HttpUrl, String> {
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
fn tls_config() -> Result<Arc<ClientConfig>, HttpError> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, HttpError>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = hotswap_common::tls::provider();
            let mut config = ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| HttpError::Tls(format!("tls configuration failed: {e}")))?
                .dangerous()
                .with_custom_certificate_verifier(hotswap_common::tls::any_server_certificate(
                    provider,
                ))
                .with_no_client_auth();
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(config))
        })
        .clone()
}

/// The reason of an I/O error, in the words the probe messages use.
pub(crate) fn io_reason(e: &io::Error) -> String {
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

/// Local servers for tests of the client and of the probes that use it.
#[cfg(test)]
pub(crate) mod test_servers {
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    // --- probes against real local servers -----------------------------------

    /// What the test server does with each connection.
    #[derive(Clone, Copy)]
    pub(crate) enum Reply {
        Status(u16),
        /// Accept, read the request, and never answer.
        Silent,
        /// A fixed raw response.
        Raw(&'static str),
    }

    /// An HTTP server on 127.0.0.1 answering every connection with `reply`.
    pub(crate) async fn server(reply: Reply) -> String {
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
    pub(crate) async fn closed_port() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        addr.to_string()
    }

    /// An HTTPS server with a fresh self-signed certificate.
    pub(crate) async fn tls_server(status: u16) -> String {
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
}

#[cfg(test)]
mod tests {
    use super::test_servers::{Reply, server};
    use super::*;
    use tokio::net::TcpListener;

    const SECOND: Duration = Duration::from_secs(1);

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
            let err = HttpUrl::parse(url).unwrap_err().to_string();
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
        let err = decode_chunked(b"10\r\n", 8).unwrap_err().to_string();
        assert!(err.contains("larger than"), "{err}");
    }

    #[test]
    fn durations_format_short() {
        assert_eq!(fmt_duration(Duration::from_secs(1)), "1s");
        assert_eq!(fmt_duration(Duration::from_millis(200)), "200ms");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5s");
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
            .unwrap_err()
            .to_string();
        assert!(err.contains("after 3 of 10 body bytes"), "{err}");

        let addr = server(Reply::Raw(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        ))
        .await;
        let err = http_get(&format!("http://{addr}/"), SECOND)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("middle of a chunked body"), "{err}");

        let addr = server(Reply::Raw(
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n",
        ))
        .await;
        let err = http_get(&format!("http://{addr}/"), SECOND)
            .await
            .unwrap_err();
        assert!(!err.is_transient());
        assert_eq!(err.to_string(), "response body larger than 4 MiB");
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
        assert!(!err.is_transient());
        assert_eq!(err.to_string(), "response body larger than 4 MiB");
    }
}
