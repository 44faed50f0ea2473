//! `pidfd_open(2)` and `pidfd_getfd(2)` (Linux 5.3 / 5.6), which nix 0.30
//! does not wrap: used to take a file descriptor the target created (by a
//! remote syscall) into the tracer.

use nix::errno::Errno;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// A pidfd for process `pid` (close-on-exec, as the kernel always sets).
pub fn pidfd_open(pid: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes a pid and a flags integer (0) and returns a
    // new descriptor or -1 with errno; no memory is passed.
    let fd = Errno::result(unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) })?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else
    // owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Whether the process behind `pidfd` has not been reaped yet
/// (`pidfd_send_signal(2)` with signal 0, Linux 5.1): `Err(ESRCH)` once it
/// has. A zombie still counts, as for `kill(pid, 0)`; unlike that, a
/// recycled pid never does, since the pidfd names one process.
pub fn pidfd_alive(pidfd: BorrowedFd<'_>) -> Result<(), Errno> {
    // SAFETY: pidfd_send_signal takes a pidfd, a signal number (0: only
    // the permission and existence checks), a null siginfo and flags (0);
    // no memory is passed.
    Errno::result(unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    })
    .map(drop)
}

/// Duplicate descriptor `target_fd` of the process behind `pidfd` into our
/// own table (close-on-exec). Needs PTRACE_MODE_ATTACH_REALCREDS over that
/// process, which a tracer has.
pub fn pidfd_getfd(pidfd: BorrowedFd<'_>, target_fd: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_getfd takes a pidfd, a descriptor number and flags (0)
    // and returns a new descriptor or -1 with errno; no memory is passed.
    let fd = Errno::result(unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target_fd, 0) })?;
    // SAFETY: the kernel just installed this descriptor in our table for us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn takes_a_descriptor_of_our_own_process() {
        let file = std::fs::File::open("/proc/self/status").unwrap();
        let pidfd = pidfd_open(std::process::id() as i32).unwrap();
        let copy = pidfd_getfd(pidfd.as_fd(), file.as_raw_fd()).unwrap();
        assert_ne!(copy.as_raw_fd(), file.as_raw_fd());
        let link = |fd: i32| std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        assert_eq!(link(copy.as_raw_fd()), link(file.as_raw_fd()));
        assert_eq!(pidfd_getfd(pidfd.as_fd(), 1 << 20).unwrap_err(), Errno::EBADF);
    }

    #[test]
    fn a_reaped_child_is_no_longer_alive() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pidfd = pidfd_open(child.id() as i32).unwrap();
        pidfd_alive(pidfd.as_fd()).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(pidfd_alive(pidfd.as_fd()).unwrap_err(), Errno::ESRCH);
    }
}
