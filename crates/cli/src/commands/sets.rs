//! Target sets on the command line: `--tree` (PID and its descendants),
//! `--cgroup PATH`, `--unit NAME` and `--all` (every process on the host
//! that maps the manifest's module; for the others, every process with
//! state) for `apply`, `rollback`, `verify` and `status`. The set operations are `shadowpatch_ops::set`'s; this module
//! parses the positionals a set changes and renders the per-member report.
//!
//! A set acts directly through the operations layer (a running agent sees
//! each member's transaction in its journal like any other).

use super::analyze::AnalysisArgs;
use super::Context;
use crate::failure::{BadInput, Exit};
use crate::output::print_json;
use shadowpatch_ops::set::{
    apply_set_with_progress, resolve, rollback_set_with_progress, with_state, Selector, SetOutcome, SetProgress,
};
use shadowpatch_ops::ApplyRequest;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

/// The set options shared by the commands that take them.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct SetFlags {
    /// Act on PID and all its descendants (e.g. a server's master and its workers).
    #[arg(long)]
    pub tree: bool,
    /// Act on every process of this cgroup (relative to a mounted cgroup hierarchy, or absolute) and its sub-cgroups; no PID is given.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["tree", "unit"])]
    pub cgroup: Option<PathBuf>,
    /// Act on every process of this systemd unit's cgroup (NAME or NAME.service); no PID is given.
    #[arg(long, value_name = "NAME", conflicts_with = "tree")]
    pub unit: Option<String>,
    /// Act on every process on the host: for apply, those that map the manifest's module (by build-id); for the others, those with state here. No PID is given.
    #[arg(long, conflicts_with_all = ["tree", "cgroup", "unit"])]
    pub all: bool,
    /// With --all: processes patched (or rolled back) at once, each its own transaction (default: 32 per CPU, 8 to 64: members mostly wait on the syncs they share and on their targets).
    #[arg(long, value_name = "N", requires = "all", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub jobs: Option<u32>,
}

impl SetFlags {
    /// The set of a command whose only positional is an optional PID
    /// (`verify`, `status`): a PID beside `--cgroup`, `--unit` or `--all`
    /// is bad input, not silently ignored.
    pub fn selector_without_pid(&self, command: &str, pid: Option<i32>) -> Result<Option<Selector>, BadInput> {
        match pid {
            Some(pid) if self.names_processes() => Err(BadInput(format!(
                "unexpected argument '{pid}': {command} with --cgroup, --unit or --all takes no PID"
            ))),
            _ => Ok(self.selector(pid)),
        }
    }

    /// Whether the set replaces the PID positional.
    fn names_processes(&self) -> bool {
        self.cgroup.is_some() || self.unit.is_some() || self.all
    }

    /// The set asked for, if any (`pid`: the PID positional, if given).
    pub fn selector(&self, pid: Option<i32>) -> Option<Selector> {
        if let Some(path) = &self.cgroup {
            Some(Selector::Cgroup(path.clone()))
        } else if let Some(name) = &self.unit {
            Some(Selector::Unit(name.clone()))
        } else if self.all {
            Some(Selector::All)
        } else if self.tree {
            pid.map(Selector::Tree)
        } else {
            None
        }
    }
}

/// Split `command`'s positionals: `PID REST` without `--cgroup`/`--unit`,
/// `REST` with one. `rest` names the second positional (for errors);
/// `rest_required` says whether it must be there.
pub fn positionals(
    command: &str,
    values: &[String],
    set: &SetFlags,
    rest: &str,
    rest_required: bool,
) -> Result<(Option<i32>, Option<String>), BadInput> {
    let usage = if rest_required {
        format!(
            "{command} <PID> {rest}, or --cgroup PATH / --unit NAME / --all and {rest}; see shadowpatch {command} --help"
        )
    } else {
        format!(
            "{command} <PID> [{rest}], or --cgroup PATH / --unit NAME / --all and [{rest}]; see shadowpatch {command} --help"
        )
    };
    let (pid, remainder) = if set.names_processes() {
        (None, values)
    } else {
        let Some(first) = values.first() else {
            return Err(BadInput(format!(
                "the following required arguments were not provided: <PID> (usage: {usage})"
            )));
        };
        let pid = first
            .parse::<i32>()
            .ok()
            .filter(|pid| *pid > 0)
            .ok_or_else(|| BadInput(format!("invalid value '{first}' for '<PID>': not a process id")))?;
        (Some(pid), &values[1..])
    };
    match remainder {
        [] if rest_required => Err(BadInput(format!(
            "the following required arguments were not provided: {rest} (usage: {usage})"
        ))),
        [] => Ok((pid, None)),
        [one] => Ok((pid, Some(one.clone()))),
        [_, extra, ..] => Err(BadInput(format!("unexpected argument '{extra}' (usage: {usage})"))),
    }
}

/// `apply` over a set.
#[allow(clippy::too_many_arguments)]
pub fn run_apply(
    context: &Context,
    selector: &Selector,
    manifest: &Path,
    attempts: u32,
    force: bool,
    analysis: &AnalysisArgs,
    partial: bool,
    jobs: Option<u32>,
) -> anyhow::Result<i32> {
    let template = ApplyRequest {
        pid: 0,
        manifest: std::path::absolute(manifest)?,
        attempts,
        force,
        analysis: match selector {
            Selector::All => analysis.settings_with_context_default(0.0),
            _ => analysis.settings(),
        },
        requested_by: "cli (set)".into(),
        baseline_module_only: false,
        no_ancestor_state: false,
    };
    let state_dir = context.state_dir.clone();
    let bar = std::sync::Mutex::new(ProgressBar::new(context));
    // Host-wide, members are worked on in parallel (each process its own
    // transaction); the other sets one at a time, children first.
    let workers = match selector {
        Selector::All => jobs.map_or_else(shadowpatch_ops::set::default_workers, |jobs| jobs as usize),
        _ => 1,
    };
    let outcome = apply_set_with_progress(
        Some(&context.state_dir),
        selector,
        &template,
        partial,
        workers,
        &|request| shadowpatch_ops::apply(&state_dir, request, None, None),
        &|request| shadowpatch_ops::rollback(&state_dir, request),
        &|progress| bar.lock().unwrap_or_else(|p| p.into_inner()).update(progress),
    );
    bar.into_inner().unwrap_or_else(|p| p.into_inner()).finish();
    Ok(render(context, &outcome?))
}

/// The bar of a long set operation (drawn only on a terminal, after a
/// moment, never with --json).
struct ProgressBar {
    bar: Option<crate::progress::Progress>,
}

impl ProgressBar {
    fn new(context: &Context) -> Self {
        let enabled = !context.json && std::io::stderr().is_terminal();
        ProgressBar {
            bar: enabled.then(|| crate::progress::Progress::count("processes", true)),
        }
    }

    fn update(&mut self, progress: SetProgress<'_>) {
        if let Some(bar) = self.bar.as_mut() {
            bar.note(&format!("{} pid {}", progress.phase, progress.pid));
            bar.update(progress.done as u64, progress.total as u64);
        }
    }

    fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish();
        }
    }
}

/// `rollback` over a set: host-wide, members in parallel as for apply.
pub fn run_rollback(
    context: &Context,
    selector: &Selector,
    patch_id: Option<&str>,
    jobs: Option<u32>,
) -> anyhow::Result<i32> {
    let state_dir = context.state_dir.clone();
    let bar = std::sync::Mutex::new(ProgressBar::new(context));
    let workers = match selector {
        Selector::All => jobs.map_or_else(shadowpatch_ops::set::default_workers, |jobs| jobs as usize),
        _ => 1,
    };
    let outcome = rollback_set_with_progress(
        &context.state_dir,
        selector,
        patch_id,
        workers,
        &|request| shadowpatch_ops::rollback(&state_dir, request),
        &|progress| bar.lock().unwrap_or_else(|p| p.into_inner()).update(progress),
    );
    bar.into_inner().unwrap_or_else(|p| p.into_inner()).finish();
    Ok(render(context, &outcome?))
}

/// A read-only command (`verify`, `status`) for each member: each
/// member's own report, the worst exit code.
pub fn for_each_member(
    context: &Context,
    selector: &Selector,
    run: impl FnMut(i32) -> anyhow::Result<i32>,
) -> anyhow::Result<i32> {
    let mut members = resolve(selector)?;
    if *selector == Selector::All {
        // Host-wide, the processes with state here (the others have no
        // mirror to verify nor patches to show).
        members = with_state(&context.state_dir, members).0;
        if members.is_empty() {
            return Err(BadInput(format!("no live process has state in {}", context.state_dir.display())).into());
        }
    }
    each(context, members, run)
}

fn each(
    context: &Context,
    members: Vec<shadowpatch_ops::set::Member>,
    mut run: impl FnMut(i32) -> anyhow::Result<i32>,
) -> anyhow::Result<i32> {
    let mut worst = 0;
    for member in members {
        if !context.json {
            println!("== pid {} ({})", member.pid, member.comm);
        }
        let code = match run(member.pid) {
            Ok(code) => code,
            Err(error) => {
                eprintln!(
                    "shadowpatch: error: pid {}: {}",
                    member.pid,
                    crate::failure::one_line(&error)
                );
                crate::failure::exit_code(&error)
            }
        };
        worst = worst.max(code);
    }
    Ok(worst)
}

/// Run `run` on each member of `selector` that maps the module of
/// `manifest` (by build-id), as `for_each_member` does; the others are
/// named as skipped.
pub fn for_each_target(
    context: &Context,
    selector: &Selector,
    manifest: &std::path::Path,
    run: impl FnMut(i32) -> anyhow::Result<i32>,
) -> anyhow::Result<i32> {
    let (parsed, _) = shadowpatch_patch::manifest::Manifest::load(manifest)?;
    let members = shadowpatch_ops::set::members(selector, &parsed.build_id_lowercase())?;
    if !context.json {
        for (member, reason) in &members.skipped {
            println!("-- pid {} ({}) skipped: {reason}", member.pid, member.comm);
        }
    }
    each(context, members.targets, run)
}

fn render(context: &Context, outcome: &SetOutcome) -> i32 {
    let code = outcome.failure.map_or(Exit::Ok, Exit::of_class).code();
    if context.json {
        print_json(outcome);
        return code;
    }
    // A member found to have the patch already (forked from a patched
    // process) is where the apply would have left it: done.
    let done = outcome
        .members
        .iter()
        .filter(|m| matches!(m.outcome.as_str(), "applied" | "rolled_back" | "already_active"))
        .count();
    println!(
        "{} on {}: {done} of {} process{} done",
        outcome.operation,
        outcome.selector,
        outcome.members.len(),
        if outcome.members.len() == 1 { "" } else { "es" }
    );
    for member in &outcome.members {
        let pause = member.pause_us.map(|us| format!(" pause {us} µs")).unwrap_or_default();
        let error = member.error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
        println!(
            "  pid {:<7} {:<15} {}{pause}{error}",
            member.pid, member.comm, member.outcome
        );
    }
    for (member, reason) in &outcome.skipped {
        println!("  pid {:<7} {:<15} skipped: {reason}", member.pid, member.comm);
    }
    for (reason, count) in &outcome.passed_over {
        if *count > 0 {
            println!(
                "  {count} other process{} {reason}",
                if *count == 1 { "" } else { "es" }
            );
        }
    }
    if outcome.members.len() > 1 {
        println!("{}", summary(outcome));
    }
    for member in &outcome.appeared {
        eprintln!(
            "shadowpatch: warning: pid {} ({}) joined the set during the {} and was not covered",
            member.pid, member.comm, outcome.operation
        );
    }
    if let Some(failure) = outcome.failure {
        let undone = outcome.members.iter().any(|m| m.outcome == "undone");
        eprintln!(
            "shadowpatch: error: the {} failed on a member ({failure:?}){}",
            outcome.operation,
            if undone {
                "; the members already done were rolled back (all or none)"
            } else if outcome.partial && outcome.operation == "apply" {
                "; --partial: the members already done keep the patch"
            } else {
                ""
            }
        );
    }
    code
}

/// One line: how many of each outcome, and the pauses (median, worst).
fn summary(outcome: &SetOutcome) -> String {
    let mut counts: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for member in &outcome.members {
        *counts.entry(member.outcome.as_str()).or_insert(0) += 1;
    }
    let mut pauses: Vec<u64> = outcome.members.iter().filter_map(|m| m.pause_us).collect();
    pauses.sort_unstable();
    let counted = counts
        .iter()
        .map(|(outcome, n)| format!("{n} {outcome}"))
        .collect::<Vec<_>>()
        .join(", ");
    match (pauses.get(pauses.len() / 2), pauses.last()) {
        (Some(median), Some(worst)) => {
            format!("summary: {counted}; pause per process median {median} µs, worst {worst} µs")
        }
        _ => format!("summary: {counted}"),
    }
}
