//! Error → exit code and one-line message.

use shadowpatch_mirror::MirrorError;
use shadowpatch_process::TargetError;
use shadowpatch_symbols::SymbolsError;

/// Exit code for input the user can fix (bad pid, missing mirror, ...).
pub const BAD_INPUT: i32 = 2;
/// Exit code for a patch operation refused on safety grounds.
pub const REFUSED: i32 = 1;
/// Exit code for an operation that failed midway.
pub const FAILED: i32 = 3;

/// Marks an error as caused by the user's input.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

pub fn exit_code(error: &anyhow::Error) -> i32 {
    for cause in error.chain() {
        if cause.downcast_ref::<BadInput>().is_some() {
            return BAD_INPUT;
        }
        if let Some(e) = cause.downcast_ref::<shadowpatch_agent::RemoteError>() {
            return match e.kind {
                shadowpatch_agent::FailureKind::BadInput | shadowpatch_agent::FailureKind::WrongStateDir => BAD_INPUT,
                shadowpatch_agent::FailureKind::Refused => REFUSED,
                shadowpatch_agent::FailureKind::Failed => FAILED,
            };
        }
        if let Some(e) = cause.downcast_ref::<shadowpatch_watch::WatchError>() {
            return if e.is_bad_input() { BAD_INPUT } else { FAILED };
        }
        if let Some(e) = cause.downcast_ref::<TargetError>() {
            return if e.is_bad_input() { BAD_INPUT } else { FAILED };
        }
        if let Some(e) = cause.downcast_ref::<MirrorError>() {
            return if e.is_bad_input() { BAD_INPUT } else { FAILED };
        }
        if let Some(e) = cause.downcast_ref::<shadowpatch_mirror::DirtyError>() {
            return if e.is_bad_input() { BAD_INPUT } else { FAILED };
        }
        if let Some(e) = cause.downcast_ref::<shadowpatch_patch::PatchError>() {
            return match e.class() {
                shadowpatch_patch::ErrorClass::BadInput => BAD_INPUT,
                shadowpatch_patch::ErrorClass::Refused => REFUSED,
                shadowpatch_patch::ErrorClass::Failed => FAILED,
            };
        }
        if let Some(e) = cause.downcast_ref::<shadowpatch_store::StoreError>() {
            return if e.is_bad_input() { BAD_INPUT } else { FAILED };
        }
        if let Some(e) = cause.downcast_ref::<shadowpatch_predict::PredictError>() {
            if let shadowpatch_predict::PredictError::Patch(patch) = e {
                return match patch.class() {
                    shadowpatch_patch::ErrorClass::BadInput => BAD_INPUT,
                    shadowpatch_patch::ErrorClass::Refused => REFUSED,
                    shadowpatch_patch::ErrorClass::Failed => FAILED,
                };
            }
            return if e.is_bad_input() { BAD_INPUT } else { FAILED };
        }
        if let Some(e) = cause.downcast_ref::<SymbolsError>() {
            return match e {
                SymbolsError::Target(t) if !t.is_bad_input() => FAILED,
                SymbolsError::Io { .. } => FAILED,
                _ => BAD_INPUT,
            };
        }
    }
    FAILED
}

/// The error and its causes on one line, without repeating a cause that
/// the message above it already includes.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}
