//! The default build command for CMake and Meson trees: the calc sources
//! with a CMakeLists.txt or a meson.build instead of the Makefile, the
//! target configured and built the usual way in a build folder of its
//! own, and `build` with no `--build-cmd`. Each patch must hold exactly
//! the function the diff changes, built from the patched source (a build
//! folder reused from the reference's copy would compile the reference's
//! sources and find no change).

use crate::common::{names, run, Fixture};
use std::process::Command;

/// The calc fixture with `file` (CMakeLists.txt or meson.build) as its
/// build description instead of the Makefile.
fn calc_with(file: &str, text: &str) -> Fixture {
    let fixture = Fixture::new();
    std::fs::remove_file(fixture.source.join("Makefile")).unwrap();
    std::fs::write(fixture.source.join(file), text).unwrap();
    fixture
}

/// Build two patches in a row (the second with the reference cached) and
/// check each holds the function its diff changes.
fn patches_build_with_the_default_command(fixture: &Fixture, target: &std::path::Path) {
    for (round, to) in ["return scale(x) + x +", "return scale(x) + 2 * x +"]
        .iter()
        .enumerate()
    {
        let diff = fixture.diff(&format!("d{round}"), "a.c", "return scale(x) +", to);
        let built = fixture
            .build(&[diff], target, &format!("out{round}"))
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(names(&built.functions_changed), vec!["compute"], "round {round}");
        assert_eq!(built.reference_cached, round == 1, "round {round}");
        assert!(built.out.join("patch.so").is_file());
    }
}

#[test]
fn a_cmake_tree_builds_with_the_default_command() {
    let fixture = calc_with(
        "CMakeLists.txt",
        "cmake_minimum_required(VERSION 3.13)\nproject(calc C)\n\
         add_executable(calc main.c a.c b.c)\ntarget_compile_options(calc PRIVATE -O2 -g)\n",
    );
    let shipped = fixture.dir.path().join("shipped");
    run(Command::new("cp").arg("-a").arg(&fixture.source).arg(&shipped));
    run(Command::new("cmake")
        .args(["-S", ".", "-B", "out", "-DCMAKE_BUILD_TYPE=None"])
        .current_dir(&shipped)
        .stdout(std::process::Stdio::null()));
    run(Command::new("cmake").args(["--build", "out"]).current_dir(&shipped));
    patches_build_with_the_default_command(&fixture, &shipped.join("out/calc"));
}

#[test]
fn a_meson_tree_builds_with_the_default_command() {
    let fixture = calc_with(
        "meson.build",
        "project('calc', 'c')\nexecutable('calc', 'main.c', 'a.c', 'b.c', c_args: ['-O2'])\n",
    );
    let shipped = fixture.dir.path().join("shipped");
    run(Command::new("cp").arg("-a").arg(&fixture.source).arg(&shipped));
    run(Command::new("meson")
        .args(["setup", "out"])
        .current_dir(&shipped)
        .stdout(std::process::Stdio::null()));
    run(Command::new("ninja")
        .args(["-C", "out"])
        .current_dir(&shipped)
        .stdout(std::process::Stdio::null()));
    patches_build_with_the_default_command(&fixture, &shipped.join("out/calc"));
}

/// A Rust target is refused before anything is built, in one line that
/// says what to do instead: a diff of a `.rs` file, or a Cargo tree with
/// no build command given. The target is a real rustc-built binary.
#[test]
fn rust_is_refused_in_one_line_with_what_to_do_instead() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("src")).unwrap();
    std::fs::write(
        tree.join("Cargo.toml"),
        "[package]\nname = \"hello\"\nversion = \"0.1.0\"\nedition = \"2021\"\n",
    )
    .unwrap();
    let main = "fn answer() -> u32 { 41 }\nfn main() { println!(\"{}\", answer()); }\n";
    std::fs::write(tree.join("src/main.rs"), main).unwrap();
    std::fs::write(tree.join("helper.c"), "int helper(void) { return 1; }\n").unwrap();
    let binary = dir.path().join("hello");
    run(Command::new("rustc")
        .args(["-O", "-o"])
        .arg(&binary)
        .arg(tree.join("src/main.rs")));
    let rust_diff = dir.path().join("answer.diff");
    std::fs::write(
        &rust_diff,
        "--- a/src/main.rs\n+++ b/src/main.rs\n@@ -1,2 +1,2 @@\n-fn answer() -> u32 { 41 }\n+fn answer() -> u32 { 42 }\n fn main() { println!(\"{}\", answer()); }\n",
    )
    .unwrap();
    let c_diff = dir.path().join("helper.diff");
    std::fs::write(
        &c_diff,
        "--- a/helper.c\n+++ b/helper.c\n@@ -1 +1 @@\n-int helper(void) { return 1; }\n+int helper(void) { return 2; }\n",
    )
    .unwrap();
    let request = |diff: &std::path::Path, out: &str| shadowpatch_build::BuildRequest {
        source: tree.clone(),
        diffs: vec![diff.to_path_buf()],
        target: binary.display().to_string(),
        out: dir.path().join(out),
        cache: Some(dir.path().join("cache")),
        ..Default::default()
    };
    let error = shadowpatch_build::build(&request(&rust_diff, "out-rs"), &mut |_, _| {}).unwrap_err();
    let text = error.to_string();
    assert!(matches!(error, shadowpatch_build::BuildError::Input(_)), "{text}");
    assert!(text.contains("changes the Rust file b/src/main.rs"), "{text}");
    assert!(
        text.contains("C and C++ code only") && text.contains("docs/writing-patches.md"),
        "{text}"
    );
    assert!(!text.contains('\n'), "one line: {text}");
    let error = shadowpatch_build::build(&request(&c_diff, "out-c"), &mut |_, _| {}).unwrap_err();
    let text = error.to_string();
    assert!(text.contains("a Cargo tree") && text.contains("--build-cmd"), "{text}");
    assert!(!dir.path().join("out-rs").exists() && !dir.path().join("out-c").exists());
    assert!(!dir.path().join("cache").join("logs").exists(), "nothing was built");
}
