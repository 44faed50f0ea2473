//! Shared helpers for the end-to-end tests: run the real `shadowpatch`
//! binary against real processes.

#![allow(dead_code)]

pub mod agent;
pub mod lighttpd;
pub mod watch;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\n{}", self.stdout, self.stderr))
    }
}

pub fn shadowpatch(state: &Path, args: &[&str]) -> Run {
    shadowpatch_env(state, args, &[])
}

/// Run with extra environment variables (e.g. SHADOWPATCH_FAULT).
pub fn shadowpatch_env(state: &Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let output = Command::new(env!("CARGO_BIN_EXE_shadowpatch"))
        .args(args)
        .env("SHADOWPATCH_STATE_DIR", state)
        .envs(env.iter().copied())
        .output()
        .expect("shadowpatch runs");
    from_output(output)
}

/// A copy of the `shadowpatch` binary that any user can run, for tests
/// that drop to another uid: the build directory may sit under a directory
/// only root can enter (a clone in `mktemp -d`, a 0700 home directory).
/// Returns the copy's path and the temporary directory holding it.
pub fn binary_runnable_by_anyone() -> (tempfile::TempDir, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let binary = dir.path().join("shadowpatch");
    // Copied by `cp`, not by this process: a file this process held open
    // for writing is inherited by every child another test thread forks
    // meanwhile, until that child execs, and executing the copy then
    // fails with ETXTBSY ("Text file busy", seen in CI).
    let copied = std::process::Command::new("cp")
        .arg(env!("CARGO_BIN_EXE_shadowpatch"))
        .arg(&binary)
        .status()
        .unwrap();
    assert!(copied.success(), "cp of the shadowpatch binary");
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, binary)
}

pub fn from_output(output: Output) -> Run {
    Run {
        code: output.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// The target is running, not traced by anyone and not stopped.
pub fn assert_untouched(pid: i32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("target still exists");
    assert!(status.contains("TracerPid:\t0"), "target left traced:\n{status}");
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let stat = std::fs::read_to_string(entry.unwrap().path().join("stat")).unwrap_or_default();
        let state = stat
            .rsplit_once(") ")
            .map(|(_, rest)| rest.chars().next().unwrap())
            .unwrap_or('?');
        assert!(
            state != 't' && state != 'T',
            "a thread of {pid} was left stopped ({state})"
        );
    }
}

/// Assert a bad-input failure: exit 2, one line on stderr containing `needle`.
pub fn assert_bad_input(run: &Run, needle: &str) {
    assert_eq!(
        run.code, 2,
        "expected exit 2, got {}: {}{}",
        run.code, run.stdout, run.stderr
    );
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one-line error expected: {:?}", run.stderr);
    assert!(lines[0].starts_with("shadowpatch: error: "), "{}", lines[0]);
    assert!(
        lines[0].contains(needle),
        "error {:?} should mention {needle:?}",
        lines[0]
    );
}

/// GNU build-id (hex) of an ELF file.
pub fn build_id_of(path: &Path) -> String {
    let image = shadowpatch_symbols::ElfImage::open(path).expect("readable ELF");
    shadowpatch_symbols::hex(image.build_id.as_deref().expect("has a build-id"))
}

/// A process the test started, killed and reaped when dropped.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `gcc -O2 -g` of `text` (written to `dir/source`) into `dir/out`, with
/// `extra` flags (`-shared -fPIC` for a patch object).
pub fn gcc(dir: &Path, source: &str, text: &str, out: &str, extra: &[&str]) -> std::path::PathBuf {
    let path = dir.join(source);
    std::fs::write(&path, text).unwrap();
    let output = dir.join(out);
    let built = std::process::Command::new("gcc")
        .args(["-O2", "-g", "-Wl,--build-id"])
        .args(extra)
        .arg("-o")
        .arg(&output)
        .arg(&path)
        .status()
        .unwrap();
    assert!(built.success(), "gcc {source}");
    output
}

/// `analyze --json PID MANIFEST --capture 3 --capture-for 20`: a verdict
/// on three live calls (exit 0 or 1, else the test fails).
pub fn analyze_three_live_calls(state: &Path, pid: u32, manifest: &Path) -> serde_json::Value {
    let run = shadowpatch(
        state,
        &[
            "--json",
            "analyze",
            &pid.to_string(),
            manifest.to_str().unwrap(),
            "--capture",
            "3",
            "--capture-for",
            "20",
        ],
    );
    assert!(run.code == 0 || run.code == 1, "{}{}", run.stdout, run.stderr);
    run.json()
}

/// The codes of an analysis's findings.
pub fn finding_codes(json: &serde_json::Value) -> Vec<String> {
    json["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["code"].as_str().unwrap().to_string())
        .collect()
}

/// The pids of a set's report (`--json`) whose outcome is `outcome`.
pub fn members_with(report: &serde_json::Value, outcome: &str) -> std::collections::BTreeSet<i64> {
    report["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["outcome"] == outcome)
        .map(|m| m["pid"].as_i64().unwrap())
        .collect()
}

/// Write a manifest for `object` into `dir`; returns its path.
pub fn write_manifest(
    dir: &Path,
    id: &str,
    object: &Path,
    build_id: &str,
    replacements: &[(&str, &str)],
) -> std::path::PathBuf {
    let mut text = format!(
        "id = \"{id}\"\nobject = \"{}\"\n[target]\nbuild_id = \"{build_id}\"\n",
        object.display()
    );
    for (symbol, with) in replacements {
        text.push_str(&format!("[[replace]]\nsymbol = \"{symbol}\"\nwith = \"{with}\"\n"));
    }
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// Anonymous executable mappings of a process (where patches live).
pub fn anonymous_code_mappings(pid: i32) -> usize {
    anonymous_mappings(pid)
        .iter()
        .filter(|(_, _, perms)| perms.contains('x'))
        .count()
}

/// The anonymous mappings of `pid`: start, end and permissions.
pub fn anonymous_mappings(pid: i32) -> Vec<(u64, u64, String)> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap()
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() != 5 {
                return None;
            }
            let (start, end) = fields[0].split_once('-')?;
            Some((
                u64::from_str_radix(start, 16).ok()?,
                u64::from_str_radix(end, 16).ok()?,
                fields[1].to_string(),
            ))
        })
        .collect()
}

/// The target's anonymous code mappings are back to `before`, except for
/// patch mappings `status` reports retired (a rollback leaves a mapping in
/// place while a thread may still be running in it, rather than unmap it
/// under the thread). A retired patch mapping can hold several executable
/// areas (its code, then its thunks after its data), so the areas inside
/// retired ranges are counted, not the ranges.
pub fn assert_patch_memory_released(state: &Path, pid: i32, before: usize) {
    let status = shadowpatch(state, &["status", &pid.to_string(), "--json"]).json();
    let retired: Vec<(u64, u64)> = status["retired"]
        .as_array()
        .map(|ranges| {
            ranges
                .iter()
                .filter_map(|range| {
                    let (start, len) = range.as_str()?.split_once('+')?;
                    let start = u64::from_str_radix(start.trim_start_matches("0x"), 16).ok()?;
                    let len = u64::from_str_radix(len.trim_start_matches("0x"), 16).ok()?;
                    Some((start, start + len))
                })
                .collect()
        })
        .unwrap_or_default();
    let (mut in_retired, mut elsewhere) = (0, 0);
    for line in std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap().lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() != 5 || !fields[1].contains('x') {
            continue;
        }
        let start = fields[0]
            .split('-')
            .next()
            .and_then(|a| u64::from_str_radix(a, 16).ok())
            .unwrap();
        if retired.iter().any(|(low, high)| (*low..*high).contains(&start)) {
            in_retired += 1;
        } else {
            elsewhere += 1;
        }
    }
    assert_eq!(
        elsewhere, before,
        "patch memory not released ({in_retired} executable areas in retired mappings {retired:x?}): {status}"
    );
}

/// Wait until busy.c's workers produce patched results (or, with
/// `want_patched` false, stop producing them), checking no result is wrong.
pub fn wait_for_patched(target: &mut shadowpatch_fixtures::Running, want_patched: bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let before = target.check().unwrap()["patched"];
    loop {
        let check = target.check().unwrap();
        assert_eq!(check["errors"], 0, "no wrong result: {check:?}");
        let moving = check["patched"] > before;
        if moving == want_patched {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "patched results never {}",
            if want_patched { "appeared" } else { "stopped" }
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// A copy of the source `tree` at `dir/shipped`, built with `make`: the
/// binary "as shipped" that `shadowpatch build` tests patch.
pub fn shipped_build(tree: &Path, dir: &Path) -> PathBuf {
    let shipped = dir.join("shipped");
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(tree)
        .arg(&shipped)
        .status();
    assert!(copied.unwrap().success());
    let made = std::process::Command::new("make")
        .arg("-s")
        .current_dir(&shipped)
        .status();
    assert!(made.unwrap().success());
    shipped
}
