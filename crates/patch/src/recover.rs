//! `recover`: bring a target whose patching was interrupted (the tool killed
//! at any step) to a consistent state, from the journal alone.
//!
//! - An apply cut short before its `Plan` had written nothing into the
//!   target (the plan is journaled before the load) → rolled back; a
//!   mapping an older tool made before its plan is unmapped.
//! - An apply with a `Plan`: if every trampoline holds the new bytes it had
//!   finished → commit (fully applied); otherwise restore the ones written
//!   and unmap the patch if it was loaded (no thread in it) → rolled back.
//!   Writes it held (a safe-point request) are undone first.
//! - A rollback: finish restoring → rolled back.
//! - Plain writes (heal, repoint): finish them → fully applied; a probe's
//!   breakpoints: remove them → rolled back.
//!
//! Live bytes that are neither what was there nor what we wrote are someone
//! else's change: recover stops and reports them, touching nothing. Bytes
//! it would restore are checked against the mirror generation below first.
//!
//! Opening the target's state repairs what a crash between files left
//! (`state::Repairs`: a torn last journal record set aside, generation
//! files brought in line with the journal); recover reports it, and brings
//! the generations in line again once the transaction is settled.

use crate::activate::{switch, Direction, DEFAULT_ATTEMPTS};
use crate::journal::{OpenTxn, Record, TxnKind, Write5};
use crate::rollback::{check_restores_against_mirror, collect_retired, finish_rollback, retire_or_unmap, Release};
use crate::state::{copies_log_path, is_mapped, staged_path, unmap, Repairs, TargetState};
use crate::transaction::publish;
use crate::PatchError;
use shadowpatch_mirror::StateDir;
use shadowpatch_process::maps::read_maps;
use shadowpatch_process::{Attached, ProcessIdentity};
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Recovered {
    /// No transaction was open: nothing to do.
    Consistent,
    /// The interrupted transaction was completed.
    FullyApplied,
    /// The interrupted transaction was undone (apply) or finished (rollback).
    FullyRolledBack,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RecoverOutcome {
    pub pid: i32,
    pub state: Recovered,
    pub patch_id: Option<String>,
    pub interrupted: Option<TxnKind>,
    /// Writes of the interrupted transaction found made when recovery
    /// started: trampolines of an apply, entries already restored by a
    /// rollback, plain writes of a heal, probe or repoint.
    pub written: usize,
    pub total: usize,
    pub active_patches: Vec<String>,
    /// Patch mappings still left in place because a thread may use them.
    pub retired_left: usize,
    /// Zombie copies a killed simulation left in the target, reaped.
    pub copies_reaped: usize,
    /// What a crash between files had left and was repaired.
    #[serde(skip_serializing_if = "Repairs::is_empty")]
    pub repairs: Repairs,
}

enum Live {
    Original,
    New,
}

fn classify(attached: &mut Attached, writes: &[Write5]) -> Result<Vec<Live>, PatchError> {
    writes
        .iter()
        .map(|w| {
            let live = attached.memory().read_vec(w.address, w.new.len())?;
            if live == w.new {
                Ok(Live::New)
            } else if live == w.original {
                Ok(Live::Original)
            } else {
                Err(PatchError::Tampered {
                    address: w.address,
                    expected: format!(
                        "{} or {}",
                        shadowpatch_symbols::hex(&w.original),
                        shadowpatch_symbols::hex(&w.new)
                    ),
                    live: shadowpatch_symbols::hex(&live),
                })
            }
        })
        .collect()
}

/// Finish or undo the interrupted transaction of `pid`, and record it.
pub fn recover(state_dir: &Path, pid: i32) -> Result<RecoverOutcome, PatchError> {
    let result = recover_transaction(state_dir, pid).and_then(|outcome| {
        // A kept window's repoint committed but its generation not yet
        // published (killed in between): publish it now.
        crate::republish::republish_for(state_dir, pid)?;
        Ok(outcome)
    });
    crate::history::record_recover(state_dir, pid, &result);
    result
}

fn recover_transaction(state_dir: &Path, pid: i32) -> Result<RecoverOutcome, PatchError> {
    let identity = ProcessIdentity::of(pid)?;
    let state = StateDir::open(state_dir)?;
    let mut target = TargetState::open_existing(&state, &identity)?;
    let mut attached = Attached::seize(&identity)?;
    let Some(open) = target.journal_state.open.clone() else {
        // Nothing interrupted; still unmap what earlier rollbacks retired.
        let txn = target.journal_state.next_txn;
        collect_retired(&mut attached, &mut target, txn);
        let copies_reaped = reap_logged_copies(&mut attached, &target.dir)?;
        attached.detach()?;
        let mut repairs = target.repairs.clone();
        repairs.merge(target.settle()?);
        return Ok(RecoverOutcome {
            pid,
            state: Recovered::Consistent,
            patch_id: None,
            interrupted: None,
            written: 0,
            total: 0,
            active_patches: target.journal_state.active.iter().map(|p| p.id.clone()).collect(),
            retired_left: target.journal_state.retired.len(),
            copies_reaped,
            repairs,
        });
    };
    let (state_reached, written, total) = match open.kind {
        TxnKind::Apply => recover_apply(&mut attached, &mut target, &open)?,
        TxnKind::Rollback => recover_rollback(&mut attached, &mut target, &open)?,
        TxnKind::Heal | TxnKind::Probe | TxnKind::Repoint => recover_writes(&mut attached, &mut target, &open)?,
    };
    let copies_reaped = reap_logged_copies(&mut attached, &target.dir)?;
    attached.detach()?;
    let mut repairs = target.repairs.clone();
    repairs.merge(target.settle()?);
    let journal_state = &target.journal_state;
    Ok(RecoverOutcome {
        pid,
        state: state_reached,
        patch_id: Some(open.patch_id.clone()),
        interrupted: Some(open.kind),
        written,
        total,
        active_patches: journal_state.active.iter().map(|p| p.id.clone()).collect(),
        retired_left: journal_state.retired.len(),
        copies_reaped,
        repairs,
    })
}

/// Reap the zombie copies a killed simulation left in the target (listed
/// in `copies_log_path`), in one stop. Only a listed pid that is a dead
/// child of the target with exit signal 0, as copies are, is reaped: a
/// recycled pid now naming one of the service's own children is left to it.
fn reap_logged_copies(attached: &mut Attached, dir: &Path) -> Result<usize, PatchError> {
    let log = copies_log_path(dir);
    let Ok(text) = std::fs::read_to_string(&log) else {
        return Ok(0);
    };
    let target = attached.pid();
    let zombies: Vec<i64> = text
        .lines()
        .filter_map(|line| line.trim().parse::<i64>().ok())
        .filter(|pid| is_dead_copy(target, *pid))
        .collect();
    let mut reaped = Vec::new();
    if !zombies.is_empty() {
        let mut stopped = attached.stop()?;
        reaped = stopped.reap_copies(&zombies)?;
        stopped.resume()?;
    }
    let _ = std::fs::remove_file(&log);
    Ok(reaped.len())
}

/// A zombie whose parent is `target` and whose exit signal is 0.
fn is_dead_copy(target: i32, pid: i64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some((_, rest)) = stat.rsplit_once(") ") else {
        return false;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields from 3 (state): state is [0], ppid [1], exit_signal (38) [35].
    fields.first() == Some(&"Z") && fields.get(1) == Some(&target.to_string().as_str()) && fields.get(35) == Some(&"0")
}

fn recover_apply(
    attached: &mut Attached,
    target: &mut TargetState,
    open: &OpenTxn,
) -> Result<(Recovered, usize, usize), PatchError> {
    let txn = open.txn;
    // Release what the apply held (the safe-point request) whatever else
    // happens: its parked threads go on in the old or the new code, both
    // consistent once the trampolines below are all-or-nothing again.
    for write in open.writes.iter().flatten() {
        crate::safepoint::release(attached.memory(), write)?;
    }
    let Some(plan) = &open.plan else {
        // Nothing was written to any function: undo the mapping, if made.
        if let Some((address, len)) = open.mapping {
            if is_mapped(&read_maps(attached.pid())?, address, len) {
                unmap(attached, address, len)?;
            }
        }
        remove_staged(target, open);
        target.journal.append(&Record::Abort {
            txn,
            reason: "recovered: interrupted before any trampoline".into(),
        })?;
        return Ok((Recovered::FullyRolledBack, 0, 0));
    };
    let writes: Vec<Write5> = plan.functions.iter().map(|f| f.write.clone()).collect();
    let live = classify(attached, &writes)?;
    let written = live.iter().filter(|l| matches!(l, Live::New)).count();
    if written == writes.len() {
        let staged = staged_path(&target.dir, plan.generation);
        target.journal.append(&Record::Commit {
            txn,
            pause_us: 0,
            boot_ns: Some(crate::journal::boot_ns()),
        })?;
        if staged.exists() {
            publish(&staged, &target.dir, plan.generation)?;
        }
        return Ok((Recovered::FullyApplied, written, writes.len()));
    }
    let undo: Vec<Write5> = writes
        .iter()
        .zip(&live)
        .filter(|(_, l)| matches!(l, Live::New))
        .map(|(w, _)| w.clone())
        .collect();
    if !undo.is_empty() {
        check_restores_against_mirror(&target.dir, plan)?;
        switch(
            attached,
            &undo,
            Direction::Backward,
            DEFAULT_ATTEMPTS,
            "recover-",
            &mut |_| Ok(()),
        )?;
    }
    // Trampolines were live: a thread may still be running the patch's code
    // (or hold a return address into it), so unmap only what no thread
    // uses, as rollback does, and otherwise retire the mapping.
    if is_mapped(&read_maps(attached.pid())?, plan.mapping_address, plan.mapping_len) {
        if let (Some(reason), _) = retire_or_unmap(attached, plan, Release::Never)? {
            target.journal.append(&Record::Retire {
                txn,
                address: plan.mapping_address,
                len: plan.mapping_len,
                reason,
            })?;
        }
    }
    remove_staged(target, open);
    target.journal.append(&Record::Abort {
        txn,
        reason: format!("recovered: {written} of {} trampolines undone", writes.len()),
    })?;
    Ok((Recovered::FullyRolledBack, written, writes.len()))
}

fn recover_rollback(
    attached: &mut Attached,
    target: &mut TargetState,
    open: &OpenTxn,
) -> Result<(Recovered, usize, usize), PatchError> {
    let patch = target
        .journal_state
        .active
        .iter()
        .find(|p| p.id == open.patch_id)
        .cloned()
        .ok_or_else(|| PatchError::Journal {
            path: target.dir.clone(),
            message: format!("rollback of {} which is not active", open.patch_id),
        })?;
    let writes: Vec<Write5> = patch.functions.iter().map(|f| f.write.clone()).collect();
    let live = classify(attached, &writes)?;
    let still_new: Vec<Write5> = writes
        .iter()
        .zip(&live)
        .filter(|(_, l)| matches!(l, Live::New))
        .map(|(w, _)| w.clone())
        .collect();
    let restored = writes.len() - still_new.len();
    if !still_new.is_empty() {
        check_restores_against_mirror(&target.dir, &patch)?;
        switch(
            attached,
            &still_new,
            Direction::Backward,
            DEFAULT_ATTEMPTS,
            "recover-",
            &mut |_| Ok(()),
        )?;
    }
    let reason = if is_mapped(&read_maps(attached.pid())?, patch.mapping_address, patch.mapping_len) {
        retire_or_unmap(attached, &patch, Release::Never)?.0
    } else {
        None
    };
    finish_rollback(target, open.txn, &patch, reason, 0)?;
    // A rollback's writes are its restorations: count those already made.
    Ok((Recovered::FullyRolledBack, restored, writes.len()))
}

/// Finish (heal, repoint) or undo (probe) announced plain writes.
fn recover_writes(
    attached: &mut Attached,
    target: &mut TargetState,
    open: &OpenTxn,
) -> Result<(Recovered, usize, usize), PatchError> {
    let txn = open.txn;
    let Some(writes) = &open.writes else {
        target.journal.append(&Record::Abort {
            txn,
            reason: "recovered: interrupted before any write".into(),
        })?;
        return Ok((Recovered::FullyRolledBack, 0, 0));
    };
    let live = classify(attached, writes)?;
    let written = live.iter().filter(|l| matches!(l, Live::New)).count();
    let pick = |wanted: fn(&Live) -> bool| -> Vec<Write5> {
        writes
            .iter()
            .zip(&live)
            .filter(|(_, l)| wanted(l))
            .map(|(w, _)| w.clone())
            .collect()
    };
    if open.kind.completes_on_recover() {
        let missing = pick(|l| matches!(l, Live::Original));
        if !missing.is_empty() {
            switch(
                attached,
                &missing,
                Direction::Forward,
                DEFAULT_ATTEMPTS,
                "recover-",
                &mut |_| Ok(()),
            )?;
        }
        target.journal.append(&Record::Commit {
            txn,
            pause_us: 0,
            boot_ns: Some(crate::journal::boot_ns()),
        })?;
        return Ok((Recovered::FullyApplied, written, writes.len()));
    }
    let undo = pick(|l| matches!(l, Live::New));
    if !undo.is_empty() {
        switch(
            attached,
            &undo,
            Direction::Backward,
            DEFAULT_ATTEMPTS,
            "recover-",
            &mut |_| Ok(()),
        )?;
    }
    target.journal.append(&Record::Abort {
        txn,
        reason: format!("recovered: {written} of {} writes undone", writes.len()),
    })?;
    Ok((Recovered::FullyRolledBack, written, writes.len()))
}

fn remove_staged(target: &TargetState, open: &OpenTxn) {
    if let Some(plan) = &open.plan {
        let _ = std::fs::remove_file(staged_path(&target.dir, plan.generation));
    }
    // Without a plan the generation number is the next one after the active patches.
    let next = target.journal_state.active.len() as u32 + 1;
    let _ = std::fs::remove_file(staged_path(&target.dir, next));
}
