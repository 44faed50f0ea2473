//! `apply --persist`: the agent applies a persisted patch to every new
//! process of the program (a restart), not to one already running, not to one whose build-id changed
//! (an upgrade), and no longer once `unpersist` ends the rule.

use crate::common::agent::Agent;
use crate::common::{assert_bad_input, build_id_of, shadowpatch, write_manifest};
use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// What busy.c's `ask 5` answers once work_fn_v2 runs.
const PATCHED: &str = "1000016";

fn answer(target: &mut Running) -> String {
    target.command("ask 5").unwrap()
}

/// Wait up to `limit` for `ask 5` to answer patched; whether it did.
fn becomes_patched(target: &mut Running, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if answer(target) == PATCHED {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn events(state: &Path, kind: &str) -> Vec<serde_json::Value> {
    let history = shadowpatch(state, &["history", "--json"]).json();
    history
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e["kind"] == kind)
        .collect()
}

#[test]
fn a_persisted_patch_reaches_restarts_but_not_an_upgraded_program_nor_after_unpersist() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // The program under a path of this test's own, so it can be
    // "upgraded" (replaced by another build) without touching the
    // fixtures other tests share.
    let fixture = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let program = dir.path().join("busy");
    let pristine = dir.path().join("busy.pristine");
    std::fs::copy(fixture.binary(), &program).unwrap();
    std::fs::copy(fixture.binary(), &pristine).unwrap();
    drop(fixture);
    let object = build_patch(Patch::BusyFix).unwrap();
    let manifest = write_manifest(
        dir.path(),
        "persisted",
        &object,
        &build_id_of(&program),
        &[("work_fn", "work_fn_v2")],
    );
    let manifest = manifest.to_str().unwrap();
    let agent = Agent::start(dir.path());

    let mut first = Running::start_binary(&program, &["1"]).unwrap();
    // Running before the rule: the user did not ask to patch it.
    let mut bystander = Running::start_binary(&program, &["1"]).unwrap();
    let pid = first.pid().to_string();
    // Bad input first: nothing applied, nothing persisted.
    let missing = agent.cli(
        &state,
        &["apply", &pid, manifest, "--persist", "--program", "/no/such/program"],
    );
    assert_bad_input(&missing, "/no/such/program");
    let unit = agent.cli(&state, &["apply", manifest, "--unit", "no-such-unit", "--persist"]);
    assert_bad_input(&unit, "no-such-unit");
    assert_ne!(
        answer(&mut first),
        PATCHED,
        "a refused --persist left the target untouched"
    );
    assert_eq!(
        shadowpatch(&state, &["persisted", "--json"]).json(),
        serde_json::json!([])
    );

    let applied = agent.cli(&state, &["apply", &pid, manifest, "--persist"]);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    assert!(applied.stderr.contains("persisted persisted"), "{}", applied.stderr);
    assert_eq!(answer(&mut first), PATCHED);
    let rules = shadowpatch(&state, &["persisted", "--json"]).json();
    assert_eq!(rules[0]["id"], "persisted", "{rules}");
    assert_eq!(
        rules[0]["scope"]["program"],
        program.canonicalize().unwrap().to_str().unwrap(),
        "{rules}"
    );

    // A restart: a new process of the program is patched by the agent.
    let mut restarted = Running::start_binary(&program, &["1"]).unwrap();
    assert!(
        becomes_patched(&mut restarted, Duration::from_secs(30)),
        "the agent never applied the persisted patch to pid {}",
        restarted.pid()
    );
    // Recorded once the transaction is done, just after activation.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !events(&state, "apply").iter().any(|e| {
        e["pid"] == restarted.pid() && e["details"]["requested_by"].as_str() == Some("agent persist persisted")
    }) {
        assert!(
            Instant::now() < deadline,
            "no apply event for pid {}: {:?}",
            restarted.pid(),
            events(&state, "apply")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(restarted.check().unwrap()["errors"], 0);
    assert_ne!(
        answer(&mut bystander),
        PATCHED,
        "a process older than the rule was patched: {} {:?}",
        shadowpatch(&state, &["persisted", "--json"]).stdout,
        events(&state, "apply")
    );
    // The original is not patched twice.
    assert_eq!(
        shadowpatch(&state, &["status", &pid, "--json"]).json()["patches"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // An upgrade: the program file is another build now.
    std::fs::remove_file(&program).unwrap();
    std::fs::copy("/bin/sleep", &program).unwrap();
    let mut upgraded = Command::new(&program).arg("600").spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let changed = loop {
        let found = events(&state, "persist")
            .into_iter()
            .find(|e| e["outcome"] == "build_id_changed" && e["pid"] == upgraded.id());
        if let Some(found) = found {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "no build_id_changed event for the upgraded program"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        changed["details"]["message"]
            .as_str()
            .unwrap()
            .contains("another build-id"),
        "{changed}"
    );
    let _ = upgraded.kill();
    let _ = upgraded.wait();

    // Unpersisted: a new process is left alone.
    let ended = agent.cli(&state, &["unpersist", "persisted"]);
    assert_eq!(ended.code, 0, "{}{}", ended.stdout, ended.stderr);
    assert_bad_input(&agent.cli(&state, &["unpersist", "persisted"]), "no persisted patch");
    std::fs::remove_file(&program).unwrap();
    std::fs::copy(&pristine, &program).unwrap();
    let mut after = Running::start_binary(&program, &["1"]).unwrap();
    assert!(
        !becomes_patched(&mut after, Duration::from_secs(2)),
        "patched after unpersist"
    );
    assert_eq!(answer(&mut first), PATCHED, "where it was applied, it stays");
}
