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

/// A main thread that exits (`pthread_exit`) while a worker runs on.
const LEADER_EXITS: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static volatile unsigned long spins;
static void *spin(void *unused) { for (;;) spins++; return unused; }
int main(void) {
    pthread_t worker;
    pthread_create(&worker, 0, spin, 0);
    char line[8];
    if (read(0, line, sizeof line) > 0) pthread_exit(0);
    return 0;
}
"#;

fn leader_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/stat")).ok()?;
    stat.rsplit_once(") ")?.1.chars().next()
}

#[test]
fn a_leader_that_exited_while_seized_is_dropped_and_its_worker_stopped() {
    use std::io::Write;
    let binary = shadowpatch_fixtures::build_c_source("leader-exits", LEADER_EXITS).unwrap();
    let mut child = std::process::Command::new(&binary)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    while shadowpatch_process::attach::thread_count(pid) != Some(2) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut stdin = child.stdin.take().unwrap();
    let outcome = finishes("exited leader", move || {
        let mut attached = Attached::seize(&ProcessIdentity::of(pid).unwrap()).unwrap();
        stdin.write_all(b"exit\n").unwrap();
        while leader_state(pid) != Some('Z') {
            std::thread::sleep(Duration::from_millis(1));
        }
        let threads = attached.stop().map(|stopped| stopped.threads().len());
        let detach = attached.detach();
        format!("stopped: {threads:?}; detach: {detach:?}")
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(outcome, "stopped: Ok(1); detach: Ok(())");
}
