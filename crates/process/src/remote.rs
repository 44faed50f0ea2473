//! Running a system call inside a stopped target by borrowing one thread,
//! so that the thread restores itself if we die at any instant.
//!
//! Self-restoring calls (the target's own threads): no byte of code is
//! written and nothing is single-stepped. The thread's registers, FPU state
//! and signal mask go into a signal frame on its stack below the red zone
//! (`sigframe`); the call starts at a `syscall; ret` sequence of the
//! target's libc with the stack pointer at that frame, whose first word is
//! the address of libc's `__restore_rt`. Let go at any instant (our process
//! killed: the kernel detaches and resumes the thread), the thread finishes
//! the call, returns into `__restore_rt`, and its `rt_sigreturn` loads its
//! own registers back: it goes on as if never borrowed. While we live, the
//! call runs under `PTRACE_SYSCALL` (its entry and exit stops; with
//! `PTRACE_O_TRACESYSGOOD` their stop code is not a signal, so a tracer
//! dying there sends nothing), and from the exit stop a `PTRACE_INTERRUPT`
//! brings the thread into an interrupt stop (inside the kernel's signal
//! path, before any user instruction) where its saved registers are put
//! back exactly. The thread thus ends every call in an interrupt stop, the
//! one stop a dying tracer leaves no signal behind in.
//!
//! Interrupted system calls: a thread stopped while blocked in `read`,
//! `nanosleep` or `futex` sits in the kernel's signal path with
//! `rax = -ERESTART*` and `orig_rax = its syscall`. We set `orig_rax = -1`
//! while borrowing it so the kernel's restart logic leaves our registers
//! alone, and restore the original pair afterwards: when the thread resumes,
//! the kernel restarts (or fails with EINTR) its own call exactly as it
//! would have without us. The signal frame holds the restart already
//! decided (`sigframe::resumed_registers`).
//!
//! Copies of the target (`copy`) still single-step their calls over a
//! `syscall` instruction: a copy dies with its tracer (PTRACE_O_EXITKILL),
//! so it needs no way back. So does a target whose libc has no
//! `syscall; ret` or `__restore_rt` (a static binary without signal
//! handling): there a tracer killed mid-call can still kill the target.
//!
//! The same machinery runs a remote `clone` that makes a copy of the target
//! (see `copy`), and the `wait4` that reaps dead copies inside the target.

use crate::attach::{Attached, Stopped};
use crate::fault;
use crate::maps::read_maps;
use crate::sigframe::{SigFrame, UC_SIGMASK};
use crate::TargetError;
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use shadowpatch_sys::{pidfd, ptrace_ext, siginfo};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};

/// The x86_64 `syscall` instruction.
const SYSCALL_INSTRUCTION: [u8; 2] = [0x0f, 0x05];
/// How many times a remote syscall may be pre-empted by foreign signals
/// before we give up.
const MAX_STEP_ATTEMPTS: usize = 64;

impl Stopped<'_> {
    /// Run syscall `number` with `args` in thread `tid` (stopped by us) and
    /// return its raw result (negative errno on failure).
    pub fn remote_syscall(&mut self, tid: Pid, number: i64, args: [u64; 6]) -> Result<i64, TargetError> {
        self.attached().remote_syscall(tid, number, args)
    }

    /// Run `calls` one after the other in thread `tid` (stopped by us); see
    /// [`Attached::remote_syscalls`].
    pub fn remote_syscalls(&mut self, tid: Pid, calls: &[RemoteCall]) -> Result<Vec<i64>, TargetError> {
        self.attached().remote_syscalls(tid, calls)
    }

    /// Move thread `tid` (the others stay stopped) forward until its
    /// instruction pointer is outside `start..end`, at most `max_steps`
    /// instructions, by emulating them (`emulate`: never a single step,
    /// which a tracer killed mid-way turns into a fatal SIGTRAP). Used to
    /// move a thread out of bytes about to be rewritten instead of waiting
    /// for the scheduler to do it. Returns false when the thread could not
    /// be moved out: it sits in a system call, or meets an instruction we
    /// do not emulate (the caller lets it run on and tries again).
    pub fn step_out_of(&mut self, tid: Pid, start: u64, end: u64, max_steps: u32) -> Result<bool, TargetError> {
        let pid = self.pid();
        if !self.attached().threads.get(&tid).is_some_and(|s| s.stopped && !s.held) {
            return Err(TargetError::ThreadNotStopped { pid, tid: tid.as_raw() });
        }
        let regs = ptrace::getregs(tid).map_err(|e| TargetError::from_errno(pid, "reading registers of", e))?;
        let thread = StepOut { tid, regs, start, end };
        Ok(self.step_out_of_many(&[thread], max_steps)?[0])
    }

    /// [`Stopped::step_out_of`] for several threads whose registers the
    /// caller read in this stop; one result per thread, in order. Inside a
    /// stop of many threads every syscall counts: the code of all of them
    /// is read in one `process_vm_readv` (every instruction to emulate
    /// starts before `end` and is at most 15 bytes long), and each thread
    /// gets its new registers in one `PTRACE_SETREGS`, after the stack
    /// words its instructions write. A thread that cannot be moved out is
    /// left unchanged.
    pub fn step_out_of_many(&mut self, threads: &[StepOut], max_steps: u32) -> Result<Vec<bool>, TargetError> {
        self.step_out_of_many_over(threads, &[], max_steps)
    }

    /// [`Stopped::step_out_of_many`] over code the caller read in this
    /// stop, as `(address, bytes)` ranges: a thread whose code lies inside
    /// one costs no read (an activation reads the entries to check them
    /// anyway; reading them a second time for the threads inside cost as
    /// much as the check's own read). Code outside them is read.
    pub fn step_out_of_many_over(
        &mut self,
        threads: &[StepOut],
        known: &[(u64, &[u8])],
        max_steps: u32,
    ) -> Result<Vec<bool>, TargetError> {
        let attached = self.attached();
        let pid = attached.pid();
        for thread in threads {
            // Emulation runs nothing in the thread: one in job-control
            // stop can be moved too.
            if !attached.threads.get(&thread.tid).is_some_and(|s| s.stopped && !s.held) {
                return Err(TargetError::ThreadNotStopped {
                    pid,
                    tid: thread.tid.as_raw(),
                });
            }
        }
        // From the instruction pointer to 15 bytes past `end`, but not past
        // the page `end - 1` is on: the bytes to rewrite are mapped, the
        // next page may not be (an instruction cut there is read again).
        let windows: Vec<(u64, usize)> = threads
            .iter()
            .map(|t| {
                // Nothing to read for a thread that is not to be moved.
                if t.regs.orig_rax != u64::MAX || !(t.start..t.end).contains(&t.regs.rip) {
                    return (t.regs.rip, 0);
                }
                let last_page_end = ((t.end - 1) | (PAGE - 1)) + 1;
                let window_end = (t.end + LONGEST_INSTRUCTION).min(last_page_end);
                (t.regs.rip, window_end.saturating_sub(t.regs.rip) as usize)
            })
            .collect();
        let copied: Vec<Option<Vec<u8>>> = windows
            .iter()
            .map(|&(address, len)| known_code(known, address, len))
            .collect();
        let unknown: Vec<(u64, usize)> = windows
            .iter()
            .zip(&copied)
            .filter(|(_, copied)| copied.is_none())
            .map(|(&window, _)| window)
            .collect();
        let mut read = attached.memory().read_many(&unknown)?.into_iter();
        let code: Vec<Vec<u8>> = copied
            .into_iter()
            .map(|copied| copied.or_else(|| read.next()).unwrap_or_default())
            .collect();
        let mut moved = Vec::with_capacity(threads.len());
        for (thread, code) in threads.iter().zip(code) {
            let Some(out) = emulate_out(attached, thread, code, max_steps)? else {
                moved.push(false);
                continue;
            };
            // The stack words first (below the stack pointer: nothing live
            // there), then every register at once: killed between the two,
            // the thread still holds its old, valid state.
            for (address, value) in out.stores {
                attached.memory().write(address, &value.to_le_bytes())?;
            }
            let written = if out.regs.rip == thread.regs.rip {
                Ok(())
            } else if out.rip_only {
                // One word (PTRACE_POKEUSER costs half a PTRACE_SETREGS, and
                // a stop may move dozens of threads over `nop`s): still all
                // of the change at once.
                ptrace::write_user(
                    thread.tid,
                    RIP_OFFSET as ptrace::AddressType,
                    out.regs.rip as libc::c_long,
                )
            } else {
                ptrace::setregs(thread.tid, out.regs)
            };
            written.map_err(|e| TargetError::from_errno(pid, "writing registers of", e))?;
            moved.push(true);
        }
        Ok(moved)
    }

    /// Reap dead copies (pids in the target's namespace) with a remote
    /// `wait4(pid, NULL, __WALL | WNOHANG, NULL)` each in a borrowed thread;
    /// returns those reaped. A copy is only waitable once killed and reaped
    /// by us as its tracer ([`crate::ProcessCopy::kill`]).
    pub fn reap_copies(&mut self, pids_in_target: &[i64]) -> Result<Vec<i64>, TargetError> {
        const WALL: u64 = 0x4000_0000;
        let tid = self.borrowable_thread();
        let mut reaped = Vec::new();
        for &pid in pids_in_target {
            let result = self.remote_syscall(
                tid,
                libc::SYS_wait4,
                [pid as u64, 0, WALL | libc::WNOHANG as u64, 0, 0, 0],
            )?;
            if result == pid {
                reaped.push(pid);
            }
        }
        Ok(reaped)
    }

    /// Remote `mmap`; returns the mapped address.
    pub fn remote_mmap(&mut self, tid: Pid, address: u64, len: u64, prot: i32, flags: i32) -> Result<u64, TargetError> {
        let args = [address, len, prot as u64, flags as u64, u64::MAX, 0];
        let result = self.remote_syscall(tid, libc::SYS_mmap, args)?;
        check_result(self.attached().pid(), "remote mmap in", result).map(|r| r as u64)
    }

    /// Remote `mprotect`.
    pub fn remote_mprotect(&mut self, tid: Pid, address: u64, len: u64, prot: i32) -> Result<(), TargetError> {
        let result = self.remote_syscall(tid, libc::SYS_mprotect, [address, len, prot as u64, 0, 0, 0])?;
        check_result(self.attached().pid(), "remote mprotect in", result).map(drop)
    }

    /// Remote `munmap`.
    pub fn remote_munmap(&mut self, tid: Pid, address: u64, len: u64) -> Result<(), TargetError> {
        let result = self.remote_syscall(tid, libc::SYS_munmap, [address, len, 0, 0, 0, 0])?;
        check_result(self.attached().pid(), "remote munmap in", result).map(drop)
    }

    /// Remote `userfaultfd(flags)`; returns the new descriptor's number in
    /// the target. The userfaultfd belongs to the target's address space
    /// whoever holds the descriptor later.
    pub fn remote_userfaultfd(&mut self, tid: Pid, flags: i32) -> Result<i32, TargetError> {
        let result = self.remote_syscall(tid, libc::SYS_userfaultfd, [flags as u64, 0, 0, 0, 0, 0])?;
        check_result(self.attached().pid(), "remote userfaultfd in", result).map(|fd| fd as i32)
    }

    /// Remote `close(fd)`.
    pub fn remote_close(&mut self, tid: Pid, fd: i32) -> Result<(), TargetError> {
        let result = self.remote_syscall(tid, libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
        check_result(self.attached().pid(), "remote close in", result).map(drop)
    }

    /// Duplicate the target's descriptor `target_fd` into our process
    /// (`pidfd_open` + `pidfd_getfd`, close-on-exec). Done while stopped, so
    /// the pid cannot name another process and the descriptor cannot change.
    pub fn take_fd(&mut self, target_fd: i32) -> Result<OwnedFd, TargetError> {
        let pid = self.attached().pid();
        let pidfd = pidfd::pidfd_open(pid).map_err(|e| TargetError::from_errno(pid, "opening a pidfd for", e))?;
        pidfd::pidfd_getfd(pidfd.as_fd(), target_fd)
            .map_err(|e| TargetError::from_errno(pid, "taking a descriptor (pidfd_getfd) from", e))
    }
}

/// A raw syscall result as a value, or the error naming `action` and pid.
pub fn check_result(pid: i32, action: &'static str, result: i64) -> Result<i64, TargetError> {
    if (-4095..0).contains(&result) {
        return Err(TargetError::Sys {
            pid,
            action,
            errno: Errno::from_raw(-result as i32),
        });
    }
    Ok(result)
}

/// What one single step ended in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// The step's trap.
    Trapped,
    /// A foreign signal's delivery stop came first; the step may not have
    /// run. The caller decides the signal's fate.
    Signal(Signal),
    /// A group-stop, interrupt or ptrace event came first: the step may not
    /// have completed.
    OtherStop,
    /// The thread is gone.
    Exited,
}

/// Single-step `tid` once and wait for what happens.
pub(crate) fn single_step(tid: Pid) -> Result<Step, Errno> {
    ptrace::step(tid, None)?;
    wait_step(tid)
}

fn wait_step(tid: Pid) -> Result<Step, Errno> {
    let status = loop {
        match waitpid(tid, Some(WaitPidFlag::__WALL)) {
            Err(Errno::EINTR) => continue,
            other => break other?,
        }
    };
    Ok(match status {
        WaitStatus::Stopped(_, Signal::SIGTRAP) => Step::Trapped,
        WaitStatus::Stopped(_, signal) => Step::Signal(signal),
        WaitStatus::Exited(..) | WaitStatus::Signaled(..) => Step::Exited,
        _ => Step::OtherStop,
    })
}

/// A syscall run by [`run_syscall`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SyscallRun {
    /// `rax` after the instruction: the result, or a negative errno.
    pub result: i64,
    /// The process a clone created, in our pid namespace (from the
    /// PTRACE_EVENT_CLONE stop), when the tracee had TRACECLONE set.
    pub cloned: Option<Pid>,
}

/// Run one syscall in stopped tracee `tid`: registers `call` (already set
/// up with rip at a `syscall` instruction) are written, the instruction
/// single-stepped, and the tracee's `saved` registers restored whatever
/// happened. Foreign signals met on the way go to `on_signal`.
pub(crate) fn run_syscall(
    pid: i32,
    tid: Pid,
    saved: libc::user_regs_struct,
    call: libc::user_regs_struct,
    on_signal: &mut dyn FnMut(Signal),
) -> Result<SyscallRun, TargetError> {
    let instruction = call.rip;
    ptrace::setregs(tid, call).map_err(|e| TargetError::from_errno(pid, "writing registers of", e))?;
    let outcome = step_over_syscall(pid, tid, instruction, on_signal);
    // Restore exactly, whatever happened (unless the thread is gone).
    let restored = ptrace::setregs(tid, saved);
    let run = outcome?;
    restored.map_err(|e| TargetError::from_errno(pid, "restoring registers of", e))?;
    Ok(run)
}

/// Single-step `tid` until it has executed the `syscall` at `instruction`.
fn step_over_syscall(
    pid: i32,
    tid: Pid,
    instruction: u64,
    on_signal: &mut dyn FnMut(Signal),
) -> Result<SyscallRun, TargetError> {
    let mut cloned = None;
    for _ in 0..MAX_STEP_ATTEMPTS {
        ptrace::step(tid, None).map_err(|e| TargetError::from_errno(pid, "single-stepping", e))?;
        let status = loop {
            match waitpid(tid, Some(WaitPidFlag::__WALL)) {
                Err(Errno::EINTR) => continue,
                other => break other.map_err(|e| TargetError::from_errno(pid, "waiting for", e))?,
            }
        };
        match status {
            WaitStatus::Stopped(_, Signal::SIGTRAP) => {
                let regs = ptrace::getregs(tid).map_err(|e| TargetError::from_errno(pid, "reading registers of", e))?;
                if regs.rip == instruction + SYSCALL_INSTRUCTION.len() as u64 {
                    if let Some(again) = restart_registers(&regs, instruction) {
                        ptrace::setregs(tid, again)
                            .map_err(|e| TargetError::from_errno(pid, "writing registers of", e))?;
                        continue;
                    }
                    return Ok(SyscallRun {
                        result: regs.rax as i64,
                        cloned,
                    });
                }
                if regs.rip != instruction {
                    return Err(TargetError::Sys {
                        pid,
                        action: "stepping a remote syscall in",
                        errno: Errno::EFAULT,
                    });
                }
            }
            // A clone event: stopped before returning from the clone, the
            // next step completes it. A group-stop or another interrupt
            // got in first: step again.
            status => other_stop(pid, tid, status, &mut cloned, on_signal)?,
        }
    }
    Err(TargetError::Sys {
        pid,
        action: "stepping a remote syscall in",
        errno: Errno::EAGAIN,
    })
}

/// The kernel's "interrupted, restart me" results (ERESTARTSYS,
/// ERESTARTNOINTR, ERESTARTNOHAND), never seen by a program: on the way
/// back to user mode the kernel delivers the pending signal, then restarts
/// the call.
const RESTART_RESULTS: [i64; 3] = [-512, -513, -514];

/// At the exit of a borrowed call that a pending signal interrupted
/// (`clone` refuses to start with a signal pending: -ERESTARTNOINTR; seen
/// with SIGCHLDs of a target whose children exit all the time): registers
/// that run the call again from `instruction`. The kernel would restart it
/// itself, but we stop it at the exit first and would report the internal
/// code as the result. Not in a syscall (`orig_rax` -1): no restart logic
/// of the kernel's applies on top of ours. The signal is dequeued on the
/// way (kept for the thread, as any signal met while borrowed).
fn restart_registers(regs: &libc::user_regs_struct, instruction: u64) -> Option<libc::user_regs_struct> {
    if !RESTART_RESULTS.contains(&(regs.rax as i64)) || (regs.orig_rax as i64) < 0 {
        return None;
    }
    let mut again = *regs;
    again.rip = instruction;
    again.rax = regs.orig_rax;
    again.orig_rax = u64::MAX;
    Some(again)
}

/// Where a remote clone points the copy's stack pointer: below
/// `vm.mmap_min_addr`, never mapped. The copy's first instruction after the
/// clone is the `ret` of a `syscall; ret` sequence, so a copy that ever ran
/// untraced (its tracer killed before it could set PTRACE_O_EXITKILL) dies
/// at once on that `ret` instead of running the service's code.
pub const CLONE_STACK_TRAP: u64 = 0x2000;

/// `clone` flags for a copy: no flag, exit signal 0. The copy is a child of
/// the target invisible to its `wait` calls (only `__WALL`/`__WCLONE` waits
/// see a child with a non-SIGCHLD exit signal) and its exit sends the
/// target no signal.
pub const COPY_CLONE_FLAGS: u64 = 0;

impl Attached {
    /// Run syscall `number` with `args` in thread `tid`, which must be in a
    /// ptrace-stop of ours (the world stopped, or the thread held at an
    /// event while the others run); returns the raw result. The thread ends
    /// in an interrupt stop with its registers as they were.
    pub fn remote_syscall(&mut self, tid: Pid, number: i64, args: [u64; 6]) -> Result<i64, TargetError> {
        let results = self.remote_syscalls(tid, &[RemoteCall::new(number, args)])?;
        Ok(results[0])
    }

    /// Run `calls` in thread `tid` one after the other, each only when the
    /// one before returned what it `expect`s; the results of those run (a
    /// shorter list when one returned something else). One borrowing of the
    /// thread for all of them: its state is saved and its signal frame
    /// written once, and each further call starts from the exit stop of the
    /// one before (a `mmap` and the `mprotect`s of its pages were three
    /// whole remote calls, a tenth of a host-wide apply's CPU). Killed
    /// between two calls, the thread runs the next one and restores itself
    /// as after any call.
    pub fn remote_syscalls(&mut self, tid: Pid, calls: &[RemoteCall]) -> Result<Vec<i64>, TargetError> {
        if !self.is_stopped(tid) {
            return Err(self.not_borrowable(tid, "a remote system call"));
        }
        let runs = match self.return_path()? {
            Some(path) => self.self_restoring_call(tid, path, calls, ptrace::Options::empty()),
            None => self.stepped_calls(tid, calls),
        };
        match runs {
            Ok(runs) => Ok(runs.into_iter().map(|run| run.result).collect()),
            Err(error) => Err(self.forget_if_exited(tid, error)),
        }
    }

    /// Make a copy of the target from thread `tid` (stopped by us): a
    /// remote `clone` with [`COPY_CLONE_FLAGS`], run with PTRACE_O_TRACECLONE
    /// so the copy is traced from birth. Returns the copy's pid in our pid
    /// namespace and in the target's. The copy has not reported its first
    /// stop yet: hand it to [`crate::ProcessCopy::adopt`].
    pub fn remote_clone(&mut self, tid: Pid) -> Result<(Pid, i64), TargetError> {
        let pid = self.pid();
        if !self.is_stopped(tid) {
            return Err(self.not_borrowable(tid, "a remote clone"));
        }
        // The copy starts with its stack pointer at CLONE_STACK_TRAP (the
        // clone's stack argument), never on the borrowed thread's frame: a
        // copy let go untraced dies on its first `ret`.
        let args = [COPY_CLONE_FLAGS, CLONE_STACK_TRAP, 0, 0, 0, 0];
        let run = match self.return_path()? {
            Some(path) => {
                let call = RemoteCall::new(libc::SYS_clone, args);
                let runs = self.self_restoring_call(tid, path, &[call], ptrace::Options::PTRACE_O_TRACECLONE);
                runs.map(|runs| runs[0])
            }
            None => self.stepped_call(tid, libc::SYS_clone, args, Some(CLONE_STACK_TRAP)),
        };
        let run = run.map_err(|error| self.forget_if_exited(tid, error))?;
        clone_result(pid, run)
    }

    fn forget_if_exited(&mut self, tid: Pid, error: TargetError) -> TargetError {
        if let TargetError::Exited { .. } = error {
            self.forget_thread(tid);
        }
        error
    }

    /// The self-restoring call (see the module comment). Every step says
    /// what a tracer killed right there leaves; `fault::point` names them
    /// for the tests that kill us there.
    fn self_restoring_call(
        &mut self,
        tid: Pid,
        path: ReturnPath,
        calls: &[RemoteCall],
        extra_options: ptrace::Options,
    ) -> Result<Vec<SyscallRun>, TargetError> {
        let pid = self.pid();
        let Some(first) = calls.first() else {
            return Ok(Vec::new());
        };
        let regs_error = |e| TargetError::from_errno(pid, "reading registers of", e);
        let saved = ptrace::getregs(tid).map_err(regs_error)?;
        let fpu = ptrace_ext::regset_bytes(tid, ptrace_ext::NT_X86_XSTATE)
            .or_else(|_| ptrace_ext::regset_bytes(tid, ptrace_ext::NT_PRFPREG))
            .map_err(|e| TargetError::from_errno(pid, "reading the FPU state of", e))?;
        let mask =
            ptrace_ext::sigmask(tid).map_err(|e| TargetError::from_errno(pid, "reading the signal mask of", e))?;
        let frame = SigFrame::new(&saved, &fpu, mask, path.restore_rt);
        // Below the red zone: memory any signal delivery may overwrite, so
        // the thread's own code keeps nothing there. Written with the
        // target's own protections (process_vm_writev, unlike /proc/PID/mem,
        // refuses a guard page or a read-only mapping): a stack with no
        // room for the frame takes the stepped call instead.
        if !write_as_target(pid, frame.address, &frame.bytes) {
            tracing::debug!(
                pid,
                tid = tid.as_raw(),
                "no room for a signal frame: stepped remote call"
            );
            return self.stepped_calls(tid, calls);
        }
        fault::point("remote-framed");
        // Every thread carries PTRACE_O_TRACESYSGOOD from its seize (see
        // `Attached::thread_options`): a stop code of SIGTRAP | 0x80 is no
        // signal, so a tracer dying in a syscall stop makes the kernel send
        // nothing. Only a clone adds an option, for its call alone.
        if !extra_options.is_empty() {
            ptrace::setoptions(tid, self.thread_options() | extra_options)
                .map_err(|e| TargetError::from_errno(pid, "setting ptrace options of", e))?;
        }
        let registers_of = |call: &RemoteCall| {
            let mut registers = syscall_registers(saved, path.syscall_ret, call.number, call.args);
            registers.rsp = frame.address;
            // Never run the call with the trap flag.
            registers.eflags &= !TRAP_FLAG;
            registers
        };
        ptrace::setregs(tid, registers_of(first))
            .map_err(|e| TargetError::from_errno(pid, "writing registers of", e))?;
        // From here on the thread restores itself whenever it is let go.
        fault::point("remote-borrowed");
        // Signals met on the way are kept from the thread while it is
        // borrowed and sent back to it at the end (see `requeue`).
        let mut kept = Vec::new();
        let mut runs = Vec::with_capacity(calls.len());
        let mut ran = Ok(());
        for (index, call) in calls.iter().enumerate() {
            if index > 0 {
                // At the exit stop of the call before: the thread, let go
                // now, would return to the `syscall; ret` with these
                // registers, make this call and restore itself.
                if let Err(e) = ptrace::setregs(tid, registers_of(call)) {
                    ran = Err(TargetError::from_errno(pid, "writing registers of", e));
                    break;
                }
                fault::point("remote-chained");
            }
            let run = run_to_exit_stop(
                pid,
                tid,
                path.syscall_ret,
                &mut |signal| kept.push(signal),
                &mut |at_entry| {
                    // Leaving the interrupt stop ran restore_saved_sigmask():
                    // the mask now is the one the thread lives with (the one
                    // read above was a ppoll/pselect/sigsuspend call's
                    // temporary mask if the thread was stopped inside one).
                    // The frame must restore it. Only the first call of a
                    // chain left an interrupt stop.
                    if at_entry && index == 0 {
                        if let Ok(now) = ptrace_ext::sigmask(tid) {
                            if now != mask {
                                self.memory().write(frame.address + UC_SIGMASK, &now.to_le_bytes())?;
                            }
                        }
                        fault::point("remote-entered");
                    }
                    Ok(())
                },
            );
            match run {
                Ok(run) => {
                    runs.push(run);
                    if !call.accepts(run.result) {
                        break;
                    }
                }
                Err(error) => {
                    ran = Err(error);
                    break;
                }
            }
        }
        let ran = ran.and_then(|()| {
            fault::point("remote-returned");
            interrupt_stop(pid, tid, &mut |signal| kept.push(signal))?;
            fault::point("remote-trapped");
            // In an interrupt stop, inside the kernel's signal path: the
            // saved registers resume exactly as they would have (restart
            // included).
            ptrace::setregs(tid, saved).map_err(|e| TargetError::from_errno(pid, "restoring registers of", e))?;
            if !extra_options.is_empty() {
                let _ = ptrace::setoptions(tid, self.thread_options());
            }
            Ok(runs)
        });
        requeue(pid, tid, &kept);
        ran
    }

    /// `calls` as single-stepped calls, in turn while each returns what it
    /// expects (a clone's stack is its second argument).
    fn stepped_calls(&mut self, tid: Pid, calls: &[RemoteCall]) -> Result<Vec<SyscallRun>, TargetError> {
        let mut runs = Vec::with_capacity(calls.len());
        for call in calls {
            let clone_stack = (call.number == libc::SYS_clone).then_some(call.args[1]);
            let run = self.stepped_call(tid, call.number, call.args, clone_stack)?;
            runs.push(run);
            if !call.accepts(run.result) {
                break;
            }
        }
        Ok(runs)
    }

    /// The single-stepped call (no way back if we die mid-call): for a
    /// target without the gadgets of [`ReturnPath`].
    fn stepped_call(
        &mut self,
        tid: Pid,
        number: i64,
        args: [u64; 6],
        clone_stack: Option<u64>,
    ) -> Result<SyscallRun, TargetError> {
        let pid = self.pid();
        let options = self.thread_options();
        let with_clone = options | ptrace::Options::PTRACE_O_TRACECLONE;
        let instruction = match clone_stack {
            Some(_) => {
                if with_clone != options {
                    ptrace::setoptions(tid, with_clone)
                        .map_err(|e| TargetError::from_errno(pid, "setting ptrace options of", e))?;
                }
                self.syscall_return_gadget()?
            }
            None => self.syscall_instruction()?,
        };
        let saved = ptrace::getregs(tid).map_err(|e| TargetError::from_errno(pid, "reading registers of", e))?;
        let mut call = syscall_registers(saved, instruction, number, args);
        if let Some(stack) = clone_stack {
            call.rsp = stack;
        }
        let mut deferred = None;
        let run = run_syscall(pid, tid, saved, call, &mut |signal| {
            deferred.get_or_insert(signal);
        });
        if let Some(signal) = deferred {
            self.defer_signal(tid, signal);
        }
        if clone_stack.is_some() && with_clone != options {
            let _ = ptrace::setoptions(tid, options);
        }
        run
    }

    /// The gadgets a self-restoring call needs, found once; `None` when
    /// the target lacks one.
    fn return_path(&mut self) -> Result<Option<ReturnPath>, TargetError> {
        if self.restore_rt.is_none() {
            let found = find_bytes(self, &RESTORE_RT)?;
            self.restore_rt = Some(found);
        }
        let Some(restore_rt) = self.restore_rt.flatten() else {
            return Ok(None);
        };
        self.syscall_return_gadget()?;
        Ok(self.syscall_return_gadget.flatten().map(|syscall_ret| ReturnPath {
            syscall_ret,
            restore_rt,
        }))
    }

    /// Find the instructions remote syscalls and clones borrow, now rather
    /// than in the first one's pause (the search reads memory).
    pub fn prepare_remote_calls(&mut self) -> Result<(), TargetError> {
        // One read of the maps for the three searches (each alone reads
        // them: a host-wide rollback read them three times per process).
        let candidates = gadget_candidates(self.pid())?;
        self.prepare_remote_calls_in(candidates)
    }

    /// [`Self::prepare_remote_calls`] with the target's maps as the caller
    /// read them moments ago (an apply's survey, whose maps also place the
    /// patch): one read of /proc/PID/maps fewer per process. Libraries'
    /// code does not move while a process lives, and every address found
    /// is read back from memory before it is used.
    pub fn prepare_remote_calls_from(&mut self, maps: &[crate::maps::Mapping]) -> Result<(), TargetError> {
        let candidates = maps.iter().filter(|m| is_gadget_candidate(m)).cloned().collect();
        self.prepare_remote_calls_in(candidates)
    }

    fn prepare_remote_calls_in(&mut self, candidates: Vec<crate::maps::Mapping>) -> Result<(), TargetError> {
        if self.syscall_instruction.is_none() {
            let found = find_bytes_in(self, candidates.clone(), &SYSCALL_INSTRUCTION)?
                .ok_or(TargetError::NoSyscallInstruction { pid: self.pid() })?;
            self.syscall_instruction = Some(found);
        }
        if self.restore_rt.is_none() {
            self.restore_rt = Some(find_bytes_in(self, candidates.clone(), &RESTORE_RT)?);
        }
        // As `return_path`: the `syscall; ret` only serves with a restorer.
        if self.restore_rt.flatten().is_some() && self.syscall_return_gadget.is_none() {
            self.syscall_return_gadget = Some(find_bytes_in(self, candidates, &SYSCALL_RETURN)?);
        }
        Ok(())
    }

    /// Address of a `syscall; ret` sequence (see [`CLONE_STACK_TRAP`]), or
    /// of any `syscall` when the target has none.
    pub(crate) fn syscall_return_gadget(&mut self) -> Result<u64, TargetError> {
        if self.syscall_return_gadget.is_none() {
            let found = find_bytes(self, &SYSCALL_RETURN)?;
            self.syscall_return_gadget = Some(found);
        }
        match self.syscall_return_gadget.flatten() {
            Some(address) => Ok(address),
            None => self.syscall_instruction(),
        }
    }
}

/// `syscall; ret`.
const SYSCALL_RETURN: [u8; 3] = [0x0f, 0x05, 0xc3];
/// `mov $15, %rax; syscall`: libc's `__restore_rt` (glibc and musl), the
/// `rt_sigreturn` a signal handler returns through.
const RESTORE_RT: [u8; 9] = [0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];
/// EFLAGS.TF.
const TRAP_FLAG: u64 = 0x100;

/// The process a clone, fork or vfork event stop of `tid` announces (in our
/// pid namespace); `None` for any other event.
fn cloned_by(pid: i32, tid: Pid, event: i32) -> Result<Option<Pid>, TargetError> {
    let clone_events = [
        ptrace::Event::PTRACE_EVENT_CLONE,
        ptrace::Event::PTRACE_EVENT_FORK,
        ptrace::Event::PTRACE_EVENT_VFORK,
    ];
    if !clone_events.iter().any(|e| *e as i32 == event) {
        return Ok(None);
    }
    let message = ptrace::getevent(tid).map_err(|e| TargetError::from_errno(pid, "reading the clone event of", e))?;
    Ok(Some(Pid::from_raw(message as i32)))
}

/// What both call loops do with a stop that is not their call's own: keep
/// a foreign signal (the caller decides its fate), note the process a
/// clone event announces, fail when the thread is gone; pass over anything
/// else (a group-stop or an interrupt that got in first).
fn other_stop(
    pid: i32,
    tid: Pid,
    status: WaitStatus,
    cloned: &mut Option<Pid>,
    on_signal: &mut dyn FnMut(Signal),
) -> Result<(), TargetError> {
    match status {
        WaitStatus::Stopped(_, signal) => on_signal(signal),
        WaitStatus::PtraceEvent(_, _, event) => *cloned = cloned.or(cloned_by(pid, tid, event)?),
        WaitStatus::Exited(..) | WaitStatus::Signaled(..) => return Err(exited_in_call(pid)),
        _ => {}
    }
    Ok(())
}

fn exited_in_call(pid: i32) -> TargetError {
    TargetError::Exited {
        pid,
        during: "running a remote syscall",
    }
}

/// Write `bytes` at `address` in `pid` as the target itself could
/// (`process_vm_writev`); false unless every byte was written.
fn write_as_target(pid: i32, address: u64, bytes: &[u8]) -> bool {
    use nix::sys::uio::{process_vm_writev, RemoteIoVec};
    let local = [std::io::IoSlice::new(bytes)];
    let remote = [RemoteIoVec {
        base: address as usize,
        len: bytes.len(),
    }];
    process_vm_writev(Pid::from_raw(pid), &local, &remote).is_ok_and(|written| written == bytes.len())
}

/// Send the signals a borrowed thread met back to it. The call ends in an
/// interrupt stop, where a signal passed to PTRACE_CONT is ignored (the
/// stepped call ended in a signal-delivery stop and deferred them to the
/// resume instead); sent again, each is pending when the thread resumes
/// and is taken like any signal met while stopped, or delivered by the
/// kernel if we die first. As when a tracer injects a signal, the
/// original sender's siginfo is not kept.
fn requeue(pid: i32, tid: Pid, signals: &[Signal]) {
    for &signal in signals {
        if let Err(errno) = siginfo::tgkill(Pid::from_raw(pid), tid, signal) {
            tracing::warn!(pid, tid = tid.as_raw(), ?signal, %errno, "could not send a kept signal back");
        }
    }
}

/// One system call of [`Attached::remote_syscalls`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteCall {
    pub number: i64,
    pub args: [u64; 6],
    /// The result that lets the next call of the chain run (`None`: any).
    pub expect: Option<i64>,
}

impl RemoteCall {
    /// A call whose result, whatever it is, lets the next one run.
    pub fn new(number: i64, args: [u64; 6]) -> Self {
        RemoteCall {
            number,
            args,
            expect: None,
        }
    }

    /// A call after which the chain goes on only if it returned `result`.
    pub fn expecting(number: i64, args: [u64; 6], result: i64) -> Self {
        RemoteCall {
            number,
            args,
            expect: Some(result),
        }
    }

    /// Whether `result` lets the next call of the chain run.
    pub fn accepts(&self, result: i64) -> bool {
        self.expect.is_none_or(|expected| expected == result)
    }
}

/// Where a self-restoring call runs and returns through.
#[derive(Debug, Clone, Copy)]
struct ReturnPath {
    /// A `syscall; ret` sequence: the call.
    syscall_ret: u64,
    /// `__restore_rt`: the `ret` lands here and restores the thread.
    restore_rt: u64,
}

/// The names of the points of a self-restoring call where tests kill us
/// (`SHADOWPATCH_FAULT`), in order: frame written; call registers set;
/// the call's entry stop; the registers of a chain's next call set at the
/// exit stop of the one before; the last call's exit stop; the interrupt
/// stop before the registers are put back.
pub const REMOTE_CALL_POINTS: &[&str] = &[
    "remote-framed",
    "remote-borrowed",
    "remote-entered",
    "remote-chained",
    "remote-returned",
    "remote-trapped",
];

fn wait_any(pid: i32, tid: Pid) -> Result<WaitStatus, TargetError> {
    loop {
        match waitpid(tid, Some(WaitPidFlag::__WALL)) {
            Err(Errno::EINTR) => continue,
            other => return other.map_err(|e| TargetError::from_errno(pid, "waiting for", e)),
        }
    }
}

/// Resume `tid` (call registers set, at `syscall_ret`) under
/// PTRACE_SYSCALL until the exit stop of its call; `at_stop(true)` runs at
/// the entry stop. Foreign signals met on the way are suppressed and handed
/// to `on_signal` (the caller delivers them at resume).
fn run_to_exit_stop(
    pid: i32,
    tid: Pid,
    syscall_ret: u64,
    on_signal: &mut dyn FnMut(Signal),
    at_stop: &mut dyn FnMut(bool) -> Result<(), TargetError>,
) -> Result<SyscallRun, TargetError> {
    let mut cloned = None;
    let mut entered = false;
    for _ in 0..MAX_STEP_ATTEMPTS {
        ptrace::syscall(tid, None).map_err(|e| TargetError::from_errno(pid, "resuming (PTRACE_SYSCALL)", e))?;
        match wait_any(pid, tid)? {
            WaitStatus::PtraceSyscall(_) => {
                // The stop, the instruction pointer and the result in one
                // request; the registers only for a call to restart.
                let info = ptrace_ext::syscall_info(tid)
                    .map_err(|e| TargetError::from_errno(pid, "reading the syscall stop of", e))?;
                // Our call's stops are at the instruction after `syscall`.
                if info.instruction_pointer != syscall_ret + SYSCALL_INSTRUCTION.len() as u64 {
                    return Err(TargetError::Sys {
                        pid,
                        action: "running a remote syscall (a syscall stop elsewhere) in",
                        errno: Errno::EFAULT,
                    });
                }
                match info.stop {
                    ptrace_ext::SyscallStop::Entry => {
                        entered = true;
                        at_stop(true)?;
                    }
                    ptrace_ext::SyscallStop::Exit if entered => {
                        if RESTART_RESULTS.contains(&info.result) {
                            let regs = ptrace::getregs(tid)
                                .map_err(|e| TargetError::from_errno(pid, "reading registers of", e))?;
                            if let Some(again) = restart_registers(&regs, syscall_ret) {
                                ptrace::setregs(tid, again)
                                    .map_err(|e| TargetError::from_errno(pid, "writing registers of", e))?;
                                entered = false;
                                continue;
                            }
                        }
                        return Ok(SyscallRun {
                            result: info.result,
                            cloned,
                        });
                    }
                    _ => {}
                }
            }
            status => other_stop(pid, tid, status, &mut cloned, on_signal)?,
        }
    }
    Err(TargetError::Sys {
        pid,
        action: "running a remote syscall in",
        errno: Errno::EAGAIN,
    })
}

/// From a syscall stop, bring `tid` into an interrupt stop
/// (PTRACE_EVENT_STOP): the interrupt is taken in the kernel's signal path
/// on the way out, before any user instruction runs.
fn interrupt_stop(pid: i32, tid: Pid, on_signal: &mut dyn FnMut(Signal)) -> Result<(), TargetError> {
    for _ in 0..MAX_STEP_ATTEMPTS {
        ptrace::interrupt(tid).map_err(|e| TargetError::from_errno(pid, "interrupting", e))?;
        ptrace::cont(tid, None).map_err(|e| TargetError::from_errno(pid, "resuming", e))?;
        match wait_any(pid, tid)? {
            WaitStatus::PtraceEvent(_, _, event) if event == libc::PTRACE_EVENT_STOP => return Ok(()),
            WaitStatus::Stopped(_, signal) => on_signal(signal),
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => return Err(exited_in_call(pid)),
            _ => {}
        }
    }
    Err(TargetError::Sys {
        pid,
        action: "stopping a thread after a remote syscall in",
        errno: Errno::EAGAIN,
    })
}

/// Registers for a syscall at `instruction`, from a thread's `saved` ones.
pub(crate) fn syscall_registers(
    saved: libc::user_regs_struct,
    instruction: u64,
    number: i64,
    args: [u64; 6],
) -> libc::user_regs_struct {
    let mut call = saved;
    call.rip = instruction;
    call.rax = number as u64;
    // -1: "not in a syscall", so the kernel does not apply restart logic
    // meant for the thread's own interrupted call to our registers.
    call.orig_rax = u64::MAX;
    call.rdi = args[0];
    call.rsi = args[1];
    call.rdx = args[2];
    call.r10 = args[3];
    call.r8 = args[4];
    call.r9 = args[5];
    call
}

/// The copy's pids from a remote clone's run.
pub(crate) fn clone_result(pid: i32, run: SyscallRun) -> Result<(Pid, i64), TargetError> {
    if (-4095..0).contains(&run.result) {
        return Err(TargetError::Sys {
            pid,
            action: "remote clone in",
            errno: Errno::from_raw(-run.result as i32),
        });
    }
    let ours = run.cloned.ok_or(TargetError::Sys {
        pid,
        action: "remote clone (no clone event) in",
        errno: Errno::ECHILD,
    })?;
    Ok((ours, run.result))
}

/// Where in a file (path, inode) a needle was found: its offset in the
/// file, learnt from one process and tried first in the next one that maps
/// the same file (a host-wide apply seizes hundreds of processes mapping
/// the same libc, and searching it took most of a rollback's CPU).
type GadgetKey = (std::path::PathBuf, u64, Vec<u8>);
static GADGET_OFFSETS: std::sync::Mutex<BTreeMap<GadgetKey, u64>> = std::sync::Mutex::new(BTreeMap::new());

/// The key a gadget found in `mapping` is remembered under: its file, or
/// the vDSO (the kernel's, the same image in every process; searched
/// first, it held the gadgets and was searched again in every process).
fn gadget_key(mapping: &crate::maps::Mapping, needle: &[u8]) -> Option<GadgetKey> {
    match &mapping.kind {
        crate::maps::MappingKind::File(path) => Some((path.clone(), mapping.inode, needle.to_vec())),
        crate::maps::MappingKind::Special(name) if name == "[vdso]" => {
            Some((std::path::PathBuf::from(name), 0, needle.to_vec()))
        }
        _ => None,
    }
}

/// `needle` at the file offset another process had it, if this mapping
/// maps that offset and the bytes there are the needle (read back: a
/// cached offset is only a guess).
fn known_gadget(attached: &mut Attached, candidates: &[crate::maps::Mapping], needle: &[u8]) -> Option<u64> {
    for mapping in candidates {
        let Some(key) = gadget_key(mapping, needle) else {
            continue;
        };
        let Some(offset) = GADGET_OFFSETS
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .copied()
        else {
            continue;
        };
        if offset < mapping.offset || offset + needle.len() as u64 > mapping.offset + mapping.len() {
            continue;
        }
        let address = mapping.start + (offset - mapping.offset);
        if attached.memory().read_vec(address, needle.len()).ok().as_deref() == Some(needle) {
            return Some(address);
        }
    }
    None
}

/// First address of `needle` in an executable, read-only mapping of the
/// target, preferring the vDSO and libc (or where another process had it
/// in the same file).
fn find_bytes(attached: &mut Attached, needle: &[u8]) -> Result<Option<u64>, TargetError> {
    let candidates = gadget_candidates(attached.pid())?;
    find_bytes_in(attached, candidates, needle)
}

/// The mappings `find_bytes` searches: executable and read-only.
fn gadget_candidates(pid: i32) -> Result<Vec<crate::maps::Mapping>, TargetError> {
    Ok(read_maps(pid)?.into_iter().filter(is_gadget_candidate).collect())
}

fn is_gadget_candidate(mapping: &crate::maps::Mapping) -> bool {
    mapping.executable && mapping.readable && !mapping.writable
}

/// [`find_bytes`] in `candidates` (from [`gadget_candidates`]).
fn find_bytes_in(
    attached: &mut Attached,
    mut candidates: Vec<crate::maps::Mapping>,
    needle: &[u8],
) -> Result<Option<u64>, TargetError> {
    if let Some(address) = known_gadget(attached, &candidates, needle) {
        return Ok(Some(address));
    }
    // Prefer the vDSO and libc: always present, never patched by us.
    candidates.sort_by_key(|m| {
        let name = m.display_name();
        if name == "[vdso]" {
            0
        } else if name.starts_with("libc") {
            1
        } else {
            2
        }
    });
    let mut buffer = vec![0u8; 1 << 16];
    for mapping in candidates {
        let mut address = mapping.start;
        while address < mapping.end {
            let len = ((mapping.end - address) as usize).min(buffer.len());
            let n = match attached.memory().read_partial(address, &mut buffer[..len]) {
                Ok(n) if n >= needle.len() => n,
                _ => break,
            };
            if let Some(offset) = position_of(&buffer[..n], needle) {
                let found = address + offset as u64;
                if let Some(key) = gadget_key(&mapping, needle) {
                    GADGET_OFFSETS
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key, mapping.offset + (found - mapping.start));
                }
                return Ok(Some(found));
            }
            // Overlap so a sequence split across reads is found.
            address += (n - (needle.len() - 1)) as u64;
        }
    }
    Ok(None)
}

/// Where `needle` (not empty) first occurs in `haystack`: candidates found
/// by their first byte, then compared (a memcmp at every offset cost more
/// than the read).
fn position_of(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(skip) = haystack.get(from..)?.iter().position(|b| *b == needle[0]) {
        let at = from + skip;
        if haystack[at..].starts_with(needle) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

impl Attached {
    /// Address of a `syscall` instruction in one of the target's executable
    /// mappings (the vDSO or libc's text), found once and cached. Any pair of
    /// bytes `0f 05` works: the CPU decodes from wherever rip points.
    pub(crate) fn syscall_instruction(&mut self) -> Result<u64, TargetError> {
        if let Some(address) = self.syscall_instruction {
            return Ok(address);
        }
        let found =
            find_bytes(self, &SYSCALL_INSTRUCTION)?.ok_or(TargetError::NoSyscallInstruction { pid: self.pid() })?;
        self.syscall_instruction = Some(found);
        Ok(found)
    }
}

/// A thread to move out of `start..end` (see [`Stopped::step_out_of_many`]),
/// with the registers read in the current stop.
#[derive(Debug, Clone, Copy)]
pub struct StepOut {
    pub tid: Pid,
    pub regs: libc::user_regs_struct,
    pub start: u64,
    pub end: u64,
}

const LONGEST_INSTRUCTION: u64 = 15;
const PAGE: u64 = 4096;

/// The `len` bytes at `address` if one of the `known` ranges holds them
/// all.
fn known_code(known: &[(u64, &[u8])], address: u64, len: usize) -> Option<Vec<u8>> {
    known.iter().find_map(|&(start, bytes)| {
        let at = usize::try_from(address.checked_sub(start)?).ok()?;
        bytes.get(at..at.checked_add(len)?).map(<[u8]>::to_vec)
    })
}

/// Where `rip` lies in the tracee's `struct user` (its registers come
/// first), for `PTRACE_PEEKUSER` and `PTRACE_POKEUSER`.
pub(crate) const RIP_OFFSET: usize = std::mem::offset_of!(libc::user_regs_struct, rip);

/// What moves a thread out of its range: its registers after the
/// emulated instructions and the stack words they write, in order.
struct MovedOut {
    regs: libc::user_regs_struct,
    stores: Vec<(u64, u64)>,
    /// No instruction changed anything but the instruction pointer.
    rip_only: bool,
}

/// How `thread` leaves its range, emulated over `code` (read from its
/// instruction pointer on), or `None` when it cannot be moved: in a
/// system call, an instruction we do not emulate, still inside after
/// `max_steps`.
fn emulate_out(
    attached: &mut Attached,
    thread: &StepOut,
    mut code: Vec<u8>,
    max_steps: u32,
) -> Result<Option<MovedOut>, TargetError> {
    if thread.regs.orig_rax != u64::MAX {
        return Ok(None);
    }
    let inside = |rip: u64| (thread.start..thread.end).contains(&rip);
    let mut base = thread.regs.rip;
    let mut now = thread.regs;
    let mut stores = Vec::new();
    let mut rip_only = true;
    for _ in 0..max_steps {
        if !inside(now.rip) {
            break;
        }
        // A jump landing outside what was read, or an instruction that
        // may run past it: read from here (as far as it is mapped).
        if now.rip < base || now.rip - base + LONGEST_INSTRUCTION > code.len() as u64 {
            base = now.rip;
            code.resize(LONGEST_INSTRUCTION as usize, 0);
            let readable = attached.memory().read_partial(base, &mut code)?;
            code.truncate(readable);
        }
        let at = (now.rip - base) as usize;
        let Some(effect) = crate::emulate::emulate(&now, &code[at..]) else {
            return Ok(None);
        };
        stores.extend(effect.store);
        rip_only &= effect.rip_only;
        now = effect.regs;
    }
    Ok((!inside(now.rip)).then_some(MovedOut {
        regs: now,
        stores,
        rip_only,
    }))
}

#[cfg(test)]
mod tests {
    use super::{known_code, position_of};

    #[test]
    fn code_is_taken_from_a_known_range_only_when_it_holds_all_of_it() {
        let page = [0x90u8; 32];
        let known: [(u64, &[u8]); 2] = [(0x1000, &page[..20]), (0x2000, &page)];
        assert_eq!(known_code(&known, 0x1003, 17), Some(vec![0x90; 17]));
        assert_eq!(known_code(&known, 0x1003, 18), None, "runs past the first range");
        assert_eq!(known_code(&known, 0x0fff, 2), None, "starts before it");
        assert_eq!(known_code(&known, 0x2010, 16), Some(vec![0x90; 16]));
        assert_eq!(known_code(&[], 0x1000, 1), None);
    }

    #[test]
    fn needles_are_found_at_their_first_place() {
        assert_eq!(position_of(b"\x0f\x0f\x05\xc3", &[0x0f, 0x05, 0xc3]), Some(1));
        assert_eq!(position_of(b"ab", b"abc"), None);
        assert_eq!(position_of(b"xxab", b"ab"), Some(2));
        assert_eq!(position_of(b"", b"a"), None);
        assert_eq!(position_of(b"aaab", b"ab"), Some(2));
    }
}
