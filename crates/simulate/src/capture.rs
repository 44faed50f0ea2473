//! Capturing live calls: an `int3` at the entry of every replaced function
//! (journaled first as a probe transaction), and at each hit a copy of the
//! process made from the calling thread with a remote `clone`, after which
//! the live thread continues at once. The copies wait, stopped at the entry
//! of the captured call, for the simulation; the breakpoints are removed
//! as soon as every function has its calls (a hot function pays a trap per
//! call while its breakpoint is in).
//!
//! What the live process sees: per captured call, one pause of the calling
//! thread (the trap, the clone, a single step past the entry), reported per
//! capture; per other hit while armed, a trap and a step; no signal, no
//! waitable child, no byte of its memory changed beyond the journaled
//! breakpoints, which are gone when the session ends.

use super::{Progress, SimulateError};
use shadowpatch_patch::activate::{switch, Direction, DEFAULT_ATTEMPTS};
use shadowpatch_patch::fault;
use shadowpatch_patch::journal::{TxnKind, Write5};
use shadowpatch_patch::state::TargetState;
use shadowpatch_patch::trampoline::FunctionSite;
use shadowpatch_patch::writes::PlainWrites;
use shadowpatch_process::events::{Event, INT3, SESSION_OPTIONS};
use shadowpatch_process::{Attached, ProcessCopy};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How many live calls to capture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CaptureLimit {
    /// Calls per replaced function.
    pub calls: u32,
    /// Give up waiting after this long (None: wait until every function has
    /// its calls, or the caller cancels).
    pub within: Option<Duration>,
    /// Spread the captures over the calls instead of taking the first
    /// ones: after each capture of a function, skip twice as many of its
    /// calls as before (0, 1, 2, 4, ... at most `SPREAD_MAX_GAP`), unless
    /// `SPREAD_WAIT` passed since its last capture. Consecutive calls of a
    /// dispatcher come from one request: the first 8 of Debian memcached's
    /// command dispatcher were the sets and gets of two connections, never
    /// a delete, and a patch crashing every delete looked clean.
    #[serde(default)]
    pub spread: bool,
}

/// The most calls skipped between two captures of one function when
/// spreading.
pub const SPREAD_MAX_GAP: u32 = 64;
/// A call this long after the function's last capture is taken whatever
/// the gap (a rarely called function is not skipped past its window).
pub const SPREAD_WAIT: Duration = Duration::from_millis(200);

/// A live call, frozen in a copy of the process at the function's entry.
#[derive(Debug)]
pub struct Captured {
    /// Index of the function in the patch's replacements.
    pub function: usize,
    pub copy: ProcessCopy,
    /// Registers at the entry (rip at the breakpoint, rsp at the return
    /// address).
    pub entry: libc::user_regs_struct,
    pub thread: i32,
    /// How long the live thread was held, from our noticing the trap to
    /// its resumption.
    pub pause_us: u64,
    /// The service's sockets when the call was captured (descriptor
    /// numbers): where its caller's reply goes.
    pub sockets: std::collections::BTreeSet<i32>,
}

/// What a capture session did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CaptureStats {
    /// Breakpoint hits (captured or not).
    pub hits: u64,
    pub captured: u64,
    /// Hits passed over to spread the captures (`CaptureLimit::spread`).
    pub skipped: u64,
    /// Per captured call, the live thread's pause (µs).
    pub pauses_us: Vec<u64>,
    /// Breakpoints in place, first written → last removed (µs).
    pub armed_us: u64,
    /// The stops that wrote and removed the breakpoints (µs).
    pub arm_pause_us: u64,
    pub disarm_pause_us: u64,
    pub new_threads: u64,
    pub new_processes: u64,
    /// Faults of the service itself while armed (delivered as they were).
    pub faults: u64,
}

/// Run a capture session on `attached` for `sites`, `wanted[i]` calls of
/// site `i` (`limit.calls` each when empty). `made` hears of every copy
/// (its pid in the target) as soon as it exists.
#[allow(clippy::too_many_arguments)]
pub fn capture(
    attached: &mut Attached,
    target: &mut TargetState,
    label: &str,
    sites: &[(FunctionSite, String)],
    limit: &CaptureLimit,
    wanted: &[u32],
    cancel: Option<&AtomicBool>,
    progress: &mut dyn FnMut(Progress),
    made: &mut dyn FnMut(i64),
) -> Result<(Vec<Captured>, CaptureStats), SimulateError> {
    let entries: Vec<(String, u64)> = sites.iter().map(|(s, _)| (s.symbol.clone(), s.entry)).collect();
    let mut probe = Probe::arm(attached, target, label, &entries)?;
    progress(Progress::Armed { functions: sites.len() });
    let mut stats = CaptureStats {
        arm_pause_us: probe.arm_pause_us,
        ..CaptureStats::default()
    };
    let mut captured = Vec::new();
    let wanted: Vec<u32> = (0..sites.len())
        .map(|index| wanted.get(index).copied().unwrap_or(limit.calls))
        .collect();
    let result = run_loop(
        &mut probe,
        sites,
        limit,
        &wanted,
        cancel,
        &mut stats,
        &mut captured,
        progress,
        made,
    );
    let (armed_us, disarm_pause_us) = probe.finish(&result)?;
    stats.armed_us = armed_us;
    stats.disarm_pause_us = disarm_pause_us;
    result?;
    Ok((captured, stats))
}

/// Journaled breakpoints at function entries, armed in one stop with the
/// session's ptrace options, removed (per function, or all at the end) in
/// one stop each. The probe transaction commits when they are all out.
#[derive(Debug)]
pub struct Probe<'a> {
    pub attached: &'a mut Attached,
    target: &'a mut TargetState,
    transaction: Option<PlainWrites>,
    pub writes: Vec<Write5>,
    pub armed: Vec<bool>,
    armed_at: Instant,
    pub arm_pause_us: u64,
}

impl<'a> Probe<'a> {
    /// Journal, then write an `int3` at each `(symbol, entry)`.
    pub fn arm(
        attached: &'a mut Attached,
        target: &'a mut TargetState,
        label: &str,
        entries: &[(String, u64)],
    ) -> Result<Probe<'a>, SimulateError> {
        let pid = attached.pid();
        let mut writes = Vec::new();
        for (symbol, entry) in entries {
            let original = attached.memory().read_vec(*entry, 1)?;
            if original[0] == INT3 {
                return Err(SimulateError::AlreadyTrapped {
                    pid,
                    symbol: symbol.clone(),
                    address: *entry,
                });
            }
            writes.push(Write5 {
                address: *entry,
                original,
                new: vec![INT3],
            });
        }
        // Found now, not in the first capture's pause: it scans memory.
        attached.prepare_remote_calls()?;
        let identity = attached.identity().clone();
        let transaction = PlainWrites::begin(target, &identity, TxnKind::Probe, label, writes.clone(), None)?;
        fault::point("capture-begin");
        let breakpoints: Vec<(u64, u8)> = writes.iter().map(|w| (w.address, w.original[0])).collect();
        attached.watch_breakpoints(&breakpoints);
        let armed_at = Instant::now();
        let arm = switch(
            attached,
            &writes,
            Direction::Forward,
            DEFAULT_ATTEMPTS,
            "capture-",
            &mut |stopped| Ok(stopped.set_options(SESSION_OPTIONS)?),
        );
        let arm = match arm {
            Ok(arm) => arm,
            Err(error) => {
                attached.forget_breakpoints();
                transaction.abort(target, &error.to_string())?;
                return Err(error.into());
            }
        };
        fault::point("capture-armed");
        Ok(Probe {
            armed: vec![true; writes.len()],
            attached,
            target,
            transaction: Some(transaction),
            writes,
            armed_at,
            arm_pause_us: arm.pause.pause_us,
        })
    }

    /// Take out the breakpoint of entry `index` (its callers stop paying).
    pub fn disarm(&mut self, index: usize) -> Result<(), SimulateError> {
        if self.armed[index] {
            switch(
                self.attached,
                std::slice::from_ref(&self.writes[index]),
                Direction::Backward,
                DEFAULT_ATTEMPTS,
                "capture-disarm-",
                &mut |_| Ok(()),
            )?;
            self.armed[index] = false;
        }
        Ok(())
    }

    /// Out with the breakpoints still in, in one stop that also clears the
    /// session's ptrace options; commit (or, after `outcome` failed,
    /// abort) the probe. Returns (µs armed, µs of the last stop).
    pub fn finish<T>(mut self, outcome: &Result<T, SimulateError>) -> Result<(u64, u64), SimulateError> {
        let still: Vec<Write5> = self
            .writes
            .iter()
            .zip(&self.armed)
            .filter(|(_, armed)| **armed)
            .map(|(w, _)| w.clone())
            .collect();
        let disarm = switch(
            self.attached,
            &still,
            Direction::Backward,
            DEFAULT_ATTEMPTS,
            "capture-disarm-",
            &mut |stopped| Ok(stopped.set_options(nix::sys::ptrace::Options::empty())?),
        );
        let armed_us = self.armed_at.elapsed().as_micros() as u64;
        let transaction = self.transaction.take().expect("finished once");
        match disarm {
            Ok(disarm) => {
                self.attached.forget_breakpoints();
                self.attached.release_foreign();
                match outcome {
                    Ok(_) => transaction.commit(self.target, disarm.pause.pause_us)?,
                    Err(error) => transaction.abort(self.target, &error.to_string())?,
                }
                Ok((armed_us, disarm.pause.pause_us))
            }
            Err(error) => {
                // The transaction stays open for `recover`; detaching
                // removes any breakpoint still in (see `Attached::detach`).
                tracing::error!("could not remove the capture breakpoints: {error}");
                std::mem::forget(transaction);
                Err(error.into())
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run_loop(
    probe: &mut Probe,
    sites: &[(FunctionSite, String)],
    limit: &CaptureLimit,
    wanted: &[u32],
    cancel: Option<&AtomicBool>,
    stats: &mut CaptureStats,
    captured: &mut Vec<Captured>,
    progress: &mut dyn FnMut(Progress),
    made: &mut dyn FnMut(i64),
) -> Result<(), SimulateError> {
    let pid = probe.attached.pid();
    let deadline = limit.within.map(|within| Instant::now() + within);
    let mut counts = vec![0u32; sites.len()];
    // Spreading: calls skipped since each function's last capture, the
    // gap wanted before its next, and when the last was taken.
    let mut skipped = vec![0u32; sites.len()];
    let mut gaps = vec![0u32; sites.len()];
    let mut last = vec![Instant::now(); sites.len()];
    const SLICE: Duration = Duration::from_millis(50);
    while probe.armed.iter().any(|a| *a) {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            break;
        }
        let wait = match deadline {
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                (deadline - now).min(SLICE)
            }
            None => SLICE,
        };
        let attached = &mut *probe.attached;
        let Some(event) = attached.next_event(wait)? else {
            continue;
        };
        match event {
            Event::Breakpoint { tid, address, regs } => {
                let noticed = Instant::now();
                stats.hits += 1;
                let Some(index) = probe.writes.iter().position(|w| w.address == address) else {
                    attached.step_past_breakpoint(tid, address)?;
                    continue;
                };
                if !probe.armed[index] || counts[index] >= wanted[index] {
                    attached.step_past_breakpoint(tid, address)?;
                    continue;
                }
                if limit.spread && skipped[index] < gaps[index] && last[index].elapsed() < SPREAD_WAIT {
                    skipped[index] += 1;
                    stats.skipped += 1;
                    attached.step_past_breakpoint(tid, address)?;
                    continue;
                }
                skipped[index] = 0;
                gaps[index] = (gaps[index] * 2).clamp(1, SPREAD_MAX_GAP);
                let cloned = attached.remote_clone(tid);
                // The copy gives back the service's sockets and pipes before
                // the live thread goes on: while a copy holds a socket the
                // service has closed, the socket stays in the service's
                // epoll set, and its next event reaches the service with a
                // pointer to a connection it freed (a single-threaded epoll
                // server aborted on "double free"). If the clone failed, the
                // live thread goes on at once.
                let adopted = cloned.and_then(|(copy_pid, in_target)| {
                    made(in_target);
                    let mut copy = attached.adopt_copy(copy_pid, in_target)?;
                    let sockets = crate::fork::release_descriptors_or_warn(&mut copy);
                    Ok((copy, sockets))
                });
                attached.step_past_breakpoint(tid, address)?;
                let pause_us = noticed.elapsed().as_micros() as u64;
                let (copy, sockets) = adopted?;
                fault::point("capture-copied");
                stats.captured += 1;
                stats.pauses_us.push(pause_us);
                counts[index] += 1;
                last[index] = Instant::now();
                captured.push(Captured {
                    function: index,
                    copy,
                    entry: *regs,
                    thread: tid.as_raw(),
                    pause_us,
                    sockets,
                });
                progress(Progress::Captured {
                    symbol: sites[index].0.symbol.clone(),
                    count: counts[index],
                    wanted: wanted[index],
                });
                if counts[index] >= wanted[index] {
                    // Done with this function: its callers stop paying.
                    probe.disarm(index)?;
                }
            }
            Event::Fault { tid, .. } => {
                // The service's own fault, not ours: deliver it as it was.
                stats.faults += 1;
                attached.resume_thread(tid, None)?;
            }
            // No signal is watched in a capture session (`watch_signals`).
            Event::Signal { tid, signal, .. } => attached.release_held(tid, Some(signal))?,
            Event::NewThread { .. } => stats.new_threads += 1,
            Event::NewProcess { .. } => stats.new_processes += 1,
            Event::Exited { process: true, .. } => {
                return Err(SimulateError::Target(shadowpatch_process::TargetError::Exited {
                    pid,
                    during: "capturing calls",
                }))
            }
            Event::Exited { .. } => {}
        }
    }
    Ok(())
}
