//! `shadowpatch apply`, `rollback` and `recover`: through a running agent
//! when one serves this state directory, else directly. Both paths print
//! from the same JSON outcome.

use super::analyze::{print_report, refusal, run_analysis, AnalysisArgs};
use super::Context;
use crate::output::print_json;
use anyhow::Context as _;
use shadowpatch_agent::ControlRequest;
use shadowpatch_patch::{apply, recover, rollback, ApplyOptions};
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
        // The watch window needs the target seized from activation on: this
        // process does it, never the agent.
        let watched = WatchedApply {
            options: &options,
            watch,
            analysis,
            analysis_us,
            force,
        };
        return run_apply_watched(context, pid, manifest, watched, before);
    }
    let request = ControlRequest::Apply {
        state_dir: context.state_dir.clone(),
        pid,
        // The agent's working directory is not ours.
        manifest: std::path::absolute(manifest)?,
        attempts,
    };
    let (outcome, by_agent) = match context.through_agent(&request)? {
        Some(outcome) => (outcome, true),
        None => (
            serde_json::to_value(apply(&context.state_dir, pid, manifest, &options)?)?,
            false,
        ),
    };
    let state_saved = match before {
        Some(taken) => super::variables::after_apply(context, pid, text(&outcome["patch_id"]), taken)?,
        None => Vec::new(),
    };
    // The agent's policy may have watched the patch and rolled it back.
    let rolled_back_by_watch = outcome["watch"]["decision"] == "rollback";
    let code = if rolled_back_by_watch {
        super::apply_watch::ROLLED_BACK
    } else {
        0
    };
    if context.json {
        let mut value = outcome;
        value["state_snapshot"] = serde_json::to_value(&state_saved)?;
        value["analysis"] = serde_json::to_value(analysis)?;
        value["analysis_us"] = analysis_us.into();
        value["forced"] = (force && analysis.verdict == Verdict::Refuse).into();
        print_json(&value);
        return Ok(code);
    }
    let functions = outcome["functions"].as_array().cloned().unwrap_or_default();
    let threads = number(&outcome["activation"]["pause"]["threads"]);
    let attempts = number(&outcome["activation"]["attempts"]);
    println!(
        "applied {} to pid {}: generation {}, {} function{}, pause {} µs ({} thread{}, {} attempt{}), total {:.1} ms{}",
        text(&outcome["patch_id"]),
        outcome["pid"],
        outcome["generation"],
        functions.len(),
        plural(functions.len()),
        outcome["pause_us"],
        threads,
        plural(threads as usize),
        attempts,
        plural(attempts as usize),
        number(&outcome["total_us"]) as f64 / 1000.0,
        via_agent(by_agent)
    );
    for f in &functions {
        let via = match f["preserved"].as_str() {
            None => "direct jump".to_string(),
            Some(registers) => format!("via a thunk preserving {registers}"),
        };
        println!(
            "  {} ({:#x}) → {} ({:#x}), {via}",
            text(&f["symbol"]),
            number(&f["entry"]),
            text(&f["with"]),
            number(&f["new_address"])
        );
    }
    println!(
        "  loaded at {:#x} ({} bytes) in a {} µs stop",
        number(&outcome["mapping_address"]),
        outcome["mapping_len"],
        outcome["load_pause_us"]
    );
    if let Some(watch) = outcome.get("watch").filter(|w| !w.is_null()) {
        println!(
            "  watched by the agent for {:.1} s: {} ({}){}",
            number(&watch["watched_ms"]) as f64 / 1000.0,
            text(&watch["decision"]),
            text(&watch["cause"]),
            watch["reason"]
                .as_str()
                .filter(|r| !r.is_empty())
                .map_or(String::new(), |r| format!(": {r}"))
        );
    }
    Ok(code)
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
    if !report.calls.is_empty() {
        println!(
            "  calls through the watch stubs: {}{}",
            shadowpatch_agent::health_watch::describe_calls(&report.calls),
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

fn number(value: &serde_json::Value) -> u64 {
    value.as_u64().unwrap_or(0)
}

fn text(value: &serde_json::Value) -> &str {
    value.as_str().unwrap_or("?")
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
    // Checked before the rollback: a missing snapshot leaves the target as it is.
    let pre = if restore_state {
        Some(super::variables::restorable(context, pid, patch_id)?)
    } else {
        None
    };
    let request = ControlRequest::Rollback {
        state_dir: context.state_dir.clone(),
        pid,
        patch_id: patch_id.map(str::to_string),
    };
    // A state restore follows the rollback in this process, so it acts directly.
    let through_agent = if pre.is_none() {
        context.through_agent(&request)?
    } else {
        None
    };
    let (outcome, by_agent) = match through_agent {
        Some(outcome) => (outcome, true),
        None => (
            serde_json::to_value(rollback(&context.state_dir, pid, patch_id)?)?,
            false,
        ),
    };
    // Right after the rollback's stop, in its own journaled transaction.
    let restored = match &pre {
        Some(pre) => Some(
            super::variables::restore(context, pid, pre, shadowpatch_patch::activate::DEFAULT_ATTEMPTS)
                .context("rolled back, but restoring the state before the patch failed")?,
        ),
        None => None,
    };
    if context.json {
        let mut value = outcome;
        if let Some(restored) = &restored {
            value["restored_state"] = serde_json::to_value(restored)?;
        }
        print_json(&value);
        return Ok(0);
    }
    let functions = outcome["functions"].as_array().map_or(0, Vec::len);
    println!(
        "rolled back {} in pid {}: generation {} active, {} function{} restored, pause {} µs{}",
        text(&outcome["patch_id"]),
        outcome["pid"],
        outcome["generation"],
        functions,
        plural(functions),
        outcome["pause_us"],
        via_agent(by_agent)
    );
    match outcome["retired_reason"].as_str() {
        None => println!(
            "  patch memory unmapped (in a separate {} µs stop)",
            outcome["unmap_pause_us"]
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
    let request = ControlRequest::Recover {
        state_dir: context.state_dir.clone(),
        pid,
    };
    let outcome = match context.through_agent(&request)? {
        Some(outcome) => outcome,
        None => serde_json::to_value(recover(&context.state_dir, pid)?)?,
    };
    if context.json {
        print_json(&outcome);
        return Ok(0);
    }
    let active = outcome["active_patches"].as_array().map_or(0, Vec::len);
    let interrupted = outcome["interrupted"].as_str().unwrap_or("apply");
    let patch_id = outcome["patch_id"].as_str().unwrap_or("?");
    match outcome["state"].as_str() {
        Some("fully_applied") => println!(
            "pid {pid}: interrupted {interrupted} of {patch_id} completed: fully applied ({}/{} writes had been made)",
            outcome["written"], outcome["total"]
        ),
        Some("fully_rolled_back") => println!(
            "pid {pid}: interrupted {interrupted} of {patch_id} undone: fully rolled back ({}/{} writes had been made)",
            outcome["written"], outcome["total"]
        ),
        _ => println!(
            "pid {pid}: consistent, no interrupted transaction ({active} active patch{})",
            if active == 1 { "" } else { "es" }
        ),
    }
    Ok(0)
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}
