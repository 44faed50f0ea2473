//! Commands served by a binary of their own, installed next to
//! `shadowpatch`: `bench` runs `shadowpatch-bench`, `predictor serve` runs
//! `shadowpatch-predictor` (the fleet service), the other `predictor`
//! commands run `shadowpatch-train`. They live apart so
//! that the shipped binary links neither the risk model's corpus and
//! fitting nor the test fixtures they build with gcc; the user keeps one
//! command name. The sibling replaces this process (exec), so its output
//! and exit code are the command's.

use super::Context;
use crate::failure::BadInput;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

/// `shadowpatch bench ARGS`: `shadowpatch-bench [--json] ARGS`.
pub fn run_bench(context: &Context, args: &[String]) -> anyhow::Result<i32> {
    let mut forwarded: Vec<String> = Vec::new();
    if context.json {
        forwarded.push("--json".into());
    }
    forwarded.extend(args.iter().cloned());
    exec_sibling("shadowpatch-bench", "shadowpatch-bench", &forwarded)
}

/// `shadowpatch predictor ARGS`: `shadowpatch-train --state-dir STATE [--json] ARGS`,
/// or for `predictor serve ARGS` the fleet service,
/// `shadowpatch-predictor --state-dir STATE serve ARGS`.
pub fn run_trainer(context: &Context, args: &[String]) -> anyhow::Result<i32> {
    if args.first().map(String::as_str) == Some("serve") {
        let mut forwarded: Vec<String> = vec!["--state-dir".into(), context.state_dir.display().to_string()];
        forwarded.extend(args.iter().cloned());
        return exec_sibling("shadowpatch-predictor", "shadowpatch-fleet", &forwarded);
    }
    let mut forwarded: Vec<String> = vec!["--state-dir".into(), context.state_dir.display().to_string()];
    if context.json {
        forwarded.push("--json".into());
    }
    forwarded.extend(args.iter().cloned());
    exec_sibling("shadowpatch-train", "shadowpatch-trainer", &forwarded)
}

/// Replace this process with `binary` from the folder of the running
/// executable. Returns only on failure: a missing sibling is bad input
/// with the command that builds it.
fn exec_sibling(binary: &str, package: &str, args: &[String]) -> anyhow::Result<i32> {
    let path = sibling(binary)?;
    if !path.is_file() {
        return Err(BadInput(format!(
            "{} is missing: build it with `cargo build --release -p {package}` (or `--workspace`)",
            path.display()
        ))
        .into());
    }
    let error = std::process::Command::new(&path).args(args).exec();
    Err(anyhow::Error::new(error).context(format!("running {}", path.display())))
}

/// `binary` in the folder of the running executable.
fn sibling(binary: &str) -> anyhow::Result<PathBuf> {
    let current = std::env::current_exe().map_err(|e| anyhow::anyhow!("finding the running executable: {e}"))?;
    let folder = current
        .parent()
        .ok_or_else(|| anyhow::anyhow!("the running executable {} has no folder", current.display()))?;
    Ok(folder.join(binary))
}
