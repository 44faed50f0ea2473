//! What the manifest says the patch means to change, checked against what
//! the simulation saw. A `[[replace]]` with `behaviour = "changed"` turns
//! the simulation's behaviour-change findings (other returns, writes,
//! side effects) into information: they are the point of the patch. Its
//! `expect` entries run as explicit calls and must return what they say
//! (else the patch does not do what its manifest declares: blocking). A
//! declared change that no simulated call shows is a warning. Without a
//! declaration, a behaviour change stays a warning with its examples.

use crate::finding::{Class, Finding, Severity, Source};
use crate::simulate::{CallOrigin, CallSpec, CallVerdict, Outcome, SimulatedCall};
use serde_json::json;
use shadowpatch_patch::manifest::{Behaviour, Replacement};
use shadowpatch_patch::survey::Survey;

/// Where expectation `j` of replacement `i` comes from (a call's origin).
fn origin(survey: &Survey, i: usize, j: usize) -> String {
    format!("{}: replace[{i}].expect[{j}]", survey.manifest_path.display())
}

/// The explicit calls the manifest's expectations ask for.
pub fn expectation_calls(survey: &Survey) -> Vec<CallSpec> {
    let mut calls = Vec::new();
    for (i, replacement) in survey.manifest.replacements.iter().enumerate() {
        for (j, expectation) in replacement.expect.iter().enumerate() {
            calls.push(CallSpec {
                function: replacement.symbol.clone(),
                arguments: expectation.args.iter().map(|a| *a as u64).collect(),
                text: expectation.call_text(&replacement.symbol),
                origin: origin(survey, i, j),
            });
        }
    }
    calls
}

/// Whether the manifest gives expectations (they need a simulation).
pub fn has_expectations(survey: &Survey) -> bool {
    survey.manifest.replacements.iter().any(|r| !r.expect.is_empty())
}

fn is_behaviour_finding(finding: &Finding) -> bool {
    finding.source == Source::Simulation && finding.class == Class::BehaviourChange
}

fn changed(call: &SimulatedCall) -> bool {
    call.comparison.verdict == CallVerdict::Diverged
        && (call.comparison.return_differs || call.comparison.fd_writes_differ || call.comparison.side_effects_differ)
}

/// Review the simulation's findings of `calls` against the declarations.
pub fn review(survey: &Survey, calls: &[SimulatedCall], findings: &mut Vec<Finding>) {
    for (i, replacement) in survey.manifest.replacements.iter().enumerate() {
        let symbol = replacement.symbol.as_str();
        let mine = |f: &Finding| f.symbol.as_deref() == Some(symbol) && is_behaviour_finding(f);
        if replacement.behaviour == Behaviour::Preserved {
            for finding in findings.iter_mut().filter(|f| mine(f)) {
                finding.message.push_str(&format!(
                    " (if intended, declare behaviour = \"changed\" on the [[replace]] of {symbol})"
                ));
            }
            continue;
        }
        for finding in findings.iter_mut().filter(|f| mine(f)) {
            finding.severity = Severity::Info;
            finding.message = format!("declared (behaviour = \"changed\"): {}", finding.message);
        }
        let mut expected_change_seen = false;
        for (j, expectation) in replacement.expect.iter().enumerate() {
            let given = origin(survey, i, j);
            let call = calls
                .iter()
                .find(|c| matches!(&c.origin, CallOrigin::Explicit { given: g, .. } if *g == given));
            findings.push(expectation_finding(replacement, &given, expectation, call));
            if call.is_some_and(|c| changed(c) && returned_value(c).is_some_and(|v| expectation.met_by(v))) {
                expected_change_seen = true;
            }
        }
        let live: Vec<&SimulatedCall> = calls
            .iter()
            .filter(|c| c.symbol == symbol && matches!(c.origin, CallOrigin::Captured { .. }))
            .collect();
        let live_changed = live.iter().filter(|c| changed(c)).count();
        let simulated = calls.iter().any(|c| c.symbol == symbol);
        if simulated && live_changed == 0 && !expected_change_seen {
            findings.push(
                Finding::new(
                    "declared-change-unseen",
                    Severity::Warning,
                    Source::Simulation,
                    format!(
                        "{symbol} declares behaviour = \"changed\", but none of its {} simulated call{} ({} live) behaved differently from the original: the patch may not do what it means to, or the calls missed the inputs it changes (give them with expect = [...] or --call)",
                        calls.iter().filter(|c| c.symbol == symbol).count(),
                        if calls.iter().filter(|c| c.symbol == symbol).count() == 1 { "" } else { "s" },
                        live.len()
                    ),
                )
                .symbol(symbol)
                .evidence(json!({ "live_calls": live.len(), "changed_live_calls": live_changed })),
            );
        }
    }
}

fn returned_value(call: &SimulatedCall) -> Option<u64> {
    match call.patched.outcome {
        Outcome::Returned { value, .. } => Some(value),
        _ => None,
    }
}

fn expectation_finding(
    replacement: &Replacement,
    given: &str,
    expectation: &shadowpatch_patch::manifest::Expectation,
    call: Option<&SimulatedCall>,
) -> Finding {
    let text = expectation.call_text(&replacement.symbol);
    let Some(call) = call else {
        return Finding::new(
            "expect-not-met",
            Severity::Warning,
            Source::Simulation,
            format!("{given}: {text} was not simulated, so its expected result is unchecked"),
        )
        .symbol(&replacement.symbol);
    };
    let original = call.original.outcome.describe();
    let evidence = json!({
        "expectation": given,
        "call": text,
        "expected": expectation.returns,
        "original": call.original.outcome,
        "patched": call.patched.outcome,
    });
    match returned_value(call) {
        Some(value) if expectation.met_by(value) => Finding::new(
            "expect-met",
            Severity::Info,
            Source::Simulation,
            format!(
                "{text} returned {} as the manifest expects (the original {original})",
                expectation.returns
            ),
        ),
        _ => Finding::new(
            "expect-not-met",
            Severity::Blocking,
            Source::Simulation,
            format!(
                "{text} {} where the manifest ({given}) expects {}: the patch does not do what it declares (the original {original})",
                call.patched.outcome.describe(),
                expectation.returns
            ),
        ),
    }
    .symbol(&replacement.symbol)
    .evidence(evidence)
}

/// Notes for declared changes when no call was simulated.
pub fn unconfirmed(survey: &Survey) -> Vec<String> {
    survey
        .manifest
        .replacements
        .iter()
        .filter(|r| r.behaviour == Behaviour::Changed)
        .map(|r| {
            format!(
                "declared change of {}: no simulated call shows it (--capture N, or expect = [...] in the manifest)",
                r.symbol
            )
        })
        .collect()
}
