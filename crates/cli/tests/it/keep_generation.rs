//! Keep is a generation (issue 10): after `apply --watch` keeps a patch on
//! Debian's lighttpd, `verify` is clean, a concurrent `watch --heal` (a
//! standalone one, and the agent's own) raises no alert and heals nothing,
//! and `rollback` works. Before, the kept direct jump differed from the
//! generation (verify exit 1), the watcher wrote the stub jump back, and
//! rollback refused ("someone else changed them").

use crate::common::agent::Agent;
use crate::common::lighttpd::{get, start_lighttpd_with, LIGHTTPD};
use crate::common::watch::WatchProcess;
use crate::common::{build_id_of, shadowpatch, write_manifest, Run};
use shadowpatch_fixtures::{build_patch, Patch};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Requests on a second thread for the whole test (so the patched
/// function is called during the window), bounded in time.
struct Load {
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicU64::new(0));
        let (stop2, failed2) = (stop.clone(), failed.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop2.load(Ordering::Relaxed) && Instant::now() < deadline {
                if get(port).is_err() {
                    failed2.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Load {
            stop,
            failed,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.failed.load(Ordering::Relaxed)
    }
}

/// Every request looks the content type up again: with lighttpd's stat
/// cache on, entries would keep pointers into the patch's data, which a
/// rollback unmaps (a limit of that patch, not of the window).
const NO_STAT_CACHE: &str = "mimetype.assign = (\".html\" => \"text/html\")\nserver.stat-cache-engine = \"disable\"\n";

fn mime_manifest(dir: &Path) -> PathBuf {
    let object = build_patch(Patch::LighttpdMime).unwrap();
    write_manifest(
        dir,
        "mime-kept",
        &object,
        &build_id_of(Path::new(LIGHTTPD)),
        &[("stat_cache_mimetype_by_ext", "mimetype_v2")],
    )
}

fn assert_kept(run: &Run) {
    assert_eq!(run.code, 0, "kept: {}{}", run.stdout, run.stderr);
    let watch = &run.json()["watch"];
    assert_eq!(watch["decision"], "keep", "{watch}");
    let calls = &watch["calls"][0];
    assert_eq!(calls["function"], "stat_cache_mimetype_by_ext", "{watch}");
    assert!(calls["calls"].as_u64().unwrap() >= 1, "the load exercised it: {watch}");
}

/// `verify` clean, then `rollback` works and `verify` is clean again.
fn assert_verify_then_rollback(run: impl Fn(&[&str]) -> Run, pid: &str) {
    let verify = run(&["verify", pid, "--json"]);
    assert_eq!(
        verify.code, 0,
        "the kept patch is the generation: {}{}",
        verify.stdout, verify.stderr
    );
    let rolled = run(&["rollback", pid, "--json"]);
    assert_eq!(
        rolled.code, 0,
        "rollback after a kept window: {}{}",
        rolled.stdout, rolled.stderr
    );
    let verify = run(&["verify", pid]);
    assert_eq!(
        verify.code, 0,
        "clean after the rollback: {}{}",
        verify.stdout, verify.stderr
    );
}

#[test]
fn a_kept_window_is_verified_clean_left_alone_by_watch_heal_and_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_lighttpd_with(dir.path(), NO_STAT_CACHE);
    let pid = server.child.id() as i32;
    let pid_text = pid.to_string();
    let state = dir.path().join("state");
    let load = Load::start(server.port);
    let mut watcher = WatchProcess::start(&state, pid, &["--interval", "20ms", "--heal"]);
    let manifest = mime_manifest(dir.path());
    let applied = shadowpatch(
        &state,
        &[
            "apply",
            &pid_text,
            manifest.to_str().unwrap(),
            "--watch",
            "1.5",
            "--baseline",
            "0.3",
            "--force",
            "--context-secs",
            "0",
            "--json",
        ],
    );
    assert_kept(&applied);
    // Past the watcher's grace for just-ended transactions (2 s), and
    // several full passes after the keep: time enough to have healed.
    let kept_at = Instant::now();
    let first = watcher.wait_for("pass", |_| true)["pass"].as_u64().unwrap();
    let last = loop {
        let pass = watcher.wait_for("pass", |_| true);
        if pass["pass"].as_u64().unwrap() >= first + 5 && kept_at.elapsed() >= Duration::from_millis(2500) {
            break pass;
        }
    };
    assert_verify_then_rollback(|args| shadowpatch(&state, args), &pid_text);
    let (_, rest) = watcher.stop();
    let events: Vec<_> = rest.iter().collect();
    assert_eq!(last["alerts"], 0, "no alert for the kept patch: {last}");
    assert_eq!(last["heals"], 0, "nothing healed over it: {last}");
    assert!(
        !events.iter().any(|e| e["event"] == "alert" || e["event"] == "heal"),
        "{events:#?}"
    );
    assert_eq!(load.finish(), 0, "lighttpd answered every request");
}

#[test]
fn the_agents_watcher_leaves_a_window_it_kept_alone() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_lighttpd_with(dir.path(), NO_STAT_CACHE);
    let pid_text = server.child.id().to_string();
    let state = dir.path().join("state");
    let load = Load::start(server.port);
    let agent = Agent::start_with(
        dir.path(),
        &["--watch-interval", "20ms", "--watch-after-apply", "1500ms"],
        &[],
    );
    let watching = agent.cli(&state, &["watch", &pid_text, "--agent", "--heal"]);
    assert_eq!(watching.code, 0, "{}{}", watching.stdout, watching.stderr);
    let manifest = mime_manifest(dir.path());
    let applied = agent.cli(
        &state,
        &[
            "apply",
            &pid_text,
            manifest.to_str().unwrap(),
            "--force",
            "--context-secs",
            "0",
            "--json",
        ],
    );
    assert_kept(&applied);
    let kept_at = Instant::now();
    let passes = |agent: &Agent| {
        let status = agent.cli(&state, &["status", &pid_text, "--json"]).json();
        status["agent"]["watched"].clone()
    };
    let first = passes(&agent)["passes"].as_u64().unwrap();
    let last = loop {
        let watched = passes(&agent);
        if watched["passes"].as_u64().unwrap() >= first + 5 && kept_at.elapsed() >= Duration::from_millis(2500) {
            break watched;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(last["alerts"], 0, "no alert for the kept patch: {last}");
    assert_eq!(last["heals"], 0, "nothing healed over it: {last}");
    assert_verify_then_rollback(|args| agent.cli(&state, args), &pid_text);
    assert_eq!(load.finish(), 0, "lighttpd answered every request");
}
