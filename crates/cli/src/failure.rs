//! Exit codes, decided here only: [`Exit`] maps each error's class (every
//! library error classifies itself through `shadowpatch_failure::Classify`)
//! and the success-path outcomes (differences found, rolled back by the
//! watch, target exited) to the documented codes. Also the one-line message.

use shadowpatch_failure::{Classify, FailureClass};

/// How `shadowpatch` exits. The codes are documented in the README's
/// "Exit codes" and in docs/exit-codes.md; `tests/exit_codes.rs` produces
/// each one with a real command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 0: done (for `analyze`: proceed or warn; `apply --watch`: kept).
    Ok,
    /// 1: `verify` found differences, `watch` raised alerts, `analyze`
    /// refuses.
    Differences,
    /// 1: refused on safety grounds; the target was not touched.
    Refused,
    /// 2: bad input; the target was not touched.
    BadInput,
    /// 3: an operation failed midway (no stop is ever left behind).
    FailedMidway,
    /// 4: `apply --watch` (or the agent's watch) rolled the patch back.
    RolledBackByWatch,
    /// 4: the process `watch` was watching exited.
    TargetExited,
}

impl Exit {
    pub const fn code(self) -> i32 {
        match self {
            Exit::Ok => 0,
            Exit::Differences | Exit::Refused => 1,
            Exit::BadInput => 2,
            Exit::FailedMidway => 3,
            Exit::RolledBackByWatch | Exit::TargetExited => 4,
        }
    }

    pub const fn of_class(class: FailureClass) -> Exit {
        match class {
            FailureClass::BadInput => Exit::BadInput,
            FailureClass::RefusedForSafety => Exit::Refused,
            FailureClass::FailedMidway => Exit::FailedMidway,
        }
    }
}

/// Marks an error as caused by the user's input (the CLI's own checks).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

impl Classify for BadInput {
    fn class(&self) -> FailureClass {
        FailureClass::BadInput
    }
}

/// The class of the first error in the chain that knows its class; an
/// error none classifies failed midway.
pub fn class_of(error: &anyhow::Error) -> FailureClass {
    macro_rules! classified {
        ($cause:expr, $($type:ty),+ $(,)?) => {
            $(if let Some(e) = $cause.downcast_ref::<$type>() {
                return e.class();
            })+
        };
    }
    for cause in error.chain() {
        classified!(
            cause,
            BadInput,
            shadowpatch_agent::RemoteError,
            shadowpatch_agent::AgentError,
            shadowpatch_ops::OpsError,
            shadowpatch_ops::health_watch::HealthWatchError,
            shadowpatch_watch::WatchError,
            shadowpatch_patch::PatchError,
            shadowpatch_predict::PredictError,
            shadowpatch_store::StoreError,
            shadowpatch_mirror::MirrorError,
            shadowpatch_mirror::DirtyError,
            shadowpatch_mirror::VariableError,
            shadowpatch_symbols::SymbolsError,
            shadowpatch_process::TargetError,
            shadowpatch_signing::SigningError,
        );
    }
    FailureClass::FailedMidway
}

/// The exit code of a command that failed with `error`.
pub fn exit_code(error: &anyhow::Error) -> i32 {
    Exit::of_class(class_of(error)).code()
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
