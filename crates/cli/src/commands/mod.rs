//! The subcommands, one file each, and what they share.

pub mod agent;
pub mod analyze;
pub mod apply_watch;
pub mod build;
pub mod build_debian;
pub mod demo;
pub mod external;
pub mod history;
pub mod lookup;
pub mod mirror;
pub mod patching;
pub mod pause;
pub mod persist;
pub mod sets;
pub mod signing;
pub mod status;
pub mod targets;
pub mod variables;
pub mod verify;
pub mod watch;

use std::path::PathBuf;

/// Options every command receives.
#[derive(Debug, Clone)]
pub struct Context {
    pub state_dir: PathBuf,
    pub json: bool,
    /// The agent's control socket, or None (`--no-agent`): act directly.
    pub agent_socket: Option<PathBuf>,
}

impl Context {
    /// Send `request` to a running agent serving this state directory;
    /// `Ok(None)` when there is none (the caller acts directly).
    pub fn through_agent(
        &self,
        request: &shadowpatch_agent::ControlRequest,
    ) -> Result<Option<serde_json::Value>, shadowpatch_agent::RemoteError> {
        match &self.agent_socket {
            None => Ok(None),
            Some(socket) => shadowpatch_agent::request(socket, request),
        }
    }
}

/// Where an address lies: module, symbol and offset (`module!symbol+0x12`).
pub use shadowpatch_symbols::Location;
