//! Issue 15's trust defects, each reproduced against a real process: a
//! torn or damaged journal, generation files a crash left out of step with
//! the journal, restored bytes the mirror does not hold, recover's wording
//! after an interrupted rollback, an analysis racing a transaction, a
//! target that exec'd, and addresses past the end of a function.

use crate::common::{assert_untouched, build_id_of, shadowpatch, shadowpatch_env, write_manifest};
use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use shadowpatch_patch::journal::{decode_line, encode_line, Journal, Record};
use std::path::{Path, PathBuf};

struct Setup {
    target: Running,
    dir: tempfile::TempDir,
    manifest: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let target = Running::start(Fixture::BusyC, &["2"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let object = build_patch(Patch::BusyFix).unwrap();
        let manifest = write_manifest(
            dir.path(),
            "trusty",
            &object,
            &build_id_of(&target.binary()),
            &[("work_fn", "work_fn_v2"), ("banner", "banner_v2")],
        );
        Setup { target, dir, manifest }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn pid(&self) -> String {
        self.target.pid().to_string()
    }

    fn run(&self, args: &[&str]) -> crate::common::Run {
        let mut all = args.to_vec();
        let pid = self.pid();
        let manifest = self.manifest.to_str().unwrap().to_string();
        for arg in &mut all {
            if *arg == "PID" {
                *arg = &pid;
            } else if *arg == "MANIFEST" {
                *arg = &manifest;
            }
        }
        shadowpatch(&self.state(), &all)
    }

    fn apply(&self) {
        let run = self.run(&["apply", "PID", "MANIFEST", "--context-secs", "0"]);
        assert_eq!(run.code, 0, "apply: {}{}", run.stdout, run.stderr);
    }

    fn target_dir(&self) -> PathBuf {
        std::fs::read_dir(self.state().join("targets"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .starts_with(&format!("{}-", self.pid()))
            })
            .expect("the target has a state directory")
    }

    fn journal(&self) -> PathBuf {
        Journal::path_in(&self.target_dir())
    }

    fn generation_exists(&self, generation: u32) -> bool {
        shadowpatch_mirror::StateDir::generation_path(&self.target_dir(), generation).exists()
    }

    /// The service answers as patched (`true`) or original, with no error.
    fn assert_answers(&mut self, patched: bool) {
        let answer = if patched { "1000016" } else { "16" };
        assert_eq!(self.target.command("ask 5").unwrap(), answer);
        assert_eq!(self.target.check().unwrap()["errors"], 0);
        assert_untouched(self.target.pid());
    }

    fn assert_verify_clean(&self) {
        let verify = self.run(&["verify", "PID"]);
        assert_eq!(verify.code, 0, "verify: {}{}", verify.stdout, verify.stderr);
    }
}

fn one_line_error(run: &crate::common::Run) -> &str {
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one-line error expected: {:?}", run.stderr);
    lines[0]
}

/// Rewrite the journal's lines with `edit` (given each decoded record's
/// JSON), re-checksumming them: damage a checksum cannot catch.
fn rewrite_records(journal: &Path, edit: &mut dyn FnMut(&mut serde_json::Value)) {
    let text = std::fs::read(journal).unwrap();
    let mut out = Vec::new();
    for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        let (record, _) = decode_line(line, false).unwrap();
        let mut value = serde_json::to_value(&record).unwrap();
        edit(&mut value);
        let record: Record = serde_json::from_value(value).unwrap();
        out.extend(encode_line(&record));
        out.push(b'\n');
    }
    std::fs::write(journal, out).unwrap();
}

#[test]
fn a_torn_last_record_is_set_aside_and_never_appended_after() {
    let mut setup = Setup::new();
    setup.apply();
    let journal = setup.journal();
    let before = std::fs::read(&journal).unwrap();
    // The repro: cut the last record (the apply's commit) short.
    let file = std::fs::OpenOptions::new().write(true).open(&journal).unwrap();
    file.set_len(before.len() as u64 - 5).unwrap();
    drop(file);
    let torn_start = before[..before.len() - 1].iter().rposition(|b| *b == b'\n').unwrap() + 1;

    let recovered = setup.run(&["recover", "PID", "--json"]);
    assert_eq!(recovered.code, 0, "{}{}", recovered.stdout, recovered.stderr);
    let recovered = recovered.json();
    // Without its commit the apply is open; every trampoline is in place.
    assert_eq!(recovered["state"], "fully_applied", "{recovered}");
    let kept = PathBuf::from(recovered["repairs"]["torn_tail_kept"].as_str().expect("tail kept"));
    assert_eq!(
        std::fs::read(&kept).unwrap(),
        before[torn_start..before.len() - 5].to_vec(),
        "the torn bytes are kept for inspection"
    );
    let replayed = Journal::replay(&setup.target_dir()).unwrap();
    assert!(replayed.torn_tail.is_none() && replayed.open.is_none());
    assert_eq!(replayed.active.len(), 1);
    setup.assert_verify_clean();
    setup.assert_answers(true);
    // Every later command works, for good.
    assert_eq!(setup.run(&["rollback", "PID"]).code, 0);
    setup.assert_answers(false);
    setup.apply();
    setup.assert_verify_clean();
    let text = std::fs::read(&journal).unwrap();
    for line in text.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
        decode_line(line, true).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(line)));
    }
}

#[test]
fn damage_before_the_last_record_is_one_line_naming_file_and_line() {
    let mut setup = Setup::new();
    setup.apply();
    let journal = setup.journal();
    let mut bytes = std::fs::read(&journal).unwrap();
    // Flip one digit in the second record (the map).
    let second = bytes.iter().position(|b| *b == b'\n').unwrap() + 1;
    let at = second + bytes[second..].windows(9).position(|w| w == b"\"address\"").unwrap() + 11;
    bytes[at] = if bytes[at] == b'1' { b'2' } else { b'1' };
    std::fs::write(&journal, &bytes).unwrap();
    for command in [&["recover", "PID"][..], &["rollback", "PID"], &["status", "PID"]] {
        let run = setup.run(command);
        assert_eq!(run.code, 3, "{command:?}: {}{}", run.stdout, run.stderr);
        let line = one_line_error(&run);
        assert!(
            line.contains(journal.to_str().unwrap()) && line.contains("line 2 of") && line.contains("damaged"),
            "{line}"
        );
    }
    // Nothing was appended, and the target still runs the patch.
    assert_eq!(std::fs::read(&journal).unwrap(), bytes);
    setup.assert_answers(true);
}

#[test]
fn rollback_refuses_original_bytes_the_mirror_does_not_hold() {
    let mut setup = Setup::new();
    setup.apply();
    let journal = setup.journal();
    let good = std::fs::read(&journal).unwrap();
    // One flipped hex digit in the plan's `original` of work_fn, with a
    // checksum that matches (a faulty writer, not a torn disk).
    let mut flipped = None;
    rewrite_records(&journal, &mut |value| {
        if value["op"] == "plan" {
            let original = value["patch"]["functions"][0]["write"]["original"]
                .as_str()
                .unwrap()
                .to_string();
            let mut digits: Vec<char> = original.chars().collect();
            digits[3] = if digits[3] == '0' { '1' } else { '0' };
            let damaged: String = digits.into_iter().collect();
            value["patch"]["functions"][0]["write"]["original"] = damaged.clone().into();
            flipped = Some((original, damaged));
        }
    });
    let (original, damaged) = flipped.unwrap();
    let refused = setup.run(&["rollback", "PID"]);
    assert_eq!(refused.code, 1, "{}{}", refused.stdout, refused.stderr);
    let line = one_line_error(&refused);
    assert!(
        line.contains(&format!("restore {damaged}")) && line.contains(&format!("generation 0 holds {original}")),
        "{line}"
    );
    setup.assert_answers(true);
    // With the journal as it was, the rollback goes through.
    std::fs::write(&journal, good).unwrap();
    assert_eq!(setup.run(&["rollback", "PID"]).code, 0);
    setup.assert_answers(false);
    setup.assert_verify_clean();
}

#[test]
fn a_crash_between_commit_and_generation_file_is_repaired_from_the_journal() {
    let mut setup = Setup::new();
    setup.apply();
    // Killed after the rollback's commit, before its generation went.
    let killed = shadowpatch_env(
        &setup.state(),
        &["rollback", &setup.pid()],
        &[("SHADOWPATCH_FAULT", "rollback-committed")],
    );
    assert_eq!(killed.code, -1, "{}", killed.stderr);
    assert!(setup.generation_exists(1), "the stale generation is still there");
    // verify follows the journal (0 patches: generation 0), before any repair.
    setup.assert_verify_clean();
    let status = setup.run(&["status", "PID", "--json"]).json();
    assert_eq!(status["generations"].as_array().unwrap().len(), 2, "{status}");
    let recovered = setup.run(&["recover", "PID", "--json"]).json();
    assert_eq!(recovered["state"], "consistent", "{recovered}");
    assert_eq!(recovered["repairs"]["generations_retired"], serde_json::json!([1]));
    assert!(!setup.generation_exists(1));
    setup.assert_answers(false);
    setup.assert_verify_clean();

    // Killed after the apply's commit, before its generation was published.
    let killed = shadowpatch_env(
        &setup.state(),
        &[
            "apply",
            &setup.pid(),
            setup.manifest.to_str().unwrap(),
            "--context-secs",
            "0",
        ],
        &[("SHADOWPATCH_FAULT", "committed")],
    );
    assert_eq!(killed.code, -1, "{}", killed.stderr);
    assert!(!setup.generation_exists(1));
    let recovered = setup.run(&["recover", "PID", "--json"]).json();
    assert_eq!(recovered["repairs"]["generations_published"], serde_json::json!([1]));
    setup.assert_answers(true);
    setup.assert_verify_clean();

    // The commands that check generations repair it themselves too.
    let killed = shadowpatch_env(
        &setup.state(),
        &["rollback", &setup.pid()],
        &[("SHADOWPATCH_FAULT", "rollback-committed")],
    );
    assert_eq!(killed.code, -1);
    let mirrored = setup.run(&["mirror", "PID"]);
    assert_eq!(mirrored.code, 0, "a new baseline: {}", mirrored.stderr);
    assert!(!setup.generation_exists(1));
    let killed = shadowpatch_env(
        &setup.state(),
        &[
            "apply",
            &setup.pid(),
            setup.manifest.to_str().unwrap(),
            "--context-secs",
            "0",
        ],
        &[("SHADOWPATCH_FAULT", "committed")],
    );
    assert_eq!(killed.code, -1);
    assert_eq!(
        setup.run(&["rollback", "PID"]).code,
        0,
        "rollback publishes, then rolls back"
    );
    setup.assert_verify_clean();
    setup.apply();
    let killed = shadowpatch_env(
        &setup.state(),
        &["rollback", &setup.pid()],
        &[("SHADOWPATCH_FAULT", "rollback-committed")],
    );
    assert_eq!(killed.code, -1);
    setup.apply();
    setup.assert_verify_clean();
    assert_eq!(setup.run(&["rollback", "PID"]).code, 0);
    setup.assert_verify_clean();
}

#[test]
fn recover_counts_the_restorations_an_interrupted_rollback_had_made() {
    let mut setup = Setup::new();
    for (point, made) in [("rollback-begin", 0), ("rollback-written", 2)] {
        setup.apply();
        let killed = shadowpatch_env(
            &setup.state(),
            &["rollback", &setup.pid()],
            &[("SHADOWPATCH_FAULT", point)],
        );
        assert_eq!(killed.code, -1, "{point}: {}", killed.stderr);
        let recovered = setup.run(&["recover", "PID"]);
        assert_eq!(recovered.code, 0, "{point}: {}", recovered.stderr);
        assert!(
            recovered.stdout.contains(&format!(
                "interrupted rollback of trusty finished: fully rolled back ({made}/2 entries had been restored)"
            )),
            "{point}: {}",
            recovered.stdout
        );
        setup.assert_answers(false);
    }
}

fn finding_codes(analysis: &serde_json::Value) -> Vec<String> {
    analysis["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["code"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn an_analysis_waits_for_a_transaction_in_flight_instead_of_calling_it_interrupted() {
    let setup = Setup::new();
    setup.apply();
    let dir = setup.target_dir();
    // Play another shadowpatch process in the middle of a rollback: the
    // lock held, the rollback begun.
    let lock = shadowpatch_patch::state::TargetLock::acquire(&dir).unwrap();
    let replayed = Journal::replay(&dir).unwrap();
    let (mut journal, _) = Journal::open(&dir, &replayed).unwrap();
    let txn = replayed.next_txn;
    journal
        .append(&Record::Begin {
            txn,
            kind: shadowpatch_patch::journal::TxnKind::Rollback,
            patch_id: "trusty".into(),
            pid: setup.target.pid(),
            start_time: shadowpatch_process::ProcessIdentity::of(setup.target.pid())
                .unwrap()
                .start_time,
            unix_ms: 0,
            boot_ns: None,
        })
        .unwrap();
    assert!(Journal::replay(&dir).unwrap().open.is_some());
    // Still busy after the wait: "busy, retry", never "run recover".
    let busy = shadowpatch_env(
        &setup.state(),
        &[
            "analyze",
            &setup.pid(),
            setup.manifest.to_str().unwrap(),
            "--context-secs",
            "0",
            "--json",
        ],
        &[("SHADOWPATCH_LOCK_WAIT_MS", "100")],
    );
    let analysis = busy.json();
    assert!(
        !finding_codes(&analysis).contains(&"open-transaction".to_string()),
        "{analysis}"
    );
    assert!(
        analysis["unavailable"].to_string().contains("busy, retry"),
        "{analysis}"
    );
    // Finished while the analysis waits: it sees the settled journal.
    let waiting = std::process::Command::new(env!("CARGO_BIN_EXE_shadowpatch"))
        .args([
            "analyze",
            &setup.pid(),
            setup.manifest.to_str().unwrap(),
            "--context-secs",
            "0",
            "--json",
        ])
        .env("SHADOWPATCH_STATE_DIR", setup.state())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    journal
        .append(&Record::Abort {
            txn,
            reason: "test".into(),
        })
        .unwrap();
    drop(lock);
    let done = crate::common::from_output(waiting.wait_with_output().unwrap());
    let analysis = done.json();
    assert!(
        !finding_codes(&analysis).contains(&"open-transaction".to_string()),
        "{analysis}"
    );
    assert!(!analysis["unavailable"].to_string().contains("busy"), "{analysis}");
}

#[test]
fn a_target_that_execd_is_gone_for_every_command() {
    let mut target = Running::start(Fixture::Execer, &["--no-aslr"]).unwrap();
    // First into the layout ASLR-off gives: every later exec repeats it
    // exactly (same addresses, same start_code), so only the per-exec
    // value can tell the programs apart.
    assert!(target.command("exec").unwrap().starts_with("ready"));
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let pid = target.pid().to_string();
    assert_eq!(shadowpatch(&state, &["mirror", &pid]).code, 0);
    assert_eq!(shadowpatch(&state, &["verify", &pid]).code, 0);
    let stat = |pid: i32| {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<String> = stat
            .rsplit_once(") ")
            .unwrap()
            .1
            .split(' ')
            .map(str::to_string)
            .collect();
        (fields[19].clone(), fields[23].clone(), fields[24].clone())
    };
    let before = stat(target.pid());
    let ready = target.command("exec").unwrap();
    assert!(ready.starts_with("ready"), "{ready}");
    assert_eq!(
        stat(target.pid()),
        before,
        "start time, start_code and end_code survive the exec"
    );
    for command in [&["verify", &pid][..], &["recover", &pid], &["rollback", &pid]] {
        let run = shadowpatch(&state, command);
        assert_eq!(run.code, 2, "{command:?}: {}{}", run.stdout, run.stderr);
        let line = one_line_error(&run);
        assert!(
            line.contains(&format!("pid {pid} exec'd a new program since")) && line.contains("dead target"),
            "{command:?}: {line}"
        );
    }
    // `status` shows the old state as a dead incarnation's.
    let status = shadowpatch(&state, &["status", &pid, "--json"]).json();
    assert!(status["generations"].as_array().unwrap().is_empty(), "{status}");
    assert_eq!(status["other_incarnations"].as_array().unwrap().len(), 1, "{status}");
    // Mirroring starts over: the old state is kept aside, like a dead
    // target's, and everything works on the new program.
    assert_eq!(shadowpatch(&state, &["mirror", &pid]).code, 0);
    assert_eq!(shadowpatch(&state, &["verify", &pid]).code, 0);
    let aside = std::fs::read_dir(state.join("targets"))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().contains(".exec-"))
        .count();
    assert_eq!(aside, 1);
    assert_eq!(target.command("work 4").unwrap(), "9");
}

#[test]
fn padding_after_a_function_is_named_by_its_neighbours_not_a_distant_label() {
    let target = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let pid = target.pid().to_string();
    let symbol = |name: &str| {
        let found = shadowpatch(&state, &["lookup", &pid, name, "--json"]).json();
        let address = u64::from_str_radix(found[0]["address"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
        (address, found[0]["size"].as_u64().unwrap())
    };
    let lookup = |address: u64| {
        let run = shadowpatch(&state, &["lookup", &pid, &format!("{address:#x}")]);
        assert_eq!(run.code, 0, "{}", run.stderr);
        run.stdout
    };
    let (tiny, tiny_size) = symbol("tiny");
    assert!(lookup(tiny + 1).contains("!tiny+0x1"), "{}", lookup(tiny + 1));
    let (work_fn, work_fn_size) = symbol("work_fn");
    for (name, start, size) in [("tiny", tiny, tiny_size), ("work_fn", work_fn, work_fn_size)] {
        let past = lookup(start + size);
        assert!(!past.contains("frame_dummy"), "{name}: {past}");
        assert!(past.contains(&format!("(between {name} and ")), "{name}: {past}");
    }
}
