//! The Mann-Whitney U test with the Hodges-Lehmann estimate of the shift
//! between two samples and its distribution-free confidence interval.
//!
//! Written here because no well-kept Rust crate provides it (`statrs` has
//! the distributions, which we use, but not the test). It follows the
//! textbook definitions and R's `wilcox.test(conf.int = TRUE)` in its normal
//! approximation: ranks with midranks for ties, a tie-corrected variance, a
//! continuity correction, and the interval taken from order statistics of
//! the pairwise differences. Metric samples of a watch window are tens to
//! hundreds of points, where the normal approximation is the usual choice.

use statrs::distribution::{ContinuousCDF, Normal};

/// The result of comparing an experiment sample with a control sample.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MannWhitney {
    /// U of the control sample (as scipy's `mannwhitneyu(control, experiment)`).
    pub u: f64,
    /// Two-sided p-value (normal approximation, continuity-corrected).
    pub p_value: f64,
    /// Hodges-Lehmann estimate of experiment − control: the median of all
    /// pairwise differences.
    pub shift: f64,
    /// Confidence interval of the shift at `confidence`.
    pub shift_low: f64,
    pub shift_high: f64,
    pub confidence: f64,
}

/// Errors of the test.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TestError {
    #[error("a sample is empty (control {control}, experiment {experiment} points)")]
    Empty { control: usize, experiment: usize },
    #[error("a sample holds a value that is not a number")]
    NotANumber,
    #[error("confidence {0} is not in (0, 1)")]
    Confidence(f64),
}

/// Compare `experiment` with `control` at confidence level `confidence`
/// (e.g. 0.95).
pub fn mann_whitney(control: &[f64], experiment: &[f64], confidence: f64) -> Result<MannWhitney, TestError> {
    if control.is_empty() || experiment.is_empty() {
        return Err(TestError::Empty {
            control: control.len(),
            experiment: experiment.len(),
        });
    }
    if control.iter().chain(experiment).any(|v| v.is_nan()) {
        return Err(TestError::NotANumber);
    }
    if !(confidence > 0.0 && confidence < 1.0) {
        return Err(TestError::Confidence(confidence));
    }
    let (n1, n2) = (control.len() as f64, experiment.len() as f64);

    // Ranks of the pooled sample, ties sharing their midrank.
    let mut pooled: Vec<(f64, bool)> = control
        .iter()
        .map(|&v| (v, true))
        .chain(experiment.iter().map(|&v| (v, false)))
        .collect();
    pooled.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut rank_sum_control = 0.0;
    let mut tie_term = 0.0;
    let mut i = 0;
    while i < pooled.len() {
        let mut j = i;
        while j + 1 < pooled.len() && pooled[j + 1].0 == pooled[i].0 {
            j += 1;
        }
        let midrank = (i + j) as f64 / 2.0 + 1.0;
        let tied = (j - i + 1) as f64;
        tie_term += tied * tied * tied - tied;
        rank_sum_control += pooled[i..=j].iter().filter(|(_, c)| *c).count() as f64 * midrank;
        i = j + 1;
    }
    let u = rank_sum_control - n1 * (n1 + 1.0) / 2.0;
    let mean = n1 * n2 / 2.0;
    let n = n1 + n2;
    let variance = n1 * n2 / 12.0 * ((n + 1.0) - tie_term / (n * (n - 1.0).max(1.0)));
    let standard = Normal::standard();
    let p_value = if variance <= 0.0 {
        // Every value equal: no evidence of any difference.
        1.0
    } else {
        let z = ((u - mean).abs() - 0.5).max(0.0) / variance.sqrt();
        (2.0 * (1.0 - standard.cdf(z))).min(1.0)
    };

    // Hodges-Lehmann: order statistics of experiment − control.
    let mut differences: Vec<f64> = Vec::with_capacity(control.len() * experiment.len());
    for &y in experiment {
        for &x in control {
            differences.push(y - x);
        }
    }
    differences.sort_by(|a, b| a.total_cmp(b));
    let count = differences.len();
    let shift = if count % 2 == 1 {
        differences[count / 2]
    } else {
        (differences[count / 2 - 1] + differences[count / 2]) / 2.0
    };
    let z = standard.inverse_cdf(1.0 - (1.0 - confidence) / 2.0);
    let k = (mean - z * (n1 * n2 * (n + 1.0) / 12.0).sqrt()).floor();
    let k = (k.max(0.0) as usize).min(count.saturating_sub(1) / 2);
    Ok(MannWhitney {
        u,
        p_value,
        shift,
        shift_low: differences[k],
        shift_high: differences[count - 1 - k],
        confidence,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Reference values from scipy 1.x: mannwhitneyu(x, y,
    // alternative='two-sided', method='asymptotic', use_continuity=True).
    #[test]
    fn u_and_p_match_scipy_with_ties() {
        let x = [
            310., 195., 530., 155., 530., 245., 385., 450., 465., 545., 170., 180., 125., 180., 230., 75., 430., 480.,
            495., 295.,
        ];
        let y = [
            116., 171., 176., 421., 111., 326., 481., 111., 346., 441., 261., 411., 206., 521., 456., 446., 296., 51.,
            426., 261.,
        ];
        let result = mann_whitney(&x, &y, 0.95).unwrap();
        assert_eq!(result.u, 223.0);
        assert!((result.p_value - 0.542_695_977_428_948_2).abs() < 1e-9, "{result:?}");
    }

    #[test]
    fn u_and_p_match_scipy_for_a_clear_shift() {
        let a = [1.1, 2.2, 3.3, 4.4, 5.5, 6.6, 7.7, 8.8];
        let b = [5.0, 6.1, 7.2, 8.3, 9.4, 10.5, 11.6, 12.7, 13.8];
        let result = mann_whitney(&a, &b, 0.95).unwrap();
        assert_eq!(result.u, 10.0);
        assert!((result.p_value - 0.014_137_969_455_911_484).abs() < 1e-9, "{result:?}");
        assert!(result.shift_low > 0.0, "the interval excludes no shift: {result:?}");
    }

    #[test]
    fn the_interval_brackets_a_known_shift() {
        let control: Vec<f64> = (0..60).map(|i| ((i * 37) % 60) as f64).collect();
        let experiment: Vec<f64> = control.iter().map(|v| v + 10.0).collect();
        let result = mann_whitney(&control, &experiment, 0.95).unwrap();
        assert_eq!(result.shift, 10.0);
        assert!(result.shift_low <= 10.0 && 10.0 <= result.shift_high, "{result:?}");
        assert!(result.shift_low > 0.0 && result.p_value < 0.05, "{result:?}");
        let same = mann_whitney(&control, &control, 0.95).unwrap();
        assert!(
            same.shift_low <= 0.0 && same.shift_high >= 0.0 && same.p_value > 0.5,
            "{same:?}"
        );
    }

    #[test]
    fn degenerate_input_is_an_error_or_no_evidence() {
        assert!(matches!(mann_whitney(&[], &[1.0], 0.95), Err(TestError::Empty { .. })));
        assert_eq!(mann_whitney(&[f64::NAN], &[1.0], 0.95), Err(TestError::NotANumber));
        assert_eq!(mann_whitney(&[1.0], &[1.0], 1.0), Err(TestError::Confidence(1.0)));
        let flat = mann_whitney(&[3.0; 10], &[3.0; 10], 0.95).unwrap();
        assert_eq!((flat.p_value, flat.shift), (1.0, 0.0));
    }
}
