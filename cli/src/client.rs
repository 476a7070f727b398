//! Connection to the control plane from a profile, and the error type that
//! decides the exit code.

use std::path::PathBuf;

use hotswap_common::profile::Profile;
use hotswap_common::tls::{self, ChannelOptions, ClientIdentity, ControlPlaneUrl, ServerTrust};
use tonic::Code;
use tonic::transport::Channel;

use crate::output::OutputFormat;

#[derive(Debug)]
pub enum CliError {
    /// The control plane answered with an error status.
    Rpc {
        action: String,
        endpoint: String,
        status: tonic::Status,
    },
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
                ) =>
            {
                5
            }
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
                status,
            } => match status.code() {
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
            },
            CliError::Other(e) => write!(f, "{e:#}"),
        }
    }
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
        let endpoint = self
            .endpoint
            .clone()
            .unwrap_or_else(|| profile.endpoint.clone());
        let url = ControlPlaneUrl::parse(&endpoint).map_err(|e| anyhow::anyhow!("{e}"))?;
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
            endpoint: url.to_string(),
        })
    }
}

pub struct Connection {
    pub channel: Channel,
    pub endpoint: String,
}

impl Connection {
    /// Wrap a failed call with what we were doing.
    pub fn rpc_error(&self, action: &str) -> impl FnOnce(tonic::Status) -> CliError + '_ {
        let action = action.to_string();
        move |status| CliError::Rpc {
            action,
            endpoint: self.endpoint.clone(),
            status,
        }
    }
}
