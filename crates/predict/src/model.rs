//! The learned risk model: its versioned file format, loading (the model
//! shipped in the repository is compiled in; a path overrides it) and the
//! [`ModelRisk`] scorer the engine uses by default.
//!
//! The model reads `Analysis.features` by name, in the order the file
//! lists them; a feature the analysis did not produce counts as 0 (a
//! source that did not run contributes nothing), and one the file does not
//! list is ignored, so new sources of features (simulation) change
//! nothing until the model is trained again with them.

use crate::engine::RiskScorer;
use crate::finding::Finding;
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
        let simulated = features.contains_key("sim_calls");
        let means = match &self.estimator {
            Estimator::LogisticRegression { means, .. } => Some(means),
            Estimator::RandomForest { .. } => None,
        };
        self.features
            .iter()
            .enumerate()
            .map(
                |(index, name)| match features.get(name).copied().filter(|v| v.is_finite()) {
                    Some(value) => value,
                    None if !simulated && is_simulation_feature(name) => means.map_or(0.0, |means| means[index]),
                    None => 0.0,
                },
            )
            .collect()
    }

    /// The uncalibrated score of one feature vector.
    pub fn raw_score(&self, vector: &[f64]) -> f64 {
        match &self.estimator {
            Estimator::LogisticRegression {
                means,
                scales,
                clip,
                coefficients,
                intercept,
            } => {
                intercept
                    + vector
                        .iter()
                        .zip(means.iter().zip(scales))
                        .zip(coefficients)
                        .map(|((x, (mean, scale)), w)| w * ((x - mean) / scale).clamp(-clip, *clip))
                        .sum::<f64>()
            }
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

/// Features that come from the simulation section: unknown (not zero)
/// when the simulation did not run.
pub fn is_simulation_feature(name: &str) -> bool {
    name.starts_with("sim_") || name.starts_with("simulation.")
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
        let patch = self.model.probability(features).clamp(0.0, 1.0);
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
}
