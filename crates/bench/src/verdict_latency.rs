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
//!
//! Then the same on a real Debian server, when installed: Debian's
//! redis-server (stripped as shipped, its own crash reporter on SIGSEGV,
//! background threads), answering GETs from two load connections, with a
//! patch of its exported `getCommand` that writes through a null pointer.
//! Every GET must be answered, before, during and after.

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
    /// The fixture server, then Debian's redis-server when installed.
    pub servers: Vec<ServerLatency>,
}

#[derive(Debug, Serialize)]
pub struct ServerLatency {
    /// Which server, and its load.
    pub server: String,
    pub rounds: usize,
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

const REDIS: &str = "/usr/bin/redis-server";

pub fn run(context: &Context, quick: bool) -> anyhow::Result<VerdictLatencyBench> {
    let mut servers = vec![fixture_server(context, quick)?];
    if std::path::Path::new(REDIS).exists() {
        servers.push(redis_server(context, quick)?);
    } else if !context.json {
        eprintln!(
            "verdict-latency: {REDIS} is not installed (apt-get install -y redis-server): the Debian row is left out"
        );
    }
    Ok(VerdictLatencyBench { servers })
}

fn fixture_server(context: &Context, quick: bool) -> anyhow::Result<ServerLatency> {
    let server_threads = 4u32;
    let dir = tempfile::tempdir()?;
    if !context.json {
        eprintln!(
            "verdict-latency: a server with {server_threads} workers and a second process loading both cores ..."
        );
    }
    let _load = Running::start(Fixture::BusyC, &["2"])?;
    let mut server = Running::start(Fixture::Server, &[&server_threads.to_string()])?;
    // One command binds the server's strstr slot, which the patch object's
    // strstr (handle_command_libc) is resolved from.
    server.check()?;
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
    let mut latency = measure(context, quick, dir.path(), server.pid(), &manifest, "handle_command")?;
    anyhow::ensure!(server.check()?["errors"] == 0, "the live server answered wrong");
    latency.server = format!(
        "the `server` fixture ({server_threads} workers, about 10,000 requests a second each, its own SIGSEGV crash reporter; a second process loads both cores)"
    );
    Ok(latency)
}

/// Debian's redis-server on a free port, killed on drop.
struct Redis {
    child: std::process::Child,
    port: u16,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One inline-protocol command on `stream`, its reply's first line.
fn redis_command(stream: &mut std::io::BufReader<std::net::TcpStream>, line: &str) -> std::io::Result<String> {
    use std::io::{BufRead, Write};
    stream.get_mut().write_all(format!("{line}\r\n").as_bytes())?;
    let mut reply = String::new();
    if stream.read_line(&mut reply)? == 0 {
        return Err(std::io::Error::other("connection closed"));
    }
    if let Some(length) = reply.strip_prefix('$').and_then(|n| n.trim().parse::<usize>().ok()) {
        let mut value = vec![0u8; length + 2];
        std::io::Read::read_exact(stream, &mut value)?;
    }
    Ok(reply.trim_end().to_string())
}

fn redis_connect(port: u16) -> std::io::Result<std::io::BufReader<std::net::TcpStream>> {
    let stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(std::io::BufReader::new(stream))
}

fn redis_server(context: &Context, quick: bool) -> anyhow::Result<ServerLatency> {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    if !context.json {
        eprintln!("verdict-latency: Debian's redis-server on port {port}, GETs from two connections ...");
    }
    let child = std::process::Command::new(REDIS)
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let redis = Redis { child, port };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut client) = redis_connect(port) {
            if redis_command(&mut client, "SET key value").is_ok_and(|reply| reply == "+OK") {
                break;
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "redis-server did not answer on port {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (stop, answered, failed) = (stop.clone(), answered.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut client = redis_connect(port).ok();
                while !stop.load(Ordering::Relaxed) {
                    let reply = client.as_mut().map(|c| redis_command(c, "GET key"));
                    match reply {
                        Some(Ok(reply)) if reply == "$5" => {
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            client = redis_connect(port).ok();
                        }
                    }
                }
            })
        })
        .collect();

    // The crashing replacement, built here: redis's handlers take a client*.
    let source = dir.path().join("crash.c");
    std::fs::write(
        &source,
        "void getCommand_crash(void *c) { (void)c; *(volatile int *)0 = 1; }\n",
    )?;
    let object = dir.path().join("crash.so");
    let status = std::process::Command::new("gcc")
        .args(["-O2", "-fPIC", "-shared", "-o"])
        .arg(&object)
        .arg(&source)
        .status()?;
    anyhow::ensure!(status.success(), "gcc failed on {}", source.display());
    let binary = std::fs::canonicalize(REDIS)?;
    let image = shadowpatch_symbols::ElfImage::open(&binary)?;
    let manifest = dir.path().join("crash.toml");
    std::fs::write(
        &manifest,
        format!(
            "id = \"redis-crash\"\nobject = \"{}\"\n[target]\nbuild_id = \"{}\"\n[[replace]]\nsymbol = \"getCommand\"\nwith = \"getCommand_crash\"\n",
            object.display(),
            shadowpatch_symbols::hex(image.build_id.as_deref().unwrap_or_default())
        ),
    )?;
    let pid = redis.child.id() as i32;
    let result = measure(context, quick, dir.path(), pid, &manifest, "getCommand");
    stop.store(true, Ordering::Relaxed);
    for thread in load {
        let _ = thread.join();
    }
    let mut latency = result?;
    let (answered, failed) = (answered.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    anyhow::ensure!(answered > 0, "redis-server answered no GET");
    anyhow::ensure!(
        failed == 0,
        "{failed} GETs of {} failed: the live server was harmed",
        answered + failed
    );
    anyhow::ensure!(
        redis_connect(redis.port).and_then(|mut c| redis_command(&mut c, "GET key"))? == "$5",
        "redis-server no longer answers"
    );
    latency.server = format!(
        "Debian's redis-server ({}, stripped, its own crash reporter; two connections answered {answered} GETs, 0 failed)",
        binary.display()
    );
    Ok(latency)
}

/// `rounds` analyses of `manifest` (a crashing patch of `symbol`) on
/// `pid`, then the floors.
fn measure(
    context: &Context,
    quick: bool,
    dir: &std::path::Path,
    pid: i32,
    manifest: &std::path::Path,
    symbol: &str,
) -> anyhow::Result<ServerLatency> {
    let rounds = if quick { 3 } else { 10 };
    let state = dir.join("state");
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
        let report = analyze(&state, pid, manifest, &settings, "analyze", Some(sink))?;
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
    let mut bench = HitBench::open(&dir.join("floor-state"), pid, symbol)?;
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
    let forks = copy_fork_floor(&dir.join("floor-state"), pid, if quick { 20 } else { 100 })?;
    // µs → ms in the percentiles of the latency rows.
    let in_ms = |v: Vec<u64>| Percentiles::of(v.into_iter().map(|us| us / 1000).collect());
    Ok(ServerLatency {
        server: String::new(),
        rounds,
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
    for server in &bench.servers {
        print_server(server);
    }
}

fn print_server(bench: &ServerLatency) {
    println!();
    println!(
        "## Verdict latency: `analyze --capture 3` of a crashing patch on {}, {} rounds",
        bench.server, bench.rounds
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
