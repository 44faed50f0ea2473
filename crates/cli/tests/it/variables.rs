//! End to end: critical variables on real fixture processes. A mirrored
//! variable's changes become snapshots (the last N kept, readable with
//! `history PID VAR`) while a guarded one's change is an alert; the dirty
//! method is reported and undone on stop, and a forced sweep mirrors the
//! same bytes; `apply` keeps the state before activation and `rollback
//! --restore-state` writes it back; bad input exits 2 with one line and
//! the target untouched.

use crate::common::watch::WatchProcess;
use crate::common::{assert_bad_input, assert_untouched, build_id_of, shadowpatch, write_manifest};
use serde_json::Value;
use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use shadowpatch_process::{ProcessIdentity, TargetMemory};
use std::path::Path;

fn memory_of(pid: i32) -> TargetMemory {
    TargetMemory::open(&ProcessIdentity::of(pid).unwrap()).unwrap()
}

fn blake3_hex(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// Mappings of `pid` write-protected by a userfaultfd (`uw` in VmFlags).
fn uffd_wp_mappings(pid: i32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap()
        .lines()
        .filter_map(|line| line.strip_prefix("VmFlags:"))
        .filter(|flags| flags.split_whitespace().any(|flag| flag == "uw"))
        .count()
}

/// `dirty 0 SEED` writes one word of one page of data_table and of bss_table.
fn dirty_tables(target: &mut Running, seed: u64) {
    assert!(target
        .command(&format!("dirty 0 {seed}"))
        .unwrap()
        .starts_with("pages=2 "));
}

fn snapshots_of(state: &Path, pid: i32, var: &str) -> Value {
    let run = shadowpatch(state, &["history", &pid.to_string(), var, "--json"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    run.json()
}

#[test]
fn mirrored_changes_are_kept_as_the_last_n_snapshots_and_a_guarded_change_alerts() {
    let mut target = Running::start(Fixture::DirtyData, &["1"]).unwrap();
    let pid = target.pid();
    let data = target.number("data");
    let data_len = target.number("data_len");
    let bss = target.number("bss");
    let bss_len = target.number("bss_len");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let vars = dir.path().join("vars.toml");
    std::fs::write(
        &vars,
        format!(
            "[[variable]]\nname = \"data_table\"\nmode = \"mirrored\"\n\
             [[variable]]\naddress = \"{bss:#x}\"\nsize = {bss_len}\nmode = \"guarded\"\n"
        ),
    )
    .unwrap();
    let vars_arg = vars.to_str().unwrap().to_string();
    let mut watch = WatchProcess::start(
        &state,
        pid,
        &["--vars", &vars_arg, "--history", "3", "--interval", "10ms"],
    );
    let started = watch.seen[0].clone();
    assert_eq!(
        started["dirty_method"], "uffd_wp_async",
        "the best method here: {started}"
    );
    assert_eq!(started["mirrored_bytes"], data_len);
    assert_eq!(started["guarded_bytes"], bss_len);
    assert_eq!(started["history"], 3);
    assert!(
        uffd_wp_mappings(pid) > 0,
        "the data pages are write-protected for tracking"
    );
    // The first snapshot is taken at start.
    watch.wait_for("snapshot", |e| e["address"] == data);

    let mut memory = memory_of(pid);
    for seed in 1..=5u64 {
        dirty_tables(&mut target, seed);
        let live = memory.read_vec(data, data_len as usize).unwrap();
        let hash = blake3_hex(&live);
        let snapshot = watch.wait_for("snapshot", |e| e["hash"] == hash.as_str());
        assert_eq!(snapshot["size"], data_len);
    }
    // The guarded table was written too: that is an alert, not a snapshot.
    let seen_alert = watch.seen.iter().find(|e| e["event"] == "alert").cloned();
    let alert = seen_alert.unwrap_or_else(|| watch.wait_for("alert", |_| true));
    assert_eq!(alert["scope"], "guarded_variable");
    assert!((bss..bss + bss_len).contains(&alert["address"].as_u64().unwrap()));

    let (code, events) = watch.stop();
    assert_eq!(code, 1, "alerts were raised");
    let stopped = events.iter().find(|e| e["event"] == "stopped").unwrap();
    assert_eq!(stopped["dirty_method_undone"], true);
    assert_eq!(uffd_wp_mappings(pid), 0, "write protection undone on stop");
    assert!(
        !events.iter().any(|e| e["event"] == "snapshot" && e["address"] == bss),
        "a guarded variable is never snapshotted as mirrored"
    );

    // Only the newest 3 are kept; the newest is the live bytes.
    let history = snapshots_of(&state, pid, "data_table");
    let kept = history["snapshots"].as_array().unwrap();
    assert_eq!(kept.len(), 3, "{history:#}");
    let live = memory.read_vec(data, data_len as usize).unwrap();
    assert_eq!(kept[2]["hash"], blake3_hex(&live));
    assert!(kept
        .windows(2)
        .all(|w| w[0]["unix_ms"].as_u64() <= w[1]["unix_ms"].as_u64()));
    let newest = shadowpatch(
        &state,
        &["history", &pid.to_string(), "data_table", "--limit", "1", "--json"],
    )
    .json();
    assert_eq!(newest["snapshots"].as_array().unwrap().len(), 1);
    assert_eq!(newest["snapshots"][0]["hash"], kept[2]["hash"]);
    assert_bad_input(
        &shadowpatch(&state, &["history", &pid.to_string(), "data_table", "--kind", "alert"]),
        "kinds select events",
    );

    // `snapshot` takes one now, detached, and keeps it in the history.
    dirty_tables(&mut target, 9);
    let taken = shadowpatch(&state, &["snapshot", &pid.to_string(), "--var", "data_table", "--json"]).json();
    let live = memory.read_vec(data, data_len as usize).unwrap();
    assert_eq!(taken["snapshots"][0]["hash"], blake3_hex(&live));
    let history = snapshots_of(&state, pid, "data_table");
    assert_eq!(history["snapshots"][2]["hash"], blake3_hex(&live));
    assert_eq!(history["snapshots"][2]["cause"], "snapshot");
    assert_eq!(target.check().unwrap()["errors"], 0);
    assert_untouched(pid);
}

#[test]
fn a_forced_sweep_mirrors_the_same_bytes_and_soft_dirty_is_refused_untouched() {
    let mut target = Running::start(Fixture::DirtyData, &["1"]).unwrap();
    let pid = target.pid();
    let data = target.number("data");
    let data_len = target.number("data_len");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");

    let refused = shadowpatch(
        &state,
        &[
            "watch",
            &pid.to_string(),
            "--mirror-var",
            "data_table",
            "--dirty-method",
            "soft-dirty",
        ],
    );
    assert_bad_input(&refused, "soft_dirty is unavailable");
    assert!(
        !state.exists() || std::fs::read_dir(&state).unwrap().next().is_none(),
        "nothing written"
    );
    assert_untouched(pid);

    let mut watch = WatchProcess::start(
        &state,
        pid,
        &[
            "--mirror-var",
            "data_table",
            "--dirty-method",
            "sweep",
            "--interval",
            "10ms",
        ],
    );
    assert_eq!(watch.seen[0]["dirty_method"], "full_sweep");
    assert_eq!(uffd_wp_mappings(pid), 0, "a sweep sets nothing up in the target");
    let mut memory = memory_of(pid);
    for seed in 1..=3u64 {
        dirty_tables(&mut target, seed);
        let hash = blake3_hex(&memory.read_vec(data, data_len as usize).unwrap());
        watch.wait_for("snapshot", |e| e["hash"] == hash.as_str());
    }
    let (code, _) = watch.stop();
    assert_eq!(code, 0);
    assert_untouched(pid);
}

#[test]
fn bad_variable_input_exits_2_with_one_line_and_leaves_the_target_untouched() {
    let target = Running::start(Fixture::DirtyData, &["1"]).unwrap();
    let pid = target.pid();
    let pid_text = pid.to_string();
    let data = target.number("data");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let unknown = write(
        "unknown.toml",
        "[[variable]]\nname = \"no_such_table\"\nmode = \"mirrored\"\n",
    );
    let overlap = write(
        "overlap.toml",
        &format!(
            "[[variable]]\nname = \"data_table\"\nmode = \"mirrored\"\n\
             [[variable]]\naddress = \"{:#x}\"\nsize = 8\nmode = \"guarded\"\n",
            data + 8
        ),
    );
    let bad_mode = write("mode.toml", "[[variable]]\nname = \"data_table\"\nmode = \"copied\"\n");
    let options = write(
        "options.toml",
        "interval = \"1s\"\n[[variable]]\nname = \"data_table\"\nmode = \"mirrored\"\n",
    );
    let zero = format!("{data:#x}:0");
    // The ELF header of the program: readable, never writable.
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let read_only = maps
        .lines()
        .find(|line| line.contains(" r--p ") && line.contains("dirtydata"))
        .and_then(|line| line.split('-').next())
        .map(|start| format!("0x{start}:8"))
        .unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--vars", &unknown], "no symbol no_such_table"),
        (vec!["--vars", &overlap], "overlaps"),
        (vec!["--vars", &bad_mode], "mode.toml"),
        (vec!["--vars", &options], "holds [[variable]] tables only"),
        (vec!["--mirror-var", &zero], "size 0"),
        (vec!["--mirror-var", &read_only], "is not writable memory"),
        (
            vec!["--mirror-var", "data_table", "--history", "0"],
            "--history: 0 is out of range",
        ),
        (
            vec!["--mirror-var", "data_table", "--dirty-method", "fast"],
            "--dirty-method: unknown method",
        ),
    ];
    for (args, needle) in cases {
        let mut all = vec!["watch", pid_text.as_str()];
        all.extend(args);
        assert_bad_input(&shadowpatch(&state, &all), needle);
        assert_untouched(pid);
        assert_eq!(uffd_wp_mappings(pid), 0);
    }
    assert!(
        !state.exists() || std::fs::read_dir(&state).unwrap().next().is_none(),
        "nothing written"
    );
    assert_bad_input(
        &shadowpatch(&state, &["snapshot", &pid_text]),
        "no registered critical variables",
    );
    assert_bad_input(
        &shadowpatch(&state, &["history", &pid_text, "data_table"]),
        "no snapshots of data_table",
    );
    assert_untouched(pid);
}

#[test]
fn rollback_restore_state_writes_back_the_variables_as_they_were_before_the_apply() {
    let mut target = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let pid = target.pid();
    let pid_text = pid.to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let object = build_patch(Patch::BusyFix).unwrap();
    let build_id = build_id_of(&target.binary());
    let manifest = write_manifest(dir.path(), "fix1", &object, &build_id, &[("work_fn", "work_fn_v2")]);
    let manifest = manifest.to_str().unwrap();

    // Without a registered mirrored variable there is nothing to restore:
    // refused before the rollback, which then still works.
    assert_eq!(shadowpatch(&state, &["apply", &pid_text, manifest]).code, 0);
    let refused = shadowpatch(&state, &["rollback", &pid_text, "--restore-state"]);
    assert_bad_input(&refused, "no snapshot was taken before fix1");
    assert_untouched(pid);
    assert_eq!(shadowpatch(&state, &["rollback", &pid_text]).code, 0);

    // Register `scale` as mirrored (a watch does), then apply.
    let watch = WatchProcess::start(&state, pid, &["--mirror-var", "scale"]);
    assert_eq!(watch.seen[0]["mirrored_variables"].as_array().unwrap().len(), 1);
    assert_eq!(watch.stop().0, 0);
    let status = shadowpatch(&state, &["status", &pid_text, "--json"]).json();
    let scale = status["variables"][0]["address"].as_u64().unwrap();
    let mut memory = memory_of(pid);
    assert_eq!(memory.read_vec(scale, 8).unwrap(), 3u64.to_le_bytes());
    let applied = shadowpatch(&state, &["apply", &pid_text, manifest, "--json"]);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    assert_eq!(applied.json()["state_snapshot"].as_array().unwrap().len(), 1);

    // The patched program changes its state; the rollback puts it back.
    memory.write(scale, &9u64.to_le_bytes()).unwrap();
    let rolled = shadowpatch(&state, &["rollback", &pid_text, "--restore-state", "--json"]);
    assert_eq!(rolled.code, 0, "{}{}", rolled.stdout, rolled.stderr);
    let restored = &rolled.json()["restored_state"];
    assert_eq!(restored["patch_id"], "fix1");
    assert_eq!(restored["restored"].as_array().unwrap().len(), 1);
    assert_eq!(restored["bytes"], 8);
    assert!(restored["txn"].is_u64(), "journaled: {restored}");
    assert_eq!(memory.read_vec(scale, 8).unwrap(), 3u64.to_le_bytes());
    // The journal is settled (nothing for recover to finish).
    let recovered = shadowpatch(&state, &["recover", &pid_text, "--json"]).json();
    assert_eq!(recovered["state"], "consistent");
    let events = shadowpatch(&state, &["history", &pid_text, "--kind", "snapshot", "--json"]).json();
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["cause"] == "restore_state" && e["patch_id"] == "fix1"),
        "{events:#}"
    );

    // The snapshot before the apply is in the variable's history.
    let history = snapshots_of(&state, pid, "scale");
    let before = history["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["cause"] == "apply")
        .unwrap()
        .clone();
    assert_eq!(before["patch_id"], "fix1");
    assert_eq!(before["value"], 3);
    assert!(target.is_running());
    assert_untouched(pid);
}
