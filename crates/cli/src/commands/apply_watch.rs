//! `apply --watch SECS`: the watched apply itself lives in
//! `shadowpatch_agent::health_watch` (the agent runs it after its own
//! applies); here its errors become the CLI's exit codes.

use crate::failure::BadInput;
use shadowpatch_agent::health_watch::{self, HealthWatchError};
pub use shadowpatch_agent::health_watch::{WatchArgs, WatchReport, ROLLED_BACK};
use shadowpatch_patch::{ApplyOptions, ApplyOutcome};
use std::path::Path;

fn cli_error(error: HealthWatchError) -> anyhow::Error {
    match error {
        HealthWatchError::BadInput(message) => BadInput(message).into(),
        HealthWatchError::Patch(error) => error.into(),
        HealthWatchError::Sample(error) => error.into(),
    }
}

/// [`WatchArgs::check`] with bad values as the CLI's bad input (exit 2).
pub fn check_args(
    watch_secs: f64,
    baseline_secs: f64,
    sample_ms: u64,
    health_cmd: Option<String>,
    health_timeout_secs: f64,
    metrics_url: Option<String>,
) -> anyhow::Result<WatchArgs> {
    WatchArgs::check(
        watch_secs,
        baseline_secs,
        sample_ms,
        health_cmd,
        health_timeout_secs,
        metrics_url,
    )
    .map_err(cli_error)
}

/// Baseline, apply, watch, decide (see `health_watch::apply_and_watch`).
pub fn apply_and_watch(
    state_dir: &Path,
    pid: i32,
    manifest: &Path,
    options: &ApplyOptions,
    args: &WatchArgs,
) -> anyhow::Result<(ApplyOutcome, WatchReport)> {
    health_watch::apply_and_watch(state_dir, pid, manifest, options, args).map_err(cli_error)
}
