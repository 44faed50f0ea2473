//! `shadowpatch bench`, continuous verification: detection latency of one
//! flipped byte at a random offset (median and worst over several trials)
//! for a large mirrored code-like region and for a 16 MiB critical set, at
//! a 20 % CPU budget, with the watcher thread's measured CPU share; and the
//! target's slowdown under watch (busy.c calls per second with and without
//! a watcher, interleaved block by block in one run).

use crate::support::Percentiles;
use serde::Serialize;
use shadowpatch_fixtures::{Fixture, Running};
use shadowpatch_mirror::{VariableMode, VariableRequest};
use shadowpatch_process::{ProcessIdentity, TargetMemory};
use shadowpatch_watch::{WatchEvent, WatchOptions, Watcher};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The budget the goals are stated for.
const BUDGET_PERCENT: f64 = 20.0;

#[derive(Debug, Serialize)]
pub struct LatencyRow {
    pub what: String,
    /// Bytes verified per pass (the region or critical set plus the
    /// process's own code and read-only data).
    pub bytes_per_pass: u64,
    pub cpu_budget_percent: f64,
    pub trials: usize,
    pub median_ms: f64,
    pub worst_ms: f64,
    /// The watcher thread's CPU time over wall time while it ran.
    pub cpu_percent: f64,
    pub goal_worst_ms: f64,
    /// One pass at the floor's speed (read + hash, measured in this run)
    /// stretched to the budget: the least a paced verifier can take to
    /// see every byte once. The worst latency is about one pass.
    pub floor_pass_ms: f64,
    pub worst_vs_floor_pass: f64,
}

#[derive(Debug, Serialize)]
pub struct SlowdownRow {
    /// The watcher's setting in this row.
    pub setting: String,
    pub blocks: usize,
    pub block_ms: u64,
    pub calls_per_s_without: f64,
    pub calls_per_s_with: f64,
    /// (without − with) / without, in percent (negative: noise).
    pub slowdown_percent: f64,
    /// The same per second of the target's own CPU time: insensitive to
    /// other load on a shared machine, sensitive to what the watcher does
    /// to the target's caches and memory bandwidth.
    pub calls_per_cpu_s_without: f64,
    pub calls_per_cpu_s_with: f64,
    pub slowdown_per_cpu_percent: f64,
    pub watcher_cpu_percent: f64,
}

#[derive(Debug, Serialize)]
pub struct WatchBench {
    pub latency: Vec<LatencyRow>,
    pub slowdown: Vec<SlowdownRow>,
}

/// A watcher running on its own thread, its events on a channel.
struct Background {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
    events: Receiver<WatchEvent>,
    bytes_per_pass: u64,
}

impl Background {
    fn start(pid: i32, state: &Path, requests: &[VariableRequest], options: WatchOptions) -> anyhow::Result<Self> {
        let (sender, events) = channel();
        let mut watcher = Watcher::start(
            pid,
            state,
            requests,
            options,
            Box::new(move |event: &WatchEvent| {
                let _ = sender.send(event.clone());
            }),
        )?;
        let bytes_per_pass = watcher.stats().bytes_per_pass;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            watcher.run(&flag)?;
            Ok(())
        });
        Ok(Background {
            stop,
            thread: Some(thread),
            events,
            bytes_per_pass,
        })
    }

    /// Stop and return the watcher's CPU share over its run.
    fn finish(mut self) -> anyhow::Result<f64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("watcher thread panicked"))??;
        }
        Ok(self
            .events
            .try_iter()
            .filter_map(|e| match e {
                WatchEvent::Stopped { cpu_percent, .. } => Some(cpu_percent),
                _ => None,
            })
            .last()
            .unwrap_or(0.0))
    }

    /// Wait for an event `accept` picks, up to `timeout`.
    fn wait(&self, timeout: Duration, accept: impl Fn(&WatchEvent) -> bool) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self
                .events
                .recv_timeout(left)
                .map_err(|_| anyhow::anyhow!("no expected watch event within {timeout:?}"))?;
            if accept(&event) {
                return Ok(Instant::now());
            }
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// xorshift64: offsets need only be spread, not secret.
fn next_random(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

/// Flip one byte at a random offset of `[start, start + len)` `trials`
/// times; each latency is from the write to the alert's arrival.
fn latency_trials(
    watch: &Background,
    memory: &mut TargetMemory,
    start: u64,
    len: u64,
    trials: usize,
    seed: &mut u64,
) -> anyhow::Result<Vec<u64>> {
    let mut latencies = Vec::with_capacity(trials);
    for _ in 0..trials {
        // A random pause so the flip lands anywhere relative to the scan.
        std::thread::sleep(Duration::from_millis(next_random(seed) % 200));
        let address = start + next_random(seed) % len;
        let original = memory.read_vec(address, 1)?[0];
        memory.write(address, &[original ^ 0x80])?;
        let flipped = Instant::now();
        let seen = watch.wait(
            Duration::from_secs(60),
            |e| matches!(e, WatchEvent::Alert(a) if a.address == address),
        )?;
        latencies.push(seen.duration_since(flipped).as_micros() as u64);
        memory.write(address, &[original])?;
        let page = address & !0xfff;
        watch.wait(
            Duration::from_secs(60),
            |e| matches!(e, WatchEvent::Cleared { address, .. } if *address == page),
        )?;
    }
    Ok(latencies)
}

fn latency_row(
    what: String,
    goal_worst_ms: f64,
    latencies: Vec<u64>,
    bytes_per_pass: u64,
    cpu_percent: f64,
    floor_bytes_per_us: f64,
) -> LatencyRow {
    let trials = latencies.len();
    let percentiles = Percentiles::of(latencies);
    let floor_pass_ms = bytes_per_pass as f64 / floor_bytes_per_us / 1000.0 / (BUDGET_PERCENT / 100.0);
    LatencyRow {
        floor_pass_ms,
        worst_vs_floor_pass: percentiles.max as f64 / 1000.0 / floor_pass_ms,
        what,
        bytes_per_pass,
        cpu_budget_percent: BUDGET_PERCENT,
        trials,
        median_ms: percentiles.median as f64 / 1000.0,
        worst_ms: percentiles.max as f64 / 1000.0,
        cpu_percent,
        goal_worst_ms,
    }
}

fn options(interval: Duration) -> WatchOptions {
    WatchOptions {
        interval,
        cpu_budget_percent: BUDGET_PERCENT,
        record_history: false,
        ..WatchOptions::default()
    }
}

/// `floor_bytes_per_us`: the read + hash floor measured earlier in the
/// same run, to state latencies relative to this machine's speed now.
pub fn run(json: bool, quick: bool, region_mib: u64, floor_bytes_per_us: f64) -> anyhow::Result<WatchBench> {
    let trials = if quick { 5 } else { 15 };
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ shadowpatch_store::now_ms();
    let mut latency = Vec::new();

    if !json {
        eprintln!("watch latency: {region_mib} MiB code-like region, {trials} trials at {BUDGET_PERCENT}% ...");
    }
    let big = Running::start(Fixture::BigRegion, &[&region_mib.to_string()])?;
    let state = tempfile::tempdir()?;
    let watch = Background::start(big.pid(), state.path(), &[], options(Duration::ZERO))?;
    let mut memory = TargetMemory::open(&ProcessIdentity::of(big.pid())?)?;
    let latencies = latency_trials(
        &watch,
        &mut memory,
        big.number("addr"),
        big.number("len"),
        trials,
        &mut seed,
    )?;
    let bytes = watch.bytes_per_pass;
    let cpu = watch.finish()?;
    latency.push(latency_row(
        format!("{region_mib} MiB mirrored code-like region"),
        1000.0,
        latencies,
        bytes,
        cpu,
        floor_bytes_per_us,
    ));
    drop(big);
    drop(state);

    if !json {
        eprintln!("watch latency: 16 MiB critical set (one guarded variable), {trials} trials ...");
    }
    let data = Running::start(Fixture::BigRegion, &["16", "rw"])?;
    let state = tempfile::tempdir()?;
    let (start, len) = (data.number("addr"), data.number("len"));
    let request = VariableRequest::parse(&format!("{start:#x}:{len}"), VariableMode::Guarded, "bench")?;
    let watch = Background::start(data.pid(), state.path(), &[request], options(Duration::ZERO))?;
    let mut memory = TargetMemory::open(&ProcessIdentity::of(data.pid())?)?;
    let latencies = latency_trials(&watch, &mut memory, start, len, trials, &mut seed)?;
    let bytes = watch.bytes_per_pass;
    let cpu = watch.finish()?;
    latency.push(latency_row(
        "16 MiB critical set (guarded)".into(),
        100.0,
        latencies,
        bytes,
        cpu,
        floor_bytes_per_us,
    ));
    drop(data);
    drop(state);

    let slowdown = slowdown(json, quick)?;
    Ok(WatchBench { latency, slowdown })
}

/// busy.c's calls per second without a watcher, with one at the default
/// setting (a pass every 100 ms) and with one passing back to back at the
/// budget (the heaviest setting), interleaved block by block.
fn slowdown(json: bool, quick: bool) -> anyhow::Result<Vec<SlowdownRow>> {
    let blocks = if quick { 4 } else { 16 };
    let block = Duration::from_millis(if quick { 300 } else { 500 });
    if !json {
        eprintln!("slowdown under watch: busy.c, {blocks} rounds of {block:?} blocks without and with ...");
    }
    let mut target = Running::start(Fixture::BusyC, &["1"])?;
    let state = tempfile::tempdir()?;
    // (calls per wall second, calls per second of the target's CPU time)
    let calls_in = |target: &mut Running| -> anyhow::Result<(f64, f64)> {
        let (before, cpu_before) = (target.check()?["calls"], cpu_ns(target.pid()));
        let started = Instant::now();
        std::thread::sleep(block);
        let (after, cpu_after) = (target.check()?["calls"], cpu_ns(target.pid()));
        let calls = (after - before) as f64;
        Ok((
            calls / started.elapsed().as_secs_f64(),
            calls / ((cpu_after - cpu_before).max(1) as f64 / 1e9),
        ))
    };
    let settings = [
        ("every 100 ms (default)", WatchOptions::default().interval),
        ("back to back", Duration::ZERO),
    ];
    let mut without = Vec::new();
    // Per setting: (calls per wall s, per CPU s) of each block, watcher CPU %.
    type Samples = (Vec<(f64, f64)>, Vec<f64>);
    let mut with: Vec<Samples> = settings.iter().map(|_| (Vec::new(), Vec::new())).collect();
    for _ in 0..blocks {
        without.push(calls_in(&mut target)?);
        for ((_, interval), (calls, cpu)) in settings.iter().zip(with.iter_mut()) {
            let watch = Background::start(target.pid(), state.path(), &[], options(*interval))?;
            // Measure only once it is verifying, not while it starts.
            watch.wait(Duration::from_secs(30), |e| matches!(e, WatchEvent::Pass { .. }))?;
            calls.push(calls_in(&mut target)?);
            cpu.push(watch.finish()?);
        }
    }
    anyhow::ensure!(target.check()?["errors"] == 0, "wrong results under watch");
    let median = |v: &[f64]| {
        let mut sorted = v.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    };
    let wall = |v: &[(f64, f64)]| median(&v.iter().map(|(w, _)| *w).collect::<Vec<_>>());
    let per_cpu = |v: &[(f64, f64)]| median(&v.iter().map(|(_, c)| *c).collect::<Vec<_>>());
    let (base, base_cpu) = (wall(&without), per_cpu(&without));
    Ok(settings
        .iter()
        .zip(with)
        .map(|((setting, _), (calls, cpu))| {
            let (with, with_cpu) = (wall(&calls), per_cpu(&calls));
            SlowdownRow {
                setting: format!("{setting}, {BUDGET_PERCENT}% budget"),
                blocks,
                block_ms: block.as_millis() as u64,
                calls_per_s_without: base,
                calls_per_s_with: with,
                slowdown_percent: (base - with) / base * 100.0,
                calls_per_cpu_s_without: base_cpu,
                calls_per_cpu_s_with: with_cpu,
                slowdown_per_cpu_percent: (base_cpu - with_cpu) / base_cpu * 100.0,
                watcher_cpu_percent: median(&cpu),
            }
        })
        .collect())
}

/// CPU time of every thread of `pid` so far, in ns (`/proc/PID/task/*/schedstat`).
fn cpu_ns(pid: i32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
        .filter_map(|text| text.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

pub fn print(bench: &WatchBench) {
    println!();
    println!("## Continuous verification: detection latency of one flipped byte");
    println!();
    println!("Watcher passes back to back, paced to {BUDGET_PERCENT}% of one core (thread CPU time).");
    println!();
    println!("Floor pass: the bytes of one pass at the read + hash floor measured above, stretched to the budget.");
    println!();
    println!(
        "| what | bytes per pass | trials | median ms | worst ms | goal worst ms | floor pass ms | worst / floor pass | watcher CPU % |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &bench.latency {
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.0} | {:.1} | {:.2} | {:.1} |",
            r.what,
            crate::support::human_bytes(r.bytes_per_pass),
            r.trials,
            r.median_ms,
            r.worst_ms,
            r.goal_worst_ms,
            r.floor_pass_ms,
            r.worst_vs_floor_pass,
            r.cpu_percent
        );
    }
    println!();
    println!("## Target slowdown under watch (busy.c, 1 worker; medians of interleaved blocks)");
    println!();
    println!(
        "| watcher | blocks × ms | calls/s without | calls/s with | slowdown | per target CPU s: without | with | slowdown | watcher CPU % |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in &bench.slowdown {
        println!(
            "| {} | {} × {} | {:.0} | {:.0} | {:+.2}% | {:.0} | {:.0} | {:+.2}% | {:.1} |",
            s.setting,
            s.blocks,
            s.block_ms,
            s.calls_per_s_without,
            s.calls_per_s_with,
            s.slowdown_percent,
            s.calls_per_cpu_s_without,
            s.calls_per_cpu_s_with,
            s.slowdown_per_cpu_percent,
            s.watcher_cpu_percent
        );
    }
}
