//! Payload → directory, for agents installing a verified artifact. The same
//! rules as packing apply to every entry (relative paths without `..`; files,
//! directories and symlinks only; symlinks must resolve inside), plus the
//! agents' [`Limits`] on entry count and unpacked bytes so a small compressed
//! payload cannot fill a disk. Bytes are counted from each entry's declared
//! size before any of them is written, so a bomb is refused at the entry that
//! would pass the limit, with nothing of that entry on disk. Symlinks are
//! created last, so nothing is ever written through one; on any error the
//! half-written directory is removed.
//!
//! [`check_artifact`] walks a payload by the same per-entry rules without
//! writing anything: the control plane's push check, so an artifact no agent
//! could unpack is refused when it is pushed.

use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::format::ArtifactInfo;
pub use super::limits::{LimitError, Limits};
use crate::manifest::MANIFEST_FILE;

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("refusing to unpack: entry {entry:?} {reason}")]
    BadEntry { entry: String, reason: String },
    #[error(transparent)]
    Limit(#[from] LimitError),
    #[error("cannot unpack into {path}: {reason}")]
    Io { path: PathBuf, reason: String },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnpackStats {
    pub entries: u64,
    pub bytes: u64,
}

/// Check that agents with `limits` can install the artifact at `path`: its
/// version and every entry of its payload, walked by the rules of
/// [`unpack_payload`] but written nowhere. What needs the written tree
/// (duplicate names, where symlinks resolve) is left to the unpack itself.
pub fn check_artifact(
    path: &Path,
    info: &ArtifactInfo,
    limits: &Limits,
) -> Result<UnpackStats, UnpackError> {
    limits.check_manifest(&info.manifest)?;
    let payload = open_payload(path, info)?;
    check_payload(payload, limits)
}

/// Walk a tar.zst payload as [`unpack_payload`] would, without writing.
pub fn check_payload<R: Read>(payload: R, limits: &Limits) -> Result<UnpackStats, UnpackError> {
    let mut archive = tar::Archive::new(zstd_decoder(payload)?);
    let mut stats = UnpackStats::default();
    let entries = archive
        .entries()
        .map_err(|e| bad("-", format!("is unreadable: {e}")))?;
    for entry in entries {
        let entry = entry.map_err(|e| bad("-", format!("is unreadable: {e}")))?;
        // The tar reader skips the entry's data when the next one is read:
        // decompressed and dropped, never stored.
        admit(&entry, &mut stats, limits)?;
    }
    Ok(stats)
}

fn open_payload(path: &Path, info: &ArtifactInfo) -> Result<impl Read, UnpackError> {
    let io = |e: std::io::Error| UnpackError::Io {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let mut file = fs::File::open(path).map_err(io)?;
    file.seek(SeekFrom::Start(info.payload_offset))
        .map_err(io)?;
    Ok(std::io::BufReader::new(file.take(info.payload_len)))
}

/// The first bytes of a zstd frame, and those of a skippable frame
/// (`0x184D2A50..=0x184D2A5F`), both little-endian.
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
const ZSTD_SKIPPABLE_LOW: u32 = 0x184d_2a50;

/// A decoder over `payload`, once its first bytes say it is zstd: anything
/// else gets a clear error instead of the decoder's "unknown frame
/// descriptor" from inside the tar reader.
fn zstd_decoder<R: Read>(mut payload: R) -> Result<impl Read, UnpackError> {
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < magic.len() {
        match payload.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(bad("-", format!("is unreadable: {e}"))),
        }
    }
    let head = &magic[..got];
    let skippable = got == 4 && u32::from_le_bytes(magic) & !0xf == ZSTD_SKIPPABLE_LOW;
    if head != ZSTD_MAGIC && !skippable {
        let shown = if head.is_empty() {
            "nothing: it is empty".to_string()
        } else {
            format!("0x{}", hex::encode(head))
        };
        return Err(LimitError::NotZstd(shown).into());
    }
    let whole = std::io::Cursor::new(magic).take(got as u64).chain(payload);
    zstd::stream::Decoder::new(whole).map_err(|e| bad("-", format!("is unreadable: {e}")))
}

/// Unpack an artifact file's payload into `dest` (which must not exist) and
/// write its manifest there as `module.toml`.
pub fn unpack_artifact(
    path: &Path,
    info: &ArtifactInfo,
    dest: &Path,
    limits: &Limits,
) -> Result<UnpackStats, UnpackError> {
    limits.check_manifest(&info.manifest)?;
    let payload = open_payload(path, info)?;
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

/// One tar entry that passed every rule not needing the written tree.
enum Admitted {
    Directory {
        rel: PathBuf,
    },
    File {
        name: String,
        rel: PathBuf,
        mode: u32,
        size: u64,
    },
    Symlink {
        name: String,
        rel: PathBuf,
        link: PathBuf,
    },
}

/// Count `entry` against `limits` and check its name and kind. A file's
/// declared size is taken from the budget here, before a byte of it is
/// read, so nothing beyond the limit is ever written.
fn admit<R: Read>(
    entry: &tar::Entry<'_, R>,
    stats: &mut UnpackStats,
    limits: &Limits,
) -> Result<Admitted, UnpackError> {
    stats.entries += 1;
    if stats.entries > limits.max_entries {
        return Err(LimitError::TooManyEntries(limits.max_entries).into());
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
    match entry.header().entry_type() {
        tar::EntryType::Directory => Ok(Admitted::Directory { rel }),
        tar::EntryType::Regular | tar::EntryType::Continuous => {
            let mode = entry
                .header()
                .mode()
                .map_err(|e| bad(&name, format!("has an invalid mode: {e}")))?;
            let mode = if mode & 0o111 != 0 { 0o755 } else { 0o644 };
            let size = entry.size();
            let left = limits.max_bytes.saturating_sub(stats.bytes);
            if size > left {
                return Err(LimitError::TooLarge {
                    entry: name,
                    declared: size,
                    left,
                    max: limits.max_bytes,
                }
                .into());
            }
            stats.bytes += size;
            Ok(Admitted::File {
                name,
                rel,
                mode,
                size,
            })
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
            let link = PathBuf::from(link);
            Ok(Admitted::Symlink { name, rel, link })
        }
        other => Err(bad(
            &name,
            format!("is a {other:?} entry; only files, directories and symlinks are allowed"),
        )),
    }
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
    let mut archive = tar::Archive::new(zstd_decoder(payload)?);
    let mut stats = UnpackStats::default();
    let mut symlinks = Vec::new();
    let entries = archive
        .entries()
        .map_err(|e| bad("-", format!("is unreadable: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad("-", format!("is unreadable: {e}")))?;
        match admit(&entry, &mut stats, limits)? {
            Admitted::Directory { rel } => {
                let target = dest.join(&rel);
                fs::create_dir_all(&target).map_err(|e| io(&target, e))?
            }
            Admitted::File {
                name,
                rel,
                mode,
                size,
            } => {
                let target = dest.join(&rel);
                if let Some(parent) = target.parent() {
                    fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
                }
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&target)
                    .map_err(|e| match e.kind() {
                        std::io::ErrorKind::AlreadyExists => bad(&name, "appears twice"),
                        _ => io(&target, e),
                    })?;
                // The budget already holds `size`; the reader never gives more.
                let copied = std::io::copy(&mut (&mut entry).take(size), &mut file)
                    .map_err(|e| io(&target, e))?;
                if copied != size {
                    return Err(bad(
                        &name,
                        format!("is truncated: declares {size} bytes, holds {copied}"),
                    ));
                }
                file.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(|e| io(&target, e))?;
            }
            Admitted::Symlink { name, rel, link } => symlinks.push((name, rel, link)),
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
