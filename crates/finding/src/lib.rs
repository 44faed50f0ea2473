//! What an analysis reports: findings with their evidence, the features the
//! risk model reads, and the verdict derived from both. Shared by the
//! analysis engine (`shadowpatch-predict`) and the simulation
//! (`shadowpatch-simulate`), which the engine runs.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

/// How much a finding weighs on the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Informational: shown, no effect on the verdict by itself.
    Info,
    /// The patch may misbehave: verdict at least `warn`.
    Warning,
    /// The patch must not go live: verdict `refuse`.
    Blocking,
}

/// Which part of the engine produced a finding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Static,
    Simulation,
    Context,
    Model,
}

/// One reason, with the evidence behind it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Finding {
    /// Stable kebab-case identifier (`entry-too-short`, `new-syscall`, ...):
    /// tests, the model's features and users' scripts key on it.
    pub code: String,
    pub severity: Severity,
    pub source: Source,
    /// The replaced function concerned, when there is one.
    pub symbol: Option<String>,
    /// The reason, in one sentence a user can act on.
    pub message: String,
    /// Addresses, bytes, instructions, call arguments, metrics...
    pub evidence: serde_json::Value,
}

impl Finding {
    pub fn new(code: &str, severity: Severity, source: Source, message: impl Into<String>) -> Self {
        Finding {
            code: code.to_string(),
            severity,
            source,
            symbol: None,
            message: message.into(),
            evidence: serde_json::Value::Null,
        }
    }

    pub fn symbol(mut self, symbol: impl Into<String>) -> Self {
        self.symbol = Some(symbol.into());
        self
    }

    pub fn evidence(mut self, evidence: serde_json::Value) -> Self {
        self.evidence = evidence;
        self
    }
}

/// What to do with the patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Proceed,
    Warn,
    Refuse,
}

/// Thresholds turning findings and the risk score into a verdict.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VerdictPolicy {
    /// Risk at or above which the verdict is at least `warn`.
    pub warn_at: f64,
    /// Risk at or above which the verdict is `refuse`.
    pub refuse_at: f64,
}

impl Default for VerdictPolicy {
    fn default() -> Self {
        VerdictPolicy {
            warn_at: 0.3,
            refuse_at: 0.7,
        }
    }
}

impl VerdictPolicy {
    /// Any blocking finding refuses; otherwise the risk and the warnings decide.
    pub fn verdict(&self, findings: &[Finding], risk: f64) -> Verdict {
        if findings.iter().any(|f| f.severity == Severity::Blocking) || risk >= self.refuse_at {
            Verdict::Refuse
        } else if findings.iter().any(|f| f.severity == Severity::Warning) || risk >= self.warn_at {
            Verdict::Warn
        } else {
            Verdict::Proceed
        }
    }
}

/// The result of analysing one patch against one live target.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Analysis {
    pub verdict: Verdict,
    /// Calibrated probability in [0, 1] that the patch misbehaves.
    pub risk: f64,
    pub findings: Vec<Finding>,
    /// Named numeric features, as the risk model reads them.
    pub features: BTreeMap<String, f64>,
    /// Evidence sources that could not be used (and why): the verdict is
    /// given with lower confidence.
    pub unavailable: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_findings_refuse_and_warnings_warn_whatever_the_risk() {
        let policy = VerdictPolicy::default();
        let warning = Finding::new("w", Severity::Warning, Source::Static, "w");
        let blocking = Finding::new("b", Severity::Blocking, Source::Static, "b");
        assert_eq!(policy.verdict(&[], 0.0), Verdict::Proceed);
        assert_eq!(policy.verdict(&[], 0.5), Verdict::Warn);
        assert_eq!(policy.verdict(&[], 0.9), Verdict::Refuse);
        assert_eq!(policy.verdict(std::slice::from_ref(&warning), 0.0), Verdict::Warn);
        assert_eq!(policy.verdict(&[warning, blocking], 0.0), Verdict::Refuse);
    }
}
