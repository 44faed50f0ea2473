//! `rollback` (and `rollback --restore-state`) and `recover`.

use crate::variables::{restorable, restore, Restored};
use crate::OpsError;
use shadowpatch_patch::{RecoverOutcome, RollbackOutcome};
use std::path::Path;

/// One rollback to make.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RollbackRequest {
    pub pid: i32,
    /// `None`: the latest patch.
    pub patch_id: Option<String>,
    /// Also write back the mirrored variables as they were before the patch.
    pub restore_state: bool,
    /// Why (`command`, `request` from the application, `watch`...).
    pub cause: String,
}

/// What a rollback did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RolledBack {
    #[serde(flatten)]
    pub rollback: RollbackOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_state: Option<Restored>,
    /// The target, forked from a patched process, adopted its state first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted: Option<crate::adopt::Adopted>,
}

/// Roll back, then (with `restore_state`) write the state before the patch
/// back right after the rollback's stop, in its own journaled transaction.
/// A missing snapshot is refused before anything is rolled back.
pub fn rollback(state_dir: &Path, request: &RollbackRequest) -> Result<RolledBack, OpsError> {
    let pid = request.pid;
    // Read once: who the target is, for the adoption check and the fleet
    // report (the transaction identifies it again before its lock).
    let identity = shadowpatch_process::ProcessIdentity::of(pid);
    // A child forked from a patched process rolls back what it inherited.
    let adopted = match &identity {
        Ok(identity) => crate::adopt::adopt_if_forked_of(state_dir, identity)?,
        // No such process (or not one to roll back): the transaction says
        // so, and the history records the refused rollback.
        Err(_) => None,
    };
    let pre = if request.restore_state {
        Some(restorable(state_dir, pid, request.patch_id.as_deref())?)
    } else {
        None
    };
    let rollback = shadowpatch_patch::rollback_with_cause(state_dir, pid, request.patch_id.as_deref(), &request.cause)?;
    // Done: only now is the fleet predictor told (never before the rollback).
    if let Ok(identity) = &identity {
        crate::fleet::report_rollback(state_dir, pid, identity.start_time, &rollback.patch_id, &request.cause);
    }
    let restored_state = match &pre {
        Some(pre) => Some(
            restore(state_dir, pid, pre, shadowpatch_patch::activate::DEFAULT_ATTEMPTS).map_err(|error| {
                OpsError::After {
                    context: "rolled back, but restoring the state before the patch failed",
                    source: Box::new(error),
                }
            })?,
        ),
        None => None,
    };
    Ok(RolledBack {
        rollback,
        restored_state,
        adopted,
    })
}

/// Finish or undo an interrupted transaction of `pid`.
pub fn recover(state_dir: &Path, pid: i32) -> Result<RecoverOutcome, OpsError> {
    Ok(shadowpatch_patch::recover(state_dir, pid)?)
}
