//! Simulation of a patch on forked copies of the live process: the same
//! call is run by a copy with the original code and by a copy with the
//! patch loaded, both sandboxed, and the two runs are compared.
//!
//! Calls come from two places:
//! - **captured** live calls (`capture`): a journaled `int3` on every
//!   replaced function catches real calls; at each hit the process is
//!   copied from the calling thread and the thread continues at once;
//! - **explicit** calls of pure functions (`call`): `compute(5)` or a
//!   vectors file, run from a copy made in one short stop.
//!
//! Each call's copy becomes a pair (`fork`): the original and, cloned from
//! it, the patched copy. Each runs the call under the sandbox (`sandbox`,
//! `policy`): side effects emulated and recorded, never performed; the
//! return caught at a sentinel address. The runs are compared (`compare`)
//! and summed up as findings and features (`report`).
//!
//! Invariants: every copy is killed and reaped on every path (a guard kills
//! copies in `Drop` and reaps their zombies inside the target in a final
//! stop; a copy whose tracer dies is killed by the kernel); the live
//! target is never left stopped, traced or with a breakpoint in it, and the
//! only bytes written into it are the journaled probe breakpoints.

#![forbid(unsafe_code)]

pub mod bench;
pub mod call;
pub mod call_sites;
pub mod capture;
pub mod carry;
pub mod compare;
pub mod continuation;
pub mod fork;
pub mod policy;
pub mod probe;
pub mod repeat;
pub mod report;
pub mod returns;
pub mod sandbox;

pub use call::{parse_call, parse_vectors, CallSpec, CallSyntaxError};
pub use capture::{CaptureLimit, CaptureStats};
pub use compare::{CallVerdict, Comparison};
pub use report::{CallOrigin, SimulatedCall};
pub use returns::{ReturnKind, ReturnShape};
pub use sandbox::{Limits, Outcome, RunResult};

use fork::{explicit_entry, prepare_pair, register_arguments, CallPair, PairSetup};
use policy::Descriptors;
pub use repeat::{Repeats, DEFAULT_REPEATS};
use shadowpatch_finding::Finding;
use shadowpatch_mirror::StateDir;
use shadowpatch_patch::load::{plan_load, LoadPlan};
use shadowpatch_patch::state::{copies_log_path, TargetState};
use shadowpatch_patch::survey::{prepare_survey, Survey};
use shadowpatch_patch::{Classify, FailureClass, PatchError};
use shadowpatch_process::{Attached, ProcessCopy, ProcessIdentity, TargetError};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Errors of a simulation, each naming what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error(transparent)]
    Patch(#[from] PatchError),
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Mirror(#[from] shadowpatch_mirror::MirrorError),
    #[error(transparent)]
    Call(#[from] CallSyntaxError),
    #[error("{origin}: {function} is not a function patch {patch} replaces (it replaces {replaced})")]
    NotReplaced {
        origin: String,
        function: String,
        patch: String,
        replaced: String,
    },
    #[error(
        "nothing to simulate: capture live calls (--capture N, --capture-for SECS) or give calls (--call, --vectors)"
    )]
    NothingToDo,
    #[error("{symbol} at {address:#x} in pid {pid} already starts with an int3 (a debugger's breakpoint?); not capturing it")]
    AlreadyTrapped { pid: i32, symbol: String, address: u64 },
    #[error("pid {pid}: no unmapped low address left for the return sentinel")]
    NoSentinel { pid: i32 },
    #[error("copy {pid} of the target: {message}")]
    Copy { pid: i32, message: String },
    #[error("reading /proc: {0}")]
    Io(#[from] std::io::Error),
}

impl Classify for SimulateError {
    fn class(&self) -> FailureClass {
        match self {
            SimulateError::Call(_) | SimulateError::NotReplaced { .. } | SimulateError::NothingToDo => {
                FailureClass::BadInput
            }
            SimulateError::AlreadyTrapped { .. } | SimulateError::NoSentinel { .. } => FailureClass::RefusedForSafety,
            SimulateError::Patch(e) => e.class(),
            SimulateError::Target(e) => e.class(),
            SimulateError::Mirror(e) => e.class(),
            SimulateError::Copy { .. } | SimulateError::Io(_) => FailureClass::FailedMidway,
        }
    }
}

/// What to simulate, and how.
#[derive(Debug, Clone)]
pub struct SimulationOptions {
    /// Capture live calls of every replaced function.
    pub capture: Option<CaptureLimit>,
    /// Explicit calls (each must name a replaced function).
    pub calls: Vec<CallSpec>,
    /// Critical variables: `(address, length)` ranges compared after each
    /// call.
    pub critical: Vec<(u64, u64)>,
    /// Budgets of each run.
    pub limits: Limits,
    /// Once the patched function crashed, hung or exited on this many
    /// calls of one function, its further captured calls are not simulated
    /// (each hang costs a whole time budget, and they tell the same story).
    /// 0: simulate them all.
    pub stop_after_failures: u32,
    /// Each call both copies returned from runs again this many times in
    /// the same copies (`repeat`): 0 for none.
    pub repeat: u32,
    /// After a captured call (and its repeats) both copies resume their
    /// caller until it waits for its next event (`continuation`).
    pub continuation: bool,
    /// Set to end a capture early (e.g. on Ctrl-C): the breakpoints are
    /// removed and what was captured is simulated.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for SimulationOptions {
    fn default() -> Self {
        SimulationOptions {
            capture: None,
            calls: Vec::new(),
            critical: Vec::new(),
            limits: Limits::default(),
            stop_after_failures: 3,
            repeat: repeat::DEFAULT_REPEATS,
            continuation: true,
            cancel: None,
        }
    }
}

/// Progress of a simulation, for a progress display.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// The breakpoints are in: live calls are being captured.
    Armed { functions: usize },
    /// A live call of `symbol` was captured (`count` of `wanted`).
    Captured { symbol: String, count: u32, wanted: u32 },
    /// `done` of `total` calls simulated.
    Simulated { done: usize, total: usize },
}

/// How many more calls are captured of a replacement that only carries an
/// inlined change (`changed_code`) than of one that is the change.
pub const INLINED_CAPTURE_FACTOR: u32 = 4;

/// Everything a simulation found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SimulationReport {
    pub pid: i32,
    pub patch_id: String,
    pub calls: Vec<SimulatedCall>,
    pub capture: Option<CaptureStats>,
    pub findings: Vec<Finding>,
    pub features: BTreeMap<String, f64>,
    /// What could not be simulated, and why.
    pub unavailable: Vec<String>,
    /// What each replaced function returns, as compared: `(symbol, shape)`.
    pub returns: Vec<(String, ReturnShape)>,
    /// Simulating the calls (after capture), µs.
    pub simulate_us: u64,
    pub total_us: u64,
}

/// Simulate the surveyed patch on its process. The survey is made again
/// under the target's lock from the same parsed patch (the files are not
/// read again): the copies must see the active patches as they are.
pub fn simulate(
    state_dir: &Path,
    survey: &Survey,
    options: &SimulationOptions,
    progress: &mut dyn FnMut(Progress),
) -> Result<SimulationReport, SimulateError> {
    let started = Instant::now();
    if options.capture.is_none() && options.calls.is_empty() {
        return Err(SimulateError::NothingToDo);
    }
    let pid = survey.identity.pid;
    let identity = ProcessIdentity::of(pid)?;
    let state = StateDir::create(state_dir)?;
    // Held to the end: no patch may come or go while copies exist.
    let mut target = TargetState::open(&state, &identity)?;
    if let Some(open) = &target.journal_state.open {
        return Err(PatchError::OpenTransaction {
            pid,
            patch_id: open.patch_id.clone(),
        }
        .into());
    }
    let originals: Vec<(u64, Vec<u8>)> = target
        .journal_state
        .active
        .iter()
        .flat_map(|p| p.functions.iter().map(|f| (f.write.address, f.write.original.clone())))
        .collect();
    let prepared = prepare_survey(survey.again(&originals)?)?;
    prepared.identity.check_same(&identity)?;
    let patch_id = prepared.manifest.id.clone();
    let explicit: Vec<(usize, &CallSpec)> = options
        .calls
        .iter()
        .map(|call| {
            prepared
                .sites
                .iter()
                .position(|(site, _)| site.symbol == call.function)
                .map(|index| (index, call))
                .ok_or_else(|| SimulateError::NotReplaced {
                    origin: call.origin.clone(),
                    function: call.function.clone(),
                    patch: patch_id.clone(),
                    replaced: prepared
                        .sites
                        .iter()
                        .map(|(s, _)| s.symbol.clone())
                        .collect::<Vec<_>>()
                        .join(", "),
                })
        })
        .collect::<Result<_, _>>()?;
    let sentinel = choose_sentinel(pid, &prepared.maps)?;

    // Declared in this order so they drop in the reverse one: copies
    // killed, then the target detached, then the dead copies reaped.
    let mut copies = CopiesGuard::new(&identity, &target.dir);
    let mut attached = Attached::seize(&identity)?;
    let plan = plan_load(&prepared, attached.memory(), false)?;
    // Read before any breakpoint is in the module's text.
    let site_list: Vec<&shadowpatch_patch::trampoline::FunctionSite> = prepared.sites.iter().map(|(s, _)| s).collect();
    let returns = returns::infer(
        pid,
        &prepared.module,
        &prepared.modules,
        &prepared.maps,
        attached.memory(),
        &site_list,
    );
    // Per replacement carrying an inlined change: where that code is in
    // the copies, to tell the calls that run it from those that do not.
    let changed: Vec<Option<probe::ChangedCode>> = prepared
        .sites
        .iter()
        .map(|(site, with)| {
            let declared = prepared
                .manifest
                .replacements
                .iter()
                .find(|r| r.symbol == site.symbol && &r.with == with)
                .or_else(|| prepared.manifest.replacements.iter().find(|r| &r.with == with))?;
            let function = plan.functions.iter().find(|f| &f.with == with)?;
            let start = (function.new_address - plan.address) as usize;
            probe::ChangedCode::new(function.new_address, plan.image.get(start..)?, &declared.changed_code)
        })
        .collect();
    // The entry bytes a capture's breakpoints replace, for the copies.
    let mut breakpoints = Vec::new();
    for (site, _) in &prepared.sites {
        breakpoints.push((site.entry, attached.memory().read_vec(site.entry, 1)?[0]));
    }
    let mut template: Option<(ProcessCopy, libc::user_regs_struct)> = None;
    let mut captured = Vec::new();
    let mut across = AcrossCalls::default();

    if !explicit.is_empty() {
        let mut stopped = attached.stop()?;
        let tid = stopped.borrowable_thread();
        let live_regs = stopped.regs(tid)?;
        // The copy gives back the service's sockets before the service
        // runs on (see `capture`: a socket the service closes while a copy
        // holds it stays in its epoll set).
        let adopted = stopped.attached().remote_clone(tid).and_then(|(copy_pid, in_target)| {
            copies.made(in_target);
            let mut copy = stopped.attached().adopt_copy(copy_pid, in_target)?;
            fork::release_descriptors_or_warn(&mut copy);
            Ok(copy)
        });
        stopped.resume()?;
        template = Some((adopted?, live_regs));
    }
    let mut capture_stats = None;
    let mut unavailable = Vec::new();
    if let Some(limit) = &options.capture {
        // A replacement that only carries an inlined change runs other code
        // on most calls (a dispatcher's other commands): more of its calls
        // are taken, so that some run the change.
        let wanted: Vec<u32> = changed
            .iter()
            .map(|c| match c {
                Some(_) => limit.calls.saturating_mul(INLINED_CAPTURE_FACTOR),
                None => limit.calls,
            })
            .collect();
        let (calls, stats) = capture::capture(
            &mut attached,
            &mut target,
            &format!("simulate:{patch_id}"),
            &prepared.sites,
            limit,
            &wanted,
            options.cancel.as_deref(),
            progress,
            &mut |pid| copies.made(pid),
        )?;
        let within = limit
            .within
            .map(|w| format!(" within {:.1} s", w.as_secs_f64()))
            .unwrap_or_default();
        let cancelled = options.cancel.as_deref().is_some_and(|c| c.load(Ordering::Relaxed));
        for (index, (site, _)) in prepared.sites.iter().enumerate() {
            let got = calls.iter().filter(|c| c.function == index).count();
            if got == 0 {
                unavailable.push(format!("simulation: no live call of {} captured{within}", site.symbol));
            } else if (got as u32) < limit.calls && !cancelled {
                // Fewer calls than asked is less evidence than asked: said,
                // so that a verdict on 2 calls is not read as one on 8.
                unavailable.push(format!(
                    "simulation: only {got} of {} live calls of {} captured{within}",
                    wanted[index], site.symbol
                ));
            }
        }
        captured = calls;
        capture_stats = Some(stats);
    }
    // The live target runs free while the copies are simulated.
    attached.detach()?;

    let simulate_started = Instant::now();
    let setup = PairSetup {
        breakpoints: &breakpoints,
        plan: &plan,
        sentinel,
    };
    let total = captured.len() + explicit.len();
    let mut calls = Vec::with_capacity(total);
    let mut one = |copy: ProcessCopy,
                   entry: libc::user_regs_struct,
                   function: usize,
                   origin: CallOrigin,
                   sockets: Option<&std::collections::BTreeSet<i32>>,
                   copies: &mut CopiesGuard|
     -> Result<SimulatedCall, SimulateError> {
        let symbol = &prepared.sites[function].0.symbol;
        let shape = &returns[function];
        let pair = prepare_pair(copy, entry, setup, &mut |pid| copies.made(pid))?;
        let context = CallContext {
            shape,
            changed: changed[function].as_ref(),
            sockets,
        };
        let (original, patched, comparison, repeats, continuation) =
            run_pair(pair, &entry, &plan, sentinel, &context, options, &mut across)?;
        Ok(SimulatedCall {
            symbol: symbol.to_string(),
            origin,
            arguments: register_arguments(&entry),
            original,
            patched,
            comparison,
            repeats,
            continuation,
        })
    };
    let mut failures = vec![0u32; prepared.sites.len()];
    let mut skipped = vec![0u32; prepared.sites.len()];
    for item in captured.drain(..) {
        let origin = CallOrigin::Captured {
            thread: item.thread,
            pause_us: item.pause_us,
        };
        if options.stop_after_failures > 0 && failures[item.function] >= options.stop_after_failures {
            skipped[item.function] += 1;
            continue;
        }
        let call = one(
            item.copy,
            item.entry,
            item.function,
            origin,
            Some(&item.sockets),
            &mut copies,
        )?;
        if call.comparison.verdict == CallVerdict::PatchedFailed || call.failed_on_repeat() {
            failures[item.function] += 1;
        }
        calls.push(call);
        progress(Progress::Simulated {
            done: calls.len(),
            total,
        });
    }
    if let Some((template_copy, live_regs)) = template.as_mut() {
        for (index, call) in &explicit {
            let copy = template_copy.remote_clone()?;
            copies.made(copy.pid_in_target());
            let site = &prepared.sites[*index].0;
            let entry = explicit_entry(live_regs, site.entry, &call.arguments);
            let origin = CallOrigin::Explicit {
                text: call.text.clone(),
                given: call.origin.clone(),
            };
            calls.push(one(copy, entry, *index, origin, None, &mut copies)?);
            progress(Progress::Simulated {
                done: calls.len(),
                total,
            });
        }
    }
    for (index, changed) in changed.iter().enumerate() {
        let Some(changed) = changed else { continue };
        let symbol = &prepared.sites[index].0.symbol;
        let of_site: Vec<&SimulatedCall> = calls.iter().filter(|c| &c.symbol == symbol).collect();
        let ran = of_site.iter().filter(|c| c.ran_change()).count();
        if of_site.is_empty() || ran == of_site.len() {
            continue;
        }
        // A call that never ran the changed code is no evidence about it,
        // however clean: said, so that a verdict on it is not read as one
        // on the change.
        unavailable.push(if ran == 0 {
            format!(
                "simulation: none of the {} simulated calls of {symbol} ran the changed code ({}, inlined into it): they are no evidence about the change",
                of_site.len(),
                changed.names()
            )
        } else {
            format!(
                "simulation: only {ran} of the {} simulated calls of {symbol} ran the changed code ({}, inlined into it)",
                of_site.len(),
                changed.names()
            )
        });
    }
    for (index, count) in skipped.iter().enumerate().filter(|(_, count)| **count > 0) {
        unavailable.push(format!(
            "simulation: {count} more captured calls of {} not simulated: the patched function already failed on {}",
            prepared.sites[index].0.symbol, options.stop_after_failures
        ));
    }
    drop(template);
    drop(across);
    let simulate_us = simulate_started.elapsed().as_micros() as u64;
    copies.reap()?;
    let stats = capture_stats.clone().unwrap_or_default();
    let returns_by_symbol: Vec<(String, ReturnShape)> = prepared
        .sites
        .iter()
        .zip(returns)
        .map(|((site, _), shape)| (site.symbol.clone(), shape))
        .collect();
    Ok(SimulationReport {
        pid,
        patch_id,
        findings: report::findings(&calls, &returns_by_symbol),
        features: report::features(&calls, &stats),
        returns: returns_by_symbol,
        calls,
        capture: capture_stats,
        unavailable,
        simulate_us,
        total_us: started.elapsed().as_micros() as u64,
    })
}

/// Run both copies of a pair and compare them; the copies are killed and
/// left in `across.dying` to be reaped.
fn run_pair(
    mut pair: CallPair,
    entry: &libc::user_regs_struct,
    plan: &LoadPlan,
    sentinel: u64,
    context: &CallContext<'_>,
    options: &SimulationOptions,
    across: &mut AcrossCalls,
) -> Result<PairRuns, SimulateError> {
    let AcrossCalls { carry, dying } = across;
    let CallContext { shape, changed, .. } = *context;
    let (inherited, shared) = (pair.inherited.clone(), pair.shared.clone());
    let descriptors = |copy: &ProcessCopy| Descriptors {
        inherited: inherited.clone(),
        own_pid: copy.pid_in_target(),
        shared: shared.clone(),
    };
    let fds = descriptors(&pair.original);
    let original = sandbox::run(&mut pair.original, sentinel, fds, &options.limits)?;
    let limits = options.limits.for_patched(original.elapsed_us);
    let carried = carry.give(&mut pair.patched, plan)?;
    if carried > 0 {
        tracing::debug!(carried, "the patch's own words as the last call left them");
    }
    let fds = descriptors(&pair.patched);
    let patched = sandbox::run_probed(&mut pair.patched, sentinel, fds, &limits, changed)?;
    // Dead memory: the stack below the call's entry, and the patch itself.
    let maps = shadowpatch_process::maps::read_maps(pair.original.pid().as_raw())?;
    let stack_start = maps
        .iter()
        .find(|m| m.contains(entry.rsp))
        .map_or(entry.rsp, |m| m.start);
    let excluded = [(stack_start, entry.rsp), (plan.address, plan.address + plan.span)];
    let comparison = compare::compare(
        shape,
        &original,
        &patched,
        (&mut pair.original, &mut pair.patched),
        &options.critical,
        &excluded,
    )?;
    // Both returned: the call again, in the same copies, for harm one
    // call does not show (after the comparison, which reads their memory
    // as the first run left it).
    let repeats = if options.repeat > 0 && original.outcome.returned() && patched.outcome.returned() {
        Some(repeat::repeat(
            (&mut pair.original, &mut pair.patched),
            &descriptors,
            entry,
            sentinel,
            &options.limits,
            options.repeat,
            changed,
        )?)
    } else {
        None
    };
    // A captured call both copies came back from, every time: what their
    // callers do next (a continuation has no caller for an explicit call).
    let repeated_alike = repeats
        .as_ref()
        .is_none_or(|r| r.patched_failed.is_none() && r.original_failed.is_none() && r.completed == r.asked);
    let continuation = match context.sockets {
        Some(sockets)
            if options.continuation && original.outcome.returned() && patched.outcome.returned() && repeated_alike =>
        {
            Some(continuation::continue_both(
                (&mut pair.original, &mut pair.patched),
                &descriptors,
                pair.return_address,
                sockets,
            )?)
        }
        _ => None,
    };
    carry.take(&mut pair.patched, plan);
    // Killed now, reaped at the end: a big copy's teardown takes
    // milliseconds that need not hold up the next call.
    pair.original.kill_soon();
    pair.patched.kill_soon();
    dying.push(pair.original);
    dying.push(pair.patched);
    Ok((original, patched, comparison, repeats, continuation))
}

/// What one call's pair leaves to the next ones.
#[derive(Default)]
struct AcrossCalls {
    /// The patch's own statics, from each call to the next (`carry`).
    carry: carry::Carry,
    /// Copies killed, to be reaped at the end: a big copy's teardown takes
    /// milliseconds that need not hold up the next call.
    dying: Vec<ProcessCopy>,
}

/// What `run_pair` needs to know of the call besides its copies.
#[derive(Clone, Copy)]
struct CallContext<'a> {
    shape: &'a ReturnShape,
    changed: Option<&'a probe::ChangedCode>,
    /// A captured call: the service's sockets, for its continuation.
    sockets: Option<&'a std::collections::BTreeSet<i32>>,
}

/// Both first runs, their comparison, the repeats and the continuation.
type PairRuns = (
    RunResult,
    RunResult,
    Comparison,
    Option<Repeats>,
    Option<continuation::Continuation>,
);

/// An address for the return sentinel: low (below vm.mmap_min_addr where
/// possible), canonical, and not mapped in the target, so that the
/// function's `ret` faults there and nowhere else.
fn choose_sentinel(pid: i32, maps: &[shadowpatch_process::Mapping]) -> Result<u64, SimulateError> {
    let minimum = std::fs::read_to_string("/proc/sys/vm/mmap_min_addr")
        .ok()
        .and_then(|text| text.trim().parse::<u64>().ok())
        .unwrap_or(0);
    let mut candidates = [0x3000u64, 0x5000, 0x7000, 0x9000, 0xb000, 0xd000, 0xf000];
    // Below the minimum first: nothing can ever be mapped there.
    candidates.sort_by_key(|c| (*c + 0x1000 > minimum, *c));
    candidates
        .into_iter()
        .find(|c| !maps.iter().any(|m| m.contains(*c)) && *c != shadowpatch_process::remote::CLONE_STACK_TRAP)
        .ok_or(SimulateError::NoSentinel { pid })
}

/// Every copy made, by its pid in the target; kills are done by the
/// copies' own guards, the reaping inside the target by this one: a dead
/// copy is a zombie child of the target until a `wait4` there collects it.
/// Each pid is also appended to a file in the target's state directory, so
/// that `recover` can reap the zombies of a session that was killed.
#[derive(Debug)]
struct CopiesGuard {
    identity: ProcessIdentity,
    log: PathBuf,
    pids: Vec<i64>,
}

impl CopiesGuard {
    fn new(identity: &ProcessIdentity, dir: &Path) -> Self {
        CopiesGuard {
            identity: identity.clone(),
            log: copies_log_path(dir),
            pids: Vec::new(),
        }
    }

    fn made(&mut self, pid: i64) {
        self.pids.push(pid);
        // No fsync: the file only has to survive our own death, not the
        // machine's (which takes the target and its zombies with it).
        let appended = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .and_then(|mut file| writeln!(file, "{pid}"));
        if let Err(error) = appended {
            tracing::warn!("cannot record copy {pid} in {}: {error}", self.log.display());
        }
    }

    /// Reap every (dead) copy inside the target, in one short stop.
    fn reap(&mut self) -> Result<(), SimulateError> {
        if self.pids.is_empty() {
            let _ = std::fs::remove_file(&self.log);
            return Ok(());
        }
        if self.identity.check_alive().is_err() {
            // The target is gone: its zombies went to init, which reaps
            // them (reparenting turns their exit signal into SIGCHLD).
            self.pids.clear();
            let _ = std::fs::remove_file(&self.log);
            return Ok(());
        }
        let mut attached = Attached::seize(&self.identity)?;
        let mut stopped = attached.stop()?;
        let reaped = stopped.reap_copies(&self.pids);
        stopped.resume()?;
        attached.detach()?;
        let reaped = reaped?;
        self.pids.retain(|pid| !reaped.contains(pid));
        if !self.pids.is_empty() {
            tracing::warn!(pids = ?self.pids, "copies not reaped (not dead yet?)");
            return Err(SimulateError::Copy {
                pid: self.pids[0] as i32,
                message: "was not dead when the target reaped its copies".into(),
            });
        }
        let _ = std::fs::remove_file(&self.log);
        Ok(())
    }
}

impl Drop for CopiesGuard {
    fn drop(&mut self) {
        if !self.pids.is_empty() {
            if let Err(error) = self.reap() {
                tracing::warn!("reaping the copies after a failed simulation: {error}");
            }
        }
    }
}
