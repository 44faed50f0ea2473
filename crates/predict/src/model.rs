//! The learned risk model: its versioned file format, loading (the model
//! shipped in the repository is compiled in; a path overrides it) and the
//! [`ModelRisk`] scorer the engine uses by default.
//!
//! The model reads `Analysis.features` by name, in the order the file
//! lists them; a feature the analysis did not produce counts as 0 (a
//! source that did not run contributes nothing), and one the file does not
//! list is ignored, so new sources of features (simulation) change
//! nothing until the model is trained again with them.
//!
//! The engine scores *harm* ([`ModelRisk`]): a behaviour-change feature
//! (divergent returns, writes, side effects) that measured a change is
//! held at its training mean, so it adds nothing (one that measured
//! identical behaviour counts as trained). The corpus labelled every wrong
//! answer harmful, so the model learned "any change is harm"; but
//! changing behaviour is what a fix does, and the verdict handles it on
//! its own (a warning with examples unless the manifest declares it).
//! [`ModelFile::probability`] stays the model as trained (the trainer
//! evaluates that).

use crate::engine::RiskScorer;
use crate::finding::{Explanation, Finding, Term};
use serde::{Deserialize, Serialize};
use smartcore::ensemble::random_forest_regressor::RandomForestRegressor;
use smartcore::linalg::basic::matrix::DenseMatrix;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

/// What the file's `format` field must say.
pub const MODEL_FORMAT: &str = "shadowpatch-risk-model";
/// The layout this shadowpatch reads and writes; a change bumps it.
pub const MODEL_FORMAT_VERSION: u32 = 1;
/// The model shipped with shadowpatch.
pub const EMBEDDED_MODEL: &str = include_str!("../model/risk-model.json");

/// The random forest as smartcore stores it.
pub type Forest = RandomForestRegressor<f64, f64, DenseMatrix<f64>, Vec<f64>>;

/// A model file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("risk model {origin}: {source}")]
    Read { origin: String, source: std::io::Error },
    #[error("risk model {origin}: not a shadowpatch risk model ({message})")]
    Corrupt { origin: String, message: String },
    #[error("risk model {origin}: format version {found}, this shadowpatch reads version {MODEL_FORMAT_VERSION}")]
    Version { origin: String, found: u64 },
}

impl ModelError {
    /// Every model problem is the user's to fix (exit 2), except that a
    /// file could not be read for another reason than its content.
    pub fn is_bad_input(&self) -> bool {
        match self {
            ModelError::Read { source, .. } => matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::IsADirectory
            ),
            _ => true,
        }
    }
}

/// The estimator's parameters.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Estimator {
    /// `z = intercept + Σ coefficient_i · clip((x_i − mean_i) / scale_i)`;
    /// the raw score is `z`.
    LogisticRegression {
        means: Vec<f64>,
        scales: Vec<f64>,
        /// Standardised values are clipped to ±clip, so a value far outside
        /// what training saw cannot dominate.
        clip: f64,
        coefficients: Vec<f64>,
        intercept: f64,
    },
    /// A forest of regression trees on 0/1 labels: the raw score is the
    /// mean of the trees' leaves, a harmful fraction.
    RandomForest { forest: Arc<Forest> },
}

/// Raw score → probability: `p = 1 / (1 + exp(−(a · raw + b)))`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calibration {
    /// Always `platt`.
    pub method: String,
    pub a: f64,
    pub b: f64,
}

impl Calibration {
    pub fn platt(a: f64, b: f64) -> Calibration {
        Calibration {
            method: "platt".to_string(),
            a,
            b,
        }
    }

    pub fn probability(&self, raw: f64) -> f64 {
        1.0 / (1.0 + (-(self.a * raw + self.b)).exp())
    }
}

/// Where the model came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingMetadata {
    /// RFC 3339 time of training.
    pub trained_at: String,
    /// BLAKE3 of the labels and of the target and rewrite sources.
    pub corpus_hash: String,
    pub seed: u64,
    /// Sample counts: train, test, history, and per label.
    pub samples: BTreeMap<String, usize>,
    /// The functions held out as the test split.
    pub test_functions: Vec<String>,
    /// Cross-validated AUC of each candidate on the training split.
    pub selection: Vec<CandidateScore>,
    /// Why the chosen estimator won.
    pub chosen_because: String,
    /// The engine sections whose features the model saw.
    pub sections: Vec<String>,
    pub compiler: String,
    /// The evaluation on the held-out split (as `shadowpatch-train evaluate` prints it).
    pub evaluation: serde_json::Value,
}

/// One candidate of the model selection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateScore {
    pub name: String,
    pub cv_auc: f64,
    pub cv_brier: f64,
}

/// The model file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    pub format: String,
    pub format_version: u32,
    /// Feature names, in the order the estimator reads them.
    pub features: Vec<String>,
    pub estimator: Estimator,
    pub calibration: Calibration,
    pub training: TrainingMetadata,
}

impl ModelFile {
    /// Parse and check a model; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<ModelFile, ModelError> {
        let corrupt = |message: String| ModelError::Corrupt {
            origin: origin.to_string(),
            message,
        };
        // Format and version first: a newer file is refused as newer, not
        // as one with unknown fields.
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| corrupt(format!("not JSON: {e}")))?;
        if value.get("format").and_then(|f| f.as_str()) != Some(MODEL_FORMAT) {
            return Err(corrupt(format!("its format field is not {MODEL_FORMAT:?}")));
        }
        let version = value
            .get("format_version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| corrupt("no format_version".into()))?;
        if version != u64::from(MODEL_FORMAT_VERSION) {
            return Err(ModelError::Version {
                origin: origin.to_string(),
                found: version,
            });
        }
        let model: ModelFile = serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))?;
        model.check().map_err(corrupt)?;
        Ok(model)
    }

    /// Read and check the model file at `path`.
    pub fn read(path: &Path) -> Result<ModelFile, ModelError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ModelError::Read {
            origin: origin.clone(),
            source,
        })?;
        ModelFile::parse(&text, &origin)
    }

    /// The model compiled into this shadowpatch.
    pub fn embedded() -> Result<ModelFile, ModelError> {
        ModelFile::parse(EMBEDDED_MODEL, "(built in)")
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a model serializes")
    }

    fn check(&self) -> Result<(), String> {
        let count = self.features.len();
        if !(self.calibration.a.is_finite() && self.calibration.b.is_finite()) || self.calibration.method != "platt" {
            return Err("calibration must be platt with finite a and b".into());
        }
        match &self.estimator {
            Estimator::LogisticRegression {
                means,
                scales,
                clip,
                coefficients,
                intercept,
            } => {
                if means.len() != count || scales.len() != count || coefficients.len() != count {
                    return Err(format!(
                        "{count} features but {} means, {} scales, {} coefficients",
                        means.len(),
                        scales.len(),
                        coefficients.len()
                    ));
                }
                let all = means.iter().chain(scales).chain(coefficients).chain([intercept, clip]);
                if !all.clone().all(|v| v.is_finite()) || scales.iter().any(|s| *s <= 0.0) {
                    return Err("parameters must be finite, scales positive".into());
                }
            }
            Estimator::RandomForest { forest } => {
                // A forest that cannot score a row of the right width is broken.
                let row = DenseMatrix::from_2d_vec(&vec![vec![0.0; count]]).map_err(|e| e.to_string())?;
                let scores = forest.predict(&row).map_err(|e| format!("forest: {e}"))?;
                if scores.len() != 1 || !scores[0].is_finite() {
                    return Err("forest gives no finite score".into());
                }
            }
        }
        Ok(())
    }

    /// The feature vector of an analysis, in the model's order (missing: 0).
    /// When the simulation did not run (no `sim_calls`), its features are
    /// unknown rather than zero: a logistic regression gets their training
    /// means, so they add nothing either way, and the risk rests on what
    /// was measured.
    pub fn vector(&self, features: &BTreeMap<String, f64>) -> Vec<f64> {
        self.vector_with(features, false)
            .into_iter()
            .map(|(value, _)| value)
            .collect()
    }

    /// The feature vector, each value with how it was taken: `harm_only`
    /// holds a behaviour-change feature that measured a change at its
    /// training mean (identical behaviour, a measured 0, still counts).
    fn vector_with(&self, features: &BTreeMap<String, f64>, harm_only: bool) -> Vec<(f64, &'static str)> {
        let simulated = simulated_calls(features) > 0.0;
        let means = match &self.estimator {
            Estimator::LogisticRegression { means, .. } => Some(means),
            Estimator::RandomForest { .. } => None,
        };
        self.features
            .iter()
            .enumerate()
            .map(|(index, name)| {
                let mean = means.map_or(0.0, |means| means[index]);
                if !simulated && is_simulation_feature(name) {
                    return (mean, IMPUTED_UNSIMULATED);
                }
                let value = features.get(name).copied().filter(|v| v.is_finite());
                if harm_only && is_behaviour_feature(name) && value.is_some_and(|v| v > 0.0) {
                    return (mean, NOT_SCORED_BEHAVIOUR);
                }
                match value {
                    Some(value) => (value, MEASURED),
                    None => (0.0, ABSENT),
                }
            })
            .collect()
    }

    /// The probability of harm: [`ModelFile::probability`] with the
    /// behaviour-change features that saw a change held at their training
    /// mean: identical behaviour on simulated calls is evidence of no
    /// harm; a change is judged by the verdict, not scored as harm.
    pub fn harm_probability(&self, features: &BTreeMap<String, f64>) -> f64 {
        let vector: Vec<f64> = self.vector_with(features, true).into_iter().map(|(v, _)| v).collect();
        self.calibration.probability(self.raw_score(&vector))
    }

    /// The harm probability term by term. A logistic regression's score is
    /// a sum: each feature's term is `coefficient · clip((x − mean) /
    /// scale)` in log-odds, and they add up (with the intercept) to the
    /// score the calibration turns into the probability. A forest's score
    /// does not split into per-feature parts: its terms show the values
    /// read, with no contribution.
    pub fn explain(&self, features: &BTreeMap<String, f64>) -> Explanation {
        let vector = self.vector_with(features, true);
        let values: Vec<f64> = vector.iter().map(|(v, _)| *v).collect();
        let (a, b) = (self.calibration.a, self.calibration.b);
        let logistic = self.logistic_terms(&values);
        let formula = match &self.estimator {
            Estimator::LogisticRegression { clip, .. } => format!(
                "logistic regression: risk = 1 / (1 + exp(−({a:.4} · z + {b:.4}))), z = intercept + Σ terms, \
                 term = coefficient · clip((value − mean) / scale, ±{clip})"
            ),
            Estimator::RandomForest { .. } => format!(
                "random forest: risk = 1 / (1 + exp(−({a:.4} · s + {b:.4}))), s = the trees' mean leaf; \
                 a forest's score does not split into per-feature contributions"
            ),
        };
        let mut terms: Vec<Term> = self
            .features
            .iter()
            .zip(&vector)
            .enumerate()
            .map(|(index, (name, (value, status)))| Term {
                name: name.clone(),
                value: shown_value(features, name, *value, status),
                contribution: logistic.as_ref().map_or(0.0, |(_, terms)| terms[index]),
                status: status.to_string(),
            })
            .collect();
        terms.sort_by(|x, y| y.contribution.abs().total_cmp(&x.contribution.abs()));
        Explanation {
            formula,
            terms,
            intercept: logistic.map(|(intercept, _)| intercept),
            model_risk: Some(self.calibration.probability(self.raw_score(&values))),
            ..Explanation::default()
        }
    }

    /// A logistic regression's intercept and per-feature terms of one
    /// vector (they sum to its raw score); `None` for a forest.
    fn logistic_terms(&self, vector: &[f64]) -> Option<(f64, Vec<f64>)> {
        let Estimator::LogisticRegression {
            means,
            scales,
            clip,
            coefficients,
            intercept,
        } = &self.estimator
        else {
            return None;
        };
        let terms = vector
            .iter()
            .zip(means.iter().zip(scales))
            .zip(coefficients)
            .map(|((x, (mean, scale)), w)| w * ((x - mean) / scale).clamp(-clip, *clip))
            .collect();
        Some((*intercept, terms))
    }

    /// The uncalibrated score of one feature vector.
    pub fn raw_score(&self, vector: &[f64]) -> f64 {
        match &self.estimator {
            Estimator::LogisticRegression { .. } => self
                .logistic_terms(vector)
                .map_or(0.0, |(intercept, terms)| intercept + terms.iter().sum::<f64>()),
            Estimator::RandomForest { forest } => DenseMatrix::from_2d_vec(&vec![vector.to_vec()])
                .ok()
                .and_then(|row| forest.predict(&row).ok())
                .and_then(|scores| scores.first().copied())
                .unwrap_or(0.0),
        }
    }

    /// The calibrated probability that a patch with these features misbehaves.
    pub fn probability(&self, features: &BTreeMap<String, f64>) -> f64 {
        self.calibration.probability(self.raw_score(&self.vector(features)))
    }

    /// One line for people: estimator, features, corpus, date.
    pub fn describe(&self) -> String {
        let kind = match &self.estimator {
            Estimator::LogisticRegression { .. } => "logistic regression",
            Estimator::RandomForest { .. } => "random forest",
        };
        format!(
            "{kind} over {} features, corpus {}, trained {}",
            self.features.len(),
            &self.training.corpus_hash[..self.training.corpus_hash.len().min(12)],
            self.training.trained_at
        )
    }
}

/// How a feature value was taken (an explanation's `status`).
const MEASURED: &str = "measured";
const ABSENT: &str = "absent (0)";
const IMPUTED_UNSIMULATED: &str = "imputed: no simulated call (training mean)";
const NOT_SCORED_BEHAVIOUR: &str = "not scored: behaviour change, judged by the verdict (training mean)";

/// Features that come from the simulation section: unknown (not zero)
/// when the simulation did not run or simulated no call.
pub fn is_simulation_feature(name: &str) -> bool {
    name.starts_with("sim_") || name.starts_with("simulation.")
}

/// The value a term shows: what was read, or for a behaviour feature
/// what was measured (and not scored); none when it was imputed.
fn shown_value(features: &BTreeMap<String, f64>, name: &str, value: f64, status: &str) -> Option<f64> {
    match status {
        MEASURED | ABSENT => Some(value),
        NOT_SCORED_BEHAVIOUR => features.get(name).copied(),
        _ => None,
    }
}

/// Features that measure a change of behaviour, not harm: not scored.
pub fn is_behaviour_feature(name: &str) -> bool {
    let name = name.strip_prefix("sim_rate_").or_else(|| name.strip_prefix("sim_"));
    matches!(
        name,
        Some("divergent_returns" | "fd_write_divergences" | "side_effect_divergences")
    )
}

/// Calls the simulation ran to a result (0 when it did not run, or a
/// capture caught no call: no evidence).
pub fn simulated_calls(features: &BTreeMap<String, f64>) -> f64 {
    features
        .get("sim_calls")
        .copied()
        .filter(|v| v.is_finite())
        .unwrap_or(0.0)
}

/// The learned risk: the calibrated model probability.
#[derive(Debug, Clone)]
pub struct ModelRisk {
    pub model: Arc<ModelFile>,
    /// Where it came from (`(built in)` or a path).
    pub origin: String,
}

impl ModelRisk {
    /// The model compiled in (parsed once per process).
    pub fn embedded() -> Result<ModelRisk, String> {
        static EMBEDDED: OnceLock<Result<Arc<ModelFile>, String>> = OnceLock::new();
        EMBEDDED
            .get_or_init(|| ModelFile::embedded().map(Arc::new).map_err(|e| e.to_string()))
            .clone()
            .map(|model| ModelRisk {
                model,
                origin: "(built in)".to_string(),
            })
    }

    /// The model at `path`.
    pub fn load(path: &Path) -> Result<ModelRisk, ModelError> {
        Ok(ModelRisk {
            model: Arc::new(ModelFile::read(path)?),
            origin: path.display().to_string(),
        })
    }
}

impl RiskScorer for ModelRisk {
    /// The model's probability that the patch misbehaves, raised by the
    /// target's own state: `1 − (1 − p) · Π (1 − w(f))` over the system
    /// context findings, with the interim weights (a degraded or
    /// trending-to-failure target makes any change riskier, and the
    /// corpus cannot teach that: its target is always healthy).
    fn score(&self, findings: &[Finding], features: &BTreeMap<String, f64>) -> f64 {
        let patch = self.model.harm_probability(features).clamp(0.0, 1.0);
        let context_safe: f64 = findings
            .iter()
            .filter(|f| f.source == crate::finding::Source::Context)
            .map(|f| 1.0 - crate::InterimRisk::weight(f))
            .product();
        (1.0 - (1.0 - patch) * context_safe).clamp(0.0, 1.0)
    }

    fn describe(&self) -> String {
        format!("risk model {}: {}", self.origin, self.model.describe())
    }

    fn explain(&self, findings: &[Finding], features: &BTreeMap<String, f64>) -> Explanation {
        let mut explanation = self.model.explain(features);
        explanation.context = findings
            .iter()
            .filter(|f| f.source == crate::finding::Source::Context)
            .map(|f| Term {
                name: f.code.clone(),
                value: None,
                contribution: crate::InterimRisk::weight(f),
                status: "context finding: risk = 1 − (1 − model) · Π (1 − weight)".into(),
            })
            .collect();
        explanation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(n, v)| (n.to_string(), *v)).collect()
    }

    #[test]
    fn the_explanation_adds_up_to_the_risk_it_explains() {
        let model = ModelFile::embedded().unwrap();
        let measured = features(&[
            ("sim_calls", 4.0),
            ("sim_rate_crashes", 0.25),
            ("static.bytes_changed", 180.0),
            ("static.added-loop", 1.0),
        ]);
        let explanation = model.explain(&measured);
        let z = explanation.intercept.unwrap() + explanation.terms.iter().map(|t| t.contribution).sum::<f64>();
        let risk = model.calibration.probability(z);
        assert!((risk - model.harm_probability(&measured)).abs() < 1e-12);
        assert_eq!(explanation.model_risk, Some(risk));
        assert_eq!(explanation.terms.len(), model.features.len());
        // Largest first.
        assert!(explanation.terms[0].contribution.abs() >= explanation.terms[1].contribution.abs());
    }

    #[test]
    fn behaviour_changes_are_not_scored_as_harm_and_no_call_is_no_evidence() {
        let model = ModelFile::embedded().unwrap();
        let same = features(&[("sim_calls", 3.0), ("sim_captured_calls", 3.0)]);
        let changed = features(&[("sim_calls", 3.0), ("sim_rate_divergent_returns", 1.0)]);
        // As trained, a divergent return is "harm"; the engine's harm score
        // holds it at the training mean (identical returns still reassure).
        assert!(model.probability(&changed) > model.probability(&same) + 0.1);
        let index = model
            .features
            .iter()
            .position(|n| n == "sim_rate_divergent_returns")
            .unwrap();
        let Estimator::LogisticRegression { means, .. } = &model.estimator else {
            panic!("the shipped model is a logistic regression")
        };
        let at_mean = features(&[("sim_calls", 3.0), ("sim_rate_divergent_returns", means[index])]);
        assert!((model.harm_probability(&changed) - model.probability(&at_mean)).abs() < 1e-12);
        assert!(model.harm_probability(&same) < model.harm_probability(&changed));
        let term = model
            .explain(&changed)
            .terms
            .into_iter()
            .find(|t| t.name == "sim_rate_divergent_returns")
            .unwrap();
        assert_eq!((term.value, term.contribution), (Some(1.0), 0.0));
        assert!(term.status.starts_with("not scored"), "{}", term.status);
        // A simulation that ran no call is the same as none at all.
        let none = features(&[("static.bytes_changed", 40.0)]);
        let mut zero = none.clone();
        zero.extend(features(&[
            ("sim_calls", 0.0),
            ("sim_rate_crashes", 0.0),
            ("sim_rate_hangs", 0.0),
        ]));
        assert_eq!(model.harm_probability(&zero), model.harm_probability(&none));
        assert_eq!(model.probability(&zero), model.probability(&none));
    }
}
