//! The reference build of the installed memcached: its own debian/rules
//! in a copy of the fetched tree, loading the installed bytes; then, with
//! the archive's headers of a build dependency installed here at a
//! version the archive no longer has, the installed build-id exactly.
//! Two builds, about a minute on two shared cores (the source is cached).
//! A tree whose build dependencies are missing is refused in one line.

use std::path::Path;

use shadowpatch_debsrc::{check_build_deps, reproduce, BinaryMatch, BuildDepsError, Progress, ReferenceOptions, Step};
use shadowpatch_failure::Classify;

use crate::common::{cache_dir, memcached_source, MEMCACHED};

#[test]
fn memcached_rebuilt_with_its_own_rules_reproduces_the_installed_build_id() {
    let source = memcached_source();
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let options = ReferenceOptions::new(work.path().join("reference"));
    let mut built_lines = 0;
    let mut steps = Vec::new();
    let mut progress = |progress| match progress {
        Progress::Output(_) => built_lines += 1,
        Progress::Started(step) => steps.push(step),
        Progress::Finished(..) => {}
    };
    let reproduction = reproduce(
        &source.dir,
        Path::new(MEMCACHED),
        &options,
        &cache_dir(),
        3,
        &mut progress,
    )
    .unwrap();
    eprintln!("memcached reproduction: {:#?}", reproduction.tries);
    assert!(built_lines > 0);
    assert!(
        steps.iter().any(|step| matches!(step, Step::Building { .. })),
        "{steps:?}"
    );
    // The plain rebuild loads the installed bytes whatever its build-id.
    assert_ne!(reproduction.tries[0].how, BinaryMatch::None, "{:?}", reproduction.tries);
    let build = &reproduction.build;
    assert_eq!(
        build.how,
        BinaryMatch::BuildId,
        "{:?} stale: {:?}",
        reproduction.tries,
        reproduction.stale
    );
    assert_eq!(reproduction.overlay.is_some(), reproduction.tries.len() > 1);
    let matched = build.matched.clone().unwrap();
    assert_eq!(matched.path, build.tree.join("memcached"));
    assert_eq!(matched.build_id.as_deref(), Some(build.target_build_id.as_str()));
    // Before dh_strip: symbols and DWARF for the stripped installed binary.
    assert!(matched.has_symtab && matched.has_debug_info, "{matched:?}");
    // The cached source tree itself was not built in.
    assert!(!source.dir.join("memcached").exists());

    let again = reproduce(
        &source.dir,
        Path::new(MEMCACHED),
        &options,
        &cache_dir(),
        3,
        &mut |_| {},
    )
    .unwrap();
    assert!(again.build.reused);
    assert_eq!(again.build.matched, build.matched);
    assert_eq!(again.overlay, reproduction.overlay);
}

#[test]
fn missing_build_dependencies_are_named_in_one_line() {
    let tree = tempfile::tempdir().unwrap();
    std::fs::create_dir(tree.path().join("debian")).unwrap();
    std::fs::write(
        tree.path().join("debian/control"),
        "Source: demo\nBuild-Depends: shadowpatch-no-such-package (>= 1), libc6-dev\n\nPackage: demo\nArchitecture: any\nDescription: demo\n demo\n",
    )
    .unwrap();
    let error = check_build_deps(tree.path()).unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, BuildDepsError::Unmet { .. }), "{message}");
    assert!(message.contains("shadowpatch-no-such-package (>= 1)"), "{message}");
    assert!(!message.contains("libc6-dev"), "installed, so not missing: {message}");
    assert!(!message.contains('\n'), "{message}");
    assert!(error.is_bad_input());

    let not_debian = check_build_deps(Path::new("/tmp")).unwrap_err();
    assert!(
        matches!(not_debian, BuildDepsError::NotDebianTree { .. }),
        "{not_debian}"
    );
}

/// The overlay filter reads which headers a binary was compiled from: a
/// header the program includes is listed (as the path gcc opened), one it
/// does not include is not, and a binary without line tables gives `None`
/// (nothing can then be ruled out).
#[test]
fn compiled_files_lists_the_headers_a_binary_was_built_from() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("main.c");
    std::fs::write(
        &source,
        "#include <stdio.h>\nint main(void) { return puts(\"x\") < 0; }\n",
    )
    .unwrap();
    let compile = |flags: &[&str], out: &str| {
        let status = std::process::Command::new("gcc")
            .args(flags)
            .arg("-o")
            .arg(dir.path().join(out))
            .arg(&source)
            .status()
            .unwrap();
        assert!(status.success(), "gcc {flags:?}");
        dir.path().join(out)
    };
    let with_debug = compile(&["-O2", "-g"], "with-debug");
    let files = shadowpatch_debsrc::compiled_files(&with_debug).expect("line tables");
    assert!(
        files.contains(std::path::Path::new("/usr/include/stdio.h")),
        "{files:?}"
    );
    assert!(files.iter().any(|f| f.ends_with("main.c")), "{files:?}");
    assert!(
        !files.contains(std::path::Path::new("/usr/include/zlib.h")),
        "{files:?}"
    );
    let without = compile(&["-O2"], "without-debug");
    assert_eq!(shadowpatch_debsrc::compiled_files(&without), None);
}
