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
pub mod inputs;
pub mod metrics;
pub mod notify;
pub mod peer;
pub mod protocol;
pub mod server;
pub mod targets;

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
    /// The one answer for a path the requester cannot use, whether it is
    /// missing, unreachable, a symlink or another user's: the agent must
    /// not tell them which (`inputs.rs`).
    #[error("cannot use {path}: not found or not yours (the agent reads only the requester's own regular files, not through a final symlink)")]
    NotFoundOrNotYours { path: PathBuf },
    #[error("{path} {message}")]
    Input { path: PathBuf, message: String },
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
    #[error(transparent)]
    Ops(#[from] shadowpatch_ops::OpsError),
    /// The analysis refused the patch (and the client did not force it).
    #[error("{}", .0.message)]
    ApplyRefused(Box<shadowpatch_ops::Refused>),
}

impl shadowpatch_failure::Classify for AgentError {
    fn class(&self) -> shadowpatch_failure::FailureClass {
        use shadowpatch_failure::FailureClass;
        match self {
            AgentError::Patch(e) => e.class(),
            AgentError::Watch(e) => e.class(),
            AgentError::Mirror(e) => e.class(),
            AgentError::Target(e) => e.class(),
            AgentError::Ops(e) => e.class(),
            AgentError::ApplyRefused(refused) => refused.class,
            AgentError::Socket { .. } | AgentError::Metrics { .. } | AgentError::PeerCredentials { .. } => {
                FailureClass::FailedMidway
            }
            AgentError::NoSuchProcess { .. }
            | AgentError::Unauthorised { .. }
            | AgentError::File { .. }
            | AgentError::NotFoundOrNotYours { .. }
            | AgentError::Input { .. }
            | AgentError::AlreadyRunning { .. }
            | AgentError::NotWatched { .. } => FailureClass::BadInput,
        }
    }
}

impl AgentError {
    /// How the CLI should exit for this error, as if it had acted directly.
    pub fn failure_kind(&self) -> FailureKind {
        shadowpatch_failure::Classify::class(self).into()
    }
}
