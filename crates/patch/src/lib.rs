//! Live patches: the manifest, the patch object and its loader, trampolines
//! and their safety checks, the journal that makes every write undoable, and
//! the transactions (apply, rollback, recover) that put them together.

#![forbid(unsafe_code)]

pub mod activate;
pub mod clobber;
pub mod fault;
mod history;
pub mod journal;
pub mod load;
pub mod manifest;
pub mod object;
pub mod recover;
pub mod republish;
pub mod resolve;
pub mod rollback;
pub mod safepoint;
pub mod state;
pub mod survey;
pub mod thunk;
pub mod trampoline;
pub mod transaction;
pub mod watchstub;
pub mod watchwindow;
pub mod writes;

pub use survey::{prepare, prepare_survey, survey, Prepared, Survey};
pub use transaction::{apply, apply_prepared, apply_watched, ApplyOptions, ApplyOutcome};

pub use manifest::{Manifest, PatchInput};
pub use object::PatchObject;
pub use recover::{recover, RecoverOutcome, Recovered};
pub use rollback::{rollback, rollback_with_cause, RollbackOutcome};

use std::path::PathBuf;

/// Errors of patching, each naming the file, symbol or address concerned.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    #[error("manifest {path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("patch object {path}: {message}")]
    Object { path: PathBuf, message: String },
    #[error("patch object {path}: unsupported: {feature}")]
    Unsupported { path: PathBuf, feature: String },
    #[error("no symbol {symbol} in {place}")]
    UnknownSymbol { symbol: String, place: String },
    #[error("{symbol} in {place} is not a function")]
    NotAFunction { symbol: String, place: String },
    #[error(
        "cannot resolve symbol {symbol} used by the patch: not in {module} nor in the {others} other loaded modules"
    )]
    Unresolved {
        symbol: String,
        module: String,
        others: usize,
    },
    #[error("symbol {symbol} is defined {count} times in {module}; cannot tell which one the patch means")]
    Ambiguous {
        symbol: String,
        module: String,
        count: usize,
    },
    #[error("symbol {symbol} in {module} is an IFUNC with no implementation chosen yet: no IRELATIVE slot of its own, and no loaded module has bound it (lazy binding: call it once in the target, or link the program with -z now)")]
    UnresolvableIfunc { symbol: String, module: String },
    #[error("relocation for {symbol} at offset {offset:#x} does not fit in 32 bits at the chosen address")]
    RelocationOverflow { symbol: String, offset: u64 },
    #[error("no free address range of {span} bytes within ±2 GiB of {module}")]
    NoRoom { module: String, span: u64 },
    #[error("cannot patch {symbol} at {address:#x}: {reason}")]
    Unpatchable {
        symbol: String,
        address: u64,
        reason: String,
    },
    #[error(
        "no module of pid {pid} has build-id {wanted}; the patch was built for another binary (modules: {available})"
    )]
    BuildIdMismatch {
        pid: i32,
        wanted: String,
        available: String,
    },
    /// A warning, never a refusal: the build-id is the identity.
    #[error(
        "the manifest's target.module {hint} does not name the module with its build-id, {module} ({path}); patching {module}"
    )]
    ModuleHint { hint: String, module: String, path: String },
    #[error("patch {id} is already active in pid {pid}; patch ids are unique per process")]
    DuplicateId { pid: i32, id: String },
    #[error("pid {pid} has an interrupted transaction on patch {patch_id}: run `shadowpatch recover {pid}` first")]
    OpenTransaction { pid: i32, patch_id: String },
    #[error(
        "another shadowpatch process (pid {holder}) is changing this target ({dir}); waited {waited_ms} ms for it"
    )]
    Locked {
        dir: PathBuf,
        holder: String,
        waited_ms: u64,
    },
    #[error("pid {pid} has no active patch to roll back")]
    NothingToRollback { pid: i32 },
    #[error("pid {pid} has no active patch {id} (active: {active})")]
    NoSuchPatch { pid: i32, id: String, active: String },
    #[error("patch {id} lies under later patches ({above}); roll those back first (rollback is last-in first-out)")]
    NotOnTop { id: String, above: String },
    #[error("refusing: live bytes at {address:#x} are {live}, expected {expected}: someone else changed them")]
    Tampered {
        address: u64,
        expected: String,
        live: String,
    },
    #[error("refusing: a thread was inside the bytes to rewrite at {address:#x} in each of {attempts} stops")]
    Busy { address: u64, attempts: u32 },
    #[error("pid {pid}: cannot activate at a safe point: {message}")]
    SafePoint { pid: i32, message: String },
    #[error("staging check failed: the bytes loaded at {address:#x} differ from the staged generation")]
    StagingMismatch { address: u64 },
    #[error(transparent)]
    Mirror(#[from] shadowpatch_mirror::MirrorError),
    #[error(transparent)]
    Symbols(#[from] shadowpatch_symbols::SymbolsError),
    #[error("journal {path}: {message}")]
    Journal { path: PathBuf, message: String },
    #[error("state directory {path} cannot be written ({message}): nothing was done; make it writable or choose another with --state-dir")]
    StateNotWritable { path: PathBuf, message: String },
    #[error(
        "refusing to roll back {patch_id}: {detail}; the journal's record disagrees with the mirror, so nothing was written"
    )]
    RestoreMismatch { patch_id: String, detail: String },
    #[error(transparent)]
    Target(#[from] shadowpatch_process::TargetError),
}

pub use shadowpatch_failure::{Classify, FailureClass};

impl Classify for PatchError {
    fn class(&self) -> FailureClass {
        use PatchError::*;
        match self {
            Manifest { .. }
            | Object { .. }
            | Unsupported { .. }
            | UnknownSymbol { .. }
            | NotAFunction { .. }
            | Unresolved { .. }
            | Ambiguous { .. }
            | UnresolvableIfunc { .. }
            | BuildIdMismatch { .. }
            | ModuleHint { .. }
            | DuplicateId { .. }
            | NothingToRollback { .. }
            | NoSuchPatch { .. }
            | StateNotWritable { .. } => FailureClass::BadInput,
            Unpatchable { .. }
            | NotOnTop { .. }
            | Tampered { .. }
            | Busy { .. }
            | OpenTransaction { .. }
            | Locked { .. }
            | RelocationOverflow { .. }
            | NoRoom { .. }
            | StagingMismatch { .. }
            | SafePoint { .. }
            | RestoreMismatch { .. } => FailureClass::RefusedForSafety,
            Target(e) => e.class(),
            Mirror(e) => e.class(),
            Symbols(e) => e.class(),
            Journal { .. } => FailureClass::FailedMidway,
        }
    }
}
