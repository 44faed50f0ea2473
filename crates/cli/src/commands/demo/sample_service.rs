//! The demo's sample service and its patch: C sources embedded in the
//! binary, compiled with the machine's gcc into a temporary folder when
//! the demo runs, and the running service driven through its pipes
//! (one `ready key=value ...` line, then one answer per command line).
//! Kept apart from the test fixtures so the shipped binary does not link
//! them.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// The service: worker threads calling `work_fn()` in a loop, checking
/// every answer, optional threads blocked in system calls.
const SERVICE_SOURCE: &str = include_str!("sample_service.c");
/// Its patch: `banner_v2` and `work_fn_v2` (and a few more) replacing the
/// service's functions.
const FIX_SOURCE: &str = include_str!("sample_fix.c");

/// File name of the service binary (the module name the demo looks for).
pub const SERVICE_NAME: &str = "sample-service";

/// Compile the service into `dir`; returns the binary's path.
pub fn build_service(dir: &Path) -> std::io::Result<PathBuf> {
    gcc(dir, SERVICE_NAME, SERVICE_SOURCE, &["-O2", "-g", "-pthread", "-Wall"])
}

/// Compile the patch object into `dir`; returns its path.
pub fn build_fix(dir: &Path) -> std::io::Result<PathBuf> {
    gcc(
        dir,
        "sample-fix.so",
        FIX_SOURCE,
        &["-O2", "-g", "-fPIC", "-shared", "-Wall"],
    )
}

fn gcc(dir: &Path, name: &str, source: &str, flags: &[&str]) -> std::io::Result<PathBuf> {
    let source_path = dir.join(format!("{name}.c"));
    let output_path = dir.join(name);
    std::fs::write(&source_path, source)?;
    let output = Command::new("gcc")
        .args(flags)
        .arg("-o")
        .arg(&output_path)
        .arg(&source_path)
        .output()
        .map_err(|e| std::io::Error::new(e.kind(), format!("running gcc to build the demo's {name}: {e}")))?;
    if !output.status.success() {
        return Err(std::io::Error::other(format!(
            "building the demo's {name} with gcc failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(output_path)
}

/// The running service. Killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
pub struct SampleService {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The `key=value` pairs of the ready line.
    ready: BTreeMap<String, String>,
}

impl SampleService {
    /// Start `binary` with `args` and wait for its ready line.
    pub fn start(binary: &Path, args: &[&str]) -> std::io::Result<SampleService> {
        let mut child = Command::new(binary)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = BufReader::new(child.stdout.take().expect("stdout is piped"));
        let mut service = SampleService {
            child,
            stdin,
            stdout,
            ready: BTreeMap::new(),
        };
        let line = service.read_line()?;
        let rest = line
            .strip_prefix("ready")
            .ok_or_else(|| std::io::Error::other(format!("the sample service said {line:?} instead of ready")))?;
        service.ready = rest
            .split_whitespace()
            .filter_map(|pair| pair.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Ok(service)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// A ready-line value parsed as a (hex `0x...` or decimal) number.
    pub fn number(&self, key: &str) -> std::io::Result<u64> {
        let value = self
            .ready
            .get(key)
            .ok_or_else(|| std::io::Error::other(format!("the sample service's ready line has no {key}")))?;
        let parsed = match value.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => value.parse().ok(),
        };
        parsed.ok_or_else(|| std::io::Error::other(format!("the sample service's {key}={value} is not a number")))
    }

    /// Send one command line and return the one-line answer.
    pub fn command(&mut self, command: &str) -> std::io::Result<String> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        self.read_line()
    }

    /// `check` answered as `key=value` numbers (errors, calls, patched, ...).
    pub fn check(&mut self) -> std::io::Result<BTreeMap<String, u64>> {
        let line = self.command("check")?;
        Ok(line
            .split_whitespace()
            .filter_map(|pair| pair.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect())
    }

    fn read_line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            return Err(std::io::Error::other(
                "the sample service closed its stdout (did it crash?)",
            ));
        }
        Ok(line.trim_end().to_string())
    }
}

impl Drop for SampleService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
