//! The one error taxonomy of shadowpatch: every library error says once,
//! through [`Classify`], whether the user's input was wrong, the operation
//! was refused on safety grounds, or it failed midway. The CLI turns the
//! class into an exit code in one place (`crates/cli/src/exit.rs`); the
//! agent sends it over its control socket so the CLI exits as it would
//! have acting directly.

#![forbid(unsafe_code)]

/// What kind of failure an error is, as the user must understand it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureClass {
    /// The input is wrong (a pid, a file, an option, the state on disk):
    /// the user can fix it, and the target was not touched.
    BadInput,
    /// Refused on safety grounds: the target was not touched.
    RefusedForSafety,
    /// Failed midway: the target may need `recover`.
    FailedMidway,
}

/// An error that knows its [`FailureClass`]. Wrapping errors delegate to
/// the error they wrap, so a class is decided where the error is made.
pub trait Classify {
    fn class(&self) -> FailureClass;

    fn is_bad_input(&self) -> bool {
        self.class() == FailureClass::BadInput
    }
}

impl<T: Classify + ?Sized> Classify for Box<T> {
    fn class(&self) -> FailureClass {
        (**self).class()
    }
}

/// Reading or writing a file failed: bad input when the path is wrong or
/// not ours to read, a failure midway otherwise.
pub fn class_of_io(error: &std::io::Error) -> FailureClass {
    use std::io::ErrorKind::*;
    match error.kind() {
        NotFound | PermissionDenied | InvalidInput | InvalidData | IsADirectory | NotADirectory => {
            FailureClass::BadInput
        }
        _ => FailureClass::FailedMidway,
    }
}
