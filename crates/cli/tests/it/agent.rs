//! End to end: the agent as a real daemon process (its own state directory
//! and sockets in a temporary directory). The CLI goes through it and acts
//! directly without it; an agent killed with SIGKILL mid-apply recovers the
//! target when restarted; another user cannot act on a target through it;
//! malformed and oversized requests are answered and the agent keeps
//! serving; C and Rust applications linking the runtime library ask it to
//! roll back their patch.

use crate::common::agent::Agent;
use crate::common::{assert_untouched, build_id_of, shadowpatch_env, wait_for_patched, write_manifest, Run};
use shadowpatch_fixtures::{build_c_patch, build_c_source, build_patch, Fixture, Patch, Running};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A test agent that listens for metrics on an ephemeral port.
fn start_agent(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Agent {
    let mut flags = vec!["--metrics-listen", "127.0.0.1:0"];
    flags.extend_from_slice(extra);
    Agent::start_with(dir, &flags, env)
}

/// The CLI with the agent's socket (used if an agent listens there).
fn cli(dir: &Path, args: &[&str]) -> Run {
    let socket = dir.join("agent.sock");
    shadowpatch_env(
        &dir.join("state"),
        args,
        &[("SHADOWPATCH_AGENT_SOCKET", socket.to_str().unwrap())],
    )
}

fn busy_patch(dir: &Path, target: &Running, id: &str) -> String {
    let object = build_patch(Patch::BusyFix).unwrap();
    let manifest = write_manifest(
        dir,
        id,
        &object,
        &build_id_of(&target.binary()),
        &[("work_fn", "work_fn_v2")],
    );
    manifest.to_str().unwrap().to_string()
}

fn send_raw(stream: &mut UnixStream, bytes: &[u8]) -> serde_json::Value {
    stream.write_all(bytes).unwrap();
    let mut line = String::new();
    BufReader::new(&*stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {line:?}"))
}

#[test]
fn the_cli_goes_through_a_running_agent_and_acts_directly_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let mut target = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let pid = target.pid();
    let pid_text = pid.to_string();
    let manifest = busy_patch(dir.path(), &target, "via-agent");
    let agent = start_agent(dir.path(), &[], &[]);
    let mode = std::fs::metadata(&agent.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the control socket is root's only by default");

    let applied = cli(dir.path(), &["apply", &pid_text, &manifest]);
    assert_eq!(applied.code, 0, "{}", applied.stderr);
    assert!(applied.stdout.contains("(by the agent)"), "{}", applied.stdout);
    wait_for_patched(&mut target, true);
    let watched = cli(dir.path(), &["watch", &pid_text, "--agent", "--json"]);
    assert_eq!(watched.code, 0, "{}", watched.stderr);
    let status = cli(dir.path(), &["status", &pid_text, "--json"]).json();
    assert_eq!(status["agent"]["watched"]["pid"], pid, "{status}");
    assert_eq!(status["patches"][0]["id"], "via-agent", "{status}");
    let rolled = cli(dir.path(), &["rollback", &pid_text, "--json"]);
    assert_eq!(rolled.code, 0, "{}", rolled.stderr);
    assert_eq!(rolled.json()["patch_id"], "via-agent");
    wait_for_patched(&mut target, false);
    // Bad input through the agent: the same one-line error and exit code.
    let nothing = cli(dir.path(), &["rollback", &pid_text]);
    assert_eq!(nothing.code, 2, "{}", nothing.stderr);
    assert!(nothing.stderr.contains("no active patch"), "{}", nothing.stderr);

    let metrics = agent.metrics();
    for line in [
        "shadowpatch_targets_watched 1\n",
        "shadowpatch_applies_total 1\n",
        "shadowpatch_rollbacks_total{cause=\"command\"} 1\n",
        "shadowpatch_patches_active 0\n",
        "shadowpatch_apply_pause_seconds_count 1\n",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    assert!(
        metrics.contains("shadowpatch_verification_sweep_seconds_bucket"),
        "{metrics}"
    );
    // The same, labelled with the target (pid, comm, unit); the refused
    // rollback ("no active patch") counted.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    let labelled = |family: &str, tail: &str| {
        let prefix = format!("{family}{{pid=\"{pid}\",comm=\"{}\",", comm.trim());
        metrics
            .lines()
            .find(|l| l.starts_with(&prefix))
            .map(|l| l.ends_with(tail))
            .unwrap_or_else(|| panic!("no {prefix} in\n{metrics}"))
    };
    assert!(labelled("shadowpatch_target_applies_total", "} 1"), "{metrics}");
    assert!(
        labelled("shadowpatch_target_rollbacks_total", "cause=\"command\"} 1"),
        "{metrics}"
    );
    assert!(
        labelled("shadowpatch_target_rollbacks_refused_total", "cause=\"command\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("shadowpatch_rollbacks_refused_total{cause=\"command\"} 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("shadowpatch_target_applies_total{pid=\"other\",comm=\"other\",unit=\"\"} 0\n"),
        "{metrics}"
    );
    let unwatched = cli(dir.path(), &["unwatch", &pid_text]);
    assert_eq!(unwatched.code, 0, "{}", unwatched.stderr);

    // Without an agent (its socket file left behind, as after a crash)
    // the same commands act directly.
    drop(agent);
    let applied = cli(dir.path(), &["apply", &pid_text, &manifest]);
    assert_eq!(applied.code, 0, "{}", applied.stderr);
    assert!(!applied.stdout.contains("(by the agent)"), "{}", applied.stdout);
    let status = cli(dir.path(), &["status", &pid_text, "--json"]).json();
    assert!(status["agent"].is_null(), "{status}");
    let rolled = cli(dir.path(), &["rollback", &pid_text, "--json"]);
    assert_eq!(rolled.code, 0, "{}", rolled.stderr);
    wait_for_patched(&mut target, false);
    assert_untouched(pid);
}

#[test]
fn an_agent_killed_mid_apply_recovers_the_target_and_its_watcher_when_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let mut target = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let pid = target.pid();
    let pid_text = pid.to_string();
    let manifest = busy_patch(dir.path(), &target, "interrupted");
    let agent = start_agent(dir.path(), &[], &[("SHADOWPATCH_FAULT", "written")]);
    let watched = cli(dir.path(), &["watch", &pid_text, "--agent"]);
    assert_eq!(watched.code, 0, "{}", watched.stderr);
    let applied = cli(dir.path(), &["apply", &pid_text, &manifest]);
    assert_eq!(applied.code, 3, "{}", applied.stderr);
    assert!(applied.stderr.contains("did not answer"), "{}", applied.stderr);
    assert_eq!(
        agent.wait().signal(),
        Some(libc::SIGKILL),
        "the agent died at the fault point"
    );
    // The agent died with every thread stopped and the trampoline written;
    // the kernel detached the dead tracer: the target runs on.
    assert_eq!(target.check().unwrap()["errors"], 0);

    let agent = start_agent(dir.path(), &[], &[]);
    let recovered = agent.target(pid);
    assert!(
        recovered["outcome"] == "fully_rolled_back" || recovered["outcome"] == "fully_applied",
        "{recovered}"
    );
    assert_eq!(recovered["watching"], true, "the watcher was resumed: {recovered}");
    let status = cli(dir.path(), &["status", &pid_text, "--json"]).json();
    assert!(status["interrupted"].is_null(), "{status}");
    assert_eq!(status["agent"]["watched"]["pid"], pid, "{status}");
    assert_eq!(target.check().unwrap()["errors"], 0);
    assert_untouched(pid);
    // Consistent: apply now works and is verified as authorised change.
    if recovered["outcome"] == "fully_applied" {
        assert_eq!(cli(dir.path(), &["rollback", &pid_text]).code, 0);
    }
    let applied = cli(dir.path(), &["apply", &pid_text, &manifest]);
    assert_eq!(applied.code, 0, "{}", applied.stderr);
    wait_for_patched(&mut target, true);
    let status = cli(dir.path(), &["status", &pid_text, "--json"]).json();
    assert_eq!(status["agent"]["watched"]["alerts"], 0, "{status}");
}

#[test]
fn another_user_cannot_act_on_a_target_through_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    // Let uid 65534 reach the socket (the directory is 0700 by default).
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let target = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let pid = target.pid();
    let pid_text = pid.to_string();
    let manifest = busy_patch(dir.path(), &target, "roots");
    let agent = start_agent(dir.path(), &["--socket-mode", "666"], &[]);
    assert_eq!(cli(dir.path(), &["apply", &pid_text, &manifest]).code, 0);

    // The build directory may sit under a directory only root can enter
    // (a clone in `mktemp -d`): run a copy from a world-readable place.
    let (_bin_dir, binary) = crate::common::binary_runnable_by_anyone();
    let output = Command::new(&binary)
        .args(["rollback", &pid_text])
        .env("SHADOWPATCH_STATE_DIR", dir.path().join("state"))
        .env("SHADOWPATCH_AGENT_SOCKET", &agent.socket)
        .current_dir("/")
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let run = crate::common::from_output(output);
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains("uid 65534") && run.stderr.contains(&format!("may not act on pid {pid}")),
        "{}",
        run.stderr
    );
    assert_eq!(run.stderr.lines().count(), 1, "one line: {}", run.stderr);
    // Untouched: the patch is still active, nothing was stopped.
    let status = cli(dir.path(), &["status", &pid_text, "--json"]).json();
    assert_eq!(status["patches"][0]["id"], "roots", "{status}");
    assert_untouched(pid);
    assert!(agent.metrics().contains("shadowpatch_bad_requests_total 1\n"));
}

#[test]
fn malformed_oversized_and_damaged_input_is_refused_and_the_agent_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let healthy = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let damaged = Running::start(Fixture::BusyC, &["1"]).unwrap();
    // Give the second target a journal that is damaged mid-file.
    let mirrored = shadowpatch_env(&state, &["mirror", &damaged.pid().to_string()], &[]);
    assert_eq!(mirrored.code, 0, "{}", mirrored.stderr);
    let target_dir = std::fs::read_dir(state.join("targets"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(&format!("{}-", damaged.pid()))
        })
        .unwrap();
    std::fs::write(target_dir.join("journal"), "{not a record}\n{\"op\":\"commit\"}\n").unwrap();
    // And a corrupt event history: the agent must serve on without it.
    std::fs::write(
        state.join("history.db"),
        b"this is not an SQLite database, it is damage",
    )
    .unwrap();

    let agent = start_agent(dir.path(), &[], &[]);
    let report = agent.target(damaged.pid());
    assert_eq!(report["outcome"], "error", "{report}");
    assert!(report["message"].as_str().unwrap().contains("journal"), "{report}");

    let mut stream = UnixStream::connect(&agent.socket).unwrap();
    let reply = send_raw(&mut stream, b"this is not json\n");
    assert_eq!(reply["ok"], false);
    assert!(
        reply["error"].as_str().unwrap().starts_with("malformed request"),
        "{reply}"
    );
    let reply = send_raw(&mut stream, b"{\"op\":\"format_disk\"}\n");
    assert_eq!(reply["ok"], false, "{reply}");
    let reply = send_raw(&mut stream, b"{\"op\":\"status\",\"state_dir\":\"/x\"}\n");
    assert_eq!(reply["ok"], false, "{reply}");
    let status = format!(
        "{{\"op\":\"status\",\"state_dir\":{:?},\"pid\":{}}}\n",
        state.to_str().unwrap(),
        healthy.pid()
    );
    let reply = send_raw(&mut stream, status.as_bytes());
    assert_eq!(reply["ok"], true, "the same connection still serves: {reply}");
    let gone = format!(
        "{{\"op\":\"rollback\",\"state_dir\":{:?},\"pid\":999999999}}\n",
        state.to_str().unwrap()
    );
    let reply = send_raw(&mut stream, gone.as_bytes());
    assert_eq!(reply["failure"], "bad_input", "{reply}");

    let mut oversized = vec![b'x'; 100 * 1024];
    oversized.push(b'\n');
    let mut stream = UnixStream::connect(&agent.socket).unwrap();
    let reply = send_raw(&mut stream, &oversized);
    assert!(reply["error"].as_str().unwrap().contains("longer than"), "{reply}");

    let mut app = UnixStream::connect(dir.path().join("app.sock")).unwrap();
    let reply = send_raw(&mut app, b"{\"op\":\"request_rollback\"}\n");
    assert_eq!(reply["ok"], false, "{reply}");
    let reply = send_raw(
        &mut app,
        b"{\"op\":\"hello\",\"version\":99,\"pending_address\":0,\"parked_address\":0,\"passed_address\":0}\n",
    );
    assert!(reply["error"].as_str().unwrap().contains("version 99"), "{reply}");
    // The test process has no patch: a clear refusal, not a crash.
    let reply = send_raw(&mut app, b"{\"op\":\"request_rollback\",\"reason\":\"test\"}\n");
    assert_eq!(reply["ok"], false, "{reply}");

    // Every other target is still served: status and a watch work.
    let pid_text = healthy.pid().to_string();
    let status = cli(dir.path(), &["status", &pid_text, "--json"]);
    assert_eq!(status.code, 0, "{}", status.stderr);
    assert_eq!(status.json()["agent"]["agent_pid"], agent.ready["pid"]);
    let watched = cli(dir.path(), &["watch", &pid_text, "--agent"]);
    assert_eq!(
        watched.code, 0,
        "watching despite the corrupt history: {}",
        watched.stderr
    );
    let damaged_status = cli(dir.path(), &["rollback", &damaged.pid().to_string()]);
    assert_ne!(damaged_status.code, 0);
    assert!(damaged_status.stderr.contains("journal"), "{}", damaged_status.stderr);
    assert_untouched(healthy.pid());
    assert_untouched(damaged.pid());
}

/// A C application linking the runtime library: `answer` prints
/// c_answer(), `register` registers a guarded variable, `rollback`
/// requests a rollback.
const C_APPLICATION: &str = r#"
__attribute__((noipa)) int c_answer(void) { return 1; }
static char config[64] = "configuration that must not change";
int main(void) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready\n");
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "answer", 6) == 0) {
            printf("answer=%d\n", c_answer());
        } else if (strncmp(line, "register", 8) == 0) {
            int r = shadowpatch_register_variable("config", config, sizeof config, SHADOWPATCH_GUARDED);
            printf("registered=%d %s\n", r, r == 0 ? "" : shadowpatch_last_error());
        } else if (strncmp(line, "rollback", 8) == 0) {
            char id[64] = "";
            int r = shadowpatch_request_rollback("error rate up since the patch", id, sizeof id);
            printf("rollback=%d id=%s %s\n", r, id, r == 0 ? "" : shadowpatch_last_error());
        }
    }
    return 0;
}
"#;

/// The same application in Rust, linking the `shadowpatch-runtime` crate.
const RUST_APPLICATION: &str = r#"
use std::io::BufRead;
#[no_mangle]
#[inline(never)]
pub extern "C" fn rust_answer() -> u64 { 1 }
static CONFIG: [u8; 64] = [7; 64];
fn main() {
    println!("ready");
    for line in std::io::stdin().lock().lines() {
        let line = line.unwrap();
        if line == "answer" {
            let f: extern "C" fn() -> u64 = std::hint::black_box(rust_answer);
            println!("answer={}", f());
        } else if line == "register" {
            let r = shadowpatch_runtime::register_variable("config", &CONFIG, shadowpatch_runtime::VariableMode::Guarded);
            println!("registered={}", if r.is_ok() { 0 } else { -1 });
        } else if line == "rollback" {
            match shadowpatch_runtime::request_rollback("error rate up since the patch") {
                Ok(done) => println!("rollback=0 id={}", done.patch_id),
                Err(e) => println!("rollback=-1 {e}"),
            }
        }
    }
}
"#;

const ANSWER_PATCH: &str = r#"
int c_answer_v2(void) { return 2; }
unsigned long rust_answer_v2(void) { return 2; }
"#;

fn c_application() -> PathBuf {
    let header = include_str!("../../../runtime/c/shadowpatch.h");
    let library = include_str!("../../../runtime/c/shadowpatch.c").replace("#include \"shadowpatch.h\"", "");
    let source = format!("#define _GNU_SOURCE\n{header}\n{library}\n{C_APPLICATION}");
    build_c_source("runtime-app-c", &source).unwrap()
}

/// Compile the Rust application with rustc against the runtime crate's
/// rlib that cargo built for this test (a dev-dependency), found beside
/// this test binary.
fn rust_application(dir: &Path) -> PathBuf {
    let deps = std::env::current_exe().unwrap().parent().unwrap().to_path_buf();
    let rlib = std::fs::read_dir(&deps)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("libshadowpatch_runtime-") && name.ends_with(".rlib")
        })
        .max_by_key(|e| e.metadata().unwrap().modified().unwrap())
        .expect("cargo built the shadowpatch-runtime rlib for this test")
        .path();
    let source = dir.join("runtime_app.rs");
    std::fs::write(&source, RUST_APPLICATION).unwrap();
    let binary = dir.join("runtime-app-rs");
    let output = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
        .args(["--edition", "2021", "-C", "opt-level=2", "-o"])
        .arg(&binary)
        .arg("--extern")
        .arg(format!("shadowpatch_runtime={}", rlib.display()))
        .arg("-L")
        .arg(format!("dependency={}", deps.display()))
        .arg(&source)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    binary
}

fn request_rollback_case(dir: &Path, binary: &Path, symbol: &str) {
    let app_socket = dir.join("app.sock");
    std::env::set_var("SHADOWPATCH_APP_SOCKET", &app_socket);
    let mut app = Running::start_binary(binary, &[]).unwrap();
    let pid = app.pid();
    let pid_text = pid.to_string();
    assert_eq!(app.command("answer").unwrap(), "answer=1");
    let object = build_c_patch("runtime-app-patch", ANSWER_PATCH).unwrap();
    let manifest = write_manifest(
        dir,
        &format!("{symbol}-fix"),
        &object,
        &build_id_of(binary),
        &[(symbol, &format!("{symbol}_v2"))],
    );
    let applied = cli(dir, &["apply", &pid_text, manifest.to_str().unwrap()]);
    assert_eq!(applied.code, 0, "{}", applied.stderr);
    assert_eq!(app.command("answer").unwrap(), "answer=2");

    let registered = app.command("register").unwrap();
    assert!(registered.starts_with("registered=0"), "{registered}");
    let status = cli(dir, &["status", &pid_text, "--json"]).json();
    assert_eq!(
        status["agent"]["watched"]["pid"], pid,
        "registering a variable starts a watch: {status}"
    );
    assert_eq!(status["variables"].as_array().unwrap().len(), 1, "{status}");

    let answer = app.command("rollback").unwrap();
    assert_eq!(answer, format!("rollback=0 id={symbol}-fix"), "{answer}");
    assert_eq!(app.command("answer").unwrap(), "answer=1");
    let answer = app.command("rollback").unwrap();
    assert!(
        answer.starts_with("rollback=-1") && answer.contains("no active patch"),
        "{answer}"
    );

    let history = cli(dir, &["history", &pid_text, "--kind", "rollback", "--json"]);
    let events = history.json();
    let events = events.as_array().unwrap();
    assert!(
        events.iter().any(|e| e["cause"] == "request" && e["outcome"] == "ok"),
        "{events:?}"
    );
    assert_untouched(pid);
}

#[test]
fn request_rollback_from_c_and_rust_applications_rolls_their_patch_back() {
    let dir = tempfile::tempdir().unwrap();
    let c_binary = c_application();
    let rust_binary = rust_application(dir.path());
    let agent = start_agent(dir.path(), &[], &[]);
    request_rollback_case(dir.path(), &c_binary, "c_answer");
    request_rollback_case(dir.path(), &rust_binary, "rust_answer");
    let metrics = agent.metrics();
    assert!(
        metrics.contains("shadowpatch_rollbacks_total{cause=\"request\"} 2\n"),
        "{metrics}"
    );
}

#[test]
fn the_agent_notifies_systemd_and_refuses_a_second_agent_and_bad_options() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    // A failure to notify fails the test instead of hanging it.
    notify
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    let notify_text = notify_path.to_str().unwrap().to_string();
    let _agent = start_agent(dir.path(), &[], &[("NOTIFY_SOCKET", &notify_text)]);
    let mut buffer = [0u8; 64];
    let read = notify.recv(&mut buffer).unwrap();
    assert_eq!(&buffer[..read], b"READY=1\n");

    let socket = dir.path().join("agent.sock");
    for (args, needle) in [
        (
            vec!["--agent-socket", socket.to_str().unwrap(), "--metrics-listen", "off"],
            "another agent is already listening",
        ),
        (
            vec![
                "--agent-socket",
                "/nonexistent-dir/x.sock",
                "--metrics-listen",
                "nowhere",
            ],
            "--metrics-listen nowhere",
        ),
        (
            vec!["--agent-socket", "/nonexistent-dir/x.sock", "--socket-mode", "999"],
            "--socket-mode 999",
        ),
        (
            vec![
                "--agent-socket",
                "/nonexistent-dir/x.sock",
                "--watch-after-apply",
                "soon",
            ],
            "--watch-after-apply soon",
        ),
        (
            vec!["--agent-socket", "/nonexistent-dir/x.sock", "--watch-after-apply", "3h"],
            "--watch",
        ),
        (
            vec![
                "--agent-socket",
                "/nonexistent-dir/x.sock",
                "--follow-interval",
                "often",
            ],
            "--follow-interval often",
        ),
        (
            vec![
                "--agent-socket",
                "/nonexistent-dir/x.sock",
                "--persist-interval",
                "weekly",
            ],
            "--persist-interval weekly",
        ),
    ] {
        let state = dir.path().join("state");
        let mut all = vec!["agent", "--app-socket"];
        let app = dir.path().join("app2.sock");
        all.push(app.to_str().unwrap());
        all.extend(args);
        let run = shadowpatch_env(&state, &all, &[]);
        assert_eq!(run.code, 2, "{all:?}: {}", run.stderr);
        assert!(run.stderr.contains(needle), "{all:?}: {}", run.stderr);
        assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    }
}

#[test]
fn the_agent_watches_its_applies_and_survives_a_crashing_patch() {
    let dir = tempfile::tempdir().unwrap();
    let mut target = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let pid_text = target.pid().to_string();
    let object = build_patch(Patch::BusyWatch).unwrap();
    let manifest = write_manifest(
        dir.path(),
        "null",
        &object,
        &build_id_of(&target.binary()),
        &[("work_fn", "work_fn_null")],
    );
    let agent = start_agent(dir.path(), &["--watch-after-apply", "5s"], &[]);
    let applied = cli(
        dir.path(),
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
    assert_eq!(
        applied.code, 4,
        "rolled back by the agent's watch: {}{}",
        applied.stdout, applied.stderr
    );
    let watch = &applied.json()["watch"];
    assert_eq!(watch["decision"], "rollback", "{watch}");
    assert_eq!(watch["cause"], "crash", "{watch}");
    assert_eq!(watch["recovery"]["function"], "work_fn", "{watch}");
    assert_eq!(target.command("ask 7").unwrap(), "22", "the original answers");
    let check = target.check().unwrap();
    assert_eq!(check["errors"], 0, "every call answered correctly: {check:?}");
    let status = cli(dir.path(), &["status", &pid_text, "--json"]).json();
    assert_eq!(status["patches"].as_array().map_or(0, Vec::len), 0, "{status}");
    let metrics = agent.metrics();
    assert!(
        metrics.contains("shadowpatch_rollbacks_total{cause=\"crash\"} 1\n"),
        "{metrics}"
    );
}
