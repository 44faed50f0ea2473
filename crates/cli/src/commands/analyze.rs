//! `shadowpatch analyze`: predict whether a patch will misbehave in a
//! running process, and why, without touching it (the analysis itself, the
//! same `apply` gates on, is `shadowpatch_ops::analysis`).

use super::Context;
use crate::failure::Exit;
use crate::output::print_json;
use shadowpatch_ops::analysis::{analyze, verdict_name, AnalysisReport, AnalysisSettings};
use shadowpatch_predict::simulate::Progress as SimProgress;
use shadowpatch_predict::{Finding, Severity, Source, Verdict};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// The analysis options `analyze` and `apply` share.
#[derive(Debug, Clone, clap::Args)]
pub struct AnalysisArgs {
    /// Seconds over which the target's CPU, RSS and open files are sampled (0: one sample, no trends) [default: 0.5; with --all: 0].
    #[arg(long, value_name = "SECONDS")]
    pub context_secs: Option<f64>,
    /// A Prometheus text-format endpoint of the target (http://...), scraped at both ends of the window.
    #[arg(long, value_name = "URL")]
    pub metrics_url: Option<String>,
    /// A log file of the target whose recent error rate counts (needs --error-pattern).
    #[arg(long, value_name = "FILE")]
    pub log: Option<PathBuf>,
    /// A regular expression matching the error lines of --log.
    #[arg(long, value_name = "REGEX")]
    pub error_pattern: Option<String>,
    /// The risk model file (default: STATE/risk-model.json if `predictor train` wrote one, else the built-in model).
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
    /// Run each simulated call that both copies returned from this many more times in the same copies (0: never), to catch harm one call does not show: a crash on a later call, a leak.
    #[arg(long, value_name = "N", default_value_t = shadowpatch_predict::simulate::DEFAULT_REPEATS)]
    pub sim_repeat: u32,
    #[command(flatten)]
    pub predictor: PredictorArgs,
}

/// The fleet predictor (`shadowpatch predictor serve`), shared by
/// `analyze`, `apply` and `agent`.
#[derive(Debug, Clone, clap::Args)]
pub struct PredictorArgs {
    /// The fleet prediction service that scores the risk (http://HOST:PORT); when it fails or is slow, this host's model decides and the report says why. Outcomes (applied, refused, kept, rolled back, crashed) are reported to it.
    #[arg(long, value_name = "URL", env = "SHADOWPATCH_PREDICTOR")]
    pub predictor: Option<String>,
    /// A file holding the bearer token for --predictor.
    #[arg(
        long,
        value_name = "FILE",
        env = "SHADOWPATCH_PREDICTOR_TOKEN",
        requires = "predictor"
    )]
    pub predictor_token: Option<PathBuf>,
    /// Seconds --predictor may take to answer before this host's model decides.
    #[arg(long, value_name = "SECONDS", default_value_t = 2.0)]
    pub predictor_timeout: f64,
    /// This host's name for the fleet (default: the hostname).
    #[arg(long, value_name = "NAME", env = "SHADOWPATCH_HOST_NAME")]
    pub predictor_host: Option<String>,
}

impl PredictorArgs {
    /// The settings, unchecked (the operations layer checks them before any work).
    pub fn settings(&self) -> Option<shadowpatch_predict::PredictorSettings> {
        Some(shadowpatch_predict::PredictorSettings {
            url: self.predictor.clone()?,
            token_file: self.predictor_token.clone(),
            timeout_secs: self.predictor_timeout,
            host: self.predictor_host.clone(),
        })
    }
}

impl AnalysisArgs {
    /// The context window when `--context-secs` is not given: 0.5 s of
    /// sampling per process.
    pub const DEFAULT_CONTEXT_SECS: f64 = 0.5;

    /// The settings the operations layer analyses with.
    pub fn settings(&self) -> AnalysisSettings {
        self.settings_with_context_default(Self::DEFAULT_CONTEXT_SECS)
    }

    /// [`Self::settings`] with another context window when
    /// `--context-secs` is not given: a host-wide apply takes one sample per
    /// process (half a second of sampling each was 8 s of a 1,000-process
    /// apply with 64 workers, eight times the patching itself).
    pub fn settings_with_context_default(&self, context_secs: f64) -> AnalysisSettings {
        AnalysisSettings {
            context_secs: self.context_secs.unwrap_or(context_secs),
            metrics_url: self.metrics_url.clone(),
            log: self.log.clone(),
            error_pattern: self.error_pattern.clone(),
            model: self.model.clone(),
            capture: self.capture,
            capture_for: self.capture_for,
            calls: self.calls.clone(),
            vectors: self.vectors.clone(),
            sim_budget_ms: self.sim_budget_ms,
            sim_repeat: self.sim_repeat,
            predictor: self.predictor.settings(),
        }
    }
}

/// A progress bar for a simulation, on a terminal and without --json.
pub fn progress_bar(context: &Context) -> Option<shadowpatch_ops::analysis::ProgressSink> {
    if context.json || !std::io::stderr().is_terminal() {
        return None;
    }
    let mut bar = crate::progress::Progress::count("simulating", true);
    Some(Box::new(move |step| match step {
        SimProgress::Armed { functions } => bar.note(&format!(
            "breakpoints on {functions} function(s), waiting for live calls"
        )),
        SimProgress::Captured { symbol, count, wanted } => {
            bar.note(&format!("captured {symbol} call {count}/{wanted}"))
        }
        SimProgress::Simulated { done, total } => bar.update(done as u64, total as u64),
    }))
}

/// `shadowpatch analyze PID MANIFEST`: exit 0 for proceed or warn, 1 for refuse.
pub fn run(context: &Context, pid: i32, manifest: &Path, args: &AnalysisArgs) -> anyhow::Result<i32> {
    let report = analyze(
        &context.state_dir,
        pid,
        manifest,
        &args.settings(),
        "analyze",
        progress_bar(context),
    )?;
    let code = if report.analysis.verdict == Verdict::Refuse {
        Exit::Differences
    } else {
        Exit::Ok
    };
    if context.json {
        print_json(&serde_json::json!({
            "pid": report.pid,
            "start_time": report.start_time,
            "patch_id": report.patch_id,
            "verdict": report.analysis.verdict,
            "risk": report.analysis.risk,
            "findings": report.analysis.findings,
            "features": report.analysis.features,
            "unavailable": report.analysis.unavailable,
            "explanation": report.analysis.explanation,
            "timings_ms": report.timings_ms,
            "scorer": report.scorer,
            "decided_by": report.decided_by,
            "duration_us": report.duration_us,
        }));
    } else {
        print_report(&report);
    }
    Ok(code.code())
}

/// Verdict, risk, then the findings grouped by source with their evidence.
pub fn print_report(report: &AnalysisReport) {
    let analysis = &report.analysis;
    println!(
        "analysis of patch {} for pid {}: {} (risk {:.2}) in {:.1} ms",
        report.patch_id,
        report.pid,
        verdict_name(analysis.verdict).to_uppercase(),
        analysis.risk,
        report.duration_us as f64 / 1000.0
    );
    if !analysis.explanation.basis.is_empty() {
        println!("  because: {}", analysis.explanation.basis);
    }
    for source in [Source::Static, Source::Simulation, Source::Context, Source::Model] {
        let mut findings: Vec<&Finding> = analysis.findings.iter().filter(|f| f.source == source).collect();
        if findings.is_empty() {
            continue;
        }
        findings.sort_by_key(|f| std::cmp::Reverse(f.severity));
        println!("  {}:", source_name(source));
        for finding in findings {
            println!(
                "    {:<8} {:<16} {:<26} {}",
                severity_name(finding.severity),
                finding.class.name(),
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
    // Which model decided, on one line (the service's, or ours and why).
    match &report.decided_by {
        shadowpatch_predict::DecidedBy::Local { model, why: None } if model.is_empty() => {
            println!("  risk by {}", report.scorer)
        }
        decided_by => println!("  risk by {}", decided_by.line()),
    }
    print_explanation(analysis);
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

/// Terms shown one by one; the rest are summed on one line.
const TERMS_SHOWN: usize = 8;

/// How the risk came about: the formula, the largest terms, what was not
/// measured and what was not scored.
fn print_explanation(analysis: &shadowpatch_predict::Analysis) {
    let explanation = &analysis.explanation;
    if explanation.formula.is_empty() {
        return;
    }
    println!("  how: {}", explanation.formula);
    if let Some(intercept) = explanation.intercept {
        println!("    {:>+7.3}  intercept", intercept);
    }
    let scored: Vec<&shadowpatch_predict::Term> = explanation
        .terms
        .iter()
        .filter(|t| t.status == "measured" || t.status.starts_with("absent") || t.status == "finding weight")
        .collect();
    for term in scored.iter().take(TERMS_SHOWN) {
        let value = term.value.map(|v| format!(" = {}", show_number(v))).unwrap_or_default();
        println!("    {:>+7.3}  {}{value}", term.contribution, term.name);
    }
    if scored.len() > TERMS_SHOWN {
        let rest: f64 = scored[TERMS_SHOWN..].iter().map(|t| t.contribution).sum();
        println!("    {:>+7.3}  {} more terms", rest, scored.len() - TERMS_SHOWN);
    }
    let mut unscored: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for term in explanation
        .terms
        .iter()
        .filter(|t| !scored.iter().any(|s| std::ptr::eq(*s, *t)))
    {
        let value = term.value.map(|v| format!(" = {}", show_number(v))).unwrap_or_default();
        unscored
            .entry(term.status.as_str())
            .or_default()
            .push(format!("{}{value}", term.name));
    }
    for (status, names) in unscored {
        println!("     0       {status}: {}", names.join(", "));
    }
    if let Some(model_risk) = explanation.model_risk {
        if explanation.context.is_empty() {
            println!("    = risk {model_risk:.3}");
        } else {
            let weights: Vec<String> = explanation
                .context
                .iter()
                .map(|t| format!("{} {:.2}", t.name, t.contribution))
                .collect();
            println!(
                "    = model {model_risk:.3}, raised by the target's context ({}) to {:.3}",
                weights.join(", "),
                analysis.risk
            );
        }
    }
}

fn show_number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{}", value as i64)
    } else {
        format!("{value:.3}")
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
