//! Module names as users know them: the build-id is the identity, and the
//! manifest's `target.module` hint (like `lookup MODULE!NAME`) matches the
//! name a program was started by through a symlink, and a library's soname;
//! a hint naming another file is a warning that names the real one, never
//! a refusal.

use crate::common::{build_id_of, shadowpatch, write_manifest};
use shadowpatch_fixtures::{build_c_patch, build_patch, Fixture, Patch, Running};
use std::path::{Path, PathBuf};

/// `write_manifest` with a `target.module` hint.
fn manifest_with_hint(
    dir: &Path,
    id: &str,
    object: &Path,
    build_id: &str,
    hint: &str,
    replacements: &[(&str, &str)],
) -> PathBuf {
    let path = write_manifest(dir, id, object, build_id, replacements);
    let text = std::fs::read_to_string(&path).unwrap();
    let text = text.replace("[target]\n", &format!("[target]\nmodule = \"{hint}\"\n"));
    std::fs::write(&path, text).unwrap();
    path
}

fn apply(state: &Path, pid: i32, manifest: &Path) -> crate::common::Run {
    shadowpatch(
        state,
        &[
            "apply",
            &pid.to_string(),
            manifest.to_str().unwrap(),
            "--json",
            "--force",
            "--context-secs",
            "0",
        ],
    )
}

#[test]
fn a_command_started_through_a_symlink_is_known_by_the_symlink_name() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let real = shadowpatch_fixtures::build(Fixture::BusyC).unwrap();
    // As Debian installs some servers: the command is a symlink to a
    // differently named file.
    let command = dir.path().join("sp-server");
    std::os::unix::fs::symlink(&real, &command).unwrap();
    let target = Running::start_binary(&command, &["2"]).unwrap();
    let pid = target.pid();
    let object = build_patch(Patch::BusyFix).unwrap();
    let build_id = build_id_of(&real);

    let lookup = shadowpatch(&state, &["lookup", &pid.to_string(), "sp-server!work_fn"]);
    assert_eq!(lookup.code, 0, "{}", lookup.stderr);
    assert!(lookup.stdout.contains("!work_fn"), "{}", lookup.stdout);

    let manifest = manifest_with_hint(
        dir.path(),
        "by-command",
        &object,
        &build_id,
        "sp-server",
        &[("work_fn", "work_fn_v2")],
    );
    let applied = apply(&state, pid, &manifest);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    assert_eq!(applied.json()["warnings"], serde_json::json!([]), "{}", applied.stdout);
    assert_eq!(shadowpatch(&state, &["rollback", &pid.to_string()]).code, 0);

    // A name that is not the module's: applied by build-id, with a warning
    // that names the real file.
    let wrong = manifest_with_hint(
        dir.path(),
        "by-wrong-name",
        &object,
        &build_id,
        "nginx",
        &[("work_fn", "work_fn_v2")],
    );
    let applied = apply(&state, pid, &wrong);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    let real_name = real.file_name().unwrap().to_str().unwrap();
    let warning = applied.json()["warnings"][0].as_str().unwrap().to_string();
    assert!(warning.contains("nginx") && warning.contains(real_name), "{warning}");
    assert!(
        applied.stderr.contains("warning:") && applied.stderr.contains(real_name),
        "{}",
        applied.stderr
    );
    assert_eq!(shadowpatch(&state, &["rollback", &pid.to_string()]).code, 0);
}

/// A library `libspso-1.2.so.3.4.5` with soname `libspso-1.2.so.3`, and a
/// program that loads it by its full path and calls it in a loop.
fn soname_target(dir: &Path) -> (Running, PathBuf) {
    let library = dir.join("libspso-1.2.so.3.4.5");
    let source = dir.join("spso.c");
    std::fs::write(
        &source,
        "__attribute__((noinline)) int spso_value(int x) { int y = x * 3; if (y > 1000) y -= 7; return y + 1; }\n",
    )
    .unwrap();
    let built = std::process::Command::new("gcc")
        .args([
            "-O2",
            "-fPIC",
            "-shared",
            "-Wl,--build-id",
            "-Wl,-soname,libspso-1.2.so.3",
            "-o",
        ])
        .arg(&library)
        .arg(&source)
        .status()
        .unwrap();
    assert!(built.success());
    let program = dir.join("spso-main.c");
    std::fs::write(
        &program,
        format!(
            r#"#include <dlfcn.h>
#include <stdio.h>
#include <unistd.h>
int main(void) {{
    void *library = dlopen("{}", RTLD_NOW);
    if (!library) {{ printf("no library: %s\n", dlerror()); return 1; }}
    int (*value)(int) = (int (*)(int))dlsym(library, "spso_value");
    printf("ready\n");
    fflush(stdout);
    for (volatile int sink = 0;; sink += value(sink & 7)) usleep(1000);
}}
"#,
            library.display()
        ),
    )
    .unwrap();
    let binary = dir.join("spso-main");
    let built = std::process::Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&binary)
        .arg(&program)
        .arg("-ldl")
        .status()
        .unwrap();
    assert!(built.success());
    (Running::start_binary(&binary, &[]).unwrap(), library)
}

#[test]
fn a_library_is_known_by_its_soname() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (target, library) = soname_target(dir.path());
    let pid = target.pid();
    let lookup = shadowpatch(&state, &["lookup", &pid.to_string(), "libspso-1.2.so.3!spso_value"]);
    assert_eq!(lookup.code, 0, "{}", lookup.stderr);
    assert!(
        lookup.stdout.contains("libspso-1.2.so.3.4.5!spso_value"),
        "{}",
        lookup.stdout
    );
    // `mirror --module` takes the soname too.
    let mirrored = shadowpatch(&state, &["mirror", &pid.to_string(), "--module", "libspso-1.2.so.3"]);
    assert_eq!(mirrored.code, 0, "{}", mirrored.stderr);
    let object = build_c_patch(
        "spso-patch",
        "int spso_value_v2(int x) { int y = x * 3; if (y > 1000) y -= 7; return y + 1; }\n",
    )
    .unwrap();
    let manifest = manifest_with_hint(
        dir.path(),
        "by-soname",
        &object,
        &build_id_of(&library),
        "libspso-1.2.so.3",
        &[("spso_value", "spso_value_v2")],
    );
    let applied = apply(&state, pid, &manifest);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    assert_eq!(applied.json()["warnings"], serde_json::json!([]), "{}", applied.stdout);
    assert_eq!(shadowpatch(&state, &["rollback", &pid.to_string()]).code, 0);
}

/// Issue 15: a build-id no module has, with a hint naming no mapped module,
/// listed "(modules: )". The error lists what is mapped.
#[test]
fn a_build_id_mismatch_lists_the_mapped_modules_even_when_the_hint_names_none() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut target = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let object = build_patch(Patch::BusyFix).unwrap();
    let wrong = "0123456789abcdef0123456789abcdef01234567";
    let replacements = [("work_fn", "work_fn_v2")];
    for hint in [None, Some("nginx")] {
        let manifest = match hint {
            Some(hint) => manifest_with_hint(dir.path(), "wrong", &object, wrong, hint, &replacements),
            None => write_manifest(dir.path(), "wrong", &object, wrong, &replacements),
        };
        let run = apply(&state, target.pid(), &manifest);
        assert_eq!(run.code, 2, "{hint:?}: {}", run.stderr);
        let line = run.stderr.lines().find(|l| l.contains("build-id")).unwrap_or_default();
        let real = build_id_of(&target.binary());
        assert!(line.contains(&real) && line.contains("libc.so.6"), "{hint:?}: {line}");
        if hint.is_some() {
            assert!(line.contains("none named nginx"), "{line}");
        }
    }
    assert_eq!(target.command("ask 5").unwrap(), "16");
}
