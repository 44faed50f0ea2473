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

/// What kind of consequence a finding is about (its severity says how
/// much it weighs). Harm refuses; a behaviour change warns unless the
/// manifest declares it; a risk (a static flag, a degraded target) warns
/// and feeds the risk score; info is shown only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// The patch does damage: a crash, hang or exit, a divergence of a
    /// critical variable, a new system call the sandbox refused, or a
    /// problem that makes the patch unsafe to apply (a blocking check).
    Harm,
    /// The patch may do damage: a structural flag of the static analysis
    /// (a new loop, allocation, system call...) or the target's own state.
    Risk,
    /// The patch behaves differently: other return values, other output,
    /// other side effects. What a fix does; harm only if unintended.
    BehaviourChange,
    /// Shown for information.
    Info,
}

impl Class {
    /// The class of a finding by its code; codes not listed take it from
    /// their severity (blocking: harm, warning: risk, info: info).
    pub fn of(code: &str, severity: Severity) -> Class {
        match code {
            "sim-patched-crashes"
            | "sim-patched-hangs"
            | "sim-patched-exits"
            | "sim-patched-fails-on-repeat"
            | "sim-patched-leaves-client-waiting"
            | "sim-patched-caller-fails"
            | "sim-patched-leaks"
            | "sim-critical-differs"
            | "sim-unsupported-syscall" => Class::Harm,
            "sim-return-differs"
            | "sim-fd-writes-differ"
            | "sim-side-effects-differ"
            | "declared-change-unseen"
            | "expect-not-met"
            | "expect-met" => Class::BehaviourChange,
            _ => match severity {
                Severity::Blocking => Class::Harm,
                Severity::Warning => Class::Risk,
                Severity::Info => Class::Info,
            },
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Class::Harm => "harm",
            Class::Risk => "risk",
            Class::BehaviourChange => "behaviour change",
            Class::Info => "info",
        }
    }
}

/// One reason, with the evidence behind it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(from = "FindingRecord")]
pub struct Finding {
    /// Stable kebab-case identifier (`entry-too-short`, `new-syscall`, ...):
    /// tests, the model's features and users' scripts key on it.
    pub code: String,
    pub severity: Severity,
    /// Harm, risk, behaviour change or info ([`Class::of`]).
    pub class: Class,
    pub source: Source,
    /// The replaced function concerned, when there is one.
    pub symbol: Option<String>,
    /// The reason, in one sentence a user can act on.
    pub message: String,
    /// Addresses, bytes, instructions, call arguments, metrics...
    pub evidence: serde_json::Value,
}

/// A finding as stored: records written before findings had a class get
/// it from their code.
#[derive(serde::Deserialize)]
struct FindingRecord {
    code: String,
    severity: Severity,
    #[serde(default)]
    class: Option<Class>,
    source: Source,
    symbol: Option<String>,
    message: String,
    evidence: serde_json::Value,
}

impl From<FindingRecord> for Finding {
    fn from(record: FindingRecord) -> Self {
        Finding {
            class: record.class.unwrap_or_else(|| Class::of(&record.code, record.severity)),
            code: record.code,
            severity: record.severity,
            source: record.source,
            symbol: record.symbol,
            message: record.message,
            evidence: record.evidence,
        }
    }
}

impl Finding {
    pub fn new(code: &str, severity: Severity, source: Source, message: impl Into<String>) -> Self {
        Finding {
            code: code.to_string(),
            severity,
            class: Class::of(code, severity),
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

/// Risk findings that live calls repeated without harm answer (the
/// repeats advance the patch's own state and measure its allocations).
pub const REPEATS_ANSWER: &[&str] = &["patch-global-state", "new-allocation", "allocation-unbalanced"];

/// What the simulation observed, as the verdict rule needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Evidence {
    /// Calls simulated to a result (captured and explicit). 0: no
    /// simulation evidence, whatever was asked for.
    pub simulated_calls: u32,
    /// Of them, live calls captured from the running process.
    pub live_calls: u32,
    /// Calls on which the original itself failed: they say nothing.
    pub inconclusive_calls: u32,
    /// Of the live calls, those repeated in the same copies (so the
    /// patch's own state advanced) without harm or leak: to the end, or as
    /// far as the original could repeat them (0 unless one went to the end).
    #[serde(default)]
    pub repeated_calls: u32,
}

/// A verdict and the rule that gave it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Decision {
    pub verdict: Verdict,
    /// The rule, in one sentence.
    pub basis: String,
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

    /// The verdict, in this order: a blocking finding (harm) refuses; a
    /// risk at or above `refuse_at` refuses when simulated calls back it
    /// (on static evidence alone it warns: the model extrapolates there;
    /// and when live calls showed nothing but a change of behaviour, it
    /// warns with that change);
    /// a warning warns; no warning and live calls that showed neither harm
    /// nor an undeclared change proceed, whatever the model's risk (with
    /// no finding left, the risk rests on the patch's size, which alone
    /// predicts nothing: PREDICTION.md); else the risk against `warn_at`.
    /// Evidence only counts when there is some: a capture that caught no
    /// call leaves `evidence` empty, and the verdict is the static one.
    pub fn decide(&self, findings: &[Finding], risk: f64, evidence: &Evidence) -> Decision {
        let codes = |severity: Severity| {
            let mut codes: Vec<&str> = findings
                .iter()
                .filter(|f| f.severity == severity)
                .map(|f| f.code.as_str())
                .collect();
            codes.dedup();
            codes.join(", ")
        };
        let decision = |verdict, basis: String| Decision { verdict, basis };
        let warnings = findings.iter().any(|f| f.severity == Severity::Warning);
        if findings.iter().any(|f| f.severity == Severity::Blocking) {
            return decision(
                Verdict::Refuse,
                format!("blocking finding: {}", codes(Severity::Blocking)),
            );
        }
        let live = evidence.live_calls > 0 && evidence.inconclusive_calls == 0;
        let clean_live = !warnings && live;
        // Live calls that showed only a change of behaviour (no harm, no
        // risk finding) do not let the model's risk refuse: changing
        // behaviour is what a fix does (issue 12), and the model, trained
        // on one program's tiny functions, refuses a real server's benign
        // fix on its size terms alone (PREDICTION.md). It warns, with the
        // examples of the change.
        let only_change_live = live
            && findings
                .iter()
                .filter(|f| f.severity == Severity::Warning)
                .all(|f| f.class == Class::BehaviourChange);
        // Live calls, each repeated, that showed no harm answer the risk
        // findings repeats test: state of the patch's own (it advanced
        // over the repeats) and allocation (the leak measure). With only
        // those beside them, the model's risk warns instead of refusing:
        // a benign call counter of a real server's handler was refused at
        // 0.71–0.98 on its `patch-global-state` warning alone, because the
        // fixture corpus's leaks keep state too (PREDICTION.md). Any other
        // risk finding (a new system call, a new loop) keeps the rule.
        let harmless_repeated_live = live
            && evidence.repeated_calls >= evidence.live_calls
            && findings.iter().all(|f| match f.class {
                Class::Harm => false,
                Class::Risk if f.severity != Severity::Info => REPEATS_ANSWER.contains(&f.code.as_str()),
                _ => true,
            });
        if risk >= self.refuse_at && evidence.simulated_calls > 0 && !only_change_live && !harmless_repeated_live {
            return decision(
                Verdict::Refuse,
                format!(
                    "risk {risk:.2} at or above {:.2}, with {} simulated call{}",
                    self.refuse_at,
                    evidence.simulated_calls,
                    plural(evidence.simulated_calls)
                ),
            );
        }
        if warnings {
            let mut basis = format!("warning: {}", codes(Severity::Warning));
            if risk >= self.refuse_at && harmless_repeated_live && !only_change_live {
                basis.push_str(&format!(
                    "; risk {risk:.2} at or above {:.2}, but {} live call{}, each repeated, showed no harm",
                    self.refuse_at,
                    evidence.live_calls,
                    plural(evidence.live_calls)
                ));
            }
            return decision(Verdict::Warn, basis);
        }
        // Identical behaviour on live calls is evidence only if the calls
        // reached the change. A call that showed any change (declared or
        // not) did; calls that showed nothing may have taken another path
        // through a replaced function (a dispatcher replaced because a
        // changed handler is inlined in it: on Debian's memcached a patch
        // crashing every `delete` proceeded at risk 0.96 on 8 captured
        // sets and gets, PREDICTION.md). With a risk at the refusal
        // threshold, such calls warn instead of proceeding.
        let showed_change = findings.iter().any(|f| f.class == Class::BehaviourChange);
        if clean_live && risk >= self.refuse_at && !showed_change {
            return decision(
                Verdict::Warn,
                format!(
                    "risk {risk:.2} at or above {:.2}; {} live call{} simulated showed no difference, but may not have reached the changed code (capture more calls, or give --call inputs that reach it)",
                    self.refuse_at,
                    evidence.live_calls,
                    plural(evidence.live_calls)
                ),
            );
        }
        if clean_live {
            return decision(
                Verdict::Proceed,
                format!(
                    "no findings, and {} live call{} simulated showed no harm and no undeclared change",
                    evidence.live_calls,
                    plural(evidence.live_calls)
                ),
            );
        }
        if risk >= self.warn_at {
            let evidence = if evidence.simulated_calls == 0 {
                "on static evidence alone".to_string()
            } else {
                format!(
                    "with {} simulated call{} and no live call",
                    evidence.simulated_calls,
                    plural(evidence.simulated_calls)
                )
            };
            return decision(
                Verdict::Warn,
                format!("risk {risk:.2} at or above {:.2} {evidence}", self.warn_at),
            );
        }
        decision(
            Verdict::Proceed,
            format!("no findings, and risk {risk:.2} below {:.2}", self.warn_at),
        )
    }
}

fn plural(count: u32) -> &'static str {
    if count == 1 {
        ""
    } else {
        "s"
    }
}

/// One term of a risk score.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Term {
    /// A feature name, or for a finding-based score the finding's code.
    pub name: String,
    /// The value the scorer read (`None`: not measured, imputed).
    pub value: Option<f64>,
    /// What it added to the score, in the scorer's own units (a
    /// logistic model's log-odds; a noisy-OR's weight).
    pub contribution: f64,
    /// How the value was taken: `measured`, `imputed (...)`, `not scored (...)`.
    pub status: String,
}

/// How a risk was computed, term by term, as honestly as the scorer allows.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Explanation {
    /// The rule that gave the verdict.
    pub basis: String,
    /// The scorer and how its terms combine into the risk.
    pub formula: String,
    /// The terms, largest contribution first.
    pub terms: Vec<Term>,
    /// The scorer's constant (a logistic model's intercept), if any.
    pub intercept: Option<f64>,
    /// The model's probability before the target's context raised it.
    pub model_risk: Option<f64>,
    /// Context findings that raised the risk: `risk = 1 − (1 − model) · Π (1 − w)`.
    pub context: Vec<Term>,
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
    /// Why this verdict and this risk.
    #[serde(default)]
    pub explanation: Explanation,
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

    #[test]
    fn evidence_decides_only_when_there_is_some() {
        let policy = VerdictPolicy::default();
        let none = Evidence::default();
        let live = Evidence {
            simulated_calls: 3,
            live_calls: 3,
            inconclusive_calls: 0,
            repeated_calls: 0,
        };
        let explicit = Evidence {
            simulated_calls: 3,
            live_calls: 0,
            inconclusive_calls: 0,
            repeated_calls: 0,
        };
        // Static evidence alone never refuses on risk...
        assert_eq!(policy.decide(&[], 0.9, &none).verdict, Verdict::Warn);
        // ... simulated calls let it, unless live calls were clean.
        assert_eq!(policy.decide(&[], 0.9, &explicit).verdict, Verdict::Refuse);
        let clean = policy.decide(&[], 0.5, &live);
        assert_eq!(clean.verdict, Verdict::Proceed, "{}", clean.basis);
        assert!(clean.basis.contains("3 live calls"), "{}", clean.basis);
        // Clean live calls with a risk at the refusal threshold may not
        // have reached the change: they warn, not proceed...
        let unreached = policy.decide(&[], 0.9, &live);
        assert_eq!(unreached.verdict, Verdict::Warn, "{}", unreached.basis);
        assert!(unreached.basis.contains("may not have reached"), "{}", unreached.basis);
        // ... unless a call showed the (declared) change: it reached it.
        let declared = Finding::new("sim-return-differs", Severity::Info, Source::Simulation, "d");
        assert_eq!(
            policy.decide(std::slice::from_ref(&declared), 0.9, &live).verdict,
            Verdict::Proceed
        );
        // An inconclusive call is no evidence of identity.
        let inconclusive = Evidence {
            inconclusive_calls: 1,
            ..live
        };
        assert_eq!(policy.decide(&[], 0.5, &inconclusive).verdict, Verdict::Warn);
        // Warnings warn whatever the live calls showed; blocking refuses.
        let warning = Finding::new("added-loop", Severity::Warning, Source::Static, "w");
        let blocking = Finding::new("sim-patched-crashes", Severity::Blocking, Source::Simulation, "b");
        assert_eq!(
            policy.decide(std::slice::from_ref(&warning), 0.0, &live).verdict,
            Verdict::Warn
        );
        let refused = policy.decide(&[warning.clone(), blocking], 0.0, &live);
        assert_eq!(refused.verdict, Verdict::Refuse);
        assert!(refused.basis.contains("sim-patched-crashes"), "{}", refused.basis);
        // Live calls showing only a change of behaviour: the model's risk
        // warns with it, never refuses; a risk finding beside it, or calls
        // that were not live, let the risk refuse.
        let change = Finding::new("sim-return-differs", Severity::Warning, Source::Simulation, "c");
        let changed = policy.decide(std::slice::from_ref(&change), 0.99, &live);
        assert_eq!(changed.verdict, Verdict::Warn, "{}", changed.basis);
        assert!(changed.basis.contains("sim-return-differs"), "{}", changed.basis);
        assert_eq!(
            policy.decide(std::slice::from_ref(&change), 0.99, &explicit).verdict,
            Verdict::Refuse
        );
        assert_eq!(
            policy.decide(&[change.clone(), warning.clone()], 0.99, &live).verdict,
            Verdict::Refuse
        );
        assert_eq!(policy.decide(&[change], 0.99, &inconclusive).verdict, Verdict::Refuse);
    }

    #[test]
    fn live_calls_repeated_without_harm_turn_a_risky_refusal_into_a_warning() {
        let policy = VerdictPolicy::default();
        let repeated = Evidence {
            simulated_calls: 3,
            live_calls: 3,
            inconclusive_calls: 0,
            repeated_calls: 3,
        };
        let state = Finding::new("patch-global-state", Severity::Warning, Source::Static, "s");
        let warned = policy.decide(std::slice::from_ref(&state), 0.95, &repeated);
        assert_eq!(warned.verdict, Verdict::Warn, "{}", warned.basis);
        assert!(
            warned.basis.contains("each repeated, showed no harm"),
            "{}",
            warned.basis
        );
        // Not every live call repeated to the end: the risk refuses.
        let partly = Evidence {
            repeated_calls: 2,
            ..repeated
        };
        assert_eq!(
            policy.decide(std::slice::from_ref(&state), 0.95, &partly).verdict,
            Verdict::Refuse
        );
        // A harm finding beside them (a warning of class harm) refuses.
        let critical = Finding::new("sim-critical-differs", Severity::Warning, Source::Simulation, "c");
        assert_eq!(
            policy.decide(&[state.clone(), critical], 0.95, &repeated).verdict,
            Verdict::Refuse
        );
        // A risk finding repeats do not test (a new system call) keeps
        // the rule: the risk refuses.
        let syscall = Finding::new("new-syscall", Severity::Warning, Source::Static, "n");
        assert_eq!(
            policy.decide(&[state.clone(), syscall], 0.95, &repeated).verdict,
            Verdict::Refuse
        );
        // Repeats do not turn an unreached change into a proceed.
        assert_eq!(policy.decide(&[], 0.95, &repeated).verdict, Verdict::Warn);
        // Blocking still refuses.
        let leak = Finding::new("sim-patched-leaks", Severity::Blocking, Source::Simulation, "l");
        assert_eq!(policy.decide(&[state, leak], 0.1, &repeated).verdict, Verdict::Refuse);
    }

    #[test]
    fn classes_follow_codes_then_severity_and_old_records_get_one() {
        assert_eq!(Class::of("sim-patched-hangs", Severity::Blocking), Class::Harm);
        assert_eq!(Class::of("sim-critical-differs", Severity::Warning), Class::Harm);
        assert_eq!(
            Class::of("sim-return-differs", Severity::Warning),
            Class::BehaviourChange
        );
        assert_eq!(Class::of("sim-return-differs", Severity::Info), Class::BehaviourChange);
        assert_eq!(Class::of("added-loop", Severity::Warning), Class::Risk);
        assert_eq!(Class::of("entry-too-short", Severity::Blocking), Class::Harm);
        assert_eq!(Class::of("register-thunk", Severity::Info), Class::Info);
        let old = r#"{"code":"sim-return-differs","severity":"warning","source":"simulation","symbol":null,"message":"m","evidence":null}"#;
        let finding: Finding = serde_json::from_str(old).unwrap();
        assert_eq!(finding.class, Class::BehaviourChange);
        let json = serde_json::to_value(&finding).unwrap();
        assert_eq!(json["class"], "behaviour_change");
    }
}
