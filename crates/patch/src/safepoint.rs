//! Activating a patch at the application's safe points (`ApplyOptions::
//! safe_point`; no CLI flag exposes it yet): an application linked with the runtime library
//! (`crates/runtime`) exposes a mailbox of three words: `pending`, which we
//! set to ask its threads to wait at their next safe point, `parked`, which
//! counts threads waiting there, and `passed`, which counts safe points
//! passed. Apply sets `pending`, waits (bounded) until a thread is parked,
//! switches the patch in its activation stop and clears `pending` in that
//! same stop, so a parked thread leaves its safe point into the new code.
//!
//! Setting `pending` is a write into the target, so it is journaled first:
//! a `Writes` record inside the apply transaction announces it as a *held*
//! write, undone before the transaction ends (in the activation stop on
//! success, before the abort on failure) and undone by `recover` if the
//! tool dies meanwhile. (A separate probe transaction cannot hold it: the
//! journal has one open transaction at a time, and `pending` must stay set
//! from before the wait until inside the activation stop.)

use crate::journal::Write5;
use crate::PatchError;
use shadowpatch_process::{Stopped, TargetMemory};
use std::time::{Duration, Instant};

/// Where an application's safe-point mailbox is, and how long to wait.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafePoint {
    pub pending_address: u64,
    pub parked_address: u64,
    pub passed_address: u64,
    /// Longest wait for a thread to park before refusing.
    pub timeout: Duration,
}

/// How long apply waits for a parked thread unless told otherwise.
pub const DEFAULT_SAFE_POINT_TIMEOUT: Duration = Duration::from_secs(5);

/// What the wait saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Parked {
    /// Threads parked when activation began.
    pub threads: u32,
    /// From setting `pending` to the first parked thread.
    pub wait_us: u64,
}

impl SafePoint {
    /// The held write: `pending` from 0 to 1 (native-endian u32).
    pub fn pending_write(&self) -> Write5 {
        Write5 {
            address: self.pending_address,
            original: 0u32.to_ne_bytes().to_vec(),
            new: 1u32.to_ne_bytes().to_vec(),
        }
    }

    /// Set `pending` (the journal already announces it) and wait until a
    /// thread is parked. On timeout `pending` is cleared again and the
    /// error says how many safe points the application passed meanwhile.
    pub fn hold(&self, pid: i32, memory: &mut TargetMemory) -> Result<Parked, PatchError> {
        let write = self.pending_write();
        let live = memory.read_vec(write.address, write.original.len())?;
        if live != write.original {
            return Err(PatchError::SafePoint {
                pid,
                message: format!(
                    "its pending word at {:#x} holds {} instead of 0: another activation is waiting for it",
                    write.address,
                    shadowpatch_symbols::hex(&live)
                ),
            });
        }
        let passed_before = read_u64(memory, self.passed_address)?;
        memory.write(write.address, &write.new)?;
        crate::fault::point("safe-point-held");
        let started = Instant::now();
        loop {
            let parked = match read_u32(memory, self.parked_address) {
                Ok(parked) => parked,
                Err(error) => {
                    let _ = release(memory, &write);
                    return Err(error);
                }
            };
            if parked >= 1 {
                return Ok(Parked {
                    threads: parked,
                    wait_us: started.elapsed().as_micros() as u64,
                });
            }
            if started.elapsed() >= self.timeout {
                let passed = read_u64(memory, self.passed_address).unwrap_or(passed_before);
                release(memory, &write)?;
                return Err(PatchError::SafePoint {
                    pid,
                    message: format!(
                        "no thread reached a safe point within {} ms ({} safe points passed meanwhile); \
                         the patch was not activated",
                        self.timeout.as_millis(),
                        passed.saturating_sub(passed_before)
                    ),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

fn read_u32(memory: &mut TargetMemory, address: u64) -> Result<u32, PatchError> {
    let bytes = memory.read_vec(address, 4)?;
    Ok(u32::from_ne_bytes(bytes.try_into().expect("4 bytes")))
}

fn read_u64(memory: &mut TargetMemory, address: u64) -> Result<u64, PatchError> {
    let bytes = memory.read_vec(address, 8)?;
    Ok(u64::from_ne_bytes(bytes.try_into().expect("8 bytes")))
}

/// Undo a held write outside a stop: the word is the application's
/// mailbox, not code, so no thread can be "inside" it. Live bytes that are
/// neither ours nor the original are someone else's change: refuse.
pub fn release(memory: &mut TargetMemory, write: &Write5) -> Result<bool, PatchError> {
    let live = memory.read_vec(write.address, write.new.len())?;
    if live == write.original {
        return Ok(false);
    }
    if live != write.new {
        return Err(PatchError::Tampered {
            address: write.address,
            expected: shadowpatch_symbols::hex(&write.new),
            live: shadowpatch_symbols::hex(&live),
        });
    }
    memory.write(write.address, &write.original)?;
    Ok(true)
}

/// Undo held writes inside the activation stop, so parked threads resume
/// into the new code.
pub fn release_in_stop(stopped: &mut Stopped, writes: &[Write5]) -> Result<(), PatchError> {
    for write in writes {
        release(stopped.memory(), write)?;
    }
    Ok(())
}
