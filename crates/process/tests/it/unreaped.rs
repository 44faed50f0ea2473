//! A target that dies while we trace it, and that its parent does not reap
//! (it stays a zombie), never makes us wait for ever (issue 15 item 3: the
//! CLI hung 40 s or more after a watched target was killed). Killed while
//! running and killed while every thread is stopped by us; in both cases
//! `stop` reports the process gone and `detach` returns.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use shadowpatch_fixtures::{Fixture, Running};
use shadowpatch_process::{Attached, ProcessIdentity};
use std::sync::mpsc;
use std::time::Duration;

/// Run `scenario` on its own thread (the tracer) and fail, rather than
/// hang, if it does not finish within a generous bound.
fn finishes(name: &str, scenario: impl FnOnce() -> String + Send + 'static) -> String {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(scenario());
    });
    match receiver.recv_timeout(Duration::from_secs(60)) {
        Ok(outcome) => outcome,
        Err(_) => {
            // Unwinding would hang too (the fixture's drop waits for the
            // child our stuck tracer thread holds): fail the binary now.
            eprintln!("{name}: still waiting on a dead, unreaped target after 60 s");
            std::process::exit(101);
        }
    }
}

fn killed(while_stopped: bool) {
    // The test process is the parent and does not reap until the end.
    let fixture = Running::start(Fixture::BusyC, &["6"]).unwrap();
    let pid = fixture.pid();
    let outcome = finishes("killed target", move || {
        let identity = ProcessIdentity::of(pid).unwrap();
        let mut attached = Attached::seize(&identity).unwrap();
        if while_stopped {
            let stopped = attached.stop().unwrap();
            kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
            let _ = stopped.resume();
        } else {
            kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
        }
        let stop = attached.stop().map(|_| ()).map_err(|e| e.to_string());
        let detach = attached.detach().map_err(|e| e.to_string());
        format!("stop: {stop:?}; detach: {detach:?}")
    });
    assert!(
        outcome.starts_with("stop: Err"),
        "a dead target cannot be stopped: {outcome}"
    );
    drop(fixture);
}

#[test]
fn a_target_killed_while_running_is_not_waited_for() {
    killed(false);
}

#[test]
fn a_target_killed_while_stopped_is_not_waited_for() {
    killed(true);
}
