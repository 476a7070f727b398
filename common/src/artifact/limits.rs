//! What an agent can install, in one place. `module pack`, the control
//! plane's push check and the agent's unpack all take these [`Limits`], so an
//! artifact the control plane accepts is one every agent can unpack, and an
//! artifact no agent can install is refused when it is built or pushed
//! instead of failing on every node of a deployment.

use crate::manifest::Manifest;

/// Longest version, in bytes of its canonical text. Agents name directories
/// after it: `modules/<name>/<version>` and, while unpacking,
/// `tmp/<name>-<version>-<16 hex digits>`. A file name has at most 255 bytes
/// on Linux; with the longest module name (63) this leaves room to spare
/// (63 + 1 + 128 + 1 + 16 = 209).
pub const MAX_VERSION_BYTES: usize = 128;

/// Entries (files, directories, symlinks) in one payload.
pub const MAX_ENTRIES: u64 = 10_000;

/// File content of one payload once unpacked, in all: 1 GiB.
pub const MAX_UNPACKED_BYTES: u64 = 1024 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Entries in the payload's tar archive.
    pub max_entries: u64,
    /// Bytes of file content the payload unpacks to, counted from each
    /// entry's declared size before any of it is written.
    pub max_bytes: u64,
    /// Bytes of the manifest's version ([`MAX_VERSION_BYTES`]).
    pub max_version_bytes: usize,
}

impl Limits {
    /// The limits agents install with, which pack and push check too.
    pub const AGENT: Limits = Limits {
        max_entries: MAX_ENTRIES,
        max_bytes: MAX_UNPACKED_BYTES,
        max_version_bytes: MAX_VERSION_BYTES,
    };

    /// The manifest-level limits: a version an agent can name a directory
    /// after.
    pub fn check_manifest(&self, manifest: &Manifest) -> Result<(), LimitError> {
        let version = manifest.version.to_string();
        if version.len() > self.max_version_bytes {
            return Err(LimitError::VersionTooLong {
                bytes: version.len(),
                max: self.max_version_bytes,
            });
        }
        Ok(())
    }
}

/// `name@version` for messages, with a version too long to install cut
/// short: a message quoting 5,000 characters of it helps nobody.
pub fn module_label(manifest: &Manifest) -> String {
    let version = manifest.version.to_string();
    if version.len() <= MAX_VERSION_BYTES {
        return format!("{}@{version}", manifest.name);
    }
    // Semver text is ASCII, so any byte index is a character boundary.
    let head = version.get(..24).unwrap_or_default();
    format!("{}@{head}...", manifest.name)
}

impl Default for Limits {
    fn default() -> Self {
        Self::AGENT
    }
}

/// An artifact beyond what agents install.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error(
        "version is {bytes} bytes long; agents install versions of at most {max} bytes (they name directories after them)"
    )]
    VersionTooLong { bytes: usize, max: usize },
    #[error("the payload has more than {0} entries, the most agents unpack")]
    TooManyEntries(u64),
    #[error(
        "the payload unpacks to more than {max} bytes, the most agents unpack (entry {entry:?} declares {declared} bytes with {left} left)"
    )]
    TooLarge {
        entry: String,
        declared: u64,
        left: u64,
        max: u64,
    },
    #[error("the payload is not zstd-compressed (it starts with {0})")]
    NotZstd(String),
}
