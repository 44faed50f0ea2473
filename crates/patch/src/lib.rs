//! Live patches: the manifest, the patch object and its loader, trampolines
//! and their safety checks, the journal that makes every write undoable, and
//! the transactions (apply, rollback, recover) that put them together.

#![forbid(unsafe_code)]

pub mod journal;
pub mod load;
pub mod manifest;
pub mod object;
pub mod resolve;
pub mod trampoline;

pub use manifest::Manifest;
pub use object::PatchObject;

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
    #[error("symbol {symbol} in {module} is an IFUNC without an IRELATIVE slot to read its implementation from")]
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
    #[error("journal {path}: {message}")]
    Journal { path: PathBuf, message: String },
    #[error(transparent)]
    Target(#[from] shadowpatch_target::TargetError),
}
