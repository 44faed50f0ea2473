//! The shadow mirror: page-granular copies of a target's immutable memory
//! (code and read-only data), hashed per page with a keyed hash and rolled
//! up into a Merkle root per region, persisted as one file per generation
//! under the state directory; the verifier that compares live memory with
//! it; and, for mutable memory, dirty-page tracking (`dirty`) and the
//! in-memory data mirror it keeps current (`datamirror`).

#![forbid(unsafe_code)]

pub mod capture;
pub mod datamirror;
pub mod derive;
pub mod dirty;
pub mod hash;
pub mod region;
pub mod snapshots;
pub mod store;
pub mod variables;
pub mod verify;

pub use capture::{capture, CaptureOptions};
pub use datamirror::{DataMirror, RefreshReport};
pub use derive::{copy_for_target, derive, AddedRegion, Edit};
pub use dirty::{detect, Detection, DirtyError, DirtyMethod, DirtyPages, DirtyTracker, MethodStatus, TrackedRange};
pub use hash::{merkle_root, PageHasher, PAGE_SIZE};
pub use region::{select_regions, RegionKind, RegionSpec};
pub use snapshots::{PreApply, SavedVariable, Snapshot, SnapshotFile, VariableHistory};
pub use store::{GenerationHeader, MirrorFile, RegionRecord, StateDir, TargetRecord};
pub use variables::{CriticalVariable, VariableError, VariableMode, VariableRegistry, VariableRequest};
pub use verify::{differing_runs, verify, Difference, DifferenceKind, VerifyReport};

use std::path::PathBuf;

/// Errors of mirroring and verification, naming the file or address.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("state directory {path}: {message}")]
    StateDir { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("mirror file {path} is corrupt: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("no mirror of pid {pid} in {state_dir}: run `shadowpatch mirror {pid}` first")]
    NoMirror { pid: i32, state_dir: PathBuf },
    #[error(
        "the mirror in {path} was taken of pid {pid} started at tick {mirrored_start_time}, but the live \
         pid {pid} started at tick {live_start_time}: a different process incarnation"
    )]
    OtherIncarnation {
        path: PathBuf,
        pid: i32,
        mirrored_start_time: u64,
        live_start_time: u64,
    },
    #[error(
        "module {module} changed since it was mirrored: build-id was {mirrored} and is now {live} \
         (mirror {path})"
    )]
    ModuleChanged {
        path: PathBuf,
        module: String,
        mirrored: String,
        live: String,
    },
    #[error("no module named {name} in pid {pid} (modules: {available})")]
    UnknownModule { pid: i32, name: String, available: String },
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    #[error(transparent)]
    Variable(#[from] VariableError),
    #[error(transparent)]
    Target(#[from] shadowpatch_process::TargetError),
    #[error(transparent)]
    Symbols(#[from] shadowpatch_symbols::SymbolsError),
}

impl MirrorError {
    /// Errors caused by the caller's input or the state on disk rather than a
    /// failure midway: the CLI exits 2 on these.
    pub fn is_bad_input(&self) -> bool {
        shadowpatch_failure::Classify::is_bad_input(self)
    }
}

impl shadowpatch_failure::Classify for MirrorError {
    fn class(&self) -> shadowpatch_failure::FailureClass {
        use shadowpatch_failure::FailureClass;
        match self {
            MirrorError::Target(e) => e.class(),
            MirrorError::Dirty(e) => e.class(),
            MirrorError::Symbols(e) => e.class(),
            MirrorError::Io { .. } => FailureClass::FailedMidway,
            _ => FailureClass::BadInput,
        }
    }
}

impl shadowpatch_failure::Classify for VariableError {
    /// A variable declaration is the user's input.
    fn class(&self) -> shadowpatch_failure::FailureClass {
        shadowpatch_failure::FailureClass::BadInput
    }
}
