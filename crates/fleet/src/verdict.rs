//! The fleet's verdict on a host's evidence: the host's findings, the
//! fleet's own (`fleet-history`: what this patch did on this build-id on
//! other hosts), the risk of the fleet's current model and the host's
//! policy, decided the way the host's engine decides
//! (`shadowpatch_predict::engine::analyze_detailed`). Pure: no I/O.

use crate::storage::FleetHistory;
use shadowpatch_predict::finding::{Class, Evidence, Finding, Severity, Source};
use shadowpatch_predict::remote::{ModelVersion, OutcomeKind, VerdictRequest, VerdictResponse};
use shadowpatch_predict::{ModelRisk, RiskScorer};
use std::collections::BTreeMap;

/// The code of the fleet-only finding.
pub const FLEET_HISTORY: &str = "fleet-history";

/// The `fleet-history` finding for a request from `asking_host`, if
/// other hosts reported outcomes of the patch: blocking harm when at
/// least one of them was harmful ([`OutcomeKind::is_harm`]), else info.
/// The asking host's own outcomes are in its own event history.
pub fn history_finding(history: &FleetHistory, asking_host: &str) -> Option<Finding> {
    let others: BTreeMap<&String, &BTreeMap<String, u64>> = history
        .by_host
        .iter()
        .filter(|(host, _)| host.as_str() != asking_host)
        .collect();
    if others.is_empty() {
        return None;
    }
    let is_harm = |kind: &str| {
        serde_json::from_value::<OutcomeKind>(serde_json::Value::String(kind.to_string()))
            .is_ok_and(OutcomeKind::is_harm)
    };
    let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
    let mut harmed_hosts = Vec::new();
    for (host, kinds) in &others {
        for (kind, count) in kinds.iter() {
            *counts.entry(kind.as_str()).or_default() += count;
        }
        if kinds.keys().any(|kind| is_harm(kind)) {
            harmed_hosts.push(host.as_str());
        }
    }
    let harmful: u64 = counts.iter().filter(|(kind, _)| is_harm(kind)).map(|(_, n)| n).sum();
    let total: u64 = counts.values().sum();
    let evidence = serde_json::json!({
        "hosts": others.keys().collect::<Vec<_>>(),
        "harmed_hosts": harmed_hosts,
        "harmful_outcomes": harmful,
        "outcomes": total,
        "by_kind": counts,
        "by_host": others,
    });
    let finding = if harmful > 0 {
        let mut finding = Finding::new(
            FLEET_HISTORY,
            Severity::Blocking,
            Source::Model,
            format!(
                "{harmful} harmful outcome{} of this patch on this build-id on {} other host{} ({}): {}",
                plural(harmful),
                harmed_hosts.len(),
                plural(harmed_hosts.len() as u64),
                harmed_hosts.join(", "),
                summary(&counts)
            ),
        );
        finding.class = Class::Harm;
        finding
    } else {
        Finding::new(
            FLEET_HISTORY,
            Severity::Info,
            Source::Model,
            format!(
                "{total} outcome{} of this patch on this build-id on {} other host{}, none harmful: {}",
                plural(total),
                others.len(),
                plural(others.len() as u64),
                summary(&counts)
            ),
        )
    };
    Some(finding.evidence(evidence))
}

fn summary(counts: &BTreeMap<&str, u64>) -> String {
    counts
        .iter()
        .map(|(kind, n)| format!("{n} {kind}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn plural(count: u64) -> &'static str {
    if count == 1 {
        ""
    } else {
        "s"
    }
}

/// Score and decide `request` with `model`. The host's own
/// `risk-unconfirmed` finding is its model's and is dropped: the fleet's
/// model gives its own when its risk needs confirming.
pub fn decide(
    analysis_id: String,
    request: &VerdictRequest,
    model: &ModelRisk,
    version: &ModelVersion,
    history: &FleetHistory,
) -> VerdictResponse {
    let mut findings: Vec<Finding> = request
        .findings
        .iter()
        .filter(|f| f.code != "risk-unconfirmed")
        .cloned()
        .collect();
    // Harm refuses, as in the host's engine.
    for finding in &mut findings {
        if finding.class == Class::Harm && finding.severity == Severity::Warning {
            finding.severity = Severity::Blocking;
        }
    }
    let mut fleet_findings: Vec<Finding> = history_finding(history, &request.host).into_iter().collect();
    findings.extend(fleet_findings.iter().cloned());
    let risk = model.score(&findings, &request.features);
    let evidence: &Evidence = &request.evidence;
    let blocking = findings.iter().any(|f| f.severity == Severity::Blocking);
    if risk >= request.policy.refuse_at && !blocking && evidence.simulated_calls == 0 {
        let unconfirmed = Finding::new(
            "risk-unconfirmed",
            Severity::Warning,
            Source::Model,
            format!(
                "the fleet model's risk is {risk:.2} (refuse at {:.2}) on static evidence alone: simulate the \
                 patch (--capture N or --call) to confirm it before a refusal",
                request.policy.refuse_at
            ),
        )
        .evidence(serde_json::json!({ "risk": risk, "refuse_at": request.policy.refuse_at }));
        findings.push(unconfirmed.clone());
        fleet_findings.push(unconfirmed);
    }
    let decision = request.policy.decide(&findings, risk, evidence);
    let mut explanation = model.explain(&findings, &request.features);
    explanation.basis = decision.basis;
    VerdictResponse {
        analysis_id,
        risk,
        verdict: decision.verdict,
        explanation,
        model: version.clone(),
        fleet_findings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadowpatch_predict::finding::{Verdict, VerdictPolicy};

    fn request(host: &str) -> VerdictRequest {
        VerdictRequest {
            host: host.into(),
            patch_id: "p".into(),
            build_id: Some("ab".into()),
            program: None,
            findings: Vec::new(),
            features: BTreeMap::new(),
            evidence: Evidence::default(),
            policy: VerdictPolicy::default(),
        }
    }

    fn history(entries: &[(&str, &str, u64)]) -> FleetHistory {
        let mut history = FleetHistory::default();
        for (host, kind, n) in entries {
            history
                .by_host
                .entry(host.to_string())
                .or_default()
                .insert(kind.to_string(), *n);
        }
        history
    }

    #[test]
    fn harm_on_other_hosts_refuses_and_the_asking_hosts_own_does_not() {
        let model = ModelRisk::embedded().unwrap();
        let version = ModelVersion {
            version: 0,
            name: "built-in".into(),
            trained_on: 0,
            held_out_auc: None,
        };
        let clean = decide("a".into(), &request("h1"), &model, &version, &FleetHistory::default());
        assert_ne!(clean.verdict, Verdict::Refuse);
        assert!(clean.fleet_findings.is_empty());
        let harmed = history(&[("h2", "crashed", 1), ("h3", "kept", 2)]);
        let refused = decide("b".into(), &request("h1"), &model, &version, &harmed);
        assert_eq!(refused.verdict, Verdict::Refuse);
        let finding = &refused.fleet_findings[0];
        assert_eq!((finding.code.as_str(), finding.class), (FLEET_HISTORY, Class::Harm));
        assert_eq!(finding.evidence["harmful_outcomes"], 1);
        assert_eq!(finding.evidence["harmed_hosts"], serde_json::json!(["h2"]));
        assert!(
            refused.explanation.basis.contains(FLEET_HISTORY),
            "{}",
            refused.explanation.basis
        );
        // h2 asking about its own crash: only h3's kept outcomes are news.
        let own = decide("c".into(), &request("h2"), &model, &version, &harmed);
        assert_ne!(own.verdict, Verdict::Refuse);
        assert_eq!(own.fleet_findings[0].severity, Severity::Info);
    }
}
