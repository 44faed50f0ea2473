//! Training and evaluating the risk model: the split by function (variants
//! of one function never straddle train and test, `split`), the features
//! a model may read (`features`), the candidates (logistic regression and a
//! random forest from `smartcore`) compared by cross-validation grouped by
//! function on the training split with Platt calibration fitted on the
//! out-of-fold scores (`fit`), and the evaluation on the held-out split of
//! (a) the full engine, (b) static analysis alone and (c) a size-only
//! baseline (`evaluate`). This file ties them into [`train`].

pub mod evaluate;
pub mod features;
pub mod fit;
pub mod lopo;
pub mod split;

pub use evaluate::{auc, evaluate, CalibrationBin, Evaluation, KindRow, SimulationCheck, SystemMetrics};
pub use features::{select_features, EXCLUDED_FEATURES, SIZE_FEATURE};
pub use fit::{fit, platt, select_and_fit, Candidate, Fitted, CANDIDATES};
pub use split::{split, split_by_groups, Split};

use crate::corpus::dataset::Sample;
use shadowpatch_predict::finding::VerdictPolicy;
use shadowpatch_predict::model::{ModelFile, TrainingMetadata};
use std::collections::BTreeMap;

/// The split and cross-validation seed unless told otherwise.
pub const DEFAULT_SEED: u64 = 20_261_126;
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

/// A trained model and its evaluation.
#[derive(Debug, Clone)]
pub struct Trained {
    pub model: ModelFile,
    pub evaluation: Evaluation,
    pub split: Split,
}

/// Everything `shadowpatch-train train` does after the features are extracted:
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
