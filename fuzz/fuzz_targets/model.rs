//! Fuzz target: `shadowpatch_fuzz::model` (see docs/fuzzing.md).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shadowpatch_fuzz::model(data));
