//! The verdict on live targets: harm refuses, a behaviour change warns
//! with examples unless the manifest declares it (and declared expected
//! results are checked), a capture that caught no call is no evidence,
//! and every verdict explains its score.

use crate::common::{capturing, Live};
use shadowpatch_predict::engine::{analyze_detailed, AnalysisRequest};
use shadowpatch_predict::simulate::SimulationSection;
use shadowpatch_predict::{Analysis, Class, Finding, Severity, Verdict};
use std::path::Path;
use std::time::Duration;

/// The full engine (static analysis and a simulation with `options`) on
/// the patch at `manifest`.
fn analyze(
    live: &Live,
    manifest: &Path,
    options: Option<shadowpatch_predict::simulate::SimulationOptions>,
) -> Analysis {
    let survey = shadowpatch_predict::survey_for_analysis(live.pid(), manifest, &live.state()).unwrap();
    let mut request = AnalysisRequest::new(&survey, &live.state());
    if let Some(options) = options {
        request.sections.push(Box::new(SimulationSection::new(options)));
    }
    analyze_detailed(request).unwrap().analysis
}

/// `manifest` with `extra` lines appended to its (last) `[[replace]]`.
fn declare(manifest: &Path, name: &str, extra: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(manifest).unwrap();
    let path = manifest.with_file_name(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!("{}{extra}\n", text.replacen("id = \"", &format!("id = \"{name}-"), 1)),
    )
    .unwrap();
    path
}

fn find<'a>(analysis: &'a Analysis, code: &str) -> &'a Finding {
    analysis
        .findings
        .iter()
        .find(|f| f.code == code)
        .unwrap_or_else(|| panic!("no {code} in {:#?}", analysis.findings))
}

fn codes(analysis: &Analysis) -> Vec<&str> {
    analysis.findings.iter().map(|f| f.code.as_str()).collect()
}

#[test]
fn a_behaviour_change_warns_unless_declared_and_declared_results_are_checked() {
    let mut live = Live::sim(2);
    let compute = live.target.number("compute");
    let original = live.byte_at(compute);
    // compute_wrong returns 3x + 2 where compute returns 3x + 1.
    let changed = live.manifest("changed", &[("compute", "compute_wrong")]);

    let undeclared = analyze(&live, &changed, Some(capturing(3)));
    assert_eq!(undeclared.verdict, Verdict::Warn, "{:#?}", undeclared.findings);
    let differs = find(&undeclared, "sim-return-differs");
    assert_eq!(
        (differs.severity, differs.class),
        (Severity::Warning, Class::BehaviourChange)
    );
    assert!(
        differs.message.contains("declare behaviour = \"changed\""),
        "{}",
        differs.message
    );
    assert_eq!(
        differs.evidence["examples"].as_array().unwrap().len(),
        3,
        "with examples"
    );
    assert!(
        undeclared.explanation.basis.contains("sim-return-differs"),
        "{}",
        undeclared.explanation.basis
    );

    // Declared, with a result it meets: the change is information, the
    // live calls showed no harm: proceed.
    let declared = declare(
        &changed,
        "declared",
        "behaviour = \"changed\"\nexpect = [{ args = [5], returns = 17 }]",
    );
    let analysis = analyze(&live, &declared, Some(capturing(3)));
    assert_eq!(
        analysis.verdict,
        Verdict::Proceed,
        "{:#?}\n{}",
        analysis.findings,
        analysis.explanation.basis
    );
    let differs = find(&analysis, "sim-return-differs");
    assert_eq!(
        (differs.severity, differs.class),
        (Severity::Info, Class::BehaviourChange)
    );
    assert_eq!(find(&analysis, "expect-met").severity, Severity::Info);
    assert_eq!(analysis.features["sim_explicit_calls"], 1.0);
    assert!(
        analysis.explanation.basis.contains("3 live calls"),
        "{}",
        analysis.explanation.basis
    );

    // A result it does not meet: the patch does not do what it declares.
    let wrong = declare(
        &changed,
        "wrong",
        "behaviour = \"changed\"\nexpect = [{ args = [5], returns = 16 }]",
    );
    let analysis = analyze(&live, &wrong, Some(capturing(2)));
    assert_eq!(analysis.verdict, Verdict::Refuse, "{:#?}", analysis.findings);
    let unmet = find(&analysis, "expect-not-met");
    assert_eq!(unmet.severity, Severity::Blocking);
    assert!(
        unmet.message.contains("compute(5) returned 17") && unmet.message.contains("expects 16"),
        "{}",
        unmet.message
    );

    // Expected results alone run as explicit calls (no capture asked).
    let options = shadowpatch_predict::simulate::SimulationOptions {
        limits: capturing(1).limits,
        ..Default::default()
    };
    let analysis = analyze(&live, &declared, Some(options));
    assert!(codes(&analysis).contains(&"expect-met"), "{:?}", codes(&analysis));

    // A declared change no call shows warns.
    let same = live.manifest("same", &[("compute", "compute_same")]);
    let unseen = declare(&same, "unseen", "behaviour = \"changed\"");
    let analysis = analyze(&live, &unseen, Some(capturing(3)));
    assert_eq!(analysis.verdict, Verdict::Warn, "{:#?}", analysis.findings);
    let finding = find(&analysis, "declared-change-unseen");
    assert_eq!(
        (finding.severity, finding.class),
        (Severity::Warning, Class::BehaviourChange)
    );
    live.assert_untouched(&[(compute, original)]);
}

#[test]
fn harm_refuses_and_identical_live_calls_proceed_each_with_its_explanation() {
    let mut live = Live::sim(2);
    let compute = live.target.number("compute");
    let original = live.byte_at(compute);
    let crash = live.manifest("crash", &[("compute", "compute_crash")]);
    let analysis = analyze(&live, &crash, Some(capturing(2)));
    assert_eq!(analysis.verdict, Verdict::Refuse);
    let crashes = find(&analysis, "sim-patched-crashes");
    assert_eq!((crashes.severity, crashes.class), (Severity::Blocking, Class::Harm));
    assert_eq!(analysis.explanation.basis, "blocking finding: sim-patched-crashes");
    // The terms add up to the risk, and the crash rate pushes it up.
    let explanation = &analysis.explanation;
    let z: f64 = explanation.intercept.unwrap() + explanation.terms.iter().map(|t| t.contribution).sum::<f64>();
    let model = shadowpatch_predict::ModelFile::embedded().unwrap();
    assert!((model.calibration.probability(z) - analysis.risk).abs() < 1e-9);
    let crash_term = explanation.terms.iter().find(|t| t.name == "sim_rate_crashes").unwrap();
    assert!(crash_term.contribution > 0.5, "{crash_term:?}");

    let same = live.manifest("same", &[("compute", "compute_same")]);
    let analysis = analyze(&live, &same, Some(capturing(3)));
    assert_eq!(analysis.verdict, Verdict::Proceed, "{:#?}", analysis.findings);
    assert!(
        analysis.explanation.basis.contains("3 live calls"),
        "{}",
        analysis.explanation.basis
    );
    assert!(!analysis.explanation.terms.is_empty());
    live.assert_untouched(&[(compute, original)]);
}

#[test]
fn a_capture_that_caught_no_call_is_no_evidence_and_never_lowers_the_risk() {
    let mut live = Live::sim(1);
    let divide = live.target.number("divide");
    let original = live.byte_at(divide);
    // divide is never called by the live fixture.
    let manifest = live.manifest("safe", &[("divide", "divide_safe")]);
    let without = analyze(&live, &manifest, None);
    let mut options = capturing(2);
    options.capture.as_mut().unwrap().within = Some(Duration::from_millis(300));
    let with = analyze(&live, &manifest, Some(options));
    assert_eq!(with.features["sim_calls"], 0.0);
    assert!(
        (with.risk - without.risk).abs() < 1e-9,
        "{} vs {}",
        with.risk,
        without.risk
    );
    assert_eq!(with.verdict, without.verdict);
    assert!(
        with.unavailable
            .iter()
            .any(|u| u.contains("no call was simulated, so it gives no evidence")),
        "{:?}",
        with.unavailable
    );
    let imputed = with
        .explanation
        .terms
        .iter()
        .find(|t| t.name == "sim_rate_crashes")
        .unwrap();
    assert_eq!((imputed.value, imputed.contribution), (None, 0.0));
    assert!(imputed.status.starts_with("imputed"), "{}", imputed.status);
    live.assert_untouched(&[(divide, original)]);
}
