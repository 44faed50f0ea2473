//! Test-only fault injection: with `SHADOWPATCH_FAULT=<point>` in the
//! environment the tool kills itself (SIGKILL, as `kill -9` would) when it
//! reaches that point, so tests can check that `recover` brings the target
//! to a consistent state from every step of a transaction.

/// The points, in the order an apply passes them.
pub const APPLY_POINTS: &[&str] = &[
    "begin",
    "map",
    "staged",
    "planned",
    "loaded",
    "partial-write",
    "written",
    "activated",
];
/// The point a safe-point apply (`ApplyOptions::safe_point`) passes once the application's
/// pending word is set, before a thread has parked (`safepoint.rs`).
pub const SAFE_POINT_POINTS: &[&str] = &["safe-point-held"];
/// The point a kept watch window passes between its repoint's commit and
/// the publication of the kept generation (`republish.rs`).
pub const KEEP_POINTS: &[&str] = &["kept-unpublished"];
/// The points a rollback passes.
pub const ROLLBACK_POINTS: &[&str] = &["rollback-begin", "rollback-partial-write", "rollback-written"];
/// Points after a transaction's commit is durable, before its mirror
/// generation is published (apply) or removed (rollback): the journal says
/// done, the generation files do not agree yet.
pub const AFTER_COMMIT_POINTS: &[&str] = &["committed", "rollback-committed"];

/// The points a simulation's capture passes: probe journaled, breakpoints
/// written, first live call copied.
pub const CAPTURE_POINTS: &[&str] = &["capture-begin", "capture-armed", "capture-copied"];

/// Die here if the environment asks for it.
pub fn point(name: &str) {
    shadowpatch_process::fault::point(name);
}

/// Kill the *target* here if `SHADOWPATCH_FAULT_TARGET` names this point:
/// tests use it to check that a target exiting mid-transaction gives a
/// clean one-line error.
pub fn target_point(name: &str, pid: i32) {
    if std::env::var("SHADOWPATCH_FAULT_TARGET").is_ok_and(|wanted| wanted == name) {
        tracing::warn!(point = name, pid, "fault injection: killing the target");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        // Wait until the kernel has torn it down (it is a zombie or gone).
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
        {
            std::thread::yield_now();
        }
    }
}
