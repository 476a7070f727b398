//! Connection to the control plane from a profile, and the error type that
//! decides the exit code.

use std::path::PathBuf;
use std::time::Duration;

use hotswap_common::profile::Profile;
use hotswap_common::tls::{
    self, ChannelOptions, ClientIdentity, ControlPlaneUrl, Endpoints, ServerTrust,
};
use tonic::Code;
use tonic::transport::Channel;

use crate::output::OutputFormat;

#[derive(Debug)]
pub enum CliError {
    /// The control plane answered with an error status.
    Rpc {
        action: String,
        endpoint: String,
        /// The profile whose certificate the call used.
        profile: PathBuf,
        status: tonic::Status,
    },
    /// The profile's certificate cannot work (expired, not yet valid, from
    /// another CA), found before connecting or from the server's TLS alert:
    /// exit 5 like any refused credential.
    Credentials(String),
    /// Anything else: bad local input, unreadable files.
    Other(anyhow::Error),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Rpc { status, .. }
                if matches!(
                    status.code(),
                    Code::Unauthenticated | Code::PermissionDenied
                ) || tls_refusal(status).is_some() =>
            {
                5
            }
            CliError::Credentials(_) => 5,
            _ => 1,
        }
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CliError::Rpc {
                action,
                endpoint,
                profile,
                status,
            } => {
                if let Some(refusal) = tls_refusal(status) {
                    return match refusal {
                        TlsRefusal::ClientCertificate(alert) => write!(
                            f,
                            "{action}: the control plane at {endpoint} refused the certificate of profile {} (TLS alert {alert}): it may have expired, been issued by another control plane's CA, or outlived a CA rotation; ask an admin for `users create`",
                            profile.display()
                        ),
                        TlsRefusal::ServerNotTrusted => write!(
                            f,
                            "{action}: the control plane at {endpoint} presents a certificate that the CA of profile {} did not issue: the profile belongs to another control plane (or the endpoint is wrong); use that control plane's profile, or ask an admin of this one for `users create`",
                            profile.display()
                        ),
                    };
                }
                match status.code() {
                    Code::Unavailable | Code::Unknown
                        if status.message().contains("transport error")
                            || std::error::Error::source(status).is_some() =>
                    {
                        write!(
                            f,
                            "{action}: cannot reach the control plane at {endpoint}: {}",
                            source_chain(status)
                        )
                    }
                    // The control plane's own reason, e.g. an upload it cut off.
                    Code::DeadlineExceeded if !status.message().is_empty() => {
                        write!(f, "{action}: {}", status.message())
                    }
                    Code::DeadlineExceeded => write!(
                        f,
                        "{action}: the control plane at {endpoint} did not answer in time"
                    ),
                    Code::Unauthenticated => {
                        write!(f, "{action}: not authenticated: {}", status.message())
                    }
                    Code::PermissionDenied => {
                        write!(f, "{action}: permission denied: {}", status.message())
                    }
                    _ => write!(f, "{action}: {}", status.message()),
                }
            }
            CliError::Credentials(message) => f.write_str(message),
            CliError::Other(e) => write!(f, "{e:#}"),
        }
    }
}

/// How a TLS handshake failed on a credential, from a failed call's error
/// chain (rustls' own wording of alerts and of its verifier's verdicts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsRefusal {
    /// The server refused our client certificate with this alert.
    ClientCertificate(&'static str),
    /// Our profile's CA does not vouch for the server's certificate.
    ServerNotTrusted,
}

/// Alerts a TLS server sends about the client's certificate. A foreign CA
/// that shares our CA's name reads as a bad signature: `DecryptError`.
const CLIENT_CERTIFICATE_ALERTS: [&str; 8] = [
    "BadCertificate",
    "UnsupportedCertificate",
    "CertificateRevoked",
    "CertificateExpired",
    "CertificateUnknown",
    "UnknownCA",
    "DecryptError",
    "CertificateRequired",
];

fn tls_refusal(status: &tonic::Status) -> Option<TlsRefusal> {
    if !matches!(status.code(), Code::Unavailable | Code::Unknown) {
        return None;
    }
    let chain = source_chain(status);
    if let Some(rest) = chain.split("received fatal alert: ").nth(1) {
        let alert = rest
            .split(|c: char| !c.is_ascii_alphanumeric())
            .next()
            .unwrap_or_default();
        return CLIENT_CERTIFICATE_ALERTS
            .iter()
            .find(|known| **known == alert)
            .map(|known| TlsRefusal::ClientCertificate(known));
    }
    // rustls: "invalid peer certificate: UnknownIssuer" (or BadSignature,
    // when the other CA has the same name as ours).
    if chain.contains("invalid peer certificate: UnknownIssuer")
        || chain.contains("invalid peer certificate: BadSignature")
    {
        return Some(TlsRefusal::ServerNotTrusted);
    }
    None
}

fn source_chain(status: &tonic::Status) -> String {
    let mut text = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // "transport error" says nothing the endpoint in the message does not.
        if !text.contains(&cause_text) && cause_text != "transport error" {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

impl From<anyhow::Error> for CliError {
    fn from(e: anyhow::Error) -> Self {
        CliError::Other(e)
    }
}

/// A reply the shared views cannot be made from.
impl From<hotswap_common::convert::ConvertError> for CliError {
    fn from(e: hotswap_common::convert::ConvertError) -> Self {
        CliError::Other(anyhow::anyhow!("unexpected reply: {e}"))
    }
}

/// Check the profile's certificate as the control plane will (validity by
/// this machine's clock, issued by the profile's CA) before connecting, so
/// an unusable one is named instead of failing the handshake obscurely.
fn check_profile_certificate(profile: &Profile, path: &std::path::Path) -> Result<(), CliError> {
    use hotswap_common::pki::{self, CertificateProblem};
    let now = hotswap_common::timefmt::now_ms();
    let problem = match pki::check_certificate(&profile.client_cert, &profile.ca_cert, now) {
        Ok(()) => return Ok(()),
        Err(problem) => problem,
    };
    let path = path.display();
    let message = match problem {
        CertificateProblem::Expired { not_after, .. } => format!(
            "your certificate expired at {not_after} (profile {path}): ask an admin for `users create` to get a new profile"
        ),
        CertificateProblem::NotYetValid { not_before, now } => format!(
            "your certificate is not valid before {not_before}, and this machine's clock says {now} (profile {path}): check the clock, or ask an admin for `users create` to get a new profile"
        ),
        CertificateProblem::ForeignIssuer => format!(
            "your certificate was not issued by the CA in your profile (profile {path}): it belongs to another control plane, or the CA was rotated; ask an admin for `users create` to get a new profile"
        ),
        CertificateProblem::Invalid(reason) => {
            return Err(CliError::Other(anyhow::anyhow!(
                "profile {path}: client certificate: {reason}"
            )));
        }
    };
    Err(CliError::Credentials(message))
}

pub struct Context {
    profile: Option<PathBuf>,
    endpoint: Option<String>,
    pub output: OutputFormat,
}

impl Context {
    pub fn new(profile: Option<PathBuf>, endpoint: Option<String>, output: OutputFormat) -> Self {
        Self {
            profile,
            endpoint,
            output,
        }
    }

    /// The profile in use and its path.
    pub fn profile(&self) -> Result<(Profile, PathBuf), CliError> {
        let path = self.profile.clone().unwrap_or_else(Profile::default_path);
        let profile = Profile::load(&path).map_err(|e| {
            anyhow::anyhow!(
                "{e} (pass --profile or set HOTSWAP_PROFILE; `hotswap-control-plane init` writes DATA_DIR/admin.profile.toml)"
            )
        })?;
        Ok((profile, path))
    }

    /// Load the profile and build a channel; connects on first use.
    pub fn connect(&self) -> Result<Connection, CliError> {
        let (profile, path) = self.profile()?;
        check_profile_certificate(&profile, &path)?;
        let endpoint = self
            .endpoint
            .clone()
            .unwrap_or_else(|| profile.endpoint.clone());
        let endpoints =
            Endpoints::parse(&[endpoint.as_str()]).map_err(|e| anyhow::anyhow!("{e}"))?;
        let url = reachable(&endpoints);
        let config = tls::client_config(
            ServerTrust::Ca(profile.ca_cert.clone()),
            Some(ClientIdentity {
                cert_pem: &profile.client_cert,
                key_pem: &profile.client_key,
            }),
        )
        .map_err(|e| anyhow::anyhow!("profile {}: {e}", path.display()))?;
        let options = ChannelOptions {
            keepalive_interval: None,
            ..ChannelOptions::default()
        };
        let channel = tls::connect_lazy(&url, config, &options)
            .map_err(|e| anyhow::anyhow!("cannot set up a connection to {url}: {e}"))?;
        Ok(Connection {
            channel,
            endpoint: endpoints.to_string(),
            profile: path,
        })
    }
}

/// With several replicas, the first (from a random one) that accepts a TCP
/// connection within a second: a replica that went away is skipped. With
/// none reachable, the first, so the call fails with its error.
fn reachable(endpoints: &Endpoints) -> ControlPlaneUrl {
    let in_turn = endpoints.in_turn();
    if in_turn.len() > 1 {
        for url in &in_turn {
            let accepts = std::net::ToSocketAddrs::to_socket_addrs(&url.authority)
                .map(|addrs| {
                    addrs.into_iter().any(|addr| {
                        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
                    })
                })
                .unwrap_or(false);
            if accepts {
                return (*url).clone();
            }
        }
    }
    in_turn[0].clone()
}

pub struct Connection {
    pub channel: Channel,
    /// Every endpoint of the profile (or `--endpoint`), comma-separated.
    pub endpoint: String,
    pub profile: PathBuf,
}

impl Connection {
    /// Wrap a failed call with what we were doing.
    pub fn rpc_error(&self, action: &str) -> impl FnOnce(tonic::Status) -> CliError + '_ {
        let action = action.to_string();
        move |status| CliError::Rpc {
            action,
            endpoint: self.endpoint.clone(),
            profile: self.profile.clone(),
            status,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpc(status: tonic::Status) -> CliError {
        CliError::Rpc {
            action: "list nodes".into(),
            endpoint: "https://cp:7443".into(),
            profile: PathBuf::from("/home/ann/p.toml"),
            status,
        }
    }

    /// A certificate the server refuses although it looked fine here (its
    /// clock differs, the CA was rotated): exit 5 naming the profile.
    #[test]
    fn tls_alerts_about_our_certificate_exit_5_naming_the_profile() {
        for alert in [
            "CertificateExpired",
            "BadCertificate",
            "UnknownCA",
            "DecryptError",
        ] {
            let error = rpc(tonic::Status::unavailable(format!(
                "transport error: connection error: received fatal alert: {alert}"
            )));
            assert_eq!(error.exit_code(), 5, "{alert}");
            let text = error.to_string();
            assert!(
                text.contains("/home/ann/p.toml")
                    && text.contains(alert)
                    && text.contains("users create"),
                "{text}"
            );
        }
        let other = rpc(tonic::Status::unavailable(
            "transport error: invalid peer certificate: BadSignature",
        ));
        assert_eq!(other.exit_code(), 5);
        assert!(
            other.to_string().contains("another control plane"),
            "{other}"
        );
        // Other transport failures stay exit 1.
        let unreachable = rpc(tonic::Status::unavailable(
            "transport error: connection refused",
        ));
        assert_eq!(unreachable.exit_code(), 1);
        let alert = rpc(tonic::Status::unavailable(
            "transport error: received fatal alert: ProtocolVersion",
        ));
        assert_eq!(alert.exit_code(), 1);
    }
}
