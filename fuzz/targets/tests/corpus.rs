//! The stable share of fuzzing, run by `cargo test --workspace`: every file of
//! the committed corpus through its target, then, for a bounded number of
//! cases per target, arbitrary bytes and random mutations of corpus files
//! (bit flips, byte overwrites, truncations, insertions and splices).
//!
//! It finds regressions on inputs the fuzzer already reached, without
//! nightly. Finding new inputs is `make fuzz`'s job (docs/fuzzing.md).

use std::path::{Path, PathBuf};

use hotswap_fuzz_targets::{TARGETS, Target};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestRunner};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../corpus")
        .join(target)
}

/// Every file of a target's corpus, sorted by name so runs are comparable.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|entry| entry.expect("corpus entry").path())
        .filter(|path| path.is_file())
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).expect("corpus file");
            (path, bytes)
        })
        .collect()
}

/// Cases per target for each generated phase. The artifact and unpack
/// targets touch the disk for every input, so they get fewer; together the
/// whole file stays well under 20 seconds in a debug build.
fn cases(target: &str) -> u32 {
    match target {
        "artifact" | "unpack" => 192,
        _ => 1024,
    }
}

fn runner(target: &str) -> TestRunner {
    TestRunner::new(Config {
        cases: cases(target),
        // Nothing to persist: a failure prints the input, and a fixed input
        // belongs in the corpus, where every run replays it.
        failure_persistence: None,
        ..Config::default()
    })
}

fn each_target(test: impl Fn(&Target)) {
    for target in TARGETS {
        test(target);
    }
}

#[test]
fn every_corpus_file_replays() {
    each_target(|(name, body)| {
        let files = corpus(name);
        assert!(!files.is_empty(), "corpus of {name} is empty");
        for (path, bytes) in files {
            let outcome = std::panic::catch_unwind(|| body(&bytes));
            assert!(
                outcome.is_ok(),
                "target {name} panics on {}",
                path.display()
            );
        }
    });
}

#[test]
fn arbitrary_bytes_never_panic() {
    each_target(|(name, body)| {
        runner(name)
            .run(&proptest::collection::vec(any::<u8>(), 0..2048), |bytes| {
                body(&bytes);
                Ok(())
            })
            .unwrap_or_else(|e| panic!("target {name}: {e}"));
    });
}

/// One edit of a corpus file; positions are fractions of the current length.
#[derive(Clone, Debug)]
enum Mutation {
    FlipBit(Index, u8),
    SetByte(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    /// Replace `[at, at + len)` with a slice of another corpus file.
    Splice {
        at: Index,
        other: Index,
        from: Index,
        len: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit(at, bit)),
        3 => (any::<Index>(), any::<u8>()).prop_map(|(at, byte)| Mutation::SetByte(at, byte)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Mutation::Insert(at, bytes)),
        1 => (any::<Index>(), any::<Index>(), any::<Index>(), 1usize..256).prop_map(
            |(at, other, from, len)| Mutation::Splice { at, other, from, len }
        ),
    ]
}

fn apply(bytes: &mut Vec<u8>, mutation: &Mutation, corpus: &[(PathBuf, Vec<u8>)]) {
    // An index into `0..=len`, so edits may also land at the very end.
    let at = |index: &Index, len: usize| index.index(len + 1);
    match mutation {
        Mutation::FlipBit(index, bit) if !bytes.is_empty() => {
            let i = index.index(bytes.len());
            bytes[i] ^= 1 << bit;
        }
        Mutation::SetByte(index, byte) if !bytes.is_empty() => {
            let i = index.index(bytes.len());
            bytes[i] = *byte;
        }
        Mutation::FlipBit(..) | Mutation::SetByte(..) => {}
        Mutation::Truncate(index) => bytes.truncate(at(index, bytes.len())),
        Mutation::Insert(index, extra) => {
            let i = at(index, bytes.len());
            bytes.splice(i..i, extra.iter().copied());
        }
        Mutation::Splice {
            at: index,
            other,
            from,
            len,
        } => {
            let donor = &corpus[other.index(corpus.len())].1;
            let start = from.index(donor.len() + 1);
            let piece = &donor[start..(start + len).min(donor.len())];
            let i = at(index, bytes.len());
            let end = (i + piece.len()).min(bytes.len());
            bytes.splice(i..end, piece.iter().copied());
        }
    }
}

#[test]
fn mutated_corpus_files_never_panic() {
    each_target(|(name, body)| {
        let files = corpus(name);
        let strategy = (any::<Index>(), proptest::collection::vec(mutation(), 1..6));
        runner(name)
            .run(&strategy, |(pick, mutations)| {
                let mut bytes = files[pick.index(files.len())].1.clone();
                for m in &mutations {
                    apply(&mut bytes, m, &files);
                }
                body(&bytes);
                Ok(())
            })
            .unwrap_or_else(|e| panic!("target {name}: {e}"));
    });
}

/// The artifact target recomputes the integrity trailer so mutations reach
/// past it; check that the fix-up really makes a changed file pass the
/// integrity check, or the target would silently test only the trailer.
#[test]
fn trailer_fix_up_reaches_the_parser() {
    use hotswap_common::artifact::format::read_artifact_from;
    let read = |bytes: &[u8]| read_artifact_from(std::io::Cursor::new(bytes), bytes.len() as u64);
    let mut bytes = corpus("artifact")
        .into_iter()
        .map(|(_, bytes)| bytes)
        .find(|bytes| read(bytes).is_ok_and(|info| !info.signatures.is_empty()))
        .expect("a well-formed signed artifact in the corpus");
    // The last 64 bytes before the trailer are a signature: changing one
    // keeps the structure and breaks only the trailer.
    let in_signature = bytes.len() - 40;
    bytes[in_signature] ^= 1;
    let error = read(&bytes)
        .expect_err("a changed byte is detected")
        .to_string();
    assert!(error.contains("integrity"), "{error}");
    let fixed = hotswap_fuzz_targets::with_valid_trailer(&bytes).expect("long enough");
    read(&fixed).expect("a fixed-up file passes the integrity check");
}
