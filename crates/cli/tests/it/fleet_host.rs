//! Hosts and the fleet predictor, end to end on real processes: with the
//! service down the host's own model decides and says why (and an apply's
//! outcome waits in the outbox); a bad `--predictor` is refused with the
//! target untouched; and with the real service (`shadowpatch predictor
//! serve`), two hosts whose watches roll a crashing patch back make a
//! third host's analysis of the same patch refuse with `fleet-history`,
//! naming the service's model. The agent's `--predictor` scores the
//! applies it makes and its outcomes are queued like the CLI's.

use crate::common::agent::Agent;
use crate::common::{assert_bad_input, assert_untouched, build_id_of, shadowpatch, write_manifest, Run};
use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A URL on 127.0.0.1 where nothing listens.
fn closed_port_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("http://127.0.0.1:{port}")
}

/// One simulated host: its own state directory and its own busy process.
struct Host {
    name: &'static str,
    target: Running,
    state: PathBuf,
}

impl Host {
    fn start(name: &'static str, dir: &Path) -> Host {
        Host {
            name,
            target: Running::start(Fixture::BusyC, &["2"]).unwrap(),
            state: dir.join(name),
        }
    }

    fn pid(&self) -> String {
        self.target.pid().to_string()
    }

    /// `work_fn` replaced by `with`, under the manifest id `id` (the same
    /// id and build-id on every host: the fleet's history is per patch).
    fn manifest(&self, dir: &Path, id: &str, with: &str) -> String {
        let object = build_patch(Patch::BusyWatch).unwrap();
        let build_id = build_id_of(&self.target.binary());
        write_manifest(dir, id, &object, &build_id, &[("work_fn", with)])
            .to_string_lossy()
            .into_owned()
    }

    fn run(&self, args: &[&str], url: &str) -> Run {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--predictor", url, "--predictor-host", self.name]);
        shadowpatch(&self.state, &all)
    }

    fn outbox(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.state.join("fleet-outbox.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }
}

#[test]
fn with_the_service_down_the_local_model_decides_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start("host-a", dir.path());
    let pid = host.pid();
    let manifest = host.manifest(dir.path(), "fine", "work_fn_fine");
    let url = closed_port_url();

    let alone = shadowpatch(
        &host.state,
        &["analyze", &pid, &manifest, "--json", "--context-secs", "0"],
    );
    assert_eq!(alone.code, 0, "{}{}", alone.stdout, alone.stderr);
    let alone = alone.json();
    assert_eq!(alone["decided_by"]["kind"], "local", "{alone}");
    assert!(
        alone["decided_by"].get("why").is_none(),
        "no predictor, no why: {alone}"
    );

    let run = host.run(&["analyze", &pid, &manifest, "--json", "--context-secs", "0"], &url);
    assert_eq!(run.code, 0, "a verdict as usual: {}{}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(report["verdict"], alone["verdict"], "{report}");
    assert_eq!(report["risk"], alone["risk"], "the same local model: {report}");
    assert_eq!(report["scorer"], alone["scorer"], "the old text stays: {report}");
    let decided_by = &report["decided_by"];
    assert_eq!(decided_by["kind"], "local", "{decided_by}");
    assert_eq!(decided_by["model"], alone["scorer"], "{decided_by}");
    let why = decided_by["why"].as_str().unwrap();
    assert!(why.contains(&url) && why.contains("unreachable"), "{why}");
    assert!(
        report["unavailable"]
            .as_array()
            .unwrap()
            .iter()
            .any(|note| note.as_str().unwrap().contains("unreachable")),
        "{report}"
    );
    let text = host.run(&["analyze", &pid, &manifest, "--context-secs", "0"], &url);
    let line: Vec<&str> = text.stdout.lines().filter(|l| l.contains("risk by")).collect();
    assert_eq!(line.len(), 1, "{}", text.stdout);
    assert!(
        line[0].contains("locally") && line[0].contains("unreachable"),
        "{}",
        line[0]
    );

    // An apply is not held up: the patch goes live, the outcome waits.
    let apply = host.run(&["apply", &pid, &manifest, "--json", "--context-secs", "0"], &url);
    assert_eq!(apply.code, 0, "{}{}", apply.stdout, apply.stderr);
    assert_eq!(apply.json()["patch_id"], "fine", "applied: {}", apply.stdout);
    let waiting = host.outbox();
    assert_eq!(waiting.len(), 1, "{waiting:?}");
    assert_eq!(waiting[0]["url"], url.as_str());
    assert_eq!(waiting[0]["outcome"]["kind"], "applied");
    assert_eq!(waiting[0]["outcome"]["host"], "host-a");
    assert_eq!(waiting[0]["outcome"]["patch_id"], "fine");
    assert!(
        waiting[0]["outcome"]["analysis_id"].is_null(),
        "the service gave no verdict"
    );
    assert!(waiting[0]["outcome"]["features"]["static.bytes_changed"].is_number());
    // A user's rollback is reported (queued) as a withdrawal.
    let rollback = shadowpatch(&host.state, &["rollback", &pid, "--json"]);
    assert_eq!(rollback.code, 0, "{}{}", rollback.stdout, rollback.stderr);
    let waiting = host.outbox();
    assert_eq!(waiting.len(), 2, "{waiting:?}");
    assert_eq!(waiting[1]["outcome"]["kind"], "withdrawn");
    assert_untouched(host.target.pid());
}

#[test]
fn the_agent_scores_with_its_predictor_and_queues_what_it_sees() {
    let dir = tempfile::tempdir().unwrap();
    let url = closed_port_url();
    let agent = Agent::start_with(
        dir.path(),
        &["--predictor", &url, "--predictor-host", "agent-host"],
        &[],
    );
    // The agent's state directory is DIR/state: the host's is the same.
    let host = Host::start("state", dir.path());
    let pid = host.pid();
    let manifest = host.manifest(dir.path(), "fine", "work_fn_fine");
    // The request names no predictor: the agent's own is asked.
    let apply = agent.cli(
        &host.state,
        &["apply", &pid, &manifest, "--json", "--context-secs", "0"],
    );
    assert_eq!(apply.code, 0, "{}{}", apply.stdout, apply.stderr);
    let applied = apply.json();
    assert_eq!(applied["by_agent"], true, "{applied}");
    assert_eq!(applied["decided_by"]["kind"], "local", "{applied}");
    assert!(
        applied["decided_by"]["why"].as_str().unwrap().contains(&url),
        "{applied}"
    );
    let rollback = agent.cli(&host.state, &["rollback", &pid, "--json"]);
    assert_eq!(rollback.code, 0, "{}{}", rollback.stdout, rollback.stderr);
    let kinds: Vec<(String, String)> = host
        .outbox()
        .iter()
        .map(|e| {
            (
                e["outcome"]["kind"].as_str().unwrap().into(),
                e["outcome"]["host"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("applied".into(), "agent-host".into()),
            ("withdrawn".into(), "agent-host".into())
        ],
        "{:?}",
        host.outbox()
    );
    assert_untouched(host.target.pid());
}

#[test]
fn a_bad_predictor_address_is_refused_before_anything() {
    let dir = tempfile::tempdir().unwrap();
    let host = Host::start("host-a", dir.path());
    let pid = host.pid();
    let manifest = host.manifest(dir.path(), "fine", "work_fn_fine");
    for (url, needle) in [
        ("ftp://127.0.0.1:1", "not an http:// URL"),
        ("http://", "--predictor http://"),
        ("https://127.0.0.1:1", "https:// is not supported"),
    ] {
        for command in ["analyze", "apply"] {
            let run = host.run(&[command, &pid, &manifest], url);
            assert_bad_input(&run, needle);
        }
    }
    let run = shadowpatch(
        &host.state,
        &[
            "apply",
            &pid,
            &manifest,
            "--predictor",
            "http://127.0.0.1:1",
            "--predictor-token",
            "/nonexistent/token",
        ],
    );
    assert_bad_input(&run, "--predictor-token /nonexistent/token");
    let app_socket = dir.path().join("app.sock");
    let agent = shadowpatch(
        &host.state,
        &[
            "agent",
            "--predictor",
            "ftp://127.0.0.1:1",
            "--metrics-listen",
            "off",
            "--agent-socket",
            dir.path().join("agent.sock").to_str().unwrap(),
            "--app-socket",
            app_socket.to_str().unwrap(),
        ],
    );
    assert_bad_input(&agent, "not an http:// URL");
    assert_untouched(host.target.pid());
    assert!(!host.state.join("fleet-outbox.jsonl").exists());
}

/// `shadowpatch predictor serve` on a free port, killed on drop.
struct Service {
    child: Child,
    url: String,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The service's binary beside `shadowpatch`, as `shadowpatch predictor
/// serve` finds it: built here when the build did not make it (in a
/// target directory of its own, since this test's cargo holds the
/// workspace's), and run through a copy of `shadowpatch` in the same folder.
fn shadowpatch_with_the_service(folder: &Path) -> PathBuf {
    let shadowpatch = PathBuf::from(env!("CARGO_BIN_EXE_shadowpatch"));
    let mut service = shadowpatch.with_file_name("shadowpatch-predictor");
    if !service.is_file() {
        let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("fleet-host-service");
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args([
                "build",
                "-p",
                "shadowpatch-fleet",
                "--bin",
                "shadowpatch-predictor",
                "--target-dir",
            ])
            .arg(&target)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .unwrap();
        assert!(status.success(), "building shadowpatch-predictor");
        service = target.join("debug").join("shadowpatch-predictor");
    }
    std::fs::copy(&shadowpatch, folder.join("shadowpatch")).unwrap();
    std::fs::copy(&service, folder.join("shadowpatch-predictor")).unwrap();
    folder.join("shadowpatch")
}

fn serve(folder: &Path, state: &Path) -> Service {
    let binary = shadowpatch_with_the_service(folder);
    let mut child = Command::new(binary)
        .args(["--state-dir"])
        .arg(state)
        .args(["predictor", "serve", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("no ready line from the service: {line:?}"))
        .to_string();
    Service { child, url }
}

#[test]
fn two_hosts_crash_outcomes_make_a_third_refuse_with_fleet_history() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let service = serve(&bin, &dir.path().join("service"));
    let hosts = [
        Host::start("host-a", dir.path()),
        Host::start("host-b", dir.path()),
        Host::start("host-c", dir.path()),
    ];
    let manifest = hosts[0].manifest(dir.path(), "null", "work_fn_null");

    for host in &hosts[..2] {
        let pid = host.pid();
        let run = host.run(
            &[
                "apply",
                &pid,
                &manifest,
                "--json",
                "--force",
                "--context-secs",
                "0",
                "--watch",
                "5",
                "--baseline",
                "0.3",
            ],
            &service.url,
        );
        assert_eq!(run.code, 4, "rolled back: {}{}", run.stdout, run.stderr);
        let applied = run.json();
        assert_eq!(applied["watch"]["cause"], "crash", "{applied}");
        assert_eq!(applied["decided_by"]["kind"], "service", "{applied}");
        assert!(
            host.outbox().is_empty(),
            "the crash was acknowledged: {:?}",
            host.outbox()
        );
        assert_untouched(host.target.pid());
    }

    let host = &hosts[2];
    let pid = host.pid();
    let run = host.run(
        &["analyze", &pid, &manifest, "--json", "--context-secs", "0"],
        &service.url,
    );
    assert_eq!(run.code, 1, "refused: {}{}", run.stdout, run.stderr);
    let report = run.json();
    assert_eq!(report["verdict"], "refuse", "{report}");
    let history = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "fleet-history")
        .unwrap_or_else(|| panic!("no fleet-history finding: {report}"));
    assert_eq!(history["severity"], "blocking", "{history}");
    assert_eq!(history["class"], "harm", "{history}");
    let decided_by = &report["decided_by"];
    assert_eq!(decided_by["kind"], "service", "{decided_by}");
    assert_eq!(decided_by["url"], service.url.as_str(), "{decided_by}");
    assert!(
        !decided_by["model"]["name"].as_str().unwrap().is_empty(),
        "{decided_by}"
    );
    assert!(!decided_by["analysis_id"].as_str().unwrap().is_empty(), "{decided_by}");

    // The text names the model that decided, on one line.
    let text = host.run(&["analyze", &pid, &manifest, "--context-secs", "0"], &service.url);
    let line: Vec<&str> = text.stdout.lines().filter(|l| l.contains("risk by")).collect();
    assert_eq!(line.len(), 1, "{}", text.stdout);
    let model = decided_by["model"]["name"].as_str().unwrap();
    assert!(
        line[0].contains(&format!("fleet predictor {}", service.url)) && line[0].contains(model),
        "{}",
        line[0]
    );
    assert!(text.stdout.contains("fleet-history"), "{}", text.stdout);

    // And apply refuses it, reporting the refusal.
    let apply = host.run(
        &["apply", &pid, &manifest, "--json", "--context-secs", "0"],
        &service.url,
    );
    assert_ne!(apply.code, 0, "{}{}", apply.stdout, apply.stderr);
    assert_eq!(apply.json()["decided_by"]["kind"], "service", "{}", apply.stdout);
    assert!(apply.stdout.contains("fleet-history"), "{}", apply.stdout);
    assert!(
        host.outbox().is_empty(),
        "the refusal was acknowledged: {:?}",
        host.outbox()
    );
    assert_untouched(host.target.pid());
}
