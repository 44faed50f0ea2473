//! `apply --watch SECS`: apply through watch stubs, then watch the patched
//! process for SECS — fatal signals in patch code (survived: the call is
//! re-run in the original, `shadowpatch_patch::watchwindow`), process exit,
//! a user health command, and metrics sampled before and after activation
//! judged with a Mann-Whitney U test in the manner of Kayenta — and roll
//! back at once on a regression, or re-point the trampolines straight at
//! the new code on a keep verdict. Every decision is recorded with its
//! evidence (`watch_verdict` event). The agent runs the same watch after
//! every apply it makes (its default policy, `--watch-after-apply`).
use shadowpatch_health::{judge, Decision, Direction, JudgeConfig, Judgement, MetricSpec};
use shadowpatch_patch::transaction::apply_prepared_watched;
use shadowpatch_patch::watchwindow::WindowEvent;
use shadowpatch_patch::{ApplyOptions, ApplyOutcome, Prepared};
use shadowpatch_predict::watch_metrics::{WatchSampler, CPU, ERRORS, LATENCY, RSS};
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

/// The watch's settings, checked before anything touches the target.
#[derive(Debug, Clone)]
pub struct WatchArgs {
    pub watch: Duration,
    pub baseline: Duration,
    pub sample_interval: Duration,
    pub health_cmd: Option<String>,
    pub health_timeout: Duration,
    pub metrics_url: Option<String>,
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
        })
    }
}

/// One run of the health command.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HealthRun {
    pub ok: bool,
    pub exit_code: Option<i32>,
    pub elapsed_ms: u64,
    pub message: String,
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
                };
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => {
                return HealthRun {
                    ok: false,
                    exit_code: None,
                    elapsed_ms: started.elapsed().as_millis() as u64,
                    message: format!("health command `{command}`: {e}"),
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

type Series = BTreeMap<String, Vec<f64>>;

fn push(series: &mut Series, values: BTreeMap<String, f64>) {
    for (name, value) in values {
        series.entry(name).or_default().push(value);
    }
}

/// What the watch decided, with its evidence.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WatchReport {
    pub decision: Decision,
    /// `judge`, `health`, `crash`, `exit` or `window` (kept to the end).
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
    let (outcome, mut window) = apply_prepared_watched(state_dir, prepared, options)?;
    let watch_started = Instant::now();
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
    };
    // Each branch either ends the window (Some) or goes on (None).
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
        if now - watch_started >= args.watch {
            break None;
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    stop.store(true, Ordering::Relaxed);
    report.watched_ms = watch_started.elapsed().as_millis() as u64;
    report.experiment_samples = experiment.values().map(Vec::len).max().unwrap_or(0);
    let decided = match early {
        Some(decided) => Some(decided),
        None => {
            let metrics: Vec<(MetricSpec, Vec<f64>, Vec<f64>)> = specs()
                .into_iter()
                .filter(|spec| control.contains_key(&spec.name) || experiment.contains_key(&spec.name))
                .map(|spec| {
                    let c = control.get(&spec.name).cloned().unwrap_or_default();
                    let e = experiment.get(&spec.name).cloned().unwrap_or_default();
                    (spec, c, e)
                })
                .collect();
            let judgement = judge(&JudgeConfig::default(), &metrics);
            let decided = (judgement.decision == Decision::Rollback)
                .then(|| (Instant::now(), "judge".to_string(), judgement.reason.clone()));
            report.reason = judgement.reason.clone();
            report.judgement = Some(judgement);
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
    report.warnings = sampler.warnings.clone();
    record_best_effort(
        state_dir,
        &NewEvent::new(EventKind::WatchVerdict)
            .target(
                pid,
                shadowpatch_process::ProcessIdentity::of(pid)
                    .map(|i| i.start_time)
                    .unwrap_or(0),
            )
            .patch(&outcome.patch_id)
            .cause(&report.cause)
            .outcome(match report.decision {
                Decision::Keep => "keep",
                Decision::Rollback => "rollback",
            })
            .duration_us(report.watched_ms * 1000)
            .details(serde_json::to_value(&report).unwrap_or_default()),
    );
    Ok((outcome, report))
}
