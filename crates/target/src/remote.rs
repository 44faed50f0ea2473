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
        let attached = self.attached();
        let pid = attached.pid();
        if !attached.is_stopped(tid) {
            return Err(TargetError::ThreadNotStopped { pid, tid: tid.as_raw() });
        }
        let instruction = attached.syscall_instruction()?;
        let saved = ptrace::getregs(tid).map_err(|e| TargetError::from_errno(pid, "reading registers of", e))?;
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
        ptrace::setregs(tid, call).map_err(|e| TargetError::from_errno(pid, "writing registers of", e))?;
        let outcome = step_over_syscall(attached, tid, instruction);
        // Restore exactly, whatever happened (unless the thread is gone).
        let restored = ptrace::setregs(tid, saved);
        let result = outcome?;
        restored.map_err(|e| TargetError::from_errno(pid, "restoring registers of", e))?;
        Ok(result)
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
            match step_once(attached, tid)? {
                Step::Exited => return Ok(true),
                Step::Trapped | Step::OtherStop => {}
            }
            rip = ptrace::getregs(tid)
                .map_err(|e| TargetError::from_errno(pid, "reading registers of", e))?
                .rip;
        }
        Ok(!(start..end).contains(&rip))
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

fn check_result(pid: i32, action: &'static str, result: i64) -> Result<i64, TargetError> {
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
enum Step {
    /// A stop after the step (the trap itself, or a foreign signal's
    /// delivery stop, whose signal is deferred to the thread's resume).
    Trapped,
    /// A group-stop or interrupt came first: the step may not have run.
    OtherStop,
    /// The thread is gone (forgotten by `attached`).
    Exited,
}

/// Single-step `tid` once and wait for what happens.
fn step_once(attached: &mut Attached, tid: Pid) -> Result<Step, TargetError> {
    let pid = attached.pid();
    ptrace::step(tid, None).map_err(|e| TargetError::from_errno(pid, "single-stepping", e))?;
    let status = loop {
        match waitpid(tid, Some(WaitPidFlag::__WALL)) {
            Err(Errno::EINTR) => continue,
            other => break other.map_err(|e| TargetError::from_errno(pid, "waiting for", e))?,
        }
    };
    Ok(match status {
        WaitStatus::Stopped(_, signal) => {
            if signal != Signal::SIGTRAP {
                // Someone else's signal: keep it for the thread's resume.
                attached.defer_signal(tid, signal);
            }
            Step::Trapped
        }
        WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
            attached.forget_thread(tid);
            Step::Exited
        }
        _ => Step::OtherStop,
    })
}

/// Single-step `tid` until it has executed the `syscall` at `instruction`;
/// returns `rax`. Foreign signals met on the way are deferred to resume.
fn step_over_syscall(attached: &mut Attached, tid: Pid, instruction: u64) -> Result<i64, TargetError> {
    let pid = attached.pid();
    for _ in 0..MAX_STEP_ATTEMPTS {
        match step_once(attached, tid)? {
            Step::Trapped => {
                let regs = ptrace::getregs(tid).map_err(|e| TargetError::from_errno(pid, "reading registers of", e))?;
                if regs.rip == instruction + SYSCALL_INSTRUCTION.len() as u64 {
                    return Ok(regs.rax as i64);
                }
                if regs.rip != instruction {
                    return Err(TargetError::Sys {
                        pid,
                        action: "stepping a remote syscall in",
                        errno: Errno::EFAULT,
                    });
                }
            }
            Step::Exited => {
                return Err(TargetError::Exited {
                    pid,
                    during: "running a remote syscall",
                })
            }
            // A group-stop or another interrupt got in first: step again.
            Step::OtherStop => {}
        }
    }
    Err(TargetError::Sys {
        pid,
        action: "stepping a remote syscall in",
        errno: Errno::EAGAIN,
    })
}

impl Attached {
    /// Address of a `syscall` instruction in one of the target's executable
    /// mappings (the vDSO or libc's text), found once and cached. Any pair of
    /// bytes `0f 05` works: the CPU decodes from wherever rip points.
    pub(crate) fn syscall_instruction(&mut self) -> Result<u64, TargetError> {
        if let Some(address) = self.syscall_instruction {
            return Ok(address);
        }
        let pid = self.pid();
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
                let n = match self.memory().read_partial(address, &mut buffer[..len]) {
                    Ok(n) if n >= 2 => n,
                    _ => break,
                };
                if let Some(offset) = buffer[..n].windows(2).position(|w| w == SYSCALL_INSTRUCTION) {
                    let found = address + offset as u64;
                    self.syscall_instruction = Some(found);
                    return Ok(found);
                }
                // Overlap by one byte so a pair split across reads is found.
                address += n as u64 - 1;
            }
        }
        Err(TargetError::NoSyscallInstruction { pid })
    }
}
