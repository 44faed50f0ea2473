//! Per-target state shared by apply, rollback and recover: the target's
//! directory, its journal, and the mirror generations that follow patches.

use crate::journal::{Journal, JournalState};
use crate::PatchError;
use shadowpatch_mirror::{capture, select_regions, CaptureOptions, StateDir};
use shadowpatch_symbols::Module;
use shadowpatch_target::{Attached, Mapping, ProcessIdentity, TargetMemory};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct TargetState {
    pub dir: PathBuf,
    pub journal: Journal,
    pub journal_state: JournalState,
}

impl TargetState {
    /// Open (creating) the state of the live process `identity`.
    pub fn open(state: &StateDir, identity: &ProcessIdentity) -> Result<Self, PatchError> {
        let dir = state.target_dir(identity.pid, identity.start_time);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| PatchError::Journal {
                path: dir.clone(),
                message: e.to_string(),
            })?;
        Self::at(dir)
    }

    /// Open the existing state of `identity` (refusing another incarnation's).
    pub fn open_existing(state: &StateDir, identity: &ProcessIdentity) -> Result<Self, PatchError> {
        Self::at(state.dir_for_live(identity)?)
    }

    /// Replay and open the journal of the target directory `dir`.
    fn at(dir: PathBuf) -> Result<Self, PatchError> {
        let journal_state = Journal::replay(&dir)?;
        let journal = Journal::open(&dir)?;
        Ok(TargetState {
            dir,
            journal,
            journal_state,
        })
    }
}

/// The latest generation number, capturing generation 0 (every module)
/// first if the process was never mirrored. Checks the generations on disk
/// agree with the journal's active patches.
pub fn ensure_baseline(
    state: &StateDir,
    target: &TargetState,
    identity: &ProcessIdentity,
    maps: &[Mapping],
    modules: &[Module],
) -> Result<u32, PatchError> {
    let _ = state;
    let generations = StateDir::generations(&target.dir);
    if generations.is_empty() {
        let regions = select_regions(identity.pid, maps, modules, None)?;
        let mut memory = TargetMemory::open(identity)?;
        capture(
            &mut memory,
            identity,
            &regions,
            &StateDir::generation_path(&target.dir, 0),
            &CaptureOptions { generation: 0 },
            &mut |_, _| {},
        )?;
        return Ok(0);
    }
    let latest = *generations.last().expect("not empty");
    let expected = target.journal_state.active.len() as u32;
    if latest != expected {
        return Err(PatchError::Journal {
            path: target.dir.clone(),
            message: format!("latest mirror generation is {latest} but {expected} patches are active"),
        });
    }
    Ok(latest)
}

pub fn staged_path(dir: &Path, generation: u32) -> PathBuf {
    dir.join(format!("gen-{generation:06}.mirror.staged"))
}

pub fn now_ms() -> u64 {
    shadowpatch_mirror::capture::unix_ms()
}

/// Unmap `len` bytes at `address` in the target, in one short stop.
pub fn unmap(attached: &mut Attached, address: u64, len: u64) -> Result<(), PatchError> {
    let mut stopped = attached.stop()?;
    let tid = stopped.borrowable_thread();
    stopped.remote_munmap(tid, address, len)?;
    stopped.resume()?;
    Ok(())
}

/// Whether anything of `[address, address + len)` is mapped in the target.
pub fn is_mapped(maps: &[Mapping], address: u64, len: u64) -> bool {
    maps.iter().any(|m| m.start < address + len && address < m.end)
}
