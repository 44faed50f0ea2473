//! Fuzz target: `shadowpatch_fuzz::signing` (see docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shadowpatch_fuzz::signing(data));
