//! Recording each apply, rollback and recover, with its outcome, cause and
//! timings, in the event history (`shadowpatch-store`). Best effort: a
//! history that cannot be written never fails the operation itself.

use crate::{ApplyOutcome, Classify, FailureClass, PatchError, RecoverOutcome, RollbackOutcome};
use shadowpatch_store::{record_best_effort, EventKind, NewEvent};
use std::path::Path;

/// `ok`, or the error's class.
fn outcome_of(error: &PatchError) -> &'static str {
    match error.class() {
        FailureClass::BadInput => "bad_input",
        FailureClass::RefusedForSafety => "refused",
        FailureClass::FailedMidway => "failed",
    }
}

fn event(kind: EventKind, pid: i32) -> NewEvent {
    let event = NewEvent::new(kind);
    // Only the start time names the target in the history: one read of
    // /proc/PID/stat, not the whole identity (status, exe, auxv, mem),
    // once per member of a host-wide rollback.
    match shadowpatch_process::identity::parent_and_start_time(pid) {
        Some((_, start_time)) => event.target(pid, start_time),
        None => NewEvent {
            pid: Some(pid),
            ..event
        },
    }
}

pub(crate) fn record_apply(state_dir: &Path, pid: i32, manifest: &Path, result: &Result<ApplyOutcome, PatchError>) {
    let event = event(EventKind::Apply, pid);
    let event = match result {
        Ok(outcome) => event
            .patch(&outcome.patch_id)
            .outcome("ok")
            .duration_us(outcome.pause_us)
            .details(serde_json::json!({
                "summary": format!("{} function(s), generation {}", outcome.functions.len(), outcome.generation),
                "manifest": manifest,
                "functions": outcome.functions.iter().map(|f| &f.symbol).collect::<Vec<_>>(),
                "generation": outcome.generation,
                "pause_us": outcome.pause_us,
                "load_pause_us": outcome.load_pause_us,
                "total_us": outcome.total_us,
                "threads": outcome.activation.pause.threads,
            })),
        Err(error) => event.outcome(outcome_of(error)).details(serde_json::json!({
            "summary": error.to_string(),
            "manifest": manifest,
        })),
    };
    record_best_effort(state_dir, &event);
}

pub(crate) fn record_rollback(state_dir: &Path, pid: i32, cause: &str, result: &Result<RollbackOutcome, PatchError>) {
    let event = event(EventKind::Rollback, pid).cause(cause);
    let event = match result {
        Ok(outcome) => event
            .patch(&outcome.patch_id)
            .outcome("ok")
            .duration_us(outcome.pause_us)
            .details(serde_json::json!({
                "summary": format!("{} function(s) restored, generation {} active", outcome.functions.len(), outcome.generation),
                "functions": outcome.functions,
                "generation": outcome.generation,
                "pause_us": outcome.pause_us,
                "unmapped": outcome.unmapped,
                "retired_reason": outcome.retired_reason,
            })),
        Err(error) => event.outcome(outcome_of(error)).details(serde_json::json!({
            "summary": error.to_string(),
        })),
    };
    record_best_effort(state_dir, &event);
}

pub(crate) fn record_recover(state_dir: &Path, pid: i32, result: &Result<RecoverOutcome, PatchError>) {
    let event = event(EventKind::Recover, pid);
    let event = match result {
        Ok(outcome) => {
            let event = event.outcome(format!("{:?}", outcome.state).to_lowercase()).details(serde_json::json!({
                "summary": format!("{:?} ({} of {} writes had been made)", outcome.state, outcome.written, outcome.total),
                "interrupted": outcome.interrupted,
                "written": outcome.written,
                "total": outcome.total,
                "repairs": outcome.repairs,
            }));
            match &outcome.patch_id {
                Some(id) => event.patch(id),
                None => event,
            }
        }
        Err(error) => event.outcome(outcome_of(error)).details(serde_json::json!({
            "summary": error.to_string(),
        })),
    };
    record_best_effort(state_dir, &event);
}
