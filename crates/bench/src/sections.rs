//! The sections of `shadowpatch bench` and the run of all of them:
//! stop-the-world latency for 1, 8 and 64 busy threads (tracer at
//! SCHED_FIFO and at normal priority), static analysis time against
//! apply's own validation, the live pause of a simulation's captures (see
//! `simulation.rs`), and mirror / verify throughput on a large
//! executable-like region against the raw floor (`process_vm_readv` + page
//! hash, nothing else) measured on the same region in the same run,
//! interleaved round by round; the data mirroring cycle per dirty-tracking
//! method is in `dirty.rs`, continuous verification (detection latency and
//! target slowdown) in `watch.rs`, `apply --watch` in `watch_window.rs`,
//! the agent in `agent.rs`, `shadowpatch build` in `build.rs`.

use crate::support::Context;
use crate::support::Percentiles;
use crate::support::{gb_per_s, print_json};
use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;
use serde::Serialize;
use shadowpatch_fixtures::{Fixture, Running};
use shadowpatch_mirror::{capture, verify, CaptureOptions, MirrorFile, PageHasher, RegionKind, RegionSpec, PAGE_SIZE};
use shadowpatch_process::attach::StopPriority;
use shadowpatch_process::{Attached, ProcessIdentity, TargetMemory};
use std::io::IoSliceMut;
use std::time::Instant;

#[derive(Debug, Serialize)]
struct StopRow {
    threads: usize,
    rounds: u32,
    fifo_pause_us: Percentiles,
    normal_pause_us: Percentiles,
    fifo_realtime: bool,
}

#[derive(Debug, Serialize)]
struct ThroughputRow {
    what: &'static str,
    median_us: u64,
    gb_per_s: f64,
    /// This row's throughput divided by the floor's (read + hash).
    ratio_to_floor: f64,
}

#[derive(Debug, Serialize)]
struct PatchRow {
    threads: usize,
    functions: usize,
    rounds: usize,
    floor_us: u64,
    apply_us: u64,
    rollback_us: u64,
    /// Medians of each phase of the same stops.
    floor_phases: Phases,
    apply_phases: Phases,
    rollback_phases: Phases,
}

/// Where a pause goes, medians over the rounds: stopping every thread,
/// the work done while they are stopped, resuming them; and how many
/// rounds' stop took a millisecond or more (a thread waiting out another
/// task's scheduler tick: on a shared machine these, not the work, decide
/// the medians).
#[derive(Debug, Serialize)]
struct Phases {
    stop_us: u64,
    work_us: u64,
    resume_us: u64,
    stalled_stops: usize,
}

/// A stop phase this long met the scheduler, not our code: the 64-thread
/// stop is ~0.2-0.6 ms without a stall, one 250 Hz tick is 4 ms.
const STALLED_STOP_US: u64 = 1_000;

impl Phases {
    fn of(reports: &[shadowpatch_process::PauseReport]) -> Phases {
        let median = |phase: fn(&shadowpatch_process::PauseReport) -> u64| {
            Percentiles::of(reports.iter().map(phase).collect()).median
        };
        Phases {
            stop_us: median(|r| r.stop_us),
            work_us: median(|r| r.work_us),
            resume_us: median(|r| r.resume_us),
            stalled_stops: reports.iter().filter(|r| r.stop_us >= STALLED_STOP_US).count(),
        }
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} / {} / {} ({} stalled)",
            self.stop_us, self.work_us, self.resume_us, self.stalled_stops
        )
    }
}

#[derive(Debug, Serialize)]
struct AnalysisRow {
    functions: usize,
    rounds: usize,
    /// apply's own validation alone (`prepare`): the floor.
    prepare_ms: f64,
    /// The prediction engine's static analysis (no context window).
    static_ms: f64,
}

#[derive(Debug, Serialize)]
struct CallCost {
    unpatched_ns: f64,
    patched_ns: f64,
    extra_ns: f64,
}

#[derive(Debug, Serialize)]
struct BenchReport {
    stop_the_world: Vec<StopRow>,
    patching: Vec<PatchRow>,
    call_cost: CallCost,
    analysis: Vec<AnalysisRow>,
    simulation: crate::simulation::SimulationBench,
    region_bytes: u64,
    rounds: usize,
    throughput: Vec<ThroughputRow>,
    dirty_tracking: crate::dirty::DirtyBenchReport,
    watch: crate::watch::WatchBench,
    watch_window: crate::watch_window::WatchWindowBench,
}

/// Only the continuous-verification section, with the read + hash floor it
/// is stated against measured first on a region of the same size.
fn run_watch_only(context: &Context, quick: bool, region_mib: Option<u64>) -> anyhow::Result<i32> {
    let mib = region_mib.unwrap_or(if quick { 256 } else { 1024 });
    let fixture = Running::start(Fixture::BigRegion, &[&mib.to_string()])?;
    let (start, len) = (fixture.number("addr"), fixture.number("len"));
    let hasher = PageHasher::random();
    let mut floor = Vec::new();
    for _ in 0..3 {
        floor.push(time(|| floor_read(fixture.pid(), start, len, Some(&hasher)))?);
    }
    drop(fixture);
    let floor_us = Percentiles::of(floor).median.max(1);
    let watch = crate::watch::run(context.json, quick, mib, len as f64 / floor_us as f64)?;
    if context.json {
        print_json(&watch);
    } else {
        println!(
            "read + hash floor on {mib} MiB: {:.1} ms ({:.2} GB/s)",
            floor_us as f64 / 1000.0,
            gb_per_s(len, floor_us)
        );
        crate::watch::print(&watch);
    }
    Ok(0)
}

/// The prediction engine's rows: simulation's capture pause and end to
/// end, static analysis against apply's validation.
fn print_prediction(simulation: &crate::simulation::SimulationBench, analysis: &[AnalysisRow]) {
    crate::simulation::print(simulation);
    println!();
    println!(
        "## Static analysis vs apply's own validation, ms (median of {} rounds)",
        analysis[0].rounds
    );
    println!();
    println!("Floor: `prepare` (manifest, object, build-id, symbols, entries, register sets) on the same target.");
    println!();
    println!("| functions | prepare (floor) | static analysis | analysis / floor |");
    println!("|---:|---:|---:|---:|");
    for r in analysis {
        println!(
            "| {} | {:.2} | {:.2} | {:.2}× |",
            r.functions,
            r.prepare_ms,
            r.static_ms,
            r.static_ms / r.prepare_ms.max(0.001)
        );
    }
}

/// Only the prediction engine's sections.
fn run_prediction_only(context: &Context, quick: bool) -> anyhow::Result<i32> {
    let analysis = static_analysis_times(context, quick)?;
    let simulation = crate::simulation::run(context, quick)?;
    if context.json {
        print_json(&serde_json::json!({ "analysis": analysis, "simulation": simulation }));
    } else {
        print_prediction(&simulation, &analysis);
    }
    Ok(0)
}

pub fn run(context: &Context, quick: bool, region_mib: Option<u64>, only: Option<&str>) -> anyhow::Result<i32> {
    match only {
        Some("watch") => return run_watch_only(context, quick, region_mib),
        Some("prediction") => return run_prediction_only(context, quick),
        Some("watch-window") => return crate::watch_window::run(context, quick),
        Some("build") => return crate::build::run(context, quick),
        Some("pause") => {
            let (patching, call_cost) = patch_pauses(context, quick)?;
            if context.json {
                print_json(&serde_json::json!({ "patching": patching, "call_cost": call_cost }));
            } else {
                print_patching(&patching, &call_cost);
            }
            return Ok(0);
        }
        Some("fleet") => {
            let bench = crate::fleet::run(context.json, quick)?;
            if context.json {
                print_json(&bench);
            } else {
                crate::fleet::print(&bench);
            }
            return Ok(0);
        }
        Some("build-debian") => return crate::build_debian::run(context, quick),
        Some("fleet-service") => {
            let bench = crate::fleet_service::run(context.json, quick)?;
            if context.json {
                print_json(&bench);
            } else {
                crate::fleet_service::print(&bench);
            }
            return Ok(0);
        }
        Some("verdict-latency") => {
            let bench = crate::verdict_latency::run(context, quick)?;
            if context.json {
                print_json(&bench);
            } else {
                crate::verdict_latency::print(&bench);
            }
            return Ok(0);
        }
        Some("capture-stress") => {
            let bench = crate::capture_stress::run(context, quick)?;
            if context.json {
                print_json(&bench);
            } else {
                crate::capture_stress::print(&bench);
            }
            return Ok(0);
        }
        Some("dirty") => {
            let report = crate::dirty::run(context, quick)?;
            if context.json {
                print_json(&report);
            } else {
                crate::dirty::print(&report);
            }
            return Ok(0);
        }
        Some("agent") => {
            let bench = crate::agent::run(context.json, quick)?;
            if context.json {
                print_json(&bench);
            } else {
                crate::agent::print(&bench);
            }
            return Ok(0);
        }
        Some(other) => {
            return Err(crate::support::BadInput(format!(
                "--only {other}: unknown section (watch, dirty, prediction, watch-window, agent, build, pause, fleet, capture-stress, verdict-latency, fleet-service)"
            ))
            .into())
        }
        None => {}
    }
    let rounds_stop = if quick { 50 } else { 300 };
    let mut stop_rows = Vec::new();
    for threads in [1usize, 8, 64] {
        if !context.json {
            eprintln!("stop-the-world: {threads} busy threads, {rounds_stop} rounds per priority ...");
        }
        let fixture = Running::start(Fixture::BusyC, &[&threads.to_string()])?;
        let mut attached = Attached::seize(&ProcessIdentity::of(fixture.pid())?)?;
        // Alternate priorities in blocks so drift on a shared machine
        // affects both columns alike.
        let mut fifo = Vec::new();
        let mut normal = Vec::new();
        let mut realtime = true;
        for _block in 0..10 {
            let per_block = (rounds_stop / 10).max(1);
            for (priority, out) in [
                (StopPriority::RealtimeIfPermitted, &mut fifo),
                (StopPriority::Normal, &mut normal),
            ] {
                attached.set_priority(priority);
                for report in attached.stop_resume_rounds(per_block)? {
                    if priority == StopPriority::RealtimeIfPermitted {
                        realtime &= report.realtime;
                    }
                    out.push(report.pause_us);
                }
            }
        }
        attached.detach()?;
        stop_rows.push(StopRow {
            threads,
            rounds: rounds_stop,
            fifo_pause_us: Percentiles::of(fifo),
            normal_pause_us: Percentiles::of(normal),
            fifo_realtime: realtime,
        });
    }

    let (patching, call_cost) = patch_pauses(context, quick)?;
    let dirty_tracking = crate::dirty::run(context, quick)?;
    let analysis = static_analysis_times(context, quick)?;
    let simulation = crate::simulation::run(context, quick)?;

    let mib = region_mib.unwrap_or(if quick { 256 } else { 1024 });
    if !context.json {
        eprintln!("throughput: mapping a {mib} MiB executable region ...");
    }
    let fixture = Running::start(Fixture::BigRegion, &[&mib.to_string()])?;
    let identity = ProcessIdentity::of(fixture.pid())?;
    let start = fixture.number("addr");
    let len = fixture.number("len");
    let region = RegionSpec {
        start,
        end: start + len,
        kind: RegionKind::Code,
        perms: "r-xp".into(),
        module: "[anon]".into(),
        path: None,
        build_id: None,
        file_offset: 0,
    };
    let state = tempfile::tempdir()?;
    let mirror_path = state.path().join("gen-000000.mirror");
    let mut memory = TargetMemory::open(&identity)?;
    let hasher = PageHasher::random();
    let rounds = if quick { 3 } else { 5 };
    let mut samples: [Vec<u64>; 4] = Default::default();
    let mut mirror = None;
    for round in 0..rounds {
        if !context.json {
            eprintln!("throughput round {}/{rounds} ...", round + 1);
        }
        samples[0].push(time(|| floor_read(fixture.pid(), start, len, None))?);
        samples[1].push(time(|| floor_read(fixture.pid(), start, len, Some(&hasher)))?);
        let started = Instant::now();
        capture(
            &mut memory,
            &identity,
            std::slice::from_ref(&region),
            &mirror_path,
            &CaptureOptions { generation: 0 },
            &mut |_, _| {},
        )?;
        samples[2].push(started.elapsed().as_micros() as u64);
        let opened = MirrorFile::open(&mirror_path)?;
        let started = Instant::now();
        let report = verify(&mut memory, &opened, &mut |_, _| {})?;
        samples[3].push(started.elapsed().as_micros() as u64);
        anyhow::ensure!(report.is_clean(), "benchmark region changed during the run");
        // The floor again, right after the verify, so both see the same
        // machine state (the capture's writeback is long finished).
        samples[1].push(time(|| floor_read(fixture.pid(), start, len, Some(&hasher)))?);
        let started = Instant::now();
        verify(&mut memory, &opened, &mut |_, _| {})?;
        samples[3].push(started.elapsed().as_micros() as u64);
        mirror = Some(opened);
    }
    drop(mirror);
    drop(fixture);
    drop(state);
    let median = |v: &Vec<u64>| Percentiles::of(v.clone()).median;
    let floor = median(&samples[1]);
    let watch = crate::watch::run(context.json, quick, mib, len as f64 / floor.max(1) as f64)?;
    let watch_window = crate::watch_window::measure(context, quick)?;
    let row = |what, index: usize| {
        let us = median(&samples[index]);
        ThroughputRow {
            what,
            median_us: us,
            gb_per_s: gb_per_s(len, us),
            ratio_to_floor: floor as f64 / us as f64,
        }
    };
    let report = BenchReport {
        stop_the_world: stop_rows,
        patching,
        call_cost,
        analysis,
        simulation,
        region_bytes: len,
        rounds,
        throughput: vec![
            row("process_vm_readv alone (1 MiB calls)", 0),
            row("floor: process_vm_readv + xxh3 per page", 1),
            row("shadowpatch verify", 3),
            row("shadowpatch mirror (to disk, fsync'd)", 2),
        ],
        dirty_tracking,
        watch,
        watch_window,
    };
    if context.json {
        print_json(&report);
        return Ok(0);
    }
    println!("## Stop-the-world pause (first interrupt → last thread resumed), µs");
    println!();
    println!("| busy threads | SCHED_FIFO median | SCHED_FIFO p99 | normal median | normal p99 | normal / FIFO |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in &report.stop_the_world {
        println!(
            "| {} | {} | {} | {} | {} | {:.1}× |",
            r.threads,
            r.fifo_pause_us.median,
            r.fifo_pause_us.p99,
            r.normal_pause_us.median,
            r.normal_pause_us.p99,
            r.normal_pause_us.median as f64 / r.fifo_pause_us.median.max(1) as f64
        );
    }
    if report.stop_the_world.iter().any(|r| !r.fifo_realtime) {
        println!("\n(SCHED_FIFO was not permitted: the FIFO columns ran at normal priority)");
    }
    println!();
    print_patching(&report.patching, &report.call_cost);
    print_prediction(&report.simulation, &report.analysis);
    println!();
    println!(
        "## Throughput on a {} MiB r-x region, median of {} rounds",
        len >> 20,
        rounds
    );
    println!();
    println!("| what | median ms | GB/s | vs floor |");
    println!("|---|---:|---:|---:|");
    for r in &report.throughput {
        println!(
            "| {} | {:.1} | {:.2} | {:.2} |",
            r.what,
            r.median_us as f64 / 1000.0,
            r.gb_per_s,
            r.ratio_to_floor
        );
    }
    println!();
    crate::dirty::print(&report.dirty_tracking);
    crate::watch::print(&report.watch);
    println!();
    crate::watch_window::print(&report.watch_window);
    Ok(0)
}

fn time(f: impl FnOnce() -> anyhow::Result<()>) -> anyhow::Result<u64> {
    let started = Instant::now();
    f()?;
    Ok(started.elapsed().as_micros() as u64)
}

/// The floor: read the region in 1 MiB `process_vm_readv` calls and, when
/// asked, hash each page; nothing stored, nothing compared.
fn floor_read(pid: i32, start: u64, len: u64, hasher: Option<&PageHasher>) -> anyhow::Result<()> {
    let mut buffer = vec![0u8; 1 << 20];
    let mut sink = 0u128;
    let mut address = start;
    while address < start + len {
        let n = ((start + len - address) as usize).min(buffer.len());
        let remote = [RemoteIoVec {
            base: address as usize,
            len: n,
        }];
        let read = process_vm_readv(Pid::from_raw(pid), &mut [IoSliceMut::new(&mut buffer[..n])], &remote)?;
        anyhow::ensure!(read == n, "short read at {address:#x}");
        if let Some(hasher) = hasher {
            for page in buffer[..n].chunks_exact(PAGE_SIZE) {
                sink ^= hasher.hash(page);
            }
        }
        address += n as u64;
    }
    std::hint::black_box(sink);
    Ok(())
}

/// Static analysis of 1/10/100 replacements against the floor of what
/// apply's own validation (`prepare`) costs, alternated round by round on
/// the same target.
fn static_analysis_times(context: &Context, quick: bool) -> anyhow::Result<Vec<AnalysisRow>> {
    const FUNCTIONS: usize = 100;
    let rounds = if quick { 5 } else { 21 };
    let binary =
        shadowpatch_fixtures::build_c_source("many-100", &shadowpatch_fixtures::many_functions_source(FUNCTIONS))?;
    let object = shadowpatch_fixtures::build_c_patch(
        "many-100-patch",
        &shadowpatch_fixtures::many_functions_patch_source(FUNCTIONS),
    )?;
    let image = shadowpatch_symbols::ElfImage::open(&binary)?;
    let build_id = shadowpatch_symbols::hex(image.build_id.as_deref().unwrap_or_default());
    let target = Running::start_binary(&binary, &["1"])?;
    let dir = tempfile::tempdir()?;
    let mut rows = Vec::new();
    for functions in [1usize, 10, 100] {
        if !context.json {
            eprintln!("static analysis: {functions} functions, {rounds} rounds ...");
        }
        let mut text = format!(
            "id = \"analysis-{functions}\"\nobject = \"{}\"\n[target]\nbuild_id = \"{build_id}\"\n",
            object.display()
        );
        for i in 0..functions {
            text.push_str(&format!("[[replace]]\nsymbol = \"f{i}\"\nwith = \"f{i}_v2\"\n"));
        }
        let manifest = dir.path().join(format!("analysis-{functions}.toml"));
        std::fs::write(&manifest, text)?;
        let (mut floor, mut analysis) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let started = Instant::now();
            shadowpatch_patch::survey::prepare(target.pid(), &manifest, &[])?;
            floor.push(started.elapsed().as_micros() as u64);
            let started = Instant::now();
            // Read and surveyed as the floor is, then analysed.
            let survey = shadowpatch_predict::survey_for_analysis(target.pid(), &manifest, dir.path())?;
            let report = shadowpatch_predict::analyze_static(&survey, dir.path())?;
            analysis.push(started.elapsed().as_micros() as u64);
            anyhow::ensure!(
                report
                    .findings
                    .iter()
                    .all(|f| f.severity != shadowpatch_predict::Severity::Blocking),
                "the benchmark patch was refused"
            );
        }
        rows.push(AnalysisRow {
            functions,
            rounds,
            prepare_ms: Percentiles::of(floor).median as f64 / 1000.0,
            static_ms: Percentiles::of(analysis).median as f64 / 1000.0,
        });
    }
    Ok(rows)
}

/// Nanoseconds per call of the many-functions program's `f0`, called
/// `calls` times on its main thread (`time N`), best of five runs.
pub(super) fn time_calls(target: &mut Running, calls: u64) -> anyhow::Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let answer = target.command(&format!("time {calls}"))?;
        let ns: f64 = answer
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("ns="))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("unexpected answer {answer:?}"))?;
        best = best.min(ns);
    }
    Ok(best)
}

/// The activation and rollback table and the per-call cost.
fn print_patching(patching: &[PatchRow], call_cost: &CallCost) {
    println!(
        "## Activation and rollback pause vs the floor, µs (median of {} rounds)",
        patching[0].rounds
    );
    println!();
    println!("Floor: stop all threads + one 5-byte write + resume, no checks, on the same target.");
    println!();
    println!("| threads | functions | floor | apply | apply / floor | rollback | rollback / floor |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for r in patching {
        println!(
            "| {} | {} | {} | {} | {:.2}× | {} | {:.2}× |",
            r.threads,
            r.functions,
            r.floor_us,
            r.apply_us,
            r.apply_us as f64 / r.floor_us.max(1) as f64,
            r.rollback_us,
            r.rollback_us as f64 / r.floor_us.max(1) as f64
        );
    }
    println!();
    println!(
        "Per phase, µs (medians: stop all threads / work while stopped / resume all threads; \
         rounds whose stop took ≥ 1 ms):"
    );
    println!();
    println!("| threads | functions | floor | apply | rollback |");
    println!("|---:|---:|---:|---:|---:|");
    for r in patching {
        println!(
            "| {} | {} | {} | {} | {} |",
            r.threads, r.functions, r.floor_phases, r.apply_phases, r.rollback_phases
        );
    }
    println!();
    println!(
        "Per call of a patched function (direct jump): {:.3} ns unpatched, {:.3} ns patched, {:+.3} ns extra",
        call_cost.unpatched_ns, call_cost.patched_ns, call_cost.extra_ns
    );
}

/// Activation and rollback pauses for 1/8/64 threads × 1/10/100 functions,
/// each round beside the floor (stop + one write + resume) on the same
/// target; and the per-call cost of a patched function.
fn patch_pauses(context: &Context, quick: bool) -> anyhow::Result<(Vec<PatchRow>, CallCost)> {
    const FUNCTIONS: usize = 100;
    let rounds = if quick { 5 } else { 21 };
    let binary =
        shadowpatch_fixtures::build_c_source("many-100", &shadowpatch_fixtures::many_functions_source(FUNCTIONS))?;
    let object = shadowpatch_fixtures::build_c_patch(
        "many-100-patch",
        &shadowpatch_fixtures::many_functions_patch_source(FUNCTIONS),
    )?;
    let image = shadowpatch_symbols::ElfImage::open(&binary)?;
    let build_id = shadowpatch_symbols::hex(image.build_id.as_deref().unwrap_or_default());
    let manifests = tempfile::tempdir()?;
    let manifest_for = |n: usize| -> anyhow::Result<std::path::PathBuf> {
        let mut text = format!(
            "id = \"bench-{n}\"\nobject = \"{}\"\n[target]\nbuild_id = \"{build_id}\"\n",
            object.display()
        );
        for i in 0..n {
            text.push_str(&format!("[[replace]]\nsymbol = \"f{i}\"\nwith = \"f{i}_v2\"\n"));
        }
        let path = manifests.path().join(format!("bench-{n}.toml"));
        std::fs::write(&path, text)?;
        Ok(path)
    };
    let mut rows = Vec::new();
    for threads in [1usize, 8, 64] {
        let mut target = Running::start_binary(&binary, &[&threads.to_string()])?;
        let state = tempfile::tempdir()?;
        let identity = ProcessIdentity::of(target.pid())?;
        let maps = shadowpatch_process::maps::read_maps(target.pid())?;
        let f0 = shadowpatch_symbols::modules_of(target.pid(), &maps)?
            .into_iter()
            .find(|m| m.main)
            .and_then(|m| m.symbol_addresses("f0").first().map(|(a, _)| *a))
            .ok_or_else(|| anyhow::anyhow!("f0 not found in the benchmark target"))?;
        for functions in [1usize, 10, 100] {
            if !context.json {
                eprintln!("patch pause: {threads} threads, {functions} functions, {rounds} rounds ...");
            }
            let manifest = manifest_for(functions)?;
            let (mut floor, mut applied, mut rolled) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..rounds {
                let mut attached = Attached::seize(&identity)?;
                let mut stopped = attached.stop()?;
                let bytes = stopped.memory().read_vec(f0, 5)?;
                stopped.memory().write(f0, &bytes)?;
                floor.push(stopped.resume()?);
                attached.detach()?;
                let options = shadowpatch_patch::ApplyOptions::default();
                applied.push(
                    shadowpatch_patch::apply(state.path(), target.pid(), &manifest, &options)?
                        .activation
                        .pause,
                );
                rolled.push(shadowpatch_patch::rollback(state.path(), target.pid(), None)?.pause);
            }
            anyhow::ensure!(target.check()?["errors"] == 0, "wrong results while benchmarking");
            rows.push(PatchRow {
                threads,
                functions,
                rounds,
                floor_us: Percentiles::of(floor.iter().map(|r| r.pause_us).collect()).median,
                apply_us: Percentiles::of(applied.iter().map(|r| r.pause_us).collect()).median,
                rollback_us: Percentiles::of(rolled.iter().map(|r| r.pause_us).collect()).median,
                floor_phases: Phases::of(&floor),
                apply_phases: Phases::of(&applied),
                rollback_phases: Phases::of(&rolled),
            });
        }
    }
    // Per-call cost: f0 called in a loop on the target's main thread,
    // unpatched and patched (a direct jump: f0_v2 changes no more registers
    // than f0), best of several runs each.
    let mut target = Running::start_binary(&binary, &["1"])?;
    let state = tempfile::tempdir()?;
    let calls: u64 = if quick { 20_000_000 } else { 200_000_000 };
    let time = |target: &mut Running| time_calls(target, calls);
    let unpatched_ns = time(&mut target)?;
    let options = shadowpatch_patch::ApplyOptions::default();
    shadowpatch_patch::apply(state.path(), target.pid(), &manifest_for(1)?, &options)?;
    let patched_ns = time(&mut target)?;
    shadowpatch_patch::rollback(state.path(), target.pid(), None)?;
    Ok((
        rows,
        CallCost {
            unpatched_ns,
            patched_ns,
            extra_ns: patched_ns - unpatched_ns,
        },
    ))
}
