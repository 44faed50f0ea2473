//! `--only fleet-service`: the fleet predictor (`shadowpatch-predictor
//! serve`, HTTP on loopback, SQLite in a temporary folder) against its
//! floor, the same verdict computed in process (`shadowpatch_fleet::verdict`
//! on the same request, no HTTP, no database); and outcomes ingested per
//! second, one per request and in batches (each request committed before
//! its answer).

use crate::support::{BadInput, Percentiles};
use serde::Serialize;
use shadowpatch_fleet::storage::FleetHistory;
use shadowpatch_fleet::verdict::decide;
use shadowpatch_predict::finding::{Evidence, VerdictPolicy};
use shadowpatch_predict::remote::{ModelVersion, Outcome, OutcomeKind, VerdictRequest};
use shadowpatch_predict::ModelRisk;
use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct FleetServiceBench {
    pub verdict_rounds: usize,
    /// The verdict in process (the floor), µs.
    pub in_process_us: Percentiles,
    /// The same verdict through the service, µs.
    pub service_us: Percentiles,
    pub median_ratio: f64,
    pub p99_ratio: f64,
    pub single_outcomes: usize,
    pub single_outcomes_per_s: f64,
    pub batch_size: usize,
    pub batches: usize,
    pub batched_outcomes_per_s: f64,
}

/// The service, killed on drop.
struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn request() -> VerdictRequest {
    VerdictRequest {
        host: "bench-host".into(),
        patch_id: "bench-patch".into(),
        build_id: Some("ab12".into()),
        program: Some("/usr/sbin/bench".into()),
        findings: Vec::new(),
        features: [
            ("static.bytes_changed", 120.0),
            ("static.functions", 2.0),
            ("sim_calls", 8.0),
            ("sim_rate_crashes", 0.0),
        ]
        .into_iter()
        .map(|(name, value)| (name.to_string(), value))
        .collect(),
        evidence: Evidence {
            simulated_calls: 8,
            live_calls: 8,
            inconclusive_calls: 0,
            repeated_calls: 0,
        },
        policy: VerdictPolicy::default(),
    }
}

fn outcome(index: usize) -> Outcome {
    Outcome {
        host: format!("bench-{}", index % 16),
        analysis_id: None,
        patch_id: format!("patch-{}", index % 64),
        build_id: Some("ab12".into()),
        kind: OutcomeKind::Kept,
        cause: None,
        features: Default::default(),
        at_unix_ms: index as u64,
    }
}

pub fn run(json: bool, quick: bool) -> anyhow::Result<FleetServiceBench> {
    let binary = std::env::current_exe()?.with_file_name("shadowpatch-predictor");
    if !binary.is_file() {
        return Err(BadInput(format!(
            "{} is missing: build it with `cargo build --release -p shadowpatch-fleet`",
            binary.display()
        ))
        .into());
    }
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(&binary)
        .arg("--state-dir")
        .arg(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0", "--retrain-every", "86400"])
        .arg("--retrain-after")
        .arg(u64::MAX.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdout = child.stdout.take().expect("piped");
    let service = Service(child);
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .ok_or_else(|| anyhow::anyhow!("shadowpatch-predictor did not start (it said {line:?})"))?
        .to_string();
    let agent: ureq::Agent = ureq::Agent::config_builder().build().into();
    let post = |path: &str, body: &str| -> anyhow::Result<()> {
        let mut response = agent.post(&format!("{base}{path}")).send(body)?;
        response.body_mut().read_to_string()?;
        Ok(())
    };

    let rounds = if quick { 200 } else { 2000 };
    let request = request();
    let body = serde_json::to_string(&request)?;
    let model = ModelRisk::embedded().map_err(anyhow::Error::msg)?;
    let version = ModelVersion {
        version: 0,
        name: "built-in".into(),
        trained_on: 0,
        held_out_auc: None,
    };
    let history = FleetHistory::default();
    if !json {
        eprintln!("fleet-service: {rounds} verdicts in process and through the service ...");
    }
    // Warm up both (first connection, the model's parse, SQLite's cache).
    for _ in 0..20 {
        post("/v1/verdict", &body)?;
        std::hint::black_box(decide("x".into(), &request, &model, &version, &history));
    }
    let mut in_process = Vec::with_capacity(rounds);
    let mut through_service = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        std::hint::black_box(decide("x".into(), &request, &model, &version, &history));
        in_process.push(started.elapsed().as_micros() as u64);
        let started = Instant::now();
        post("/v1/verdict", &body)?;
        through_service.push(started.elapsed().as_micros() as u64);
    }
    let in_process_us = Percentiles::of(in_process);
    let service_us = Percentiles::of(through_service);

    let single = if quick { 200 } else { 1000 };
    let started = Instant::now();
    for index in 0..single {
        post("/v1/outcomes", &serde_json::to_string(&outcome(index))?)?;
    }
    let single_outcomes_per_s = single as f64 / started.elapsed().as_secs_f64();
    let (batch_size, batches) = (100, if quick { 20 } else { 100 });
    let started = Instant::now();
    for batch in 0..batches {
        let outcomes: Vec<Outcome> = (0..batch_size)
            .map(|i| outcome(single + batch * batch_size + i))
            .collect();
        post("/v1/outcomes", &serde_json::to_string(&outcomes)?)?;
    }
    let batched_outcomes_per_s = (batches * batch_size) as f64 / started.elapsed().as_secs_f64();
    drop(service);
    Ok(FleetServiceBench {
        verdict_rounds: rounds,
        median_ratio: service_us.median as f64 / in_process_us.median.max(1) as f64,
        p99_ratio: service_us.p99 as f64 / in_process_us.p99.max(1) as f64,
        in_process_us,
        service_us,
        single_outcomes: single,
        single_outcomes_per_s,
        batch_size,
        batches,
        batched_outcomes_per_s,
    })
}

pub fn print(bench: &FleetServiceBench) {
    println!(
        "## Fleet predictor: verdict latency, µs ({} rounds, HTTP on loopback, SQLite)",
        bench.verdict_rounds
    );
    println!();
    println!("Floor: the same verdict computed in process (model score + policy, no HTTP, no database).");
    println!();
    println!("| path | median | p99 | max |");
    println!("|---|---:|---:|---:|");
    for (name, p) in [
        ("in process (floor)", &bench.in_process_us),
        ("through the service", &bench.service_us),
    ] {
        println!("| {name} | {} | {} | {} |", p.median, p.p99, p.max);
    }
    println!(
        "| service / floor | {:.1}× | {:.1}× | |",
        bench.median_ratio, bench.p99_ratio
    );
    println!();
    println!("## Fleet predictor: outcomes ingested (each request committed before its answer)");
    println!();
    println!("| requests | outcomes per request | outcomes/s |");
    println!("|---:|---:|---:|");
    println!("| {} | 1 | {:.0} |", bench.single_outcomes, bench.single_outcomes_per_s);
    println!(
        "| {} | {} | {:.0} |",
        bench.batches, bench.batch_size, bench.batched_outcomes_per_s
    );
}
