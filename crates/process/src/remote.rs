//! Running a system call inside a stopped target by borrowing one thread.
//!
//! The thread's registers are saved, pointed at a `syscall` instruction found
//! in the target's own code with the syscall number and arguments loaded, and
//! single-stepped over it; then the saved registers are restored exactly.
//!
//! Interrupted system calls: a thread stopped while blocked in `read`,
//! `nanosleep` or `futex` sits in the kernel's signal path with
//! `rax = -ERESTART*` and `orig_rax = its syscall`. We set `orig_rax = -1`
//! while borrowing it so the kernel's restart logic leaves our registers
//! alone, and restore the original pair afterwards: when the thread resumes,
//! the kernel restarts (or fails with EINTR) its own call exactly as it
//! would have without us.
//!
//! The same machinery runs a remote `clone` that makes a copy of the target
//! (see `copy`), and the `wait4` that reaps dead copies inside the target.

use crate::attach::{Attached, Stopped};
use crate::maps::read_maps;
use crate::TargetError;
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use shadowpatch_sys::pidfd;
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

    /// Single-step thread `tid` (the others stay stopped) until its
    /// instruction pointer is outside `start..end`, at most `max_steps`
    /// instructions. Used to move a thread out of bytes about to be
    /// rewritten instead of waiting for the scheduler to do it. Returns
    /// false, having done nothing, when the thread sits in a system call
    /// (stepping would wait for the call to return).
    pub fn step_out_of(&mut self, tid: Pid, start: u64, end: u64, max_steps: u32) -> Result<bool, TargetError> {
        let attached = self.attached();
        let pid = attached.pid();
        if !attached.is_stopped(tid) {
            return Err(TargetError::ThreadNotStopped { pid, tid: tid.as_raw() });
        }
        let regs = ptrace::getregs(tid).map_err(|e| TargetError::from_errno(pid, "reading registers of", e))?;
        if regs.orig_rax != u64::MAX {
            return Ok(false);
        }
        let mut rip = regs.rip;
        for _ in 0..max_steps {
            if !(start..end).contains(&rip) {
                return Ok(true);
            }
            match attached.step_held(tid)? {
                Step::Exited => return Ok(true),
                Step::Trapped | Step::OtherStop | Step::Signal(_) => {}
            }
            rip = ptrace::getregs(tid)
                .map_err(|e| TargetError::from_errno(pid, "reading registers of", e))?
                .rip;
        }
        Ok(!(start..end).contains(&rip))
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
            // Someone else's signal: the caller keeps it for later.
            WaitStatus::Stopped(_, signal) => on_signal(signal),
            WaitStatus::PtraceEvent(_, _, event)
                if event == nix::sys::ptrace::Event::PTRACE_EVENT_CLONE as i32
                    || event == nix::sys::ptrace::Event::PTRACE_EVENT_FORK as i32
                    || event == nix::sys::ptrace::Event::PTRACE_EVENT_VFORK as i32 =>
            {
                // Stopped before returning from the clone: the next step
                // completes it.
                let message =
                    ptrace::getevent(tid).map_err(|e| TargetError::from_errno(pid, "reading the clone event of", e))?;
                cloned = Some(Pid::from_raw(message as i32));
            }
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                return Err(TargetError::Exited {
                    pid,
                    during: "running a remote syscall",
                })
            }
            // A group-stop or another interrupt got in first: step again.
            _ => {}
        }
    }
    Err(TargetError::Sys {
        pid,
        action: "stepping a remote syscall in",
        errno: Errno::EAGAIN,
    })
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
    /// event while the others run); returns the raw result.
    pub fn remote_syscall(&mut self, tid: Pid, number: i64, args: [u64; 6]) -> Result<i64, TargetError> {
        let pid = self.pid();
        if !self.is_stopped(tid) {
            return Err(TargetError::ThreadNotStopped { pid, tid: tid.as_raw() });
        }
        let instruction = self.syscall_instruction()?;
        let saved = ptrace::getregs(tid).map_err(|e| TargetError::from_errno(pid, "reading registers of", e))?;
        let call = syscall_registers(saved, instruction, number, args);
        let mut deferred = None;
        let run = run_syscall(pid, tid, saved, call, &mut |signal| {
            deferred.get_or_insert(signal);
        });
        if let Some(signal) = deferred {
            self.defer_signal(tid, signal);
        }
        match run {
            Ok(run) => Ok(run.result),
            Err(TargetError::Exited { .. }) => {
                self.forget_thread(tid);
                Err(TargetError::Exited {
                    pid,
                    during: "running a remote syscall",
                })
            }
            Err(error) => Err(error),
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
            return Err(TargetError::ThreadNotStopped { pid, tid: tid.as_raw() });
        }
        let instruction = self.syscall_return_gadget()?;
        let options = self.options;
        let with_clone = options | ptrace::Options::PTRACE_O_TRACECLONE;
        if with_clone != options {
            ptrace::setoptions(tid, with_clone)
                .map_err(|e| TargetError::from_errno(pid, "setting ptrace options of", e))?;
        }
        let saved = ptrace::getregs(tid).map_err(|e| TargetError::from_errno(pid, "reading registers of", e))?;
        let mut call = syscall_registers(saved, instruction, libc::SYS_clone, [COPY_CLONE_FLAGS, 0, 0, 0, 0, 0]);
        call.rsp = CLONE_STACK_TRAP;
        let mut deferred = None;
        let run = run_syscall(pid, tid, saved, call, &mut |signal| {
            deferred.get_or_insert(signal);
        });
        if let Some(signal) = deferred {
            self.defer_signal(tid, signal);
        }
        if with_clone != options {
            let _ = ptrace::setoptions(tid, options);
        }
        let run = run?;
        clone_result(pid, run)
    }

    /// Find the instructions remote syscalls and clones borrow, now rather
    /// than in the first one's pause (the search reads memory).
    pub fn prepare_remote_calls(&mut self) -> Result<(), TargetError> {
        self.syscall_instruction()?;
        self.syscall_return_gadget()?;
        Ok(())
    }

    /// Single-step a thread in a ptrace-stop of ours, keeping a foreign
    /// signal met on the way for its resume.
    pub(crate) fn step_held(&mut self, tid: Pid) -> Result<Step, TargetError> {
        let pid = self.pid();
        let step = single_step(tid).map_err(|e| TargetError::from_errno(pid, "single-stepping", e))?;
        match step {
            Step::Signal(signal) => self.defer_signal(tid, signal),
            Step::Exited => self.forget_thread(tid),
            Step::Trapped | Step::OtherStop => {}
        }
        Ok(step)
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

/// First address of `needle` in an executable, read-only mapping of the
/// target, preferring the vDSO and libc.
fn find_bytes(attached: &mut Attached, needle: &[u8]) -> Result<Option<u64>, TargetError> {
    let pid = attached.pid();
    let mut candidates: Vec<_> = read_maps(pid)?
        .into_iter()
        .filter(|m| m.executable && m.readable && !m.writable)
        .collect();
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
            if let Some(offset) = buffer[..n].windows(needle.len()).position(|w| w == needle) {
                return Ok(Some(address + offset as u64));
            }
            // Overlap so a sequence split across reads is found.
            address += (n - (needle.len() - 1)) as u64;
        }
    }
    Ok(None)
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
