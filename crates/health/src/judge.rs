//! The canary judgement: classify each metric (pass, high, low, no data)
//! from its Mann-Whitney interval and tolerance, fail on any critical
//! metric, and otherwise require a minimum score.

use crate::mann_whitney::{mann_whitney, MannWhitney};

/// Which way a metric goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Higher is worse (error rate, latency, CPU, memory).
    Increase,
    /// Lower is worse (throughput, successful requests).
    Decrease,
    /// Any significant change is a regression.
    Either,
}

/// One metric to judge.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MetricSpec {
    pub name: String,
    pub direction: Direction,
    /// A failing critical metric fails the judgement whatever the score.
    pub critical: bool,
    /// The shift tolerated, relative to the control's median (0.25 = 25 %):
    /// a regression needs the whole confidence interval beyond it. When the
    /// control's median is 0 (an error count that was zero) any significant
    /// shift in the bad direction is a regression.
    pub tolerance: f64,
}

impl MetricSpec {
    pub fn new(name: &str, direction: Direction) -> Self {
        MetricSpec {
            name: name.to_string(),
            direction,
            critical: false,
            tolerance: 0.25,
        }
    }

    pub fn critical(mut self) -> Self {
        self.critical = true;
        self
    }

    pub fn tolerance(mut self, tolerance: f64) -> Self {
        self.tolerance = tolerance;
        self
    }
}

/// Judgement settings (Kayenta's defaults where it has them).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JudgeConfig {
    /// Confidence level of each metric's interval.
    pub confidence: f64,
    /// Minimum score (percent of metrics passing) to keep the patch.
    pub pass_score: f64,
    /// Fewer points than this in either sample: no data, not judged.
    pub min_samples: usize,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        JudgeConfig {
            confidence: 0.95,
            pass_score: 75.0,
            min_samples: 5,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetricClass {
    Pass,
    /// Significantly higher than before, beyond the tolerance.
    High,
    /// Significantly lower than before, beyond the tolerance.
    Low,
    NoData,
}

/// One metric's result, with the evidence.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MetricResult {
    pub name: String,
    pub class: MetricClass,
    /// Whether this class counts against the patch for this metric.
    pub failed: bool,
    pub critical: bool,
    pub control_points: usize,
    pub experiment_points: usize,
    pub control_median: Option<f64>,
    pub experiment_median: Option<f64>,
    pub test: Option<MannWhitney>,
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Keep,
    Rollback,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Judgement {
    pub decision: Decision,
    /// Percent of judged metrics that passed (100 when none could be judged).
    pub score: f64,
    pub results: Vec<MetricResult>,
    pub reason: String,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

fn classify(config: &JudgeConfig, spec: &MetricSpec, control: &[f64], experiment: &[f64]) -> MetricResult {
    let mut result = MetricResult {
        name: spec.name.clone(),
        class: MetricClass::NoData,
        failed: false,
        critical: spec.critical,
        control_points: control.len(),
        experiment_points: experiment.len(),
        control_median: None,
        experiment_median: None,
        test: None,
        reason: String::new(),
    };
    if control.len() < config.min_samples || experiment.len() < config.min_samples {
        result.reason = format!(
            "not judged: {} control and {} experiment points (need {})",
            control.len(),
            experiment.len(),
            config.min_samples
        );
        return result;
    }
    let test = match mann_whitney(control, experiment, config.confidence) {
        Ok(test) => test,
        Err(error) => {
            result.reason = format!("not judged: {error}");
            return result;
        }
    };
    let reference = median(control);
    result.control_median = Some(reference);
    result.experiment_median = Some(median(experiment));
    result.test = Some(test);
    let allowed = spec.tolerance * reference.abs();
    result.class = if test.shift_low > allowed {
        MetricClass::High
    } else if test.shift_high < -allowed {
        MetricClass::Low
    } else {
        MetricClass::Pass
    };
    result.failed = matches!(
        (result.class, spec.direction),
        (MetricClass::High, Direction::Increase | Direction::Either)
            | (MetricClass::Low, Direction::Decrease | Direction::Either)
    );
    let interval = format!(
        "shift {:+.4} ({:.0}% interval {:+.4} .. {:+.4}), median {:.4} → {:.4}, p = {:.4}",
        test.shift,
        config.confidence * 100.0,
        test.shift_low,
        test.shift_high,
        reference,
        median(experiment),
        test.p_value
    );
    result.reason = match result.class {
        MetricClass::Pass => format!("within tolerance {:.0}%: {interval}", spec.tolerance * 100.0),
        MetricClass::High | MetricClass::Low => format!(
            "{} beyond tolerance {:.0}%{}: {interval}",
            if result.class == MetricClass::High {
                "higher"
            } else {
                "lower"
            },
            spec.tolerance * 100.0,
            if result.failed { "" } else { " (the good direction)" }
        ),
        MetricClass::NoData => unreachable!("classified above"),
    };
    result
}

/// Judge every metric: (spec, control samples, experiment samples).
pub fn judge(config: &JudgeConfig, metrics: &[(MetricSpec, Vec<f64>, Vec<f64>)]) -> Judgement {
    let results: Vec<MetricResult> = metrics
        .iter()
        .map(|(spec, control, experiment)| classify(config, spec, control, experiment))
        .collect();
    let judged: Vec<&MetricResult> = results.iter().filter(|r| r.class != MetricClass::NoData).collect();
    let score = if judged.is_empty() {
        100.0
    } else {
        100.0 * judged.iter().filter(|r| !r.failed).count() as f64 / judged.len() as f64
    };
    let failed_critical: Vec<&str> = results
        .iter()
        .filter(|r| r.failed && r.critical)
        .map(|r| r.name.as_str())
        .collect();
    let (decision, reason) = if !failed_critical.is_empty() {
        (
            Decision::Rollback,
            format!("critical metric regressed: {}", failed_critical.join(", ")),
        )
    } else if score < config.pass_score {
        let failed: Vec<&str> = results.iter().filter(|r| r.failed).map(|r| r.name.as_str()).collect();
        (
            Decision::Rollback,
            format!(
                "score {score:.0} below {:.0} (regressed: {})",
                config.pass_score,
                failed.join(", ")
            ),
        )
    } else {
        (
            Decision::Keep,
            format!("score {score:.0} (pass at {:.0})", config.pass_score),
        )
    };
    Judgement {
        decision,
        score,
        results,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noisy(base: f64, n: usize, seed: u64) -> Vec<f64> {
        // A deterministic spread of ±10 % around `base`.
        (0..n as u64)
            .map(|i| base * (0.9 + 0.2 * (((i + seed) * 7919 % 101) as f64 / 100.0)))
            .collect()
    }

    #[test]
    fn an_error_rate_rising_from_zero_fails_a_critical_metric() {
        let errors = MetricSpec::new("errors_per_second", Direction::Increase).critical();
        let cpu = MetricSpec::new("cpu", Direction::Increase);
        let judgement = judge(
            &JudgeConfig::default(),
            &[
                (errors, vec![0.0; 20], noisy(5.0, 20, 1)),
                (cpu, noisy(50.0, 20, 2), noisy(50.0, 20, 3)),
            ],
        );
        assert_eq!(judgement.decision, Decision::Rollback, "{judgement:#?}");
        assert!(judgement.reason.contains("errors_per_second"), "{}", judgement.reason);
        assert_eq!(judgement.results[0].class, MetricClass::High);
        assert_eq!(judgement.results[1].class, MetricClass::Pass);
    }

    #[test]
    fn noise_and_improvements_keep_the_patch() {
        let latency = MetricSpec::new("latency", Direction::Increase).critical();
        let throughput = MetricSpec::new("throughput", Direction::Decrease);
        let judgement = judge(
            &JudgeConfig::default(),
            &[
                // Latency halved: significant, but the good direction.
                (latency, noisy(10.0, 30, 4), noisy(5.0, 30, 5)),
                (throughput, noisy(1000.0, 30, 6), noisy(1000.0, 30, 7)),
            ],
        );
        assert_eq!(judgement.decision, Decision::Keep, "{judgement:#?}");
        assert_eq!(judgement.results[0].class, MetricClass::Low);
        assert!(!judgement.results[0].failed);
        assert_eq!(judgement.score, 100.0);
    }

    #[test]
    fn a_significant_shift_within_tolerance_passes_and_beyond_it_fails() {
        let control = noisy(100.0, 40, 8);
        let plus_ten: Vec<f64> = control.iter().map(|v| v + 10.0).collect();
        let plus_fifty: Vec<f64> = control.iter().map(|v| v + 50.0).collect();
        let spec = MetricSpec::new("rss", Direction::Increase).tolerance(0.25);
        let within = judge(&JudgeConfig::default(), &[(spec.clone(), control.clone(), plus_ten)]);
        assert_eq!(within.results[0].class, MetricClass::Pass, "{within:#?}");
        let beyond = judge(&JudgeConfig::default(), &[(spec, control, plus_fifty)]);
        assert_eq!(beyond.results[0].class, MetricClass::High, "{beyond:#?}");
        assert_eq!(beyond.decision, Decision::Rollback, "one of one metric failed: score 0");
    }

    #[test]
    fn too_few_points_are_not_judged() {
        let judgement = judge(
            &JudgeConfig::default(),
            &[(
                MetricSpec::new("x", Direction::Either).critical(),
                vec![1.0, 2.0],
                vec![9.0; 10],
            )],
        );
        assert_eq!(judgement.results[0].class, MetricClass::NoData);
        assert_eq!(judgement.decision, Decision::Keep);
        assert!(judgement.results[0].reason.contains("2 control"));
    }
}
