//! Crash safety: kill shadowpatch (SIGKILL, via the test-only
//! SHADOWPATCH_FAULT hook) at every step of apply and rollback, then check
//! `recover` brings the target to a consistent state, fully applied or
//! fully rolled back, says which, and that everything agrees afterwards.

use crate::common::{
    anonymous_code_mappings, assert_untouched, build_id_of, shadowpatch, shadowpatch_env, write_manifest,
};
use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use shadowpatch_patch::fault::{APPLY_POINTS, ROLLBACK_POINTS};
use shadowpatch_process::remote::REMOTE_CALL_POINTS;

struct Setup {
    target: Running,
    dir: tempfile::TempDir,
    manifest: std::path::PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let target = Running::start(Fixture::BusyC, &["2"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let object = build_patch(Patch::BusyFix).unwrap();
        // Two functions, so a crash can fall between the two writes.
        let manifest = write_manifest(
            dir.path(),
            "crashy",
            &object,
            &build_id_of(&target.binary()),
            &[("work_fn", "work_fn_v2"), ("banner", "banner_v2")],
        );
        Setup { target, dir, manifest }
    }

    fn state(&self) -> std::path::PathBuf {
        self.dir.path().join("state")
    }

    fn pid(&self) -> String {
        self.target.pid().to_string()
    }

    /// Check the target answers as `applied` says and everything agrees.
    fn assert_consistent(&mut self, applied: bool, mappings_unpatched: usize) {
        let (answer, banner) = if applied {
            ("1000016", "sample service v2 (live-patched)")
        } else {
            ("16", "sample service v1")
        };
        assert_eq!(self.target.command("ask 5").unwrap(), answer);
        assert_eq!(self.target.command("banner").unwrap(), banner);
        let verify = shadowpatch(&self.state(), &["verify", &self.pid()]);
        assert_eq!(verify.code, 0, "mirror agrees with the target: {}", verify.stdout);
        let status = shadowpatch(&self.state(), &["status", &self.pid(), "--json"]).json();
        assert!(status["interrupted"].is_null(), "{status}");
        assert_eq!(status["patches"].as_array().unwrap().len(), usize::from(applied));
        if !applied {
            crate::common::assert_patch_memory_released(&self.state(), self.target.pid(), mappings_unpatched);
        }
        assert_eq!(self.target.check().unwrap()["errors"], 0);
        assert_untouched(self.target.pid());
    }
}

#[test]
fn killed_at_every_apply_step_recover_reaches_a_consistent_state() {
    for &point in APPLY_POINTS {
        let mut setup = Setup::new();
        let (state, pid) = (setup.state(), setup.pid());
        assert_eq!(shadowpatch(&state, &["mirror", &pid]).code, 0);
        let mappings = anonymous_code_mappings(setup.target.pid());
        let killed = shadowpatch_env(
            &state,
            &["apply", &pid, setup.manifest.to_str().unwrap()],
            &[("SHADOWPATCH_FAULT", point)],
        );
        assert_eq!(
            killed.code, -1,
            "{point}: killed by SIGKILL, got {}: {}",
            killed.code, killed.stderr
        );
        // Until recovered, new transactions are refused.
        let blocked = shadowpatch(&state, &["apply", &pid, setup.manifest.to_str().unwrap()]);
        assert_eq!(blocked.code, 1, "{point}: {}", blocked.stderr);
        assert!(
            blocked.stderr.contains("shadowpatch recover"),
            "{point}: {}",
            blocked.stderr
        );
        let recovered = shadowpatch(&state, &["recover", &pid, "--json"]);
        assert_eq!(recovered.code, 0, "{point}: {}{}", recovered.stdout, recovered.stderr);
        let recovered = recovered.json();
        let fully_applied = matches!(point, "written" | "activated");
        let expected = if fully_applied {
            "fully_applied"
        } else {
            "fully_rolled_back"
        };
        assert_eq!(recovered["state"], expected, "{point}: {recovered}");
        assert_eq!(recovered["patch_id"], "crashy");
        setup.assert_consistent(fully_applied, mappings);
        // A second recover finds nothing to do.
        assert_eq!(
            shadowpatch(&state, &["recover", &pid, "--json"]).json()["state"],
            "consistent"
        );
        if fully_applied {
            assert_eq!(shadowpatch(&state, &["rollback", &pid]).code, 0, "{point}");
            setup.assert_consistent(false, mappings);
        } else {
            assert_eq!(
                shadowpatch(&state, &["apply", &pid, setup.manifest.to_str().unwrap()]).code,
                0,
                "{point}"
            );
            setup.assert_consistent(true, mappings);
        }
    }
}

#[test]
fn killed_at_every_rollback_step_recover_finishes_the_rollback() {
    for &point in ROLLBACK_POINTS {
        let mut setup = Setup::new();
        let (state, pid) = (setup.state(), setup.pid());
        assert_eq!(shadowpatch(&state, &["mirror", &pid]).code, 0);
        let mappings = anonymous_code_mappings(setup.target.pid());
        assert_eq!(
            shadowpatch(&state, &["apply", &pid, setup.manifest.to_str().unwrap()]).code,
            0
        );
        let killed = shadowpatch_env(&state, &["rollback", &pid], &[("SHADOWPATCH_FAULT", point)]);
        assert_eq!(killed.code, -1, "{point}: {}", killed.stderr);
        let recovered = shadowpatch(&state, &["recover", &pid, "--json"]).json();
        assert_eq!(recovered["state"], "fully_rolled_back", "{point}: {recovered}");
        assert_eq!(recovered["interrupted"], "rollback");
        setup.assert_consistent(false, mappings);
    }
}

/// A kill while a target thread is borrowed for a remote system call (the
/// patch's mmap in an apply, its munmap in a rollback, or a call of the
/// analysis): the thread restores itself from its signal frame, so the
/// target runs on, its interrupted `read` restarted, and `recover` finds
/// the journal's transaction where the kill left it.
#[test]
fn killed_inside_every_remote_call_the_target_runs_on() {
    for &point in REMOTE_CALL_POINTS {
        for rollback in [false, true] {
            let mut setup = Setup::new();
            let (state, pid) = (setup.state(), setup.pid());
            let manifest = setup.manifest.to_str().unwrap().to_string();
            assert_eq!(shadowpatch(&state, &["mirror", &pid]).code, 0);
            let mappings = anonymous_code_mappings(setup.target.pid());
            if rollback {
                assert_eq!(shadowpatch(&state, &["apply", &pid, &manifest]).code, 0);
            }
            let args: &[&str] = if rollback {
                &["rollback", &pid]
            } else {
                &["apply", &pid, &manifest]
            };
            let killed = shadowpatch_env(&state, args, &[("SHADOWPATCH_FAULT", point)]);
            // A rollback whose patch a busy thread still runs retires it
            // rather than unmapping it: then no remote call is made.
            let finished = rollback && killed.code == 0;
            assert!(killed.code == -1 || finished, "{point} {args:?}: {}", killed.stderr);
            // The target is alive and its borrowed (main) thread answers.
            assert!(
                setup.target.command("ask 5").is_ok(),
                "{point} {args:?}: the target died"
            );
            let recovered = shadowpatch(&state, &["recover", &pid, "--json"]);
            assert_eq!(recovered.code, 0, "{point} {args:?}: {}", recovered.stderr);
            let applied = !recovered.json()["active_patches"].as_array().unwrap().is_empty();
            setup.assert_consistent(applied, mappings);
            let again: &[&str] = if applied {
                &["rollback", &pid]
            } else {
                &["apply", &pid, &manifest]
            };
            assert_eq!(shadowpatch(&state, again).code, 0, "{point} {again:?}");
            setup.assert_consistent(!applied, mappings);
        }
    }
}

#[test]
fn rollback_refuses_to_overwrite_someone_elses_change() {
    let mut setup = Setup::new();
    let (state, pid) = (setup.state(), setup.pid());
    let applied = shadowpatch(&state, &["apply", &pid, setup.manifest.to_str().unwrap(), "--json"]).json();
    // Someone else rewrites our jump at banner's entry.
    let entry = applied["functions"][1]["entry"].as_u64().unwrap();
    let identity = shadowpatch_process::ProcessIdentity::of(setup.target.pid()).unwrap();
    let mut memory = shadowpatch_process::TargetMemory::open(&identity).unwrap();
    let ours = memory.read_vec(entry, 5).unwrap();
    memory.write(entry + 1, &[0xcc]).unwrap();
    let refused = shadowpatch(&state, &["rollback", &pid]);
    assert_eq!(refused.code, 1, "{}", refused.stderr);
    assert!(
        refused.stderr.contains("someone else changed them"),
        "{}",
        refused.stderr
    );
    // Nothing was restored: work_fn is still patched.
    assert_eq!(setup.target.command("ask 5").unwrap(), "1000016");
    memory.write(entry, &ours).unwrap();
    assert_eq!(shadowpatch(&state, &["rollback", &pid]).code, 0);
    assert_eq!(setup.target.command("ask 5").unwrap(), "16");
}
