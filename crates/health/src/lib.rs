//! Judging a patched process's health: compare metric samples taken before
//! activation (control) with samples taken after (experiment), in the manner
//! of Netflix's Kayenta canary judge: a Mann-Whitney U test per metric with
//! a confidence interval for the shift, a tolerance below which a
//! statistically significant shift is not a regression, critical metrics
//! that fail the whole judgement alone, and a score over the rest.

#![forbid(unsafe_code)]

pub mod judge;
pub mod mann_whitney;

pub use judge::{judge, Decision, Direction, JudgeConfig, Judgement, MetricClass, MetricResult, MetricSpec};
pub use mann_whitney::{mann_whitney, MannWhitney, TestError};
