//! Module artifacts (`.hsm`): one file holding a module's manifest, its payload
//! (a tar archive compressed with zstd) and ed25519 signatures.
//!
//! A signature covers a *statement* that binds the module name, the version and
//! the SHA-256 of the content (manifest + payload), plus the signing key and
//! times, so an artifact that is altered, renamed or re-versioned fails to
//! verify. The byte layout is in `docs/artifact-format.md`; every byte of a
//! file is covered by a signature or checked structurally, so any single-byte
//! change is detected.
//!
//! Submodules: [`format`] (layout, digest, reading and writing), [`keys`]
//! (publisher keys and trust sets), [`limits`] (what agents install, checked
//! by pack, push and unpack alike), [`pack`] (directory → artifact, with the
//! source tree rules) and [`unpack`] (payload → directory, with the same rules
//! plus limits; and the write-nothing check of push).

pub mod format;
pub mod keys;
pub mod limits;
pub mod pack;
pub mod unpack;

pub use format::{ArtifactInfo, Digest, Signature, read_artifact, statement};
pub use keys::{KeyError, TrustSet, TrustedKey};
pub use limits::{LimitError, Limits};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("not a valid hotswap artifact: {0}")]
    Format(String),
    #[error("artifact manifest is invalid: {0}")]
    Manifest(#[from] crate::manifest::ManifestError),
    #[error(
        "artifact {module}: signature by key {key} does not verify; the artifact was altered after signing"
    )]
    BadSignature { module: String, key: String },
    #[error("artifact {module}: no valid signature by a trusted key ({detail})")]
    Untrusted { module: String, detail: String },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("artifact {module} cannot be installed by agents: {source}")]
    Uninstallable { module: String, source: LimitError },
}

#[cfg(test)]
mod tests;
