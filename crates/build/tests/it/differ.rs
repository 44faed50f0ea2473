//! What build decides for each kind of change, on real gcc builds.

use crate::common::{names, Fixture};
use shadowpatch_build::BuildError;

#[test]
fn changed_function_binds_same_named_statics_by_file() {
    let fixture = Fixture::new();
    let target = fixture.target_binary(false);
    let diff = fixture.diff(
        "triple",
        "a.c",
        "return scale(x) +",
        "return scale(x) + counter * 0 + x +",
    );
    let built = fixture.build(&[diff], &target, "out").unwrap();
    assert_eq!(names(&built.functions_changed), vec!["compute"]);
    assert!(built.functions_new.is_empty());
    // compute uses a.c's counter and its own static local, never b.c's.
    let bound: Vec<&str> = built.bindings.iter().map(|b| b.symbol.as_str()).collect();
    assert!(bound.contains(&"a.c::counter"), "{bound:?}");
    assert!(bound.iter().any(|b| b.starts_with("a.c::calls")), "{bound:?}");
    assert!(!bound.iter().any(|b| b.starts_with("b.c::")), "{bound:?}");
    let manifest = std::fs::read_to_string(built.out.join("manifest.toml")).unwrap();
    assert!(manifest.contains("symbol = \"compute\""), "{manifest}");
    assert!(built.out.join("patch.so").is_file());
}

#[test]
fn new_function_and_inlined_callee() {
    let fixture = Fixture::new();
    let target = fixture.target_binary(false);
    // A tree handed over already built: its objects are rebuilt in the copies.
    crate::common::run(
        std::process::Command::new("make")
            .arg("-s")
            .current_dir(&fixture.source),
    );
    let inlined = fixture.diff("scale", "a.c", "return x * 2;", "return x * 3;");
    let built = fixture.build(&[inlined], &target, "inlined").unwrap();
    assert!(built.functions_changed.is_empty(), "{:?}", built.functions_changed);
    assert_eq!(names(&built.functions_included_for_inlining), vec!["compute"]);
    // Where scale's inlined code is inside compute, from the patched
    // object's DWARF: inside compute, not all of it.
    let changed = &built.manifest.replacements[0].changed_code;
    assert!(!changed.is_empty(), "{:?}", built.notes);
    assert!(
        changed.iter().all(|r| r.function == "scale" && r.size > 0),
        "{changed:?}"
    );
    let with = shadowpatch_patch::object::PatchObject::parse(
        &built.out.join("patch.so"),
        std::fs::read(built.out.join("patch.so")).unwrap(),
    )
    .unwrap();
    let compute = with.function(&built.manifest.replacements[0].with).unwrap();
    let covered: u64 = changed.iter().map(|r| r.size).sum();
    assert!(changed.iter().all(|r| r.offset + r.size <= compute.size) && covered < compute.size);

    let new = fixture.diff(
        "helper",
        "a.c",
        "int compute(int x)\n{",
        "__attribute__((noinline)) int offset(int x)\n{\n    return x + 7;\n}\n\nint compute(int x)\n{\n    x = offset(x);",
    );
    let built = fixture.build(&[new], &target, "new").unwrap();
    assert_eq!(names(&built.functions_new), vec!["offset"]);
    assert_eq!(names(&built.functions_changed), vec!["compute"]);
}

#[test]
fn line_number_only_is_no_functional_change() {
    let fixture = Fixture::new();
    let target = fixture.target_binary(false);
    // Two lines more above compute: its assert passes another __LINE__.
    let diff = fixture.diff(
        "lines",
        "a.c",
        "int limit = 10;\n",
        "int limit = 10;\n\n/* a comment */\n",
    );
    let error = fixture.build(&[diff], &target, "out").unwrap_err();
    assert!(matches!(error, BuildError::NoFunctionalChange { .. }), "{error}");
    assert!(error.to_string().contains("compute"), "{error}");
    assert!(!fixture.dir.path().join("out").exists());
}

#[test]
fn changed_initial_value_is_refused() {
    let fixture = Fixture::new();
    let target = fixture.target_binary(false);
    let diff = fixture.diff("limit", "a.c", "int limit = 10;", "int limit = 20;");
    let error = fixture.build(&[diff], &target, "out").unwrap_err();
    assert!(
        error.to_string().starts_with("refused: limit: initial value changed"),
        "{error}"
    );
    assert!(!fixture.dir.path().join("out").exists());
}

#[test]
fn bad_inputs_are_one_line_errors() {
    let fixture = Fixture::new();
    let target = fixture.target_binary(false);
    let stale = fixture.diff("stale", "a.c", "return x * 2;", "return x * 3;");
    let text = std::fs::read_to_string(&stale).unwrap().replace("x * 2", "x * 5");
    std::fs::write(&stale, text).unwrap();
    let error = fixture.build(&[stale], &target, "out").unwrap_err();
    assert!(matches!(error, BuildError::DiffDoesNotApply { .. }), "{error}");
    assert!(
        error.to_string().contains("file a.c") && error.to_string().contains("Hunk #1"),
        "{error}"
    );
    // Found before any build: no reference was built or cached.
    let cache = fixture.dir.path().join("cache");
    let built: Vec<_> = std::fs::read_dir(&cache)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| name.starts_with("reference-"))
                .collect()
        })
        .unwrap_or_default();
    assert!(
        built.is_empty(),
        "a reference was built for a diff that does not apply: {built:?}"
    );

    let broken = fixture.diff("broken", "a.c", "return x * 2;", "return x * ;");
    let error = fixture.build(&[broken], &target, "out").unwrap_err();
    let message = error.to_string();
    assert!(
        message.starts_with("build failed: `make -j2`") && message.contains("log: "),
        "{message}"
    );

    // A binary this tree did not build: the reference matches nothing of it.
    let other = fixture.diff("other", "a.c", "x * 2", "x * 6");
    let error = fixture
        .build(
            std::slice::from_ref(&other),
            std::path::Path::new("/usr/bin/true"),
            "out",
        )
        .unwrap_err();
    assert!(matches!(error, BuildError::Mismatch(_)), "{error}");
    // A module the process does not have.
    let mut request = fixture.request(&[other], &std::process::id().to_string(), "out");
    request.module = Some("no-such-module".into());
    let error = shadowpatch_build::build(&request, &mut |_, _| {}).unwrap_err();
    assert!(matches!(error, BuildError::ModuleNotFound { .. }), "{error}");

    for error in [
        fixture.build(
            &[fixture.diff("ok", "a.c", "x * 2", "x * 4")],
            std::path::Path::new("/nonexistent"),
            "out",
        ),
        fixture.build(&[], &target, "out"),
    ] {
        let message = error.unwrap_err().to_string();
        assert!(!message.contains('\n'), "{message}");
    }
    assert!(!fixture.dir.path().join("out").exists());
}

#[test]
fn statics_of_one_name_in_two_files_bind_to_their_own_file() {
    let fixture = Fixture::new();
    let target = fixture.target_binary(true);
    let a = fixture.diff("a", "a.c", "return scale(x) +", "return scale(x) + counter +");
    let b = fixture.diff("b", "b.c", "return ++counter;", "return counter += 2;");
    let built = fixture.build(&[a, b], &target, "out").unwrap();
    assert_eq!(names(&built.functions_changed), vec!["compute", "tally"]);
    let address = |name: &str| built.bindings.iter().find(|b| b.symbol == name).unwrap().address;
    assert_ne!(address("a.c::counter"), address("b.c::counter"));
    // Each is the address of its own file's `counter` in the unstripped build.
    let symtab = std::process::Command::new("readelf")
        .arg("-sW")
        .arg(fixture.target_binary(false))
        .output()
        .unwrap();
    let symtab = String::from_utf8(symtab.stdout).unwrap();
    let mut file = "";
    let mut expected = std::collections::HashMap::new();
    for line in symtab.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() == 8 && fields[3] == "FILE" {
            file = fields[7];
        } else if fields.len() == 8 && fields[7] == "counter" {
            expected.insert(format!("{file}::counter"), u64::from_str_radix(fields[1], 16).unwrap());
        }
    }
    assert_eq!(address("a.c::counter"), expected["a.c::counter"]);
    assert_eq!(address("b.c::counter"), expected["b.c::counter"]);
}

#[test]
fn new_thread_local_is_refused() {
    let fixture = Fixture::new();
    let target = fixture.target_binary(false);
    let diff = fixture.diff(
        "tls",
        "b.c",
        "int tally(void)\n{\n    return ++counter;",
        "static __thread int mine;\n\nint tally(void)\n{\n    mine++;\n    return ++counter + mine * 0;",
    );
    let error = fixture.build(&[diff], &target, "out").unwrap_err();
    assert!(
        error
            .to_string()
            .starts_with("refused: mine: new thread-local variable"),
        "{error}"
    );
}

#[test]
fn a_cplusplus_tree_builds_with_mangled_names_in_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("cpp");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(
        tree.join("Makefile"),
        "hello: hello.o\n\t$(CXX) -o $@ $^\n%.o: %.cc\n\t$(CXX) -O2 -c -o $@ $<\n",
    )
    .unwrap();
    std::fs::write(
        tree.join("hello.cc"),
        "int twice(int x) { return x * 2; }\nint main() { return twice(0); }\n",
    )
    .unwrap();
    crate::common::run(std::process::Command::new("make").arg("-s").current_dir(&tree));
    let diff = dir.path().join("c.diff");
    std::fs::write(&diff, "--- a/hello.cc\n+++ b/hello.cc\n@@ -1 +1 @@\n-int twice(int x) { return x * 2; }\n+int twice(int x) { return x * 3; }\n").unwrap();
    let request = shadowpatch_build::BuildRequest {
        source: tree.clone(),
        diffs: vec![diff],
        target: tree.join("hello").display().to_string(),
        out: dir.path().join("out"),
        cache: Some(dir.path().join("cache")),
        ..Default::default()
    };
    // A `.cc` file compiled by `$(CXX)` (g++ through the wrapper).
    let built = shadowpatch_build::build(&request, &mut |_, _| {}).unwrap();
    assert_eq!(crate::common::names(&built.functions_changed), ["_Z5twicei"]);
    assert_eq!(built.manifest.replacements[0].symbol, "_Z5twicei");
    assert_eq!(shadowpatch_build::cxx::demangle("_Z5twicei"), "twice(int)");
}

#[test]
fn new_variables_are_allowed_and_live_in_the_patch() {
    let fixture = Fixture::new();
    let target = fixture.target_binary(false);
    let diff = fixture.diff(
        "extra",
        "a.c",
        "int compute(int x)\n{",
        "int extra = 5;\nstatic int seen;\n\nint compute(int x)\n{\n    seen += extra;",
    );
    let built = fixture.build(&[diff], &target, "out").unwrap();
    assert_eq!(names(&built.functions_changed), vec!["compute"]);
    let mut data = built.data_new.clone();
    data.sort();
    assert_eq!(data, vec!["a.c::seen", "extra"]);
    // Defined in the patch object, not bound to the target.
    assert!(!built
        .bindings
        .iter()
        .any(|b| b.symbol == "extra" || b.symbol == "a.c::seen"));
}

#[test]
fn constructor_code_is_refused() {
    let fixture = Fixture::new();
    let target = fixture.target_binary(false);
    let diff = fixture.diff(
        "ctor",
        "b.c",
        "int tally(void)",
        "__attribute__((constructor)) static void start(void)\n{\n    counter = 100;\n}\n\nint tally(void)",
    );
    let error = fixture.build(&[diff], &target, "out").unwrap_err();
    assert!(
        error.to_string().starts_with("refused: start: constructor code"),
        "{error}"
    );
}

/// gcc numbers a unit's static locals with one counter: a static added to
/// `tens` takes the name `ticks`'s counter had (count.1). Bound by name,
/// the patch's new variable would be `ticks`'s live counter (it then
/// advanced twice a second); the build refuses instead.
#[test]
fn a_static_local_renumbered_onto_another_functions_is_refused() {
    let fixture = Fixture::of("statics");
    let target = fixture.target_binary(false);
    let diff = fixture.diff(
        "inner",
        "statics.c",
        "    static int count;\n    return count += 10;",
        "    static int count;\n    { static int count; count++; }\n    return count += 10;",
    );
    let error = fixture.build(&[diff], &target, "inner").unwrap_err();
    assert!(matches!(error, BuildError::Refused { .. }), "{error}");
    let text = error.to_string();
    assert!(
        text.contains("renumbered") && text.contains("ticks") && text.contains("tens"),
        "{text}"
    );

    // A new static of a name of its own shifts `ticks`'s number too, but
    // no existing name changes hands: built, and nothing of `ticks` bound.
    let diff = fixture.diff(
        "seen",
        "statics.c",
        "    static int count;\n    return count += 10;",
        "    static int count;\n    static int seen;\n    seen++;\n    return count += 10;",
    );
    let built = fixture.build(&[diff], &target, "seen").unwrap();
    assert_eq!(names(&built.functions_changed), vec!["tens"]);
    let bound: Vec<&str> = built.bindings.iter().map(|b| b.symbol.as_str()).collect();
    assert_eq!(bound.len(), 1, "{bound:?}");
    assert!(bound[0].starts_with("statics.c::count"), "{bound:?}");
}
