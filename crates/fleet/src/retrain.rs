//! Retraining from the fleet's outcomes: label the stored outcomes, fit a
//! candidate with the trainer's own selection and fitting
//! (`shadowpatch_trainer::training`: the split by group, the feature
//! families, grouped cross-validation, Platt calibration), and compare it
//! with the current model on the same held-out patches. The candidate is
//! promoted only when its held-out AUC is not below the current model's.
//!
//! Labels: a harmful outcome ([`OutcomeKind::is_harm`]) is harmful; a
//! `kept` one is benign, and so is an `applied` one older than the benign
//! window with no later outcome of the same patch on the same host;
//! `withdrawn` (a user's choice) and `refused` (never ran) say nothing
//! about harm and are left out, as are outcomes without features.

use crate::storage::LabelRow;
use shadowpatch_predict::model::{ModelFile, TrainingMetadata};
use shadowpatch_predict::remote::{ModelVersion, OutcomeKind};
use shadowpatch_trainer::corpus::dataset::Sample;
use shadowpatch_trainer::training::{auc, select_and_fit, select_features, split, TrainOptions, CANDIDATES};
use std::collections::BTreeMap;

/// Share of the patches (whole groups) held out to compare the models.
const TEST_FRACTION: f64 = 0.3;

/// What a retraining round decided.
#[derive(Debug)]
pub enum Retrained {
    /// The candidate is at least as good on the held-out patches.
    Promote {
        model: Box<ModelFile>,
        version: ModelVersion,
        current_auc: Option<f64>,
    },
    /// Kept the current model, and why.
    Refuse { reason: String },
}

/// The fleet outcomes that carry a label, as trainer samples (one group
/// per patch, so a patch's outcomes never straddle the split).
pub fn label(rows: &[LabelRow], now_ms: u64, benign_after_ms: u64) -> Vec<Sample> {
    let mut samples = Vec::new();
    for (index, row) in rows.iter().enumerate() {
        if row.features.is_empty() {
            continue;
        }
        let harmful = match row.kind {
            kind if kind.is_harm() => true,
            OutcomeKind::Kept => false,
            OutcomeKind::Applied => {
                let later = rows[index + 1..].iter().any(|other| {
                    other.host == row.host && other.patch_id == row.patch_id && other.build_id == row.build_id
                });
                if later || now_ms.saturating_sub(row.at_unix_ms) < benign_after_ms {
                    continue;
                }
                false
            }
            _ => continue,
        };
        let kind = serde_json::to_value(row.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        samples.push(Sample {
            id: format!(
                "fleet:{}:{}:{}:{}",
                row.host, row.patch_id, row.build_id, row.at_unix_ms
            ),
            group: format!("fleet:{}", row.patch_id),
            kind: "fleet".into(),
            harmful,
            outcome: kind,
            features: row.features.clone(),
            blocking: false,
            static_blocking: false,
            simulation_failed: None,
            findings: Vec::new(),
        });
    }
    samples
}

/// Fit a candidate on `fleet` (and `corpus`, the built-in model's samples
/// when given) and compare it with `current` on the held-out patches.
pub fn retrain(fleet: &[Sample], corpus: &[Sample], current: &ModelFile, current_version: &ModelVersion) -> Retrained {
    let refuse = |reason: String| Retrained::Refuse { reason };
    let all: Vec<Sample> = fleet.iter().chain(corpus).cloned().collect();
    let options = TrainOptions::default();
    let split = split(&all, &[], options.seed, TEST_FRACTION);
    for (name, part) in [("training", &split.train), ("held-out", &split.test)] {
        let harmful = part.iter().filter(|s| s.harmful).count();
        if harmful == 0 || harmful == part.len() {
            return refuse(format!(
                "the {name} split has {harmful} harmful of {} samples: both labels are needed ({} labelled fleet outcomes)",
                part.len(),
                fleet.len()
            ));
        }
    }
    let features = select_features(&split.train, &|_| true);
    if features.is_empty() {
        return refuse("no feature varies over the training samples".into());
    }
    let fitted = match select_and_fit(&split.train, features, CANDIDATES, &options) {
        Ok(fitted) => fitted,
        Err(error) => return refuse(format!("fitting failed: {error}")),
    };
    let labels: Vec<bool> = split.test.iter().map(|s| s.harmful).collect();
    let mut samples = BTreeMap::new();
    samples.insert("train".to_string(), split.train.len());
    samples.insert("test".to_string(), split.test.len());
    samples.insert("fleet".to_string(), fleet.len());
    samples.insert("corpus".to_string(), corpus.len());
    samples.insert("harmful".to_string(), all.iter().filter(|s| s.harmful).count());
    samples.insert("benign".to_string(), all.iter().filter(|s| !s.harmful).count());
    let mut hasher = blake3::Hasher::new();
    for sample in &all {
        hasher.update(sample.id.as_bytes());
        hasher.update(&[u8::from(sample.harmful)]);
    }
    let metadata = TrainingMetadata {
        trained_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        corpus_hash: hasher.finalize().to_hex().to_string(),
        seed: options.seed,
        samples,
        test_functions: split.test_groups.clone(),
        selection: fitted.selection.clone(),
        chosen_because: fitted.chosen_because.clone(),
        sections: vec!["fleet outcomes".into()],
        compiler: String::new(),
        evaluation: serde_json::Value::Null,
    };
    let mut candidate = fitted.model(metadata);
    let scores =
        |model: &ModelFile| -> Vec<f64> { split.test.iter().map(|s| model.probability(&s.features)).collect() };
    let candidate_auc = auc(&scores(&candidate), &labels);
    let current_auc = auc(&scores(current), &labels);
    candidate.training.evaluation = serde_json::json!({
        "held_out_auc": candidate_auc,
        "current_model_auc": current_auc,
        "current_model": current_version.name,
        "test_samples": split.test.len(),
    });
    match (candidate_auc, current_auc) {
        (Some(new), Some(old)) if new < old => refuse(format!(
            "the candidate's held-out AUC {new:.3} is below the current model {}'s {old:.3} on the same {} samples",
            current_version.name,
            split.test.len()
        )),
        (None, _) => refuse("the candidate's held-out AUC is undefined".into()),
        (Some(new), _) => {
            let next = current_version.version + 1;
            Retrained::Promote {
                model: Box::new(candidate),
                version: ModelVersion {
                    version: next,
                    name: format!("fleet-v{next}"),
                    trained_on: fleet.len() as u64,
                    held_out_auc: Some(new),
                },
                current_auc,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(host: &str, patch: &str, kind: OutcomeKind, at: u64, bytes: f64) -> LabelRow {
        LabelRow {
            host: host.into(),
            patch_id: patch.into(),
            build_id: "b".into(),
            kind,
            at_unix_ms: at,
            features: [("static.bytes_changed".to_string(), bytes)].into_iter().collect(),
        }
    }

    #[test]
    fn labels_follow_the_outcome_kinds() {
        let rows = vec![
            row("a", "p", OutcomeKind::Applied, 0, 1.0),
            row("a", "p", OutcomeKind::RolledBack, 10, 1.0),
            row("b", "q", OutcomeKind::Applied, 0, 1.0),
            row("c", "r", OutcomeKind::Applied, 900, 1.0),
            row("d", "s", OutcomeKind::Withdrawn, 0, 1.0),
            row("e", "t", OutcomeKind::Kept, 0, 1.0),
        ];
        let samples = label(&rows, 1000, 500);
        let labels: Vec<(&str, bool)> = samples.iter().map(|s| (s.group.as_str(), s.harmful)).collect();
        // a's apply is superseded by its rollback; c's is too recent; d withdrew.
        assert_eq!(labels, vec![("fleet:p", true), ("fleet:q", false), ("fleet:t", false)]);
    }

    #[test]
    fn a_separable_fleet_history_promotes_over_the_built_in_model() {
        // Harmful patches change many bytes, benign ones few: the built-in
        // model's weights know nothing of this fleet's pattern.
        let mut rows = Vec::new();
        for patch in 0..40 {
            let harmful = patch % 2 == 0;
            let bytes = if harmful {
                400.0 + patch as f64
            } else {
                10.0 + patch as f64
            };
            let kind = if harmful {
                OutcomeKind::Crashed
            } else {
                OutcomeKind::Kept
            };
            rows.push(row("h", &format!("p{patch}"), kind, patch, bytes));
        }
        let samples = label(&rows, 100, 1000);
        let current = ModelFile::embedded().unwrap();
        let version = ModelVersion {
            version: 0,
            name: "built-in".into(),
            trained_on: 0,
            held_out_auc: None,
        };
        match retrain(&samples, &[], &current, &version) {
            Retrained::Promote { version, model, .. } => {
                assert_eq!((version.version, version.name.as_str()), (1, "fleet-v1"));
                assert_eq!(version.held_out_auc, Some(1.0));
                assert_eq!(model.features, vec!["static.bytes_changed".to_string()]);
            }
            Retrained::Refuse { reason } => panic!("refused: {reason}"),
        }
        let one_class: Vec<Sample> = samples.iter().filter(|s| s.harmful).cloned().collect();
        assert!(matches!(
            retrain(&one_class, &[], &current, &version),
            Retrained::Refuse { .. }
        ));
    }
}
