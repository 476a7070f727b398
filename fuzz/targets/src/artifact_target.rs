//! Targets `artifact` (a whole `.hsm` file: structure, manifest, signatures,
//! then unpack of its payload) and `unpack` (a bare tar archive through the
//! hardened unpack), plus the invariants every unpack must keep.

use std::io::Cursor;
use std::path::Path;

use ed25519_dalek::SigningKey;
use hotswap_common::artifact::format::{read_artifact_from, trailer_for};
use hotswap_common::artifact::unpack::{Limits, UnpackError, unpack_artifact, unpack_payload};
use hotswap_common::artifact::{ArtifactInfo, TrustSet};

/// Seed of the publisher key that signs the seed artifacts and that the
/// `artifact` target trusts, so committed seeds reach the verified path.
/// Public on purpose: it protects nothing.
pub const FUZZ_PUBLISHER_SEED: [u8; 32] = [0x5e; 32];

/// The clock the target verifies signatures at (2027-01-15), fixed so a
/// run is reproducible; seeds are signed a little before it.
pub const FUZZ_NOW_MS: u64 = 1_800_000_000_000;

/// Unpack limits of both targets. Far below the agent's defaults so that a
/// decompression bomb ends in an error quickly instead of filling the disk
/// of the machine that fuzzes.
pub const UNPACK_LIMITS: Limits = Limits {
    max_entries: 256,
    max_bytes: 1024 * 1024,
    ..Limits::AGENT
};

/// Where the `artifact` target writes its input for [`unpack_artifact`].
const ARTIFACT_FILE: &str = "artifact.hsm";

/// Length of the SHA-256 integrity trailer at the end of every artifact.
const TRAILER_BYTES: usize = 32;

pub fn fuzz_publisher_key() -> SigningKey {
    SigningKey::from_bytes(&FUZZ_PUBLISHER_SEED)
}

fn trust_set() -> TrustSet {
    let mut trust = TrustSet::new();
    trust.add("fuzz", fuzz_publisher_key().verifying_key());
    trust
}

/// Read `data` as an artifact file and, when its structure holds, verify its
/// signatures and unpack its payload as an agent would.
///
/// The trailer is a SHA-256 of everything before it, which no fuzzer can
/// forge, so almost every mutation would stop at the integrity check. The
/// input is therefore read twice: as given (the integrity check itself),
/// and with the trailer recomputed (everything after it: manifest, signature
/// statements, zstd, tar and the unpack rules).
pub fn artifact(data: &[u8]) {
    check_artifact(data);
    if let Some(fixed) = with_valid_trailer(data)
        && fixed != data
    {
        check_artifact(&fixed);
    }
}

/// `data` with its last 32 bytes replaced by the trailer the rest calls
/// for (`format::trailer_for`), or `None` when it is too short to have one.
pub fn with_valid_trailer(data: &[u8]) -> Option<Vec<u8>> {
    let body_len = data.len().checked_sub(TRAILER_BYTES)?;
    let mut fixed = data.to_vec();
    let trailer = trailer_for(&data[..body_len])?;
    fixed[body_len..].copy_from_slice(&trailer);
    Some(fixed)
}

fn check_artifact(bytes: &[u8]) {
    let Ok(info) = read_artifact_from(Cursor::new(bytes), bytes.len() as u64) else {
        return;
    };
    check_layout(&info, bytes.len() as u64);
    let _ = info.module();
    let trusted = trust_set().verify(&info, FUZZ_NOW_MS);
    if let Ok(verified) = &trusted {
        assert!(
            !verified.is_empty(),
            "verification passed without a signature"
        );
    }
    assert!(
        TrustSet::new().verify(&info, FUZZ_NOW_MS).is_err(),
        "an empty trust set verified {}",
        info.module()
    );
    // An agent unpacks only verified artifacts. Unpack the others too: a
    // publisher key can leak, and then the unpack rules are what is left.
    unpack_file(bytes, &info);
}

/// The offsets a reader returns must lie inside the file it read.
fn check_layout(info: &ArtifactInfo, total_len: u64) {
    let payload_end = info.payload_offset.checked_add(info.payload_len);
    let content_end = info.content_offset.checked_add(info.content_len);
    assert!(
        payload_end.is_some_and(|end| end <= total_len)
            && content_end.is_some_and(|end| end <= total_len)
            && payload_end == content_end
            && info.payload_offset >= info.content_offset,
        "offsets outside the file: {info:?} in {total_len} bytes"
    );
}

/// Unpack the payload of an accepted artifact through the agent's entry
/// point, [`unpack_artifact`], which reads the payload from a file.
fn unpack_file(bytes: &[u8], info: &ArtifactInfo) {
    let Ok(tmp) = tempfile::tempdir() else {
        return;
    };
    let file = tmp.path().join(ARTIFACT_FILE);
    if std::fs::write(&file, bytes).is_err() {
        return;
    }
    let outer = tmp.path().join("modules");
    if std::fs::create_dir(&outer).is_err() {
        return;
    }
    let dest = outer.join("fuzz");
    let result = unpack_artifact(&file, info, &dest, &UNPACK_LIMITS);
    check_unpacked(&dest, &result.map(drop));
    if dest.exists() {
        let written = std::fs::read_to_string(dest.join("module.toml"));
        assert_eq!(
            written.ok().as_deref(),
            Some(info.manifest_text.as_str()),
            "the unpacked module.toml is the signed manifest"
        );
    }
}

/// Take `data` as an uncompressed tar archive, compress it as packing does,
/// and unpack it. Compressing here lets the fuzzer work on tar headers
/// directly instead of on zstd frames.
pub fn unpack(data: &[u8]) {
    let Ok(payload) = zstd::bulk::compress(data, 1) else {
        return;
    };
    let Ok(tmp) = tempfile::tempdir() else {
        return;
    };
    let outer = tmp.path().join("modules");
    if std::fs::create_dir(&outer).is_err() {
        return;
    }
    let dest = outer.join("fuzz");
    let result = unpack_payload(Cursor::new(payload), &dest, &UNPACK_LIMITS);
    check_unpacked(&dest, &result.map(drop));
}

/// What an unpack promises whatever the archive: nothing is created beside
/// the destination (checked two levels up: `<tmp>/modules/fuzz`), a failed
/// unpack leaves nothing behind, and a successful one holds only files,
/// directories and symlinks that resolve inside it, within the limits.
fn check_unpacked(dest: &Path, result: &Result<(), UnpackError>) {
    let outer = dest.parent().expect("the destination has a parent");
    let tmp = outer.parent().expect("the modules directory has a parent");
    for (dir, expected) in [
        (outer, &["fuzz"][..]),
        (tmp, &["modules", ARTIFACT_FILE][..]),
    ] {
        let beside: Vec<_> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .map(|e| e.file_name())
                    .filter(|name| !expected.iter().any(|e| name.as_os_str() == *e))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            beside.is_empty(),
            "unpack created {beside:?} in {}, outside its destination ({result:?})",
            dir.display()
        );
    }
    match result {
        Err(_) => assert!(
            std::fs::symlink_metadata(dest).is_err(),
            "a failed unpack left its destination behind ({result:?})"
        ),
        Ok(()) => check_tree(dest),
    }
}

fn check_tree(dest: &Path) {
    let root = std::fs::canonicalize(dest).expect("the unpacked destination resolves");
    // Directories are not counted: unpack creates the parents an entry
    // needs, so they can outnumber the archive's entries.
    let mut entries = 0u64;
    let mut bytes = 0u64;
    let mut pending = vec![dest.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let listing = std::fs::read_dir(&dir).expect("an unpacked directory is readable");
        for entry in listing {
            let path = entry.expect("an unpacked entry is readable").path();
            let meta = std::fs::symlink_metadata(&path).expect("an unpacked entry has metadata");
            let kind = meta.file_type();
            if !kind.is_dir() {
                entries += 1;
            }
            if kind.is_symlink() {
                let resolved = std::fs::canonicalize(&path);
                assert!(
                    resolved.as_ref().is_ok_and(|r| r.starts_with(&root)),
                    "symlink {} resolves to {resolved:?}, outside {}",
                    path.display(),
                    root.display()
                );
            } else if kind.is_dir() {
                pending.push(path);
            } else {
                assert!(kind.is_file(), "{} is a special file", path.display());
                bytes += meta.len();
            }
        }
    }
    // module.toml is written by unpack_artifact itself, outside the limits.
    assert!(
        entries <= UNPACK_LIMITS.max_entries + 1,
        "{entries} entries unpacked, limit {}",
        UNPACK_LIMITS.max_entries
    );
    assert!(
        bytes <= UNPACK_LIMITS.max_bytes + 64 * 1024,
        "{bytes} bytes unpacked, limit {}",
        UNPACK_LIMITS.max_bytes
    );
}
