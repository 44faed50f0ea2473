//! `apply --watch` end to end on real processes: a NULL-dereferencing
//! patch is survived (rolled back, the faulting call re-run in the
//! original, the service keeps answering correctly); a patch raising the
//! error rate is rolled back by the judge; a harmless patch is kept (with
//! an unreachable metrics URL only warned about); a health command that
//! hangs times out and counts as a failure; bad flags are refused with the
//! target untouched.

use crate::common::{assert_bad_input, assert_untouched, build_id_of, shadowpatch, write_manifest};
use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};

struct Setup {
    target: Running,
    dir: tempfile::TempDir,
    state: std::path::PathBuf,
}

fn setup(args: &[&str]) -> Setup {
    let target = Running::start(Fixture::BusyC, args).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    Setup { target, dir, state }
}

impl Setup {
    fn manifest(&self, id: &str, with: &str) -> String {
        let object = build_patch(Patch::BusyWatch).unwrap();
        let build_id = build_id_of(&self.target.binary());
        write_manifest(self.dir.path(), id, &object, &build_id, &[("work_fn", with)])
            .to_string_lossy()
            .into_owned()
    }

    fn apply(&self, id: &str, with: &str, extra: &[&str]) -> crate::common::Run {
        let pid = self.target.pid().to_string();
        let manifest = self.manifest(id, with);
        let mut args = vec!["apply", &pid, &manifest, "--json", "--force", "--context-secs", "0"];
        args.extend_from_slice(extra);
        shadowpatch(&self.state, &args)
    }
}

#[test]
fn a_null_dereferencing_patch_is_survived_and_rolled_back() {
    let mut s = setup(&["2"]);
    let run = s.apply("null", "work_fn_null", &["--watch", "5", "--baseline", "0.3"]);
    assert_eq!(run.code, 4, "rolled back: {}{}", run.stdout, run.stderr);
    let watch = &run.json()["watch"];
    assert_eq!(watch["decision"], "rollback", "{watch}");
    assert_eq!(watch["cause"], "crash", "{watch}");
    assert_eq!(watch["recovery"]["signal"], "SIGSEGV");
    assert_eq!(watch["recovery"]["function"], "work_fn");
    assert_untouched(s.target.pid());
    assert_eq!(s.target.command("ask 7").unwrap(), "22", "the original answers");
    let check = s.target.check().unwrap();
    assert_eq!(check["errors"], 0, "every call answered correctly: {check:?}");
    // The decision is in the history with its evidence.
    let history = shadowpatch(&s.state, &["history", "--json"]);
    assert!(history.stdout.contains("watch_verdict"), "{}", history.stdout);
}

#[test]
fn a_patch_raising_the_error_rate_is_rolled_back_by_the_judge() {
    let mut s = setup(&["2", "--metrics"]);
    let url = format!("http://127.0.0.1:{}/metrics", s.target.number("metrics_port"));
    let run = s.apply(
        "wrong",
        "work_fn_wrong",
        &[
            "--watch",
            "2",
            "--baseline",
            "1.5",
            "--sample-ms",
            "100",
            "--metrics-url",
            &url,
        ],
    );
    assert_eq!(run.code, 4, "rolled back: {}{}", run.stdout, run.stderr);
    let watch = &run.json()["watch"];
    assert_eq!(watch["cause"], "judge", "{watch}");
    let errors = watch["judgement"]["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "errors_per_second")
        .expect("the error rate was judged")
        .clone();
    assert_eq!(errors["class"], "high", "{errors}");
    assert!(watch["decision_to_rollback_us"].as_u64().is_some());
    assert_untouched(s.target.pid());
    assert_eq!(s.target.command("ask 5").unwrap(), "16", "the original answers");
}

#[test]
fn a_harmless_patch_is_kept_and_an_unreachable_metrics_url_is_a_warning() {
    let mut s = setup(&["1"]);
    let run = s.apply(
        "fine",
        "work_fn_fine",
        &[
            "--watch",
            "1",
            "--baseline",
            "1",
            "--metrics-url",
            "http://127.0.0.1:1/metrics",
        ],
    );
    assert_eq!(run.code, 0, "kept: {}{}", run.stdout, run.stderr);
    assert!(
        run.stderr
            .contains("warning: metrics endpoint http://127.0.0.1:1/metrics unreachable"),
        "{}",
        run.stderr
    );
    let watch = &run.json()["watch"];
    assert_eq!(watch["decision"], "keep", "{watch}");
    assert!(watch["keep_pause_us"].as_u64().is_some());
    assert_untouched(s.target.pid());
    assert_eq!(s.target.command("ask 5").unwrap(), "1000016", "the patch runs");
    assert_eq!(s.target.check().unwrap()["errors"], 0);
}

#[test]
fn a_hanging_health_command_times_out_and_rolls_back() {
    let mut s = setup(&["1"]);
    // Passes once (the check before applying), then hangs.
    let flag = s.dir.path().join("checked-once");
    let command = format!("if [ -e {0} ]; then sleep 30; else touch {0}; fi", flag.display());
    let run = s.apply(
        "hang",
        "work_fn_fine",
        &[
            "--watch",
            "5",
            "--baseline",
            "0.3",
            "--health-cmd",
            &command,
            "--health-timeout",
            "0.5",
        ],
    );
    assert_eq!(run.code, 4, "rolled back: {}{}", run.stdout, run.stderr);
    let watch = &run.json()["watch"];
    assert_eq!(watch["cause"], "health", "{watch}");
    let reason = watch["reason"].as_str().unwrap();
    assert!(
        reason.contains("did not finish within 0.5 s: timed out, treated as a failure"),
        "{reason}"
    );
    assert_untouched(s.target.pid());
    assert_eq!(s.target.command("ask 5").unwrap(), "16", "the original answers");
}

#[test]
fn the_process_exiting_during_the_watch_is_reported() {
    let s = setup(&["1"]);
    // Passes once (the check before applying), then kills the target.
    let flag = s.dir.path().join("checked-once");
    let command = format!(
        "if [ -e {0} ]; then kill -9 $SHADOWPATCH_PID; else touch {0}; fi",
        flag.display()
    );
    let run = s.apply(
        "exit",
        "work_fn_fine",
        &["--watch", "10", "--baseline", "0.3", "--health-cmd", &command],
    );
    assert_eq!(run.code, 4, "{}{}", run.stdout, run.stderr);
    let watch = &run.json()["watch"];
    assert_eq!(watch["cause"], "exit", "{watch}");
    assert_eq!(watch["exit"]["event"], "exited", "{watch}");
    assert_eq!(watch["exit"]["signal"], "SIGKILL", "{watch}");
}

#[test]
fn bad_watch_flags_are_refused_with_the_target_untouched() {
    let s = setup(&["1"]);
    let pid = s.target.pid();
    assert_bad_input(&s.apply("a", "work_fn_fine", &["--watch", "0"]), "--watch 0");
    assert_bad_input(&s.apply("b", "work_fn_fine", &["--health-cmd", "true"]), "need --watch");
    assert_bad_input(
        &s.apply(
            "c",
            "work_fn_fine",
            &["--watch", "1", "--health-cmd", "sleep 30", "--health-timeout", "0.3"],
        ),
        "did not finish within 0.3 s",
    );
    assert_bad_input(
        &s.apply("d", "work_fn_fine", &["--watch", "1", "--health-cmd", "false"]),
        "failed",
    );
    assert_untouched(pid);
    let status = shadowpatch(&s.state, &["rollback", &pid.to_string()]);
    assert_ne!(
        status.code, 0,
        "nothing was applied: {}{}",
        status.stdout, status.stderr
    );
}

fn process_state(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(") ").unwrap().1.chars().next().unwrap()
}

/// Whether every thread of `pid` is in job-control stop (the leader's
/// state alone says 'T' while the other threads are still on their way).
fn all_threads_stopped(pid: i32) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .all(|task| {
            std::fs::read_to_string(task.path().join("stat"))
                .map(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('T')))
                .unwrap_or(true)
        })
}

/// Issue 15: SIGSTOP sent to the target as `apply --watch` starts failed
/// with exit 3 "thread X of pid X is not stopped by us". A target stopped
/// by job control is refused with one line saying so, left stopped as it
/// was found, nothing journaled; once continued, the same apply works.
#[test]
fn a_job_control_stopped_target_is_refused_and_left_stopped() {
    let mut s = setup(&["2"]);
    let pid = s.target.pid();
    assert_eq!(shadowpatch(&s.state, &["mirror", &pid.to_string()]).code, 0);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGSTOP).unwrap();
    while !all_threads_stopped(pid) {
        std::thread::yield_now();
    }
    let run = s.apply("stopped", "work_fn_fine", &["--watch", "2"]);
    assert_eq!(run.code, 1, "{}{}", run.stdout, run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {}", run.stderr);
    assert!(
        lines[0].contains(&format!("pid {pid}")) && lines[0].contains("SIGCONT"),
        "{}",
        lines[0]
    );
    // Detaching wakes each thread to re-enter the stop it was found in
    // (the kernel re-arms a group-stop on detach): under load a thread can
    // be seen runnable ('R') for a moment on its way back. Left stopped
    // means every thread is back in 'T' and stays there.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !all_threads_stopped(pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "left stopped: state {}",
            process_state(pid)
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(100));
    assert!(all_threads_stopped(pid), "left stopped: state {}", process_state(pid));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(s.target.command("ask 5").unwrap(), "16");
    let status = shadowpatch(&s.state, &["status", &pid.to_string(), "--json"]).json();
    assert!(status["interrupted"].is_null(), "{status}");
    let run = s.apply("stopped", "work_fn_fine", &[]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(s.target.command("ask 5").unwrap(), "1000016");
    assert_untouched(pid);
}
