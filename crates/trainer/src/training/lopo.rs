//! Leave-one-program-out evaluation (issue 12, item 7): for each real
//! program, a model is selected and fitted on every other program (and
//! the fixture corpus, when given) and judged on the program it never
//! saw. The label is *harm* (crash, exit, hang, leak); a change of
//! behaviour (`wrong`) is not harm: the engine warns about it from the
//! simulation's evidence, so it must not be refused on risk.
//!
//! A patch is refused when a finding blocks (a crash, hang or exit in
//! simulation, a static blocker) or its harm probability
//! (`ModelFile::harm_probability`, the engine's risk) reaches the
//! refusal threshold.

use super::evaluate::calibration_bins;
use super::{auc, select_and_fit, select_features, CalibrationBin, TrainError, TrainOptions, CANDIDATES};
use crate::corpus::dataset::Sample;
use crate::training::fit::{empty_metadata, Fitted};
use serde::{Deserialize, Serialize};
use shadowpatch_predict::engine::evidence_of;
use shadowpatch_predict::model::ModelFile;
use shadowpatch_predict::{Verdict, VerdictPolicy};

/// One held-out program's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgramRow {
    pub program: String,
    pub train_samples: usize,
    pub samples: usize,
    pub harm: usize,
    pub change: usize,
    pub same: usize,
    /// Harm against everything else, ranked by (blocking, risk).
    pub auc: Option<f64>,
    pub crash_or_hang: usize,
    /// Refusals by the model rule (a blocking finding, or the risk at the
    /// threshold), flattened into the row.
    #[serde(flatten)]
    pub model: Refusals,
    pub chosen: String,
    /// The same counts by the engine's whole verdict rule (the held-out
    /// model's risk, the sample's findings and simulation evidence):
    /// what a user would see. Samples without findings recorded count by
    /// the model rule.
    pub verdict: Refusals,
}

/// What one rule refused of a held-out program.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Refusals {
    pub refused_harm: usize,
    /// Refused patches that keep behaviour (the false refusals).
    pub refused_same: usize,
    /// Refused changes of behaviour (they should warn).
    pub refused_change: usize,
    pub crash_or_hang_refused: usize,
    /// What was missed, one `id (outcome, risk)` each.
    pub missed: Vec<String>,
    pub falsely_refused: Vec<String>,
}

impl Refusals {
    /// Count `sample` (described by `line`), refused or not.
    fn tally(&mut self, sample: &Sample, refused: bool, line: &str) {
        let refused_count = usize::from(refused);
        if sample.harmful {
            self.refused_harm += refused_count;
            if !refused {
                self.missed.push(line.to_string());
            }
        } else if sample.outcome == "wrong" {
            self.refused_change += refused_count;
        } else {
            self.refused_same += refused_count;
            if refused {
                self.falsely_refused.push(line.to_string());
            }
        }
        if is_crash_or_hang(sample) {
            self.crash_or_hang_refused += refused_count;
        }
    }
}

/// The whole evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lopo {
    pub refuse_at: f64,
    pub rows: Vec<ProgramRow>,
    /// Every held-out sample pooled: AUC and the reliability of the risk.
    pub pooled_auc: Option<f64>,
    pub calibration: Vec<CalibrationBin>,
}

/// The program a sample belongs to (`memcached:process_update_command` → `memcached`).
pub fn program_of(sample: &Sample) -> &str {
    sample.group.split(':').next().unwrap_or("")
}

fn is_crash_or_hang(sample: &Sample) -> bool {
    matches!(sample.outcome.as_str(), "crash" | "hang")
}

fn view(model: &ModelFile, sample: &Sample, refuse_at: f64) -> (f64, f64, bool) {
    let risk = model.harm_probability(&sample.features);
    let refused = sample.blocking || risk >= refuse_at;
    (if sample.blocking { 1.0 + risk } else { risk }, risk, refused)
}

/// Whether the engine's verdict rule refuses `sample` at `risk`.
fn verdict_refuses(policy: &VerdictPolicy, sample: &Sample, risk: f64, refused_by_model: bool) -> bool {
    if sample.findings.is_empty() {
        return refused_by_model;
    }
    let findings: Vec<_> = sample.findings.iter().map(|f| f.finding()).collect();
    policy.decide(&findings, risk, &evidence_of(&sample.features)).verdict == Verdict::Refuse
}

/// Fit on `train` the way `shadowpatch-train train` does.
pub fn fit_all(train: &[Sample], options: &TrainOptions) -> Result<Fitted, TrainError> {
    let features = select_features(train, &|_| true);
    select_and_fit(train, features, CANDIDATES, options)
}

/// Leave each program of `real` out in turn; `extra` (the fixture corpus)
/// always trains. Samples must carry the harm label in `harmful`.
pub fn leave_one_program_out(real: &[Sample], extra: &[Sample], options: &TrainOptions) -> Result<Lopo, TrainError> {
    let refuse_at = options.policy.refuse_at;
    let mut programs: Vec<&str> = real.iter().map(program_of).collect();
    programs.sort();
    programs.dedup();
    let mut rows = Vec::new();
    let (mut pooled_scores, mut pooled_risks, mut pooled_harm) = (Vec::new(), Vec::new(), Vec::new());
    for program in programs {
        let (test, train): (Vec<&Sample>, Vec<&Sample>) = real.iter().partition(|s| program_of(s) == program);
        let train: Vec<Sample> = train.into_iter().chain(extra).cloned().collect();
        let fitted = fit_all(&train, options)?;
        let model = fitted.model(empty_metadata());
        let mut row = ProgramRow {
            program: program.to_string(),
            train_samples: train.len(),
            samples: test.len(),
            harm: 0,
            change: 0,
            same: 0,
            auc: None,
            crash_or_hang: 0,
            model: Refusals::default(),
            chosen: fitted.chosen.name(),
            verdict: Refusals::default(),
        };
        let mut scores = Vec::new();
        let mut harm = Vec::new();
        for sample in &test {
            let (score, risk, refused) = view(&model, sample, refuse_at);
            scores.push(score);
            harm.push(sample.harmful);
            pooled_scores.push(score);
            pooled_risks.push(risk);
            pooled_harm.push(sample.harmful);
            let line = format!("{} ({}, risk {:.2})", sample.id, sample.outcome, risk);
            row.model.tally(sample, refused, &line);
            let by_verdict = verdict_refuses(&options.policy, sample, risk, refused);
            row.verdict.tally(sample, by_verdict, &line);
            if sample.harmful {
                row.harm += 1;
            } else if sample.outcome == "wrong" {
                row.change += 1;
            } else {
                row.same += 1;
            }
            row.crash_or_hang += usize::from(is_crash_or_hang(sample));
        }
        row.auc = auc(&scores, &harm);
        rows.push(row);
    }
    let calibration = calibration_bins(&pooled_risks, &pooled_harm);
    Ok(Lopo {
        refuse_at,
        rows,
        pooled_auc: auc(&pooled_scores, &pooled_harm),
        calibration,
    })
}

/// The fixture corpus's samples with the harm label: a wrong answer is a
/// change of behaviour, not harm.
pub fn harm_labelled(samples: &[Sample], prefix: &str) -> Vec<Sample> {
    samples
        .iter()
        .cloned()
        .map(|mut s| {
            s.harmful = matches!(s.outcome.as_str(), "crash" | "hang" | "exit" | "leak");
            if !s.group.contains(':') {
                s.group = format!("{prefix}:{}", s.group);
            }
            s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn sample(group: &str, id: usize, harmful: bool, x: f64, blocking: bool) -> Sample {
        let mut features = BTreeMap::new();
        features.insert("static.signal".to_string(), x);
        Sample {
            id: format!("{group}-{id}"),
            group: group.to_string(),
            kind: "k".into(),
            harmful,
            outcome: if harmful { "crash" } else { "ok" }.into(),
            features,
            blocking,
            static_blocking: false,
            simulation_failed: None,
            findings: Vec::new(),
        }
    }

    #[test]
    fn each_program_is_judged_by_a_model_that_never_saw_it() {
        let mut real = Vec::new();
        for (p, program) in ["a", "b", "c"].iter().enumerate() {
            for f in 0..3 {
                for i in 0..6 {
                    let harmful = i % 2 == 0;
                    let x = if harmful {
                        3.0 + (i + p) as f64 * 0.1
                    } else {
                        -3.0 - f as f64 * 0.1
                    };
                    real.push(sample(&format!("{program}:f{f}"), i, harmful, x, false));
                }
            }
        }
        // One benign patch of program c that blocks (a false refusal) and is reported.
        real.push(sample("c:f9", 0, false, -3.0, true));
        let lopo = leave_one_program_out(&real, &[], &TrainOptions::default()).unwrap();
        assert_eq!(lopo.rows.len(), 3);
        for row in &lopo.rows {
            assert_eq!(row.train_samples + row.samples, real.len());
            assert_eq!(row.model.refused_harm, row.harm, "{row:?}");
        }
        let c = &lopo.rows[2];
        assert_eq!(
            (c.program.as_str(), c.model.refused_same, c.model.falsely_refused.len()),
            ("c", 1, 1)
        );
        assert!(lopo.pooled_auc.unwrap() > 0.9);
    }

    #[test]
    fn wrong_answers_of_the_fixture_corpus_are_not_harm() {
        let mut wrong = sample("fixture_fn", 0, true, 0.0, false);
        wrong.outcome = "wrong".into();
        let labelled = harm_labelled(&[wrong, sample("g", 1, true, 0.0, false)], "fixture");
        assert!(!labelled[0].harmful && labelled[1].harmful);
        assert_eq!(labelled[0].group, "fixture:fixture_fn");
    }

    #[test]
    fn the_verdict_rule_reads_the_findings_and_the_live_evidence() {
        use crate::corpus::dataset::BriefFinding;
        use shadowpatch_predict::Severity;
        let policy = VerdictPolicy::default();
        let mut counter = sample("p:f", 0, false, 0.0, false);
        counter.findings = vec![BriefFinding {
            code: "patch-global-state".into(),
            severity: Severity::Warning,
        }];
        for (name, value) in [
            ("sim_calls", 3.0),
            ("sim_captured_calls", 3.0),
            ("sim_live_repeated_clean", 3.0),
        ] {
            counter.features.insert(name.into(), value);
        }
        // The model refuses it; live calls repeated without harm warn.
        assert!(!verdict_refuses(&policy, &counter, 0.9, true));
        // Without the repeats, the risk finding lets the risk refuse.
        counter.features.insert("sim_live_repeated_clean".into(), 0.0);
        assert!(verdict_refuses(&policy, &counter, 0.9, true));
        // A sample without findings recorded counts by the model's rule.
        let old = sample("p:f", 1, false, 0.0, false);
        assert!(verdict_refuses(&policy, &old, 0.1, true));
        assert!(!verdict_refuses(&policy, &old, 0.9, false));
    }
}
