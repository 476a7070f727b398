//! The TLS side of the gRPC listener. One port serves both the enrollment
//! call (no client certificate yet) and everything else (client certificate
//! required), so client certificates are optional at the TLS layer: when one
//! is sent it must chain to our CA, and each RPC then checks what it needs
//! (see [`crate::auth`]).
//!
//! Admission runs in three phases, each bounded, so that neither a
//! reconnect storm nor a client that sends nothing can starve the others:
//!
//! 1. **Per-address cap.** One source address may have at most
//!    [`PENDING_PER_ADDRESS`] connections that have not finished their
//!    handshake; more are closed at once. This bounds the file descriptors
//!    and tasks one host can pin.
//! 2. **ClientHello first.** The connection must deliver a complete
//!    ClientHello within [`CLIENT_HELLO_TIMEOUT`], and it holds no handshake
//!    turn while it does. Reading it costs no CPU to speak of; waiting for it
//!    is what idle or slow-drip clients would make us do, so they cost us a
//!    socket for a few seconds and nothing else. (Before this, a turn was
//!    taken at accept: eight idle sockets held every turn for 10 s.)
//! 3. **Fair queue of real handshakes.** The CPU-bound part (key exchange,
//!    signature, certificate checks) runs at most [`HANDSHAKES_PER_CORE`] at
//!    once per core, in the order the ClientHellos arrived. Thousands of
//!    agents reconnecting at once (after a restart of the control plane)
//!    would otherwise all progress slowly together, past their clients'
//!    connect timeouts, so that the work is wasted and the storm repeats. A
//!    connection that waited longer than a client waits is dropped without
//!    spending a handshake on it. A ClientHello that offers a session
//!    ticket (read by peeking at the first record) waits in a second, wider
//!    queue of its own ([`RESUMPTIONS_PER_CORE`]): resuming costs a key
//!    exchange and no signatures, and behind full handshakes such a client
//!    timed out and spent its ticket on the attempt.
//!
//! Clients that reconnect (agents after a restart) resume their TLS 1.3
//! session with a ticket sealed by keys that survive restarts (see
//! [`crate::tickets`]), which skips the signatures and the certificate
//! chain. What that skips is checked here instead: a resumed connection
//! whose client certificate has expired since is closed. Whether the
//! certificate still belongs to a known node or user is checked on every
//! call, resumed or not.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use hotswap_common::tls::{self, TlsError};
use rustls::server::{Acceptor, NoServerSessionStorage, ProducesTickets, WebPkiClientVerifier};
use rustls::{HandshakeKind, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::LazyConfigAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::Connected;

use crate::auth::Connection;
use crate::metrics::{DropReasonLabel, HandshakeLabel, Metrics};

/// A client must have sent its whole ClientHello by then. Real clients send
/// it in their first packet right after connecting; the bound only has to
/// cover a loaded network, not a slow client.
const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(3);

/// After its turn starts, a client that has not finished its handshake by
/// then is dropped (one round trip after our first flight).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once, per core.
const HANDSHAKES_PER_CORE: usize = 4;

/// Handshakes of clients that offer a session ticket in progress at once,
/// per core, besides the full ones: a resumption costs a key exchange and
/// no signature, a few times less than a full handshake.
const RESUMPTIONS_PER_CORE: usize = 16;

/// A connection that waited this long for its turn is dropped unanswered:
/// its client (agents give up after 5 s) has most likely gone already.
const STALE_AFTER: Duration = Duration::from_secs(4);

/// Connections from one source address that may be between accept and the
/// end of their handshake. Large enough for the thousands of simulated
/// agents of the scale benchmarks, which all connect from 127.0.0.1 and
/// retry with backoff when refused, and small against the open-files limit
/// the daemon raises itself to (20,000 here).
pub const PENDING_PER_ADDRESS: usize = 1024;

/// Session tickets sent after each handshake (see `server_config`).
pub const TICKETS_PER_HANDSHAKE: usize = 4;

/// Server TLS config: TLS 1.3, ALPN h2 and http/1.1, our chain (server certificate, then
/// the CA, so agents can check it against their pinned fingerprint, then the
/// cross-signed CA during a rotation), client certificates verified against
/// `client_roots_pem` (the CA, plus the previous one during a rotation) when
/// presented. With `tickets`, clients may resume their sessions with tickets
/// those keys seal; without, nobody resumes.
pub fn server_config(
    client_roots_pem: &str,
    chain_pem: &str,
    key_pem: &str,
    tickets: Option<Arc<dyn ProducesTickets>>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = tls::provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(
        tls::roots_from_pem(client_roots_pem)?,
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()?;
    let chain = tls::certs_from_pem("server certificate chain", chain_pem)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(tls::PROTOCOL_VERSIONS)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, tls::key_from_pem("server key", key_pem)?)?;
    // h2 for gRPC (and HTTP/2 clients of the JSON API), http/1.1 for the
    // JSON API's plain HTTP clients (curl without --http2, scripts).
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Stateless tickets only: nothing per session is held in memory, and a
    // restart forgets nothing. Without tickets, no resumption at all.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    match tickets {
        Some(ticketer) => {
            config.ticketer = ticketer;
            // A client spends a ticket on every attempt, also on one that
            // fails (in a reconnect storm: dropped while queued, timed out):
            // with one ticket, 56-78 % of 10k agents handshook in full after
            // a restart. Every handshake, resumed too, hands out fresh ones.
            config.send_tls13_tickets = TICKETS_PER_HANDSHAKE;
        }
        None => config.send_tls13_tickets = 0,
    }
    Ok(Arc::new(config))
}

/// Counts of connections per source address that are still in admission.
#[derive(Debug, Default)]
pub struct PendingByAddress {
    limit: usize,
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection's place in [`PendingByAddress`]; released on drop.
#[derive(Debug)]
pub struct PendingSlot {
    table: Arc<PendingByAddress>,
    address: IpAddr,
}

impl PendingByAddress {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(PendingByAddress {
            limit,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// A place for one more connection from `address`, or `None` when that
    /// address already has `limit` connections in admission.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Option<PendingSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = counts.entry(address).or_insert(0);
        if *count >= self.limit {
            return None;
        }
        *count += 1;
        Some(PendingSlot {
            table: self.clone(),
            address,
        })
    }

    /// Connections from `address` in admission now.
    pub fn pending(&self, address: IpAddr) -> usize {
        let counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        counts.get(&address).copied().unwrap_or(0)
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// A connection whose TLS handshake completed: the stream the server reads
/// and writes, and, through [`Connected`], the [`Connection`] every
/// request on it carries (the client certificate's identity is read once
/// here, not on each call).
pub struct Accepted(TlsStream<TcpStream>);

impl Accepted {
    pub fn get_ref(&self) -> &TlsStream<TcpStream> {
        &self.0
    }
}

impl Connected for Accepted {
    type ConnectInfo = Connection;

    fn connect_info(&self) -> Connection {
        Connection::new(self.0.connect_info())
    }
}

impl AsyncRead for Accepted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Accepted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Accept TCP connections and complete TLS handshakes until `shutdown`.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<Accepted, std::io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let turns = Arc::new(tokio::sync::Semaphore::new(cores * HANDSHAKES_PER_CORE));
    let resumptions = Arc::new(tokio::sync::Semaphore::new(cores * RESUMPTIONS_PER_CORE));
    let pending = PendingByAddress::new(PENDING_PER_ADDRESS);
    let handshakes = metrics.tls_handshakes.clone();
    let dropped = move |reason: &'static str| {
        metrics
            .tls_dropped
            .get_or_create(&DropReasonLabel { reason })
            .inc();
    };
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, peer) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Typically EMFILE: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = pending.admit(peer.ip()) else {
                tracing::debug!(%peer, "refused a connection: too many pending from its address");
                dropped("address_limit");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let config = config.clone();
            let tx = tx.clone();
            let turns = turns.clone();
            let resumptions = resumptions.clone();
            let dropped = dropped.clone();
            let handshakes = handshakes.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let hello = tokio::time::timeout(CLIENT_HELLO_TIMEOUT, async {
                    let resuming = peek_offers_ticket(&tcp).await;
                    let start = LazyConfigAcceptor::new(Acceptor::default(), tcp).await;
                    start.map(|start| (start, resuming))
                })
                .await;
                let (start, resuming) = match hello {
                    Ok(Ok(started)) => started,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "no valid ClientHello");
                        dropped("bad_client_hello");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "no ClientHello in time");
                        dropped("client_hello_timeout");
                        return;
                    }
                };
                let hello_at = tokio::time::Instant::now();
                // A client offering a ticket most likely resumes (no
                // signatures, no chain): it waits in its own, wider queue
                // instead of behind full handshakes, where it would time
                // out and spend its ticket on the attempt. The queue is
                // still bounded, for clients that offer made-up tickets.
                let queue = if resuming { &resumptions } else { &turns };
                let Ok(turn) = queue.acquire().await else {
                    return;
                };
                if hello_at.elapsed() > STALE_AFTER {
                    tracing::debug!(%peer, "dropped a connection that waited too long for its handshake");
                    dropped("stale");
                    return;
                }
                let handshake =
                    tokio::time::timeout(HANDSHAKE_TIMEOUT, start.into_stream(config)).await;
                drop(turn);
                match handshake {
                    Ok(Ok(stream)) => {
                        let resumed =
                            stream.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
                        handshakes
                            .get_or_create(&HandshakeLabel {
                                kind: if resumed { "resumed" } else { "full" },
                            })
                            .inc();
                        if resumed
                            && let Some(reason) = resumed_refusal(stream.get_ref().1, now_ms())
                        {
                            tracing::debug!(%peer, %reason, "closed a resumed TLS session");
                            dropped("resumed_expired");
                            return;
                        }
                        let _ = tx.send(Ok(Accepted(stream))).await;
                    }
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        dropped("handshake_failed");
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        dropped("handshake_timeout");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Whether the client's first TLS record is a ClientHello that offers a
/// pre-shared key (a session ticket), read without consuming it. A hello
/// that does not arrive whole, or does not parse, counts as not offering
/// one: it waits with the full handshakes, and the acceptor judges it.
async fn peek_offers_ticket(tcp: &TcpStream) -> bool {
    // The record's header first, then a buffer of the record's size: a
    // buffer of the largest record for every connection, short-lived as it
    // is, cost 1.2 KiB of resident memory per connected agent at 10k.
    let mut header = [0u8; 5];
    loop {
        match tcp.peek(&mut header).await {
            Ok(0) | Err(_) => return false,
            Ok(5) => break,
            Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if header[0] != 22 || length > MAX_RECORD {
        return false;
    }
    let mut buf = vec![0u8; 5 + length];
    loop {
        let n = match tcp.peek(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => n,
        };
        match offers_ticket(&buf[..n]) {
            Some(offers) => return offers,
            None if n == buf.len() => return false,
            // Part of the record is still on its way (a hello split over
            // segments); peek returns at once while anything is buffered.
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

/// The largest TLS plaintext record.
const MAX_RECORD: usize = 16 * 1024;

/// Whether `bytes`, the start of a client's stream, hold a ClientHello
/// offering a pre-shared key: `None` while its first record is incomplete,
/// `Some(false)` for anything that is not such a hello (another record, a
/// hello spanning records, malformed data).
pub fn offers_ticket(bytes: &[u8]) -> Option<bool> {
    const HANDSHAKE: u8 = 22;
    const CLIENT_HELLO: u8 = 1;
    const PRE_SHARED_KEY: u16 = 41;
    let header = bytes.get(..5)?;
    if header[0] != HANDSHAKE {
        return Some(false);
    }
    let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
    if length > MAX_RECORD {
        return Some(false);
    }
    let record = bytes.get(5..5 + length)?;
    let parsed = (|| {
        let mut r = Reader(record);
        if r.u8()? != CLIENT_HELLO {
            return None;
        }
        let hello_length = r.u24()?;
        let mut hello = Reader(r.take(hello_length)?);
        hello.take(2 + 32)?; // legacy version, random
        let session_id = usize::from(hello.u8()?);
        hello.take(session_id)?;
        let suites = hello.u16()?;
        hello.take(usize::from(suites))?;
        let compression = usize::from(hello.u8()?);
        hello.take(compression)?;
        let extensions_length = usize::from(hello.u16()?);
        let mut extensions = Reader(hello.take(extensions_length)?);
        while !extensions.0.is_empty() {
            let kind = extensions.u16()?;
            let length = extensions.u16()?;
            extensions.take(usize::from(length))?;
            if kind == PRE_SHARED_KEY {
                return Some(true);
            }
        }
        Some(false)
    })();
    Some(parsed.unwrap_or(false))
}

/// A cursor over TLS's big-endian length-prefixed fields.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u16(&mut self) -> Option<u16> {
        let b = self.take(2)?;
        Some(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u24(&mut self) -> Option<usize> {
        let b = self.take(3)?;
        Some(usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]))
    }
}

/// Why a resumed session may not go on, if it may not: its client
/// certificate has expired since the full handshake verified it (a ticket
/// carries the chain, not a new verification).
pub fn resumed_refusal(connection: &rustls::ServerConnection, now_ms: u64) -> Option<String> {
    let leaf = connection.peer_certificates()?.first()?;
    match hotswap_common::pki::not_after_ms(leaf.as_ref()) {
        Ok(not_after) if not_after > now_ms => None,
        Ok(not_after) => Some(format!(
            "the client certificate expired at {}",
            hotswap_common::timefmt::rfc3339_from_ms(not_after)
        )),
        Err(e) => Some(format!("the client certificate is unreadable: {e}")),
    }
}

fn now_ms() -> u64 {
    hotswap_common::timefmt::now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server config of `ca`'s with ticket keys in `dir`.
    fn ticketing_server(
        ca: &hotswap_common::pki::CertificateAuthority,
        server: &hotswap_common::pki::CertifiedKeyPem,
        dir: &std::path::Path,
    ) -> Arc<ServerConfig> {
        let keys = crate::tickets::TicketKeys::open(
            &dir.join("tls-tickets.json"),
            Duration::from_secs(3600),
            ca.cert_pem(),
            hotswap_common::timefmt::now_ms(),
        )
        .expect("ticket keys");
        server_config(
            ca.cert_pem(),
            &format!("{}{}", server.cert_pem, ca.cert_pem()),
            &server.key_pem,
            Some(Arc::new(keys)),
        )
        .expect("server config")
    }

    /// One client connection: the handshake kind the client saw, and
    /// whether the server then sent it the greeting (a connection the
    /// server closed after the handshake reads nothing).
    async fn greeted(
        config: Arc<rustls::ClientConfig>,
        addr: std::net::SocketAddr,
    ) -> (Option<HandshakeKind>, bool) {
        use tokio::io::AsyncReadExt;
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .expect("the client finishes its side of the handshake");
        let kind = tls.get_ref().1.handshake_kind();
        let mut greeting = [0u8; 5];
        let read = tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut greeting))
            .await
            .expect("the server answers or closes");
        (kind, read.is_ok() && &greeting == b"hello")
    }

    /// Every request on a connection carries the identity its client
    /// certificate names, read once at accept; a connection without a
    /// client certificate carries the reason calls are refused, and the
    /// client's address either way.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn accepted_connections_carry_the_identity_read_at_accept() {
        use hotswap_common::pki::{CertificateAuthority, Principal};
        use hotswap_common::tls::{ClientIdentity, ServerTrust};
        use tokio_stream::StreamExt;

        let (ca, _) = CertificateAuthority::generate("test ca").expect("ca");
        let server = ca
            .issue_server(&["localhost".into()], Duration::from_secs(3600))
            .expect("server cert");
        let node = ca
            .issue_client_with_new_key(&Principal::Node("n7".into()), Duration::from_secs(3600))
            .expect("client cert");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = ticketing_server(&ca, &server, dir.path());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = Arc::new(Metrics::new().0);
        let shutdown = CancellationToken::new();
        let mut accepted = incoming(listener, config, metrics, shutdown.clone());
        let trust = || ServerTrust::Ca(ca.cert_pem().to_string());
        let with_cert = hotswap_common::tls::client_config(
            trust(),
            Some(ClientIdentity {
                cert_pem: &node.cert_pem,
                key_pem: &node.key_pem,
            }),
        )
        .expect("client config");
        let without_cert = hotswap_common::tls::client_config(trust(), None).expect("config");

        for (client, expect_node) in [(with_cert, true), (without_cert, false)] {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let local = tcp.local_addr().expect("local addr");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let connecting = tokio_rustls::TlsConnector::from(client).connect(name, tcp);
            let (client_side, server_side) = tokio::join!(connecting, accepted.next());
            let _client_side = client_side.expect("client handshake");
            let server_side = server_side.expect("accepted").expect("stream");
            let connection = server_side.connect_info();
            assert_eq!(connection.remote_addr(), Some(local));
            let mut extensions = tonic::codegen::http::Extensions::new();
            extensions.insert(connection.clone());
            match crate::auth::connection_peer(&extensions) {
                Ok(peer) => {
                    assert!(
                        expect_node,
                        "a connection without a certificate has no peer"
                    );
                    assert_eq!(peer.principal, Principal::Node("n7".into()));
                    assert_eq!(
                        peer.cert_fingerprint,
                        hotswap_common::pki::der_fingerprint(&first_der(&node.cert_pem))
                    );
                }
                Err(e) => {
                    assert!(!expect_node, "refused: {e}");
                    assert!(e.to_string().contains("client certificate"), "{e}");
                }
            }
        }
        // A request that came some other way names nobody.
        let none = tonic::codegen::http::Extensions::new();
        assert!(crate::auth::connection_peer(&none).is_err());
        assert_eq!(crate::auth::remote_addr(&none), None);
        shutdown.cancel();
    }

    /// The DER of the first certificate of a PEM text.
    fn first_der(pem: &str) -> Vec<u8> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
            .expect("pem")
            .to_vec()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sessions_resume_with_tickets_until_the_client_certificate_expires() {
        use hotswap_common::pki::{CertificateAuthority, Principal};
        use hotswap_common::tls::{ClientIdentity, ServerTrust};
        use tokio::io::AsyncWriteExt;
        use tokio_stream::StreamExt;

        let (ca, _) = CertificateAuthority::generate("test ca").expect("ca");
        let server = ca
            .issue_server(&["localhost".into()], Duration::from_secs(3600))
            .expect("server cert");
        let now = std::time::SystemTime::now();
        let expires = now + Duration::from_secs(4);
        let node = ca
            .issue_client_valid_between(
                &Principal::Node("n1".into()),
                now - Duration::from_secs(60),
                expires,
            )
            .expect("client cert");
        let dir = tempfile::tempdir().expect("tempdir");
        let config = ticketing_server(&ca, &server, dir.path());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = Arc::new(Metrics::new().0);
        let shutdown = CancellationToken::new();
        let mut accepted = incoming(listener, config, metrics.clone(), shutdown.clone());
        tokio::spawn(async move {
            while let Some(Ok(mut stream)) = accepted.next().await {
                tokio::spawn(async move {
                    let _ = stream.write_all(b"hello").await;
                    let _ = stream.flush().await;
                    let mut sink = Vec::new();
                    let _ = tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut sink).await;
                });
            }
        });
        let client = hotswap_common::tls::client_config(
            ServerTrust::Ca(ca.cert_pem().to_string()),
            Some(ClientIdentity {
                cert_pem: &node.cert_pem,
                key_pem: &node.key_pem,
            }),
        )
        .expect("client config");

        assert_eq!(
            greeted(client.clone(), addr).await,
            (Some(HandshakeKind::Full), true)
        );
        assert_eq!(
            greeted(client.clone(), addr).await,
            (Some(HandshakeKind::Resumed), true),
            "the second connection resumes with the ticket of the first"
        );
        // Let the certificate expire (X.509 times are whole seconds).
        let wait = expires
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default()
            + Duration::from_millis(1500);
        tokio::time::sleep(wait).await;
        assert_eq!(
            greeted(client.clone(), addr).await,
            (Some(HandshakeKind::Resumed), false),
            "a resumed session with an expired certificate is closed"
        );
        let handshakes = |kind| {
            metrics
                .tls_handshakes
                .get_or_create(&HandshakeLabel { kind })
                .get()
        };
        assert_eq!((handshakes("full"), handshakes("resumed")), (1, 2));
        assert_eq!(
            metrics
                .tls_dropped
                .get_or_create(&DropReasonLabel {
                    reason: "resumed_expired"
                })
                .get(),
            1
        );
        // A full handshake refuses the expired certificate too.
        let fresh = hotswap_common::tls::client_config(
            ServerTrust::Ca(ca.cert_pem().to_string()),
            Some(ClientIdentity {
                cert_pem: &node.cert_pem,
                key_pem: &node.key_pem,
            }),
        )
        .expect("client config");
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let full = tokio_rustls::TlsConnector::from(fresh)
            .connect(name, tcp)
            .await;
        if let Ok(mut tls) = full {
            let mut byte = [0u8; 1];
            assert!(
                tokio::io::AsyncReadExt::read_exact(&mut tls, &mut byte)
                    .await
                    .is_err(),
                "an expired certificate is refused in a full handshake"
            );
        }
        shutdown.cancel();
    }

    /// Move TLS bytes between an in-memory client and server until both
    /// are quiet.
    fn pump(client: &mut rustls::ClientConnection, server: &mut rustls::ServerConnection) {
        for _ in 0..8 {
            let mut wire = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut wire).expect("client writes");
            }
            let mut read = &wire[..];
            while !read.is_empty() {
                server.read_tls(&mut read).expect("server reads");
                server.process_new_packets().expect("server processes");
            }
            let mut wire = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut wire).expect("server writes");
            }
            let mut read = &wire[..];
            while !read.is_empty() {
                client.read_tls(&mut read).expect("client reads");
                client.process_new_packets().expect("client processes");
            }
        }
    }

    fn first_flight(config: &Arc<rustls::ClientConfig>) -> (rustls::ClientConnection, Vec<u8>) {
        let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
        let mut client = rustls::ClientConnection::new(config.clone(), name).expect("client");
        let mut hello = Vec::new();
        client.write_tls(&mut hello).expect("hello");
        (client, hello)
    }

    #[test]
    fn a_client_hello_offering_a_ticket_is_told_from_one_that_does_not() {
        use hotswap_common::pki::{CertificateAuthority, Principal};
        use hotswap_common::tls::{ClientIdentity, ServerTrust};
        let (ca, _) = CertificateAuthority::generate("test ca").expect("ca");
        let server_cert = ca
            .issue_server(&["localhost".into()], Duration::from_secs(3600))
            .expect("server cert");
        let node = ca
            .issue_client_with_new_key(&Principal::Node("n1".into()), Duration::from_secs(3600))
            .expect("client cert");
        let dir = tempfile::tempdir().expect("tempdir");
        let server_config = ticketing_server(&ca, &server_cert, dir.path());
        let client_config = hotswap_common::tls::client_config(
            ServerTrust::Ca(ca.cert_pem().to_string()),
            Some(ClientIdentity {
                cert_pem: &node.cert_pem,
                key_pem: &node.key_pem,
            }),
        )
        .expect("client config");

        let (mut client, fresh) = first_flight(&client_config);
        assert_eq!(offers_ticket(&fresh), Some(false), "no ticket yet");
        let mut server = rustls::ServerConnection::new(server_config.clone()).expect("server");
        let mut read = &fresh[..];
        server.read_tls(&mut read).expect("read");
        server.process_new_packets().expect("process");
        pump(&mut client, &mut server);
        assert!(!client.is_handshaking() && !server.is_handshaking());

        let (_, resuming) = first_flight(&client_config);
        assert_eq!(
            offers_ticket(&resuming),
            Some(true),
            "the next hello offers the ticket"
        );
        // Incomplete: wait for more; complete with more after it: decided.
        for cut in 0..resuming.len() {
            assert_eq!(offers_ticket(&resuming[..cut]), None, "cut at {cut}");
        }
        let mut followed = resuming.clone();
        followed.extend_from_slice(&[23, 3, 3, 0, 1, 0]);
        assert_eq!(offers_ticket(&followed), Some(true));
        // Not a handshake record, or a handshake that is not a hello.
        assert_eq!(offers_ticket(&[23, 3, 3, 0, 1, 0]), Some(false));
        let mut not_hello = resuming.clone();
        not_hello[5] = 2;
        assert_eq!(offers_ticket(&not_hello), Some(false));
        // A record claiming more than TLS allows is not waited for.
        assert_eq!(offers_ticket(&[22, 3, 1, 0xff, 0xff]), Some(false));
        // Lengths inside the hello that overrun it.
        for i in 5..resuming.len() {
            let mut damaged = resuming.clone();
            damaged[i] = 0xff;
            assert!(offers_ticket(&damaged).is_some(), "byte {i}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_are_judged_without_panicking(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let judged = offers_ticket(&bytes);
            if bytes.len() >= 5 + usize::from(u16::from_be_bytes([bytes.get(3).copied().unwrap_or(0), bytes.get(4).copied().unwrap_or(0)])) {
                proptest::prop_assert!(judged.is_some());
            }
        }
    }

    #[test]
    fn pending_slots_are_capped_per_address_and_released_on_drop() {
        let table = PendingByAddress::new(2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let first = table.admit(a).expect("first");
        let second = table.admit(a).expect("second");
        assert!(
            table.admit(a).is_none(),
            "a third from one address is refused"
        );
        let other = table.admit(b).expect("another address has its own budget");
        assert_eq!(table.pending(a), 2);
        drop(first);
        assert_eq!(table.pending(a), 1);
        let third = table.admit(a).expect("a freed place is reusable");
        drop((second, third, other));
        assert_eq!(table.pending(a), 0);
        assert_eq!(table.pending(b), 0);
        assert!(
            table.counts.lock().unwrap().is_empty(),
            "no entry outlives its connections"
        );
    }
}
