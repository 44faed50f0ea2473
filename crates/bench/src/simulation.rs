//! The simulation section of `shadowpatch bench`: what capturing a live
//! call costs the calling thread of a process with 100 MiB resident, beside
//! floors measured in the same run: a bare breakpoint hit stepped past, a
//! remote `getpid` in the thread, and `fork()` called by the target itself
//! (a capture is a fork made from outside: it cannot cost less). Each hit
//! is seen from our side (trap noticed → thread resumed) and from the
//! target's (the fixture times every call of the function; the trapped
//! call is found by its argument). Then a whole simulation of N captured
//! calls.

use crate::support::Context;
use crate::support::Percentiles;
use serde::Serialize;
use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use shadowpatch_predict::simulate::bench::{HitBench, HitHandling};
use shadowpatch_predict::simulate::{simulate, CaptureLimit, Limits, Progress, SimulationOptions};
use std::time::Duration;

/// Resident ballast of the benchmark target.
const RSS_MIB: u64 = 100;

#[derive(Debug, Serialize)]
pub struct HitRow {
    /// What each hit (or, for the fork floor, each fork) did.
    pub handling: String,
    pub hits: usize,
    /// Trap noticed → thread resumed, µs.
    pub tool_us: Percentiles,
    /// The call's duration as the target measured it, µs (the fork floor:
    /// the fork() call's).
    pub target_us: Percentiles,
}

#[derive(Debug, Serialize)]
pub struct EndToEnd {
    pub calls: usize,
    /// Repeats of each call in the same copies.
    pub repeat: u32,
    pub total_ms: f64,
    /// Simulating the captured calls (after capture), ms.
    pub simulate_ms: f64,
    pub per_call_ms: f64,
    pub pause_median_us: u64,
    pub pause_max_us: u64,
}

#[derive(Debug, Serialize)]
pub struct SimulationBench {
    pub rss_mib: u64,
    pub rows: Vec<HitRow>,
    pub end_to_end: EndToEnd,
    /// The same, each call run once (no repeats): the repeats' cost.
    pub end_to_end_once: EndToEnd,
}

pub fn run(context: &Context, quick: bool) -> anyhow::Result<SimulationBench> {
    let (blocks, hits, calls) = if quick { (3, 10, 20) } else { (10, 20, 100) };
    let dir = tempfile::tempdir()?;
    let log = dir.path().join("service.log");
    let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let port = udp.local_addr()?.port().to_string();
    if !context.json {
        eprintln!("simulation: starting a target with {RSS_MIB} MiB resident ...");
    }
    let mut target = Running::start(
        Fixture::Sim,
        &["1", log.to_str().unwrap_or_default(), &port, &RSS_MIB.to_string()],
    )?;
    let rss_mib = resident_mib(target.pid());
    let state = dir.path().join("state");
    let mut bench = HitBench::open(&state, target.pid(), "compute")?;
    let kinds = [HitHandling::StepPast, HitHandling::RemoteGetpid, HitHandling::Capture];
    let mut tool: [Vec<u64>; 3] = Default::default();
    let mut seen: [Vec<u64>; 3] = Default::default();
    let mut forks = Vec::new();
    for block in 0..blocks {
        if !context.json {
            eprintln!("simulation: breakpoint hits, block {}/{blocks} ...", block + 1);
        }
        for (index, handling) in kinds.iter().enumerate() {
            target.command("slow")?;
            let block = bench.block(*handling, hits, Duration::from_secs(20))?;
            let slow = slow_calls(&target.command("slow")?);
            for (pause, argument) in block {
                tool[index].push(pause);
                // The target's own timing of the same call (its argument
                // cycles through 65536 values: the slow one is ours).
                if let Some((_, took)) = slow.iter().find(|(x, _)| *x == argument) {
                    seen[index].push(*took);
                }
            }
        }
        forks.extend(durations(&target.command(&format!("forktime {hits}"))?));
    }
    bench.close()?;
    anyhow::ensure!(
        target.check()?["errors"] == 0,
        "wrong results while benchmarking captures"
    );
    let names = [
        "stepped past (floor)",
        "remote getpid, stepped past",
        "captured (remote clone), stepped past",
    ];
    let mut rows: Vec<HitRow> = names
        .iter()
        .enumerate()
        .map(|(index, name)| HitRow {
            handling: name.to_string(),
            hits: tool[index].len(),
            tool_us: Percentiles::of(tool[index].clone()),
            target_us: Percentiles::of(seen[index].clone()),
        })
        .collect();
    rows.push(HitRow {
        handling: "fork() by the target itself (floor of a capture)".into(),
        hits: forks.len(),
        tool_us: Percentiles::of(Vec::new()),
        target_us: Percentiles::of(forks),
    });

    if !context.json {
        eprintln!("simulation: capturing and simulating {calls} live calls ...");
    }
    let manifest = dir.path().join("same.toml");
    let image = shadowpatch_symbols::ElfImage::open(&target.binary())?;
    std::fs::write(
        &manifest,
        format!(
            "id = \"same\"\nobject = \"{}\"\n[target]\nbuild_id = \"{}\"\n[[replace]]\nsymbol = \"compute\"\nwith = \"compute_same\"\n",
            build_patch(Patch::SimPatches)?.display(),
            shadowpatch_symbols::hex(image.build_id.as_deref().unwrap_or_default())
        ),
    )?;
    let survey = shadowpatch_predict::survey_for_analysis(target.pid(), &manifest, &state)?;
    // Side by side: the calls repeated (the default) and run once.
    let repeated = end_to_end(&mut target, &state, &survey, calls, SimulationOptions::default().repeat)?;
    let once = end_to_end(&mut target, &state, &survey, calls, 0)?;
    drop(udp);
    Ok(SimulationBench {
        rss_mib,
        rows,
        end_to_end: repeated,
        end_to_end_once: once,
    })
}

/// Capture and simulate `calls` live calls, each repeated `repeat` times.
fn end_to_end(
    target: &mut Running,
    state: &std::path::Path,
    survey: &shadowpatch_patch::survey::Survey,
    calls: u32,
    repeat: u32,
) -> anyhow::Result<EndToEnd> {
    let options = SimulationOptions {
        capture: Some(CaptureLimit {
            calls,
            within: Some(Duration::from_secs(60)),
            spread: false,
        }),
        limits: Limits::default(),
        repeat,
        ..SimulationOptions::default()
    };
    let report = simulate(state, survey, &options, &mut |_: Progress| {})?;
    anyhow::ensure!(
        report.calls.len() == calls as usize,
        "captured {} calls",
        report.calls.len()
    );
    anyhow::ensure!(target.check()?["errors"] == 0, "wrong results while simulating");
    let pauses = Percentiles::of(report.capture.as_ref().map(|c| c.pauses_us.clone()).unwrap_or_default());
    Ok(EndToEnd {
        calls: report.calls.len(),
        repeat,
        total_ms: report.total_us as f64 / 1000.0,
        simulate_ms: report.simulate_us as f64 / 1000.0,
        per_call_ms: report.total_us as f64 / 1000.0 / report.calls.len().max(1) as f64,
        pause_median_us: pauses.median,
        pause_max_us: pauses.max,
    })
}

/// Print the section's tables.
pub fn print(bench: &SimulationBench) {
    println!();
    println!(
        "## Simulation: live pause per breakpoint hit, target with {} MiB resident, µs",
        bench.rss_mib
    );
    println!();
    println!("Tool side: trap noticed → thread resumed. Target side: the call's duration as the target timed it");
    println!("(includes the trap and our polling). Floor: a bare hit stepped past, in the same session.");
    println!();
    println!("| each hit | hits | tool median | tool p99 | target median | target p99 | target / step-past floor | target / fork floor |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let floor = bench.rows[0].target_us.median.max(1) as f64;
    let fork_floor = bench.rows[3].target_us.median.max(1) as f64;
    for row in &bench.rows {
        let tool = |v: u64| {
            if row.tool_us.max == 0 {
                "-".to_string()
            } else {
                v.to_string()
            }
        };
        println!(
            "| {} | {} | {} | {} | {} | {} | {:.1}× | {:.2}× |",
            row.handling,
            row.hits,
            tool(row.tool_us.median),
            tool(row.tool_us.p99),
            row.target_us.median,
            row.target_us.p99,
            row.target_us.median as f64 / floor,
            row.target_us.median as f64 / fork_floor
        );
    }
    println!();
    println!("End to end, the same captures simulated with the default repeats and with each call run once:");
    println!();
    println!("| each call | calls | total ms | simulating ms | per call ms | simulating / once | live pause median µs | max µs |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let once = bench.end_to_end_once.simulate_ms.max(0.001);
    for e in [&bench.end_to_end, &bench.end_to_end_once] {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.1} | {:.2}× | {} | {} |",
            if e.repeat == 0 {
                "run once".to_string()
            } else {
                format!("run, then repeated {} times", e.repeat)
            },
            e.calls,
            e.total_ms,
            e.simulate_ms,
            e.per_call_ms,
            e.simulate_ms / once,
            e.pause_median_us,
            e.pause_max_us
        );
    }
}

/// `slow=N calls=X1:D1,X2:D2,...` → (argument, µs) pairs.
fn slow_calls(answer: &str) -> Vec<(u64, u64)> {
    answer
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("calls="))
        .map(|list| {
            list.split(',')
                .filter_map(|pair| {
                    let (x, us) = pair.split_once(':')?;
                    Some((x.parse().ok()?, us.parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `us=D1,D2,...` → the durations.
fn durations(answer: &str) -> Vec<u64> {
    answer
        .strip_prefix("us=")
        .map(|list| list.split(',').filter_map(|d| d.parse().ok()).collect())
        .unwrap_or_default()
}

fn resident_mib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kib| kib / 1024)
}
