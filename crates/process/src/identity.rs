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
    /// What makes [`check_alive`](Self::check_alive) cheap, when asked
    /// for ([`of_probed`](Self::of_probed)); not part of the identity.
    pub probe: Probe,
}

/// A pidfd of the identified process and where its `AT_RANDOM` bytes are.
/// Then "still this process, alive, same program" is two system calls
/// (read those 16 bytes, then ask the pidfd whether the process was
/// reaped), not two /proc files opened and parsed: the pidfd alive after
/// the read means the pid named this very process at the read (a pid is
/// recycled only once its process is reaped), and the same random bytes
/// mean no exec since. A host-wide apply checks each member about ten
/// times. Held only for the length of one operation: a descriptor each.
#[derive(Debug, Clone, Default)]
pub struct Probe(Option<std::sync::Arc<ProbeFd>>);

#[derive(Debug)]
pub struct ProbeFd {
    pidfd: std::os::fd::OwnedFd,
    /// The identity probed, as it was: a copy of it changed by hand (a
    /// test's other start time or exec id) is not vouched for.
    start_time: u64,
    exec_id: String,
    at_random: u64,
    random: [u8; AT_RANDOM_LEN],
}

/// Identities are equal whether probed or not.
impl PartialEq for Probe {
    fn eq(&self, _: &Probe) -> bool {
        true
    }
}
impl Eq for Probe {}
impl std::hash::Hash for Probe {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

impl ProcessIdentity {
    /// Identify a live user process, refusing zombies, kernel threads and
    /// thread ids that are not the thread-group leader.
    pub fn of(pid: i32) -> Result<Self, TargetError> {
        Self::identify(pid, None)
    }

    /// [`of`](Self::of), with a [`Probe`] for cheap checks of it while an
    /// operation on it lasts (without one when the pidfd cannot be had).
    pub fn of_probed(pid: i32) -> Result<Self, TargetError> {
        // The pidfd first: alive after the reads below, the process it
        // names is the one they read.
        let pidfd = if pid > 0 {
            shadowpatch_sys::pidfd::pidfd_open(pid).ok()
        } else {
            None
        };
        Self::identify(pid, pidfd)
    }

    fn identify(pid: i32, pidfd: Option<std::os::fd::OwnedFd>) -> Result<Self, TargetError> {
        if pid <= 0 {
            return Err(TargetError::NoSuchProcess { pid });
        }
        let stat = read_stat(pid)?;
        if stat.flags & PF_KTHREAD != 0 {
            return Err(TargetError::KernelThread { pid, comm: stat.comm });
        }
        if stat.state == 'Z' || stat.state == 'X' {
            return Err(TargetError::Zombie { pid });
        }
        let tgid = read_tgid(pid)?;
        if tgid != pid {
            return Err(TargetError::NotThreadGroupLeader { pid, tgid });
        }
        let random = at_random_of(pid);
        let exec_id = random.map(|(_, random)| hex(&random));
        let probe = match (pidfd, random, &exec_id) {
            (Some(pidfd), Some((at_random, random)), Some(exec_id))
                if shadowpatch_sys::pidfd::pidfd_alive(std::os::fd::AsFd::as_fd(&pidfd)).is_ok() =>
            {
                Probe(Some(std::sync::Arc::new(ProbeFd {
                    pidfd,
                    start_time: stat.starttime,
                    exec_id: exec_id.clone(),
                    at_random,
                    random,
                })))
            }
            _ => Probe::default(),
        };
        Ok(ProcessIdentity {
            pid,
            start_time: stat.starttime,
            comm: stat.comm,
            exe: std::fs::read_link(format!("/proc/{pid}/exe")).ok(),
            exec_id,
            probe,
        })
    }

    /// Whether the probe (if any) says this is still the live process
    /// identified, not exec'd since: `false` means "ask /proc".
    fn probe_says_same(&self) -> bool {
        let Some(probe) = &self.probe.0 else {
            return false;
        };
        probe.start_time == self.start_time
            && self.exec_id.as_ref() == Some(&probe.exec_id)
            && read_random(self.pid, probe.at_random) == Some(probe.random)
            && shadowpatch_sys::pidfd::pidfd_alive(std::os::fd::AsFd::as_fd(&probe.pidfd)).is_ok()
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
        // A zombie has no memory to read: it takes the path below, which
        // names it.
        if self.probe_says_same() {
            return Ok(());
        }
        let pid = self.pid;
        let stat = read_stat(pid)?;
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
    let stat = read_stat(pid).ok()?;
    if stat.flags & PF_KTHREAD != 0 || stat.state == 'Z' || stat.state == 'X' {
        return None;
    }
    Some((stat.ppid, stat.starttime))
}

pub fn parent_pid(pid: i32) -> Option<i32> {
    let stat = read_stat(pid).ok()?;
    (stat.ppid > 0).then_some(stat.ppid)
}

/// The fields of /proc/PID/stat an identity (and a process tree) needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatFields {
    pub comm: String,
    pub state: char,
    pub ppid: i32,
    pub flags: u32,
    pub starttime: u64,
}

/// /proc/PID/stat, read with one open and one read and parsed by hand.
/// Not through `procfs` (used elsewhere), which opens the /proc/PID
/// directory first, stats and seeks the file and parses all 52 fields: an
/// identity is read or checked about a dozen times per member of a
/// host-wide apply, and those reads were a tenth of its CPU.
fn read_stat(pid: i32) -> Result<StatFields, TargetError> {
    let text = read_proc(pid, "stat", 512)?;
    parse_stat(&text).ok_or_else(|| TargetError::Proc {
        pid,
        file: "stat",
        message: format!("unexpected contents {:?}", text.trim_end()),
    })
}

/// The fields of a /proc/PID/stat line. `comm` may hold spaces and
/// parentheses: it ends at the last ')'.
pub fn parse_stat(text: &str) -> Option<StatFields> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    // Field 3 (state) onwards: field N is at index N - 3.
    let fields: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    Some(StatFields {
        comm,
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        flags: fields.get(6)?.parse().ok()?,
        starttime: fields.get(19)?.parse().ok()?,
    })
}

/// The thread-group id of `pid`, from the `Tgid:` line of its status.
fn read_tgid(pid: i32) -> Result<i32, TargetError> {
    let text = read_proc(pid, "status", 2048)?;
    text.lines()
        .find_map(|line| line.strip_prefix("Tgid:"))
        .and_then(|tgid| tgid.trim().parse().ok())
        .ok_or_else(|| TargetError::Proc {
            pid,
            file: "status",
            message: "no Tgid line".into(),
        })
}

/// /proc/PID/`file` in one read (they are generated whole on the first
/// read), with the errors `procfs` would give.
fn read_proc(pid: i32, file: &'static str, capacity: usize) -> Result<String, TargetError> {
    std::fs::File::open(format!("/proc/{pid}/{file}"))
        .and_then(|f| read_small(&f, capacity))
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => TargetError::NoSuchProcess { pid },
            // A process that exited between the open and the read.
            _ if e.raw_os_error() == Some(libc::ESRCH) => TargetError::NoSuchProcess { pid },
            std::io::ErrorKind::PermissionDenied => TargetError::PermissionDenied {
                pid,
                action: "reading /proc of",
            },
            _ => TargetError::Proc {
                pid,
                file,
                message: e.to_string(),
            },
        })
}

/// The whole of a small file, read until its end into `capacity` bytes
/// (grown if needed). Not `read_to_string`, which asks the file for its
/// size (`statx`) and position (`lseek`) first: /proc files answer 0 to
/// both, two system calls for nothing on every read of a host-wide
/// apply's dozens per member.
pub fn read_small(mut file: &std::fs::File, capacity: usize) -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = vec![0u8; capacity.max(64)];
    let mut len = 0;
    loop {
        if len == bytes.len() {
            bytes.resize(bytes.len() * 2, 0);
        }
        match file.read(&mut bytes[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    bytes.truncate(len);
    String::from_utf8(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Clock ticks per second, the unit of a process's start time.
pub fn ticks_per_second() -> u64 {
    procfs::ticks_per_second()
}

/// The per-exec value of `pid`: its `AT_RANDOM` bytes, in hex.
pub fn exec_id_of(pid: i32) -> Option<String> {
    at_random_of(pid).map(|(_, random)| hex(&random))
}

/// Where `pid`'s `AT_RANDOM` bytes are, and what they are.
fn at_random_of(pid: i32) -> Option<(u64, [u8; AT_RANDOM_LEN])> {
    use std::io::Read;
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
    Some((address, read_random(pid, address)?))
}

/// The 16 bytes at `address` of `pid`: one process_vm_readv rather than
/// opening /proc/PID/mem (the same access check: ptrace read access).
fn read_random(pid: i32, address: u64) -> Option<[u8; AT_RANDOM_LEN]> {
    let mut random = [0u8; AT_RANDOM_LEN];
    let read = nix::sys::uio::process_vm_readv(
        nix::unistd::Pid::from_raw(pid),
        &mut [std::io::IoSliceMut::new(&mut random)],
        &[nix::sys::uio::RemoteIoVec {
            base: address as usize,
            len: AT_RANDOM_LEN,
        }],
    )
    .ok()?;
    (read == AT_RANDOM_LEN).then_some(random)
}

fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
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
    fn stat_lines_parse_whatever_the_command_name() {
        let line = "4242 (a (b) c) S 17 4242 4242 0 -1 4194560 120 0 0 0 3 1 0 0 20 0 1 0 98765 1000 200 18446744073709551615\n";
        assert_eq!(
            parse_stat(line),
            Some(StatFields {
                comm: "a (b) c".into(),
                state: 'S',
                ppid: 17,
                flags: 4194560,
                starttime: 98765,
            })
        );
        assert_eq!(parse_stat("4242 (short) S 1 2 3"), None);
        let me = read_stat(std::process::id() as i32).unwrap();
        let theirs = procfs::process::Process::myself().unwrap().stat().unwrap();
        assert_eq!(
            (me.ppid, me.starttime, me.flags, me.comm),
            (theirs.ppid, theirs.starttime, theirs.flags, theirs.comm)
        );
        assert_eq!(read_tgid(std::process::id() as i32).unwrap(), std::process::id() as i32);
        assert!(matches!(read_stat(i32::MAX), Err(TargetError::NoSuchProcess { .. })));
    }

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
    fn a_probed_identity_still_sees_an_exec_a_zombie_and_a_reaped_process() {
        use std::io::Write;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read line; exec sleep 30"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // spawn returns once exec began; its auxv is set a moment later.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while exec_id_of(pid).is_none() {
            assert!(std::time::Instant::now() < deadline, "sh's auxv never showed");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let probed = ProcessIdentity::of_probed(pid).unwrap();
        assert!(probed.probe.0.is_some(), "a child of ours can be probed");
        assert!(probed.probe_says_same());
        probed.check_alive().unwrap();
        assert_eq!(
            probed,
            ProcessIdentity::of(pid).unwrap(),
            "the probe is not part of the identity"
        );
        // A copy changed by hand is checked against /proc, not vouched for.
        let other = ProcessIdentity {
            start_time: probed.start_time + 1,
            ..probed.clone()
        };
        assert!(matches!(other.check_alive(), Err(TargetError::Recycled { .. })));
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        while exec_id_of(pid).is_none_or(|id| Some(id) == probed.exec_id) {
            assert!(std::time::Instant::now() < deadline, "sh did not exec sleep");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!probed.probe_says_same());
        assert!(matches!(probed.check_alive(), Err(TargetError::Execd { .. })));
        let after_exec = ProcessIdentity::of_probed(pid).unwrap();
        after_exec.check_alive().unwrap();
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL).unwrap();
        while read_stat(pid).unwrap().state != 'Z' {
            assert!(std::time::Instant::now() < deadline, "sleep did not die");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(matches!(after_exec.check_alive(), Err(TargetError::Zombie { .. })));
        child.wait().unwrap();
        assert!(matches!(
            after_exec.check_alive(),
            Err(TargetError::NoSuchProcess { .. })
        ));
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
