//! A running `shadowpatch watch --json` whose events are read on a thread,
//! shared by the watch and critical-variable tests.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// How long a test waits for an event before failing.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// A running `shadowpatch watch --json`, its events read on a thread.
pub struct WatchProcess {
    pub child: Child,
    events: Receiver<Value>,
    /// Every event seen so far (wait_for keeps them).
    pub seen: Vec<Value>,
}

impl WatchProcess {
    pub fn start(state: &Path, pid: i32, extra: &[&str]) -> WatchProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_shadowpatch"));
        command
            .args(["watch", &pid.to_string(), "--json"])
            .args(extra)
            .env("SHADOWPATCH_STATE_DIR", state);
        Self::start_command(command)
    }

    /// Run `command` (which execs `shadowpatch watch --json`).
    pub fn start_command(mut command: Command) -> WatchProcess {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("shadowpatch watch starts");
        let stdout = child.stdout.take().unwrap();
        let (sender, events) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value: Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
                if sender.send(value).is_err() {
                    break;
                }
            }
        });
        let mut watch = WatchProcess {
            child,
            events,
            seen: Vec::new(),
        };
        watch.wait_for("started", |_| true);
        watch
    }

    /// Wait for an event named `name` matching `accept`; returns it.
    pub fn wait_for(&mut self, name: &str, accept: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) => {
                    self.seen.push(event.clone());
                    if event["event"] == name && accept(&event) {
                        return event;
                    }
                }
                Err(_) => panic!("no {name} event within {PATIENCE:?}; seen: {:#?}", self.seen),
            }
        }
    }

    /// SIGTERM, then the exit code and the remaining events.
    pub fn stop(self) -> (i32, Vec<Value>) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.finish()
    }

    pub fn finish(mut self) -> (i32, Vec<Value>) {
        let status = self.child.wait().unwrap();
        let mut all = std::mem::take(&mut self.seen);
        all.extend(self.events.iter());
        (status.code().unwrap_or(-1), all)
    }
}

impl Drop for WatchProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
