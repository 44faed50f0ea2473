//! A target's identity: pid plus start time, so that a recycled pid is never
//! mistaken for the process we mirrored or patched, plus a per-exec value,
//! because `exec` keeps pid and start time but replaces the whole program.
//!
//! The per-exec value is the 16 bytes the kernel puts at `AT_RANDOM` (see
//! /proc/PID/auxv) on every `execve`: fresh random bytes each time, even for
//! the same binary with the same arguments and ASLR off (where the auxv
//! addresses, `start_code` and `end_code` all stay the same). glibc only
//! reads them (stack protector and pointer guard seeds).

use crate::TargetError;

/// Thread flag marking kernel threads in /proc/PID/stat (PF_KTHREAD).
const PF_KTHREAD: u32 = 0x0020_0000;
/// The auxv key of the address of 16 random bytes (`<elf.h>`).
const AT_RANDOM: u64 = 25;
const AT_RANDOM_LEN: usize = 16;

/// pid + start time (clock ticks since boot, field 22 of /proc/PID/stat).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProcessIdentity {
    pub pid: i32,
    pub start_time: u64,
    /// `comm` at the time of identification (informational only).
    pub comm: String,
    /// The executable's path at the time of identification (informational).
    pub exe: Option<std::path::PathBuf>,
    /// Changes on every `exec` (hex of the `AT_RANDOM` bytes); `None` when
    /// it cannot be read (then only pid + start time are compared).
    pub exec_id: Option<String>,
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
            exec_id: exec_id_of(pid),
        })
    }

    /// Check that `self.pid` still names the same process (same start time)
    /// and that it is still alive.
    /// Whether the process is still this one: same start time, not a
    /// zombie, same program (exec id). Reads only what tells that (stat,
    /// and auxv + AT_RANDOM for the exec id), not the whole identity: a
    /// pid whose start time matches is the leader identified before, so
    /// status (its tgid) and the exe link need no second read. Called
    /// around every seize and memory open.
    pub fn check_alive(&self) -> Result<(), TargetError> {
        let pid = self.pid;
        let stat = procfs::process::Process::new(pid)
            .and_then(|process| process.stat())
            .map_err(|e| proc_error(pid, "stat", e))?;
        if stat.state == 'Z' || stat.state == 'X' {
            return Err(TargetError::Zombie { pid });
        }
        let live = ProcessIdentity {
            start_time: stat.starttime,
            exec_id: self.exec_id.as_ref().and_then(|_| exec_id_of(pid)),
            ..self.clone()
        };
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
        if let (Some(ours), Some(live_id)) = (&self.exec_id, &live.exec_id) {
            if ours != live_id {
                return Err(TargetError::Execd {
                    pid: self.pid,
                    since: "it was identified".into(),
                });
            }
        }
        Ok(())
    }
}

/// The parent of `pid` (/proc/PID/stat), `None` when it cannot be read or
/// the process has none (pid 1, processes the kernel started).
/// From one read of /proc/PID/stat: the parent's pid (0 when none) and the
/// start time of a live user process; `None` for a zombie, a kernel
/// thread or a pid that is gone. Enough to name a state directory without
/// reading the whole identity (status, auxv, mem).
pub fn parent_and_start_time(pid: i32) -> Option<(i32, u64)> {
    let stat = procfs::process::Process::new(pid).ok()?.stat().ok()?;
    if stat.flags & PF_KTHREAD != 0 || stat.state == 'Z' || stat.state == 'X' {
        return None;
    }
    Some((stat.ppid, stat.starttime))
}

pub fn parent_pid(pid: i32) -> Option<i32> {
    let stat = procfs::process::Process::new(pid).ok()?.stat().ok()?;
    (stat.ppid > 0).then_some(stat.ppid)
}

/// Clock ticks per second, the unit of a process's start time.
pub fn ticks_per_second() -> u64 {
    procfs::ticks_per_second()
}

/// The per-exec value of `pid`: its `AT_RANDOM` bytes, in hex.
pub fn exec_id_of(pid: i32) -> Option<String> {
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    // One read: the vector is about 400 bytes, and /proc reports size 0
    // (`fs::read` would grow its buffer from 32 bytes, a read each time).
    let mut auxv = Vec::with_capacity(1024);
    std::fs::File::open(format!("/proc/{pid}/auxv"))
        .ok()?
        .read_to_end(&mut auxv)
        .ok()?;
    let address = auxv.chunks_exact(16).find_map(|pair| {
        let key = u64::from_ne_bytes(pair[..8].try_into().ok()?);
        (key == AT_RANDOM).then(|| u64::from_ne_bytes(pair[8..].try_into().expect("8 bytes")))
    })?;
    let mut random = [0u8; AT_RANDOM_LEN];
    std::fs::File::open(format!("/proc/{pid}/mem"))
        .ok()?
        .read_exact_at(&mut random, address)
        .ok()?;
    Some(random.iter().map(|b| format!("{b:02x}")).collect())
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
    fn the_exec_id_is_stable_within_a_program_and_changes_on_exec() {
        let me = ProcessIdentity::of(std::process::id() as i32).unwrap();
        let id = me.exec_id.clone().expect("our own AT_RANDOM is readable");
        assert_eq!(id.len(), 2 * AT_RANDOM_LEN);
        assert_eq!(ProcessIdentity::of(me.pid).unwrap().exec_id, Some(id.clone()));
        let other = ProcessIdentity {
            exec_id: Some("00".repeat(AT_RANDOM_LEN)),
            ..me.clone()
        };
        assert!(matches!(other.check_alive(), Err(TargetError::Execd { .. })));
        // Identities without the value (state written before it existed)
        // compare as before.
        let legacy = ProcessIdentity { exec_id: None, ..me };
        legacy.check_alive().unwrap();
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
