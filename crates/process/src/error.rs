//! Errors of every operation on a target, each naming the pid and what failed.

use nix::errno::Errno;
use shadowpatch_failure::{Classify, FailureClass};

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("no process with pid {pid} (it does not exist or has exited)")]
    NoSuchProcess { pid: i32 },
    #[error("pid {pid} is a zombie: it has exited and has no memory left to attach to")]
    Zombie { pid: i32 },
    #[error("pid {pid} ({comm}) is a kernel thread: it has no user address space")]
    KernelThread { pid: i32, comm: String },
    #[error("pid {pid} is a thread of process {tgid}: pass the process id {tgid}")]
    NotThreadGroupLeader { pid: i32, tgid: i32 },
    #[error(
        "pid {pid} is not the process we attached to: it started at tick {expected_start_time} \
         but the live pid {pid} started at tick {live_start_time} (the pid was recycled)"
    )]
    Recycled {
        pid: i32,
        expected_start_time: u64,
        live_start_time: u64,
    },
    #[error("pid {pid} exec'd a new program since {since}; its state is that of a dead target")]
    Execd { pid: i32, since: String },
    #[error(
        "permission denied {action} pid {pid}: run as root or grant CAP_SYS_PTRACE, \
         and check /proc/sys/kernel/yama/ptrace_scope"
    )]
    PermissionDenied { pid: i32, action: &'static str },
    #[error("{action} pid {pid}: {errno}")]
    Sys {
        pid: i32,
        action: &'static str,
        errno: Errno,
    },
    #[error("reading /proc/{pid}/{file}: {message}")]
    Proc {
        pid: i32,
        file: &'static str,
        message: String,
    },
    #[error("pid {pid} exited while {during}")]
    Exited { pid: i32, during: &'static str },
    #[error("reading {len} bytes at {address:#x} in pid {pid}: {errno}")]
    Read {
        pid: i32,
        address: u64,
        len: usize,
        errno: Errno,
    },
    #[error("writing {len} bytes at {address:#x} in pid {pid}: {errno}")]
    Write {
        pid: i32,
        address: u64,
        len: usize,
        errno: Errno,
    },
    #[error("pid {pid}: no `syscall` instruction found in any executable mapping")]
    NoSyscallInstruction { pid: i32 },
    #[error("thread {tid} of pid {pid} is not stopped by us")]
    ThreadNotStopped { pid: i32, tid: i32 },
    #[error(
        "pid {pid} is stopped by job control (SIGSTOP or SIGTSTP), so none of its threads can run {action}: \
         nothing was changed and it is left stopped; send it SIGCONT (kill -CONT {pid}) and retry"
    )]
    JobControlStopped { pid: i32, action: &'static str },
}

impl TargetError {
    /// Map an errno from a ptrace or /proc operation, turning EPERM/EACCES
    /// into the privilege hint and ESRCH into "no such process".
    pub fn from_errno(pid: i32, action: &'static str, errno: Errno) -> Self {
        match errno {
            Errno::EPERM | Errno::EACCES => TargetError::PermissionDenied { pid, action },
            Errno::ESRCH => TargetError::NoSuchProcess { pid },
            errno => TargetError::Sys { pid, action, errno },
        }
    }

    /// True for errors caused by the caller's input (bad pid, no permission,
    /// wrong process) rather than by a failure midway (see [`Classify`]).
    pub fn is_bad_input(&self) -> bool {
        self.class() == FailureClass::BadInput
    }
}

impl Classify for TargetError {
    fn class(&self) -> FailureClass {
        match self {
            TargetError::NoSuchProcess { .. }
            | TargetError::Zombie { .. }
            | TargetError::KernelThread { .. }
            | TargetError::NotThreadGroupLeader { .. }
            | TargetError::Recycled { .. }
            | TargetError::Execd { .. }
            | TargetError::PermissionDenied { .. } => FailureClass::BadInput,
            TargetError::JobControlStopped { .. } => FailureClass::RefusedForSafety,
            _ => FailureClass::FailedMidway,
        }
    }
}
