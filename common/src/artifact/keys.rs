//! Publisher keys: ed25519 key pairs in standard PEM (PKCS#8 private keys,
//! SPKI public keys, readable by `openssl pkey`), key ids, signing, and the
//! trust sets the control plane and agents verify against.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest as _, Sha256};

use super::ArtifactError;
use super::format::{ArtifactInfo, Signature, statement};
use crate::fsutil::{self, PRIVATE_FILE_MODE, PUBLIC_FILE_MODE};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write key {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not an ed25519 {kind} key in PEM form: {reason}")]
    Parse {
        path: PathBuf,
        kind: &'static str,
        reason: String,
    },
    #[error("{0} already exists; refusing to overwrite a key")]
    Exists(PathBuf),
    #[error("cannot generate a key: {0}")]
    Random(String),
}

/// `ed25519:` and the first 16 bytes of the SHA-256 of the raw public key, in hex.
pub fn key_id(key: &VerifyingKey) -> String {
    let hash = Sha256::digest(key.as_bytes());
    format!("ed25519:{}", hex::encode(&hash[..16]))
}

/// A fresh key pair from the OS random source.
pub fn generate() -> Result<SigningKey, KeyError> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| KeyError::Random(e.to_string()))?;
    Ok(SigningKey::from_bytes(&seed))
}

/// Paths `PATH.key` and `PATH.pub` for `keys generate --out PATH`.
pub fn key_paths(out: &Path) -> (PathBuf, PathBuf) {
    let with = |ext: &str| {
        let mut os = out.as_os_str().to_os_string();
        os.push(ext);
        PathBuf::from(os)
    };
    (with(".key"), with(".pub"))
}

/// Write a new key pair to `PATH.key` (0600) and `PATH.pub`; refuses to overwrite.
pub fn write_key_pair(out: &Path, key: &SigningKey) -> Result<(PathBuf, PathBuf), KeyError> {
    let (key_path, pub_path) = key_paths(out);
    for path in [&key_path, &pub_path] {
        if path.exists() {
            return Err(KeyError::Exists(path.clone()));
        }
    }
    // PKCS#8 v1 (RFC 8410, no embedded public key), the form OpenSSL
    // writes and the only one OpenSSL 3.0 reads; `SigningKey::to_pkcs8_pem`
    // writes v2 (RFC 5958 with the public key), which `openssl pkey`
    // refuses. Reading accepts both.
    let key_bytes = ed25519_dalek::pkcs8::KeypairBytes {
        secret_key: key.to_bytes(),
        public_key: None,
    };
    let private_pem = key_bytes
        .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .map_err(|e| KeyError::Parse {
            path: key_path.clone(),
            kind: "private",
            reason: e.to_string(),
        })?;
    let public_pem = key
        .verifying_key()
        .to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .map_err(|e| KeyError::Parse {
            path: pub_path.clone(),
            kind: "public",
            reason: e.to_string(),
        })?;
    fsutil::write_atomic(&key_path, private_pem.as_bytes(), PRIVATE_FILE_MODE).map_err(
        |source| KeyError::Write {
            path: key_path.clone(),
            source,
        },
    )?;
    fsutil::write_atomic(&pub_path, public_pem.as_bytes(), PUBLIC_FILE_MODE).map_err(|source| {
        KeyError::Write {
            path: pub_path.clone(),
            source,
        }
    })?;
    Ok((key_path, pub_path))
}

pub fn load_signing_key(path: &Path) -> Result<SigningKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| KeyError::Parse {
        path: path.to_path_buf(),
        kind: "private",
        reason: e.to_string(),
    })
}

pub fn load_public_key(path: &Path) -> Result<VerifyingKey, KeyError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_public_key(&text).map_err(|reason| KeyError::Parse {
        path: path.to_path_buf(),
        kind: "public",
        reason,
    })
}

/// Parse a public key from its PEM text.
pub fn parse_public_key(pem: &str) -> Result<VerifyingKey, String> {
    VerifyingKey::from_public_key_pem(pem).map_err(|e| e.to_string())
}

/// PEM text of a public key.
pub fn public_key_pem(key: &VerifyingKey) -> String {
    key.to_public_key_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
        .unwrap_or_default()
}

/// Sign an artifact's statement.
pub fn sign(
    info: &ArtifactInfo,
    key: &SigningKey,
    signed_at_ms: u64,
    expires_at_ms: Option<u64>,
) -> Signature {
    let key_id = key_id(&key.verifying_key());
    let message = statement(
        &info.manifest.name,
        &info.manifest.version.to_string(),
        &info.digest,
        &key_id,
        signed_at_ms,
        expires_at_ms,
    );
    Signature {
        key_id,
        signed_at_ms,
        expires_at_ms,
        bytes: key.sign(&message).to_bytes(),
    }
}

/// A publisher key someone decided to trust, under a name.
#[derive(Clone, Debug)]
pub struct TrustedKey {
    pub name: String,
    pub key: VerifyingKey,
}

/// Keys that may sign artifacts, by key id.
#[derive(Clone, Debug, Default)]
pub struct TrustSet {
    keys: BTreeMap<String, TrustedKey>,
}

/// How far ahead of the verifier's clock a signature's `signed_at` may be:
/// the skew tolerated between a publisher's clock and the control plane's
/// or an agent's, the same hour certificates are backdated by
/// (`pki::BACKDATE`). Beyond it the date is not a time anyone signed at (a
/// wrong clock, or a date chosen to look fresh for decades), and the
/// signature does not count.
pub const MAX_SIGNATURE_CLOCK_SKEW_MS: u64 = 3600 * 1000;

/// A signature that verified against a trusted key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedSignature {
    pub key_name: String,
    pub key_id: String,
    pub signed_at_ms: u64,
    pub expires_at_ms: Option<u64>,
}

impl TrustSet {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, name: &str, key: VerifyingKey) {
        self.keys.insert(
            key_id(&key),
            TrustedKey {
                name: name.to_string(),
                key,
            },
        );
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn name_of(&self, key_id: &str) -> Option<&str> {
        self.keys.get(key_id).map(|k| k.name.as_str())
    }

    /// Check an artifact's signatures. A signature by a trusted key that does
    /// not verify fails the artifact outright (it was altered); signatures by
    /// unknown keys are ignored; at least one trusted, unexpired signature
    /// must verify.
    pub fn verify(
        &self,
        info: &ArtifactInfo,
        now_ms: u64,
    ) -> Result<Vec<VerifiedSignature>, ArtifactError> {
        let module = info.module();
        let mut verified = Vec::new();
        let mut unknown = Vec::new();
        let mut expired = Vec::new();
        let mut future = Vec::new();
        for signature in &info.signatures {
            let Some(trusted) = self.keys.get(&signature.key_id) else {
                unknown.push(signature.key_id.clone());
                continue;
            };
            let message = statement(
                &info.manifest.name,
                &info.manifest.version.to_string(),
                &info.digest,
                &signature.key_id,
                signature.signed_at_ms,
                signature.expires_at_ms,
            );
            let sig = ed25519_dalek::Signature::from_bytes(&signature.bytes);
            if trusted.key.verify_strict(&message, &sig).is_err() {
                return Err(ArtifactError::BadSignature {
                    module,
                    key: format!("{:?} ({})", trusted.name, signature.key_id),
                });
            }
            if signature.signed_at_ms > now_ms.saturating_add(MAX_SIGNATURE_CLOCK_SKEW_MS) {
                future.push(format!(
                    "{} is dated {}",
                    trusted.name,
                    crate::timefmt::rfc3339_from_ms(signature.signed_at_ms)
                ));
                continue;
            }
            if signature
                .expires_at_ms
                .is_some_and(|expiry| expiry <= now_ms)
            {
                expired.push(trusted.name.clone());
                continue;
            }
            verified.push(VerifiedSignature {
                key_name: trusted.name.clone(),
                key_id: signature.key_id.clone(),
                signed_at_ms: signature.signed_at_ms,
                expires_at_ms: signature.expires_at_ms,
            });
        }
        if verified.is_empty() {
            let mut detail = Vec::new();
            if info.signatures.is_empty() {
                detail.push("it is not signed".to_string());
            }
            if !unknown.is_empty() {
                detail.push(format!(
                    "signed only by untrusted key(s) {}",
                    unknown.join(", ")
                ));
            }
            if !expired.is_empty() {
                detail.push(format!("signature(s) by {} expired", expired.join(", ")));
            }
            if !future.is_empty() {
                detail.push(format!(
                    "the signature by {}, more than 1 h ahead of this clock ({}): check the signer's clock and sign again",
                    future.join(", the signature by "),
                    crate::timefmt::rfc3339_from_ms(now_ms)
                ));
            }
            if self.keys.is_empty() {
                detail.push("no publisher keys are trusted".to_string());
            }
            return Err(ArtifactError::Untrusted {
                module,
                detail: detail.join("; "),
            });
        }
        Ok(verified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `openssl` lines of docs/artifact-format.md's key section, run
    /// against a key pair `keys generate` wrote (OpenSSL 3.0 refused the
    /// PKCS#8 v2 form hotswap used to write).
    #[test]
    fn documented_openssl_commands_read_generated_keys() {
        let has_openssl = std::process::Command::new("openssl")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_openssl {
            eprintln!("SKIPPED: openssl is not installed");
            return;
        }
        let doc = include_str!("../../../docs/artifact-format.md");
        let section = doc
            .split("## Keys")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("a Keys section");
        let commands: Vec<&str> = section
            .lines()
            .filter(|l| l.starts_with("openssl "))
            .map(|l| l.split(" #").next().unwrap_or(l).trim())
            .collect();
        assert!(commands.len() >= 3, "{commands:?}");
        let dir = tempfile::tempdir().expect("tempdir");
        let base = dir.path().join("publisher");
        let key = generate().expect("key");
        let (_, pub_path) = write_key_pair(&base, &key).expect("write");
        let public_pem = std::fs::read_to_string(&pub_path).expect("pub");
        for command in commands {
            let line = command.replace("PATH", base.to_str().expect("utf8"));
            let out = std::process::Command::new("sh")
                .args(["-c", &line])
                .output()
                .expect("sh");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "{line}: {stderr}");
            if line.ends_with("-pubout") {
                assert_eq!(String::from_utf8_lossy(&out.stdout), public_pem, "{line}");
            }
        }
    }

    /// Keys of both PKCS#8 forms load: v2 written before, v1 now (and by
    /// OpenSSL).
    #[test]
    fn both_pkcs8_forms_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = generate().expect("key");
        let v2 = key
            .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
            .expect("v2");
        let v2_path = dir.path().join("v2.key");
        std::fs::write(&v2_path, v2.as_bytes()).expect("write");
        assert_eq!(
            load_signing_key(&v2_path).expect("v2").to_bytes(),
            key.to_bytes()
        );
        let (v1_path, _) = write_key_pair(&dir.path().join("v1"), &key).expect("write");
        let v1 = std::fs::read_to_string(&v1_path).expect("read");
        assert!(v1.len() < v2.len(), "no public key inside: {v1}");
        assert_eq!(
            load_signing_key(&v1_path).expect("v1").to_bytes(),
            key.to_bytes()
        );
    }
}
