//! The records the control plane keeps, as every storage backend stores
//! them: plain structs serialized as JSON, so a dump is readable and new
//! fields are added with `#[serde(default)]` without a migration.

use hotswap_common::labels::Labels;
use serde::{Deserialize, Serialize};

use super::StoreError;

/// Why an enrollment was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum EnrollRejection {
    #[error("join token rejected: unknown token")]
    UnknownToken,
    #[error("join token rejected: expired at {0}")]
    Expired(String),
    #[error("join token rejected: all {0} uses are used up")]
    UsedUp(u32),
    #[error(
        "node name {name:?} is already enrolled as node {id}; remove that node first or choose another --name"
    )]
    NameTaken { name: String, id: String },
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Rejected(#[from] EnrollRejection),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub uses_total: u32,
    pub uses_left: u32,
    /// Labels forced on every node that enrolls with this token.
    pub labels: Labels,
    pub created_by: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: String,
    pub name: String,
    /// Effective labels: what the agent asked for, overridden by `forced_labels`.
    pub labels: Labels,
    /// Labels from the join token; the agent cannot change these.
    pub forced_labels: Labels,
    pub enrolled_at_ms: u64,
    /// Fingerprint of the node's current certificate; any other is refused.
    pub cert_fingerprint: String,
    pub cert_not_after_ms: u64,
    pub last_seen_ms: Option<u64>,
    pub agent_version: String,
    /// The certificate replaced by the last renewal: still accepted until it
    /// expires (or the next renewal), so connections opened with it survive.
    #[serde(default)]
    pub previous_cert_fingerprint: Option<String>,
    #[serde(default)]
    pub previous_cert_not_after_ms: u64,
    /// Hash of the join token the node enrolled with; removing the node
    /// spends what is left of it.
    #[serde(default)]
    pub token_hash: String,
    /// `sha256:<hex>` of the public key the node enrolled with (its CSR's
    /// SubjectPublicKeyInfo); empty in records from before it was kept. An
    /// agent that retries an enrollment which committed although its
    /// answer was lost sends the same key again, and gets the same node.
    #[serde(default)]
    pub enroll_key: String,
}

impl NodeRecord {
    /// Whether an enrollment of `name` with the join token `token_hash` and
    /// the key `enroll_key` is a retry of the one that created this record: the same name, token
    /// and key, and the node never connected (so the agent never got its
    /// certificate). Such a retry is answered with this node, not refused.
    pub fn is_retried_by(&self, token_hash: &str, name: &str, enroll_key: &str) -> bool {
        !self.enroll_key.is_empty()
            && self.enroll_key == enroll_key
            && self.name == name
            && self.token_hash == token_hash
            && self.last_seen_ms.is_none()
    }

    /// Whether `fingerprint` is a certificate this node may use at `now_ms`.
    pub fn accepts_certificate(&self, fingerprint: &str, now_ms: u64) -> bool {
        (fingerprint == self.cert_fingerprint && now_ms < self.cert_not_after_ms)
            || (self.previous_cert_fingerprint.as_deref() == Some(fingerprint)
                && now_ms < self.previous_cert_not_after_ms)
    }

    /// An enrolled node for tests: no labels, a certificate `sha256:<id>`
    /// that never expires, never seen.
    #[cfg(test)]
    pub fn for_tests(id: &str, name: &str) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            labels: Labels::new(),
            forced_labels: Labels::new(),
            enrolled_at_ms: 1,
            cert_fingerprint: format!("sha256:{id}"),
            cert_not_after_ms: u64::MAX,
            last_seen_ms: None,
            agent_version: "test".into(),
            previous_cert_fingerprint: None,
            previous_cert_not_after_ms: 0,
            token_hash: String::new(),
            enroll_key: String::new(),
        }
    }
}

/// An operator. The certificate says who the caller is; the role here says
/// what they may do, so changing it or revoking takes effect on the next call.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserRecord {
    pub name: String,
    pub role: crate::roles::Role,
    pub created_at_ms: u64,
    pub created_by: String,
    /// Only this certificate is accepted for the user.
    pub cert_fingerprint: String,
    pub cert_not_after_ms: u64,
    pub revoked_at_ms: Option<u64>,
}

/// An ad hoc deployment freeze (SPEC §9): no deployment or pipeline starts
/// in `environment` between `from_ms` and `until_ms` (wall clock) unless an
/// admin overrides it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FreezeRecord {
    pub id: String,
    pub environment: String,
    pub from_ms: u64,
    pub until_ms: u64,
    pub reason: String,
    pub created_by: String,
}

/// What one module should be on one node.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DesiredModuleRecord {
    /// Version to run; empty keeps whatever is active.
    pub version: String,
    /// Version to stage without activating; empty for none.
    #[serde(default)]
    pub staged_version: String,
    /// W3C trace context of the deployment's "node command" span that set
    /// this entry, sent to the agent; empty when not traced.
    #[serde(default)]
    pub traceparent: String,
}

impl DesiredModuleRecord {
    /// Whether both ask the node for the same thing (trace context aside):
    /// setting an entry that only differs in it changes nothing.
    pub fn same_target(&self, other: &Self) -> bool {
        self.version == other.version && self.staged_version == other.staged_version
    }
}

/// The desired state of one node. `generation` increases with every change.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DesiredRecord {
    pub generation: u64,
    /// The store-wide revision of the write that made this record (0 in
    /// records written before revisions existed).
    #[serde(default)]
    pub revision: u64,
    pub modules: std::collections::BTreeMap<String, DesiredModuleRecord>,
}

/// A publisher key the control plane trusts (or trusted, once revoked).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyRecord {
    pub name: String,
    pub key_id: String,
    pub public_key_pem: String,
    pub added_at_ms: u64,
    pub added_by: String,
    pub revoked_at_ms: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SignatureRecord {
    pub key_id: String,
    pub signed_at_ms: u64,
    pub expires_at_ms: Option<u64>,
    /// Hex of the 64 signature bytes.
    pub signature: String,
}

/// One stored module version. The content itself is a blob named by `digest`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArtifactRecord {
    pub name: String,
    pub version: String,
    pub digest: String,
    pub size: u64,
    pub runtime: String,
    pub manifest: String,
    pub signatures: Vec<SignatureRecord>,
    pub pushed_at_ms: u64,
    pub pushed_by: String,
    /// Set by `module yank`: the version is known bad and may not be
    /// deployed, caught up to or set on a node (history stays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yanked: Option<YankRecord>,
}

/// Who marked a version undeployable, when and why.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct YankRecord {
    pub at_ms: u64,
    pub by: String,
    pub reason: String,
}
