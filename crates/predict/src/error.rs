//! Errors of the prediction engine: what kept an analysis from being made
//! at all. Problems of the patch itself are findings, never errors.

use shadowpatch_patch::{Classify, FailureClass, PatchError};

#[derive(Debug, thiserror::Error)]
pub enum PredictError {
    /// Reading the manifest, the object or the target failed.
    #[error(transparent)]
    Patch(#[from] PatchError),
    #[error(transparent)]
    Target(#[from] shadowpatch_process::TargetError),
    #[error(transparent)]
    Symbols(#[from] shadowpatch_symbols::SymbolsError),
    /// The simulation could not run (bad calls, a trapped entry, ...).
    #[error(transparent)]
    Simulation(Box<shadowpatch_simulate::SimulateError>),
    /// An argument of the request is malformed (a regex, a URL, a window).
    #[error("{argument} {value:?}: {message}")]
    BadArgument {
        argument: &'static str,
        value: String,
        message: String,
    },
}

impl PredictError {
    /// Input the user can fix (exit 2); the target was not touched.
    pub fn is_bad_input(&self) -> bool {
        self.class() == FailureClass::BadInput
    }
}

impl Classify for PredictError {
    fn class(&self) -> FailureClass {
        match self {
            PredictError::Patch(e) => e.class(),
            PredictError::Target(e) => e.class(),
            PredictError::Symbols(e) => e.class(),
            PredictError::BadArgument { .. } => FailureClass::BadInput,
            PredictError::Simulation(e) => e.class(),
        }
    }
}
