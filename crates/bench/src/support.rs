//! What the sections share: the options every section receives,
//! percentiles of a sample, stop/resume rounds, and printing helpers.

use serde::Serialize;
use shadowpatch_process::{Attached, PauseReport};
use std::path::PathBuf;

/// Options every section receives.
#[derive(Debug, Clone)]
pub struct Context {
    /// Machine-readable JSON on stdout instead of text.
    pub json: bool,
}

/// Marks an error as caused by the user's input (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadInput(pub String);

#[derive(Debug, Serialize, Clone, Copy)]
pub struct Percentiles {
    pub min: u64,
    pub median: u64,
    pub p99: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(mut values: Vec<u64>) -> Percentiles {
        values.sort_unstable();
        if values.is_empty() {
            return Percentiles {
                min: 0,
                median: 0,
                p99: 0,
                max: 0,
            };
        }
        let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
        Percentiles {
            min: values[0],
            median: at(0.5),
            p99: at(0.99),
            max: values[values.len() - 1],
        }
    }
}

/// Stop and resume `attached` `rounds` times; one report per round.
pub fn collect(attached: &mut Attached, rounds: u32) -> anyhow::Result<Vec<PauseReport>> {
    let mut reports: Vec<PauseReport> = Vec::with_capacity(rounds as usize);
    for _ in 0..rounds {
        reports.push(attached.stop()?.resume()?);
    }
    Ok(reports)
}

/// 1536 → "1.5 KiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Throughput in GB/s (10^9 bytes per second) from bytes and microseconds.
pub fn gb_per_s(bytes: u64, micros: u64) -> f64 {
    if micros == 0 {
        return 0.0;
    }
    bytes as f64 / micros as f64 / 1000.0
}

/// Print a value as pretty JSON on stdout.
pub fn print_json(value: &impl Serialize) {
    println!("{}", serde_json::to_string_pretty(value).expect("serializable"));
}

/// The `shadowpatch` binary next to this one (the agent section runs
/// `shadowpatch agent` and `shadowpatch watch` processes).
pub fn shadowpatch_binary() -> anyhow::Result<PathBuf> {
    let current = std::env::current_exe()?;
    let path = current.with_file_name("shadowpatch");
    if !path.is_file() {
        return Err(BadInput(format!(
            "{} is missing: build it with `cargo build --release -p shadowpatch`",
            path.display()
        ))
        .into());
    }
    Ok(path)
}
