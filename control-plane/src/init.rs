//! `hotswap-control-plane init`: a new data directory with the CA, the server
//! certificate, the replicas' client certificate (with which a follower
//! forwards operator calls to the leader) and the first admin's profile. It refuses to touch a
//! directory that already holds anything, so an existing CA (and every
//! certificate it issued) can never be overwritten by mistake.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hotswap_common::fsutil::{self, PRIVATE_FILE_MODE, PUBLIC_FILE_MODE};
use hotswap_common::pki::{self, CertificateAuthority, PkiError, Principal};
use hotswap_common::profile::{Profile, ProfileError};
use hotswap_common::timefmt::now_ms;
use hotswap_common::tls::ControlPlaneUrl;

use crate::auth::Role;
use crate::data_dir::DataDir;
use crate::store::{Store, UserRecord};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(
        "data dir {0} already exists and is not empty; refusing to overwrite an existing control plane"
    )]
    NotEmpty(PathBuf),
    #[error("cannot create {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Profile(#[from] ProfileError),
    #[error("invalid --endpoint: {0}")]
    Endpoint(String),
    #[error("invalid --san {0:?}: must be a DNS name or an IP address")]
    BadSan(String),
    #[error("cannot create the database: {0}")]
    Store(String),
    #[error("{0}")]
    Etcd(String),
}

pub struct InitOptions {
    pub data_dir: PathBuf,
    /// Extra names for the server certificate, beyond localhost and loopback.
    pub sans: Vec<String>,
    /// Endpoint written into the admin profile.
    pub endpoint: String,
    /// The etcd cluster to keep the records in; `None` for the embedded
    /// database in the data directory.
    pub store: Option<crate::config::StoreSettings>,
}

#[derive(Debug)]
pub struct InitOutcome {
    pub ca_fingerprint: String,
    pub admin_profile: PathBuf,
}

/// Server certificates are re-issued on rotation; ten years is the CA's life.
const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(3650 * 86_400);
/// The first admin's certificate lives one year.
const ADMIN_CERT_VALIDITY: Duration = Duration::from_secs(365 * 86_400);

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> InitError + '_ {
    move |source| InitError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// `init` against an etcd cluster: a runtime of its own (init is
/// synchronous), the client, and the key layout.
struct EtcdInit {
    runtime: tokio::runtime::Runtime,
    client: hotswap_etcd::Client,
    keys: crate::store::keys::Keys,
}

impl EtcdInit {
    fn connect(settings: &crate::config::StoreSettings) -> Result<Self, InitError> {
        let etcd = |e: String| InitError::Etcd(e);
        let keys = settings.keys().map_err(etcd)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| etcd(format!("cannot start a runtime: {e}")))?;
        let client = runtime
            .block_on(crate::replica::etcd_client(settings))
            .map_err(|e| etcd(e.to_string()))?;
        let cluster = runtime
            .block_on(client.get(keys.cluster()))
            .map_err(|e| etcd(e.to_string()))?;
        if cluster.is_some() {
            return Err(etcd(format!(
                "a hotswap cluster already lives under etcd prefix {}; choose another --etcd-prefix, or run replicas against it with a copy of its data directory",
                keys.prefix()
            )));
        }
        Ok(Self {
            runtime,
            client,
            keys,
        })
    }

    /// Claim the prefix and store the first admin.
    fn create(self, admin: &UserRecord, ca_fingerprint: &str) -> Result<(), InitError> {
        let etcd = |e: crate::store::StoreError| InitError::Etcd(e.to_string());
        let record = crate::store::etcd::ClusterRecord {
            id: ca_fingerprint.to_string(),
            created_at_ms: now_ms(),
        };
        self.runtime.block_on(async {
            crate::store::etcd::EtcdStore::init(&self.client, &self.keys, &record)
                .await
                .map_err(etcd)?;
            let store = crate::store::etcd::EtcdStore::open(self.client.clone(), self.keys.clone())
                .await
                .map_err(etcd)?;
            crate::store::UserRecords::put_user(&store, admin)
                .await
                .map_err(etcd)
        })
    }
}

pub fn init(options: &InitOptions) -> Result<InitOutcome, InitError> {
    let dir = &options.data_dir;
    if dir.exists() {
        let mut entries = std::fs::read_dir(dir).map_err(io_err(dir))?;
        if entries.next().is_some() {
            return Err(InitError::NotEmpty(dir.clone()));
        }
    }
    let endpoint = ControlPlaneUrl::parse(&options.endpoint)
        .map_err(|e| InitError::Endpoint(e.to_string()))?;
    let mut sans = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    for san in &options.sans {
        let valid = !san.is_empty()
            && san.len() <= 253
            && san
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | ':' | '*'));
        if !valid {
            return Err(InitError::BadSan(san.clone()));
        }
        if !sans.contains(san) {
            sans.push(san.clone());
        }
    }
    if !sans.contains(&endpoint.host) {
        sans.push(endpoint.host.clone());
    }

    // A prefix that already holds a cluster is refused before anything is
    // written, so the data directory is not left behind half made.
    let etcd = options.store.as_ref().map(EtcdInit::connect).transpose()?;

    let (ca, ca_pems) = CertificateAuthority::generate("hotswap CA")?;
    let server = ca.issue_server(&sans, SERVER_CERT_VALIDITY)?;
    let admin =
        ca.issue_client_with_new_key(&Principal::User("admin".into()), ADMIN_CERT_VALIDITY)?;
    // Every replica gets the same one with its copy of the data directory,
    // like the server certificate.
    let replica = ca.issue_client_with_new_key(
        &Principal::Replica(crate::auth::REPLICA_IDENTITY.into()),
        SERVER_CERT_VALIDITY,
    )?;

    fsutil::create_private_dir(dir).map_err(io_err(dir))?;
    let layout = DataDir::new(dir);
    let writes = [
        (
            layout.ca_key(),
            ca_pems.key_pem.as_bytes(),
            PRIVATE_FILE_MODE,
        ),
        (
            layout.ca_cert(),
            ca_pems.cert_pem.as_bytes(),
            PUBLIC_FILE_MODE,
        ),
        (
            layout.server_key(),
            server.key_pem.as_bytes(),
            PRIVATE_FILE_MODE,
        ),
        (
            layout.server_cert(),
            server.cert_pem.as_bytes(),
            PUBLIC_FILE_MODE,
        ),
        (
            layout.replica_key(),
            replica.key_pem.as_bytes(),
            PRIVATE_FILE_MODE,
        ),
        (
            layout.replica_cert(),
            replica.cert_pem.as_bytes(),
            PUBLIC_FILE_MODE,
        ),
    ];
    for (path, bytes, mode) in writes {
        fsutil::write_atomic(&path, bytes, mode).map_err(io_err(&path))?;
    }
    // The first admin is a user like any other: its role and certificate
    // are in the user table, so it can be revoked once other admins exist.
    let admin_der = pki::first_cert_der(&admin.cert_pem)?;
    let admin_user = UserRecord {
        name: "admin".into(),
        role: Role::Admin,
        created_at_ms: now_ms(),
        created_by: "init".into(),
        cert_fingerprint: pki::der_fingerprint(admin_der.as_ref()),
        cert_not_after_ms: pki::not_after_ms(admin_der.as_ref())?,
        revoked_at_ms: None,
    };
    match etcd {
        Some(etcd) => etcd.create(&admin_user, &ca.fingerprint()?)?,
        None => {
            let state = layout.state();
            let store =
                Store::open(&state, 1024 * 1024).map_err(|e| InitError::Store(e.to_string()))?;
            store
                .put_user_blocking(&admin_user)
                .map_err(|e| InitError::Store(e.to_string()))?;
        }
    }
    let profile = Profile {
        endpoint: endpoint.to_string(),
        ca_cert: ca_pems.cert_pem.clone(),
        client_cert: admin.cert_pem,
        client_key: admin.key_pem,
    };
    let admin_profile = layout.admin_profile();
    profile.save(&admin_profile)?;
    Ok(InitOutcome {
        ca_fingerprint: ca.fingerprint()?,
        admin_profile,
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn options(dir: &Path) -> InitOptions {
        InitOptions {
            data_dir: dir.to_path_buf(),
            sans: vec!["cp.example".into()],
            endpoint: "https://127.0.0.1:7443".into(),
            store: None,
        }
    }

    #[test]
    fn init_writes_private_keys_0600_and_refuses_to_overwrite() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("cp");
        let outcome = init(&options(&dir)).expect("init");
        assert!(outcome.ca_fingerprint.starts_with("sha256:"));
        let layout = DataDir::new(&dir);
        for key in [
            layout.ca_key(),
            layout.server_key(),
            layout.replica_key(),
            layout.admin_profile(),
        ] {
            let mode = std::fs::metadata(&key).expect("stat").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} has mode {mode:o}", key.display());
        }
        let replica_pem = std::fs::read_to_string(layout.replica_cert()).expect("replica.crt");
        let replica_der = pki::first_cert_der(&replica_pem).expect("replica certificate");
        assert_eq!(
            pki::principal_of(replica_der.as_ref()).expect("identity"),
            Principal::Replica(crate::auth::REPLICA_IDENTITY.into())
        );
        let ca_pem = std::fs::read_to_string(layout.ca_cert()).expect("ca.crt");
        pki::check_certificate(&replica_pem, &ca_pem, now_ms()).expect("issued by the CA");
        let before = std::fs::read(layout.ca_key()).expect("read");
        let err = init(&options(&dir)).expect_err("second init").to_string();
        assert!(err.contains("refusing to overwrite"), "{err}");
        assert_eq!(
            std::fs::read(layout.ca_key()).expect("read"),
            before,
            "CA key untouched"
        );
    }

    #[test]
    fn bad_san_changes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("cp");
        let mut opts = options(&dir);
        opts.sans = vec!["bad name/".into()];
        let err = init(&opts).expect_err("bad san").to_string();
        assert!(err.contains("invalid --san"), "{err}");
        assert!(!dir.exists(), "nothing created");
    }
}
