//! Which program a target directory's state describes: recorded as the
//! directory's attribute (no file of its own), still read from the
//! `exec-id` file earlier versions wrote, and an exec refused either way.

use shadowpatch_mirror::{MirrorError, StateDir};
use shadowpatch_process::{ProcessIdentity, TargetError};

fn me() -> ProcessIdentity {
    let identity = ProcessIdentity::of(std::process::id() as i32).unwrap();
    assert!(identity.exec_id.is_some(), "our own auxv is readable");
    identity
}

#[test]
fn the_exec_id_is_recorded_without_a_file_and_an_exec_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let identity = me();
    StateDir::check_same_program(dir.path(), &identity).unwrap();
    assert_eq!(
        StateDir::recorded_program(dir.path()).unwrap(),
        identity.exec_id.clone()
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "no file created for it"
    );
    StateDir::check_same_program(dir.path(), &identity).unwrap();
    assert!(StateDir::describes_live(dir.path(), identity.pid, identity.start_time));
    let execd = ProcessIdentity {
        exec_id: Some("00".repeat(16)),
        ..identity.clone()
    };
    let error = StateDir::check_same_program(dir.path(), &execd).unwrap_err();
    assert!(
        matches!(error, MirrorError::Target(TargetError::Execd { .. })),
        "{error}"
    );
}

#[test]
fn an_exec_id_file_of_an_earlier_version_is_still_read() {
    let dir = tempfile::tempdir().unwrap();
    let identity = me();
    std::fs::write(dir.path().join("exec-id"), "ff".repeat(16) + "\n").unwrap();
    assert_eq!(StateDir::recorded_program(dir.path()).unwrap(), Some("ff".repeat(16)));
    let error = StateDir::check_same_program(dir.path(), &identity).unwrap_err();
    assert!(
        matches!(error, MirrorError::Target(TargetError::Execd { .. })),
        "{error}"
    );
    assert!(!StateDir::describes_live(dir.path(), identity.pid, identity.start_time));
    // Recorded again (adoption records the child's): the attribute
    // replaces the file, so no reader sees the old value.
    StateDir::record_program(dir.path(), &identity).unwrap();
    assert!(!dir.path().join("exec-id").exists());
    StateDir::check_same_program(dir.path(), &identity).unwrap();
}

#[test]
fn no_directory_records_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("1-2");
    assert_eq!(StateDir::recorded_program(&missing).unwrap(), None);
    StateDir::check_same_program(&missing, &me()).unwrap();
    assert!(!missing.exists());
}
