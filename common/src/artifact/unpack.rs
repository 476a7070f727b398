//! Payload → directory, for agents installing a verified artifact. The same
//! rules as packing apply to every entry (relative paths without `..`; files,
//! directories and symlinks only; symlinks must resolve inside), plus limits
//! on entry count and unpacked bytes so a small compressed payload cannot
//! fill a disk. Symlinks are created last, so nothing is ever written through
//! one; on any error the half-written directory is removed.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::format::ArtifactInfo;
use crate::manifest::MANIFEST_FILE;

#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_entries: u64,
    pub max_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_entries: 10_000,
            max_bytes: 1024 * 1024 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("refusing to unpack: entry {entry:?} {reason}")]
    BadEntry { entry: String, reason: String },
    #[error("refusing to unpack: more than {0} entries")]
    TooManyEntries(u64),
    #[error("refusing to unpack: more than {0} bytes unpacked")]
    TooLarge(u64),
    #[error("cannot unpack into {path}: {reason}")]
    Io { path: PathBuf, reason: String },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnpackStats {
    pub entries: u64,
    pub bytes: u64,
}

/// Unpack an artifact file's payload into `dest` (which must not exist) and
/// write its manifest there as `module.toml`.
pub fn unpack_artifact(
    path: &Path,
    info: &ArtifactInfo,
    dest: &Path,
    limits: &Limits,
) -> Result<UnpackStats, UnpackError> {
    let io = |e: std::io::Error| UnpackError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut file = fs::File::open(path).map_err(io)?;
    file.seek(SeekFrom::Start(info.payload_offset))
        .map_err(io)?;
    let payload = std::io::BufReader::new(file.take(info.payload_len));
    let stats = unpack_payload(payload, dest, limits)?;
    let manifest = dest.join(MANIFEST_FILE);
    let written = fs::write(&manifest, info.manifest_text.as_bytes());
    if let Err(e) = written {
        let _ = fs::remove_dir_all(dest);
        return Err(UnpackError::Io {
            path: manifest,
            reason: e.to_string(),
        });
    }
    Ok(stats)
}

/// Unpack a tar.zst payload into `dest`, which must not exist yet.
pub fn unpack_payload<R: Read>(
    payload: R,
    dest: &Path,
    limits: &Limits,
) -> Result<UnpackStats, UnpackError> {
    if dest.exists() {
        return Err(UnpackError::Io {
            path: dest.to_path_buf(),
            reason: "already exists".into(),
        });
    }
    fs::create_dir_all(dest).map_err(|e| UnpackError::Io {
        path: dest.to_path_buf(),
        reason: e.to_string(),
    })?;
    let result = unpack_into(payload, dest, limits);
    if result.is_err() {
        let _ = fs::remove_dir_all(dest);
    }
    result
}

fn bad(entry: &str, reason: impl Into<String>) -> UnpackError {
    UnpackError::BadEntry {
        entry: entry.to_string(),
        reason: reason.into(),
    }
}

/// A safe relative path: only normal components, nothing absolute, no `..`.
fn safe_relative(entry: &str) -> Result<PathBuf, UnpackError> {
    if entry.len() > 4096 {
        return Err(bad(entry, "has a path longer than 4096 bytes"));
    }
    let mut clean = PathBuf::new();
    for component in Path::new(entry).components() {
        match component {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(bad(entry, "has a `..` component")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(bad(entry, "is an absolute path"));
            }
        }
    }
    if clean.as_os_str().is_empty() {
        return Err(bad(entry, "has an empty path"));
    }
    Ok(clean)
}

/// Whether a directory on the way from `dest` to `rel` is a symlink.
fn through_symlink(dest: &Path, rel: &Path) -> bool {
    let mut at = dest.to_path_buf();
    rel.parent()
        .into_iter()
        .flat_map(Path::components)
        .any(|part| {
            at.push(part);
            fs::symlink_metadata(&at).is_ok_and(|m| m.file_type().is_symlink())
        })
}

fn unpack_into<R: Read>(
    payload: R,
    dest: &Path,
    limits: &Limits,
) -> Result<UnpackStats, UnpackError> {
    let io = |path: &Path, e: std::io::Error| UnpackError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let decoder = zstd::stream::Decoder::new(payload).map_err(|e| io(dest, e))?;
    let mut archive = tar::Archive::new(decoder);
    let mut stats = UnpackStats::default();
    let mut symlinks = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| bad("-", format!("is unreadable: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad("-", format!("is unreadable: {e}")))?;
        stats.entries += 1;
        if stats.entries > limits.max_entries {
            return Err(UnpackError::TooManyEntries(limits.max_entries));
        }
        let raw = entry.path_bytes();
        let name = std::str::from_utf8(&raw)
            .map_err(|_| {
                bad(
                    &String::from_utf8_lossy(&raw),
                    "has a name that is not UTF-8",
                )
            })?
            .to_string();
        let rel = safe_relative(&name)?;
        if rel == Path::new(MANIFEST_FILE) {
            return Err(bad(&name, "would replace the signed manifest"));
        }
        let target = dest.join(&rel);
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Directory => fs::create_dir_all(&target).map_err(|e| io(&target, e))?,
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
                }
                let mode = entry
                    .header()
                    .mode()
                    .map_err(|e| bad(&name, format!("has an invalid mode: {e}")))?;
                let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&target)
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::AlreadyExists => bad(&name, "appears twice"),
                        _ => io(&target, e),
                    })?;
                let budget = limits.max_bytes.saturating_sub(stats.bytes);
                // Read one byte past the budget to detect overflow without trusting the header.
                let copied =
                    std::io::copy(&mut (&mut entry).take(budget.saturating_add(1)), &mut file)
                        .map_err(|e| io(&target, e))?;
                if copied > budget {
                    return Err(UnpackError::TooLarge(limits.max_bytes));
                }
                stats.bytes += copied;
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(|e| io(&target, e))?;
            }
            tar::EntryType::Symlink => {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad(&name, "is a symlink without a target"))?;
                let link = std::str::from_utf8(&link)
                    .map_err(|_| bad(&name, "has a symlink target that is not UTF-8"))?;
                if link.is_empty() || Path::new(link).is_absolute() {
                    return Err(bad(
                        &name,
                        format!("is a symlink to {link:?}; only relative targets are allowed"),
                    ));
                }
                symlinks.push((name.clone(), rel, PathBuf::from(link)));
            }
            other => {
                return Err(bad(
                    &name,
                    format!(
                        "is a {other:?} entry; only files, directories and symlinks are allowed"
                    ),
                ));
            }
        }
    }
    let root = fs::canonicalize(dest).map_err(|e| io(dest, e))?;
    for (name, rel, link) in &symlinks {
        // An earlier link may be a directory on this one's path (`a` -> `..`,
        // then `a/x`): creating it would write through that link, outside.
        if through_symlink(dest, rel) {
            return Err(bad(
                name,
                "is inside a symlink; nothing is written through one",
            ));
        }
        let at = dest.join(rel);
        if let Some(parent) = at.parent() {
            fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
        }
        std::os::unix::fs::symlink(link, &at).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => bad(name, "appears twice"),
            _ => io(&at, e),
        })?;
    }
    // With every link in place, resolve each for real (chains included).
    for (name, rel, link) in &symlinks {
        let resolved = fs::canonicalize(dest.join(rel)).map_err(|_| {
            bad(
                name,
                format!("is a symlink to {} that does not resolve", link.display()),
            )
        })?;
        if !resolved.starts_with(&root) {
            return Err(bad(
                name,
                format!(
                    "is a symlink to {} outside the module directory",
                    link.display()
                ),
            ));
        }
    }
    Ok(stats)
}
