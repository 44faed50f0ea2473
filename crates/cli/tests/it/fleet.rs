//! Host-wide library patches: a hundred processes mapping libfleet (a
//! small shared library), `apply --all` patches every one of them (each its
//! own journaled transaction) and no other process, `verify --all` finds
//! them clean, `rollback --all` restores them all; a batch killed after
//! its members' journal appends, before any stop, is recovered member by
//! member; bad input exits 2 with nothing touched.

use crate::common::{
    assert_bad_input, assert_untouched, build_id_of, members_with, shadowpatch, shadowpatch_env, write_manifest,
};
use shadowpatch_fixtures::{build_library_fixture, build_patch, Fixture, Patch, Running};
use std::collections::BTreeSet;

const PROCESSES: usize = 100;

/// The tests here run one at a time: `--all` reaches every libfleet
/// process on the host, another test's included.
static HOST_WIDE: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn host_wide() -> std::sync::MutexGuard<'static, ()> {
    HOST_WIDE.lock().unwrap_or_else(|p| p.into_inner())
}

/// A manifest replacing libfleet's fleet_value, for the module `build_id`.
fn fleet_manifest(dir: &std::path::Path, id: &str, build_id: &str) -> String {
    let object = build_patch(Patch::FleetFix).unwrap();
    let manifest = write_manifest(dir, id, &object, build_id, &[("fleet_value", "fleet_value_v2")]);
    manifest.to_str().unwrap().to_string()
}

/// Ask a fleet process to fork a child that waits; the child's pid.
fn fork_child(process: &mut Running) -> i32 {
    let answer = process.command("fork").unwrap();
    answer
        .strip_prefix("child=")
        .unwrap_or_else(|| panic!("fork: {answer}"))
        .parse()
        .unwrap()
}

fn values(processes: &mut [Running]) -> BTreeSet<String> {
    processes.iter_mut().map(|p| p.command("value").unwrap()).collect()
}

/// Host-wide, a member's mirror holds the patched module only (not its
/// glibc): a byte changed in libfleet's code, just past the patched
/// entry's jump, is still found by `verify`, and clean again once put back.
fn tamper_is_detected_on_a_member(state: &std::path::Path, member: &Running) {
    let pid = member.pid();
    let generation = state
        .join("targets")
        .read_dir()
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{pid}-")))
        .expect("the member has state")
        .join("gen-000000.mirror");
    let header = shadowpatch_mirror::MirrorFile::open(&generation).unwrap().header;
    let mirrored: BTreeSet<&str> = header.regions.iter().map(|r| r.spec.module.as_str()).collect();
    assert!(
        mirrored.iter().all(|m| m.starts_with("libfleet")),
        "generation 0 of a host-wide member is its libfleet only: {mirrored:?}"
    );
    let maps = shadowpatch_process::maps::read_maps(pid).unwrap();
    let entry = shadowpatch_symbols::modules_of(pid, &maps)
        .unwrap()
        .iter()
        .flat_map(|m| m.symbol_addresses("fleet_value"))
        .map(|(address, _)| address)
        .next()
        .expect("fleet_value in the member");
    // Past the 5-byte jump the patch wrote: the original function's bytes.
    let address = entry + 5;
    let mut memory =
        shadowpatch_process::TargetMemory::open(&shadowpatch_process::ProcessIdentity::of(pid).unwrap()).unwrap();
    let original = memory.read_vec(address, 1).unwrap()[0];
    memory.write(address, &[original ^ 0x5a]).unwrap();
    let pid_text = pid.to_string();
    let dirty = shadowpatch(state, &["verify", &pid_text, "--json"]);
    memory.write(address, &[original]).unwrap();
    assert_eq!(dirty.code, 1, "{}{}", dirty.stdout, dirty.stderr);
    let dirty = dirty.json();
    assert_eq!(dirty["differences"][0]["address"], address, "{dirty}");
    let clean = shadowpatch(state, &["verify", &pid_text]);
    assert_eq!(clean.code, 0, "{}{}", clean.stdout, clean.stderr);
}

#[test]
fn apply_all_patches_every_process_mapping_the_library_and_rollback_all_restores_them() {
    let _alone = host_wide();
    let fixture = build_library_fixture().unwrap();
    let mut processes: Vec<Running> = (0..PROCESSES)
        .map(|_| Running::start_binary(&fixture.program, &[]).unwrap())
        .collect();
    // A process that does not map the library: never touched.
    let bystander = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let manifest = fleet_manifest(dir.path(), "fleet1", &build_id_of(&fixture.library));
    let manifest = manifest.as_str();
    assert_eq!(values(&mut processes), BTreeSet::from(["value=1".to_string()]));

    let applied = shadowpatch(&state, &["apply", "--all", manifest, "--json"]);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    let applied = applied.json();
    let members = applied["members"].as_array().unwrap();
    let ours: BTreeSet<i64> = processes.iter().map(|p| i64::from(p.pid())).collect();
    let patched = members_with(&applied, "applied");
    assert!(ours.is_subset(&patched), "every fixture process is patched: {applied}");
    assert!(!patched.contains(&i64::from(bystander.pid())), "{applied}");
    assert!(
        members.iter().all(|m| m["pause_us"].as_u64().is_some()),
        "each process's pause is reported"
    );
    assert!(
        applied["passed_over"]["do not map the module"].as_u64().unwrap() > 0,
        "{applied}"
    );
    assert_eq!(values(&mut processes), BTreeSet::from(["value=2".to_string()]));
    // Host-wide, the analysis gate takes one context sample per process
    // unless --context-secs asks for a window (a single apply samples for
    // 0.5 s).
    let first = processes[0].pid().to_string();
    let history = shadowpatch(&state, &["history", &first, "--kind", "analysis", "--json"]);
    assert_eq!(history.code, 0, "{}", history.stderr);
    let events = history.json().as_array().unwrap().clone();
    assert_eq!(events.len(), 1, "{events:?}");
    let window = &events[0]["details"]["analysis"]["features"]["context.window_s"];
    assert_eq!(window.as_f64(), Some(0.0), "{}", events[0]);
    assert!(
        !state.join("targets").read_dir().unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with(&format!("{}-", bystander.pid()))),
        "the bystander has no state"
    );

    let verified = shadowpatch(&state, &["verify", "--all"]);
    assert_eq!(verified.code, 0, "{}{}", verified.stdout, verified.stderr);
    assert!(
        verified.stdout.matches("== pid ").count() >= PROCESSES,
        "{}",
        verified.stdout
    );
    tamper_is_detected_on_a_member(&state, &processes[PROCESSES / 2]);

    // Run again with one newcomer: only it is patched, no warning.
    let mut newcomer = Running::start_binary(&fixture.program, &[]).unwrap();
    let again = shadowpatch(&state, &["apply", "--all", manifest, "--json"]);
    assert_eq!(again.code, 0, "{}{}", again.stdout, again.stderr);
    let again = again.json();
    assert_eq!(again["members"].as_array().unwrap().len(), 1, "{again}");
    assert_eq!(again["members"][0]["pid"], newcomer.pid(), "{again}");
    assert_eq!(
        again["passed_over"]["already have patch fleet1 active"].as_u64(),
        Some(patched.len() as u64),
        "{again}"
    );
    assert!(again["appeared"].as_array().unwrap().is_empty(), "{again}");
    assert_eq!(newcomer.command("value").unwrap(), "value=2");

    let rolled = shadowpatch(&state, &["rollback", "--all"]);
    assert_eq!(rolled.code, 0, "{}{}", rolled.stdout, rolled.stderr);
    assert!(rolled.stdout.contains("summary: "), "{}", rolled.stdout);
    assert!(
        rolled.stdout.contains(&format!("{} rolled_back", patched.len() + 1)),
        "{}",
        rolled.stdout
    );
    assert_eq!(newcomer.command("value").unwrap(), "value=1");
    assert_eq!(values(&mut processes), BTreeSet::from(["value=1".to_string()]));
    let verified = shadowpatch(&state, &["verify", "--all"]);
    assert_eq!(verified.code, 0, "{}{}", verified.stdout, verified.stderr);
    for process in &processes {
        assert_untouched(process.pid());
    }
    assert_untouched(bystander.pid());

    // Nothing left to roll back: bad input, nothing touched.
    assert_bad_input(
        &shadowpatch(&state, &["rollback", "--all"]),
        "no process of the host has a patch active",
    );
}

#[test]
fn host_wide_bad_input_exits_2_and_touches_nothing() {
    let _alone = host_wide();
    let fixture = build_library_fixture().unwrap();
    let mut process = Running::start_binary(&fixture.program, &[]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    // A build-id no process maps.
    let nobody = fleet_manifest(dir.path(), "nobody", &"ab".repeat(20));
    assert_bad_input(
        &shadowpatch(&state, &["apply", "--all", &nobody]),
        "no process of the host maps the module",
    );
    let manifest = fleet_manifest(dir.path(), "fleet1", &build_id_of(&fixture.library));
    let manifest = manifest.as_str();
    let pid = process.pid().to_string();
    for args in [
        vec!["apply", "--all", &pid, manifest],
        vec!["apply", "--all", "--tree", manifest],
        vec!["apply", "--all", "--watch", "5", manifest],
        vec!["rollback", "--all", "--restore-state"],
        vec!["verify", "--all", &pid],
        vec!["status", "--all", &pid],
        vec!["gc", "--dry-run=maybe"],
        vec!["gc", "--older-than", "3d"],
        vec!["list", "--all"],
    ] {
        let run = shadowpatch(&state, &args);
        assert_eq!(run.code, 2, "{args:?}: {}{}", run.stdout, run.stderr);
        assert_eq!(run.stderr.lines().count(), 1, "{args:?}: one line: {}", run.stderr);
    }
    // No live process has state yet: --all has nothing to verify.
    assert_bad_input(&shadowpatch(&state, &["verify", "--all"]), "no live process has state");
    assert_eq!(process.command("value").unwrap(), "value=1");
    assert!(!state.join("targets").exists(), "nothing recorded");
    assert_untouched(process.pid());
}

/// Host-wide, members' journal records are synced together, before each
/// worker's next stop. Killed (SIGKILL) when the first member has appended
/// `Begin` and `Map` (the batch's sync not yet made, no member's target
/// stopped or written): every process still runs the original code,
/// untraced, each member's journal replays, `recover` closes what was
/// open, and the next `apply --all` patches every one of them.
#[test]
fn apply_all_killed_after_the_batch_appends_before_any_stop_is_recovered() {
    const MEMBERS: usize = 24;
    let _alone = host_wide();
    let fixture = build_library_fixture().unwrap();
    let mut processes: Vec<Running> = (0..MEMBERS)
        .map(|_| Running::start_binary(&fixture.program, &[]).unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let manifest = fleet_manifest(dir.path(), "fleet1", &build_id_of(&fixture.library));
    let manifest = manifest.as_str();

    let killed = shadowpatch_env(
        &state,
        &["apply", "--all", "--jobs", "8", manifest],
        &[("SHADOWPATCH_FAULT", "map")],
    );
    assert_eq!(killed.code, -1, "killed by SIGKILL: {}{}", killed.stdout, killed.stderr);
    assert_eq!(values(&mut processes), BTreeSet::from(["value=1".to_string()]));
    for process in &processes {
        assert_untouched(process.pid());
    }

    let mut interrupted = 0;
    for process in &processes {
        let pid = process.pid().to_string();
        let recovered = shadowpatch(&state, &["recover", &pid, "--json"]);
        if recovered.code == 2 {
            // A member the batch had not reached: no state to recover.
            assert!(recovered.stderr.contains("no mirror"), "{}", recovered.stderr);
            continue;
        }
        assert_eq!(recovered.code, 0, "{pid}: {}{}", recovered.stdout, recovered.stderr);
        let recovered = recovered.json();
        match recovered["state"].as_str() {
            Some("fully_rolled_back") => {
                interrupted += 1;
                assert_eq!(recovered["interrupted"], "apply", "{recovered}");
                assert_eq!(recovered["written"], 0, "no trampoline was written: {recovered}");
            }
            Some("consistent") => {}
            other => panic!("{pid}: recovered to {other:?}: {recovered}"),
        }
        assert_untouched(process.pid());
    }
    assert!(interrupted >= 1, "the member killed at `map` had an open transaction");
    assert_eq!(values(&mut processes), BTreeSet::from(["value=1".to_string()]));

    let applied = shadowpatch(&state, &["apply", "--all", manifest, "--json"]);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    assert_eq!(values(&mut processes), BTreeSet::from(["value=2".to_string()]));
    let verified = shadowpatch(&state, &["verify", "--all"]);
    assert_eq!(verified.code, 0, "{}{}", verified.stdout, verified.stderr);
    let rolled = shadowpatch(&state, &["rollback", "--all"]);
    assert_eq!(rolled.code, 0, "{}{}", rolled.stdout, rolled.stderr);
    assert_eq!(values(&mut processes), BTreeSet::from(["value=1".to_string()]));
}

/// Host-wide, a process forked from a patched one carries the patch: the
/// apply adopts its ancestor's state and passes it over as
/// `already_active` (neither a failure nor a second patch), patches the
/// others, and records every member's events in the history (written a
/// group at a time); `rollback --all` then restores the child too, and a
/// child forked from a member after the set.
#[test]
fn apply_all_passes_over_a_child_that_carries_the_patch_by_fork() {
    let _alone = host_wide();
    let fixture = build_library_fixture().unwrap();
    let mut processes: Vec<Running> = (0..3)
        .map(|_| Running::start_binary(&fixture.program, &[]).unwrap())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let manifest = fleet_manifest(dir.path(), "fleet-fork", &build_id_of(&fixture.library));
    let manifest = manifest.as_str();
    let parent = processes[0].pid();
    let single = shadowpatch(&state, &["apply", &parent.to_string(), manifest, "--context-secs", "0"]);
    assert_eq!(single.code, 0, "{}{}", single.stdout, single.stderr);
    let child = fork_child(&mut processes[0]);

    let applied = shadowpatch(&state, &["apply", "--all", manifest, "--json"]);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    let applied = applied.json();
    let outcome_of = |pid: i32| {
        applied["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["pid"] == pid)
            .map(|m| m["outcome"].as_str().unwrap().to_string())
    };
    assert_eq!(outcome_of(child).as_deref(), Some("already_active"), "{applied}");
    assert_eq!(outcome_of(parent), None, "passed over before the set: {applied}");
    for process in &processes[1..] {
        assert_eq!(outcome_of(process.pid()).as_deref(), Some("applied"), "{applied}");
    }
    assert_eq!(applied["failure"], serde_json::Value::Null, "{applied}");
    assert_eq!(values(&mut processes), BTreeSet::from(["value=2".to_string()]));
    // The child is known, at the generation it adopted, and clean.
    let verified = shadowpatch(&state, &["verify", &child.to_string(), "--json"]);
    assert_eq!(verified.code, 0, "{}{}", verified.stdout, verified.stderr);
    assert_eq!(verified.json()["generation"], 1, "{}", verified.stdout);
    // Every member's apply event is in the history once the set is done.
    for process in &processes[1..] {
        let history = shadowpatch(
            &state,
            &["history", &process.pid().to_string(), "--kind", "apply", "--json"],
        );
        assert_eq!(history.code, 0, "{}", history.stderr);
        let events = history.json().as_array().unwrap().clone();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["outcome"], "ok", "{}", events[0]);
    }

    // A child forked from a member after the set, with no state of its
    // own: `rollback --all` adopts it before its parent rolls back.
    let late = fork_child(&mut processes[1]);
    let rolled = shadowpatch(&state, &["rollback", "--all", "--json"]);
    assert_eq!(rolled.code, 0, "{}{}", rolled.stdout, rolled.stderr);
    let rolled = rolled.json();
    let rolled_back = members_with(&rolled, "rolled_back");
    for pid in [parent, child, late, processes[1].pid(), processes[2].pid()] {
        assert!(rolled_back.contains(&i64::from(pid)), "{pid} rolled back: {rolled}");
    }
    assert_eq!(values(&mut processes), BTreeSet::from(["value=1".to_string()]));
    for forked in [child, late] {
        let verified = shadowpatch(&state, &["verify", &forked.to_string(), "--json"]);
        assert_eq!(verified.code, 0, "{}{}", verified.stdout, verified.stderr);
        assert_eq!(
            verified.json()["generation"],
            0,
            "{forked} rolled back: {}",
            verified.stdout
        );
    }
    for process in &processes {
        assert_untouched(process.pid());
    }
    assert_untouched(child);
    assert_untouched(late);
}
