//! Fuzz target: `shadowpatch_fuzz::call` (see docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shadowpatch_fuzz::call(data));
