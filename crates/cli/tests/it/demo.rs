//! The README's first command must work: the demo runs end to end.

#[test]
fn demo_runs_every_step_and_succeeds() {
    let state = tempfile::tempdir().unwrap();
    let run = crate::common::shadowpatch(state.path(), &["demo", "--json"]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(report["ok"], true);
    assert_eq!(report["steps"].as_array().unwrap().len(), 12);
    assert_eq!(report["differences_found"], 1);
    assert_eq!(report["threads"], 12);
}
