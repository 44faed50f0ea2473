//! Evaluation on the held-out split: the model under evaluation against a
//! static-only and a size-only baseline fitted the same way, with ranking
//! (AUC), refusals (precision, recall, false refusals), calibration
//! (Brier, reliability bins), the simulation's crashes and hangs, and a
//! table per variant kind.

use super::features::{select_features, value, SIZE_FEATURE};
use super::fit::{empty_metadata, select_and_fit, Candidate, CANDIDATES};
use super::{TrainError, TrainOptions};
use crate::corpus::dataset::{is_simulation_feature, Sample};
use serde::{Deserialize, Serialize};
use shadowpatch_predict::model::ModelFile;
use std::collections::BTreeMap;

/// ROC AUC (smartcore's, ties averaged); `None` without both labels.
pub fn auc(scores: &[f64], harmful: &[bool]) -> Option<f64> {
    if !harmful.iter().any(|h| *h) || harmful.iter().all(|h| *h) {
        return None;
    }
    let truth: Vec<f64> = harmful.iter().map(|h| if *h { 1.0 } else { 0.0 }).collect();
    Some(smartcore::metrics::roc_auc_score(&truth, &scores.to_vec()))
}

pub(crate) fn brier(probabilities: &[f64], harmful: &[bool]) -> f64 {
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

    let calibration = calibration_bins(&full_risks, &harmful);

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

/// The reliability table: five bins of risk, each with its count, mean
/// risk and harmful fraction.
pub fn calibration_bins(risks: &[f64], harmful: &[bool]) -> Vec<CalibrationBin> {
    (0..5)
        .map(|bin| {
            let (from, to) = (bin as f64 / 5.0, (bin + 1) as f64 / 5.0);
            let inside: Vec<usize> = (0..risks.len())
                .filter(|i| risks[*i] >= from && (risks[*i] < to || (bin == 4 && risks[*i] <= 1.0)))
                .collect();
            let count = inside.len();
            let mean = |f: &dyn Fn(usize) -> f64| {
                if count == 0 {
                    0.0
                } else {
                    inside.iter().map(|i| f(*i)).sum::<f64>() / count as f64
                }
            };
            CalibrationBin {
                from,
                to,
                count,
                mean_risk: mean(&|i| risks[i]),
                harmful_fraction: mean(&|i| f64::from(u8::from(harmful[i]))),
            }
        })
        .collect()
}

fn unzip3(views: &[(f64, f64, bool)]) -> (Vec<f64>, Vec<f64>, Vec<bool>) {
    (
        views.iter().map(|v| v.0).collect(),
        views.iter().map(|v| v.1).collect(),
        views.iter().map(|v| v.2).collect(),
    )
}
