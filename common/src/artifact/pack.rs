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
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use sha2::{Digest as _, Sha256};

use super::ArtifactError;
use super::format::{
    ArtifactInfo, CONTENT_OFFSET, Digest, MAX_MANIFEST_BYTES, MAX_SIGNATURES, describe,
    patch_header, read_artifact_and_prefix, write_tail,
};
use super::keys::sign;
use super::limits::{LimitError, Limits, module_label};
use crate::fsutil::PUBLIC_FILE_MODE;
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
    let tree = checked_tree(dir, &manifest, limits)?;
    let payload =
        write_payload(&tree, Vec::new()).map_err(|e| ArtifactError::Format(e.to_string()))?;
    Ok(Packed {
        manifest,
        manifest_text,
        payload,
    })
}

/// The source tree of `dir`, refused when an agent could not install the
/// result: its version, its entry count and its bytes, counted as the
/// agents' unpack counts them.
fn checked_tree(
    dir: &Path,
    manifest: &Manifest,
    limits: &Limits,
) -> Result<SourceTree, ArtifactError> {
    let uninstallable = |source| ArtifactError::Uninstallable {
        module: module_label(manifest),
        source,
    };
    limits.check_manifest(manifest).map_err(uninstallable)?;
    let tree = scan_tree(dir).map_err(|e| ArtifactError::Format(e.to_string()))?;
    if tree.entries.len() as u64 > limits.max_entries {
        return Err(uninstallable(LimitError::TooManyEntries(
            limits.max_entries,
        )));
    }
    let mut bytes: u64 = 0;
    for (rel, meta) in &tree.entries {
        if meta.is_file() {
            let left = limits.max_bytes.saturating_sub(bytes);
            if meta.len() > left {
                return Err(uninstallable(LimitError::TooLarge {
                    entry: rel.display().to_string(),
                    declared: meta.len(),
                    left,
                    max: limits.max_bytes,
                }));
            }
            bytes += meta.len();
        }
    }
    Ok(tree)
}

/// A source tree that passed the rules, in the order it is archived.
struct SourceTree {
    root: PathBuf,
    entries: Vec<(PathBuf, fs::Metadata)>,
}

fn scan_tree(dir: &Path) -> Result<SourceTree, PackError> {
    let root = fs::canonicalize(dir).map_err(|e| pack_err(dir, e.to_string()))?;
    let mut entries = Vec::new();
    collect(&root, Path::new(""), &mut entries)?;

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
        ));
    }
    Ok(SourceTree { root, entries })
}

/// Write the payload (tar through zstd) of `tree` to `out` as it is built:
/// each file is read in chunks straight into the compressor, so memory
/// stays bounded by the tar and zstd buffers whatever the tree's size.
fn write_payload<W: Write>(tree: &SourceTree, out: W) -> Result<W, PackError> {
    let SourceTree { root, entries } = tree;
    let encoder =
        zstd::stream::Encoder::new(out, ZSTD_LEVEL).map_err(|e| pack_err(root, e.to_string()))?;
    let mut builder = tar::Builder::new(encoder);
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
            // The size in the header was taken when the tree was scanned; a
            // file that changed since would make tar pad or cut silently.
            let now = file.metadata().map_err(io)?.len();
            if now != meta.len() {
                return Err(pack_err(
                    &full,
                    format!("changed while packing ({} bytes, then {now})", meta.len()),
                ));
            }
            builder
                .append_data(&mut header, rel, std::io::Read::take(file, meta.len()))
                .map_err(io)?;
        }
    }
    let encoder = builder
        .into_inner()
        .map_err(|e| pack_err(root, e.to_string()))?;
    encoder.finish().map_err(|e| pack_err(root, e.to_string()))
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
///
/// Streamed, in bounded memory whatever the module's size: the payload goes
/// through the compressor into a temporary file next to `out` behind a
/// placeholder header, hashed for the digest as it is written. Then the
/// header gets the real length, the signature and the trailer (which covers
/// the content through its digest) are appended, and the file is renamed
/// over `out`: the content is hashed once and never read back.
pub fn pack_and_sign(
    dir: &Path,
    key: &SigningKey,
    now_ms: u64,
    out: &Path,
) -> Result<ArtifactInfo, ArtifactError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let manifest = load_manifest(&manifest_path)?;
    let manifest_text =
        fs::read_to_string(&manifest_path).map_err(|source| ArtifactError::Read {
            path: manifest_path.clone(),
            source,
        })?;
    if manifest_text.len() > MAX_MANIFEST_BYTES as usize {
        return Err(ArtifactError::Format(format!(
            "{} is {} bytes; a manifest may have at most {MAX_MANIFEST_BYTES}",
            manifest_path.display(),
            manifest_text.len()
        )));
    }
    let tree = checked_tree(dir, &manifest, &Limits::AGENT)?;
    let write_err = |source| ArtifactError::Write {
        path: out.to_path_buf(),
        source,
    };

    let staged = Staged::new(out).map_err(write_err)?;
    let file = staged.create().map_err(write_err)?;
    let mut head = (manifest_text.len() as u32).to_be_bytes().to_vec();
    head.extend_from_slice(manifest_text.as_bytes());
    let mut writer = std::io::BufWriter::with_capacity(256 * 1024, file);
    writer
        .write_all(&[0u8; CONTENT_OFFSET as usize])
        .map_err(write_err)?;
    let mut content = HashingWriter::new(writer);
    content.write_all(&head).map_err(write_err)?;
    let content =
        write_payload(&tree, content).map_err(|e| ArtifactError::Format(e.to_string()))?;
    let (writer, digest, content_len) = content.finish();
    let mut file = writer.into_inner().map_err(|e| write_err(e.into_error()))?;

    let unsigned = describe(&head, digest, Vec::new(), content_len)?;
    let signature = sign(&unsigned, key, now_ms, None);
    let prefix = patch_header(&mut file, content_len, &digest).map_err(write_err)?;
    write_tail(
        &mut file,
        content_len,
        prefix,
        std::slice::from_ref(&signature),
    )
    .map_err(write_err)?;
    staged.commit(file).map_err(write_err)?;
    Ok(ArtifactInfo {
        signatures: vec![signature],
        ..unsigned
    })
}

/// Add a signature to an existing artifact file (rewritten atomically). A
/// second signature by the same key replaces the first.
///
/// Streamed, in bounded memory: the file is copied next to itself by the
/// kernel, the copy is read once (structure, digest and the trailer's hash
/// state after the content), and only its signature block and trailer are
/// rewritten before it is renamed over the original. Reading the copy rather
/// than the original means the signature covers exactly the bytes installed.
pub fn add_signature(
    path: &Path,
    key: &SigningKey,
    now_ms: u64,
    expires_at_ms: Option<u64>,
) -> Result<ArtifactInfo, ArtifactError> {
    let write_err = |source| ArtifactError::Write {
        path: path.to_path_buf(),
        source,
    };
    // Fail on an unreadable or broken original before copying anything.
    let file_len = fs::metadata(path)
        .map_err(|source| ArtifactError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let staged = Staged::new(path).map_err(write_err)?;
    staged
        .copy_from(path)
        .map_err(|source| ArtifactError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    let mut file = staged.open().map_err(write_err)?;
    let copied = file.metadata().map_err(write_err)?.len();
    if copied != file_len {
        return Err(ArtifactError::Format(format!(
            "{} changed while it was being signed",
            path.display()
        )));
    }
    let (info, prefix) = read_artifact_and_prefix(std::io::BufReader::new(&file), copied)?;
    let signature = sign(&info, key, now_ms, expires_at_ms);
    let mut signatures: Vec<_> = info
        .signatures
        .iter()
        .filter(|s| s.key_id != signature.key_id)
        .cloned()
        .collect();
    signatures.push(signature);
    if signatures.len() > usize::from(MAX_SIGNATURES) {
        return Err(ArtifactError::Format(format!(
            "at most {MAX_SIGNATURES} signatures are allowed"
        )));
    }
    write_tail(&mut file, info.content_len, prefix, &signatures).map_err(write_err)?;
    staged.commit(file).map_err(write_err)?;
    Ok(ArtifactInfo { signatures, ..info })
}

/// Hashes and counts everything written through it (the content digest).
struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    fn finish(self) -> (W, Digest, u64) {
        (
            self.inner,
            Digest(self.hasher.finalize().into()),
            self.written,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A temporary file next to `target`, renamed over it by
/// [`Staged::commit`] and removed if dropped before that (an error, a
/// panic), so `target` is either the old file or the complete new one.
struct Staged {
    tmp: PathBuf,
    target: PathBuf,
    committed: bool,
}

impl Staged {
    fn new(target: &Path) -> std::io::Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = target.file_name().ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, "path has no file name")
        })?;
        let tmp = target.with_file_name(format!(
            ".{}.tmp.{}.{}",
            name.to_string_lossy(),
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        Ok(Self {
            tmp,
            target: target.to_path_buf(),
            committed: false,
        })
    }

    fn create(&self) -> std::io::Result<fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .mode(PUBLIC_FILE_MODE)
            .open(&self.tmp)
    }

    /// Copy `source` to the temporary file (`copy_file_range`: in the
    /// kernel, no copy through this process's memory).
    fn copy_from(&self, source: &Path) -> std::io::Result<()> {
        fs::copy(source, &self.tmp).map(drop)
    }

    fn open(&self) -> std::io::Result<fs::File> {
        fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.tmp)
    }

    fn commit(mut self, file: fs::File) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        // The mode passed to open is filtered by the umask; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(PUBLIC_FILE_MODE))?;
        file.sync_all()?;
        drop(file);
        fs::rename(&self.tmp, &self.target)?;
        self.committed = true;
        let dir = self
            .target
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        crate::fsutil::sync_dir(dir)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}
