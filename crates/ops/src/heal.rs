//! `heal`: write mirrored bytes back over tampered immutable bytes, as a
//! journaled transaction of its own (`TxnKind::Heal`). The watcher decides
//! what to heal and calls this through [`OpsHealer`], which the CLI's
//! `watch --heal` and the agent hand it; nothing else writes a heal.
//!
//! The target lock is taken and the target attached only for the heal; the
//! writes are announced in the fsync'd journal, checked to still hold the
//! tampered bytes and switched in one stop of all threads (`write_in_one_stop`);
//! an interrupted heal is finished by `recover`. A heal never writes over
//! bytes a committed transaction of ours put there (an active patch's
//! entry, e.g. after a kept watch window), and is skipped when the journal
//! moved since the difference was judged.

use crate::OpsError;
use shadowpatch_mirror::StateDir;
use shadowpatch_patch::journal::{Journal, JournalState, TxnKind, Write5};
use shadowpatch_patch::state::TargetState;
use shadowpatch_patch::writes::write_in_one_stop;
use shadowpatch_process::Attached;
use shadowpatch_watch::heal::{HealDone, HealRequest, HealRun, HealSkipped, Healer};
use shadowpatch_watch::WatchError;

/// Heal `request.runs` in one journaled stop.
pub fn heal(request: HealRequest<'_>) -> Result<Result<HealDone, HealSkipped>, OpsError> {
    let state = StateDir::open(request.state_dir)?;
    let mut target = TargetState::open_existing(&state, request.identity)?;
    let journal = Journal::path_in(&target.dir);
    let length_now = std::fs::metadata(&journal).map(|m| m.len()).unwrap_or(0);
    if length_now != request.journal_len || target.journal_state.open.is_some() {
        return Ok(Err(HealSkipped::JournalMoved));
    }
    if let Some(address) = committed_run(&target.journal_state, request.runs) {
        return Ok(Err(HealSkipped::Committed { address }));
    }
    let writes: Vec<Write5> = request
        .runs
        .iter()
        .map(|run| Write5 {
            address: run.address,
            original: run.live.clone(),
            new: run.expected.clone(),
        })
        .collect();
    let txn = target.journal_state.next_txn;
    let mut attached = Attached::seize(request.identity)?;
    let result = write_in_one_stop(
        &mut attached,
        &mut target,
        TxnKind::Heal,
        "heal",
        writes,
        None,
        request.attempts,
    );
    let detached = attached.detach();
    let activation = result?;
    detached?;
    Ok(Ok(HealDone {
        txn,
        pause_us: activation.pause.pause_us,
    }))
}

/// The first run whose live bytes, where it overlaps an active patch's
/// entry, are that entry's committed bytes.
fn committed_run(journal: &JournalState, runs: &[HealRun]) -> Option<u64> {
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

/// The heal operation as the watcher calls it.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpsHealer;

impl Healer for OpsHealer {
    fn heal(&self, request: HealRequest<'_>) -> Result<Result<HealDone, HealSkipped>, WatchError> {
        heal(request).map_err(|error| match error {
            // The watcher ends on a target that is gone: keep the kind.
            OpsError::Target(e) => WatchError::Target(e),
            OpsError::Patch(e) => WatchError::Patch(e),
            OpsError::Mirror(e) => WatchError::Mirror(e),
            other => WatchError::Heal(other.to_string()),
        })
    }
}
