//! Metric samples for `apply --watch`: per-interval values of the target's
//! CPU and RSS growth (/proc) and, from a Prometheus endpoint, its error rate (the
//! same error counters the context analysis reads) and mean latency (from
//! `*_sum`/`*_count` series whose name says latency or duration), taken
//! before activation (control) and after (experiment) for the judge.

use crate::context::{error_total, scrape};
use crate::PredictError;
use std::collections::BTreeMap;
use std::time::Instant;

/// The sampled metrics' names, as the judge reports them.
pub const CPU: &str = "cpu_percent";
/// RSS growth, not level: the patch's own mapping raises a small
/// process's RSS by a large fraction once, at activation; a leak grows it
/// in every interval.
pub const RSS: &str = "rss_growth_kib_per_second";
pub const ERRORS: &str = "errors_per_second";
pub const LATENCY: &str = "latency_mean";
/// Sampled but not judged: the share of the target's CPU time spent by
/// threads that were runnable (on a CPU or waiting for one, per
/// `/proc/PID/task/TID/schedstat`) for at least 90 % of the interval:
/// spinning threads (a busy loop, a polling server). A spinning thread's
/// CPU time is whatever the host leaves free, not what its code costs.
pub const SPINNING: &str = "spinning_cpu_share";

/// A thread runnable for this share of an interval is spinning.
const SPINNING_RUNNABLE: f64 = 0.9;

/// When spinning threads spent at least this share of the control
/// period's CPU (median), `cpu_percent` is not judged.
pub const CPU_BOUND_SHARE: f64 = 0.5;

/// Whether `cpu_percent` says nothing about the patch: in the control
/// period most of the target's CPU went to spinning threads, so its CPU
/// time follows the host's load. Only the control counts: a patch that
/// makes a thread spin is a regression the CPU judge must still see.
pub fn cpu_bound(control: &[f64]) -> Option<f64> {
    let mut sorted: Vec<f64> = control.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    (median >= CPU_BOUND_SHARE).then_some(median)
}

#[derive(Debug, Clone)]
struct Raw {
    at: Instant,
    cpu_ticks: u64,
    rss_bytes: u64,
    errors: Option<f64>,
    latency: Option<(f64, f64)>,
    /// Per thread: nanoseconds run and waited on a runqueue.
    threads: BTreeMap<i32, (u64, u64)>,
}

/// Samples one target's metrics; each `sample` yields the values over the
/// interval since the previous one.
#[derive(Debug)]
pub struct WatchSampler {
    pid: i32,
    metrics_url: Option<String>,
    previous: Option<Raw>,
    /// Why a source could not be read (reported once each).
    pub warnings: Vec<String>,
}

impl WatchSampler {
    pub fn new(pid: i32, metrics_url: Option<&str>) -> Self {
        WatchSampler {
            pid,
            metrics_url: metrics_url.map(str::to_string),
            previous: None,
            warnings: Vec::new(),
        }
    }

    /// Read the sources now; `None` on the first call (no interval yet).
    pub fn sample(&mut self) -> Result<Option<BTreeMap<String, f64>>, PredictError> {
        let pid = self.pid;
        let gone = |_| PredictError::Target(shadowpatch_process::TargetError::NoSuchProcess { pid });
        let stat = procfs::process::Process::new(pid)
            .and_then(|p| p.stat())
            .map_err(gone)?;
        let (errors, latency) = match &self.metrics_url {
            None => (None, None),
            Some(url) => match scrape(url) {
                Ok(scrape) => {
                    let (errors, series) = error_total(&scrape);
                    (Some(errors).filter(|_| series > 0), latency_totals(&scrape))
                }
                Err(message) => {
                    let warning = format!("metrics endpoint {url} unreachable: {message}; judging without it");
                    if !self.warnings.contains(&warning) {
                        self.warnings.push(warning);
                    }
                    (None, None)
                }
            },
        };
        let now = Raw {
            at: Instant::now(),
            cpu_ticks: stat.utime + stat.stime,
            rss_bytes: stat.rss * procfs::page_size(),
            errors,
            latency,
            threads: thread_schedstats(pid),
        };
        let Some(before) = self.previous.replace(now.clone()) else {
            return Ok(None);
        };
        let seconds = (now.at - before.at).as_secs_f64().max(1e-6);
        let mut values = BTreeMap::new();
        let ticks = procfs::ticks_per_second() as f64;
        values.insert(
            CPU.to_string(),
            (now.cpu_ticks.saturating_sub(before.cpu_ticks)) as f64 / ticks / seconds * 100.0,
        );
        values.insert(
            RSS.to_string(),
            (now.rss_bytes as f64 - before.rss_bytes as f64) / 1024.0 / seconds,
        );
        if let (Some(a), Some(b)) = (before.errors, now.errors) {
            values.insert(ERRORS.to_string(), (b - a).max(0.0) / seconds);
        }
        if let (Some((sum_a, count_a)), Some((sum_b, count_b))) = (before.latency, now.latency) {
            if count_b > count_a {
                values.insert(LATENCY.to_string(), (sum_b - sum_a) / (count_b - count_a));
            }
        }
        // Threads present at both readings; one that came or went in
        // between has no interval.
        let (mut run_ns, mut spinning_ns) = (0u64, 0u64);
        for (tid, (run, delay)) in &now.threads {
            if let Some((run_before, delay_before)) = before.threads.get(tid) {
                let ran = run.saturating_sub(*run_before);
                let runnable = ran + delay.saturating_sub(*delay_before);
                run_ns += ran;
                if runnable as f64 / 1e9 >= SPINNING_RUNNABLE * seconds {
                    spinning_ns += ran;
                }
            }
        }
        if run_ns > 0 {
            values.insert(SPINNING.to_string(), spinning_ns as f64 / run_ns as f64);
        }
        Ok(Some(values))
    }
}

/// Each thread's run and runqueue-wait nanoseconds; empty when schedstat
/// is not there (a kernel without CONFIG_SCHED_INFO), so nothing is known.
fn thread_schedstats(pid: i32) -> BTreeMap<i32, (u64, u64)> {
    let Ok(tasks) = procfs::process::Process::new(pid).and_then(|p| p.tasks()) else {
        return BTreeMap::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let stat = task.schedstat().ok()?;
            Some((task.tid, (stat.sum_exec_runtime, stat.run_delay)))
        })
        .collect()
}

/// Total `_sum` and `_count` of latency/duration series.
fn latency_totals(scrape: &prometheus_parse::Scrape) -> Option<(f64, f64)> {
    let (mut sum, mut count, mut seen) = (0.0, 0.0, false);
    for sample in &scrape.samples {
        let name = sample.metric.to_ascii_lowercase();
        if !(name.contains("latency") || name.contains("duration")) {
            continue;
        }
        match &sample.value {
            prometheus_parse::Value::Histogram(_) | prometheus_parse::Value::Summary(_) => {}
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Untyped(v)
            | prometheus_parse::Value::Gauge(v) => {
                if name.ends_with("_sum") {
                    sum += v;
                    seen = true;
                } else if name.ends_with("_count") {
                    count += v;
                }
            }
        }
    }
    seen.then_some((sum, count))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};
    use std::time::Duration;

    fn share_of(child: &mut Child) -> f64 {
        let mut sampler = WatchSampler::new(child.id() as i32, None);
        assert!(sampler.sample().unwrap().is_none());
        std::thread::sleep(Duration::from_millis(300));
        let values = sampler.sample().unwrap().expect("an interval");
        let _ = child.kill();
        let _ = child.wait();
        values.get(SPINNING).copied().unwrap_or(0.0)
    }

    #[test]
    fn a_busy_loop_spends_its_cpu_spinning_and_a_mostly_idle_loop_does_not() {
        let mut spinner = Command::new("sh").args(["-c", "while :; do :; done"]).spawn().unwrap();
        let busy = share_of(&mut spinner);
        // Works a little, then sleeps: CPU time, but never runnable 90 %.
        let mut napper = Command::new("sh")
            .args([
                "-c",
                "while :; do i=0; while [ $i -lt 200 ]; do i=$((i+1)); done; sleep 0.05; done",
            ])
            .spawn()
            .unwrap();
        let idle = share_of(&mut napper);
        assert!(busy > 0.9, "a busy loop's spinning share was {busy}");
        assert!(idle < 0.1, "a napping loop's spinning share was {idle}");
    }

    #[test]
    fn cpu_is_not_judged_when_spinning_threads_spent_the_controls_cpu() {
        assert_eq!(cpu_bound(&[0.2, 0.3, 0.25]), None);
        assert_eq!(cpu_bound(&[0.99, 1.0, 0.95]), Some(0.99));
        assert_eq!(cpu_bound(&[0.0, 0.6, 0.7]), Some(0.6));
        assert_eq!(cpu_bound(&[]), None);
        assert_eq!(cpu_bound(&[f64::NAN]), None);
    }
}
