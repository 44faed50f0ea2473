//! Watch windows that outlive the agent. A watched apply saves the window
//! (patch id, start, settings, the baseline samples) in the target's state
//! directory as `watch-window.json` (atomically) once the patch is active
//! through its watch stubs, and removes it after the verdict is acted on.
//! An agent that starts and finds the newest active patch still going
//! through watch stubs finishes its window:
//!
//! - saved window of that patch: **resumed** for its remaining time (at
//!   least [`RESUME_MIN`] of fresh evidence, so a window whose time ran out
//!   while no agent ran is still judged on something), the call counters
//!   still in the target's memory, the saved baseline as the control;
//! - no saved window, an unreadable one, or one of another patch or
//!   process: it **cannot be judged** (no settings, no baseline): rolled
//!   back, cause `window-lost`;
//! - a saved window whose patch no longer goes through stubs (the agent
//!   died during the keep or the rollback, which `recover` finished): the
//!   verdict is recorded as `recover` left it and the file removed.
//!
//! Every case is a `watch_verdict` event in the history (cause, reason,
//! `resumed`), documented in docs/watch-window.md.

use crate::health_watch::{run_window, Series, WatchArgs, WatchReport};
use shadowpatch_mirror::StateDir;
use shadowpatch_patch::journal::{Journal, PatchRecord};
use shadowpatch_patch::trampoline::jump;
use shadowpatch_patch::watchwindow::WatchWindow;
use shadowpatch_process::ProcessIdentity;
use shadowpatch_store::{record_best_effort, EventKind, NewEvent};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The least a resumed window runs, whatever was left of it.
pub const RESUME_MIN: Duration = Duration::from_secs(1);

const FILE_NAME: &str = "watch-window.json";
const FORMAT: u32 = 1;

/// A watch window as saved for a successor.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SavedWindow {
    pub format: u32,
    pub patch_id: String,
    pub pid: i32,
    pub start_time: u64,
    /// When the patch went live through its stubs.
    pub started_unix_ms: u64,
    pub args: WatchArgs,
    /// The baseline (control) samples taken before activation.
    pub control: Series,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn target_dir(state_dir: &Path, pid: i32) -> Option<(ProcessIdentity, PathBuf)> {
    let identity = ProcessIdentity::of(pid).ok()?;
    let dir = StateDir::open(state_dir).ok()?.dir_for_live(&identity).ok()?;
    Some((identity, dir))
}

/// Save the window of `patch_id` (just activated through stubs).
pub fn persist(state_dir: &Path, pid: i32, patch_id: &str, args: &WatchArgs, control: &Series) -> Result<(), String> {
    let (identity, dir) = target_dir(state_dir, pid).ok_or_else(|| format!("no state directory for pid {pid}"))?;
    let saved = SavedWindow {
        format: FORMAT,
        patch_id: patch_id.to_string(),
        pid,
        start_time: identity.start_time,
        started_unix_ms: now_ms(),
        args: args.clone(),
        control: control.clone(),
    };
    let bytes = serde_json::to_vec(&saved).expect("serializes");
    shadowpatch_mirror::store::write_atomically(&dir.join(FILE_NAME), &bytes).map_err(|e| e.to_string())
}

/// The window is over: remove its saved state.
pub fn forget(state_dir: &Path, pid: i32) {
    if let Some((_, dir)) = target_dir(state_dir, pid) {
        let _ = std::fs::remove_file(dir.join(FILE_NAME));
    }
}

/// Whether `patch`'s entries still jump to its watch stubs (its window
/// never reached a verdict).
pub fn through_stubs(patch: &PatchRecord) -> bool {
    patch.functions.iter().any(|function| {
        function.watch_stub.is_some_and(|stub| {
            jump(&function.site.symbol, function.write.address, stub.stub)
                .is_ok_and(|bytes| bytes == function.write.new)
        })
    })
}

/// The pid tracing `pid`, if any (`TracerPid` in /proc/PID/status).
fn tracer_of(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("TracerPid:"))
        .and_then(|value| value.trim().parse().ok())
        .filter(|tracer| *tracer != 0)
}

/// What a starting agent found of a window its predecessor left, and did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LeftWindow {
    pub patch_id: String,
    /// `resuming`, `rolled_back`, `finished`, `error`, or `in_progress`
    /// (another process's window is running on the target: left alone).
    pub action: String,
    pub reason: String,
}

fn record(
    state_dir: &Path,
    identity: &ProcessIdentity,
    patch_id: &str,
    outcome: &str,
    cause: &str,
    details: serde_json::Value,
) {
    record_best_effort(
        state_dir,
        &NewEvent::new(EventKind::WatchVerdict)
            .target(identity.pid, identity.start_time)
            .patch(patch_id)
            .cause(cause)
            .outcome(outcome)
            .details(details),
    );
}

/// At agent start, after `recover`: finish the window left on `pid`, if
/// any. A window to resume runs on its own thread (the window's tracer);
/// its handle is returned with what was decided.
pub fn finish_left_window(
    state_dir: &Path,
    pid: i32,
) -> Option<(LeftWindow, Option<std::thread::JoinHandle<Option<WatchReport>>>)> {
    let (identity, dir) = target_dir(state_dir, pid)?;
    if let Some(tracer) = tracer_of(pid) {
        // A live window keeps its target seized for its whole length: this
        // one is running in another process (a CLI `apply --watch`), not
        // left behind. Touching it would contradict that window's verdict.
        return Some((
            LeftWindow {
                patch_id: String::new(),
                action: "in_progress".into(),
                reason: format!("pid {pid} is traced by pid {tracer}: a window in progress elsewhere, left alone"),
            },
            None,
        ))
        .filter(|_| dir.join(FILE_NAME).exists());
    }
    let journal = Journal::replay(&dir).ok()?;
    let file = dir.join(FILE_NAME);
    let saved: Option<Result<SavedWindow, String>> = match std::fs::read(&file) {
        Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| format!("{} is unreadable: {e}", file.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(Err(format!("{}: {e}", file.display()))),
    };
    let newest = journal.active.last().filter(|p| through_stubs(p)).cloned();
    let Some(patch) = newest else {
        // Nothing through stubs: no window to finish. A saved one means
        // the agent died during the keep or the rollback, finished by recover.
        let Some(Ok(saved)) = saved else {
            if saved.is_some() {
                let _ = std::fs::remove_file(&file);
            }
            return None;
        };
        let kept = journal.active.iter().any(|p| p.id == saved.patch_id);
        let reason = format!(
            "the agent stopped while acting on the verdict; recover left the patch {}",
            if kept { "kept" } else { "rolled back" }
        );
        record(
            state_dir,
            &identity,
            &saved.patch_id,
            if kept { "keep" } else { "rollback" },
            "window-finished",
            serde_json::json!({ "resumed": reason }),
        );
        let _ = std::fs::remove_file(&file);
        return Some((
            LeftWindow {
                patch_id: saved.patch_id,
                action: "finished".into(),
                reason,
            },
            None,
        ));
    };
    // The newest patch goes through stubs: resume its window, or roll back.
    let unusable = match &saved {
        None => Some(format!(
            "no saved window for {} (the agent stopped before saving it)",
            patch.id
        )),
        Some(Err(error)) => Some(error.clone()),
        Some(Ok(saved))
            if saved.patch_id != patch.id || saved.pid != pid || saved.start_time != identity.start_time =>
        {
            Some(format!(
                "the saved window is of patch {} in pid {}, not of {}",
                saved.patch_id, saved.pid, patch.id
            ))
        }
        Some(Ok(saved)) if saved.format != FORMAT => Some(format!("the saved window has format {}", saved.format)),
        Some(Ok(_)) => None,
    };
    if let Some(problem) = unusable {
        let reason = format!("window cannot be judged: {problem}; rolled back");
        let result = shadowpatch_patch::rollback_with_cause(state_dir, pid, Some(&patch.id), "window-lost");
        let (action, reason) = match &result {
            Ok(_) => ("rolled_back", reason),
            Err(error) => ("error", format!("{reason} failed: {error}")),
        };
        let fleet = match &saved {
            Some(Ok(saved)) => saved.args.fleet.clone().filter(|c| c.patch_id == patch.id),
            _ => None,
        };
        if let (Some(context), Ok(_)) = (fleet, &result) {
            crate::fleet::report(
                state_dir,
                &context,
                crate::fleet::rollback_outcome("window-lost"),
                Some(format!("window-lost: {reason}")),
            );
        }
        record(
            state_dir,
            &identity,
            &patch.id,
            "rollback",
            "window-lost",
            serde_json::json!({ "resumed": reason, "rolled_back": result.is_ok() }),
        );
        let _ = std::fs::remove_file(&file);
        return Some((
            LeftWindow {
                patch_id: patch.id,
                action: action.into(),
                reason,
            },
            None,
        ));
    }
    let saved = saved.and_then(Result::ok).expect("checked above");
    let mut args = saved.args.clone();
    let elapsed = Duration::from_millis(now_ms().saturating_sub(saved.started_unix_ms));
    if elapsed >= args.max_window {
        // No extension left: judged on the fresh evidence alone.
        args.max_window = args.watch;
    }
    let resume_min = RESUME_MIN.max(args.sample_interval * 3).min(args.watch);
    let counted_elapsed = elapsed.min(args.watch - resume_min);
    let reason = format!(
        "resumed after an agent restart: {:.1} s of the {:.1} s window had passed, {:.1} s left",
        elapsed.as_secs_f64(),
        args.watch.as_secs_f64(),
        (args.watch - counted_elapsed).as_secs_f64()
    );
    let state_dir = state_dir.to_path_buf();
    let patch_id = patch.id.clone();
    let thread_reason = reason.clone();
    let handle = std::thread::Builder::new()
        .name(format!("window-{pid}"))
        .spawn(move || {
            let result = WatchWindow::open(&state_dir, pid, &patch_id)
                .map_err(crate::health_watch::HealthWatchError::from)
                .and_then(|window| {
                    run_window(
                        &state_dir,
                        pid,
                        &patch_id,
                        window,
                        &args,
                        saved.control,
                        None,
                        counted_elapsed,
                        Some(thread_reason.clone()),
                        Vec::new(),
                    )
                });
            match result {
                Ok(report) => Some(report),
                Err(error) => {
                    // Could not take the window up: it cannot be judged.
                    tracing::warn!(pid, %error, "could not resume the watch window: rolling back");
                    let rolled =
                        shadowpatch_patch::rollback_with_cause(&state_dir, pid, Some(&patch_id), "window-lost");
                    if let (Some(context), Ok(_)) = (&args.fleet, &rolled) {
                        crate::fleet::report(
                            &state_dir,
                            context,
                            crate::fleet::rollback_outcome("window-lost"),
                            Some(format!("window-lost: the window could not be taken up: {error}")),
                        );
                    }
                    if let Ok(identity) = ProcessIdentity::of(pid) {
                        record(
                            &state_dir,
                            &identity,
                            &patch_id,
                            "rollback",
                            "window-lost",
                            serde_json::json!({
                                "resumed": format!("{thread_reason}, but it could not be taken up: {error}"),
                                "rolled_back": rolled.is_ok(),
                            }),
                        );
                    }
                    forget(&state_dir, pid);
                    None
                }
            }
        })
        .ok();
    Some((
        LeftWindow {
            patch_id: patch.id,
            action: "resuming".into(),
            reason,
        },
        handle,
    ))
}
