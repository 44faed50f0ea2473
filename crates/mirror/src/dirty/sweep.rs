//! Dirty tracking by full sweep: read every tracked page each collect
//! (`process_vm_readv` in 4 MiB chunks) and hash it with the mirror's keyed
//! XXH3; dirty = pages whose hash changed. Always available and invisible
//! to the target; its cost is a full read per cycle, which makes it the
//! denominator of the benchmark. A page rewritten with identical bytes is
//! not reported (nothing to copy); the keyed hash makes a collision
//! something a writer without the key cannot aim for.

use super::{DirtyError, DirtyPages, TrackedRange};
use crate::hash::{PageHasher, PAGE_SIZE};
use shadowpatch_process::TargetMemory;

/// Bytes read per `process_vm_readv`.
const CHUNK: usize = 4 << 20;

#[derive(Debug)]
pub(super) struct SweepTracking {
    hasher: PageHasher,
    ranges: Vec<TrackedRange>,
    /// Per range, the hash of each page at the last collect.
    hashes: Vec<Vec<u128>>,
    buffer: Vec<u8>,
}

impl SweepTracking {
    pub(super) fn start(memory: &mut TargetMemory, ranges: &[TrackedRange]) -> Result<Self, DirtyError> {
        let mut tracking = SweepTracking {
            hasher: PageHasher::random(),
            ranges: ranges.to_vec(),
            hashes: ranges.iter().map(|r| vec![0; r.pages()]).collect(),
            buffer: vec![0; CHUNK],
        };
        tracking.sweep(memory, None)?;
        Ok(tracking)
    }

    pub(super) fn collect(&mut self, memory: &mut TargetMemory) -> Result<DirtyPages, DirtyError> {
        let mut dirty = DirtyPages::default();
        self.sweep(memory, Some(&mut dirty.pages))?;
        dirty.bytes_read = self.ranges.iter().map(TrackedRange::len).sum();
        Ok(dirty)
    }

    /// Hash every page, recording new hashes; with `changed`, also list
    /// the pages whose hash differs from the recorded one.
    fn sweep(&mut self, memory: &mut TargetMemory, mut changed: Option<&mut Vec<u64>>) -> Result<(), DirtyError> {
        for (range, hashes) in self.ranges.iter().zip(self.hashes.iter_mut()) {
            let mut address = range.start;
            while address < range.end {
                let len = ((range.end - address) as usize).min(CHUNK);
                memory.read_exact(address, &mut self.buffer[..len])?;
                let first = ((address - range.start) / PAGE_SIZE as u64) as usize;
                for (index, page) in self.buffer[..len].chunks_exact(PAGE_SIZE).enumerate() {
                    let hash = self.hasher.hash(page);
                    let recorded = &mut hashes[first + index];
                    if *recorded != hash {
                        if let Some(changed) = changed.as_deref_mut() {
                            changed.push(address + (index * PAGE_SIZE) as u64);
                        }
                        *recorded = hash;
                    }
                }
                address += len as u64;
            }
        }
        Ok(())
    }
}
