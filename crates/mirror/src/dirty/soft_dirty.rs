//! Dirty tracking with soft-dirty bits: `echo 4 > /proc/PID/clear_refs`
//! clears them (write-protecting every writable page of the process), the
//! first write to a page sets bit 55 of its /proc/PID/pagemap entry.
//!
//! Needs CONFIG_MEM_SOFT_DIRTY. Without it `clear_refs` still accepts "4"
//! and no page is ever marked, so availability is probed by behaviour.
//!
//! Reading the bits and clearing them are two steps: a write landing
//! between them would be cleared unseen. Each collect therefore stops the
//! target for the read + clear (a few hundred microseconds for 64 Ki
//! pages); the copy of the dirty pages happens after the resume, and a page
//! written again meanwhile is simply dirty again at the next collect.
//! `clear_refs` has no range: it clears the whole process, the cost the
//! module documentation weighs against the userfaultfd method. Nothing is
//! left to undo on stop (the bits are the kernel's own bookkeeping).

use super::{DirtyError, DirtyMethod, DirtyPages, TrackedRange};
use crate::hash::PAGE_SIZE;
use shadowpatch_process::Attached;
use shadowpatch_sys::pagemap::{Pagemap, PAGEMAP_ENTRY_SOFT_DIRTY};
use shadowpatch_sys::scratch::ScratchMapping;

/// Pagemap entries read per `pread` (64 KiB of entries, 32 MiB of memory).
const ENTRIES_PER_READ: usize = 8192;

/// Whether soft-dirty works here: on a scratch mapping of our own, after
/// a clear, a written page must be marked and an untouched one must not.
pub(super) fn probe() -> Result<(), String> {
    let mut scratch = ScratchMapping::new(2).map_err(|e| format!("mapping a probe page: {e}"))?;
    scratch.write(0, 1);
    scratch.write(PAGE_SIZE, 1);
    clear_refs(0).map_err(|e| format!("writing 4 to /proc/self/clear_refs: {e}"))?;
    scratch.write(0, 2);
    let pagemap = Pagemap::open(0).map_err(|e| format!("opening /proc/self/pagemap: {e}"))?;
    let mut entries = [0u64; 2];
    pagemap
        .read_entries(scratch.address() / PAGE_SIZE as u64, &mut entries)
        .map_err(|e| format!("reading /proc/self/pagemap: {e}"))?;
    if entries[0] & PAGEMAP_ENTRY_SOFT_DIRTY == 0 {
        return Err(
            "a page written after `echo 4 > /proc/self/clear_refs` is not marked soft-dirty \
                    (bit 55 of /proc/self/pagemap): the kernel lacks CONFIG_MEM_SOFT_DIRTY"
                .into(),
        );
    }
    if entries[1] & PAGEMAP_ENTRY_SOFT_DIRTY != 0 {
        return Err("`echo 4 > /proc/self/clear_refs` did not clear the soft-dirty bit of an untouched page".into());
    }
    Ok(())
}

/// Clear the soft-dirty bits of process `pid` (0: ourselves).
fn clear_refs(pid: i32) -> std::io::Result<()> {
    let path = if pid == 0 {
        "/proc/self/clear_refs".to_string()
    } else {
        format!("/proc/{pid}/clear_refs")
    };
    std::fs::write(path, "4")
}

#[derive(Debug)]
pub(super) struct SoftDirtyTracking {
    pid: i32,
    pagemap: Pagemap,
    ranges: Vec<TrackedRange>,
    entries: Vec<u64>,
}

impl SoftDirtyTracking {
    pub(super) fn start(attached: &mut Attached, ranges: &[TrackedRange]) -> Result<Self, DirtyError> {
        let pid = attached.pid();
        let pagemap = Pagemap::open(pid).map_err(|e| proc_error(pid, "opening", "pagemap", e))?;
        let stopped = attached.stop()?;
        let cleared = clear_refs(pid);
        stopped.resume()?;
        cleared.map_err(|e| DirtyError::MethodUnavailable {
            pid,
            method: DirtyMethod::SoftDirty,
            reason: format!("writing 4 to /proc/{pid}/clear_refs: {e}"),
        })?;
        Ok(SoftDirtyTracking {
            pid,
            pagemap,
            ranges: ranges.to_vec(),
            entries: vec![0; ENTRIES_PER_READ],
        })
    }

    pub(super) fn collect(&mut self, attached: &mut Attached) -> Result<DirtyPages, DirtyError> {
        let pid = self.pid;
        let mut dirty = DirtyPages::default();
        let stopped = attached.stop()?;
        let read = self.read_dirty_bits(&mut dirty.pages);
        // Clear even after a failed read: the next collect then reports
        // from here on, and the caller sees the error now.
        let cleared = clear_refs(pid);
        stopped.resume()?;
        read.map_err(|e| proc_error(pid, "reading", "pagemap", e))?;
        cleared.map_err(|e| proc_error(pid, "writing 4 to", "clear_refs", e))?;
        Ok(dirty)
    }

    fn read_dirty_bits(&mut self, pages: &mut Vec<u64>) -> std::io::Result<()> {
        for range in &self.ranges {
            let first_page = range.start / PAGE_SIZE as u64;
            let mut done = 0;
            while done < range.pages() {
                let count = (range.pages() - done).min(self.entries.len());
                self.pagemap
                    .read_entries(first_page + done as u64, &mut self.entries[..count])?;
                for (index, entry) in self.entries[..count].iter().enumerate() {
                    if entry & PAGEMAP_ENTRY_SOFT_DIRTY != 0 {
                        pages.push(range.start + ((done + index) * PAGE_SIZE) as u64);
                    }
                }
                done += count;
            }
        }
        Ok(())
    }
}

fn proc_error(pid: i32, action: &'static str, file: &'static str, error: std::io::Error) -> DirtyError {
    DirtyError::Proc {
        pid,
        action,
        file,
        message: error.to_string(),
    }
}
