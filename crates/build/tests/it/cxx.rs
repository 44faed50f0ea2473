//! C++ (`tests/data/shapes`, built with g++ through the wrapper): a
//! member function, a virtual method called through the vtable and a
//! template instance in a header (a COMDAT group) replaced in the running
//! program and rolled back; a static function of an anonymous namespace
//! bound by its file; a new function in the patch; the template refused
//! when an object that may hold it inlined was not rebuilt; a function
//! with a catch refused.

use crate::common::{names, Fixture};
use crate::end_to_end::Running;
use shadowpatch_build::cxx::demangle;
use shadowpatch_build::{BuildError, Built};
use std::path::PathBuf;

/// Start the stripped program, build `diffs` against its PID, apply, ask
/// 3 (answers `before`, then `patched`), roll back, ask 3 (`after`).
fn patch_and_roll_back(fixture: &Fixture, diffs: &[PathBuf], answers: [&str; 3]) -> Built {
    let mut running = Running::start(&fixture.target_binary(true));
    assert_eq!(running.ask(3), answers[0]);
    let pid = running.child.id() as i32;
    let request = fixture.request(diffs, &pid.to_string(), "out");
    let built = shadowpatch_build::build(&request, &mut |_, _| {}).unwrap();
    let state = fixture.dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    shadowpatch_patch::apply(&state, pid, &built.manifest_path, &Default::default()).unwrap();
    assert_eq!(running.ask(3), answers[1]);
    shadowpatch_patch::rollback(&state, pid, None).unwrap();
    assert_eq!(running.ask(3), answers[2]);
    built
}

#[test]
fn cxx_member_function_is_replaced_in_the_running_program() {
    let fixture = Fixture::of("shapes");
    let diff = fixture.diff("step", "counter.cpp", "total_ += bump(x);", "total_ += bump(x) * 10;");
    // step(3) adds bump(3) = 4 to the running total: 4, then 4 + 40, then 48.
    let built = patch_and_roll_back(&fixture, &[diff], ["4 6 9 6", "44 6 9 6", "48 6 9 6"]);
    assert_eq!(names(&built.functions_changed), ["_ZN7Counter4stepEi"]);
    assert_eq!(demangle(&built.functions_changed[0].symbol), "Counter::step(int)");
    // The manifest names the mangled symbol; the anonymous namespace's
    // bump is bound to the running one, by its file.
    assert_eq!(built.manifest.replacements[0].symbol, "_ZN7Counter4stepEi");
    assert!(
        built
            .bindings
            .iter()
            .any(|b| b.symbol == "counter.cpp::_ZN12_GLOBAL__N_14bumpEi"),
        "{:?}",
        built.bindings
    );
}

#[test]
fn cxx_virtual_method_is_replaced_behind_an_unchanged_vtable() {
    let fixture = Fixture::of("shapes");
    let diff = fixture.diff("area", "shape.cpp", "return x * x;", "return x * x + 1000;");
    let built = patch_and_roll_back(&fixture, &[diff], ["4 6 9 6", "8 6 1009 6", "12 6 9 6"]);
    assert_eq!(names(&built.functions_changed), ["_ZNK6Square4areaEi"]);
    assert!(built.data_new.is_empty(), "{:?}", built.data_new);
}

#[test]
fn cxx_template_instance_in_a_header_is_replaced_once_when_every_includer_is_rebuilt() {
    let fixture = Fixture::of("shapes");
    let diff = fixture.diff("twice", "counter.h", ": x * 2;", ": x * 2 + 100;");
    // twice<int> is a COMDAT instance in main.o and counter.o; the running
    // program has one, called by main and by checked.
    let built = patch_and_roll_back(&fixture, &[diff], ["4 6 9 6", "8 106 9 106", "12 6 9 6"]);
    assert_eq!(names(&built.functions_changed), ["_Z5twiceIiET_S0_"]);
    assert_eq!(built.manifest.replacements.len(), 1);
}

#[test]
fn cxx_anonymous_namespace_function_is_replaced_by_its_file() {
    let fixture = Fixture::of("shapes");
    let diff = fixture.diff("bump", "counter.cpp", ": x + 1;", ": x + 2;");
    let built = patch_and_roll_back(&fixture, &[diff], ["4 6 9 6", "9 6 9 6", "13 6 9 6"]);
    assert_eq!(
        names(&built.functions_changed),
        ["counter.cpp::_ZN12_GLOBAL__N_14bumpEi"]
    );
}

#[test]
fn cxx_header_template_with_an_includer_not_rebuilt_is_refused() {
    let fixture = Fixture::of("shapes");
    let target = fixture.target_binary(false);
    let header = fixture.diff("twice", "counter.h", ": x * 2;", ": x * 2 + 100;");
    let main = fixture.diff("ready", "main.cpp", "\"ready\\n\"", "\"ready!\\n\"");
    // A build without header dependencies: only main.o is recompiled,
    // counter.o keeps whatever it had of the old twice<int>.
    let mut request = fixture.request(&[header, main], &target.display().to_string(), "out");
    request.build_command = Some("make HDRS=".into());
    let error = shadowpatch_build::build(&request, &mut |_, _| {}).unwrap_err();
    let BuildError::Refused { symbol, reason } = &error else {
        panic!("not refused: {error}");
    };
    assert_eq!(symbol, "int twice<int>(int)");
    assert!(reason.contains("COMDAT") && reason.contains("counter.o"), "{reason}");
    assert!(!request.out.exists());
}

#[test]
fn cxx_function_with_a_catch_is_refused() {
    let fixture = Fixture::of("shapes");
    let diff = fixture.diff("checked", "counter.cpp", "return -1;", "return -2;");
    let error = fixture
        .build(&[diff], &fixture.target_binary(false), "out")
        .unwrap_err();
    let BuildError::Refused { symbol, reason } = &error else {
        panic!("not refused: {error}");
    };
    assert!(symbol.starts_with("checked(int)"), "{symbol}");
    assert!(reason.contains("exception handling"), "{reason}");
}

#[test]
fn cxx_new_function_lives_in_the_patch() {
    let fixture = Fixture::of("shapes");
    let diff = fixture.diff(
        "triple",
        "counter.cpp",
        "int Counter::step(int x)\n{\n    total_ += bump(x);",
        "__attribute__((noinline)) static int triple(int x)\n{\n    return x > 100 ? x : x * 3;\n}\n\nint Counter::step(int x)\n{\n    total_ += triple(bump(x));",
    );
    let built = patch_and_roll_back(&fixture, &[diff], ["4 6 9 6", "16 6 9 6", "20 6 9 6"]);
    assert_eq!(names(&built.functions_changed), ["_ZN7Counter4stepEi"]);
    assert_eq!(names(&built.functions_new), ["counter.cpp::_ZL6triplei"]);
}
