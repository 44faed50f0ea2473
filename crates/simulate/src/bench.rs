//! Also the capture stress run ([`capture_stress`]): many short capture
//! sessions on a busy target, every captured copy run to its return and
//! its result checked, the target checked alive after every session.
//!
//! What a capture costs the live thread, measured beside its floors in the
//! same session, for `shadowpatch bench`: a breakpoint on one function, and
//! each hit handled one of three ways — stepped past only (the floor of
//! any breakpoint), a remote `getpid` in the thread then stepped past (the
//! floor of borrowing the thread), or captured (remote clone, then stepped
//! past). The caller alternates blocks of hits of each kind so that noise
//! on a shared machine hits all three alike.

use super::capture::Probe;
use super::{CopiesGuard, SimulateError};
use shadowpatch_mirror::StateDir;
use shadowpatch_patch::state::TargetState;
use shadowpatch_process::events::Event;
use shadowpatch_process::maps::read_maps;
use shadowpatch_process::{Attached, ProcessCopy, ProcessIdentity};
use std::path::Path;
use std::time::{Duration, Instant};

/// How a breakpoint hit is handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HitHandling {
    /// Step the thread past the breakpoint and resume it.
    StepPast,
    /// A remote `getpid` in the thread, then step past.
    RemoteGetpid,
    /// A remote clone (a copy of the process), then step past.
    Capture,
}

/// A benchmark session on one function of one process. The target is
/// attached only during a block: seized but unwatched between blocks, its
/// signals (a SIGCHLD...) would wait for us in signal-delivery stops.
#[derive(Debug)]
pub struct HitBench {
    identity: ProcessIdentity,
    target: TargetState,
    symbol: String,
    entry: u64,
    copies: CopiesGuard,
}

impl HitBench {
    /// Attach to `pid` for breakpoints on `symbol` (a function of any of
    /// its modules).
    pub fn open(state_dir: &Path, pid: i32, symbol: &str) -> Result<HitBench, SimulateError> {
        let identity = ProcessIdentity::of(pid)?;
        let state = StateDir::create(state_dir)?;
        let target = TargetState::open(&state, &identity)?;
        let entry = entries_of(pid, &[symbol])?[0];
        let copies = CopiesGuard::new(&identity, &target.dir);
        Ok(HitBench {
            identity,
            target,
            symbol: symbol.to_string(),
            entry,
            copies,
        })
    }

    /// Arm the breakpoint, handle `hits` hits as `handling` says, disarm;
    /// returns, per hit, the live thread's pause (µs, from our noticing the
    /// trap to the thread's resumption) and the call's first argument (rdi,
    /// to find the same call in the target's own timings).
    pub fn block(
        &mut self,
        handling: HitHandling,
        hits: usize,
        within: Duration,
    ) -> Result<Vec<(u64, u64)>, SimulateError> {
        let entries = [(self.symbol.clone(), self.entry)];
        let mut attached = Attached::seize(&self.identity)?;
        let probe = Probe::arm(&mut attached, &mut self.target, "bench", &entries)?;
        let mut pauses = Vec::with_capacity(hits);
        let deadline = Instant::now() + within;
        let copies = &mut self.copies;
        let result = (|| {
            while pauses.len() < hits && Instant::now() < deadline {
                let attached = &mut *probe.attached;
                let (tid, address, argument) = match attached.next_event(Duration::from_millis(50))? {
                    Some(Event::Breakpoint { tid, address, regs }) => (tid, address, regs.rdi),
                    // The target's own fault: delivered as it was.
                    Some(Event::Fault { tid, .. }) => {
                        attached.resume_thread(tid, None)?;
                        continue;
                    }
                    _ => continue,
                };
                let noticed = Instant::now();
                let copy = match handling {
                    HitHandling::StepPast => None,
                    HitHandling::RemoteGetpid => {
                        attached.remote_syscall(tid, libc::SYS_getpid, [0; 6])?;
                        None
                    }
                    HitHandling::Capture => Some(attached.remote_clone(tid)),
                };
                attached.step_past_breakpoint(tid, address)?;
                pauses.push((noticed.elapsed().as_micros() as u64, argument));
                if let Some(cloned) = copy {
                    let (copy_pid, in_target) = cloned?;
                    copies.made(in_target);
                    // Killed at once (dropped): only its making is measured.
                    attached.adopt_copy(copy_pid, in_target)?;
                }
            }
            Ok::<(), SimulateError>(())
        })();
        probe.finish(&result)?;
        attached.detach()?;
        result?;
        Ok(pauses)
    }

    /// Reap the copies.
    pub fn close(mut self) -> Result<(), SimulateError> {
        self.copies.reap()
    }
}

/// The entry address of each of `symbols` (functions of any module of
/// `pid`).
fn entries_of(pid: i32, symbols: &[&str]) -> Result<Vec<u64>, SimulateError> {
    let maps = read_maps(pid)?;
    let modules = shadowpatch_symbols::modules_of(pid, &maps).map_err(shadowpatch_patch::PatchError::from)?;
    symbols
        .iter()
        .map(|symbol| {
            modules
                .iter()
                .find_map(|m| m.symbol_addresses(symbol).first().map(|(address, _)| *address))
                .ok_or_else(|| {
                    shadowpatch_patch::PatchError::UnknownSymbol {
                        symbol: symbol.to_string(),
                        place: format!("pid {pid}"),
                    }
                    .into()
                })
        })
        .collect()
}

/// A function to capture in a stress run, with the result every call must
/// give.
#[derive(Debug, Clone)]
pub struct StressFunction {
    pub symbol: String,
    /// The call's result (rax) from its first argument (rdi).
    pub expected: fn(u64) -> u64,
}

impl StressFunction {
    /// The functions of the `sim` test program (fixtures' `sim.c`), which
    /// its threads call all the time: `compute` (3x + 1), `compute_cet`
    /// (the same, starting with `endbr64`: stepped past without touching
    /// memory) and `note` (x + 1, with a write to a global).
    pub fn sim_fixture() -> Vec<StressFunction> {
        vec![
            StressFunction {
                symbol: "compute".into(),
                expected: |x| x.wrapping_mul(3).wrapping_add(1),
            },
            StressFunction {
                symbol: "compute_cet".into(),
                expected: |x| x.wrapping_mul(3).wrapping_add(1),
            },
            StressFunction {
                symbol: "note".into(),
                expected: |x| x.wrapping_add(1),
            },
        ]
    }
}

/// What a capture stress run did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StressFigures {
    /// Capture sessions (each: seize, arm, capture, disarm per function,
    /// finish, detach, reap the copies inside the target).
    pub sessions: u64,
    /// Breakpoint hits (captured or stepped past).
    pub hits: u64,
    pub captures: u64,
    /// Captured calls whose copy, run to its return, did not return the
    /// expected result (or did not return at all), or whose copy was not
    /// at the entry with the live thread's registers.
    pub wrong: u64,
    /// The target died (the run stops at the first death).
    pub deaths: u64,
    /// Threads and processes the target created while armed.
    pub new_threads: u64,
    pub new_processes: u64,
    /// Faults of the target itself delivered while armed.
    pub faults: u64,
    pub elapsed_us: u64,
}

/// Where a checked copy returns to: below `vm.mmap_min_addr`, never
/// mapped, so the copy's `ret` faults there with its result in rax.
const STRESS_SENTINEL: u64 = 0x1000;

/// Capture sessions on `pid` until `captures` calls were captured: each
/// session arms a breakpoint on every function (journaled, in one stop, as
/// `capture` does), captures `per_session` calls of each by remote clone
/// (one hit in `capture_every`; the others are stepped past), takes a function's breakpoint out once
/// it has its calls, removes the rest and detaches. Every captured copy is
/// run to its return and its result compared with the function's
/// `expected`; the target is checked alive after every session. A target
/// that dies ends the run with `deaths` = 1 (not an error: it is the
/// figure under test).
pub fn capture_stress(
    state_dir: &Path,
    pid: i32,
    functions: &[StressFunction],
    captures: u64,
    per_session: u32,
    capture_every: u64,
) -> Result<StressFigures, SimulateError> {
    let started = Instant::now();
    let identity = ProcessIdentity::of(pid)?;
    let state = StateDir::create(state_dir)?;
    let mut target = TargetState::open(&state, &identity)?;
    let symbols: Vec<&str> = functions.iter().map(|f| f.symbol.as_str()).collect();
    let entries: Vec<(String, u64)> = symbols
        .iter()
        .map(|s| s.to_string())
        .zip(entries_of(pid, &symbols)?)
        .collect();
    let mut copies = CopiesGuard::new(&identity, &target.dir);
    let mut figures = StressFigures::default();
    while figures.captures < captures {
        let session = stress_session(
            &identity,
            &mut target,
            &entries,
            functions,
            (per_session, capture_every.max(1)),
            &mut figures,
            &mut copies,
        );
        figures.sessions += 1;
        let reaped = copies.reap();
        if identity.check_alive().is_err() {
            figures.deaths += 1;
            break;
        }
        session?;
        reaped?;
    }
    figures.elapsed_us = started.elapsed().as_micros() as u64;
    Ok(figures)
}

fn stress_session(
    identity: &ProcessIdentity,
    target: &mut TargetState,
    entries: &[(String, u64)],
    functions: &[StressFunction],
    (per_session, capture_every): (u32, u64),
    figures: &mut StressFigures,
    copies: &mut CopiesGuard,
) -> Result<(), SimulateError> {
    let mut attached = Attached::seize(identity)?;
    let mut probe = Probe::arm(&mut attached, target, "stress", entries)?;
    let originals: Vec<(u64, u8)> = probe.writes.iter().map(|w| (w.address, w.original[0])).collect();
    let mut counts = vec![0u32; entries.len()];
    // A quiet function (never called) must not hang the run.
    let deadline = Instant::now() + Duration::from_secs(10);
    let result = (|| {
        while probe.armed.iter().any(|a| *a) && Instant::now() < deadline {
            let attached = &mut *probe.attached;
            let event = attached.next_event(Duration::from_millis(50))?;
            let (tid, address, regs) = match event {
                Some(Event::Breakpoint { tid, address, regs }) => (tid, address, regs),
                Some(Event::Fault { tid, .. }) => {
                    figures.faults += 1;
                    attached.resume_thread(tid, None)?;
                    continue;
                }
                Some(Event::Signal { tid, signal, .. }) => {
                    attached.release_held(tid, Some(signal))?;
                    continue;
                }
                Some(Event::NewThread { .. }) => {
                    figures.new_threads += 1;
                    continue;
                }
                Some(Event::NewProcess { .. }) => {
                    figures.new_processes += 1;
                    continue;
                }
                Some(Event::Exited { process: true, .. }) => {
                    return Err(SimulateError::Target(shadowpatch_process::TargetError::Exited {
                        pid: identity.pid,
                        during: "a capture stress session",
                    }))
                }
                Some(Event::Exited { .. }) | None => continue,
            };
            figures.hits += 1;
            let index = probe.writes.iter().position(|w| w.address == address);
            let capture = figures.hits.is_multiple_of(capture_every);
            let Some(index) = index.filter(|&i| capture && probe.armed[i] && counts[i] < per_session) else {
                attached.step_past_breakpoint(tid, address)?;
                continue;
            };
            let cloned = attached.remote_clone(tid);
            attached.step_past_breakpoint(tid, address)?;
            let (copy_pid, in_target) = cloned?;
            copies.made(in_target);
            let copy = attached.adopt_copy(copy_pid, in_target)?;
            figures.captures += 1;
            counts[index] += 1;
            if !copy_returns(copy, &regs, address, &originals, functions[index].expected)? {
                figures.wrong += 1;
            }
            if counts[index] >= per_session {
                probe.disarm(index)?;
            }
        }
        Ok::<(), SimulateError>(())
    })();
    probe.finish(&result)?;
    attached.detach()?;
    result
}

/// Run a captured copy from the entry to its return; true when it was at
/// the entry with the live registers and returned `expected(rdi)`.
fn copy_returns(
    mut copy: ProcessCopy,
    entry: &libc::user_regs_struct,
    address: u64,
    originals: &[(u64, u8)],
    expected: fn(u64) -> u64,
) -> Result<bool, SimulateError> {
    use shadowpatch_process::{CopyStop, Resume};
    if entry.rip != address {
        return Ok(false);
    }
    // The copy is the process at the clone: our `int3`s in, its one thread
    // parked; it runs the call from the live thread's entry registers.
    for &(at, original) in originals {
        copy.memory().write(at, &[original])?;
    }
    copy.memory().write(entry.rsp, &STRESS_SENTINEL.to_le_bytes())?;
    copy.set_regs(*entry)?;
    copy.resume(Resume::Continue, None)?;
    let returned = match copy.wait()? {
        CopyStop::Signal {
            signal: nix::sys::signal::Signal::SIGSEGV,
            ..
        } => {
            let regs = copy.regs()?;
            regs.rip == STRESS_SENTINEL && regs.rax == expected(entry.rdi)
        }
        _ => false,
    };
    copy.kill();
    Ok(returned)
}

/// The floor of a simulated call's fork: `rounds` copies of a copy of
/// `pid` made as the simulation makes its patched copy (a remote clone of
/// the copy, [`ProcessCopy::remote_clone`]), each timed (µs), killed and
/// reaped inside the target.
pub fn copy_fork_floor(state_dir: &Path, pid: i32, rounds: usize) -> Result<Vec<u64>, SimulateError> {
    let identity = ProcessIdentity::of(pid)?;
    let state = StateDir::create(state_dir)?;
    let target = TargetState::open(&state, &identity)?;
    let mut copies = CopiesGuard::new(&identity, &target.dir);
    let mut attached = Attached::seize(&identity)?;
    let mut stopped = attached.stop()?;
    let tid = stopped.borrowable_thread();
    let cloned = stopped.attached().remote_clone(tid);
    stopped.resume()?;
    let (copy_pid, in_target) = cloned?;
    copies.made(in_target);
    let mut template = attached.adopt_copy(copy_pid, in_target)?;
    attached.detach()?;
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        let mut copy = template.remote_clone()?;
        times.push(started.elapsed().as_micros() as u64);
        copies.made(copy.pid_in_target());
        copy.kill();
    }
    template.kill();
    copies.reap()?;
    Ok(times)
}
