//! The agent wire protocol's frame decoder: no panic, and the same items however the input
//! is split (see `relay_common::fuzzing::frames`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| relay_common::fuzzing::frames(data));
