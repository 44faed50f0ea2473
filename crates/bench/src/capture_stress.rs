//! `shadowpatch bench --only capture-stress`: a capture never harms the
//! live process. Many short capture sessions on a busy multi-threaded
//! target (compute workers, a note worker, and a churner creating threads
//! and processes all along), each session arming breakpoints on three
//! functions, capturing calls by remote clone, taking each breakpoint out
//! once its function has its calls, and detaching; every captured copy is
//! run to its return and its result checked. Not part of the full run
//! (minutes).

use crate::support::Context;
use serde::Serialize;
use shadowpatch_fixtures::{Fixture, Running};
use shadowpatch_predict::simulate::bench::{capture_stress, StressFigures, StressFunction};

#[derive(Debug, Serialize)]
pub struct StressRow {
    /// What each session did.
    pub sessions_of: String,
    pub figures: StressFigures,
    /// Wrong results the live target itself counted (its workers check
    /// every call, its children's too).
    pub live_errors: u64,
    pub threads_born: u64,
    pub processes_born: u64,
}

#[derive(Debug, Serialize)]
pub struct CaptureStressBench {
    pub compute_threads: u32,
    pub rows: Vec<StressRow>,
}

pub fn run(context: &Context, quick: bool) -> anyhow::Result<CaptureStressBench> {
    let captures: u64 = if quick { 1_000 } else { 10_000 };
    let compute_threads = 3u32;
    let functions = StressFunction::sim_fixture();
    // (captures per function and session, one hit in N captured, label)
    let plans = [
        (2u32, 3u64, "2 captures per function, 1 hit in 3 captured"),
        (100, 1, "100 captures per function, every hit captured"),
    ];
    let mut rows = Vec::new();
    for (per_session, every, label) in plans {
        if !context.json {
            eprintln!("capture-stress: {captures} captures, sessions of {label} ...");
        }
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("service.log");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port().to_string();
        let mut target = Running::start(
            Fixture::Sim,
            &[&compute_threads.to_string(), log.to_str().unwrap_or_default(), &port],
        )?;
        anyhow::ensure!(
            target.command("churn")? == "churning",
            "the target did not start churning"
        );
        let figures = capture_stress(
            &dir.path().join("state"),
            target.pid(),
            &functions,
            captures,
            per_session,
            every,
        )?;
        let check = if target.is_running() {
            target.check()?
        } else {
            Default::default()
        };
        rows.push(StressRow {
            sessions_of: label.to_string(),
            live_errors: check.get("errors").copied().unwrap_or(0),
            threads_born: check.get("churned").copied().unwrap_or(0),
            processes_born: check.get("forked").copied().unwrap_or(0),
            figures,
        });
        drop(udp);
    }
    let bench = CaptureStressBench { compute_threads, rows };
    anyhow::ensure!(
        bench
            .rows
            .iter()
            .all(|r| r.figures.deaths == 0 && r.figures.wrong == 0 && r.live_errors == 0),
        "a capture harmed the target: {:?}",
        bench.rows
    );
    Ok(bench)
}

pub fn print(bench: &CaptureStressBench) {
    println!();
    println!(
        "## Capture stress: {} compute threads + a note thread + thread/process churn, sessions armed and disarmed back to back",
        bench.compute_threads
    );
    println!();
    println!("Every captured copy is run to its return and its result checked (wrong); the target checks every live");
    println!(
        "call itself (live errors). Born: threads and processes the target created during the run (while armed: new)."
    );
    println!();
    println!("| sessions of | sessions | hits | captures | deaths | wrong | live errors | threads born (new while armed) | processes born (new while armed) | hits/s | captures/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in &bench.rows {
        let f = &row.figures;
        let seconds = (f.elapsed_us as f64 / 1e6).max(1e-6);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} ({}) | {} ({}) | {:.0} | {:.0} |",
            row.sessions_of,
            f.sessions,
            f.hits,
            f.captures,
            f.deaths,
            f.wrong,
            row.live_errors,
            row.threads_born,
            f.new_threads,
            row.processes_born,
            f.new_processes,
            f.hits as f64 / seconds,
            f.captures as f64 / seconds
        );
    }
}
