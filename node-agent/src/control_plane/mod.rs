//! The agent's protocol client: the one module of the agent that speaks the
//! control plane's wire protocol (`hotswap_common::pb`). It enrolls a node,
//! opens the agent session (hello, heartbeats, status reports in; welcome,
//! acknowledgements and desired state out), renews certificates, lists the
//! trusted publisher keys and downloads artifacts. Everything it hands to
//! the rest of the agent is a domain type; [`convert`] turns one into the
//! other. The real agent and `simulate` share it, so both enroll and read
//! desired state the same way.

pub mod convert;

use std::time::Duration;

use hotswap_common::artifact::Digest;
use hotswap_common::labels::Labels;
use hotswap_common::pb;
use hotswap_common::pb::agent_message::Msg as AgentMsg;
use hotswap_common::pb::control_message::Msg as ControlMsg;
use hotswap_common::pki;
use hotswap_common::tls::{self, ChannelOptions, ControlPlaneUrl, PinnedCa, ServerTrust};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

use crate::artifacts::{ArtifactDescriptor, ArtifactSource, Chunk, SourceError, TrustedKey};
use crate::report::AgentReport;
use crate::state::Desired;

/// A refused or failed call to the control plane.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    fn of(status: &tonic::Status) -> Self {
        Self {
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    /// The control plane refuses this node's identity: reconnecting with it
    /// cannot help.
    pub fn is_identity_refused(&self) -> bool {
        matches!(self.code, Code::PermissionDenied | Code::Unauthenticated)
    }
}

/// An authenticated (mTLS) connection to the control plane; cheap to clone.
#[derive(Clone, Debug)]
pub struct Connection {
    channel: Channel,
}

impl Connection {
    pub fn new(channel: Channel) -> Self {
        Self { channel }
    }

    /// Open the agent session: the hello goes out first, then the stream.
    pub async fn open_session(&self, hello: &Hello) -> Result<Session, RpcError> {
        let (outbound, rx) = mpsc::channel(16);
        // Fresh channel: cannot be full.
        let _ = outbound.try_send(convert::hello_to_pb(hello));
        let inbound = pb::agent_session_client::AgentSessionClient::new(self.channel.clone())
            .session(ReceiverStream::new(rx))
            .await
            .map_err(|s| RpcError::of(&s))?
            .into_inner();
        Ok(Session { outbound, inbound })
    }

    /// Ask for a new certificate for the key behind `csr_pem`.
    pub async fn renew_certificate(&self, csr_pem: String) -> Result<RenewedCertificate, RpcError> {
        let response = pb::agent_session_client::AgentSessionClient::new(self.channel.clone())
            .renew_certificate(pb::RenewCertificateRequest { csr_pem })
            .await
            .map_err(|s| RpcError::of(&s))?
            .into_inner();
        Ok(RenewedCertificate {
            certificate_pem: response.certificate_pem,
            ca_certificate_pem: response.ca_certificate_pem,
        })
    }

    fn artifacts(&self) -> pb::artifacts_client::ArtifactsClient<Channel> {
        pb::artifacts_client::ArtifactsClient::new(self.channel.clone())
    }
}

/// What the agent says about itself when a session opens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub node_id: String,
    pub name: String,
    pub labels: Labels,
    pub agent_version: String,
}

/// A certificate issued by a renewal, with the CA the control plane uses now.
#[derive(Clone, Debug)]
pub struct RenewedCertificate {
    pub certificate_pem: String,
    pub ca_certificate_pem: String,
}

/// What the control plane says in a session.
#[derive(Clone, Debug, PartialEq)]
pub enum Inbound {
    /// The session is accepted.
    Welcome(Welcome),
    HeartbeatAck,
    /// Desired state for this node, replacing any before it.
    Desired(Desired),
    /// A desired state that breaks the protocol (see
    /// [`convert::desired_from_pb`]): not acted on.
    MalformedDesired {
        generation: u64,
        error: hotswap_common::convert::FieldError,
    },
    /// A message without content (or of a kind this agent does not know).
    Empty,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub heartbeat_interval_ms: u64,
}

impl Welcome {
    /// The heartbeat interval asked for, bounded to 100 ms .. 1 h so a
    /// strange value can neither flood the control plane nor stop heartbeats.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms.clamp(100, 3_600_000))
    }
}

/// The agent's half of the session stream was closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("session stream closed")]
pub struct StreamClosed;

/// An open agent session. Dropping it closes the agent's half of the
/// stream, which tells the control plane the node is gone.
pub struct Session {
    outbound: mpsc::Sender<pb::AgentMessage>,
    inbound: tonic::Streaming<pb::ControlMessage>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Session")
    }
}

/// A status report encoded for the wire, so a report held under a lock can
/// be encoded there and sent after the lock is released.
pub struct EncodedReport(pb::AgentMessage);

impl EncodedReport {
    pub fn new(report: &AgentReport) -> Self {
        Self(convert::report_to_pb(report))
    }
}

impl Session {
    pub async fn send_report(&self, report: EncodedReport) -> Result<(), StreamClosed> {
        self.send(report.0).await
    }

    pub async fn send_heartbeat(&self, seq: u64) -> Result<(), StreamClosed> {
        self.send(pb::AgentMessage {
            msg: Some(AgentMsg::Heartbeat(pb::Heartbeat { seq })),
        })
        .await
    }

    async fn send(&self, message: pb::AgentMessage) -> Result<(), StreamClosed> {
        self.outbound.send(message).await.map_err(|_| StreamClosed)
    }

    /// The next message; `None` when the control plane closed the session.
    /// Cancel-safe.
    pub async fn next(&mut self) -> Result<Option<Inbound>, RpcError> {
        let message = self.inbound.message().await.map_err(|s| RpcError::of(&s))?;
        Ok(message.map(|m| match m.msg {
            Some(ControlMsg::Welcome(w)) => Inbound::Welcome(Welcome {
                heartbeat_interval_ms: w.heartbeat_interval_ms,
            }),
            Some(ControlMsg::HeartbeatAck(_)) => Inbound::HeartbeatAck,
            Some(ControlMsg::Desired(desired)) => {
                let generation = desired.generation;
                match convert::desired_from_pb(desired) {
                    Ok(desired) => Inbound::Desired(desired),
                    Err(error) => Inbound::MalformedDesired { generation, error },
                }
            }
            None => Inbound::Empty,
        }))
    }
}

/// An enrollment to make: who asks, with which token, to which control
/// plane (its CA pinned by fingerprint).
pub struct Enrollment<'a> {
    pub url: &'a ControlPlaneUrl,
    /// The key pair enrolled, the same in every attempt of one enrollment:
    /// an attempt that committed although its answer was lost is then
    /// answered again on retry, not refused as a taken name.
    pub key: &'a EnrollmentKey,
    pub options: &'a ChannelOptions,
    pub join_token: &'a str,
    pub ca_fingerprint: [u8; 32],
    pub name: &'a str,
    pub labels: &'a Labels,
    pub agent_version: String,
}

/// A fresh key pair and a CSR for it, made once per enrollment and sent
/// with every attempt.
#[derive(Clone)]
pub struct EnrollmentKey {
    csr_pem: String,
    key_pem: String,
}

impl EnrollmentKey {
    pub fn generate(name: &str) -> Result<Self, EnrollError> {
        let (csr_pem, key_pem) =
            pki::generate_csr(name).map_err(|e| EnrollError::KeyPair(e.to_string()))?;
        Ok(Self { csr_pem, key_pem })
    }
}

impl std::fmt::Debug for EnrollmentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private key stays out of logs.
        f.debug_struct("EnrollmentKey").finish_non_exhaustive()
    }
}

/// What a successful enrollment yields: the node's id and granted labels,
/// its new key and certificate, and the control plane's CA.
#[derive(Clone, Debug)]
pub struct Enrolled {
    pub node_id: String,
    pub labels: Labels,
    pub certificate_pem: String,
    pub key_pem: String,
    pub ca_certificate_pem: String,
}

/// Why an enrollment attempt failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EnrollError {
    #[error("cannot generate a key pair: {0}")]
    KeyPair(String),
    #[error("{0}")]
    Tls(String),
    #[error(
        "CA fingerprint mismatch: the control plane at {url} is not the one pinned with --ca-fingerprint sha256:{pinned}: {reason}"
    )]
    PinMismatch {
        url: String,
        pinned: String,
        reason: String,
    },
    #[error("cannot reach the control plane at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("enrollment refused by the control plane at {url}: {message}")]
    Refused {
        url: String,
        code: Code,
        message: String,
    },
    #[error("control plane sent an invalid CA certificate: {0}")]
    InvalidCa(String),
    #[error("control plane sent a CA certificate that does not match the pinned fingerprint")]
    CaMismatch,
    #[error("control plane sent an invalid node certificate: {0}")]
    InvalidCertificate(String),
    #[error("control plane sent a certificate for {principal}, not for node {node_id}")]
    WrongPrincipal { principal: String, node_id: String },
}

impl EnrollError {
    /// Trying again later can succeed: the control plane is unreachable,
    /// busy or rate-limiting. Everything else (wrong CA, rejected token,
    /// invalid request, a bad answer) needs a person.
    pub fn is_transient(&self) -> bool {
        match self {
            EnrollError::Unreachable { .. } => true,
            EnrollError::Refused { code, .. } => !matches!(
                code,
                Code::Unauthenticated
                    | Code::PermissionDenied
                    | Code::InvalidArgument
                    | Code::AlreadyExists
                    | Code::FailedPrecondition
            ),
            _ => false,
        }
    }

    /// The control plane's enrollment rate limit refused the attempt.
    pub fn is_rate_limited(&self) -> bool {
        matches!(
            self,
            EnrollError::Refused {
                code: Code::ResourceExhausted,
                ..
            }
        )
    }

    /// How the enroll call ended, for the `rpc` metric (`None`: it was not
    /// made, or the failure came after a successful call).
    pub fn rpc_outcome(&self) -> Option<&'static str> {
        match self {
            EnrollError::PinMismatch { .. } | EnrollError::Unreachable { .. } => {
                Some("unreachable")
            }
            EnrollError::Refused { .. } => Some("error"),
            EnrollError::KeyPair(_) | EnrollError::Tls(_) => None,
            _ => Some("ok"),
        }
    }
}

/// One enrollment attempt: connect with the CA pinned by fingerprint, send
/// the key's CSR with the join token, and check the answer:
/// the CA must be the one pinned and the certificate must name the node id
/// the control plane gave.
pub async fn enroll(request: &Enrollment<'_>) -> Result<Enrolled, EnrollError> {
    let url = request.url;
    let csr_pem = request.key.csr_pem.clone();
    let key_pem = request.key.key_pem.clone();
    let pin = PinnedCa::new(request.ca_fingerprint);
    let config = tls::client_config(ServerTrust::Pinned(pin.clone()), None)
        .map_err(|e| EnrollError::Tls(e.to_string()))?;
    let channel = match tls::connect(url, config, request.options).await {
        Ok(channel) => channel,
        Err(e) => {
            return Err(match pin.mismatch() {
                Some(reason) => EnrollError::PinMismatch {
                    url: url.to_string(),
                    pinned: hex_of(&request.ca_fingerprint),
                    reason: reason.to_string(),
                },
                None => EnrollError::Unreachable {
                    url: url.to_string(),
                    reason: error_chain(&e),
                },
            });
        }
    };
    let response = pb::enrollment_client::EnrollmentClient::new(channel)
        .enroll(pb::EnrollRequest {
            join_token: request.join_token.to_string(),
            csr_pem,
            name: request.name.to_string(),
            labels: request.labels.clone().into_iter().collect(),
            agent_version: request.agent_version.clone(),
        })
        .await
        .map_err(|status| EnrollError::Refused {
            url: url.to_string(),
            code: status.code(),
            message: status.message().to_string(),
        })?
        .into_inner();
    let ca_der = pki::first_cert_der(&response.ca_certificate_pem)
        .map_err(|e| EnrollError::InvalidCa(e.to_string()))?;
    if pki::der_fingerprint(ca_der.as_ref())
        != format!("sha256:{}", hex_of(&request.ca_fingerprint))
    {
        return Err(EnrollError::CaMismatch);
    }
    let cert_der = pki::first_cert_der(&response.certificate_pem)
        .map_err(|e| EnrollError::InvalidCertificate(e.to_string()))?;
    match pki::principal_of(cert_der.as_ref()) {
        Ok(pki::Principal::Node(id)) if id == response.node_id => {}
        other => {
            return Err(EnrollError::WrongPrincipal {
                principal: format!("{other:?}"),
                node_id: response.node_id,
            });
        }
    }
    Ok(Enrolled {
        node_id: response.node_id,
        labels: response.labels.into_iter().collect(),
        certificate_pem: response.certificate_pem,
        key_pem,
        ca_certificate_pem: response.ca_certificate_pem,
    })
}

fn hex_of(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An error and its causes on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
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

/// A failed artifact call, sorted: a refusal means the artifact cannot be
/// had; anything else may clear up.
fn source_error(status: &tonic::Status) -> SourceError {
    match status.code() {
        Code::NotFound | Code::InvalidArgument | Code::PermissionDenied | Code::Unauthenticated => {
            SourceError::Refused {
                message: status.message().to_string(),
            }
        }
        code => SourceError::Unavailable {
            code: code.to_string(),
            message: status.message().to_string(),
        },
    }
}

/// The artifact content stream of a [`Connection`].
pub struct ContentStream {
    inner: tonic::Streaming<pb::ArtifactChunk>,
}

impl crate::artifacts::ContentStream for ContentStream {
    async fn next_chunk(&mut self) -> Result<Option<Chunk>, SourceError> {
        let chunk = self.inner.message().await.map_err(|s| source_error(&s))?;
        Ok(chunk.map(|c| Chunk {
            offset: c.offset,
            data: c.data,
        }))
    }
}

impl ArtifactSource for Connection {
    type Content = ContentStream;

    async fn describe(&self, name: &str, version: &str) -> Result<ArtifactDescriptor, SourceError> {
        let descriptor = self
            .artifacts()
            .describe_artifact(pb::DescribeArtifactRequest {
                name: name.to_string(),
                version: version.to_string(),
            })
            .await
            .map_err(|s| source_error(&s))?
            .into_inner();
        convert::descriptor_from_pb(descriptor, &format!("artifact {name}@{version}"))
    }

    async fn trusted_keys(&self) -> Result<Vec<TrustedKey>, SourceError> {
        let reply = self
            .artifacts()
            .list_keys(pb::ListKeysRequest {})
            .await
            .map_err(|s| source_error(&s))?
            .into_inner();
        Ok(convert::trusted_keys_from_pb(reply.keys))
    }

    async fn content(&self, digest: &Digest, offset: u64) -> Result<ContentStream, SourceError> {
        let inner = self
            .artifacts()
            .fetch_artifact(pb::FetchArtifactRequest {
                digest: digest.to_string(),
                offset,
            })
            .await
            .map_err(|s| source_error(&s))?
            .into_inner();
        Ok(ContentStream { inner })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: Code) -> EnrollError {
        EnrollError::Refused {
            url: "https://cp:7443".into(),
            code,
            message: "why".into(),
        }
    }

    #[test]
    fn enrollment_failures_are_sorted_by_status_code() {
        assert!(refused(Code::ResourceExhausted).is_rate_limited());
        assert!(refused(Code::ResourceExhausted).is_transient());
        for code in [
            Code::Unauthenticated,
            Code::InvalidArgument,
            Code::AlreadyExists,
            Code::PermissionDenied,
            Code::FailedPrecondition,
        ] {
            assert!(!refused(code).is_transient(), "{code:?}");
            assert!(!refused(code).is_rate_limited(), "{code:?}");
        }
        for code in [Code::Unavailable, Code::Internal, Code::DeadlineExceeded] {
            assert!(refused(code).is_transient(), "{code:?}");
            assert!(!refused(code).is_rate_limited(), "{code:?}");
        }
        assert_eq!(
            refused(Code::Unavailable).to_string(),
            "enrollment refused by the control plane at https://cp:7443: why"
        );
        assert!(!EnrollError::CaMismatch.is_transient());
        assert_eq!(EnrollError::CaMismatch.rpc_outcome(), Some("ok"));
        assert_eq!(refused(Code::Internal).rpc_outcome(), Some("error"));
    }

    #[test]
    fn welcome_interval_is_bounded() {
        let interval = |ms| {
            Welcome {
                heartbeat_interval_ms: ms,
            }
            .heartbeat_interval()
        };
        assert_eq!(interval(0), Duration::from_millis(100));
        assert_eq!(interval(5_000), Duration::from_secs(5));
        assert_eq!(interval(u64::MAX), Duration::from_secs(3_600));
    }

    proptest::proptest! {
        #[test]
        fn welcome_interval_is_the_asked_one_within_bounds(ms in proptest::prelude::any::<u64>()) {
            let interval = Welcome { heartbeat_interval_ms: ms }.heartbeat_interval();
            proptest::prop_assert!(interval >= Duration::from_millis(100));
            proptest::prop_assert!(interval <= Duration::from_secs(3_600));
            if (100..=3_600_000).contains(&ms) {
                proptest::prop_assert_eq!(interval, Duration::from_millis(ms));
            }
        }
    }

    #[test]
    fn artifact_status_codes_are_sorted() {
        let refusal = source_error(&tonic::Status::not_found("no such artifact"));
        assert!(!refusal.is_transient());
        assert_eq!(refusal.to_string(), "no such artifact");
        let outage = source_error(&tonic::Status::unavailable("down"));
        assert!(outage.is_transient());
        assert_eq!(outage.message(), "down");
    }
}
