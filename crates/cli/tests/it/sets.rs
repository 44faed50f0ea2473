//! Target sets (`--tree`, `--cgroup`, `--unit`) on real processes:
//! Debian's lighttpd run with a master and two forked workers, patched as
//! a tree under load (every answer patched, verify clean on each member,
//! rolled back as a tree), all-or-none when one member fails, and fixture
//! processes moved into a cgroup of the test's own.

use crate::common::lighttpd::{content_type, start_lighttpd_with, LIGHTTPD};
use crate::common::{assert_bad_input, assert_untouched, build_id_of, shadowpatch, write_manifest};
use shadowpatch_fixtures::{build_patch, children_of, Fixture, Patch, Running};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Every request looks the content type up again (see keep_generation.rs);
/// two workers forked by the master serve the requests.
const WORKERS: &str = "mimetype.assign = (\".html\" => \"text/html\")\nserver.stat-cache-engine = \"disable\"\n\
                       server.max-worker = 2\n";

/// The content types of `n` requests (spread over the workers).
fn content_types(port: u16, n: usize) -> std::collections::BTreeSet<String> {
    (0..n).map(|_| content_type(port)).collect()
}

fn outcomes(run: &crate::common::Run) -> Vec<(i64, String)> {
    run.json()["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["pid"].as_i64().unwrap(), m["outcome"].as_str().unwrap().to_string()))
        .collect()
}

#[test]
fn a_lighttpd_master_and_its_workers_are_patched_and_rolled_back_as_a_tree() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_lighttpd_with(dir.path(), WORKERS);
    let master = server.child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(20);
    while children_of(master).len() < 2 {
        assert!(Instant::now() < deadline, "lighttpd never forked its 2 workers");
        std::thread::sleep(Duration::from_millis(20));
    }
    let workers = children_of(master);
    let state = dir.path().join("state");
    let manifest = write_manifest(
        dir.path(),
        "mime-tree",
        &build_patch(Patch::LighttpdMime).unwrap(),
        &build_id_of(Path::new(LIGHTTPD)),
        &[("stat_cache_mimetype_by_ext", "mimetype_v2")],
    );
    let manifest = manifest.to_str().unwrap();
    let root = master.to_string();
    assert_eq!(content_types(server.port, 20), ["text/html".to_string()].into());

    // One analysis per member, nothing written.
    let analysed = shadowpatch(&state, &["analyze", &root, manifest, "--tree", "--context-secs", "0"]);
    assert_eq!(analysed.code, 0, "{}{}", analysed.stdout, analysed.stderr);
    assert_eq!(analysed.stdout.matches("== pid").count(), 3, "{}", analysed.stdout);
    assert_eq!(
        analysed.stdout.matches("analysis of patch mime-tree").count(),
        3,
        "{}",
        analysed.stdout
    );
    assert_eq!(content_types(server.port, 20), ["text/html".to_string()].into());

    let applied = shadowpatch(
        &state,
        &["apply", &root, manifest, "--tree", "--context-secs", "0", "--json"],
    );
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    let members = outcomes(&applied);
    assert_eq!(members.len(), 3, "master and 2 workers: {members:?}");
    assert!(members.iter().all(|(_, o)| o == "applied"), "{members:?}");
    // Children first: the master, their parent, comes last.
    assert_eq!(members.last().unwrap().0, master as i64);
    for worker in &workers {
        assert!(members.iter().any(|(pid, _)| *pid == *worker as i64), "{members:?}");
    }
    assert_eq!(
        content_types(server.port, 20),
        ["text/x-shadowpatch".to_string()].into(),
        "every worker answers patched"
    );
    let verified = shadowpatch(&state, &["verify", &root, "--tree"]);
    assert_eq!(verified.code, 0, "{}{}", verified.stdout, verified.stderr);
    assert_eq!(verified.stdout.matches("== pid").count(), 3, "{}", verified.stdout);

    let rolled = shadowpatch(&state, &["rollback", &root, "--tree", "--json"]);
    assert_eq!(rolled.code, 0, "{}{}", rolled.stdout, rolled.stderr);
    assert_eq!(outcomes(&rolled).len(), 3);
    assert_eq!(content_types(server.port, 20), ["text/html".to_string()].into());

    // All or none: one worker already has the patch, so its member of
    // the set fails; the members done before it are rolled back.
    let one = workers[0].to_string();
    let single = shadowpatch(&state, &["apply", &one, manifest, "--context-secs", "0"]);
    assert_eq!(single.code, 0, "{}{}", single.stdout, single.stderr);
    let refused = shadowpatch(
        &state,
        &["apply", &root, manifest, "--tree", "--context-secs", "0", "--json"],
    );
    assert_ne!(refused.code, 0, "{}{}", refused.stdout, refused.stderr);
    let members = outcomes(&refused);
    assert!(
        members
            .iter()
            .all(|(_, o)| o == "undone" || o == "refused" || o == "failed" || o == "not_attempted"),
        "{members:?}"
    );
    assert!(
        members
            .iter()
            .any(|(pid, o)| *pid == workers[0] as i64 && (o == "refused" || o == "failed")),
        "{members:?}"
    );
    // Only the worker patched on its own answers patched; rolling the
    // tree back finds exactly that one.
    let rolled = shadowpatch(&state, &["rollback", &root, "--tree", "--json"]);
    assert_eq!(rolled.code, 0, "{}{}", rolled.stdout, rolled.stderr);
    assert_eq!(outcomes(&rolled), vec![(workers[0] as i64, "rolled_back".to_string())]);
    assert_eq!(content_types(server.port, 20), ["text/html".to_string()].into());
}

/// A cgroup v2 of the test's own, removed on drop. The v2 hierarchy is
/// found in /proc/self/mountinfo: on a hybrid host (this machine kind)
/// /sys/fs/cgroup is a tmpfs and v2 is mounted at /sys/fs/cgroup/unified.
struct TestCgroup {
    root: std::path::PathBuf,
    dir: std::path::PathBuf,
}

impl TestCgroup {
    fn new() -> Option<TestCgroup> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let root = mountinfo.lines().find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            right
                .starts_with("cgroup2 ")
                .then(|| left.split(' ').nth(4).map(std::path::PathBuf::from))?
        })?;
        let dir = root.join(format!("shadowpatch-test-{}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        Some(TestCgroup { root, dir })
    }

    fn adopt(&self, pid: i32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Its processes go back to the root cgroup first.
        if let Ok(procs) = std::fs::read_to_string(self.dir.join("cgroup.procs")) {
            for pid in procs.lines() {
                let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

#[test]
fn a_cgroup_is_patched_member_by_member_and_bad_sets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut first = Running::start(Fixture::BusyC, &[]).unwrap();
    let mut second = Running::start(Fixture::BusyC, &[]).unwrap();
    let manifest = write_manifest(
        dir.path(),
        "fix-cgroup",
        &build_patch(Patch::BusyFix).unwrap(),
        &build_id_of(&first.binary()),
        &[("work_fn", "work_fn_v2")],
    );
    let manifest = manifest.to_str().unwrap();

    // Bad sets: one line, exit 2, nothing done.
    let missing = shadowpatch(&state, &["apply", "--cgroup", "no/such/group-sp", manifest]);
    assert_bad_input(&missing, "no/such/group-sp");
    let unit = shadowpatch(&state, &["apply", "--unit", "no-such-unit-sp", manifest]);
    assert_bad_input(&unit, "no-such-unit-sp");
    let both = shadowpatch(&state, &["apply", "1", manifest, "--partial"]);
    assert_bad_input(&both, "--partial");
    let no_manifest = shadowpatch(&state, &["apply", "--cgroup", "x"]);
    assert_bad_input(&no_manifest, "<MANIFEST>");
    let root = first.pid().to_string();
    let watched = shadowpatch(&state, &["apply", &root, manifest, "--tree", "--watch", "2"]);
    assert_bad_input(&watched, "--watch applies to one process");
    let restore = shadowpatch(&state, &["rollback", &root, "--tree", "--restore-state"]);
    assert_bad_input(&restore, "--restore-state applies to one process");
    // A tree in which no process maps the manifest's module: analyze and
    // apply say so, exit 2.
    let other = Running::start(Fixture::AnalysisTarget, &[]).unwrap();
    let other_root = other.pid().to_string();
    for command in ["analyze", "apply"] {
        let none = shadowpatch(
            &state,
            &[command, &other_root, manifest, "--tree", "--context-secs", "0"],
        );
        assert_bad_input(&none, "maps");
        assert!(none.stderr.contains(&other_root), "{command}: {}", none.stderr);
    }
    assert_untouched(other.pid());
    // Refused before anything was read or written: no state, target as it was.
    assert!(!state.join("targets").exists(), "nothing recorded for a refused set");
    assert_untouched(first.pid());

    let Some(group) = TestCgroup::new() else {
        panic!("cannot create a cgroup v2 (a writable cgroup2 mount is needed, as on this machine kind)");
    };
    group.adopt(first.pid());
    group.adopt(second.pid());
    let name = group.dir.file_name().unwrap().to_str().unwrap().to_string();
    let before = (first.command("ask 5").unwrap(), second.command("ask 5").unwrap());
    let applied = shadowpatch(
        &state,
        &["apply", "--cgroup", &name, manifest, "--context-secs", "0", "--json"],
    );
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    assert_eq!(outcomes(&applied).len(), 2, "{}", applied.stdout);
    let after = (first.command("ask 5").unwrap(), second.command("ask 5").unwrap());
    assert_ne!(before.0, after.0, "the first member runs the patch");
    assert_ne!(before.1, after.1, "the second member runs the patch");
    let status = shadowpatch(&state, &["status", "--cgroup", group.dir.to_str().unwrap()]);
    assert_eq!(status.code, 0, "{}{}", status.stdout, status.stderr);
    let rolled = shadowpatch(&state, &["rollback", "--cgroup", &name]);
    assert_eq!(rolled.code, 0, "{}{}", rolled.stdout, rolled.stderr);
    assert_eq!(
        (first.command("ask 5").unwrap(), second.command("ask 5").unwrap()),
        before
    );
    // Nothing left to roll back: bad input, named.
    let again = shadowpatch(&state, &["rollback", "--cgroup", &name]);
    assert_bad_input(&again, "has a patch active");
}

/// `watch` over a set is the agent's (one watcher per member); without
/// `--agent` it is refused before anything is done.
#[test]
fn the_agent_watches_each_process_of_a_tree() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let mut tree = Command::new("sh")
        .args(["-c", "sleep 600 & sleep 600 & wait"])
        .spawn()
        .unwrap();
    let root = tree.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(20);
    while children_of(root).len() < 2 {
        assert!(Instant::now() < deadline, "the shell never started its 2 children");
        std::thread::sleep(Duration::from_millis(20));
    }
    let root_text = root.to_string();
    let refused = shadowpatch(&state, &["watch", &root_text, "--tree"]);
    assert_bad_input(&refused, "add --agent");
    let agent = crate::common::agent::Agent::start(dir.path());
    let watched = agent.cli(&state, &["watch", &root_text, "--tree", "--agent"]);
    assert_eq!(watched.code, 0, "{}{}", watched.stdout, watched.stderr);
    assert_eq!(
        watched.stdout.matches("the agent watches pid").count(),
        3,
        "{}",
        watched.stdout
    );
    for pid in std::iter::once(root).chain(children_of(root)) {
        let ended = agent.cli(&state, &["unwatch", &pid.to_string()]);
        assert_eq!(
            ended.code, 0,
            "pid {pid} was not watched: {}{}",
            ended.stdout, ended.stderr
        );
    }
    for child in children_of(root) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child), nix::sys::signal::Signal::SIGKILL);
    }
    let _ = tree.kill();
    let _ = tree.wait();
}
