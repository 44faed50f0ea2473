//! A test agent: `shadowpatch agent` on a test's own state directory and
//! sockets (DIR/state, DIR/agent.sock, DIR/app.sock), killed (SIGKILL) on
//! drop. By default: no metrics listener, no watch after apply, persisted
//! patches swept every 100 ms; a flag a test passes replaces its default.

use super::{shadowpatch_env, Run};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};

/// The flags every test agent gets unless the test passes its own.
const DEFAULTS: [(&str, &str); 3] = [
    ("--metrics-listen", "off"),
    ("--watch-after-apply", "0"),
    ("--persist-interval", "100ms"),
];

pub struct Agent {
    child: Child,
    /// Kept open: the agent's later output must not meet a closed pipe.
    _stdout: BufReader<ChildStdout>,
    /// The agent's first line (`{"event": "ready", ...}`).
    pub ready: serde_json::Value,
    pub socket: PathBuf,
    pub app_socket: PathBuf,
}

impl Agent {
    pub fn start(dir: &Path) -> Agent {
        Agent::start_with(dir, &[], &[])
    }

    /// An agent with further flags (replacing the defaults they name) and
    /// environment variables.
    pub fn start_with(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        let socket = dir.join("agent.sock");
        let app_socket = dir.join("app.sock");
        let mut command = Command::new(env!("CARGO_BIN_EXE_shadowpatch"));
        command
            .arg("agent")
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--agent-socket")
            .arg(&socket)
            .arg("--app-socket")
            .arg(&app_socket);
        for (flag, value) in DEFAULTS {
            if !extra.contains(&flag) {
                command.args([flag, value]);
            }
        }
        let mut child = command
            .args(extra)
            .env_remove("NOTIFY_SOCKET")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the agent starts");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let ready: serde_json::Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("ready line is not JSON ({e}): {line:?}"));
        assert_eq!(ready["event"], "ready", "{ready}");
        Agent {
            child,
            _stdout: stdout,
            ready,
            socket,
            app_socket,
        }
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The CLI with this agent's socket.
    pub fn cli(&self, state: &Path, args: &[&str]) -> Run {
        shadowpatch_env(
            state,
            args,
            &[("SHADOWPATCH_AGENT_SOCKET", self.socket.to_str().unwrap())],
        )
    }

    /// One raw request line on the control socket, one reply.
    pub fn ask(&self, request: &serde_json::Value) -> serde_json::Value {
        let mut stream = UnixStream::connect(&self.socket).unwrap();
        let mut line = serde_json::to_vec(request).unwrap();
        line.push(b'\n');
        stream.write_all(&line).unwrap();
        let mut answer = String::new();
        BufReader::new(&stream).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {answer:?}"))
    }

    /// Target `pid` as the ready line reported it (recovered at start).
    pub fn target(&self, pid: i32) -> serde_json::Value {
        self.ready["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["pid"] == pid)
            .cloned()
            .unwrap_or_else(|| panic!("no target {pid} in the ready line {}", self.ready))
    }

    /// The metrics page (start with `--metrics-listen 127.0.0.1:0`).
    pub fn metrics(&self) -> String {
        let address = self.ready["metrics"].as_str().expect("the agent listens for metrics");
        let mut stream = std::net::TcpStream::connect(address).unwrap();
        stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        assert!(response.starts_with("HTTP/1.0 200"), "{response}");
        response
    }

    /// Wait for the agent to end; returns how.
    pub fn wait(mut self) -> ExitStatus {
        self.child.wait().unwrap()
    }

    /// Kill it now (SIGKILL), as a crash would.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
