//! `shadowpatch apply`, `rollback` and `recover`: through a running agent
//! when one serves this state directory, else directly. Both paths print
//! from the same JSON outcome.

use super::analyze::{print_report, refusal, run_analysis, AnalysisArgs};
use super::Context;
use crate::output::print_json;
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
            serde_json::to_value(apply(
                &context.state_dir,
                pid,
                manifest,
                &ApplyOptions { max_attempts: attempts },
            )?)?,
            false,
        ),
    };
    if context.json {
        let mut value = outcome;
        value["analysis"] = serde_json::to_value(analysis)?;
        value["analysis_us"] = analysis_us.into();
        value["forced"] = (force && analysis.verdict == Verdict::Refuse).into();
        print_json(&value);
        return Ok(0);
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
    Ok(0)
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

pub fn run_rollback(context: &Context, pid: i32, patch_id: Option<&str>) -> anyhow::Result<i32> {
    let request = ControlRequest::Rollback {
        state_dir: context.state_dir.clone(),
        pid,
        patch_id: patch_id.map(str::to_string),
    };
    let (outcome, by_agent) = match context.through_agent(&request)? {
        Some(outcome) => (outcome, true),
        None => (
            serde_json::to_value(rollback(&context.state_dir, pid, patch_id)?)?,
            false,
        ),
    };
    if context.json {
        print_json(&outcome);
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
