//! Directory → artifact. The payload is a reproducible tar (sorted entries,
//! zero times and owners, normalized modes) compressed with zstd, so packing
//! the same tree twice gives the same digest.
//!
//! Rules for the source tree: regular files, directories and symlinks only;
//! symlinks must resolve inside the tree; a hard-linked file must have all of
//! its links inside the tree; names must be UTF-8. `module.toml` at the top is
//! the manifest and is stored once, outside the payload.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;

use super::ArtifactError;
use super::format::{ArtifactInfo, encode_content, read_artifact_from, write_artifact};
use super::keys::sign;
use super::limits::{LimitError, Limits, module_label};
use crate::manifest::{MANIFEST_FILE, Manifest, load_manifest};

#[derive(Debug, thiserror::Error)]
#[error("cannot pack {path}: {reason}")]
pub struct PackError {
    pub path: PathBuf,
    pub reason: String,
}

fn pack_err(path: &Path, reason: impl Into<String>) -> PackError {
    PackError {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// A packed module before signing.
pub struct Packed {
    pub manifest: Manifest,
    pub manifest_text: String,
    pub payload: Vec<u8>,
}

/// zstd level: a good ratio at a speed far above disk and network.
const ZSTD_LEVEL: i32 = 3;

/// Pack `dir` into an artifact agents can install: its version and tree
/// are checked against the agents' [`Limits`] before anything is built.
pub fn pack_dir(dir: &Path) -> Result<Packed, ArtifactError> {
    pack_dir_within(dir, &Limits::AGENT)
}

/// [`pack_dir`] against other limits (tests).
pub fn pack_dir_within(dir: &Path, limits: &Limits) -> Result<Packed, ArtifactError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest = load_manifest(&manifest_path)?;
    let manifest_text =
        fs::read_to_string(&manifest_path).map_err(|source| ArtifactError::Read {
            path: manifest_path.clone(),
            source,
        })?;
    let uninstallable = |source| ArtifactError::Uninstallable {
        module: module_label(&manifest),
        source,
    };
    limits.check_manifest(&manifest).map_err(uninstallable)?;
    let payload = build_payload(dir, limits).map_err(|e| match e {
        Built::Pack(e) => ArtifactError::Format(e.to_string()),
        Built::Limit(e) => uninstallable(e),
    })?;
    Ok(Packed {
        manifest,
        manifest_text,
        payload,
    })
}

/// Why a payload was not built: the tree breaks a rule, or an agent could
/// not unpack it.
enum Built {
    Pack(PackError),
    Limit(LimitError),
}

impl From<PackError> for Built {
    fn from(e: PackError) -> Self {
        Built::Pack(e)
    }
}

fn build_payload(dir: &Path, limits: &Limits) -> Result<Vec<u8>, Built> {
    let root = fs::canonicalize(dir).map_err(|e| pack_err(dir, e.to_string()))?;
    let mut entries = Vec::new();
    collect(&root, Path::new(""), &mut entries)?;
    // The agents' unpack counts every tar entry and the bytes of regular
    // files; refuse here what it would refuse there.
    if entries.len() as u64 > limits.max_entries {
        return Err(Built::Limit(LimitError::TooManyEntries(limits.max_entries)));
    }
    let mut bytes: u64 = 0;
    for (rel, meta) in &entries {
        if meta.is_file() {
            let left = limits.max_bytes.saturating_sub(bytes);
            if meta.len() > left {
                return Err(Built::Limit(LimitError::TooLarge {
                    entry: rel.display().to_string(),
                    declared: meta.len(),
                    left,
                    max: limits.max_bytes,
                }));
            }
            bytes += meta.len();
        }
    }

    // Every link of a hard-linked file must be inside the tree.
    let mut links: HashMap<(u64, u64), (u64, usize, PathBuf)> = HashMap::new();
    for (rel, meta) in &entries {
        if meta.is_file() && meta.nlink() > 1 {
            let entry =
                links
                    .entry((meta.dev(), meta.ino()))
                    .or_insert((meta.nlink(), 0, rel.clone()));
            entry.1 += 1;
        }
    }
    if let Some((_, (_, _, rel))) = links
        .iter()
        .find(|(_, (nlink, seen, _))| (*seen as u64) < *nlink)
    {
        return Err(pack_err(
            &root.join(rel),
            "is a hard link to a file outside the module directory",
        )
        .into());
    }

    let encoder = zstd::stream::Encoder::new(Vec::new(), ZSTD_LEVEL)
        .map_err(|e| pack_err(dir, e.to_string()))?;
    let mut builder = tar::Builder::new(encoder);
    append_entries(&mut builder, &root, &entries)?;
    let encoder = builder
        .into_inner()
        .map_err(|e| pack_err(dir, e.to_string()))?;
    Ok(encoder.finish().map_err(|e| pack_err(dir, e.to_string()))?)
}

fn append_entries<W: std::io::Write>(
    builder: &mut tar::Builder<W>,
    root: &Path,
    entries: &[(PathBuf, fs::Metadata)],
) -> Result<(), PackError> {
    for (rel, meta) in entries {
        let full = root.join(rel);
        let io = |e: std::io::Error| pack_err(&full, e.to_string());
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&full).map_err(io)?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            builder.append_link(&mut header, rel, &target).map_err(io)?;
        } else if meta.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            builder
                .append_data(&mut header, rel, std::io::empty())
                .map_err(io)?;
        } else {
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(if meta.mode() & 0o111 != 0 {
                0o755
            } else {
                0o644
            });
            header.set_size(meta.len());
            let file = fs::File::open(&full).map_err(io)?;
            builder.append_data(&mut header, rel, file).map_err(io)?;
        }
    }
    Ok(())
}

/// Walk `root/rel` in sorted order, checking every entry against the rules.
fn collect(
    root: &Path,
    rel: &Path,
    out: &mut Vec<(PathBuf, fs::Metadata)>,
) -> Result<(), PackError> {
    let dir = root.join(rel);
    let mut names: Vec<_> = fs::read_dir(&dir)
        .map_err(|e| pack_err(&dir, e.to_string()))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| pack_err(&dir, e.to_string()))?;
    names.sort();
    for name in names {
        let child_rel = rel.join(&name);
        let full = root.join(&child_rel);
        if name.to_str().is_none() {
            return Err(pack_err(&full, "file name is not valid UTF-8"));
        }
        if rel.as_os_str().is_empty() && name == MANIFEST_FILE {
            continue;
        }
        let meta = fs::symlink_metadata(&full).map_err(|e| pack_err(&full, e.to_string()))?;
        let kind = meta.file_type();
        if kind.is_symlink() {
            let target = fs::read_link(&full).map_err(|e| pack_err(&full, e.to_string()))?;
            if target.is_absolute() {
                return Err(pack_err(
                    &full,
                    format!("symlink to absolute path {}", target.display()),
                ));
            }
            // Resolve for real (following any chain) and require it inside.
            let resolved = fs::canonicalize(&full).map_err(|e| {
                pack_err(
                    &full,
                    format!("symlink target {} does not resolve: {e}", target.display()),
                )
            })?;
            if !resolved.starts_with(root) {
                return Err(pack_err(
                    &full,
                    format!(
                        "symlink points outside the module directory ({})",
                        target.display()
                    ),
                ));
            }
            out.push((child_rel, meta));
        } else if kind.is_dir() {
            out.push((child_rel.clone(), meta));
            collect(root, &child_rel, out)?;
        } else if kind.is_file() {
            out.push((child_rel, meta));
        } else {
            return Err(pack_err(
                &full,
                "is a special file (device, fifo or socket); only files, directories and symlinks can be packed",
            ));
        }
    }
    Ok(())
}

/// Pack `dir`, sign with `key`, and write the artifact to `out` atomically.
pub fn pack_and_sign(
    dir: &Path,
    key: &SigningKey,
    now_ms: u64,
    out: &Path,
) -> Result<ArtifactInfo, ArtifactError> {
    let packed = pack_dir(dir)?;
    let content = encode_content(&packed.manifest_text, &packed.payload);
    let mut unsigned = Vec::new();
    write_artifact(&mut unsigned, &content, &[]).map_err(|source| ArtifactError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let info = read_artifact_from(std::io::Cursor::new(&unsigned), unsigned.len() as u64)?;
    let signature = sign(&info, key, now_ms, None);
    let mut bytes = Vec::with_capacity(unsigned.len() + 128);
    write_artifact(&mut bytes, &content, &[signature]).map_err(|source| ArtifactError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    crate::fsutil::write_atomic(out, &bytes, crate::fsutil::PUBLIC_FILE_MODE).map_err(
        |source| ArtifactError::Write {
            path: out.to_path_buf(),
            source,
        },
    )?;
    read_artifact_from(std::io::Cursor::new(&bytes), bytes.len() as u64)
}

/// Add a signature to an existing artifact file (rewritten atomically). A
/// second signature by the same key replaces the first.
pub fn add_signature(
    path: &Path,
    key: &SigningKey,
    now_ms: u64,
    expires_at_ms: Option<u64>,
) -> Result<ArtifactInfo, ArtifactError> {
    let info = super::format::read_artifact(path)?;
    let content = super::format::read_content(path, &info)?;
    let signature = sign(&info, key, now_ms, expires_at_ms);
    let mut signatures: Vec<_> = info
        .signatures
        .iter()
        .filter(|s| s.key_id != signature.key_id)
        .cloned()
        .collect();
    signatures.push(signature);
    if signatures.len() > usize::from(super::format::MAX_SIGNATURES) {
        return Err(ArtifactError::Format(format!(
            "at most {} signatures are allowed",
            super::format::MAX_SIGNATURES
        )));
    }
    let mut bytes = Vec::with_capacity(content.len() + 256);
    write_artifact(&mut bytes, &content, &signatures).map_err(|source| ArtifactError::Write {
        path: path.to_path_buf(),
        source,
    })?;
    crate::fsutil::write_atomic(path, &bytes, crate::fsutil::PUBLIC_FILE_MODE).map_err(
        |source| ArtifactError::Write {
            path: path.to_path_buf(),
            source,
        },
    )?;
    read_artifact_from(std::io::Cursor::new(&bytes), bytes.len() as u64)
}
