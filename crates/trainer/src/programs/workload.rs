//! A live instance of a corpus program and the requests it is labelled
//! and analysed under: one connection per request, replies read to the
//! end, lines masked (dates) before comparison.

use super::{Program, ProgramsError};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long one request may take before the instance counts as hung.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// A running instance in a scratch folder of its own.
#[derive(Debug)]
pub struct Instance {
    pub child: Child,
    pub port: u16,
    pub dir: PathBuf,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn fill(text: &str, port: u16, dir: &Path, driver: &Path) -> String {
    text.replace("{port}", &port.to_string())
        .replace("{dir}", &dir.display().to_string())
        .replace("{driver}", &driver.display().to_string())
}

/// Files `www/many/0.txt` … `www/many/{MANY_FILES - 1}.txt`, for requests
/// that must reach a new file each time (`{k}`): a server's per-file cache
/// (lighttpd's stat cache and the ETag it keeps) then runs the code it
/// skips for a file it has seen.
pub const MANY_FILES: usize = 256;

/// A request template with its number: `{i}` is `n`, `{k}` is `n` modulo
/// `MANY_FILES`.
fn numbered(template: &str, n: usize) -> String {
    template
        .replace("{i}", &n.to_string())
        .replace("{k}", &(n % MANY_FILES).to_string())
}

impl Instance {
    /// Start `program` in `dir` (created, with `www/` for HTTP servers)
    /// and wait until it accepts connections.
    pub fn start(program: &Program, dir: &Path, driver: &Path) -> Result<Instance, ProgramsError> {
        let fail = |message: String| ProgramsError::Program {
            program: program.name.clone(),
            message,
        };
        let io = |path: &Path, source: std::io::Error| ProgramsError::Io {
            path: path.display().to_string(),
            source,
        };
        let www = dir.join("www");
        std::fs::create_dir_all(www.join("sub")).map_err(|e| io(&www, e))?;
        std::fs::create_dir_all(www.join("many")).map_err(|e| io(&www, e))?;
        let many = (0..MANY_FILES).map(|k| (format!("many/{k}.txt"), format!("file {k}\n")));
        let files = [
            ("index.html", "<html><body>corpus</body></html>\n"),
            ("a.txt", "plain text\n"),
            ("style.css", "body { color: black; }\n"),
        ]
        .into_iter()
        .map(|(name, text)| (name.to_string(), text.to_string()))
        .chain(many);
        for (name, text) in files {
            let path = www.join(name);
            std::fs::write(&path, text).map_err(|e| io(&path, e))?;
            // One modification time for every instance: replies carry it
            // (Last-Modified, ETag) and are compared across instances.
            let file = std::fs::File::options()
                .write(true)
                .open(&path)
                .map_err(|e| io(&path, e))?;
            file.set_modified(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
                .map_err(|e| io(&path, e))?;
        }
        let port = free_port().map_err(|e| fail(format!("no free port: {e}")))?;
        if let Some(config) = &program.config {
            let path = dir.join(&config.path);
            std::fs::write(&path, fill(&config.text, port, dir, driver)).map_err(|e| io(&path, e))?;
        }
        let args: Vec<String> = program.start.iter().map(|a| fill(a, port, dir, driver)).collect();
        let log = std::fs::File::create(dir.join("instance.log")).map_err(|e| io(dir, e))?;
        let child = Command::new(&args[0])
            .args(&args[1..])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| io(dir, e))?)
            .stderr(log)
            .spawn()
            .map_err(|e| fail(format!("{}: {e}", args[0])))?;
        let mut instance = Instance {
            child,
            port,
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let address = SocketAddr::from(([127, 0, 0, 1], port));
        while TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = instance.child.try_wait() {
                return Err(fail(format!(
                    "exited at start ({status}); log {}",
                    dir.join("instance.log").display()
                )));
            }
            if Instant::now() > deadline {
                return Err(fail("does not accept connections after 10 s".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(instance)
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `None` while running, else how it ended (`killed by signal 11`, `exited with 71`).
    pub fn ended(&mut self) -> Option<(bool, String)> {
        let status = self.child.try_wait().ok()??;
        Some(match status.signal() {
            Some(signal) => (true, format!("killed by signal {signal}")),
            None => (false, format!("exited with {}", status.code().unwrap_or(-1))),
        })
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The reply to one request, or why there was none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Text(String),
    TimedOut,
    Refused(String),
}

/// One request of `program`'s, its reply's lines masked.
pub fn request(program: &Program, port: u16, text: &str, masks: &[regex::Regex]) -> Reply {
    let reply = if program.udp {
        datagram(port, text)
    } else {
        connection(port, text, program.half_close)
    };
    let Reply::Text(text) = reply else { return reply };
    let masked: Vec<&str> = text
        .split('\n')
        .map(|line| {
            if masks.iter().any(|m| m.is_match(line)) {
                "(masked)"
            } else {
                line
            }
        })
        .collect();
    Reply::Text(masked.join("\n"))
}

/// One datagram out, one back (bytes beyond ASCII shown lossily: the
/// comparison only needs equal replies to look equal).
fn datagram(port: u16, text: &str) -> Reply {
    let socket = match std::net::UdpSocket::bind("127.0.0.1:0") {
        Ok(s) => s,
        Err(e) => return Reply::Refused(e.to_string()),
    };
    let _ = socket.set_read_timeout(Some(REQUEST_TIMEOUT));
    if let Err(e) = socket.send_to(text.as_bytes(), SocketAddr::from(([127, 0, 0, 1], port))) {
        return Reply::Refused(e.to_string());
    }
    let mut buffer = [0u8; 4096];
    match socket.recv(&mut buffer) {
        Ok(n) => Reply::Text(String::from_utf8_lossy(&buffer[..n]).into_owned()),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => Reply::TimedOut,
        Err(e) => Reply::Refused(e.to_string()),
    }
}

/// A connection of its own, the reply read to the end.
fn connection(port: u16, text: &str, half_close: bool) -> Reply {
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = match TcpStream::connect_timeout(&address, REQUEST_TIMEOUT) {
        Ok(s) => s,
        Err(e) => return Reply::Refused(e.to_string()),
    };
    let _ = stream.set_read_timeout(Some(REQUEST_TIMEOUT));
    let _ = stream.set_write_timeout(Some(REQUEST_TIMEOUT));
    if let Err(e) = stream.write_all(text.as_bytes()) {
        return Reply::Refused(e.to_string());
    }
    if half_close {
        let _ = stream.shutdown(Shutdown::Write);
    }
    let mut bytes = Vec::new();
    let started = Instant::now();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => bytes.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return Reply::TimedOut
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Reply::Refused(e.to_string()),
        }
        if started.elapsed() > REQUEST_TIMEOUT {
            return Reply::TimedOut;
        }
    }
    Reply::Text(String::from_utf8_lossy(&bytes).into_owned())
}

/// The program's compiled mask patterns (checked when the spec was read).
pub fn masks(program: &Program) -> Vec<regex::Regex> {
    program.mask.iter().filter_map(|m| regex::Regex::new(m).ok()).collect()
}

/// Every request `rounds` times, numbered: the replies in order. Stops at
/// the first request without a reply (the rest would only wait too).
pub fn run(program: &Program, port: u16, rounds: usize) -> Vec<Reply> {
    let masks = masks(program);
    let mut replies = Vec::new();
    let mut n = 0;
    for _ in 0..rounds {
        for template in &program.requests {
            let reply = request(program, port, &numbered(template, n), &masks);
            n += 1;
            let stop = !matches!(reply, Reply::Text(_));
            replies.push(reply);
            if stop {
                return replies;
            }
        }
    }
    replies
}

/// Requests in a loop on another thread until the flag drops (the live
/// calls an analysis captures).
pub fn background(program: &Program, port: u16, running: Arc<AtomicBool>) -> std::thread::JoinHandle<usize> {
    let program = program.clone();
    std::thread::spawn(move || {
        let masks = masks(&program);
        let mut n = 0usize;
        while running.load(Ordering::Relaxed) {
            for template in &program.requests {
                let _ = request(&program, port, &numbered(template, n), &masks);
                n += 1;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        n
    })
}
