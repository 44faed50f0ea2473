//! The analysis gate every apply passes (and `analyze` alone): the
//! prediction engine's static analysis, system context and optional
//! simulation, its record in the event history, and the refusal it gives.

use crate::{bad_input, OpsError};
use shadowpatch_patch::survey::Survey;
use shadowpatch_predict::engine::{analyze_detailed, built_in_scorer, AnalysisRequest, Analyzed};
use shadowpatch_predict::remote_client::{AskedPatch, DecidedBy, Predictor, PredictorSettings, RemoteScorer};
use shadowpatch_predict::simulate::{
    parse_call, parse_vectors, CaptureLimit, Limits, Progress, SimulationOptions, SimulationSection,
};
use shadowpatch_predict::{survey_for_analysis, Analysis, ContextOptions, Finding, ModelRisk, Severity, Verdict};
use shadowpatch_store::{EventKind, NewEvent};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How to analyse: the options `analyze` and `apply` share, as the CLI's
/// flags give them and as the agent's `apply` request carries them
/// (every field optional on the wire, defaults as the CLI's).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnalysisSettings {
    /// Seconds over which CPU, RSS and open files are sampled (0: one sample).
    pub context_secs: f64,
    pub metrics_url: Option<String>,
    pub log: Option<PathBuf>,
    pub error_pattern: Option<String>,
    /// The risk model file (default: STATE/risk-model.json if present, else built in).
    pub model: Option<PathBuf>,
    /// Live calls to capture per replaced function.
    pub capture: Option<u32>,
    /// Capture for at most this long (seconds).
    pub capture_for: Option<f64>,
    /// Explicit calls, e.g. `compute(5, -1)`.
    pub calls: Vec<String>,
    /// A file of explicit calls.
    pub vectors: Option<PathBuf>,
    /// CPU each simulated call may use, in milliseconds.
    pub sim_budget_ms: u64,
    /// Each simulated call both copies returned from runs again this many
    /// times in the same copies (0: never), for harm one call does not
    /// show: a failure on a later call, a leak.
    pub sim_repeat: u32,
    /// The fleet predictor that scores the risk (`None`: this host's
    /// model); when it fails, this host's model decides and says why.
    pub predictor: Option<PredictorSettings>,
}

/// Repeats of a simulated call at most (each may take a budget).
pub const MAX_REPEATS: u32 = 100;

impl Default for AnalysisSettings {
    fn default() -> Self {
        AnalysisSettings {
            context_secs: 0.5,
            metrics_url: None,
            log: None,
            error_pattern: None,
            model: None,
            capture: None,
            capture_for: None,
            calls: Vec::new(),
            vectors: None,
            sim_budget_ms: 1000,
            sim_repeat: shadowpatch_predict::simulate::DEFAULT_REPEATS,
            predictor: None,
        }
    }
}

impl AnalysisSettings {
    /// Files the analysis reads on the requester's behalf (the agent checks
    /// they are the requester's own).
    pub fn files(&self) -> Vec<&Path> {
        let token = self.predictor.as_ref().and_then(|p| p.token_file.as_ref());
        [self.log.as_ref(), self.model.as_ref(), self.vectors.as_ref(), token]
            .into_iter()
            .flatten()
            .map(PathBuf::as_path)
            .collect()
    }

    /// The simulation these settings ask for, if any.
    pub fn simulation(&self) -> Result<Option<SimulationOptions>, OpsError> {
        let within = match self.capture_for {
            Some(seconds) if !(seconds > 0.0 && seconds <= 86_400.0) => {
                return Err(bad_input(format!(
                    "--capture-for {seconds}: must be in (0, 86400] seconds"
                )))
            }
            Some(seconds) => Some(Duration::from_secs_f64(seconds)),
            None => None,
        };
        if let Some(calls) = self.capture {
            if !(1..=10_000).contains(&calls) {
                return Err(bad_input(format!("--capture {calls}: must be between 1 and 10000")));
            }
        }
        if !(1..=600_000).contains(&self.sim_budget_ms) {
            return Err(bad_input(format!(
                "--sim-budget-ms {}: must be between 1 and 600000",
                self.sim_budget_ms
            )));
        }
        if self.sim_repeat > MAX_REPEATS {
            return Err(bad_input(format!(
                "--sim-repeat {}: must be between 0 and {MAX_REPEATS}",
                self.sim_repeat
            )));
        }
        let capture = match (self.capture, within) {
            (Some(calls), within) => Some(CaptureLimit {
                calls,
                within: Some(within.unwrap_or(Duration::from_secs(60))),
                spread: true,
            }),
            (None, Some(within)) => Some(CaptureLimit {
                calls: 1000,
                within: Some(within),
                // Every call of the window, up to 1000: none skipped.
                spread: false,
            }),
            (None, None) => None,
        };
        let mut calls = Vec::new();
        for text in &self.calls {
            calls.push(parse_call(text).map_err(|e| bad_input(e.to_string()))?);
        }
        if let Some(path) = &self.vectors {
            calls.extend(parse_vectors(path).map_err(|e| bad_input(e.to_string()))?);
        }
        if capture.is_none() && calls.is_empty() {
            return Ok(None);
        }
        Ok(Some(SimulationOptions {
            capture,
            calls,
            limits: self.limits(),
            repeat: self.sim_repeat,
            ..SimulationOptions::default()
        }))
    }

    /// The budgets of each simulated run.
    fn limits(&self) -> Limits {
        let cpu = Duration::from_millis(self.sim_budget_ms);
        Limits {
            cpu,
            wall: (cpu * 10).max(Duration::from_secs(5)),
            ..Limits::default()
        }
    }
}

/// Where a simulation's progress goes (the CLI's progress bar).
pub type ProgressSink = Box<dyn FnMut(Progress)>;

/// An analysis as the user sees it and the history keeps it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct AnalysisReport {
    pub pid: i32,
    pub start_time: u64,
    pub patch_id: String,
    pub analysis: Analysis,
    pub timings_ms: BTreeMap<String, f64>,
    /// What scored the risk.
    pub scorer: String,
    /// Who scored it: the fleet predictor, or this host's model and why.
    #[serde(default)]
    pub decided_by: DecidedBy,
    /// The build-id the patch targets (manifest), hex.
    #[serde(default)]
    pub build_id: Option<String>,
    pub duration_us: u64,
}

impl AnalysisReport {
    fn of(analyzed: Analyzed, build_id: String, duration_us: u64) -> Self {
        AnalysisReport {
            pid: analyzed.identity.pid,
            start_time: analyzed.identity.start_time,
            patch_id: analyzed.patch_id,
            analysis: analyzed.analysis,
            timings_ms: analyzed.timings_ms,
            scorer: analyzed.scorer,
            decided_by: analyzed.decided_by,
            build_id: Some(build_id),
            duration_us,
        }
    }
}

/// The model `analyze` and `apply` use: `explicit`, else the state
/// directory's trained model when there is one (`None`: built in).
pub fn model_path(state_dir: &Path, explicit: Option<&Path>) -> Option<PathBuf> {
    explicit
        .map(Path::to_path_buf)
        .or_else(|| Some(state_dir.join("risk-model.json")).filter(|p| p.exists()))
}

/// Read and survey the patch at `manifest`, run the analysis and record
/// it in the history (`shadowpatch analyze`).
pub fn analyze(
    state_dir: &Path,
    pid: i32,
    manifest: &Path,
    settings: &AnalysisSettings,
    cause: &str,
    progress: Option<ProgressSink>,
) -> Result<AnalysisReport, OpsError> {
    // The settings first: a bad option is named before the patch is read.
    let parts = Parts::of(state_dir, settings, progress)?;
    let survey = survey_for_analysis(pid, manifest, state_dir)?;
    parts.run(state_dir, &survey, cause)
}

/// Run the analysis of a patch already read and surveyed (apply's gate:
/// the same survey then goes on to the transaction) and record it in the
/// history (`cause`: `analyze` or `apply`).
pub fn analyze_surveyed(
    state_dir: &Path,
    survey: &Survey,
    settings: &AnalysisSettings,
    cause: &str,
    progress: Option<ProgressSink>,
) -> Result<AnalysisReport, OpsError> {
    Parts::of(state_dir, settings, progress)?.run(state_dir, survey, cause)
}

/// [`analyze_surveyed`] without its history record: the caller records
/// [`analysis_event`] itself (an apply, with its own event, in one
/// transaction).
pub(crate) fn analyze_surveyed_unrecorded(
    state_dir: &Path,
    survey: &Survey,
    settings: &AnalysisSettings,
    progress: Option<ProgressSink>,
) -> Result<AnalysisReport, OpsError> {
    Parts::of(state_dir, settings, progress)?.run_unrecorded(state_dir, survey)
}

/// What the settings ask the engine to run, checked before any work.
struct Parts {
    context: ContextOptions,
    /// Budgets for a simulation the manifest's `expect` entries ask for
    /// when the settings asked for none.
    limits: Limits,
    sections: Vec<Box<dyn shadowpatch_predict::Section>>,
    scorer: Option<Box<dyn shadowpatch_predict::RiskScorer>>,
    /// The fleet predictor asked first, and its settings.
    predictor: Option<(Predictor, PredictorSettings)>,
}

impl Parts {
    fn of(state_dir: &Path, settings: &AnalysisSettings, progress: Option<ProgressSink>) -> Result<Parts, OpsError> {
        let context = ContextOptions::from_arguments(
            settings.context_secs,
            settings.metrics_url.as_deref(),
            settings.log.as_deref(),
            settings.error_pattern.as_deref(),
        )?;
        let sections = match settings.simulation()? {
            Some(options) => {
                let section = SimulationSection::new(options);
                let section = match progress {
                    Some(progress) => section.with_progress(progress),
                    None => section,
                };
                vec![Box::new(section) as Box<dyn shadowpatch_predict::Section>]
            }
            None => shadowpatch_predict::standard_sections(None),
        };
        // Checked before any work: a bad address is bad input, while a
        // service that fails to answer later leaves the local model to decide.
        let predictor = match &settings.predictor {
            Some(predictor) => Some((
                predictor.check().map_err(|e| bad_input(e.to_string()))?,
                predictor.clone(),
            )),
            None => None,
        };
        let scorer = match model_path(state_dir, settings.model.as_deref()) {
            Some(path) => {
                let model = ModelRisk::load(&path).map_err(|e| bad_input(e.to_string()))?;
                Some(Box::new(model) as Box<dyn shadowpatch_predict::RiskScorer>)
            }
            None => None,
        };
        Ok(Parts {
            context,
            limits: settings.limits(),
            sections,
            scorer,
            predictor,
        })
    }

    fn run(self, state_dir: &Path, survey: &Survey, cause: &str) -> Result<AnalysisReport, OpsError> {
        let report = self.run_unrecorded(state_dir, survey)?;
        if let Err(error) = record(state_dir, &report, cause) {
            // The history is a record, not a safety mechanism.
            tracing::warn!("could not record the analysis in the event history: {error}");
        }
        Ok(report)
    }

    fn run_unrecorded(self, state_dir: &Path, survey: &Survey) -> Result<AnalysisReport, OpsError> {
        let mut request = AnalysisRequest::new(survey, state_dir);
        request.context = Some(self.context);
        request.sections = self.sections;
        if request.sections.is_empty() && shadowpatch_predict::intent::has_expectations(survey) {
            // The manifest's expected results are checked on explicit
            // calls (copies of the process; the target only pauses for
            // one fork), even without --capture or --call.
            request
                .sections
                .push(Box::new(SimulationSection::new(SimulationOptions {
                    limits: self.limits,
                    ..SimulationOptions::default()
                })));
        }
        request.scorer = self.scorer;
        if let Some((predictor, _)) = &self.predictor {
            // The local model the engine would use decides when the service fails.
            let local = request.scorer.take().unwrap_or_else(|| {
                let (scorer, note) = built_in_scorer();
                if let Some(note) = note {
                    tracing::warn!("{note}");
                }
                scorer
            });
            let patch = AskedPatch {
                patch_id: survey.manifest.id.clone(),
                build_id: Some(survey.manifest.target.build_id.clone()),
                program: survey.identity.exe.as_ref().map(|p| p.display().to_string()),
            };
            request.scorer = Some(Box::new(RemoteScorer::new(
                predictor.clone(),
                patch,
                request.policy,
                local,
            )));
        }
        let started = Instant::now();
        let analyzed = analyze_detailed(request)?;
        let report = AnalysisReport::of(
            analyzed,
            survey.manifest.target.build_id.clone(),
            started.elapsed().as_micros() as u64,
        );
        if let (Some((_, settings)), DecidedBy::Service { .. }) = (&self.predictor, &report.decided_by) {
            // The service answers: outcomes it missed go now.
            crate::fleet::send(state_dir, settings);
        }
        Ok(report)
    }
}

fn record(state_dir: &Path, report: &AnalysisReport, cause: &str) -> Result<(), OpsError> {
    shadowpatch_mirror::StateDir::create(state_dir)?;
    shadowpatch_store::record_in(state_dir, &analysis_event(report, cause))?;
    Ok(())
}

/// The history's event for an analysis (`cause`: `analyze` or `apply`),
/// timed now.
pub(crate) fn analysis_event(report: &AnalysisReport, cause: &str) -> NewEvent {
    NewEvent::new(EventKind::Analysis)
        .at(shadowpatch_store::now_ms())
        .target(report.pid, report.start_time)
        .patch(report.patch_id.clone())
        .cause(cause)
        .outcome(verdict_name(report.analysis.verdict))
        .duration_us(report.duration_us)
        .details(serde_json::json!({
            "analysis": report.analysis,
            "timings_ms": report.timings_ms,
            "scorer": report.scorer,
            "decided_by": report.decided_by,
        }))
}

pub fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Proceed => "proceed",
        Verdict::Warn => "warn",
        Verdict::Refuse => "refuse",
    }
}

/// Why `apply` refuses, on one line, and the class of the refusal: bad
/// input when a blocking finding is one apply classes so (unknown symbol,
/// build-id...), else refused for safety. The first such finding leads.
pub fn refusal(analysis: &Analysis) -> (String, shadowpatch_failure::FailureClass) {
    use shadowpatch_failure::FailureClass;
    let blocking: Vec<&Finding> = analysis
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Blocking)
        .collect();
    let bad_input = blocking.iter().find(|f| f.evidence["apply_error"] == "bad_input");
    let (lead, class) = match (bad_input, blocking.first()) {
        (Some(finding), _) => (Some(*finding), FailureClass::BadInput),
        (None, Some(finding)) => (Some(*finding), FailureClass::RefusedForSafety),
        (None, None) => (None, FailureClass::RefusedForSafety),
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
    (message, class)
}
