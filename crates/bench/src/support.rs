//! What the sections share: the options every section receives,
//! percentiles of a sample, stop/resume rounds, and printing helpers.

use std::path::PathBuf;

/// Options every section receives.
#[derive(Debug, Clone)]
pub struct Context {
    /// Machine-readable JSON on stdout instead of text.
    pub json: bool,
}

/// Marks an error as caused by the user's input (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

pub use shadowpatch_report::{gb_per_s, human_bytes, print_json, Percentiles};

/// The `shadowpatch` binary next to this one (the agent section runs
/// `shadowpatch agent` and `shadowpatch watch` processes).
pub fn shadowpatch_binary() -> anyhow::Result<PathBuf> {
    let current = std::env::current_exe()?;
    let path = current.with_file_name("shadowpatch");
    if !path.is_file() {
        return Err(BadInput(format!(
            "{} is missing: build it with `cargo build --release -p shadowpatch`",
            path.display()
        ))
        .into());
    }
    Ok(path)
}
