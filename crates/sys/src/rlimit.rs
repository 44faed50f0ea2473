//! Another process's resource limits with `prlimit(2)` (nix wraps only
//! the caller's own `getrlimit`): one system call instead of reading and
//! parsing the sixteen lines of /proc/PID/limits, which a host-wide apply
//! did once per process for the one limit its context looks at.

use nix::errno::Errno;

/// The soft `RLIMIT_NOFILE` of process `pid`; `None` when unlimited.
/// Needs the permission `prlimit` asks for (the same user, or
/// `CAP_SYS_RESOURCE`): callers fall back to /proc/PID/limits.
pub fn open_files_soft_limit(pid: i32) -> Result<Option<u64>, Errno> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit reads no new limit (null) and writes the old one
    // into `old`, a live, properly aligned `rlimit` owned by this frame.
    Errno::result(unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) })?;
    Ok((old.rlim_cur != libc::RLIM_INFINITY).then_some(old.rlim_cur))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_same_limit_as_proc() {
        let ours = open_files_soft_limit(std::process::id() as i32).unwrap();
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
        let soft = line.split_whitespace().nth(3).unwrap();
        assert_eq!(ours.map_or("unlimited".to_string(), |n| n.to_string()), soft);
        assert_eq!(open_files_soft_limit(i32::MAX).unwrap_err(), Errno::ESRCH);
    }
}
