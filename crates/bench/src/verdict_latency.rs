//! `shadowpatch bench --only verdict-latency`: how long after the first
//! captured live call `analyze --capture 3` refuses a crashing patch, on a
//! loaded server, beside the floors of a simulated call: the live pause of
//! one capture (trap noticed → clone → thread resumed) and the fork of a
//! copy (a simulated call forks the captured copy for its patched run).
//!
//! The server (`server.c`, 4 workers serving about 10,000 requests a
//! second each, with its own SIGSEGV crash reporter) runs beside a second
//! process keeping both cores busy; the analysis is the one `shadowpatch
//! analyze --capture 3` runs (`ops::analysis::analyze`), its progress
//! timestamped: calls 1 to 3 captured, simulated, verdict.

use crate::support::{Context, Percentiles};
use serde::Serialize;
use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use shadowpatch_ops::analysis::{analyze, AnalysisSettings};
use shadowpatch_predict::simulate::bench::{copy_fork_floor, HitBench, HitHandling};
use shadowpatch_predict::simulate::Progress;
use shadowpatch_predict::Verdict;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Serialize)]
pub struct VerdictLatencyBench {
    pub rounds: usize,
    pub server_threads: u32,
    /// First captured call → verdict, ms.
    pub first_capture_to_verdict_ms: Percentiles,
    /// First → last captured call (waiting for calls 2 and 3), ms.
    pub waiting_for_calls_ms: Percentiles,
    /// Last captured call → last call simulated, ms.
    pub simulating_ms: Percentiles,
    /// Last call simulated → verdict (the copies killed and reaped inside
    /// the target, scoring, the history record), ms.
    pub after_simulation_ms: Percentiles,
    /// Of the whole analysis, the time outside the engine's timed parts
    /// (static, context, simulation): reading and surveying the patch,
    /// scoring, the history record, ms.
    pub outside_parts_ms: Percentiles,
    /// The whole analysis (static analysis, 0.5 s of context sampling,
    /// arming, capture, simulation, verdict), ms.
    pub total_ms: Percentiles,
    /// Floor: the live thread's pause per capture, µs.
    pub capture_pause_us: Percentiles,
    /// Floor: a fork of the captured copy, µs.
    pub copy_fork_us: Percentiles,
}

pub fn run(context: &Context, quick: bool) -> anyhow::Result<VerdictLatencyBench> {
    let rounds = if quick { 3 } else { 10 };
    let server_threads = 4u32;
    let dir = tempfile::tempdir()?;
    if !context.json {
        eprintln!(
            "verdict-latency: a server with {server_threads} workers and a second process loading both cores ..."
        );
    }
    let _load = Running::start(Fixture::BusyC, &["2"])?;
    let mut server = Running::start(Fixture::Server, &[&server_threads.to_string()])?;
    let image = shadowpatch_symbols::ElfImage::open(&server.binary())?;
    let manifest = dir.path().join("crash.toml");
    std::fs::write(
        &manifest,
        format!(
            "id = \"crash\"\nobject = \"{}\"\n[target]\nbuild_id = \"{}\"\n[[replace]]\nsymbol = \"handle_command\"\nwith = \"handle_command_crash\"\n",
            build_patch(Patch::ServerPatches)?.display(),
            shadowpatch_symbols::hex(image.build_id.as_deref().unwrap_or_default())
        ),
    )?;
    let state = dir.path().join("state");
    let settings = AnalysisSettings {
        capture: Some(3),
        ..AnalysisSettings::default()
    };
    let (mut latency, mut waiting, mut simulating, mut after, mut total, mut outside) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        if !context.json {
            eprintln!("verdict-latency: analyze --capture 3, round {}/{rounds} ...", round + 1);
        }
        let marks: Arc<Mutex<Vec<(Instant, bool)>>> = Arc::default();
        let sink = {
            let marks = marks.clone();
            Box::new(move |step: Progress| {
                let captured = match step {
                    Progress::Captured { .. } => true,
                    Progress::Simulated { .. } => false,
                    Progress::Armed { .. } => return,
                };
                if let Ok(mut marks) = marks.lock() {
                    marks.push((Instant::now(), captured));
                }
            })
        };
        let started = Instant::now();
        let report = analyze(&state, server.pid(), &manifest, &settings, "analyze", Some(sink))?;
        let ended = Instant::now();
        anyhow::ensure!(
            report.analysis.verdict == Verdict::Refuse,
            "the crashing patch was not refused: {:?}",
            report.analysis.verdict
        );
        let marks = marks
            .lock()
            .map_err(|_| anyhow::anyhow!("progress lock poisoned"))?
            .clone();
        let captured: Vec<Instant> = marks.iter().filter(|(_, c)| *c).map(|(t, _)| *t).collect();
        let simulated: Vec<Instant> = marks.iter().filter(|(_, c)| !*c).map(|(t, _)| *t).collect();
        let (Some(first), Some(last), Some(done)) = (captured.first(), captured.last(), simulated.last()) else {
            anyhow::bail!("no call captured and simulated in round {}", round + 1);
        };
        let us = |d: Duration| d.as_micros() as u64;
        latency.push(us(ended - *first));
        waiting.push(us(*last - *first));
        simulating.push(us(*done - *last));
        after.push(us(ended - *done));
        total.push(us(ended - started));
        let parts_us = (report.timings_ms.values().sum::<f64>() * 1000.0) as u64;
        outside.push(us(ended - started).saturating_sub(parts_us));
    }
    if !context.json {
        eprintln!("verdict-latency: floors (capture pause, fork of a copy) ...");
    }
    let mut bench = HitBench::open(&dir.path().join("floor-state"), server.pid(), "handle_command")?;
    let pauses: Vec<u64> = bench
        .block(
            HitHandling::Capture,
            if quick { 20 } else { 100 },
            Duration::from_secs(30),
        )?
        .into_iter()
        .map(|(pause, _)| pause)
        .collect();
    bench.close()?;
    let forks = copy_fork_floor(
        &dir.path().join("floor-state"),
        server.pid(),
        if quick { 20 } else { 100 },
    )?;
    anyhow::ensure!(server.check()?["errors"] == 0, "the live server answered wrong");
    // µs → ms in the percentiles of the latency rows.
    let in_ms = |v: Vec<u64>| Percentiles::of(v.into_iter().map(|us| us / 1000).collect());
    Ok(VerdictLatencyBench {
        rounds,
        server_threads,
        first_capture_to_verdict_ms: in_ms(latency),
        waiting_for_calls_ms: in_ms(waiting),
        simulating_ms: in_ms(simulating),
        after_simulation_ms: in_ms(after),
        outside_parts_ms: in_ms(outside),
        total_ms: in_ms(total),
        capture_pause_us: Percentiles::of(pauses),
        copy_fork_us: Percentiles::of(forks),
    })
}

pub fn print(bench: &VerdictLatencyBench) {
    println!();
    println!(
        "## Verdict latency: `analyze --capture 3` of a crashing patch on a loaded server ({} workers, a second process loading both cores), {} rounds",
        bench.server_threads, bench.rounds
    );
    println!();
    println!("| what | median | p99 | max |");
    println!("|---|---:|---:|---:|");
    let row = |what: &str, p: &Percentiles, unit: &str| {
        println!("| {what} | {} {unit} | {} {unit} | {} {unit} |", p.median, p.p99, p.max);
    };
    row(
        "first captured call → verdict (refuse)",
        &bench.first_capture_to_verdict_ms,
        "ms",
    );
    row("  waiting for calls 2 and 3", &bench.waiting_for_calls_ms, "ms");
    row("  simulating the 3 calls", &bench.simulating_ms, "ms");
    row(
        "  after simulation (copies reaped, score, history)",
        &bench.after_simulation_ms,
        "ms",
    );
    row(
        "whole analysis (static, context sampling, capture, simulation)",
        &bench.total_ms,
        "ms",
    );
    row(
        "floor: live pause of one capture (trap → clone → resumed)",
        &bench.capture_pause_us,
        "µs",
    );
    row("floor: fork of a captured copy", &bench.copy_fork_us, "µs");
}
