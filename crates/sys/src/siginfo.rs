//! Fields of `siginfo_t` that libc exposes only through unsafe union
//! accessors, and sending a signal to one thread.

/// `si_addr` of a fault signal (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP):
/// the faulting address, or the instruction for SIGILL/SIGFPE.
pub fn fault_address(info: &libc::siginfo_t) -> u64 {
    // SAFETY: `si_addr` reads the first word of the siginfo union, which
    // for every signal is plain data inside the 128-byte structure we hold
    // a reference to; for the fault signals it is the address the kernel
    // stored, for others an unrelated but initialised value.
    unsafe { info.si_addr() as u64 }
}

/// `si_pid` of a signal sent by a process (`si_code` SI_USER, SI_TKILL,
/// SI_QUEUE): the sender's pid in the receiver's pid namespace.
pub fn sender_pid(info: &libc::siginfo_t) -> i32 {
    // SAFETY: `si_pid` reads the first 32-bit word of the siginfo union,
    // initialised plain data inside the structure we hold a reference to;
    // for signals sent by a process it is the sender's pid.
    unsafe { info.si_pid() }
}

/// Send `signal` to thread `tid` of process `pid` (`tgkill`): a signal
/// kept from a thread while it was borrowed goes back to that thread.
pub fn tgkill(
    pid: nix::unistd::Pid,
    tid: nix::unistd::Pid,
    signal: nix::sys::signal::Signal,
) -> Result<(), nix::errno::Errno> {
    // SAFETY: tgkill takes three integers and touches no memory of ours;
    // failure is reported through the return value and errno.
    let rc = unsafe { libc::tgkill(pid.as_raw(), tid.as_raw(), signal as libc::c_int) };
    nix::errno::Errno::result(rc).map(drop)
}
