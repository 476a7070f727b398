//! The TLS side of the gRPC listener. One port serves both the enrollment
//! call (no client certificate yet) and everything else (client certificate
//! required), so client certificates are optional at the TLS layer: when one
//! is sent it must chain to our CA, and each RPC then checks what it needs
//! (see [`crate::auth`]).
//!
//! Handshakes run in their own tasks with a deadline, so one slow or silent
//! client cannot hold up accepting others, and only a few at a time (per
//! core): a handshake is CPU-bound work, and thousands of agents
//! reconnecting at once (after a restart of the control plane) would
//! otherwise all progress slowly together, past their clients' connect
//! timeouts, so that the work is wasted and the storm repeats. Queued
//! connections wait their turn in order; one that waited longer than a
//! client waits is dropped without spending a handshake on it.

use std::sync::Arc;
use std::time::Duration;

use hotswap_common::tls::{self, TlsError};
use rustls::ServerConfig;
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once, per core.
const HANDSHAKES_PER_CORE: usize = 4;

/// A connection that waited this long for its turn is dropped unanswered:
/// its client (agents give up after 5 s) has most likely gone already.
const STALE_AFTER: Duration = Duration::from_secs(4);

/// Server TLS config: TLS 1.3, ALPN h2, our chain (server certificate, then
/// the CA, so agents can check it against their pinned fingerprint, then the
/// cross-signed CA during a rotation), client certificates verified against
/// `client_roots_pem` (the CA, plus the previous one during a rotation) when
/// presented.
pub fn server_config(
    client_roots_pem: &str,
    chain_pem: &str,
    key_pem: &str,
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
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Accept TCP connections and complete TLS handshakes until `shutdown`.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    shutdown: CancellationToken,
) -> ReceiverStream<Result<TlsStream<TcpStream>, std::io::Error>> {
    let (tx, rx) = mpsc::channel(128);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let turns = Arc::new(tokio::sync::Semaphore::new(cores * HANDSHAKES_PER_CORE));
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
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let turns = turns.clone();
            let accepted_at = tokio::time::Instant::now();
            tokio::spawn(async move {
                let Ok(turn) = turns.acquire().await else {
                    return;
                };
                if accepted_at.elapsed() > STALE_AFTER {
                    tracing::debug!(%peer, "dropped a connection that waited too long for its handshake");
                    return;
                }
                let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                drop(turn);
                match handshake {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
