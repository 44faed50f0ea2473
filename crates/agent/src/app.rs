//! The application socket: processes linking the runtime library
//! (`crates/runtime`, `shadowpatch.h`) say hello, register critical
//! variables and ask for their latest patch to be rolled back. The sender
//! is the peer process of the connection (SO_PEERCRED), never a field of
//! the message, so an application can only act on itself.

use crate::peer::Peer;
use crate::protocol::{read_line_capped, Line, MAX_LINE_BYTES};
use crate::server::Agent;
use shadowpatch_mirror::variables::{VariableRequest, VariableTarget};
use shadowpatch_runtime::{AppReply, AppRequest, VariableMode, PROTOCOL_VERSION};
use shadowpatch_store::{record_best_effort, EventKind, NewEvent};
use std::io::{BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Serve one application connection until it closes.
pub fn serve_app(agent: &Arc<Agent>, stream: UnixStream, peer: Peer) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let reply = match read_line_capped(&mut reader, MAX_LINE_BYTES)? {
            Line::End => return Ok(()),
            Line::TooLong => {
                agent.metrics.bad_requests.fetch_add(1, Ordering::Relaxed);
                return write(
                    &mut writer,
                    &AppReply::error(format!("malformed request: longer than {MAX_LINE_BYTES} bytes")),
                );
            }
            Line::NotUtf8 => malformed(agent, "not UTF-8"),
            Line::Text(text) => match serde_json::from_str::<AppRequest>(&text) {
                Err(error) => malformed(agent, &error.to_string()),
                Ok(request) => {
                    agent.metrics.requests.fetch_add(1, Ordering::Relaxed);
                    handle(agent, &peer, request)
                }
            },
        };
        write(&mut writer, &reply)?;
    }
}

fn malformed(agent: &Agent, reason: &str) -> AppReply {
    agent.metrics.bad_requests.fetch_add(1, Ordering::Relaxed);
    AppReply::error(format!("malformed request: {reason}"))
}

fn write(writer: &mut UnixStream, reply: &AppReply) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(reply).expect("replies serialize");
    line.push(b'\n');
    writer.write_all(&line)
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
