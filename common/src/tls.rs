//! TLS for every hotswap connection: TLS 1.3 only, ALPN `h2`, ring as the
//! crypto provider. Clients connect through our own connector (TCP, then
//! tokio-rustls) so we control verification fully:
//!
//! - after enrollment, the server is verified against the stored CA and the
//!   client presents its certificate (mTLS);
//! - during enrollment, the agent has no CA yet, only the fingerprint the
//!   operator gave it: the server must present a chain containing a CA with
//!   exactly that SHA-256 fingerprint, and the leaf must verify against it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint, Uri};

/// The only protocol version hotswap speaks.
pub static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid control plane URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("invalid PEM in {what}: {reason}")]
    BadPem { what: &'static str, reason: String },
    #[error("TLS configuration error: {0}")]
    Config(#[from] rustls::Error),
    #[error("TLS configuration error: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The provider every config uses: ring, with AES-128-GCM/SHA-256 first.
/// Both ends are ours, so the preference decides: SHA-256 has hardware
/// instructions on current x86 and ARM CPUs where SHA-384 has none, and it
/// is most of a handshake's hashing (a reconnect storm is made of them).
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Parse all certificates of a PEM text.
pub fn certs_from_pem(
    what: &'static str,
    pem: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::BadPem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::BadPem {
            what,
            reason: "no certificate found".into(),
        });
    }
    Ok(certs)
}

/// Parse a private key from PEM (PKCS#8, SEC1 or PKCS#1).
pub fn key_from_pem(what: &'static str, pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::BadPem {
        what,
        reason: e.to_string(),
    })
}

/// A root store holding exactly the given CA.
pub fn roots_from_pem(ca_pem: &str) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem("CA certificate", ca_pem)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

/// How a client decides to trust the server.
pub enum ServerTrust {
    /// The CA certificate (PEM) stored after enrollment or in a profile.
    Ca(String),
    /// Only the CA's SHA-256 fingerprint, before enrollment.
    Pinned(PinnedCa),
}

/// Fingerprint pin plus a place to record why a handshake failed, so the
/// caller can tell "wrong CA" (fatal) from "not reachable" (retry).
#[derive(Clone)]
pub struct PinnedCa {
    fingerprint: [u8; 32],
    mismatch: Arc<Mutex<Option<String>>>,
}

impl PinnedCa {
    pub fn new(fingerprint: [u8; 32]) -> Self {
        Self {
            fingerprint,
            mismatch: Arc::new(Mutex::new(None)),
        }
    }

    /// Why the last handshake failed pin verification, if it did.
    pub fn mismatch(&self) -> Option<String> {
        self.mismatch.lock().ok().and_then(|m| m.clone())
    }
}

/// A client's own certificate and key, PEM.
pub struct ClientIdentity<'a> {
    pub cert_pem: &'a str,
    pub key_pem: &'a str,
}

/// Build a client config: TLS 1.3, ALPN h2, the given trust, optional identity.
pub fn client_config(
    trust: ServerTrust,
    identity: Option<ClientIdentity<'_>>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(PROTOCOL_VERSIONS)?;
    let builder = match trust {
        ServerTrust::Ca(ca_pem) => builder.with_root_certificates(roots_from_pem(&ca_pem)?),
        ServerTrust::Pinned(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerVerifier {
                policy: ServerPolicy::PinnedCa(pin),
                provider,
            })),
    };
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(
            certs_from_pem("client certificate", id.cert_pem)?,
            key_from_pem("client key", id.key_pem)?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The one server-certificate verifier of hotswap's clients. Whatever the
/// policy, the handshake signature is verified with the provider's
/// algorithms, so a server must hold the key of the certificate it presents.
#[derive(Debug)]
struct ServerVerifier {
    policy: ServerPolicy,
    provider: Arc<CryptoProvider>,
}

#[derive(Debug)]
enum ServerPolicy {
    /// The chain must lead to the CA with this fingerprint, sent by the
    /// server, and name the host (the control plane).
    PinnedCa(PinnedCa),
    /// Any certificate: for module health probes and metrics scraping over
    /// HTTPS, as Kubernetes probes do. Modules usually serve self-signed
    /// certificates the agent has no root for, and a probe checks liveness,
    /// not identity.
    AnyCertificate,
}

/// A verifier that accepts any server certificate but still checks the
/// handshake signature (see [`ServerPolicy::AnyCertificate`]).
pub fn any_server_certificate(provider: Arc<CryptoProvider>) -> Arc<dyn ServerCertVerifier> {
    Arc::new(ServerVerifier {
        policy: ServerPolicy::AnyCertificate,
        provider,
    })
}

impl std::fmt::Debug for PinnedCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PinnedCa(sha256:{})", hex::encode(self.fingerprint))
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let pin = match &self.policy {
            ServerPolicy::AnyCertificate => return Ok(ServerCertVerified::assertion()),
            ServerPolicy::PinnedCa(pin) => pin,
        };
        let pinned = intermediates
            .iter()
            .find(|cert| Sha256::digest(cert.as_ref()).as_slice() == pin.fingerprint);
        let Some(ca) = pinned else {
            let offered: Vec<String> = intermediates
                .iter()
                .map(|c| format!("sha256:{}", hex::encode(Sha256::digest(c.as_ref()))))
                .collect();
            let reason = if offered.is_empty() {
                "the server sent no CA certificate to compare".to_string()
            } else {
                format!("the server's CA has fingerprint {}", offered.join(", "))
            };
            if let Ok(mut slot) = pin.mismatch.lock() {
                *slot = Some(reason.clone());
            }
            return Err(rustls::Error::General(format!(
                "CA fingerprint mismatch: {reason}"
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        verifier.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
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

/// A parsed control plane address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControlPlaneUrl {
    /// `host:port` to connect to.
    pub authority: String,
    /// Host name or IP the server certificate must match.
    pub host: String,
    pub port: u16,
}

/// Default gRPC port of the control plane.
pub const DEFAULT_PORT: u16 = 7443;

impl ControlPlaneUrl {
    /// Accepts `https://host[:port]` or `host[:port]`; plain `http` is refused
    /// because hotswap never talks to its control plane without TLS.
    pub fn parse(url: &str) -> Result<Self, TlsError> {
        let bad = |reason: &str| TlsError::BadUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let with_scheme = if url.contains("://") {
            url.to_string()
        } else {
            format!("https://{url}")
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|e: tonic::codegen::http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("https") => {}
            Some(other) => {
                return Err(bad(&format!(
                    "scheme {other:?} is not supported; use https://"
                )));
            }
            None => return Err(bad("missing scheme")),
        }
        if uri.path() != "/" && !uri.path().is_empty() {
            return Err(bad("a path is not allowed"));
        }
        let host = uri.host().ok_or_else(|| bad("missing host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(DEFAULT_PORT);
        let authority = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        Ok(Self {
            authority,
            host,
            port,
        })
    }

    fn server_name(&self) -> Result<ServerName<'static>, TlsError> {
        ServerName::try_from(self.host.clone()).map_err(|e| TlsError::BadUrl {
            url: self.host.clone(),
            reason: e.to_string(),
        })
    }
}

impl std::fmt::Display for ControlPlaneUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "https://{}", self.authority)
    }
}

/// Several control plane replicas (SPEC §7): given as repeated flags or a
/// comma-separated list, tried in turn from a random starting point so
/// that clients spread over the replicas and fail over when one goes away.
#[derive(Debug)]
pub struct Endpoints {
    urls: Vec<ControlPlaneUrl>,
    next: std::sync::atomic::AtomicUsize,
}

impl Clone for Endpoints {
    fn clone(&self) -> Self {
        Self {
            urls: self.urls.clone(),
            next: std::sync::atomic::AtomicUsize::new(
                self.next.load(std::sync::atomic::Ordering::Relaxed),
            ),
        }
    }
}

impl PartialEq for Endpoints {
    fn eq(&self, other: &Self) -> bool {
        self.urls == other.urls
    }
}

impl Endpoints {
    /// Every URL of `values`, each of which may be a comma-separated list;
    /// repeats are dropped. At least one is required.
    pub fn parse<S: AsRef<str>>(values: &[S]) -> Result<Self, TlsError> {
        let mut urls: Vec<ControlPlaneUrl> = Vec::new();
        for value in values {
            for part in value.as_ref().split(',').map(str::trim) {
                if part.is_empty() {
                    continue;
                }
                let url = ControlPlaneUrl::parse(part)?;
                if !urls.contains(&url) {
                    urls.push(url);
                }
            }
        }
        if urls.is_empty() {
            return Err(TlsError::BadUrl {
                url: String::new(),
                reason: "no control plane address given".into(),
            });
        }
        let start = rand::random_range(0..urls.len());
        Ok(Self {
            urls,
            next: std::sync::atomic::AtomicUsize::new(start),
        })
    }

    /// The endpoint for the next attempt: each call moves to the next one,
    /// so an attempt after a failed one goes elsewhere.
    pub fn pick(&self) -> &ControlPlaneUrl {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.urls[i % self.urls.len()]
    }

    pub fn all(&self) -> &[ControlPlaneUrl] {
        &self.urls
    }

    /// Every endpoint once, starting from the next one [`Endpoints::pick`]
    /// would give.
    pub fn in_turn(&self) -> Vec<&ControlPlaneUrl> {
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        (0..self.urls.len())
            .map(|k| &self.urls[(start + k) % self.urls.len()])
            .collect()
    }
}

impl std::fmt::Display for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, url) in self.urls.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{url}")?;
        }
        Ok(())
    }
}

/// Options for a gRPC channel to the control plane.
#[derive(Clone, Debug)]
pub struct ChannelOptions {
    pub connect_timeout: Duration,
    /// HTTP/2 keepalive pings: they detect a dead peer on an idle connection.
    pub keepalive_interval: Option<Duration>,
    /// Source address to connect from (the simulator spreads thousands of
    /// connections over several loopback addresses this way).
    pub local_addr: Option<std::net::IpAddr>,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Some(Duration::from_secs(10)),
            local_addr: None,
        }
    }
}

/// Connect a gRPC channel over our TLS connector. Fails if the TCP connect or
/// TLS handshake fails, so callers can classify the error.
pub async fn connect(
    url: &ControlPlaneUrl,
    config: Arc<ClientConfig>,
    options: &ChannelOptions,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = endpoint(url, options)?;
    endpoint
        .connect_with_connector(connector(url, config, options.local_addr))
        .await
}

/// A channel that connects on first use (used by the CLI).
pub fn connect_lazy(
    url: &ControlPlaneUrl,
    config: Arc<ClientConfig>,
    options: &ChannelOptions,
) -> Result<Channel, tonic::transport::Error> {
    Ok(
        endpoint(url, options)?.connect_with_connector_lazy(connector(
            url,
            config,
            options.local_addr,
        )),
    )
}

fn endpoint(
    url: &ControlPlaneUrl,
    options: &ChannelOptions,
) -> Result<Endpoint, tonic::transport::Error> {
    // tonic sees plain http: TLS is done by our connector below.
    let mut endpoint = Endpoint::from_shared(format!("http://{}", url.authority))?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true);
    if let Some(interval) = options.keepalive_interval {
        endpoint = endpoint
            .http2_keep_alive_interval(interval)
            .keep_alive_timeout(interval)
            .keep_alive_while_idle(true);
    }
    Ok(endpoint)
}

fn connector(
    url: &ControlPlaneUrl,
    config: Arc<ClientConfig>,
    local_addr: Option<std::net::IpAddr>,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    Error = std::io::Error,
    Future = impl Future<
        Output = std::io::Result<TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>,
    > + Send,
> + Send
+ 'static {
    let authority = url.authority.clone();
    let server_name = url.server_name();
    let connector = tokio_rustls::TlsConnector::from(config);
    tower::service_fn(move |_uri: Uri| {
        let authority = authority.clone();
        let connector = connector.clone();
        let server_name = server_name
            .as_ref()
            .map(Clone::clone)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()));
        async move {
            let server_name = server_name?;
            let tcp = match local_addr {
                None => tokio::net::TcpStream::connect(&authority).await?,
                Some(ip) => {
                    let remote = tokio::net::lookup_host(&authority)
                        .await?
                        .next()
                        .ok_or_else(|| {
                            std::io::Error::new(std::io::ErrorKind::NotFound, "no address")
                        })?;
                    let socket = if remote.is_ipv4() {
                        tokio::net::TcpSocket::new_v4()?
                    } else {
                        tokio::net::TcpSocket::new_v6()?
                    };
                    socket.bind(std::net::SocketAddr::new(ip, 0))?;
                    socket.connect(remote).await?
                }
            };
            tcp.set_nodelay(true)?;
            let tls = connector.connect(server_name, tcp).await?;
            Ok(TokioIo::new(tls))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = ControlPlaneUrl::parse("https://127.0.0.1:7000").expect("ip");
        assert_eq!(
            (u.authority.as_str(), u.host.as_str(), u.port),
            ("127.0.0.1:7000", "127.0.0.1", 7000)
        );
        let u = ControlPlaneUrl::parse("cp.example:9000").expect("no scheme");
        assert_eq!(u.to_string(), "https://cp.example:9000");
        let u = ControlPlaneUrl::parse("https://[::1]").expect("v6");
        assert_eq!(
            (u.authority.as_str(), u.host.as_str()),
            ("[::1]:7443", "::1")
        );
        for bad in [
            "http://127.0.0.1:1",
            "https://",
            "https://h:1/path",
            "ftp://x",
        ] {
            assert!(
                ControlPlaneUrl::parse(bad).is_err(),
                "{bad} should be refused"
            );
        }
    }

    #[test]
    fn endpoint_lists_rotate_over_every_replica() {
        let list = Endpoints::parse(&["https://a:1,b:2", " https://a:1 ", "c:3,"]).expect("list");
        let all: Vec<String> = list.all().iter().map(ToString::to_string).collect();
        assert_eq!(all, ["https://a:1", "https://b:2", "https://c:3"]);
        let picks: Vec<String> = (0..6).map(|_| list.pick().to_string()).collect();
        // Three in a row cover all three, whatever the random start.
        let mut first: Vec<&String> = picks[..3].iter().collect();
        first.sort();
        assert_eq!(first, vec!["https://a:1", "https://b:2", "https://c:3"]);
        assert_eq!(picks[..3], picks[3..]);
        assert_eq!(list.in_turn().len(), 3);
        assert_eq!(list.to_string(), "https://a:1,https://b:2,https://c:3");
        assert!(Endpoints::parse(&[",", ""]).is_err());
        assert!(Endpoints::parse(&["http://a:1"]).is_err());
    }
}
