//! Continuous verification of a running process (step 2 of the design): a
//! `Watcher` re-reads and re-hashes every mirrored immutable region (code,
//! read-only data, guarded critical variables) on an interval within a CPU
//! budget, reports every discrepancy as an event (alert, with location,
//! bytes and detection latency), optionally heals it through a journaled
//! one-stop write, copies mirrored critical variables each pass through a
//! dirty-page tracker keeping their last snapshots, and tells authorised change (apply, rollback, heals) from
//! tampering by reading the patch journal and the published generations.
//!
//! A `Watcher` holds no process-global state and is `Send`: the agent runs
//! many of them on threads. It reports through a callback, never stdout.

#![forbid(unsafe_code)]

pub mod authority;
pub mod classify;
pub mod config;
pub mod event;
pub mod heal;
pub mod hook;
pub mod mirrored;
pub mod pacing;
pub mod watched;
pub mod watcher;

pub use config::{parse_duration, ConfigError, WatchConfig, WatchOptions};
pub use event::{Alert, Classification, Heal, Location, Scope, WatchEvent};
pub use hook::{AlertHook, HookOutcome};
pub use watcher::{EventSink, StepOutcome, StopReason, WatchStats, Watcher};

use std::path::PathBuf;

/// Errors of a watch, each naming the pid, file, option or variable concerned.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Variable(#[from] shadowpatch_mirror::VariableError),
    #[error("--dirty-method: {0}")]
    DirtyMethod(String),
    #[error(transparent)]
    Dirty(#[from] shadowpatch_mirror::DirtyError),
    #[error("state directory {path} is not writable: {message}")]
    StateNotWritable { path: PathBuf, message: String },
    #[error("journal {path}: {message}")]
    Journal { path: PathBuf, message: String },
    #[error(transparent)]
    Store(#[from] shadowpatch_store::StoreError),
    #[error(transparent)]
    Mirror(#[from] shadowpatch_mirror::MirrorError),
    #[error(transparent)]
    Patch(#[from] shadowpatch_patch::PatchError),
    #[error(transparent)]
    Target(#[from] shadowpatch_process::TargetError),
    #[error(transparent)]
    Symbols(#[from] shadowpatch_symbols::SymbolsError),
    /// The heal operation failed for another reason.
    #[error("heal: {0}")]
    Heal(String),
    /// `heal` is on but the caller gave the watcher no healer (a bug of
    /// the caller, said rather than ignored).
    #[error("healing was asked for but no heal operation was given to the watcher")]
    NoHealer,
}

impl WatchError {
    /// Errors the user must fix (bad option, variable, pid, state
    /// directory): the CLI exits 2 and the target was not touched.
    pub fn is_bad_input(&self) -> bool {
        shadowpatch_failure::Classify::is_bad_input(self)
    }
}

impl shadowpatch_failure::Classify for WatchError {
    fn class(&self) -> shadowpatch_failure::FailureClass {
        use shadowpatch_failure::FailureClass;
        match self {
            WatchError::Config(_)
            | WatchError::Variable(_)
            | WatchError::DirtyMethod(_)
            | WatchError::StateNotWritable { .. } => FailureClass::BadInput,
            WatchError::Journal { .. } => FailureClass::FailedMidway,
            WatchError::Dirty(e) => e.class(),
            WatchError::Store(e) => e.class(),
            WatchError::Mirror(e) => e.class(),
            WatchError::Patch(e) => e.class(),
            WatchError::Target(e) => e.class(),
            WatchError::Symbols(e) => e.class(),
            WatchError::Heal(_) | WatchError::NoHealer => FailureClass::FailedMidway,
        }
    }
}
