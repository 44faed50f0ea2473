//! The fleet predictor's wire protocol: HTTP/JSON between a host's
//! `shadowpatch` (which runs the static analysis and simulation next to
//! the process) and `shadowpatch predictor serve` (the fleet's model and
//! outcome history, on a node of its own).
//!
//! Shared by both sides so that they cannot drift: the service
//! (`crates/fleet`) deserialises what the host's client serialises.
//!
//! Endpoints (all JSON, `Authorization: Bearer TOKEN` unless the service
//! runs on loopback without a token):
//! - `POST /v1/verdict`: [`VerdictRequest`] → [`VerdictResponse`]
//! - `POST /v1/outcomes`: [`Outcome`] or `[Outcome]` → [`OutcomeAck`]
//! - `GET /v1/model`: [`ModelVersion`] of the model now deciding
//! - `GET /v1/health`: `{"status": "ok", "model": ModelVersion}`
//!
//! Errors: an HTTP status (400 malformed, 401 token, 413 too large,
//! 503 storage down) and one-line JSON [`ErrorBody`].

use crate::finding::{Evidence, Explanation, Finding, Verdict, VerdictPolicy};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The protocol's version, in every path (`/v1/...`).
pub const API_VERSION: u32 = 1;

/// The largest request body either side sends or accepts.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// A host's evidence about one patch on one process, asking the fleet's
/// model for the risk and verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerdictRequest {
    /// The asking host (its hostname, or what `--host-name` says).
    pub host: String,
    /// The patch's id (manifest `id`).
    pub patch_id: String,
    /// GNU build-id of the module the patch targets, hex.
    #[serde(default)]
    pub build_id: Option<String>,
    /// The target's program (executable path), for the history's reports.
    #[serde(default)]
    pub program: Option<String>,
    /// Every finding of the host's static analysis, context and simulation.
    pub findings: Vec<Finding>,
    /// The features the model reads, as the host measured them.
    pub features: BTreeMap<String, f64>,
    /// What the simulation observed.
    pub evidence: Evidence,
    /// The host's thresholds: the service decides with them.
    pub policy: VerdictPolicy,
}

/// The model that decided, named in every verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    /// Increases by one on every promotion; 0 is the built-in model.
    pub version: u64,
    /// e.g. `fleet-v3` or `built-in`.
    pub name: String,
    /// Outcomes it was trained on (0 for the built-in model).
    pub trained_on: u64,
    /// Its held-out AUC when it was promoted, if measured.
    #[serde(default)]
    pub held_out_auc: Option<f64>,
}

/// The fleet's answer to a [`VerdictRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VerdictResponse {
    /// Names this analysis in later [`Outcome`]s.
    pub analysis_id: String,
    pub risk: f64,
    pub verdict: Verdict,
    /// How the risk came about, term by term.
    pub explanation: Explanation,
    pub model: ModelVersion,
    /// Findings only the fleet can make (e.g. `fleet-history`: this patch
    /// on this build-id was rolled back or crashed on other hosts).
    #[serde(default)]
    pub fleet_findings: Vec<Finding>,
}

/// What happened to a patch on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    /// Activated (no watch, or the watch has not ended yet).
    Applied,
    /// A watch ended and kept the patch.
    Kept,
    /// Rolled back by a watch or the agent because health regressed.
    RolledBack,
    /// The patched process crashed (fault in patch code, or died).
    Crashed,
    /// The patched process hung (watch or simulation evidence).
    Hung,
    /// The host refused to apply it (verdict or policy).
    Refused,
    /// A user rolled it back by hand (not evidence of harm).
    Withdrawn,
}

impl OutcomeKind {
    /// Whether this outcome is evidence that the patch misbehaved.
    pub fn is_harm(self) -> bool {
        matches!(self, OutcomeKind::RolledBack | OutcomeKind::Crashed | OutcomeKind::Hung)
    }
}

/// One outcome a host reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub host: String,
    /// The verdict's `analysis_id`, when the service gave the verdict.
    #[serde(default)]
    pub analysis_id: Option<String>,
    pub patch_id: String,
    #[serde(default)]
    pub build_id: Option<String>,
    pub kind: OutcomeKind,
    /// Why (the watch's reason, the fault, the user's command).
    #[serde(default)]
    pub cause: Option<String>,
    /// The analysis features of the patch, so the outcome can be learned
    /// from even without an `analysis_id` (empty when unknown).
    #[serde(default)]
    pub features: BTreeMap<String, f64>,
    /// When it happened, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
}

/// The service's receipt for outcomes: stored durably before it answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeAck {
    pub stored: u64,
}

/// Every error answer's body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_round_trips_and_defaults_what_old_hosts_omit() {
        let text = r#"{"host":"a","patch_id":"p","kind":"rolled_back","at_unix_ms":5}"#;
        let outcome: Outcome = serde_json::from_str(text).unwrap();
        assert_eq!(outcome.kind, OutcomeKind::RolledBack);
        assert!(outcome.kind.is_harm() && !OutcomeKind::Withdrawn.is_harm());
        assert!(outcome.features.is_empty() && outcome.analysis_id.is_none());
        let again: Outcome = serde_json::from_str(&serde_json::to_string(&outcome).unwrap()).unwrap();
        assert_eq!(again, outcome);
        assert!(
            serde_json::from_str::<Outcome>(r#"{"host":"a","patch_id":"p","kind":"exploded","at_unix_ms":5}"#).is_err()
        );
    }
}
