//! Critical-variable snapshots from the command line: `shadowpatch snapshot
//! PID [--var NAME]` (a copy now, read from outside with
//! `process_vm_readv`; the operation is `shadowpatch_ops::snapshot`) and
//! `shadowpatch history PID VAR` (the kept snapshots of one variable).

use super::history::{parse_since, HistoryQuery};
use super::Context;
use crate::failure::BadInput;
use crate::output::{hex_bytes, print_json};
use shadowpatch_mirror::{Snapshot, SnapshotFile, StateDir};
use shadowpatch_ops::variables::live_target_dir;
use shadowpatch_process::ProcessIdentity;

/// Bytes of a snapshot shown in text output.
const SHOWN_BYTES: usize = 16;

/// `shadowpatch snapshot PID [--var NAME]` (the operation is `shadowpatch_ops::snapshot`).
pub fn run_snapshot(context: &Context, pid: i32, var: Option<&str>) -> anyhow::Result<i32> {
    let outcome = shadowpatch_ops::snapshot(&context.state_dir, pid, var)?;
    if context.json {
        print_json(&outcome);
        return Ok(0);
    }
    for row in &outcome.snapshots {
        println!("{}", describe(&row.name, row.address, &row.snapshot));
    }
    Ok(0)
}

/// One line: time, name, address, size, value or first bytes, hash.
fn describe(name: &str, address: u64, snapshot: &Snapshot) -> String {
    let time =
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(snapshot.unix_ms));
    let shown = match (snapshot.integer(), &snapshot.bytes) {
        (Some(value), _) => format!("value {value}"),
        (None, Some(bytes)) => format!(
            "bytes {}{}",
            hex_bytes(&bytes[..bytes.len().min(SHOWN_BYTES)]),
            if bytes.len() > SHOWN_BYTES { "…" } else { "" }
        ),
        (None, None) => "bytes not kept (too large)".into(),
    };
    let patch = snapshot
        .patch_id
        .as_ref()
        .map(|p| format!(" before {p}"))
        .unwrap_or_default();
    format!(
        "{time} {name} ({address:#x}, {} bytes) {shown} blake3 {} ({}{patch})",
        snapshot.size,
        &snapshot.hash[..16],
        snapshot.cause
    )
}

/// `shadowpatch history PID VAR`: the kept snapshots of one variable, oldest first.
/// `--since` and `--limit` (the newest N) apply to the snapshots as to events.
pub fn run_variable_history(context: &Context, pid: i32, var: &str, query: &HistoryQuery) -> anyhow::Result<i32> {
    if let Some(kind) = query.kinds.first() {
        return Err(BadInput(format!(
            "--kind {kind}: kinds select events; history {pid} {var} lists the snapshots of {var}"
        ))
        .into());
    }
    let since = query.since.as_deref().map(parse_since).transpose()?;
    // The live incarnation, else the newest one stored (the process may
    // have exited: its history is still worth reading).
    let dir = match ProcessIdentity::of(pid) {
        Ok(identity) => live_target_dir(&context.state_dir, &identity)?,
        Err(_) => None,
    }
    .or_else(|| {
        StateDir::open_if_present(&context.state_dir)
            .ok()
            .flatten()
            .and_then(|state| state.incarnations(pid).pop().map(|(_, dir)| dir))
    });
    let file = match &dir {
        Some(dir) => SnapshotFile::load(dir)?,
        None => None,
    };
    let Some(history) = file.as_ref().and_then(|f| f.history(var)) else {
        let known = file
            .as_ref()
            .map(|f| {
                f.variables
                    .iter()
                    .map(|h| h.name.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| "none".into());
        return Err(BadInput(format!(
            "history {pid} {var}: no snapshots of {var} for pid {pid} (variables with snapshots: {known})"
        ))
        .into());
    };
    let mut shown: Vec<&Snapshot> = history
        .snapshots
        .iter()
        .filter(|s| since.is_none_or(|since| s.unix_ms >= since))
        .collect();
    if let Some(limit) = query.limit {
        let excess = shown.len().saturating_sub(limit as usize);
        shown.drain(..excess);
    }
    if context.json {
        let snapshots: Vec<serde_json::Value> = shown
            .iter()
            .map(|s| {
                let mut value = serde_json::to_value(s).expect("snapshots serialize");
                value["value"] = s.integer().into();
                value
            })
            .collect();
        print_json(&serde_json::json!({
            "pid": pid,
            "variable": history.name,
            "address": history.address,
            "size": history.size,
            "snapshots": snapshots,
        }));
        return Ok(0);
    }
    for snapshot in shown {
        println!("{}", describe(&history.name, history.address, snapshot));
    }
    Ok(0)
}
