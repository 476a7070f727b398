//! The hotswap PKI. The control plane's CA issues every certificate: its own
//! server certificate, operator (user) certificates and node certificates.
//! Who a peer is comes from one URI subject alternative name the CA sets itself
//! (`hotswap://node/<id>`, `hotswap://user/<name>`, or
//! `hotswap://replica/<name>` for the certificate control-plane replicas
//! forward operator calls to their leader with); nothing in a CSR but its
//! public key is trusted.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("certificate signing request is invalid: {0}")]
    BadCsr(String),
    #[error("certificate is invalid: {0}")]
    BadCertificate(String),
    #[error(
        "certificate carries no hotswap identity (expected a hotswap://node/, hotswap://user/ or hotswap://replica/ URI)"
    )]
    NoIdentity,
    #[error("invalid CA fingerprint {0:?}: expected sha256: followed by 64 hex digits")]
    BadFingerprint(String),
    #[error("the signature was not made by the key of CA {0}")]
    BadSignature(String),
}

/// Who a certificate belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Principal {
    /// An enrolled node, by node id.
    Node(String),
    /// An operator, by user name.
    User(String),
    /// A control-plane replica of the cluster (every replica holds the same
    /// one, issued by `init` next to the server certificate): it forwards
    /// operator calls to the leader on behalf of the user who made them.
    Replica(String),
}

impl Principal {
    /// The identity URI the CA puts in the certificate.
    pub fn uri(&self) -> String {
        match self {
            Principal::Node(id) => format!("hotswap://node/{id}"),
            Principal::User(name) => format!("hotswap://user/{name}"),
            Principal::Replica(name) => format!("hotswap://replica/{name}"),
        }
    }

    /// The principal an identity URI names, if it is one of ours.
    pub fn parse_uri(uri: &str) -> Option<Principal> {
        let rest = uri.strip_prefix("hotswap://")?;
        let (kind, name) = rest.split_once('/')?;
        if name.is_empty() {
            return None;
        }
        match kind {
            "node" => Some(Principal::Node(name.to_string())),
            "user" => Some(Principal::User(name.to_string())),
            "replica" => Some(Principal::Replica(name.to_string())),
            _ => None,
        }
    }
}

impl std::fmt::Display for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Principal::Node(id) => write!(f, "node {id}"),
            Principal::User(name) => write!(f, "user {name}"),
            Principal::Replica(name) => write!(f, "replica {name}"),
        }
    }
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct CertifiedKeyPem {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The control plane's certificate authority.
pub struct CertificateAuthority {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl CertificateAuthority {
    /// Create a new self-signed CA valid for ten years.
    pub fn generate(common_name: &str) -> Result<(Self, CertifiedKeyPem), PkiError> {
        let key = KeyPair::generate()?;
        let cert = ca_params(common_name).self_signed(&key)?;
        let pems = CertifiedKeyPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        };
        let ca = Self::from_pem(&pems.cert_pem, &pems.key_pem)?;
        Ok((ca, pems))
    }

    /// Load a CA from its certificate and key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            cert_pem: cert_pem.to_string(),
            issuer,
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// `sha256:<hex>` of the CA certificate's DER, what agents pin.
    pub fn fingerprint(&self) -> Result<String, PkiError> {
        pem_fingerprint(&self.cert_pem)
    }

    /// `message` signed with the CA's key, in its certificate's algorithm
    /// (ECDSA P-256 with SHA-256, ASN.1 DER, for a CA `init` made): for
    /// statements the control plane makes besides certificates, checked
    /// with [`verify_signed_by`].
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, PkiError> {
        use rcgen::SigningKey;
        Ok(self.issuer.key().sign(message)?)
    }

    /// A certificate for another CA (its name and key, from `other_cert_pem`
    /// and `other_key_pem`) signed by this one. During a CA rotation the
    /// server sends it along, so clients that still trust only this (old)
    /// CA accept chains issued by the new one.
    pub fn cross_sign(
        &self,
        other_common_name: &str,
        other_key_pem: &str,
    ) -> Result<String, PkiError> {
        let key = KeyPair::from_pem(other_key_pem)?;
        Ok(ca_params(other_common_name)
            .signed_by(&key, &self.issuer)?
            .pem())
    }

    /// Issue the server certificate for the given DNS names and IP addresses.
    pub fn issue_server(
        &self,
        sans: &[String],
        validity: Duration,
    ) -> Result<CertifiedKeyPem, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans.to_vec())?;
        params.distinguished_name = common_name_dn("hotswap control plane");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, validity);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKeyPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issue a client certificate for `principal` with a key generated here.
    /// Used by `init` for the first admin, whose key is created on the control
    /// plane host by the operator running `init`.
    pub fn issue_client_with_new_key(
        &self,
        principal: &Principal,
        validity: Duration,
    ) -> Result<CertifiedKeyPem, PkiError> {
        let key = KeyPair::generate()?;
        let params = client_params(principal, validity)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKeyPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issue a client certificate valid from `not_before` to `not_after`
    /// exactly, with a key generated here: for tests of expired and
    /// not-yet-valid credentials. Everything that serves uses the policy of
    /// [`Self::issue_client_with_new_key`] and [`Self::sign_csr`].
    pub fn issue_client_valid_between(
        &self,
        principal: &Principal,
        not_before: std::time::SystemTime,
        not_after: std::time::SystemTime,
    ) -> Result<CertifiedKeyPem, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = client_params(principal, Duration::ZERO)?;
        params.not_before = OffsetDateTime::from(not_before);
        params.not_after = OffsetDateTime::from(not_after);
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(CertifiedKeyPem {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Sign a CSR for `principal`. Only the CSR's public key is used: subject,
    /// names, usages and validity are the CA's policy, not the requester's.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        principal: &Principal,
        validity: Duration,
    ) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| PkiError::BadCsr(e.to_string()))?;
        let params = client_params(principal, validity)?;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(cert.pem())
    }
}

/// A CA certificate's name, usages and ten-year validity.
fn ca_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "hotswap");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(3650);
    params.serial_number = Some(random_serial());
    params
}

fn common_name_dn(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

fn client_params(principal: &Principal, validity: Duration) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::default();
    let cn = match principal {
        Principal::Node(id) => format!("node {id}"),
        Principal::User(name) => format!("user {name}"),
        Principal::Replica(name) => format!("replica {name}"),
    };
    params.distinguished_name = common_name_dn(&cn);
    params.subject_alt_names = vec![SanType::URI(principal.uri().try_into()?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    set_validity(&mut params, validity);
    Ok(params)
}

fn set_validity(params: &mut CertificateParams, validity: Duration) {
    let now = OffsetDateTime::now_utc();
    // Backdate a little so a peer whose clock is slightly behind accepts it.
    params.not_before = now - time::Duration::seconds(BACKDATE.as_secs() as i64);
    params.not_after =
        now + time::Duration::seconds(validity.as_secs().min(i64::MAX as u64) as i64);
    params.serial_number = Some(random_serial());
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and non-zero leading byte, as RFC 5280 asks.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

/// `sha256:<hex>` of the public key a CSR asks a certificate for (its DER
/// SubjectPublicKeyInfo). Parsing checks the CSR's signature, so the
/// requester holds the private key.
pub fn csr_key_fingerprint(csr_pem: &str) -> Result<String, PkiError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem)
        .map_err(|e| PkiError::BadCsr(e.to_string()))?;
    Ok(der_fingerprint(&csr.public_key.subject_public_key_info()))
}

/// A fresh key pair and a CSR for it. Returns `(csr_pem, key_pem)`.
pub fn generate_csr(common_name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = common_name_dn(common_name);
    let csr = params.serialize_request(&key)?;
    let csr_pem = csr.pem()?;
    Ok((csr_pem, key.serialize_pem()))
}

/// `sha256:<hex>` of a DER certificate.
pub fn der_fingerprint(der: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(der)))
}

/// `sha256:<hex>` of the first certificate in a PEM text.
pub fn pem_fingerprint(pem: &str) -> Result<String, PkiError> {
    let der = first_cert_der(pem)?;
    Ok(der_fingerprint(der.as_ref()))
}

/// Parse a `sha256:<hex>` fingerprint into its 32 bytes.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], PkiError> {
    let bad = || PkiError::BadFingerprint(text.to_string());
    let hex_part = text.trim().strip_prefix("sha256:").ok_or_else(bad)?;
    let bytes = hex::decode(hex_part).map_err(|_| bad())?;
    bytes.try_into().map_err(|_| bad())
}

/// The first certificate of a PEM text, as DER.
pub fn first_cert_der(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| PkiError::BadCertificate(format!("no PEM certificate found: {e}")))
}

/// Whether `signature` over `message` was made with the key of the CA
/// certificate `ca_pem` ([`CertificateAuthority::sign`]). The key decides
/// the algorithm: ECDSA P-256 or P-384 (ASN.1 DER signatures) or Ed25519.
pub fn verify_signed_by(ca_pem: &str, message: &[u8], signature: &[u8]) -> Result<(), PkiError> {
    use ring::signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA384_ASN1, ED25519, UnparsedPublicKey,
        VerificationAlgorithm,
    };
    let der = first_cert_der(ca_pem)?;
    let fingerprint = der_fingerprint(&der);
    let (_, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let key = cert.public_key().subject_public_key.data.as_ref();
    let algorithms: [&'static dyn VerificationAlgorithm; 3] =
        [&ECDSA_P256_SHA256_ASN1, &ECDSA_P384_SHA384_ASN1, &ED25519];
    // A key of one algorithm never verifies a signature under another.
    algorithms
        .into_iter()
        .any(|algorithm| {
            UnparsedPublicKey::new(algorithm, key)
                .verify(message, signature)
                .is_ok()
        })
        .then_some(())
        .ok_or(PkiError::BadSignature(fingerprint))
}

/// The identity carried by a certificate issued by the hotswap CA.
pub fn principal_of(der: &[u8]) -> Result<Principal, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?
        .ok_or(PkiError::NoIdentity)?;
    san.value
        .general_names
        .iter()
        .find_map(|name| match name {
            x509_parser::extensions::GeneralName::URI(uri) => Principal::parse_uri(uri),
            _ => None,
        })
        .ok_or(PkiError::NoIdentity)
}

/// The DNS names and IP addresses a server certificate is valid for.
pub fn server_names(der: &[u8]) -> Result<Vec<String>, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let Some(san) = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?
    else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(dns) => Some(dns.to_string()),
            x509_parser::extensions::GeneralName::IPAddress(bytes) => match bytes.len() {
                4 => <[u8; 4]>::try_from(*bytes)
                    .ok()
                    .map(|b| std::net::IpAddr::from(b).to_string()),
                16 => <[u8; 16]>::try_from(*bytes)
                    .ok()
                    .map(|b| std::net::IpAddr::from(b).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect())
}

/// How far before its issue time a certificate's `notBefore` is set: the
/// clock skew tolerated between the control plane and its peers, and the
/// size of a backward step of the control plane's clock (an NTP correction,
/// a VM restored from a snapshot) that leaves certificates issued just
/// before it valid. Nothing is lost by it: the key did not exist earlier.
pub const BACKDATE: Duration = Duration::from_secs(3600);

/// Why a client certificate cannot work, found before connecting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CertificateProblem {
    /// `notBefore` is after now (RFC 3339 of both).
    #[error("certificate is not valid before {not_before} (now is {now} by this machine's clock)")]
    NotYetValid { not_before: String, now: String },
    /// `notAfter` is before now (RFC 3339 of both).
    #[error("certificate expired at {not_after} (now is {now} by this machine's clock)")]
    Expired { not_after: String, now: String },
    /// No certificate of the given CA text signed it.
    #[error("certificate was not issued by the CA it is paired with")]
    ForeignIssuer,
    #[error("certificate is invalid: {0}")]
    Invalid(String),
}

/// Check a client certificate (the first of `cert_pem`) the way the control
/// plane will: inside its validity at `now_ms`, and signed by a certificate
/// of `ca_pem`. Lets a client say "expired" instead of failing the TLS
/// handshake with a bare alert.
pub fn check_certificate(
    cert_pem: &str,
    ca_pem: &str,
    now_ms: u64,
) -> Result<(), CertificateProblem> {
    let invalid = |e: &dyn std::fmt::Display| CertificateProblem::Invalid(e.to_string());
    let der = first_cert_der(cert_pem).map_err(|e| invalid(&e))?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).map_err(|e| invalid(&e))?;
    let now_secs = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
    let rfc3339 =
        |secs: i64| crate::timefmt::rfc3339_from_ms((secs.max(0) as u64).saturating_mul(1000));
    let validity = cert.validity();
    if validity.not_before.timestamp() > now_secs {
        return Err(CertificateProblem::NotYetValid {
            not_before: rfc3339(validity.not_before.timestamp()),
            now: rfc3339(now_secs),
        });
    }
    if validity.not_after.timestamp() < now_secs {
        return Err(CertificateProblem::Expired {
            not_after: rfc3339(validity.not_after.timestamp()),
            now: rfc3339(now_secs),
        });
    }
    // The same chain check the server runs (rustls' webpki), at a time
    // inside the validity just checked, so only the issuer is in question.
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let ca = ca.map_err(|e| invalid(&format!("the CA certificate: {e}")))?;
        roots
            .add(ca)
            .map_err(|e| invalid(&format!("the CA certificate: {e}")))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| invalid(&format!("the CA certificate: {e}")))?;
    let at =
        rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(now_secs.max(0) as u64));
    match verifier.verify_client_cert(&der, &[], at) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature,
        )) => Err(CertificateProblem::ForeignIssuer),
        Err(e) => Err(invalid(&e)),
    }
}

/// When a certificate should be renewed: two thirds into its lifetime,
/// counted from when it was issued (its `notBefore` minus the backdating).
pub fn renewal_due_ms(der: &[u8]) -> Result<u64, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let ms = |t: i64| (t.max(0) as u64).saturating_mul(1000);
    let issued = ms(cert.validity().not_before.timestamp()) + BACKDATE.as_millis() as u64;
    let not_after = ms(cert.validity().not_after.timestamp());
    Ok(issued + not_after.saturating_sub(issued) * 2 / 3)
}

/// The `notAfter` of a certificate, in milliseconds since the epoch.
pub fn not_after_ms(der: &[u8]) -> Result<u64, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
    let secs = cert.validity().not_after.timestamp();
    Ok((secs.max(0) as u64).saturating_mul(1000))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn what_the_ca_signs_verifies_with_its_certificate_only() {
        let (ca, pems) = CertificateAuthority::generate("test CA").expect("ca");
        let (_, other) = CertificateAuthority::generate("other CA").expect("ca");
        let message = b"anchor 17 abc";
        let signature = ca.sign(message).expect("sign");
        assert!(verify_signed_by(&pems.cert_pem, message, &signature).is_ok());
        let fingerprint = ca.fingerprint().expect("fingerprint");
        let foreign = pem_fingerprint(&other.cert_pem).expect("fingerprint");
        let refused = |ca_pem: &str, message: &[u8], signature: &[u8]| match verify_signed_by(
            ca_pem, message, signature,
        ) {
            Err(PkiError::BadSignature(fp)) => fp,
            other => panic!("expected a bad signature, got {other:?}"),
        };
        assert_eq!(
            refused(&pems.cert_pem, b"anchor 18 abc", &signature),
            fingerprint
        );
        assert_eq!(refused(&other.cert_pem, message, &signature), foreign);
        let mut flipped = signature.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(refused(&pems.cert_pem, message, &flipped), fingerprint);
        assert!(matches!(
            verify_signed_by("not a certificate", message, &signature),
            Err(PkiError::BadCertificate(_))
        ));
    }

    #[test]
    fn a_csr_key_fingerprint_names_the_key_not_the_request() {
        let (csr, key_pem) = generate_csr("n").expect("csr");
        let fingerprint = csr_key_fingerprint(&csr).expect("fingerprint");
        assert!(fingerprint.starts_with("sha256:"), "{fingerprint}");
        // A second CSR for the same key (another name) has the same key.
        let key = KeyPair::from_pem(&key_pem).expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn("other");
        let again = params
            .serialize_request(&key)
            .expect("csr")
            .pem()
            .expect("pem");
        assert_eq!(csr_key_fingerprint(&again).expect("again"), fingerprint);
        let (other, _) = generate_csr("n").expect("csr");
        assert_ne!(csr_key_fingerprint(&other).expect("other"), fingerprint);
        assert!(matches!(
            csr_key_fingerprint("not a csr"),
            Err(PkiError::BadCsr(_))
        ));
    }

    #[test]
    fn renewal_is_due_two_thirds_into_the_lifetime() {
        let (ca, _) = CertificateAuthority::generate("test ca").expect("ca");
        let (csr, _key) = generate_csr("n").expect("csr");
        let before = crate::timefmt::now_ms();
        let pem = ca
            .sign_csr(
                &csr,
                &Principal::Node("n1".into()),
                Duration::from_secs(3 * 3600),
            )
            .expect("sign");
        let der = first_cert_der(&pem).expect("der");
        let due = renewal_due_ms(der.as_ref()).expect("due");
        // Second resolution in certificates: allow a couple of seconds.
        let expected = before + 2 * 3600 * 1000;
        assert!(
            due.abs_diff(expected) <= 2000,
            "due {due} expected {expected}"
        );
    }

    #[test]
    fn certificate_check_names_expiry_future_validity_and_foreign_issuer() {
        use std::time::SystemTime;
        let (ca, ca_pems) = CertificateAuthority::generate("test ca").expect("ca");
        let (_, other_pems) = CertificateAuthority::generate("other ca").expect("ca");
        let user = Principal::User("ann".into());
        let now = crate::timefmt::now_ms();
        let good = ca.issue_client_with_new_key(&user, DAY).expect("issue");
        assert_eq!(
            check_certificate(&good.cert_pem, &ca_pems.cert_pem, now),
            Ok(())
        );
        let past = ca
            .issue_client_valid_between(&user, SystemTime::now() - 2 * DAY, SystemTime::now() - DAY)
            .expect("issue");
        let err = check_certificate(&past.cert_pem, &ca_pems.cert_pem, now).expect_err("expired");
        assert!(matches!(err, CertificateProblem::Expired { .. }), "{err}");
        assert!(
            err.to_string().starts_with("certificate expired at 20"),
            "{err}"
        );
        let future = ca
            .issue_client_valid_between(&user, SystemTime::now() + DAY, SystemTime::now() + 2 * DAY)
            .expect("issue");
        let err = check_certificate(&future.cert_pem, &ca_pems.cert_pem, now).expect_err("future");
        assert!(
            matches!(err, CertificateProblem::NotYetValid { .. }),
            "{err}"
        );
        assert_eq!(
            check_certificate(&good.cert_pem, &other_pems.cert_pem, now),
            Err(CertificateProblem::ForeignIssuer)
        );
        // A CA bundle (mid-rotation) accepts a certificate of either CA.
        let bundle = format!("{}{}", other_pems.cert_pem, ca_pems.cert_pem);
        assert_eq!(check_certificate(&good.cert_pem, &bundle, now), Ok(()));
    }

    #[test]
    fn csr_signing_sets_identity_from_policy_not_request() {
        let (ca, _) = CertificateAuthority::generate("test ca").expect("ca");
        let (csr, _key) = generate_csr("hotswap://user/mallory").expect("csr");
        let cert_pem = ca
            .sign_csr(&csr, &Principal::Node("n-1".into()), DAY)
            .expect("sign");
        let der = first_cert_der(&cert_pem).expect("der");
        assert_eq!(
            principal_of(der.as_ref()).expect("principal"),
            Principal::Node("n-1".into())
        );
    }

    #[test]
    fn replica_certificates_carry_their_identity_uri() {
        let (ca, _) = CertificateAuthority::generate("test ca").expect("ca");
        let replica = Principal::Replica("control-plane".into());
        let issued = ca.issue_client_with_new_key(&replica, DAY).expect("issue");
        let der = first_cert_der(&issued.cert_pem).expect("der");
        assert_eq!(principal_of(der.as_ref()).expect("principal"), replica);
        for (uri, expected) in [
            ("hotswap://replica/a", Some(Principal::Replica("a".into()))),
            ("hotswap://user/ann", Some(Principal::User("ann".into()))),
            ("hotswap://node/n-1", Some(Principal::Node("n-1".into()))),
            ("hotswap://replica/", None),
            ("hotswap://admin/ann", None),
            ("https://user/ann", None),
        ] {
            assert_eq!(Principal::parse_uri(uri), expected, "{uri}");
            if let Some(principal) = expected {
                assert_eq!(principal.uri(), uri);
            }
        }
    }

    #[test]
    fn garbage_csr_is_rejected() {
        let (ca, _) = CertificateAuthority::generate("test ca").expect("ca");
        let err = ca
            .sign_csr(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                &Principal::Node("n".into()),
                DAY,
            )
            .expect_err("garbage");
        assert!(
            err.to_string()
                .contains("certificate signing request is invalid")
        );
    }

    #[test]
    fn server_cert_has_no_identity() {
        let (ca, _) = CertificateAuthority::generate("test ca").expect("ca");
        let server = ca
            .issue_server(&["localhost".into(), "127.0.0.1".into()], DAY)
            .expect("server");
        let der = first_cert_der(&server.cert_pem).expect("der");
        assert!(matches!(
            principal_of(der.as_ref()),
            Err(PkiError::NoIdentity)
        ));
    }

    #[test]
    fn fingerprints_parse_and_match() {
        let (ca, pems) = CertificateAuthority::generate("test ca").expect("ca");
        let fp = ca.fingerprint().expect("fp");
        assert_eq!(fp, pem_fingerprint(&pems.cert_pem).expect("fp2"));
        let bytes = parse_fingerprint(&fp).expect("parse");
        assert_eq!(format!("sha256:{}", hex::encode(bytes)), fp);
        for bad in ["", "sha256:", "sha1:00", "sha256:zz", &fp[..fp.len() - 2]] {
            assert!(parse_fingerprint(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn identity_uris() {
        assert_eq!(
            Principal::parse_uri("hotswap://user/admin"),
            Some(Principal::User("admin".into()))
        );
        assert_eq!(Principal::parse_uri("hotswap://node/"), None);
        assert_eq!(Principal::parse_uri("hotswap://other/x"), None);
        assert_eq!(Principal::parse_uri("https://node/x"), None);
    }
}
