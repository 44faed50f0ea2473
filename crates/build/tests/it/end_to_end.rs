//! The whole path on a running, stripped program: build against its PID
//! (symbols from the reference rebuild, whose build-id is the target's),
//! apply, see the new behaviour, roll back.

use crate::common::{names, Fixture};
use shadowpatch_build::target::SymbolOrigin;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

pub struct Running {
    pub child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
}

impl Running {
    pub fn start(binary: &std::path::Path) -> Running {
        let mut child = Command::new(binary)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        let mut output = BufReader::new(child.stdout.take().unwrap());
        let mut ready = String::new();
        output.read_line(&mut ready).unwrap();
        assert_eq!(ready, "ready\n");
        Running { child, input, output }
    }

    pub fn ask(&mut self, x: i32) -> String {
        writeln!(self.input, "{x}").unwrap();
        let mut answer = String::new();
        self.output.read_line(&mut answer).unwrap();
        answer.trim_end().to_string()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `binary`, build the counter diff against its PID, apply, see
/// compute() add a.c's running `counter` (not b.c's), roll back.
fn patch_and_roll_back(fixture: &Fixture, binary: &std::path::Path) -> shadowpatch_build::Built {
    let mut running = Running::start(binary);
    assert_eq!(running.ask(3), "6 1 10");
    let pid = running.child.id() as i32;
    let diff = fixture.diff(
        "counter",
        "a.c",
        "return scale(x) +",
        "return scale(x) + counter * 100 +",
    );
    let request = fixture.request(&[diff], &pid.to_string(), "out");
    let built = shadowpatch_build::build(&request, &mut |_, _| {}).unwrap();
    assert_eq!(names(&built.functions_changed), vec!["compute"]);
    let state = fixture.dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    shadowpatch_patch::apply(&state, pid, &built.manifest_path, &Default::default()).unwrap();
    assert_eq!(running.ask(3), "206 2 10");
    shadowpatch_patch::rollback(&state, pid, None).unwrap();
    assert_eq!(running.ask(3), "6 3 10");
    built
}

#[test]
fn stripped_process_is_patched_through_the_reference_rebuild() {
    let fixture = Fixture::new();
    let built = patch_and_roll_back(&fixture, &fixture.target_binary(true));
    assert_eq!(
        built.reference_build_id.as_deref(),
        Some(built.target_build_id.as_str())
    );
    let counter = built.bindings.iter().find(|b| b.symbol == "a.c::counter").unwrap();
    assert_eq!(counter.how, SymbolOrigin::ReferenceBuild);
}

#[test]
fn stripped_process_of_another_build_id_is_matched_function_by_function() {
    let fixture = Fixture::new();
    // Without the Makefile's -ffile-prefix-map the build folder lands in
    // the DWARF and the build-id differs; the code is the same.
    let built = patch_and_roll_back(&fixture, &fixture.target_binary_with(true, Some("-O2 -g")));
    assert_ne!(
        built.reference_build_id.as_deref(),
        Some(built.target_build_id.as_str())
    );
    let counter = built.bindings.iter().find(|b| b.symbol == "a.c::counter").unwrap();
    assert_eq!(counter.how, SymbolOrigin::MaskedMatch);
}

#[test]
fn switch_jump_table_string_literal_and_global_work_in_the_patch() {
    let fixture = Fixture::new();
    let mut running = Running::start(&fixture.target_binary(true));
    assert_eq!(running.ask(1), "2 1 10");
    let pid = running.child.id() as i32;
    // A jump table (copied .rodata relocated back into the copied code), a
    // string literal, the global `limit` and the static `counter`.
    let diff = fixture.diff(
        "switch",
        "a.c",
        "    return scale(x) +",
        "    switch (x) {\n    case 1: return 101;\n    case 2: return 202 + limit;\n    case 3: return 303 + counter;\n    case 4: return 404;\n    case 5: return 505;\n    case 6: return 606;\n    case 7: return (int)__builtin_strlen(x > 0 ? \"seven\" : \"neg\");\n    default: break;\n    }\n    return scale(x) +",
    );
    let request = fixture.request(&[diff], &pid.to_string(), "out");
    let built = shadowpatch_build::build(&request, &mut |_, _| {}).unwrap();
    assert!(built.bindings.iter().any(|b| b.symbol == "limit"));
    let state = fixture.dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    shadowpatch_patch::apply(&state, pid, &built.manifest_path, &Default::default()).unwrap();
    let answers: Vec<String> = [1, 2, 3, 7, 9].into_iter().map(|x| running.ask(x)).collect();
    assert_eq!(answers, ["101 2 10", "212 3 10", "307 4 10", "5 5 10", "18 6 10"]);
    shadowpatch_patch::rollback(&state, pid, None).unwrap();
    assert_eq!(running.ask(2), "4 7 10");
}
