//! The shadowpatch agent: a long-running daemon that manages many targets
//! at once. At start it recovers every target's interrupted transaction
//! from the state directory's journals and resumes the watchers it ran
//! before; then it serves the CLI on a control socket (peer credentials
//! checked: root or the target's owner), applications linking the runtime
//! library on the application socket (rollback requests, critical
//! variables), and Prometheus metrics on a loopback TCP port.

#![forbid(unsafe_code)]

pub mod app;
pub mod client;
pub mod health_watch;
pub mod metrics;
pub mod notify;
pub mod peer;
pub mod protocol;
pub mod server;
pub mod targets;
pub mod window;

pub use client::{request, RemoteError};
pub use protocol::{ControlReply, ControlRequest, FailureKind};
pub use server::{Agent, AgentConfig, StartReport, TargetRecovery};

use std::path::PathBuf;

/// Where the agent listens for the CLI, unless told otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/shadowpatch/agent.sock";
pub use shadowpatch_runtime::DEFAULT_APP_SOCKET;

/// Errors of the agent, each naming the socket, file, pid or peer concerned.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot read the peer credentials of a connection: {source}")]
    PeerCredentials { source: std::io::Error },
    #[error("no process with pid {pid}")]
    NoSuchProcess { pid: i32 },
    #[error(
        "uid {peer_uid} (pid {peer_pid}) may not act on pid {pid}, owned by uid {owner}: only root or the owner may"
    )]
    Unauthorised {
        peer_uid: u32,
        peer_pid: i32,
        pid: i32,
        owner: u32,
    },
    #[error("{path}: {source}")]
    File { path: PathBuf, source: std::io::Error },
    #[error("{path} belongs to uid {owner}, not to the requesting uid {uid}: the agent reads only the requester's own files")]
    NotYours { path: PathBuf, uid: u32, owner: u32 },
    #[error("socket {path}: {source}")]
    Socket { path: PathBuf, source: std::io::Error },
    #[error("socket {path}: another agent is already listening there")]
    AlreadyRunning { path: PathBuf },
    #[error("metrics address {address}: {source}")]
    Metrics { address: String, source: std::io::Error },
    #[error("pid {pid} is not watched by the agent")]
    NotWatched { pid: i32 },
    #[error(transparent)]
    Patch(#[from] shadowpatch_patch::PatchError),
    #[error(transparent)]
    Watch(#[from] shadowpatch_watch::WatchError),
    #[error(transparent)]
    Mirror(#[from] shadowpatch_mirror::MirrorError),
    #[error(transparent)]
    Target(#[from] shadowpatch_process::TargetError),
    /// The health watch after an apply could not run.
    #[error(transparent)]
    HealthWatch(#[from] health_watch::HealthWatchError),
}

impl AgentError {
    /// How the CLI should exit for this error, as if it had acted directly.
    pub fn failure_kind(&self) -> FailureKind {
        use shadowpatch_patch::ErrorClass;
        match self {
            AgentError::Patch(e) => match e.class() {
                ErrorClass::BadInput => FailureKind::BadInput,
                ErrorClass::Refused => FailureKind::Refused,
                ErrorClass::Failed => FailureKind::Failed,
            },
            AgentError::Watch(e) if !e.is_bad_input() => FailureKind::Failed,
            AgentError::Mirror(e) if !e.is_bad_input() => FailureKind::Failed,
            AgentError::Target(e) if !e.is_bad_input() => FailureKind::Failed,
            AgentError::HealthWatch(health_watch::HealthWatchError::Patch(e)) => match e.class() {
                ErrorClass::BadInput => FailureKind::BadInput,
                ErrorClass::Refused => FailureKind::Refused,
                ErrorClass::Failed => FailureKind::Failed,
            },
            AgentError::HealthWatch(health_watch::HealthWatchError::Sample(_)) => FailureKind::Failed,
            AgentError::Socket { .. } | AgentError::Metrics { .. } | AgentError::PeerCredentials { .. } => {
                FailureKind::Failed
            }
            _ => FailureKind::BadInput,
        }
    }
}
