//! The sandbox's rules: what each system call of a simulated function may
//! do. A copy shares its open file descriptions, sockets and shared memory
//! with the live service (fork shares them), so anything that acts on those
//! would reach the service or the outside world. The rules, at syscall
//! entry:
//!
//! - **run** calls whose effect stays in the copy: memory management on
//!   private memory, clocks, ids, signal masks and handlers, private
//!   futexes, read-only file queries, opening files read-only, closing and
//!   duplicating descriptors (the descriptor table is the copy's own);
//! - **emulate and record** writes to any descriptor (`write`, `writev`,
//!   `pwrite64`, `sendto`, `sendmsg`, ... : the bytes are read from the copy
//!   and the call "succeeds" with the full length), signals to anyone but
//!   the copy itself, file changes (`unlink`, `rename`, `chmod`, locks, ...;
//!   an `open` for writing is redirected to `/dev/null`, so the function
//!   carries on and its writes are recorded like any other), network
//!   actions (`connect`, `bind`, `listen`, `shutdown`), state changes of
//!   shared descriptors (`fcntl(F_SETFL)`, `setsockopt`, `ioctl`), process
//!   creation and `execve`;
//! - **refuse and record** reads from inherited descriptors (`read`, `recv*`,
//!   `accept`, `epoll_wait`: they would take data or events meant for the
//!   service), emulated as `NEGATIVE_EAGAIN` (no data yet) or "no events";
//! - **end** the run at `exit` / `exit_group` (the function ends the process);
//! - anything else is emulated as `NEGATIVE_ENOSYS` and recorded as unsupported.

use std::collections::BTreeSet;

/// Why a syscall was not simply run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EffectKind {
    /// A signal to another process or thread.
    Signal,
    /// A file created, changed, removed, locked or opened for writing.
    FileChange,
    /// A connection, bind, listen or shutdown.
    Network,
    /// A read that would take data or events from the service.
    RefusedRead,
    /// A shared descriptor's state changed (flags, socket options, ioctl).
    DescriptorState,
    /// A new process or thread, or a new program.
    Spawn,
    /// A syscall the sandbox does not model (emulated as NEGATIVE_ENOSYS).
    Unsupported,
}

/// A side effect the sandbox stopped, as recorded.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct SideEffect {
    pub kind: EffectKind,
    pub syscall: String,
    /// Arguments that identify the effect (path, fd, signal, ...).
    pub detail: String,
}

/// What to do with a syscall at its entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Let the kernel run it; then `after` at its exit.
    Run(After),
    /// Skip it: its result is `result`, with the effect recorded.
    Emulate { result: i64, effect: Option<SideEffect> },
    /// A write to descriptor `fd`: record `iov` (address, length) pairs
    /// and return their total length (or `result` when set).
    Write {
        fd: i32,
        syscall: &'static str,
        iov: Vec<(u64, u64)>,
        result: Option<i64>,
    },
    /// Open `path` for writing: redirected to /dev/null, recorded.
    RedirectOpen { path_address: u64, flags: i64 },
    /// The function ends the process with this exit code.
    End(i32),
}

/// Bookkeeping needed at the syscall's exit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum After {
    Nothing,
    /// The result is a descriptor duplicating `source`.
    Duplicate {
        source: i32,
    },
    /// `dup2`/`dup3`: descriptor `target` now duplicates `source`.
    DuplicateTo {
        source: i32,
        target: i32,
    },
    /// The descriptor was closed (if the call succeeded).
    Close {
        fd: i32,
    },
}

/// What the rules need to know about the copy.
#[derive(Debug)]
pub struct Descriptors {
    /// Descriptors that refer to the service's open file descriptions
    /// (inherited, or duplicated from inherited ones).
    pub inherited: BTreeSet<i32>,
    /// The copy's pid and thread id (one thread), in the target's namespace.
    pub own_pid: i64,
    /// Shared writable mappings (start, end): the sandbox keeps them
    /// read-only in the copy.
    pub shared: Vec<(u64, u64)>,
}

impl Descriptors {
    pub(crate) fn inherited(&self, fd: u64) -> bool {
        self.inherited.contains(&(fd as i32))
    }

    fn overlaps_shared(&self, start: u64, len: u64) -> bool {
        let end = start.saturating_add(len);
        self.shared.iter().any(|&(s, e)| s < end && start < e)
    }

    /// Apply `after` once the syscall returned `result`.
    pub fn after(&mut self, after: After, result: i64) {
        match after {
            After::Nothing => {}
            After::Duplicate { source } if result >= 0 && self.inherited.contains(&source) => {
                self.inherited.insert(result as i32);
            }
            After::DuplicateTo { source, target } if result >= 0 => {
                if self.inherited.contains(&source) {
                    self.inherited.insert(target);
                } else {
                    self.inherited.remove(&target);
                }
            }
            After::Close { fd } if result == 0 => {
                self.inherited.remove(&fd);
            }
            _ => {}
        }
    }
}

const NEGATIVE_EAGAIN: i64 = -(libc::EAGAIN as i64);
const NEGATIVE_EACCES: i64 = -(libc::EACCES as i64);
const NEGATIVE_ENOSYS: i64 = -(libc::ENOSYS as i64);
const NEGATIVE_ENOTTY: i64 = -(libc::ENOTTY as i64);
const NEGATIVE_ESPIPE: i64 = -(libc::ESPIPE as i64);

/// `ioctl` requests that only read a descriptor's state.
const READ_ONLY_IOCTLS: [u64; 3] = [
    0x541b, // FIONREAD
    0x5401, // TCGETS
    0x5413, // TIOCGWINSZ
];

fn effect(kind: EffectKind, syscall: &str, detail: String) -> Option<SideEffect> {
    Some(SideEffect {
        kind,
        syscall: syscall.to_string(),
        detail,
    })
}

fn emulate(result: i64, kind: EffectKind, syscall: &str, detail: String) -> Decision {
    Decision::Emulate {
        result,
        effect: effect(kind, syscall, detail),
    }
}

const RUN: Decision = Decision::Run(After::Nothing);

/// Decide syscall `number` with arguments `a` (rdi, rsi, rdx, r10, r8, r9).
// libc names syscalls in lower case (SYS_read); matching on them is clearer
// than renaming two hundred constants.
#[allow(non_upper_case_globals)]
pub fn decide(number: i64, a: [u64; 6], fds: &Descriptors) -> Decision {
    use libc::*;
    let fd = a[0];
    let fd_detail = |fd: u64| format!("fd {}", fd as i32);
    match number {
        // Memory of the copy's own.
        SYS_brk | SYS_munmap | SYS_mremap | SYS_mlock | SYS_munlock | SYS_mlock2 | SYS_mincore | SYS_msync => RUN,
        SYS_mmap => {
            let (prot, flags, file) = (a[2] as i32, a[3] as i32, a[4] as i32);
            if file >= 0 && flags & MAP_SHARED != 0 && prot & PROT_WRITE != 0 {
                emulate(
                    NEGATIVE_EACCES,
                    EffectKind::FileChange,
                    "mmap",
                    format!("shared writable mapping of fd {file}"),
                )
            } else {
                RUN
            }
        }
        SYS_mprotect => {
            if a[2] as i32 & PROT_WRITE != 0 && fds.overlaps_shared(a[0], a[1]) {
                emulate(
                    NEGATIVE_EACCES,
                    EffectKind::FileChange,
                    "mprotect",
                    format!("shared memory at {:#x} made writable", a[0]),
                )
            } else {
                RUN
            }
        }
        SYS_madvise => {
            if fds.overlaps_shared(a[0], a[1]) {
                emulate(
                    0,
                    EffectKind::FileChange,
                    "madvise",
                    format!("advice {} on shared memory at {:#x}", a[2], a[0]),
                )
            } else {
                RUN
            }
        }
        // Time, identity, scheduling of the copy itself, signal handling.
        SYS_clock_gettime
        | SYS_clock_getres
        | SYS_gettimeofday
        | SYS_time
        | SYS_nanosleep
        | SYS_clock_nanosleep
        | SYS_getpid
        | SYS_gettid
        | SYS_getppid
        | SYS_getuid
        | SYS_geteuid
        | SYS_getgid
        | SYS_getegid
        | SYS_getgroups
        | SYS_getresuid
        | SYS_getresgid
        | SYS_getpgrp
        | SYS_getpgid
        | SYS_getsid
        | SYS_getrlimit
        | SYS_getrusage
        | SYS_times
        | SYS_uname
        | SYS_sysinfo
        | SYS_getcpu
        | SYS_sched_getaffinity
        | SYS_sched_yield
        | SYS_sched_getparam
        | SYS_sched_getscheduler
        | SYS_getpriority
        | SYS_rt_sigprocmask
        | SYS_rt_sigaction
        | SYS_sigaltstack
        | SYS_rt_sigreturn
        | SYS_rt_sigpending
        | SYS_rt_sigtimedwait
        | SYS_rt_sigsuspend
        | SYS_pause
        | SYS_getrandom
        | SYS_set_robust_list
        | SYS_get_robust_list
        | SYS_set_tid_address
        | SYS_arch_prctl
        | SYS_prctl
        | SYS_rseq
        | SYS_membarrier
        | SYS_umask
        | SYS_capget
        | SYS_personality => RUN,
        SYS_prlimit64 if a[2] == 0 => RUN,
        SYS_futex | SYS_futex_waitv => {
            const FUTEX_PRIVATE_FLAG: u64 = 128;
            if number == SYS_futex && a[1] & FUTEX_PRIVATE_FLAG == 0 && fds.overlaps_shared(a[0], 4) {
                emulate(
                    NEGATIVE_EAGAIN,
                    EffectKind::Signal,
                    "futex",
                    format!("shared futex at {:#x}", a[0]),
                )
            } else {
                RUN
            }
        }
        // Queries on files and descriptors.
        SYS_fstat | SYS_newfstatat | SYS_stat | SYS_lstat | SYS_statx | SYS_statfs | SYS_fstatfs | SYS_access
        | SYS_faccessat | SYS_faccessat2 | SYS_readlink | SYS_readlinkat | SYS_getcwd | SYS_chdir | SYS_fchdir
        | SYS_fadvise64 | SYS_getsockname | SYS_getpeername | SYS_getsockopt | SYS_poll | SYS_ppoll | SYS_select
        | SYS_pselect6 | SYS_fsync | SYS_fdatasync | SYS_pread64 | SYS_preadv | SYS_socket | SYS_pipe | SYS_pipe2
        | SYS_socketpair | SYS_eventfd | SYS_eventfd2 | SYS_epoll_create | SYS_epoll_create1 | SYS_timerfd_create
        | SYS_signalfd | SYS_signalfd4 | SYS_memfd_create | SYS_timerfd_settime | SYS_timerfd_gettime
        | SYS_getxattr | SYS_lgetxattr | SYS_fgetxattr | SYS_listxattr | SYS_llistxattr | SYS_flistxattr => RUN,
        SYS_preadv2 if a[3] as i64 != -1 => RUN,
        SYS_close => Decision::Run(After::Close { fd: fd as i32 }),
        SYS_dup => Decision::Run(After::Duplicate { source: fd as i32 }),
        SYS_dup2 | SYS_dup3 => Decision::Run(After::DuplicateTo {
            source: fd as i32,
            target: a[1] as i32,
        }),
        SYS_fcntl => fcntl_decision(a, fds),
        // Reads: only from the copy's own descriptors.
        SYS_read | SYS_readv | SYS_recvfrom | SYS_recvmsg | SYS_recvmmsg | SYS_preadv2 | SYS_accept | SYS_accept4 => {
            if fds.inherited(fd) {
                emulate(
                    NEGATIVE_EAGAIN,
                    EffectKind::RefusedRead,
                    syscall_name(number),
                    fd_detail(fd),
                )
            } else {
                RUN
            }
        }
        SYS_epoll_wait | SYS_epoll_pwait | SYS_epoll_pwait2 => {
            if fds.inherited(fd) {
                emulate(0, EffectKind::RefusedRead, syscall_name(number), fd_detail(fd))
            } else {
                RUN
            }
        }
        SYS_epoll_ctl | SYS_setsockopt => {
            if fds.inherited(fd) {
                emulate(0, EffectKind::DescriptorState, syscall_name(number), fd_detail(fd))
            } else {
                RUN
            }
        }
        SYS_shutdown => {
            if fds.inherited(fd) {
                emulate(0, EffectKind::Network, "shutdown", fd_detail(fd))
            } else {
                RUN
            }
        }
        SYS_lseek => {
            if !fds.inherited(fd) || (a[1] == 0 && a[2] as i32 == SEEK_CUR) {
                RUN
            } else {
                let result = if a[2] as i32 == SEEK_SET {
                    a[1] as i64
                } else {
                    NEGATIVE_ESPIPE
                };
                emulate(result, EffectKind::DescriptorState, "lseek", fd_detail(fd))
            }
        }
        SYS_getdents64 => {
            if fds.inherited(fd) {
                emulate(0, EffectKind::RefusedRead, "getdents64", fd_detail(fd))
            } else {
                RUN
            }
        }
        SYS_ioctl => {
            if !fds.inherited(fd) || READ_ONLY_IOCTLS.contains(&a[1]) {
                RUN
            } else {
                emulate(
                    NEGATIVE_ENOTTY,
                    EffectKind::DescriptorState,
                    "ioctl",
                    format!("fd {} request {:#x}", fd as i32, a[1]),
                )
            }
        }
        // Writes: never performed, always recorded.
        SYS_write | SYS_pwrite64 => Decision::Write {
            fd: fd as i32,
            syscall: syscall_name(number),
            iov: vec![(a[1], a[2])],
            result: None,
        },
        SYS_sendto => Decision::Write {
            fd: fd as i32,
            syscall: "sendto",
            iov: vec![(a[1], a[2])],
            result: None,
        },
        // The iovec arrays are read by the sandbox (it has the memory).
        SYS_writev | SYS_pwritev | SYS_pwritev2 | SYS_sendmsg | SYS_sendmmsg => Decision::Write {
            fd: fd as i32,
            syscall: syscall_name(number),
            iov: Vec::new(),
            result: None,
        },
        SYS_connect | SYS_bind | SYS_listen => emulate(0, EffectKind::Network, syscall_name(number), fd_detail(fd)),
        // Signals: to the copy itself they are its own business.
        SYS_kill | SYS_tkill => {
            if a[0] as i64 == fds.own_pid {
                RUN
            } else {
                emulate(
                    0,
                    EffectKind::Signal,
                    syscall_name(number),
                    format!("signal {} to {}", a[1], a[0] as i64),
                )
            }
        }
        SYS_tgkill => {
            if a[0] as i64 == fds.own_pid && a[1] as i64 == fds.own_pid {
                RUN
            } else {
                emulate(
                    0,
                    EffectKind::Signal,
                    "tgkill",
                    format!("signal {} to {}/{}", a[2], a[0] as i64, a[1] as i64),
                )
            }
        }
        SYS_rt_sigqueueinfo | SYS_rt_tgsigqueueinfo | SYS_pidfd_send_signal => emulate(
            0,
            EffectKind::Signal,
            syscall_name(number),
            format!("to {}", a[0] as i64),
        ),
        // Files: opening for writing is redirected, changes are emulated.
        SYS_open | SYS_creat | SYS_openat => {
            let (path, flags) = match number {
                SYS_open => (a[0], a[1] as i64),
                SYS_creat => (a[0], (O_CREAT | O_WRONLY | O_TRUNC) as i64),
                _ => (a[1], a[2] as i64),
            };
            if opens_for_writing(flags) {
                Decision::RedirectOpen {
                    path_address: path,
                    flags,
                }
            } else {
                RUN
            }
        }
        // openat2's flags sit in a structure: the sandbox reads them.
        SYS_openat2 => Decision::RedirectOpen {
            path_address: a[1],
            flags: -1,
        },
        SYS_unlink | SYS_unlinkat | SYS_rename | SYS_renameat | SYS_renameat2 | SYS_mkdir | SYS_mkdirat | SYS_rmdir
        | SYS_link | SYS_linkat | SYS_symlink | SYS_symlinkat | SYS_chmod | SYS_fchmodat | SYS_fchmodat2
        | SYS_chown | SYS_lchown | SYS_fchownat | SYS_truncate | SYS_utime | SYS_utimes | SYS_utimensat
        | SYS_futimesat | SYS_setxattr | SYS_lsetxattr | SYS_removexattr | SYS_lremovexattr | SYS_mknod
        | SYS_mknodat | SYS_chroot | SYS_mount | SYS_umount2 | SYS_sync | SYS_syncfs | SYS_sync_file_range => {
            emulate(0, EffectKind::FileChange, syscall_name(number), String::new())
        }
        SYS_ftruncate | SYS_fallocate | SYS_fchmod | SYS_fchown | SYS_fsetxattr | SYS_fremovexattr | SYS_flock => {
            emulate(0, EffectKind::FileChange, syscall_name(number), fd_detail(fd))
        }
        // New processes and programs.
        SYS_fork | SYS_vfork | SYS_clone | SYS_clone3 => {
            emulate(NEGATIVE_EAGAIN, EffectKind::Spawn, syscall_name(number), String::new())
        }
        SYS_execve | SYS_execveat => emulate(NEGATIVE_EACCES, EffectKind::Spawn, syscall_name(number), String::new()),
        SYS_exit | SYS_exit_group => Decision::End(a[0] as i32),
        _ => emulate(
            NEGATIVE_ENOSYS,
            EffectKind::Unsupported,
            &format!("syscall {number}"),
            String::new(),
        ),
    }
}

#[allow(non_upper_case_globals)]
fn fcntl_decision(a: [u64; 6], fds: &Descriptors) -> Decision {
    use libc::*;
    let fd = a[0] as i32;
    match a[1] as i32 {
        F_GETFD | F_SETFD | F_GETFL | F_GETLK | F_OFD_GETLK | F_GETOWN | F_GETPIPE_SZ | F_GET_SEALS => RUN,
        F_DUPFD | F_DUPFD_CLOEXEC => Decision::Run(After::Duplicate { source: fd }),
        // Locks are seen by every process using the file.
        F_SETLK | F_SETLKW | F_OFD_SETLK | F_OFD_SETLKW => {
            emulate(0, EffectKind::FileChange, "fcntl", format!("lock on fd {fd}"))
        }
        command if fds.inherited.contains(&fd) => emulate(
            0,
            EffectKind::DescriptorState,
            "fcntl",
            format!("command {command} on fd {fd}"),
        ),
        _ => RUN,
    }
}

/// Whether open flags ask for anything but reading.
pub fn opens_for_writing(flags: i64) -> bool {
    let flags = flags as i32;
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & (libc::O_CREAT | libc::O_TRUNC | libc::O_TMPFILE) != 0
}

/// A syscall's name for reports (the ones the rules mention).
#[allow(non_upper_case_globals)]
pub fn syscall_name(number: i64) -> &'static str {
    use libc::*;
    match number {
        SYS_read => "read",
        SYS_readv => "readv",
        SYS_write => "write",
        SYS_writev => "writev",
        SYS_pwrite64 => "pwrite64",
        SYS_pwritev => "pwritev",
        SYS_pwritev2 => "pwritev2",
        SYS_sendto => "sendto",
        SYS_sendmsg => "sendmsg",
        SYS_sendmmsg => "sendmmsg",
        SYS_recvfrom => "recvfrom",
        SYS_recvmsg => "recvmsg",
        SYS_recvmmsg => "recvmmsg",
        SYS_preadv2 => "preadv2",
        SYS_accept => "accept",
        SYS_accept4 => "accept4",
        SYS_epoll_wait => "epoll_wait",
        SYS_epoll_pwait => "epoll_pwait",
        SYS_epoll_pwait2 => "epoll_pwait2",
        SYS_epoll_ctl => "epoll_ctl",
        SYS_setsockopt => "setsockopt",
        SYS_shutdown => "shutdown",
        SYS_connect => "connect",
        SYS_bind => "bind",
        SYS_listen => "listen",
        SYS_kill => "kill",
        SYS_tkill => "tkill",
        SYS_rt_sigqueueinfo => "rt_sigqueueinfo",
        SYS_rt_tgsigqueueinfo => "rt_tgsigqueueinfo",
        SYS_pidfd_send_signal => "pidfd_send_signal",
        SYS_unlink => "unlink",
        SYS_unlinkat => "unlinkat",
        SYS_rename => "rename",
        SYS_renameat => "renameat",
        SYS_renameat2 => "renameat2",
        SYS_mkdir => "mkdir",
        SYS_mkdirat => "mkdirat",
        SYS_rmdir => "rmdir",
        SYS_link => "link",
        SYS_linkat => "linkat",
        SYS_symlink => "symlink",
        SYS_symlinkat => "symlinkat",
        SYS_chmod => "chmod",
        SYS_fchmodat => "fchmodat",
        SYS_fchmodat2 => "fchmodat2",
        SYS_chown => "chown",
        SYS_lchown => "lchown",
        SYS_fchownat => "fchownat",
        SYS_truncate => "truncate",
        SYS_ftruncate => "ftruncate",
        SYS_fallocate => "fallocate",
        SYS_fchmod => "fchmod",
        SYS_fchown => "fchown",
        SYS_fsetxattr => "fsetxattr",
        SYS_fremovexattr => "fremovexattr",
        SYS_flock => "flock",
        SYS_utime => "utime",
        SYS_utimes => "utimes",
        SYS_utimensat => "utimensat",
        SYS_futimesat => "futimesat",
        SYS_setxattr => "setxattr",
        SYS_lsetxattr => "lsetxattr",
        SYS_removexattr => "removexattr",
        SYS_lremovexattr => "lremovexattr",
        SYS_mknod => "mknod",
        SYS_mknodat => "mknodat",
        SYS_chroot => "chroot",
        SYS_mount => "mount",
        SYS_umount2 => "umount2",
        SYS_sync => "sync",
        SYS_syncfs => "syncfs",
        SYS_sync_file_range => "sync_file_range",
        SYS_fork => "fork",
        SYS_vfork => "vfork",
        SYS_clone => "clone",
        SYS_clone3 => "clone3",
        SYS_execve => "execve",
        SYS_execveat => "execveat",
        SYS_open => "open",
        SYS_openat => "openat",
        SYS_openat2 => "openat2",
        SYS_creat => "creat",
        _ => "syscall",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fds() -> Descriptors {
        Descriptors {
            inherited: [0, 1, 2, 3].into_iter().collect(),
            own_pid: 100,
            shared: vec![(0x10000, 0x20000)],
        }
    }

    #[test]
    fn service_facing_calls_are_emulated_and_local_ones_run() {
        let fds = fds();
        let decide = |n: i64, a: [u64; 6]| decide(n, a, &fds);
        assert_eq!(decide(libc::SYS_getpid, [0; 6]), RUN);
        assert!(matches!(
            decide(libc::SYS_write, [3, 0x1000, 5, 0, 0, 0]),
            Decision::Write { fd: 3, .. }
        ));
        assert!(matches!(
            decide(libc::SYS_read, [3, 0, 0, 0, 0, 0]),
            Decision::Emulate {
                result: NEGATIVE_EAGAIN,
                ..
            }
        ));
        assert_eq!(decide(libc::SYS_read, [7, 0, 0, 0, 0, 0]), RUN, "the copy's own fd");
        assert_eq!(decide(libc::SYS_kill, [100, 6, 0, 0, 0, 0]), RUN, "to itself");
        assert!(matches!(
            decide(libc::SYS_kill, [1, 9, 0, 0, 0, 0]),
            Decision::Emulate { result: 0, .. }
        ));
        assert!(matches!(
            decide(libc::SYS_openat, [0, 0x1000, libc::O_WRONLY as u64, 0, 0, 0]),
            Decision::RedirectOpen { .. }
        ));
        assert_eq!(
            decide(libc::SYS_openat, [0, 0x1000, libc::O_RDONLY as u64, 0, 0, 0]),
            RUN
        );
        assert_eq!(decide(libc::SYS_exit_group, [3, 0, 0, 0, 0, 0]), Decision::End(3));
        assert!(matches!(
            decide(libc::SYS_unlink, [0; 6]),
            Decision::Emulate { result: 0, .. }
        ));
        assert!(matches!(
            decide(
                libc::SYS_mprotect,
                [0x18000, 0x1000, (libc::PROT_READ | libc::PROT_WRITE) as u64, 0, 0, 0]
            ),
            Decision::Emulate { .. }
        ));
        assert!(matches!(
            decide(9999, [0; 6]),
            Decision::Emulate {
                result: NEGATIVE_ENOSYS,
                effect: Some(SideEffect {
                    kind: EffectKind::Unsupported,
                    ..
                })
            }
        ));
    }

    #[test]
    fn duplicates_of_inherited_descriptors_stay_inherited() {
        let mut fds = fds();
        fds.after(After::Duplicate { source: 3 }, 9);
        assert!(fds.inherited.contains(&9));
        fds.after(After::Close { fd: 3 }, 0);
        assert!(!fds.inherited.contains(&3));
        fds.after(After::DuplicateTo { source: 12, target: 9 }, 9);
        assert!(!fds.inherited.contains(&9), "now the copy's own");
    }
}
