//! `list` and `gc` end to end: a live patched target and dead ones (one
//! killed with a patch active, one whose apply was interrupted) are listed
//! as such; `gc --dry-run` removes nothing; `gc` removes only the dead
//! targets' state, records each in the history, and leaves the live target
//! patched and rollback-able; it keeps (exit 1, one line why) an
//! interrupted transaction's journal unless `--interrupted`, and the state
//! of a dead process a live one was forked from.

use crate::common::{assert_bad_input, assert_untouched, build_id_of, shadowpatch, shadowpatch_env, write_manifest};
use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use std::path::PathBuf;

fn entry_of(listed: &serde_json::Value, pid: i32) -> &serde_json::Value {
    listed["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["pid"] == pid)
        .unwrap_or_else(|| panic!("pid {pid} not listed: {listed}"))
}

#[test]
fn list_tells_live_from_dead_and_gc_collects_only_the_dead() {
    let mut live = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let mut dead_patched = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let mut dead_interrupted = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let object = build_patch(Patch::BusyFix).unwrap();
    let manifest = write_manifest(
        dir.path(),
        "fix1",
        &object,
        &build_id_of(&live.binary()),
        &[("banner", "banner_v2")],
    );
    let manifest = manifest.to_str().unwrap();
    for target in [&live, &dead_patched] {
        let applied = shadowpatch(&state, &["apply", &target.pid().to_string(), manifest]);
        assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    }
    // The CLI dies between the trampoline writes and the commit: the
    // journal keeps an open transaction.
    let killed = shadowpatch_env(
        &state,
        &["apply", &dead_interrupted.pid().to_string(), manifest],
        &[("SHADOWPATCH_FAULT", "written")],
    );
    assert_ne!(killed.code, 0, "the fault point killed the apply");
    dead_patched.kill().unwrap();
    dead_interrupted.kill().unwrap();

    let listed = shadowpatch(&state, &["list", "--json"]);
    assert_eq!(listed.code, 0, "{}{}", listed.stdout, listed.stderr);
    let listed = listed.json();
    assert_eq!(listed["targets"].as_array().unwrap().len(), 3, "{listed}");
    let alive = entry_of(&listed, live.pid());
    assert_eq!(alive["liveness"], "alive");
    assert_eq!(alive["active_patches"], serde_json::json!(["fix1"]));
    assert_eq!(alive["generations"], serde_json::json!([0, 1]));
    assert!(alive["comm"].is_string(), "{alive}");
    assert!(alive["interrupted"].is_null(), "{alive}");
    assert!(alive["bytes"].as_u64().unwrap() > 0);
    let patched = entry_of(&listed, dead_patched.pid());
    assert_eq!(patched["liveness"], "dead");
    assert_eq!(patched["active_patches"], serde_json::json!(["fix1"]));
    assert!(patched["comm"].is_null(), "{patched}");
    let interrupted = entry_of(&listed, dead_interrupted.pid());
    assert_eq!(interrupted["liveness"], "dead");
    assert!(
        interrupted["interrupted"]
            .as_str()
            .is_some_and(|t| t.contains("apply fix1")),
        "{interrupted}"
    );
    let dirs = |pid: i32| PathBuf::from(entry_of(&listed, pid)["dir"].as_str().unwrap());
    let (live_dir, patched_dir, interrupted_dir) =
        (dirs(live.pid()), dirs(dead_patched.pid()), dirs(dead_interrupted.pid()));

    let text = shadowpatch(&state, &["list"]);
    assert_eq!(text.code, 0);
    let line_of = |pid: i32| {
        text.stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&pid.to_string()))
            .unwrap_or_else(|| panic!("no line for {pid}:\n{}", text.stdout))
            .to_string()
    };
    assert!(line_of(live.pid()).contains("alive"), "{}", text.stdout);
    assert!(line_of(dead_patched.pid()).contains("dead"), "{}", text.stdout);
    assert!(
        line_of(dead_interrupted.pid()).contains("interrupted"),
        "{}",
        text.stdout
    );

    // A dry run says what would go and removes nothing; the interrupted
    // target is refused (kept) with a line saying why.
    let dry = shadowpatch(&state, &["gc", "--dry-run", "--json"]);
    assert_eq!(dry.code, 1, "a refusal is exit 1: {}{}", dry.stdout, dry.stderr);
    let dry = dry.json();
    assert_eq!(dry["removed"].as_array().unwrap().len(), 1, "{dry}");
    assert_eq!(dry["kept"], 1);
    assert_eq!(dry["refused"][0]["target"]["pid"], dead_interrupted.pid(), "{dry}");
    assert!(patched_dir.is_dir() && interrupted_dir.is_dir());
    let history = shadowpatch(&state, &["history", "--kind", "gc", "--json"]).json();
    assert_eq!(history.as_array().unwrap().len(), 0, "a dry run records nothing");

    let collected = shadowpatch(&state, &["gc"]);
    assert_eq!(collected.code, 1, "{}{}", collected.stdout, collected.stderr);
    let kept_line = collected
        .stdout
        .lines()
        .find(|l| l.starts_with("kept "))
        .unwrap_or_else(|| panic!("no kept line:\n{}", collected.stdout));
    assert!(
        kept_line.contains("uncommitted apply fix1") && kept_line.contains("gc --interrupted"),
        "{kept_line}"
    );
    assert!(!patched_dir.exists(), "the dead patched target is collected");
    assert!(interrupted_dir.is_dir(), "the interrupted one is kept");
    assert!(live_dir.is_dir(), "the live target's state is kept");

    // Said explicitly, the interrupted one goes too, recorded first.
    let collected = shadowpatch(&state, &["gc", "--interrupted", "--json"]);
    assert_eq!(collected.code, 0, "{}{}", collected.stdout, collected.stderr);
    let collected = collected.json();
    let removed: Vec<i64> = collected["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["pid"].as_i64().unwrap())
        .collect();
    assert_eq!(removed, vec![i64::from(dead_interrupted.pid())], "{collected}");
    assert!(collected["bytes_freed"].as_u64().unwrap() > 0);
    assert!(!interrupted_dir.exists());
    assert!(live_dir.is_dir(), "the live target's state is kept");

    // The history keeps what the removed state held.
    let history = shadowpatch(&state, &["history", "--kind", "gc", "--json"]).json();
    let events = history.as_array().unwrap();
    assert_eq!(events.len(), 2, "{history}");
    let patched_event = events
        .iter()
        .find(|e| e["pid"] == dead_patched.pid())
        .expect("gc event of the dead patched target");
    assert_eq!(patched_event["details"]["active_patches"], serde_json::json!(["fix1"]));
    assert!(patched_event["details"]["bytes"].as_u64().unwrap() > 0);
    let interrupted_event = events.iter().find(|e| e["pid"] == dead_interrupted.pid()).unwrap();
    assert!(
        interrupted_event["details"]["interrupted"].is_string(),
        "{interrupted_event}"
    );

    // A second gc has nothing left to do; the live target still works.
    let again = shadowpatch(&state, &["gc"]);
    assert_eq!(again.code, 0);
    assert!(again.stdout.contains("removed 0 targets"), "{}", again.stdout);
    let pid = live.pid().to_string();
    assert_eq!(live.command("banner").unwrap(), "sample service v2 (live-patched)");
    let verified = shadowpatch(&state, &["verify", &pid]);
    assert_eq!(verified.code, 0, "{}{}", verified.stdout, verified.stderr);
    let rolled = shadowpatch(&state, &["rollback", &pid]);
    assert_eq!(rolled.code, 0, "{}{}", rolled.stdout, rolled.stderr);
    assert_eq!(live.command("banner").unwrap(), "sample service v1");
    assert_untouched(live.pid());
}

#[test]
fn list_and_gc_refuse_a_directory_that_is_not_a_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let foreign = dir.path().join("not-state");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "mine").unwrap();
    std::fs::create_dir(foreign.join("targets")).unwrap();
    assert_bad_input(&shadowpatch(&foreign, &["list"]), "not a shadowpatch state directory");
    assert_bad_input(&shadowpatch(&foreign, &["gc"]), "not a shadowpatch state directory");
    assert!(foreign.join("notes.txt").is_file() && foreign.join("targets").is_dir());

    // A state directory never used has no targets and nothing to collect.
    let fresh = dir.path().join("fresh");
    let listed = shadowpatch(&fresh, &["list", "--json"]);
    assert_eq!(listed.code, 0, "{}", listed.stderr);
    assert_eq!(listed.json()["targets"], serde_json::json!([]));
    let collected = shadowpatch(&fresh, &["gc", "--json"]);
    assert_eq!(collected.code, 0, "{}", collected.stderr);
    assert_eq!(collected.json()["removed"], serde_json::json!([]));
    assert!(!fresh.exists(), "list and gc create nothing");
}

#[test]
fn a_target_that_exec_d_is_listed_as_such_and_collected() {
    use std::io::Write;
    let mut shell = std::process::Command::new("/bin/sh")
        .args(["-c", "read line; exec sleep 1000"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = shell.id() as i32;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mirrored = shadowpatch(&state, &["mirror", &pid.to_string(), "--json"]);
    assert_eq!(mirrored.code, 0, "{}{}", mirrored.stdout, mirrored.stderr);
    writeln!(shell.stdin.as_mut().unwrap(), "go").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .unwrap_or_default()
        .trim()
        != "sleep"
    {
        assert!(std::time::Instant::now() < deadline, "the shell never exec'd sleep");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The kernel names the new program (comm) before it writes the new
    // auxv, which holds the exec id: until then the exec cannot be told
    // (a window of microseconds, seen once on a loaded machine).
    let mut entry = serde_json::Value::Null;
    while std::time::Instant::now() < deadline {
        entry = entry_of(&shadowpatch(&state, &["list", "--json"]).json(), pid).clone();
        if entry["liveness"] == "execd" {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(entry["liveness"], "execd", "{entry}");
    assert_eq!(entry["comm"], "sleep", "the program running now");
    let collected = shadowpatch(&state, &["gc", "--json"]).json();
    assert_eq!(collected["removed"].as_array().unwrap().len(), 1, "{collected}");
    assert_eq!(
        shadowpatch(&state, &["list", "--json"]).json()["targets"],
        serde_json::json!([])
    );
    let _ = shell.kill();
    let _ = shell.wait();
}

#[test]
fn gc_keeps_a_dead_target_whose_forked_child_still_runs() {
    use std::io::BufRead;
    // A shell that forks a subshell (no exec: same AT_RANDOM bytes) and
    // then waits for a line; the parent is killed, the child lives on. (A
    // background subshell reads /dev/null unless redirected: fd 3 is the pipe.)
    let mut shell = std::process::Command::new("/bin/sh")
        .args([
            "-c",
            "exec 3<&0; ( read line <&3; echo child-done ) & echo child=$!; read line",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let parent = shell.id() as i32;
    // Kept open past the parent's wait (which would close it): the child
    // reads it.
    let _child_stdin = shell.stdin.take();
    let mut first = String::new();
    std::io::BufReader::new(shell.stdout.as_mut().unwrap())
        .read_line(&mut first)
        .unwrap();
    let child: i32 = first.trim().trim_start_matches("child=").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mirrored = shadowpatch(&state, &["mirror", &parent.to_string(), "--json"]);
    assert_eq!(mirrored.code, 0, "{}{}", mirrored.stdout, mirrored.stderr);
    shell.kill().unwrap();
    shell.wait().unwrap();
    let listed = shadowpatch(&state, &["list", "--json"]).json();
    assert_eq!(entry_of(&listed, parent)["liveness"], "dead", "{listed}");

    let collected = shadowpatch(&state, &["gc", "--interrupted", "--json"]);
    assert_eq!(collected.code, 1, "{}{}", collected.stdout, collected.stderr);
    let collected = collected.json();
    assert_eq!(collected["removed"], serde_json::json!([]), "{collected}");
    let reason = collected["refused"][0]["reason"].as_str().unwrap();
    assert!(
        reason.contains(&format!("{child} (")) && reason.contains("forked from it"),
        "{reason}"
    );

    // Once the child is gone too, the state goes.
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child), nix::sys::signal::Signal::SIGKILL);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|s| !s.contains(") Z")) {
        assert!(std::time::Instant::now() < deadline, "the child never exited");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let collected = shadowpatch(&state, &["gc", "--json"]);
    assert_eq!(collected.code, 0, "{}{}", collected.stdout, collected.stderr);
    assert_eq!(collected.json()["removed"].as_array().unwrap().len(), 1);
}
