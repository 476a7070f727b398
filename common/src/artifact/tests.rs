//! Artifact tests: format, signatures, pack rules and hostile archives.

use std::io::Cursor;
use std::path::Path;

use proptest::prelude::*;

use super::format::{
    ArtifactInfo, content_info, encode_content, read_artifact, read_artifact_from, write_artifact,
};
use super::keys::{self, TrustSet};
use super::limits::{LimitError, Limits};
use super::pack::{add_signature, pack_and_sign, pack_dir, pack_dir_within};
use super::unpack::{UnpackError, check_artifact, unpack_artifact, unpack_payload};
use super::{ArtifactError, statement};

const MANIFEST: &str = "name = \"hello\"\nversion = \"1.0.0\"\nruntime = \"bundle\"\n";
const NOW: u64 = 1_700_000_000_000;

fn module_dir(root: &Path) -> std::path::PathBuf {
    let dir = root.join("hello");
    std::fs::create_dir_all(dir.join("bin")).expect("mkdir");
    std::fs::write(dir.join("module.toml"), MANIFEST).expect("manifest");
    std::fs::write(dir.join("config.txt"), "greeting = hi\n").expect("file");
    std::fs::write(dir.join("bin/run.sh"), "#!/bin/sh\necho hi\n").expect("script");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("bin/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    std::os::unix::fs::symlink("config.txt", dir.join("current.txt")).expect("symlink");
    dir
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: std::path::PathBuf,
    artifact: std::path::PathBuf,
    key: ed25519_dalek::SigningKey,
    trust: TrustSet,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().to_path_buf();
    let dir = module_dir(&root);
    let key = keys::generate().expect("key");
    let artifact = root.join("hello.hsm");
    pack_and_sign(&dir, &key, NOW, &artifact).expect("pack");
    let mut trust = TrustSet::new();
    trust.add("ci", key.verifying_key());
    Fixture {
        _tmp: tmp,
        root,
        artifact,
        key,
        trust,
    }
}

fn verify_bytes(bytes: &[u8], trust: &TrustSet) -> Result<ArtifactInfo, ArtifactError> {
    let info = read_artifact_from(Cursor::new(bytes), bytes.len() as u64)?;
    trust.verify(&info, NOW)?;
    Ok(info)
}

#[test]
fn pack_sign_verify_unpack_round_trip() {
    let f = fixture();
    let info = read_artifact(&f.artifact).expect("read");
    assert_eq!(info.module(), "hello@1.0.0");
    let verified = f.trust.verify(&info, NOW).expect("verify");
    assert_eq!(verified.len(), 1);
    assert_eq!(verified[0].key_name, "ci");

    let dest = f.root.join("unpacked");
    let stats = unpack_artifact(&f.artifact, &info, &dest, &Limits::default()).expect("unpack");
    assert!(stats.entries >= 4, "{stats:?}");
    assert_eq!(
        std::fs::read_to_string(dest.join("module.toml")).expect("manifest"),
        MANIFEST
    );
    assert_eq!(
        std::fs::read_to_string(dest.join("current.txt")).expect("via symlink"),
        "greeting = hi\n"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dest.join("bin/run.sh"))
        .expect("script")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o755, "executable bit kept");
}

#[test]
fn packing_is_reproducible() {
    let f = fixture();
    let first = read_artifact(&f.artifact).expect("read").digest;
    let again = f.root.join("again.hsm");
    pack_and_sign(&f.root.join("hello"), &f.key, NOW + 5, &again).expect("pack again");
    assert_eq!(read_artifact(&again).expect("read").digest, first);
}

/// `bytes` (a version 2 file) as the same artifact in version 1: the old
/// magic, and a trailer over every byte before it.
fn as_version_1(bytes: &[u8]) -> Vec<u8> {
    let mut old = bytes.to_vec();
    old[..8].copy_from_slice(super::format::MAGIC_V1);
    let n = old.len();
    let trailer: [u8; 32] = sha2::Digest::finalize(sha2::Digest::chain_update(
        <sha2::Sha256 as sha2::Digest>::new(),
        &old[..n - 32],
    ))
    .into();
    old[n - 32..].copy_from_slice(&trailer);
    old
}

#[test]
fn files_are_written_as_version_2_whose_trailer_takes_the_content_digest() {
    use sha2::Digest as _;
    let f = fixture();
    let bytes = std::fs::read(&f.artifact).expect("read");
    assert_eq!(&bytes[..8], super::format::MAGIC);
    let info = read_artifact(&f.artifact).expect("read");
    // The trailer: header, then the digest instead of the content, then
    // the signatures.
    let n = bytes.len();
    let content_end = 16 + info.content_len as usize;
    let mut expected = sha2::Sha256::new();
    expected.update(&bytes[..16]);
    expected.update(info.digest.0);
    expected.update(&bytes[content_end..n - 32]);
    assert_eq!(&bytes[n - 32..], &expected.finalize()[..]);
    assert_eq!(
        super::format::trailer_for(&bytes[..n - 32]),
        Some(bytes[n - 32..].try_into().expect("32 bytes"))
    );
    // Corrupt content is still corruption, found by the trailer.
    let mut corrupt = bytes.clone();
    corrupt[content_end - 1] ^= 1;
    let error = verify_bytes(&corrupt, &f.trust).expect_err("corrupt");
    assert!(
        error.to_string().contains("integrity check failed"),
        "{error}"
    );
}

#[test]
fn version_1_files_are_read_and_signed_as_version_1() {
    let f = fixture();
    let bytes = std::fs::read(&f.artifact).expect("read");
    let old = as_version_1(&bytes);
    let info = verify_bytes(&old, &f.trust).expect("a version 1 file verifies");
    assert_eq!(
        info.digest,
        read_artifact(&f.artifact).expect("read").digest
    );
    let n = old.len();
    assert_eq!(
        super::format::trailer_for(&old[..n - 32]),
        Some(old[n - 32..].try_into().expect("32 bytes"))
    );
    // A version 1 trailer on a version 2 file, and the reverse, are corrupt.
    let mut mixed = old.clone();
    mixed[..8].copy_from_slice(super::format::MAGIC);
    assert!(verify_bytes(&mixed, &f.trust).is_err());
    let mut mixed = bytes.clone();
    mixed[..8].copy_from_slice(super::format::MAGIC_V1);
    assert!(verify_bytes(&mixed, &f.trust).is_err());
    // Signing keeps the version; both signatures verify.
    let path = f.root.join("old.hsm");
    std::fs::write(&path, &old).expect("write");
    let second = keys::generate().expect("key");
    add_signature(&path, &second, NOW, None).expect("sign");
    let signed = std::fs::read(&path).expect("read");
    assert_eq!(&signed[..8], super::format::MAGIC_V1);
    let mut trust = f.trust.clone();
    trust.add("second", second.verifying_key());
    let info = verify_bytes(&signed, &trust).expect("verifies");
    assert_eq!(info.signatures.len(), 2);
    for position in 0..signed.len() {
        let mut altered = signed.clone();
        altered[position] ^= 0x01;
        assert!(
            verify_bytes(&altered, &trust).is_err(),
            "flipping byte {position} of a version 1 file went unnoticed"
        );
    }
}

#[test]
fn every_single_byte_change_is_detected() {
    let f = fixture();
    // A second signature by a key the verifier does not know: its bytes
    // cannot be checked cryptographically, the integrity trailer covers them.
    add_signature(
        &f.artifact,
        &keys::generate().expect("key"),
        NOW,
        Some(NOW + 1),
    )
    .expect("second signature");
    let bytes = std::fs::read(&f.artifact).expect("read");
    verify_bytes(&bytes, &f.trust).expect("original verifies");
    for position in 0..bytes.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut altered = bytes.clone();
            altered[position] ^= flip;
            assert!(
                verify_bytes(&altered, &f.trust).is_err(),
                "flipping byte {position} with {flip:#x} went unnoticed"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn any_byte_change_fails_verification(position in any::<prop::sample::Index>(), value in any::<u8>()) {
        let f = fixture();
        let mut bytes = std::fs::read(&f.artifact).expect("read");
        let i = position.index(bytes.len());
        prop_assume!(bytes[i] != value);
        bytes[i] = value;
        prop_assert!(verify_bytes(&bytes, &f.trust).is_err());
    }

    #[test]
    fn reading_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = read_artifact_from(Cursor::new(&bytes), bytes.len() as u64);
        let mut with_magic = super::format::MAGIC.to_vec();
        with_magic.extend_from_slice(&bytes);
        let _ = read_artifact_from(Cursor::new(&with_magic), with_magic.len() as u64);
    }
}

#[test]
fn truncated_and_extended_files_are_rejected() {
    let f = fixture();
    let bytes = std::fs::read(&f.artifact).expect("read");
    for cut in [0, 7, 16, bytes.len() / 2, bytes.len() - 1] {
        let err = verify_bytes(&bytes[..cut], &f.trust).expect_err("truncated");
        assert!(
            matches!(err, ArtifactError::Format(_)),
            "cut at {cut}: {err}"
        );
    }
    let mut longer = bytes.clone();
    longer.push(0);
    let err = verify_bytes(&longer, &f.trust).expect_err("trailing byte");
    assert!(
        err.to_string()
            .contains("unexpected bytes after the integrity trailer"),
        "{err}"
    );
}

#[test]
fn wrong_and_untrusted_keys_are_rejected() {
    let f = fixture();
    let info = read_artifact(&f.artifact).expect("read");
    let mut other = TrustSet::new();
    other.add(
        "someone-else",
        keys::generate().expect("key").verifying_key(),
    );
    let err = other.verify(&info, NOW).expect_err("wrong key");
    assert!(
        err.to_string()
            .contains("signed only by untrusted key(s) ed25519:"),
        "{err}"
    );
    let err = TrustSet::new().verify(&info, NOW).expect_err("empty trust");
    assert!(
        err.to_string().contains("no publisher keys are trusted"),
        "{err}"
    );
}

/// Re-encode the artifact with an edited manifest but the original signature.
fn with_manifest(f: &Fixture, manifest: &str) -> Vec<u8> {
    let info = read_artifact(&f.artifact).expect("read");
    let content = super::format::read_content(&f.artifact, &info).expect("content");
    let payload = &content[4 + info.manifest_text.len()..];
    let mut out = Vec::new();
    write_artifact(
        &mut out,
        &encode_content(manifest, payload),
        &info.signatures,
    )
    .expect("write");
    out
}

#[test]
fn renamed_and_reversioned_artifacts_fail() {
    let f = fixture();
    let renamed = with_manifest(&f, &MANIFEST.replace("hello", "hullo"));
    let err = verify_bytes(&renamed, &f.trust).expect_err("renamed");
    assert!(matches!(err, ArtifactError::BadSignature { .. }), "{err}");
    assert!(err.to_string().contains("hullo@1.0.0"), "{err}");
    let reversioned = with_manifest(&f, &MANIFEST.replace("1.0.0", "1.0.1"));
    let err = verify_bytes(&reversioned, &f.trust).expect_err("re-versioned");
    assert!(matches!(err, ArtifactError::BadSignature { .. }), "{err}");
}

#[test]
fn statement_binds_every_field() {
    let digest = super::Digest([7; 32]);
    let base = statement("a", "1.0.0", &digest, "ed25519:k", 1, None);
    assert_ne!(base, statement("b", "1.0.0", &digest, "ed25519:k", 1, None));
    assert_ne!(base, statement("a", "1.0.1", &digest, "ed25519:k", 1, None));
    assert_ne!(
        base,
        statement("a", "1.0.0", &super::Digest([8; 32]), "ed25519:k", 1, None)
    );
    assert_ne!(base, statement("a", "1.0.0", &digest, "ed25519:j", 1, None));
    assert_ne!(base, statement("a", "1.0.0", &digest, "ed25519:k", 2, None));
    assert_ne!(
        base,
        statement("a", "1.0.0", &digest, "ed25519:k", 1, Some(5))
    );
}

#[test]
fn second_signature_and_expiry() {
    let f = fixture();
    let second = keys::generate().expect("key");
    let info = add_signature(&f.artifact, &second, NOW, Some(NOW + 1000)).expect("sign");
    assert_eq!(info.signatures.len(), 2);
    let mut only_second = TrustSet::new();
    only_second.add("release", second.verifying_key());
    only_second.verify(&info, NOW).expect("valid before expiry");
    let err = only_second.verify(&info, NOW + 1000).expect_err("expired");
    assert!(err.to_string().contains("expired"), "{err}");
    // Re-signing with the same key replaces, not duplicates.
    let info = add_signature(&f.artifact, &second, NOW, None).expect("sign again");
    assert_eq!(info.signatures.len(), 2);
}

#[test]
fn keys_are_written_0600_and_never_overwritten() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = tmp.path().join("ci");
    let key = keys::generate().expect("key");
    let (key_path, pub_path) = keys::write_key_pair(&out, &key).expect("write");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key_path)
            .expect("stat")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        keys::load_signing_key(&key_path).expect("load").to_bytes(),
        key.to_bytes()
    );
    assert_eq!(
        keys::load_public_key(&pub_path).expect("load pub"),
        key.verifying_key()
    );
    let err = keys::write_key_pair(&out, &keys::generate().expect("key")).expect_err("exists");
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    let err = keys::load_signing_key(&pub_path).expect_err("public as private");
    assert!(
        err.to_string().contains("is not an ed25519 private key"),
        "{err}"
    );
}

#[test]
fn pack_refuses_links_leaving_the_dir_and_special_files() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let outside = tmp.path().join("secret.txt");
    std::fs::write(&outside, "secret").expect("write");

    let check = |setup: &dyn Fn(&Path), fragment: &str| {
        let dir = tempfile::tempdir_in(tmp.path()).expect("dir");
        std::fs::write(dir.path().join("module.toml"), MANIFEST).expect("manifest");
        setup(dir.path());
        let err = pack_dir(dir.path()).err().expect("must refuse").to_string();
        assert!(err.contains(fragment), "expected {fragment:?} in {err:?}");
    };
    check(
        &|d| std::os::unix::fs::symlink(&outside, d.join("abs")).expect("link"),
        "symlink to absolute path",
    );
    check(
        &|d| std::os::unix::fs::symlink("../secret.txt", d.join("up")).expect("link"),
        "points outside",
    );
    check(
        &|d| std::os::unix::fs::symlink("missing", d.join("dangling")).expect("link"),
        "does not resolve",
    );
    check(
        &|d| std::fs::hard_link(&outside, d.join("hard")).expect("link"),
        "hard link to a file outside",
    );
    check(
        &|d| {
            let path = std::ffi::CString::new(d.join("fifo").as_os_str().as_encoded_bytes())
                .expect("cstr");
            // SAFETY: mkfifo with a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o644) }, 0);
        },
        "special file",
    );
    // A hard link whose every link is inside is fine.
    let dir = module_dir(&tmp.path().join("ok"));
    std::fs::hard_link(dir.join("config.txt"), dir.join("config-copy.txt")).expect("link");
    pack_dir(&dir).expect("hard links inside are allowed");
}

/// A tar.zst payload built from raw headers, bypassing the tar crate's own path checks.
fn crafted(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, kind, data, link) in entries {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(link) = link {
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(*kind);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_cksum();
        builder.append(&header, *data).expect("append");
    }
    let tar = builder.into_inner().expect("tar");
    zstd::encode_all(Cursor::new(tar), 3).expect("zstd")
}

fn unpack_crafted(
    payload: &[u8],
    limits: &Limits,
) -> (Result<super::unpack::UnpackStats, UnpackError>, bool) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dest = tmp.path().join("module");
    let result = unpack_payload(Cursor::new(payload), &dest, limits);
    let exists = dest.exists();
    (result, exists)
}

#[test]
fn hostile_archives_are_refused_and_leave_nothing() {
    use tar::EntryType::{Block, Char, Fifo, Link, Regular, Symlink};
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            crafted(&[("../evil", Regular, b"x", None)]),
            "`..` component",
        ),
        (
            crafted(&[("a/../../evil", Regular, b"x", None)]),
            "`..` component",
        ),
        (
            crafted(&[("/etc/evil", Regular, b"x", None)]),
            "absolute path",
        ),
        (
            crafted(&[("up", Symlink, b"", Some("../.."))]),
            "outside the module directory",
        ),
        (
            crafted(&[("abs", Symlink, b"", Some("/etc/passwd"))]),
            "only relative targets",
        ),
        (
            crafted(&[
                ("a", Symlink, b"", Some(".")),
                ("t", Symlink, b"", Some("a/..")),
            ]),
            "outside the module directory",
        ),
        (
            crafted(&[("h", Link, b"", Some("/etc/passwd"))]),
            "only files, directories and symlinks",
        ),
        (
            crafted(&[("c", Char, b"", None)]),
            "only files, directories and symlinks",
        ),
        (
            crafted(&[("b", Block, b"", None)]),
            "only files, directories and symlinks",
        ),
        (
            crafted(&[("f", Fifo, b"", None)]),
            "only files, directories and symlinks",
        ),
        (
            crafted(&[("x", Regular, b"1", None), ("x", Regular, b"2", None)]),
            "appears twice",
        ),
        (
            crafted(&[("module.toml", Regular, b"name = \"evil\"", None)]),
            "signed manifest",
        ),
        (
            crafted(&[("x", Symlink, b"", Some("y")), ("x/z", Regular, b"1", None)]),
            "appears twice",
        ),
        (b"not zstd at all".to_vec(), "cannot unpack"),
    ];
    for (payload, fragment) in cases {
        let (result, exists) = unpack_crafted(&payload, &Limits::default());
        let err = result.expect_err(fragment).to_string();
        assert!(
            err.contains(fragment) || fragment == "cannot unpack" && !err.is_empty(),
            "expected {fragment:?} in {err:?}"
        );
        assert!(!exists, "nothing may be left behind ({fragment})");
    }
}

/// Found with the `unpack` fuzz target's invariant (nothing is created beside
/// the destination): a symlink under an earlier symlink to `..` was created
/// through it, outside the module directory, before the links were checked.
#[test]
fn symlinks_are_never_created_through_a_symlink() {
    use tar::EntryType::Symlink;
    for second in ["a/evil", "a/b/evil"] {
        let payload = crafted(&[
            ("a", Symlink, b"", Some("..")),
            (second, Symlink, b"", Some("x")),
        ]);
        let tmp = tempfile::tempdir().expect("tempdir");
        let dest = tmp.path().join("module");
        let err = unpack_payload(Cursor::new(&payload), &dest, &Limits::default())
            .expect_err("escaping link")
            .to_string();
        assert!(err.contains("inside a symlink"), "{err}");
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert!(
            left.is_empty(),
            "{second}: left {left:?} beside the destination"
        );
    }
}

fn small_limits(max_entries: u64, max_bytes: u64) -> Limits {
    Limits {
        max_entries,
        max_bytes,
        ..Limits::AGENT
    }
}

#[test]
fn unpack_limits_hold_against_bombs() {
    let zeros = vec![0u8; 4 * 1024 * 1024];
    let bomb = crafted(&[("big", tar::EntryType::Regular, &zeros, None)]);
    assert!(bomb.len() < 64 * 1024, "compresses well: {}", bomb.len());
    let (result, exists) = unpack_crafted(&bomb, &small_limits(10, 1024 * 1024));
    assert!(
        matches!(result, Err(UnpackError::Limit(LimitError::TooLarge { .. }))),
        "{result:?}"
    );
    assert!(!exists);

    let many: Vec<(String, tar::EntryType, &[u8], Option<&str>)> = (0..20)
        .map(|i| (format!("f{i}"), tar::EntryType::Regular, &b"x"[..], None))
        .collect();
    let many: Vec<(&str, tar::EntryType, &[u8], Option<&str>)> = many
        .iter()
        .map(|(n, k, d, l)| (n.as_str(), *k, *d, *l))
        .collect();
    let (result, exists) = unpack_crafted(&crafted(&many), &small_limits(10, 1 << 20));
    assert!(
        matches!(
            result,
            Err(UnpackError::Limit(LimitError::TooManyEntries(10)))
        ),
        "{result:?}"
    );
    assert!(!exists);
}

/// A tar.zst payload of one regular file `name` whose header declares
/// `declared` bytes but which holds only `held` bytes of zeros: what the
/// unpack reads of it before refusing shows whether it counted first.
fn declaring(name: &str, declared: u64, held: usize) -> Vec<u8> {
    let mut header = tar::Header::new_gnu();
    header.as_gnu_mut().expect("gnu").name[..name.len()].copy_from_slice(name.as_bytes());
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mode(0o644);
    header.set_size(declared);
    header.set_cksum();
    let mut tar = header.as_bytes().to_vec();
    tar.extend(std::iter::repeat_n(0u8, held));
    zstd::encode_all(Cursor::new(tar), 3).expect("zstd")
}

/// Issue 18, item 6: a bomb was refused only after the agent had written up
/// to the whole limit (1 GiB) of it. Bytes are now counted from the declared
/// size before any is written: an entry declaring more than is left is
/// refused from its header alone. The payload below holds only 64 KiB of
/// the 2 GiB its entry declares; an unpack that wrote first would run out of
/// data instead of refusing the size.
#[test]
fn a_bomb_is_refused_before_any_byte_beyond_the_limit_is_written() {
    let limits = small_limits(10, 1024 * 1024);
    let bomb = declaring("big", 2 * 1024 * 1024 * 1024, 64 * 1024);
    let (result, exists) = unpack_crafted(&bomb, &limits);
    match result {
        Err(UnpackError::Limit(LimitError::TooLarge {
            entry,
            declared,
            left,
            max,
        })) => {
            assert_eq!(
                (entry.as_str(), declared, left, max),
                ("big", 2 * 1024 * 1024 * 1024, 1024 * 1024, 1024 * 1024)
            );
        }
        other => panic!("expected the declared size to be refused, got {other:?}"),
    }
    assert!(!exists, "nothing may be left behind");

    // Several files within the limit one by one but not together: the one
    // that would pass it is refused before it is created, with every byte
    // before it counted (600 KiB + 600 KiB > 1 MiB).
    let part = vec![7u8; 600 * 1024];
    let payload = crafted(&[
        ("a", tar::EntryType::Regular, &part, None),
        ("b", tar::EntryType::Regular, &part, None),
    ]);
    let (result, exists) = unpack_crafted(&payload, &limits);
    match result {
        Err(UnpackError::Limit(LimitError::TooLarge { entry, left, .. })) => {
            assert_eq!((entry.as_str(), left), ("b", 1024 * 1024 - 600 * 1024));
        }
        other => panic!("expected b to be refused, got {other:?}"),
    }
    assert!(!exists);

    // The push check walks the same payloads to the same verdicts, writing
    // nothing at all.
    for payload in [&bomb, &payload] {
        let checked = super::unpack::check_payload(Cursor::new(payload), &limits);
        assert!(
            matches!(
                checked,
                Err(UnpackError::Limit(LimitError::TooLarge { .. }))
            ),
            "{checked:?}"
        );
    }
}

#[test]
fn a_payload_that_is_not_zstd_is_named_as_such() {
    for (payload, shown) in [
        (&b"PK\x03\x04 a zip file"[..], "0x504b0304"),
        (&b""[..], "nothing: it is empty"),
        (&b"\x28\xb5"[..], "0x28b5"),
    ] {
        let (result, exists) = unpack_crafted(payload, &Limits::default());
        let expected = format!("the payload is not zstd-compressed (it starts with {shown})");
        match result {
            Err(e @ UnpackError::Limit(LimitError::NotZstd(_))) => {
                assert_eq!(e.to_string(), expected)
            }
            other => panic!("{payload:?}: expected NotZstd, got {other:?}"),
        }
        assert!(!exists);
        let checked = super::unpack::check_payload(Cursor::new(payload), &Limits::default());
        assert!(
            matches!(checked, Err(UnpackError::Limit(LimitError::NotZstd(_)))),
            "{checked:?}"
        );
    }
}

/// `module pack` refuses what agents would refuse, with the same limits.
#[test]
fn pack_refuses_what_no_agent_can_install() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = module_dir(tmp.path());
    let long = format!("1.0.0-{}", "a".repeat(5000));
    std::fs::write(
        dir.join("module.toml"),
        format!("name = \"hello\"\nversion = \"{long}\"\nruntime = \"bundle\"\n"),
    )
    .expect("manifest");
    let err = pack_dir(&dir).err().expect("a long version is refused");
    assert_eq!(
        err.to_string(),
        "artifact hello@1.0.0-aaaaaaaaaaaaaaaaaa... cannot be installed by agents: version is \
         5006 bytes long; agents install versions of at most 128 bytes (they name directories \
         after them)"
    );

    std::fs::write(dir.join("module.toml"), MANIFEST).expect("manifest");
    // module_dir has 4 entries: bin, bin/run.sh, config.txt, current.txt.
    let err = pack_dir_within(&dir, &small_limits(3, 1 << 20))
        .err()
        .expect("too many entries");
    assert!(
        err.to_string()
            .ends_with("the payload has more than 3 entries, the most agents unpack"),
        "{err}"
    );
    let err = pack_dir_within(&dir, &small_limits(10, 20))
        .err()
        .expect("too many bytes");
    assert!(
        err.to_string().contains("unpacks to more than 20 bytes"),
        "{err}"
    );
    pack_dir_within(&dir, &small_limits(4, 1 << 20)).expect("at the limits");
}

/// The control plane's push check: every payload rule an agent applies,
/// without writing, plus the version.
#[test]
fn check_artifact_applies_the_agents_limits() {
    let f = fixture();
    let info = read_artifact(&f.artifact).expect("read");
    let stats = check_artifact(&f.artifact, &info, &Limits::default()).expect("installable");
    let dest = f.root.join("unpacked");
    let unpacked = unpack_artifact(&f.artifact, &info, &dest, &Limits::default()).expect("unpack");
    assert_eq!(stats, unpacked, "the check counts what the unpack writes");
    let err = check_artifact(&f.artifact, &info, &small_limits(3, 1 << 20))
        .expect_err("too many entries");
    assert!(
        matches!(err, UnpackError::Limit(LimitError::TooManyEntries(3))),
        "{err:?}"
    );
    let tight = Limits {
        max_version_bytes: 4,
        ..Limits::AGENT
    };
    let err = check_artifact(&f.artifact, &info, &tight).expect_err("long version");
    assert!(
        matches!(
            err,
            UnpackError::Limit(LimitError::VersionTooLong { bytes: 5, max: 4 })
        ),
        "{err:?}"
    );
    let dest = f.root.join("unpacked-tight");
    let err = unpack_artifact(&f.artifact, &info, &dest, &tight).expect_err("agent refuses");
    assert!(
        matches!(err, UnpackError::Limit(LimitError::VersionTooLong { .. })),
        "{err:?}"
    );
    assert!(!dest.exists());
}

#[test]
fn content_received_over_the_wire_gives_the_same_info_as_the_file() {
    let f = fixture();
    let info = read_artifact(&f.artifact).expect("read");
    let content = super::format::read_content(&f.artifact, &info).expect("content");
    let from_content =
        content_info(&content, info.digest, info.signatures.clone()).expect("content info");
    assert_eq!(from_content.manifest_text, info.manifest_text);
    assert_eq!(from_content.module(), info.module());
    assert_eq!(from_content.digest, info.digest);
    assert_eq!(
        (
            from_content.content_offset,
            from_content.content_len,
            from_content.payload_offset,
            from_content.payload_len
        ),
        (
            info.content_offset,
            info.content_len,
            info.payload_offset,
            info.payload_len
        )
    );
    f.trust
        .verify(&from_content, NOW)
        .expect("signatures verify");

    // Malformed content is refused with a reason, never a panic.
    for (bad, why) in [
        (Vec::new(), "no manifest length"),
        (vec![0, 0], "no manifest length"),
        (vec![0, 0, 0, 9, b'x'], "out of range"),
        (vec![0xff, 0xff, 0xff, 0xff], "out of range"),
        (vec![0, 0, 0, 2, 0xc3, 0x28], "not valid UTF-8"),
    ] {
        let err = content_info(&bad, info.digest, Vec::new()).expect_err("malformed");
        assert!(err.to_string().contains(why), "{bad:?}: {err}");
    }
    let too_many = vec![info.signatures[0].clone(); 17];
    let err = content_info(&content, info.digest, too_many).expect_err("too many signatures");
    assert!(err.to_string().contains("at most 16"), "{err}");
}

/// Feed `content` to a writer in pieces cut at `cuts`.
fn write_in_pieces<W: std::io::Write>(
    writer: &mut super::format::ArtifactWriter<W>,
    content: &[u8],
    cuts: &[usize],
) {
    let mut at = 0;
    for &cut in cuts.iter().chain([content.len()].iter()) {
        let cut = cut.min(content.len()).max(at);
        writer.write_content(&content[at..cut]).expect("write");
        at = cut;
    }
}

#[test]
fn streaming_writer_writes_the_same_file_and_describes_it_without_reading_back() {
    use super::format::ArtifactWriter;
    let f = fixture();
    let original = std::fs::read(&f.artifact).expect("artifact");
    let info = read_artifact(&f.artifact).expect("read");
    let content = super::format::read_content(&f.artifact, &info).expect("content");

    let mut writer = ArtifactWriter::new(Vec::new(), content.len() as u64).expect("new");
    write_in_pieces(&mut writer, &content, &[1, 3, 5, 200, 201]);
    assert_eq!(writer.content_written(), content.len() as u64);
    let (bytes, written) = writer.finish(info.signatures.clone()).expect("finish");
    assert_eq!(bytes, original, "byte for byte the packed file");
    assert_eq!(written.digest, info.digest);
    assert_eq!(written.manifest_text, info.manifest_text);
    assert_eq!(
        (written.payload_offset, written.payload_len),
        (info.payload_offset, info.payload_len)
    );
    f.trust.verify(&written, NOW).expect("signatures verify");

    // More than announced is refused, and so is finishing early.
    let mut writer = ArtifactWriter::new(Vec::new(), 4).expect("new");
    let err = writer.write_content(&[0; 5]).expect_err("too long");
    assert!(err.to_string().contains("1 more content bytes"), "{err}");
    writer.write_content(&[0, 0]).expect("within the length");
    let err = writer.finish(Vec::new()).expect_err("early");
    assert!(err.to_string().contains("byte 2 of 4"), "{err}");

    // Malformed manifests are refused with a reason.
    for (bad, why) in [
        (vec![0, 0], "no manifest length"),
        (vec![0, 0, 0, 9, b'x'], "out of range"),
        (vec![0xff, 0xff, 0xff, 0xff, 0], "out of range"),
        (vec![0, 0, 0, 2, 0xc3, 0x28], "not valid UTF-8"),
    ] {
        let mut writer = ArtifactWriter::new(Vec::new(), bad.len() as u64).expect("new");
        writer.write_content(&bad).expect("write");
        let err = writer.finish(Vec::new()).expect_err("malformed");
        assert!(err.to_string().contains(why), "{bad:?}: {err}");
    }
    let writer = ArtifactWriter::new(Vec::new(), content.len() as u64);
    let mut writer = writer.expect("new");
    writer.write_content(&content).expect("write");
    let err = writer
        .finish(vec![info.signatures[0].clone(); 17])
        .expect_err("too many signatures");
    assert!(err.to_string().contains("at most 16"), "{err}");
}

#[test]
fn streaming_writer_refuses_to_resume_a_file_of_another_artifact() {
    use super::format::ArtifactWriter;
    let mut first = ArtifactWriter::new(Vec::new(), 10).expect("new");
    first.write_content(&[1, 2, 3]).expect("write");
    let prefix = first.output().clone();
    // Another announced length, a cut header, too many content bytes.
    for (existing, len) in [
        (prefix.clone(), 11),
        (prefix[..10].to_vec(), 10),
        ([prefix.clone(), vec![0; 8]].concat(), 10),
    ] {
        let resumed = ArtifactWriter::resume(Vec::new(), Cursor::new(existing), len).expect("io");
        assert!(resumed.is_none());
    }
    let resumed = ArtifactWriter::resume(Vec::new(), Cursor::new(prefix), 10)
        .expect("io")
        .expect("a prefix of this artifact");
    assert_eq!(resumed.content_written(), 3);
}

proptest! {
    /// Whatever the content, the pieces it arrives in and where a transfer
    /// is cut and resumed, the writer produces the file `write_artifact`
    /// writes and describes it exactly as `read_artifact` does.
    #[test]
    fn streaming_writer_matches_write_and_read(
        manifest_extra in "[a-z ]{0,300}",
        payload in proptest::collection::vec(any::<u8>(), 0..4096),
        cuts in proptest::collection::vec(0usize..5000, 0..6),
        resume_at in proptest::option::of(0usize..5000),
    ) {
        use super::format::ArtifactWriter;
        let manifest = format!("{MANIFEST}description = \"{manifest_extra}\"\n");
        let content = encode_content(&manifest, &payload);
        let key = keys::generate().expect("key");
        let mut unsigned = Vec::new();
        write_artifact(&mut unsigned, &content, &[]).expect("write");
        let unsigned_info =
            read_artifact_from(Cursor::new(&unsigned), unsigned.len() as u64).expect("read");
        let signature = keys::sign(&unsigned_info, &key, NOW, None);
        let mut expected = Vec::new();
        write_artifact(&mut expected, &content, std::slice::from_ref(&signature)).expect("write");
        let expected_info =
            read_artifact_from(Cursor::new(&expected), expected.len() as u64).expect("read");

        let len = content.len() as u64;
        let mut writer = match resume_at {
            None => ArtifactWriter::new(Vec::new(), len).expect("new"),
            Some(at) => {
                // A first writer is cut after `at` bytes; a second one picks
                // up from what it left on "disk".
                let at = at.min(content.len());
                let mut first = ArtifactWriter::new(Vec::new(), len).expect("new");
                first.write_content(&content[..at]).expect("prefix");
                let on_disk = first.output().clone();
                let resumed = ArtifactWriter::resume(on_disk.clone(), Cursor::new(on_disk), len)
                    .expect("io")
                    .expect("resumable");
                prop_assert_eq!(resumed.content_written(), at as u64);
                resumed
            }
        };
        let mut cuts = cuts;
        cuts.sort_unstable();
        let at = writer.content_written() as usize;
        let cuts: Vec<usize> = cuts.iter().map(|c| (*c).max(at) - at).collect();
        write_in_pieces(&mut writer, &content[at..], &cuts);
        let (bytes, info) = writer.finish(vec![signature]).expect("finish");
        prop_assert_eq!(&bytes, &expected);
        prop_assert_eq!(info.digest, expected_info.digest);
        prop_assert_eq!(&info.manifest_text, &expected_info.manifest_text);
        prop_assert_eq!(&info.signatures, &expected_info.signatures);
        prop_assert_eq!(
            (info.content_offset, info.content_len, info.payload_offset, info.payload_len),
            (expected_info.content_offset, expected_info.content_len, expected_info.payload_offset, expected_info.payload_len)
        );
    }
}

/// Everything in `dir` whose name marks a staging file of `pack` or `sign`.
fn staging_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("list")
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .filter(|name| name.contains(".tmp."))
        .collect()
}

/// Streamed `pack` and `sign` write byte for byte the file the in-memory
/// writer gives for the same content and signatures, describe it as reading
/// it back would, and leave no staging file behind.
#[test]
fn streamed_pack_and_sign_write_the_same_bytes_as_the_in_memory_writer() {
    let f = fixture();
    let dir = f.root.join("hello");
    // A file bigger than every buffer on the way (tar, zstd, hashing).
    let big: Vec<u8> = (0..3 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(dir.join("big.bin"), &big).expect("big file");
    let out = f.root.join("streamed.hsm");
    let packed = pack_and_sign(&dir, &f.key, NOW, &out).expect("pack");

    let payload = pack_dir(&dir).expect("pack in memory").payload;
    let content = encode_content(MANIFEST, &payload);
    let mut expected = Vec::new();
    write_artifact(&mut expected, &content, &packed.signatures).expect("write");
    assert_eq!(std::fs::read(&out).expect("read"), expected);
    let read = read_artifact(&out).expect("read back");
    assert_eq!(format!("{packed:?}"), format!("{read:?}"));
    f.trust
        .verify(&packed, NOW)
        .expect("the signature verifies");

    let second = keys::generate().expect("key");
    let signed = add_signature(&out, &second, NOW, Some(NOW + 1000)).expect("sign");
    let mut expected = Vec::new();
    write_artifact(&mut expected, &content, &signed.signatures).expect("write");
    assert_eq!(std::fs::read(&out).expect("read"), expected);
    let read = read_artifact(&out).expect("read back");
    assert_eq!(format!("{signed:?}"), format!("{read:?}"));
    assert_eq!(signed.signatures.len(), 2);
    assert_eq!(staging_files(&f.root), Vec::<String>::new());
}

/// Signing a broken file fails without touching it or leaving a copy.
#[test]
fn signing_a_corrupt_artifact_leaves_it_alone() {
    let f = fixture();
    let mut bytes = std::fs::read(&f.artifact).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&f.artifact, &bytes).expect("corrupt");
    let err = add_signature(&f.artifact, &f.key, NOW, None).expect_err("corrupt");
    assert!(err.to_string().contains("integrity"), "{err}");
    assert_eq!(std::fs::read(&f.artifact).expect("read"), bytes);
    assert_eq!(staging_files(&f.root), Vec::<String>::new());
}
