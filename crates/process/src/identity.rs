//! A target's identity: pid plus start time, so that a recycled pid is never
//! mistaken for the process we mirrored or patched.

use crate::TargetError;

/// Thread flag marking kernel threads in /proc/PID/stat (PF_KTHREAD).
const PF_KTHREAD: u32 = 0x0020_0000;

/// pid + start time (clock ticks since boot, field 22 of /proc/PID/stat).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProcessIdentity {
    pub pid: i32,
    pub start_time: u64,
    /// `comm` at the time of identification (informational only).
    pub comm: String,
    /// The executable's path at the time of identification (informational).
    pub exe: Option<std::path::PathBuf>,
}

impl ProcessIdentity {
    /// Identify a live user process, refusing zombies, kernel threads and
    /// thread ids that are not the thread-group leader.
    pub fn of(pid: i32) -> Result<Self, TargetError> {
        if pid <= 0 {
            return Err(TargetError::NoSuchProcess { pid });
        }
        let process = procfs::process::Process::new(pid).map_err(|e| proc_error(pid, "stat", e))?;
        let stat = process.stat().map_err(|e| proc_error(pid, "stat", e))?;
        if stat.flags & PF_KTHREAD != 0 {
            return Err(TargetError::KernelThread { pid, comm: stat.comm });
        }
        if stat.state == 'Z' || stat.state == 'X' {
            return Err(TargetError::Zombie { pid });
        }
        let status = process.status().map_err(|e| proc_error(pid, "status", e))?;
        if status.tgid != pid {
            return Err(TargetError::NotThreadGroupLeader { pid, tgid: status.tgid });
        }
        Ok(ProcessIdentity {
            pid,
            start_time: stat.starttime,
            comm: stat.comm,
            exe: process.exe().ok(),
        })
    }

    /// Check that `self.pid` still names the same process (same start time)
    /// and that it is still alive.
    pub fn check_alive(&self) -> Result<(), TargetError> {
        let live = ProcessIdentity::of(self.pid)?;
        self.check_same(&live)
    }

    /// Compare against another identity taken of the same pid.
    pub fn check_same(&self, live: &ProcessIdentity) -> Result<(), TargetError> {
        if live.start_time != self.start_time {
            return Err(TargetError::Recycled {
                pid: self.pid,
                expected_start_time: self.start_time,
                live_start_time: live.start_time,
            });
        }
        Ok(())
    }
}

pub(crate) fn proc_error(pid: i32, file: &'static str, error: procfs::ProcError) -> TargetError {
    match error {
        procfs::ProcError::NotFound(_) => TargetError::NoSuchProcess { pid },
        procfs::ProcError::PermissionDenied(_) => TargetError::PermissionDenied {
            pid,
            action: "reading /proc of",
        },
        other => TargetError::Proc {
            pid,
            file,
            message: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifies_self_and_detects_a_different_start_time() {
        let me = ProcessIdentity::of(std::process::id() as i32).unwrap();
        me.check_alive().unwrap();
        let other = ProcessIdentity {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        assert!(matches!(other.check_alive(), Err(TargetError::Recycled { .. })));
    }

    #[test]
    fn refuses_kernel_threads_and_missing_pids() {
        // kthreadd is pid 2 on every Linux system with a kernel thread tree.
        assert!(matches!(ProcessIdentity::of(2), Err(TargetError::KernelThread { .. })));
        assert!(matches!(ProcessIdentity::of(0), Err(TargetError::NoSuchProcess { .. })));
        assert!(matches!(
            ProcessIdentity::of(i32::MAX),
            Err(TargetError::NoSuchProcess { .. })
        ));
    }
}
