//! `shadowpatch-train programs` and `lopo` on bad input: one line naming
//! what and where, exit 2, nothing started; and `lopo` on the committed
//! real-program samples.

use std::process::{Command, Output};

fn train(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_shadowpatch-train"))
        .args(args)
        .output()
        .unwrap()
}

fn one_line_exit_2(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    stderr
}

#[test]
fn bad_programs_input_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let samples = dir.path().join("samples.jsonl");
    let work = dir.path().join("work");
    let (samples, work) = (samples.to_str().unwrap(), work.to_str().unwrap());
    // `programs --samples S --work W` and `more`.
    let programs = |more: &[&str]| {
        let mut args = vec!["programs", "--samples", samples, "--work", work];
        args.extend_from_slice(more);
        train(&args)
    };

    let stderr = one_line_exit_2(&programs(&["--only", "nosuch"]));
    assert!(stderr.contains("--only nosuch"), "{stderr}");

    let stderr = one_line_exit_2(&programs(&["--templates", "crash-always,explode"]));
    assert!(stderr.contains("\"explode\""), "{stderr}");

    let spec = dir.path().join("programs.toml");
    std::fs::write(&spec, "[[program]]\nname = \"x\"\ntarget = \"/bin/true\"\nstart = [\"/bin/true\"]\nfunctions = []\nrequests = [\"q\"]\n").unwrap();
    let stderr = one_line_exit_2(&train(&[
        "programs",
        "--spec",
        spec.to_str().unwrap(),
        "--samples",
        samples,
        "--work",
        work,
    ]));
    assert!(
        stderr.contains("programs.toml") && stderr.contains("program x"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("work").exists(),
        "nothing made before the input was checked"
    );

    // --rebuild only means something with --reanalyse: the flag is named.
    let stderr = one_line_exit_2(&programs(&["--rebuild"]));
    assert!(stderr.contains("missing required argument --reanalyse"), "{stderr}");

    // --reanalyse in a work folder without the samples' built patches: the
    // first labelled variant is named, before any source is fetched.
    let committed = include_str!("../../programs/samples.jsonl");
    let labelled = committed
        .lines()
        .find(|line| line.contains("\"program\":\"tinyproxy\"") && line.contains("\"outcome\":\"crash\""))
        .expect("a labelled tinyproxy variant");
    std::fs::write(samples, format!("{labelled}\n")).unwrap();
    let stderr = one_line_exit_2(&programs(&["--only", "tinyproxy", "--reanalyse"]));
    assert!(
        stderr.contains("has no built patch at") && stderr.contains("tinyproxy:"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("work").exists(),
        "nothing fetched or built before the missing patch was said"
    );

    let stderr = one_line_exit_2(&train(&["lopo", "--samples", "/nonexistent/samples.jsonl"]));
    assert!(stderr.contains("/nonexistent/samples.jsonl"), "{stderr}");
}

#[test]
fn lopo_on_the_committed_samples_reports_every_program() {
    let output = train(&["lopo", "--json"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let rows = report["lopo"]["rows"].as_array().unwrap();
    let programs: Vec<&str> = rows.iter().map(|r| r["program"].as_str().unwrap()).collect();
    for name in ["libevent", "lighttpd", "memcached", "redis", "tinyproxy"] {
        assert!(programs.contains(&name), "{programs:?}");
    }
    // Issue 12's goals, each program held out, on the committed samples
    // (analysed by the engine of PREDICTION.md's fourth run): AUC ≥ 0.95,
    // no false refusal (≤ 2 % of 6 is none), every crash and hang refused,
    // by the model rule and by the whole verdict rule.
    for row in rows {
        assert!(row["auc"].as_f64().unwrap() >= 0.95, "{row}");
        assert_eq!(row["refused_same"], 0, "{row}");
        assert_eq!(row["crash_or_hang_refused"], row["crash_or_hang"], "{row}");
        assert_eq!(row["verdict"]["refused_same"], 0, "{row}");
        assert_eq!(row["verdict"]["crash_or_hang_refused"], row["crash_or_hang"], "{row}");
    }
    let recorded = report["recorded_verdicts"].as_array().unwrap();
    assert!(recorded
        .iter()
        .any(|r| r["class"] == "harm" && r["verdicts"]["refuse"].as_u64() > Some(0)));
}
