//! Rotation of the server certificate and of the CA, done offline (the
//! control plane stopped: these commands take the database lock).
//!
//! Every rotation changes several files. They are written to `DIR/pending/`
//! first, then a `COMMIT` file (atomic) marks the set complete, then each is
//! moved into place and `pending/` is removed. A crash before `COMMIT`
//! leaves the old files untouched (the staging is discarded); a crash after
//! it is completed by the next command or by `run`.
//!
//! CA rotation has two steps, with a period of at least one node
//! certificate lifetime between them:
//! 1. `rotate-ca`: a new CA issues everything from now on. The old CA stays
//!    trusted for client certificates (`ca-previous.crt`), and the server
//!    sends the new CA cross-signed by the old one (`ca-cross.crt`), so
//!    agents and profiles that trust only the old CA still connect. Agents
//!    receive the new CA with their next certificate renewal. The server
//!    and replica certificates are issued again from the new CA.
//! 2. `finish-ca-rotation`: the old CA is dropped; only certificates from the
//!    new CA are accepted.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hotswap_common::fsutil::{self, PRIVATE_FILE_MODE, PUBLIC_FILE_MODE};
use hotswap_common::pki::{self, CertificateAuthority, PkiError};
use serde::{Deserialize, Serialize};

use crate::data_dir::DataDir;
use crate::store::Store;

/// Server certificates are re-issued on rotation; ten years like the CA.
pub const SERVER_CERT_VALIDITY: Duration = Duration::from_secs(3650 * 86_400);

#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error(
        "cannot lock the database in {0}: stop the control plane first (rotation runs offline)"
    )]
    Locked(PathBuf),
    #[error("data dir {0} is not initialized")]
    NotInitialized(PathBuf),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{0}")]
    State(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RotationError + '_ {
    move |source| RotationError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a committed staging does.
#[derive(Serialize, Deserialize)]
struct Commit {
    /// File names staged in `pending/`, to move into the data dir.
    install: Vec<(String, u32)>,
    /// File names to delete from the data dir.
    remove: Vec<String>,
}

fn read(path: &Path) -> Result<String, RotationError> {
    std::fs::read_to_string(path).map_err(io(path))
}

/// Finish a committed rotation, or discard an uncommitted one.
pub fn recover(dir: &Path) -> Result<(), RotationError> {
    let layout = DataDir::new(dir);
    let pending = layout.pending();
    if !pending.exists() {
        return Ok(());
    }
    let commit_path = pending.join("COMMIT");
    if !commit_path.exists() {
        tracing::warn!(dir = %pending.display(), "discarding an unfinished rotation");
        return std::fs::remove_dir_all(&pending).map_err(io(&pending));
    }
    let commit: Commit = serde_json::from_str(&read(&commit_path)?)
        .map_err(|e| RotationError::State(format!("{} is corrupt: {e}", commit_path.display())))?;
    for (name, mode) in &commit.install {
        let staged = pending.join(name);
        let bytes = std::fs::read(&staged).map_err(io(&staged))?;
        let target = dir.join(name);
        fsutil::write_atomic(&target, &bytes, *mode).map_err(io(&target))?;
    }
    for name in &commit.remove {
        let target = dir.join(name);
        match std::fs::remove_file(&target) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&target)(e)),
        }
    }
    std::fs::remove_dir_all(&pending).map_err(io(&pending))
}

/// Stage files and a removal list, commit, apply.
fn stage_and_apply(
    dir: &Path,
    files: &[(&str, &str, u32)],
    remove: &[&str],
) -> Result<(), RotationError> {
    let pending = DataDir::new(dir).pending();
    if pending.exists() {
        std::fs::remove_dir_all(&pending).map_err(io(&pending))?;
    }
    fsutil::create_private_dir(&pending).map_err(io(&pending))?;
    for (name, content, mode) in files {
        let path = pending.join(name);
        fsutil::write_atomic(&path, content.as_bytes(), *mode).map_err(io(&path))?;
    }
    let commit = Commit {
        install: files
            .iter()
            .map(|(name, _, mode)| (name.to_string(), *mode))
            .collect(),
        remove: remove.iter().map(|s| s.to_string()).collect(),
    };
    let commit_path = pending.join("COMMIT");
    let json = serde_json::to_vec(&commit).unwrap_or_default();
    fsutil::write_atomic(&commit_path, &json, PUBLIC_FILE_MODE).map_err(io(&commit_path))?;
    recover(dir)
}

/// Hold the database lock (the control plane must be stopped) and finish
/// any earlier rotation first.
fn lock(dir: &Path) -> Result<Store, RotationError> {
    let layout = DataDir::new(dir);
    if !layout.ca_key().exists() {
        return Err(RotationError::NotInitialized(dir.to_path_buf()));
    }
    let store = Store::open(&layout.state(), 1024 * 1024)
        .map_err(|_| RotationError::Locked(dir.to_path_buf()))?;
    recover(dir)?;
    Ok(store)
}

fn file_name(path: &Path) -> &str {
    path.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
}

/// New server key and certificate from the current CA, for the names the
/// old certificate had plus `extra_sans`. Returns the names.
pub fn rotate_server_cert(dir: &Path, extra_sans: &[String]) -> Result<Vec<String>, RotationError> {
    let _store = lock(dir)?;
    let layout = DataDir::new(dir);
    let ca = CertificateAuthority::from_pem(&read(&layout.ca_cert())?, &read(&layout.ca_key())?)?;
    let old = pki::first_cert_der(&read(&layout.server_cert())?)?;
    let mut names = pki::server_names(old.as_ref())?;
    for san in extra_sans {
        if !names.contains(san) {
            names.push(san.clone());
        }
    }
    let server = ca.issue_server(&names, SERVER_CERT_VALIDITY)?;
    stage_and_apply(
        dir,
        &[
            (
                file_name(&layout.server_key()),
                &server.key_pem,
                PRIVATE_FILE_MODE,
            ),
            (
                file_name(&layout.server_cert()),
                &server.cert_pem,
                PUBLIC_FILE_MODE,
            ),
        ],
        &[],
    )?;
    Ok(names)
}

/// Step 1 of a CA rotation. Returns the new CA's fingerprint.
pub fn rotate_ca(dir: &Path) -> Result<String, RotationError> {
    let _store = lock(dir)?;
    let layout = DataDir::new(dir);
    if layout.ca_previous().exists() {
        return Err(RotationError::State(
            "a CA rotation is already in progress: run `finish-ca-rotation` once every node has renewed its certificate".into(),
        ));
    }
    let old_pem = read(&layout.ca_cert())?;
    let old = CertificateAuthority::from_pem(&old_pem, &read(&layout.ca_key())?)?;
    // A name of its own, so chain building never confuses the two CAs.
    let name = format!(
        "hotswap CA {}",
        hotswap_common::timefmt::rfc3339_from_ms(hotswap_common::timefmt::now_ms())
    );
    let (new, new_pems) = CertificateAuthority::generate(&name)?;
    let cross = old.cross_sign(&name, &new_pems.key_pem)?;
    let names = pki::server_names(pki::first_cert_der(&read(&layout.server_cert())?)?.as_ref())?;
    let server = new.issue_server(&names, SERVER_CERT_VALIDITY)?;
    // The certificate replicas forward calls to the leader with: from the
    // new CA too, so copies of this directory forward after the rotation.
    let replica = new.issue_client_with_new_key(
        &pki::Principal::Replica(crate::auth::REPLICA_IDENTITY.into()),
        SERVER_CERT_VALIDITY,
    )?;
    stage_and_apply(
        dir,
        &[
            (file_name(&layout.ca_previous()), &old_pem, PUBLIC_FILE_MODE),
            (file_name(&layout.ca_cross()), &cross, PUBLIC_FILE_MODE),
            (
                file_name(&layout.ca_key()),
                &new_pems.key_pem,
                PRIVATE_FILE_MODE,
            ),
            (
                file_name(&layout.ca_cert()),
                &new_pems.cert_pem,
                PUBLIC_FILE_MODE,
            ),
            (
                file_name(&layout.server_key()),
                &server.key_pem,
                PRIVATE_FILE_MODE,
            ),
            (
                file_name(&layout.server_cert()),
                &server.cert_pem,
                PUBLIC_FILE_MODE,
            ),
            (
                file_name(&layout.replica_key()),
                &replica.key_pem,
                PRIVATE_FILE_MODE,
            ),
            (
                file_name(&layout.replica_cert()),
                &replica.cert_pem,
                PUBLIC_FILE_MODE,
            ),
        ],
        &[],
    )?;
    Ok(new.fingerprint()?)
}

/// Step 2 of a CA rotation: stop trusting the old CA.
pub fn finish_ca_rotation(dir: &Path) -> Result<(), RotationError> {
    let _store = lock(dir)?;
    let layout = DataDir::new(dir);
    if !layout.ca_previous().exists() {
        return Err(RotationError::State(
            "no CA rotation is in progress (run `rotate-ca` first)".into(),
        ));
    }
    stage_and_apply(
        dir,
        &[],
        &[
            file_name(&layout.ca_previous()),
            file_name(&layout.ca_cross()),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommitted_staging_is_discarded_and_committed_is_completed() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path();
        std::fs::write(dir.join("a"), "old a").expect("a");
        std::fs::write(dir.join("gone"), "x").expect("gone");
        let pending = dir.join("pending");
        std::fs::create_dir(&pending).expect("pending");
        std::fs::write(pending.join("a"), "new a").expect("staged");
        recover(dir).expect("recover");
        assert_eq!(std::fs::read_to_string(dir.join("a")).expect("a"), "old a");
        assert!(!pending.exists());

        std::fs::create_dir(&pending).expect("pending");
        std::fs::write(pending.join("a"), "new a").expect("staged");
        let commit = Commit {
            install: vec![("a".into(), 0o600)],
            remove: vec!["gone".into(), "never-there".into()],
        };
        std::fs::write(
            pending.join("COMMIT"),
            serde_json::to_vec(&commit).expect("json"),
        )
        .expect("commit");
        recover(dir).expect("recover");
        assert_eq!(std::fs::read_to_string(dir.join("a")).expect("a"), "new a");
        assert!(!dir.join("gone").exists() && !pending.exists());
    }
}
