//! End to end: apply, stack and roll back live patches on running C and
//! Rust fixtures through the real binary, and refuse every bad patch with
//! the target untouched.

use crate::common::{
    anonymous_code_mappings, anonymous_mappings, assert_untouched, build_id_of, shadowpatch, wait_for_patched,
    write_manifest,
};
use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use std::time::{Duration, Instant};

#[test]
fn c_patch_changes_answers_and_rollback_restores_them() {
    let mut target = Running::start(Fixture::BusyC, &["8"]).unwrap();
    let pid = target.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let object = build_patch(Patch::BusyFix).unwrap();
    let build_id = build_id_of(&target.binary());
    let manifest = write_manifest(
        dir.path(),
        "fix1",
        &object,
        &build_id,
        &[("work_fn", "work_fn_v2"), ("banner", "banner_v2")],
    );
    let mappings_before = anonymous_code_mappings(target.pid());
    assert_eq!(target.command("banner").unwrap(), "sample service v1");

    let applied = shadowpatch(&state, &["apply", &pid, manifest.to_str().unwrap(), "--json"]);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    let applied = applied.json();
    // The load's pages have the object's protections, page by page (it is
    // mapped with one and the others are set after), never writable and
    // executable at once.
    let object_bytes = std::fs::read(&object).unwrap();
    let expected = shadowpatch_patch::object::PatchObject::parse(&object, object_bytes)
        .unwrap()
        .page_protections();
    let status = shadowpatch(&state, &["status", &pid, "--json"]).json();
    let mapping = status["patches"][0]["mapping"].as_str().unwrap().to_string();
    let (base, len) = mapping.split_once('+').unwrap();
    let base = u64::from_str_radix(base.trim_start_matches("0x"), 16).unwrap();
    let len = u64::from_str_radix(len.trim_start_matches("0x"), 16).unwrap();
    let loaded: Vec<(u64, u64, String)> = anonymous_mappings(target.pid())
        .into_iter()
        .filter(|(start, end, _)| base <= *start && *end <= base + len)
        .collect();
    for (start, end, protection) in expected {
        let perms = format!(
            "{}{}{}",
            if protection & 1 != 0 { 'r' } else { '-' },
            if protection & 2 != 0 { 'w' } else { '-' },
            if protection & 4 != 0 { 'x' } else { '-' }
        );
        let (at, to) = (base + start, base + end);
        assert!(
            loaded
                .iter()
                .any(|(s, e, p)| *s <= at && to <= *e && p.starts_with(&perms)),
            "pages {start:#x}..{end:#x} of the object are not {perms}: {loaded:x?}"
        );
    }
    assert!(
        loaded.iter().all(|(_, _, p)| !(p.contains('w') && p.contains('x'))),
        "a writable code page: {loaded:x?}"
    );
    assert_eq!(applied["patch_id"], "fix1");
    assert_eq!(applied["generation"], 1);
    assert_eq!(applied["functions"].as_array().unwrap().len(), 2);
    assert!(applied["pause_us"].as_u64().unwrap() > 0);
    assert_eq!(target.command("banner").unwrap(), "sample service v2 (live-patched)");
    // work_fn_v2 reads the target's static variable `scale` (3).
    assert_eq!(target.command("ask 5").unwrap(), "1000016");
    wait_for_patched(&mut target, true);
    assert_eq!(
        shadowpatch(&state, &["verify", &pid]).code,
        0,
        "generation 1 verifies clean"
    );
    let status = shadowpatch(&state, &["status", &pid, "--json"]).json();
    assert_eq!(status["patches"][0]["id"], "fix1");

    let rolled = shadowpatch(&state, &["rollback", &pid, "--json"]);
    assert_eq!(rolled.code, 0, "{}{}", rolled.stdout, rolled.stderr);
    let rolled = rolled.json();
    assert_eq!(rolled["patch_id"], "fix1");
    assert_eq!(rolled["generation"], 0);
    assert!(rolled["pause_us"].as_u64().unwrap() > 0);
    if rolled["unmapped"] == false {
        // A preempted worker was still inside the patch: the mapping was
        // retired; `recover` (like any later transaction) unmaps it once free.
        let deadline = Instant::now() + Duration::from_secs(20);
        while shadowpatch(&state, &["recover", &pid, "--json"]).json()["retired_left"] != 0 {
            assert!(Instant::now() < deadline, "retired mapping never collected");
        }
    }
    assert_eq!(target.command("banner").unwrap(), "sample service v1");
    assert_eq!(target.command("ask 5").unwrap(), "16");
    wait_for_patched(&mut target, false);
    assert_eq!(
        shadowpatch(&state, &["verify", &pid]).code,
        0,
        "generation 0 verifies clean"
    );
    crate::common::assert_patch_memory_released(&state, target.pid(), mappings_before);
    assert_untouched(target.pid());
}

#[test]
fn patches_stack_and_roll_back_last_in_first_out() {
    let mut target = Running::start(Fixture::BusyC, &["4"]).unwrap();
    let pid = target.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let object = build_patch(Patch::BusyFix).unwrap();
    let build_id = build_id_of(&target.binary());
    let first = write_manifest(dir.path(), "first", &object, &build_id, &[("work_fn", "work_fn_v2")]);
    // The second replaces the same function again, calling the target's static scaled().
    let second = write_manifest(dir.path(), "second", &object, &build_id, &[("work_fn", "work_fn_v3")]);
    assert_eq!(shadowpatch(&state, &["apply", &pid, first.to_str().unwrap()]).code, 0);
    let applied = shadowpatch(&state, &["apply", &pid, second.to_str().unwrap(), "--json"]).json();
    assert_eq!(applied["generation"], 2);
    assert_eq!(target.command("ask 5").unwrap(), "1000016");
    wait_for_patched(&mut target, true);
    assert_eq!(shadowpatch(&state, &["verify", &pid]).code, 0);

    // Duplicate ids are refused.
    let again = shadowpatch(&state, &["apply", &pid, first.to_str().unwrap()]);
    crate::common::assert_bad_input(&again, "already active");

    // The first lies under the second: refused, exit 1, nothing changes.
    let refused = shadowpatch(&state, &["rollback", &pid, "first"]);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("lies under later patches (second)"),
        "{}",
        refused.stderr
    );
    assert_eq!(target.command("ask 5").unwrap(), "1000016");

    let rolled = shadowpatch(&state, &["rollback", &pid, "--json"]).json();
    assert_eq!(
        (rolled["patch_id"].as_str(), rolled["generation"].as_u64()),
        (Some("second"), Some(1))
    );
    assert_eq!(
        target.command("ask 5").unwrap(),
        "1000016",
        "the first patch is active again"
    );
    assert_eq!(shadowpatch(&state, &["verify", &pid]).code, 0);
    let rolled = shadowpatch(&state, &["rollback", &pid, "first", "--json"]).json();
    assert_eq!(rolled["generation"], 0);
    assert_eq!(target.command("ask 5").unwrap(), "16");
    assert_eq!(shadowpatch(&state, &["verify", &pid]).code, 0);
    crate::common::assert_bad_input(&shadowpatch(&state, &["rollback", &pid]), "no active patch");
    assert_eq!(target.check().unwrap()["errors"], 0);
}

#[test]
fn rust_cdylib_patch_replaces_a_rust_function() {
    let mut target = Running::start(Fixture::BusyRust, &["4"]).unwrap();
    let pid = target.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let object = build_patch(Patch::RustFix).unwrap();
    let manifest = write_manifest(
        dir.path(),
        "rust-fix",
        &object,
        &build_id_of(&target.binary()),
        &[("rust_work", "rust_work_v2")],
    );
    let applied = shadowpatch(&state, &["apply", &pid, manifest.to_str().unwrap(), "--json"]);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    assert_eq!(target.command("ask 5").unwrap(), "1000016");
    wait_for_patched(&mut target, true);
    assert_eq!(shadowpatch(&state, &["rollback", &pid]).code, 0);
    assert_eq!(target.command("ask 5").unwrap(), "16");
    wait_for_patched(&mut target, false);
    assert_eq!(shadowpatch(&state, &["verify", &pid]).code, 0);
}

/// Every refusal: the right exit code and message, and the target exactly
/// as it was (same answers, no new mapping, not traced, verify clean).
#[test]
fn bad_patches_are_refused_and_the_target_is_untouched() {
    let mut target = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let pid = target.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let good = build_patch(Patch::BusyFix).unwrap();
    let build_id = build_id_of(&target.binary());
    assert_eq!(shadowpatch(&state, &["mirror", &pid]).code, 0);
    let mappings = anonymous_code_mappings(target.pid());

    let garbage = dir.path().join("garbage.so");
    std::fs::write(&garbage, b"\x7fELF this is not really an ELF file").unwrap();
    let truncated = dir.path().join("truncated.so");
    std::fs::write(&truncated, &std::fs::read(&good).unwrap()[..300]).unwrap();
    let wrong_arch = dir.path().join("aarch64.so");
    let mut bytes = std::fs::read(&good).unwrap();
    bytes[18] = 183; // e_machine = EM_AARCH64
    std::fs::write(&wrong_arch, bytes).unwrap();
    let executable = target.binary();

    let cases: Vec<(std::path::PathBuf, i32, &str)> = vec![
        (
            write_manifest(dir.path(), "a", &good, "00ff00ff00ff", &[("work_fn", "work_fn_v2")]),
            2,
            "has build-id 00ff00ff00ff",
        ),
        (
            write_manifest(dir.path(), "b", &good, &build_id, &[("no_such_fn", "work_fn_v2")]),
            2,
            "no symbol no_such_fn in busy",
        ),
        (
            write_manifest(dir.path(), "c", &good, &build_id, &[("work_fn", "no_such_v2")]),
            2,
            "no symbol no_such_v2 in",
        ),
        (
            write_manifest(dir.path(), "d", &good, &build_id, &[("scale", "work_fn_v2")]),
            2,
            "scale in busy",
        ),
        (
            write_manifest(dir.path(), "e", &garbage, &build_id, &[("work_fn", "work_fn_v2")]),
            2,
            "malformed ELF",
        ),
        (
            write_manifest(dir.path(), "f", &truncated, &build_id, &[("work_fn", "work_fn_v2")]),
            2,
            "truncated.so",
        ),
        (
            write_manifest(dir.path(), "g", &wrong_arch, &build_id, &[("work_fn", "work_fn_v2")]),
            2,
            "only x86_64",
        ),
        (
            write_manifest(dir.path(), "h", &executable, &build_id, &[("work_fn", "work_fn")]),
            2,
            "build with -shared",
        ),
        (
            write_manifest(
                dir.path(),
                "i",
                &build_patch(Patch::BadTls).unwrap(),
                &build_id,
                &[("work_fn", "work_fn_v2")],
            ),
            2,
            "thread-local",
        ),
        (
            write_manifest(
                dir.path(),
                "j",
                &build_patch(Patch::BadCtor).unwrap(),
                &build_id,
                &[("work_fn", "work_fn_v2")],
            ),
            2,
            "constructor setup",
        ),
        (
            write_manifest(
                dir.path(),
                "k",
                &build_patch(Patch::BadUnresolved).unwrap(),
                &build_id,
                &[("work_fn", "work_fn_v2")],
            ),
            2,
            "cannot resolve symbol no_such_function_anywhere",
        ),
        (
            write_manifest(dir.path(), "l", &good, &build_id, &[("tiny", "tiny_v2")]),
            1,
            "shorter than the 5-byte jump",
        ),
        (
            write_manifest(dir.path(), "m", &good, &build_id, &[("branchy", "branchy_v2")]),
            1,
            "inside the 5 bytes",
        ),
        (
            write_manifest(
                dir.path(),
                "n",
                &dir.path().join("missing.so"),
                &build_id,
                &[("work_fn", "work_fn_v2")],
            ),
            2,
            "cannot read",
        ),
    ];
    for (manifest, code, needle) in cases {
        let run = shadowpatch(&state, &["apply", &pid, manifest.to_str().unwrap()]);
        assert_eq!(run.code, code, "{}: {}", manifest.display(), run.stderr);
        let lines: Vec<&str> = run.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {}", run.stderr);
        assert!(lines[0].contains(needle), "{:?} should mention {needle:?}", lines[0]);
    }
    // Manifest problems.
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        "id = \"x\"\nobject = \"a.so\"\n[target]\nbuild_id = \"abcd\"\nmodule = \"m\"\ncolour = 1\n",
    )
    .unwrap();
    crate::common::assert_bad_input(
        &shadowpatch(&state, &["apply", &pid, broken.to_str().unwrap()]),
        "unknown field `colour`",
    );
    std::fs::write(&broken, "id = \"x\"\n").unwrap();
    crate::common::assert_bad_input(
        &shadowpatch(&state, &["apply", &pid, broken.to_str().unwrap()]),
        "missing field",
    );
    crate::common::assert_bad_input(
        &shadowpatch(&state, &["apply", &pid, "/nonexistent/m.toml"]),
        "/nonexistent/m.toml",
    );
    crate::common::assert_bad_input(
        &shadowpatch(&state, &["apply", "2147483646", broken.to_str().unwrap()]),
        "no process",
    );

    assert_eq!(anonymous_code_mappings(target.pid()), mappings, "nothing left mapped");
    assert_eq!(target.command("ask 5").unwrap(), "16");
    assert_eq!(shadowpatch(&state, &["verify", &pid]).code, 0);
    assert_eq!(target.check().unwrap()["errors"], 0);
    assert_untouched(target.pid());
}

#[test]
fn a_target_exiting_mid_apply_is_a_one_line_error() {
    let target = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let pid = target.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let manifest = write_manifest(
        dir.path(),
        "doomed",
        &build_patch(Patch::BusyFix).unwrap(),
        &build_id_of(&target.binary()),
        &[("work_fn", "work_fn_v2")],
    );
    let run = crate::common::shadowpatch_env(
        &state,
        &["apply", &pid, manifest.to_str().unwrap()],
        &[("SHADOWPATCH_FAULT_TARGET", "loaded")],
    );
    assert_eq!(run.code, 3, "{}", run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {}", run.stderr);
    assert!(
        lines[0].contains(&format!("pid {pid}")) && lines[0].contains("exited"),
        "{}",
        lines[0]
    );
}
