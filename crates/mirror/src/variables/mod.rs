//! Critical variables: ranges of a target's memory that the user declared
//! important, named by symbol (size from the symbol table) or by address
//! range, each either `guarded` (must never change after it was mirrored:
//! a change is an alert and can be healed) or `mirrored` (changes
//! legitimately; copied periodically, kept with a short history).
//!
//! The resolved set is persisted per target incarnation in
//! `targets/<pid>-<start>/variables.json`, written atomically, so every
//! command (watch, status, apply, rollback, snapshot) sees the same set.
//! A guarded variable's bytes as mirrored are stored with it: they are
//! what the verifier compares with and what a heal writes back.

//!
//! Two parts: declaring a variable and resolving it against the live
//! process (`request`), and the persisted registry of resolved variables
//! with the bytes of the guarded ones (`registry`).

mod registry;
mod request;

pub(crate) use registry::{load_versioned_json, optional_hex};
pub use registry::{merge, CriticalVariable, VariableRegistry, REGISTRY_FILE, REGISTRY_FORMAT};
pub use request::{parse_number, parse_size, resolve, ResolvedVariable, VariableRequest, VariableTarget};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VariableMode {
    /// Must never change after mirroring: a change is an alert (heal-able).
    Guarded,
    /// Changes legitimately: copied periodically with a short history.
    Mirrored,
}

impl VariableMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VariableMode::Guarded => "guarded",
            VariableMode::Mirrored => "mirrored",
        }
    }
}

/// Bad variable declarations: each names the variable and where it was declared.
#[derive(Debug, thiserror::Error)]
pub enum VariableError {
    #[error("{origin}: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}: no symbol {name} in {place} of pid {pid}")]
    UnknownSymbol {
        origin: String,
        name: String,
        place: String,
        pid: i32,
    },
    #[error("{origin}: symbol {name} is defined in several places ({places}); qualify it as MODULE!{name}")]
    Ambiguous {
        origin: String,
        name: String,
        places: String,
    },
    #[error("{origin}: {what} has size 0 (give an address range ADDR:SIZE instead)")]
    ZeroSize { origin: String, what: String },
    #[error("{origin}: {range} is not mapped readable in pid {pid}")]
    Unmapped { origin: String, range: String, pid: i32 },
    #[error(
        "{origin}: {range} is not writable memory in pid {pid}; a mirrored variable is tracked \
         through its writes (declare it guarded)"
    )]
    NotWritable { origin: String, range: String, pid: i32 },
    #[error("{origin}: {range} overlaps {other} ({other_origin})")]
    Overlap {
        origin: String,
        range: String,
        other: String,
        other_origin: String,
    },
}
