//! Running one copy of the target through one call, sandboxed: every
//! system call stops the copy (`PTRACE_SYSCALL`), the rules of `policy`
//! decide it, and what was emulated is recorded. The run ends when the
//! function returns (its `ret` reaches the sentinel address and faults
//! there), crashes, calls `exit`, or exceeds its time or syscall budget.

use super::policy::{decide, opens_for_writing, After, Decision, Descriptors, EffectKind, SideEffect};
use super::probe::ChangedCode;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use shadowpatch_process::{CopyStop, Deadline, ProcessCopy, Resume, TargetError};
use std::time::{Duration, Instant};

/// Bytes of each write kept for display; the whole write (up to
/// `DIGEST_LIMIT`) is hashed for comparison.
const SHOWN_BYTES: usize = 256;
const DIGEST_LIMIT: u64 = 1 << 20;

/// Budgets of one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    /// Processor time the call may use (a busy loop burns it; a copy
    /// waiting for a core on a loaded machine does not).
    pub cpu: Duration,
    /// Wall-clock time for the call (a copy blocked forever).
    pub wall: Duration,
    /// System calls the call may make.
    pub syscalls: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            cpu: Duration::from_secs(1),
            wall: Duration::from_secs(10),
            syscalls: 10_000,
        }
    }
}

/// The patched run's budget follows the original's own time on the same
/// call: this many times what the original took ...
pub const PATCHED_BUDGET_FACTOR: u32 = 20;
/// ... but never less than this (a call that took microseconds still gets
/// time for the patch's extra work and for a loaded machine) ...
pub const PATCHED_BUDGET_FLOOR: Duration = Duration::from_millis(200);
/// ... nor more than this: a hang is decided within it.
pub const PATCHED_BUDGET_CAP: Duration = Duration::from_secs(2);

impl Limits {
    /// The budgets of the patched run of a call the original ran in
    /// `original_us`: processor time `FACTOR` × the original's time, at
    /// least `FLOOR`, at most `CAP`; wall time `CAP` (a copy blocked
    /// forever); neither above these limits.
    pub fn for_patched(&self, original_us: u64) -> Limits {
        let adaptive = (Duration::from_micros(original_us) * PATCHED_BUDGET_FACTOR)
            .clamp(PATCHED_BUDGET_FLOOR, PATCHED_BUDGET_CAP);
        Limits {
            cpu: self.cpu.min(adaptive),
            wall: self.wall.min(PATCHED_BUDGET_CAP),
            syscalls: self.syscalls,
        }
    }
}

/// The budgets a run had, in milliseconds (reported with its outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Budget {
    pub cpu_ms: u64,
    pub wall_ms: u64,
    pub syscalls: u32,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    /// The function returned: rax (the return value), rdx (a second
    /// integer word, if the function returns one) and xmm0 (a floating-point
    /// return value, if any), as hex.
    Returned { value: u64, rdx: u64, xmm0: String },
    /// A fatal signal.
    Crashed {
        signal: String,
        /// `si_code` and `si_addr` of the signal.
        code: i32,
        address: u64,
        rip: u64,
    },
    /// Over budget: "cpu time", "wall time" or "syscalls".
    Hung { budget: String },
    /// The function ended the process (`exit`, `exit_group`).
    Exited { code: i32 },
    /// The sandbox stopped the function: it wrote to memory shared with the
    /// service (kept read-only in copies), at `address`.
    SharedMemoryWrite { address: u64 },
    /// A continuation (`run_until_wait`) reached a system call where a
    /// service waits for its next event (`epoll_wait`, `poll`, `accept`, a
    /// futex wait...): the caller's work after the call is done.
    Waiting { syscall: String },
}

impl Outcome {
    /// Returned normally.
    pub fn returned(&self) -> bool {
        matches!(self, Outcome::Returned { .. })
    }

    /// Short description for messages.
    pub fn describe(&self) -> String {
        match self {
            Outcome::Returned { value, .. } => format!("returned {}", show_value(*value)),
            Outcome::Crashed {
                signal, address, rip, ..
            } => format!("crashed with {signal} (address {address:#x}, rip {rip:#x})"),
            Outcome::Hung { budget } => format!("did not return within its {budget} budget"),
            Outcome::Exited { code } => format!("ended the process with exit code {code}"),
            Outcome::SharedMemoryWrite { address } => format!("wrote to shared memory at {address:#x}"),
            Outcome::Waiting { syscall } => format!("went back to waiting ({syscall})"),
        }
    }
}

/// A 64-bit value as a signed decimal when small, else hex.
pub fn show_value(value: u64) -> String {
    let signed = value as i64;
    if signed.unsigned_abs() < 1 << 32 {
        signed.to_string()
    } else {
        format!("{value:#x}")
    }
}

/// One write the function tried to make, not performed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FdWrite {
    pub fd: i32,
    pub syscall: String,
    /// Bytes the function tried to write.
    pub len: u64,
    /// The first bytes, as text with escapes.
    pub shown: String,
    /// BLAKE3 of the bytes (the first MiB), for comparison.
    pub digest: String,
}

/// Everything one run did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RunResult {
    pub outcome: Outcome,
    pub fd_writes: Vec<FdWrite>,
    pub side_effects: Vec<SideEffect>,
    pub syscalls: u32,
    /// Signals sent to the copy by someone else (suppressed).
    pub foreign_signals: u32,
    pub elapsed_us: u64,
    /// The budgets it ran under.
    pub budget: Budget,
    /// Whether the call ran the changed code the run watched for (see
    /// `probe`); `None` when it watched for none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ran_changed_code: Option<bool>,
    /// Inherited descriptors a continuation closed (the copy's own table:
    /// the service's stay open), in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub closed_inherited: Vec<i32>,
    /// Descriptors the run asked the service's epoll set to report as
    /// writable (`epoll_ctl` ADD/MOD with `EPOLLOUT`, emulated): output on
    /// its way.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub output_wanted: Vec<i32>,
    /// The same requests in full, last one per descriptor: what the
    /// service's epoll set would report once the socket is writable
    /// (`next_turn`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub output_interest: Vec<Interest>,
}

/// A request to an epoll set to report output on a descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Interest {
    /// The epoll set's descriptor.
    pub epoll: i32,
    pub fd: i32,
    /// The events asked for.
    pub events: u32,
    /// The caller's `epoll_data`, handed back with each event.
    pub data: u64,
}

/// What to do at the exit of the syscall in progress.
#[derive(Debug, Clone)]
enum AtExit {
    /// It was skipped: set its result.
    Result(i64),
    /// It ran: descriptor bookkeeping.
    After(After),
    /// A redirected open ran: put the caller's argument registers back.
    Restore(Box<libc::user_regs_struct>),
}

/// Run `copy` (registers already at the function's entry, its return
/// address the `sentinel`) to the end of the call.
pub fn run(copy: &mut ProcessCopy, sentinel: u64, fds: Descriptors, limits: &Limits) -> Result<RunResult, TargetError> {
    run_probed(copy, sentinel, fds, limits, None)
}

/// Where a run ends besides a crash, an exit or a budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// The function's `ret` reaching this address.
    Sentinel(u64),
    /// The first system call that waits for an event.
    Wait,
}

/// Run `copy` from where it is (a caller's code, after the call) until it
/// waits for its next event (`Outcome::Waiting`): what the caller does
/// with the call's result, up to writing its answer.
pub fn run_until_wait(copy: &mut ProcessCopy, fds: Descriptors, limits: &Limits) -> Result<RunResult, TargetError> {
    drive(copy, End::Wait, fds, limits, None)
}

/// `sizeof(struct epoll_event)` on x86-64 (packed).
const EPOLL_EVENT_SIZE: usize = 12;

/// A copy stopped at the entry of its `epoll_wait` (where `run_until_wait`
/// left it): end the wait as the kernel would once `ready` became
/// writable, reporting each with `EPOLLOUT` and its `epoll_data`, so the
/// service's next loop turn runs (`run_until_wait` again). Only the
/// interests registered on the epoll set it waits on are reported, no
/// more than it asked for. `false`: the copy does not wait in an
/// `epoll_wait` of that set, or nothing of `ready` is registered there
/// (nothing was changed), or it did not come back to the wait's exit
/// (it died: no turn to run).
pub fn end_wait_writable(copy: &mut ProcessCopy, ready: &[Interest]) -> Result<bool, TargetError> {
    let mut regs = copy.regs()?;
    let number = regs.orig_rax as i64;
    if !matches!(
        number,
        libc::SYS_epoll_wait | libc::SYS_epoll_pwait | libc::SYS_epoll_pwait2
    ) {
        return Ok(false);
    }
    let (epoll, events, most) = (regs.rdi as i32, regs.rsi, regs.rdx as i64);
    let reported: Vec<&Interest> = ready
        .iter()
        .filter(|i| i.epoll == epoll)
        .take(most.max(0) as usize)
        .collect();
    if reported.is_empty() {
        return Ok(false);
    }
    let mut bytes = Vec::with_capacity(reported.len() * EPOLL_EVENT_SIZE);
    for interest in &reported {
        bytes.extend_from_slice(&(libc::EPOLLOUT as u32).to_le_bytes());
        bytes.extend_from_slice(&interest.data.to_le_bytes());
    }
    copy.memory().write(events, &bytes)?;
    // Skipped at its entry; its exit stop gets the count.
    regs.orig_rax = u64::MAX;
    copy.set_regs(regs)?;
    copy.resume(Resume::Syscall, None)?;
    match copy.wait()? {
        CopyStop::Syscall => {
            let mut regs = copy.regs()?;
            regs.rax = reported.len() as u64;
            copy.set_regs(regs)?;
            Ok(true)
        }
        // Gone or signalled instead: no turn to run (the copy is only
        // killed after this).
        _ => Ok(false),
    }
}

/// System calls where a service waits for its next event. A futex wait
/// counts: in a copy (one thread) no other thread will ever wake it.
// libc names syscalls in lower case, as `policy::decide` matches them.
#[allow(non_upper_case_globals)]
fn waits(number: i64, args: &[u64; 6]) -> bool {
    use libc::*;
    const FUTEX_CMD_MASK: u64 = 0x7f;
    match number {
        SYS_epoll_wait | SYS_epoll_pwait | SYS_epoll_pwait2 | SYS_poll | SYS_ppoll | SYS_select | SYS_pselect6
        | SYS_accept | SYS_accept4 | SYS_pause | SYS_rt_sigsuspend | SYS_rt_sigtimedwait | SYS_nanosleep
        | SYS_clock_nanosleep | SYS_wait4 | SYS_waitid => true,
        SYS_futex => matches!(
            args[1] & FUTEX_CMD_MASK,
            x if x == FUTEX_WAIT as u64 || x == FUTEX_WAIT_BITSET as u64
        ),
        _ => false,
    }
}

/// `run`, watching whether the call runs `changed` code (its traps are
/// armed for the run and gone after it).
pub fn run_probed(
    copy: &mut ProcessCopy,
    sentinel: u64,
    fds: Descriptors,
    limits: &Limits,
    changed: Option<&ChangedCode>,
) -> Result<RunResult, TargetError> {
    drive(copy, End::Sentinel(sentinel), fds, limits, changed)
}

fn drive(
    copy: &mut ProcessCopy,
    end: End,
    mut fds: Descriptors,
    limits: &Limits,
    changed: Option<&ChangedCode>,
) -> Result<RunResult, TargetError> {
    if let Some(changed) = changed {
        changed.arm(copy)?;
    }
    let started = Instant::now();
    let deadline = Deadline::arm(copy, limits.cpu, started + limits.wall);
    let mut result = RunResult {
        outcome: Outcome::Hung {
            budget: "wall time".into(),
        },
        fd_writes: Vec::new(),
        side_effects: Vec::new(),
        syscalls: 0,
        foreign_signals: 0,
        elapsed_us: 0,
        budget: Budget {
            cpu_ms: limits.cpu.as_millis() as u64,
            wall_ms: limits.wall.as_millis() as u64,
            syscalls: limits.syscalls,
        },
        ran_changed_code: changed.map(|_| false),
        closed_inherited: Vec::new(),
        output_wanted: Vec::new(),
        output_interest: Vec::new(),
    };
    let mut at_exit: Option<AtExit> = None;
    let mut deliver: Option<Signal> = None;
    loop {
        copy.resume(Resume::Syscall, deliver.take())?;
        let stop = copy.wait()?;
        if let Some(budget) = deadline.expired() {
            result.outcome = Outcome::Hung { budget: budget.into() };
            break;
        }
        match stop {
            CopyStop::Syscall if copy.at_syscall_entry()? => {
                result.syscalls += 1;
                if result.syscalls > limits.syscalls {
                    result.outcome = Outcome::Hung {
                        budget: "syscalls".into(),
                    };
                    break;
                }
                // One read of the registers for every decision at this stop.
                let regs = copy.regs()?;
                if end == End::Wait {
                    let number = regs.orig_rax as i64;
                    let args = [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9];
                    if waits(number, &args) {
                        result.outcome = Outcome::Waiting {
                            syscall: super::policy::syscall_name(number).to_string(),
                        };
                        break;
                    }
                    if number == libc::SYS_close && fds.inherited(args[0]) {
                        result.closed_inherited.push(args[0] as i32);
                    }
                }
                match entry(copy, regs, &fds, &mut result)? {
                    Entry::Continue(next) => at_exit = next,
                    Entry::End(code) => {
                        result.outcome = Outcome::Exited { code };
                        break;
                    }
                }
            }
            CopyStop::Syscall => {
                let mut regs = copy.regs()?;
                match at_exit.take() {
                    Some(AtExit::Result(value)) => {
                        regs.rax = value as u64;
                        copy.set_regs(regs)?;
                    }
                    Some(AtExit::After(after)) => fds.after(after, regs.rax as i64),
                    Some(AtExit::Restore(saved)) => {
                        let saved = *saved;
                        regs.rdi = saved.rdi;
                        regs.rsi = saved.rsi;
                        regs.rdx = saved.rdx;
                        regs.r10 = saved.r10;
                        copy.set_regs(regs)?;
                    }
                    None => {}
                }
            }
            CopyStop::Signal { signal, code, address } => {
                let mut regs = copy.regs()?;
                if let Some(changed) = changed.filter(|_| result.ran_changed_code == Some(false)) {
                    if signal == Signal::SIGTRAP && changed.trapped_at(regs.rip) {
                        // One of our traps: every byte back, and the
                        // instruction runs as if nothing happened.
                        changed.disarm(copy)?;
                        regs.rip -= 1;
                        copy.set_regs(regs)?;
                        result.ran_changed_code = Some(true);
                        continue;
                    }
                }
                if signal == Signal::SIGSEGV && end == End::Sentinel(regs.rip) {
                    let fp = copy.fp_regs()?;
                    let xmm0 = fp.xmm_space[..4]
                        .iter()
                        .rev()
                        .fold(0u128, |acc, word| (acc << 32) | *word as u128);
                    result.outcome = Outcome::Returned {
                        value: regs.rax,
                        rdx: regs.rdx,
                        xmm0: format!("{xmm0:#034x}"),
                    };
                    break;
                }
                if matches!(signal, Signal::SIGSEGV | Signal::SIGBUS) && fds_shared(&fds, address) {
                    result.outcome = Outcome::SharedMemoryWrite { address };
                    break;
                }
                match signal_fate(copy, signal, code, fds.own_pid) {
                    Fate::Deliver => deliver = Some(signal),
                    Fate::Suppress => result.foreign_signals += 1,
                    Fate::Fatal => {
                        result.outcome = Outcome::Crashed {
                            signal: signal.as_str().to_string(),
                            code,
                            address,
                            rip: regs.rip,
                        };
                        break;
                    }
                }
            }
            CopyStop::Event(_) => {}
            CopyStop::Exited(code) => {
                result.outcome = Outcome::Exited { code };
                break;
            }
            CopyStop::Killed(signal) => {
                result.outcome = Outcome::Crashed {
                    signal: signal.as_str().to_string(),
                    code: 0,
                    address: 0,
                    rip: 0,
                };
                break;
            }
        }
    }
    drop(deadline);
    result.elapsed_us = started.elapsed().as_micros() as u64;
    if let Some(changed) = changed.filter(|_| result.ran_changed_code == Some(false)) {
        // Never reached: the traps come out before the copy runs again (a
        // repeat); a copy that died has no memory left to mend.
        let _ = changed.disarm(copy);
    }
    Ok(result)
}

fn fds_shared(fds: &Descriptors, address: u64) -> bool {
    fds.shared.iter().any(|&(start, end)| (start..end).contains(&address))
}

enum Entry {
    Continue(Option<AtExit>),
    End(i32),
}

/// Decide and carry out a syscall at its entry stop (`regs` as read there).
fn entry(
    copy: &mut ProcessCopy,
    mut regs: libc::user_regs_struct,
    fds: &Descriptors,
    result: &mut RunResult,
) -> Result<Entry, TargetError> {
    let number = regs.orig_rax as i64;
    let args = [regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9];
    let skip = |copy: &mut ProcessCopy, mut regs: libc::user_regs_struct| {
        // orig_rax = -1: the kernel skips the call (and reports its exit).
        regs.orig_rax = u64::MAX;
        copy.set_regs(regs)
    };
    match decide(number, args, fds) {
        Decision::Run(after) => Ok(Entry::Continue(Some(AtExit::After(after)))),
        Decision::Emulate {
            result: value,
            mut effect,
        } => {
            if number == libc::SYS_epoll_ctl {
                // What the service's event loop was asked to watch: for a
                // continuation, interest in output on a socket is a reply
                // on its way (libevent writes on the next loop turn).
                // `struct epoll_event` is packed on x86-64: the events'
                // u32, then the caller's 8 bytes of `epoll_data`.
                let event = copy.memory().read_vec(args[3], EPOLL_EVENT_SIZE).ok().map(|bytes| {
                    (
                        u32::from_le_bytes(bytes[..4].try_into().expect("4 bytes")),
                        u64::from_le_bytes(bytes[4..].try_into().expect("8 bytes")),
                    )
                });
                let events = event.map(|(events, _)| events);
                let (op, target) = (args[1] as i32, args[2] as i32);
                if let Some(effect) = effect.as_mut() {
                    effect.detail = format!(
                        "{} {} fd {target}{}",
                        effect.detail,
                        match op {
                            libc::EPOLL_CTL_ADD => "add",
                            libc::EPOLL_CTL_MOD => "mod",
                            libc::EPOLL_CTL_DEL => "del",
                            _ => "op?",
                        },
                        events.map(|e| format!(" events {e:#x}")).unwrap_or_default()
                    );
                }
                result
                    .output_interest
                    .retain(|i| i.fd != target || i.epoll != args[0] as i32);
                if let Some((events, data)) =
                    event.filter(|(e, _)| op != libc::EPOLL_CTL_DEL && e & libc::EPOLLOUT as u32 != 0)
                {
                    result.output_wanted.push(target);
                    result.output_interest.push(Interest {
                        epoll: args[0] as i32,
                        fd: target,
                        events,
                        data,
                    });
                }
            }
            result.side_effects.extend(effect);
            skip(copy, regs)?;
            Ok(Entry::Continue(Some(AtExit::Result(value))))
        }
        Decision::Write {
            fd,
            syscall,
            iov,
            result: _,
        } => {
            let (pieces, value) = gather(copy, number, args, iov)?;
            result.fd_writes.push(record_write(copy, fd, syscall, &pieces)?);
            skip(copy, regs)?;
            Ok(Entry::Continue(Some(AtExit::Result(value))))
        }
        Decision::RedirectOpen { path_address, flags } => {
            let flags = if flags == -1 {
                // openat2(dirfd, path, struct open_how *how, size): flags first.
                let how = copy.memory().read_vec(args[2], 8).unwrap_or_else(|_| vec![0; 8]);
                u64::from_le_bytes(how.try_into().expect("8 bytes")) as i64
            } else {
                flags
            };
            if !opens_for_writing(flags) {
                return Ok(Entry::Continue(Some(AtExit::After(After::Nothing))));
            }
            let path = read_c_string(copy, path_address);
            result.side_effects.push(SideEffect {
                kind: EffectKind::FileChange,
                syscall: super::policy::syscall_name(number).to_string(),
                detail: format!("open {path:?} for writing (flags {flags:#o}), redirected to /dev/null"),
            });
            // "/dev/null" below the red zone of the copy's stack: dead
            // memory at a syscall, and excluded from the comparison.
            let scratch = (regs.rsp - 128 - 64) & !15;
            copy.memory().write(scratch, b"/dev/null\0")?;
            let saved = regs;
            regs.orig_rax = libc::SYS_openat as u64;
            regs.rdi = libc::AT_FDCWD as i64 as u64;
            regs.rsi = scratch;
            regs.rdx = (libc::O_WRONLY | libc::O_CLOEXEC) as u64;
            regs.r10 = 0;
            copy.set_regs(regs)?;
            Ok(Entry::Continue(Some(AtExit::Restore(Box::new(saved)))))
        }
        Decision::End(code) => Ok(Entry::End(code)),
    }
}

/// The (address, length) pieces of a write, and the result to report.
fn gather(
    copy: &mut ProcessCopy,
    number: i64,
    args: [u64; 6],
    simple: Vec<(u64, u64)>,
) -> Result<(Vec<(u64, u64)>, i64), TargetError> {
    let iov_array = |copy: &mut ProcessCopy, address: u64, count: u64| -> Vec<(u64, u64)> {
        let count = count.min(1024) as usize;
        copy.memory()
            .read_vec(address, count * 16)
            .map(|bytes| {
                bytes
                    .chunks_exact(16)
                    .map(|c| {
                        (
                            u64::from_le_bytes(c[..8].try_into().expect("8")),
                            u64::from_le_bytes(c[8..].try_into().expect("8")),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    // struct msghdr: name, namelen(+pad), iov at 16, iovlen at 24, ...
    let msghdr_iov = |copy: &mut ProcessCopy, address: u64| -> Vec<(u64, u64)> {
        let Ok(header) = copy.memory().read_vec(address, 32) else {
            return Vec::new();
        };
        let iov = u64::from_le_bytes(header[16..24].try_into().expect("8"));
        let len = u64::from_le_bytes(header[24..32].try_into().expect("8"));
        iov_array(copy, iov, len)
    };
    let total = |pieces: &[(u64, u64)]| pieces.iter().map(|(_, len)| *len).sum::<u64>() as i64;
    let pieces = match number {
        libc::SYS_writev | libc::SYS_pwritev | libc::SYS_pwritev2 => iov_array(copy, args[1], args[2]),
        libc::SYS_sendmsg => msghdr_iov(copy, args[1]),
        libc::SYS_sendmmsg => {
            // struct mmsghdr { struct msghdr (56 bytes); unsigned msg_len; } (64).
            let count = args[2].min(1024);
            let mut all = Vec::new();
            for index in 0..count {
                let message = args[1] + 64 * index;
                let pieces = msghdr_iov(copy, message);
                let sent = total(&pieces) as u32;
                let _ = copy.memory().write(message + 56, &sent.to_le_bytes());
                all.extend(pieces);
            }
            return Ok((all, count as i64));
        }
        _ => simple,
    };
    let value = total(&pieces);
    Ok((pieces, value))
}

fn record_write(copy: &mut ProcessCopy, fd: i32, syscall: &str, pieces: &[(u64, u64)]) -> Result<FdWrite, TargetError> {
    let mut hasher = blake3::Hasher::new();
    let mut shown = Vec::new();
    let mut budget = DIGEST_LIMIT;
    let mut len = 0;
    for &(address, piece) in pieces {
        len += piece;
        let take = piece.min(budget);
        budget -= take;
        if take == 0 {
            continue;
        }
        // Unreadable buffers would make the real call fail with EFAULT;
        // record what is readable.
        let mut bytes = vec![0u8; take as usize];
        let read = copy.memory().read_partial(address, &mut bytes).unwrap_or(0);
        bytes.truncate(read);
        hasher.update(&bytes);
        let room = SHOWN_BYTES.saturating_sub(shown.len());
        shown.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
    Ok(FdWrite {
        fd,
        syscall: syscall.to_string(),
        len,
        shown: shown.escape_ascii().to_string(),
        digest: hasher.finalize().to_hex().to_string(),
    })
}

fn read_c_string(copy: &mut ProcessCopy, address: u64) -> String {
    let mut bytes = vec![0u8; 4096];
    let read = copy.memory().read_partial(address, &mut bytes).unwrap_or(0);
    bytes.truncate(read);
    if let Some(end) = bytes.iter().position(|b| *b == 0) {
        bytes.truncate(end);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

enum Fate {
    Deliver,
    Suppress,
    Fatal,
}

/// Signals that end a run as a crash at their delivery stop, before any
/// handler of the target's runs: a crash reporter (or a handler that waits
/// for a debugger) would otherwise run in the sandbox and never return,
/// turning a crash into a hang decided seconds later. A program that uses
/// faults on purpose (a garbage collector's barriers) faults in the
/// original run too, and the call is inconclusive rather than a crash.
const CRASH_SIGNALS: [Signal; 5] = [
    Signal::SIGSEGV,
    Signal::SIGBUS,
    Signal::SIGILL,
    Signal::SIGFPE,
    Signal::SIGABRT,
];

/// What to do with a signal stopping the copy: a fault or an abort of the
/// function's own is a crash whatever handler the target installed; its
/// other signals (those it sent itself) take their course, as its handlers
/// or the default action say; signals from others are not its business.
fn signal_fate(copy: &ProcessCopy, signal: Signal, code: i32, own_pid: i64) -> Fate {
    if code <= 0 {
        let sender = ptrace::getsiginfo(copy.pid())
            .map(|info| shadowpatch_sys::siginfo::sender_pid(&info))
            .unwrap_or(0);
        if sender as i64 != own_pid {
            return Fate::Suppress;
        }
    }
    if CRASH_SIGNALS.contains(&signal) {
        return Fate::Fatal;
    }
    let (caught, ignored) = dispositions(copy.pid().as_raw());
    let bit = 1u64 << (signal as i32 - 1);
    if caught & bit != 0 || ignored & bit != 0 {
        return Fate::Deliver;
    }
    match signal {
        Signal::SIGCHLD | Signal::SIGCONT | Signal::SIGURG | Signal::SIGWINCH => Fate::Deliver,
        _ => Fate::Fatal,
    }
}

/// (SigCgt, SigIgn) masks of a process.
fn dispositions(pid: i32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(key))
            .and_then(|value| u64::from_str_radix(value.trim(), 16).ok())
            .unwrap_or(0)
    };
    (mask("SigCgt:"), mask("SigIgn:"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_show_as_signed_decimal_or_hex() {
        assert_eq!(show_value(16), "16");
        assert_eq!(show_value(-5i64 as u64), "-5");
        assert_eq!(show_value(0x7fff_0000_1234), "0x7fff00001234");
    }
}
