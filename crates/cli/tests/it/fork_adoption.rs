//! Fork adoption on real processes: a child forked from a patched process
//! carries the patch, so every command on it takes over its ancestor's
//! state as of the fork (verify clean against that generation, rollback
//! restores the original code in the child alone); a child forked before
//! the patch, or one that exec'd, is its own clean program. Then Debian's
//! nginx: the master patched, `nginx -s reload` and a killed worker respawned, the new workers known,
//! verified and rolled back as a tree.

use crate::common::{build_id_of, members_with, shadowpatch, write_manifest};
use shadowpatch_fixtures::{build_c_patch, children_of, Fixture, Running};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// execer's `work(x)` is `x * 2 + 1`; the patch answers `x * 2 + 100`, so a
/// child's exit code (work(1) & 0xff) tells which code it ran: 3 or 102.
const WORK_PATCH: &str = "long work_v2(long x) { return x * 2 + 100; }\n";
const ORIGINAL_EXIT: &str = "exit=3";
const PATCHED_EXIT: &str = "exit=102";

struct Setup {
    _dir: tempfile::TempDir,
    state: PathBuf,
    manifest: String,
    parent: Running,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let parent = Running::start(Fixture::Execer, &[]).unwrap();
    let object = build_c_patch("execer_fork_work", WORK_PATCH).unwrap();
    let manifest = write_manifest(
        dir.path(),
        "fork-work",
        &object,
        &build_id_of(&parent.binary()),
        &[("work", "work_v2")],
    );
    Setup {
        state: dir.path().join("state"),
        manifest: manifest.to_str().unwrap().to_string(),
        _dir: dir,
        parent,
    }
}

impl Setup {
    fn apply_to_parent(&mut self) {
        let pid = self.parent.pid().to_string();
        let applied = shadowpatch(&self.state, &["apply", &pid, &self.manifest, "--context-secs", "0"]);
        assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
        assert_eq!(self.parent.command("work 1").unwrap(), "102");
    }

    /// Fork a child (`fork` or `forkexec`); its pid.
    fn fork(&mut self, command: &str) -> i32 {
        let answer = self.parent.command(command).unwrap();
        answer
            .strip_prefix("child=")
            .unwrap_or_else(|| panic!("{command}: {answer}"))
            .parse()
            .unwrap()
    }

    /// Ask the child to run work(1) and exit with it; its exit line.
    fn child_exit(&mut self, child: i32) -> String {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child), nix::sys::signal::Signal::SIGTERM).unwrap();
        self.parent.command(&format!("wait {child}")).unwrap()
    }
}

#[test]
fn a_child_forked_after_the_patch_adopts_it_and_rolls_back_alone() {
    let mut setup = setup();
    setup.apply_to_parent();
    let child = setup.fork("fork");
    let pid = child.to_string();
    let parent = setup.parent.pid();

    let verified = shadowpatch(&setup.state, &["verify", &pid, "--json"]);
    assert_eq!(verified.code, 0, "{}{}", verified.stdout, verified.stderr);
    let outcome = verified.json();
    assert_eq!(outcome["clean"], true, "{outcome}");
    assert_eq!(
        outcome["generation"], 1,
        "verified against the adopted generation: {outcome}"
    );
    assert_eq!(outcome["adopted"]["ancestor_pid"], parent, "{outcome}");
    assert_eq!(
        outcome["adopted"]["patches"],
        serde_json::json!(["fork-work"]),
        "{outcome}"
    );
    // Adopted once: the next command finds the child's own state.
    let again = shadowpatch(&setup.state, &["verify", &pid, "--json"]).json();
    assert!(again.get("adopted").is_none(), "{again}");
    assert_eq!(again["generation"], 1);
    let history = shadowpatch(&setup.state, &["history", "--json"]);
    assert!(history.stdout.contains("\"adopt\""), "{}", history.stdout);

    let rolled = shadowpatch(&setup.state, &["rollback", &pid, "--json"]);
    assert_eq!(rolled.code, 0, "{}{}", rolled.stdout, rolled.stderr);
    let after = shadowpatch(&setup.state, &["verify", &pid, "--json"]).json();
    assert_eq!(
        (after["clean"].clone(), after["generation"].clone()),
        (true.into(), 0.into()),
        "{after}"
    );
    // The child runs the original code again; its parent keeps the patch.
    assert_eq!(setup.child_exit(child), ORIGINAL_EXIT);
    assert_eq!(setup.parent.command("work 1").unwrap(), "102");
    let parent_verified = shadowpatch(&setup.state, &["verify", &parent.to_string(), "--json"]).json();
    assert_eq!(parent_verified["generation"], 1, "{parent_verified}");
    assert_eq!(parent_verified["clean"], true, "{parent_verified}");

    // `mirror` of another such child says it adopted; the child runs the
    // patch it carries.
    let second = setup.fork("fork");
    let mirrored = shadowpatch(&setup.state, &["mirror", &second.to_string()]);
    assert_eq!(mirrored.code, 0, "{}{}", mirrored.stdout, mirrored.stderr);
    assert!(
        mirrored.stdout.contains(&format!("was forked from pid {parent}")) && mirrored.stdout.contains("adopted"),
        "{}",
        mirrored.stdout
    );
    assert_eq!(setup.child_exit(second), PATCHED_EXIT);
}

#[test]
fn a_child_forked_before_the_patch_is_not_adopted_as_patched() {
    let mut setup = setup();
    let child = setup.fork("fork");
    setup.apply_to_parent();
    let pid = child.to_string();
    let mirrored = shadowpatch(&setup.state, &["mirror", &pid, "--json"]);
    assert_eq!(mirrored.code, 0, "{}{}", mirrored.stdout, mirrored.stderr);
    let outcome = mirrored.json();
    assert!(outcome.get("adopted").is_none(), "{outcome}");
    assert_eq!(outcome["generation"], 0);
    let verified = shadowpatch(&setup.state, &["verify", &pid, "--json"]).json();
    assert_eq!(
        (verified["clean"].clone(), verified["generation"].clone()),
        (true.into(), 0.into())
    );
    let rollback = shadowpatch(&setup.state, &["rollback", &pid]);
    assert_ne!(rollback.code, 0, "nothing to roll back: {}", rollback.stdout);
    assert_eq!(setup.child_exit(child), ORIGINAL_EXIT);
}

#[test]
fn a_child_that_execd_is_a_new_image_and_not_adopted() {
    let mut setup = setup();
    setup.apply_to_parent();
    let child = setup.fork("forkexec");
    let pid = child.to_string();
    let verified = shadowpatch(&setup.state, &["verify", &pid]);
    assert_eq!(
        verified.code, 2,
        "no state and nothing adopted: {}{}",
        verified.stdout, verified.stderr
    );
    assert!(verified.stderr.contains("no mirror of pid"), "{}", verified.stderr);
    let mirrored = shadowpatch(&setup.state, &["mirror", &pid, "--json"]).json();
    assert!(mirrored.get("adopted").is_none(), "{mirrored}");
    let verified = shadowpatch(&setup.state, &["verify", &pid, "--json"]).json();
    assert_eq!(
        (verified["clean"].clone(), verified["generation"].clone()),
        (true.into(), 0.into())
    );
    assert_eq!(setup.child_exit(child), ORIGINAL_EXIT);
}

#[test]
fn a_child_whose_ancestor_rolled_back_since_the_fork_is_refused_untouched() {
    let mut setup = setup();
    setup.apply_to_parent();
    let child = setup.fork("fork");
    let parent = setup.parent.pid().to_string();
    assert_eq!(shadowpatch(&setup.state, &["rollback", &parent]).code, 0);
    let verified = shadowpatch(&setup.state, &["verify", &child.to_string()]);
    assert_eq!(verified.code, 1, "refused: {}{}", verified.stdout, verified.stderr);
    assert!(
        verified.stderr.contains("has rolled back since") && verified.stderr.lines().count() == 1,
        "{}",
        verified.stderr
    );
    // Nothing was adopted, and the child still runs what it inherited.
    assert_eq!(setup.child_exit(child), PATCHED_EXIT);
}

const NGINX: &str = "/usr/sbin/nginx";

/// Replaces nginx's `ngx_http_arg` (the `$arg_NAME` lookup): every
/// argument reads "patched".
const NGINX_ARG_PATCH: &str = "typedef struct { unsigned long len; unsigned char *data; } ngx_str_t;\n\
static unsigned char text[] = \"patched\";\n\
long ngx_http_arg_v2(void *r, unsigned char *name, unsigned long len, ngx_str_t *value) {\n\
    (void)r; (void)name; (void)len;\n\
    value->len = sizeof(text) - 1;\n\
    value->data = text;\n\
    return 0;\n\
}\n";

struct Nginx {
    master: Child,
    config: PathBuf,
    port: u16,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // The master first (it would replace killed workers), then the
        // workers it leaves behind.
        let workers = children_of(self.master.id() as i32);
        let _ = self.master.kill();
        let _ = self.master.wait();
        for worker in workers {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(worker), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn start_nginx(dir: &Path) -> Nginx {
    assert!(
        Path::new(NGINX).exists(),
        "{NGINX} is missing: install Debian's nginx-light (apt-get install -y nginx-light)"
    );
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let d = dir.display();
    let config = dir.join("nginx.conf");
    std::fs::write(
        &config,
        format!(
            "daemon off;\nmaster_process on;\nworker_processes 2;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             server {{\n    listen 127.0.0.1:{port};\n    location / {{ return 200 \"arg=$arg_x\\n\"; }}\n  }}\n}}\n"
        ),
    )
    .unwrap();
    let master = Command::new(NGINX)
        .args(["-e", &format!("{d}/error.log"), "-c"])
        .arg(&config)
        .stdin(Stdio::null())
        .spawn()
        .expect("nginx starts");
    let nginx = Nginx { master, config, port };
    let deadline = Instant::now() + Duration::from_secs(20);
    while nginx_get(port).is_err() || children_of(nginx.master.id() as i32).len() < 2 {
        assert!(Instant::now() < deadline, "nginx did not answer on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    nginx
}

/// The body nginx answers to `/?x=original`.
fn nginx_get(port: u16) -> std::io::Result<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET /?x=original HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.trim().to_string()),
        _ => Err(std::io::Error::other(format!("bad response: {response:?}"))),
    }
}

fn nginx_bodies(port: u16, n: usize) -> std::collections::BTreeSet<String> {
    (0..n).map(|_| nginx_get(port).expect("nginx answers")).collect()
}

#[test]
fn nginx_workers_started_by_a_reload_or_a_respawn_of_the_patched_master_are_adopted_and_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let nginx = start_nginx(dir.path());
    let master = nginx.master.id() as i32;
    let old_workers = children_of(master);
    let state = dir.path().join("state");
    let manifest = write_manifest(
        dir.path(),
        "nginx-arg",
        &build_c_patch("nginx_arg", NGINX_ARG_PATCH).unwrap(),
        &build_id_of(Path::new(NGINX)),
        &[("ngx_http_arg", "ngx_http_arg_v2")],
    );
    let manifest = manifest.to_str().unwrap();
    assert_eq!(nginx_bodies(nginx.port, 10), ["arg=original".to_string()].into());

    // The master alone: its workers, forked before, stay unpatched.
    let root = master.to_string();
    let applied = shadowpatch(&state, &["apply", &root, manifest, "--context-secs", "0"]);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    assert_eq!(nginx_bodies(nginx.port, 10), ["arg=original".to_string()].into());

    let reload = Command::new(NGINX)
        .args(["-e", &format!("{}/error.log", dir.path().display()), "-c"])
        .arg(&nginx.config)
        .args(["-s", "reload"])
        .output()
        .unwrap();
    assert!(reload.status.success(), "{reload:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let new_workers = loop {
        let now = children_of(master);
        if now.len() == 2 && now.iter().all(|w| !old_workers.contains(w)) {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the reload never replaced the workers: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        nginx_bodies(nginx.port, 20),
        ["arg=patched".to_string()].into(),
        "the new workers inherited the patch"
    );
    for worker in &new_workers {
        let verified = shadowpatch(&state, &["verify", &worker.to_string(), "--json"]);
        assert_eq!(verified.code, 0, "{}{}", verified.stdout, verified.stderr);
        let outcome = verified.json();
        assert_eq!(
            (outcome["clean"].clone(), outcome["generation"].clone()),
            (true.into(), 1.into())
        );
        assert_eq!(outcome["adopted"]["ancestor_pid"], master, "{outcome}");
    }

    // A worker dies; the master forks its replacement, patched like its
    // sibling, and `--tree` reaches it.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new_workers[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let new_workers = loop {
        let now = children_of(master);
        if now.len() == 2 && !now.contains(&new_workers[0]) {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the master never respawned the worker: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        nginx_bodies(nginx.port, 20),
        ["arg=patched".to_string()].into(),
        "the respawned worker carries the patch"
    );

    let rolled = shadowpatch(&state, &["rollback", &root, "--tree", "--json"]);
    assert_eq!(rolled.code, 0, "{}{}", rolled.stdout, rolled.stderr);
    let members = members_with(&rolled.json(), "rolled_back");
    assert_eq!(
        members.len(),
        3,
        "master, the reload's worker and the respawned one: {}",
        rolled.stdout
    );
    assert_eq!(nginx_bodies(nginx.port, 20), ["arg=original".to_string()].into());
    for pid in new_workers.iter().chain([&master]) {
        let verified = shadowpatch(&state, &["verify", &pid.to_string(), "--json"]).json();
        assert_eq!(
            (verified["clean"].clone(), verified["generation"].clone()),
            (true.into(), 0.into()),
            "{verified}"
        );
    }
}

#[test]
fn the_agent_adopts_a_child_as_it_is_forked() {
    let mut setup = setup();
    let home = setup.state.parent().unwrap().to_path_buf();
    let _agent = crate::common::agent::Agent::start_with(&home, &["--follow-interval", "50ms"], &[]);
    setup.apply_to_parent();
    let child = setup.fork("fork");
    // No command names the child: the agent finds and adopts it, so it is
    // known (listed, verifiable) even if its parent exits first.
    let deadline = Instant::now() + Duration::from_secs(20);
    let adopted = loop {
        let listed = shadowpatch(&setup.state, &["list", "--json"]).json();
        let entry = listed["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["pid"] == child)
            .cloned();
        if let Some(entry) = entry.filter(|e| e["active_patches"] == serde_json::json!(["fork-work"])) {
            break entry;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never adopted pid {child}: {listed}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(adopted["liveness"], "alive", "{adopted}");
    let history = shadowpatch(&setup.state, &["history", "--kind", "adopt", "--json"]).json();
    let events = history["events"]
        .as_array()
        .or(history.as_array())
        .cloned()
        .unwrap_or_default();
    assert!(
        events.iter().any(|e| e["pid"] == child && e["outcome"] == "ok"),
        "{history}"
    );
    let pid = child.to_string();
    let verified = shadowpatch(&setup.state, &["verify", &pid]);
    assert_eq!(verified.code, 0, "{}{}", verified.stdout, verified.stderr);
    assert_eq!(setup.child_exit(child), PATCHED_EXIT);
}
