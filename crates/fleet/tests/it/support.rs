//! A running service (killed on drop), its HTTP client, and requests.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

pub const BINARY: &str = env!("CARGO_BIN_EXE_shadowpatch-predictor");

/// A `shadowpatch-predictor serve` process; killed and reaped on drop.
#[derive(Debug)]
pub struct Service {
    child: Child,
    pub base: String,
    token: Option<String>,
    /// The service's log lines (stderr), read by a thread.
    log: Receiver<String>,
}

/// `shadowpatch-predictor --state-dir STATE serve [--listen 127.0.0.1:0] ARGS`
/// (ARGS may name another `--listen`).
pub fn command(state_dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(BINARY);
    command.arg("--state-dir").arg(state_dir).arg("serve");
    if !args.contains(&"--listen") {
        command.args(["--listen", "127.0.0.1:0"]);
    }
    command.args(args).env("SHADOWPATCH_LOG", "info");
    command
}

impl Service {
    /// Start and wait for its `listening on` line.
    pub fn start(state_dir: &Path, args: &[&str]) -> Service {
        let mut child = command(state_dir, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start shadowpatch-predictor");
        let (sender, log) = channel();
        let stderr = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Some(base) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            let said: Vec<String> = log.try_iter().collect();
            panic!("the service did not start: {}", said.join("\n"));
        };
        Service {
            base: base.to_string(),
            child,
            token: None,
            log,
        }
    }

    /// Wait for a log line containing `needle` (the service says when it
    /// promotes a model); panics after `limit` without one.
    pub fn wait_for_log(&self, needle: &str, limit: Duration) -> String {
        let deadline = std::time::Instant::now() + limit;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        panic!("no log line with {needle:?}; the service said:\n{}", seen.join("\n"));
    }

    pub fn with_token(mut self, token: &str) -> Service {
        self.token = Some(token.to_string());
        self
    }

    /// Send a request; the status and the JSON answer.
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Value) {
        self.request_as(self.token.as_deref(), method, path, body)
    }

    pub fn request_as(&self, token: Option<&str>, method: &str, path: &str, body: Option<&[u8]>) -> (u16, Value) {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let url = format!("{}{path}", self.base);
        let mut response = match (method, body) {
            ("GET", _) => {
                let mut request = agent.get(&url);
                if let Some(token) = token {
                    request = request.header("Authorization", &format!("Bearer {token}"));
                }
                request.call()
            }
            (_, body) => {
                let mut request = agent.post(&url).header("Content-Type", "application/json");
                if let Some(token) = token {
                    request = request.header("Authorization", &format!("Bearer {token}"));
                }
                request.send(body.unwrap_or_default())
            }
        }
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap();
        let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text:?}"));
        (status, value)
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.request("POST", path, Some(body.to_string().as_bytes()))
    }

    /// SIGKILL: no chance to flush anything the answers did not promise.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A host's verdict request for `patch` on build-id `ab12`.
pub fn verdict_request(host: &str, patch: &str) -> Value {
    json!({
        "host": host,
        "patch_id": patch,
        "build_id": "ab12",
        "program": "/usr/sbin/example",
        "findings": [],
        "features": {"static.bytes_changed": 40.0, "static.functions": 1.0},
        "evidence": {"simulated_calls": 0, "live_calls": 0, "inconclusive_calls": 0},
        "policy": {"warn_at": 0.3, "refuse_at": 0.7}
    })
}

pub fn outcome(host: &str, patch: &str, kind: &str, at: u64) -> Value {
    json!({
        "host": host,
        "patch_id": patch,
        "build_id": "ab12",
        "kind": kind,
        "cause": "test",
        "at_unix_ms": at
    })
}

/// The round trip every backend must pass: a verdict names the model;
/// three other hosts' outcomes (one harmful) make the next verdict for
/// the same patch and build-id refuse with `fleet-history`.
pub fn round_trip(service: &Service, patch: &str) {
    let (status, health) = service.request("GET", "/v1/health", None);
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")), "{health}");
    let (status, first) = service.post("/v1/verdict", &verdict_request("host-a", patch));
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["model"]["name"], "built-in");
    assert_eq!(first["model"]["version"], 0);
    assert_ne!(first["verdict"], "refuse", "{first}");
    assert!(first["fleet_findings"].as_array().unwrap().is_empty(), "{first}");
    let analysis_id = first["analysis_id"].as_str().unwrap().to_string();
    assert_eq!(analysis_id.len(), 32);

    let mut crashed = outcome("host-c", patch, "crashed", 2_000);
    crashed["analysis_id"] = Value::String(analysis_id);
    let batch = json!([outcome("host-b", patch, "kept", 1_000), crashed]);
    let (status, ack) = service.post("/v1/outcomes", &batch);
    assert_eq!((status, ack["stored"].as_u64()), (200, Some(2)), "{ack}");
    let (status, ack) = service.post("/v1/outcomes", &outcome("host-d", patch, "rolled_back", 3_000));
    assert_eq!((status, ack["stored"].as_u64()), (200, Some(1)), "{ack}");
    // Another build-id's history says nothing about this one.
    let mut other_build = outcome("host-e", patch, "hung", 4_000);
    other_build["build_id"] = Value::String("ffff".into());
    assert_eq!(service.post("/v1/outcomes", &other_build).0, 200);

    let (status, later) = service.post("/v1/verdict", &verdict_request("host-a", patch));
    assert_eq!(status, 200, "{later}");
    assert_eq!(later["verdict"], "refuse", "{later}");
    assert_eq!(later["model"]["name"], "built-in");
    let finding = later["fleet_findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "fleet-history")
        .unwrap_or_else(|| panic!("no fleet-history finding: {later}"));
    assert_eq!(finding["severity"], "blocking");
    assert_eq!(finding["class"], "harm");
    assert_eq!(finding["evidence"]["harmful_outcomes"], 2, "{finding}");
    assert_eq!(finding["evidence"]["outcomes"], 3, "{finding}");
    assert_eq!(finding["evidence"]["hosts"], json!(["host-b", "host-c", "host-d"]));
    assert_eq!(finding["evidence"]["harmed_hosts"], json!(["host-c", "host-d"]));
    assert!(later["explanation"]["basis"]
        .as_str()
        .unwrap()
        .contains("fleet-history"));
}
