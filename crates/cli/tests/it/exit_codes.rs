//! Every exit code docs/exit-codes.md documents, produced by a real
//! command on a real process: 0 done, 1 differences found or refused for
//! safety, 2 bad input (missing arguments named), 3 failed midway, 4 rolled
//! back by the watch or the watched target exited.

use crate::common::{build_id_of, shadowpatch, shadowpatch_env, write_manifest};
use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// The codes the exit-code page documents (its table's first column).
fn documented_codes() -> Vec<i32> {
    let page = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/exit-codes.md")).unwrap();
    let mut codes: Vec<i32> = page
        .lines()
        .filter_map(|line| line.strip_prefix("| "))
        .filter_map(|rest| rest.split(' ').next()?.parse().ok())
        .collect();
    codes.sort();
    codes.dedup();
    codes
}

/// Each code below has a test here that produces it.
#[test]
fn the_page_documents_exactly_the_codes_tested_here() {
    assert_eq!(documented_codes(), vec![0, 1, 2, 3, 4]);
}

#[test]
fn zero_done_and_one_differences_and_one_refused() {
    let target = Running::start(Fixture::AnalysisTarget, &[]).unwrap();
    let pid = target.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // 0: a mirror, and a verify that finds nothing.
    assert_eq!(shadowpatch(&state, &["mirror", &pid]).code, 0);
    assert_eq!(shadowpatch(&state, &["verify", &pid]).code, 0);
    let narrow = write_manifest(
        dir.path(),
        "narrow",
        &build_patch(Patch::Analysis).unwrap(),
        &build_id_of(&target.binary()),
        &[("read_counter", "read_counter_narrow")],
    );
    let narrow = narrow.to_str().unwrap();
    // 1: the analysis refuses (a difference between the patch's idea of
    // a type and the target's), and apply refuses it for safety.
    let analyzed = shadowpatch(&state, &["analyze", &pid, narrow, "--context-secs", "0"]);
    assert_eq!(analyzed.code, 1, "{}{}", analyzed.stdout, analyzed.stderr);
    let applied = shadowpatch(&state, &["apply", &pid, narrow, "--context-secs", "0"]);
    assert_eq!(applied.code, 1, "{}{}", applied.stdout, applied.stderr);
    // 1: verify finds a difference (a patch applied behind the mirror's
    // back: verify against the generation before it).
    let forced = shadowpatch(&state, &["apply", &pid, narrow, "--context-secs", "0", "--force"]);
    assert_eq!(forced.code, 0, "{}{}", forced.stdout, forced.stderr);
    let verified = shadowpatch(&state, &["verify", &pid, "--generation", "0"]);
    assert_eq!(verified.code, 1, "{}{}", verified.stdout, verified.stderr);
    assert_eq!(shadowpatch(&state, &["verify", &pid]).code, 0);
}

#[test]
fn two_bad_input_names_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    for (args, missing) in [
        (&["status"][..], "<PID>"),
        (&["verify"][..], "<PID>"),
        (&["apply", "1"][..], "<MANIFEST>"),
        (&["rollback"][..], "<PID>"),
        (&["lookup", "1"][..], "<WHAT>"),
        (&["snapshot"][..], "<PID>"),
    ] {
        let run = shadowpatch(&state, args);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        let lines: Vec<&str> = run.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: one line: {}", run.stderr);
        assert!(lines[0].contains(missing), "{args:?} names {missing}: {}", lines[0]);
        assert!(
            lines[0].contains(&format!("shadowpatch {} --help", args[0])),
            "{args:?}: {}",
            lines[0]
        );
    }
    let run = shadowpatch(&state, &["verify", "2147483646"]);
    assert_eq!(run.code, 2, "{}", run.stderr);
}

#[test]
fn three_failed_midway() {
    let target = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let pid = target.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let manifest = write_manifest(
        dir.path(),
        "doomed",
        &build_patch(Patch::BusyFix).unwrap(),
        &build_id_of(&target.binary()),
        &[("work_fn", "work_fn_v2")],
    );
    // The target dies between loading the patch and activating it.
    let run = shadowpatch_env(
        &state,
        &["apply", &pid, manifest.to_str().unwrap(), "--context-secs", "0"],
        &[("SHADOWPATCH_FAULT_TARGET", "loaded")],
    );
    assert_eq!(run.code, 3, "{}", run.stderr);
}

#[test]
fn four_rolled_back_by_the_watch() {
    let target = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let pid = target.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let manifest = write_manifest(
        dir.path(),
        "null",
        &build_patch(Patch::BusyWatch).unwrap(),
        &build_id_of(&target.binary()),
        &[("work_fn", "work_fn_null")],
    );
    let run = shadowpatch(
        &state,
        &[
            "apply",
            &pid,
            manifest.to_str().unwrap(),
            "--force",
            "--context-secs",
            "0",
            "--watch",
            "5",
            "--baseline",
            "0.3",
        ],
    );
    assert_eq!(run.code, 4, "{}{}", run.stdout, run.stderr);
}

#[test]
fn four_the_watched_target_exited() {
    let target = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let pid = target.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut watch = Command::new(env!("CARGO_BIN_EXE_shadowpatch"))
        .args(["--state-dir", state.to_str().unwrap(), "--no-agent", "--json"])
        .args(["watch", &pid, "--interval", "10ms"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Once the watch has started, the target goes away.
    let mut stdout = BufReader::new(watch.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.contains("started"), "{line}");
    drop(target);
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    assert_eq!(watch.wait().unwrap().code(), Some(4));
}

/// A reader that went away (`| head`) ends the command with the shell's
/// SIGPIPE status and nothing on stderr, not a panic's backtrace.
#[test]
fn a_closed_pipe_on_stdout_ends_quietly_with_141() {
    let state = tempfile::tempdir().unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let output = Command::new(env!("CARGO_BIN_EXE_shadowpatch"))
        .args(["--json", "history"])
        .env("SHADOWPATCH_STATE_DIR", state.path())
        .env("SHADOWPATCH_AGENT_SOCKET", state.path().join("no-agent.sock"))
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(141), "{output:?}");
    assert!(output.stderr.is_empty(), "{}", String::from_utf8_lossy(&output.stderr));
}
