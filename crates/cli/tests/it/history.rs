//! `shadowpatch history`: every mirror, apply and rollback (with its cause)
//! lands in the SQLite event history and can be filtered; bad input and a
//! database from a newer shadowpatch are one-line errors.

use crate::common::{assert_bad_input, build_id_of, shadowpatch, write_manifest};
use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};

#[test]
fn mirror_apply_and_rollback_are_recorded_in_order() {
    let target = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let pid = target.pid().to_string();
    let manifest = write_manifest(
        dir.path(),
        "hist",
        &build_patch(Patch::BusyFix).unwrap(),
        &build_id_of(&target.binary()),
        &[("banner", "banner_v2")],
    );
    // A refused rollback before anything else is recorded, and the history
    // it creates does not stop the state directory from being used.
    assert_eq!(shadowpatch(&state, &["rollback", &pid]).code, 2);
    assert_eq!(shadowpatch(&state, &["mirror", &pid]).code, 0);
    assert_eq!(
        shadowpatch(&state, &["apply", &pid, manifest.to_str().unwrap()]).code,
        0
    );
    assert_eq!(shadowpatch(&state, &["rollback", &pid]).code, 0);
    // A refused operation is recorded too, with its outcome.
    assert_eq!(shadowpatch(&state, &["rollback", &pid]).code, 2);

    let events = shadowpatch(&state, &["history", &pid, "--json"]).json();
    let kinds: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    // apply runs the prediction engine first: its analysis is recorded too.
    assert_eq!(
        kinds,
        ["rollback", "mirror", "analysis", "apply", "rollback", "rollback"]
    );
    let events: Vec<&serde_json::Value> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] != "analysis")
        .skip(1)
        .collect();
    let apply = &events[1];
    assert_eq!(apply["patch_id"], "hist");
    assert_eq!(apply["outcome"], "ok");
    assert!(apply["duration_us"].as_u64().unwrap() > 0);
    assert_eq!(apply["details"]["functions"][0], "banner");
    assert_eq!(events[2]["cause"], "command");
    assert_eq!(events[3]["outcome"], "bad_input");

    let only_rollbacks = shadowpatch(&state, &["history", "--kind", "rollback", "--limit", "1", "--json"]).json();
    assert_eq!(only_rollbacks.as_array().unwrap().len(), 1);
    assert_eq!(only_rollbacks[0]["outcome"], "bad_input");
    let text = shadowpatch(&state, &["history", &pid, "--since", "1h"]);
    assert_eq!(text.code, 0);
    assert!(
        text.stdout.contains("apply") && text.stdout.contains("patch hist"),
        "{}",
        text.stdout
    );
    let future = shadowpatch(&state, &["history", "--since", "2999-01-01T00:00:00Z", "--json"]).json();
    assert!(future.as_array().unwrap().is_empty());
}

#[test]
fn bad_queries_and_future_databases_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    assert_bad_input(
        &shadowpatch(dir.path(), &["history", "--since", "soon"]),
        "--since soon",
    );
    assert_bad_input(
        &shadowpatch(dir.path(), &["history", "--kind", "coffee"]),
        "--kind coffee",
    );
    // No history yet is not an error.
    let empty = shadowpatch(dir.path(), &["history", "--json"]);
    assert_eq!((empty.code, empty.json()), (0, serde_json::json!([])));

    std::fs::create_dir_all(dir.path()).unwrap();
    let database = dir.path().join("history.db");
    let status = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('create table events(x)'); \
             c.execute('pragma user_version = 42'); c.commit()",
        ])
        .arg(&database)
        .status()
        .unwrap();
    assert!(status.success());
    assert_bad_input(&shadowpatch(dir.path(), &["history"]), "schema version 42");
}
