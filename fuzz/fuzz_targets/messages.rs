//! Fuzz target `messages`: one protobuf message of the type the first byte picks, decoded and consumed.
//! The body is [`hotswap_fuzz_targets::messages`], shared with the stable replay test.

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| hotswap_fuzz_targets::messages(data));
