//! `shadowpatch analyze`: predict whether a patch will misbehave in a
//! running process, and why, without touching it. Also the analysis that
//! `apply` runs first, and its record in the event history.

use super::Context;
use crate::failure::BadInput;
use crate::output::print_json;
use shadowpatch_predict::engine::{analyze_detailed, AnalysisRequest, Analyzed};
use shadowpatch_predict::simulate::{
    parse_call, parse_vectors, CaptureLimit, Limits, Progress as SimProgress, SimulationOptions, SimulationSection,
};
use shadowpatch_predict::{Analysis, ContextOptions, Finding, ModelRisk, Severity, Source, Verdict};
use shadowpatch_store::{EventKind, NewEvent, Store};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The analysis options `analyze` and `apply` share.
#[derive(Debug, Clone, clap::Args)]
pub struct AnalysisArgs {
    /// Seconds over which the target's CPU, RSS and open files are sampled (0: one sample, no trends).
    #[arg(long, default_value_t = 0.5, value_name = "SECONDS")]
    pub context_secs: f64,
    /// A Prometheus text-format endpoint of the target (http://...), scraped at both ends of the window.
    #[arg(long, value_name = "URL")]
    pub metrics_url: Option<String>,
    /// A log file of the target whose recent error rate counts (needs --error-pattern).
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// A regular expression matching the error lines of --log.
    #[arg(long, value_name = "REGEX")]
    pub error_pattern: Option<String>,
    /// The risk model file (default: STATE/risk-model.json if `shadowpatch-train train` wrote one, else the built-in model).
    #[arg(long, value_name = "FILE", env = "SHADOWPATCH_MODEL")]
    pub model: Option<PathBuf>,
    /// Simulate the patch on N live calls of each replaced function, each caught by a breakpoint and run original vs patched in sandboxed copies of the process.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub capture: Option<u32>,
    /// Capture live calls for at most this long (alone: every call in the window, up to 1000 per function; with --capture: the wait limit, default 60 s).
    #[arg(long, value_name = "SECONDS")]
    pub capture_for: Option<f64>,
    /// Simulate an explicit call of a pure replaced function, e.g. 'compute(5, -1)' (repeatable).
    #[arg(long = "call", value_name = "EXPR")]
    pub calls: Vec<String>,
    /// A file of explicit calls, one `function(arg, ...)` per line (`#` comments).
    #[arg(long, value_name = "FILE")]
    pub vectors: Option<PathBuf>,
    /// Processor time each simulated call may use before it counts as hung, in milliseconds.
    #[arg(long, default_value_t = 1000, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=600_000))]
    pub sim_budget_ms: u64,
}

impl AnalysisArgs {
    /// The simulation these arguments ask for, if any.
    pub fn simulation(&self) -> anyhow::Result<Option<SimulationOptions>> {
        let within = match self.capture_for {
            Some(seconds) if !(seconds > 0.0 && seconds <= 86_400.0) => {
                return Err(BadInput(format!("--capture-for {seconds}: must be in (0, 86400] seconds")).into())
            }
            Some(seconds) => Some(Duration::from_secs_f64(seconds)),
            None => None,
        };
        let capture = match (self.capture, within) {
            (Some(calls), within) => Some(CaptureLimit {
                calls,
                within: Some(within.unwrap_or(Duration::from_secs(60))),
            }),
            (None, Some(within)) => Some(CaptureLimit {
                calls: 1000,
                within: Some(within),
            }),
            (None, None) => None,
        };
        let mut calls = Vec::new();
        for text in &self.calls {
            calls.push(parse_call(text).map_err(|e| BadInput(e.to_string()))?);
        }
        if let Some(path) = &self.vectors {
            calls.extend(parse_vectors(path).map_err(|e| BadInput(e.to_string()))?);
        }
        if capture.is_none() && calls.is_empty() {
            return Ok(None);
        }
        let cpu = Duration::from_millis(self.sim_budget_ms);
        Ok(Some(SimulationOptions {
            capture,
            calls,
            limits: Limits {
                cpu,
                wall: (cpu * 10).max(Duration::from_secs(5)),
                ..Limits::default()
            },
            ..SimulationOptions::default()
        }))
    }
}

/// Run the analysis (static + context) and record it in the history.
pub fn run_analysis(
    context: &Context,
    pid: i32,
    manifest: &Path,
    args: &AnalysisArgs,
    cause: &str,
) -> anyhow::Result<(Analyzed, u64)> {
    let options = ContextOptions::from_arguments(
        args.context_secs,
        args.metrics_url.as_deref(),
        args.log.as_deref(),
        args.error_pattern.as_deref(),
    )?;
    let mut request = AnalysisRequest::new(pid, manifest, &context.state_dir);
    request.context = Some(options);
    request.sections = match args.simulation()? {
        Some(options) => {
            let section = SimulationSection::new(options);
            let enabled = !context.json && std::io::stderr().is_terminal();
            let section = if enabled {
                let mut bar = crate::progress::Progress::count("simulating", true);
                section.with_progress(Box::new(move |step| match step {
                    SimProgress::Armed { functions } => bar.note(&format!(
                        "breakpoints on {functions} function(s), waiting for live calls"
                    )),
                    SimProgress::Captured { symbol, count, wanted } => {
                        bar.note(&format!("captured {symbol} call {count}/{wanted}"))
                    }
                    SimProgress::Simulated { done, total } => bar.update(done as u64, total as u64),
                }))
            } else {
                section
            };
            vec![Box::new(section) as Box<dyn shadowpatch_predict::Section>]
        }
        None => shadowpatch_predict::standard_sections(None),
    };
    if let Some(path) = model_path(context, args.model.as_deref()) {
        let model = ModelRisk::load(&path).map_err(|e| BadInput(e.to_string()))?;
        request.scorer = Some(Box::new(model));
    }
    let started = Instant::now();
    let analyzed = analyze_detailed(request)?;
    let duration_us = started.elapsed().as_micros() as u64;
    if let Err(error) = record(context, &analyzed, duration_us, cause) {
        // The history is a record, not a safety mechanism.
        tracing::warn!("could not record the analysis in the event history: {error:#}");
    }
    Ok((analyzed, duration_us))
}

fn record(context: &Context, analyzed: &Analyzed, duration_us: u64, cause: &str) -> anyhow::Result<()> {
    shadowpatch_mirror::StateDir::create(&context.state_dir)?;
    let store = Store::open(&context.state_dir)?;
    store.record(
        &NewEvent::new(EventKind::Analysis)
            .target(analyzed.identity.pid, analyzed.identity.start_time)
            .patch(analyzed.patch_id.clone())
            .cause(cause)
            .outcome(verdict_name(analyzed.analysis.verdict))
            .duration_us(duration_us)
            .details(serde_json::json!({
                "analysis": analyzed.analysis,
                "timings_ms": analyzed.timings_ms,
                "scorer": analyzed.scorer,
            })),
    )?;
    Ok(())
}

pub fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Proceed => "proceed",
        Verdict::Warn => "warn",
        Verdict::Refuse => "refuse",
    }
}

/// `shadowpatch analyze PID MANIFEST`: exit 0 for proceed or warn, 1 for refuse.
pub fn run(context: &Context, pid: i32, manifest: &Path, args: &AnalysisArgs) -> anyhow::Result<i32> {
    let (analyzed, duration_us) = run_analysis(context, pid, manifest, args, "analyze")?;
    let code = if analyzed.analysis.verdict == Verdict::Refuse {
        1
    } else {
        0
    };
    if context.json {
        print_json(&serde_json::json!({
            "pid": analyzed.identity.pid,
            "start_time": analyzed.identity.start_time,
            "patch_id": analyzed.patch_id,
            "verdict": analyzed.analysis.verdict,
            "risk": analyzed.analysis.risk,
            "findings": analyzed.analysis.findings,
            "features": analyzed.analysis.features,
            "unavailable": analyzed.analysis.unavailable,
            "timings_ms": analyzed.timings_ms,
            "scorer": analyzed.scorer,
            "duration_us": duration_us,
        }));
    } else {
        print_report(&analyzed, duration_us);
    }
    Ok(code)
}

/// Verdict, risk, then the findings grouped by source with their evidence.
pub fn print_report(analyzed: &Analyzed, duration_us: u64) {
    let analysis = &analyzed.analysis;
    println!(
        "analysis of patch {} for pid {}: {} (risk {:.2}) in {:.1} ms",
        analyzed.patch_id,
        analyzed.identity.pid,
        verdict_name(analysis.verdict).to_uppercase(),
        analysis.risk,
        duration_us as f64 / 1000.0
    );
    for source in [Source::Static, Source::Simulation, Source::Context, Source::Model] {
        let mut findings: Vec<&Finding> = analysis.findings.iter().filter(|f| f.source == source).collect();
        if findings.is_empty() {
            continue;
        }
        findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
        println!("  {}:", source_name(source));
        for finding in findings {
            println!(
                "    {:<8} {:<26} {}",
                severity_name(finding.severity),
                finding.code,
                finding.message
            );
            if !finding.evidence.is_null() {
                println!("             evidence: {}", finding.evidence);
            }
        }
    }
    if analysis.findings.is_empty() {
        println!("  no findings");
    }
    println!("  risk by {}", analyzed.scorer);
    if !analysis.unavailable.is_empty() {
        println!(
            "  lower confidence: {} source{} unavailable:",
            analysis.unavailable.len(),
            if analysis.unavailable.len() == 1 { "" } else { "s" }
        );
        for note in &analysis.unavailable {
            println!("    {note}");
        }
    }
}

fn source_name(source: Source) -> &'static str {
    match source {
        Source::Static => "static analysis",
        Source::Simulation => "simulation",
        Source::Context => "system context",
        Source::Model => "risk model",
    }
}

fn severity_name(severity: Severity) -> &'static str {
    match severity {
        Severity::Blocking => "BLOCKING",
        Severity::Warning => "warning",
        Severity::Info => "info",
    }
}

/// Why `apply` refuses, on one line, and its exit code: 2 when a blocking
/// finding is one apply classes as bad input (unknown symbol, build-id...),
/// else 1. The first such finding's own message leads.
pub fn refusal(analysis: &Analysis) -> (String, i32) {
    let blocking: Vec<&Finding> = analysis
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Blocking)
        .collect();
    let bad_input = blocking.iter().find(|f| f.evidence["apply_error"] == "bad_input");
    let (lead, code) = match (bad_input, blocking.first()) {
        (Some(finding), _) => (Some(*finding), 2),
        (None, Some(finding)) => (Some(*finding), 1),
        (None, None) => (None, 1),
    };
    let message = match lead {
        Some(finding) if blocking.len() > 1 => format!(
            "{} (and {} more blocking finding{}: run `shadowpatch analyze` for all)",
            finding.message,
            blocking.len() - 1,
            if blocking.len() == 2 { "" } else { "s" }
        ),
        Some(finding) => finding.message.clone(),
        None => format!(
            "the prediction engine refuses this patch: risk {:.2} (run `shadowpatch analyze` for the findings; --force overrides)",
            analysis.risk
        ),
    };
    (message, code)
}

/// The model `analyze` and `apply` use: `explicit`, else the state
/// directory's trained model (what `shadowpatch-train train` writes by
/// default), else none (the built-in one). A file that cannot be used is
/// bad input.
pub fn model_path(context: &Context, explicit: Option<&Path>) -> Option<PathBuf> {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| Some(context.state_dir.join("risk-model.json")).filter(|p| p.exists()))
}
