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

#[derive(Debug, Clone, Copy)]
struct Raw {
    at: Instant,
    cpu_ticks: u64,
    rss_bytes: u64,
    errors: Option<f64>,
    latency: Option<(f64, f64)>,
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
        };
        let Some(before) = self.previous.replace(now) else {
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
        Ok(Some(values))
    }
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
