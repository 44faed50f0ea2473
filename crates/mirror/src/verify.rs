//! One verification pass: re-read live memory, hash each page with the
//! mirror's key, and for every page whose hash differs, compare bytes with
//! the stored page to report exact differing runs.

use crate::capture::READ_CHUNK;
use crate::hash::PAGE_SIZE;
use crate::store::MirrorFile;
use crate::MirrorError;
use shadowpatch_process::TargetMemory;
use std::time::Instant;

/// At most this many differences are reported in detail (the count of
/// differing pages is always exact).
pub const MAX_DIFFERENCES: usize = 4096;
/// Bytes shown per difference; longer runs are cut (their length is kept).
pub const MAX_SHOWN_BYTES: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DifferenceKind {
    /// Live bytes differ from the mirror.
    Bytes,
    /// The mirrored range can no longer be read (unmapped or protected).
    Unreadable,
}

/// One run of differing bytes (or an unreadable range).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    pub kind: DifferenceKind,
    pub region_index: usize,
    pub address: u64,
    pub len: u64,
    /// Mirrored bytes (at most `MAX_SHOWN_BYTES`).
    pub expected: Vec<u8>,
    /// Live bytes (at most `MAX_SHOWN_BYTES`; empty when unreadable).
    pub live: Vec<u8>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub generation: u32,
    pub regions: usize,
    pub pages: u64,
    pub bytes: u64,
    pub differing_pages: u64,
    pub differences: Vec<Difference>,
    /// More differences existed than `MAX_DIFFERENCES`.
    pub truncated: bool,
    pub elapsed_us: u64,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.differing_pages == 0
    }
}

/// Verify live memory against `mirror`.
pub fn verify(
    memory: &mut TargetMemory,
    mirror: &MirrorFile,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<VerifyReport, MirrorError> {
    let started = Instant::now();
    let total = mirror.header.total_bytes;
    let mut buffer = vec![0u8; READ_CHUNK];
    let mut report = VerifyReport {
        generation: mirror.header.generation,
        regions: mirror.header.regions.len(),
        pages: mirror.hashes.len() as u64,
        bytes: total,
        differing_pages: 0,
        differences: Vec::new(),
        truncated: false,
        elapsed_us: 0,
    };
    let mut done = 0u64;
    for (region_index, region) in mirror.header.regions.iter().enumerate() {
        let expected_hashes = mirror.region_hashes(region_index);
        let mut address = region.spec.start;
        let end = region.spec.end;
        while address < end {
            let len = ((end - address) as usize).min(READ_CHUNK);
            let read = match memory.read_partial(address, &mut buffer[..len]) {
                Ok(n) => n,
                Err(shadowpatch_process::TargetError::Read { .. }) => 0,
                Err(other) => return Err(other.into()),
            };
            let first_page = (address - region.spec.start) / PAGE_SIZE as u64;
            for (i, live_page) in buffer[..read - read % PAGE_SIZE].chunks_exact(PAGE_SIZE).enumerate() {
                let page_index = first_page + i as u64;
                if mirror.hasher.hash(live_page) != expected_hashes[page_index as usize] {
                    report.differing_pages += 1;
                    let stored = mirror.read_page(region_index, page_index)?;
                    let page_address = region.spec.start + page_index * PAGE_SIZE as u64;
                    push_runs(&mut report, region_index, page_address, &stored, live_page);
                }
            }
            let whole = (read - read % PAGE_SIZE) as u64;
            done += whole;
            progress(done, total);
            if whole < len as u64 {
                // The rest of the region cannot be read any more.
                let unreadable_from = address + whole;
                let pages = (end - unreadable_from) / PAGE_SIZE as u64;
                report.differing_pages += pages;
                let page_index = (unreadable_from - region.spec.start) / PAGE_SIZE as u64;
                let stored = mirror.read_page(region_index, page_index)?;
                push(
                    &mut report,
                    Difference {
                        kind: DifferenceKind::Unreadable,
                        region_index,
                        address: unreadable_from,
                        len: end - unreadable_from,
                        expected: stored[..MAX_SHOWN_BYTES].to_vec(),
                        live: Vec::new(),
                    },
                );
                done += end - unreadable_from;
                break;
            }
            address += whole;
        }
    }
    report.elapsed_us = started.elapsed().as_micros() as u64;
    Ok(report)
}

/// Each maximal run of differing bytes between two equally long buffers,
/// as (start offset, end offset).
pub fn differing_runs(stored: &[u8], live: &[u8]) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut offset = 0;
    let len = stored.len().min(live.len());
    while offset < len {
        if stored[offset] == live[offset] {
            offset += 1;
            continue;
        }
        let start = offset;
        while offset < len && stored[offset] != live[offset] {
            offset += 1;
        }
        runs.push((start, offset));
    }
    runs
}

/// Append each maximal run of differing bytes between two pages.
fn push_runs(report: &mut VerifyReport, region_index: usize, page_address: u64, stored: &[u8], live: &[u8]) {
    for (start, end) in differing_runs(stored, live) {
        let shown = start..end.min(start + MAX_SHOWN_BYTES);
        push(
            report,
            Difference {
                kind: DifferenceKind::Bytes,
                region_index,
                address: page_address + start as u64,
                len: (end - start) as u64,
                expected: stored[shown.clone()].to_vec(),
                live: live[shown].to_vec(),
            },
        );
    }
}

fn push(report: &mut VerifyReport, difference: Difference) {
    if report.differences.len() < MAX_DIFFERENCES {
        report.differences.push(difference);
    } else {
        report.truncated = true;
    }
}
