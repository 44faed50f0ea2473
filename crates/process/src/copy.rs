//! A copy of the target made by a remote `clone`: one thread, its own
//! copy-on-write memory, traced by us from birth, killed when dropped.
//!
//! Copies are children of the target with exit signal 0 (see
//! [`crate::remote::COPY_CLONE_FLAGS`]): the target gets no SIGCHLD and its
//! `wait` calls do not see them. A copy of a copy is made with
//! `CLONE_PARENT`, so every copy is the target's child and none is ever
//! reparented (reparenting would turn its exit signal into SIGCHLD, sent to
//! init or to the target if it is a child subreaper). When we reap a dead
//! copy as its tracer, it stays a zombie of the target until a `wait4(pid,
//! __WALL)` runs inside the target: see [`crate::Stopped::reap_copies`].
//!
//! A copy carries PTRACE_O_EXITKILL from its first stop, and every copy of
//! it inherits the flag: if the tracer dies, the kernel kills the copies
//! rather than let a copy of the service run free with the service's file
//! descriptors. Before that first stop, the copy's stack pointer is
//! [`crate::remote::CLONE_STACK_TRAP`] and its next instruction a `ret`, so
//! even a copy orphaned in that window dies on its first instruction.

use crate::remote::{clone_result, run_syscall, syscall_registers, CLONE_STACK_TRAP};
use crate::{Attached, ProcessIdentity, TargetError, TargetMemory};
use nix::errno::Errno;
use nix::sys::ptrace::{self, Options};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// `CLONE_PARENT`: the new copy is a child of the copy's parent (the target).
const CLONE_PARENT: u64 = 0x8000;

/// Options of every copy: killed with the tracer, syscall stops marked,
/// its own clones (copies of the copy) traced from birth.
const COPY_OPTIONS: Options = Options::PTRACE_O_EXITKILL
    .union(Options::PTRACE_O_TRACESYSGOOD)
    .union(Options::PTRACE_O_TRACECLONE);

/// How to let a stopped copy run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Until a signal or exit.
    Continue,
    /// Until the next syscall entry or exit (PTRACE_SYSCALL).
    Syscall,
    /// One instruction.
    Step,
}

/// Why a copy stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyStop {
    /// A syscall-entry or syscall-exit stop (which one: `syscall_op`).
    Syscall,
    /// A signal is about to be delivered: `code` and `address` from its
    /// siginfo (`si_code`, `si_addr`).
    Signal { signal: Signal, code: i32, address: u64 },
    /// A ptrace event stop (interrupt, clone...) with its event number.
    Event(i32),
    /// The copy exited with `code`.
    Exited(i32),
    /// The copy was killed by `signal`.
    Killed(Signal),
}

/// A copy of the target, stopped or running under our control.
#[derive(Debug)]
pub struct ProcessCopy {
    pid: Pid,
    pid_in_target: i64,
    memory: TargetMemory,
    syscall_instruction: u64,
    syscall_return_gadget: u64,
    /// Not yet exited and reaped by us.
    alive: bool,
    /// SIGKILL sent, exit not yet reaped.
    kill_sent: bool,
}

impl Attached {
    /// Take charge of a copy returned by [`Attached::remote_clone`].
    pub fn adopt_copy(&mut self, pid: Pid, pid_in_target: i64) -> Result<ProcessCopy, TargetError> {
        let syscall_instruction = self.syscall_instruction()?;
        let syscall_return_gadget = self.syscall_return_gadget()?;
        ProcessCopy::adopt(pid, pid_in_target, syscall_instruction, syscall_return_gadget)
    }
}

impl ProcessCopy {
    /// Wait for a fresh copy's first stop and set its options. Killed on
    /// any failure.
    fn adopt(
        pid: Pid,
        pid_in_target: i64,
        syscall_instruction: u64,
        syscall_return_gadget: u64,
    ) -> Result<Self, TargetError> {
        let raw = pid.as_raw();
        let fail = |error: TargetError| {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = reap(pid);
            error
        };
        loop {
            match waitpid(pid, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::PtraceEvent(..)) => break,
                // A signal sent to the copy before its first stop (e.g. to
                // the target's process group): not the copy's business.
                Ok(WaitStatus::Stopped(..)) => {
                    let _ = ptrace::cont(pid, None);
                }
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => {
                    return Err(TargetError::Exited {
                        pid: raw,
                        during: "adopting a copy",
                    })
                }
                Ok(_) | Err(Errno::EINTR) => {}
                Err(errno) => return Err(fail(TargetError::from_errno(raw, "waiting for the copy", errno))),
            }
        }
        ptrace::setoptions(pid, COPY_OPTIONS)
            .map_err(|e| fail(TargetError::from_errno(raw, "setting ptrace options of the copy", e)))?;
        let memory = ProcessIdentity::of(raw)
            .and_then(|identity| TargetMemory::open(&identity))
            .map_err(fail)?;
        Ok(ProcessCopy {
            pid,
            pid_in_target,
            memory,
            syscall_instruction,
            syscall_return_gadget,
            alive: true,
            kill_sent: false,
        })
    }

    /// The copy's pid in our pid namespace.
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The copy's pid in the target's pid namespace (for `wait4` there).
    pub fn pid_in_target(&self) -> i64 {
        self.pid_in_target
    }

    pub fn memory(&mut self) -> &mut TargetMemory {
        &mut self.memory
    }

    pub fn regs(&self) -> Result<libc::user_regs_struct, TargetError> {
        ptrace::getregs(self.pid).map_err(|e| self.error("reading registers of the copy", e))
    }

    pub fn set_regs(&self, regs: libc::user_regs_struct) -> Result<(), TargetError> {
        ptrace::setregs(self.pid, regs).map_err(|e| self.error("writing registers of the copy", e))
    }

    /// The floating-point and vector registers (xmm0 holds a returned
    /// `double`).
    pub fn fp_regs(&self) -> Result<libc::user_fpregs_struct, TargetError> {
        ptrace::getregset::<ptrace::regset::NT_PRFPREG>(self.pid)
            .map_err(|e| self.error("reading vector registers of the copy", e))
    }

    /// At a syscall stop: whether it is the entry (true) or the exit.
    pub fn at_syscall_entry(&self) -> Result<bool, TargetError> {
        use shadowpatch_sys::ptrace_ext::{syscall_stop, SyscallStop};
        match syscall_stop(self.pid).map_err(|e| self.error("reading syscall info of the copy", e))? {
            SyscallStop::Entry => Ok(true),
            SyscallStop::Exit => Ok(false),
            // Never guess: a syscall taken for an exit would run for real.
            SyscallStop::Other => {
                Err(self.error("reading syscall info of the copy (not a syscall stop)", Errno::EINVAL))
            }
        }
    }

    /// Run a syscall in the stopped copy; returns its raw result. Signals
    /// met on the way are dropped: nobody but us should signal a copy.
    pub fn remote_syscall(&mut self, number: i64, args: [u64; 6]) -> Result<i64, TargetError> {
        let saved = self.regs()?;
        let call = syscall_registers(saved, self.syscall_instruction, number, args);
        Ok(run_syscall(self.pid.as_raw(), self.pid, saved, call, &mut |_| {})?.result)
    }

    /// Make a copy of this copy, in the state it is in now (a sibling: the
    /// target's child too, with the same options).
    pub fn remote_clone(&mut self) -> Result<ProcessCopy, TargetError> {
        let saved = self.regs()?;
        let flags = crate::remote::COPY_CLONE_FLAGS | CLONE_PARENT;
        let mut call = syscall_registers(
            saved,
            self.syscall_return_gadget,
            libc::SYS_clone,
            [flags, 0, 0, 0, 0, 0],
        );
        call.rsp = CLONE_STACK_TRAP;
        let run = run_syscall(self.pid.as_raw(), self.pid, saved, call, &mut |_| {})?;
        let (pid, pid_in_target) = clone_result(self.pid.as_raw(), run)?;
        ProcessCopy::adopt(pid, pid_in_target, self.syscall_instruction, self.syscall_return_gadget)
    }

    /// Let the stopped copy run, delivering `signal` if given.
    pub fn resume(&self, how: Resume, signal: Option<Signal>) -> Result<(), TargetError> {
        let result = match how {
            Resume::Continue => ptrace::cont(self.pid, signal),
            Resume::Syscall => ptrace::syscall(self.pid, signal),
            Resume::Step => ptrace::step(self.pid, signal),
        };
        result.map_err(|e| self.error("resuming the copy", e))
    }

    /// Wait (blocking) for the copy's next stop. Bound the wait with a
    /// [`Deadline`], which stops the copy when it expires.
    pub fn wait(&mut self) -> Result<CopyStop, TargetError> {
        loop {
            let status = match waitpid(self.pid, Some(WaitPidFlag::__WALL)) {
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(self.error("waiting for the copy", errno)),
                Ok(status) => status,
            };
            return Ok(match status {
                WaitStatus::PtraceSyscall(_) => CopyStop::Syscall,
                WaitStatus::Stopped(_, signal) => {
                    let info = ptrace::getsiginfo(self.pid).ok();
                    CopyStop::Signal {
                        signal,
                        code: info.map_or(0, |i| i.si_code),
                        address: info.map_or(0, |i| shadowpatch_sys::siginfo::fault_address(&i)),
                    }
                }
                WaitStatus::PtraceEvent(_, _, event) => CopyStop::Event(event),
                WaitStatus::Exited(_, code) => {
                    self.alive = false;
                    CopyStop::Exited(code)
                }
                WaitStatus::Signaled(_, signal, _) => {
                    self.alive = false;
                    CopyStop::Killed(signal)
                }
                WaitStatus::Continued(_) | WaitStatus::StillAlive => continue,
            });
        }
    }

    /// Kill the copy and reap it as its tracer. It then waits as a zombie
    /// of the target for [`crate::Stopped::reap_copies`].
    pub fn kill(&mut self) {
        if self.alive {
            self.kill_soon();
            let _ = reap(self.pid);
            self.alive = false;
        }
    }

    /// Send SIGKILL without waiting: the copy's teardown (milliseconds for
    /// a big process) runs meanwhile; [`ProcessCopy::kill`] or dropping it
    /// reaps it later. It can run no more code of its own either way.
    pub fn kill_soon(&mut self) {
        if self.alive && !self.kill_sent {
            let _ = kill(self.pid, Signal::SIGKILL);
            self.kill_sent = true;
        }
    }

    /// Whether the copy has not exited or been killed yet.
    pub fn is_alive(&self) -> bool {
        self.alive
    }

    fn error(&self, action: &'static str, errno: Errno) -> TargetError {
        TargetError::from_errno(self.pid.as_raw(), action, errno)
    }
}

impl Drop for ProcessCopy {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Wait until a killed tracee is gone (its exit reported to us).
fn reap(pid: Pid) -> Result<(), Errno> {
    loop {
        match waitpid(pid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) => return Ok(()),
            Err(Errno::EINTR) | Ok(_) => {}
            Err(errno) => return Err(errno),
        }
    }
}

/// The time budget of a running copy, kept by a watchdog thread: when the
/// copy has used `cpu` of processor time, or `wall` has passed, the copy is
/// sent SIGSTOP, which ends any blocking [`ProcessCopy::wait`] with a
/// signal stop; [`Deadline::expired`] then tells a hang from a stop of the
/// copy's own. A stop, not a kill: the copy's memory stays readable.
/// Processor time, not wall time, is what a busy loop burns: a copy
/// starved of a core on a loaded machine is not taken for a hang; the wall
/// budget catches a copy blocked forever (a lock no thread will release).
#[derive(Debug)]
pub struct Deadline {
    shared: Arc<(Mutex<DeadlineState>, Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct DeadlineState {
    cancelled: bool,
    expired: Option<&'static str>,
}

/// How often the watchdog reads the copy's processor time.
const CPU_CHECK: std::time::Duration = std::time::Duration::from_millis(5);

impl Deadline {
    /// Stop `copy` once it used `cpu` of processor time or at `wall`,
    /// unless dropped before.
    pub fn arm(copy: &ProcessCopy, cpu: std::time::Duration, wall: Instant) -> Deadline {
        let shared = Arc::new((Mutex::new(DeadlineState::default()), Condvar::new()));
        let pid = copy.pid;
        let clock = nix::time::ClockId::pid_cpu_clock_id(pid).ok();
        let start = clock.and_then(|c| c.now().ok()).map(std::time::Duration::from);
        let watcher = shared.clone();
        let thread = std::thread::spawn(move || {
            let (lock, condvar) = &*watcher;
            let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
            while !state.cancelled {
                let now = Instant::now();
                let used = match (clock, start) {
                    (Some(clock), Some(start)) => clock
                        .now()
                        .ok()
                        .map(|t| std::time::Duration::from(t).saturating_sub(start)),
                    _ => None,
                };
                let reason = if now >= wall {
                    Some("wall time")
                } else if used.is_some_and(|used| used >= cpu) {
                    Some("cpu time")
                } else {
                    None
                };
                if let Some(reason) = reason {
                    state.expired = Some(reason);
                    let _ = kill(pid, Signal::SIGSTOP);
                    return;
                }
                state = condvar
                    .wait_timeout(state, (wall - now).min(CPU_CHECK))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        });
        Deadline {
            shared,
            thread: Some(thread),
        }
    }

    /// Which budget ran out, if one did: "cpu time" or "wall time".
    pub fn expired(&self) -> Option<&'static str> {
        self.shared.0.lock().unwrap_or_else(|p| p.into_inner()).expired
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        {
            let (lock, condvar) = &*self.shared;
            lock.lock().unwrap_or_else(|p| p.into_inner()).cancelled = true;
            condvar.notify_all();
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
