//! The CLI's side of the control socket: send one request to a running
//! agent, or say there is none (so the CLI acts directly).

use crate::protocol::{ControlReply, ControlRequest, FailureKind};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

/// A failure the agent reported, with how the CLI should exit.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    pub kind: FailureKind,
    pub message: String,
    /// What the agent sent with the failure (a refused apply's refusal
    /// and analysis), else null.
    pub result: serde_json::Value,
}

impl shadowpatch_failure::Classify for RemoteError {
    /// As the agent classed it (a wrong state directory never reaches a
    /// caller: the CLI acts directly then).
    fn class(&self) -> shadowpatch_failure::FailureClass {
        self.kind.class().unwrap_or(shadowpatch_failure::FailureClass::BadInput)
    }
}

/// Send `request` to the agent at `socket`. `Ok(None)` when no agent
/// serves this state directory there (no socket, nobody listening, not
/// allowed to connect, or an agent of another state directory): the
/// caller then acts directly.
pub fn request(socket: &Path, request: &ControlRequest) -> Result<Option<serde_json::Value>, RemoteError> {
    use std::io::ErrorKind::{ConnectionRefused, NotFound, PermissionDenied};
    let stream = match UnixStream::connect(socket) {
        Ok(stream) => stream,
        Err(e) if matches!(e.kind(), NotFound | ConnectionRefused | PermissionDenied) => {
            tracing::debug!(socket = %socket.display(), error = %e, "no agent: acting directly");
            return Ok(None);
        }
        Err(e) => {
            return Err(RemoteError {
                kind: FailureKind::Failed,
                message: format!("agent socket {}: {e}", socket.display()),
                result: serde_json::Value::Null,
            })
        }
    };
    let broken = |e: std::io::Error| {
        RemoteError {
        kind: FailureKind::Failed,
        message: format!(
            "the agent at {} did not answer ({e}); it may have died mid-operation: it recovers the target when restarted, or run `shadowpatch recover PID --no-agent`",
            socket.display()
        ),
        result: serde_json::Value::Null,
    }
    };
    let mut line = serde_json::to_vec(request).expect("requests serialize");
    line.push(b'\n');
    (&stream).write_all(&line).map_err(broken)?;
    let mut answer = String::new();
    if BufReader::new(&stream).read_line(&mut answer).map_err(broken)? == 0 {
        return Err(broken(std::io::ErrorKind::UnexpectedEof.into()));
    }
    let reply: ControlReply = serde_json::from_str(&answer).map_err(|e| RemoteError {
        kind: FailureKind::Failed,
        message: format!("the agent at {} answered something unreadable: {e}", socket.display()),
        result: serde_json::Value::Null,
    })?;
    match (reply.ok, reply.failure) {
        (true, _) => Ok(Some(reply.result)),
        (false, Some(FailureKind::WrongStateDir)) => {
            tracing::debug!(error = ?reply.error, "the agent serves another state directory: acting directly");
            Ok(None)
        }
        (false, kind) => Err(RemoteError {
            kind: kind.unwrap_or(FailureKind::Failed),
            message: reply
                .error
                .unwrap_or_else(|| "the agent refused without saying why".into()),
            result: reply.result,
        }),
    }
}
