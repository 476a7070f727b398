//! The bodies of hotswap's fuzz targets, as plain functions on stable Rust:
//! the module manifest parser ([`manifest`]), the `.hsm` artifact reader with
//! signature verification and hardened unpack ([`artifact`], [`unpack`]), and
//! the decoding of every protobuf message a hotswap process receives, with
//! the validation and conversion code in `hotswap-common` that consumes them
//! ([`messages`]). It also owns the builders of the seed corpora ([`seeds`]).
//!
//! The cargo-fuzz harness in `fuzz/` (nightly, outside the workspace) only
//! forwards libFuzzer's input to these functions, and `tests/corpus.rs`
//! replays the committed corpus and random mutations of it through them on
//! stable, so `cargo test --workspace` catches a regression without nightly.
//!
//! Every function accepts any byte string. Returning is success; a panic is a
//! bug, either in the code under test or in one of the invariants asserted
//! here (for example: an unpack never creates anything outside its
//! destination directory).

mod artifact_target;
mod manifest_target;
mod messages_target;
pub mod seeds;

pub use artifact_target::{
    FUZZ_NOW_MS, FUZZ_PUBLISHER_SEED, UNPACK_LIMITS, artifact, fuzz_publisher_key, unpack,
    with_valid_trailer,
};
pub use manifest_target::manifest;
pub use messages_target::{MESSAGE_KINDS, MessageKind, messages};

/// A target: its name (the cargo-fuzz target and corpus directory) and body.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, in the order `make fuzz` runs them.
pub const TARGETS: &[Target] = &[
    ("manifest", manifest),
    ("artifact", artifact),
    ("unpack", unpack),
    ("messages", messages),
];
