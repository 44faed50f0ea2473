//! Training and evaluating the risk model: the split by function (variants
//! of one function never straddle train and test), the candidates
//! (logistic regression and a random forest from `smartcore`) compared by
//! cross-validation grouped by function on the training split, Platt
//! calibration fitted on the out-of-fold scores, and the evaluation on the
//! held-out split of (a) the full engine, (b) static analysis alone and
//! (c) a size-only baseline.

use crate::corpus::dataset::{is_simulation_feature, Sample};
use crate::corpus::variants::seeded;
use crate::finding::VerdictPolicy;
use crate::model::{Calibration, CandidateScore, Estimator, Forest, ModelFile, TrainingMetadata};
use serde::{Deserialize, Serialize};
use smartcore::ensemble::random_forest_regressor::RandomForestRegressorParameters;
use smartcore::linalg::basic::arrays::Array;
use smartcore::linalg::basic::matrix::DenseMatrix;
use smartcore::linear::logistic_regression::{LogisticRegression, LogisticRegressionParameters};
use std::collections::{BTreeMap, BTreeSet};

/// The split and cross-validation seed unless told otherwise.
pub const DEFAULT_SEED: u64 = 20_261_126;
/// The size-only baseline's one feature.
pub const SIZE_FEATURE: &str = "static.bytes_changed";
/// Features that describe the target's size, not the patch's risk: a
/// model would learn the corpus target's RSS, not anything that carries
/// over to another service. Left out of every model.
pub const EXCLUDED_FEATURES: &[&str] = &[
    "context.rss_bytes",
    "context.ram_total_bytes",
    "context.fd_count",
    "context.window_s",
    "context.metrics_series",
    "context.metrics_error_total",
    "static.module_functions",
];
/// Families of features the model reads. Not `context.`: the corpus target
/// is always healthy, so weights learned for the target's health would be
/// noise; a degraded target raises the risk through its context findings
/// instead ([`crate::model::ModelRisk`]). Not `analysis.`: those counts mix
/// every source, context included, for the same reason.
/// Of the simulation, only the rates per call (`sim_rate_*`): the corpus
/// always captures 8 calls, so raw counts would teach the model the
/// corpus's call count (fewer calls there means failures stopped it early).
const FEATURE_PREFIXES: &[&str] = &["static.", "sim_rate_", "history."];
/// Feature families that measure the machine, not the patch (the live
/// pause of a capture depends on the load of the moment).
/// Nor `sim_rate_memory_pages_differing`: which pages differ after a call
/// depends on the program's stack and heap layout (1 page per call for a
/// trivially correct patch of another fixture), so its corpus weight does
/// not carry over; leaks are seen by static analysis's allocation checks.
const EXCLUDED_PREFIXES: &[&str] = &["sim_live_pause_", "sim_rate_memory_pages_differing"];
/// Standardised values beyond ±CLIP are clipped (logistic regression).
const CLIP: f64 = 5.0;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("no samples to train on")]
    NoSamples,
    #[error("the {split} split has only {label} samples: both labels are needed")]
    OneClass { split: &'static str, label: &'static str },
    #[error("fitting {candidate}: {message}")]
    Fit { candidate: String, message: String },
}

/// How to train.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub seed: u64,
    /// Share of corpus samples (by whole functions) held out for the test.
    pub test_fraction: f64,
    /// Folds of the grouped cross-validation.
    pub folds: usize,
    pub policy: VerdictPolicy,
}

impl Default for TrainOptions {
    fn default() -> Self {
        TrainOptions {
            seed: DEFAULT_SEED,
            test_fraction: 0.3,
            folds: 5,
            policy: VerdictPolicy::default(),
        }
    }
}

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

/// The samples split by group.
#[derive(Debug, Clone)]
pub struct Split {
    pub train: Vec<Sample>,
    pub test: Vec<Sample>,
    pub test_groups: Vec<String>,
}

/// Hold out whole functions (in a seeded order) until `fraction` of the
/// corpus samples are in the test split. History samples always train.
pub fn split(corpus: &[Sample], history: &[Sample], seed: u64, fraction: f64) -> Split {
    let mut groups: Vec<&str> = corpus
        .iter()
        .map(|s| s.group.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    groups.sort_by_key(|g| seeded(seed, g));
    let wanted = (corpus.len() as f64 * fraction).round() as usize;
    let mut test_groups = BTreeSet::new();
    let mut held = 0;
    for group in groups {
        if held >= wanted {
            break;
        }
        held += corpus.iter().filter(|s| s.group == group).count();
        test_groups.insert(group.to_string());
    }
    split_by_groups(corpus, history, &test_groups.into_iter().collect::<Vec<_>>())
}

/// Split with the given test groups (as a model file records them).
pub fn split_by_groups(corpus: &[Sample], history: &[Sample], test_groups: &[String]) -> Split {
    let (test, mut train): (Vec<Sample>, Vec<Sample>) =
        corpus.iter().cloned().partition(|s| test_groups.contains(&s.group));
    train.extend(history.iter().cloned());
    Split {
        train,
        test,
        test_groups: test_groups.to_vec(),
    }
}

/// The features a model reads: known families, not excluded, and not
/// constant over `samples` (a constant carries no information), sorted.
pub fn select_features(samples: &[Sample], keep: &dyn Fn(&str) -> bool) -> Vec<String> {
    let names: BTreeSet<&String> = samples.iter().flat_map(|s| s.features.keys()).collect();
    names
        .into_iter()
        .filter(|name| FEATURE_PREFIXES.iter().any(|p| name.starts_with(p)))
        .filter(|name| !EXCLUDED_FEATURES.contains(&name.as_str()))
        .filter(|name| !EXCLUDED_PREFIXES.iter().any(|p| name.starts_with(p)))
        .filter(|name| keep(name))
        .filter(|name| {
            let values: Vec<f64> = samples.iter().map(|s| value(s, name)).collect();
            values.iter().any(|v| *v != values[0])
        })
        .cloned()
        .collect()
}

fn value(sample: &Sample, name: &str) -> f64 {
    sample
        .features
        .get(name)
        .copied()
        .filter(|v| v.is_finite())
        .unwrap_or(0.0)
}

fn matrix(samples: &[Sample], features: &[String]) -> Vec<Vec<f64>> {
    samples
        .iter()
        .map(|s| features.iter().map(|f| value(s, f)).collect())
        .collect()
}

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
        format: crate::model::MODEL_FORMAT.to_string(),
        format_version: crate::model::MODEL_FORMAT_VERSION,
        features: features.to_vec(),
        estimator: estimator.clone(),
        calibration: Calibration::platt(1.0, 0.0),
        training: empty_metadata(),
    };
    x.iter().map(|row| model.raw_score(row)).collect()
}

fn empty_metadata() -> TrainingMetadata {
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

/// ROC AUC (smartcore's, ties averaged); `None` without both labels.
pub fn auc(scores: &[f64], harmful: &[bool]) -> Option<f64> {
    if !harmful.iter().any(|h| *h) || harmful.iter().all(|h| *h) {
        return None;
    }
    let truth: Vec<f64> = harmful.iter().map(|h| if *h { 1.0 } else { 0.0 }).collect();
    Some(smartcore::metrics::roc_auc_score(&truth, &scores.to_vec()))
}

fn brier(probabilities: &[f64], harmful: &[bool]) -> f64 {
    if probabilities.is_empty() {
        return 0.0;
    }
    probabilities
        .iter()
        .zip(harmful)
        .map(|(p, h)| (p - if *h { 1.0 } else { 0.0 }).powi(2))
        .sum::<f64>()
        / probabilities.len() as f64
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
            format: crate::model::MODEL_FORMAT.to_string(),
            format_version: crate::model::MODEL_FORMAT_VERSION,
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

/// One system's results on the test split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemMetrics {
    pub name: String,
    pub auc: Option<f64>,
    /// Of the refused patches, the harmful share.
    pub precision: Option<f64>,
    /// Of the harmful patches, the refused share.
    pub recall: Option<f64>,
    /// Of the benign patches, the refused share.
    pub false_refusal_rate: Option<f64>,
    pub refused_harmful: usize,
    pub harmful: usize,
    pub refused_benign: usize,
    pub benign: usize,
    pub brier: f64,
}

/// One bin of the reliability table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibrationBin {
    pub from: f64,
    pub to: f64,
    pub count: usize,
    pub mean_risk: f64,
    pub harmful_fraction: f64,
}

/// Refusal of the harmful patches the simulation saw crash or hang.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimulationCheck {
    /// False when no test sample has simulation results.
    pub available: bool,
    pub crashed_or_hung: usize,
    pub refused: usize,
}

/// Per variant kind on the test split: how many, harmful, refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KindRow {
    pub kind: String,
    pub samples: usize,
    pub harmful: usize,
    pub refused: usize,
}

/// The evaluation on the held-out split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub train_samples: usize,
    pub test_samples: usize,
    pub test_benign: usize,
    pub test_harmful: usize,
    pub refuse_at: f64,
    pub systems: Vec<SystemMetrics>,
    /// Reliability of the full engine's risk on the test split.
    pub calibration: Vec<CalibrationBin>,
    pub simulation: SimulationCheck,
    pub by_kind: Vec<KindRow>,
}

fn system(name: &str, test: &[Sample], scores: &[f64], risks: &[f64], refused: &[bool]) -> SystemMetrics {
    let harmful: Vec<bool> = test.iter().map(|s| s.harmful).collect();
    let count = |label: bool, refused_too: bool| {
        harmful
            .iter()
            .zip(refused)
            .filter(|(h, r)| **h == label && (!refused_too || **r))
            .count()
    };
    let (refused_harmful, all_harmful) = (count(true, true), count(true, false));
    let (refused_benign, all_benign) = (count(false, true), count(false, false));
    let ratio = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);
    SystemMetrics {
        name: name.to_string(),
        auc: auc(scores, &harmful),
        precision: ratio(refused_harmful, refused_harmful + refused_benign),
        recall: ratio(refused_harmful, all_harmful),
        false_refusal_rate: ratio(refused_benign, all_benign),
        refused_harmful,
        harmful: all_harmful,
        refused_benign,
        benign: all_benign,
        brier: brier(risks, &harmful),
    }
}

/// How a model's verdict sees one sample: (ranking score, risk, refused).
/// A blocking finding refuses whatever the risk, and ranks above every
/// risk-only score.
fn verdict_view(model: &ModelFile, sample: &Sample, blocking: bool, refuse_at: f64) -> (f64, f64, bool) {
    let risk = model.probability(&sample.features);
    let refused = blocking || risk >= refuse_at;
    (if blocking { 1.0 + risk } else { risk }, risk, refused)
}

/// The three systems trained on `train` and judged on `test`: `full` is
/// the model under evaluation (trained here or read from a file); the
/// static-only and size-only baselines are fitted here the same way.
pub fn evaluate(
    full: &ModelFile,
    train: &[Sample],
    test: &[Sample],
    options: &TrainOptions,
) -> Result<Evaluation, TrainError> {
    let refuse_at = options.policy.refuse_at;
    let harmful: Vec<bool> = test.iter().map(|s| s.harmful).collect();
    let mut systems = Vec::new();

    let views: Vec<(f64, f64, bool)> = test
        .iter()
        .map(|s| verdict_view(full, s, s.blocking, refuse_at))
        .collect();
    let (full_scores, full_risks, full_refused): (Vec<f64>, Vec<f64>, Vec<bool>) = unzip3(&views);
    systems.push(system("full engine", test, &full_scores, &full_risks, &full_refused));

    let static_features = select_features(train, &|name| name.starts_with("static."));
    let static_model = select_and_fit(train, static_features, CANDIDATES, options)?.model(empty_metadata());
    let views: Vec<(f64, f64, bool)> = test
        .iter()
        .map(|s| verdict_view(&static_model, s, s.static_blocking, refuse_at))
        .collect();
    let (scores, risks, refused) = unzip3(&views);
    systems.push(system("static analysis only", test, &scores, &risks, &refused));

    let size_model = select_and_fit(
        train,
        vec![SIZE_FEATURE.to_string()],
        &[Candidate::Logistic { alpha: 0.3 }],
        options,
    )?
    .model(empty_metadata());
    let size_scores: Vec<f64> = test.iter().map(|s| value(s, SIZE_FEATURE)).collect();
    let size_risks: Vec<f64> = test.iter().map(|s| size_model.probability(&s.features)).collect();
    let size_refused: Vec<bool> = size_risks.iter().map(|r| *r >= refuse_at).collect();
    systems.push(system(
        "size only (bytes changed)",
        test,
        &size_scores,
        &size_risks,
        &size_refused,
    ));

    let mut calibration = Vec::new();
    for bin in 0..5 {
        let (from, to) = (bin as f64 / 5.0, (bin + 1) as f64 / 5.0);
        let inside: Vec<usize> = (0..test.len())
            .filter(|i| full_risks[*i] >= from && (full_risks[*i] < to || (bin == 4 && full_risks[*i] <= 1.0)))
            .collect();
        let count = inside.len();
        calibration.push(CalibrationBin {
            from,
            to,
            count,
            mean_risk: if count > 0 {
                inside.iter().map(|i| full_risks[*i]).sum::<f64>() / count as f64
            } else {
                0.0
            },
            harmful_fraction: if count > 0 {
                inside.iter().filter(|i| harmful[**i]).count() as f64 / count as f64
            } else {
                0.0
            },
        });
    }

    let simulated: Vec<usize> = (0..test.len())
        .filter(|i| test[*i].simulation_failed.is_some())
        .collect();
    let crashed: Vec<usize> = simulated
        .iter()
        .copied()
        .filter(|i| test[*i].harmful && test[*i].simulation_failed == Some(true))
        .collect();
    let simulation = SimulationCheck {
        available: !simulated.is_empty() || test.iter().any(|s| s.features.keys().any(|k| is_simulation_feature(k))),
        crashed_or_hung: crashed.len(),
        refused: crashed.iter().filter(|i| full_refused[**i]).count(),
    };

    let mut by_kind: BTreeMap<&str, KindRow> = BTreeMap::new();
    for (i, sample) in test.iter().enumerate() {
        let row = by_kind.entry(sample.kind.as_str()).or_insert_with(|| KindRow {
            kind: sample.kind.clone(),
            samples: 0,
            harmful: 0,
            refused: 0,
        });
        row.samples += 1;
        row.harmful += usize::from(sample.harmful);
        row.refused += usize::from(full_refused[i]);
    }

    Ok(Evaluation {
        train_samples: train.len(),
        test_samples: test.len(),
        test_benign: harmful.iter().filter(|h| !**h).count(),
        test_harmful: harmful.iter().filter(|h| **h).count(),
        refuse_at,
        systems,
        calibration,
        simulation,
        by_kind: by_kind.into_values().collect(),
    })
}

fn unzip3(views: &[(f64, f64, bool)]) -> (Vec<f64>, Vec<f64>, Vec<bool>) {
    (
        views.iter().map(|v| v.0).collect(),
        views.iter().map(|v| v.1).collect(),
        views.iter().map(|v| v.2).collect(),
    )
}

/// A trained model and its evaluation.
#[derive(Debug, Clone)]
pub struct Trained {
    pub model: ModelFile,
    pub evaluation: Evaluation,
    pub split: Split,
}

/// Everything `predictor train` does after the features are extracted:
/// split, select, calibrate, fit, evaluate, and the model file.
pub fn train(
    corpus: &[Sample],
    history: &[Sample],
    corpus_hash: &str,
    sections: Vec<String>,
    options: &TrainOptions,
) -> Result<Trained, TrainError> {
    let split = split(corpus, history, options.seed, options.test_fraction);
    for (name, part) in [("train", &split.train), ("test", &split.test)] {
        if !part.iter().any(|s| s.harmful) {
            return Err(TrainError::OneClass {
                split: name,
                label: "benign",
            });
        }
        if part.iter().all(|s| s.harmful) {
            return Err(TrainError::OneClass {
                split: name,
                label: "harmful",
            });
        }
    }
    let features = select_features(&split.train, &|_| true);
    let fitted = select_and_fit(&split.train, features, CANDIDATES, options)?;
    let mut samples = BTreeMap::new();
    samples.insert("train".to_string(), split.train.len() - history.len());
    samples.insert("test".to_string(), split.test.len());
    samples.insert("history".to_string(), history.len());
    samples.insert(
        "harmful".to_string(),
        corpus.iter().chain(history).filter(|s| s.harmful).count(),
    );
    samples.insert(
        "benign".to_string(),
        corpus.iter().chain(history).filter(|s| !s.harmful).count(),
    );
    let metadata = TrainingMetadata {
        trained_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        corpus_hash: corpus_hash.to_string(),
        seed: options.seed,
        samples,
        test_functions: split.test_groups.clone(),
        selection: fitted.selection.clone(),
        chosen_because: fitted.chosen_because.clone(),
        sections,
        compiler: shadowpatch_fixtures::compiler_version(),
        evaluation: serde_json::Value::Null,
    };
    let mut model = fitted.model(metadata);
    let evaluation = evaluate(&model, &split.train, &split.test, options)?;
    model.training.evaluation = serde_json::to_value(&evaluation).expect("evaluation serializes");
    Ok(Trained {
        model,
        evaluation,
        split,
    })
}
