//! Running the Debian tools: a short query whose output we parse, or a
//! long step whose output goes line by line to a log file and to the
//! progress callback, and whose failure names the command, its exit and
//! the last lines of the log.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;

use crate::{Progress, ProgressFn};

/// How many trailing log lines a failure message carries.
const TAIL_LINES: usize = 3;

/// A tool that could not be started or that failed.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot run `{command}`: {source} (is the {package} package installed?)")]
    Spawn {
        command: String,
        package: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {tail}{}", log_note(.log))]
    Failed {
        command: String,
        status: String,
        /// The last lines of its output, joined by " | ".
        tail: String,
        log: Option<PathBuf>,
    },
    #[error("cannot write the log {}: {source}", .path.display())]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn log_note(log: &Option<PathBuf>) -> String {
    log.as_ref()
        .map(|path| format!(" (log: {})", path.display()))
        .unwrap_or_default()
}

/// The command line as a user would type it, for messages.
pub(crate) fn display(command: &Command) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|arg| {
        let arg = arg.to_string_lossy();
        if arg.is_empty() || arg.contains(char::is_whitespace) {
            format!("'{arg}'")
        } else {
            arg.into_owned()
        }
    }));
    words.join(" ")
}

/// The Debian package that ships each tool we run, for the spawn error.
fn package_of(program: &str) -> &'static str {
    match program {
        "dpkg-query" => "dpkg",
        "apt-get" => "apt",
        "cp" => "coreutils",
        _ => "dpkg-dev",
    }
}

fn spawn_error(command: &Command, source: std::io::Error) -> CommandError {
    CommandError::Spawn {
        command: display(command),
        package: package_of(&command.get_program().to_string_lossy()),
        source,
    }
}

fn tail_of(lines: &[String]) -> String {
    let kept: Vec<&str> = lines
        .iter()
        .map(|line| line.trim())
        .filter(|line| !line.is_empty())
        .collect();
    let start = kept.len().saturating_sub(TAIL_LINES);
    if kept.is_empty() {
        "no output".to_string()
    } else {
        kept[start..].join(" | ")
    }
}

/// Runs a short query and returns its output, whatever its exit status
/// (dpkg-query's "not found" is an answer, not a failure).
pub(crate) fn query(command: &mut Command) -> Result<Output, CommandError> {
    command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| spawn_error(command, source))
}

/// Fails with the command's stderr (or stdout) tail when it exited non-zero.
pub(crate) fn check(command: &Command, output: &Output) -> Result<(), CommandError> {
    if output.status.success() {
        return Ok(());
    }
    let text = if output.stderr.is_empty() {
        &output.stdout
    } else {
        &output.stderr
    };
    let lines: Vec<String> = String::from_utf8_lossy(text).lines().map(str::to_string).collect();
    Err(CommandError::Failed {
        command: display(command),
        status: output.status.to_string(),
        tail: tail_of(&lines),
        log: None,
    })
}

/// Runs a long command: its stdout and stderr go, line by line, to `log`
/// (created or appended) and to `progress` as [`Progress::Output`].
/// Returns every line it printed on success.
pub(crate) fn run_logged(
    command: &mut Command,
    log: &Path,
    progress: ProgressFn<'_>,
) -> Result<Vec<String>, CommandError> {
    let log_error = |source| CommandError::Log {
        path: log.to_path_buf(),
        source,
    };
    let mut log_file = File::options().create(true).append(true).open(log).map_err(log_error)?;
    writeln!(log_file, "$ {}", display(command)).map_err(log_error)?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| spawn_error(command, source))?;
    // Two readers so neither pipe fills while we wait on the other.
    let (sender, receiver) = mpsc::channel::<String>();
    let readers: Vec<_> = [
        child
            .stdout
            .take()
            .map(|out| Box::new(out) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|err| Box::new(err) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|pipe| {
        let sender = sender.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).split(b'\n').map_while(Result::ok) {
                if sender.send(String::from_utf8_lossy(&line).into_owned()).is_err() {
                    break;
                }
            }
        })
    })
    .collect();
    drop(sender);
    let mut lines = Vec::new();
    for line in receiver {
        writeln!(log_file, "{line}").map_err(log_error)?;
        progress(Progress::Output(line.clone()));
        lines.push(line);
    }
    for reader in readers {
        // A reader only ends when its pipe closes; a panic there is a bug.
        reader.join().expect("log reader thread panicked");
    }
    let status = child.wait().map_err(|source| spawn_error(command, source))?;
    if status.success() {
        return Ok(lines);
    }
    Err(CommandError::Failed {
        command: display(command),
        status: status.to_string(),
        tail: tail_of(&lines),
        log: Some(log.to_path_buf()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_command_names_itself_its_status_and_its_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut command = Command::new("sh");
        command.args(["-c", "echo one; echo two >&2; echo three; echo four; exit 3"]);
        let error = run_logged(&mut command, &log, &mut |_| {}).unwrap_err().to_string();
        assert!(error.starts_with("`sh -c 'echo one;"), "{error}");
        assert!(error.contains("exit status: 3"), "{error}");
        assert!(error.ends_with(&format!("(log: {})", log.display())), "{error}");
        assert!(!error.contains('\n'), "{error}");
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(logged.contains("four"), "{logged}");
    }

    #[test]
    fn a_missing_tool_names_its_package() {
        let mut command = Command::new("dpkg-no-such-tool");
        let error = query(&mut command).unwrap_err().to_string();
        assert!(error.contains("dpkg-dev package"), "{error}");
    }
}
