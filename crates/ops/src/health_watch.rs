//! `apply --watch SECS`: apply through watch stubs, then watch the patched
//! process for SECS — fatal signals in patch code (survived: the call is
//! re-run in the original, `shadowpatch_patch::watchwindow`), process exit,
//! a user health command, and metrics sampled before and after activation
//! judged with a Mann-Whitney U test in the manner of Kayenta — and roll
//! back at once on a regression, or re-point the trampolines straight at
//! the new code on a keep verdict. Every decision is recorded with its
//! evidence (`watch_verdict` event). The agent runs the same watch after
//! every apply it makes (its default policy, `--watch-after-apply`).
//!
//! Only exercised patches are kept: each watch stub counts its calls, and a
//! keep verdict needs `min_calls` through every replaced function. Short of
//! that the window is extended, up to `max_window`, and then ends
//! `unexercised`, kept or rolled back per `unexercised` (default: rolled
//! back). The window's settings and baseline are persisted in the target's
//! state directory (`window.rs`) so an agent killed mid-window finishes it
//! when it restarts (docs/watch-window.md).
use shadowpatch_health::{judge, Decision, Direction, JudgeConfig, Judgement, MetricSpec};
use shadowpatch_patch::transaction::apply_prepared_watched;
use shadowpatch_patch::watchwindow::{FunctionCalls, WatchWindow, WindowEvent};
use shadowpatch_patch::{ApplyOptions, ApplyOutcome, Prepared};
use shadowpatch_predict::watch_metrics::{cpu_bound, WatchSampler, CPU, ERRORS, LATENCY, RSS, SPINNING};
use shadowpatch_store::{record_best_effort, EventKind, NewEvent};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

/// Why a watched apply could not run or went wrong.
#[derive(Debug, thiserror::Error)]
pub enum HealthWatchError {
    /// A setting or the pre-apply health check is wrong: the target was
    /// not touched.
    #[error("{0}")]
    BadInput(String),
    #[error(transparent)]
    Patch(#[from] shadowpatch_patch::PatchError),
    #[error(transparent)]
    Sample(#[from] shadowpatch_predict::PredictError),
}

fn bad_input(message: String) -> HealthWatchError {
    HealthWatchError::BadInput(message)
}

/// Exit code when the watch rolled the patch back.
pub const ROLLED_BACK: i32 = 4;

/// What an unexercised window (fewer than `min_calls` through some
/// replaced function by `max_window`) does with the patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnexercisedPolicy {
    /// Roll back (the default): a patch no call has run is unjudged, and
    /// the original code is what the service ran before.
    Rollback,
    /// Keep it anyway (still judged on metrics and health).
    Keep,
}

impl UnexercisedPolicy {
    pub fn parse(text: &str) -> Result<Self, HealthWatchError> {
        match text {
            "rollback" => Ok(UnexercisedPolicy::Rollback),
            "keep" => Ok(UnexercisedPolicy::Keep),
            other => Err(bad_input(format!("--unexercised {other}: want keep or rollback"))),
        }
    }
}

/// Calls needed through each replaced function, unless told otherwise.
pub const DEFAULT_MIN_CALLS: u64 = 1;
/// How long a window may be extended waiting for calls, unless told otherwise.
pub const DEFAULT_MAX_WINDOW: Duration = Duration::from_secs(600);

/// The watch's settings, checked before anything touches the target.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WatchArgs {
    pub watch: Duration,
    pub baseline: Duration,
    pub sample_interval: Duration,
    pub health_cmd: Option<String>,
    pub health_timeout: Duration,
    pub metrics_url: Option<String>,
    /// Calls needed through every replaced function for a keep verdict.
    #[serde(default = "default_min_calls")]
    pub min_calls: u64,
    /// The longest the window runs waiting for those calls (≥ `watch`).
    #[serde(default = "default_max_window")]
    pub max_window: Duration,
    #[serde(default = "default_unexercised")]
    pub unexercised: UnexercisedPolicy,
    /// The fleet predictor the window's verdict is reported to (set by
    /// `apply` when the analysis had one; saved with the window, so a
    /// resumed window reports too).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::fleet::FleetContext>,
}

fn default_min_calls() -> u64 {
    DEFAULT_MIN_CALLS
}

fn default_max_window() -> Duration {
    DEFAULT_MAX_WINDOW
}

fn default_unexercised() -> UnexercisedPolicy {
    UnexercisedPolicy::Rollback
}

impl WatchArgs {
    /// Refuse nonsensical values with the flag's name.
    pub fn check(
        watch_secs: f64,
        baseline_secs: f64,
        sample_ms: u64,
        health_cmd: Option<String>,
        health_timeout_secs: f64,
        metrics_url: Option<String>,
    ) -> Result<Self, HealthWatchError> {
        let seconds = |flag: &str, value: f64, max: f64| {
            if value.is_finite() && value > 0.0 && value <= max {
                Ok(Duration::from_secs_f64(value))
            } else {
                Err(bad_input(format!(
                    "{flag} {value}: must be more than 0 and at most {max} seconds"
                )))
            }
        };
        if health_cmd.as_deref().is_some_and(|c| c.trim().is_empty()) {
            return Err(bad_input("--health-cmd: empty command".into()));
        }
        if !(10..=60_000).contains(&sample_ms) {
            return Err(bad_input(format!(
                "--sample-ms {sample_ms}: must be between 10 and 60000"
            )));
        }
        Ok(WatchArgs {
            watch: seconds("--watch", watch_secs, 3600.0)?,
            baseline: seconds("--baseline", baseline_secs, 3600.0)?,
            sample_interval: Duration::from_millis(sample_ms),
            health_cmd,
            health_timeout: seconds("--health-timeout", health_timeout_secs, 3600.0)?,
            metrics_url,
            min_calls: DEFAULT_MIN_CALLS,
            max_window: DEFAULT_MAX_WINDOW.max(Duration::from_secs_f64(watch_secs.clamp(0.0, 3600.0))),
            unexercised: UnexercisedPolicy::Rollback,
            fleet: None,
        })
    }

    /// Set the exercise rule: `min_calls` per replaced function (0: no
    /// rule), the window extended up to `max_window` (default 10 min, at
    /// least `--watch`), then the `unexercised` policy.
    pub fn exercise(
        mut self,
        min_calls: u64,
        max_window: Option<Duration>,
        unexercised: &str,
    ) -> Result<Self, HealthWatchError> {
        if min_calls > 1_000_000_000 {
            return Err(bad_input(format!("--min-calls {min_calls}: at most 1000000000")));
        }
        let max_window = max_window.unwrap_or_else(|| DEFAULT_MAX_WINDOW.max(self.watch));
        if max_window < self.watch || max_window > Duration::from_secs(24 * 3600) {
            return Err(bad_input(format!(
                "--max-window {:.1} s: must be at least --watch ({:.1} s) and at most 24 h",
                max_window.as_secs_f64(),
                self.watch.as_secs_f64()
            )));
        }
        self.min_calls = min_calls;
        self.max_window = max_window;
        self.unexercised = UnexercisedPolicy::parse(unexercised)?;
        Ok(self)
    }
}

/// One run of the health command.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HealthRun {
    pub ok: bool,
    pub exit_code: Option<i32>,
    pub elapsed_ms: u64,
    pub message: String,
    /// Killed at `--health-timeout`: the service hung.
    #[serde(default)]
    pub timed_out: bool,
}

/// Run `sh -c CMD` (with SHADOWPATCH_PID set), killed after `timeout`: a
/// timeout is a failure.
fn run_health(command: &str, pid: i32, timeout: Duration) -> HealthRun {
    let started = Instant::now();
    let child = Command::new("sh")
        .arg("-c")
        .arg(command)
        .env("SHADOWPATCH_PID", pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            return HealthRun {
                ok: false,
                exit_code: None,
                elapsed_ms: 0,
                message: format!("health command `{command}` could not start: {e}"),
                timed_out: false,
            }
        }
    };
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                let ok = status.success();
                return HealthRun {
                    ok,
                    exit_code: status.code(),
                    elapsed_ms: started.elapsed().as_millis() as u64,
                    message: if ok {
                        "ok".into()
                    } else {
                        format!("health command `{command}` failed ({status})")
                    },
                    timed_out: false,
                };
            }
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return HealthRun {
                    ok: false,
                    exit_code: None,
                    elapsed_ms: started.elapsed().as_millis() as u64,
                    message: format!(
                        "health command `{command}` did not finish within {:.1} s: timed out, treated as a failure",
                        timeout.as_secs_f64()
                    ),
                    timed_out: true,
                };
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                return HealthRun {
                    ok: false,
                    exit_code: None,
                    elapsed_ms: started.elapsed().as_millis() as u64,
                    message: format!("health command `{command}`: {e}"),
                    timed_out: false,
                }
            }
        }
    }
}

/// The metrics judged, Kayenta-style: errors and latency are critical.
fn specs() -> Vec<MetricSpec> {
    vec![
        MetricSpec::new(ERRORS, Direction::Increase).critical(),
        MetricSpec::new(LATENCY, Direction::Increase).critical(),
        MetricSpec::new(CPU, Direction::Increase).tolerance(0.5),
        MetricSpec::new(RSS, Direction::Increase).tolerance(0.25),
    ]
}

pub(crate) type Series = BTreeMap<String, Vec<f64>>;

fn push(series: &mut Series, values: BTreeMap<String, f64>) {
    for (name, value) in values {
        series.entry(name).or_default().push(value);
    }
}

/// What the watch decided, with its evidence.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WatchReport {
    pub decision: Decision,
    /// `judge`, `health`, `crash`, `exit`, `window` (kept to the end),
    /// `unexercised` (too few calls by `--max-window`; kept or rolled back
    /// per `--unexercised`) or `window-lost` (a restarted agent could not
    /// judge a window its predecessor left).
    pub cause: String,
    pub reason: String,
    pub watched_ms: u64,
    pub judgement: Option<Judgement>,
    pub health: Vec<HealthRun>,
    pub recovery: Option<shadowpatch_patch::watchwindow::Recovery>,
    pub exit: Option<WindowEvent>,
    /// From the regression decision to the rollback complete.
    pub decision_to_rollback_us: Option<u64>,
    pub rollback: Option<shadowpatch_patch::RollbackOutcome>,
    pub keep_pause_us: Option<u64>,
    pub warnings: Vec<String>,
    pub control_samples: usize,
    pub experiment_samples: usize,
    /// Calls through each replaced function's watch stub, as last read.
    pub calls: Vec<FunctionCalls>,
    /// The calls a keep verdict needed per function.
    pub min_calls: u64,
    /// Time the window ran past `--watch` waiting for calls.
    pub extended_ms: u64,
    /// Set when a restarted agent finished a window its predecessor left:
    /// how it was taken up.
    pub resumed: Option<String>,
}

/// Baseline, apply, watch, decide. Returns the apply outcome and the
/// report; the caller (the operations layer) records the apply event.
pub fn apply_and_watch(
    state_dir: &Path,
    pid: i32,
    prepared: Prepared,
    options: &ApplyOptions,
    args: &WatchArgs,
) -> Result<(ApplyOutcome, WatchReport), HealthWatchError> {
    // The health command must pass before the patch: otherwise it cannot
    // tell anything about the patch (and the target is left untouched).
    if let Some(command) = &args.health_cmd {
        let before = run_health(command, pid, args.health_timeout);
        if !before.ok {
            return Err(bad_input(format!("before applying: {}", before.message)));
        }
    }
    let mut sampler = WatchSampler::new(pid, args.metrics_url.as_deref());
    let mut control = Series::new();
    let baseline_end = Instant::now() + args.baseline;
    sampler.sample()?;
    while Instant::now() < baseline_end {
        std::thread::sleep(args.sample_interval);
        if let Some(values) = sampler.sample()? {
            push(&mut control, values);
        }
    }
    let (outcome, window) = apply_prepared_watched(state_dir, prepared, options)?;
    let mut warnings = Vec::new();
    // From here an agent killed mid-window can finish it (`window.rs`).
    if let Err(error) = crate::window::persist(state_dir, pid, &outcome.patch_id, args, &control) {
        warnings.push(format!(
            "the window's settings could not be saved ({error}): a restarted agent rolls it back"
        ));
    }
    let report = run_window(
        state_dir,
        pid,
        &outcome.patch_id,
        window,
        args,
        control,
        Some(sampler),
        Duration::ZERO,
        None,
        warnings,
    )?;
    Ok((outcome, report))
}

/// Watch an open window to its verdict and act on it: keep (re-point) or
/// roll back, record the `watch_verdict` event and forget the persisted
/// window. `elapsed` is how much of the window ran before (a resumed one);
/// `sampler` the sampler whose previous reading the first sample diffs
/// against (`None`: a new one, primed here).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_window(
    state_dir: &Path,
    pid: i32,
    patch_id: &str,
    mut window: WatchWindow,
    args: &WatchArgs,
    control: Series,
    sampler: Option<WatchSampler>,
    elapsed: Duration,
    resumed: Option<String>,
    warnings: Vec<String>,
) -> Result<WatchReport, HealthWatchError> {
    let mut sampler = match sampler {
        Some(sampler) => sampler,
        None => {
            let mut sampler = WatchSampler::new(pid, args.metrics_url.as_deref());
            sampler.sample()?;
            sampler
        }
    };
    let watch_started = Instant::now().checked_sub(elapsed).unwrap_or_else(Instant::now);
    // The health command runs on its own thread, one run after another:
    // this thread must stay free to catch faults (it is the tracer).
    let stop = Arc::new(AtomicBool::new(false));
    let (health_tx, health_rx) = mpsc::channel();
    let health_thread = args.health_cmd.clone().map(|command| {
        let stop = stop.clone();
        let (timeout, interval) = (args.health_timeout, args.sample_interval);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let run = run_health(&command, pid, timeout);
                if health_tx.send(run).is_err() {
                    break;
                }
                std::thread::sleep(interval);
            }
        })
    });
    let mut experiment = Series::new();
    let mut health = Vec::new();
    let mut next_sample = Instant::now() + args.sample_interval;
    let mut next_calls_read = Instant::now();
    let mut report = WatchReport {
        decision: Decision::Keep,
        cause: "window".into(),
        reason: String::new(),
        watched_ms: 0,
        judgement: None,
        health: Vec::new(),
        recovery: None,
        exit: None,
        decision_to_rollback_us: None,
        rollback: None,
        keep_pause_us: None,
        warnings: Vec::new(),
        control_samples: control.values().map(Vec::len).max().unwrap_or(0),
        experiment_samples: 0,
        calls: window.calls().unwrap_or_default(),
        min_calls: args.min_calls,
        extended_ms: 0,
        resumed,
    };
    // Each branch either ends the window early (Some) or goes on (None);
    // `unexercised` says the window ran to `max_window` short of calls.
    let mut unexercised = false;
    let early: Option<(Instant, String, String)> = loop {
        match window.poll()? {
            WindowEvent::Quiet => {}
            WindowEvent::Recovered(recovery) => {
                let reason = format!(
                    "{} in patch code of {} (thread {}): rolled back, the call re-run in the original",
                    recovery.signal, recovery.function, recovery.tid
                );
                report.recovery = Some(recovery);
                break Some((Instant::now(), "crash".into(), reason));
            }
            event @ (WindowEvent::Delivered { .. } | WindowEvent::Exited { .. }) => {
                let reason = format!("the process went down during the watch: {event:?}");
                report.exit = Some(event);
                break Some((Instant::now(), "exit".into(), reason));
            }
        }
        if let Ok(run) = health_rx.try_recv() {
            let failed = !run.ok;
            let message = run.message.clone();
            health.push(run);
            if failed {
                break Some((Instant::now(), "health".into(), message));
            }
        }
        let now = Instant::now();
        if now >= next_sample {
            next_sample += args.sample_interval;
            match sampler.sample() {
                Ok(Some(values)) => push(&mut experiment, values),
                Ok(None) => {}
                // The process is gone: the next poll reports how.
                Err(_) => {}
            }
        }
        if now - watch_started >= args.watch && (now >= next_calls_read || now - watch_started >= args.max_window) {
            // Past --watch: judged once every function has its calls, else
            // extended up to --max-window (counters read once per sample).
            next_calls_read = now + args.sample_interval;
            if let Ok(calls) = window.calls() {
                report.calls = calls;
            }
            if exercised(&report.calls, args.min_calls) {
                break None;
            }
            if now - watch_started >= args.max_window {
                unexercised = true;
                break None;
            }
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    stop.store(true, Ordering::Relaxed);
    if early.is_some() {
        // The counters as they stood at the end (a rollback may since
        // have unmapped them: then the last reading stands).
        if let Ok(calls) = window.calls() {
            report.calls = calls;
        }
    }
    report.watched_ms = watch_started.elapsed().as_millis() as u64;
    report.extended_ms = report.watched_ms.saturating_sub(args.watch.as_millis() as u64);
    report.experiment_samples = experiment.values().map(Vec::len).max().unwrap_or(0);
    let decided = match early {
        Some(decided) => Some(decided),
        None => {
            let bound = cpu_bound(control.get(SPINNING).map_or(&[][..], Vec::as_slice));
            if let Some(share) = bound {
                report.warnings.push(format!(
                    "{CPU} not judged: before the patch, {:.0} % of the target's CPU went to threads that never \
                     wait (spinning), whose CPU time follows the host's free CPU, not the patch's cost",
                    share * 100.0
                ));
            }
            let metrics: Vec<(MetricSpec, Vec<f64>, Vec<f64>)> = specs()
                .into_iter()
                .filter(|spec| !(bound.is_some() && spec.name == CPU))
                .filter(|spec| control.contains_key(&spec.name) || experiment.contains_key(&spec.name))
                .map(|spec| {
                    let c = control.get(&spec.name).cloned().unwrap_or_default();
                    let e = experiment.get(&spec.name).cloned().unwrap_or_default();
                    (spec, c, e)
                })
                .collect();
            let judgement = judge(&JudgeConfig::default(), &metrics);
            let mut decided = (judgement.decision == Decision::Rollback)
                .then(|| (Instant::now(), "judge".to_string(), judgement.reason.clone()));
            report.reason = judgement.reason.clone();
            report.judgement = Some(judgement);
            if unexercised && decided.is_none() {
                let reason = format!(
                    "unexercised: {} after {:.1} s (a keep needs {} call(s) through each replaced function)",
                    describe_calls(&report.calls),
                    watch_started.elapsed().as_secs_f64(),
                    args.min_calls
                );
                report.cause = "unexercised".into();
                report.reason = match args.unexercised {
                    UnexercisedPolicy::Rollback => format!("{reason}; rolled back (--unexercised rollback)"),
                    UnexercisedPolicy::Keep => format!("{reason}; kept (--unexercised keep)"),
                };
                if args.unexercised == UnexercisedPolicy::Rollback {
                    decided = Some((Instant::now(), "unexercised".into(), report.reason.clone()));
                }
            }
            decided
        }
    };
    match decided {
        Some((decided_at, cause, reason)) => {
            report.decision = Decision::Rollback;
            report.cause = cause.clone();
            report.reason = reason;
            if report.exit.is_some() {
                let _ = window.close();
            } else {
                if report.recovery.is_some() {
                    // Threads that faulted during the rollback's stop are
                    // held: rewind them too before leaving.
                    for _ in 0..50 {
                        let _ = window.poll()?;
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                let rollback = window.rollback(&cause)?;
                report.decision_to_rollback_us = Some(decided_at.elapsed().as_micros() as u64);
                report.rollback = Some(rollback);
            }
        }
        None => {
            let activation = window.keep()?;
            report.keep_pause_us = Some(activation.pause.pause_us);
        }
    }
    if let Some(thread) = health_thread {
        drop(health_rx);
        let _ = thread.join();
    }
    report.health = health;
    let judged = std::mem::take(&mut report.warnings);
    report.warnings = warnings;
    report.warnings.extend(judged);
    report.warnings.extend(sampler.warnings.iter().cloned());
    record_best_effort(
        state_dir,
        &NewEvent::new(EventKind::WatchVerdict)
            .target(
                pid,
                shadowpatch_process::ProcessIdentity::of(pid)
                    .map(|i| i.start_time)
                    .unwrap_or(0),
            )
            .patch(patch_id)
            .cause(&report.cause)
            .outcome(match report.decision {
                Decision::Keep => "keep",
                Decision::Rollback => "rollback",
            })
            .duration_us(report.watched_ms * 1000)
            .details(serde_json::to_value(&report).unwrap_or_default()),
    );
    crate::window::forget(state_dir, pid);
    if let Some(context) = &args.fleet {
        // After the decision is carried out: the service never delays a rollback.
        crate::fleet::report(
            state_dir,
            context,
            crate::fleet::watch_outcome(&report),
            Some(format!("{}: {}", report.cause, report.reason)),
        );
        // A kept patch's later rollback is reported with the same context.
        if let Ok(identity) = shadowpatch_process::ProcessIdentity::of(pid) {
            match report.decision {
                Decision::Keep => crate::fleet::remember(state_dir, pid, identity.start_time, context),
                Decision::Rollback => drop(crate::fleet::take(state_dir, pid, identity.start_time, patch_id)),
            }
        }
    }
    Ok(report)
}

/// Whether every counted function had at least `min_calls` calls.
fn exercised(calls: &[FunctionCalls], min_calls: u64) -> bool {
    calls.iter().all(|f| f.calls >= min_calls)
}

/// `work_fn 0 calls, other 3 calls`.
pub fn describe_calls(calls: &[FunctionCalls]) -> String {
    if calls.is_empty() {
        return "no counted function".into();
    }
    calls
        .iter()
        .map(|f| format!("{} {} call{}", f.function, f.calls, if f.calls == 1 { "" } else { "s" }))
        .collect::<Vec<_>>()
        .join(", ")
}
