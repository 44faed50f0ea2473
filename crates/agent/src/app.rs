//! The application socket: processes linking the runtime library
//! (`crates/runtime`, `shadowpatch.h`) say hello, register critical
//! variables and ask for their latest patch to be rolled back. The sender
//! is the peer process of the connection (SO_PEERCRED), never a field of
//! the message, so an application can only act on itself.

use crate::peer::Peer;
use crate::protocol::app::{AppReply, AppRequest, VariableMode};
use crate::protocol::serve_lines;
use crate::server::Agent;
use shadowpatch_mirror::variables::{VariableRequest, VariableTarget};
use shadowpatch_runtime::PROTOCOL_VERSION;
use shadowpatch_store::{record_best_effort, EventKind, NewEvent};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

/// The largest variable an application may register: the agent copies and
/// hashes it on every verification and keeps it in `variables.json`.
pub const MAX_VARIABLE_BYTES: u64 = 1024 * 1024;
/// The most one process may register in all.
pub const MAX_VARIABLE_BYTES_PER_PROCESS: u64 = 16 * 1024 * 1024;

/// Serve one application connection until it closes.
pub fn serve_app(agent: &Arc<Agent>, stream: UnixStream, peer: Peer) -> std::io::Result<()> {
    serve_lines(stream, &agent.metrics, AppReply::error, |request: AppRequest| {
        handle(agent, &peer, request)
    })
}

fn handle(agent: &Agent, peer: &Peer, request: AppRequest) -> AppReply {
    let pid = peer.pid;
    match request {
        AppRequest::Hello { version, .. } if version != PROTOCOL_VERSION => AppReply::error(format!(
            "protocol version {version} is not supported by this agent (it speaks {PROTOCOL_VERSION})"
        )),
        AppRequest::Hello { .. } | AppRequest::Ping => AppReply::ok(),
        AppRequest::RegisterVariable {
            name,
            address,
            size,
            mode,
        } => {
            if let Err(message) = within_caps(agent, pid, address, size) {
                return AppReply::error(format!("register_variable {name:?}: {message}"));
            }
            let mode = match mode {
                VariableMode::Guarded => shadowpatch_mirror::VariableMode::Guarded,
                VariableMode::Mirrored => shadowpatch_mirror::VariableMode::Mirrored,
            };
            let request = VariableRequest {
                target: VariableTarget::Range { address, size },
                mode,
                origin: format!("register_variable {name:?} from pid {pid}"),
            };
            // Registering a variable means the application wants to be
            // watched: (re)start its watcher with the variable, keeping
            // the heal setting it had.
            let heal = agent.targets.heal_of(pid).unwrap_or(false);
            match agent.targets.watch(pid, heal, &[request]) {
                Ok(_) => AppReply::ok(),
                Err(error) => AppReply::error(error.to_string()),
            }
        }
        AppRequest::RequestRollback { reason } => {
            let result = agent.rollback(pid, None, "request");
            record_best_effort(
                &agent.config.state_dir,
                &NewEvent::new(EventKind::Agent)
                    .cause("request")
                    .outcome(if result.is_ok() { "rolled_back" } else { "refused" })
                    .details(serde_json::json!({
                        "pid": pid,
                        "request": "request_rollback",
                        "reason": reason,
                        "patch_id": result.as_ref().ok().map(|o| o.patch_id.clone()),
                        "error": result.as_ref().err().map(|e| e.to_string()),
                    })),
            );
            match result {
                Ok(outcome) => AppReply {
                    ok: true,
                    error: None,
                    patch_id: Some(outcome.patch_id),
                    pause_us: Some(outcome.pause_us),
                },
                Err(error) => AppReply::error(error.to_string()),
            }
        }
    }
}

/// Whether registering `size` bytes at `address` keeps `pid` within the
/// caps (a variable re-registered at the same address replaces itself).
fn within_caps(agent: &Agent, pid: i32, address: u64, size: u64) -> Result<(), String> {
    if size > MAX_VARIABLE_BYTES {
        return Err(format!(
            "{size} bytes is more than the {MAX_VARIABLE_BYTES} bytes a variable may have"
        ));
    }
    let registered: u64 = crate::server::target_dirs(&agent.config.state_dir)
        .into_iter()
        .filter(|(target, start_time, dir)| {
            *target == pid && shadowpatch_mirror::StateDir::describes_live(dir, pid, *start_time)
        })
        .filter_map(|(_, _, dir)| {
            shadowpatch_mirror::variables::VariableRegistry::load(&dir)
                .ok()
                .flatten()
        })
        .flat_map(|registry| registry.variables)
        .filter(|variable| variable.address != address)
        .map(|variable| variable.size)
        .sum();
    if registered.saturating_add(size) > MAX_VARIABLE_BYTES_PER_PROCESS {
        return Err(format!(
            "{registered} bytes already registered; {size} more would pass the {MAX_VARIABLE_BYTES_PER_PROCESS} bytes a process may register"
        ));
    }
    Ok(())
}
