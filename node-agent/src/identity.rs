//! The node's identity on disk and how it is obtained.
//!
//! Layout under `DATA_DIR/identity/`: `node.key` (0600, generated here and
//! never sent anywhere), `node.crt`, `ca.crt`, and `node.json` (id, name,
//! labels granted at enrollment). `node.json` is written last, so a crash
//! mid-enrollment leaves no half identity: the next start enrolls again.

use std::path::{Path, PathBuf};

use hotswap_common::fsutil::{self, PRIVATE_FILE_MODE, PUBLIC_FILE_MODE};
use hotswap_common::labels::Labels;
use hotswap_common::pki;
use hotswap_common::tls::{self, ChannelOptions, ControlPlaneUrl};
use serde::{Deserialize, Serialize};

use crate::config::EnrollmentConfig;
use crate::control_plane::{self, EnrollError, Enrollment, EnrollmentKey};
use crate::metrics::Metrics;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeInfo {
    pub node_id: String,
    pub name: String,
    /// Labels as granted at enrollment (token labels included).
    pub labels: Labels,
    /// The control plane this node enrolled with.
    pub control_plane: String,
}

#[derive(Clone)]
pub struct Identity {
    pub info: NodeInfo,
    pub cert_pem: String,
    pub key_pem: String,
    pub ca_pem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("identity file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

struct Paths {
    dir: PathBuf,
}

impl Paths {
    fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("identity"),
        }
    }
    fn key(&self) -> PathBuf {
        self.dir.join("node.key")
    }
    fn cert(&self) -> PathBuf {
        self.dir.join("node.crt")
    }
    fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    fn info(&self) -> PathBuf {
        self.dir.join("node.json")
    }
    /// A renewed key and certificate, written as one file before the two
    /// files they replace; see [`Identity::save_renewed`].
    fn renewal(&self) -> PathBuf {
        self.dir.join("renewal.json")
    }
}

/// The journal entry of a renewal.
#[derive(Serialize, Deserialize)]
struct Renewal {
    cert_pem: String,
    key_pem: String,
    ca_pem: String,
}

fn read(path: &Path) -> Result<String, IdentityError> {
    std::fs::read_to_string(path).map_err(|source| IdentityError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl Identity {
    /// The stored identity, or `None` when this node has not enrolled yet.
    pub fn load(data_dir: &Path) -> Result<Option<Self>, IdentityError> {
        let paths = Paths::new(data_dir);
        let info_path = paths.info();
        if !info_path.exists() {
            return Ok(None);
        }
        let info: NodeInfo =
            serde_json::from_str(&read(&info_path)?).map_err(|e| IdentityError::Corrupt {
                path: info_path.clone(),
                reason: e.to_string(),
            })?;
        // A renewal interrupted after its journal was written: finish it.
        let renewal_path = paths.renewal();
        if renewal_path.exists() {
            let renewal: Renewal = serde_json::from_str(&read(&renewal_path)?).map_err(|e| {
                IdentityError::Corrupt {
                    path: renewal_path.clone(),
                    reason: e.to_string(),
                }
            })?;
            let identity = Identity {
                info: info.clone(),
                cert_pem: renewal.cert_pem,
                key_pem: renewal.key_pem,
                ca_pem: renewal.ca_pem,
            };
            identity.save_renewed(data_dir)?;
        }
        let identity = Identity {
            info,
            cert_pem: read(&paths.cert())?,
            key_pem: read(&paths.key())?,
            ca_pem: read(&paths.ca())?,
        };
        // Fail here, with the file named, rather than deep inside TLS later.
        pki::first_cert_der(&identity.cert_pem).map_err(|e| IdentityError::Corrupt {
            path: paths.cert(),
            reason: e.to_string(),
        })?;
        tls::key_from_pem("node key", &identity.key_pem).map_err(|e| IdentityError::Corrupt {
            path: paths.key(),
            reason: e.to_string(),
        })?;
        tls::roots_from_pem(&identity.ca_pem).map_err(|e| IdentityError::Corrupt {
            path: paths.ca(),
            reason: e.to_string(),
        })?;
        Ok(Some(identity))
    }

    /// Persist the identity; `node.json` last, as the commit point.
    pub fn save(&self, data_dir: &Path) -> Result<(), IdentityError> {
        let paths = Paths::new(data_dir);
        let write = |path: PathBuf, bytes: &[u8], mode| {
            fsutil::write_atomic(&path, bytes, mode)
                .map_err(|source| IdentityError::Write { path, source })
        };
        fsutil::create_private_dir(&paths.dir).map_err(|source| IdentityError::Write {
            path: paths.dir.clone(),
            source,
        })?;
        write(paths.key(), self.key_pem.as_bytes(), PRIVATE_FILE_MODE)?;
        write(paths.cert(), self.cert_pem.as_bytes(), PUBLIC_FILE_MODE)?;
        write(paths.ca(), self.ca_pem.as_bytes(), PUBLIC_FILE_MODE)?;
        let info = serde_json::to_vec_pretty(&self.info).unwrap_or_default();
        write(paths.info(), &info, PUBLIC_FILE_MODE)
    }
}

impl Identity {
    /// Replace the key and certificate after a renewal, safely under a crash
    /// at any point: the new pair goes to one journal file first (atomic),
    /// then over the two files, then the journal is removed. A crash in
    /// between leaves the journal, which [`Identity::load`] replays.
    pub fn save_renewed(&self, data_dir: &Path) -> Result<(), IdentityError> {
        let paths = Paths::new(data_dir);
        let journal = serde_json::to_vec(&Renewal {
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            ca_pem: self.ca_pem.clone(),
        })
        .unwrap_or_default();
        let write = |path: PathBuf, bytes: &[u8], mode| {
            fsutil::write_atomic(&path, bytes, mode)
                .map_err(|source| IdentityError::Write { path, source })
        };
        write(paths.renewal(), &journal, PRIVATE_FILE_MODE)?;
        write(paths.key(), self.key_pem.as_bytes(), PRIVATE_FILE_MODE)?;
        write(paths.cert(), self.cert_pem.as_bytes(), PUBLIC_FILE_MODE)?;
        write(paths.ca(), self.ca_pem.as_bytes(), PUBLIC_FILE_MODE)?;
        let renewal = paths.renewal();
        std::fs::remove_file(&renewal).map_err(|source| IdentityError::Write {
            path: renewal,
            source,
        })
    }
}

/// One enrollment attempt (see [`control_plane::enroll`]), recorded in the
/// `rpc` metric; the identity it yields is not saved yet.
pub async fn enroll_once(
    url: &ControlPlaneUrl,
    key: &EnrollmentKey,
    enrollment: &EnrollmentConfig,
    name: &str,
    labels: &Labels,
    metrics: &Metrics,
) -> Result<Identity, EnrollError> {
    let enrolled = control_plane::enroll(&Enrollment {
        url,
        key,
        options: &ChannelOptions::default(),
        join_token: &enrollment.join_token,
        ca_fingerprint: enrollment.ca_fingerprint,
        name,
        labels,
        agent_version: hotswap_common::VERSION.to_string(),
    })
    .await;
    match &enrolled {
        Ok(_) => metrics.rpc("enroll", "ok"),
        Err(e) => {
            if let Some(outcome) = e.rpc_outcome() {
                metrics.rpc("enroll", outcome);
            }
        }
    }
    let enrolled = enrolled?;
    Ok(Identity {
        info: NodeInfo {
            node_id: enrolled.node_id,
            name: name.to_string(),
            labels: enrolled.labels,
            control_plane: url.to_string(),
        },
        cert_pem: enrolled.certificate_pem,
        key_pem: enrolled.key_pem,
        ca_pem: enrolled.ca_certificate_pem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_identity_is_none_and_round_trip_works() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(Identity::load(dir.path()).expect("load").is_none());

        let (ca, ca_pems) = pki::CertificateAuthority::generate("t").expect("ca");
        let (csr, key_pem) = pki::generate_csr("n").expect("csr");
        let cert_pem = ca
            .sign_csr(
                &csr,
                &pki::Principal::Node("id-1".into()),
                std::time::Duration::from_secs(60),
            )
            .expect("sign");
        let identity = Identity {
            info: NodeInfo {
                node_id: "id-1".into(),
                name: "n".into(),
                labels: Labels::new(),
                control_plane: "https://x:1".into(),
            },
            cert_pem,
            key_pem,
            ca_pem: ca_pems.cert_pem,
        };
        identity.save(dir.path()).expect("save");
        let loaded = Identity::load(dir.path()).expect("load").expect("present");
        assert_eq!(loaded.info, identity.info);

        std::fs::write(dir.path().join("identity/node.crt"), "garbage").expect("corrupt");
        let err = Identity::load(dir.path())
            .err()
            .expect("corrupt cert")
            .to_string();
        assert!(err.contains("node.crt") && err.contains("corrupt"), "{err}");
    }

    #[test]
    fn interrupted_renewal_is_completed_on_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ca, ca_pems) = pki::CertificateAuthority::generate("t").expect("ca");
        let issue = || {
            let (csr, key_pem) = pki::generate_csr("n").expect("csr");
            let cert_pem = ca
                .sign_csr(
                    &csr,
                    &pki::Principal::Node("id-1".into()),
                    std::time::Duration::from_secs(60),
                )
                .expect("sign");
            (cert_pem, key_pem)
        };
        let (cert_pem, key_pem) = issue();
        let old = Identity {
            info: NodeInfo {
                node_id: "id-1".into(),
                name: "n".into(),
                labels: Labels::new(),
                control_plane: "https://x:1".into(),
            },
            cert_pem,
            key_pem,
            ca_pem: ca_pems.cert_pem.clone(),
        };
        old.save(dir.path()).expect("save");
        let (cert_pem, key_pem) = issue();
        // As if the agent died right after writing the journal: the old key
        // and certificate are still in place.
        let journal = serde_json::to_vec(&Renewal {
            cert_pem: cert_pem.clone(),
            key_pem: key_pem.clone(),
            ca_pem: ca_pems.cert_pem.clone(),
        })
        .expect("json");
        std::fs::write(dir.path().join("identity/renewal.json"), journal).expect("journal");
        let loaded = Identity::load(dir.path()).expect("load").expect("present");
        assert_eq!((loaded.cert_pem, loaded.key_pem), (cert_pem, key_pem));
        assert!(!dir.path().join("identity/renewal.json").exists());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("identity/node.key"))
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
