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
