//! Fields of `siginfo_t` that libc exposes only through unsafe union accessors.

/// `si_addr` of a fault signal (SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP):
/// the faulting address, or the instruction for SIGILL/SIGFPE.
pub fn fault_address(info: &libc::siginfo_t) -> u64 {
    // SAFETY: `si_addr` reads the first word of the siginfo union, which
    // for every signal is plain data inside the 128-byte structure we hold
    // a reference to; for the fault signals it is the address the kernel
    // stored, for others an unrelated but initialised value.
    unsafe { info.si_addr() as u64 }
}
