//! ptrace requests missing from `nix` (`PTRACE_LISTEN`) or wrongly wrapped
//! there (`PTRACE_GET_SYSCALL_INFO`).

use nix::errno::Errno;
use nix::unistd::Pid;

/// Resume a seized tracee that is in group-stop without letting it run:
/// it stays stopped for the job-control state of its process but becomes
/// able to report further events (`PTRACE_LISTEN`). Used so that a process
/// stopped by SIGSTOP before we attached stays stopped after we leave.
pub fn listen(tid: Pid) -> Result<(), Errno> {
    // SAFETY: PTRACE_LISTEN takes no address or data pointer (both are
    // ignored by the kernel and passed as null); the call cannot touch our
    // memory and reports failure through the return value and errno.
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_LISTEN,
            tid.as_raw(),
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_void>(),
        )
    };
    Errno::result(rc).map(drop)
}

/// Where a tracee stopped for a syscall (PTRACE_GET_SYSCALL_INFO's `op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyscallStop {
    Entry,
    Exit,
    /// Not a syscall stop (or a seccomp stop).
    Other,
}

/// `PTRACE_GET_SYSCALL_INFO`: whether a tracee in a syscall stop is at the
/// entry or the exit. (nix's `syscall_info` passes a zero buffer size, so
/// the kernel copies nothing and its result is uninitialised memory.)
pub fn syscall_stop(tid: Pid) -> Result<SyscallStop, Errno> {
    let mut info = std::mem::MaybeUninit::<libc::ptrace_syscall_info>::zeroed();
    // SAFETY: the kernel writes at most `size` bytes (the structure's size)
    // into `info`, which we own and which outlives the call; the structure
    // is plain data, valid when zeroed, so reading `op` afterwards is sound
    // however much the kernel filled in.
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_GET_SYSCALL_INFO,
            tid.as_raw(),
            std::mem::size_of::<libc::ptrace_syscall_info>(),
            info.as_mut_ptr(),
        )
    };
    Errno::result(rc)?;
    // SAFETY: zero-initialised above and only ever written by the kernel
    // with a valid structure: every bit pattern of it is valid plain data.
    let info = unsafe { info.assume_init() };
    Ok(match info.op {
        libc::PTRACE_SYSCALL_INFO_ENTRY => SyscallStop::Entry,
        libc::PTRACE_SYSCALL_INFO_EXIT => SyscallStop::Exit,
        _ => SyscallStop::Other,
    })
}
