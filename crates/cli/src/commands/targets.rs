//! `shadowpatch list` and `shadowpatch gc`: the targets with state, and the
//! removal of dead targets' state (the operations are
//! `shadowpatch_ops::list` and `shadowpatch_ops::gc`).

use super::Context;
use crate::output::{human_bytes, print_json};
use shadowpatch_ops::{Liveness, TargetEntry};

pub fn run_list(context: &Context) -> anyhow::Result<i32> {
    let listed = shadowpatch_ops::list(&context.state_dir)?;
    if context.json {
        print_json(&listed);
        return Ok(0);
    }
    if listed.targets.is_empty() {
        println!("no targets with state in {}", listed.state_dir.display());
        return Ok(0);
    }
    println!(
        "{:>7}  {:>10}  {:<7} {:<16} {:<11} {:<20} {:>9}  notes",
        "PID", "START", "STATE", "PROGRAM", "GENERATIONS", "ACTIVE PATCHES", "SIZE"
    );
    for target in &listed.targets {
        println!("{}", row(target));
    }
    let dead = listed.targets.iter().filter(|t| t.liveness != Liveness::Alive).count();
    let dead_bytes: u64 = listed
        .targets
        .iter()
        .filter(|t| t.liveness != Liveness::Alive)
        .map(|t| t.bytes)
        .sum();
    println!(
        "{} target{}, {} alive; {} not alive holding {} (`shadowpatch gc` removes them)",
        listed.targets.len(),
        if listed.targets.len() == 1 { "" } else { "s" },
        listed.targets.len() - dead,
        dead,
        human_bytes(dead_bytes)
    );
    Ok(0)
}

fn row(target: &TargetEntry) -> String {
    let program = target
        .comm
        .clone()
        .or_else(|| {
            target
                .exe
                .as_ref()
                .and_then(|e| e.file_name())
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "-".into());
    let generations = match (target.generations.first(), target.generations.last()) {
        (Some(first), Some(last)) if first == last => format!("{first}"),
        (Some(first), Some(last)) => format!("{first}..{last} ({})", target.generations.len()),
        _ => "-".into(),
    };
    let active = if target.active_patches.is_empty() {
        "-".to_string()
    } else {
        target.active_patches.join(",")
    };
    let mut notes = Vec::new();
    if target.watch_window {
        notes.push("watch window open".to_string());
    }
    if target.watched {
        notes.push("watched by the agent".to_string());
    }
    if let Some(txn) = &target.interrupted {
        notes.push(format!("interrupted: {txn}"));
    }
    if let Some(error) = &target.journal_error {
        notes.push(format!("journal unreadable: {error}"));
    }
    if target.dir.to_string_lossy().contains(".exec-") {
        notes.push("set aside after exec".to_string());
    }
    format!(
        "{:>7}  {:>10}  {:<7} {:<16} {:<11} {:<20} {:>9}  {}",
        target.pid,
        target.start_time,
        target.liveness.as_str(),
        program,
        generations,
        active,
        human_bytes(target.bytes),
        notes.join("; ")
    )
    .trim_end()
    .to_string()
}

pub fn run_gc(context: &Context, dry_run: bool, interrupted: bool) -> anyhow::Result<i32> {
    let request = shadowpatch_ops::GcRequest { dry_run, interrupted };
    let outcome = shadowpatch_ops::gc(&context.state_dir, &request)?;
    if context.json {
        print_json(&outcome);
    } else {
        let verb = if dry_run { "would remove" } else { "removed" };
        for target in &outcome.removed {
            let mut what = format!(
                "{verb} {} ({}, pid {}, generations {:?}, active patches [{}], {})",
                target.dir.display(),
                target.liveness.as_str(),
                target.pid,
                target.generations,
                target.active_patches.join(", "),
                human_bytes(target.bytes)
            );
            if let Some(txn) = &target.interrupted {
                what.push_str(&format!(
                    "; its transaction {txn} was interrupted and the process is gone"
                ));
            }
            println!("{what}");
        }
        for refused in &outcome.refused {
            println!(
                "kept {} (pid {}): {}",
                refused.target.dir.display(),
                refused.target.pid,
                refused.reason
            );
        }
        for failure in &outcome.failed {
            println!("not removed: {failure}");
        }
        println!(
            "{} {} target{}, {} {}; kept {} live target{}{}{}",
            verb,
            outcome.removed.len(),
            if outcome.removed.len() == 1 { "" } else { "s" },
            human_bytes(outcome.bytes_freed),
            if dry_run { "would be freed" } else { "freed" },
            outcome.kept,
            if outcome.kept == 1 { "" } else { "s" },
            if outcome.refused.is_empty() {
                String::new()
            } else {
                format!(
                    " and {} dead one{} for safety",
                    outcome.refused.len(),
                    if outcome.refused.len() == 1 { "" } else { "s" }
                )
            },
            if dry_run {
                " (dry run: nothing removed)"
            } else {
                "; history kept"
            }
        );
    }
    // A directory that could not be removed: the collection stopped midway;
    // one kept for safety: refused (the others are collected either way).
    Ok(if !outcome.failed.is_empty() {
        crate::failure::Exit::FailedMidway.code()
    } else if !outcome.refused.is_empty() {
        crate::failure::Exit::Refused.code()
    } else {
        0
    })
}
