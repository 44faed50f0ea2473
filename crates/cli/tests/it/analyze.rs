//! End to end: `shadowpatch analyze` on a live target (verdicts, findings,
//! exit codes, the event history, nothing written to the target) and
//! `apply` running the analysis first (refusing, or `--force`).

use crate::common::{
    anonymous_code_mappings, assert_bad_input, assert_untouched, build_id_of, shadowpatch, write_manifest,
};
use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use std::collections::BTreeMap;
use std::path::Path;

/// Every file of the state directory except the history, with its bytes.
fn state_files(state: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![state.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            let name = path.strip_prefix(state).unwrap().display().to_string();
            if path.is_dir() {
                stack.push(path);
            } else if !name.starts_with("history.db") {
                files.insert(name, std::fs::read(&path).unwrap());
            }
        }
    }
    files
}

#[test]
fn analyze_gives_verdicts_with_evidence_records_them_and_writes_nothing() {
    let mut target = Running::start(Fixture::AnalysisTarget, &[]).unwrap();
    let pid = target.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let object = build_patch(Patch::Analysis).unwrap();
    let build_id = build_id_of(&target.binary());
    assert_eq!(shadowpatch(&state, &["mirror", &pid]).code, 0);
    let files_before = state_files(&state);
    let mappings = anonymous_code_mappings(target.pid());

    let benign = write_manifest(
        dir.path(),
        "benign",
        &object,
        &build_id,
        &[("add_values", "add_values_ok")],
    );
    // Static analysis alone cannot tell a correct rewrite from a wrong one
    // (PREDICTION.md): the model's risk stays near the corpus base rate, so
    // not a refusal, but not a clean bill either.
    let run = shadowpatch(&state, &["analyze", &pid, benign.to_str().unwrap(), "--json"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert_ne!(run.json()["verdict"], "refuse");
    let report = run.json();
    assert!(report["features"]["static.abi-parameter-count"] == 0.0);
    assert!(report["features"]["context.rss_bytes"].as_f64().unwrap() > 0.0);
    // Every verdict explains its score: the rule, and the model's terms.
    let explanation = &report["explanation"];
    assert!(
        explanation["basis"].as_str().unwrap().contains("static evidence alone"),
        "{explanation}"
    );
    assert!(explanation["intercept"].is_number(), "{explanation}");
    let terms = explanation["terms"].as_array().unwrap();
    assert!(
        terms
            .iter()
            .any(|t| t["name"] == "static.bytes_changed" && t["status"] == "measured"),
        "{explanation}"
    );
    assert!(
        terms
            .iter()
            .any(|t| t["name"] == "sim_rate_crashes" && t["status"].as_str().unwrap().starts_with("imputed")),
        "no simulation: its features are imputed, not zero: {explanation}"
    );

    let leaky = write_manifest(
        dir.path(),
        "leaky",
        &object,
        &build_id,
        &[("plain_compute", "plain_compute_alloc")],
    );
    let run = shadowpatch(&state, &["analyze", &pid, leaky.to_str().unwrap(), "--json"]);
    // Warnings only (no blocking finding) and no simulation: however high
    // the model puts the risk (in the corpus every unbalanced allocation
    // leaked), a refusal on risk alone needs simulation evidence, so it
    // warns (exit 0) and says how to confirm.
    assert_eq!(run.code, 0, "warn still exits 0: {}", run.stderr);
    let report = run.json();
    assert_eq!(report["verdict"], "warn", "{report}");
    assert_eq!(report["features"]["analysis.blocking"], 0.0, "{report}");
    let codes: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["code"].as_str().unwrap())
        .collect();
    assert!(
        codes.contains(&"new-allocation") && codes.contains(&"allocation-unbalanced"),
        "{codes:?}"
    );
    // Static flags are a risk, not harm seen.
    assert!(
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| f["class"] == if f["severity"] == "info" { "info" } else { "risk" }),
        "{report}"
    );

    let recursive = write_manifest(
        dir.path(),
        "recursive",
        &object,
        &build_id,
        &[
            ("plain_compute", "plain_compute_via_old"),
            ("cc_target", "cc_target_ms"),
        ],
    );
    let run = shadowpatch(&state, &["analyze", &pid, recursive.to_str().unwrap()]);
    assert_eq!(run.code, 1, "refuse exits 1: {}{}", run.stdout, run.stderr);
    assert!(run.stdout.contains("REFUSE"), "{}", run.stdout);
    assert!(run.stdout.contains("static analysis:"), "{}", run.stdout);
    assert!(run.stdout.contains("recursion-through-patch"), "{}", run.stdout);
    assert!(run.stdout.contains("calling-convention"), "{}", run.stdout);
    assert!(run.stdout.contains("evidence: {"), "{}", run.stdout);
    assert!(run.stdout.contains("because: blocking finding: "), "{}", run.stdout);
    assert!(run.stdout.contains("BLOCKING harm "), "{}", run.stdout);
    assert!(run.stdout.contains("how: logistic regression"), "{}", run.stdout);
    assert!(run.stdout.contains("intercept"), "{}", run.stdout);

    // Nothing was written: the mirror verifies clean, no patch mapping,
    // the journal and mirror files are byte for byte what they were.
    assert_eq!(shadowpatch(&state, &["verify", &pid]).code, 0);
    assert_eq!(anonymous_code_mappings(target.pid()), mappings);
    assert_eq!(state_files(&state), files_before);
    assert_untouched(target.pid());
    assert_eq!(target.check().unwrap()["errors"], 0);

    // With the functions simulated on explicit inputs, the evidence clears it
    // (simulation logs its copies in the state directory, hence after the
    // byte-for-byte check above).
    let run = shadowpatch(
        &state,
        &[
            "analyze",
            &pid,
            benign.to_str().unwrap(),
            "--call",
            "add_values(1, 2)",
            "--call",
            "add_values(-5, 7)",
            "--json",
        ],
    );
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(report["verdict"], "proceed", "{report}");
    assert!(report["risk"].as_f64().unwrap() < 0.3, "{report}");

    // Each analysis is in the event history, with its verdict.
    let store = shadowpatch_store::Store::open_read_only(&state)
        .unwrap()
        .expect("history exists");
    let events = store
        .events(&shadowpatch_store::EventFilter {
            kinds: vec![shadowpatch_store::EventKind::Analysis],
            ..Default::default()
        })
        .unwrap();
    let outcomes: Vec<&str> = events.iter().map(|e| e.outcome.as_deref().unwrap()).collect();
    assert_eq!(outcomes.len(), 4, "{outcomes:?}");
    assert_eq!(outcomes[3], "proceed", "the simulated benign patch: {outcomes:?}");
    assert_eq!(events[2].patch_id.as_deref(), Some("recursive"));
    assert_eq!(events[2].details["analysis"]["verdict"], "refuse");
}

#[test]
fn apply_refuses_what_the_engine_refuses_unless_forced() {
    let mut target = Running::start(Fixture::AnalysisTarget, &[]).unwrap();
    let pid = target.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let object = build_patch(Patch::Analysis).unwrap();
    let build_id = build_id_of(&target.binary());
    assert_eq!(shadowpatch(&state, &["mirror", &pid]).code, 0);
    let mappings = anonymous_code_mappings(target.pid());
    // Declares `counter` an int where the target has a long: refused; but
    // reading the low half of 5 still gives 5, so forcing it is harmless.
    let narrow = write_manifest(
        dir.path(),
        "narrow",
        &object,
        &build_id,
        &[("read_counter", "read_counter_narrow")],
    );
    let run = shadowpatch(&state, &["apply", &pid, narrow.to_str().unwrap(), "--json"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {}", run.stderr);
    assert!(lines[0].contains("declares counter as int"), "{}", lines[0]);
    assert_eq!(run.json()["analysis"]["verdict"], "refuse");
    assert_eq!(anonymous_code_mappings(target.pid()), mappings, "target untouched");
    assert_eq!(shadowpatch(&state, &["verify", &pid]).code, 0);
    assert_untouched(target.pid());

    let forced = shadowpatch(&state, &["apply", &pid, narrow.to_str().unwrap(), "--force", "--json"]);
    assert_eq!(forced.code, 0, "{}{}", forced.stdout, forced.stderr);
    let forced = forced.json();
    assert_eq!(forced["forced"], true);
    assert_eq!(forced["analysis"]["verdict"], "refuse");
    assert_eq!(forced["generation"], 1);
    assert_eq!(target.check().unwrap()["errors"], 0);
    assert_eq!(shadowpatch(&state, &["rollback", &pid]).code, 0);

    // A warning does not stop apply; its JSON carries the analysis.
    let state_patch = write_manifest(
        dir.path(),
        "stateful",
        &object,
        &build_id,
        &[("plain_compute", "plain_compute_state")],
    );
    let applied = shadowpatch(&state, &["apply", &pid, state_patch.to_str().unwrap(), "--json"]);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    let applied = applied.json();
    assert_eq!(applied["analysis"]["verdict"], "warn");
    assert_eq!(applied["forced"], false);
    assert_eq!(target.check().unwrap()["errors"], 0);
    // Analysing it again now names the active patch as a conflict.
    let again = write_manifest(
        dir.path(),
        "again",
        &object,
        &build_id,
        &[("plain_compute", "plain_compute_ok")],
    );
    let report = shadowpatch(&state, &["analyze", &pid, again.to_str().unwrap(), "--json"]).json();
    assert!(report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|f| f["code"] == "function-already-patched" && f["evidence"]["patch"] == "stateful"));
    let report = shadowpatch(&state, &["analyze", &pid, state_patch.to_str().unwrap(), "--json"]).json();
    assert_eq!(report["verdict"], "refuse", "same patch id again");
    assert_eq!(shadowpatch(&state, &["rollback", &pid]).code, 0);
}

#[test]
fn bad_arguments_are_one_line_errors_and_leave_the_target_untouched() {
    let target = Running::start(Fixture::AnalysisTarget, &[]).unwrap();
    let pid = target.pid().to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let object = build_patch(Patch::Analysis).unwrap();
    let manifest = write_manifest(
        dir.path(),
        "ok",
        &object,
        &build_id_of(&target.binary()),
        &[("add_values", "add_values_ok")],
    );
    let m = manifest.to_str().unwrap();
    let log = dir.path().join("service.log");
    std::fs::write(&log, "started\n").unwrap();
    let l = log.to_str().unwrap();
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "id = \"x\"\n").unwrap();
    // A truncated model file and one from a newer shadowpatch.
    let corrupt_model = dir.path().join("corrupt-model.json");
    std::fs::write(&corrupt_model, "{\"format\": \"shadowpatch-risk-model\", \"format_ver").unwrap();
    let future_model = dir.path().join("future-model.json");
    std::fs::write(
        &future_model,
        "{\"format\": \"shadowpatch-risk-model\", \"format_version\": 99}",
    )
    .unwrap();
    // A `behaviour` not recognised, expected results that do not parse.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let bad_behaviour = dir.path().join("bad-behaviour.toml");
    std::fs::write(&bad_behaviour, format!("{text}behaviour = \"different\"\n")).unwrap();
    let bad_expect = dir.path().join("bad-expect.toml");
    std::fs::write(
        &bad_expect,
        format!("{text}behaviour = \"changed\"\nexpect = [{{ args = [1], returns = \"two\" }}]\n"),
    )
    .unwrap();
    let behaviour_line = text.lines().count() + 1;
    let behaviour_needle = format!("line {behaviour_line}: unknown variant `different`");
    let expect_needle = format!("bad-expect.toml: line {}", behaviour_line + 1);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["analyze", &pid, bad_behaviour.to_str().unwrap()],
            &behaviour_needle,
        ),
        (
            vec!["analyze", &pid, bad_behaviour.to_str().unwrap()],
            "bad-behaviour.toml",
        ),
        (vec!["apply", &pid, bad_expect.to_str().unwrap()], &expect_needle),
        (
            vec!["analyze", &pid, m, "--model", corrupt_model.to_str().unwrap()],
            "corrupt-model.json",
        ),
        (
            vec!["analyze", &pid, m, "--model", future_model.to_str().unwrap()],
            "format version 99",
        ),
        (
            vec!["analyze", &pid, m, "--log", l, "--error-pattern", "(unclosed"],
            "--error-pattern",
        ),
        (vec!["analyze", &pid, m, "--metrics-url", "not a url"], "--metrics-url"),
        (
            vec!["analyze", &pid, m, "--metrics-url", "ftp://127.0.0.1/metrics"],
            "--metrics-url",
        ),
        (vec!["analyze", &pid, m, "--log", l], "--error-pattern"),
        (vec!["analyze", &pid, m, "--context-secs=-3"], "--context-secs"),
        (vec!["analyze", &pid, broken.to_str().unwrap()], "missing field"),
        (vec!["analyze", &pid, "/nonexistent/m.toml"], "/nonexistent/m.toml"),
        (vec!["analyze", "2147483646", m], "no process"),
        (vec!["apply", &pid, m, "--metrics-url", "http://"], "--metrics-url"),
        (
            vec!["analyze", &pid, m, "--capture", "1", "--sim-repeat", "101"],
            "--sim-repeat 101",
        ),
        (vec!["apply", &pid, m, "--sim-repeat", "101"], "--sim-repeat 101"),
    ];
    for (args, needle) in cases {
        assert_bad_input(&shadowpatch(&state, &args), needle);
        assert_untouched(target.pid());
    }
    // An unreachable endpoint or unreadable log is not bad input: a note.
    let run = shadowpatch(
        &state,
        &[
            "analyze",
            &pid,
            m,
            "--metrics-url",
            "http://127.0.0.1:1/metrics",
            "--log",
            "/nonexistent.log",
            "--error-pattern",
            "ERROR",
            "--json",
        ],
    );
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(report["verdict"], "warn", "lower confidence");
    assert_eq!(report["unavailable"].as_array().unwrap().len(), 2, "{report}");
}

/// sim.c with its log file and UDP peer, and the patch object of sim_patches.c.
fn sim_target(dir: &Path) -> (Running, std::path::PathBuf, std::net::UdpSocket) {
    let log = dir.join("service.log");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = udp.local_addr().unwrap().port().to_string();
    let target = Running::start(Fixture::Sim, &["2", log.to_str().unwrap(), &port]).unwrap();
    (target, log, udp)
}

#[test]
fn analyze_and_apply_simulate_live_calls_and_refuse_a_crashing_patch() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (mut target, log, _udp) = sim_target(dir.path());
    let pid = target.pid().to_string();
    let object = build_patch(Patch::SimPatches).unwrap();
    let build_id = build_id_of(&target.binary());
    let crash = write_manifest(dir.path(), "crash", &object, &build_id, &[("compute", "compute_crash")]);
    let same = write_manifest(dir.path(), "same", &object, &build_id, &[("compute", "compute_same")]);
    let mappings = anonymous_code_mappings(target.pid());

    // Captured live calls: the crashing patch is refused with the call's evidence.
    let run = shadowpatch(
        &state,
        &[
            "analyze",
            &pid,
            crash.to_str().unwrap(),
            "--capture",
            "3",
            "--sim-budget-ms",
            "300",
            "--json",
        ],
    );
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(report["verdict"], "refuse", "{report}");
    let crashes: Vec<&serde_json::Value> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["code"] == "sim-patched-crashes")
        .collect();
    assert_eq!(crashes.len(), 1, "{report}");
    assert_eq!(crashes[0]["severity"], "blocking");
    assert!(report["features"]["sim_crashes"].as_f64().unwrap() >= 1.0, "{report}");
    assert!(report["timings_ms"]["simulation"].as_f64().is_some());

    // Explicit calls: the benign patch agrees with the original.
    let run = shadowpatch(
        &state,
        &[
            "analyze",
            &pid,
            same.to_str().unwrap(),
            "--call",
            "compute(5)",
            "--call",
            "compute(-7)",
            "--json",
        ],
    );
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(report["features"]["sim_explicit_calls"], 2.0, "{report}");
    assert_eq!(report["features"]["sim_divergent_returns"], 0.0, "{report}");

    // apply runs the same simulation first and refuses without touching the target.
    let run = shadowpatch(
        &state,
        &["apply", &pid, crash.to_str().unwrap(), "--call", "compute(5)"],
    );
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    assert_untouched(target.pid());
    assert_eq!(anonymous_code_mappings(target.pid()), mappings, "nothing loaded");
    assert_eq!(
        std::fs::metadata(&log).unwrap().len(),
        0,
        "no write escaped the sandbox"
    );
    let check = target.command("check").unwrap();
    assert!(
        check.contains("errors=0"),
        "the live target kept answering right: {check}"
    );

    // Bad simulation input: one line, exit 2, target untouched.
    let m = same.to_str().unwrap();
    let vectors = dir.path().join("vectors.txt");
    std::fs::write(&vectors, "compute(1)\ncompute(2\n").unwrap();
    // An inlined change said to lie past the end of the replacement, or
    // an empty one.
    let text = std::fs::read_to_string(&same).unwrap();
    let past_end = dir.path().join("past-end.toml");
    std::fs::write(
        &past_end,
        format!("{text}changed_code = [{{ offset = 0, size = 1048576, function = \"inner\" }}]\n"),
    )
    .unwrap();
    let empty_range = dir.path().join("empty-range.toml");
    std::fs::write(
        &empty_range,
        format!("{text}changed_code = [{{ offset = 4, size = 0, function = \"inner\" }}]\n"),
    )
    .unwrap();
    for (args, needle) in [
        (
            vec!["analyze", &pid, past_end.to_str().unwrap(), "--call", "compute(1)"],
            "changed_code of inner ends at offset 0x100000, past the end",
        ),
        (vec!["analyze", &pid, empty_range.to_str().unwrap()], "changed_code[0]"),
        (vec!["analyze", &pid, m, "--call", "compute(1"], "--call"),
        (vec!["analyze", &pid, m, "--call", "not_replaced(1)"], "not_replaced"),
        (
            vec!["analyze", &pid, m, "--vectors", vectors.to_str().unwrap()],
            "vectors.txt",
        ),
        (vec!["analyze", &pid, m, "--capture-for=-1"], "--capture-for"),
        (vec!["analyze", &pid, m, "--capture", "0"], "--capture"),
    ] {
        assert_bad_input(&shadowpatch(&state, &args), needle);
        assert_untouched(target.pid());
    }
}
