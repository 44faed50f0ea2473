//! Host-wide library patches (`apply --all`): N processes mapping
//! libfleet, patched and rolled back through the operations layer exactly
//! as `shadowpatch apply --all` / `rollback --all` do (each process its own
//! journaled transaction, the analysis gate with one context sample per
//! process as `--all` takes by default, the history; members in parallel as the CLI's default `--jobs`), beside the floor measured on the same processes in the same
//! run: for each process, seize + stop + one 5-byte write (the bytes that
//! are there) + resume + detach, one after the other.

use anyhow::Context as _;
use serde::Serialize;
use shadowpatch_fixtures::{build_library_fixture, build_patch, Patch};
use shadowpatch_ops::set::{apply_set_with_progress, rollback_set_with_progress, Selector};
use shadowpatch_process::{Attached, ProcessIdentity};
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct FleetBench {
    pub processes: usize,
    pub workers: usize,
    /// Seize + stop + one write + resume + detach, per process in turn.
    pub floor_ms: f64,
    pub apply_all_ms: f64,
    pub rollback_all_ms: f64,
    /// The tool's own CPU time (all its threads, user + system) over the
    /// apply and the rollback, ms: unlike the wall time, what other load
    /// on a shared machine does not inflate.
    #[serde(default)]
    pub apply_cpu_ms: f64,
    #[serde(default)]
    pub rollback_cpu_ms: f64,
    /// Median activation pause per process, µs.
    pub apply_pause_median_us: u64,
    pub rollback_pause_median_us: u64,
}

/// The fleet's processes, killed and reaped on drop.
struct Fleet(Vec<Child>);

impl Drop for Fleet {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn run(json: bool, quick: bool) -> anyhow::Result<FleetBench> {
    let processes = if quick { 100 } else { 1000 };
    let fixture = build_library_fixture()?;
    let mut fleet = Fleet(Vec::with_capacity(processes));
    for _ in 0..processes {
        // No stdin: the program prints its ready line and waits forever.
        let mut child = Command::new(&fixture.program)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().expect("piped")).read_line(&mut line)?;
        anyhow::ensure!(line.starts_with("ready"), "fleet fixture said {line:?}");
        fleet.0.push(child);
    }
    let pids: Vec<i32> = fleet.0.iter().map(|c| c.id() as i32).collect();
    // fleet_value's address in each process (ASLR: each its own).
    let mut entries = Vec::with_capacity(processes);
    for pid in &pids {
        let maps = shadowpatch_process::maps::read_maps(*pid)?;
        let address = shadowpatch_symbols::modules_of(*pid, &maps)?
            .into_iter()
            .flat_map(|m| {
                m.symbol_addresses("fleet_value")
                    .into_iter()
                    .map(|(a, _)| a)
                    .collect::<Vec<_>>()
            })
            .next()
            .with_context(|| format!("fleet_value not found in pid {pid}"))?;
        entries.push((ProcessIdentity::of(*pid)?, address));
    }
    if !json {
        eprintln!("fleet: floor over {processes} processes ...");
    }
    let started = Instant::now();
    for (identity, address) in &entries {
        let mut attached = Attached::seize(identity)?;
        let mut stopped = attached.stop()?;
        let bytes = stopped.memory().read_vec(*address, 5)?;
        stopped.memory().write(*address, &bytes)?;
        stopped.resume()?;
        attached.detach()?;
    }
    let floor_ms = started.elapsed().as_secs_f64() * 1000.0;

    let state = tempfile::tempdir()?;
    let object = build_patch(Patch::FleetFix)?;
    let image = shadowpatch_symbols::ElfImage::open(&fixture.library)?;
    let build_id = shadowpatch_symbols::hex(image.build_id.as_deref().unwrap_or_default());
    let manifest = state.path().join("fleet.toml");
    std::fs::write(
        &manifest,
        format!(
            "id = \"fleet-bench\"\nobject = \"{}\"\n[target]\nbuild_id = \"{build_id}\"\n[[replace]]\nsymbol = \"fleet_value\"\nwith = \"fleet_value_v2\"\n",
            object.display()
        ),
    )?;
    let state_dir = state.path().join("state");
    let template = shadowpatch_ops::ApplyRequest {
        pid: 0,
        manifest,
        attempts: shadowpatch_patch::activate::DEFAULT_ATTEMPTS,
        force: false,
        analysis: shadowpatch_ops::AnalysisSettings {
            context_secs: 0.0,
            ..Default::default()
        },
        requested_by: "bench (fleet)".into(),
        baseline_module_only: false,
        no_ancestor_state: false,
    };
    // As `apply --all` / `rollback --all` do without `--jobs`.
    let workers = shadowpatch_ops::set::default_workers();
    if !json {
        eprintln!("fleet: apply --all over {processes} processes ({workers} workers) ...");
    }
    let me = std::process::id();
    let cpu_before = crate::agent::cpu_seconds(me)?;
    let started = Instant::now();
    let applied = apply_set_with_progress(
        Some(&state_dir),
        &Selector::All,
        &template,
        false,
        workers,
        &|request| shadowpatch_ops::apply(&state_dir, request, None, None),
        &|request| shadowpatch_ops::rollback(&state_dir, request),
        &|_| {},
    )?;
    let apply_all_ms = started.elapsed().as_secs_f64() * 1000.0;
    let apply_cpu_ms = (crate::agent::cpu_seconds(me)? - cpu_before) * 1000.0;
    anyhow::ensure!(
        applied.ok(),
        "apply --all failed: {:?}",
        applied.members.iter().find(|m| m.error.is_some())
    );
    let patched = applied
        .members
        .iter()
        .filter(|m| m.outcome == "applied" && pids.contains(&m.pid))
        .count();
    anyhow::ensure!(patched == processes, "{patched} of {processes} processes patched");
    if !json {
        eprintln!("fleet: rollback --all ...");
    }
    let cpu_before = crate::agent::cpu_seconds(me)?;
    let started = Instant::now();
    let rolled = rollback_set_with_progress(
        &state_dir,
        &Selector::All,
        None,
        workers,
        &|request| shadowpatch_ops::rollback(&state_dir, request),
        &|_| {},
    )?;
    let rollback_all_ms = started.elapsed().as_secs_f64() * 1000.0;
    let rollback_cpu_ms = (crate::agent::cpu_seconds(me)? - cpu_before) * 1000.0;
    anyhow::ensure!(rolled.ok(), "rollback --all failed");
    let median = |outcome: &shadowpatch_ops::set::SetOutcome| {
        shadowpatch_report::Percentiles::of(outcome.members.iter().filter_map(|m| m.pause_us).collect()).median
    };
    Ok(FleetBench {
        processes,
        workers,
        floor_ms,
        apply_all_ms,
        rollback_all_ms,
        apply_cpu_ms,
        rollback_cpu_ms,
        apply_pause_median_us: median(&applied),
        rollback_pause_median_us: median(&rolled),
    })
}

pub fn print(bench: &FleetBench) {
    println!(
        "## Host-wide library patch: {} processes mapping libfleet",
        bench.processes
    );
    println!();
    println!(
        "Floor: seize + stop + one 5-byte write + resume + detach, per process in turn, same processes, same run."
    );
    println!(
        "apply --all / rollback --all: through the operations layer (survey, analysis with a one-sample context, mirror, journal, history), {} workers each.",
        bench.workers
    );
    println!();
    println!("| what | total ms | per process ms | / floor | median pause µs | CPU ms per process |");
    println!("|---|---:|---:|---:|---:|---:|");
    let n = bench.processes as f64;
    let floor = bench.floor_ms.max(0.001);
    println!(
        "| floor | {:.0} | {:.3} | 1.00× | | |",
        bench.floor_ms,
        bench.floor_ms / n
    );
    for (what, total_ms, pause_us, cpu_ms) in [
        (
            "apply --all",
            bench.apply_all_ms,
            bench.apply_pause_median_us,
            bench.apply_cpu_ms,
        ),
        (
            "rollback --all",
            bench.rollback_all_ms,
            bench.rollback_pause_median_us,
            bench.rollback_cpu_ms,
        ),
    ] {
        println!(
            "| {what} | {total_ms:.0} | {:.3} | {:.1}× | {pause_us} | {:.2} |",
            total_ms / n,
            total_ms / floor,
            cpu_ms / n
        );
    }
}
