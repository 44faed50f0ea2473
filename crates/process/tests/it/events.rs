//! The event loop of a running, seized target, and the copies a remote
//! clone makes, against real fixture processes.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use shadowpatch_fixtures::{Fixture, Running};
use shadowpatch_process::events::{Event, INT3, SESSION_OPTIONS};
use shadowpatch_process::{Attached, ProcessIdentity};
use std::time::{Duration, Instant};

/// Field `index` (1-based, as in proc(5)) of /proc/PID/stat.
fn stat_field(pid: i32, index: usize) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after_comm = stat.rsplit_once(") ").unwrap().1;
    after_comm.split_whitespace().nth(index - 3).unwrap().to_string()
}

/// Arm an `int3` at `address` in one stop (the journal is the patch
/// crate's business; here we test the mechanism).
fn arm(attached: &mut Attached, address: u64) -> u8 {
    let mut stopped = attached.stop().unwrap();
    stopped.set_options(SESSION_OPTIONS).unwrap();
    let original = stopped.memory().read_vec(address, 1).unwrap()[0];
    stopped.memory().write(address, &[INT3]).unwrap();
    drop(stopped);
    attached.watch_breakpoints(&[(address, original)]);
    original
}

fn disarm(attached: &mut Attached, address: u64, original: u8) {
    let mut stopped = attached.stop().unwrap();
    stopped.memory().write(address, &[original]).unwrap();
    stopped.set_options(nix::sys::ptrace::Options::empty()).unwrap();
    drop(stopped);
    attached.forget_breakpoints();
}

#[test]
fn foreign_signals_are_delivered_while_the_loop_waits() {
    let mut fixture = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let pid = fixture.pid();
    let mut attached = Attached::seize(&ProcessIdentity::of(pid).unwrap()).unwrap();
    for _ in 0..5 {
        kill(Pid::from_raw(pid), Signal::SIGUSR1).unwrap();
        // Nothing to report: the signal is passed on inside the loop.
        assert_eq!(attached.next_event(Duration::from_millis(30)).unwrap(), None);
    }
    assert_eq!(
        fixture.check().unwrap()["usr1"],
        5,
        "every signal delivered while attached"
    );
    attached.detach().unwrap();
    assert_eq!(fixture.check().unwrap()["errors"], 0);
}

#[test]
fn breakpoint_hits_are_reported_rewound_and_stepped_past() {
    let mut fixture = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let pid = fixture.pid();
    let work = fixture.number("work");
    let mut attached = Attached::seize(&ProcessIdentity::of(pid).unwrap()).unwrap();
    let original = arm(&mut attached, work);
    let mut hits = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while hits < 50 && Instant::now() < deadline {
        match attached.next_event(Duration::from_millis(100)).unwrap() {
            Some(Event::Breakpoint { tid, address, regs }) => {
                assert_eq!(address, work);
                assert_eq!(regs.rip, work, "instruction pointer rewound to the breakpoint");
                hits += 1;
                attached.step_past_breakpoint(tid, address).unwrap();
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_eq!(hits, 50);
    disarm(&mut attached, work, original);
    attached.detach().unwrap();
    let check = fixture.check().unwrap();
    assert_eq!(check["errors"], 0, "every stepped-past call computed the right result");
}

#[test]
fn threads_created_during_a_session_are_traced_from_birth() {
    let mut fixture = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let pid = fixture.pid();
    let work = fixture.number("work");
    let mut attached = Attached::seize(&ProcessIdentity::of(pid).unwrap()).unwrap();
    let original = arm(&mut attached, work);
    // The new worker calls work_fn at once: untraced, its int3 would kill
    // the process with SIGTRAP. (The answer comes once the loop has let the
    // main thread past its clone event.)
    fixture.send("spawn").unwrap();
    let mut new_thread = None;
    let mut hit_by_new_thread = false;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !hit_by_new_thread && Instant::now() < deadline {
        match attached.next_event(Duration::from_millis(100)).unwrap() {
            Some(Event::NewThread { tid }) => new_thread = Some(tid),
            Some(Event::Breakpoint { tid, address, .. }) => {
                hit_by_new_thread |= Some(tid) == new_thread;
                attached.step_past_breakpoint(tid, address).unwrap();
            }
            Some(other) => panic!("unexpected event {other:?}"),
            None => {}
        }
    }
    assert!(new_thread.is_some(), "the new thread was reported");
    assert!(hit_by_new_thread, "the new thread's breakpoint hit reached us");
    disarm(&mut attached, work, original);
    assert_eq!(fixture.answer().unwrap(), "spawned");
    attached.detach().unwrap();
    assert!(fixture.is_running());
    assert_eq!(fixture.check().unwrap()["errors"], 0);
}

/// Whether SIGTRAP is pending for thread `tid` itself.
fn sigtrap_pending(pid: i32, tid: Pid) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
    let mask = status.lines().find_map(|l| l.strip_prefix("SigPnd:")).unwrap().trim();
    u64::from_str_radix(mask, 16).unwrap() & (1 << (Signal::SIGTRAP as i32 - 1)) != 0
}

/// The race behind a live target's death in the capture benchmark: a
/// thread executes the `int3` just as a world stop interrupts it; the
/// kernel takes the interrupt before dequeuing the SIGTRAP, so the thread
/// stops one byte past the breakpoint with the trap still queued. Counted
/// as stopped, it took the SIGTRAP later — delivered, and fatal, once the
/// breakpoint was forgotten. Threads let go at a hot breakpoint run
/// straight back into it as each stop begins: no stop may ever count such
/// a thread as stopped.
#[test]
fn no_world_stop_holds_a_thread_with_a_breakpoint_trap_still_queued() {
    let mut fixture = Running::start(Fixture::BusyC, &["4"]).unwrap();
    let pid = fixture.pid();
    let work = fixture.number("work");
    let mut attached = Attached::seize(&ProcessIdentity::of(pid).unwrap()).unwrap();
    let original = arm(&mut attached, work);
    let (mut queued, mut hits) = (0, 0);
    for _ in 0..1500 {
        while let Some(event) = attached.next_event(Duration::ZERO).unwrap() {
            match event {
                Event::Breakpoint { tid, address, .. } => {
                    hits += 1;
                    attached.step_past_breakpoint(tid, address).unwrap();
                }
                other => panic!("unexpected event {other:?}"),
            }
        }
        let stopped = attached.stop().unwrap();
        for tid in stopped.threads() {
            if stopped.regs(tid).unwrap().rip == work + 1 && sigtrap_pending(pid, tid) {
                queued += 1;
            }
        }
        drop(stopped);
    }
    disarm(&mut attached, work, original);
    attached.detach().unwrap();
    assert!(hits > 0);
    assert_eq!(
        queued, 0,
        "threads stopped with their breakpoint trap queued ({hits} hits)"
    );
    assert!(fixture.is_running(), "the target survived");
    assert_eq!(fixture.check().unwrap()["errors"], 0);
}

#[test]
fn a_remote_clone_is_an_invisible_child_reaped_inside_the_target() {
    let mut fixture = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let pid = fixture.pid();
    let greeting = fixture.number("greeting");
    let mut attached = Attached::seize(&ProcessIdentity::of(pid).unwrap()).unwrap();
    let mut stopped = attached.stop().unwrap();
    let tid = stopped.borrowable_thread();
    let live_regs = stopped.regs(tid).unwrap();
    let (copy_pid, copy_in_target) = stopped.attached().remote_clone(tid).unwrap();
    assert_eq!(
        stopped.regs(tid).unwrap().rip,
        live_regs.rip,
        "borrowed thread restored"
    );
    drop(stopped);
    let mut copy = attached.adopt_copy(copy_pid, copy_in_target).unwrap();
    assert_eq!(copy_in_target, copy_pid.as_raw() as i64, "same pid namespace here");
    // A child of the target with exit signal 0, invisible to its wait().
    assert_eq!(
        stat_field(copy_pid.as_raw(), 4),
        pid.to_string(),
        "parent is the target"
    );
    assert_eq!(stat_field(copy_pid.as_raw(), 38), "0", "exit signal 0");
    // Same memory, its own copy of it.
    let live = attached.memory().read_vec(greeting, 16).unwrap();
    assert_eq!(copy.memory().read_vec(greeting, 16).unwrap(), live);
    copy.memory().write(greeting, b"XXXX").unwrap();
    assert_eq!(attached.memory().read_vec(greeting, 16).unwrap(), live, "copy-on-write");
    // A copy of the copy is the target's child too.
    let mut sibling = copy.remote_clone().unwrap();
    assert_eq!(stat_field(sibling.pid().as_raw(), 4), pid.to_string());
    assert_eq!(sibling.memory().read_vec(greeting, 4).unwrap(), b"XXXX");
    let getpid = sibling.remote_syscall(libc::SYS_getpid, [0; 6]).unwrap();
    assert_eq!(getpid, sibling.pid_in_target());

    let pids = vec![copy.pid_in_target(), sibling.pid_in_target()];
    copy.kill();
    sibling.kill();
    let mut children = shadowpatch_fixtures::children_of(pid);
    children.sort();
    let mut expected: Vec<i32> = pids.iter().map(|p| *p as i32).collect();
    expected.sort();
    assert_eq!(children, expected, "dead copies wait as zombies of the target");
    let mut stopped = attached.stop().unwrap();
    let reaped = stopped.reap_copies(&pids).unwrap();
    drop(stopped);
    assert_eq!(reaped, pids);
    assert!(
        shadowpatch_fixtures::children_of(pid).is_empty(),
        "no child left behind"
    );
    attached.detach().unwrap();
    assert_eq!(fixture.check().unwrap()["errors"], 0);
}

#[test]
fn copies_die_with_their_tracer() {
    let fixture = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let pid = fixture.pid();
    // A tracer thread that makes a copy, then exits without cleaning up.
    let copy = std::thread::spawn(move || {
        let mut attached = Attached::seize(&ProcessIdentity::of(pid).unwrap()).unwrap();
        let mut stopped = attached.stop().unwrap();
        let tid = stopped.borrowable_thread();
        let (copy_pid, in_target) = stopped.attached().remote_clone(tid).unwrap();
        drop(stopped);
        let copy = attached.adopt_copy(copy_pid, in_target).unwrap();
        let copy_pid = copy.pid();
        std::mem::forget(copy);
        std::mem::forget(attached);
        copy_pid
    })
    .join()
    .unwrap();
    // The tracer thread exited: PTRACE_O_EXITKILL kills the copy (the
    // kernel does it in the thread's exit, which may end after the join).
    let deadline = Instant::now() + Duration::from_secs(5);
    while stat_field(copy.as_raw(), 3) != "Z" && Instant::now() < deadline {
        std::thread::yield_now();
    }
    assert_eq!(stat_field(copy.as_raw(), 3), "Z", "the copy never runs untraced");
}

#[test]
fn detaching_removes_a_breakpoint_left_armed() {
    let mut fixture = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let pid = fixture.pid();
    let work = fixture.number("work");
    let mut attached = Attached::seize(&ProcessIdentity::of(pid).unwrap()).unwrap();
    let original = arm(&mut attached, work);
    // Hits pile up while nobody handles them; the owner then fails and
    // drops the attachment without disarming.
    let _ = attached.next_event(Duration::from_millis(20)).unwrap();
    drop(attached);
    let identity = ProcessIdentity::of(pid).unwrap();
    let byte = shadowpatch_process::TargetMemory::open(&identity)
        .unwrap()
        .read_vec(work, 1)
        .unwrap()[0];
    assert_eq!(byte, original, "the int3 is gone: an untraced thread would die on it");
    assert!(fixture.is_running());
    assert_eq!(fixture.check().unwrap()["errors"], 0);
}
