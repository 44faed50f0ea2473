//! Binaries and running modules resolve to the installed package and its
//! exact version: /usr-merge aliases, symlinked commands, a live process
//! and one of its libraries; anything else is a one-line bad-input error.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use shadowpatch_debsrc::{resolve_binary, resolve_process, ResolveError};
use shadowpatch_failure::Classify;

use crate::common::MEMCACHED;

fn installed_version(package: &str) -> String {
    let output = Command::new("dpkg-query")
        .args(["-W", "-f=${Version}", package])
        .output()
        .unwrap();
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn memcached_resolves_to_its_package_and_exact_version() {
    let installed = resolve_binary(Path::new(MEMCACHED)).unwrap();
    assert_eq!(installed.package, "memcached");
    assert_eq!(installed.source_package, "memcached");
    assert_eq!(installed.version, installed_version("memcached"));
    assert!(!installed.version.is_empty());
    assert_eq!(installed.registered_path, Path::new(MEMCACHED));
    assert_eq!(installed.build_id.len(), 40, "{}", installed.build_id);
    assert_eq!(
        installed.build_id,
        shadowpatch_debsrc::build_id_hex(Path::new(MEMCACHED)).unwrap()
    );
}

#[test]
fn usr_merge_aliases_and_symlinked_commands_find_the_registered_file() {
    // coreutils registers /bin/ls; with merged /usr the file is /usr/bin/ls.
    for asked in ["/bin/ls", "/usr/bin/ls"] {
        let installed = resolve_binary(Path::new(asked)).unwrap();
        assert_eq!(installed.package, "coreutils", "{asked}");
        assert_eq!(installed.registered_path, Path::new("/bin/ls"), "{asked}");
    }
    // awk -> /etc/alternatives/awk -> the implementation's own binary.
    let awk = resolve_binary(Path::new("/usr/bin/awk")).unwrap();
    let real = std::fs::canonicalize("/usr/bin/awk").unwrap();
    assert!(awk.registered_path.ends_with(real.file_name().unwrap()), "{awk:?}");
    assert_ne!(awk.package, "", "{awk:?}");
}

#[test]
fn a_module_of_this_process_resolves_to_its_library_package() {
    let libc = resolve_process(std::process::id() as i32, Some("libc.so.6")).unwrap();
    // dpkg qualifies a Multi-Arch: same package with its architecture.
    assert!(libc.package.starts_with("libc6:"), "{libc:?}");
    assert_eq!(libc.source_package, "glibc");
}

/// A memcached listening on a private unix socket, killed on drop.
struct RunningMemcached {
    child: Child,
    _dir: tempfile::TempDir,
}

impl RunningMemcached {
    fn start() -> RunningMemcached {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(MEMCACHED)
            .args(["-u", "root", "-vv", "-s"])
            .arg(dir.path().join("memcached.sock"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // -vv prints the slab classes from main(): the dynamic libraries
        // are mapped by then.
        let mut first = String::new();
        BufReader::new(child.stderr.as_mut().unwrap())
            .read_line(&mut first)
            .unwrap();
        assert!(first.contains("slab class"), "{first}");
        RunningMemcached { child, _dir: dir }
    }
}

impl Drop for RunningMemcached {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_running_memcached_resolves_with_its_running_build_id() {
    let running = RunningMemcached::start();
    let pid = running.child.id() as i32;
    let main = resolve_process(pid, None).unwrap();
    assert_eq!(main.package, "memcached");
    assert_eq!(main.path, Path::new(MEMCACHED));
    assert_eq!(main.build_id, resolve_binary(Path::new(MEMCACHED)).unwrap().build_id);
    let libevent = resolve_process(pid, Some("libevent-2.1.so.7")).unwrap();
    assert!(libevent.package.starts_with("libevent-2.1-7"), "{libevent:?}");
    assert_eq!(libevent.source_package, "libevent");

    let missing = resolve_process(pid, Some("libnothing.so.1")).unwrap_err();
    assert!(matches!(missing, ResolveError::ModuleNotFound { .. }), "{missing}");
    assert_one_line_bad_input(&missing, "libnothing.so.1");
}

fn assert_one_line_bad_input(error: &ResolveError, names: &str) {
    let message = error.to_string();
    assert!(!message.contains('\n'), "{message}");
    assert!(message.contains(names), "{message}");
    assert!(error.is_bad_input(), "{message}");
}

#[test]
fn a_binary_from_no_package_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("true");
    std::fs::copy("/bin/true", &copy).unwrap();
    let error = resolve_binary(&copy).unwrap_err();
    assert!(matches!(error, ResolveError::NotPackaged { .. }), "{error}");
    assert_one_line_bad_input(&error, &copy.display().to_string());

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "not a binary\n").unwrap();
    assert_one_line_bad_input(&resolve_binary(&text).unwrap_err(), "notes.txt");

    let missing = dir.path().join("missing");
    assert_one_line_bad_input(&resolve_binary(&missing).unwrap_err(), "missing");
}
