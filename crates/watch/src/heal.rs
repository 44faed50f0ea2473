//! Self-heal: write the mirrored bytes back over tampered immutable bytes,
//! journaled like a patch (`patch/src/writes.rs`): the target lock is taken
//! and the target attached only for the heal; the writes are announced in
//! the fsync'd journal, checked to still hold the tampered bytes and
//! switched in one stop of all threads; an interrupted heal is finished by
//! `recover`.

use crate::WatchError;
use shadowpatch_mirror::StateDir;
use shadowpatch_patch::journal::{TxnKind, Write5};
use shadowpatch_patch::state::TargetState;
use shadowpatch_patch::writes::write_in_one_stop;
use shadowpatch_process::{Attached, ProcessIdentity};
use std::path::Path;

/// One run to write back: where, the tampered bytes seen, the mirrored bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealRun {
    pub address: u64,
    pub live: Vec<u8>,
    pub expected: Vec<u8>,
}

/// What a heal did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealDone {
    pub txn: u64,
    pub pause_us: u64,
}

/// Why a heal was not made although nothing failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealSkipped {
    /// The journal changed since the difference was judged (an authorised
    /// change may explain it): re-verify first.
    JournalMoved,
    /// Some run's live bytes are what a committed transaction of ours put
    /// there (an active patch's entry, e.g. after a kept watch window):
    /// never written over.
    Committed { address: u64 },
}

/// The first run whose live bytes, where it overlaps an active patch's
/// entry, are that entry's committed bytes.
fn committed_run(journal: &shadowpatch_patch::journal::JournalState, runs: &[HealRun]) -> Option<u64> {
    for run in runs {
        let end = run.address + run.live.len() as u64;
        for write in journal.active.iter().flat_map(|p| &p.functions).map(|f| &f.write) {
            let write_end = write.address + write.new.len() as u64;
            let (from, to) = (run.address.max(write.address), end.min(write_end));
            if from >= to {
                continue;
            }
            let live = &run.live[(from - run.address) as usize..(to - run.address) as usize];
            let committed = &write.new[(from - write.address) as usize..(to - write.address) as usize];
            if live == committed {
                return Some(run.address);
            }
        }
    }
    None
}

/// Heal `runs` in one journaled stop. `journal_len` is the journal length
/// the differences were judged against: if another process changed the
/// journal since, the heal is skipped (the verifier judges again).
pub fn heal(
    state_dir: &Path,
    identity: &ProcessIdentity,
    runs: &[HealRun],
    journal_len: u64,
    attempts: u32,
) -> Result<Result<HealDone, HealSkipped>, WatchError> {
    let state = StateDir::open(state_dir)?;
    let mut target = TargetState::open_existing(&state, identity)?;
    let journal = shadowpatch_patch::journal::Journal::path_in(&target.dir);
    let length_now = std::fs::metadata(&journal).map(|m| m.len()).unwrap_or(0);
    if length_now != journal_len || target.journal_state.open.is_some() {
        return Ok(Err(HealSkipped::JournalMoved));
    }
    if let Some(address) = committed_run(&target.journal_state, runs) {
        return Ok(Err(HealSkipped::Committed { address }));
    }
    let writes: Vec<Write5> = runs
        .iter()
        .map(|run| Write5 {
            address: run.address,
            original: run.live.clone(),
            new: run.expected.clone(),
        })
        .collect();
    let txn = target.journal_state.next_txn;
    let mut attached = Attached::seize(identity)?;
    let result = write_in_one_stop(
        &mut attached,
        &mut target,
        TxnKind::Heal,
        "heal",
        writes,
        None,
        attempts,
    );
    let detached = attached.detach();
    let activation = result?;
    detached?;
    Ok(Ok(HealDone {
        txn,
        pause_us: activation.pause.pause_us,
    }))
}
