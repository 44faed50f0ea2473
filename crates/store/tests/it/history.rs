//! The event history on a real SQLite file: round trip, filters, several
//! writers at once, and refusal of foreign, corrupt and future databases.

use shadowpatch_store::{EventFilter, EventKind, NewEvent, Store, StoreError, DATABASE_FILE, SCHEMA_VERSION};

#[test]
fn events_round_trip_with_filters() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .record(
            &NewEvent::new(EventKind::Apply)
                .target(10, 100)
                .at(1_000)
                .patch("fix-1")
                .outcome("ok")
                .duration_us(95)
                .details(serde_json::json!({"functions": ["f"]})),
        )
        .unwrap();
    store
        .record(
            &NewEvent::new(EventKind::Rollback)
                .target(10, 100)
                .at(2_000)
                .patch("fix-1")
                .cause("health"),
        )
        .unwrap();
    store
        .record(&NewEvent::new(EventKind::Alert).target(11, 5).at(3_000))
        .unwrap();
    let all = store.events(&EventFilter::default()).unwrap();
    assert_eq!(
        all.iter().map(|e| e.kind).collect::<Vec<_>>(),
        [EventKind::Apply, EventKind::Rollback, EventKind::Alert]
    );
    assert_eq!(all[0].details["functions"][0], "f");
    assert_eq!(all[0].duration_us, Some(95));
    assert_eq!(all[1].cause.as_deref(), Some("health"));

    let of_pid = store
        .events(&EventFilter {
            pid: Some(10),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(of_pid.len(), 2);
    let since = store
        .events(&EventFilter {
            since_unix_ms: Some(2_000),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(since.len(), 2);
    let newest = store
        .events(&EventFilter {
            limit: Some(1),
            ..Default::default()
        })
        .unwrap();
    assert_eq!(newest[0].kind, EventKind::Alert);
    let rollbacks = store
        .events(&EventFilter {
            kinds: vec![EventKind::Rollback],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(rollbacks.len(), 1);
    assert_eq!(store.count().unwrap(), 3);
}

#[test]
fn several_processes_append_concurrently_without_loss() {
    let dir = tempfile::tempdir().unwrap();
    Store::open(dir.path()).unwrap();
    // Threads with their own connections stand in for separate processes:
    // SQLite locks the file the same way for both.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let path = dir.path().to_path_buf();
            std::thread::spawn(move || {
                let store = Store::open(&path).unwrap();
                for i in 0..50 {
                    store
                        .record(&NewEvent::new(EventKind::Verify).target(w, i as u64))
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.join().unwrap();
    }
    assert_eq!(Store::open(dir.path()).unwrap().count().unwrap(), 200);
}

#[test]
fn reopening_keeps_events_and_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    Store::open(dir.path())
        .unwrap()
        .record(&NewEvent::new(EventKind::Mirror))
        .unwrap();
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.count().unwrap(), 1);
    let version: u32 = rusqlite_version(&dir.path().join(DATABASE_FILE));
    assert_eq!(version, SCHEMA_VERSION);
    let read_only = Store::open_read_only(dir.path()).unwrap().unwrap();
    assert_eq!(read_only.count().unwrap(), 1);
}

fn rusqlite_version(path: &std::path::Path) -> u32 {
    let output = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('pragma user_version').fetchone()[0])",
        ])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8(output.stdout).unwrap().trim().parse().unwrap()
}

#[test]
fn a_future_version_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(DATABASE_FILE);
    let status = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('create table events(x)'); \
             c.execute('pragma user_version = 99'); c.commit()",
        ])
        .arg(&path)
        .status()
        .unwrap();
    assert!(status.success());
    let before = std::fs::read(&path).unwrap();
    let error = Store::open(dir.path()).unwrap_err();
    assert!(matches!(error, StoreError::FutureVersion { found: 99, .. }), "{error}");
    assert!(error.to_string().contains("schema version 99"), "{error}");
    assert!(error.is_bad_input());
    assert!(Store::open_read_only(dir.path()).is_err());
    assert!(
        std::fs::read(&path).unwrap() == before,
        "a refused database is not modified"
    );
}

#[test]
fn garbage_and_foreign_databases_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(DATABASE_FILE), vec![0x5a; 8192]).unwrap();
    let error = Store::open(dir.path()).unwrap_err();
    assert!(matches!(error, StoreError::Corrupt { .. }), "{error}");
    assert!(error.to_string().contains("history.db"), "{error}");

    let foreign = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('create table t(x)'); c.commit()",
        ])
        .arg(foreign.path().join(DATABASE_FILE))
        .status()
        .unwrap();
    assert!(status.success());
    let error = Store::open(foreign.path()).unwrap_err();
    assert!(error.to_string().contains("no shadowpatch schema version"), "{error}");
}

#[test]
fn every_kind_round_trips_by_name() {
    for kind in EventKind::ALL {
        assert_eq!(EventKind::parse(kind.as_str()), Some(kind));
        assert_eq!(
            serde_json::to_value(kind).unwrap(),
            serde_json::Value::String(kind.as_str().into())
        );
    }
    assert_eq!(EventKind::parse("nonsense"), None);
}

/// `record_in` keeps the history open between events, but a database
/// moved away (or replaced) is never written through the old connection:
/// the next event goes to the file now at the path.
#[test]
fn recording_reuses_the_open_history_only_while_its_file_is_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let event = |pid| NewEvent::new(EventKind::Apply).target(pid, 1).outcome("ok");
    shadowpatch_store::record_in(dir.path(), &event(1)).unwrap();
    shadowpatch_store::record_in(dir.path(), &event(2)).unwrap();
    let count = |path: &std::path::Path| {
        Store::open(path)
            .unwrap()
            .events(&EventFilter::default())
            .unwrap()
            .len()
    };
    assert_eq!(count(dir.path()), 2);
    let aside = tempfile::tempdir().unwrap();
    for suffix in ["", "-wal", "-shm"] {
        let from = dir.path().join(format!("{DATABASE_FILE}{suffix}"));
        if from.exists() {
            std::fs::rename(&from, aside.path().join(format!("{DATABASE_FILE}{suffix}"))).unwrap();
        }
    }
    shadowpatch_store::record_in(dir.path(), &event(3)).unwrap();
    assert_eq!(count(dir.path()), 1, "the new file holds the new event only");
    assert_eq!(count(aside.path()), 2, "the moved file was not written again");
}

/// Threads recording at once (a host-wide apply's workers) each get their
/// own event written, with its own id and the time of its call, in two
/// histories at once; an event for a history that cannot be opened fails
/// alone.
#[test]
fn threads_recording_at_once_each_get_their_event_committed() {
    let first = tempfile::tempdir().unwrap();
    let second = tempfile::tempdir().unwrap();
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(
        broken.path().join(DATABASE_FILE),
        b"not a database at all, not even close",
    )
    .unwrap();
    let before = shadowpatch_store::now_ms();
    let results: Vec<(i32, Result<i64, StoreError>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..48)
            .map(|pid| {
                let (first, second, broken) = (first.path(), second.path(), broken.path());
                scope.spawn(move || {
                    let dir = match pid % 8 {
                        7 => broken,
                        n if n % 2 == 0 => first,
                        _ => second,
                    };
                    let event = NewEvent::new(EventKind::Apply).target(pid, 1).outcome("ok");
                    (pid, shadowpatch_store::record_in(dir, &event))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (pid, result) in &results {
        match pid % 8 {
            7 => assert!(result.is_err(), "pid {pid} went into a broken history"),
            _ => assert!(result.as_ref().is_ok_and(|id| *id > 0), "pid {pid}: {result:?}"),
        }
    }
    for (dir, parity) in [(first.path(), 0), (second.path(), 1)] {
        let events = Store::open(dir).unwrap().events(&EventFilter::default()).unwrap();
        let mut pids: Vec<i32> = events.iter().filter_map(|e| e.pid).collect();
        pids.sort_unstable();
        let expected: Vec<i32> = (0..48).filter(|p| p % 8 != 7 && p % 8 % 2 == parity).collect();
        assert_eq!(pids, expected);
        let mut ids: Vec<i64> = events.iter().map(|e| e.id).collect();
        ids.dedup();
        assert_eq!(ids.len(), events.len(), "one id per event");
        assert!(events.iter().all(|e| e.unix_ms >= before));
    }
}

/// Several events recorded together (an apply's analysis and outcome) are
/// one transaction: all of them, in order, or none.
#[test]
fn events_recorded_together_are_all_or_none() {
    let dir = tempfile::tempdir().unwrap();
    let event = |patch: &str| NewEvent::new(EventKind::Apply).target(7, 1).patch(patch).outcome("ok");
    drop(Store::open(dir.path()).unwrap());
    // A trigger that refuses one patch id, to make the second insert fail.
    rusqlite::Connection::open(dir.path().join(DATABASE_FILE))
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER refuse_poison BEFORE INSERT ON events WHEN NEW.patch_id = 'poison'
             BEGIN SELECT RAISE(ABORT, 'poison refused'); END;",
        )
        .unwrap();
    let store = Store::open(dir.path()).unwrap();
    let error = store.record_all(&[&event("first"), &event("poison")]).unwrap_err();
    assert!(error.to_string().contains("poison refused"), "{error}");
    assert!(store.events(&EventFilter::default()).unwrap().is_empty(), "none kept");
    let ids = store.record_all(&[&event("a"), &event("b")]).unwrap();
    assert_eq!(ids.len(), 2);
    assert!(ids[0] < ids[1]);
    let patches: Vec<String> = store
        .events(&EventFilter::default())
        .unwrap()
        .into_iter()
        .filter_map(|e| e.patch_id)
        .collect();
    assert_eq!(patches.len(), 2);
    assert!(patches.contains(&"a".to_string()) && patches.contains(&"b".to_string()));
}

/// While a group is open, best-effort events of its state directory are
/// held and written a group at a time, in the order given, each with the
/// time it was given at; the rest when the group closes. Another state
/// directory's events are written at once.
#[test]
fn a_history_group_holds_events_until_it_is_full_or_closed() {
    let grouped = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let count = |dir: &std::path::Path| Store::open(dir).unwrap().events(&EventFilter::default()).unwrap().len();
    let event = |pid: i32| NewEvent::new(EventKind::Apply).target(pid, 1).outcome("ok");
    let before = shadowpatch_store::now_ms();
    let group = shadowpatch_store::HistoryGroup::open(grouped.path());
    shadowpatch_store::record_best_effort(other.path(), &event(1));
    assert_eq!(count(other.path()), 1, "another directory's event is written at once");
    let full = shadowpatch_store::GROUP as i32;
    for pid in 0..full - 1 {
        shadowpatch_store::record_all_best_effort(grouped.path(), &[&event(pid)]);
    }
    assert_eq!(count(grouped.path()), 0, "held while the group is not full");
    shadowpatch_store::record_best_effort(grouped.path(), &event(full - 1));
    assert_eq!(count(grouped.path()), full as usize, "written once full");
    let given = shadowpatch_store::now_ms();
    shadowpatch_store::record_all_best_effort(grouped.path(), &[&event(full), &event(full + 1)]);
    let after = shadowpatch_store::now_ms();
    // Written at least this much later (when the group closes).
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(count(grouped.path()), full as usize);
    drop(group);
    let events = Store::open(grouped.path())
        .unwrap()
        .events(&EventFilter::default())
        .unwrap();
    let pids: Vec<i32> = events.iter().filter_map(|e| e.pid).collect();
    assert_eq!(pids, (0..full + 2).collect::<Vec<_>>(), "all of them, in order");
    assert!(events.iter().all(|e| e.unix_ms >= before));
    let last = events.last().unwrap();
    assert!(
        (given..=after).contains(&last.unix_ms),
        "the time it was given at ({given}), not written at: {}",
        last.unix_ms
    );
    // Closed: written at once again.
    shadowpatch_store::record_best_effort(grouped.path(), &event(99));
    assert_eq!(count(grouped.path()), full as usize + 3);
}
