//! Stress: hot functions patched and rolled back again and again through
//! the full apply/rollback path (journal, staging generation, activation
//! stop) while 1, 8 and 64 threads call them in a loop, in C and in Rust.
//! The fixtures check every result: a wrong result or a crash fails the
//! test. The suite runs a bounded number of cycles; the long run (1,000
//! cycles per configuration, about 16 minutes on 2 cores) is `#[ignore]`d:
//! `cargo test -p shadowpatch-patch --test it stress -- --ignored`.

use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use shadowpatch_patch::{apply, rollback, ApplyOptions};
use std::path::Path;

/// Cycles per configuration in the suite: every cycle stops all threads
/// twice, so a few dozen already cross thousands of hot calls mid-flight.
const CYCLES: usize = 20;

/// Cycles per configuration of the long, ignored run.
const LONG_CYCLES: usize = 1000;

fn manifest(dir: &Path, target: &Running, patch: Patch, replacements: &[(&str, &str)]) -> std::path::PathBuf {
    let image = shadowpatch_symbols::ElfImage::open(&target.binary()).unwrap();
    let build_id = shadowpatch_symbols::hex(image.build_id.as_deref().unwrap());
    let mut text = format!(
        "id = \"stress\"\nobject = \"{}\"\n[target]\nbuild_id = \"{build_id}\"\n",
        build_patch(patch).unwrap().display()
    );
    for (symbol, with) in replacements {
        text.push_str(&format!("[[replace]]\nsymbol = \"{symbol}\"\nwith = \"{with}\"\n"));
    }
    let path = dir.join("stress.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn cycle(cycles: usize, fixture: Fixture, threads: usize, patch: Patch, replacements: &[(&str, &str)]) {
    let mut target = Running::start(fixture, &[&threads.to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let manifest = manifest(dir.path(), &target, patch, replacements);
    let mut pauses = Vec::with_capacity(2 * cycles);
    let check_every = (cycles / 10).max(1);
    for i in 0..cycles {
        let applied = apply(&state, target.pid(), &manifest, &ApplyOptions::default())
            .unwrap_or_else(|e| panic!("cycle {i}: apply: {e}"));
        let rolled = rollback(&state, target.pid(), None).unwrap_or_else(|e| panic!("cycle {i}: rollback: {e}"));
        pauses.push(applied.pause_us);
        pauses.push(rolled.pause_us);
        if i % check_every == 0 {
            let check = target.check().unwrap();
            assert_eq!(check["errors"], 0, "cycle {i}: {check:?}");
        }
    }
    let check = target.check().unwrap();
    assert_eq!(check["errors"], 0, "no wrong result in {cycles} cycles: {check:?}");
    assert!(check["patched"] > 0, "the patch really ran: {check:?}");
    assert!(target.is_running());
    pauses.sort_unstable();
    eprintln!(
        "{fixture:?} {threads} threads: {cycles} apply+rollback cycles, pause median {} µs, max {} µs",
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1]
    );
}

/// The configurations one after another: run side by side, 64 + 8 + 8
/// busy threads on two cores would starve each other and measure the
/// machine, not the patcher.
fn every_configuration(cycles: usize) {
    cycle(
        cycles,
        Fixture::BusyC,
        1,
        Patch::BusyFix,
        &[("work_fn", "work_fn_v2"), ("banner", "banner_v2")],
    );
    cycle(cycles, Fixture::BusyC, 8, Patch::BusyFix, &[("work_fn", "work_fn_v3")]);
    cycle(cycles, Fixture::BusyC, 64, Patch::BusyFix, &[("work_fn", "work_fn_v2")]);
    cycle(
        cycles,
        Fixture::BusyRust,
        8,
        Patch::RustFix,
        &[("rust_work", "rust_work_v2")],
    );
}

#[test]
fn hot_functions_survive_repeated_apply_rollback_cycles() {
    every_configuration(CYCLES);
}

#[test]
#[ignore = "long (about 16 min on 2 cores): run with --ignored, see docs/testing.md"]
fn hot_functions_survive_a_thousand_apply_rollback_cycles() {
    every_configuration(LONG_CYCLES);
}
