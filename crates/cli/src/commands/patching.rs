//! `shadowpatch apply`, `rollback` and `recover`: arguments in, typed
//! outcomes of the operations layer (`shadowpatch_ops`) out, rendered as
//! text or JSON. Through a running agent when one serves this state
//! directory (it runs the same operation), else directly.

use super::analyze::{print_report, progress_bar, AnalysisArgs};
use super::Context;
use crate::failure::Exit;
use crate::output::print_json;
use shadowpatch_agent::{ControlRequest, RemoteError};
use shadowpatch_health::Decision;
use shadowpatch_ops::health_watch::WatchArgs;
use shadowpatch_ops::{Applied, ApplyRequest, ApplyResult, Refused, RollbackRequest, RolledBack};
use shadowpatch_patch::{RecoverOutcome, Recovered};
use shadowpatch_predict::Verdict;
use shadowpatch_signing::SignatureCheck;
use std::path::Path;

/// What `apply` was asked.
#[derive(Debug)]
pub struct ApplyArgs<'a> {
    pub pid: i32,
    pub manifest: &'a Path,
    pub attempts: u32,
    pub force: bool,
    pub analysis: &'a AnalysisArgs,
    pub watch: Option<WatchArgs>,
}

/// An agent's typed outcome, or the error it answered with.
fn from_agent<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> anyhow::Result<T> {
    serde_json::from_value(value).map_err(|e| anyhow::anyhow!("the agent's answer is not the outcome expected: {e}"))
}

/// `apply`: the operations layer's apply (analysis gate, snapshot,
/// transaction, optional watch window, history), rendered.
pub fn run_apply(context: &Context, args: ApplyArgs) -> anyhow::Result<i32> {
    let request = ApplyRequest {
        pid: args.pid,
        // The agent's working directory is not ours.
        manifest: std::path::absolute(args.manifest)?,
        attempts: args.attempts,
        force: args.force,
        analysis: args.analysis.settings(),
        requested_by: "cli".into(),
        baseline_module_only: false,
        no_ancestor_state: false,
    };
    // The watch window needs the target seized from activation on by the
    // process that watches: `apply --watch` runs here, never in the agent.
    let through_agent = match &args.watch {
        Some(_) => None,
        None => {
            let message = ControlRequest::Apply {
                state_dir: context.state_dir.clone(),
                pid: request.pid,
                manifest: request.manifest.clone(),
                attempts: request.attempts,
                force: request.force,
                analysis: Box::new(request.analysis.clone()),
            };
            match context.through_agent(&message) {
                Ok(answer) => answer,
                // A refusal comes back whole, to be shown like ours.
                Err(RemoteError { result, .. }) if !result.is_null() => Some(result),
                Err(error) => return Err(error.into()),
            }
        }
    };
    let (result, by_agent) = match through_agent {
        Some(value) => (from_agent::<ApplyResult>(value)?, true),
        None => (
            shadowpatch_ops::apply(&context.state_dir, &request, args.watch.as_ref(), progress_bar(context))?,
            false,
        ),
    };
    match result {
        ApplyResult::Refused(refused) => Ok(show_refused(context, &refused)),
        ApplyResult::Applied(applied) => Ok(show_applied(context, &applied, by_agent)),
    }
}

fn show_refused(context: &Context, refused: &Refused) -> i32 {
    let code = Exit::of_class(refused.class).code();
    if context.json {
        print_json(&serde_json::json!({
            "error": refused.message,
            "exit_code": code,
            "analysis": refused.analysis.analysis,
            "decided_by": refused.analysis.decided_by,
        }));
    } else {
        print_report(&refused.analysis);
    }
    eprintln!("shadowpatch: error: {}", refused.message);
    code
}

fn show_applied(context: &Context, applied: &Applied, by_agent: bool) -> i32 {
    let code = if applied.rolled_back_by_watch() {
        Exit::RolledBackByWatch
    } else {
        Exit::Ok
    }
    .code();
    for warning in applied
        .warnings
        .iter()
        .chain(applied.watch.iter().flat_map(|w| &w.warnings))
    {
        eprintln!("shadowpatch: warning: {warning}");
    }
    if context.json {
        print_json(&serde_json::json!({
            "patch_id": applied.apply.patch_id,
            "pid": applied.apply.pid,
            "generation": applied.apply.generation,
            "functions": applied.apply.functions,
            "mapping_address": applied.apply.mapping_address,
            "mapping_len": applied.apply.mapping_len,
            "pause_us": applied.apply.pause_us,
            "activation": applied.apply.activation,
            "load_pause_us": applied.apply.load_pause_us,
            "total_us": applied.apply.total_us,
            "safe_point": applied.apply.safe_point,
            "analysis": applied.analysis.analysis,
            "analysis_us": applied.analysis.duration_us,
            "decided_by": applied.analysis.decided_by,
            "forced": applied.forced,
            "signature": applied.signature,
            "warnings": applied.warnings,
            "state_snapshot": applied.state_snapshot,
            "watch": applied.watch,
            "by_agent": by_agent,
        }));
        return code;
    }
    if applied.analysis.analysis.verdict != Verdict::Proceed || applied.forced {
        print_report(&applied.analysis);
    }
    let outcome = &applied.apply;
    let functions = outcome.functions.len();
    let threads = outcome.activation.pause.threads;
    let attempts = outcome.activation.attempts;
    let stubs = match &applied.watch {
        Some(_) if !by_agent => " (through watch stubs)",
        _ => "",
    };
    println!(
        "applied {} to pid {}{stubs}: generation {}, {} function{}, pause {} µs ({} thread{}, {} attempt{}), total {:.1} ms{}",
        outcome.patch_id,
        outcome.pid,
        outcome.generation,
        functions,
        plural(functions),
        outcome.pause_us,
        threads,
        plural(threads),
        attempts,
        plural(attempts as usize),
        outcome.total_us as f64 / 1000.0,
        via_agent(by_agent)
    );
    if applied.forced {
        println!("  forced over the analysis's refusal (recorded in the history)");
    }
    match &applied.signature {
        SignatureCheck::Verified { key_id } => println!("  signed by trusted key {key_id}"),
        SignatureCheck::UntrustedKey { key_id } => {
            println!("  signed by key {key_id}, which the policy does not trust (unsigned patches are allowed)")
        }
        SignatureCheck::Unsigned => {}
    }
    for f in &outcome.functions {
        let via = match &f.preserved {
            None => "direct jump".to_string(),
            Some(registers) => format!("via a thunk preserving {registers}"),
        };
        println!(
            "  {} ({:#x}) → {} ({:#x}), {via}",
            f.symbol, f.entry, f.with, f.new_address
        );
    }
    println!(
        "  loaded at {:#x} ({} bytes) in a {} µs stop",
        outcome.mapping_address, outcome.mapping_len, outcome.load_pause_us
    );
    if let Some(report) = &applied.watch {
        println!(
            "  watched{} for {:.1} s",
            if by_agent { " by the agent" } else { "" },
            report.watched_ms as f64 / 1000.0
        );
        if !report.calls.is_empty() {
            println!(
                "  calls through the watch stubs: {}{}",
                shadowpatch_ops::health_watch::describe_calls(&report.calls),
                if report.extended_ms > 0 {
                    format!(
                        " (window extended {:.1} s waiting for calls)",
                        report.extended_ms as f64 / 1000.0
                    )
                } else {
                    String::new()
                }
            );
        }
        match report.decision {
            Decision::Keep => println!(
                "  kept: {}; trampolines re-pointed straight at the new code ({} µs stop)",
                if report.reason.is_empty() {
                    "no regression"
                } else {
                    &report.reason
                },
                report.keep_pause_us.unwrap_or(0)
            ),
            Decision::Rollback => {
                println!("  rolled back ({}): {}", report.cause, report.reason);
                if let Some(recovery) = &report.recovery {
                    println!(
                        "  fault at {:#x} survived: thread {} resumed in the original {} {} µs after the fault was seen",
                        recovery.fault_address, recovery.tid, recovery.function, recovery.resumed_us
                    );
                }
                if let Some(us) = report.decision_to_rollback_us {
                    println!("  decision to rollback complete: {us} µs");
                }
            }
        }
    }
    code
}

/// Said after a result when an agent did the work.
fn via_agent(by_agent: bool) -> &'static str {
    if by_agent {
        " (by the agent)"
    } else {
        ""
    }
}

pub fn run_rollback(context: &Context, pid: i32, patch_id: Option<&str>, restore_state: bool) -> anyhow::Result<i32> {
    let request = ControlRequest::Rollback {
        state_dir: context.state_dir.clone(),
        pid,
        patch_id: patch_id.map(str::to_string),
        restore_state,
    };
    let (outcome, by_agent): (RolledBack, bool) = match context.through_agent(&request)? {
        Some(value) => (from_agent(value)?, true),
        None => {
            let request = RollbackRequest {
                pid,
                patch_id: patch_id.map(str::to_string),
                restore_state,
                cause: "command".into(),
            };
            (shadowpatch_ops::rollback(&context.state_dir, &request)?, false)
        }
    };
    if context.json {
        print_json(&outcome);
        return Ok(Exit::Ok.code());
    }
    let rollback = &outcome.rollback;
    let functions = rollback.functions.len();
    println!(
        "rolled back {} in pid {}: generation {} active, {} function{} restored, pause {} µs{}",
        rollback.patch_id,
        rollback.pid,
        rollback.generation,
        functions,
        plural(functions),
        rollback.pause_us,
        via_agent(by_agent)
    );
    match &rollback.retired_reason {
        None => println!(
            "  patch memory unmapped (in a separate {} µs stop)",
            rollback.unmap_pause_us
        ),
        Some(reason) => println!("  patch memory left mapped: {reason}"),
    }
    if let Some(restored) = &outcome.restored_state {
        match restored.txn {
            Some(txn) => println!(
                "  state before {} restored: {} ({} bytes) in a {} µs stop (journal transaction {txn}){}",
                restored.patch_id,
                restored.restored.join(", "),
                restored.bytes,
                restored.pause_us,
                if restored.unchanged.is_empty() {
                    String::new()
                } else {
                    format!("; unchanged: {}", restored.unchanged.join(", "))
                }
            ),
            None => println!(
                "  state before {}: every variable already holds it ({})",
                restored.patch_id,
                restored.unchanged.join(", ")
            ),
        }
    }
    Ok(Exit::Ok.code())
}

pub fn run_recover(context: &Context, pid: i32) -> anyhow::Result<i32> {
    let request = ControlRequest::Recover {
        state_dir: context.state_dir.clone(),
        pid,
    };
    let outcome: RecoverOutcome = match context.through_agent(&request)? {
        Some(value) => from_agent(value)?,
        None => shadowpatch_ops::recover(&context.state_dir, pid)?,
    };
    if context.json {
        print_json(&outcome);
        return Ok(Exit::Ok.code());
    }
    let active = outcome.active_patches.len();
    let interrupted = match outcome.interrupted {
        Some(kind) => serde_json::to_value(kind)?.as_str().unwrap_or("apply").to_string(),
        None => "apply".to_string(),
    };
    let patch_id = outcome.patch_id.as_deref().unwrap_or("?");
    // A rollback's writes are its restorations of the original entries.
    let made = if interrupted == "rollback" {
        "entries had been restored"
    } else {
        "writes had been made"
    };
    match outcome.state {
        Recovered::FullyApplied => println!(
            "pid {pid}: interrupted {interrupted} of {patch_id} completed: fully applied ({}/{} {made})",
            outcome.written, outcome.total
        ),
        Recovered::FullyRolledBack if interrupted == "rollback" => println!(
            "pid {pid}: interrupted rollback of {patch_id} finished: fully rolled back ({}/{} {made})",
            outcome.written, outcome.total
        ),
        Recovered::FullyRolledBack => println!(
            "pid {pid}: interrupted {interrupted} of {patch_id} undone: fully rolled back ({}/{} {made})",
            outcome.written, outcome.total
        ),
        Recovered::Consistent => println!(
            "pid {pid}: consistent, no interrupted transaction ({active} active patch{})",
            if active == 1 { "" } else { "es" }
        ),
    }
    if let Some(line) = outcome.repairs.describe() {
        println!("  repaired: {line}");
    }
    Ok(Exit::Ok.code())
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
