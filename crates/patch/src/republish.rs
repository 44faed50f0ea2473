//! A kept watch window is a generation: after a committed `Repoint` (the
//! trampolines re-aimed from their watch stubs straight at the new code)
//! the active generation N is derived again with the entry bytes the
//! journal now holds and published in place of the old file (staged, then
//! renamed over it, directory fsync'd), so `verify` and every watcher
//! compare against what the target really runs.
//!
//! Crash-safe ordering: the repoint's `Begin`/`Writes` are fsync'd before
//! the write and its `Commit` after it; the generation follows the commit.
//! A kill between the commit and the rename leaves a journal whose active
//! patches say bytes that generation N does not hold: `recover` (and the
//! agent at start) call [`republish_committed`], which notices exactly that
//! and publishes again. Until then a watcher excuses live bytes equal to an
//! active patch's committed entry bytes (`watch/src/authority.rs`), so no
//! heal writes over a committed transaction of ours.

use crate::journal::JournalState;
use crate::state::staged_path;
use crate::PatchError;
use shadowpatch_mirror::{derive, Edit, MirrorFile, StateDir, PAGE_SIZE};
use std::path::Path;

/// The bytes generation `file` stores at `[address, address + len)`, if a
/// mirrored region holds all of them.
pub fn stored_bytes(file: &MirrorFile, address: u64, len: usize) -> Result<Option<Vec<u8>>, PatchError> {
    let mut out = Vec::with_capacity(len);
    let mut at = address;
    while out.len() < len {
        let Some(index) = file
            .header
            .regions
            .iter()
            .position(|r| r.spec.start <= at && at < r.spec.end)
        else {
            return Ok(None);
        };
        let region = &file.header.regions[index];
        let page_index = (at - region.spec.start) / PAGE_SIZE as u64;
        let page = file.read_page(index, page_index)?;
        let offset = ((at - region.spec.start) % PAGE_SIZE as u64) as usize;
        let take = (len - out.len()).min(PAGE_SIZE - offset);
        out.extend_from_slice(&page[offset..offset + take]);
        at += take as u64;
    }
    Ok(Some(out))
}

/// The entry writes of the active patches that generation N (N = the
/// number of active patches) does not hold: what a committed repoint left
/// to publish. Empty when the generation agrees with the journal.
pub fn unpublished_edits(dir: &Path, journal: &JournalState) -> Result<Vec<Edit>, PatchError> {
    let generation = journal.active.len() as u32;
    if journal.open.is_some() || generation == 0 {
        return Ok(Vec::new());
    }
    let path = StateDir::generation_path(dir, generation);
    if !path.exists() {
        // The apply's own publication is missing: not ours to fix here.
        return Ok(Vec::new());
    }
    let file = MirrorFile::open(&path)?;
    let mut edits = Vec::new();
    for function in journal.active.iter().flat_map(|p| &p.functions) {
        let write = &function.write;
        let stored = stored_bytes(&file, write.address, write.new.len())?;
        if stored.as_deref().is_some_and(|bytes| bytes != write.new.as_slice()) {
            edits.push(Edit {
                address: write.address,
                bytes: write.new.clone(),
            });
        }
    }
    Ok(edits)
}

/// Derive generation N again with the entry bytes the journal's active
/// patches hold, and publish it in place. Returns whether it did (false:
/// the generation already agreed).
pub fn republish_committed(dir: &Path, journal: &JournalState) -> Result<bool, PatchError> {
    let edits = unpublished_edits(dir, journal)?;
    if edits.is_empty() {
        return Ok(false);
    }
    let generation = journal.active.len() as u32;
    let current = MirrorFile::open(&StateDir::generation_path(dir, generation))?;
    let staged = staged_path(dir, generation);
    let result = derive(&current, generation, &edits, &[], &staged)
        .map_err(PatchError::from)
        .and_then(|_| crate::transaction::publish(&staged, dir, generation));
    if result.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    result.map(|()| true)
}

/// [`republish_committed`] for the live target `pid`, under its lock.
pub fn republish_for(state_dir: &Path, pid: i32) -> Result<bool, PatchError> {
    let identity = shadowpatch_process::ProcessIdentity::of(pid)?;
    let state = StateDir::open(state_dir)?;
    let target = crate::state::TargetState::open_existing(&state, &identity)?;
    let published = republish_committed(&target.dir, &target.journal_state)?;
    if published {
        tracing::info!(pid, "published the kept generation a killed window left unpublished");
    }
    Ok(published)
}
