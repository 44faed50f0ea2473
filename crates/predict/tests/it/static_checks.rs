//! Each static check against its purpose-built patch on a live target
//! (analysis_target.c, with and without DWARF): the finding appears with
//! its code and severity, and the benign replacements trip none.

use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use shadowpatch_predict::{analyze_static, survey_for_analysis, Finding, PredictError, Severity, StaticReport};
use std::path::{Path, PathBuf};

/// The static analysis of the patch at `manifest`, read and surveyed as
/// the operations layer does for a path.
fn analyze_path(pid: i32, manifest: &Path, state_dir: &Path) -> Result<StaticReport, PredictError> {
    analyze_static(&survey_for_analysis(pid, manifest, state_dir)?, state_dir)
}

struct Target {
    running: Running,
    object: PathBuf,
    build_id: String,
    dir: tempfile::TempDir,
}

impl Target {
    fn start(fixture: Fixture, patch: Patch) -> Target {
        let running = Running::start(fixture, &[]).unwrap();
        let image = shadowpatch_symbols::ElfImage::open(&running.binary()).unwrap();
        Target {
            build_id: shadowpatch_symbols::hex(image.build_id.as_deref().unwrap()),
            object: build_patch(patch).unwrap(),
            running,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn manifest(&self, id: &str, replacements: &[(&str, &str)]) -> PathBuf {
        let mut text = format!(
            "id = \"{id}\"\nobject = \"{}\"\n[target]\nbuild_id = \"{}\"\n",
            self.object.display(),
            self.build_id
        );
        for (symbol, with) in replacements {
            text.push_str(&format!("[[replace]]\nsymbol = \"{symbol}\"\nwith = \"{with}\"\n"));
        }
        let path = self.dir.path().join(format!("{id}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn analyze(&self, symbol: &str, with: &str) -> StaticReport {
        let manifest = self.manifest(with, &[(symbol, with)]);
        analyze_path(self.running.pid(), &manifest, &self.dir.path().join("state")).unwrap()
    }
}

fn describe(findings: &[Finding]) -> String {
    findings
        .iter()
        .map(|f| format!("{:?} {}: {}", f.severity, f.code, f.message))
        .collect::<Vec<_>>()
        .join("\n")
}

fn assert_finding(report: &StaticReport, code: &str, severity: Severity, method: Option<&str>) {
    let found = report
        .findings
        .iter()
        .find(|f| f.code == code)
        .unwrap_or_else(|| panic!("no {code} among:\n{}", describe(&report.findings)));
    assert_eq!(found.severity, severity, "{code}: {}", found.message);
    if let Some(method) = method {
        assert_eq!(found.evidence["method"], method, "{code}: {}", found.evidence);
    }
    assert_eq!(
        report.features[&format!("static.{code}")],
        1.0,
        "{code} counted as a feature"
    );
}

fn assert_benign(report: &StaticReport) {
    let serious: Vec<Finding> = report
        .findings
        .iter()
        .filter(|f| f.severity != Severity::Info)
        .cloned()
        .collect();
    assert!(serious.is_empty(), "benign patch flagged:\n{}", describe(&serious));
}

const DWARF: Option<&str> = Some("dwarf");
const HEURISTIC: Option<&str> = Some("register-use heuristic");

#[test]
fn with_dwarf_each_check_fires_on_its_patch_and_benign_patches_are_clean() {
    let mut target = Target::start(Fixture::AnalysisTarget, Patch::Analysis);
    assert_benign(&target.analyze("add_values", "add_values_ok"));
    assert_benign(&target.analyze("plain_compute", "plain_compute_ok"));
    // A `.cold` part jumping back into its parent is no recursion.
    assert_benign(&target.analyze("plain_compute", "plain_compute_cold"));
    // A replacement that allocates less than the old function is fine.
    assert_benign(&target.analyze("make_buffer", "plain_compute_ok"));
    let report = target.analyze("add_values", "add_values_ok");
    assert_eq!(report.features["static.dwarf_target"], 1.0);
    assert_eq!(report.features["static.abi_dwarf_compared"], 1.0);

    let cases: &[(&str, &str, &str, Severity, Option<&str>)] = &[
        (
            "add_values",
            "add_values_three",
            "abi-parameter-count",
            Severity::Blocking,
            DWARF,
        ),
        (
            "add_values",
            "add_values_double",
            "abi-return-type",
            Severity::Blocking,
            DWARF,
        ),
        (
            "scale_value",
            "scale_value_long",
            "abi-parameter-class",
            Severity::Blocking,
            DWARF,
        ),
        (
            "sum_point",
            "sum_point_v2",
            "struct-layout-changed",
            Severity::Blocking,
            DWARF,
        ),
        (
            "cc_target",
            "cc_target_ms",
            "calling-convention",
            Severity::Blocking,
            None,
        ),
        (
            "read_counter",
            "read_counter_narrow",
            "global-type-changed",
            Severity::Blocking,
            DWARF,
        ),
        (
            "read_counter",
            "read_counter_narrow",
            "global-access-changed",
            Severity::Warning,
            Some("access pattern"),
        ),
        (
            "read_limit",
            "read_limit_v2",
            "global-type-changed",
            Severity::Blocking,
            DWARF,
        ),
        (
            "read_limit",
            "read_limit_v2",
            "global-access-changed",
            Severity::Blocking,
            None,
        ),
        (
            "plain_compute",
            "plain_compute_syscall",
            "new-syscall",
            Severity::Warning,
            None,
        ),
        (
            "plain_compute",
            "plain_compute_raw_syscall",
            "new-syscall",
            Severity::Warning,
            None,
        ),
        (
            "plain_compute",
            "plain_compute_alloc",
            "new-allocation",
            Severity::Warning,
            None,
        ),
        (
            "plain_compute",
            "plain_compute_alloc",
            "allocation-unbalanced",
            Severity::Warning,
            None,
        ),
        (
            "plain_compute",
            "plain_compute_state",
            "patch-global-state",
            Severity::Warning,
            None,
        ),
        (
            "plain_compute",
            "plain_compute_recursive",
            "recursion",
            Severity::Warning,
            None,
        ),
        (
            "plain_compute",
            "plain_compute_via_old",
            "recursion-through-patch",
            Severity::Blocking,
            None,
        ),
        (
            "plain_compute",
            "plain_compute_loop",
            "added-loop",
            Severity::Warning,
            None,
        ),
        ("lookup", "lookup_reinit", "calls-init-only", Severity::Warning, None),
        (
            "init_table",
            "init_table_replacement",
            "init-only-function",
            Severity::Warning,
            None,
        ),
    ];
    for (symbol, with, code, severity, method) in cases {
        let report = target.analyze(symbol, with);
        assert_finding(&report, code, *severity, *method);
    }
    let narrow = target.analyze("add_values", "add_values_narrow");
    assert_eq!(
        narrow
            .findings
            .iter()
            .filter(|f| f.code == "abi-parameter-size")
            .count(),
        2,
        "both parameters narrowed:\n{}",
        describe(&narrow.findings)
    );
    // A leaking allocation is no loop: the jump back to a shared epilogue is not counted.
    let alloc = target.analyze("plain_compute", "plain_compute_alloc");
    assert!(
        !alloc.findings.iter().any(|f| f.code == "added-loop"),
        "{}",
        describe(&alloc.findings)
    );
    assert_eq!(target.running.check().unwrap()["errors"], 0, "the target kept working");
}

#[test]
fn without_dwarf_the_register_use_heuristic_decides_and_says_so() {
    let target = Target::start(Fixture::AnalysisTargetNoDebug, Patch::AnalysisNoDebug);
    assert_benign(&target.analyze("add_values", "add_values_ok"));
    assert_benign(&target.analyze("plain_compute", "plain_compute_ok"));
    let report = target.analyze("add_values", "add_values_ok");
    assert_eq!(report.features["static.dwarf_target"], 0.0);
    assert_eq!(report.features["static.abi_heuristic_compared"], 1.0);
    let cases: &[(&str, &str, &str, Severity, Option<&str>)] = &[
        (
            "add_values",
            "add_values_three",
            "abi-parameter-count",
            Severity::Warning,
            HEURISTIC,
        ),
        (
            "cc_target",
            "cc_target_ms",
            "calling-convention",
            Severity::Warning,
            HEURISTIC,
        ),
        (
            "scale_value",
            "scale_value_long",
            "calling-convention",
            Severity::Warning,
            HEURISTIC,
        ),
        (
            "read_counter",
            "read_counter_narrow",
            "global-access-changed",
            Severity::Warning,
            Some("access pattern"),
        ),
        (
            "read_limit",
            "read_limit_v2",
            "global-access-changed",
            Severity::Blocking,
            None,
        ),
        (
            "plain_compute",
            "plain_compute_syscall",
            "new-syscall",
            Severity::Warning,
            None,
        ),
        (
            "plain_compute",
            "plain_compute_via_old",
            "recursion-through-patch",
            Severity::Blocking,
            None,
        ),
        (
            "init_table",
            "init_table_replacement",
            "init-only-function",
            Severity::Warning,
            None,
        ),
    ];
    for (symbol, with, code, severity, method) in cases {
        assert_finding(&target.analyze(symbol, with), code, *severity, *method);
    }
}

/// Where apply stops at the first problem, the analysis reports them all.
#[test]
fn every_problem_of_a_bad_patch_is_collected_not_only_the_first() {
    let target = Target::start(Fixture::BusyC, Patch::BusyFix);
    let manifest = target.manifest(
        "many-problems",
        &[
            ("tiny", "tiny_v2"),
            ("branchy", "branchy_v2"),
            ("no_such_fn", "work_fn_v2"),
            ("scale", "work_fn_v2"),
            ("work_fn", "missing_v2"),
            ("banner", "banner_v2"),
        ],
    );
    let report = analyze_path(target.running.pid(), &manifest, &target.dir.path().join("state")).unwrap();
    let codes: Vec<&str> = report.findings.iter().map(|f| f.code.as_str()).collect();
    for code in [
        "entry-too-short",
        "inbound-branch",
        "unknown-symbol",
        "not-a-function",
        "unknown-replacement",
    ] {
        assert!(codes.contains(&code), "{code} missing: {codes:?}");
    }
    let blocking: Vec<&Finding> = report
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Blocking)
        .collect();
    assert_eq!(blocking.len(), 5, "{}", describe(&report.findings));
    for finding in blocking {
        assert!(finding.evidence["apply_error"].is_string(), "{}", finding.evidence);
    }
    // banner → banner_v2 is fine: nothing about it.
    assert!(!report
        .findings
        .iter()
        .any(|f| f.symbol.as_deref() == Some("banner") && f.severity != Severity::Info));
    let wrong_build = target.dir.path().join("wrong.toml");
    std::fs::write(
        &wrong_build,
        std::fs::read_to_string(&manifest)
            .unwrap()
            .replace(&target.build_id, "00ff00ff00ff"),
    )
    .unwrap();
    let report = analyze_path(target.running.pid(), &wrong_build, Path::new("/nonexistent")).unwrap();
    let mismatch = report
        .findings
        .iter()
        .find(|f| f.code == "build-id-mismatch")
        .expect("build-id finding");
    assert_eq!(mismatch.evidence["apply_error"], "bad_input");
    // The object-side problem is still reported beside it.
    assert!(report.findings.iter().any(|f| f.code == "unknown-replacement"));
}

#[test]
fn existing_test_patches_are_not_refused() {
    let target = Target::start(Fixture::BusyC, Patch::BusyFix);
    for (symbol, with) in [
        ("work_fn", "work_fn_v2"),
        ("work_fn", "work_fn_v3"),
        ("banner", "banner_v2"),
    ] {
        let report = target.analyze(symbol, with);
        assert!(
            !report.findings.iter().any(|f| f.severity == Severity::Blocking),
            "{symbol} → {with}:\n{}",
            describe(&report.findings)
        );
    }
    let rust = Target::start(Fixture::BusyRust, Patch::RustFix);
    let report = rust.analyze("rust_work", "rust_work_v2");
    assert!(
        !report.findings.iter().any(|f| f.severity == Severity::Blocking),
        "{}",
        describe(&report.findings)
    );
}

#[test]
fn malformed_manifest_object_or_pid_is_bad_input() {
    let target = Target::start(Fixture::AnalysisTarget, Patch::Analysis);
    let state = target.dir.path().join("state");
    let broken = target.dir.path().join("broken.toml");
    std::fs::write(&broken, "id = \"x\"\n").unwrap();
    let error = analyze_path(target.running.pid(), &broken, &state).unwrap_err();
    assert!(
        error.is_bad_input() && error.to_string().contains("missing field"),
        "{error}"
    );
    let garbage = target.dir.path().join("garbage.so");
    std::fs::write(&garbage, b"\x7fELF garbage").unwrap();
    let manifest = target.manifest("g", &[("add_values", "add_values_ok")]);
    std::fs::write(
        &manifest,
        std::fs::read_to_string(&manifest)
            .unwrap()
            .replace(&target.object.display().to_string(), &garbage.display().to_string()),
    )
    .unwrap();
    let error = analyze_path(target.running.pid(), &manifest, &state).unwrap_err();
    assert!(
        error.is_bad_input() && error.to_string().contains("malformed ELF"),
        "{error}"
    );
    let error = analyze_path(2147483646, &manifest, &state).unwrap_err();
    assert!(
        error.is_bad_input() && error.to_string().contains("no process"),
        "{error}"
    );
}

/// Like with like: target code both the original and the replacement
/// reach is no change of the patch's. `request_total` reaches `pair_total`
/// (a loop, 16-byte copies of `shared_pair`) only deeper than the walk;
/// its replacements call `pair_total` directly.
#[test]
fn target_code_both_sides_reach_is_not_a_difference() {
    let mut target = Target::start(Fixture::AnalysisTarget, Patch::Analysis);
    let direct = target.analyze("request_total", "request_total_direct");
    for code in ["added-loop", "global-access-changed"] {
        assert!(
            !direct.findings.iter().any(|f| f.code == code),
            "pair_total is reached by both sides, yet {code}:\n{}",
            describe(&direct.findings)
        );
    }
    assert_eq!(direct.features["static.backward_branches_added"], 0.0);
    // A loop of the replacement's own still counts...
    let own_loop = target.analyze("request_total", "request_total_loop");
    assert_finding(&own_loop, "added-loop", Severity::Warning, None);
    let evidence = &own_loop
        .findings
        .iter()
        .find(|f| f.code == "added-loop")
        .unwrap()
        .evidence;
    assert_eq!(evidence["new_backward_branches"], 1, "{evidence}");
    assert!(
        evidence["shared_functions_not_counted"]
            .as_array()
            .unwrap()
            .iter()
            .any(|name| name == "pair_total"),
        "{evidence}"
    );
    // ... and so does a loop in target code only the replacement reaches.
    let scan = target.analyze("request_total", "request_total_scan");
    assert_finding(&scan, "added-loop", Severity::Warning, None);
    let evidence = &scan.findings.iter().find(|f| f.code == "added-loop").unwrap().evidence;
    assert!(
        evidence["new_target_functions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|name| name == "pair_scan"),
        "{evidence}"
    );
    assert_eq!(target.running.check().unwrap()["errors"], 0, "the target kept working");
}
