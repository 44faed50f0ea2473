//! The labeller: apply each variant to a live corpus target (with
//! `shadowpatch_patch::apply` itself, so the engine's refusal does not
//! interfere), let the workers run, ask the test oracle, roll back. A
//! variant is harmful when the target crashed, hung (no answer in time),
//! computed a wrong result (worker errors or oracle failures) or leaked
//! (heap growth); benign otherwise. A target that died, hung or saw a
//! harmful variant is replaced by a fresh one.
//!
//! Labels are cached by variant hash in a JSON-lines file; re-labelling
//! compares with what the file says and reports every difference.

use super::variants::{build, BuiltVariant, Variant};
use super::{CorpusError, VariantKind};
use serde::{Deserialize, Serialize};
use shadowpatch_fixtures::{Fixture, Running};
use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What running the variant showed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    /// Workers and oracle agreed with the references, no leak.
    Ok,
    /// The target died.
    Crash,
    /// The workers stopped making progress or the oracle did not answer.
    Hang,
    /// A result differed from the reference.
    Wrong,
    /// The heap grew.
    Leak,
    /// `apply` refused the variant: it never ran, so it has no label.
    NotApplied,
}

impl Outcome {
    /// `Some(true)`: harmful; `Some(false)`: benign; `None`: no label.
    pub fn harmful(self) -> Option<bool> {
        match self {
            Outcome::Ok => Some(false),
            Outcome::NotApplied => None,
            _ => Some(true),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Crash => "crash",
            Outcome::Hang => "hang",
            Outcome::Wrong => "wrong",
            Outcome::Leak => "leak",
            Outcome::NotApplied => "not-applied",
        }
    }
}

/// One line of the labels file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelRecord {
    pub id: String,
    /// [`Variant::hash`] of the variant labelled.
    pub hash: String,
    pub function: String,
    pub kind: VariantKind,
    pub outcome: Outcome,
    /// Why, in one line (`killed by signal 11`, `3 oracle failures (fail_gcd=3)`).
    pub reason: String,
    /// Milliseconds: apply, window, oracle, rollback, total.
    pub timings_ms: BTreeMap<String, f64>,
}

impl LabelRecord {
    pub fn harmful(&self) -> Option<bool> {
        self.outcome.harmful()
    }
}

/// How long and how hard to watch each variant.
#[derive(Debug, Clone)]
pub struct LabelOptions {
    /// Worker threads of each corpus target.
    pub threads: u32,
    /// Rounds over all functions the workers must make while patched.
    pub rounds: u64,
    /// How long those rounds may take before the target counts as hung.
    pub window_timeout: Duration,
    /// How long the oracle may take.
    pub oracle_timeout: Duration,
    /// Heap growth over one oracle run that counts as a leak.
    pub oracle_leak_bytes: i64,
    /// Heap growth over the window that counts as a leak.
    pub window_leak_bytes: i64,
}

impl Default for LabelOptions {
    fn default() -> Self {
        LabelOptions {
            threads: 1,
            rounds: 20_000,
            window_timeout: Duration::from_secs(4),
            oracle_timeout: Duration::from_secs(4),
            oracle_leak_bytes: 16 * 1024,
            window_leak_bytes: 256 * 1024,
        }
    }
}

/// A live corpus target with the state directory its patches journal in.
#[derive(Debug)]
pub struct CorpusTarget {
    pub running: Running,
    pub build_id: String,
    pub state_dir: PathBuf,
}

impl CorpusTarget {
    /// Build (cached) and start the corpus target; its stderr is discarded
    /// (logging variants write a line per call).
    pub fn start(threads: u32, state_dir: &Path) -> Result<CorpusTarget, CorpusError> {
        let binary = shadowpatch_fixtures::build(Fixture::CorpusTarget).map_err(CorpusError::Fixture)?;
        let running = Running::start_binary_with_stderr(&binary, &[&threads.to_string()], Stdio::null())
            .map_err(CorpusError::Fixture)?;
        Ok(CorpusTarget {
            running,
            build_id: corpus_target_build_id()?,
            state_dir: state_dir.to_path_buf(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.running.pid()
    }
}

/// The GNU build-id (hex) of the corpus target binary.
pub fn corpus_target_build_id() -> Result<String, CorpusError> {
    let binary = shadowpatch_fixtures::build(Fixture::CorpusTarget).map_err(CorpusError::Fixture)?;
    let image = shadowpatch_symbols::ElfImage::open(&binary)?;
    let id = image.build_id.ok_or_else(|| {
        CorpusError::Fixture(std::io::Error::other(format!(
            "{} has no GNU build-id",
            binary.display()
        )))
    })?;
    Ok(shadowpatch_symbols::hex(&id))
}

fn numbers(line: &str) -> BTreeMap<String, i64> {
    line.split_whitespace()
        .filter_map(|pair| pair.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

/// What became of the target during a command.
enum Answer {
    Line(String),
    Hung,
    Died(String),
}

fn ask(target: &mut CorpusTarget, command: &str, timeout: Duration) -> Answer {
    match target.running.command_timeout(command, timeout) {
        Ok(Some(line)) => Answer::Line(line),
        Ok(None) => Answer::Hung,
        Err(_) => Answer::Died(death(&mut target.running)),
    }
}

fn death(running: &mut Running) -> String {
    match running.kill() {
        Ok(status) => match (status.signal(), status.code()) {
            (Some(signal), _) => format!("killed by signal {signal}"),
            (None, Some(code)) => format!("exited with status {code}"),
            _ => "ended".to_string(),
        },
        Err(error) => format!("gone ({error})"),
    }
}

/// Label one built variant on `target`. Returns the record and whether the
/// target is still fit to label the next variant (else start a new one).
pub fn label_on(target: &mut CorpusTarget, built: &BuiltVariant, options: &LabelOptions) -> (LabelRecord, bool) {
    let started = Instant::now();
    let mut timings = BTreeMap::new();
    let variant = &built.variant;
    let record = |outcome: Outcome, reason: String, timings: BTreeMap<String, f64>| LabelRecord {
        id: variant.id.clone(),
        hash: variant.hash(),
        function: variant.function.clone(),
        kind: variant.kind,
        outcome,
        reason,
        timings_ms: timings,
    };
    let before = match ask(target, "check", options.oracle_timeout) {
        Answer::Line(line) => numbers(&line),
        Answer::Hung => {
            return (
                record(Outcome::NotApplied, "target hung before the patch".into(), timings),
                false,
            )
        }
        Answer::Died(how) => {
            return (
                record(Outcome::NotApplied, format!("target {how} before the patch"), timings),
                false,
            )
        }
    };
    let step = Instant::now();
    let applied = shadowpatch_patch::apply(
        &target.state_dir,
        target.pid(),
        &built.manifest,
        &shadowpatch_patch::ApplyOptions::default(),
    );
    timings.insert("apply".into(), ms(step));
    if let Err(error) = applied {
        let alive = target.running.is_running();
        let reason = format!("apply refused it: {error}");
        timings.insert("total".into(), ms(started));
        return (record(Outcome::NotApplied, reason, timings), alive);
    }
    let finish = |target: &mut CorpusTarget,
                  outcome: Outcome,
                  reason: String,
                  mut timings: BTreeMap<String, f64>|
     -> (LabelRecord, bool) {
        let mut reusable = outcome == Outcome::Ok;
        if matches!(outcome, Outcome::Ok | Outcome::Wrong | Outcome::Leak) {
            let step = Instant::now();
            let rolled_back = shadowpatch_patch::rollback(&target.state_dir, target.pid(), Some(&variant.id));
            timings.insert("rollback".into(), ms(step));
            reusable &= rolled_back.is_ok();
        }
        timings.insert("total".into(), ms(started));
        (record(outcome, reason, timings), reusable)
    };
    let step = Instant::now();
    let window = ask(
        target,
        &format!("advance {} {}", options.rounds, options.window_timeout.as_millis()),
        options.window_timeout + Duration::from_secs(2),
    );
    timings.insert("window".into(), ms(step));
    match window {
        Answer::Line(line) if line.starts_with("advanced") => {}
        Answer::Line(line) => {
            return finish(
                target,
                Outcome::Hang,
                format!(
                    "the workers did not make {} rounds in {} ms ({line})",
                    options.rounds,
                    options.window_timeout.as_millis()
                ),
                timings,
            )
        }
        Answer::Hung => return finish(target, Outcome::Hang, "the target stopped answering".into(), timings),
        Answer::Died(how) => return finish(target, Outcome::Crash, format!("target {how}"), timings),
    }
    let step = Instant::now();
    let oracle = ask(target, "oracle", options.oracle_timeout);
    timings.insert("oracle".into(), ms(step));
    let oracle = match oracle {
        Answer::Line(line) => line,
        Answer::Hung => {
            return finish(
                target,
                Outcome::Hang,
                format!("the oracle gave no answer in {} ms", options.oracle_timeout.as_millis()),
                timings,
            )
        }
        Answer::Died(how) => {
            return finish(
                target,
                Outcome::Crash,
                format!("target {how} during the oracle"),
                timings,
            )
        }
    };
    let after = match ask(target, "check", options.oracle_timeout) {
        Answer::Line(line) => numbers(&line),
        Answer::Hung => return finish(target, Outcome::Hang, "the target stopped answering".into(), timings),
        Answer::Died(how) => return finish(target, Outcome::Crash, format!("target {how}"), timings),
    };
    let oracle_numbers = numbers(&oracle);
    let failures = oracle_numbers.get("failures").copied().unwrap_or(0);
    let errors = after.get("errors").copied().unwrap_or(0) - before.get("errors").copied().unwrap_or(0);
    if failures > 0 || errors > 0 {
        let detail: Vec<String> = oracle_numbers
            .iter()
            .filter(|(k, _)| k.starts_with("fail_"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        return finish(
            target,
            Outcome::Wrong,
            format!(
                "{failures} oracle failures ({}), {errors} worker errors",
                detail.join(" ")
            ),
            timings,
        );
    }
    let leaked = oracle_numbers.get("leaked").copied().unwrap_or(0);
    let grown = after.get("heap").copied().unwrap_or(0) - before.get("heap").copied().unwrap_or(0);
    if leaked > options.oracle_leak_bytes || grown > options.window_leak_bytes {
        return finish(
            target,
            Outcome::Leak,
            format!("heap grew {leaked} bytes over the oracle, {grown} bytes over the window"),
            timings,
        );
    }
    finish(
        target,
        Outcome::Ok,
        format!("{} rounds and the oracle agree with the references", options.rounds),
        timings,
    )
}

/// The labels file: one [`LabelRecord`] per line.
pub fn parse_labels(text: &str, path: &Path) -> Result<Vec<LabelRecord>, CorpusError> {
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(index, line)| {
            serde_json::from_str(line).map_err(|e| CorpusError::Labels {
                path: path.to_path_buf(),
                line: index + 1,
                message: e.to_string(),
            })
        })
        .collect()
}

pub fn read_labels(path: &Path) -> Result<Vec<LabelRecord>, CorpusError> {
    match std::fs::read_to_string(path) {
        Ok(text) => parse_labels(&text, path),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(CorpusError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Write the records sorted by id (temp file + rename).
pub fn write_labels(path: &Path, records: &[LabelRecord]) -> Result<(), CorpusError> {
    let io = |source| CorpusError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut sorted: Vec<&LabelRecord> = records.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut text = String::new();
    for record in sorted {
        text.push_str(&serde_json::to_string(record).expect("records serialize"));
        text.push('\n');
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io)?;
    }
    let temporary = path.with_extension("jsonl.tmp");
    std::fs::write(&temporary, text).map_err(io)?;
    std::fs::rename(&temporary, path).map_err(io)
}

/// A label that changed when the variant was run again.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelDifference {
    pub id: String,
    pub before: Outcome,
    pub before_reason: String,
    pub now: Outcome,
    pub now_reason: String,
}

/// What a labelling run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LabelRun {
    /// Every variant's record (reused or new), sorted by id.
    pub records: Vec<LabelRecord>,
    /// Variants run now (the others came from the file).
    pub labelled: usize,
    pub reused: usize,
    /// Targets started (the first ones and replacements).
    pub targets_started: usize,
    /// Re-labelled variants whose outcome changed.
    pub differences: Vec<LabelDifference>,
}

/// Label every variant not already labelled with the same hash in
/// `existing` (all of them when `relabel`), on `jobs` targets in parallel.
/// `progress(done, total, record)` is called after each variant.
pub fn label_all(
    variants: &[Variant],
    existing: &[LabelRecord],
    cache_dir: &Path,
    jobs: usize,
    relabel: bool,
    options: &LabelOptions,
    progress: &(dyn Fn(usize, usize, &LabelRecord) + Sync),
) -> Result<LabelRun, CorpusError> {
    let build_id = corpus_target_build_id()?;
    let known: BTreeMap<(&str, &str), &LabelRecord> =
        existing.iter().map(|r| ((r.id.as_str(), r.hash.as_str()), r)).collect();
    let mut run = LabelRun::default();
    let mut todo: Vec<&Variant> = Vec::new();
    for variant in variants {
        let hash = variant.hash();
        match known.get(&(variant.id.as_str(), hash.as_str())) {
            Some(record) if !relabel => {
                run.records.push((*record).clone());
                run.reused += 1;
            }
            _ => todo.push(variant),
        }
    }
    let total = todo.len();
    let queue = Mutex::new(todo.into_iter());
    let results: Mutex<Vec<LabelRecord>> = Mutex::new(Vec::new());
    let started_targets = Mutex::new(0usize);
    let failure: Mutex<Option<CorpusError>> = Mutex::new(None);
    let state_root = cache_dir.join("state");
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| {
                let mut target: Option<CorpusTarget> = None;
                loop {
                    let Some(variant) = queue.lock().expect("queue").next() else {
                        break;
                    };
                    let built = match build(variant, cache_dir, &build_id) {
                        Ok(built) => built,
                        Err(error) => {
                            *failure.lock().expect("failure") = Some(CorpusError::Build {
                                id: variant.id.clone(),
                                message: error.to_string(),
                            });
                            break;
                        }
                    };
                    if target.as_mut().is_none_or(|t| !t.running.is_running()) {
                        match CorpusTarget::start(options.threads, &state_root) {
                            Ok(fresh) => {
                                target = Some(fresh);
                                *started_targets.lock().expect("count") += 1;
                            }
                            Err(error) => {
                                *failure.lock().expect("failure") = Some(error);
                                break;
                            }
                        }
                    }
                    let live = target.as_mut().expect("started above");
                    let (record, reusable) = label_on(live, &built, options);
                    if !reusable {
                        target = None;
                    }
                    let mut results = results.lock().expect("results");
                    results.push(record);
                    progress(results.len(), total, results.last().expect("just pushed"));
                }
            });
        }
    });
    if let Some(error) = failure.into_inner().expect("failure") {
        return Err(error);
    }
    let fresh = results.into_inner().expect("results");
    run.labelled = fresh.len();
    run.targets_started = started_targets.into_inner().expect("count");
    for record in fresh {
        if let Some(old) = existing.iter().find(|r| r.id == record.id && r.hash == record.hash) {
            if old.outcome != record.outcome {
                run.differences.push(LabelDifference {
                    id: record.id.clone(),
                    before: old.outcome,
                    before_reason: old.reason.clone(),
                    now: record.outcome,
                    now_reason: record.reason.clone(),
                });
            }
        }
        run.records.push(record);
    }
    run.records.sort_by(|a, b| a.id.cmp(&b.id));
    run.differences.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(run)
}
