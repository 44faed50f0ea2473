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
use shadowpatch_process::{Attached, ProcessIdentity};
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
        let maps = read_maps(pid)?;
        let modules = shadowpatch_symbols::modules_of(pid, &maps).map_err(shadowpatch_patch::PatchError::from)?;
        let entry = modules
            .iter()
            .find_map(|m| m.symbol_addresses(symbol).first().map(|(address, _)| *address))
            .ok_or_else(|| shadowpatch_patch::PatchError::UnknownSymbol {
                symbol: symbol.to_string(),
                place: format!("pid {pid}"),
            })?;
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
