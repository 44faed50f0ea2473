//! `shadowpatch apply`, `rollback` and `recover`.

use super::analyze::{print_report, refusal, run_analysis, AnalysisArgs};
use super::Context;
use crate::output::print_json;
use anyhow::Context as _;
use shadowpatch_patch::journal::TxnKind;
use shadowpatch_patch::{apply, recover, rollback, ApplyOptions, Recovered};
use shadowpatch_predict::Verdict;
use std::path::Path;

/// `apply`: the prediction engine first (static analysis + system
/// context), refusing what it refuses unless `force`; then the patch.
pub fn run_apply(
    context: &Context,
    pid: i32,
    manifest: &Path,
    attempts: u32,
    force: bool,
    analysis_args: &AnalysisArgs,
    watch: Option<&super::apply_watch::WatchArgs>,
) -> anyhow::Result<i32> {
    let (analyzed, analysis_us) = run_analysis(context, pid, manifest, analysis_args, "apply")?;
    let analysis = &analyzed.analysis;
    if analysis.verdict == Verdict::Refuse && !force {
        let (message, code) = refusal(analysis);
        if context.json {
            print_json(&serde_json::json!({ "error": message, "exit_code": code, "analysis": analysis }));
        } else {
            print_report(&analyzed, analysis_us);
        }
        eprintln!("shadowpatch: error: {message}");
        return Ok(code);
    }
    if !context.json && (analysis.verdict != Verdict::Proceed || force) {
        print_report(&analyzed, analysis_us);
    }
    let options = ApplyOptions {
        max_attempts: attempts,
        ..ApplyOptions::default()
    };
    // The mirrored variables as they are just before activation, kept for
    // `rollback --restore-state` once the patch is active.
    let before = super::variables::before_apply(context, pid)?;
    if let Some(watch) = watch {
        let watched = WatchedApply {
            options: &options,
            watch,
            analysis,
            analysis_us,
            force,
        };
        return run_apply_watched(context, pid, manifest, watched, before);
    }
    let outcome = apply(&context.state_dir, pid, manifest, &options)?;
    let state_saved = match before {
        Some(taken) => super::variables::after_apply(context, pid, &outcome.patch_id, taken)?,
        None => Vec::new(),
    };
    if context.json {
        let mut value = serde_json::to_value(&outcome)?;
        value["state_snapshot"] = serde_json::to_value(&state_saved)?;
        value["analysis"] = serde_json::to_value(analysis)?;
        value["analysis_us"] = analysis_us.into();
        value["forced"] = (force && analysis.verdict == Verdict::Refuse).into();
        print_json(&value);
        return Ok(0);
    }
    println!(
        "applied {} to pid {}: generation {}, {} function{}, pause {} µs ({} thread{}, {} attempt{}), total {:.1} ms",
        outcome.patch_id,
        outcome.pid,
        outcome.generation,
        outcome.functions.len(),
        plural(outcome.functions.len()),
        outcome.pause_us,
        outcome.activation.pause.threads,
        plural(outcome.activation.pause.threads),
        outcome.activation.attempts,
        plural(outcome.activation.attempts as usize),
        outcome.total_us as f64 / 1000.0
    );
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
    Ok(0)
}

/// What `apply --watch` carries from the analysis into the watched apply.
struct WatchedApply<'a> {
    options: &'a ApplyOptions,
    watch: &'a super::apply_watch::WatchArgs,
    analysis: &'a shadowpatch_predict::Analysis,
    analysis_us: u64,
    force: bool,
}

fn run_apply_watched(
    context: &Context,
    pid: i32,
    manifest: &Path,
    watched: WatchedApply,
    before: Option<Vec<(shadowpatch_mirror::CriticalVariable, shadowpatch_mirror::Snapshot)>>,
) -> anyhow::Result<i32> {
    let WatchedApply {
        options,
        watch,
        analysis,
        analysis_us,
        force,
    } = watched;
    let (outcome, report) = super::apply_watch::apply_and_watch(&context.state_dir, pid, manifest, options, watch)?;
    // Kept: the pre-activation variables become restorable like any apply's.
    if let (Some(taken), shadowpatch_health::Decision::Keep) = (before, report.decision) {
        super::variables::after_apply(context, pid, &outcome.patch_id, taken)?;
    }
    for warning in &report.warnings {
        eprintln!("shadowpatch: warning: {warning}");
    }
    let code = match report.decision {
        shadowpatch_health::Decision::Keep => 0,
        shadowpatch_health::Decision::Rollback => super::apply_watch::ROLLED_BACK,
    };
    if context.json {
        let mut value = serde_json::to_value(&outcome)?;
        value["analysis"] = serde_json::to_value(analysis)?;
        value["analysis_us"] = analysis_us.into();
        value["forced"] = (force && analysis.verdict == Verdict::Refuse).into();
        value["watch"] = serde_json::to_value(&report)?;
        print_json(&value);
        return Ok(code);
    }
    println!(
        "applied {} to pid {} (through watch stubs), pause {} µs; watched {:.1} s",
        outcome.patch_id,
        pid,
        outcome.pause_us,
        report.watched_ms as f64 / 1000.0
    );
    match report.decision {
        shadowpatch_health::Decision::Keep => println!(
            "  kept: {}; trampolines re-pointed straight at the new code ({} µs stop)",
            if report.reason.is_empty() {
                "no regression"
            } else {
                &report.reason
            },
            report.keep_pause_us.unwrap_or(0)
        ),
        shadowpatch_health::Decision::Rollback => {
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
    Ok(code)
}

pub fn run_rollback(context: &Context, pid: i32, patch_id: Option<&str>, restore_state: bool) -> anyhow::Result<i32> {
    // Checked before the rollback: a missing snapshot leaves the target as it is.
    let pre = if restore_state {
        Some(super::variables::restorable(context, pid, patch_id)?)
    } else {
        None
    };
    let outcome = rollback(&context.state_dir, pid, patch_id)?;
    // Right after the rollback's stop, in its own journaled transaction.
    let restored = match &pre {
        Some(pre) => Some(
            super::variables::restore(context, pid, pre, shadowpatch_patch::activate::DEFAULT_ATTEMPTS)
                .context("rolled back, but restoring the state before the patch failed")?,
        ),
        None => None,
    };
    if context.json {
        let mut value = serde_json::to_value(&outcome)?;
        if let Some(restored) = &restored {
            value["restored_state"] = serde_json::to_value(restored)?;
        }
        print_json(&value);
        return Ok(0);
    }
    println!(
        "rolled back {} in pid {}: generation {} active, {} function{} restored, pause {} µs",
        outcome.patch_id,
        outcome.pid,
        outcome.generation,
        outcome.functions.len(),
        plural(outcome.functions.len()),
        outcome.pause_us
    );
    match &outcome.retired_reason {
        None => println!(
            "  patch memory unmapped (in a separate {} µs stop)",
            outcome.unmap_pause_us
        ),
        Some(reason) => println!("  patch memory left mapped: {reason}"),
    }
    if let Some(restored) = &restored {
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
    Ok(0)
}

pub fn run_recover(context: &Context, pid: i32) -> anyhow::Result<i32> {
    let outcome = recover(&context.state_dir, pid)?;
    if context.json {
        print_json(&outcome);
        return Ok(0);
    }
    match outcome.state {
        Recovered::Consistent => println!(
            "pid {pid}: consistent, no interrupted transaction ({} active patch{})",
            outcome.active_patches.len(),
            if outcome.active_patches.len() == 1 { "" } else { "es" }
        ),
        Recovered::FullyApplied => println!(
            "pid {pid}: interrupted {} of {} completed: fully applied ({}/{} writes had been made)",
            kind_name(outcome.interrupted),
            outcome.patch_id.as_deref().unwrap_or("?"),
            outcome.written,
            outcome.total
        ),
        Recovered::FullyRolledBack => println!(
            "pid {pid}: interrupted {} of {} undone: fully rolled back ({}/{} writes had been made)",
            kind_name(outcome.interrupted),
            outcome.patch_id.as_deref().unwrap_or("?"),
            outcome.written,
            outcome.total
        ),
    }
    Ok(0)
}

fn kind_name(kind: Option<TxnKind>) -> &'static str {
    match kind {
        Some(TxnKind::Apply) | None => "apply",
        Some(TxnKind::Rollback) => "rollback",
        Some(TxnKind::Heal) => "heal",
        Some(TxnKind::Probe) => "probe",
        Some(TxnKind::Repoint) => "repoint",
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
