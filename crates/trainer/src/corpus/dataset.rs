//! Samples for the model: each labelled variant analysed by the engine
//! (static analysis, context, and every standard section) against a live
//! corpus target, keeping the analysis's features and what the verdict
//! policy needs (blocking findings, simulation failures).

use super::label::{corpus_target_build_id, CorpusTarget, LabelRecord};
use super::variants::{build, Variant};
use super::CorpusError;
use serde::{Deserialize, Serialize};
use shadowpatch_predict::engine::{analyze_detailed, standard_sections, AnalysisRequest};
use shadowpatch_predict::finding::{Analysis, Severity, Source};
pub use shadowpatch_predict::model::is_simulation_feature;
use shadowpatch_predict::simulate::{CaptureLimit, Limits, SimulationOptions};
use shadowpatch_predict::{survey_for_analysis, ContextOptions, InterimRisk};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

/// One labelled analysis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub id: String,
    /// Samples of one group never straddle the train/test split: the
    /// function for corpus variants, `history:<patch id>` for history.
    pub group: String,
    /// The variant kind, or `history`.
    pub kind: String,
    pub harmful: bool,
    /// The label's outcome (`ok`, `crash`, `rollback:health`, ...).
    pub outcome: String,
    pub features: BTreeMap<String, f64>,
    /// A blocking finding of any source (the engine refuses whatever the risk).
    pub blocking: bool,
    /// A blocking finding of static analysis.
    pub static_blocking: bool,
    /// `Some(true)` when the simulation saw the patched copy crash or hang;
    /// `None` when no simulation ran.
    pub simulation_failed: Option<bool>,
    /// Every finding's code and severity: what the verdict rule reads
    /// beside the risk (absent from samples made before 2026-12-07).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<BriefFinding>,
}

/// A finding as the verdict rule sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BriefFinding {
    pub code: String,
    pub severity: Severity,
}

impl BriefFinding {
    pub fn finding(&self) -> shadowpatch_predict::Finding {
        shadowpatch_predict::Finding::new(&self.code, self.severity, Source::Static, "")
    }
}

impl Sample {
    pub fn from_analysis(
        id: &str,
        group: &str,
        kind: &str,
        harmful: bool,
        outcome: &str,
        analysis: &Analysis,
    ) -> Sample {
        let simulated = analysis.findings.iter().any(|f| f.source == Source::Simulation)
            || analysis.features.keys().any(|name| is_simulation_feature(name));
        let failed = analysis
            .findings
            .iter()
            .any(|f| f.source == Source::Simulation && f.severity == Severity::Blocking)
            || analysis.features.iter().any(|(name, value)| {
                is_simulation_feature(name) && (name.contains("crash") || name.contains("hang")) && *value > 0.0
            });
        Sample {
            id: id.to_string(),
            group: group.to_string(),
            kind: kind.to_string(),
            harmful,
            outcome: outcome.to_string(),
            features: analysis.features.clone(),
            blocking: analysis.findings.iter().any(|f| f.severity == Severity::Blocking),
            static_blocking: analysis
                .findings
                .iter()
                .any(|f| f.severity == Severity::Blocking && f.source == Source::Static),
            simulation_failed: simulated.then_some(failed),
            findings: analysis
                .findings
                .iter()
                .map(|f| BriefFinding {
                    code: f.code.clone(),
                    severity: f.severity,
                })
                .collect(),
        }
    }
}

/// The engine parts whose features the samples hold.
pub fn section_names() -> Vec<String> {
    let mut names = vec!["static".to_string(), "context".to_string()];
    names.extend(
        standard_sections(Some(corpus_simulation()))
            .iter()
            .map(|s| s.name().to_string()),
    );
    names
}

/// How the corpus simulates each variant: a few live calls of each
/// replaced function captured on the corpus target (its workers call all of
/// them continuously with varying inputs), tight budgets. What `analyze
/// --capture N` does on a service.
pub fn corpus_simulation() -> SimulationOptions {
    SimulationOptions {
        capture: Some(CaptureLimit {
            calls: CORPUS_CAPTURED_CALLS,
            within: Some(Duration::from_secs(10)),
            // As `analyze --capture N` takes them.
            spread: true,
        }),
        limits: Limits {
            cpu: Duration::from_millis(250),
            wall: Duration::from_secs(5),
            syscalls: 1000,
        },
        stop_after_failures: 2,
        ..SimulationOptions::default()
    }
}

/// Live calls captured per replaced function in the corpus.
pub const CORPUS_CAPTURED_CALLS: u32 = 8;

/// Analyse every labelled variant (those `apply` accepted) on one live
/// corpus target. `progress(done, total)` after each.
pub fn extract(
    records: &[LabelRecord],
    variants: &[Variant],
    cache_dir: &Path,
    progress: &dyn Fn(usize, usize),
) -> Result<Vec<Sample>, CorpusError> {
    let build_id = corpus_target_build_id()?;
    let by_id: BTreeMap<&str, &Variant> = variants.iter().map(|v| (v.id.as_str(), v)).collect();
    let labelled: Vec<(&LabelRecord, &Variant)> = records
        .iter()
        .filter(|r| r.harmful().is_some())
        .filter_map(|r| Some((r, *by_id.get(r.id.as_str())?)))
        .filter(|(r, v)| v.hash() == r.hash)
        .collect();
    let state_dir = cache_dir.join("analysis-state");
    let mut target = CorpusTarget::start(1, &state_dir)?;
    let mut samples = Vec::new();
    for (index, (record, variant)) in labelled.iter().enumerate() {
        let built = build(variant, cache_dir, &build_id).map_err(|e| CorpusError::Build {
            id: variant.id.clone(),
            message: e.to_string(),
        })?;
        if !target.running.is_running() {
            target = CorpusTarget::start(1, &state_dir)?;
        }
        let survey = survey_for_analysis(target.pid(), &built.manifest, &state_dir)?;
        let mut request = AnalysisRequest::new(&survey, &state_dir);
        // One sample of the target's health: the corpus target is always
        // healthy, so a window would only add time.
        request.context = Some(ContextOptions {
            window: Duration::ZERO,
            samples: 1,
            ..ContextOptions::default()
        });
        request.sections = standard_sections(Some(corpus_simulation()));
        request.scorer = Some(Box::new(InterimRisk));
        let analyzed = analyze_detailed(request)?;
        samples.push(Sample::from_analysis(
            &record.id,
            &record.function,
            record.kind.as_str(),
            record.harmful().expect("filtered above"),
            record.outcome.as_str(),
            &analyzed.analysis,
        ));
        progress(index + 1, labelled.len());
    }
    Ok(samples)
}
