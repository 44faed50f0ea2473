//! The prediction engine: before a patch touches a running service, predict
//! whether it will misbehave and say why. Four sources of evidence feed one
//! verdict: static analysis of the patch against the live target (no
//! writes), simulation of captured calls on forked copies of the process,
//! the target's recent health, and a learned risk model over all of them.
//!
//! Invariant: nothing here writes to the live target except through the
//! journaled probe transactions of `shadowpatch-patch`, and a failed
//! analysis leaves no child process behind.

#![forbid(unsafe_code)]

pub mod abi;
pub mod callgraph;
pub mod code;
pub mod context;
pub mod engine;
pub mod error;
pub mod intent;
/// Findings, verdicts and the analysis record (`shadowpatch-finding`).
pub use shadowpatch_finding as finding;
pub mod model;
pub mod remote;
pub mod remote_client;
pub mod simulate;
pub mod static_analysis;
pub mod watch_metrics;

pub use context::{ContextOptions, ContextReport};
pub use engine::{
    analyze, analyze_detailed, standard_sections, AnalysisRequest, Analyzed, Contribution, InterimRisk, RiskScorer,
    Section,
};
pub use error::PredictError;
pub use finding::{Analysis, Class, Explanation, Finding, Severity, Source, Term, Verdict, VerdictPolicy};
pub use model::{ModelError, ModelFile, ModelRisk};
pub use remote_client::{DecidedBy, Predictor, PredictorSettings, RemoteScorer};
pub use static_analysis::{analyze_static, survey_for_analysis, StaticReport};
