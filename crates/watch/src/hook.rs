//! The `--on-alert` hook: a shell command run for each alert with the
//! alert's JSON on stdin and its main fields in `SHADOWPATCH_*` environment
//! variables. Hooks run one after another on their own thread, so the
//! verifier never waits for one; a hook still running after its timeout is
//! killed, and a backlog beyond `QUEUE` alerts is dropped and said so.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::time::{Duration, Instant};

/// Alerts waiting for the hook beyond this many are dropped.
const QUEUE: usize = 64;

/// One queued run: the alert's JSON and the environment variables.
type HookJob = (String, Vec<(String, String)>);

/// What happened to one run of the hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookOutcome {
    Exited(i32),
    Signalled,
    TimedOut,
    Failed(String),
    /// The queue was full: this alert's hook never ran.
    Dropped,
}

/// A running hook thread. Dropping it lets queued hooks finish, then joins.
#[derive(Debug)]
pub struct AlertHook {
    sender: Option<SyncSender<HookJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AlertHook {
    /// Start the hook thread for `command` (run with `sh -c`). `report` is
    /// called on the hook thread with every outcome other than exit 0.
    pub fn start(
        command: String,
        timeout: Duration,
        mut report: impl FnMut(&str, HookOutcome) + Send + 'static,
    ) -> AlertHook {
        let (sender, receiver) = sync_channel::<HookJob>(QUEUE);
        let thread = std::thread::Builder::new()
            .name("shadowpatch-hook".into())
            .spawn(move || run_hooks(&command, timeout, receiver, &mut report))
            .expect("a thread can be spawned");
        AlertHook {
            sender: Some(sender),
            thread: Some(thread),
        }
    }

    /// Queue one run with `json` on stdin and `env` set; never blocks.
    pub fn fire(&self, json: String, env: Vec<(String, String)>) -> Result<(), HookOutcome> {
        let sender = self.sender.as_ref().expect("sender lives until drop");
        match sender.try_send((json, env)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => Err(HookOutcome::Dropped),
        }
    }
}

impl Drop for AlertHook {
    fn drop(&mut self) {
        drop(self.sender.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run_hooks(command: &str, timeout: Duration, receiver: Receiver<HookJob>, report: &mut dyn FnMut(&str, HookOutcome)) {
    for (json, env) in receiver {
        let outcome = run_once(command, timeout, &json, &env);
        if outcome != HookOutcome::Exited(0) {
            report(command, outcome);
        }
    }
}

/// Run the hook once, killing it after `timeout`.
pub fn run_once(command: &str, timeout: Duration, json: &str, env: &[(String, String)]) -> HookOutcome {
    let mut child = match Command::new("sh")
        .arg("-c")
        .arg(command)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("SHADOWPATCH_ALERT_JSON", json)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        // Its own process group, so a timeout kills what it started too.
        .process_group(0)
        .spawn()
    {
        Ok(child) => child,
        Err(error) => return HookOutcome::Failed(format!("cannot start sh: {error}")),
    };
    if let Some(mut stdin) = child.stdin.take() {
        // A hook that does not read its stdin is fine: the alert is also in
        // the environment. (An alert is far smaller than a pipe buffer.)
        let _ = stdin.write_all(json.as_bytes());
        let _ = stdin.write_all(b"\n");
    }
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                return match status.code() {
                    Some(code) => HookOutcome::Exited(code),
                    None => HookOutcome::Signalled,
                }
            }
            Ok(None) if Instant::now() >= deadline => {
                let group = nix::unistd::Pid::from_raw(child.id() as i32);
                let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
                let _ = child.kill();
                let _ = child.wait();
                return HookOutcome::TimedOut;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(5)),
            Err(error) => return HookOutcome::Failed(error.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hook_gets_the_alert_on_stdin_and_in_its_environment() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let command = format!(
            "cat > {0}.stdin; echo \"$SHADOWPATCH_ADDRESS\" > {0}.env",
            out.display()
        );
        let outcome = run_once(
            &command,
            Duration::from_secs(10),
            "{\"event\":\"alert\"}",
            &[("SHADOWPATCH_ADDRESS".into(), "0x10".into())],
        );
        assert_eq!(outcome, HookOutcome::Exited(0));
        assert_eq!(
            std::fs::read_to_string(format!("{}.stdin", out.display())).unwrap(),
            "{\"event\":\"alert\"}\n"
        );
        assert_eq!(
            std::fs::read_to_string(format!("{}.env", out.display())).unwrap(),
            "0x10\n"
        );
    }

    #[test]
    fn a_hung_hook_is_killed_after_its_timeout() {
        let started = Instant::now();
        let outcome = run_once("sleep 30", Duration::from_millis(100), "{}", &[]);
        assert_eq!(outcome, HookOutcome::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(20));
    }
}
