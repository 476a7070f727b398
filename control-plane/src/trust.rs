//! Which stored artifact versions may be deployed. An artifact was verified
//! when it was pushed, but trust changes afterwards: keys get revoked and
//! signatures expire. Every deployment, pipeline stage and raw desired-state
//! change re-checks the stored signatures against the keys trusted now, and
//! environments may ask for signatures from several distinct keys.

use std::collections::BTreeMap;

use hotswap_common::timefmt::rfc3339_from_ms;

use crate::store::{ArtifactRecord, ArtifactRecords, KeyRecord, StoreError};

/// The key ids whose signatures on `artifact` count at `now_ms`, and why the
/// others do not.
pub fn valid_signers(
    artifact: &ArtifactRecord,
    keys: &[KeyRecord],
    now_ms: u64,
) -> (Vec<String>, Vec<String>) {
    let by_id: BTreeMap<&str, &KeyRecord> = keys.iter().map(|k| (k.key_id.as_str(), k)).collect();
    let mut valid: Vec<String> = Vec::new();
    let mut rejected = Vec::new();
    for signature in &artifact.signatures {
        let Some(key) = by_id.get(signature.key_id.as_str()) else {
            rejected.push(format!("{} is not a known key", signature.key_id));
            continue;
        };
        if let Some(at) = key.revoked_at_ms {
            rejected.push(format!(
                "key {:?} was revoked at {}",
                key.name,
                rfc3339_from_ms(at)
            ));
            continue;
        }
        if let Some(expiry) = signature.expires_at_ms
            && expiry <= now_ms
        {
            rejected.push(format!(
                "the signature by {:?} expired at {}",
                key.name,
                rfc3339_from_ms(expiry)
            ));
            continue;
        }
        if !valid.contains(&signature.key_id) {
            valid.push(signature.key_id.clone());
        }
    }
    (valid, rejected)
}

/// Why a yanked version may not be deployed, naming who yanked it and why.
pub fn yank_refusal(artifact: &ArtifactRecord) -> Option<String> {
    artifact.yanked.as_ref().map(|yank| {
        format!(
            "{}@{} cannot be deployed: it was yanked by {} at {}: {}; deploy another version",
            artifact.name,
            artifact.version,
            yank.by,
            rfc3339_from_ms(yank.at_ms),
            yank.reason
        )
    })
}

/// Refuse to deploy `artifact` when it was yanked (`module yank`), or
/// unless at least `required` distinct trusted keys hold an unexpired
/// signature on it. Every way onto a node goes through here: deployments,
/// pipelines, catch-up and `nodes set-module`.
pub fn ensure_deployable(
    store: &dyn ArtifactRecords,
    artifact: &ArtifactRecord,
    required: u32,
    now_ms: u64,
) -> Result<(), TrustError> {
    if let Some(why) = yank_refusal(artifact) {
        return Err(TrustError::Yanked(why));
    }
    let keys = store.list_keys()?;
    let (valid, rejected) = valid_signers(artifact, &keys, now_ms);
    let required = required.max(1) as usize;
    if valid.len() >= required {
        return Ok(());
    }
    Err(TrustError::Unsigned {
        module: artifact.name.clone(),
        version: artifact.version.clone(),
        required,
        valid: valid.len(),
        rejected,
    })
}

/// Why an artifact may not be deployed.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// `module yank` marked the version bad (the message says who, when, why).
    #[error("{0}")]
    Yanked(String),
    /// Too few distinct trusted keys hold an unexpired signature on it.
    #[error("{}", unsigned_message(.module, .version, *.required, *.valid, .rejected))]
    Unsigned {
        module: String,
        version: String,
        required: usize,
        valid: usize,
        /// Why each signature that did not count was rejected.
        rejected: Vec<String>,
    },
    #[error(transparent)]
    Storage(#[from] StoreError),
}

fn unsigned_message(
    module: &str,
    version: &str,
    required: usize,
    valid: usize,
    rejected: &[String],
) -> String {
    let mut why = format!(
        "{module}@{version} cannot be deployed: it needs signatures from {required} distinct trusted key(s) and has {valid}"
    );
    if !rejected.is_empty() {
        why.push_str(&format!(" ({})", rejected.join("; ")));
    }
    if required > 1 {
        why.push_str("; add signatures with `hotswapctl module sign` and push again");
    }
    why
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SignatureRecord;

    fn key(name: &str, revoked: Option<u64>) -> KeyRecord {
        KeyRecord {
            name: name.into(),
            key_id: format!("ed25519:{name}"),
            public_key_pem: String::new(),
            added_at_ms: 0,
            added_by: "admin".into(),
            revoked_at_ms: revoked,
        }
    }

    /// (key name, signature expiry) per signature.
    type Sigs<'a> = &'a [(&'a str, Option<u64>)];

    fn artifact(sigs: Sigs<'_>) -> ArtifactRecord {
        ArtifactRecord {
            name: "m".into(),
            version: "1.0.0".into(),
            digest: String::new(),
            size: 0,
            runtime: "bundle".into(),
            manifest: String::new(),
            signatures: sigs
                .iter()
                .map(|(k, expires)| SignatureRecord {
                    key_id: format!("ed25519:{k}"),
                    signed_at_ms: 0,
                    expires_at_ms: *expires,
                    signature: String::new(),
                })
                .collect(),
            pushed_at_ms: 0,
            pushed_by: "admin".into(),
            yanked: None,
        }
    }

    #[test]
    fn counts_distinct_unrevoked_unexpired_keys() {
        let keys = [key("a", None), key("b", None), key("c", Some(5))];
        let cases: [(Sigs<'_>, usize); 6] = [
            (&[("a", None)], 1),
            (&[("a", None), ("a", None)], 1),
            (&[("a", None), ("b", None)], 2),
            (&[("a", None), ("c", None)], 1),
            (&[("a", Some(100)), ("b", Some(10))], 1),
            (&[("x", None)], 0),
        ];
        for (sigs, expected) in cases {
            let (valid, _) = valid_signers(&artifact(sigs), &keys, 50);
            assert_eq!(valid.len(), expected, "{sigs:?}");
        }
        let (_, why) = valid_signers(&artifact(&[("c", None), ("b", Some(10))]), &keys, 50);
        assert!(why[0].contains("revoked"), "{why:?}");
        assert!(why[1].contains("expired"), "{why:?}");
    }
}
