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
