//! `rollback`: restore the previous generation's bytes in one stop, after
//! checking the live bytes are exactly what we wrote. Patches stack and
//! roll back last-in first-out; rolling back a patch with later patches
//! above it is refused. Then, in a second short stop that is not part of
//! the rollback pause, the patch's mapping is unmapped when no thread can
//! still be using it (no instruction pointer inside it, no word on any
//! thread's stack pointing into it); otherwise it is left in place,
//! retired, and said so.

use crate::activate::{switch, Direction, DEFAULT_ATTEMPTS};
use crate::fault;
use crate::journal::{PatchRecord, Record, TxnKind, Write5};
use crate::state::{now_ms, TargetState};
use crate::PatchError;
use shadowpatch_mirror::StateDir;
use shadowpatch_process::{Attached, PauseReport, ProcessIdentity, Stopped};
use std::path::Path;

/// How much of each thread's stack is scanned for return addresses into
/// the patch before unmapping it.
const STACK_SCAN_BYTES: usize = 256 * 1024;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RollbackOutcome {
    pub patch_id: String,
    pub pid: i32,
    /// The generation now active.
    pub generation: u32,
    pub functions: Vec<String>,
    pub pause_us: u64,
    /// The switching stop's phases (`pause_us` is its `pause_us`); absent
    /// from an older agent's answer.
    #[serde(default)]
    pub pause: PauseReport,
    pub attempts: u32,
    /// The second stop, in which the patch's memory was checked and unmapped.
    pub unmap_pause_us: u64,
    /// Whether the patch's memory was unmapped (else retired, left mapped).
    pub unmapped: bool,
    pub retired_reason: Option<String>,
}

/// Roll back the latest patch (or `patch_id`, if it is the latest) on the
/// operator's command.
pub fn rollback(state_dir: &Path, pid: i32, patch_id: Option<&str>) -> Result<RollbackOutcome, PatchError> {
    rollback_with_cause(state_dir, pid, patch_id, "command")
}

/// Roll back, recording why (`command`, `crash`, `health`, `request`, ...)
/// in the event history with the outcome.
pub fn rollback_with_cause(
    state_dir: &Path,
    pid: i32,
    patch_id: Option<&str>,
    cause: &str,
) -> Result<RollbackOutcome, PatchError> {
    let result = rollback_transaction(state_dir, pid, patch_id);
    crate::history::record_rollback(state_dir, pid, cause, &result);
    result
}

fn rollback_transaction(state_dir: &Path, pid: i32, patch_id: Option<&str>) -> Result<RollbackOutcome, PatchError> {
    // Probed: checked again at each memory open, seize and stop.
    let identity = ProcessIdentity::of_probed(pid)?;
    let state = StateDir::open(state_dir)?;
    let mut target = TargetState::open_existing(&state, &identity)?;
    if let Some(open) = &target.journal_state.open {
        return Err(PatchError::OpenTransaction {
            pid,
            patch_id: open.patch_id.clone(),
        });
    }
    let active = &target.journal_state.active;
    let top = active.last().ok_or(PatchError::NothingToRollback { pid })?;
    let patch = match patch_id {
        None => top.clone(),
        Some(id) => {
            let position = active
                .iter()
                .position(|p| p.id == id)
                .ok_or_else(|| PatchError::NoSuchPatch {
                    pid,
                    id: id.to_string(),
                    active: active.iter().map(|p| p.id.clone()).collect::<Vec<_>>().join(", "),
                })?;
            if position + 1 != active.len() {
                return Err(PatchError::NotOnTop {
                    id: id.to_string(),
                    above: active[position + 1..]
                        .iter()
                        .map(|p| p.id.clone())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            active[position].clone()
        }
    };
    let mut attached = Attached::seize(&identity)?;
    let outcome = rollback_seized(
        &mut attached,
        &mut target,
        &patch,
        Release::AtTheLastStop,
        &mut |_| Ok(()),
        &mut |_| Ok(()),
    )?;
    attached.detach()?;
    Ok(outcome)
}

/// Whether the tracer lets go of the target at the last stop of a
/// rollback (its unmap), instead of stopping it once more to detach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Release {
    AtTheLastStop,
    /// The caller goes on with the target seized (a watch window, recover).
    Never,
}

/// The rollback transaction on an already seized target: `in_stop` runs
/// inside the switching stop (after the entries are restored), `switched`
/// right after it, before the mapping is retired or unmapped (the watch
/// window resumes a rewound thread there).
pub(crate) fn rollback_seized(
    attached: &mut Attached,
    target: &mut TargetState,
    patch: &PatchRecord,
    release: Release,
    in_stop: &mut dyn FnMut(&mut Stopped) -> Result<(), PatchError>,
    switched: &mut dyn FnMut(&mut Attached) -> Result<(), PatchError>,
) -> Result<RollbackOutcome, PatchError> {
    let pid = attached.pid();
    let identity = attached.identity().clone();
    check_restores_against_mirror(&target.dir, patch)?;
    let txn = target.journal_state.next_txn;
    target.journal.append(&Record::Begin {
        txn,
        kind: TxnKind::Rollback,
        patch_id: patch.id.clone(),
        pid,
        start_time: identity.start_time,
        unix_ms: now_ms(),
        boot_ns: Some(crate::journal::boot_ns()),
    })?;
    fault::point("rollback-begin");
    collect_retired(attached, target, txn);
    let writes: Vec<Write5> = patch.functions.iter().map(|f| f.write.clone()).collect();
    let result = switch(
        attached,
        &writes,
        Direction::Backward,
        DEFAULT_ATTEMPTS,
        "rollback-",
        in_stop,
    );
    let activation = match result {
        Ok(activation) => activation,
        Err(error) => {
            // Nothing was switched: the patch stays active.
            let _ = target.journal.append(&Record::Abort {
                txn,
                reason: error.to_string(),
            });
            return Err(error);
        }
    };
    switched(attached)?;
    let (retired_reason, unmap_pause_us) = retire_or_unmap(attached, patch, release)?;
    finish_rollback(target, txn, patch, retired_reason.clone(), activation.pause.pause_us)?;
    target.journal_state = crate::journal::Journal::replay(&target.dir)?;
    Ok(RollbackOutcome {
        patch_id: patch.id.clone(),
        pid,
        generation: patch.generation - 1,
        functions: patch.functions.iter().map(|f| f.site.symbol.clone()).collect(),
        pause_us: activation.pause.pause_us,
        pause: activation.pause,
        attempts: activation.attempts,
        unmap_pause_us,
        unmapped: retired_reason.is_none(),
        retired_reason,
    })
}

/// Check that the bytes a rollback of `patch` would put back (each write's
/// `original`) are the bytes generation N−1 of the mirror holds there,
/// page hashes checked: a journal record damaged in a way its checksum
/// does not catch (or written by a faulty tool) must never put wrong code
/// into the target. A write outside every mirrored region (a mirror taken
/// of one module only) cannot be checked and is let through.
pub(crate) fn check_restores_against_mirror(dir: &Path, patch: &PatchRecord) -> Result<(), PatchError> {
    let below = patch.generation.saturating_sub(1);
    let path = StateDir::generation_path(dir, below);
    let mirror = match shadowpatch_mirror::MirrorFile::open(&path) {
        Ok(mirror) => mirror,
        Err(shadowpatch_mirror::MirrorError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(PatchError::RestoreMismatch {
                patch_id: patch.id.clone(),
                detail: format!("generation {below} ({}) is missing", path.display()),
            })
        }
        Err(other) => return Err(other.into()),
    };
    for function in &patch.functions {
        let write = &function.write;
        let Some(mirrored) = mirror.stored_bytes(write.address, write.original.len())? else {
            tracing::warn!(
                address = write.address,
                "rollback: {} is outside generation {below}'s regions; its restored bytes are not checked",
                function.site.symbol
            );
            continue;
        };
        if mirrored != write.original {
            return Err(PatchError::RestoreMismatch {
                patch_id: patch.id.clone(),
                detail: format!(
                    "the journal would restore {} at {:#x} ({}) but generation {below} holds {}",
                    shadowpatch_symbols::hex(&write.original),
                    write.address,
                    function.site.symbol,
                    shadowpatch_symbols::hex(&mirrored)
                ),
            });
        }
    }
    Ok(())
}

/// Journal the unmap (or retirement) and the commit, and drop the patch's
/// mirror generation: only after the commit is durable, so a crash between
/// the two leaves a generation the journal no longer backs, which the next
/// opening of the target's state removes (`state::reconcile_generations`).
pub(crate) fn finish_rollback(
    target: &mut TargetState,
    txn: u64,
    patch: &PatchRecord,
    retired_reason: Option<String>,
    pause_us: u64,
) -> Result<(), PatchError> {
    let (address, len) = (patch.mapping_address, patch.mapping_len);
    target.journal.append(&match retired_reason {
        None => Record::Unmap { txn, address, len },
        Some(reason) => Record::Retire {
            txn,
            address,
            len,
            reason,
        },
    })?;
    target.journal.append(&Record::Commit {
        txn,
        pause_us,
        boot_ns: Some(crate::journal::boot_ns()),
    })?;
    fault::point("rollback-committed");
    let generation = StateDir::generation_path(&target.dir, patch.generation);
    // The commit is durable before the generation goes (inside a batch,
    // its sync may still be pending: made now).
    let removed = shadowpatch_process::durable::flush()
        .map_err(std::io::Error::from)
        .and_then(|_| std::fs::remove_file(&generation))
        .and_then(|_| shadowpatch_process::durable::sync_dir(&target.dir));
    match removed {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(PatchError::Journal {
                path: generation,
                message: e.to_string(),
            })
        }
    }
    Ok(())
}

/// A thread that was inside the patch when its entries were restored
/// leaves it as soon as it runs again; but on a loaded machine a preempted
/// thread may wait for a core for many milliseconds. Try a few quick stops,
/// then retire the mapping: every later transaction on the target tries
/// again to unmap retired mappings (`collect_retired`).
const UNMAP_ATTEMPTS: u32 = 3;

/// In one stop, unmap the patch unless a thread may still use it; returns
/// why it was kept (if it was) and the stops' total pause.
pub(crate) fn retire_or_unmap(
    attached: &mut Attached,
    patch: &PatchRecord,
    release: Release,
) -> Result<(Option<String>, u64), PatchError> {
    let range = (patch.mapping_address, patch.mapping_len);
    let mut total_pause = 0;
    for attempt in 1..=UNMAP_ATTEMPTS {
        let stacks = stack_ranges(attached.pid())?;
        // The remote munmap's instructions are found before the stop, not in it.
        attached.prepare_remote_calls()?;
        let mut stopped = attached.stop()?;
        let outcome = unmap_unused(&mut stopped, &[range], &stacks);
        // The last stop (unmapped, failed, or the last attempt) lets go.
        let last = !matches!(&outcome, Ok(busy) if !busy.is_empty()) || attempt == UNMAP_ATTEMPTS;
        if last && release == Release::AtTheLastStop {
            stopped.attached().release_at_next_resume(true);
        }
        total_pause += stopped.resume()?.pause_us;
        let busy = outcome?;
        match busy.into_iter().next() {
            None => return Ok((None, total_pause)),
            Some((_, reason)) if attempt == UNMAP_ATTEMPTS => return Ok((Some(reason), total_pause)),
            Some(_) => std::thread::sleep(std::time::Duration::from_millis(u64::from(attempt))),
        }
    }
    unreachable!("the loop returns on its last attempt")
}

/// An address range: (start, length).
type Range = (u64, u64);

/// Stack mappings of the target (`[stack]` and anonymous rw mappings that
/// threads' stack pointers may lie in), to bound each thread's stack scan
/// by the end of the mapping holding its stack pointer.
fn stack_ranges(pid: i32) -> Result<Vec<(u64, u64)>, PatchError> {
    Ok(shadowpatch_process::maps::read_maps(pid)?
        .into_iter()
        .filter(|m| m.readable && m.writable && !m.executable)
        .map(|m| (m.start, m.end))
        .collect())
}

/// Inside a stop: unmap each of `ranges` unless a thread's instruction
/// pointer or a word of its stack (from its stack pointer to the end of
/// its stack mapping, at most `STACK_SCAN_BYTES`) points into it. Returns
/// the ranges kept, each with why.
fn unmap_unused(stopped: &mut Stopped, ranges: &[Range], stacks: &[Range]) -> Result<Vec<(Range, String)>, PatchError> {
    let mut busy: Vec<(Range, String)> = Vec::new();
    let inside = |value: u64| ranges.iter().copied().find(|(a, len)| (*a..a + len).contains(&value));
    let mut stack = vec![0u8; STACK_SCAN_BYTES];
    for tid in stopped.threads() {
        let regs = stopped.regs(tid)?;
        if let Some(range) = inside(regs.rip) {
            busy.push((
                range,
                format!("thread {tid} is executing patch code at {:#x}", regs.rip),
            ));
        }
        let end = stacks
            .iter()
            .find(|(start, end)| (*start..*end).contains(&regs.rsp))
            .map(|(_, end)| *end)
            .unwrap_or(regs.rsp + STACK_SCAN_BYTES as u64);
        let len = ((end - regs.rsp) as usize).min(STACK_SCAN_BYTES);
        let n = stopped.memory().read_partial(regs.rsp, &mut stack[..len]).unwrap_or(0);
        for (i, word) in stack[..n - n % 8].chunks_exact(8).enumerate() {
            let value = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            if let Some(range) = inside(value) {
                busy.push((
                    range,
                    format!(
                        "thread {tid}'s stack holds {value:#x} (at {:#x}), an address in the patch",
                        regs.rsp + (i * 8) as u64
                    ),
                ));
            }
        }
    }
    let tid = stopped.borrowable_thread();
    for range in ranges {
        if !busy.iter().any(|(r, _)| r == range) {
            stopped.remote_munmap(tid, range.0, range.1)?;
        }
    }
    Ok(busy)
}

/// Unmap mappings earlier rollbacks had to leave in place, where no thread
/// uses them any more, all in one stop; journals each unmap under
/// transaction `txn`. Best effort: what is still in use stays retired.
pub(crate) fn collect_retired(attached: &mut Attached, target: &mut TargetState, txn: u64) {
    let retired = target.journal_state.retired.clone();
    if retired.is_empty() {
        return;
    }
    let Ok(maps) = shadowpatch_process::maps::read_maps(attached.pid()) else {
        return;
    };
    let mut candidates = Vec::new();
    for (address, len) in retired {
        // Only a mapping that is still ours: anonymous, within the range.
        let ours = maps
            .iter()
            .filter(|m| m.start < address + len && address < m.end)
            .all(|m| {
                m.kind == shadowpatch_process::MappingKind::Anonymous && m.start >= address && m.end <= address + len
            });
        if !ours || !crate::state::is_mapped(&maps, address, len) {
            // Gone (the program unmapped it) or reused: forget it, touch nothing.
            let _ = target.journal.append(&Record::Unmap { txn, address, len });
        } else {
            candidates.push((address, len));
        }
    }
    if candidates.is_empty() {
        return;
    }
    let Ok(stacks) = stack_ranges(attached.pid()) else {
        return;
    };
    let Ok(mut stopped) = attached.stop() else { return };
    let outcome = unmap_unused(&mut stopped, &candidates, &stacks);
    let _ = stopped.resume();
    if let Ok(busy) = outcome {
        for (address, len) in candidates {
            if !busy.iter().any(|(r, _)| *r == (address, len)) {
                let _ = target.journal.append(&Record::Unmap { txn, address, len });
            }
        }
    }
}
