//! Fuzz target `manifest`: module.toml text through the manifest parser and variable expansion.
//! The body is [`hotswap_fuzz_targets::manifest`], shared with the stable replay test.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hotswap_fuzz_targets::manifest(data));
