//! Make, build, label and analyse the real-program variants: for each
//! program its exact Debian source (`shadowpatch-debsrc`, cached), for
//! each function and template a diff, `shadowpatch build --debian` (the
//! user's path, run as a command), then a fresh instance patched with
//! `shadowpatch apply --force` under the program's requests (the label),
//! then another fresh instance analysed by the engine, with live calls
//! captured from the same requests running (the sample).
//!
//! This is the one place of the real-program corpus that writes to
//! processes: instances it started itself, in scratch folders of its own.

use super::mutate::{mutate, unified_diff, Template};
use super::workload::{background, run, Instance, Reply};
use super::{Program, ProgramRecord, ProgramsError, Spec};
use crate::corpus::dataset::{corpus_simulation, Sample};
use shadowpatch_predict::engine::{analyze_detailed, standard_sections, AnalysisRequest};
use shadowpatch_predict::{survey_for_analysis, ContextOptions};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// Sources, reference builds, diffs, patches and instance folders.
    pub work: PathBuf,
    /// The `shadowpatch` binary that builds and applies.
    pub shadowpatch: PathBuf,
    /// Rounds of the program's requests while patched.
    pub rounds: usize,
    pub only: Option<String>,
    pub templates: Vec<Template>,
    /// Analyse kept (labelled) variants again from their built patches.
    pub reanalyse: bool,
    /// With `reanalyse`: build those patches again first.
    pub rebuild: bool,
}

/// Resident growth beyond the unpatched program's that counts as a leak.
pub const LEAK_KIB: i64 = 4096;

struct Baseline {
    replies: Vec<Reply>,
    growth_kib: i64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProgramsError + '_ {
    move |source| ProgramsError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn fail(program: &Program, message: impl Into<String>) -> ProgramsError {
    ProgramsError::Program {
        program: program.name.clone(),
        message: message.into(),
    }
}

/// The driver binary for library programs, built once.
fn build_driver(work: &Path) -> Result<PathBuf, ProgramsError> {
    // Built under a name of this process's, then renamed: generators
    // running side by side (one per program) share the work folder.
    let source = work.join(format!("driver-{}.c", std::process::id()));
    let built = work.join(format!("driver-{}", std::process::id()));
    let binary = work.join("driver");
    std::fs::write(&source, super::DRIVER_SOURCE).map_err(io(&source))?;
    let output = Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&built)
        .arg(&source)
        .args(["-lsqlite3", "-levent"])
        .output()
        .map_err(io(Path::new("gcc")))?;
    if !output.status.success() {
        return Err(ProgramsError::Program {
            program: "driver".into(),
            message: format!(
                "gcc failed (install libsqlite3-dev and libevent-dev): {}",
                String::from_utf8_lossy(&output.stderr).lines().next().unwrap_or("")
            ),
        });
    }
    let _ = std::fs::remove_file(&source);
    std::fs::rename(&built, &binary).map_err(io(&binary))?;
    Ok(binary)
}

/// The program's Debian source tree, fetched into the cache.
fn source_tree(program: &Program, work: &Path) -> Result<PathBuf, ProgramsError> {
    let target = std::fs::canonicalize(&program.target).map_err(io(Path::new(&program.target)))?;
    let installed = shadowpatch_debsrc::resolve_binary(&target).map_err(|e| fail(program, e.to_string()))?;
    let tree = shadowpatch_debsrc::fetch_source(
        &installed.source_package,
        &installed.source_version,
        &work.join("debsrc"),
        &mut |_| {},
    )
    .map_err(|e| fail(program, e.to_string()))?;
    Ok(tree.dir)
}

fn baseline(program: &Program, dir: &Path, driver: &Path, rounds: usize) -> Result<Baseline, ProgramsError> {
    let instance = Instance::start(program, dir, driver)?;
    let before = instance.rss_kib().unwrap_or(0) as i64;
    let replies = run(program, instance.port, rounds);
    let after = instance.rss_kib().unwrap_or(0) as i64;
    instance.stop();
    if let Some(bad) = replies.iter().find(|r| !matches!(r, Reply::Text(_))) {
        return Err(fail(
            program,
            format!("the unpatched program did not answer every request: {bad:?}"),
        ));
    }
    Ok(Baseline {
        replies,
        growth_kib: after - before,
    })
}

fn fresh(dir: &Path) -> Result<(), ProgramsError> {
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::create_dir_all(dir).map_err(io(dir))
}

fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("")
        .to_string()
}

/// The first line where two replies differ, both sides shortened.
fn first_difference(expected: Option<&Reply>, got: Option<&Reply>) -> String {
    let text = |reply: Option<&Reply>| match reply {
        Some(Reply::Text(t)) => t.clone(),
        other => format!("{other:?}"),
    };
    let (expected, got) = (text(expected), text(got));
    let short = |line: Option<&str>| line.unwrap_or("(none)").chars().take(70).collect::<String>();
    let line = expected
        .split('\n')
        .zip(got.split('\n'))
        .position(|(a, b)| a != b)
        .unwrap_or_else(|| expected.split('\n').count().min(got.split('\n').count()));
    format!(
        "line {line} was {:?}, is {:?}",
        short(expected.split('\n').nth(line)),
        short(got.split('\n').nth(line))
    )
}

/// Label one built patch: apply it to a fresh instance and watch the requests.
fn label(
    program: &Program,
    options: &GenerateOptions,
    driver: &Path,
    manifest: &Path,
    dir: &Path,
    baseline: &Baseline,
) -> Result<(String, String), ProgramsError> {
    fresh(dir)?;
    let state = dir.join("state");
    let mut instance = Instance::start(program, dir, driver)?;
    let output = Command::new(&options.shadowpatch)
        .args(["apply", &instance.pid().to_string()])
        .arg(manifest)
        .args(["--force", "--context-secs", "0", "--state-dir"])
        .arg(&state)
        .output()
        .map_err(io(&options.shadowpatch))?;
    if !output.status.success() {
        let reason = format!("apply: {}", last_line(&output.stderr));
        instance.stop();
        return Ok(("not-applied".into(), reason));
    }
    // Growth from here on, as the baseline's: loading the patch object
    // maps and touches pages of its own (several MiB in redis).
    let before = instance.rss_kib().unwrap_or(0) as i64;
    let replies = run(program, instance.port, options.rounds);
    std::thread::sleep(Duration::from_millis(200));
    let after = instance.rss_kib().unwrap_or(0) as i64;
    let ended = instance.ended();
    instance.stop();
    let result = if let Some((signalled, how)) = ended {
        (if signalled { "crash" } else { "exit" }.to_string(), how)
    } else if let Some(n) = replies.iter().position(|r| *r == Reply::TimedOut) {
        ("hang".into(), format!("request {n} had no answer in 2 s"))
    } else if let Some((n, Reply::Refused(why))) =
        replies.iter().enumerate().find(|(_, r)| matches!(r, Reply::Refused(_)))
    {
        ("wrong".into(), format!("request {n} failed: {why}"))
    } else if after - before - baseline.growth_kib > LEAK_KIB {
        (
            "leak".into(),
            format!(
                "resident memory grew {} KiB (unpatched: {} KiB)",
                after - before,
                baseline.growth_kib
            ),
        )
    } else if let Some(n) = (0..baseline.replies.len()).find(|n| replies.get(*n) != baseline.replies.get(*n)) {
        (
            "wrong".into(),
            format!(
                "reply {n}: {}",
                first_difference(baseline.replies.get(n), replies.get(n))
            ),
        )
    } else {
        ("ok".into(), "every reply as the unpatched program's".into())
    };
    Ok(result)
}

/// Analyse one built patch on a fresh instance under the requests.
fn analyse(
    program: &Program,
    driver: &Path,
    manifest: &Path,
    dir: &Path,
) -> Result<shadowpatch_predict::finding::Analysis, ProgramsError> {
    fresh(dir)?;
    let state = dir.join("state");
    std::fs::create_dir_all(&state).map_err(io(&state))?;
    let instance = Instance::start(program, dir, driver)?;
    let running = Arc::new(AtomicBool::new(true));
    let load = background(program, instance.port, running.clone());
    std::thread::sleep(Duration::from_millis(100));
    let analysed = (|| {
        let survey = survey_for_analysis(instance.pid(), manifest, &state)?;
        let mut request = AnalysisRequest::new(&survey, &state);
        request.context = Some(ContextOptions {
            window: Duration::ZERO,
            samples: 1,
            ..ContextOptions::default()
        });
        request.sections = standard_sections(Some(corpus_simulation()));
        analyze_detailed(request)
    })();
    running.store(false, Ordering::Relaxed);
    let _ = load.join();
    instance.stop();
    analysed
        .map(|a| a.analysis)
        .map_err(|e| fail(program, format!("analysis: {e}")))
}

/// `shadowpatch build --debian` of one variant's diff into `out`.
fn build_variant(
    options: &GenerateOptions,
    program: &Program,
    diff: &Path,
    out: &Path,
) -> Result<std::process::Output, ProgramsError> {
    Command::new(&options.shadowpatch)
        .args(["build", "--debian", "--json", "--diff"])
        .arg(diff)
        .args(["--target", &program.target, "--out"])
        .arg(out)
        .arg("--debsrc-cache")
        .arg(options.work.join("debsrc"))
        .arg("--cache")
        .arg(options.work.join("build-cache"))
        .output()
        .map_err(io(&options.shadowpatch))
}

/// Analyse a labelled variant's built patch on a fresh instance and keep
/// the engine's verdict, risk and features in the record.
fn analyse_into(
    record: &mut ProgramRecord,
    program: &Program,
    driver: &Path,
    manifest: &Path,
    dir: &Path,
) -> Result<(), ProgramsError> {
    let Some(harm) = record.harm() else {
        return Ok(());
    };
    let started = Instant::now();
    let analysis = analyse(program, driver, manifest, dir)?;
    record
        .timings_s
        .insert("analyse".into(), started.elapsed().as_secs_f64());
    record.verdict = Some(format!("{:?}", analysis.verdict).to_lowercase());
    record.risk = Some(analysis.risk);
    record.sample = Some(Sample::from_analysis(
        &record.id,
        &format!("{}:{}", program.name, record.function),
        record.template.as_str(),
        harm,
        &record.outcome,
        &analysis,
    ));
    Ok(())
}

/// Where a variant's diff and built patch are kept, under its program's
/// folder of the work folder.
fn variant_dir(home: &Path, function: &str, template: Template) -> PathBuf {
    home.join("variants").join(format!("{function}-{}", template.as_str()))
}

/// `--reanalyse` needs every labelled variant's built patch: a work folder
/// other than the one the samples were made in is said before anything is
/// fetched, built or run, naming the first variant whose patch is missing.
fn patches_kept(spec: &Spec, options: &GenerateOptions, existing: &[ProgramRecord]) -> Result<(), ProgramsError> {
    for program in &spec.program {
        if options.only.as_ref().is_some_and(|only| *only != program.name) {
            continue;
        }
        let home = options.work.join(&program.name);
        for record in existing
            .iter()
            .filter(|r| r.program == program.name && r.harm().is_some() && options.templates.contains(&r.template))
        {
            let manifest = variant_dir(&home, &record.function, record.template)
                .join("patch")
                .join("manifest.toml");
            if !manifest.exists() {
                return Err(fail(
                    program,
                    format!(
                        "--reanalyse: {} has no built patch at {} (give the --work folder the samples were made in)",
                        record.id,
                        manifest.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Generate every variant of `spec` not already in `existing` (same id
/// and diff), calling `emit` with each record as it is made.
pub fn generate(
    spec: &Spec,
    options: &GenerateOptions,
    existing: &[ProgramRecord],
    emit: &mut dyn FnMut(&ProgramRecord) -> Result<(), ProgramsError>,
    progress: &dyn Fn(&str),
) -> Result<(), ProgramsError> {
    if options.reanalyse {
        patches_kept(spec, options, existing)?;
    }
    std::fs::create_dir_all(&options.work).map_err(io(&options.work))?;
    let driver = if spec.program.iter().any(Program::uses_driver) {
        build_driver(&options.work)?
    } else {
        PathBuf::new()
    };
    let known: BTreeMap<(&str, &str), &ProgramRecord> = existing
        .iter()
        .map(|r| ((r.id.as_str(), r.diff_hash.as_str()), r))
        .collect();
    for program in &spec.program {
        if options.only.as_ref().is_some_and(|only| *only != program.name) {
            continue;
        }
        progress(&format!("{}: source", program.name));
        let tree = source_tree(program, &options.work)?;
        let home = options.work.join(&program.name);
        let base = baseline(program, &home.join("baseline"), &driver, options.rounds)?;
        for function in &program.functions {
            let path = tree.join(&function.file);
            let original = std::fs::read_to_string(&path).map_err(io(&path))?;
            for template in &options.templates {
                let id = format!("{}:{}:{}", program.name, function.name, template.as_str());
                let mut record = ProgramRecord {
                    id: id.clone(),
                    program: program.name.clone(),
                    function: function.name.clone(),
                    template: *template,
                    intent: template.intent(),
                    diff_hash: String::new(),
                    outcome: String::new(),
                    reason: String::new(),
                    build: serde_json::Value::Null,
                    verdict: None,
                    risk: None,
                    sample: None,
                    timings_s: BTreeMap::new(),
                };
                let mutated = match mutate(&original, &function.name, *template) {
                    Ok(m) => m,
                    Err(e) => {
                        record.outcome = "build-refused".into();
                        record.reason = e.to_string();
                        emit(&record)?;
                        continue;
                    }
                };
                let diff = unified_diff(&function.file, &original, &mutated);
                record.diff_hash = blake3::hash(diff.as_bytes()).to_hex()[..16].to_string();
                // Labelled variants are kept; one that did not build or
                // apply runs again (its build dependencies may be there now).
                let kept = known.get(&(id.as_str(), record.diff_hash.as_str()));
                let variant_dir = variant_dir(&home, &function.name, *template);
                let manifest = variant_dir.join("patch").join("manifest.toml");
                if let Some(done) = kept.filter(|r| r.harm().is_some()) {
                    if !options.reanalyse {
                        emit(done)?;
                        continue;
                    }
                    if !manifest.exists() {
                        return Err(fail(
                            program,
                            format!("--reanalyse: {id} has no built patch at {}", manifest.display()),
                        ));
                    }
                    if options.rebuild {
                        progress(&format!("{id}: build again"));
                        let out = variant_dir.join("patch");
                        std::fs::remove_dir_all(&out).map_err(io(&out))?;
                        let built = build_variant(options, program, &variant_dir.join("change.diff"), &out)?;
                        if !built.status.success() {
                            return Err(fail(
                                program,
                                format!("--rebuild: {id} no longer builds: {}", last_line(&built.stderr)),
                            ));
                        }
                    }
                    let mut again = (*done).clone();
                    progress(&format!("{id}: analyse again ({})", again.outcome));
                    analyse_into(&mut again, program, &driver, &manifest, &home.join("run"))?;
                    emit(&again)?;
                    continue;
                }
                progress(&format!("{id}: build"));
                fresh(&variant_dir)?;
                let diff_path = variant_dir.join("change.diff");
                std::fs::write(&diff_path, &diff).map_err(io(&diff_path))?;
                let out = variant_dir.join("patch");
                let started = Instant::now();
                let built = build_variant(options, program, &diff_path, &out)?;
                record.timings_s.insert("build".into(), started.elapsed().as_secs_f64());
                if !built.status.success() {
                    record.outcome = "build-refused".into();
                    record.reason = last_line(&built.stderr);
                    emit(&record)?;
                    continue;
                }
                if let Ok(report) = serde_json::from_slice::<serde_json::Value>(&built.stdout) {
                    record.build = serde_json::json!({
                        "functions_changed": report["functions_changed"],
                        "functions_new": report["functions_new"],
                        "functions_included_for_inlining": report["functions_included_for_inlining"],
                    });
                }
                progress(&format!("{id}: label"));
                let started = Instant::now();
                let (outcome, reason) = label(program, options, &driver, &manifest, &home.join("run"), &base)?;
                record.timings_s.insert("label".into(), started.elapsed().as_secs_f64());
                record.outcome = outcome;
                record.reason = reason;
                if record.harm().is_some() {
                    progress(&format!("{id}: analyse ({})", record.outcome));
                    analyse_into(&mut record, program, &driver, &manifest, &home.join("run"))?;
                }
                emit(&record)?;
            }
        }
    }
    Ok(())
}
