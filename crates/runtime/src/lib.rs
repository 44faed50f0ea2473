//! The runtime library an application may link to cooperate with the
//! shadowpatch agent: register critical variables by name and address, mark
//! safe points where a patch may be switched while the calling thread is
//! parked, and ask for the latest patch to be rolled back.
//!
//! It talks to the agent over its application socket (`$SHADOWPATCH_APP_SOCKET`,
//! default `/run/shadowpatch/app.sock`) with one JSON object per line; the
//! agent identifies the calling process by the socket's peer credentials,
//! so an application can only ever act on itself. A C header and static
//! library speaking the same protocol are in `c/` (`shadowpatch.h`).
//!
//! ```no_run
//! static CONFIG: [u8; 64] = [0; 64];
//! shadowpatch_runtime::register_variable("config", &CONFIG, shadowpatch_runtime::VariableMode::Guarded)?;
//! loop {
//!     shadowpatch_runtime::safe_point(); // between requests
//!     # break;
//! }
//! # Ok::<(), shadowpatch_runtime::RuntimeError>(())
//! ```

#![forbid(unsafe_code)]

pub mod protocol;

pub use protocol::{AppReply, AppRequest, VariableMode, PROTOCOL_VERSION};

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Where the agent listens for applications, unless `$SHADOWPATCH_APP_SOCKET` says.
pub const DEFAULT_APP_SOCKET: &str = "/run/shadowpatch/app.sock";

/// How long a request waits for the agent's answer (a rollback takes
/// milliseconds; the agent may be busy with other targets).
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// What went wrong talking to the agent. (`Display` and `Error` by hand:
/// this crate has no dependencies, see Cargo.toml.)
#[derive(Debug)]
pub enum RuntimeError {
    Connect { path: PathBuf, source: std::io::Error },
    Io { path: PathBuf, source: std::io::Error },
    Refused(String),
    Protocol(String),
}

impl std::fmt::Display for RuntimeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RuntimeError::Connect { path, source } => {
                write!(f, "cannot reach the shadowpatch agent at {}: {source}", path.display())
            }
            RuntimeError::Io { path, source } => {
                write!(f, "talking to the shadowpatch agent at {}: {source}", path.display())
            }
            RuntimeError::Refused(message) => write!(f, "the shadowpatch agent refused: {message}"),
            RuntimeError::Protocol(message) => {
                write!(f, "the shadowpatch agent answered something unreadable: {message}")
            }
        }
    }
}

impl std::error::Error for RuntimeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RuntimeError::Connect { source, .. } | RuntimeError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The safe-point mailbox the agent reads and writes in this process's
/// memory: `PENDING` is set by the agent when it wants threads to stop at
/// their next safe point, `PARKED` counts threads waiting there, and
/// `PASSED` counts safe points passed (so the agent can tell the
/// application uses them at all).
static PENDING: AtomicU32 = AtomicU32::new(0);
static PARKED: AtomicU32 = AtomicU32::new(0);
static PASSED: AtomicU64 = AtomicU64::new(0);

/// How long a parked thread sleeps between looks at `PENDING`. Polling,
/// not a futex: a futex wait needs `unsafe` (raw syscall) and a thread
/// parks only for the few milliseconds of an activation.
const PARK_POLL: Duration = Duration::from_micros(100);

/// The connection, opened on first use and kept.
static CONNECTION: Mutex<Option<Connection>> = Mutex::new(None);

#[derive(Debug)]
struct Connection {
    path: PathBuf,
    writer: UnixStream,
    reader: BufReader<UnixStream>,
}

fn socket_path() -> PathBuf {
    std::env::var_os("SHADOWPATCH_APP_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_APP_SOCKET))
}

fn address_of<T: ?Sized>(value: &T) -> u64 {
    (value as *const T).cast::<u8>() as usize as u64
}

impl Connection {
    fn open() -> Result<Connection, RuntimeError> {
        let path = socket_path();
        let stream = UnixStream::connect(&path).map_err(|source| RuntimeError::Connect {
            path: path.clone(),
            source,
        })?;
        let io = |source| RuntimeError::Io {
            path: path.clone(),
            source,
        };
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        let reader = BufReader::new(stream.try_clone().map_err(io)?);
        let mut connection = Connection {
            path: path.clone(),
            writer: stream,
            reader,
        };
        connection.exchange(&AppRequest::Hello {
            version: PROTOCOL_VERSION,
            pending_address: address_of(&PENDING),
            parked_address: address_of(&PARKED),
            passed_address: address_of(&PASSED),
        })?;
        Ok(connection)
    }

    fn exchange(&mut self, request: &AppRequest) -> Result<AppReply, RuntimeError> {
        let io = |source| RuntimeError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = request.to_json().into_bytes();
        line.push(b'\n');
        self.writer.write_all(&line).map_err(io)?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer).map_err(io)? == 0 {
            return Err(RuntimeError::Io {
                path: self.path.clone(),
                source: std::io::ErrorKind::UnexpectedEof.into(),
            });
        }
        let reply = AppReply::parse(&answer).map_err(|e| RuntimeError::Protocol(format!("{e}: {}", answer.trim())))?;
        match &reply.error {
            Some(error) if !reply.ok => Err(RuntimeError::Refused(error.clone())),
            _ => Ok(reply),
        }
    }
}

/// Send one request on the shared connection, opening it if needed and
/// reopening it once if the agent restarted.
fn request(request: &AppRequest) -> Result<AppReply, RuntimeError> {
    let mut guard = CONNECTION.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    for attempt in 0..2 {
        if guard.is_none() {
            *guard = Some(Connection::open()?);
        }
        let connection = guard.as_mut().expect("opened above");
        match connection.exchange(request) {
            Err(RuntimeError::Io { .. }) if attempt == 0 => *guard = None,
            other => return other,
        }
    }
    unreachable!("the second attempt returns")
}

/// Declare a critical variable: `Guarded` ones must never change (the agent
/// alerts and can heal), `Mirrored` ones are copied periodically with a
/// history, so their state at a patch's activation can be restored.
pub fn register_variable<T: ?Sized>(name: &str, variable: &T, mode: VariableMode) -> Result<(), RuntimeError> {
    register_range(name, address_of(variable), std::mem::size_of_val(variable) as u64, mode)
}

/// Declare a critical address range (for memory the program owns but that
/// is not one Rust value).
pub fn register_range(name: &str, address: u64, size: u64, mode: VariableMode) -> Result<(), RuntimeError> {
    request(&AppRequest::RegisterVariable {
        name: name.to_string(),
        address,
        size,
        mode,
    })
    .map(drop)
}

/// Connect to the agent now (otherwise the first call does), so that it
/// knows this process's safe-point mailbox.
pub fn connect() -> Result<(), RuntimeError> {
    request(&AppRequest::Ping).map(drop)
}

/// A safe point: a place where this thread holds no state a patch could
/// trip over (e.g. between two requests). Costs one atomic load unless the
/// agent is waiting for it, in which case the thread parks until the
/// agent has switched the patch.
pub fn safe_point() {
    PASSED.fetch_add(1, Ordering::Relaxed);
    if PENDING.load(Ordering::Acquire) == 0 {
        return;
    }
    PARKED.fetch_add(1, Ordering::AcqRel);
    while PENDING.load(Ordering::Acquire) != 0 {
        std::thread::sleep(PARK_POLL);
    }
    PARKED.fetch_sub(1, Ordering::AcqRel);
}

/// What the agent did with a rollback request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RolledBack {
    pub patch_id: String,
    pub pause_us: u64,
}

/// Ask the agent to roll back the latest patch of this process, because
/// the application found it misbehaving (`reason` is recorded).
pub fn request_rollback(reason: &str) -> Result<RolledBack, RuntimeError> {
    let reply = request(&AppRequest::RequestRollback {
        reason: reason.to_string(),
    })?;
    Ok(RolledBack {
        patch_id: reply.patch_id.unwrap_or_default(),
        pause_us: reply.pause_us.unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test for both cases: the mailbox is process-global.
    #[test]
    fn a_safe_point_passes_at_once_unless_pending_then_parks_until_released() {
        let before = PASSED.load(Ordering::Relaxed);
        safe_point();
        assert_eq!(PASSED.load(Ordering::Relaxed), before + 1);
        assert_eq!(PARKED.load(Ordering::Relaxed), 0);

        PENDING.store(1, Ordering::Release);
        let parked = std::thread::spawn(safe_point);
        while PARKED.load(Ordering::Acquire) == 0 {
            std::thread::yield_now();
        }
        assert!(!parked.is_finished());
        PENDING.store(0, Ordering::Release);
        parked.join().unwrap();
        assert_eq!(PARKED.load(Ordering::Acquire), 0);
    }

    #[test]
    fn no_agent_is_a_clear_error() {
        std::env::set_var("SHADOWPATCH_APP_SOCKET", "/nonexistent/app.sock");
        let error = request_rollback("test").unwrap_err();
        assert!(error.to_string().contains("/nonexistent/app.sock"), "{error}");
    }
}
