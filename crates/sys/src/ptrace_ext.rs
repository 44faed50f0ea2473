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

/// What `PTRACE_GET_SYSCALL_INFO` says of a tracee's syscall stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyscallInfo {
    pub stop: SyscallStop,
    /// The user instruction pointer (after the `syscall` instruction).
    pub instruction_pointer: u64,
    /// At an exit stop, the call's raw result (a negative errno on
    /// failure); 0 at any other stop.
    pub result: i64,
}

/// `PTRACE_GET_SYSCALL_INFO`: whether a tracee in a syscall stop is at the
/// entry or the exit. (nix's `syscall_info` passes a zero buffer size, so
/// the kernel copies nothing and its result is uninitialised memory.)
pub fn syscall_stop(tid: Pid) -> Result<SyscallStop, Errno> {
    syscall_info(tid).map(|info| info.stop)
}

/// `PTRACE_GET_SYSCALL_INFO` in full: the stop, the instruction pointer
/// and, at an exit, the result. One request where `PTRACE_GETREGS` would
/// be a second (a remote call reads both at each of its stops).
pub fn syscall_info(tid: Pid) -> Result<SyscallInfo, Errno> {
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
    let stop = match info.op {
        libc::PTRACE_SYSCALL_INFO_ENTRY => SyscallStop::Entry,
        libc::PTRACE_SYSCALL_INFO_EXIT => SyscallStop::Exit,
        _ => SyscallStop::Other,
    };
    let result = match stop {
        // SAFETY: `op` says the kernel filled the union's `exit` member;
        // its fields are plain integers, valid for any bit pattern.
        SyscallStop::Exit => unsafe { info.u.exit.sval },
        _ => 0,
    };
    Ok(SyscallInfo {
        stop,
        instruction_pointer: info.instruction_pointer,
        result,
    })
}

/// `NT_X86_XSTATE`: the XSAVE-layout extended register state regset.
pub const NT_X86_XSTATE: libc::c_int = 0x202;
/// `NT_PRFPREG`: the 512-byte FXSAVE-layout x87/SSE regset.
pub const NT_PRFPREG: libc::c_int = 2;

/// The raw bytes of regset `note` of a stopped tracee (`PTRACE_GETREGSET`),
/// as many as the kernel filled in (at most 64 KiB: AMX-era XSAVE areas are
/// about 11 KiB).
pub fn regset_bytes(tid: Pid, note: libc::c_int) -> Result<Vec<u8>, Errno> {
    // Not zeroed: the kernel fills what it reports and only that is kept
    // (zeroing 64 KiB for the ~3 KiB an XSAVE area takes was the larger
    // part of the request's cost).
    let mut buffer: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut iov = libc::iovec {
        iov_base: buffer.as_mut_ptr().cast(),
        iov_len: buffer.capacity(),
    };
    // SAFETY: `iov` describes `buffer`'s allocation, which we own and which
    // outlives the call; the kernel writes at most `iov_len` bytes into it
    // and updates `iov_len` (a field of our own `iov`) to the number written.
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            tid.as_raw(),
            note as usize as *mut libc::c_void,
            std::ptr::addr_of_mut!(iov).cast::<libc::c_void>(),
        )
    };
    Errno::result(rc)?;
    let written = iov.iov_len.min(buffer.capacity());
    // SAFETY: the kernel initialised the first `iov_len` bytes of the
    // allocation (never more than the capacity it was given, bounded again
    // here); a `u8` has no invalid bit patterns.
    unsafe { buffer.set_len(written) };
    Ok(buffer)
}

/// A stopped tracee's blocked-signal mask (`PTRACE_GETSIGMASK`), bit
/// `n - 1` for signal `n`.
pub fn sigmask(tid: Pid) -> Result<u64, Errno> {
    let mut mask: u64 = 0;
    // SAFETY: the kernel writes exactly `size_of::<u64>()` bytes (the size
    // we pass, the kernel's sigset size on x86_64) into `mask`, a local that
    // outlives the call.
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_GETSIGMASK,
            tid.as_raw(),
            std::mem::size_of::<u64>() as *mut libc::c_void,
            std::ptr::addr_of_mut!(mask).cast::<libc::c_void>(),
        )
    };
    Errno::result(rc)?;
    Ok(mask)
}
