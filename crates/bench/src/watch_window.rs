//! `shadowpatch bench --only watch-window`: the costs of `apply --watch`,
//! each beside its floor measured in the same run on the same target:
//! fatal signal in patch code → call resumed in the original (floor: the
//! rollback's own stop), per-call cost of the watch stub (floor: the
//! direct jump), and regression decision → rollback complete (floor: the
//! rollback's stop).

use crate::support::print_json;
use crate::support::Context;
use crate::support::Percentiles;
use serde::Serialize;
use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use shadowpatch_patch::watchwindow::WindowEvent;
use shadowpatch_patch::{apply, apply_watched, rollback, ApplyOptions};
use std::time::{Duration, Instant};

#[derive(Debug, Serialize)]
pub struct WatchWindowBench {
    pub rounds: usize,
    /// Fault seen → faulting thread resumed in the original, µs.
    pub fault_to_resumed_us: Percentiles,
    /// The rollback stop inside it (stop + restore + rewind + resume), µs.
    pub rollback_pause_us: Percentiles,
    /// Regression decision → rollback complete (journal committed,
    /// mapping unmapped or retired), µs.
    pub decision_to_rollback_us: Percentiles,
    pub decision_rollback_pause_us: Percentiles,
    pub unpatched_ns: f64,
    pub direct_ns: f64,
    pub stub_ns: f64,
}

fn manifest(
    dir: &std::path::Path,
    id: &str,
    object: &std::path::Path,
    binary: &std::path::Path,
    pairs: &[(&str, &str)],
) -> anyhow::Result<std::path::PathBuf> {
    let image = shadowpatch_symbols::ElfImage::open(binary)?;
    let build_id = shadowpatch_symbols::hex(image.build_id.as_deref().unwrap_or_default());
    let mut text = format!(
        "id = \"{id}\"\nobject = \"{}\"\n[target]\nbuild_id = \"{build_id}\"\n",
        object.display()
    );
    for (symbol, with) in pairs {
        text.push_str(&format!("[[replace]]\nsymbol = \"{symbol}\"\nwith = \"{with}\"\n"));
    }
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

pub fn measure(context: &Context, quick: bool) -> anyhow::Result<WatchWindowBench> {
    let rounds = if quick { 5 } else { 21 };
    let dir = tempfile::tempdir()?;
    let object = build_patch(Patch::BusyWatch)?;
    let (mut resumed, mut fault_pause, mut decided, mut decided_pause) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut target = Running::start(Fixture::BusyC, &["2"])?;
    let binary = target.binary();
    if !context.json {
        eprintln!("watch window: {rounds} faults survived, {rounds} decisions rolled back ...");
    }
    for round in 0..rounds {
        let state = dir.path().join(format!("state-{round}"));
        let null = manifest(
            dir.path(),
            &format!("null-{round}"),
            &object,
            &binary,
            &[("work_fn", "work_fn_null")],
        )?;
        let (_, mut window) = apply_watched(&state, target.pid(), &null, &ApplyOptions::default())?;
        let started = Instant::now();
        loop {
            match window.poll()? {
                WindowEvent::Quiet => {}
                WindowEvent::Recovered(recovery) => {
                    resumed.push(recovery.resumed_us);
                    fault_pause.push(recovery.rollback.pause_us);
                    break;
                }
                other => anyhow::bail!("the benchmark target went down: {other:?}"),
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(10), "no fault within 10 s");
            std::thread::sleep(Duration::from_micros(100));
        }
        for _ in 0..20 {
            window.poll()?;
            std::thread::sleep(Duration::from_micros(200));
        }
        window.close()?;
        let fine = manifest(
            dir.path(),
            &format!("fine-{round}"),
            &object,
            &binary,
            &[("work_fn", "work_fn_fine")],
        )?;
        let (_, window) = apply_watched(&state, target.pid(), &fine, &ApplyOptions::default())?;
        let decision = Instant::now();
        let outcome = window.rollback("bench")?;
        decided.push(decision.elapsed().as_micros() as u64);
        decided_pause.push(outcome.pause_us);
    }
    anyhow::ensure!(target.check()?["errors"] == 0, "wrong results while benchmarking");
    drop(target);

    // Per-call cost: f0 of the many-functions program called in a loop on
    // its main thread: unpatched, through a direct jump, through a stub.
    if !context.json {
        eprintln!("watch window: per-call cost of the stub ...");
    }
    let binary = shadowpatch_fixtures::build_c_source("many-100", &shadowpatch_fixtures::many_functions_source(100))?;
    let object = shadowpatch_fixtures::build_c_patch(
        "many-100-patch",
        &shadowpatch_fixtures::many_functions_patch_source(100),
    )?;
    let mut target = Running::start_binary(&binary, &["1"])?;
    let state = dir.path().join("state-cost");
    let calls: u64 = if quick { 20_000_000 } else { 200_000_000 };
    let time = |target: &mut Running| crate::sections::time_calls(target, calls);
    let unpatched_ns = time(&mut target)?;
    let direct = manifest(dir.path(), "direct", &object, &binary, &[("f0", "f0_v2")])?;
    apply(&state, target.pid(), &direct, &ApplyOptions::default())?;
    let direct_ns = time(&mut target)?;
    rollback(&state, target.pid(), None)?;
    let stubbed = manifest(dir.path(), "stubbed", &object, &binary, &[("f0", "f0_v2")])?;
    let options = ApplyOptions {
        watch_stubs: true,
        ..ApplyOptions::default()
    };
    apply(&state, target.pid(), &stubbed, &options)?;
    let stub_ns = time(&mut target)?;
    rollback(&state, target.pid(), None)?;
    Ok(WatchWindowBench {
        rounds,
        fault_to_resumed_us: Percentiles::of(resumed),
        rollback_pause_us: Percentiles::of(fault_pause),
        decision_to_rollback_us: Percentiles::of(decided),
        decision_rollback_pause_us: Percentiles::of(decided_pause),
        unpatched_ns,
        direct_ns,
        stub_ns,
    })
}

pub fn print(bench: &WatchWindowBench) {
    println!("## Watch window (apply --watch), {} rounds", bench.rounds);
    println!();
    println!("| what | median | p99 | floor (median) | vs floor |");
    println!("|---|---:|---:|---:|---:|");
    let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    println!(
        "| fatal signal in patch code (seen in its signal-delivery stop) → call resumed in the original | {} µs | {} µs | {} µs rollback stop | {:.1}× |",
        bench.fault_to_resumed_us.median,
        bench.fault_to_resumed_us.p99,
        bench.rollback_pause_us.median,
        ratio(bench.fault_to_resumed_us.median, bench.rollback_pause_us.median)
    );
    println!(
        "| regression decision → rollback complete | {} µs | {} µs | {} µs rollback stop | {:.1}× |",
        bench.decision_to_rollback_us.median,
        bench.decision_to_rollback_us.p99,
        bench.decision_rollback_pause_us.median,
        ratio(
            bench.decision_to_rollback_us.median,
            bench.decision_rollback_pause_us.median
        )
    );
    println!();
    println!("| per call (best of 5) | ns | extra vs unpatched | stub / direct |");
    println!("|---|---:|---:|---:|");
    println!("| unpatched | {:.2} | | |", bench.unpatched_ns);
    println!(
        "| direct jump | {:.2} | {:+.2} | |",
        bench.direct_ns,
        bench.direct_ns - bench.unpatched_ns
    );
    println!(
        "| watch stub | {:.2} | {:+.2} | {:.2}× |",
        bench.stub_ns,
        bench.stub_ns - bench.unpatched_ns,
        bench.stub_ns / bench.direct_ns.max(1e-9)
    );
}

/// `bench --only watch-window`.
pub fn run(context: &Context, quick: bool) -> anyhow::Result<i32> {
    let bench = measure(context, quick)?;
    if context.json {
        print_json(&bench);
    } else {
        print(&bench);
    }
    Ok(0)
}
