//! A test agent: `shadowpatch agent` on a test's own state directory and
//! sockets, no metrics, no watch after apply, persisted patches swept
//! every 100 ms; killed on drop.

use super::{shadowpatch_env, Run};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Agent {
    child: Child,
    socket: PathBuf,
}

impl Agent {
    pub fn start(dir: &Path) -> Agent {
        Agent::start_with(dir, &[])
    }

    /// With further `agent` options (e.g. `--predictor URL`).
    pub fn start_with(dir: &Path, extra: &[&str]) -> Agent {
        let socket = dir.join("agent.sock");
        let mut child = Command::new(env!("CARGO_BIN_EXE_shadowpatch"))
            .arg("agent")
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--agent-socket")
            .arg(&socket)
            .arg("--app-socket")
            .arg(dir.join("app.sock"))
            .args([
                "--metrics-listen",
                "off",
                "--watch-after-apply",
                "0",
                "--persist-interval",
                "100ms",
            ])
            .args(extra)
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::piped())
            .spawn()
            .expect("the agent starts");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("\"ready\""), "ready line: {line:?}");
        Agent { child, socket }
    }

    pub fn cli(&self, state: &Path, args: &[&str]) -> Run {
        shadowpatch_env(
            state,
            args,
            &[("SHADOWPATCH_AGENT_SOCKET", self.socket.to_str().unwrap())],
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
