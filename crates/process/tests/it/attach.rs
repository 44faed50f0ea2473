//! Attach, stop-the-world and remote syscalls against real fixture processes.

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use shadowpatch_fixtures::{Fixture, Running};
use shadowpatch_process::{Attached, ProcessIdentity, TargetError};

fn thread_states(pid: i32) -> Vec<char> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|e| {
            let stat = std::fs::read_to_string(e.ok()?.path().join("stat")).ok()?;
            stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next())
        })
        .collect()
}

fn stop_and_resume_all_threads(threads: usize) {
    let mut fixture = Running::start(Fixture::BusyC, &[&threads.to_string()]).unwrap();
    let identity = ProcessIdentity::of(fixture.pid()).unwrap();
    let mut attached = Attached::seize(&identity).unwrap();
    let calls_before = fixture.check().unwrap()["calls"];
    for _ in 0..20 {
        let stopped = attached.stop().unwrap();
        assert_eq!(
            stopped.threads().len(),
            threads + 1,
            "every thread stopped, main included"
        );
        // 't' = tracing stop, for every task of the process.
        assert!(thread_states(fixture.pid()).iter().all(|s| *s == 't'));
        let report = stopped.resume().unwrap();
        assert_eq!(report.threads, threads + 1);
        assert!(report.pause_us >= report.stop_us);
    }
    attached.detach().unwrap();
    // On a loaded machine the workers may not have been scheduled yet when we
    // first ask; progress within a generous deadline is what "kept running" means.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let after = loop {
        let after = fixture.check().unwrap();
        if after["calls"] > calls_before || std::time::Instant::now() > deadline {
            break after;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!(after["errors"], 0);
    assert!(after["calls"] > calls_before, "workers kept running after detach");
    assert!(thread_states(fixture.pid()).iter().all(|s| *s == 'R' || *s == 'S'));
}

#[test]
fn stops_and_resumes_one_thread() {
    stop_and_resume_all_threads(1);
}

#[test]
fn stops_and_resumes_eight_threads() {
    stop_and_resume_all_threads(8);
}

#[test]
fn stops_and_resumes_sixty_four_threads() {
    stop_and_resume_all_threads(64);
}

#[test]
fn rust_fixture_stops_and_resumes() {
    let mut fixture = Running::start(Fixture::BusyRust, &["4"]).unwrap();
    let mut attached = Attached::seize(&ProcessIdentity::of(fixture.pid()).unwrap()).unwrap();
    let stopped = attached.stop().unwrap();
    assert_eq!(stopped.threads().len(), 5);
    stopped.resume().unwrap();
    drop(attached);
    assert_eq!(fixture.check().unwrap()["errors"], 0);
}

#[test]
fn dropping_the_guard_detaches_and_leaves_the_target_running() {
    let mut fixture = Running::start(Fixture::BusyC, &["2"]).unwrap();
    {
        let mut attached = Attached::seize(&ProcessIdentity::of(fixture.pid()).unwrap()).unwrap();
        let _stopped = attached.stop().unwrap();
        // Both guards dropped here while stopped.
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", fixture.pid())).unwrap();
    assert!(status.contains("TracerPid:\t0"), "no tracer left: {status}");
    assert_eq!(fixture.check().unwrap()["errors"], 0);
}

#[test]
fn a_signal_arriving_while_attached_is_delivered_not_swallowed() {
    let mut fixture = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let mut attached = Attached::seize(&ProcessIdentity::of(fixture.pid()).unwrap()).unwrap();
    kill(Pid::from_raw(fixture.pid()), Signal::SIGUSR1).unwrap();
    let stopped = attached.stop().unwrap();
    stopped.resume().unwrap();
    attached.detach().unwrap();
    // The handler ran exactly once: the signal reached the process.
    assert_eq!(fixture.check().unwrap()["usr1"], 1);
}

/// A signal the borrowed thread meets during a remote syscall is kept from
/// it while borrowed and reaches it afterwards, once.
#[test]
fn a_signal_met_during_a_remote_syscall_is_delivered_afterwards() {
    let mut fixture = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let pid = Pid::from_raw(fixture.pid());
    let mut attached = Attached::seize(&ProcessIdentity::of(fixture.pid()).unwrap()).unwrap();
    let mut stopped = attached.stop().unwrap();
    // Pending for the stopped main thread: taken when the call resumes it.
    shadowpatch_sys::siginfo::tgkill(pid, pid, Signal::SIGUSR1).unwrap();
    let result = stopped.remote_syscall(pid, libc::SYS_getpid, [0; 6]).unwrap();
    assert_eq!(result, i64::from(pid.as_raw()));
    stopped.resume().unwrap();
    attached.detach().unwrap();
    assert_eq!(fixture.check().unwrap()["usr1"], 1);
    assert_eq!(fixture.command("ask 5").unwrap(), "16");
}

/// A chain of remote calls runs each call in turn in one borrowing, stops
/// at the first result that is not the one expected (the calls after it
/// never run), and leaves the thread as it was: a signal met on the way
/// is delivered afterwards, once.
#[test]
fn a_chain_of_remote_syscalls_stops_at_the_first_unexpected_result() {
    use shadowpatch_process::RemoteCall;
    let mut fixture = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let pid = Pid::from_raw(fixture.pid());
    let own = i64::from(pid.as_raw());
    let mut attached = Attached::seize(&ProcessIdentity::of(fixture.pid()).unwrap()).unwrap();
    let mut stopped = attached.stop().unwrap();
    shadowpatch_sys::siginfo::tgkill(pid, pid, Signal::SIGUSR1).unwrap();
    let all = [
        RemoteCall::expecting(libc::SYS_getpid, [0; 6], own),
        RemoteCall::expecting(libc::SYS_gettid, [0; 6], own),
        RemoteCall::new(libc::SYS_getppid, [0; 6]),
    ];
    let parent = i64::from(nix::unistd::getpid().as_raw());
    assert_eq!(stopped.remote_syscalls(pid, &all).unwrap(), vec![own, own, parent]);
    // The second call's expectation fails: the third (a kill of the
    // target, were it run) never runs.
    let cut = [
        RemoteCall::expecting(libc::SYS_getpid, [0; 6], own),
        RemoteCall::expecting(libc::SYS_getppid, [0; 6], own),
        RemoteCall::new(libc::SYS_kill, [own as u64, libc::SIGKILL as u64, 0, 0, 0, 0]),
    ];
    assert_eq!(stopped.remote_syscalls(pid, &cut).unwrap(), vec![own, parent]);
    assert_eq!(stopped.remote_syscalls(pid, &[]).unwrap(), Vec::<i64>::new());
    stopped.resume().unwrap();
    attached.detach().unwrap();
    assert_eq!(fixture.check().unwrap()["usr1"], 1);
    assert_eq!(fixture.command("ask 5").unwrap(), "16");
}

#[test]
fn a_job_control_stopped_process_stays_stopped() {
    let mut fixture = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let pid = Pid::from_raw(fixture.pid());
    let mut attached = Attached::seize(&ProcessIdentity::of(fixture.pid()).unwrap()).unwrap();
    kill(pid, Signal::SIGSTOP).unwrap();
    let stopped = attached.stop().unwrap();
    stopped.resume().unwrap();
    attached.detach().unwrap();
    // Every thread is back in job-control stop ('T'), as SIGSTOP asked.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !thread_states(fixture.pid()).iter().all(|s| *s == 'T') {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            thread_states(fixture.pid())
        );
        std::thread::yield_now();
    }
    kill(pid, Signal::SIGCONT).unwrap();
    assert_eq!(fixture.check().unwrap()["errors"], 0);
}

#[test]
fn threads_created_after_attach_are_stopped_too() {
    let mut fixture = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let mut attached = Attached::seize(&ProcessIdentity::of(fixture.pid()).unwrap()).unwrap();
    assert_eq!(attached.stop().unwrap().threads().len(), 2);
    // The main thread creates a worker while we are attached but not stopped.
    assert_eq!(fixture.command("spawn").unwrap(), "spawned");
    let stopped = attached.stop().unwrap();
    assert_eq!(stopped.threads().len(), 3, "the new thread was found and stopped");
    assert!(thread_states(fixture.pid()).iter().all(|s| *s == 't'));
    stopped.resume().unwrap();
    drop(attached);
    assert_eq!(fixture.check().unwrap()["errors"], 0);
}

#[test]
fn the_kernel_thread_count_a_stop_trusts_is_the_number_of_listed_threads() {
    let fixture = Running::start(Fixture::BusyC, &["8"]).unwrap();
    let listed = shadowpatch_process::attach::list_threads(fixture.pid()).unwrap().len();
    assert_eq!(listed, 9);
    assert_eq!(shadowpatch_process::attach::thread_count(fixture.pid()), Some(listed));
    assert_eq!(shadowpatch_process::attach::thread_count(i32::MAX), None);
}

#[test]
fn remote_syscalls_in_threads_blocked_in_read_nanosleep_and_futex() {
    let mut fixture = Running::start(Fixture::BusyC, &["1", "--blockers"]).unwrap();
    let blocked: Vec<Pid> = ["tid_read", "tid_sleep", "tid_futex"]
        .iter()
        .map(|key| Pid::from_raw(fixture.number(key) as i32))
        .collect();
    let mut attached = Attached::seize(&ProcessIdentity::of(fixture.pid()).unwrap()).unwrap();
    for round in 0..10 {
        let mut stopped = attached.stop().unwrap();
        for &tid in &blocked {
            let before = stopped.regs(tid).unwrap();
            let page = stopped
                .remote_mmap(
                    tid,
                    0,
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                )
                .unwrap();
            assert_eq!(page % 4096, 0);
            stopped.memory().write(page, b"shadowpatch").unwrap();
            assert_eq!(stopped.memory().read_vec(page, 11).unwrap(), b"shadowpatch");
            stopped.remote_mprotect(tid, page, 4096, libc::PROT_READ).unwrap();
            stopped.remote_munmap(tid, page, 4096).unwrap();
            let after = stopped.regs(tid).unwrap();
            assert_eq!(
                format!("{before:?}"),
                format!("{after:?}"),
                "registers restored exactly (round {round})"
            );
        }
        // A failing remote syscall reports its errno and changes nothing.
        let err = stopped.remote_munmap(blocked[0], 1, 4096).unwrap_err();
        assert!(err.to_string().contains("EINVAL"), "{err}");
        stopped.resume().unwrap();
    }
    drop(attached);
    // The interrupted calls completed as if we had never been there: the read
    // gets its byte, the futex its wake, every nanosleep its full duration.
    assert_eq!(fixture.command("wake").unwrap(), "woken");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let check = fixture.check().unwrap();
        assert_eq!(check["errors"], 0, "{check:?}");
        if check["reads"] == 1 && check["wakes"] == 1 && check["sleeps"] >= 1 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{check:?}");
        std::thread::yield_now();
    }
}

#[test]
fn bad_targets_are_refused_with_a_reason() {
    assert!(matches!(
        ProcessIdentity::of(i32::MAX),
        Err(TargetError::NoSuchProcess { .. })
    ));
    assert!(matches!(ProcessIdentity::of(2), Err(TargetError::KernelThread { .. })));
    // A zombie: a child that exited and is not reaped yet.
    let child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id() as i32;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match ProcessIdentity::of(pid) {
            Err(TargetError::Zombie { .. }) => break,
            _ => assert!(std::time::Instant::now() < deadline, "child never became a zombie"),
        }
        std::thread::yield_now();
    }
    drop(child);
    // A thread id that is not a process id.
    let fixture = Running::start(Fixture::BusyC, &["1", "--blockers"]).unwrap();
    let tid = fixture.number("tid_read") as i32;
    assert!(matches!(
        ProcessIdentity::of(tid),
        Err(TargetError::NotThreadGroupLeader { .. })
    ));
}

fn fd_table(pid: i32) -> Vec<(String, std::path::PathBuf)> {
    let mut table: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read_link(e.path()).ok()?,
            ))
        })
        .collect();
    table.sort();
    table
}

#[test]
fn a_descriptor_created_remotely_moves_to_the_tracer_and_leaves_the_fd_table_as_it_was() {
    let mut fixture = Running::start(Fixture::BusyC, &["1", "--blockers"]).unwrap();
    let before = fd_table(fixture.pid());
    let mut attached = Attached::seize(&ProcessIdentity::of(fixture.pid()).unwrap()).unwrap();
    let mut stopped = attached.stop().unwrap();
    let tid = Pid::from_raw(fixture.number("tid_read") as i32);
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | shadowpatch_sys::uffd::UFFD_USER_MODE_ONLY;
    let remote_fd = stopped.remote_userfaultfd(tid, flags).unwrap();
    assert_eq!(fd_table(fixture.pid()).len(), before.len() + 1);
    let ours = stopped.take_fd(remote_fd).unwrap();
    stopped.remote_close(tid, remote_fd).unwrap();
    let err = stopped.remote_close(tid, remote_fd).unwrap_err();
    assert!(err.to_string().contains("EBADF"), "{err}");
    stopped.resume().unwrap();
    drop(attached);
    assert_eq!(fd_table(fixture.pid()), before);
    // Ours is the target's userfaultfd: its registrations act on the
    // target's address space, not ours.
    let uffd = shadowpatch_sys::uffd::Userfaultfd::from_fd(ours).unwrap();
    uffd.api(shadowpatch_sys::uffd::UFFD_FEATURE_WP_ASYNC).unwrap();
    assert_eq!(fixture.command("wake").unwrap(), "woken");
    assert_eq!(fixture.check().unwrap()["errors"], 0);
}

#[test]
fn a_stop_asked_to_release_detaches_at_its_resume_and_only_there() {
    let mut fixture = Running::start(Fixture::BusyC, &["8"]).unwrap();
    let pid = fixture.pid();
    let tracer = |pid: i32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("TracerPid:"))
            .unwrap()
            .trim()
            .to_string()
    };
    let identity = ProcessIdentity::of(pid).unwrap();
    let mut attached = Attached::seize(&identity).unwrap();
    attached.release_at_next_resume(true);
    // A stop dropped without an explicit resume (a failed attempt) resumes
    // the threads and stays attached.
    drop(attached.stop().unwrap());
    assert_ne!(tracer(pid), "0");
    assert!(!attached.released());
    let report = attached.stop().unwrap().resume().unwrap();
    assert_eq!(report.threads, 9, "every thread was stopped, then let go");
    assert!(attached.released());
    assert_eq!(tracer(pid), "0", "no tracer left after the resume");
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        assert!(status.contains("TracerPid:\t0"), "a thread left traced: {status}");
    }
    // Detaching again (or dropping) is a no-op, and the flag was used up:
    // a new seize resumes normally.
    attached.detach().unwrap();
    let mut again = Attached::seize(&identity).unwrap();
    again.stop().unwrap().resume().unwrap();
    assert_ne!(tracer(pid), "0");
    again.detach().unwrap();
    let calls = fixture.check().unwrap()["calls"];
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while fixture.check().unwrap()["calls"] <= calls {
        assert!(std::time::Instant::now() < deadline, "workers did not run on");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
