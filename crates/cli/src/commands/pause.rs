//! `shadowpatch pause PID`: stop and resume every thread, report the pause.

use super::Context;
use crate::output::print_json;
use serde::Serialize;
use shadowpatch_process::attach::StopPriority;
use shadowpatch_process::{Attached, ProcessIdentity};
use shadowpatch_report::Percentiles;

#[derive(Debug, Serialize)]
pub struct PauseSummary {
    pub threads: usize,
    pub rounds: usize,
    pub realtime: bool,
    pub stop_us: Percentiles,
    pub resume_us: Percentiles,
    pub pause_us: Percentiles,
}

/// Stop and resume `attached` `rounds` times and summarise the pauses.
pub fn measure(attached: &mut Attached, rounds: u32) -> anyhow::Result<PauseSummary> {
    let reports = attached.stop_resume_rounds(rounds)?;
    Ok(PauseSummary {
        threads: reports.last().map_or(0, |r| r.threads),
        rounds: reports.len(),
        realtime: reports.iter().all(|r| r.realtime),
        stop_us: Percentiles::of(reports.iter().map(|r| r.stop_us).collect()),
        resume_us: Percentiles::of(reports.iter().map(|r| r.resume_us).collect()),
        pause_us: Percentiles::of(reports.iter().map(|r| r.pause_us).collect()),
    })
}

pub fn run(context: &Context, pid: i32, rounds: u32, normal_priority: bool) -> anyhow::Result<i32> {
    let identity = ProcessIdentity::of(pid)?;
    let mut attached = Attached::seize(&identity)?;
    if normal_priority {
        attached.set_priority(StopPriority::Normal);
    }
    let summary = measure(&mut attached, rounds.max(1))?;
    attached.detach()?;
    if context.json {
        print_json(&summary);
        return Ok(0);
    }
    println!(
        "pid {pid}: {} threads, {} rounds, tracer at {}",
        summary.threads,
        summary.rounds,
        if summary.realtime {
            "SCHED_FIFO"
        } else {
            "normal priority"
        }
    );
    for (name, p) in [
        ("stop", summary.stop_us),
        ("resume", summary.resume_us),
        ("pause", summary.pause_us),
    ] {
        println!(
            "  {name:<7} min {:>6} µs  median {:>6} µs  p99 {:>6} µs  max {:>6} µs",
            p.min, p.median, p.p99, p.max
        );
    }
    Ok(0)
}
