//! `apply --watch SECS`: the flags, checked before anything touches the
//! target (the watched apply itself is `shadowpatch_ops::health_watch`,
//! which the agent also runs after its own applies).

use crate::failure::BadInput;
use shadowpatch_ops::health_watch::{HealthWatchError, WatchArgs};

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
    .map_err(|error| match error {
        HealthWatchError::BadInput(message) => BadInput(message).into(),
        other => other.into(),
    })
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
            HealthWatchError::BadInput(message) => BadInput(message).into(),
            other => other.into(),
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
