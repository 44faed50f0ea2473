//! What happened to a patch, told to the fleet predictor: the outcome of
//! an apply (applied, refused), of its watch (kept, rolled back, crashed,
//! hung) and of a later rollback (withdrawn by a user, or rolled back by
//! the application's request).
//!
//! Never in the way of the operation: the outcome is first appended to
//! `STATE/fleet-outbox.jsonl` (after the operation is done: a rollback
//! never waits for the service), then every waiting outcome for that
//! service is sent in one `POST /v1/outcomes` with a short timeout; what
//! could not be sent stays in the outbox and goes with the next contact
//! (the next outcome, or an analysis the service answered). A failure is
//! a `tracing` warning, never an error.
//!
//! An applied patch keeps its [`FleetContext`] in its target directory
//! (`fleet.json`), so that whoever rolls it back later (the CLI, the
//! agent, a restarted agent's lost window) reports to the same service
//! with the verdict's `analysis_id` and the analysis's features.

use crate::analysis::{AnalysisReport, AnalysisSettings};
use nix::fcntl::{Flock, FlockArg};
use shadowpatch_predict::remote::{Outcome, OutcomeKind};
use shadowpatch_predict::remote_client::OUTCOME_TIMEOUT;
use shadowpatch_predict::PredictorSettings;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The outcomes not yet acknowledged, one JSON [`OutboxEntry`] a line.
pub const OUTBOX: &str = "fleet-outbox.jsonl";
/// Held while the outbox file is read, appended to or rewritten.
const OUTBOX_LOCK: &str = "fleet-outbox.lock";
/// Held (try-lock) by the one process sending the outbox at a time.
const SENDING_LOCK: &str = "fleet-outbox.sending";
/// In a target's directory: its patches' fleet contexts by patch id.
const TARGET_RECORD: &str = "fleet.json";
/// Outcomes sent in one request at most.
const BATCH: usize = 500;

/// What an outcome of an analysed patch is reported with.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FleetContext {
    pub predictor: PredictorSettings,
    pub patch_id: String,
    /// The verdict's id, when the service gave the verdict.
    #[serde(default)]
    pub analysis_id: Option<String>,
    #[serde(default)]
    pub build_id: Option<String>,
    #[serde(default)]
    pub features: BTreeMap<String, f64>,
}

impl FleetContext {
    /// The context of an analysis made with a predictor configured.
    pub fn of(settings: &AnalysisSettings, report: &AnalysisReport) -> Option<FleetContext> {
        Some(FleetContext {
            predictor: settings.predictor.clone()?,
            patch_id: report.patch_id.clone(),
            analysis_id: report.decided_by.analysis_id().map(str::to_string),
            build_id: report.build_id.clone(),
            features: report.analysis.features.clone(),
        })
    }
}

/// One waiting outcome and the service it is for.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct OutboxEntry {
    url: String,
    outcome: Outcome,
}

/// Report `kind` (with `cause`) of the patch `context` names: queued, then
/// sent with everything waiting for that service. Never fails.
pub fn report(state_dir: &Path, context: &FleetContext, kind: OutcomeKind, cause: Option<String>) {
    let predictor = match context.predictor.check() {
        Ok(predictor) => predictor,
        Err(error) => {
            tracing::warn!("outcome {kind:?} of {} not reported: {error}", context.patch_id);
            return;
        }
    };
    let outcome = Outcome {
        host: predictor.host.clone(),
        analysis_id: context.analysis_id.clone(),
        patch_id: context.patch_id.clone(),
        build_id: context.build_id.clone(),
        kind,
        cause,
        features: context.features.clone(),
        at_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
    };
    let entry = OutboxEntry {
        url: predictor.url.clone(),
        outcome,
    };
    if let Err(error) = append(state_dir, &entry) {
        tracing::warn!(
            "outcome {kind:?} of {} could not be queued in {}: {error}",
            context.patch_id,
            state_dir.join(OUTBOX).display()
        );
    }
    send(state_dir, &context.predictor);
}

/// Send every outcome waiting for the service `settings` names, in
/// batches; what is acknowledged leaves the outbox. Never fails.
pub fn send(state_dir: &Path, settings: &PredictorSettings) {
    let Ok(predictor) = settings.check() else { return };
    // One sender at a time (two would send the same outcomes twice);
    // another one sending now takes ours along or leaves it for next time.
    let Some(_sending) = try_lock(&state_dir.join(SENDING_LOCK)) else {
        return;
    };
    let waiting: Vec<String> = match with_outbox_lock(state_dir, read_lines) {
        Ok(lines) => lines
            .into_iter()
            .filter(|line| serde_json::from_str::<OutboxEntry>(line).is_ok_and(|entry| entry.url == predictor.url))
            .collect(),
        Err(error) => {
            tracing::warn!("the fleet outbox cannot be read: {error}");
            return;
        }
    };
    let timeout = OUTCOME_TIMEOUT.min(predictor.timeout);
    for batch in waiting.chunks(BATCH) {
        let outcomes: Vec<Outcome> = batch
            .iter()
            .filter_map(|line| serde_json::from_str::<OutboxEntry>(line).ok())
            .map(|entry| entry.outcome)
            .collect();
        if let Err(why) = predictor.outcomes(&outcomes, timeout) {
            tracing::warn!(
                "{why}: {} outcome(s) kept in {} for the next contact",
                waiting.len(),
                state_dir.join(OUTBOX).display()
            );
            return;
        }
        if let Err(error) = with_outbox_lock(state_dir, |path| remove_lines(path, batch)) {
            tracing::warn!("the fleet outbox could not be rewritten (outcomes may be sent again): {error}");
            return;
        }
    }
}

/// Outcomes waiting in the outbox (for reports and tests).
pub fn waiting(state_dir: &Path) -> usize {
    read_lines(&state_dir.join(OUTBOX)).map_or(0, |lines| lines.len())
}

/// The most outcomes the outbox keeps while no service answers: a host
/// cut off for weeks must not fill its disk. Beyond it the oldest are
/// dropped (a warning says how many): the newest outcomes describe the
/// patches still running.
pub const OUTBOX_CAPACITY: usize = 10_000;

fn append(state_dir: &Path, entry: &OutboxEntry) -> std::io::Result<()> {
    append_capped(state_dir, entry, OUTBOX_CAPACITY)
}

fn append_capped(state_dir: &Path, entry: &OutboxEntry, capacity: usize) -> std::io::Result<()> {
    let line = serde_json::to_string(entry).map_err(std::io::Error::other)?;
    with_outbox_lock(state_dir, |path| {
        let waiting = read_lines(path)?;
        if waiting.len() >= capacity {
            let dropped = waiting.len() + 1 - capacity;
            tracing::warn!(
                dropped,
                capacity,
                "the fleet outbox is full (no predictor service answered): the oldest outcomes are dropped"
            );
            let kept: Vec<String> = waiting[dropped..].iter().cloned().chain([line]).collect();
            return rewrite(path, &kept);
        }
        let mut file = OpenOptions::new().create(true).append(true).open(path)?;
        file.write_all(format!("{line}\n").as_bytes())?;
        file.sync_data()
    })
}

fn read_lines(path: &Path) -> std::io::Result<Vec<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

/// Rewrite the outbox without one occurrence of each of `sent`.
fn remove_lines(path: &Path, sent: &[String]) -> std::io::Result<()> {
    let mut left = read_lines(path)?;
    for line in sent {
        if let Some(at) = left.iter().position(|l| l == line) {
            left.remove(at);
        }
    }
    rewrite(path, &left)
}

/// Replace the outbox with `lines`, atomically.
fn rewrite(path: &Path, lines: &[String]) -> std::io::Result<()> {
    let temporary = path.with_extension("jsonl.tmp");
    let mut file = File::create(&temporary)?;
    for line in lines {
        writeln!(file, "{line}")?;
    }
    file.sync_data()?;
    std::fs::rename(&temporary, path)
}

fn with_outbox_lock<T>(state_dir: &Path, body: impl FnOnce(&Path) -> std::io::Result<T>) -> std::io::Result<T> {
    std::fs::create_dir_all(state_dir)?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(state_dir.join(OUTBOX_LOCK))?;
    let _held = Flock::lock(lock, FlockArg::LockExclusive).map_err(|(_, errno)| std::io::Error::from(errno))?;
    body(&state_dir.join(OUTBOX))
}

fn try_lock(path: &Path) -> Option<Flock<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ok()?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).ok()
}

fn target_record(state_dir: &Path, pid: i32, start_time: u64) -> Option<PathBuf> {
    let state = shadowpatch_mirror::StateDir::open_if_present(state_dir).ok()??;
    Some(state.target_dir(pid, start_time).join(TARGET_RECORD))
}

fn read_record(path: &Path) -> BTreeMap<String, FleetContext> {
    std::fs::read(path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

/// Keep `context` with the target's state, for its later outcomes.
pub fn remember(state_dir: &Path, pid: i32, start_time: u64, context: &FleetContext) {
    let Some(path) = target_record(state_dir, pid, start_time).filter(|p| p.parent().is_some_and(Path::exists)) else {
        return;
    };
    let mut record = read_record(&path);
    record.insert(context.patch_id.clone(), context.clone());
    write_record(&path, &record);
}

/// The context an applied patch was kept with, taken out of the record
/// (its last outcome is being reported).
pub fn take(state_dir: &Path, pid: i32, start_time: u64, patch_id: &str) -> Option<FleetContext> {
    let path = target_record(state_dir, pid, start_time)?;
    let mut record = read_record(&path);
    let context = record.remove(patch_id)?;
    write_record(&path, &record);
    Some(context)
}

fn write_record(path: &Path, record: &BTreeMap<String, FleetContext>) {
    let temporary = path.with_extension("json.tmp");
    let written = serde_json::to_vec_pretty(record)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&temporary, bytes))
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(error) = written {
        tracing::warn!(
            "{}: {error} (later outcomes of these patches are not reported)",
            path.display()
        );
    }
}

/// The outcome a rollback with `cause` is: a user's command or a window
/// that could not be judged withdraws the patch (no evidence of harm);
/// anything else (the application's request) rolled it back.
pub fn rollback_outcome(cause: &str) -> OutcomeKind {
    match cause {
        "command" | "window-lost" => OutcomeKind::Withdrawn,
        _ => OutcomeKind::RolledBack,
    }
}

/// Report the rollback of `patch_id` on (`pid`, `start_time`) when the
/// patch was applied with a predictor.
pub fn report_rollback(state_dir: &Path, pid: i32, start_time: u64, patch_id: &str, cause: &str) {
    if let Some(context) = take(state_dir, pid, start_time, patch_id) {
        report(state_dir, &context, rollback_outcome(cause), Some(cause.to_string()));
    }
}

/// The outcome a watch window's verdict is.
pub fn watch_outcome(report: &crate::health_watch::WatchReport) -> OutcomeKind {
    use shadowpatch_health::Decision;
    match (report.decision, report.cause.as_str()) {
        (Decision::Keep, _) => OutcomeKind::Kept,
        (Decision::Rollback, "crash" | "exit") => OutcomeKind::Crashed,
        (Decision::Rollback, "health") if report.health.last().is_some_and(|run| run.timed_out) => OutcomeKind::Hung,
        // Not judged: no call ran the new code, or the window was lost.
        (Decision::Rollback, "unexercised" | "window-lost") => OutcomeKind::Withdrawn,
        (Decision::Rollback, _) => OutcomeKind::RolledBack,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read};
    use std::net::TcpListener;

    fn context(url: &str) -> FleetContext {
        FleetContext {
            predictor: PredictorSettings {
                url: url.into(),
                token_file: None,
                timeout_secs: 0.5,
                host: Some("host-a".into()),
            },
            patch_id: "fix".into(),
            analysis_id: Some("a-1".into()),
            build_id: Some("abcd".into()),
            features: BTreeMap::from([("static.bytes_changed".to_string(), 86.0)]),
        }
    }

    /// Answer one `POST /v1/outcomes` with an acknowledgement; its body comes back.
    fn acknowledging_stub(listener: TcpListener) -> std::thread::JoinHandle<Vec<Outcome>> {
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            let outcomes: Vec<Outcome> = serde_json::from_slice(&body).unwrap();
            let answer = format!(r#"{{"stored":{}}}"#, outcomes.len());
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                answer.len()
            )
            .unwrap();
            outcomes
        })
    }

    #[test]
    fn an_outcome_waits_in_the_outbox_until_the_service_answers() {
        let state = tempfile::tempdir().unwrap();
        // Reserve a port, closed for now: the outcome is queued, not lost.
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        drop(listener);
        report(
            state.path(),
            &context(&url),
            OutcomeKind::Crashed,
            Some("crash: SIGSEGV".into()),
        );
        report(state.path(), &context("http://127.0.0.1:1"), OutcomeKind::Kept, None);
        assert_eq!(waiting(state.path()), 2);
        // The service is back: the next contact sends what waits for it, only that.
        let Ok(listener) = TcpListener::bind(url.trim_start_matches("http://")) else {
            return; // the port was taken meanwhile: nothing to prove here
        };
        let stub = acknowledging_stub(listener);
        send(state.path(), &context(&url).predictor);
        let sent = stub.join().unwrap();
        assert_eq!(sent.len(), 1, "{sent:?}");
        assert_eq!(sent[0].kind, OutcomeKind::Crashed);
        assert_eq!(sent[0].host, "host-a");
        assert_eq!(sent[0].analysis_id.as_deref(), Some("a-1"));
        assert_eq!(sent[0].features["static.bytes_changed"], 86.0);
        assert_eq!(waiting(state.path()), 1, "the other service's outcome stays");
    }

    #[test]
    fn a_full_outbox_drops_its_oldest_outcomes() {
        let state = tempfile::tempdir().unwrap();
        let entry = |n: u64| OutboxEntry {
            url: "http://127.0.0.1:1".into(),
            outcome: Outcome {
                host: "h".into(),
                analysis_id: None,
                patch_id: format!("p{n}"),
                build_id: None,
                kind: OutcomeKind::Applied,
                cause: None,
                features: BTreeMap::new(),
                at_unix_ms: n,
            },
        };
        for n in 0..5 {
            append_capped(state.path(), &entry(n), 3).unwrap();
        }
        let left: Vec<String> = read_lines(&state.path().join(OUTBOX))
            .unwrap()
            .into_iter()
            .map(|line| serde_json::from_str::<OutboxEntry>(&line).unwrap().outcome.patch_id)
            .collect();
        assert_eq!(left, ["p2", "p3", "p4"]);
    }

    #[test]
    fn outcomes_follow_the_watch_and_the_rollback_cause() {
        assert_eq!(rollback_outcome("command"), OutcomeKind::Withdrawn);
        assert_eq!(rollback_outcome("window-lost"), OutcomeKind::Withdrawn);
        assert_eq!(rollback_outcome("request"), OutcomeKind::RolledBack);
    }
}
