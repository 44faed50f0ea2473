//! Fitting: the candidate estimators, their grouped cross-validation on
//! the training split, the choice among them, and Platt calibration of the
//! chosen one's out-of-fold scores.

use super::evaluate::{auc, brier};
use super::features::matrix;
use super::{TrainError, TrainOptions};
use crate::corpus::dataset::Sample;
use crate::corpus::variants::seeded;
use shadowpatch_predict::model::{Calibration, CandidateScore, Estimator, Forest, ModelFile, TrainingMetadata};
use smartcore::ensemble::random_forest_regressor::RandomForestRegressorParameters;
use smartcore::linalg::basic::arrays::Array;
use smartcore::linalg::basic::matrix::DenseMatrix;
use smartcore::linear::logistic_regression::{LogisticRegression, LogisticRegressionParameters};
use std::collections::{BTreeMap, BTreeSet};

/// Standardised values beyond ±CLIP are clipped (logistic regression).
const CLIP: f64 = 5.0;

/// A model family and its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Candidate {
    Logistic { alpha: f64 },
    Forest { trees: usize, depth: u16, leaf: usize },
}

impl Candidate {
    pub fn name(&self) -> String {
        match self {
            Candidate::Logistic { alpha } => format!("logistic regression (L2 alpha {alpha})"),
            Candidate::Forest { trees, depth, leaf } => {
                format!("random forest ({trees} trees, depth {depth}, leaf {leaf})")
            }
        }
    }

    fn is_logistic(&self) -> bool {
        matches!(self, Candidate::Logistic { .. })
    }
}

/// The candidates compared by cross-validation.
pub const CANDIDATES: &[Candidate] = &[
    Candidate::Logistic { alpha: 0.3 },
    Candidate::Logistic { alpha: 3.0 },
    Candidate::Logistic { alpha: 30.0 },
    Candidate::Forest {
        trees: 60,
        depth: 6,
        leaf: 2,
    },
    Candidate::Forest {
        trees: 60,
        depth: 3,
        leaf: 4,
    },
];

fn fit_failed(candidate: &str, error: impl std::fmt::Display) -> TrainError {
    TrainError::Fit {
        candidate: candidate.to_string(),
        message: error.to_string(),
    }
}

/// Fit one candidate on rows `x` with labels `y` (true: harmful).
pub fn fit(candidate: Candidate, x: &[Vec<f64>], y: &[bool], seed: u64) -> Result<Estimator, TrainError> {
    let name = candidate.name();
    if !y.iter().any(|l| *l) || y.iter().all(|l| *l) {
        return Err(fit_failed(&name, "needs both labels"));
    }
    let width = x.first().map(Vec::len).unwrap_or(0);
    match candidate {
        Candidate::Logistic { alpha } => {
            let count = x.len() as f64;
            let means: Vec<f64> = (0..width)
                .map(|j| x.iter().map(|r| r[j]).sum::<f64>() / count)
                .collect();
            let scales: Vec<f64> = (0..width)
                .map(|j| {
                    let variance = x.iter().map(|r| (r[j] - means[j]).powi(2)).sum::<f64>() / count;
                    if variance > 1e-12 {
                        variance.sqrt()
                    } else {
                        1.0
                    }
                })
                .collect();
            let standardised: Vec<Vec<f64>> = x
                .iter()
                .map(|r| {
                    (0..width)
                        .map(|j| ((r[j] - means[j]) / scales[j]).clamp(-CLIP, CLIP))
                        .collect()
                })
                .collect();
            let (coefficients, intercept) = logistic(&standardised, y, alpha).map_err(|e| fit_failed(&name, e))?;
            Ok(Estimator::LogisticRegression {
                means,
                scales,
                clip: CLIP,
                coefficients,
                intercept,
            })
        }
        Candidate::Forest { trees, depth, leaf } => {
            let rows = DenseMatrix::from_2d_vec(&x.to_vec()).map_err(|e| fit_failed(&name, e))?;
            let targets: Vec<f64> = y.iter().map(|l| if *l { 1.0 } else { 0.0 }).collect();
            let parameters = RandomForestRegressorParameters::default()
                .with_n_trees(trees)
                .with_max_depth(depth)
                .with_min_samples_leaf(leaf)
                .with_seed(seed);
            let forest = Forest::fit(&rows, &targets, parameters).map_err(|e| fit_failed(&name, e))?;
            Ok(Estimator::RandomForest {
                forest: std::sync::Arc::new(forest),
            })
        }
    }
}

/// smartcore's logistic regression: coefficients and intercept of the
/// harmful class's log-odds.
fn logistic(x: &[Vec<f64>], y: &[bool], alpha: f64) -> Result<(Vec<f64>, f64), String> {
    let rows = DenseMatrix::from_2d_vec(&x.to_vec()).map_err(|e| e.to_string())?;
    let labels: Vec<i32> = y.iter().map(|l| i32::from(*l)).collect();
    let parameters = LogisticRegressionParameters::default().with_alpha(alpha);
    let fitted = LogisticRegression::fit(&rows, &labels, parameters).map_err(|e| e.to_string())?;
    let width = x.first().map(Vec::len).unwrap_or(0);
    let coefficients: Vec<f64> = (0..width).map(|j| *fitted.coefficients().get((0, j))).collect();
    let intercept = *fitted.intercept().get((0, 0));
    if fitted.classes() != &vec![0, 1] {
        return Err(format!("unexpected classes {:?}", fitted.classes()));
    }
    if !coefficients.iter().chain([&intercept]).all(|v| v.is_finite()) {
        return Err("the fit diverged".into());
    }
    Ok((coefficients, intercept))
}

fn raw_scores(estimator: &Estimator, features: &[String], x: &[Vec<f64>]) -> Vec<f64> {
    let model = ModelFile {
        format: shadowpatch_predict::model::MODEL_FORMAT.to_string(),
        format_version: shadowpatch_predict::model::MODEL_FORMAT_VERSION,
        features: features.to_vec(),
        estimator: estimator.clone(),
        calibration: Calibration::platt(1.0, 0.0),
        training: empty_metadata(),
    };
    x.iter().map(|row| model.raw_score(row)).collect()
}

pub(crate) fn empty_metadata() -> TrainingMetadata {
    TrainingMetadata {
        trained_at: String::new(),
        corpus_hash: String::new(),
        seed: 0,
        samples: BTreeMap::new(),
        test_functions: Vec::new(),
        selection: Vec::new(),
        chosen_because: String::new(),
        sections: Vec::new(),
        compiler: String::new(),
        evaluation: serde_json::Value::Null,
    }
}

/// Platt scaling: a one-feature logistic regression (smartcore, a light
/// L2 penalty so separable scores stay finite) of the label on the score.
pub fn platt(scores: &[f64], y: &[bool]) -> Result<Calibration, TrainError> {
    let rows: Vec<Vec<f64>> = scores.iter().map(|s| vec![*s]).collect();
    let (coefficients, intercept) = logistic(&rows, y, 0.01).map_err(|e| fit_failed("platt calibration", e))?;
    Ok(Calibration::platt(coefficients[0], intercept))
}

/// Out-of-fold raw scores of `candidate` over `samples`, folds by group.
fn out_of_fold(candidate: Candidate, samples: &[Sample], features: &[String], folds: usize, seed: u64) -> Vec<f64> {
    let mut groups: Vec<&str> = samples
        .iter()
        .map(|s| s.group.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    groups.sort_by_key(|g| seeded(seed ^ 0x5eed, g));
    let folds = folds.min(groups.len()).max(2);
    let fold_of: BTreeMap<&str, usize> = groups.iter().enumerate().map(|(i, g)| (*g, i % folds)).collect();
    let x = matrix(samples, features);
    let y: Vec<bool> = samples.iter().map(|s| s.harmful).collect();
    let mut scores = vec![f64::NAN; samples.len()];
    for fold in 0..folds {
        let (inside, outside): (Vec<usize>, Vec<usize>) =
            (0..samples.len()).partition(|i| fold_of[samples[*i].group.as_str()] == fold);
        let train_x: Vec<Vec<f64>> = outside.iter().map(|i| x[*i].clone()).collect();
        let train_y: Vec<bool> = outside.iter().map(|i| y[*i]).collect();
        let fold_scores = match fit(candidate, &train_x, &train_y, seed) {
            Ok(estimator) => {
                let rows: Vec<Vec<f64>> = inside.iter().map(|i| x[*i].clone()).collect();
                raw_scores(&estimator, features, &rows)
            }
            // A fold without both labels: no information, a neutral score.
            Err(_) => vec![0.0; inside.len()],
        };
        for (i, score) in inside.iter().zip(fold_scores) {
            scores[*i] = score;
        }
    }
    scores
}

/// A fitted and calibrated model over `features`, and its selection.
#[derive(Debug, Clone)]
pub struct Fitted {
    pub features: Vec<String>,
    pub estimator: Estimator,
    pub calibration: Calibration,
    pub selection: Vec<CandidateScore>,
    pub chosen: Candidate,
    pub chosen_because: String,
}

impl Fitted {
    pub fn model(&self, training: TrainingMetadata) -> ModelFile {
        ModelFile {
            format: shadowpatch_predict::model::MODEL_FORMAT.to_string(),
            format_version: shadowpatch_predict::model::MODEL_FORMAT_VERSION,
            features: self.features.clone(),
            estimator: self.estimator.clone(),
            calibration: self.calibration.clone(),
            training,
        }
    }
}

/// Choose among `candidates` by grouped cross-validated AUC on `train`
/// (a logistic regression within 0.005 of the best wins: smaller, and
/// monotone outside the training range), calibrate on its out-of-fold
/// scores, and fit it on the whole training split.
pub fn select_and_fit(
    train: &[Sample],
    features: Vec<String>,
    candidates: &[Candidate],
    options: &TrainOptions,
) -> Result<Fitted, TrainError> {
    if train.is_empty() {
        return Err(TrainError::NoSamples);
    }
    let y: Vec<bool> = train.iter().map(|s| s.harmful).collect();
    if !y.iter().any(|h| *h) {
        return Err(TrainError::OneClass {
            split: "training",
            label: "benign",
        });
    }
    if y.iter().all(|h| *h) {
        return Err(TrainError::OneClass {
            split: "training",
            label: "harmful",
        });
    }
    let mut scored = Vec::new();
    for candidate in candidates {
        let scores = out_of_fold(*candidate, train, &features, options.folds, options.seed);
        let cv_auc = auc(&scores, &y).unwrap_or(0.5);
        // Brier of the out-of-fold scores once Platt-calibrated on themselves.
        let cv_brier = platt(&scores, &y)
            .map(|c| brier(&scores.iter().map(|s| c.probability(*s)).collect::<Vec<_>>(), &y))
            .unwrap_or(1.0);
        scored.push((*candidate, scores, cv_auc, cv_brier));
    }
    let best_auc = scored.iter().map(|s| s.2).fold(f64::MIN, f64::max);
    let best_logistic = scored
        .iter()
        .filter(|s| s.0.is_logistic() && s.2 >= best_auc - 0.005)
        .max_by(|a, b| a.2.total_cmp(&b.2).then(b.3.total_cmp(&a.3)));
    let best_any = scored
        .iter()
        .max_by(|a, b| a.2.total_cmp(&b.2).then(b.3.total_cmp(&a.3)))
        .expect("at least one candidate");
    let chosen = best_logistic.unwrap_or(best_any);
    let chosen_because = if chosen.0.is_logistic() && !best_any.0.is_logistic() {
        format!(
            "{} has the best cross-validated AUC among logistic regressions ({:.3}), within 0.005 of the best overall ({} at {:.3}); a linear model is preferred at equal accuracy",
            chosen.0.name(),
            chosen.2,
            best_any.0.name(),
            best_any.2
        )
    } else {
        format!(
            "{} has the best cross-validated AUC ({:.3}) over {} folds grouped by function",
            chosen.0.name(),
            chosen.2,
            options.folds
        )
    };
    let calibration = platt(&chosen.1, &y)?;
    let x = matrix(train, &features);
    let estimator = fit(chosen.0, &x, &y, options.seed)?;
    Ok(Fitted {
        selection: scored
            .iter()
            .map(|(candidate, _, cv_auc, cv_brier)| CandidateScore {
                name: candidate.name(),
                cv_auc: *cv_auc,
                cv_brier: *cv_brier,
            })
            .collect(),
        chosen: chosen.0,
        chosen_because,
        features,
        estimator,
        calibration,
    })
}
