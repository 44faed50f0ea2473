//! The engine: runs the parts of an analysis a request asks for, merges
//! their findings and features, scores the risk and gives the verdict.
//!
//! Static analysis always runs; system context runs when the request has
//! context options; further parts (simulation on forked copies, and any
//! later source) plug in as [`Section`]s, each adding findings, features
//! and unavailable notes; the risk comes from a [`RiskScorer`]: the
//! learned model ([`crate::model::ModelRisk`]) by default, the interim
//! formula below when the model cannot be used (said in `unavailable`).

use crate::context::{read_context, ContextOptions};
use crate::finding::{Analysis, Class, Evidence, Explanation, Finding, Severity, Source, Term, VerdictPolicy};
use crate::model::simulated_calls;
use crate::remote_client::DecidedBy;
use crate::static_analysis::analyze_static;
use crate::PredictError;
use shadowpatch_patch::survey::Survey;
use shadowpatch_process::ProcessIdentity;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What one part of the engine adds to an analysis.
#[derive(Debug, Clone, Default)]
pub struct Contribution {
    pub findings: Vec<Finding>,
    pub features: BTreeMap<String, f64>,
    pub unavailable: Vec<String>,
}

/// What a section sees of the request and of the analysis so far.
#[derive(Debug)]
pub struct SectionInput<'a> {
    pub identity: &'a ProcessIdentity,
    /// The patch as the caller read and surveyed it (never re-read).
    pub survey: &'a Survey,
    pub state_dir: &'a Path,
    pub findings: &'a [Finding],
    pub features: &'a BTreeMap<String, f64>,
}

/// A further part of the analysis (e.g. simulation on forked copies).
pub trait Section: std::fmt::Debug {
    /// Short name, used in timings and `unavailable` notes.
    fn name(&self) -> &'static str;
    /// Run; an `Err` that is not bad input becomes an `unavailable` note.
    fn run(&mut self, input: &SectionInput) -> Result<Contribution, PredictError>;
}

/// Turns findings and features into a risk in [0, 1].
pub trait RiskScorer: std::fmt::Debug {
    fn score(&self, findings: &[Finding], features: &BTreeMap<String, f64>) -> f64;
    /// What scored, for reports and the event history.
    fn describe(&self) -> String {
        format!("{self:?}")
    }
    /// How the score came about, term by term (the engine fills `basis`).
    fn explain(&self, _findings: &[Finding], _features: &BTreeMap<String, f64>) -> Explanation {
        Explanation {
            formula: self.describe(),
            ..Explanation::default()
        }
    }
    /// Findings the scorer itself makes (the fleet's history of this
    /// patch), asked after `score`: the engine adds them before the
    /// verdict (a harm among them blocks).
    fn extra_findings(&self) -> Vec<Finding> {
        Vec::new()
    }
    /// Who scored, for the report (asked after `score`).
    fn decided_by(&self) -> DecidedBy {
        DecidedBy::Local {
            model: self.describe(),
            why: None,
        }
    }
}

/// What the simulation gave as evidence, from the analysis's features.
pub fn evidence_of(features: &BTreeMap<String, f64>) -> Evidence {
    let simulated = simulated_calls(features);
    Evidence {
        simulated_calls: simulated as u32,
        live_calls: if simulated > 0.0 {
            count(features, "sim_captured_calls")
        } else {
            0
        },
        inconclusive_calls: count(features, "sim_inconclusive"),
        repeated_calls: count(features, "sim_live_repeated_clean"),
    }
}

/// The sections every analysis runs after static analysis and context,
/// in order: the corpus's feature extraction uses the same list, so a
/// section added here reaches the model by re-training only. Simulation
/// runs when there is something to simulate (captured or explicit calls).
pub fn standard_sections(simulation: Option<crate::simulate::SimulationOptions>) -> Vec<Box<dyn Section>> {
    let mut sections: Vec<Box<dyn Section>> = Vec::new();
    if let Some(options) = simulation {
        sections.push(Box::new(crate::simulate::SimulationSection::new(options)));
    }
    sections
}

/// The fallback risk when the learned model cannot be used: a noisy-OR over the
/// findings, `risk = 1 − Π (1 − w(f))`, with `w` = 0.9 for a blocking
/// finding, 0.15 for a warning, 0.01 for an informational one, and 0 for a
/// note that a source was unavailable (that lowers confidence, not safety).
/// One blocking finding alone gives 0.9; three independent warnings give
/// 0.39 (`warn`); eight give 0.73 (`refuse` at the default policy).
#[derive(Debug, Clone, Copy, Default)]
pub struct InterimRisk;

impl InterimRisk {
    pub fn weight(finding: &Finding) -> f64 {
        if finding.code == "context-source-unavailable" {
            return 0.0;
        }
        match finding.severity {
            Severity::Blocking => 0.9,
            Severity::Warning => 0.15,
            Severity::Info => 0.01,
        }
    }
}

impl RiskScorer for InterimRisk {
    fn score(&self, findings: &[Finding], _features: &BTreeMap<String, f64>) -> f64 {
        let safe: f64 = findings.iter().map(|f| 1.0 - Self::weight(f)).product();
        (1.0 - safe).clamp(0.0, 1.0)
    }

    fn describe(&self) -> String {
        "interim formula (noisy-OR of the findings)".to_string()
    }

    fn explain(&self, findings: &[Finding], _features: &BTreeMap<String, f64>) -> Explanation {
        let mut terms: Vec<Term> = findings
            .iter()
            .map(|f| Term {
                name: f.code.clone(),
                value: None,
                contribution: Self::weight(f),
                status: "finding weight".into(),
            })
            .collect();
        terms.sort_by(|x, y| y.contribution.total_cmp(&x.contribution));
        Explanation {
            formula:
                "interim formula: risk = 1 − Π (1 − weight) over the findings (blocking 0.9, warning 0.15, info 0.01)"
                    .into(),
            terms,
            ..Explanation::default()
        }
    }
}

/// The built-in model ([`crate::model::ModelRisk::embedded`]), else
/// [`InterimRisk`] with the note saying why.
pub fn built_in_scorer() -> (Box<dyn RiskScorer>, Option<String>) {
    match crate::model::ModelRisk::embedded() {
        Ok(model) => (Box::new(model), None),
        Err(error) => (
            Box::new(InterimRisk),
            Some(format!("risk model: {error}; the risk is the interim formula")),
        ),
    }
}

/// One analysis to run, of a patch read and surveyed once by the caller.
#[derive(Debug)]
pub struct AnalysisRequest<'a> {
    pub survey: &'a Survey,
    /// The state directory (its journal is read, never written).
    pub state_dir: PathBuf,
    /// System context; `None` skips it.
    pub context: Option<ContextOptions>,
    pub policy: VerdictPolicy,
    /// Further parts, run in order after static analysis and context.
    pub sections: Vec<Box<dyn Section>>,
    /// `None`: the built-in model ([`crate::model::ModelRisk::embedded`]),
    /// else [`InterimRisk`] with a note in `unavailable`.
    pub scorer: Option<Box<dyn RiskScorer>>,
}

impl<'a> AnalysisRequest<'a> {
    pub fn new(survey: &'a Survey, state_dir: &Path) -> Self {
        AnalysisRequest {
            survey,
            state_dir: state_dir.to_path_buf(),
            context: None,
            policy: VerdictPolicy::default(),
            sections: Vec::new(),
            scorer: None,
        }
    }
}

/// An analysis with what the caller needs to report and record it.
#[derive(Debug, Clone)]
pub struct Analyzed {
    pub analysis: Analysis,
    pub patch_id: String,
    pub identity: ProcessIdentity,
    /// Milliseconds per part (`static`, `context`, sections by name).
    pub timings_ms: BTreeMap<String, f64>,
    /// What scored the risk ([`RiskScorer::describe`]).
    pub scorer: String,
    /// Who scored it: the fleet's service or this host's model, and why.
    pub decided_by: DecidedBy,
}

/// Run the analysis `request` describes.
pub fn analyze(request: AnalysisRequest) -> Result<Analysis, PredictError> {
    analyze_detailed(request).map(|analyzed| analyzed.analysis)
}

/// Run the analysis and keep the patch id, target identity and timings.
pub fn analyze_detailed(mut request: AnalysisRequest) -> Result<Analyzed, PredictError> {
    let mut timings_ms = BTreeMap::new();
    let started = Instant::now();
    let report = analyze_static(request.survey, &request.state_dir)?;
    timings_ms.insert("static".to_string(), ms(started));
    let mut findings = report.findings;
    let mut features = report.features;
    let mut unavailable = report.unavailable;
    if let Some(options) = &request.context {
        let started = Instant::now();
        let context = read_context(&report.identity, options)?;
        findings.extend(context.findings);
        features.extend(context.features);
        unavailable.extend(context.unavailable);
        timings_ms.insert("context".to_string(), ms(started));
    }
    for section in &mut request.sections {
        let started = Instant::now();
        let input = SectionInput {
            identity: &report.identity,
            survey: request.survey,
            state_dir: &request.state_dir,
            findings: &findings,
            features: &features,
        };
        match section.run(&input) {
            Ok(contribution) => {
                findings.extend(contribution.findings);
                features.extend(contribution.features);
                unavailable.extend(contribution.unavailable);
            }
            Err(error) if error.is_bad_input() => return Err(error),
            Err(error) => unavailable.push(format!("{}: {error}", section.name())),
        }
        timings_ms.insert(section.name().to_string(), ms(started));
    }
    let simulated = simulated_calls(&features);
    if features.contains_key("sim_calls") && simulated == 0.0 {
        // Asking for evidence and getting none must not lower the risk:
        // the simulation's features are then unknown, not "no difference".
        unavailable.push(
            "simulation: no call was simulated, so it gives no evidence: the risk and the verdict rest on static analysis"
                .into(),
        );
    }
    if simulated == 0.0 {
        unavailable.extend(crate::intent::unconfirmed(request.survey));
    }
    // Harm refuses: a harm the simulation saw (a critical variable that
    // diverged, a new system call the sandbox refused) blocks like a crash.
    for finding in &mut findings {
        if finding.class == Class::Harm && finding.severity == Severity::Warning {
            finding.severity = Severity::Blocking;
        }
    }
    for severity in [Severity::Blocking, Severity::Warning, Severity::Info] {
        let name = match severity {
            Severity::Blocking => "analysis.blocking",
            Severity::Warning => "analysis.warnings",
            Severity::Info => "analysis.info",
        };
        let count = findings.iter().filter(|f| f.severity == severity).count();
        features.insert(name.into(), count as f64);
    }
    features.insert("analysis.unavailable".into(), unavailable.len() as f64);
    let default_scorer: Box<dyn RiskScorer>;
    let scorer: &dyn RiskScorer = match &request.scorer {
        Some(scorer) => scorer.as_ref(),
        None => {
            let note;
            (default_scorer, note) = built_in_scorer();
            unavailable.extend(note);
            default_scorer.as_ref()
        }
    };
    let risk = scorer.score(&findings, &features);
    // What only the scorer knows (the fleet's outcomes of this patch)
    // joins the findings before the verdict; a harm among them blocks.
    for mut finding in scorer.extra_findings() {
        if finding.class == Class::Harm && finding.severity == Severity::Warning {
            finding.severity = Severity::Blocking;
        }
        findings.push(finding);
    }
    let decided_by = scorer.decided_by();
    if let DecidedBy::Local { why: Some(why), .. } = &decided_by {
        unavailable.push(format!("{why}: the local model scored the risk"));
    }
    let evidence = evidence_of(&features);
    // A refusal on risk alone needs the simulation's evidence: on static
    // evidence only the model barely beats chance (held-out AUC 0.70,
    // PREDICTION.md) and extrapolates on patches unlike its corpus (a
    // rewrite of a 400-byte function), so it warns and says how to confirm.
    let blocking = findings.iter().any(|f| f.severity == Severity::Blocking);
    if risk >= request.policy.refuse_at && !blocking && evidence.simulated_calls == 0 {
        findings.push(
            Finding::new(
                "risk-unconfirmed",
                Severity::Warning,
                Source::Model,
                format!(
                    "the risk is {risk:.2} (refuse at {:.2}) on static evidence alone: simulate the patch \
                     (--capture N or --call) to confirm it before a refusal",
                    request.policy.refuse_at
                ),
            )
            .evidence(serde_json::json!({ "risk": risk, "refuse_at": request.policy.refuse_at })),
        );
    }
    let decision = request.policy.decide(&findings, risk, &evidence);
    let mut explanation = scorer.explain(&findings, &features);
    explanation.basis = decision.basis;
    Ok(Analyzed {
        analysis: Analysis {
            verdict: decision.verdict,
            risk,
            findings,
            features,
            unavailable,
            explanation,
        },
        patch_id: report.patch_id,
        identity: report.identity,
        timings_ms,
        scorer: scorer.describe(),
        decided_by,
    })
}

fn count(features: &BTreeMap<String, f64>, name: &str) -> u32 {
    features
        .get(name)
        .copied()
        .filter(|v| v.is_finite() && *v > 0.0)
        .unwrap_or(0.0) as u32
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::finding::Source;

    #[test]
    fn interim_risk_is_a_noisy_or_of_the_findings() {
        let finding = |severity| Finding::new("x", severity, Source::Static, "x");
        let empty = BTreeMap::new();
        assert_eq!(InterimRisk.score(&[], &empty), 0.0);
        assert!((InterimRisk.score(&[finding(Severity::Blocking)], &empty) - 0.9).abs() < 1e-9);
        let three = vec![finding(Severity::Warning); 3];
        assert!((InterimRisk.score(&three, &empty) - (1.0 - 0.85f64.powi(3))).abs() < 1e-9);
        let unavailable = Finding::new("context-source-unavailable", Severity::Warning, Source::Context, "x");
        assert_eq!(InterimRisk.score(&[unavailable], &empty), 0.0);
        let policy = VerdictPolicy::default();
        assert_eq!(
            policy.verdict(&[], InterimRisk.score(&vec![finding(Severity::Warning); 8], &empty)),
            crate::Verdict::Refuse
        );
    }
}
