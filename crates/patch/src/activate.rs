//! Switching a set of function entries in one stop of all threads: check no
//! thread's instruction pointer lies inside the bytes being rewritten (retry
//! a bounded number of times if one does), check the live bytes are exactly
//! what we expect (never overwrite someone else's change), write them all,
//! read them back, resume. All entries switch or none do.

use crate::fault;
use crate::journal::Write5;
use crate::PatchError;
use shadowpatch_process::{Attached, PauseReport, Stopped};

/// Picks the expected or the new bytes of a write.
type BytesOf = fn(&Write5) -> &[u8];

/// Which way the writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Expect `original`, write `new` (apply).
    Forward,
    /// Expect `new`, write `original` (rollback).
    Backward,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Activation {
    pub pause: PauseReport,
    /// Stops needed until no thread was inside the rewritten bytes.
    pub attempts: u32,
}

/// Default bound on stops before giving up because a thread keeps sitting
/// inside the bytes to rewrite.
pub const DEFAULT_ATTEMPTS: u32 = 50;

/// Switch `writes` in one stop. `during` runs inside the same stop after
/// the writes (used by rollback to unmap the patch).
pub fn switch(
    attached: &mut Attached,
    writes: &[Write5],
    direction: Direction,
    max_attempts: u32,
    fault_prefix: &str,
    during: &mut dyn FnMut(&mut Stopped) -> Result<(), PatchError>,
) -> Result<Activation, PatchError> {
    for attempt in 1..=max_attempts.max(1) {
        let mut stopped = attached.stop()?;
        let mut busy = None;
        for (tid, write) in threads_inside(&stopped, writes)? {
            // Move it past the bytes rather than wait for the scheduler to.
            let end = write.address + write.new.len() as u64;
            if !stopped.step_out_of(tid, write.address + 1, end, STEP_OUT_LIMIT)? {
                busy = Some(write.address);
            }
        }
        if let Some(busy) = busy {
            drop(stopped);
            if attempt == max_attempts.max(1) {
                return Err(PatchError::Busy {
                    address: busy,
                    attempts: attempt,
                });
            }
            // Let the thread run on past the entry before trying again.
            std::thread::yield_now();
            continue;
        }
        let (expected_of, new_of): (BytesOf, BytesOf) = match direction {
            Direction::Forward => (|w| &w.original, |w| &w.new),
            Direction::Backward => (|w| &w.new, |w| &w.original),
        };
        let ranges: Vec<(u64, usize)> = writes.iter().map(|w| (w.address, w.new.len())).collect();
        let live_bytes = stopped.memory().read_many(&ranges)?;
        for (write, live) in writes.iter().zip(&live_bytes) {
            if live.as_slice() != expected_of(write) {
                return Err(PatchError::Tampered {
                    address: write.address,
                    expected: shadowpatch_symbols::hex(expected_of(write)),
                    live: shadowpatch_symbols::hex(live),
                });
            }
        }
        for (index, write) in writes.iter().enumerate() {
            if index == 1 {
                fault::point(&format!("{fault_prefix}partial-write"));
            }
            if let Err(error) = stopped.memory().write(write.address, new_of(write)) {
                // Undo what this stop already wrote, so none switch.
                for done in &writes[..index] {
                    let _ = stopped.memory().write(done.address, expected_of(done));
                }
                return Err(error.into());
            }
        }
        let written = stopped.memory().read_many(&ranges)?;
        for (write, live) in writes.iter().zip(&written) {
            if live.as_slice() != new_of(write) {
                for done in writes {
                    let _ = stopped.memory().write(done.address, expected_of(done));
                }
                return Err(PatchError::Tampered {
                    address: write.address,
                    expected: shadowpatch_symbols::hex(new_of(write)),
                    live: shadowpatch_symbols::hex(live),
                });
            }
        }
        fault::point(&format!("{fault_prefix}written"));
        during(&mut stopped)?;
        let pause = stopped.resume()?;
        return Ok(Activation {
            pause,
            attempts: attempt,
        });
    }
    unreachable!("the loop returns on its last attempt")
}

/// Instructions a thread may be single-stepped to leave the bytes to
/// rewrite (the jump covers at most five one-byte instructions). On a busy
/// target with a hot tiny function some thread is almost always inside its
/// first bytes, and waiting for the scheduler to move it may never work.
const STEP_OUT_LIMIT: u32 = 16;

/// Threads whose instruction pointer sits strictly inside bytes to rewrite
/// (at the first byte is fine: the thread will execute the new instruction
/// whole), with the write concerned.
fn threads_inside<'w>(
    stopped: &Stopped,
    writes: &'w [Write5],
) -> Result<Vec<(nix::unistd::Pid, &'w Write5)>, PatchError> {
    let mut inside = Vec::new();
    for tid in stopped.threads() {
        let rip = stopped.regs(tid)?.rip;
        if let Some(write) = writes
            .iter()
            .find(|w| rip > w.address && rip < w.address + w.new.len() as u64)
        {
            inside.push((tid, write));
        }
    }
    Ok(inside)
}
