//! The data mirror: an in-memory copy of a target's mutable ranges
//! (variables, data sections, heaps), kept current by re-copying only the
//! pages a [`DirtyTracker`] reports written, with a keyed hash per page.
//!
//! Order matters: start the tracker, *then* capture. A page written between
//! the two is reported by the first collect and copied again, so the copy
//! never misses a write; the reverse order could.

use crate::dirty::{DirtyError, DirtyMethod, DirtyPages, DirtyTracker, TrackedRange};
use crate::hash::{PageHasher, PAGE_SIZE};
use serde::Serialize;
use shadowpatch_process::TargetMemory;
use std::time::Instant;

/// Bytes read per `process_vm_readv` before hashing them: small enough to
/// stay in the L2 cache, large enough that the syscall count does not matter.
const BATCH_BYTES: usize = 256 << 10;

/// One mirrored range: its bytes and the hash of each page.
#[derive(Debug, Clone)]
struct MirroredRange {
    range: TrackedRange,
    bytes: Vec<u8>,
    hashes: Vec<u128>,
}

/// What one refresh did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefreshReport {
    /// The method that found the dirty pages (None: a full re-copy, or
    /// pages given by the caller).
    pub method: Option<DirtyMethod>,
    pub pages_tracked: u64,
    /// Pages the method reported written.
    pub pages_dirty: u64,
    /// Pages copied from the target (= dirty, or all for a full refresh).
    pub pages_copied: u64,
    /// Copied pages whose bytes differ from the previous copy.
    pub pages_changed: u64,
    pub bytes_copied: u64,
    /// Bytes of target memory the method itself read (the full sweep's).
    pub method_bytes_read: u64,
    /// Time to find the dirty pages.
    pub collect_us: u64,
    /// Time to copy and hash them.
    pub copy_us: u64,
    /// collect + copy: the cost of one mirroring cycle.
    pub total_us: u64,
    /// The pages whose bytes changed, ascending (what a caller re-hashes
    /// at a finer grain, e.g. the chunks of critical variables).
    #[serde(skip)]
    pub changed: Vec<u64>,
}

/// Copies of the tracked ranges of one target.
#[derive(Debug, Clone)]
pub struct DataMirror {
    pid: i32,
    hasher: PageHasher,
    ranges: Vec<MirroredRange>,
}

impl DataMirror {
    /// Copy every page the tracker tracks, now (after starting it).
    pub fn capture(tracker: &DirtyTracker, memory: &mut TargetMemory) -> Result<Self, DirtyError> {
        if memory.pid() != tracker.pid() {
            return Err(DirtyError::WrongTarget {
                tracker_pid: tracker.pid(),
                pid: memory.pid(),
            });
        }
        let mut mirror = DataMirror {
            pid: tracker.pid(),
            hasher: PageHasher::random(),
            ranges: tracker
                .ranges()
                .iter()
                .map(|range| MirroredRange {
                    range: *range,
                    bytes: vec![0; range.len() as usize],
                    hashes: vec![0; range.pages()],
                })
                .collect(),
        };
        mirror.refresh_all(memory)?;
        Ok(mirror)
    }

    /// Re-copy the pages written since the last refresh (or the capture).
    /// Needs no attach (see [`DirtyTracker::collect`]).
    pub fn refresh(
        &mut self,
        tracker: &mut DirtyTracker,
        memory: &mut TargetMemory,
    ) -> Result<RefreshReport, DirtyError> {
        if tracker.pid() != self.pid {
            return Err(DirtyError::WrongTarget {
                tracker_pid: tracker.pid(),
                pid: self.pid,
            });
        }
        let dirty = tracker.collect(memory)?;
        let mut report = self.refresh_pages(&dirty, memory)?;
        report.method = Some(tracker.method());
        Ok(report)
    }

    /// Re-copy the pages of `dirty` (one collect of the tracker, for a
    /// caller that also wants the page list).
    pub fn refresh_pages(
        &mut self,
        dirty: &DirtyPages,
        memory: &mut TargetMemory,
    ) -> Result<RefreshReport, DirtyError> {
        let started = Instant::now();
        if let Some(&outside) = dirty.pages.iter().find(|&&page| !self.contains(page)) {
            return Err(DirtyError::BadRange {
                pid: self.pid,
                start: outside,
                end: outside + PAGE_SIZE as u64,
                problem: "reported dirty but not mirrored",
            });
        }
        let runs = self.runs_within_ranges(&dirty.pages);
        let changed = self.copy_runs(memory, &runs)?;
        let copied = dirty.pages.len() as u64;
        let copy_us = started.elapsed().as_micros() as u64;
        Ok(RefreshReport {
            method: None,
            pages_tracked: self.page_count() as u64,
            pages_dirty: copied,
            pages_copied: copied,
            pages_changed: changed.len() as u64,
            changed,
            bytes_copied: copied * PAGE_SIZE as u64,
            method_bytes_read: dirty.bytes_read,
            collect_us: dirty.collect_us,
            copy_us,
            total_us: dirty.collect_us + copy_us,
        })
    }

    /// Runs of contiguous dirty pages, ascending, each inside one mirrored
    /// range: two tracked ranges may touch (`.data` then `.bss`), and a run
    /// crossing from one into the next would not fit either copy.
    fn runs_within_ranges(&self, pages: &[u64]) -> Vec<(u64, usize)> {
        let mut pages = pages.to_vec();
        pages.sort_unstable();
        pages.dedup();
        let range_end = |address: u64| {
            self.ranges
                .iter()
                .find(|m| m.range.contains(address))
                .map(|m| m.range.end)
        };
        let mut runs: Vec<(u64, usize)> = Vec::new();
        for page in pages {
            match runs.last_mut() {
                Some((start, len)) if *start + *len as u64 == page && range_end(*start) > Some(page) => {
                    *len += PAGE_SIZE
                }
                _ => runs.push((page, PAGE_SIZE)),
            }
        }
        runs
    }

    fn contains(&self, address: u64) -> bool {
        self.ranges.iter().any(|m| m.range.contains(address))
    }

    /// Re-copy every page (no tracker involved).
    pub fn refresh_all(&mut self, memory: &mut TargetMemory) -> Result<RefreshReport, DirtyError> {
        let started = Instant::now();
        let runs: Vec<(u64, usize)> = self
            .ranges
            .iter()
            .map(|m| (m.range.start, m.range.len() as usize))
            .collect();
        let changed = self.copy_runs(memory, &runs)?;
        let pages = self.page_count() as u64;
        Ok(RefreshReport {
            method: None,
            pages_tracked: pages,
            pages_dirty: 0,
            pages_copied: pages,
            pages_changed: changed.len() as u64,
            changed,
            bytes_copied: pages * PAGE_SIZE as u64,
            method_bytes_read: 0,
            collect_us: 0,
            copy_us: started.elapsed().as_micros() as u64,
            total_us: started.elapsed().as_micros() as u64,
        })
    }

    /// Read `runs` (ascending, each inside one range) from the target
    /// straight into the copy and re-hash their pages; returns the pages
    /// that changed. Works in batches of [`BATCH_BYTES`]: each batch is
    /// hashed right after its read, while its bytes are still in cache
    /// (hashing 2.6 MB of scattered pages after one big read measured ~15 %
    /// of the cycle, mostly cache misses).
    fn copy_runs(&mut self, memory: &mut TargetMemory, runs: &[(u64, usize)]) -> Result<Vec<u64>, DirtyError> {
        let pieces: Vec<(u64, usize)> = runs
            .iter()
            .flat_map(|&(start, len)| {
                (0..len)
                    .step_by(BATCH_BYTES)
                    .map(move |offset| (start + offset as u64, (len - offset).min(BATCH_BYTES)))
            })
            .collect();
        let mut changed = Vec::new();
        let mut first = 0;
        while first < pieces.len() {
            let mut end = first + 1;
            let mut bytes = pieces[first].1;
            while end < pieces.len() && bytes + pieces[end].1 <= BATCH_BYTES {
                bytes += pieces[end].1;
                end += 1;
            }
            self.read_in_place(memory, &pieces[first..end])?;
            self.rehash(&pieces[first..end], &mut changed);
            first = end;
        }
        Ok(changed)
    }

    /// One `read_many_into` for `pieces` (ascending), into the copy.
    fn read_in_place(&mut self, memory: &mut TargetMemory, pieces: &[(u64, usize)]) -> Result<(), DirtyError> {
        let mut parts: Vec<(u64, &mut [u8])> = Vec::with_capacity(pieces.len());
        let mut pending = pieces.iter().peekable();
        for mirrored in &mut self.ranges {
            let mut rest: &mut [u8] = &mut mirrored.bytes;
            let mut rest_start = mirrored.range.start;
            while let Some(&&(start, len)) = pending.peek() {
                if start >= mirrored.range.end {
                    break;
                }
                debug_assert!(start >= rest_start && start + len as u64 <= mirrored.range.end);
                let (_, tail) = std::mem::take(&mut rest).split_at_mut((start - rest_start) as usize);
                let (part, tail) = tail.split_at_mut(len);
                parts.push((start, part));
                rest = tail;
                rest_start = start + len as u64;
                pending.next();
            }
        }
        memory.read_many_into(&mut parts)?;
        Ok(())
    }

    /// Re-hash the pages of `pieces`, appending those that changed.
    fn rehash(&mut self, pieces: &[(u64, usize)], changed: &mut Vec<u64>) {
        for &(start, len) in pieces {
            let Some(mirrored) = self.ranges.iter_mut().find(|m| m.range.contains(start)) else {
                continue;
            };
            let first = ((start - mirrored.range.start) / PAGE_SIZE as u64) as usize;
            let bytes = &mirrored.bytes[first * PAGE_SIZE..first * PAGE_SIZE + len];
            for (index, page) in bytes.chunks_exact(PAGE_SIZE).enumerate() {
                let hash = self.hasher.hash(page);
                let recorded = &mut mirrored.hashes[first + index];
                if *recorded != hash {
                    changed.push(start + (index * PAGE_SIZE) as u64);
                    *recorded = hash;
                }
            }
        }
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn page_count(&self) -> usize {
        self.ranges.iter().map(|m| m.range.pages()).sum()
    }

    /// The mirrored ranges with their current copy.
    pub fn ranges(&self) -> impl Iterator<Item = (TrackedRange, &[u8])> {
        self.ranges.iter().map(|m| (m.range, m.bytes.as_slice()))
    }

    /// The copy of `len` bytes at `address`, if entirely mirrored.
    pub fn read(&self, address: u64, len: usize) -> Option<&[u8]> {
        let mirrored = self.ranges.iter().find(|m| m.range.contains(address))?;
        let offset = (address - mirrored.range.start) as usize;
        mirrored.bytes.get(offset..offset.checked_add(len)?)
    }

    /// The keyed hash of the copy of the page at `address`.
    pub fn page_hash(&self, address: u64) -> Option<u128> {
        let mirrored = self.ranges.iter().find(|m| m.range.contains(address))?;
        let index = ((address - mirrored.range.start) / PAGE_SIZE as u64) as usize;
        mirrored.hashes.get(index).copied()
    }
}
