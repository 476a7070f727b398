//! Fuzz target `unpack`: a bare tar archive, compressed and unpacked with the hardened unpack.
//! The body is [`hotswap_fuzz_targets::unpack`], shared with the stable replay test.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hotswap_fuzz_targets::unpack(data));
