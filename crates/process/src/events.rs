//! The event loop of a seized target whose threads run: wait, with a
//! timeout, for the next stop of any traced thread, deal with the stops
//! that are nobody's business (foreign signals re-injected at once,
//! job-control stops kept with `PTRACE_LISTEN`, new threads registered),
//! and report the rest: breakpoint traps, synchronous faults, new processes,
//! thread exits.
//!
//! A thread reported at a breakpoint or a fault is *held*: it stays in its
//! ptrace-stop until [`Attached::resume_thread`] (or the next world stop's
//! resume) while every other thread runs on. Held threads are always safe to
//! resume blindly: a breakpoint's instruction pointer is already rewound to
//! the breakpoint's address, and a fault's signal is kept as the thread's
//! pending signal, so resuming delivers it instead of swallowing it.
//!
//! Sessions that leave `int3`s in the target for a while (simulation
//! capture, a watch window) set [`SESSION_OPTIONS`] with
//! [`Stopped::set_options`]: new threads are then traced from birth (an
//! untraced thread would be killed by its first `int3`), and a process the
//! target forks gets the breakpoints removed from its private copy of the
//! memory before it is let go (a `vfork` child, which shares the memory,
//! stays traced until it execs or exits and is stepped over breakpoints).
//!
//! Waiting uses `waitpid(tid, WNOHANG)` per traced thread with an adaptive
//! sleep between rounds, never `waitpid(-1)`: that would steal the stops
//! and exits of other tracers' tracees and children in the same process
//! (tests run many tracers in one process), and a blocking wait cannot time
//! out without a signal handler, which a library must not install.

use crate::attach::{is_stop_signal, Attached, Stopped};
use crate::TargetError;
use nix::errno::Errno;
use nix::sys::ptrace::{self, Event as PtraceEvent, Options};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use std::time::{Duration, Instant};

/// The `int3` instruction.
pub const INT3: u8 = 0xcc;
/// `si_code` of a SIGTRAP raised by an `int3` (SI_KERNEL).
const SI_KERNEL: i32 = 0x80;
/// The x86_64 `endbr64` instruction (a no-op unless IBT enforcement is on).
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// Options for a session that keeps breakpoints in a running target.
pub const SESSION_OPTIONS: Options = Options::PTRACE_O_TRACECLONE
    .union(Options::PTRACE_O_TRACEFORK)
    .union(Options::PTRACE_O_TRACEVFORK);

/// Default longest sleep between polls: a stop waits at most this long
/// (plus timer slack) before the loop sees it.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_micros(100);
/// Polling rounds spent yielding, not sleeping, after the last event: a
/// breakpoint in a hot function reports again within microseconds.
const SPIN_ROUNDS: u32 = 64;

/// What the target did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A thread executed one of the registered breakpoints. It is held with
    /// its instruction pointer back at `address` (registers as at the
    /// breakpoint's instruction, before it ran).
    Breakpoint {
        tid: Pid,
        address: u64,
        regs: Box<libc::user_regs_struct>,
    },
    /// A thread raised a synchronous fault (SIGSEGV, SIGBUS, SIGILL, SIGFPE,
    /// a kernel SIGTRAP that is no breakpoint of ours). It is held; resuming
    /// it delivers the signal unless the caller says otherwise.
    Fault {
        tid: Pid,
        signal: Signal,
        /// `si_code` and `si_addr` of the signal.
        code: i32,
        address: u64,
    },
    /// A new thread of the target, traced and running.
    NewThread { tid: Pid },
    /// The target created a process (fork, vfork, or clone without
    /// CLONE_THREAD). Breakpoints are already removed from its memory if it
    /// has its own; `traced` says whether it stays traced meanwhile.
    NewProcess { parent: Pid, child: Pid, traced: bool },
    /// A thread stopped on the way to receiving one of the signals given to
    /// [`Attached::watch_signals`] (synchronous or not: a SIGABRT counts).
    /// It is held in its signal-delivery-stop, the signal not delivered,
    /// until [`Attached::release_held`]; resuming the world leaves it held.
    Signal {
        tid: Pid,
        signal: Signal,
        regs: Box<libc::user_regs_struct>,
    },
    /// A thread exited (or the whole process, when `process` is set), with
    /// its exit code or killing signal when its status reached us (not
    /// when it was reaped elsewhere, e.g. by an exec in another thread).
    Exited {
        tid: Pid,
        process: bool,
        code: Option<i32>,
        signal: Option<Signal>,
    },
}

/// How a stop is absorbed: while stopping the world or in the event loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    Stopping,
    Events,
}

/// What became of a thread after one wait status.
#[derive(Debug)]
pub(crate) enum Absorbed {
    /// In the ptrace-stop we wanted (our interrupt or a group-stop).
    Stopped,
    /// Held at a reported event.
    Held(Event),
    /// Running again, with maybe something to report.
    Running(Option<Event>),
    /// Exited and forgotten, with its exit code or killing signal.
    Gone { code: Option<i32>, signal: Option<Signal> },
}

/// A process the target created that we still trace.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ForeignProcess {
    /// In a ptrace-stop of ours.
    stopped: bool,
}

impl Stopped<'_> {
    /// Set ptrace `options` on every stopped thread; threads seized or
    /// auto-attached later get them too. [`SESSION_OPTIONS`] before placing
    /// breakpoints; `Options::empty()` to clear them again.
    pub fn set_options(&mut self, options: Options) -> Result<(), TargetError> {
        let attached = self.attached();
        let pid = attached.pid();
        attached.options = options;
        let tids: Vec<Pid> = attached
            .threads
            .iter()
            .filter(|(_, s)| s.stopped && !s.group_stop)
            .map(|(tid, _)| *tid)
            .collect();
        let options = attached.thread_options();
        for tid in tids {
            match ptrace::setoptions(tid, options) {
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(errno) => return Err(TargetError::from_errno(pid, "setting ptrace options of", errno)),
            }
        }
        // A thread in group-stop is listening: ptrace requests fail on it
        // until it leaves the stop. Such a thread runs no code, so it can
        // neither clone nor hit a breakpoint before the next world stop.
        Ok(())
    }
}

impl Attached {
    /// Register breakpoints the caller has written (or is about to write)
    /// into the target: `(address, original byte)`. Their traps are then
    /// reported as [`Event::Breakpoint`] (in the event loop) or rewound and
    /// suppressed (while stopping the world), never delivered. Only register
    /// breakpoints whose write is journaled: the loop itself toggles the
    /// bytes between the original and `int3` when stepping a thread past.
    pub fn watch_breakpoints(&mut self, breakpoints: &[(u64, u8)]) {
        self.breakpoints.extend(breakpoints.iter().copied());
    }

    /// Forget every breakpoint (after the caller removed them).
    pub fn forget_breakpoints(&mut self) {
        self.breakpoints.clear();
    }

    /// The longest sleep between polls (latency of noticing a stop).
    pub fn set_poll_interval(&mut self, interval: Duration) {
        self.poll_interval = interval;
    }

    /// Wait up to `timeout` for the next event of a running thread. `None`
    /// when nothing happened in time. Foreign signals are re-injected and
    /// job-control stops honoured on the way, without being reported.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, TargetError> {
        let deadline = Instant::now() + timeout;
        let mut idle_rounds = 0u32;
        loop {
            if let Some(event) = self.queued.pop_front() {
                return Ok(Some(event));
            }
            if self.threads.is_empty() {
                return Err(TargetError::Exited {
                    pid: self.pid(),
                    during: "waiting for events",
                });
            }
            let watched: Vec<Pid> = self
                .threads
                .iter()
                .filter(|(_, s)| !s.stopped || s.group_stop)
                .map(|(tid, _)| *tid)
                .collect();
            let mut seen = false;
            for tid in watched {
                let status = match waitpid(tid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => continue,
                    Ok(status) => status,
                    Err(Errno::ECHILD) => {
                        self.threads.remove(&tid);
                        self.queued.push_back(self.exit_event(tid, None, None));
                        seen = true;
                        continue;
                    }
                    Err(errno) => return Err(TargetError::from_errno(self.pid(), "waiting for", errno)),
                };
                seen = true;
                match self.absorb(tid, status, Mode::Events)? {
                    Absorbed::Held(event) => return Ok(Some(event)),
                    Absorbed::Running(Some(event)) => self.queued.push_back(event),
                    Absorbed::Running(None) | Absorbed::Stopped => {}
                    Absorbed::Gone { code, signal } => self.queued.push_back(self.exit_event(tid, code, signal)),
                }
            }
            seen |= self.poll_foreign()?;
            if seen || !self.queued.is_empty() {
                idle_rounds = 0;
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            idle_rounds += 1;
            if idle_rounds < SPIN_ROUNDS {
                std::thread::yield_now();
            } else {
                // Double the sleep every 64 idle rounds, up to the interval.
                let exponent = ((idle_rounds - SPIN_ROUNDS) / SPIN_ROUNDS).min(12);
                let sleep = (Duration::from_micros(5) * (1 << exponent)).min(self.poll_interval);
                std::thread::sleep(sleep.min(deadline - now));
            }
        }
    }

    fn exit_event(&self, tid: Pid, code: Option<i32>, signal: Option<Signal>) -> Event {
        Event::Exited {
            tid,
            process: self.threads.is_empty(),
            code,
            signal,
        }
    }

    /// Resume a held thread (delivering `signal`, else any signal kept for
    /// it, such as a reported fault's).
    pub fn resume_thread(&mut self, tid: Pid, signal: Option<Signal>) -> Result<(), TargetError> {
        let pid = self.pid();
        let Some(state) = self.threads.get_mut(&tid) else {
            return Ok(());
        };
        if !state.stopped {
            return Ok(());
        }
        let result = if state.group_stop {
            shadowpatch_sys::ptrace_ext::listen(tid)
        } else {
            ptrace::cont(tid, signal.or(state.pending_signal))
        };
        match result {
            Ok(()) | Err(Errno::ESRCH) => {
                state.stopped = false;
                state.pending_signal = None;
                Ok(())
            }
            Err(errno) => Err(TargetError::from_errno(pid, "resuming", errno)),
        }
    }

    /// Move a thread held at breakpoint `address` past the instruction the
    /// breakpoint covers, leaving the breakpoint armed, and resume it. An
    /// `endbr64` (a no-op here) is skipped without touching memory;
    /// otherwise the original byte is put back, the thread single-stepped
    /// and the `int3` re-inserted (other threads calling the function in
    /// that window run it untrapped: a missed capture, nothing worse).
    pub fn step_past_breakpoint(&mut self, tid: Pid, address: u64) -> Result<(), TargetError> {
        self.step_past_breakpoint_in(tid, address, true)?;
        self.resume_thread(tid, None)
    }

    /// `step_past_breakpoint` without the resume; `live` is false for a
    /// foreign process (its memory is reached through its own pid).
    fn step_past_breakpoint_in(&mut self, tid: Pid, address: u64, live: bool) -> Result<(), TargetError> {
        let pid = self.pid();
        let original = *self.breakpoints.get(&address).ok_or(TargetError::Sys {
            pid,
            action: "stepping past an unknown breakpoint in",
            errno: Errno::EINVAL,
        })?;
        // Removed since the trap (a world stop took the breakpoint out
        // while this thread's trap was on its way): the thread is already
        // rewound onto the original instruction, which it runs when
        // resumed. Re-inserting the `int3` here would leave one in the
        // target that no journal entry and no disarm knows of.
        let mut live_byte = [0u8; 1];
        self.read_in(tid, live, address, &mut live_byte)?;
        if live_byte[0] != INT3 {
            return Ok(());
        }
        let mut regs = ptrace::getregs(tid).map_err(|e| TargetError::from_errno(pid, "reading registers of", e))?;
        if original == ENDBR64[0] {
            let mut rest = [0u8; 3];
            self.read_in(tid, live, address + 1, &mut rest)?;
            if rest == ENDBR64[1..] {
                regs.rip = address + ENDBR64.len() as u64;
                return ptrace::setregs(tid, regs).map_err(|e| TargetError::from_errno(pid, "writing registers of", e));
            }
        }
        self.write_in(tid, live, address, &[original])?;
        let stepped = crate::remote::single_step(tid).map_err(|e| TargetError::from_errno(pid, "single-stepping", e));
        // Re-arm whatever the step did: the journal says `int3` is there.
        let rearmed = self.write_in(tid, live, address, &[INT3]);
        match stepped? {
            crate::remote::Step::Trapped => {}
            crate::remote::Step::Signal(signal) => {
                if let Some(state) = self.threads.get_mut(&tid) {
                    state.pending_signal.get_or_insert(signal);
                }
            }
            crate::remote::Step::OtherStop => {}
            crate::remote::Step::Exited => {
                self.threads.remove(&tid);
                self.foreign.remove(&tid);
            }
        }
        rearmed
    }

    fn read_in(&mut self, tid: Pid, live: bool, address: u64, buf: &mut [u8]) -> Result<(), TargetError> {
        if live {
            self.memory().read_exact(address, buf)
        } else {
            let bytes = foreign_memory(tid)?.read_vec(address, buf.len())?;
            buf.copy_from_slice(&bytes);
            Ok(())
        }
    }

    fn write_in(&mut self, tid: Pid, live: bool, address: u64, bytes: &[u8]) -> Result<(), TargetError> {
        if live {
            self.memory().write(address, bytes)
        } else {
            foreign_memory(tid)?.write(address, bytes)
        }
    }

    /// Interpret one wait status of live thread `tid`.
    pub(crate) fn absorb(&mut self, tid: Pid, status: WaitStatus, mode: Mode) -> Result<Absorbed, TargetError> {
        let pid = self.pid();
        let plain_cont = |signal: Option<Signal>| match ptrace::cont(tid, signal) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(errno) => Err(TargetError::from_errno(pid, "resuming", errno)),
        };
        // While stopping, a thread let go from any stop but our interrupt
        // must meet the interrupt again: the kernel clears a pending
        // interrupt whenever the thread enters *any* ptrace-stop ("any
        // trap clears pending STOP trap", kernel/signal.c), so a clone
        // event (raised inside the syscall, after our interrupt) or a
        // breakpoint trap taken after it would otherwise run on free, and
        // the world stop would wait for it for ever. Interrupting twice is
        // harmless: the request is a flag, answered by one stop.
        let cont = |signal: Option<Signal>| {
            if mode == Mode::Stopping {
                match ptrace::interrupt(tid) {
                    Ok(()) | Err(Errno::ESRCH) => {}
                    Err(errno) => return Err(TargetError::from_errno(pid, "interrupting", errno)),
                }
            }
            plain_cont(signal)
        };
        let breakpoint = match status {
            WaitStatus::Stopped(_, Signal::SIGTRAP) => self.breakpoint_trap(tid)?,
            _ => None,
        };
        match status {
            WaitStatus::PtraceEvent(_, signal, event) if event == PtraceEvent::PTRACE_EVENT_STOP as i32 => {
                if mode == Mode::Stopping && !is_stop_signal(signal) && self.int3_trap_pending(tid)? {
                    // Our interrupt overtook the trap of an `int3` the
                    // thread had just executed: the kernel takes a pending
                    // interrupt before dequeuing signals, so the thread
                    // sits one byte past the breakpoint with SIGTRAP still
                    // queued. Counted as stopped, it would take that
                    // SIGTRAP on resume — delivered, and fatal, once the
                    // breakpoint is forgotten. Let it take the trap now:
                    // its delivery stop comes next, is rewound and
                    // suppressed below, and interrupted again. (Not
                    // interrupted now: the interrupt would be taken first
                    // again.)
                    plain_cont(None)?;
                    return Ok(Absorbed::Running(None));
                }
                let state = self.threads.entry(tid).or_default();
                if mode == Mode::Stopping {
                    state.stopped = true;
                    state.group_stop = is_stop_signal(signal);
                    return Ok(Absorbed::Stopped);
                }
                if is_stop_signal(signal) {
                    // Job-control stop: stay stopped, keep reporting.
                    state.stopped = true;
                    state.group_stop = true;
                    shadowpatch_sys::ptrace_ext::listen(tid)
                        .or_else(|e| if e == Errno::ESRCH { Ok(()) } else { Err(e) })
                        .map_err(|e| TargetError::from_errno(pid, "listening to", e))?;
                    return Ok(Absorbed::Running(None));
                }
                // The end of a group-stop (SIGCONT) for a listener, or a new
                // thread's first stop: let it run.
                state.stopped = false;
                state.group_stop = false;
                cont(None)?;
                Ok(Absorbed::Running(None))
            }
            WaitStatus::PtraceEvent(_, _, event)
                if event == PtraceEvent::PTRACE_EVENT_CLONE as i32
                    || event == PtraceEvent::PTRACE_EVENT_FORK as i32
                    || event == PtraceEvent::PTRACE_EVENT_VFORK as i32 =>
            {
                let child = ptrace::getevent(tid)
                    .map(|m| Pid::from_raw(m as i32))
                    .map_err(|e| TargetError::from_errno(pid, "reading the clone event of", e))?;
                let report = if std::path::Path::new(&format!("/proc/{pid}/task/{child}")).exists() {
                    // A thread: traced from birth, its first stop is ahead.
                    self.threads.entry(child).or_default();
                    Event::NewThread { tid: child }
                } else {
                    let shares_memory = event != PtraceEvent::PTRACE_EVENT_FORK as i32;
                    let traced = self.adopt_foreign(child, shares_memory)?;
                    Event::NewProcess {
                        parent: tid,
                        child,
                        traced,
                    }
                };
                cont(None)?;
                Ok(Absorbed::Running(Some(report)))
            }
            WaitStatus::Stopped(..) if breakpoint.is_some() => {
                let address = breakpoint.expect("checked");
                if mode == Mode::Stopping {
                    // Interrupted again (see `cont`): it traps right after,
                    // with the thread at the breakpoint, which it
                    // re-executes on resume (or runs the original byte, if
                    // removed by then). The SIGTRAP is suppressed.
                    cont(None)?;
                    return Ok(Absorbed::Running(None));
                }
                let regs = ptrace::getregs(tid).map_err(|e| TargetError::from_errno(pid, "reading registers of", e))?;
                self.threads.entry(tid).or_default().stopped = true;
                Ok(Absorbed::Held(Event::Breakpoint {
                    tid,
                    address,
                    regs: Box::new(regs),
                }))
            }
            WaitStatus::Stopped(_, signal) if self.watched_signals.contains(&signal) => {
                // A watched signal (a watch window's fatal ones): hold the
                // thread before delivery, whatever raised it.
                let regs = ptrace::getregs(tid).map_err(|e| TargetError::from_errno(pid, "reading registers of", e))?;
                let state = self.threads.entry(tid).or_default();
                state.stopped = true;
                state.held = true;
                state.pending_signal = Some(signal);
                let event = Event::Signal {
                    tid,
                    signal,
                    regs: Box::new(regs),
                };
                if mode == Mode::Stopping {
                    // Counted as stopped for the world stop; reported by the
                    // next `next_event`. Our interrupt traps once released.
                    self.queued.push_back(event);
                    return Ok(Absorbed::Stopped);
                }
                Ok(Absorbed::Held(event))
            }
            WaitStatus::Stopped(_, signal) => {
                let info = ptrace::getsiginfo(tid).ok();
                // Raised by the CPU (si_code > 0), not sent by someone
                // (SI_USER is 0, tkill and sigqueue are negative).
                let synchronous = info.is_some_and(|i| i.si_code > 0)
                    && matches!(
                        signal,
                        Signal::SIGSEGV | Signal::SIGBUS | Signal::SIGILL | Signal::SIGFPE | Signal::SIGTRAP
                    );
                if mode == Mode::Events && synchronous {
                    let info = info.expect("checked");
                    let state = self.threads.entry(tid).or_default();
                    state.stopped = true;
                    state.pending_signal = Some(signal);
                    return Ok(Absorbed::Held(Event::Fault {
                        tid,
                        signal,
                        code: info.si_code,
                        address: shadowpatch_sys::siginfo::fault_address(&info),
                    }));
                }
                // Someone else's signal: deliver it now. While stopping,
                // the interrupt (made again by `cont`) traps right after.
                cont(Some(signal))?;
                Ok(Absorbed::Running(None))
            }
            WaitStatus::Exited(_, code) => {
                self.threads.remove(&tid);
                Ok(Absorbed::Gone {
                    code: Some(code),
                    signal: None,
                })
            }
            WaitStatus::Signaled(_, signal, _) => {
                self.threads.remove(&tid);
                Ok(Absorbed::Gone {
                    code: None,
                    signal: Some(signal),
                })
            }
            // Other events (exec, syscall stops) are not asked for; resume.
            _ => {
                cont(None)?;
                Ok(Absorbed::Running(None))
            }
        }
    }

    /// `Some(address)` when `tid` stopped on one of our `int3`s, with its
    /// instruction pointer rewound to the breakpoint.
    fn breakpoint_trap(&mut self, tid: Pid) -> Result<Option<u64>, TargetError> {
        if self.breakpoints.is_empty() {
            return Ok(None);
        }
        let pid = self.pid();
        let Ok(info) = ptrace::getsiginfo(tid) else {
            return Ok(None);
        };
        if info.si_code != SI_KERNEL {
            return Ok(None);
        }
        let mut regs = ptrace::getregs(tid).map_err(|e| TargetError::from_errno(pid, "reading registers of", e))?;
        let address = regs.rip.wrapping_sub(1);
        if !self.breakpoints.contains_key(&address) {
            return Ok(None);
        }
        regs.rip = address;
        ptrace::setregs(tid, regs).map_err(|e| TargetError::from_errno(pid, "rewinding", e))?;
        Ok(Some(address))
    }

    /// Whether `tid`, in an interrupt stop, executed one of our `int3`s
    /// whose SIGTRAP is still queued (the interrupt was taken first): its
    /// instruction pointer is one past a registered breakpoint and a
    /// SIGTRAP is pending for the thread itself (`SigPnd` of its status).
    fn int3_trap_pending(&self, tid: Pid) -> Result<bool, TargetError> {
        if self.breakpoints.is_empty() {
            return Ok(false);
        }
        let Ok(regs) = ptrace::getregs(tid) else {
            return Ok(false);
        };
        if !self.breakpoints.contains_key(&regs.rip.wrapping_sub(1)) {
            return Ok(false);
        }
        Ok(thread_signal_pending(self.pid(), tid, Signal::SIGTRAP))
    }

    /// A process the target just created (it is auto-attached). Without a
    /// breakpoint in place it is simply let go. With its own memory, our
    /// breakpoints are removed from that copy before it is let go. Sharing
    /// memory with the target (vfork), it stays traced until it execs or
    /// exits. Returns whether it stays traced.
    fn adopt_foreign(&mut self, child: Pid, shares_memory: bool) -> Result<bool, TargetError> {
        let pid = self.pid();
        // Its first stop is imminent (it is created with a trap pending).
        loop {
            match waitpid(child, Some(WaitPidFlag::__WALL)) {
                Ok(WaitStatus::PtraceEvent(..)) => break,
                // A signal before its first stop: keep it queued for it.
                Ok(WaitStatus::Stopped(_, signal)) => {
                    let _ = ptrace::cont(child, Some(signal));
                }
                Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(Errno::ECHILD) => return Ok(false),
                Ok(_) | Err(Errno::EINTR) => {}
                Err(errno) => return Err(TargetError::from_errno(pid, "waiting for a child of", errno)),
            }
        }
        if self.breakpoints.is_empty() || !shares_memory {
            if !self.breakpoints.is_empty() {
                let mut memory = foreign_memory(child)?;
                for (&address, &original) in &self.breakpoints {
                    if memory.read_vec(address, 1).is_ok_and(|b| b[0] == INT3) {
                        memory.write(address, &[original])?;
                    }
                }
            }
            let _ = ptrace::detach(child, None);
            return Ok(false);
        }
        // Exec replaces the memory: we want to know, to let it go then.
        let _ = ptrace::setoptions(child, self.options | Options::PTRACE_O_TRACEEXEC);
        let _ = ptrace::cont(child, None);
        self.foreign.insert(child, ForeignProcess { stopped: false });
        Ok(true)
    }

    /// Poll the foreign processes we still trace; true if any reported.
    fn poll_foreign(&mut self) -> Result<bool, TargetError> {
        let mut seen = false;
        let children: Vec<Pid> = self.foreign.keys().copied().collect();
        for child in children {
            let status = match waitpid(child, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::EINTR) => continue,
                Ok(status) => status,
                Err(_) => {
                    self.foreign.remove(&child);
                    continue;
                }
            };
            seen = true;
            let breakpoint = match status {
                WaitStatus::Stopped(_, Signal::SIGTRAP) => self.breakpoint_trap(child)?,
                _ => None,
            };
            match status {
                WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                    self.foreign.remove(&child);
                }
                WaitStatus::PtraceEvent(_, _, event) if event == PtraceEvent::PTRACE_EVENT_EXEC as i32 => {
                    // New program, new memory: nothing of ours left in it.
                    let _ = ptrace::detach(child, None);
                    self.foreign.remove(&child);
                }
                WaitStatus::Stopped(..) if breakpoint.is_some() => {
                    self.step_past_breakpoint_in(child, breakpoint.expect("checked"), false)?;
                    let _ = ptrace::cont(child, None);
                }
                WaitStatus::Stopped(_, signal) => {
                    let _ = ptrace::cont(child, Some(signal));
                }
                _ => {
                    let _ = ptrace::cont(child, None);
                }
            }
            if let Some(foreign) = self.foreign.get_mut(&child) {
                foreign.stopped = false;
            }
        }
        Ok(seen)
    }

    /// Let go of every foreign process (called once the breakpoints are
    /// gone from the target, and when detaching): a copy that still holds
    /// an `int3` gets its original byte back first.
    pub fn release_foreign(&mut self) {
        let children: Vec<Pid> = self.foreign.keys().copied().collect();
        for child in children {
            // Detaching needs a ptrace-stop.
            if ptrace::interrupt(child).is_ok() {
                loop {
                    match waitpid(child, Some(WaitPidFlag::__WALL)) {
                        Ok(WaitStatus::PtraceEvent(..)) => break,
                        Ok(WaitStatus::Stopped(_, signal)) => {
                            if signal == Signal::SIGTRAP {
                                if let Ok(Some(address)) = self.breakpoint_trap(child) {
                                    let _ = self.step_past_breakpoint_in(child, address, false);
                                    let _ = ptrace::cont(child, None);
                                    continue;
                                }
                            }
                            let _ = ptrace::cont(child, Some(signal));
                        }
                        Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            }
            if let Ok(mut memory) = foreign_memory(child) {
                for (&address, &original) in &self.breakpoints {
                    if memory.read_vec(address, 1).is_ok_and(|b| b[0] == INT3) {
                        let _ = memory.write(address, &[original]);
                    }
                }
            }
            let _ = ptrace::detach(child, None);
            self.foreign.remove(&child);
        }
    }

    /// Last resort before detaching: any registered breakpoint still armed
    /// in the target is restored (an untraced thread would die on it). The
    /// caller's journal still shows the probe open; `recover` then finds
    /// the original bytes and has nothing left to undo.
    pub(crate) fn disarm_leftover_breakpoints(&mut self) {
        let breakpoints: Vec<(u64, u8)> = self.breakpoints.iter().map(|(a, b)| (*a, *b)).collect();
        for (address, original) in breakpoints {
            if self.memory().read_vec(address, 1).is_ok_and(|b| b[0] == INT3) {
                tracing::warn!(address, "removing a breakpoint left armed before detaching");
                let _ = self.memory().write(address, &[original]);
            }
        }
    }
}

/// Whether `tid` is already traced by the calling thread (auto-attached).
pub(crate) fn traced_by_us(pid: i32, tid: Pid) -> bool {
    let me = nix::unistd::gettid().as_raw();
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("TracerPid:"))
            .and_then(|value| value.trim().parse::<i32>().ok())
            == Some(me)
    })
}

/// Whether `signal` is pending for thread `tid` itself (its private
/// queue: `SigPnd` in /proc/PID/task/TID/status, a hexadecimal mask).
fn thread_signal_pending(pid: i32, tid: Pid, signal: Signal) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).is_ok_and(|status| {
        status
            .lines()
            .find_map(|line| line.strip_prefix("SigPnd:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .is_some_and(|mask| mask & (1 << (signal as i32 - 1)) != 0)
    })
}

fn foreign_memory(child: Pid) -> Result<crate::TargetMemory, TargetError> {
    crate::TargetMemory::open(&crate::ProcessIdentity::of(child.as_raw())?)
}
