//! The reference build of the installed memcached: its own debian/rules
//! in a copy of the fetched tree, then the unstripped binary that matches
//! the installed one, by build-id or by every loaded byte. Takes about a
//! minute on two cores (the build; the source is cached). A tree whose
//! build dependencies are missing is refused in one line.

use std::path::Path;

use shadowpatch_debsrc::{
    check_build_deps, reference_build, BinaryMatch, BuildDepsError, Progress, ReferenceOptions, Step,
};
use shadowpatch_failure::Classify;

use crate::common::{memcached_source, MEMCACHED};

#[test]
fn memcached_rebuilt_with_its_own_rules_matches_the_installed_binary() {
    let source = memcached_source();
    let work = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let options = ReferenceOptions::new(work.path().join("reference"));
    let mut built_lines = 0;
    let mut steps = Vec::new();
    let build = reference_build(
        &source.dir,
        Path::new(MEMCACHED),
        &options,
        &mut |progress| match progress {
            Progress::Output(_) => built_lines += 1,
            Progress::Started(step) => steps.push(step),
            Progress::Finished(..) => {}
        },
    )
    .unwrap();
    assert!(!build.reused);
    assert!(built_lines > 0);
    assert!(
        steps.iter().any(|step| matches!(step, Step::Building { .. })),
        "{steps:?}"
    );
    assert_ne!(
        build.how,
        BinaryMatch::None,
        "no rebuilt binary loads the installed bytes: {:?}",
        build.binaries
    );
    let matched = build.matched.clone().unwrap();
    assert_eq!(matched.path, build.tree.join("memcached"));
    // Before dh_strip: symbols and DWARF for the stripped installed binary.
    assert!(matched.has_symtab && matched.has_debug_info, "{matched:?}");
    eprintln!(
        "memcached reference build: {:.1} s, match by {:?}, rebuilt build-id {:?}, installed {}",
        build.build_seconds, build.how, matched.build_id, build.target_build_id
    );
    // The source tree itself was not built in.
    assert!(!source.dir.join("memcached").exists());

    let again = reference_build(&source.dir, Path::new(MEMCACHED), &options, &mut |_| {}).unwrap();
    assert!(again.reused);
    assert_eq!(again.matched, build.matched);
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
