//! The watch window's life beyond a plain keep (issue 10, issue 15):
//! an agent killed mid-window finishes the window when it restarts
//! (resumed, or rolled back when it cannot be judged); a window whose
//! function is never called ends `unexercised` with its call counts and
//! the policy applied; a patch that recurses without end is survived
//! through the CLI and the target answers correctly afterwards.

use crate::common::agent::Agent;
use crate::common::{assert_bad_input, build_id_of, shadowpatch, shadowpatch_env, write_manifest, Run};
use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn manifest(dir: &Path, target: &Running, id: &str, with: &str) -> String {
    let object = build_patch(Patch::BusyWatch).unwrap();
    write_manifest(dir, id, &object, &build_id_of(&target.binary()), &[("work_fn", with)])
        .to_string_lossy()
        .into_owned()
}

fn apply_watched(state: &Path, pid: i32, manifest: &str, extra: &[&str]) -> Run {
    let pid = pid.to_string();
    let mut args = vec![
        "apply",
        &pid,
        manifest,
        "--force",
        "--context-secs",
        "0",
        "--baseline",
        "0.3",
        "--json",
    ];
    args.extend_from_slice(extra);
    shadowpatch(state, &args)
}

#[test]
fn a_window_no_call_exercised_ends_unexercised_and_the_policy_applies() {
    // No worker threads: work_fn runs only when asked.
    let mut target = Running::start(Fixture::BusyC, &["0"]).unwrap();
    let pid = target.pid();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");

    let fine = manifest(dir.path(), &target, "idle", "work_fn_fine");
    let run = apply_watched(&state, pid, &fine, &["--watch", "1", "--max-window", "2s"]);
    assert_eq!(run.code, 4, "rolled back: {}{}", run.stdout, run.stderr);
    let watch = &run.json()["watch"];
    assert_eq!(watch["decision"], "rollback", "{watch}");
    assert_eq!(watch["cause"], "unexercised", "{watch}");
    assert_eq!(watch["calls"][0]["function"], "work_fn", "{watch}");
    assert_eq!(watch["calls"][0]["calls"], 0, "{watch}");
    assert_eq!(watch["min_calls"], 1, "{watch}");
    assert!(
        watch["extended_ms"].as_u64().unwrap() > 0,
        "extended past --watch: {watch}"
    );
    assert_eq!(target.command("ask 5").unwrap(), "16", "the original runs again");
    let history = shadowpatch(&state, &["history", "--json"]);
    assert!(
        history.stdout.contains("unexercised") && history.stdout.contains("\"calls\""),
        "the verdict and its counts are in the history: {}",
        history.stdout
    );

    // --unexercised keep: kept, still said to be unexercised.
    let fine = manifest(dir.path(), &target, "idle-kept", "work_fn_fine");
    let run = apply_watched(
        &state,
        pid,
        &fine,
        &["--watch", "1", "--max-window", "1s", "--unexercised", "keep"],
    );
    assert_eq!(run.code, 0, "kept: {}{}", run.stdout, run.stderr);
    let watch = &run.json()["watch"];
    assert_eq!(
        (&watch["decision"], &watch["cause"]),
        (&"keep".into(), &"unexercised".into()),
        "{watch}"
    );
    assert_eq!(watch["calls"][0]["calls"], 0, "{watch}");
    assert_eq!(target.command("ask 5").unwrap(), "1000016", "the patch runs");
    assert_eq!(shadowpatch(&state, &["verify", &pid.to_string()]).code, 0);
    assert_eq!(shadowpatch(&state, &["rollback", &pid.to_string()]).code, 0);

    // Calls during the window: exercised, kept, counted.
    let fine = manifest(dir.path(), &target, "asked", "work_fn_fine");
    let state_for_apply = state.clone();
    let applier = std::thread::spawn(move || {
        apply_watched(
            &state_for_apply,
            pid,
            &fine,
            &["--watch", "2", "--max-window", "2s", "--min-calls", "2"],
        )
    });
    // Ask until the stub has counted two calls (each answer is patched).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut patched = 0;
    while patched < 3 {
        assert!(Instant::now() < deadline, "the patch never answered");
        if target.command("ask 5").unwrap() == "1000016" {
            patched += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let run = applier.join().unwrap();
    assert_eq!(run.code, 0, "kept: {}{}", run.stdout, run.stderr);
    let watch = &run.json()["watch"];
    assert_eq!(
        (&watch["decision"], &watch["cause"]),
        (&"keep".into(), &"window".into()),
        "{watch}"
    );
    assert!(watch["calls"][0]["calls"].as_u64().unwrap() >= 2, "{watch}");

    // Bad values are one-line refusals, the target untouched.
    let bad = manifest(dir.path(), &target, "bad", "work_fn_fine");
    assert_bad_input(
        &apply_watched(&state, pid, &bad, &["--watch", "1", "--unexercised", "maybe"]),
        "--unexercised maybe",
    );
    assert_bad_input(
        &apply_watched(&state, pid, &bad, &["--watch", "3", "--max-window", "1s"]),
        "--max-window",
    );
    assert_bad_input(
        &apply_watched(&state, pid, &bad, &["--max-window", "1s"]),
        "need --watch",
    );
}

#[test]
fn endless_recursion_under_watch_is_survived_through_the_cli() {
    let mut target = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let pid = target.pid();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let recurse = manifest(dir.path(), &target, "recurse", "work_fn_recurse");
    let run = apply_watched(&state, pid, &recurse, &["--watch", "3"]);
    assert_eq!(run.code, 4, "rolled back: {}{}", run.stdout, run.stderr);
    let watch = &run.json()["watch"];
    assert_eq!(watch["cause"], "crash", "{watch}");
    assert_eq!(watch["recovery"]["signal"], "SIGSEGV", "{watch}");
    assert!(target.is_running(), "the target survived its stack overflow");
    assert_eq!(target.command("ask 7").unwrap(), "22", "the original answers");
    let check = target.check().unwrap();
    assert_eq!(check["errors"], 0, "every call answered correctly: {check:?}");
}

/// A test agent that watches every apply for 3 s.
fn watching_agent(dir: &Path) -> Agent {
    Agent::start_with(dir, &["--watch-after-apply", "3s"], &[])
}

/// Target `pid`'s window as the agent's ready line reported it.
fn window_of(agent: &Agent, pid: i32) -> serde_json::Value {
    agent.target(pid)["window"].clone()
}

/// Start an agent apply of `id` in the background and kill the agent -9
/// once the window is live (its saved state appears).
fn kill_agent_mid_window(dir: &Path, state: &Path, target: &Running, id: &str) -> PathBuf {
    let agent = watching_agent(dir);
    let manifest = manifest(dir, target, id, "work_fn_fine");
    let pid_text = target.pid().to_string();
    let (socket, state_for_apply) = (agent.socket.clone(), state.to_path_buf());
    let applier = std::thread::spawn(move || {
        shadowpatch_env(
            &state_for_apply,
            &[
                "apply",
                &pid_text,
                &manifest,
                "--force",
                "--context-secs",
                "0",
                "--json",
            ],
            &[("SHADOWPATCH_AGENT_SOCKET", socket.to_str().unwrap())],
        )
    });
    let targets = state.join("targets");
    let deadline = Instant::now() + Duration::from_secs(30);
    let saved = loop {
        let found = std::fs::read_dir(&targets)
            .into_iter()
            .flatten()
            .flatten()
            .map(|entry| entry.path().join("watch-window.json"))
            .find(|path| path.exists());
        if let Some(found) = found {
            break found;
        }
        assert!(Instant::now() < deadline, "the window never started");
        std::thread::sleep(Duration::from_millis(10));
    };
    agent.kill();
    let cut = applier.join().unwrap();
    assert_ne!(cut.code, 0, "the apply's agent died: {}{}", cut.stdout, cut.stderr);
    saved
}

fn verdicts(state: &Path, patch: &str) -> Vec<serde_json::Value> {
    let history = shadowpatch(state, &["history", "--json"]).json();
    history
        .as_array()
        .or_else(|| history["events"].as_array())
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["kind"] == "watch_verdict" && e["patch_id"] == patch)
        .collect()
}

#[test]
fn an_agent_killed_mid_window_finishes_the_window_when_it_restarts() {
    let mut target = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let pid = target.pid();
    let pid_text = pid.to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");

    // Resumed: the saved window is taken up for its remaining time and the
    // (exercised, harmless) patch kept.
    kill_agent_mid_window(dir.path(), &state, &target, "resumed");
    let agent = watching_agent(dir.path());
    let window = window_of(&agent, pid);
    assert_eq!(window["action"], "resuming", "{}", agent.ready);
    assert_eq!(window["patch_id"], "resumed", "{window}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let verdict = loop {
        if let Some(verdict) = verdicts(&state, "resumed").pop() {
            break verdict;
        }
        assert!(Instant::now() < deadline, "the resumed window never reached a verdict");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(verdict["outcome"], "keep", "{verdict}");
    let details = &verdict["details"];
    assert!(
        details["resumed"]
            .as_str()
            .unwrap()
            .contains("resumed after an agent restart"),
        "{verdict}"
    );
    assert!(details["calls"][0]["calls"].as_u64().unwrap() >= 1, "{verdict}");
    // Two spinning threads: their CPU share is whatever the host leaves
    // free, so it is not judged (it flipped this verdict under CI load).
    assert!(
        details["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().starts_with("cpu_percent not judged")),
        "{verdict}"
    );
    assert_eq!(target.command("ask 5").unwrap(), "1000016", "the kept patch runs");
    assert_eq!(
        shadowpatch(&state, &["verify", &pid_text]).code,
        0,
        "kept = the generation"
    );
    let rolled = agent.cli(&state, &["rollback", &pid_text, "--json"]);
    assert_eq!(rolled.code, 0, "{}{}", rolled.stdout, rolled.stderr);
    agent.kill();

    // Cannot be judged: its saved window is lost, so it is rolled back.
    let saved = kill_agent_mid_window(dir.path(), &state, &target, "lost");
    std::fs::remove_file(&saved).unwrap();
    let agent = watching_agent(dir.path());
    let window = window_of(&agent, pid);
    assert_eq!(window["action"], "rolled_back", "{}", agent.ready);
    assert!(
        window["reason"].as_str().unwrap().contains("cannot be judged"),
        "{window}"
    );
    let verdict = verdicts(&state, "lost").pop().expect("a verdict for the lost window");
    assert_eq!(
        (&verdict["outcome"], &verdict["cause"]),
        (&"rollback".into(), &"window-lost".into()),
        "{verdict}"
    );
    let status = agent.cli(&state, &["status", &pid_text, "--json"]).json();
    assert_eq!(status["patches"].as_array().map_or(0, Vec::len), 0, "{status}");
    assert_eq!(target.command("ask 5").unwrap(), "16", "the original runs again");
    let check = target.check().unwrap();
    assert_eq!(check["errors"], 0, "every call answered correctly: {check:?}");
    assert_eq!(shadowpatch(&state, &["verify", &pid_text]).code, 0);
}

#[test]
fn a_kill_between_the_keep_and_its_generation_is_recovered() {
    let mut target = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let pid = target.pid();
    let pid_text = pid.to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let fine = manifest(dir.path(), &target, "unpublished", "work_fn_fine");
    let args = [
        "apply",
        &pid_text,
        &fine,
        "--force",
        "--context-secs",
        "0",
        "--baseline",
        "0.3",
        "--watch",
        "1",
    ];
    let killed = shadowpatch_env(&state, &args, &[("SHADOWPATCH_FAULT", "kept-unpublished")]);
    assert_eq!(
        killed.code, -1,
        "killed at the point: {}{}",
        killed.stdout, killed.stderr
    );
    // The repoint committed: the patch runs straight from its entry.
    assert_eq!(target.command("ask 5").unwrap(), "1000016");
    let recovered = shadowpatch(&state, &["recover", &pid_text]);
    assert_eq!(recovered.code, 0, "{}{}", recovered.stdout, recovered.stderr);
    let verify = shadowpatch(&state, &["verify", &pid_text]);
    assert_eq!(
        verify.code, 0,
        "recover published the kept generation: {}{}",
        verify.stdout, verify.stderr
    );
    let rolled = shadowpatch(&state, &["rollback", &pid_text]);
    assert_eq!(rolled.code, 0, "{}{}", rolled.stdout, rolled.stderr);
    assert_eq!(target.command("ask 5").unwrap(), "16");
}
