//! The patch's own state, carried from one simulated call to the next.
//! Every pair of copies is made afresh from the live process, where the
//! patch never ran: a patch that keeps a counter of its own (a static it
//! adds) starts each simulated call at zero, though live it would count
//! every call. A crash on every third call then shows only if one call
//! and its repeats reach three, and a dispatcher whose input is consumed
//! by its first run (memcached's command handler, a delete inlined into
//! it) never runs the changed code again in a repeat.
//!
//! So the patched copy's writable pages of the patch (its data and bss)
//! as each call left them (after its repeats and its caller's
//! continuation) become the starting state of the next call's patched
//! copy, in the order the calls were captured: the patch's statics advance
//! as they would live. Only a state that means the same in the next copy
//! is carried: numbers (values that are no address of anything mapped),
//! and addresses inside the patch itself or inside a file's mapping (the
//! same in every copy). If the patch left an address of anonymous memory
//! (a buffer it allocated in the last copy, whose heap is not the next
//! copy's), nothing is carried for that call: a flag saying "allocated"
//! without its buffer would be a state no live process has.

use super::SimulateError;
use shadowpatch_patch::load::LoadPlan;
use shadowpatch_process::maps::read_maps;
use shadowpatch_process::ProcessCopy;

/// The patch's writable bytes as the last patched copy left them.
#[derive(Debug, Default)]
pub struct Carry {
    /// `(address, bytes)` per writable range of the patch.
    ranges: Vec<(u64, Vec<u8>)>,
}

/// The patch's writable ranges in the copies: `(address, offset in the
/// image, length)`.
fn writable(plan: &LoadPlan) -> impl Iterator<Item = (u64, usize, usize)> + '_ {
    plan.protections
        .iter()
        .filter(|(_, _, prot)| prot & libc::PROT_WRITE != 0)
        .map(|&(start, end, _)| (plan.address + start, start as usize, (end - start) as usize))
}

impl Carry {
    /// Read the patch's writable pages from `patched` (a copy whose run
    /// is over). A copy that died keeps the state carried before it.
    pub fn take(&mut self, patched: &mut ProcessCopy, plan: &LoadPlan) {
        let read: Result<Vec<(u64, Vec<u8>)>, _> = writable(plan)
            .map(|(address, _, len)| patched.memory().read_vec(address, len).map(|bytes| (address, bytes)))
            .collect();
        if let Ok(ranges) = read {
            self.ranges = ranges;
        }
    }

    /// Put the carried words into a fresh patched copy (the patch just
    /// mapped into it from `plan`): each 8-byte word that differs from the
    /// image, unless one of them is an address of anonymous memory (then
    /// none). The number of words carried.
    pub fn give(&self, patched: &mut ProcessCopy, plan: &LoadPlan) -> Result<usize, SimulateError> {
        if self.ranges.is_empty() {
            return Ok(0);
        }
        let maps = read_maps(patched.pid().as_raw())?;
        let patch = plan.address..plan.address + plan.span;
        // Whether `value`, as an address, would mean another thing in the
        // next copy: inside anonymous memory other than the patch's own.
        let unstable =
            |value: u64| !patch.contains(&value) && maps.iter().any(|m| m.contains(value) && m.file().is_none());
        let mut writes = Vec::new();
        for ((address, offset, len), (taken_at, taken)) in writable(plan).zip(&self.ranges) {
            if address != *taken_at || taken.len() != len {
                continue;
            }
            for (index, word) in taken.chunks_exact(8).enumerate() {
                let at = offset + index * 8;
                // Beyond the image (bss past its bytes) the fresh value is 0.
                let fresh = plan.image.get(at..at + 8).unwrap_or(&[0; 8]);
                if word == fresh {
                    continue;
                }
                if unstable(u64::from_le_bytes(word.try_into().expect("8 bytes"))) {
                    return Ok(0);
                }
                writes.push((address + (index * 8) as u64, word));
            }
        }
        for (address, word) in &writes {
            patched.memory().write(*address, word)?;
        }
        Ok(writes.len())
    }
}
