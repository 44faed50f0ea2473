//! `shadowpatch-bench`: the measurements behind BENCHMARKS.md, each beside
//! its floor measured in the same run on real fixture processes: stop the
//! world, patching, static analysis and simulation, mirror and verify
//! throughput, dirty tracking, continuous verification, `apply --watch`,
//! the agent. A binary of its own so the shipped `shadowpatch` does not
//! link the test fixtures (built with gcc at run time); `shadowpatch bench
//! ARGS` runs it. Exit codes: 0 done, 2 bad input, 3 a measurement failed.

#![forbid(unsafe_code)]

mod agent;
mod build;
mod build_debian;
mod capture_stress;
mod dirty;
mod fleet;
mod fleet_service;
mod sections;
mod simulation;
mod support;
mod verdict_latency;
mod watch;
mod watch_window;

use clap::Parser;
use support::{BadInput, Context};

/// Exit code for input the user can fix.
const BAD_INPUT: i32 = 2;
/// Exit code for a measurement that failed.
const FAILED: i32 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "shadowpatch-bench",
    version,
    about = "Measure stop-the-world latency, patching, prediction, mirror/verify throughput, dirty tracking, watching and the agent"
)]
struct Cli {
    /// Smaller sizes and fewer rounds (seconds instead of a minute).
    #[arg(long)]
    quick: bool,
    /// Size of the executable-like region for throughput, in MiB.
    #[arg(long)]
    region_mib: Option<u64>,
    /// Run one section only (`watch`: continuous verification; `dirty`: data mirroring per dirty-tracking method; `prediction`: static analysis and simulation; `watch-window`: apply --watch; `agent`: the agent's overhead with many idle targets; `build`: patches from a diff against the floor; `pause`: activation and rollback pauses against the floor; `fleet`: apply --all over 1,000 processes mapping a library against the floor, not part of the full run; `capture-stress`: 10,000 captures in short sessions on a busy target, deaths and wrong results counted, not part of the full run; `verdict-latency`: analyze --capture 3 of a crashing patch on a loaded server, first captured call to verdict, beside the capture pause and copy fork floors; `fleet-service`: the fleet predictor's verdict latency against in-process scoring and its outcome ingestion, not part of the full run; `build-debian`: build --debian of Debian's lighttpd against the package's own build plus its rebuild after the diff, not part of the full run).
    #[arg(long, value_parser = ["watch", "dirty", "prediction", "watch-window", "agent", "build", "pause", "fleet", "capture-stress", "verdict-latency", "fleet-service", "build-debian"])]
    only: Option<String>,
    /// Machine-readable JSON on stdout instead of text.
    #[arg(long)]
    json: bool,
}

fn main() {
    let cli: Cli = shadowpatch_report::parse_args("shadowpatch-bench");
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_env("SHADOWPATCH_LOG"))
        .with_writer(std::io::stderr)
        .init();
    let context = Context { json: cli.json };
    match sections::run(&context, cli.quick, cli.region_mib, cli.only.as_deref()) {
        Ok(code) => std::process::exit(code),
        Err(error) => {
            let code = if error.chain().any(|cause| cause.downcast_ref::<BadInput>().is_some()) {
                BAD_INPUT
            } else {
                FAILED
            };
            let message = one_line(&error);
            if context.json {
                println!("{}", serde_json::json!({ "error": message, "exit_code": code }));
            }
            eprintln!("shadowpatch-bench: error: {message}");
            std::process::exit(code);
        }
    }
}

/// The error and its causes on one line, without repeating a cause that
/// the message above it already includes.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}
