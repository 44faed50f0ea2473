//! Attaching to every thread of a target with `PTRACE_SEIZE`, stopping all
//! of them at once with `PTRACE_INTERRUPT`, and resuming them.
//!
//! Race-freedom: seizing re-scans /proc/PID/task until a scan finds no new
//! thread, and every stop re-scans again once all known threads are stopped
//! (a stopped thread cannot create another, so a scan that finds nothing new
//! with everything stopped is final; the kernel's thread count equal to
//! ours stands for that scan). Signals that arrive while we stop a
//! thread are re-injected, never swallowed; a thread in job-control stop
//! (SIGSTOP/SIGTSTP...) is left stopped with `PTRACE_LISTEN`.
//!
//! The stop window runs the tracer at `SCHED_FIFO` when permitted: on a
//! 2-core machine resumed threads otherwise starve the tracer that still has
//! threads to resume, stretching a 0.5 ms pause to tens of milliseconds.

use crate::memory::TargetMemory;
use crate::{ProcessIdentity, TargetError};
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use shadowpatch_sys::sched::RealtimeGuard;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// How many scans of /proc/PID/task may still find new threads before we
/// give up (a process creating threads faster than we can seize them).
const MAX_SCAN_ROUNDS: usize = 1000;

/// How long the tracer sleeps between polls of a leader not yet stopped:
/// short, since the stop usually comes within microseconds of its wake-up.
const LEADER_POLL: Duration = Duration::from_micros(10);
/// A leader still not stopped after this many polls is waiting for a CPU
/// (many targets stopped at once on few CPUs: a host-wide apply): the
/// sleep doubles every this many polls, up to `LEADER_POLL_LONGEST`, so
/// that the poller's wake-ups do not take the CPU the leader waits for.
const LEADER_POLLS_PER_STEP: u32 = 16;
const LEADER_POLL_LONGEST: Duration = Duration::from_micros(160);
/// How long the tracer blocks in `waitpid` for a leader's stop before it
/// polls (`wait_for_stop`): long enough for a leader waiting for a CPU
/// behind a host-wide apply's workers, short enough that a zombie leader
/// (which never reports) costs little.
const LEADER_BLOCK: Duration = Duration::from_millis(5);

/// The sleep after the `polls`-th poll of a leader not yet stopped.
fn leader_poll(polls: u32) -> Duration {
    let doublings = (polls / LEADER_POLLS_PER_STEP).min(8);
    (LEADER_POLL * (1 << doublings)).min(LEADER_POLL_LONGEST)
}

/// Whether the stop window may raise the tracer to real-time priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopPriority {
    /// SCHED_FIFO when permitted, else normal priority (reported).
    RealtimeIfPermitted,
    /// Always normal priority (for comparison in benchmarks).
    Normal,
}

/// Per-thread tracer state.
#[derive(Debug, Clone, Default)]
pub(crate) struct ThreadState {
    /// In a ptrace-stop we caused (interrupt or group-stop), or held at an
    /// event reported by `next_event` until `resume_thread`.
    pub(crate) stopped: bool,
    /// Stopped in job-control group-stop: resume with PTRACE_LISTEN.
    pub(crate) group_stop: bool,
    /// A signal caught while stopping, to deliver when we resume.
    pub(crate) pending_signal: Option<Signal>,
    /// Held in a signal-delivery-stop (a watched signal, see
    /// `watch_signals`) until `release_held`: resuming the world leaves it
    /// stopped.
    pub(crate) held: bool,
}

/// What `Attached::poll_signals` saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignalEvent {
    /// A thread stopped on the way to receiving one of the watched signals;
    /// it is held (stopped) until `release_held`.
    Held {
        tid: Pid,
        signal: Signal,
        regs: Box<libc::user_regs_struct>,
    },
    /// The process is gone (its main thread exited or was killed).
    Exited {
        pid: i32,
        code: Option<i32>,
        signal: Option<Signal>,
    },
}

/// All threads of one target, seized. Dropping it resumes and detaches
/// every thread, so the target is never left stopped or traced.
#[derive(Debug)]
pub struct Attached {
    identity: ProcessIdentity,
    pub(crate) threads: BTreeMap<Pid, ThreadState>,
    priority: StopPriority,
    /// Address of a `syscall` instruction in the target, found on first use.
    pub(crate) syscall_instruction: Option<u64>,
    /// Address of a `syscall; ret` sequence, for remote clones (see `remote`).
    pub(crate) syscall_return_gadget: Option<Option<u64>>,
    /// Address of libc's `__restore_rt`, for self-restoring remote calls.
    pub(crate) restore_rt: Option<Option<u64>>,
    memory: TargetMemory,
    /// ptrace options every traced thread carries (none outside sessions).
    pub(crate) options: ptrace::Options,
    /// Breakpoints (`int3`) the caller placed, with the byte each replaced:
    /// their traps are recognised, never delivered to the target.
    pub(crate) breakpoints: BTreeMap<u64, u8>,
    /// Processes the target created while traced with fork options: kept
    /// traced only while they may share memory holding our breakpoints.
    pub(crate) foreign: BTreeMap<Pid, crate::events::ForeignProcess>,
    /// Events noticed while stopping the world, reported by `next_event`.
    pub(crate) queued: VecDeque<crate::events::Event>,
    /// Longest sleep between two polls of `next_event`.
    pub(crate) poll_interval: Duration,
    /// Signals held rather than delivered (`watch_signals`): the event
    /// loop and a world stop that meet one hold its thread.
    pub(crate) watched_signals: Vec<Signal>,
    /// The next explicit [`Stopped::resume`] detaches every thread instead
    /// of resuming it (`release_at_next_resume`).
    release_at_resume: bool,
}

/// The timings of one stop-the-world window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PauseReport {
    /// Threads stopped.
    pub threads: usize,
    /// First interrupt sent → last thread confirmed stopped.
    pub stop_us: u64,
    /// Work done while stopped.
    pub work_us: u64,
    /// First resume → last thread resumed.
    pub resume_us: u64,
    /// First thread stopped → last thread resumed.
    pub pause_us: u64,
    /// Whether the tracer ran the window at SCHED_FIFO.
    pub realtime: bool,
}

impl Attached {
    /// Seize every thread of `identity` (without stopping them).
    pub fn seize(identity: &ProcessIdentity) -> Result<Self, TargetError> {
        identity.check_alive()?;
        let memory = TargetMemory::open(identity)?;
        let mut attached = Attached {
            identity: identity.clone(),
            threads: BTreeMap::new(),
            priority: StopPriority::RealtimeIfPermitted,
            syscall_instruction: None,
            syscall_return_gadget: None,
            restore_rt: None,
            memory,
            options: ptrace::Options::empty(),
            breakpoints: BTreeMap::new(),
            foreign: BTreeMap::new(),
            queued: VecDeque::new(),
            poll_interval: crate::events::DEFAULT_POLL_INTERVAL,
            watched_signals: Vec::new(),
            release_at_resume: false,
        };
        for _round in 0..MAX_SCAN_ROUNDS {
            // Every thread the kernel counts is seized (one stat of
            // /proc/PID/task, not a second listing to find nothing new).
            let new = attached.seize_new_threads()?;
            if new == 0 || thread_count(identity.pid) == Some(attached.threads.len()) {
                // After seizing, re-check the start time: the pid could have
                // been recycled between identification and the first seize.
                identity.check_alive()?;
                return Ok(attached);
            }
        }
        Err(TargetError::Sys {
            pid: identity.pid,
            action: "seizing the threads of",
            errno: Errno::EAGAIN,
        })
    }

    pub fn identity(&self) -> &ProcessIdentity {
        &self.identity
    }

    /// The ptrace options each thread is seized (or set) with: the
    /// session's, plus PTRACE_O_TRACESYSGOOD always. That option only marks
    /// the syscall stops of our remote calls (the only PTRACE_SYSCALL we
    /// make) as no signal; set once here rather than set and cleared
    /// around each call (two requests a call).
    pub(crate) fn thread_options(&self) -> ptrace::Options {
        self.options | ptrace::Options::PTRACE_O_TRACESYSGOOD
    }

    pub fn pid(&self) -> i32 {
        self.identity.pid
    }

    pub fn memory(&mut self) -> &mut TargetMemory {
        &mut self.memory
    }

    pub fn set_priority(&mut self, priority: StopPriority) {
        self.priority = priority;
    }

    pub fn thread_count(&self) -> usize {
        self.threads.len()
    }

    /// Seize threads listed in /proc/PID/task that we do not trace yet.
    /// Returns how many were new.
    fn seize_new_threads(&mut self) -> Result<usize, TargetError> {
        let pid = self.identity.pid;
        let mut new = 0;
        for tid in list_threads(pid)? {
            if self.threads.contains_key(&tid) {
                continue;
            }
            match ptrace::seize(tid, self.thread_options()) {
                Ok(()) => {
                    self.threads.insert(tid, ThreadState::default());
                    new += 1;
                }
                // The thread exited between the listing and the seize.
                Err(Errno::ESRCH) => {}
                // Auto-attached by PTRACE_O_TRACECLONE before its parent's
                // clone event reached us: already ours, it reports its
                // initial stop like any running thread.
                // (Not a zombie leader: a dying process keeps its leader
                // listed, still traced by us, until the last thread is
                // reaped; re-adding it every round made a stop of a target
                // dying meanwhile end in EAGAIN instead of "exited".)
                Err(Errno::EPERM) if crate::events::traced_by_us(pid, tid) && !is_zombie(pid, tid) => {
                    self.threads.insert(tid, ThreadState::default());
                    new += 1;
                }
                Err(Errno::EPERM) if tid.as_raw() != pid && self.threads.is_empty() => {
                    return Err(TargetError::PermissionDenied {
                        pid,
                        action: "attaching to",
                    })
                }
                // EPERM on a non-leader thread once others are seized: the
                // thread is exiting (the kernel refuses to trace PF_EXITING).
                Err(Errno::EPERM) if !self.threads.is_empty() => {}
                Err(errno) => return Err(TargetError::from_errno(pid, "attaching to", errno)),
            }
        }
        Ok(new)
    }

    /// Stop every thread. The returned guard resumes them when dropped;
    /// call [`Stopped::resume`] to get the timings.
    pub fn stop(&mut self) -> Result<Stopped<'_>, TargetError> {
        // Whatever a stop is for, the journal records announcing it are
        // durable first (deferred inside a batch: `durable`).
        crate::durable::flush().map_err(|errno| TargetError::Sys {
            pid: self.identity.pid,
            action: "syncing the state files (syncfs) before stopping",
            errno,
        })?;
        let realtime = match self.priority {
            StopPriority::RealtimeIfPermitted => RealtimeWindow::enter(),
            StopPriority::Normal => None,
        };
        let started = Instant::now();
        match self.stop_all_threads() {
            Ok(()) => Ok(Stopped {
                attached: self,
                realtime,
                started,
                stopped_at: Instant::now(),
                resumed: false,
            }),
            Err(error) => {
                // Never leave some threads stopped after a failed stop.
                let _ = self.resume_all_threads();
                Err(error)
            }
        }
    }

    fn stop_all_threads(&mut self) -> Result<(), TargetError> {
        let pid = self.identity.pid;
        for _round in 0..MAX_SCAN_ROUNDS {
            let to_stop: Vec<Pid> = self
                .threads
                .iter()
                .filter(|(_, state)| !state.stopped)
                .map(|(tid, _)| *tid)
                .collect();
            for tid in &to_stop {
                match ptrace::interrupt(*tid) {
                    Ok(()) => {}
                    // Exiting thread: waitpid below reports its exit.
                    Err(Errno::ESRCH) => {}
                    Err(errno) => return Err(TargetError::from_errno(pid, "interrupting", errno)),
                }
            }
            // The leader last: a dying leader is reported only once every
            // other thread is reaped, which waiting for them does.
            let mut to_stop = to_stop;
            to_stop.sort_by_key(|tid| tid.as_raw() == pid);
            // A zombie leader (it exited, or the whole process was killed)
            // is reported by waitpid only once every other thread is
            // reaped: `wait_for_stop` polls the leader and asks /proc
            // whether it is one only when it does not stop at once.
            for tid in to_stop {
                self.wait_for_stop(tid)?;
            }
            if self.threads.is_empty() {
                return Err(TargetError::Exited {
                    pid,
                    during: "stopping its threads",
                });
            }
            // Everything we know is stopped; threads created before their
            // parent stopped appear now (or were registered from a clone
            // event met while waiting). None new: the world is stopped.
            // The kernel's count says so in one `stat` when it equals ours
            // (every thread we count has just reported a stop, so it is
            // alive and in the group); the directory, ~30-80 µs of the stop
            // at 64 threads, is read only when a thread is missing or gone.
            if self.threads.values().all(|s| s.stopped) && thread_count(pid) == Some(self.threads.len()) {
                return Ok(());
            }
            if self.seize_new_threads()? == 0 && self.threads.values().all(|s| s.stopped) {
                return Ok(());
            }
        }
        Err(TargetError::Sys {
            pid,
            action: "stopping the threads of",
            errno: Errno::EAGAIN,
        })
    }

    /// Wait until `tid` reports our interrupt (or a group-stop), passing on
    /// any signal that arrives first. Removes the thread if it exited. The
    /// other stops met on the way are absorbed as `events::absorb` says
    /// (breakpoint traps rewound and suppressed, clone events registered).
    fn wait_for_stop(&mut self, tid: Pid) -> Result<(), TargetError> {
        // The leader is never waited for without a deadline: if the process
        // dies meanwhile (a thread we count as stopped killed with it), its
        // report can wait for ever on a thread nobody reaps, and a dead
        // target its parent has not reaped stays a zombie. /proc says so.
        let leader = tid.as_raw() == self.identity.pid;
        let flags = if leader {
            WaitPidFlag::__WALL | WaitPidFlag::WNOHANG
        } else {
            WaitPidFlag::__WALL
        };
        let mut polls: u32 = 0;
        // The leader is first waited for blocking, up to `LEADER_BLOCK`:
        // woken the moment it stops, with no poll's sleep and wake-up (a
        // twentieth of a host-wide apply's CPU went to those). Past the
        // deadline (or without a timer), it is polled as below.
        let mut blocking = leader;
        loop {
            let result = if blocking {
                match shadowpatch_sys::alarm::interrupt_after(LEADER_BLOCK, || waitpid(tid, Some(WaitPidFlag::__WALL)))
                {
                    Some(Err(Errno::EINTR)) | None => {
                        blocking = false;
                        continue;
                    }
                    Some(result) => result,
                }
            } else {
                waitpid(tid, Some(flags))
            };
            let status = match result {
                Ok(WaitStatus::StillAlive) => {
                    // /proc says whether it is a zombie at the second poll
                    // and then every 16th (~0.2 ms apart), never the first:
                    // a live leader (woken from a blocking call by the
                    // interrupt) is usually stopped within microseconds,
                    // and a read of /proc (~10-20 µs) before every leader's
                    // wait lengthened every stop; reading it at every poll
                    // cost more than the wait when many targets were
                    // stopped one after another.
                    polls = polls.wrapping_add(1);
                    if (polls == 2 || polls.is_multiple_of(16)) && is_zombie(self.identity.pid, tid) {
                        self.threads.remove(&tid);
                        return Ok(());
                    }
                    // A real sleep, not a yield: at SCHED_FIFO a yield
                    // would not let the (normal-priority) leader run.
                    std::thread::sleep(leader_poll(polls));
                    continue;
                }
                Ok(status) => status,
                // The thread was reaped elsewhere (exec by another thread).
                Err(Errno::ECHILD) => {
                    self.threads.remove(&tid);
                    return Ok(());
                }
                Err(Errno::EINTR) => continue,
                Err(errno) => return Err(TargetError::from_errno(self.identity.pid, "waiting for", errno)),
            };
            match self.absorb(tid, status, crate::events::Mode::Stopping)? {
                crate::events::Absorbed::Stopped | crate::events::Absorbed::Gone { .. } => return Ok(()),
                crate::events::Absorbed::Running(event) => self.queued.extend(event),
                crate::events::Absorbed::Held(_) => unreachable!("stopping mode never holds a thread"),
            }
        }
    }

    fn resume_all_threads(&mut self) -> Result<(), TargetError> {
        let pid = self.identity.pid;
        let mut first_error = None;
        for (tid, state) in self.threads.iter_mut().filter(|(_, s)| s.stopped && !s.held) {
            let result = if state.group_stop {
                shadowpatch_sys::ptrace_ext::listen(*tid)
            } else {
                ptrace::cont(*tid, state.pending_signal)
            };
            match result {
                Ok(()) | Err(Errno::ESRCH) => {
                    state.stopped = false;
                    state.pending_signal = None;
                }
                Err(errno) => {
                    first_error.get_or_insert(TargetError::from_errno(pid, "resuming", errno));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Stop and resume every thread `rounds` times; one report per round
    /// (`shadowpatch pause` and the bench's stop-the-world rows).
    pub fn stop_resume_rounds(&mut self, rounds: u32) -> Result<Vec<PauseReport>, TargetError> {
        let mut reports = Vec::with_capacity(rounds as usize);
        for _ in 0..rounds {
            reports.push(self.stop()?.resume()?);
        }
        Ok(reports)
    }

    /// From now on, hold these signals (see `poll_signals`) instead of
    /// delivering them when a stop meets them.
    pub fn watch_signals(&mut self, signals: &[Signal]) {
        self.watched_signals = signals.to_vec();
    }

    /// Without blocking, the next watched signal or the process's end: a
    /// filter over [`Attached::next_event`] (the one event loop) for the
    /// watch window. A signal in `watched` holds its thread in
    /// signal-delivery-stop (the signal not yet delivered) and is returned;
    /// other signals are passed on at once and job-control stops listened
    /// through (as `next_event` does). The window sets no clone option, so
    /// threads created since the last call are found by a /proc rescan and
    /// seized: a new thread's fault is seen too.
    pub fn poll_signals(&mut self, watched: &[Signal]) -> Result<Option<SignalEvent>, TargetError> {
        use crate::events::Event;
        let pid = self.identity.pid;
        self.watched_signals = watched.to_vec();
        // A process that is exiting cannot be listed; its exit status says
        // how it ended, so a failed scan is not an error here.
        let _ = self.seize_new_threads();
        loop {
            let event = match self.next_event(Duration::ZERO) {
                Ok(Some(event)) => event,
                Ok(None) => return Ok(None),
                Err(TargetError::Exited { .. }) => {
                    return Ok(Some(SignalEvent::Exited {
                        pid,
                        code: None,
                        signal: None,
                    }))
                }
                Err(error) => return Err(error),
            };
            match event {
                Event::Signal { tid, signal, regs } => return Ok(Some(SignalEvent::Held { tid, signal, regs })),
                Event::Exited {
                    tid,
                    process,
                    code,
                    signal,
                } if process || tid.as_raw() == pid => return Ok(Some(SignalEvent::Exited { pid, code, signal })),
                // A synchronous fault that is not watched: delivered at
                // once, as it would be untraced.
                Event::Fault { tid, .. } => self.resume_thread(tid, None)?,
                // No breakpoint is registered in a window; should one be,
                // its thread is rewound to it and re-executes it.
                Event::Breakpoint { tid, .. } => self.resume_thread(tid, None)?,
                Event::Exited { .. } | Event::NewThread { .. } | Event::NewProcess { .. } => {}
            }
        }
    }

    /// Resume a thread held by `poll_signals`, delivering `signal` (the
    /// held one, or `None` to suppress it).
    pub fn release_held(&mut self, tid: Pid, signal: Option<Signal>) -> Result<(), TargetError> {
        let pid = self.identity.pid;
        match ptrace::cont(tid, signal) {
            Ok(()) | Err(Errno::ESRCH) => {}
            Err(errno) => return Err(TargetError::from_errno(pid, "resuming", errno)),
        }
        if let Some(state) = self.threads.get_mut(&tid) {
            state.stopped = false;
            state.held = false;
            state.pending_signal = None;
        }
        Ok(())
    }

    /// Set the general registers and the x87/SSE state of a held thread.
    pub fn set_held_registers(
        &mut self,
        tid: Pid,
        regs: libc::user_regs_struct,
        xmms: &[[u8; 16]; 8],
    ) -> Result<(), TargetError> {
        use nix::sys::ptrace::regset::NT_PRFPREG;
        let pid = self.identity.pid;
        let mut fp = ptrace::getregset::<NT_PRFPREG>(tid)
            .map_err(|errno| TargetError::from_errno(pid, "reading SSE registers of", errno))?;
        for (k, xmm) in xmms.iter().enumerate() {
            for word in 0..4 {
                fp.xmm_space[4 * k + word] = u32::from_le_bytes(xmm[4 * word..4 * word + 4].try_into().expect("4"));
            }
        }
        ptrace::setregset::<NT_PRFPREG>(tid, fp)
            .map_err(|errno| TargetError::from_errno(pid, "writing SSE registers of", errno))?;
        ptrace::setregs(tid, regs).map_err(|errno| TargetError::from_errno(pid, "writing registers of", errno))
    }

    /// Record a signal to deliver to `tid` at resume (used by remote syscalls
    /// when a foreign signal interrupts them).
    pub(crate) fn defer_signal(&mut self, tid: Pid, signal: Signal) {
        if let Some(state) = self.threads.get_mut(&tid) {
            state.pending_signal.get_or_insert(signal);
        }
    }

    /// Whether `tid` is in a ptrace-stop we control (stopped by us or held
    /// at an event), not in job-control group-stop, and not held for the
    /// watch window (`poll_signals`).
    pub fn is_stopped(&self, tid: Pid) -> bool {
        self.threads
            .get(&tid)
            .is_some_and(|s| s.stopped && !s.group_stop && !s.held)
    }

    /// The error for a thread that is not ours to borrow: a thread in
    /// job-control stop says the process is stopped (`action` is what the
    /// caller was about to do), any other says so plainly.
    pub(crate) fn not_borrowable(&self, tid: Pid, action: &'static str) -> TargetError {
        let pid = self.pid();
        match self.threads.get(&tid) {
            Some(state) if state.stopped && state.group_stop => TargetError::JobControlStopped { pid, action },
            _ => TargetError::ThreadNotStopped { pid, tid: tid.as_raw() },
        }
    }

    pub(crate) fn forget_thread(&mut self, tid: Pid) {
        self.threads.remove(&tid);
    }

    /// Detach from every thread (stopping them first, as PTRACE_DETACH
    /// requires a ptrace-stop), delivering any signals still owed.
    pub fn detach(mut self) -> Result<(), TargetError> {
        self.detach_all()
    }

    fn detach_all(&mut self) -> Result<(), TargetError> {
        if self.threads.is_empty() {
            return Ok(());
        }
        // Detaching needs every thread stopped first: the same starvation
        // as any stop window applies, so run it at real-time priority too.
        let _realtime = match self.priority {
            StopPriority::RealtimeIfPermitted => RealtimeWindow::enter(),
            StopPriority::Normal => None,
        };
        let stop_result = self.stop_all_threads();
        self.detach_stopped();
        self.detach_strays();
        stop_result.map(drop)
    }

    /// Detach every thread, each in a ptrace-stop (which a detach ends).
    fn detach_stopped(&mut self) {
        self.disarm_leftover_breakpoints();
        self.release_foreign();
        let threads = std::mem::take(&mut self.threads);
        for (tid, state) in threads {
            // Detaching a group-stopped thread leaves it in group-stop, as
            // it was before we came; others run on with their owed signal.
            let signal = if state.group_stop { None } else { state.pending_signal };
            let _ = ptrace::detach(tid, signal);
        }
    }

    /// Make the next explicit [`Stopped::resume`] (not a stop dropped
    /// unresumed) detach the target instead of resuming it: a transaction
    /// whose last stop is its activation lets go of the target there,
    /// rather than stop every thread once more only to detach (a third of
    /// a host-wide apply's stops). `false` takes it back (the activation
    /// failed, and undoing it needs the target seized).
    pub fn release_at_next_resume(&mut self, release: bool) {
        self.release_at_resume = release;
    }

    /// Whether this tracer has let go of the target (no thread traced).
    pub fn released(&self) -> bool {
        self.threads.is_empty()
    }

    /// Let go of any thread of the target still traced by this thread
    /// that the map lost track of (seen once: a thread auto-attached at
    /// clone stayed traced after detach, and when the process was killed
    /// its zombie waited for ever for us to reap it, blocking its parent's
    /// wait). Each is interrupted and detached; a dead one is reaped (a
    /// traced zombie thread is the tracer's to reap). Bounded: a thread
    /// that never reports is left after 100 ms.
    fn detach_strays(&mut self) {
        let pid = self.identity.pid;
        let Ok(tids) = list_threads(pid) else {
            return;
        };
        for tid in tids {
            if tid.as_raw() == pid || !crate::events::traced_by_us(pid, tid) {
                continue;
            }
            tracing::warn!(
                pid,
                tid = tid.as_raw(),
                "detaching a traced thread the tracer had lost track of"
            );
            let _ = ptrace::interrupt(tid);
            let deadline = Instant::now() + std::time::Duration::from_millis(100);
            loop {
                match waitpid(tid, Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) if Instant::now() < deadline => {
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                    Ok(WaitStatus::Exited(..) | WaitStatus::Signaled(..)) | Err(_) => break,
                    Ok(WaitStatus::Stopped(_, signal)) => {
                        let _ = ptrace::detach(tid, Some(signal));
                        break;
                    }
                    Ok(_) => {
                        let _ = ptrace::detach(tid, None);
                        break;
                    }
                }
            }
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = self.detach_all();
    }
}

/// Stop windows at real-time priority at once in this process: at most
/// one CPU fewer than there are. A window's thread polls its target's
/// leader (`wait_for_stop`); with as many such threads as CPUs, the
/// targets (normal priority) never get a CPU to reach their stop, and a
/// host-wide apply with many workers spent seconds in one pause. A window
/// waits up to `REALTIME_SLOT_WAIT` for a slot (windows last a fraction of
/// a millisecond: waiting kept the median pause at half of what running
/// at normal priority at once gave), then runs at normal priority (as an
/// unprivileged tracer's always do): a thread never waits long, nor for
/// ever, for another one's window.
static REALTIME_SLOTS: (std::sync::Mutex<usize>, std::sync::Condvar) =
    (std::sync::Mutex::new(0), std::sync::Condvar::new());
const REALTIME_SLOT_WAIT: std::time::Duration = std::time::Duration::from_millis(10);

thread_local! {
    /// Slots this thread holds (a window inside a window takes none).
    static SLOTS_HELD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn realtime_slot_limit() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .saturating_sub(1)
            .max(1)
    })
}

/// A stop window at real-time priority: a slot among the process's
/// windows (waited for), then `SCHED_FIFO` for the calling thread.
#[derive(Debug)]
struct RealtimeWindow {
    // Dropped first: normal priority again before the slot is given back.
    _guard: RealtimeGuard,
    _slot: RealtimeSlot,
}

impl RealtimeWindow {
    /// `None` when every slot is taken or the thread may not raise its
    /// priority: then the window runs at normal priority.
    fn enter() -> Option<Self> {
        let slot = RealtimeSlot::take()?;
        let guard = RealtimeGuard::enter().ok()?;
        Some(RealtimeWindow {
            _guard: guard,
            _slot: slot,
        })
    }
}

#[derive(Debug)]
struct RealtimeSlot {
    counted: bool,
}

impl RealtimeSlot {
    /// A slot, if one is free within `REALTIME_SLOT_WAIT` (a window inside
    /// this thread's window always gets one: it is the same window).
    fn take() -> Option<Self> {
        if SLOTS_HELD.with(|held| held.get()) > 0 {
            SLOTS_HELD.with(|held| held.set(held.get() + 1));
            return Some(RealtimeSlot { counted: false });
        }
        let (busy, freed) = &REALTIME_SLOTS;
        let deadline = Instant::now() + REALTIME_SLOT_WAIT;
        let mut busy = busy.lock().unwrap_or_else(|p| p.into_inner());
        while *busy >= realtime_slot_limit() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            busy = freed.wait_timeout(busy, left).unwrap_or_else(|p| p.into_inner()).0;
        }
        *busy += 1;
        SLOTS_HELD.with(|held| held.set(1));
        Some(RealtimeSlot { counted: true })
    }
}

impl Drop for RealtimeSlot {
    fn drop(&mut self) {
        SLOTS_HELD.with(|held| held.set(held.get().saturating_sub(1)));
        if self.counted {
            let (busy, freed) = &REALTIME_SLOTS;
            *busy.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
            freed.notify_one();
        }
    }
}

/// The world, stopped. Resumes every thread when dropped.
#[derive(Debug)]
pub struct Stopped<'a> {
    attached: &'a mut Attached,
    realtime: Option<RealtimeWindow>,
    started: Instant,
    stopped_at: Instant,
    resumed: bool,
}

impl Stopped<'_> {
    pub fn attached(&mut self) -> &mut Attached {
        self.attached
    }

    /// Threads in ptrace-stop (group-stopped threads included).
    pub fn threads(&self) -> Vec<Pid> {
        self.attached
            .threads
            .iter()
            .filter(|(_, s)| s.stopped)
            .map(|(tid, _)| *tid)
            .collect()
    }

    /// The thread to borrow for remote syscalls: the main thread when it is
    /// stopped like the others, else the first stopped thread. A thread in
    /// job-control stop is taken only when every thread is (the remote call
    /// then says the process is stopped by job control).
    pub fn borrowable_thread(&self) -> Pid {
        // Never a thread held in signal-delivery-stop (`poll_signals`).
        let candidates = |allow_group_stop: bool| -> Vec<Pid> {
            self.attached
                .threads
                .iter()
                .filter(|(_, s)| s.stopped && !s.held && (allow_group_stop || !s.group_stop))
                .map(|(tid, _)| *tid)
                .collect()
        };
        let mut threads = candidates(false);
        if threads.is_empty() {
            threads = candidates(true);
        }
        let main = Pid::from_raw(self.attached.pid());
        if threads.contains(&main) {
            main
        } else {
            threads[0]
        }
    }

    /// Time from the first interrupt to the last thread stopped.
    pub fn stop_latency(&self) -> Duration {
        self.stopped_at - self.started
    }

    /// General-purpose registers of a stopped thread.
    pub fn regs(&self, tid: Pid) -> Result<libc::user_regs_struct, TargetError> {
        ptrace::getregs(tid)
            .map_err(|errno| TargetError::from_errno(self.attached.pid(), "reading registers of", errno))
    }

    /// The instruction pointer of a stopped thread: one `PTRACE_PEEKUSER`,
    /// half the cost of reading every register, for a check of where each
    /// of many threads is.
    pub fn instruction_pointer(&self, tid: Pid) -> Result<u64, TargetError> {
        ptrace::read_user(tid, crate::remote::RIP_OFFSET as ptrace::AddressType)
            .map(|rip| rip as u64)
            .map_err(|errno| TargetError::from_errno(self.attached.pid(), "reading registers of", errno))
    }

    pub fn memory(&mut self) -> &mut TargetMemory {
        &mut self.attached.memory
    }

    /// The target's pid.
    pub fn pid(&self) -> i32 {
        self.attached.pid()
    }

    /// Resume every thread; returns the window's timings.
    pub fn resume(mut self) -> Result<PauseReport, TargetError> {
        if std::mem::take(&mut self.attached.release_at_resume) {
            let report = self.end(|attached| {
                attached.detach_stopped();
                Ok(())
            });
            // After the pause: threads this tracer lost track of, if any.
            self.attached.detach_strays();
            return report;
        }
        self.resume_inner()
    }

    fn resume_inner(&mut self) -> Result<PauseReport, TargetError> {
        self.end(Attached::resume_all_threads)
    }

    /// End the stop with `let_go` (resume every thread, or detach every
    /// one: `release_at_next_resume`), timed.
    fn end(
        &mut self,
        let_go: impl FnOnce(&mut Attached) -> Result<(), TargetError>,
    ) -> Result<PauseReport, TargetError> {
        let resume_started = Instant::now();
        let threads = self.threads().len();
        self.resumed = true;
        let result = let_go(self.attached);
        let resumed_at = Instant::now();
        let realtime = self.realtime.take().is_some();
        result?;
        Ok(PauseReport {
            threads,
            stop_us: micros(self.stopped_at - self.started),
            work_us: micros(resume_started - self.stopped_at),
            resume_us: micros(resumed_at - resume_started),
            pause_us: micros(resumed_at - self.started),
            realtime,
        })
    }
}

impl Drop for Stopped<'_> {
    fn drop(&mut self) {
        if !self.resumed {
            let _ = self.resume_inner();
        }
    }
}

fn micros(duration: Duration) -> u64 {
    duration.as_micros() as u64
}

fn is_zombie(pid: i32, tid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat"))
        .map(|stat| {
            stat.rsplit_once(") ")
                .is_none_or(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X'))
        })
        .unwrap_or(true)
}

pub(crate) fn is_stop_signal(signal: Signal) -> bool {
    matches!(
        signal,
        Signal::SIGSTOP | Signal::SIGTSTP | Signal::SIGTTIN | Signal::SIGTTOU
    )
}

/// How many threads `pid` has, from the link count of /proc/PID/task
/// (two plus one per thread: the kernel's own count, in one `stat`);
/// `None` when it cannot be read.
pub fn thread_count(pid: i32) -> Option<usize> {
    use std::os::unix::fs::MetadataExt;
    let links = std::fs::metadata(format!("/proc/{pid}/task")).ok()?.nlink();
    usize::try_from(links.checked_sub(2)?).ok()
}

/// List the thread ids of `pid`. Reads the directory directly instead of
/// through `procfs`'s task iterator, which opens every task's directory:
/// this runs inside the stop window, where each microsecond counts.
pub fn list_threads(pid: i32) -> Result<Vec<Pid>, TargetError> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/task")).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => TargetError::NoSuchProcess { pid },
        std::io::ErrorKind::PermissionDenied => TargetError::PermissionDenied {
            pid,
            action: "listing threads of",
        },
        _ => TargetError::Proc {
            pid,
            file: "task",
            message: e.to_string(),
        },
    })?;
    Ok(entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .map(Pid::from_raw)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_is_polled_quickly_first_then_less_often() {
        assert_eq!(leader_poll(1), LEADER_POLL);
        assert_eq!(leader_poll(LEADER_POLLS_PER_STEP - 1), LEADER_POLL);
        assert_eq!(leader_poll(LEADER_POLLS_PER_STEP), LEADER_POLL * 2);
        let sleeps: Vec<Duration> = (0..1000).map(leader_poll).collect();
        assert!(sleeps.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(sleeps.last(), Some(&LEADER_POLL_LONGEST));
        assert_eq!(leader_poll(u32::MAX), LEADER_POLL_LONGEST);
    }
}
