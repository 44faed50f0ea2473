//! ELF modules of a target: which files are mapped where (load bias), their
//! GNU build-ids, and their symbols from both `.symtab` and `.dynsym`, with
//! lookup by name and address → symbol + offset; and DWARF signatures and
//! variable types for ABI comparison. Parsing uses `object` and `gimli`.

#![forbid(unsafe_code)]

mod claim;
pub mod dwarf;
pub mod elf;
pub mod module;

pub use dwarf::{inlined_code, DebugInfo, DebugSource, FunctionInfo, InlinedCode, TypeClass, TypeShape, VariableInfo};
pub use elf::{ElfImage, Segment, Symbol, SymbolKind, SymbolSource, SymbolTable};
pub use module::{modules_of, Location, Module};

/// Errors of ELF parsing and module discovery, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum SymbolsError {
    #[error("reading {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a valid ELF file: {message}")]
    Malformed { path: std::path::PathBuf, message: String },
    #[error("{path}: ELF for {found}, but only x86_64 is supported")]
    WrongArchitecture { path: std::path::PathBuf, found: String },
    #[error(transparent)]
    Target(#[from] shadowpatch_process::TargetError),
}

impl shadowpatch_failure::Classify for SymbolsError {
    /// A file that is not an x86_64 ELF is the user's input; a read that
    /// fails is a failure midway.
    fn class(&self) -> shadowpatch_failure::FailureClass {
        use shadowpatch_failure::FailureClass;
        match self {
            SymbolsError::Io { .. } => FailureClass::FailedMidway,
            SymbolsError::Malformed { .. } | SymbolsError::WrongArchitecture { .. } => FailureClass::BadInput,
            SymbolsError::Target(e) => e.class(),
        }
    }
}

/// Hex form of a build-id, as `file(1)` and `readelf -n` print it.
pub fn hex(bytes: &[u8]) -> String {
    // One allocation for the text (a `format!` per byte was 2 % of a
    // host-wide apply's CPU: build-ids are hexed per module per process).
    hex::encode(bytes)
}

/// The bytes of hex text (`hex`'s inverse, either case); `None` for odd
/// length or anything but hex digits. Works on bytes: slicing the text
/// by two panicked on a non-ASCII character (found by fuzzing the journal).
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |byte: u8| (byte as char).to_digit(16);
    text.as_bytes()
        .chunks_exact(2)
        .map(|pair| Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8))
        .collect()
}
