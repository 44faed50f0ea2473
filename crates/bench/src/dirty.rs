//! The dirty-tracking section of `shadowpatch bench`: the cost of one data
//! mirroring cycle (find the dirty pages + copy them) at 1 % of pages dirty,
//! for each available method, with the full sweep as the denominator; and
//! what tracking costs the target (its own time to write those pages,
//! untracked and under each method), all measured in one run, interleaved
//! block by block on the same fixture.

use crate::support::Context;
use crate::support::Percentiles;
use serde::Serialize;
use shadowpatch_fixtures::{Fixture, Running};
use shadowpatch_mirror::{detect, DataMirror, Detection, DirtyMethod, DirtyTracker, TrackedRange, PAGE_SIZE};
use shadowpatch_process::{Attached, ProcessIdentity};
use std::collections::BTreeSet;
use std::time::Instant;

/// Percentage of the region's pages the fixture writes per round.
const DIRTY_PERCENT: f64 = 1.0;

#[derive(Debug, Serialize)]
pub struct DirtyBenchReport {
    pub region_bytes: u64,
    pub pages_tracked: u64,
    pub dirty_percent: f64,
    /// Rounds per method (blocks × rounds per block).
    pub rounds: usize,
    pub detection: Detection,
    pub cycles: Vec<CycleRow>,
    pub target_cost: Vec<TargetCostRow>,
}

/// One method's mirroring cycle.
#[derive(Debug, Serialize)]
pub struct CycleRow {
    pub method: DirtyMethod,
    /// Collect + copy, µs.
    pub cycle_us: Percentiles,
    pub collect_us_median: u64,
    pub copy_us_median: u64,
    pub pages_copied_median: u64,
    /// Pages the fixture wrote that the method did not report (all rounds).
    pub missed_pages: u64,
    /// Pages reported that the fixture did not write (all rounds).
    pub extra_pages: u64,
    /// Full sweep's median cycle divided by this method's.
    pub sweep_over_method: f64,
    /// Setting the method up (for uffd: write-protecting every page).
    pub start_us_median: u64,
}

/// The fixture's own time to write one word into each chosen page.
#[derive(Debug, Serialize)]
pub struct TargetCostRow {
    /// None: no tracking at all.
    pub method: Option<DirtyMethod>,
    pub write_ns_median: u64,
    pub ns_per_page: f64,
    pub vs_untracked: f64,
}

#[derive(Debug, Default)]
struct Samples {
    cycle: Vec<u64>,
    collect: Vec<u64>,
    copy: Vec<u64>,
    copied: Vec<u64>,
    start: Vec<u64>,
    target_ns: Vec<u64>,
    missed: u64,
    extra: u64,
}

pub fn run(context: &Context, quick: bool) -> anyhow::Result<DirtyBenchReport> {
    let mib: u64 = if quick { 64 } else { 256 };
    let (blocks, rounds_per_block) = if quick { (2, 5) } else { (4, 10) };
    let detection = detect();
    let methods = detection.available();
    if !context.json {
        eprintln!("dirty tracking: {mib} MiB data region, methods {methods:?} ...");
    }
    let mut fixture = Running::start(Fixture::DirtyData, &[&mib.to_string()])?;
    let mut ranges: Vec<TrackedRange> = ["region", "data", "bss"]
        .iter()
        .map(|name| TrackedRange::covering(fixture.number(name), fixture.number(&format!("{name}_len"))))
        .collect();
    ranges.sort();
    // Populate every page once, so each round sees the steady state of a
    // program whose data is in use.
    fixture.command("dirty 100 0")?;
    let mut attached = Attached::seize(&ProcessIdentity::of(fixture.pid())?)?;
    // None first: the untracked baseline of the target's write time.
    let variants: Vec<Option<DirtyMethod>> = std::iter::once(None).chain(methods.iter().copied().map(Some)).collect();
    let mut samples: Vec<Samples> = variants.iter().map(|_| Samples::default()).collect();
    let mut seed = 1u64;
    for block in 0..blocks {
        if !context.json {
            eprintln!("dirty tracking block {}/{blocks} ...", block + 1);
        }
        // Rotate the order so no variant always runs after the same one.
        for offset in 0..variants.len() {
            let index = (block + offset) % variants.len();
            measure_block(
                &mut fixture,
                &mut attached,
                &ranges,
                variants[index],
                rounds_per_block,
                &mut seed,
                &mut samples[index],
            )?;
        }
    }
    attached.detach()?;
    anyhow::ensure!(
        fixture.check()?["errors"] == 0,
        "the fixture saw wrong values while benchmarking"
    );

    let median = |v: &Vec<u64>| Percentiles::of(v.clone()).median;
    let sweep_index = variants.iter().position(|v| *v == Some(DirtyMethod::FullSweep));
    let sweep_cycle = sweep_index.map_or(0, |i| median(&samples[i].cycle));
    let untracked_ns = median(&samples[0].target_ns);
    // The fixture writes this share of its region's pages, plus one page
    // of each of its two global tables.
    let region_pages = fixture.number("region_len") / PAGE_SIZE as u64;
    let pages_written = (region_pages as f64 * DIRTY_PERCENT / 100.0).round() + 2.0;
    let cycles = variants
        .iter()
        .zip(&samples)
        .filter_map(|(variant, s)| {
            let method = (*variant)?;
            let cycle = Percentiles::of(s.cycle.clone());
            Some(CycleRow {
                method,
                cycle_us: cycle,
                collect_us_median: median(&s.collect),
                copy_us_median: median(&s.copy),
                pages_copied_median: median(&s.copied),
                missed_pages: s.missed,
                extra_pages: s.extra,
                sweep_over_method: sweep_cycle as f64 / cycle.median.max(1) as f64,
                start_us_median: median(&s.start),
            })
        })
        .collect();
    let target_cost = variants
        .iter()
        .zip(&samples)
        .map(|(variant, s)| {
            let ns = median(&s.target_ns);
            TargetCostRow {
                method: *variant,
                write_ns_median: ns,
                ns_per_page: ns as f64 / pages_written,
                vs_untracked: ns as f64 / untracked_ns.max(1) as f64,
            }
        })
        .collect();
    Ok(DirtyBenchReport {
        region_bytes: mib << 20,
        pages_tracked: ranges.iter().map(|r| r.pages() as u64).sum(),
        dirty_percent: DIRTY_PERCENT,
        rounds: blocks * rounds_per_block,
        detection,
        cycles,
        target_cost,
    })
}

/// One block of rounds under `variant`: start the tracker (timed) and
/// capture, then per round let the fixture dirty 1 % of its pages (it
/// times its writes) and run one mirroring cycle, checking the reported
/// pages against the ones the fixture lists; stop the tracker.
fn measure_block(
    fixture: &mut Running,
    attached: &mut Attached,
    ranges: &[TrackedRange],
    variant: Option<DirtyMethod>,
    rounds: usize,
    seed: &mut u64,
    samples: &mut Samples,
) -> anyhow::Result<()> {
    let mut tracking = match variant {
        None => None,
        Some(method) => {
            let started = Instant::now();
            let tracker = DirtyTracker::start(attached, ranges, Some(method))?;
            samples.start.push(started.elapsed().as_micros() as u64);
            let mirror = DataMirror::capture(&tracker, attached.memory())?;
            Some((tracker, mirror))
        }
    };
    for _ in 0..rounds {
        *seed += 1;
        let answer = fixture.command(&format!("dirty {DIRTY_PERCENT} {seed}"))?;
        let ns = answer
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("ns="))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("unexpected answer from the fixture: {answer:?}"))?;
        samples.target_ns.push(ns);
        let Some((tracker, mirror)) = tracking.as_mut() else {
            continue;
        };
        let dirty = tracker.collect_attached(attached)?;
        let report = mirror.refresh_pages(&dirty, attached.memory())?;
        samples.cycle.push(report.total_us);
        samples.collect.push(report.collect_us);
        samples.copy.push(report.copy_us);
        samples.copied.push(report.pages_copied);
        let listed = fixture.command("list")?;
        let written: BTreeSet<u64> = listed
            .split_whitespace()
            .skip(1)
            .filter_map(|hex| u64::from_str_radix(hex.trim_start_matches("0x"), 16).ok())
            .collect();
        let reported: BTreeSet<u64> = dirty.pages.iter().copied().collect();
        samples.missed += written.difference(&reported).count() as u64;
        samples.extra += reported.difference(&written).count() as u64;
    }
    if let Some((tracker, _)) = tracking {
        tracker.stop()?;
    }
    Ok(())
}

/// The section as markdown.
pub fn print(report: &DirtyBenchReport) {
    println!(
        "## Data mirroring cycle at {} % dirty, {} MiB region + globals ({} pages), median of {} rounds",
        report.dirty_percent,
        report.region_bytes >> 20,
        report.pages_tracked,
        report.rounds
    );
    println!();
    println!("Best method here: `{}`.", report.detection.best);
    for status in report.detection.methods.iter().filter(|s| !s.available) {
        println!(
            "`{}` unavailable: {}.",
            status.method,
            status.reason.as_deref().unwrap_or("")
        );
    }
    println!();
    println!("| method | cycle median µs | p99 µs | find µs | copy µs | pages copied | missed / extra pages | full sweep ÷ method | start µs |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &report.cycles {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} / {} | {:.1}× | {} |",
            r.method,
            r.cycle_us.median,
            r.cycle_us.p99,
            r.collect_us_median,
            r.copy_us_median,
            r.pages_copied_median,
            r.missed_pages,
            r.extra_pages,
            r.sweep_over_method,
            r.start_us_median
        );
    }
    println!();
    println!("Target side: the fixture's own time to write one word into each of those pages.");
    println!();
    println!("| tracking | write time median µs | ns per page | vs untracked |");
    println!("|---|---:|---:|---:|");
    for r in &report.target_cost {
        println!(
            "| {} | {:.1} | {:.0} | {:.2}× |",
            r.method.map_or("none", DirtyMethod::name),
            r.write_ns_median as f64 / 1000.0,
            r.ns_per_page,
            r.vs_untracked
        );
    }
}
