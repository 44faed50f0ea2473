//! `shadowpatch bench --only agent`: the agent's CPU use while it watches
//! many idle targets, side by side with the same targets watched by one
//! `shadowpatch watch` process each (the peer the agent replaces), same
//! interval and budget, measured in one run.

use serde::Serialize;
use shadowpatch_agent::ControlRequest;
use shadowpatch_fixtures::{Fixture, Running};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Serialize)]
pub struct AgentRow {
    pub setting: String,
    pub targets: usize,
    pub processes: usize,
    pub window_s: f64,
    /// CPU time of the watching process(es) over wall time, in percent of one core.
    pub cpu_percent: f64,
}

#[derive(Debug, Serialize)]
pub struct AgentBench {
    pub interval: String,
    pub rows: Vec<AgentRow>,
    /// Agent with N targets ÷ N `watch` processes.
    pub agent_vs_processes: f64,
}

/// utime + stime of `pid`, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(") ").map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state is field 3, utime 14 and stime 15 (1-based).
    let ticks: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    Ok(ticks as f64 / per_second)
}

/// CPU percent of `pids` over `window`.
fn measure(pids: &[u32], window: Duration) -> anyhow::Result<f64> {
    let before: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum::<anyhow::Result<f64>>()?;
    let started = Instant::now();
    std::thread::sleep(window);
    let after: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum::<anyhow::Result<f64>>()?;
    Ok((after - before) / started.elapsed().as_secs_f64() * 100.0)
}

struct Spawned {
    child: Child,
    _stdout: BufReader<ChildStdout>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start a `shadowpatch` subprocess and wait for its first stdout line.
fn spawn_ready(state_dir: &Path, args: &[&str]) -> anyhow::Result<Spawned> {
    let mut child = Command::new(crate::support::shadowpatch_binary()?)
        .args(args)
        .arg("--state-dir")
        .arg(state_dir)
        .arg("--json")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut stdout = BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    stdout.read_line(&mut line)?;
    anyhow::ensure!(
        !line.is_empty(),
        "shadowpatch {} exited before its first line",
        args.join(" ")
    );
    Ok(Spawned { child, _stdout: stdout })
}

pub fn run(json: bool, quick: bool) -> anyhow::Result<AgentBench> {
    let targets_count = if quick { 20 } else { 100 };
    let window = Duration::from_secs(if quick { 3 } else { 10 });
    let interval = "1s";
    let dir = tempfile::tempdir()?;
    let state = dir.path().join("state");
    let socket = dir.path().join("agent.sock");
    let socket_text = socket.to_str().expect("temporary paths are UTF-8");
    let app_text = dir.path().join("app.sock").to_str().expect("UTF-8").to_string();
    let agent_args = [
        "agent",
        "--agent-socket",
        socket_text,
        "--app-socket",
        &app_text,
        "--metrics-listen",
        "off",
        "--watch-interval",
        interval,
    ];
    let agent = spawn_ready(&state, &agent_args)?;
    let agent_pid = agent.child.id();
    let mut rows = Vec::new();
    rows.push(AgentRow {
        setting: "agent, nothing watched".into(),
        targets: 0,
        processes: 1,
        window_s: window.as_secs_f64(),
        cpu_percent: measure(&[agent_pid], window)?,
    });
    if !json {
        eprintln!("agent: starting {targets_count} idle targets and watching them ...");
    }
    let targets: Vec<Running> = (0..targets_count)
        .map(|_| Running::start(Fixture::BusyC, &["0"]))
        .collect::<Result<_, _>>()?;
    for target in &targets {
        let request = ControlRequest::Watch {
            state_dir: state.clone(),
            pid: target.pid(),
            heal: false,
        };
        shadowpatch_agent::request(&socket, &request)?
            .ok_or_else(|| anyhow::anyhow!("the agent at {} did not answer", socket.display()))?;
    }
    let with_targets = measure(&[agent_pid], window)?;
    rows.push(AgentRow {
        setting: format!("agent, {targets_count} idle targets, interval {interval}"),
        targets: targets_count,
        processes: 1,
        window_s: window.as_secs_f64(),
        cpu_percent: with_targets,
    });
    drop(agent);

    if !json {
        eprintln!("agent: the same targets with one `watch` process each ...");
    }
    let watchers: Vec<Spawned> = targets
        .iter()
        .map(|t| spawn_ready(&state, &["watch", &t.pid().to_string(), "--interval", interval]))
        .collect::<anyhow::Result<_>>()?;
    let pids: Vec<u32> = watchers.iter().map(|w| w.child.id()).collect();
    let separate = measure(&pids, window)?;
    rows.push(AgentRow {
        setting: format!("{targets_count} `watch` processes, interval {interval}"),
        targets: targets_count,
        processes: targets_count,
        window_s: window.as_secs_f64(),
        cpu_percent: separate,
    });
    Ok(AgentBench {
        interval: interval.into(),
        rows,
        agent_vs_processes: if separate > 0.0 { with_targets / separate } else { 0.0 },
    })
}

pub fn print(bench: &AgentBench) {
    println!(
        "\n## Agent overhead (idle targets, watch interval {})\n",
        bench.interval
    );
    println!("| setting | targets | processes | window | CPU (% of one core) |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for row in &bench.rows {
        println!(
            "| {} | {} | {} | {:.0} s | {:.2} |",
            row.setting, row.targets, row.processes, row.window_s, row.cpu_percent
        );
    }
    println!("\nagent ÷ separate `watch` processes: {:.2}", bench.agent_vs_processes);
}
