//! Critical-variable state around patches: the snapshot `apply` takes of
//! the mirrored variables just before activation, `rollback
//! --restore-state` writing it back through a journaled plain-writes
//! transaction, and `snapshot` (a copy now, kept in each variable's
//! history).

use crate::{bad_input, OpsError};
use shadowpatch_mirror::{
    CriticalVariable, PreApply, SavedVariable, Snapshot, SnapshotFile, StateDir, VariableMode, VariableRegistry,
};
use shadowpatch_patch::journal::{Journal, TxnKind, Write5};
use shadowpatch_patch::state::TargetState;
use shadowpatch_patch::writes::write_in_one_stop;
use shadowpatch_process::{Attached, ProcessIdentity, TargetMemory};
use shadowpatch_store::{record_best_effort, EventKind, NewEvent};
use std::path::{Path, PathBuf};

/// The target directory of the live `identity`, if anything was stored for it.
pub fn live_target_dir(state_dir: &Path, identity: &ProcessIdentity) -> Result<Option<PathBuf>, OpsError> {
    let Some(state) = StateDir::open_if_present(state_dir)? else {
        return Ok(None);
    };
    let dir = state.target_dir(identity.pid, identity.start_time);
    Ok(dir.exists().then_some(dir))
}

/// The registered variable named `name`: `module!symbol`, the bare symbol,
/// or the `0xADDR:SIZE` name of an unnamed one.
pub fn find<'a>(variables: &'a [CriticalVariable], name: &str) -> Option<&'a CriticalVariable> {
    variables
        .iter()
        .find(|v| v.name == name)
        .or_else(|| variables.iter().find(|v| v.symbol.as_deref() == Some(name)))
}

fn names(variables: &[CriticalVariable]) -> String {
    if variables.is_empty() {
        return "none".into();
    }
    variables.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
}

fn registered(state_dir: &Path, identity: &ProcessIdentity) -> Result<(PathBuf, Vec<CriticalVariable>), OpsError> {
    let pid = identity.pid;
    let none = || {
        bad_input(format!(
            "pid {pid} has no registered critical variables in {} \
             (declare them with watch --guard, --mirror-var or --vars)",
            state_dir.display()
        ))
    };
    let dir = live_target_dir(state_dir, identity)?.ok_or_else(none)?;
    let registry = VariableRegistry::load(&dir)?.ok_or_else(none)?;
    Ok((dir, registry.variables))
}

/// Read `variables` now (from outside; the target keeps running).
fn read_now(
    identity: &ProcessIdentity,
    variables: &[CriticalVariable],
    cause: &str,
    patch_id: Option<&str>,
) -> Result<Vec<(CriticalVariable, Snapshot)>, OpsError> {
    let mut memory = TargetMemory::open(identity)?;
    let now = shadowpatch_store::now_ms();
    variables
        .iter()
        .map(|v| {
            let bytes = memory.read_vec(v.address, v.size as usize)?;
            Ok((v.clone(), Snapshot::of(&bytes, now, cause, patch_id)))
        })
        .collect()
}

/// One variable copied by `snapshot`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Taken {
    pub name: String,
    pub address: u64,
    #[serde(flatten)]
    pub snapshot: Snapshot,
    pub value: Option<u64>,
}

/// What `snapshot` copied.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SnapshotOutcome {
    pub pid: i32,
    pub start_time: u64,
    pub snapshots: Vec<Taken>,
}

/// `snapshot PID [--var NAME]`: copy the registered critical variables (or
/// one) now, keep the copies in their history, and record the event.
pub fn snapshot(state_dir: &Path, pid: i32, var: Option<&str>) -> Result<SnapshotOutcome, OpsError> {
    let identity = ProcessIdentity::of(pid)?;
    let (dir, variables) = registered(state_dir, &identity)?;
    let selected: Vec<CriticalVariable> = match var {
        Some(name) => vec![find(&variables, name)
            .ok_or_else(|| {
                bad_input(format!(
                    "--var {name}: no critical variable {name} registered for pid {pid} (registered: {})",
                    names(&variables)
                ))
            })?
            .clone()],
        None if variables.is_empty() => {
            return Err(bad_input(format!("pid {pid} has no registered critical variables")))
        }
        None => variables,
    };
    let taken = read_now(&identity, &selected, "snapshot", None)?;
    SnapshotFile::update(&dir, pid, identity.start_time, |file| {
        for (variable, snapshot) in &taken {
            file.record(variable, snapshot.clone(), false);
        }
    })?;
    let rows: Vec<Taken> = taken
        .iter()
        .map(|(variable, snapshot)| Taken {
            name: variable.name.clone(),
            address: variable.address,
            value: snapshot.integer(),
            snapshot: snapshot.clone(),
        })
        .collect();
    record_best_effort(
        state_dir,
        &NewEvent::new(EventKind::Snapshot)
            .target(pid, identity.start_time)
            .cause("command")
            .outcome("ok")
            .details(serde_json::json!({
                "summary": format!("{} variable{}", rows.len(), if rows.len() == 1 { "" } else { "s" }),
                "variables": rows.iter().map(|r| serde_json::json!({
                    "name": r.name, "hash": r.snapshot.hash, "size": r.snapshot.size,
                })).collect::<Vec<_>>(),
            })),
    );
    Ok(SnapshotOutcome {
        pid,
        start_time: identity.start_time,
        snapshots: rows,
    })
}

/// The mirrored variables of a target, read just before activation.
pub type BeforeApply = Vec<(CriticalVariable, Snapshot)>;

/// `apply`, before activating: read the registered mirrored variables of
/// `pid` (None when it has none).
pub fn before_apply(state_dir: &Path, identity: &ProcessIdentity) -> Result<Option<BeforeApply>, OpsError> {
    let Some(dir) = live_target_dir(state_dir, identity)? else {
        return Ok(None);
    };
    let mirrored: Vec<CriticalVariable> = VariableRegistry::load(&dir)?
        .map(|r| r.variables)
        .unwrap_or_default()
        .into_iter()
        .filter(|v| v.mode == VariableMode::Mirrored)
        .collect();
    if mirrored.is_empty() {
        return Ok(None);
    }
    Ok(Some(read_now(identity, &mirrored, "apply", None)?))
}

/// `apply`, once the patch is active: keep the snapshot as the one to
/// restore on `rollback --restore-state`, and in each variable's history.
/// Returns the names of the variables kept.
pub fn after_apply(state_dir: &Path, pid: i32, patch_id: &str, taken: BeforeApply) -> Result<Vec<String>, OpsError> {
    let identity = ProcessIdentity::of(pid)?;
    let state = StateDir::open(state_dir)?;
    let dir = state.dir_for_live(&identity)?;
    let unix_ms = taken.first().map_or(0, |(_, s)| s.unix_ms);
    let saved: Vec<SavedVariable> = taken
        .into_iter()
        .map(|(variable, mut snapshot)| {
            snapshot.patch_id = Some(patch_id.to_string());
            SavedVariable {
                name: variable.name,
                address: variable.address,
                snapshot,
            }
        })
        .collect();
    let names = saved.iter().map(|s| s.name.clone()).collect();
    let registry = VariableRegistry::load(&dir)?.map(|r| r.variables).unwrap_or_default();
    SnapshotFile::update(&dir, pid, identity.start_time, |file| {
        for saved in &saved {
            if let Some(variable) = registry.iter().find(|v| v.address == saved.address) {
                file.record(variable, saved.snapshot.clone(), false);
            }
        }
        file.record_pre_apply(PreApply {
            patch_id: patch_id.to_string(),
            unix_ms,
            variables: saved,
        });
    })?;
    Ok(names)
}

/// The pre-activation snapshot `rollback --restore-state` will write back,
/// checked before anything is rolled back (bad input leaves the target as it is).
pub fn restorable(state_dir: &Path, pid: i32, patch_id: Option<&str>) -> Result<PreApply, OpsError> {
    let identity = ProcessIdentity::of(pid)?;
    let state = StateDir::open(state_dir)?;
    let dir = state.dir_for_live(&identity)?;
    let journal = Journal::replay(&dir)?;
    let patch = match patch_id {
        Some(id) => id.to_string(),
        None => match journal.active.last() {
            Some(top) => top.id.clone(),
            // Let rollback say there is nothing to roll back.
            None => {
                return Ok(PreApply {
                    patch_id: String::new(),
                    unix_ms: 0,
                    variables: Vec::new(),
                })
            }
        },
    };
    let pre = SnapshotFile::load(&dir)?.and_then(|f| f.pre_apply(&patch).cloned());
    let pre = pre.ok_or_else(|| {
        bad_input(format!(
            "--restore-state: no snapshot was taken before {patch} was applied to pid {pid} \
             (no mirrored variable was registered then)"
        ))
    })?;
    if let Some(large) = pre.variables.iter().find(|v| v.snapshot.bytes.is_none()) {
        return Err(bad_input(format!(
            "--restore-state: the snapshot of {} before {patch} kept its hash only ({} bytes is too large to restore)",
            large.name, large.snapshot.size
        )));
    }
    Ok(pre)
}

/// What `rollback --restore-state` wrote back.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Restored {
    pub patch_id: String,
    /// Variables written back (those already holding the snapshot are not).
    pub restored: Vec<String>,
    pub unchanged: Vec<String>,
    pub bytes: u64,
    /// The plain-writes transaction in the journal (None: nothing to write).
    pub txn: Option<u64>,
    pub pause_us: u64,
}

/// Times the live bytes are re-read when they change between the read and
/// the stop (a variable the target keeps writing).
const RESTORE_ROUNDS: u32 = 3;

/// Write `pre` back: announced in the journal (fsync'd) first, then
/// switched in one stop after checking each variable still holds the bytes
/// read just before.
pub fn restore(state_dir: &Path, pid: i32, pre: &PreApply, attempts: u32) -> Result<Restored, OpsError> {
    let identity = ProcessIdentity::of(pid)?;
    let state = StateDir::open(state_dir)?;
    let mut round = 0;
    loop {
        round += 1;
        let mut memory = TargetMemory::open(&identity)?;
        let mut writes = Vec::new();
        let mut restored = Vec::new();
        let mut unchanged = Vec::new();
        for saved in &pre.variables {
            let wanted = saved.snapshot.bytes.clone().expect("checked by restorable");
            let live = memory.read_vec(saved.address, wanted.len())?;
            if live == wanted {
                unchanged.push(saved.name.clone());
                continue;
            }
            restored.push(saved.name.clone());
            writes.push(Write5 {
                address: saved.address,
                original: live,
                new: wanted,
            });
        }
        let bytes = writes.iter().map(|w| w.new.len() as u64).sum();
        if writes.is_empty() {
            return Ok(Restored {
                patch_id: pre.patch_id.clone(),
                restored,
                unchanged,
                bytes,
                txn: None,
                pause_us: 0,
            });
        }
        let mut target = TargetState::open_existing(&state, &identity)?;
        let txn = target.journal_state.next_txn;
        let mut attached = Attached::seize(&identity)?;
        let result = write_in_one_stop(
            &mut attached,
            &mut target,
            TxnKind::Heal,
            "restore-state",
            writes,
            // As a heal: the writes change no patch's state.
            None,
            attempts,
        );
        let detached = attached.detach();
        match result {
            Ok(activation) => {
                detached?;
                record_best_effort(
                    state_dir,
                    &NewEvent::new(EventKind::Snapshot)
                        .target(pid, identity.start_time)
                        .patch(pre.patch_id.clone())
                        .cause("restore_state")
                        .outcome("restored")
                        .duration_us(activation.pause.pause_us)
                        .details(serde_json::json!({
                            "summary": format!("wrote back {}", restored.join(", ")),
                            "txn": txn,
                            "bytes": bytes,
                        })),
                );
                return Ok(Restored {
                    patch_id: pre.patch_id.clone(),
                    restored,
                    unchanged,
                    bytes,
                    txn: Some(txn),
                    pause_us: activation.pause.pause_us,
                });
            }
            // The target wrote a variable after we read it: read again.
            Err(shadowpatch_patch::PatchError::Tampered { .. }) if round < RESTORE_ROUNDS => detached?,
            Err(error) => return Err(error.into()),
        }
    }
}
