//! The operations layer: every state-changing operation of shadowpatch,
//! whole, in one place — `apply` (analysis gate → snapshot of the mirrored
//! variables → transaction → optional watch window → history event),
//! `rollback` (with `--restore-state`), `recover`, `heal` (called by the
//! watcher through `heal::OpsHealer`), `snapshot`, `mirror`,
//! `build` (a patch from a source diff) and
//! `gc` (with `list`, its read-only counterpart), and `adopt` (a forked
//! child takes over its patched ancestor's state, before any command on it). The CLI and the agent both call these functions and nothing below them for a
//! change of state: the CLI parses arguments and renders the typed
//! outcomes; the agent authenticates, queues and calls. Outcomes derive
//! Serialize + Deserialize, so the agent's reply is the same value the CLI
//! would have computed itself.

#![forbid(unsafe_code)]

pub mod adopt;
pub mod analysis;
pub mod apply;
pub mod build;
pub mod build_debian;
pub mod fleet;
pub mod heal;
pub mod health_watch;
pub mod mirror;
pub mod persist;
pub mod rollback;
pub mod set;
pub mod signature;
pub mod targets;
pub mod variables;
pub mod window;

pub use adopt::{adopt_descendants, adopt_if_forked, Adopted, Followed};
pub use analysis::{AnalysisReport, AnalysisSettings};
pub use apply::{apply, Applied, ApplyRequest, ApplyResult, Refused};
pub use build::{build, BuildOutcome};
pub use build_debian::{build_debian, DebianBuildOutcome, DEBIAN_BUILD_STAGES};
pub use mirror::{mirror, MirrorOutcome};
pub use rollback::{recover, rollback, RollbackRequest, RolledBack};
pub use shadowpatch_failure::{Classify, FailureClass};
pub use targets::{gc, list, GcOutcome, GcRefusal, GcRequest, Liveness, TargetEntry, TargetList};
pub use variables::{snapshot, Restored, SnapshotOutcome};

/// Errors of an operation, each naming what and where.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// The user's input is wrong (an option, a variable name, a file):
    /// nothing was done.
    #[error("{0}")]
    BadInput(String),
    /// A process forked from a patched one whose state cannot be adopted
    /// with certainty (see `adopt`): nothing was done.
    #[error("{0}")]
    AdoptionRefused(String),
    #[error(transparent)]
    Patch(#[from] shadowpatch_patch::PatchError),
    #[error(transparent)]
    Build(#[from] shadowpatch_build::BuildError),
    /// `build --debian`: the package, its source, build dependencies or reference build.
    #[error(transparent)]
    Debian(Box<shadowpatch_build::debian::DebianError>),
    #[error(transparent)]
    Predict(#[from] shadowpatch_predict::PredictError),
    #[error(transparent)]
    Mirror(#[from] shadowpatch_mirror::MirrorError),
    #[error(transparent)]
    Target(#[from] shadowpatch_process::TargetError),
    #[error(transparent)]
    Store(#[from] shadowpatch_store::StoreError),
    #[error(transparent)]
    HealthWatch(#[from] health_watch::HealthWatchError),
    /// The trust policy refused the patch, or a key, signature or policy
    /// file is unusable.
    #[error(transparent)]
    Signing(#[from] shadowpatch_signing::SigningError),
    /// A step after the change itself failed (the change stands).
    #[error("{context}: {source}")]
    After {
        context: &'static str,
        source: Box<OpsError>,
    },
}

impl From<shadowpatch_build::debian::DebianError> for OpsError {
    fn from(error: shadowpatch_build::debian::DebianError) -> OpsError {
        OpsError::Debian(Box::new(error))
    }
}

impl Classify for OpsError {
    fn class(&self) -> FailureClass {
        match self {
            OpsError::BadInput(_) => FailureClass::BadInput,
            OpsError::AdoptionRefused(_) => FailureClass::RefusedForSafety,
            OpsError::Patch(e) => e.class(),
            OpsError::Build(e) => e.class(),
            OpsError::Debian(e) => e.class(),
            OpsError::Predict(e) => e.class(),
            OpsError::Mirror(e) => e.class(),
            OpsError::Target(e) => e.class(),
            OpsError::Store(e) => e.class(),
            OpsError::HealthWatch(e) => e.class(),
            OpsError::Signing(e) => e.class(),
            // The operation was done; what followed failed midway.
            OpsError::After { .. } => FailureClass::FailedMidway,
        }
    }
}

impl Classify for health_watch::HealthWatchError {
    fn class(&self) -> FailureClass {
        match self {
            health_watch::HealthWatchError::BadInput(_) => FailureClass::BadInput,
            health_watch::HealthWatchError::Patch(e) => e.class(),
            // Sampling the target's metrics failed during the window.
            health_watch::HealthWatchError::Sample(_) => FailureClass::FailedMidway,
        }
    }
}

/// The journal of `identity`'s target, when the state directory has one
/// (read without the target lock: a view, not a decision).
fn journal_if_any(
    state_dir: &std::path::Path,
    identity: &shadowpatch_process::ProcessIdentity,
) -> Result<Option<shadowpatch_patch::journal::JournalState>, OpsError> {
    let Some(state) = shadowpatch_mirror::StateDir::open_if_present(state_dir)? else {
        return Ok(None);
    };
    let dir = state.target_dir(identity.pid, identity.start_time);
    if !dir.exists() {
        return Ok(None);
    }
    Ok(Some(shadowpatch_patch::journal::Journal::replay(&dir)?))
}

fn bad_input(message: impl Into<String>) -> OpsError {
    OpsError::BadInput(message.into())
}
