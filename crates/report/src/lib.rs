//! What the `shadowpatch`, `shadowpatch-bench` and `shadowpatch-train`
//! binaries share for showing results: percentiles of a sample, byte and
//! throughput formatting, pretty JSON on stdout, a progress bar, and
//! command-line usage errors on one line. One
//! crate, so the three binaries (which cannot depend on one another) do not
//! each carry a copy.

#![forbid(unsafe_code)]

mod progress;

pub use progress::Progress;

/// Parse the command line; a usage error is one line on stderr
/// (`BINARY: error: ... (see BINARY --help)`) and exit 2, help and
/// version print as clap prints them, and a missing subcommand prints the
/// help and exits 2.
pub fn parse_args<T: clap::Parser>(binary: &str) -> T {
    use clap::error::ErrorKind;
    match T::try_parse() {
        Ok(parsed) => parsed,
        Err(error) => {
            if matches!(error.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                error.exit();
            }
            if error.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                let _ = error.print();
                std::process::exit(2);
            }
            if let Some(line) = missing_arguments(binary, &error) {
                eprintln!("{binary}: error: {line}");
                std::process::exit(2);
            }
            let text = error.to_string();
            let first = text
                .lines()
                .next()
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("{binary}: error: {first} (see {binary} --help)");
            std::process::exit(2);
        }
    }
}

/// A missing-argument error on one line that names the arguments and the
/// subcommand (clap puts the names on the lines after its first).
fn missing_arguments(binary: &str, error: &clap::Error) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if error.kind() != ErrorKind::MissingRequiredArgument {
        return None;
    }
    let names = match error.get(ContextKind::InvalidArg) {
        Some(ContextValue::Strings(names)) => names.join(", "),
        Some(ContextValue::String(name)) => name.clone(),
        _ => return None,
    };
    let usage = match error.get(ContextKind::Usage) {
        Some(ContextValue::StyledStr(usage)) => usage.to_string(),
        _ => String::new(),
    };
    // "Usage: shadowpatch status <PID>" → "shadowpatch status".
    let command: Vec<&str> = usage
        .trim()
        .trim_start_matches("Usage:")
        .split_whitespace()
        .take_while(|word| !word.starts_with('<') && !word.starts_with('[') && !word.starts_with('-'))
        .collect();
    let command = if command.is_empty() {
        binary.to_string()
    } else {
        command.join(" ")
    };
    Some(format!(
        "missing required argument{} {names} (see {command} --help)",
        if names.contains(',') { "s" } else { "" }
    ))
}

/// Min, median, 99th percentile and max of a sample.
#[derive(Debug, serde::Serialize, Clone, Copy)]
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
pub fn print_json(value: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(value).expect("serializable"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
        assert_eq!(gb_per_s(1_000_000_000, 1_000_000), 1.0);
    }

    #[test]
    fn percentiles() {
        let p = Percentiles::of((1..=100).collect());
        assert_eq!((p.min, p.median, p.p99, p.max), (1, 51, 99, 100));
        assert_eq!(Percentiles::of(Vec::new()).max, 0);
    }
}
