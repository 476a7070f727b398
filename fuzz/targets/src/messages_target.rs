//! Target `messages`: protobuf decoding of every message a hotswap process
//! receives, then the code in `hotswap-common` that consumes it. The first
//! input byte picks the message type (modulo [`MESSAGE_KINDS`]), the rest is
//! the encoded message.
//!
//! Requests come first: what the control plane decodes from agents and
//! operators (validated with `labels`, `pki`, `artifact` and semver as its
//! services do). Then the messages agents and the CLI decode from the
//! control plane, through `convert` into the views the CLI prints as JSON.
//! Later additions (users, audit, renewal, events, clusters) follow, since
//! the list only grows.

use std::sync::OnceLock;
use std::time::Duration;

use hotswap_common::artifact::keys::{key_id, parse_public_key};
use hotswap_common::artifact::{Digest, TrustSet, format::read_artifact_from};
use hotswap_common::labels::{Labels, validate_labels};
use hotswap_common::model::{
    DeploymentView, ModuleView, NodeUpdateView, NodeView, PublisherKeyView, TokenView,
};
use hotswap_common::pb;
use hotswap_common::pki::{self, CertificateAuthority, Principal};
use hotswap_common::timefmt::{ms_from_ts, rfc3339_from_ms};
use prost::Message;

/// A message type by its protobuf name, and what consumes it.
pub type MessageKind = (&'static str, fn(&[u8]));

/// Every message type the target decodes, by its protobuf name. The index of
/// an entry is the selector byte that picks it. Append only: the seeds then
/// keep meaning the same message (a fuzzer-found input whose selector byte
/// is past the end maps to another type when the list grows, which is
/// harmless).
pub const MESSAGE_KINDS: &[MessageKind] = &[
    // Received by the control plane.
    ("EnrollRequest", enroll_request),
    ("AgentMessage", agent_message),
    ("PushArtifactChunk", push_artifact_chunk),
    ("CreateDeploymentRequest", create_deployment_request),
    (
        "ControlDeploymentRequest",
        decode_only::<pb::ControlDeploymentRequest>,
    ),
    ("SetNodeModuleRequest", set_node_module_request),
    (
        "UnsetNodeModuleRequest",
        decode_only::<pb::UnsetNodeModuleRequest>,
    ),
    ("CreateTokenRequest", create_token_request),
    ("TrustKeyRequest", trust_key_request),
    ("RevokeKeyRequest", decode_only::<pb::RevokeKeyRequest>),
    ("DescribeArtifactRequest", describe_artifact_request),
    ("FetchArtifactRequest", fetch_artifact_request),
    ("GetModuleRequest", decode_only::<pb::GetModuleRequest>),
    ("ListModulesRequest", decode_only::<pb::ListModulesRequest>),
    ("ListKeysRequest", decode_only::<pb::ListKeysRequest>),
    (
        "ListDeploymentsRequest",
        decode_only::<pb::ListDeploymentsRequest>,
    ),
    (
        "GetDeploymentRequest",
        decode_only::<pb::GetDeploymentRequest>,
    ),
    ("RunPipelineRequest", decode_only::<pb::RunPipelineRequest>),
    ("GetPipelineRequest", decode_only::<pb::GetPipelineRequest>),
    ("ListNodesRequest", decode_only::<pb::ListNodesRequest>),
    ("GetNodeRequest", decode_only::<pb::GetNodeRequest>),
    ("RemoveNodeRequest", decode_only::<pb::RemoveNodeRequest>),
    ("WatchNodesRequest", decode_only::<pb::WatchNodesRequest>),
    // Received by agents.
    ("EnrollResponse", enroll_response),
    ("ControlMessage", control_message),
    ("ArtifactDescriptor", artifact_descriptor),
    ("ArtifactChunk", decode_only::<pb::ArtifactChunk>),
    // Received by the CLI and converted by `hotswap_common::convert`.
    ("Token", token),
    ("Node", node),
    ("NodeUpdate", node_update),
    ("ListNodesResponse", list_nodes_response),
    ("Module", module),
    ("ListModulesResponse", list_modules_response),
    ("ModuleVersion", decode_only::<pb::ModuleVersion>),
    ("PublisherKey", publisher_key),
    ("ListKeysResponse", list_keys_response),
    ("Deployment", deployment),
    ("ListDeploymentsResponse", list_deployments_response),
    ("CreateDeploymentResponse", create_deployment_response),
    ("Pipeline", pipeline),
    // Operator identities, audit and certificate renewal.
    ("RenewCertificateRequest", renew_certificate_request),
    ("CreateUserRequest", create_user_request),
    ("SetUserRoleRequest", decode_only::<pb::SetUserRoleRequest>),
    ("RevokeUserRequest", decode_only::<pb::RevokeUserRequest>),
    ("ListUsersRequest", decode_only::<pb::ListUsersRequest>),
    ("ListAuditRequest", decode_only::<pb::ListAuditRequest>),
    ("VerifyAuditRequest", decode_only::<pb::VerifyAuditRequest>),
    ("RenewCertificateResponse", renew_certificate_response),
    ("CreateUserResponse", create_user_response),
    ("ListUsersResponse", decode_only::<pb::ListUsersResponse>),
    ("ListAuditResponse", decode_only::<pb::ListAuditResponse>),
    (
        "VerifyAuditResponse",
        decode_only::<pb::VerifyAuditResponse>,
    ),
    // The event stream and per-environment views.
    ("WatchEventsRequest", decode_only::<pb::WatchEventsRequest>),
    (
        "ListClustersRequest",
        decode_only::<pb::ListClustersRequest>,
    ),
    ("GetClusterRequest", decode_only::<pb::GetClusterRequest>),
    ("Event", event),
    (
        "ListClustersResponse",
        decode_only::<pb::ListClustersResponse>,
    ),
    ("Cluster", decode_only::<pb::Cluster>),
];

/// Decode `data[1..]` as the message type `data[0]` picks and consume it.
pub fn messages(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let (_, consume) = MESSAGE_KINDS[usize::from(selector) % MESSAGE_KINDS.len()];
    consume(body);
}

/// Decode a message; whatever decodes must encode to bytes that decode to a
/// message of the same size (unknown fields are dropped on the first pass).
fn decode<M: Message + Default>(body: &[u8]) -> Option<M> {
    let message = M::decode(body).ok()?;
    let encoded = message.encode_to_vec();
    assert_eq!(encoded.len(), message.encoded_len(), "encoded_len is exact");
    let again = M::decode(encoded.as_slice()).expect("a re-encoded message decodes");
    assert_eq!(
        again.encoded_len(),
        encoded.len(),
        "a re-encoded message keeps its size"
    );
    Some(message)
}

fn decode_only<M: Message + Default>(body: &[u8]) {
    let _ = decode::<M>(body);
}

fn labels(map: std::collections::HashMap<String, String>) -> Labels {
    map.into_iter().collect()
}

/// The control plane's limit on a CSR (`service/enrollment.rs`).
const MAX_CSR_BYTES: usize = 16 * 1024;

/// One CA for the whole process: generating a key per input would dominate.
fn certificate_authority() -> &'static CertificateAuthority {
    static CA: OnceLock<CertificateAuthority> = OnceLock::new();
    CA.get_or_init(|| {
        CertificateAuthority::generate("hotswap fuzz ca")
            .expect("a CA can be generated")
            .0
    })
}

fn enroll_request(body: &[u8]) {
    let Some(request) = decode::<pb::EnrollRequest>(body) else {
        return;
    };
    let _ = validate_labels(&labels(request.labels));
    sign_csr(&request.csr_pem, Principal::Node("fuzz-node".into()));
}

fn renew_certificate_request(body: &[u8]) {
    if let Some(request) = decode::<pb::RenewCertificateRequest>(body) {
        sign_csr(&request.csr_pem, Principal::Node("fuzz-node".into()));
    }
}

/// The control plane validates user names before signing (in its own
/// crate); a fixed valid name keeps the check on the CSR.
fn create_user_request(body: &[u8]) {
    if let Some(request) = decode::<pb::CreateUserRequest>(body) {
        sign_csr(&request.csr_pem, Principal::User("fuzz-user".into()));
    }
}

/// Sign a CSR from the wire as the control plane does; whatever the CSR
/// says, the certificate must carry the identity the CA chose.
fn sign_csr(csr_pem: &str, principal: Principal) {
    if csr_pem.len() > MAX_CSR_BYTES {
        return;
    }
    let Ok(cert_pem) =
        certificate_authority().sign_csr(csr_pem, &principal, Duration::from_secs(86_400))
    else {
        return;
    };
    let der = pki::first_cert_der(&cert_pem).expect("an issued certificate is PEM");
    assert_eq!(
        pki::principal_of(der.as_ref()).expect("an issued certificate has an identity"),
        principal
    );
    pki::not_after_ms(der.as_ref()).expect("an issued certificate has a validity");
    pki::renewal_due_ms(der.as_ref()).expect("an issued certificate has a renewal time");
}

/// Certificates an agent or the CLI receives and reads before storing them.
fn received_certificates(pems: [&str; 2]) {
    for pem in pems {
        if let Ok(der) = pki::first_cert_der(pem) {
            let _ = pki::principal_of(der.as_ref());
            let _ = pki::server_names(der.as_ref());
            let _ = pki::not_after_ms(der.as_ref());
            let _ = pki::renewal_due_ms(der.as_ref());
            let _ = pki::pem_fingerprint(pem);
        }
    }
}

fn renew_certificate_response(body: &[u8]) {
    if let Some(response) = decode::<pb::RenewCertificateResponse>(body) {
        received_certificates([&response.certificate_pem, &response.ca_certificate_pem]);
    }
}

fn create_user_response(body: &[u8]) {
    if let Some(response) = decode::<pb::CreateUserResponse>(body) {
        received_certificates([&response.certificate_pem, &response.ca_certificate_pem]);
    }
}

fn agent_message(body: &[u8]) {
    let Some(message) = decode::<pb::AgentMessage>(body) else {
        return;
    };
    match message.msg {
        Some(pb::agent_message::Msg::Hello(hello)) => {
            let _ = validate_labels(&labels(hello.labels));
        }
        Some(pb::agent_message::Msg::Status(report)) => {
            for module in &report.modules {
                let _ = hotswap_common::status::ModuleStatus::try_from(module.clone());
            }
        }
        Some(pb::agent_message::Msg::Heartbeat(_)) | None => {}
    }
}

/// One chunk of an upload. The control plane concatenates the chunks into a
/// file and reads it as an artifact; a single chunk is the whole file here.
fn push_artifact_chunk(body: &[u8]) {
    let Some(chunk) = decode::<pb::PushArtifactChunk>(body) else {
        return;
    };
    let data = &chunk.data;
    if let Ok(info) = read_artifact_from(std::io::Cursor::new(data), data.len() as u64) {
        let mut trust = TrustSet::new();
        trust.add("fuzz", crate::fuzz_publisher_key().verifying_key());
        let _ = trust.verify(&info, crate::FUZZ_NOW_MS);
    }
}

fn create_deployment_request(body: &[u8]) {
    let Some(request) = decode::<pb::CreateDeploymentRequest>(body) else {
        return;
    };
    let options = request.options.unwrap_or_default();
    let _ = validate_labels(&labels(options.selector));
    let _ = semver::Version::parse(&request.version);
}

fn set_node_module_request(body: &[u8]) {
    let Some(request) = decode::<pb::SetNodeModuleRequest>(body) else {
        return;
    };
    for version in [&request.version, &request.staged_version] {
        let _ = semver::Version::parse(version);
    }
}

fn create_token_request(body: &[u8]) {
    let Some(request) = decode::<pb::CreateTokenRequest>(body) else {
        return;
    };
    let _ = validate_labels(&labels(request.labels));
}

fn trust_key_request(body: &[u8]) {
    let Some(request) = decode::<pb::TrustKeyRequest>(body) else {
        return;
    };
    if let Ok(key) = parse_public_key(&request.public_key_pem) {
        assert!(key_id(&key).starts_with("ed25519:"));
    }
}

fn describe_artifact_request(body: &[u8]) {
    let Some(request) = decode::<pb::DescribeArtifactRequest>(body) else {
        return;
    };
    let _ = semver::Version::parse(&request.version);
}

fn fetch_artifact_request(body: &[u8]) {
    let Some(request) = decode::<pb::FetchArtifactRequest>(body) else {
        return;
    };
    if let Ok(digest) = Digest::parse(&request.digest) {
        assert_eq!(Digest::parse(&digest.to_string()), Ok(digest));
    }
}

fn enroll_response(body: &[u8]) {
    let Some(response) = decode::<pb::EnrollResponse>(body) else {
        return;
    };
    received_certificates([&response.certificate_pem, &response.ca_certificate_pem]);
    let _ = validate_labels(&labels(response.labels));
}

fn control_message(body: &[u8]) {
    let Some(message) = decode::<pb::ControlMessage>(body) else {
        return;
    };
    match message.msg {
        Some(pb::control_message::Msg::Welcome(welcome)) => {
            let _ = validate_labels(&labels(welcome.labels));
        }
        Some(pb::control_message::Msg::Desired(desired)) => {
            for module in &desired.modules {
                let _ = semver::Version::parse(&module.version);
                let _ = semver::Version::parse(&module.staged_version);
            }
        }
        Some(pb::control_message::Msg::HeartbeatAck(_)) | None => {}
    }
}

fn artifact_descriptor(body: &[u8]) {
    let Some(descriptor) = decode::<pb::ArtifactDescriptor>(body) else {
        return;
    };
    let _ = Digest::parse(&descriptor.digest);
    for signature in &descriptor.signatures {
        let _: Result<[u8; 64], _> = signature.signature.as_slice().try_into();
    }
}

/// The CLI prints every view as JSON with `-o json`.
fn print<T: serde::Serialize>(view: &T) {
    serde_json::to_string(view).expect("a view serializes to JSON");
}

fn token(body: &[u8]) {
    if let Some(Ok(view)) = decode::<pb::Token>(body).map(TokenView::try_from) {
        print(&view);
    }
}

fn node(body: &[u8]) {
    if let Some(Ok(view)) = decode::<pb::Node>(body).map(NodeView::try_from) {
        print(&view);
    }
}

fn node_update(body: &[u8]) {
    if let Some(Ok(view)) = decode::<pb::NodeUpdate>(body).map(NodeUpdateView::try_from) {
        print(&view);
    }
}

fn list_nodes_response(body: &[u8]) {
    if let Some(response) = decode::<pb::ListNodesResponse>(body) {
        let views: Result<Vec<NodeView>, _> =
            response.nodes.into_iter().map(TryInto::try_into).collect();
        if let Ok(views) = views {
            print(&views);
        }
    }
}

fn module(body: &[u8]) {
    if let Some(Ok(view)) = decode::<pb::Module>(body).map(ModuleView::try_from) {
        print(&view);
    }
}

fn list_modules_response(body: &[u8]) {
    if let Some(response) = decode::<pb::ListModulesResponse>(body) {
        let views: Result<Vec<ModuleView>, _> = response
            .modules
            .into_iter()
            .map(TryInto::try_into)
            .collect();
        if let Ok(views) = views {
            print(&views);
        }
    }
}

fn publisher_key(body: &[u8]) {
    if let Some(Ok(view)) = decode::<pb::PublisherKey>(body).map(PublisherKeyView::try_from) {
        print(&view);
    }
}

fn list_keys_response(body: &[u8]) {
    if let Some(response) = decode::<pb::ListKeysResponse>(body) {
        let views: Result<Vec<PublisherKeyView>, _> =
            response.keys.into_iter().map(TryInto::try_into).collect();
        if let Ok(views) = views {
            print(&views);
        }
    }
}

fn deployment(body: &[u8]) {
    if let Some(Ok(view)) = decode::<pb::Deployment>(body).map(DeploymentView::try_from) {
        print(&view);
    }
}

fn list_deployments_response(body: &[u8]) {
    if let Some(response) = decode::<pb::ListDeploymentsResponse>(body) {
        let views: Result<Vec<DeploymentView>, _> = response
            .deployments
            .into_iter()
            .map(TryInto::try_into)
            .collect();
        if let Ok(views) = views {
            print(&views);
        }
    }
}

fn create_deployment_response(body: &[u8]) {
    if let Some(response) = decode::<pb::CreateDeploymentResponse>(body)
        && let Some(Ok(view)) = response.deployment.map(DeploymentView::try_from)
    {
        print(&view);
    }
}

/// `hotswapctl events` prints each event's time.
fn event(body: &[u8]) {
    if let Some(event) = decode::<pb::Event>(body)
        && let Some(time) = &event.time
    {
        let _ = rfc3339_from_ms(ms_from_ts(time));
    }
}

/// Pipelines have no view in `convert`; the CLI formats their timestamps.
fn pipeline(body: &[u8]) {
    if let Some(pipeline) = decode::<pb::Pipeline>(body) {
        for ts in [&pipeline.created_at, &pipeline.finished_at]
            .into_iter()
            .flatten()
        {
            let _ = rfc3339_from_ms(ms_from_ts(ts));
        }
    }
}
