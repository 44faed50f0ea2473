//! `shadowpatch build` from the command line: a patch for a binary file
//! with `--json`, and bad input as one line, exit 2, nothing in `--out`.

use crate::common::shadowpatch;
use std::path::Path;
use std::process::Command;

fn fixture_tree(dir: &Path) -> std::path::PathBuf {
    let tree = dir.join("calc");
    let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../build/tests/data/calc");
    assert!(Command::new("cp")
        .arg("-a")
        .arg(data)
        .arg(&tree)
        .status()
        .unwrap()
        .success());
    tree
}

fn write_diff(dir: &Path, name: &str, from: &str, to: &str) -> String {
    let path = dir.join(name);
    let text = format!("--- a/a.c\n+++ b/a.c\n@@ -9,3 +9,3 @@\n {{\n-    {from}\n+    {to}\n }}\n");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn builds_for_a_file_and_refuses_bad_input_with_exit_two() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let tree = fixture_tree(dir.path());
    let shipped = crate::common::shipped_build(&tree, dir.path());
    let target = shipped.join("calc").display().to_string();
    let cache = dir.path().join("cache").display().to_string();
    let tree = tree.display().to_string();
    let out = |name: &str| dir.path().join(name).display().to_string();
    let base = |diff: &str, out: &str| {
        let args = [
            "build", "--source", &tree, "--diff", diff, "--target", &target, "--out", out, "--cache", &cache,
        ];
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>| shadowpatch(&state, &args.iter().map(String::as_str).collect::<Vec<_>>());

    let good = write_diff(dir.path(), "good.diff", "return x * 2;", "return x * 3;");
    let mut args = base(&good, &out("good"));
    args.insert(0, "--json".into());
    let built = run(args);
    assert_eq!(built.code, 0, "{}{}", built.stdout, built.stderr);
    let json: serde_json::Value = serde_json::from_str(&built.stdout).unwrap();
    assert_eq!(json["functions_included_for_inlining"][0]["symbol"], "compute");
    assert_eq!(json["manifest"]["replace"][0]["symbol"], "compute");
    assert!(json["build_seconds"].as_f64().unwrap() > 0.0);
    assert!(Path::new(&out("good")).join("patch.so").is_file());

    let stale = write_diff(dir.path(), "stale.diff", "return x * 7;", "return x * 3;");
    let broken = write_diff(dir.path(), "broken.diff", "return x * 2;", "return x * ;");
    let nothing = write_diff(dir.path(), "nothing.diff", "return x * 2;", "return x  *  2;");
    let data = dir.path().join("data.diff");
    std::fs::write(
        &data,
        "--- a/a.c\n+++ b/a.c\n@@ -5 +5 @@\n-int limit = 10;\n+int limit = 11;\n",
    )
    .unwrap();
    let data = data.display().to_string();
    for (diff, needle) in [
        (&stale, "does not apply: file a.c: Hunk #1 FAILED"),
        (&broken, "build failed: `make -j2`"),
        (&nothing, "changes no function's code"),
        (&data, "refused: limit: initial value changed"),
    ] {
        let failed = run(base(diff, &out("bad")));
        assert_eq!(failed.code, 2, "{}{}", failed.stdout, failed.stderr);
        assert!(failed.stderr.contains(needle), "{needle:?} in {}", failed.stderr);
        assert_eq!(failed.stderr.trim_end().lines().count(), 1, "{}", failed.stderr);
        assert!(!Path::new(&out("bad")).exists());
    }
}
