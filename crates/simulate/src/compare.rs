//! Comparing the original and the patched run of one call: how each ended,
//! the return value, the bytes each tried to write to descriptors, the
//! other side effects, the declared critical variables, and how many pages
//! of writable memory differ between the two copies afterwards.
//!
//! Memory: both copies were one process until the patched one was cloned
//! from the original at the entry, so every page neither run wrote is the
//! same physical page in both. /proc/PID/pagemap gives each page's frame
//! number: pages with the same frame are equal without reading them, and
//! only the few others are read and compared byte for byte. (Frame numbers
//! need CAP_SYS_ADMIN; without them every present page is compared.)
//! Dead memory is left out: the stack below the call's entry (the
//! function's frames, gone after it returns) and the patch's own mapping.

use super::returns::{compare_returns, ReturnCheck, ReturnShape};
use super::sandbox::{Outcome, RunResult};
use super::SimulateError;
use shadowpatch_process::maps::read_maps;
use shadowpatch_process::{Mapping, ProcessCopy};
use std::os::unix::fs::FileExt;

const PAGE: u64 = 4096;

/// What a call's two runs say about the patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CallVerdict {
    /// Same result, same writes, same effects.
    Same,
    /// Both ran to the end, differently.
    Diverged,
    /// The patched run crashed, hung or ended the process where the
    /// original returned.
    PatchedFailed,
    /// The original itself crashed, hung or was stopped by the sandbox:
    /// the call says nothing about the patch.
    Inconclusive,
}

/// A declared critical range that ended up different.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CriticalDifference {
    pub address: u64,
    pub len: u64,
    /// The bytes (at most 64 shown), hex.
    pub original: String,
    pub patched: String,
}

/// The comparison of one call.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Comparison {
    pub verdict: CallVerdict,
    /// The return values (or what they point to) differ; never for a
    /// `void` function.
    pub return_differs: bool,
    /// What each run returned, as compared; `None` for a `void` function
    /// or when either run did not return.
    pub returned: Option<ReturnCheck>,
    pub fd_writes_differ: bool,
    pub side_effects_differ: bool,
    /// A syscall the sandbox does not model, made by the patched run only.
    pub unsupported_in_patched: bool,
    pub critical: Vec<CriticalDifference>,
    pub memory_pages_differing: u64,
}

/// Compare the runs (the return as `shape` says the function returns);
/// read memory only when both returned.
pub fn compare(
    shape: &ReturnShape,
    original: &RunResult,
    patched: &RunResult,
    copies: (&mut ProcessCopy, &mut ProcessCopy),
    critical: &[(u64, u64)],
    excluded: &[(u64, u64)],
) -> Result<Comparison, SimulateError> {
    let failed = |outcome: &Outcome| {
        matches!(
            outcome,
            Outcome::Crashed { .. }
                | Outcome::Hung { .. }
                | Outcome::SharedMemoryWrite { .. }
                | Outcome::Waiting { .. }
        )
    };
    let (original_copy, patched_copy) = copies;
    let returned = compare_returns(
        shape,
        &original.outcome,
        &patched.outcome,
        (&mut *original_copy, &mut *patched_copy),
    );
    let return_differs = match (&original.outcome, &patched.outcome) {
        (Outcome::Returned { .. }, Outcome::Returned { .. }) => returned.as_ref().is_some_and(|r| r.differs),
        (Outcome::Exited { code: a }, Outcome::Exited { code: b }) => a != b,
        _ => false,
    };
    let writes = |run: &RunResult| {
        run.fd_writes
            .iter()
            .map(|w| (w.fd, w.len, w.digest.clone()))
            .collect::<Vec<_>>()
    };
    let fd_writes_differ = writes(original) != writes(patched);
    let mut effects_original = original.side_effects.clone();
    let mut effects_patched = patched.side_effects.clone();
    effects_original.sort();
    effects_patched.sort();
    let side_effects_differ = effects_original != effects_patched
        || matches!(patched.outcome, Outcome::SharedMemoryWrite { .. }) && original.outcome.returned();
    let unsupported = |run: &RunResult| {
        run.side_effects
            .iter()
            .filter(|e| e.kind == super::policy::EffectKind::Unsupported)
            .count()
    };
    let unsupported_in_patched = unsupported(patched) > unsupported(original);

    let both_ran = !failed(&original.outcome) && !failed(&patched.outcome);
    let mut critical_differences = Vec::new();
    let mut memory_pages_differing = 0;
    if both_ran {
        for &(address, len) in critical {
            let a = original_copy.memory().read_vec(address, len as usize)?;
            let b = patched_copy.memory().read_vec(address, len as usize)?;
            if a != b {
                critical_differences.push(CriticalDifference {
                    address,
                    len,
                    original: shadowpatch_symbols::hex(&a[..a.len().min(64)]),
                    patched: shadowpatch_symbols::hex(&b[..b.len().min(64)]),
                });
            }
        }
        memory_pages_differing = differing_pages(original_copy, patched_copy, excluded)?;
    }

    let verdict = if failed(&original.outcome) {
        CallVerdict::Inconclusive
    } else if matches!(patched.outcome, Outcome::Crashed { .. } | Outcome::Hung { .. })
        || matches!(patched.outcome, Outcome::Exited { .. }) && original.outcome.returned()
    {
        CallVerdict::PatchedFailed
    } else if return_differs
        || fd_writes_differ
        || side_effects_differ
        || !critical_differences.is_empty()
        || original.outcome.returned() != patched.outcome.returned()
    {
        CallVerdict::Diverged
    } else {
        CallVerdict::Same
    };
    Ok(Comparison {
        verdict,
        return_differs,
        returned,
        fd_writes_differ,
        side_effects_differ,
        unsupported_in_patched,
        critical: critical_differences,
        memory_pages_differing,
    })
}

/// Pages of writable private memory that differ between two copies, not
/// counting the byte ranges in `excluded`.
pub fn differing_pages(
    a: &mut ProcessCopy,
    b: &mut ProcessCopy,
    excluded: &[(u64, u64)],
) -> Result<u64, SimulateError> {
    let ranges_a = writable_ranges(&read_maps(a.pid().as_raw())?);
    let ranges_b = writable_ranges(&read_maps(b.pid().as_raw())?);
    let pagemap_a = std::fs::File::open(format!("/proc/{}/pagemap", a.pid()))?;
    let pagemap_b = std::fs::File::open(format!("/proc/{}/pagemap", b.pid()))?;
    let mut differing = 0;
    let mut candidates: Vec<u64> = Vec::new();
    // Mappings only one copy has: each present page counts.
    for (mine, other, pagemap) in [(&ranges_a, &ranges_b, &pagemap_a), (&ranges_b, &ranges_a, &pagemap_b)] {
        for &(start, end) in mine {
            for (s, e) in subtract(start, end, other) {
                let entries = pagemap_entries(pagemap, s, e)?;
                differing += entries
                    .iter()
                    .enumerate()
                    .filter(|(i, entry)| present(**entry) && !fully_excluded(s + *i as u64 * PAGE, excluded))
                    .count() as u64;
            }
        }
    }
    // Mappings both have: same frame, same bytes.
    let mut frames_known = false;
    let mut both = Vec::new();
    for &(start, end) in &ranges_a {
        for &(other_start, other_end) in &ranges_b {
            let (s, e) = (start.max(other_start), end.min(other_end));
            if s < e {
                both.push((s, e));
            }
        }
    }
    for &(s, e) in &both {
        let entries_a = pagemap_entries(&pagemap_a, s, e)?;
        let entries_b = pagemap_entries(&pagemap_b, s, e)?;
        for (index, (x, y)) in entries_a.iter().zip(&entries_b).enumerate() {
            frames_known |= frame(*x) != 0 || frame(*y) != 0;
            if !present(*x) && !present(*y) {
                continue;
            }
            if present(*x) && present(*y) && frame(*x) == frame(*y) && frame(*x) != 0 {
                continue;
            }
            candidates.push(s + index as u64 * PAGE);
        }
    }
    if !frames_known {
        tracing::debug!("no page frame numbers (CAP_SYS_ADMIN?): comparing every present page");
    }
    for chunk in candidates.chunks(256) {
        let ranges: Vec<(u64, usize)> = chunk.iter().map(|page| (*page, PAGE as usize)).collect();
        let pages_a = a.memory().read_many(&ranges);
        let pages_b = b.memory().read_many(&ranges);
        let (pages_a, pages_b) = match (pages_a, pages_b) {
            (Ok(x), Ok(y)) => (x, y),
            // Some page is unreadable (PROT_NONE guard inside a writable
            // range cannot happen, but a racing unmap can): page by page.
            _ => chunk
                .iter()
                .map(|page| {
                    (
                        a.memory().read_vec(*page, PAGE as usize).unwrap_or_default(),
                        b.memory().read_vec(*page, PAGE as usize).unwrap_or_default(),
                    )
                })
                .unzip(),
        };
        for ((page, x), y) in chunk.iter().zip(&pages_a).zip(&pages_b) {
            if differs_outside(*page, x, y, excluded) {
                differing += 1;
            }
        }
    }
    Ok(differing)
}

/// Writable ranges of a process, merged.
fn writable_ranges(maps: &[Mapping]) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = maps
        .iter()
        .filter(|m| m.writable && m.readable && !m.shared)
        .map(|m| (m.start, m.end))
        .collect();
    ranges.sort();
    let mut merged: Vec<(u64, u64)> = Vec::new();
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// `[start, end)` minus every range of `others`.
fn subtract(start: u64, end: u64, others: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut pieces = vec![(start, end)];
    for &(os, oe) in others {
        pieces = pieces
            .into_iter()
            .flat_map(|(s, e)| {
                if oe <= s || e <= os {
                    vec![(s, e)]
                } else {
                    [(s, os.max(s)), (oe.min(e), e)]
                        .into_iter()
                        .filter(|(a, b)| a < b)
                        .collect()
                }
            })
            .collect();
    }
    pieces
}

fn pagemap_entries(pagemap: &std::fs::File, start: u64, end: u64) -> Result<Vec<u64>, SimulateError> {
    let pages = ((end - start) / PAGE) as usize;
    let mut bytes = vec![0u8; pages * 8];
    pagemap.read_exact_at(&mut bytes, start / PAGE * 8)?;
    Ok(bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

fn present(entry: u64) -> bool {
    entry & (1 << 63) != 0 || entry & (1 << 62) != 0
}

fn frame(entry: u64) -> u64 {
    if entry & (1 << 63) != 0 {
        entry & ((1 << 55) - 1)
    } else {
        0
    }
}

fn fully_excluded(page: u64, excluded: &[(u64, u64)]) -> bool {
    excluded.iter().any(|&(s, e)| s <= page && page + PAGE <= e)
}

/// Whether two copies of the page at `page` differ in a byte outside the
/// excluded ranges.
fn differs_outside(page: u64, a: &[u8], b: &[u8], excluded: &[(u64, u64)]) -> bool {
    if a.len() != b.len() {
        return true;
    }
    a.iter()
        .zip(b)
        .enumerate()
        .any(|(offset, (x, y))| x != y && !excluded.iter().any(|&(s, e)| (s..e).contains(&(page + offset as u64))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtracting_ranges_leaves_the_pieces_outside() {
        assert_eq!(subtract(0, 100, &[(10, 20), (50, 200)]), vec![(0, 10), (20, 50)]);
        assert_eq!(subtract(0, 100, &[]), vec![(0, 100)]);
        assert!(subtract(10, 20, &[(0, 100)]).is_empty());
    }

    #[test]
    fn excluded_bytes_do_not_count_as_differences() {
        let a = vec![0u8; 4096];
        let mut b = a.clone();
        b[10] = 1;
        assert!(differs_outside(0x1000, &a, &b, &[]));
        assert!(!differs_outside(0x1000, &a, &b, &[(0x1000, 0x100b)]));
        assert!(fully_excluded(0x1000, &[(0x800, 0x2000)]));
        assert!(!fully_excluded(0x1000, &[(0x1800, 0x3000)]));
    }
}
