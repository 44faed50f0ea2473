//! The control protocol between the `shadowpatch` CLI and the agent: one
//! JSON object per line each way, lines capped at `MAX_LINE_BYTES`. The
//! agent learns who asks from the socket's peer credentials, never from
//! the message.

use std::io::BufRead;
use std::path::PathBuf;

/// Longest request line accepted (a request is a few hundred bytes; the
/// cap keeps one client from making the agent buffer without bound).
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// The first request line must arrive whole within this long of the
/// connection (a client sending a byte a second cannot hold a thread).
pub const FIRST_LINE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);
/// Every later line must arrive whole within this long of the previous
/// reply; an idle connection is then closed.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);

/// A socket read against a deadline for the whole line, not per read: each
/// read waits only for the time left.
struct DeadlineReader {
    stream: std::os::unix::net::UnixStream,
    deadline: std::time::Instant,
}

impl std::io::Read for DeadlineReader {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let left = self.deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "request line not received in time",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        std::io::Read::read(&mut self.stream, buffer).map_err(|error| {
            // The socket's timeout says "would block": it is the deadline.
            if error.kind() == std::io::ErrorKind::WouldBlock {
                std::io::Error::new(std::io::ErrorKind::TimedOut, "request line not received in time")
            } else {
                error
            }
        })
    }
}

/// A request from the CLI.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// What the agent knows of a target: watched or not, its counters.
    Status {
        state_dir: PathBuf,
        pid: i32,
    },
    /// Apply a patch: the analysis gate first (the same as the CLI's:
    /// `shadowpatch_ops::apply`), refusing what it refuses unless `force`,
    /// which every client must state and the history records.
    Apply {
        state_dir: PathBuf,
        pid: i32,
        manifest: PathBuf,
        attempts: u32,
        force: bool,
        /// How to analyse (defaults as the CLI's); boxed, as the largest
        /// request by far.
        #[serde(default)]
        analysis: Box<shadowpatch_ops::AnalysisSettings>,
    },
    Rollback {
        state_dir: PathBuf,
        pid: i32,
        patch_id: Option<String>,
        /// Also write back the mirrored variables as they were before the patch.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        restore_state: bool,
    },
    Recover {
        state_dir: PathBuf,
        pid: i32,
    },
    /// Keep verifying a target continuously from the agent.
    Watch {
        state_dir: PathBuf,
        pid: i32,
        heal: bool,
    },
    Unwatch {
        state_dir: PathBuf,
        pid: i32,
    },
}

impl ControlRequest {
    pub fn state_dir(&self) -> &std::path::Path {
        match self {
            ControlRequest::Status { state_dir, .. }
            | ControlRequest::Apply { state_dir, .. }
            | ControlRequest::Rollback { state_dir, .. }
            | ControlRequest::Recover { state_dir, .. }
            | ControlRequest::Watch { state_dir, .. }
            | ControlRequest::Unwatch { state_dir, .. } => state_dir,
        }
    }

    pub fn pid(&self) -> i32 {
        match self {
            ControlRequest::Status { pid, .. }
            | ControlRequest::Apply { pid, .. }
            | ControlRequest::Rollback { pid, .. }
            | ControlRequest::Recover { pid, .. }
            | ControlRequest::Watch { pid, .. }
            | ControlRequest::Unwatch { pid, .. } => *pid,
        }
    }
}

impl From<shadowpatch_failure::FailureClass> for FailureKind {
    fn from(class: shadowpatch_failure::FailureClass) -> Self {
        match class {
            shadowpatch_failure::FailureClass::BadInput => FailureKind::BadInput,
            shadowpatch_failure::FailureClass::RefusedForSafety => FailureKind::Refused,
            shadowpatch_failure::FailureClass::FailedMidway => FailureKind::Failed,
        }
    }
}

impl FailureKind {
    /// The class the CLI exits by (`None`: the agent serves another
    /// state directory, and the CLI acts directly).
    pub fn class(self) -> Option<shadowpatch_failure::FailureClass> {
        match self {
            FailureKind::BadInput => Some(shadowpatch_failure::FailureClass::BadInput),
            FailureKind::Refused => Some(shadowpatch_failure::FailureClass::RefusedForSafety),
            FailureKind::Failed => Some(shadowpatch_failure::FailureClass::FailedMidway),
            FailureKind::WrongStateDir => None,
        }
    }
}

/// How a request failed, so the CLI exits as it would have acting directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// Malformed request, unknown pid, unauthorised peer: exit 2.
    BadInput,
    /// Refused on safety grounds, target untouched: exit 1.
    Refused,
    /// Failed midway: exit 3.
    Failed,
    /// The agent serves another state directory: the CLI acts directly.
    WrongStateDir,
}

/// The agent's answer to one request.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ControlReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<FailureKind>,
    /// The operation's typed outcome (`shadowpatch_ops`), the same value
    /// the CLI computes acting directly; for a refused apply, the refusal
    /// with its analysis.
    #[serde(default)]
    pub result: serde_json::Value,
}

impl ControlReply {
    pub fn success(result: serde_json::Value) -> Self {
        ControlReply {
            ok: true,
            error: None,
            failure: None,
            result,
        }
    }

    pub fn failure(kind: FailureKind, message: impl Into<String>) -> Self {
        ControlReply {
            ok: false,
            error: Some(message.into()),
            failure: Some(kind),
            result: serde_json::Value::Null,
        }
    }
}

/// Serve one connection: read request lines, answer each with one reply
/// line, until the peer closes. A malformed line (not UTF-8, not a
/// `Request`) is answered with `malformed(reason)` and the next is read;
/// a line over the cap is answered and ends the connection (the rest of
/// it is never read).
pub fn serve_lines<Request, Reply>(
    stream: std::os::unix::net::UnixStream,
    metrics: &crate::metrics::Metrics,
    malformed: impl Fn(String) -> Reply,
    mut handle: impl FnMut(Request) -> Reply,
) -> std::io::Result<()>
where
    Request: serde::de::DeserializeOwned,
    Reply: serde::Serialize,
{
    use std::sync::atomic::Ordering;
    let mut reader = std::io::BufReader::new(DeadlineReader {
        stream: stream.try_clone()?,
        deadline: std::time::Instant::now() + FIRST_LINE_DEADLINE,
    });
    let mut writer = stream;
    // A client that does not read its replies cannot hold the thread.
    writer.set_write_timeout(Some(FIRST_LINE_DEADLINE))?;
    let refuse = |reason: String| {
        metrics.bad_requests.fetch_add(1, Ordering::Relaxed);
        malformed(format!("malformed request: {reason}"))
    };
    loop {
        let (reply, last) = match decode_line(read_line_capped(&mut reader, MAX_LINE_BYTES)?) {
            Decoded::End => return Ok(()),
            Decoded::Refused { reason, last } => (refuse(reason), last),
            Decoded::Request(request) => {
                metrics.requests.fetch_add(1, Ordering::Relaxed);
                (handle(request), false)
            }
        };
        let mut line = serde_json::to_vec(&reply).expect("replies serialize");
        line.push(b'\n');
        std::io::Write::write_all(&mut writer, &line)?;
        if last {
            return Ok(());
        }
        reader.get_mut().deadline = std::time::Instant::now() + IDLE_TIMEOUT;
    }
}

/// What one line of a connection asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded<Request> {
    Request(Request),
    /// Answered with `malformed(reason)`; `last`: the connection ends.
    Refused {
        reason: String,
        last: bool,
    },
    /// The peer closed.
    End,
}

/// Turn one line read with `read_line_capped` into a request or a refusal.
pub fn decode_line<Request: serde::de::DeserializeOwned>(line: Line) -> Decoded<Request> {
    match line {
        Line::End => Decoded::End,
        Line::TooLong => Decoded::Refused {
            reason: format!("longer than {MAX_LINE_BYTES} bytes"),
            last: true,
        },
        Line::NotUtf8 => Decoded::Refused {
            reason: "not UTF-8".into(),
            last: false,
        },
        Line::Text(text) => match serde_json::from_str::<Request>(&text) {
            Ok(request) => Decoded::Request(request),
            Err(error) => Decoded::Refused {
                reason: error.to_string(),
                last: false,
            },
        },
    }
}

/// What `serve_lines` makes of `bytes` sent on a connection, without the
/// socket: each line decoded in turn, up to the peer's end or the first
/// line over the cap (which ends the connection). The fuzz targets drive
/// the request parsing through it.
pub fn decode_stream<Request: serde::de::DeserializeOwned>(bytes: &[u8]) -> Vec<Decoded<Request>> {
    let mut reader = std::io::Cursor::new(bytes);
    let mut decoded = Vec::new();
    loop {
        let line = read_line_capped(&mut reader, MAX_LINE_BYTES).expect("reading memory never fails");
        match decode_line(line) {
            Decoded::End => return decoded,
            Decoded::Refused { last: true, reason } => {
                decoded.push(Decoded::Refused { reason, last: true });
                return decoded;
            }
            other => decoded.push(other),
        }
    }
}

/// One line read with a cap.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    Text(String),
    /// Longer than the cap: the rest of the connection is not read.
    TooLong,
    NotUtf8,
    End,
}

/// Read one `\n`-terminated line of at most `cap` bytes without ever
/// buffering more than `cap` of it.
pub fn read_line_capped(reader: &mut impl BufRead, cap: usize) -> std::io::Result<Line> {
    let mut line = Vec::new();
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            if line.is_empty() {
                return Ok(Line::End);
            }
            break;
        }
        let (taken, done) = match available.iter().position(|&b| b == b'\n') {
            Some(newline) => (newline + 1, true),
            None => (available.len(), false),
        };
        if line.len() + taken > cap + 1 {
            return Ok(Line::TooLong);
        }
        line.extend_from_slice(&available[..taken]);
        reader.consume(taken);
        if done {
            break;
        }
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    }
    match String::from_utf8(line) {
        Ok(text) => Ok(Line::Text(text)),
        Err(_) => Ok(Line::NotUtf8),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_read_up_to_the_cap_and_refused_beyond() {
        let mut input = std::io::Cursor::new(b"short\nxxxxxxxxxx\n".to_vec());
        assert_eq!(read_line_capped(&mut input, 8).unwrap(), Line::Text("short".into()));
        assert_eq!(read_line_capped(&mut input, 8).unwrap(), Line::TooLong);
        let mut input = std::io::Cursor::new(b"last".to_vec());
        assert_eq!(read_line_capped(&mut input, 8).unwrap(), Line::Text("last".into()));
        assert_eq!(read_line_capped(&mut input, 8).unwrap(), Line::End);
        let mut input = std::io::Cursor::new(vec![0xff, b'\n']);
        assert_eq!(read_line_capped(&mut input, 8).unwrap(), Line::NotUtf8);
    }

    #[test]
    fn a_line_sent_a_byte_a_second_is_cut_off_at_the_first_line_deadline() {
        let (server, mut client) = std::os::unix::net::UnixStream::pair().unwrap();
        // Ten bytes a second apart: each read alone would be quick, the
        // whole line takes longer than the deadline.
        let slow = std::thread::spawn(move || {
            for byte in b"{\"op\":1}\n\n" {
                if std::io::Write::write_all(&mut client, &[*byte]).is_err() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        });
        let metrics = crate::metrics::Metrics::default();
        let served = serve_lines(server, &metrics, |reason| reason, |_: ControlRequest| String::new());
        let error = served.expect_err("the line never completes in time");
        assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
        slow.join().unwrap();
    }

    #[test]
    fn requests_have_a_stable_wire_form_and_unknown_fields_are_refused() {
        let request = ControlRequest::Rollback {
            state_dir: "/s".into(),
            pid: 7,
            patch_id: None,
            restore_state: false,
        };
        assert_eq!(
            serde_json::to_string(&request).unwrap(),
            r#"{"op":"rollback","state_dir":"/s","pid":7,"patch_id":null}"#
        );
        assert!(serde_json::from_str::<ControlRequest>(r#"{"op":"status","state_dir":"/s","pid":1,"x":1}"#).is_err());
        assert!(serde_json::from_str::<ControlRequest>(r#"{"op":"format_disk"}"#).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        /// Any bytes: lines come back whole up to the cap, never longer,
        /// and parsing them as requests fails cleanly or succeeds.
        #[test]
        fn arbitrary_input_never_yields_a_line_over_the_cap(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
            cap in 1usize..512,
        ) {
            let mut input = std::io::Cursor::new(bytes.clone());
            let mut consumed_lines = 0;
            loop {
                match read_line_capped(&mut input, cap).unwrap() {
                    Line::End | Line::TooLong => break,
                    Line::NotUtf8 => consumed_lines += 1,
                    Line::Text(text) => {
                        proptest::prop_assert!(text.len() <= cap);
                        proptest::prop_assert!(!text.contains('\n'));
                        let _ = serde_json::from_str::<ControlRequest>(&text);
                        let _ = serde_json::from_str::<app::AppRequest>(&text);
                        consumed_lines += 1;
                    }
                }
                proptest::prop_assert!(consumed_lines <= bytes.len() + 1);
            }
        }
    }
}

/// The application protocol's server side, with serde: the runtime library
/// (`crates/runtime`) writes and reads these lines by hand to stay free of
/// dependencies; the shapes here are the same, and the agent tests check
/// that every line the Rust and C runtimes write parses.
pub mod app {
    /// How a critical variable is protected.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "snake_case")]
    pub enum VariableMode {
        Guarded,
        Mirrored,
    }

    /// A request from an application.
    #[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    #[serde(tag = "op", rename_all = "snake_case")]
    pub enum AppRequest {
        Hello {
            version: u32,
            pending_address: u64,
            parked_address: u64,
            passed_address: u64,
        },
        Ping,
        RegisterVariable {
            name: String,
            address: u64,
            size: u64,
            mode: VariableMode,
        },
        RequestRollback {
            reason: String,
        },
    }

    /// The agent's answer to one request.
    #[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    pub struct AppReply {
        pub ok: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub error: Option<String>,
        /// For a rollback: the patch rolled back and the pause.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub patch_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub pause_us: Option<u64>,
    }

    impl AppReply {
        pub fn ok() -> Self {
            AppReply {
                ok: true,
                ..Default::default()
            }
        }

        pub fn error(message: impl Into<String>) -> Self {
            AppReply {
                ok: false,
                error: Some(message.into()),
                ..Default::default()
            }
        }
    }
}
