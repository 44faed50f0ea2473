//! ptrace requests missing from `nix`: `PTRACE_LISTEN`.

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
