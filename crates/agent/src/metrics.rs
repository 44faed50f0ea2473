//! The agent's metrics in the Prometheus text format, served over plain
//! HTTP on a loopback address. Hand-rendered: the format is a few lines of
//! text, and the `prometheus` crate would bring a registry, protobuf and a
//! global state for the dozen series here. Per-target series, within a
//! bounded cardinality, are `per_target`'s.

pub mod per_target;

pub use per_target::{PerTarget, TargetCount, MAX_LABELLED_TARGETS};

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// A cumulative histogram with fixed upper bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    counts: Mutex<(Vec<u64>, f64, u64)>,
}

impl Histogram {
    pub const fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: Mutex::new((Vec::new(), 0.0, 0)),
        }
    }

    pub fn observe(&self, value: f64) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if counts.0.is_empty() {
            counts.0 = vec![0; self.bounds.len()];
        }
        for (i, bound) in self.bounds.iter().enumerate() {
            if value <= *bound {
                counts.0[i] += 1;
            }
        }
        counts.1 += value;
        counts.2 += 1;
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} histogram\n"));
        for (i, bound) in self.bounds.iter().enumerate() {
            let count = counts.0.get(i).copied().unwrap_or(0);
            out.push_str(&format!("{name}_bucket{{le=\"{bound}\"}} {count}\n"));
        }
        out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {}\n", counts.2));
        out.push_str(&format!("{name}_sum {}\n{name}_count {}\n", counts.1, counts.2));
    }
}

const PAUSE_SECONDS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.05, 0.25,
];
const SWEEP_SECONDS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0];

/// Every series the agent exports.
#[derive(Debug)]
pub struct Metrics {
    pub targets_watched: AtomicU64,
    pub sweeps: AtomicU64,
    pub sweep_seconds: Histogram,
    pub alerts: AtomicU64,
    pub heals: AtomicU64,
    pub applies: AtomicU64,
    pub apply_pause_seconds: Histogram,
    pub rollback_pause_seconds: Histogram,
    pub rollbacks_by_cause: Mutex<BTreeMap<String, u64>>,
    /// Rollbacks asked for (by cause) that did not happen: nothing to roll
    /// back, the target gone, a refusal on safety grounds.
    pub rollbacks_refused_by_cause: Mutex<BTreeMap<String, u64>>,
    pub requests: AtomicU64,
    pub bad_requests: AtomicU64,
    pub recoveries: AtomicU64,
    /// Persisted patches applied to new processes (`ops::persist`).
    pub persist_applies: AtomicU64,
    /// New processes of a persisted patch's scope left unpatched because
    /// their build-id changed (a package upgrade).
    pub persist_build_id_changed: AtomicU64,
    /// Forked processes that took over their ancestor's patch state.
    pub adoptions: AtomicU64,
    /// Forked processes whose adoption was refused (each counted once).
    pub adoptions_refused: AtomicU64,
    /// The same counts per target (pid, comm, unit; bounded).
    pub per_target: PerTarget,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            targets_watched: AtomicU64::new(0),
            sweeps: AtomicU64::new(0),
            sweep_seconds: Histogram::new(SWEEP_SECONDS),
            alerts: AtomicU64::new(0),
            heals: AtomicU64::new(0),
            applies: AtomicU64::new(0),
            apply_pause_seconds: Histogram::new(PAUSE_SECONDS),
            rollback_pause_seconds: Histogram::new(PAUSE_SECONDS),
            rollbacks_by_cause: Mutex::new(BTreeMap::new()),
            rollbacks_refused_by_cause: Mutex::new(BTreeMap::new()),
            requests: AtomicU64::new(0),
            bad_requests: AtomicU64::new(0),
            recoveries: AtomicU64::new(0),
            persist_applies: AtomicU64::new(0),
            persist_build_id_changed: AtomicU64::new(0),
            adoptions: AtomicU64::new(0),
            adoptions_refused: AtomicU64::new(0),
            per_target: PerTarget::default(),
        }
    }
}

impl Metrics {
    /// A verification pass over `pid`'s memory.
    pub fn swept(&self, pid: i32, seconds: f64) {
        self.sweeps.fetch_add(1, Ordering::Relaxed);
        self.sweep_seconds.observe(seconds);
        self.per_target.count(pid, TargetCount::Sweep);
    }

    /// An alert raised on `pid`.
    pub fn alerted(&self, pid: i32) {
        self.alerts.fetch_add(1, Ordering::Relaxed);
        self.per_target.count(pid, TargetCount::Alert);
    }

    /// A heal written into `pid`.
    pub fn healed(&self, pid: i32) {
        self.heals.fetch_add(1, Ordering::Relaxed);
        self.per_target.count(pid, TargetCount::Heal);
    }

    /// A patch applied to `pid` by the agent, with its pause.
    pub fn applied(&self, pid: i32, pause_us: u64) {
        self.applies.fetch_add(1, Ordering::Relaxed);
        self.apply_pause_seconds.observe(pause_us as f64 / 1e6);
        self.per_target.count(pid, TargetCount::Apply);
    }

    pub fn rolled_back(&self, pid: i32, cause: &str, pause_us: u64) {
        self.per_target.count(pid, TargetCount::Rollback(cause));
        *self
            .rollbacks_by_cause
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(cause.to_string())
            .or_insert(0) += 1;
        self.rollback_pause_seconds.observe(pause_us as f64 / 1e6);
    }

    /// A rollback of `pid` asked for with `cause` was refused or failed.
    pub fn rollback_refused(&self, pid: i32, cause: &str) {
        self.per_target.count(pid, TargetCount::RollbackRefused(cause));
        *self
            .rollbacks_refused_by_cause
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(cause.to_string())
            .or_insert(0) += 1;
    }

    /// The text exposition; `active` (pid, start time, active patches of
    /// every live target) is read by the caller from the journals at
    /// scrape time.
    pub fn render(&self, active: &[(i32, u64, u64)]) -> String {
        let patches_active: u64 = active.iter().map(|(_, _, n)| n).sum();
        let mut out = String::new();
        let mut gauge = |name: &str, kind: &str, help: &str, value: u64| {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"));
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        gauge(
            "shadowpatch_targets_watched",
            "gauge",
            "Targets the agent verifies continuously.",
            load(&self.targets_watched),
        );
        gauge(
            "shadowpatch_patches_active",
            "gauge",
            "Active patches over every live target.",
            patches_active,
        );
        gauge(
            "shadowpatch_verification_sweeps_total",
            "counter",
            "Full verification passes over a target's mirrored memory.",
            load(&self.sweeps),
        );
        gauge(
            "shadowpatch_alerts_total",
            "counter",
            "Alerts raised (tampered memory, map changes).",
            load(&self.alerts),
        );
        gauge(
            "shadowpatch_heals_total",
            "counter",
            "Heals written.",
            load(&self.heals),
        );
        gauge(
            "shadowpatch_applies_total",
            "counter",
            "Patches applied by the agent.",
            load(&self.applies),
        );
        gauge(
            "shadowpatch_recoveries_total",
            "counter",
            "Interrupted transactions finished or undone.",
            load(&self.recoveries),
        );
        gauge(
            "shadowpatch_persist_applies_total",
            "counter",
            "Persisted patches applied to processes that appeared after the rule was made.",
            load(&self.persist_applies),
        );
        gauge(
            "shadowpatch_adoptions_total",
            "counter",
            "Processes forked from patched targets that the agent adopted (took over their ancestor's patch state).",
            load(&self.adoptions),
        );
        gauge(
            "shadowpatch_adoptions_refused_total",
            "counter",
            "Processes forked from patched targets whose adoption was refused (the history says why).",
            load(&self.adoptions_refused),
        );
        gauge(
            "shadowpatch_persist_build_id_changed_total",
            "counter",
            "New processes of a persisted patch's scope not patched because their build-id changed.",
            load(&self.persist_build_id_changed),
        );
        gauge(
            "shadowpatch_requests_total",
            "counter",
            "Requests received on the control and application sockets.",
            load(&self.requests),
        );
        gauge(
            "shadowpatch_bad_requests_total",
            "counter",
            "Requests refused as malformed, oversized or unauthorised.",
            load(&self.bad_requests),
        );
        self.sweep_seconds.render(
            "shadowpatch_verification_sweep_seconds",
            "Duration of one verification pass.",
            &mut out,
        );
        self.apply_pause_seconds.render(
            "shadowpatch_apply_pause_seconds",
            "Pause of the target while a patch was switched in.",
            &mut out,
        );
        self.rollback_pause_seconds.render(
            "shadowpatch_rollback_pause_seconds",
            "Pause of the target while a patch was rolled back.",
            &mut out,
        );
        out.push_str(
            "# HELP shadowpatch_rollbacks_total Rollbacks by cause.\n# TYPE shadowpatch_rollbacks_total counter\n",
        );
        for (cause, count) in self.rollbacks_by_cause.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            out.push_str(&format!("shadowpatch_rollbacks_total{{cause=\"{cause}\"}} {count}\n"));
        }
        out.push_str(
            "# HELP shadowpatch_rollbacks_refused_total Rollbacks asked for that did not happen (refused or failed), by cause.\n# TYPE shadowpatch_rollbacks_refused_total counter\n",
        );
        for (cause, count) in self
            .rollbacks_refused_by_cause
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            out.push_str(&format!(
                "shadowpatch_rollbacks_refused_total{{cause=\"{cause}\"}} {count}\n"
            ));
        }
        self.per_target.render(active, &mut out);
        out
    }
}

/// Answer every HTTP request on `listener` with `render()`'s text. A
/// blocking accept loop on its own thread; each request is read up to its
/// blank line (bounded) with a timeout, so a slow client cannot hold it.
pub fn serve(listener: TcpListener, render: impl Fn() -> String + Send + 'static) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let _ = answer(stream, &render);
    }
}

fn answer(stream: TcpStream, render: &impl Fn() -> String) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    let mut total = 0;
    loop {
        let mut line = String::new();
        let read = (&mut reader).take(8192).read_line(&mut line)?;
        total += read;
        if request_line.is_empty() {
            request_line = line.clone();
        }
        if read == 0 || line == "\r\n" || line == "\n" || total > 64 * 1024 {
            break;
        }
    }
    let mut stream = stream;
    let (status, body) = if request_line.starts_with("GET /metrics") || request_line.starts_with("GET / ") {
        ("200 OK", render())
    } else {
        ("404 Not Found", "not found: GET /metrics\n".to_string())
    };
    write!(
        stream,
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative_and_rollbacks_are_labelled() {
        let metrics = Metrics::default();
        metrics.rolled_back(0, "request", 40);
        metrics.rolled_back(0, "request", 400);
        metrics.rolled_back(0, "command", 4000);
        metrics.rollback_refused(0, "request");
        let text = metrics.render(&[(0, 0, 1), (0, 1, 2)]);
        assert!(
            text.contains("shadowpatch_rollbacks_total{cause=\"request\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("shadowpatch_rollbacks_refused_total{cause=\"request\"} 1\n"),
            "{text}"
        );
        assert!(
            !text.contains("shadowpatch_rollbacks_refused_total{cause=\"command\"}"),
            "{text}"
        );
        assert!(
            text.contains("shadowpatch_rollbacks_total{cause=\"command\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("shadowpatch_rollback_pause_seconds_bucket{le=\"0.00005\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("shadowpatch_rollback_pause_seconds_bucket{le=\"0.0005\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("shadowpatch_rollback_pause_seconds_bucket{le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("shadowpatch_patches_active 3\n"), "{text}");
    }
}
