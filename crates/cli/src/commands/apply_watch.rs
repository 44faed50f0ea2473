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

/// [`WatchArgs::exercise`]: `--min-calls`, `--max-window` (a duration such
/// as `90s` or `10m`), `--unexercised`; bad values are bad input (exit 2).
/// `flag_prefix` is `--` for `apply`, `--watch-` for the agent's policy.
pub fn exercise_args_named(
    args: WatchArgs,
    min_calls: u64,
    max_window: Option<&str>,
    unexercised: &str,
    flag_prefix: &str,
) -> anyhow::Result<WatchArgs> {
    let max_window = max_window
        .map(|text| {
            humantime::parse_duration(text)
                .map_err(|e| BadInput(format!("{flag_prefix}max-window {text}: {e} (want e.g. 90s or 10m)")))
        })
        .transpose()?;
    args.exercise(min_calls, max_window, unexercised)
        .map_err(|error| match error {
            HealthWatchError::BadInput(message) if flag_prefix != "--" => {
                BadInput(message.replacen("--", flag_prefix, 1)).into()
            }
            other => cli_error(other),
        })
}

/// [`exercise_args_named`] with `apply`'s flag names.
pub fn exercise_args(
    args: WatchArgs,
    min_calls: u64,
    max_window: Option<&str>,
    unexercised: &str,
) -> anyhow::Result<WatchArgs> {
    exercise_args_named(args, min_calls, max_window, unexercised, "--")
}
