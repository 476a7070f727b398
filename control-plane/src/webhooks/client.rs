//! Sending one delivery: an HTTP/1.1 POST through reqwest on rustls (ring,
//! the process's one provider), verified against the system roots or the
//! webhook's own CA. One client per webhook, so one receiver's connections
//! and CA never touch another's.
//!
//! The SSRF rule is enforced where the connection is made as well as at
//! create time: the client's resolver drops addresses that reach our own
//! listeners, redirects are not followed, and no proxy is used, so the
//! address checked is the address connected to.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

use super::{Format, OwnPorts, WebhookError, body, signature};
use crate::events::Event;
use crate::store::WebhookRecord;

/// A connection that takes longer than this is a failed attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A receiver that has not answered within this long (accepting and never
/// answering) is a failed attempt: its delivery task retries later, and no
/// other webhook waits for it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How much of a failing receiver's answer goes into `last_error`.
const ERROR_BODY_BYTES: usize = 200;

/// The certificates of a PEM bundle as a root store.
pub fn roots_from_pem(pem: &str) -> Result<rustls::RootCertStore, WebhookError> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
        let cert = cert.map_err(|e| WebhookError::Ca(format!("not PEM certificates: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| WebhookError::Ca(format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(WebhookError::Ca("holds no PEM certificate".into()));
    }
    Ok(roots)
}

/// The system's trusted roots, read once (rustls-native-certs: the
/// distribution's bundle, or `SSL_CERT_FILE`).
fn system_roots() -> Arc<rustls::RootCertStore> {
    static ROOTS: OnceLock<Arc<rustls::RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let found = rustls_native_certs::load_native_certs();
            for error in &found.errors {
                tracing::warn!(error = %error, "cannot read some system CA certificates");
            }
            let mut roots = rustls::RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            if ignored > 0 {
                tracing::debug!(added, ignored, "system CA certificates");
            }
            Arc::new(roots)
        })
        .clone()
}

fn tls_config(ca_pem: &str) -> Result<rustls::ClientConfig, WebhookError> {
    let roots = if ca_pem.is_empty() {
        system_roots()
    } else {
        Arc::new(roots_from_pem(ca_pem)?)
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| WebhookError::Ca(format!("cannot build a TLS client: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Resolves a receiver's host and drops every address that reaches this
/// control plane's own listeners on the receiver's port.
struct GuardedResolver {
    port: u16,
    own: OwnPorts,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let (port, own) = (self.port, self.own);
        let host = name.as_str().to_string();
        Box::pin(async move {
            let resolved: Vec<std::net::SocketAddr> =
                tokio::net::lookup_host((host.as_str(), port))
                    .await?
                    .collect();
            let allowed: Vec<std::net::SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|addr| own.reached_by(*addr).is_none())
                .collect();
            if allowed.is_empty() && !resolved.is_empty() {
                return Err(format!(
                    "{host} resolves only to this control plane's own listeners; not connecting"
                )
                .into());
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// Why one attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliveryError {
    #[error("receiver answered HTTP {status}{body}")]
    Status { status: u16, body: String },
    #[error("{0}")]
    Transport(String),
}

impl DeliveryError {
    pub fn status(&self) -> Option<u16> {
        match self {
            DeliveryError::Status { status, .. } => Some(*status),
            DeliveryError::Transport(_) => None,
        }
    }
}

/// One webhook's receiver, ready to send to.
pub struct Receiver {
    client: reqwest::Client,
    url: reqwest::Url,
    secret: String,
    format: Format,
}

impl Receiver {
    pub fn new(record: &WebhookRecord, own: OwnPorts) -> Result<Self, WebhookError> {
        let url = super::parse_url(&record.url)?;
        let format = Format::parse(&record.format)?;
        let port = url.port_or_known_default().unwrap_or(80);
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls_config(&record.ca_pem)?)
            .dns_resolver(GuardedResolver { port, own })
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .retry(reqwest::retry::never())
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("hotswap/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| WebhookError::Url {
                url: record.url.clone(),
                reason: format!("cannot build an HTTP client for it: {e}"),
            })?;
        Ok(Self {
            client,
            url,
            secret: record.secret.clone(),
            format,
        })
    }

    /// POST `event`; the receiver's status when it answered 2xx.
    pub async fn deliver(&self, event: &Event) -> Result<u16, DeliveryError> {
        let body = body(event, self.format);
        let mut request = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("X-Hotswap-Event", event.kind.as_str())
            .header("X-Hotswap-Delivery", event.seq.to_string());
        if !self.secret.is_empty() {
            request = request.header("X-Hotswap-Signature", signature(&self.secret, &body));
        }
        let response = request
            .body(body)
            .send()
            .await
            .map_err(|e| DeliveryError::Transport(describe(&e)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(status.as_u16());
        }
        let text = response.text().await.unwrap_or_default();
        let text: String = text.chars().take(ERROR_BODY_BYTES).collect();
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        Err(DeliveryError::Status {
            status: status.as_u16(),
            body: if text.is_empty() {
                String::new()
            } else {
                format!(": {text}")
            },
        })
    }
}

/// reqwest's error with its causes, which say what actually went wrong
/// (refused, timed out, certificate not trusted).
fn describe(error: &reqwest::Error) -> String {
    let what = if error.is_timeout() {
        "timed out"
    } else if error.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    let mut text = what.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
