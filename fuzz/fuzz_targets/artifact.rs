//! Fuzz target `artifact`: a whole .hsm file: structure, manifest, signatures, unpack of its payload.
//! The body is [`hotswap_fuzz_targets::artifact`], shared with the stable replay test.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hotswap_fuzz_targets::artifact(data));
