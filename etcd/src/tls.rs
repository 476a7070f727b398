//! Client TLS settings for `https://` endpoints: the CA that signs the
//! members' certificates and, for etcd's `--client-cert-auth`, the client's
//! own certificate and key. Every PEM is checked when the settings are made,
//! so a wrong file fails at startup and is named, instead of surfacing as an
//! unreachable cluster at the first call.
//!
//! The CA is required: the system's trusted roots are not used, because an
//! etcd cluster's certificates come from a private CA, and trusting every
//! public CA would let anyone with a public certificate for the member's
//! name stand in for it.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::error::Error;

/// Checked client TLS settings, PEM text kept as given. Build with
/// [`EtcdTls::from_pem`] or [`EtcdTls::from_files`].
#[derive(Clone)]
pub struct EtcdTls {
    ca_pem: String,
    identity: Option<ClientIdentity>,
}

/// The client's certificate (chain) and private key, for mutual TLS.
#[derive(Clone)]
struct ClientIdentity {
    cert_pem: String,
    key_pem: String,
}

// By hand, so the private key never reaches a log.
impl std::fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdTls")
            .field("client_certificate", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

/// Which of the three PEM inputs a problem is in; its name in error
/// messages, and the `[store]` setting it comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Ca,
    Cert,
    Key,
}

impl Part {
    fn setting(self) -> &'static str {
        match self {
            Part::Ca => "ca_file",
            Part::Cert => "cert_file",
            Part::Key => "key_file",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Part::Ca => "CA certificate",
            Part::Cert => "client certificate",
            Part::Key => "client key",
        }
    }
}

/// A problem found while checking the settings: which part, and why.
struct Problem {
    part: Part,
    reason: String,
}

impl EtcdTls {
    /// Settings from PEM text: `ca_pem` holds one or more CA certificates
    /// the members' certificates must chain to; `client` is the client
    /// certificate (chain) and its private key, for members that require
    /// client certificates.
    pub fn from_pem(ca_pem: &str, client: Option<(&str, &str)>) -> Result<Self, Error> {
        Self::check(ca_pem, client).map_err(|problem| Error::InvalidTls {
            what: problem.part.what().to_string(),
            reason: problem.reason,
        })
    }

    /// Settings from the `[store]` section's files: `ca_file` is required;
    /// `cert_file` and `key_file` come together or not at all. Errors name
    /// the setting and the file.
    pub fn from_files(
        ca_file: &Path,
        cert_file: Option<&Path>,
        key_file: Option<&Path>,
    ) -> Result<Self, Error> {
        let files = match (cert_file, key_file) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(cert), None) => {
                return Err(Error::InvalidTls {
                    what: format!("cert_file {}", cert.display()),
                    reason: "given without key_file: a client certificate needs its private key"
                        .to_string(),
                });
            }
            (None, Some(key)) => {
                return Err(Error::InvalidTls {
                    what: format!("key_file {}", key.display()),
                    reason: "given without cert_file: a private key needs its client certificate"
                        .to_string(),
                });
            }
        };
        // Without client files only the CA is read and checked, so the
        // fallbacks to `ca_file` are never used to name a problem.
        let path_of = |part: Part| match part {
            Part::Ca => ca_file,
            Part::Cert => files.map_or(ca_file, |(cert, _)| cert),
            Part::Key => files.map_or(ca_file, |(_, key)| key),
        };
        let read = |part: Part| {
            let path = path_of(part);
            std::fs::read_to_string(path).map_err(|e| Error::TlsFile {
                setting: part.setting(),
                path: path.to_path_buf(),
                reason: format!("cannot read it: {e}"),
            })
        };
        let ca_pem = read(Part::Ca)?;
        let client = match files {
            Some(_) => Some((read(Part::Cert)?, read(Part::Key)?)),
            None => None,
        };
        let client_refs = client
            .as_ref()
            .map(|(cert, key)| (cert.as_str(), key.as_str()));
        Self::check(&ca_pem, client_refs).map_err(|problem| Error::TlsFile {
            setting: problem.part.setting(),
            path: path_of(problem.part).to_path_buf(),
            reason: problem.reason,
        })
    }

    /// Whether a client certificate is presented.
    pub fn has_client_certificate(&self) -> bool {
        self.identity.is_some()
    }

    fn check(ca_pem: &str, client: Option<(&str, &str)>) -> Result<Self, Problem> {
        let mut roots = RootCertStore::empty();
        for (n, der) in certificates(Part::Ca, ca_pem)?.into_iter().enumerate() {
            roots.add(der).map_err(|e| Problem {
                part: Part::Ca,
                reason: format!("certificate {} is not usable as a CA: {e}", n + 1),
            })?;
        }
        let identity = match client {
            None => None,
            Some((cert_pem, key_pem)) => {
                let chain = certificates(Part::Cert, cert_pem)?;
                let key =
                    PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| Problem {
                        part: Part::Key,
                        reason: format!("no PEM private key in it ({e})"),
                    })?;
                // The same provider tonic falls back to; what matters here
                // is only whether the key loads and matches the certificate.
                let provider = CryptoProvider::get_default()
                    .cloned()
                    .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
                CertifiedKey::from_der(chain, key, &provider).map_err(|e| Problem {
                    part: Part::Key,
                    reason: match e {
                        rustls::Error::InconsistentKeys(_) => {
                            "it is not the key of the client certificate".to_string()
                        }
                        other => format!("the key is not usable: {other}"),
                    },
                })?;
                Some(ClientIdentity {
                    cert_pem: cert_pem.to_string(),
                    key_pem: key_pem.to_string(),
                })
            }
        };
        Ok(Self {
            ca_pem: ca_pem.to_string(),
            identity,
        })
    }

    /// tonic's settings for a connection to `host` (the endpoint's host,
    /// which the member's certificate must name).
    pub(crate) fn tonic_config(&self, host: &str) -> ClientTlsConfig {
        let config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name(host);
        match &self.identity {
            Some(identity) => {
                config.identity(Identity::from_pem(&identity.cert_pem, &identity.key_pem))
            }
            None => config,
        }
    }
}

/// Every certificate in a PEM text; at least one.
fn certificates(part: Part, pem: &str) -> Result<Vec<CertificateDer<'static>>, Problem> {
    let problem = |reason: String| Problem { part, reason };
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| problem(format!("not valid PEM ({e})")))?;
    if certs.is_empty() {
        return Err(problem(
            "no PEM certificate in it (expected -----BEGIN CERTIFICATE-----)".to_string(),
        ));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate and its key, PEM.
    fn self_signed(name: &str) -> (String, String) {
        let certified = rcgen::generate_simple_self_signed(vec![name.to_string()])
            .expect("rcgen makes a certificate");
        (certified.cert.pem(), certified.signing_key.serialize_pem())
    }

    fn check_pem(ca: &str, client: Option<(&str, &str)>, expected: Result<(), &str>) {
        let got = EtcdTls::from_pem(ca, client)
            .map(|_| ())
            .map_err(|e| e.to_string());
        assert_eq!(got, expected.map_err(str::to_string));
    }

    #[test]
    fn pem_is_checked_and_problems_are_named() {
        let (ca, ca_key) = self_signed("ca");
        let (cert, key) = self_signed("client");
        check_pem(&ca, None, Ok(()));
        check_pem(&ca, Some((&cert, &key)), Ok(()));
        // Several CAs in one file (a CA rotation) are all trusted.
        check_pem(&format!("{ca}{cert}"), None, Ok(()));
        check_pem(
            "",
            None,
            Err("etcd client TLS CA certificate: no PEM certificate in it \
                 (expected -----BEGIN CERTIFICATE-----)"),
        );
        check_pem(
            &ca_key,
            None,
            Err("etcd client TLS CA certificate: no PEM certificate in it \
                 (expected -----BEGIN CERTIFICATE-----)"),
        );
        check_pem(
            &ca,
            Some((&key, &key)),
            Err(
                "etcd client TLS client certificate: no PEM certificate in it \
                 (expected -----BEGIN CERTIFICATE-----)",
            ),
        );
        check_pem(
            &ca,
            Some((&cert, &cert)),
            Err("etcd client TLS client key: no PEM private key in it (no items found)"),
        );
        check_pem(
            &ca,
            Some((&cert, &ca_key)),
            Err("etcd client TLS client key: it is not the key of the client certificate"),
        );
    }

    #[test]
    fn broken_pem_is_refused() {
        let (ca, _) = self_signed("ca");
        // Cut inside the base64 body: the END line is missing.
        let truncated = &ca[..ca.len() / 2];
        let error = EtcdTls::from_pem(truncated, None)
            .expect_err("a truncated certificate is refused")
            .to_string();
        assert!(
            error.starts_with("etcd client TLS CA certificate: not valid PEM ("),
            "{error}"
        );
        // Garbage between the markers is not a certificate either.
        let garbage = "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n";
        let error = EtcdTls::from_pem(garbage, None)
            .expect_err("a certificate that does not parse is refused")
            .to_string();
        assert!(
            error.starts_with(
                "etcd client TLS CA certificate: certificate 1 is not usable as a CA: "
            ),
            "{error}"
        );
    }

    #[test]
    fn files_are_read_and_named_in_errors() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (ca, _) = self_signed("ca");
        let (cert, key) = self_signed("client");
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write a test file");
            path
        };
        let ca_file = write("ca.pem", &ca);
        let cert_file = write("client.pem", &cert);
        let key_file = write("client-key.pem", &key);
        let missing = dir.path().join("missing.pem");
        let empty = write("empty.pem", "");
        let shown = |path: &Path| path.display().to_string();

        let tls = EtcdTls::from_files(&ca_file, Some(&cert_file), Some(&key_file))
            .expect("good files load");
        assert!(tls.has_client_certificate());
        let tls = EtcdTls::from_files(&ca_file, None, None).expect("a CA alone loads");
        assert!(!tls.has_client_certificate());

        let check = |ca: &Path, cert: Option<&Path>, key: Option<&Path>, expected: String| {
            let error = EtcdTls::from_files(ca, cert, key)
                .expect_err("bad files are refused")
                .to_string();
            assert_eq!(error, expected);
        };
        let error = EtcdTls::from_files(&missing, None, None)
            .expect_err("a missing CA file is refused")
            .to_string();
        assert!(
            error.starts_with(&format!(
                "etcd client TLS ca_file {}: cannot read it: ",
                shown(&missing)
            )),
            "{error}"
        );
        let error = EtcdTls::from_files(&ca_file, Some(&cert_file), Some(&missing))
            .expect_err("a missing key file is refused")
            .to_string();
        assert!(
            error.starts_with(&format!(
                "etcd client TLS key_file {}: cannot read it: ",
                shown(&missing)
            )),
            "{error}"
        );
        check(
            &ca_file,
            Some(&cert_file),
            None,
            format!(
                "etcd client TLS cert_file {}: given without key_file: \
                 a client certificate needs its private key",
                shown(&cert_file)
            ),
        );
        check(
            &ca_file,
            None,
            Some(&key_file),
            format!(
                "etcd client TLS key_file {}: given without cert_file: \
                 a private key needs its client certificate",
                shown(&key_file)
            ),
        );
        check(
            &empty,
            None,
            None,
            format!(
                "etcd client TLS ca_file {}: no PEM certificate in it \
                 (expected -----BEGIN CERTIFICATE-----)",
                shown(&empty)
            ),
        );
        // Certificate and key swapped: the problem is named by the file
        // that holds the wrong thing.
        check(
            &ca_file,
            Some(&key_file),
            Some(&cert_file),
            format!(
                "etcd client TLS cert_file {}: no PEM certificate in it \
                 (expected -----BEGIN CERTIFICATE-----)",
                shown(&key_file)
            ),
        );
    }

    #[test]
    fn debug_shows_no_key() {
        let (ca, _) = self_signed("ca");
        let (cert, key) = self_signed("client");
        let tls = EtcdTls::from_pem(&ca, Some((&cert, &key))).expect("valid settings");
        let shown = format!("{tls:?}");
        assert!(!shown.contains("PRIVATE KEY"), "{shown}");
        assert_eq!(shown, "EtcdTls { client_certificate: true, .. }");
    }
}
