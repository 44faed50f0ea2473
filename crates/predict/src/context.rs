//! System context: the target's recent health, read without touching it.
//! CPU, RSS and open-fd trends sampled from /proc over a short window, the
//! cgroup v2 memory limit and the machine's RAM (a linear fit of RSS
//! estimates the time to the nearest limit), optionally a Prometheus
//! endpoint (scraped at both ends of the window: error counters' rates)
//! and a log file's error rate (lines matching a pattern). A degraded or
//! trending-to-failure target is a finding; an optional source that fails
//! is a note in `unavailable` and a warning, never an abort.

use crate::finding::{Finding, Severity, Source};
use crate::PredictError;
use procfs::Current;
use serde_json::json;
use shadowpatch_process::ProcessIdentity;
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Time to a limit under which a trend is a finding.
const HORIZON_SECS: f64 = 600.0;
/// How much of a log's end is read for its recent error rate.
const LOG_TAIL_BYTES: u64 = 256 * 1024;
/// How long a metrics scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// A log file and the pattern its error lines match.
#[derive(Debug, Clone)]
pub struct LogSource {
    pub path: PathBuf,
    pub pattern: regex::Regex,
}

/// What to read and for how long.
#[derive(Debug, Clone)]
pub struct ContextOptions {
    /// Sampling window (0: one sample, no trends).
    pub window: Duration,
    /// Samples taken across the window (at least 2 when it is not 0).
    pub samples: u32,
    pub metrics_url: Option<String>,
    pub log: Option<LogSource>,
}

impl Default for ContextOptions {
    fn default() -> Self {
        ContextOptions {
            window: Duration::from_millis(500),
            samples: 6,
            metrics_url: None,
            log: None,
        }
    }
}

impl ContextOptions {
    /// Build options from command-line values, refusing malformed ones (a
    /// bad regex, a URL that is not `http://host...`, a negative window).
    pub fn from_arguments(
        window_secs: f64,
        metrics_url: Option<&str>,
        log: Option<&Path>,
        error_pattern: Option<&str>,
    ) -> Result<Self, PredictError> {
        if !window_secs.is_finite() || !(0.0..=3600.0).contains(&window_secs) {
            return Err(PredictError::BadArgument {
                argument: "--context-secs",
                value: window_secs.to_string(),
                message: "must be between 0 and 3600 seconds".into(),
            });
        }
        if let Some(url) = metrics_url {
            check_url(url)?;
        }
        let log = match (log, error_pattern) {
            (Some(path), Some(pattern)) => Some(LogSource {
                path: path.to_path_buf(),
                pattern: regex::Regex::new(pattern).map_err(|e| PredictError::BadArgument {
                    argument: "--error-pattern",
                    value: pattern.to_string(),
                    message: e.to_string().replace('\n', " "),
                })?,
            }),
            (None, None) => None,
            (Some(path), None) => {
                return Err(PredictError::BadArgument {
                    argument: "--log",
                    value: path.display().to_string(),
                    message: "needs --error-pattern REGEX to tell error lines".into(),
                })
            }
            (None, Some(pattern)) => {
                return Err(PredictError::BadArgument {
                    argument: "--error-pattern",
                    value: pattern.to_string(),
                    message: "needs --log FILE to read".into(),
                })
            }
        };
        Ok(ContextOptions {
            window: Duration::from_secs_f64(window_secs),
            samples: if window_secs == 0.0 { 1 } else { 6 },
            metrics_url: metrics_url.map(str::to_string),
            log,
        })
    }
}

fn check_url(url: &str) -> Result<(), PredictError> {
    let bad = |message: &str| PredictError::BadArgument {
        argument: "--metrics-url",
        value: url.to_string(),
        message: message.to_string(),
    };
    let uri: ureq::http::Uri = url
        .parse()
        .map_err(|e: ureq::http::uri::InvalidUri| bad(&e.to_string()))?;
    match uri.scheme_str() {
        Some("http") => {}
        // Built without TLS: metrics endpoints are scraped on the local
        // network, where Prometheus itself mostly uses plain HTTP.
        Some("https") => return Err(bad("only http:// endpoints are supported")),
        _ => return Err(bad("not an http:// URL")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    Ok(())
}

/// What the context contributes to an analysis.
#[derive(Debug, Clone, Default)]
pub struct ContextReport {
    pub findings: Vec<Finding>,
    pub features: BTreeMap<String, f64>,
    pub unavailable: Vec<String>,
}

/// One /proc sample.
#[derive(Debug, Clone, Copy)]
struct Sample {
    seconds: f64,
    cpu_ticks: u64,
    rss_bytes: u64,
    fds: u64,
}

fn sample(pid: i32, started: Instant) -> Result<Sample, PredictError> {
    let gone = |e: procfs::ProcError| -> PredictError {
        match e {
            procfs::ProcError::NotFound(_) => {
                PredictError::Target(shadowpatch_process::TargetError::NoSuchProcess { pid })
            }
            other => PredictError::BadArgument {
                argument: "pid",
                value: pid.to_string(),
                message: format!("cannot read its /proc entries: {other}"),
            },
        }
    };
    let process = procfs::process::Process::new(pid).map_err(gone)?;
    let stat = process.stat().map_err(gone)?;
    let fds = process.fd_count().map_err(gone)? as u64;
    Ok(Sample {
        seconds: started.elapsed().as_secs_f64(),
        cpu_ticks: stat.utime + stat.stime,
        rss_bytes: stat.rss * procfs::page_size(),
        fds,
    })
}

/// Least-squares slope of `y` over `x` (per second); 0 with fewer than two points.
pub fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    if points.len() < 2 {
        return 0.0;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let covariance: f64 = points.iter().map(|(x, y)| (x - mean_x) * (y - mean_y)).sum();
    let variance: f64 = points.iter().map(|(x, _)| (x - mean_x).powi(2)).sum();
    if variance == 0.0 {
        0.0
    } else {
        covariance / variance
    }
}

/// The machine's RAM: available (or free, on kernels without the
/// estimate) and total, in bytes.
#[derive(Debug, Clone, Copy)]
struct MachineMemory {
    available: u64,
    total: u64,
}

/// How long one read of /proc/meminfo stands for the machine's memory.
const MEMINFO_FRESH: std::time::Duration = std::time::Duration::from_millis(250);

/// /proc/meminfo, read at most every `MEMINFO_FRESH` per process: it is
/// the machine's, not the target's, and a host-wide apply read and parsed
/// it once per member (about 2 % of its CPU). A quarter-second-old
/// figure is as good a headroom as a fresh one.
fn machine_memory() -> Result<MachineMemory, procfs::ProcError> {
    static LAST: std::sync::Mutex<Option<(Instant, MachineMemory)>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((at, memory)) = *last {
        if at.elapsed() < MEMINFO_FRESH {
            return Ok(memory);
        }
    }
    let meminfo = procfs::Meminfo::current()?;
    let memory = MachineMemory {
        available: meminfo.mem_available.unwrap_or(meminfo.mem_free),
        total: meminfo.mem_total,
    };
    *last = Some((Instant::now(), memory));
    Ok(memory)
}

/// The soft limit on open files of `pid` (`Some(None)`: unlimited), by
/// `prlimit`, else from /proc/PID/limits; `None` when neither can be read.
fn open_files_limit(pid: i32) -> Option<Option<u64>> {
    if let Ok(limit) = shadowpatch_sys::rlimit::open_files_soft_limit(pid) {
        return Some(limit);
    }
    let limits = procfs::process::Process::new(pid).and_then(|p| p.limits()).ok()?;
    Some(match limits.max_open_files.soft_limit {
        procfs::process::LimitValue::Value(max) => Some(max),
        procfs::process::LimitValue::Unlimited => None,
    })
}

/// The cgroup v2 memory limit and usage of the process, if it has one.
fn cgroup_memory(pid: i32) -> Result<(Option<u64>, Option<u64>, String), String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).map_err(|e| e.to_string())?;
    let path = text
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| "no cgroup v2 membership in /proc/PID/cgroup".to_string())?;
    let dir = Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let read = |name: &str| std::fs::read_to_string(dir.join(name)).map(|s| s.trim().to_string());
    let max = match read("memory.max") {
        Ok(max) => max,
        // The root cgroup, or one without the memory controller: no limit
        // of its own.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => "max".to_string(),
        Err(e) => return Err(format!("{}: {e}", dir.join("memory.max").display())),
    };
    let current = read("memory.current").ok().and_then(|s| s.parse().ok());
    Ok((max.parse().ok(), current, dir.display().to_string()))
}

fn context_finding(code: &str, severity: Severity, message: String, evidence: serde_json::Value) -> Finding {
    Finding::new(code, severity, Source::Context, message).evidence(evidence)
}

/// A source the user asked for could not be read: noted, and a warning.
fn unavailable_source(report: &mut ContextReport, what: String) {
    report.findings.push(context_finding(
        "context-source-unavailable",
        Severity::Warning,
        format!("{what}: the verdict is given without it"),
        json!({ "source": what }),
    ));
    report.unavailable.push(what);
}

/// Read the context of the live process `identity` over `options.window`.
pub fn read_context(identity: &ProcessIdentity, options: &ContextOptions) -> Result<ContextReport, PredictError> {
    let pid = identity.pid;
    let mut report = ContextReport::default();
    let started = Instant::now();
    let first_scrape = options.metrics_url.as_deref().map(scrape);
    let log_start = options.log.as_ref().map(|log| log_position(&log.path));
    let mut samples = vec![sample(pid, started)?];
    let count = options.samples.max(1);
    for index in 1..count {
        // The sampling window itself: trends need time to show.
        let due = options.window.mul_f64(index as f64 / (count - 1) as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            std::thread::sleep(wait);
        }
        samples.push(sample(pid, started)?);
    }
    identity.check_alive()?;
    let last = *samples.last().expect("one sample at least");
    let first = samples[0];
    let elapsed = (last.seconds - first.seconds).max(0.0);
    let cpu_percent = if elapsed > 0.0 {
        (last.cpu_ticks - first.cpu_ticks) as f64 / procfs::ticks_per_second() as f64 / elapsed * 100.0
    } else {
        0.0
    };
    let rss_slope = slope(
        &samples
            .iter()
            .map(|s| (s.seconds, s.rss_bytes as f64))
            .collect::<Vec<_>>(),
    );
    let fd_slope = slope(&samples.iter().map(|s| (s.seconds, s.fds as f64)).collect::<Vec<_>>());
    let features = &mut report.features;
    features.insert("context.window_s".into(), elapsed);
    features.insert("context.cpu_percent".into(), cpu_percent);
    features.insert("context.rss_bytes".into(), last.rss_bytes as f64);
    features.insert("context.rss_growth_bytes_per_s".into(), rss_slope);
    features.insert("context.fd_count".into(), last.fds as f64);
    features.insert("context.fd_growth_per_s".into(), fd_slope);

    // Memory: the nearest of the cgroup limit and the machine's RAM.
    let mut limits: Vec<(String, f64)> = Vec::new();
    match cgroup_memory(pid) {
        Ok((Some(max), current, dir)) => {
            let used = current.unwrap_or(last.rss_bytes);
            let fraction = used as f64 / max as f64;
            report
                .features
                .insert("context.cgroup_memory_fraction".into(), fraction);
            limits.push((
                format!("the cgroup limit {} ({dir})", mib(max)),
                max.saturating_sub(used) as f64,
            ));
            if fraction >= 0.9 {
                report.findings.push(context_finding(
                    "memory-near-limit",
                    Severity::Warning,
                    format!(
                        "the target's cgroup uses {} of its {} memory limit ({:.0} %): little room for a patch that allocates",
                        mib(used),
                        mib(max),
                        fraction * 100.0
                    ),
                    json!({ "cgroup": dir, "memory_max": max, "memory_current": used }),
                ));
            }
        }
        Ok((None, _, _)) => {
            report.features.insert("context.cgroup_memory_fraction".into(), 0.0);
        }
        Err(why) => report.unavailable.push(format!("cgroup memory limit: {why}")),
    }
    match machine_memory() {
        Ok(MachineMemory { available, total }) => {
            limits.push((
                format!("the machine's available RAM ({})", mib(available)),
                available as f64,
            ));
            report.features.insert("context.ram_total_bytes".into(), total as f64);
        }
        Err(error) => report.unavailable.push(format!("/proc/meminfo: {error}")),
    }
    let mut time_to_limit = f64::INFINITY;
    if rss_slope > 0.0 {
        if let Some((limit, headroom)) = limits.iter().min_by(|a, b| a.1.total_cmp(&b.1)) {
            time_to_limit = headroom / rss_slope;
            if time_to_limit < HORIZON_SECS {
                report.findings.push(context_finding(
                    "memory-growth",
                    Severity::Warning,
                    format!(
                        "the target's RSS grows {}/s (now {}): at this rate it reaches {limit} in about {:.0} s",
                        mib(rss_slope as u64),
                        mib(last.rss_bytes),
                        time_to_limit
                    ),
                    json!({
                        "rss_bytes": samples.iter().map(|s| s.rss_bytes).collect::<Vec<_>>(),
                        "seconds": samples.iter().map(|s| s.seconds).collect::<Vec<_>>(),
                        "growth_bytes_per_s": rss_slope,
                        "limit": limit,
                        "headroom_bytes": headroom,
                        "time_to_limit_s": time_to_limit,
                        "method": "least-squares fit of RSS over the window",
                    }),
                ));
            }
        }
    }
    report
        .features
        .insert("context.memory_time_to_limit_s".into(), time_to_limit.min(86_400.0));

    // File descriptors against RLIMIT_NOFILE.
    if let Some(Some(max)) = open_files_limit(pid) {
        let fraction = last.fds as f64 / max as f64;
        report.features.insert("context.fd_fraction".into(), fraction);
        let time_to_fd_limit = if fd_slope > 0.0 {
            (max as f64 - last.fds as f64) / fd_slope
        } else {
            f64::INFINITY
        };
        if fraction >= 0.9 || time_to_fd_limit < HORIZON_SECS {
            report.findings.push(context_finding(
                "fd-exhaustion",
                Severity::Warning,
                format!(
                    "the target has {} of {max} file descriptors open{}",
                    last.fds,
                    if time_to_fd_limit.is_finite() {
                        format!(", growing {fd_slope:.1}/s: the limit in about {time_to_fd_limit:.0} s")
                    } else {
                        String::new()
                    }
                ),
                json!({ "fds": samples.iter().map(|s| s.fds).collect::<Vec<_>>(), "limit": max, "growth_per_s": fd_slope }),
            ));
        }
    }
    if cpu_percent >= 95.0 {
        report.findings.push(context_finding(
            "cpu-busy",
            Severity::Info,
            format!("the target is using {cpu_percent:.0} % of a core: activation stops will be felt"),
            json!({ "cpu_percent": cpu_percent }),
        ));
    }

    if let (Some(url), Some(first)) = (&options.metrics_url, first_scrape) {
        metrics(&mut report, url, first, elapsed);
    }
    if let (Some(log), Some(start)) = (&options.log, log_start) {
        log_errors(&mut report, log, start, elapsed);
    }
    report
        .features
        .insert("context.sources_unavailable".into(), report.unavailable.len() as f64);
    Ok(report)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
}

/// Fetch and parse a Prometheus text exposition.
pub(crate) fn scrape(url: &str) -> Result<prometheus_parse::Scrape, String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(SCRAPE_TIMEOUT))
        .build()
        .into();
    let mut response = agent.get(url).call().map_err(|e| e.to_string())?;
    let body = response
        .body_mut()
        .with_config()
        .limit(16 << 20)
        .read_to_string()
        .map_err(|e| e.to_string())?;
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).map_err(|e| e.to_string())
}

/// Error counters: names saying error/fail/exception, and request counters
/// labelled with a 5xx status.
pub(crate) fn error_total(scrape: &prometheus_parse::Scrape) -> (f64, usize) {
    let mut total = 0.0;
    let mut series = 0;
    for sample in &scrape.samples {
        let value = match sample.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        let name = sample.metric.to_ascii_lowercase();
        let named_error = ["error", "fail", "exception", "panic"].iter().any(|w| name.contains(w));
        let server_error = ["code", "status", "status_code"]
            .iter()
            .filter_map(|label| sample.labels.get(label))
            .any(|code| code.starts_with('5'));
        if (named_error || server_error) && value.is_finite() {
            total += value;
            series += 1;
        }
    }
    (total, series)
}

fn metrics(report: &mut ContextReport, url: &str, first: Result<prometheus_parse::Scrape, String>, elapsed: f64) {
    let first = match first {
        Ok(scrape) => scrape,
        Err(why) => return unavailable_source(report, format!("metrics endpoint {url}: {why}")),
    };
    report
        .features
        .insert("context.metrics_series".into(), first.samples.len() as f64);
    let (errors_before, series) = error_total(&first);
    report
        .features
        .insert("context.metrics_error_total".into(), errors_before);
    if elapsed <= 0.0 {
        return;
    }
    let last = match scrape(url) {
        Ok(scrape) => scrape,
        Err(why) => return unavailable_source(report, format!("metrics endpoint {url} (second scrape): {why}")),
    };
    let (errors_after, _) = error_total(&last);
    let rate = (errors_after - errors_before).max(0.0) / elapsed;
    report.features.insert("context.metrics_error_rate_per_s".into(), rate);
    if rate > 0.0 {
        report.findings.push(context_finding(
            "metrics-errors",
            Severity::Warning,
            format!("the target's metrics count {rate:.1} errors/s right now ({url}): it is already failing"),
            json!({ "url": url, "error_series": series, "before": errors_before, "after": errors_after, "window_s": elapsed }),
        ));
    }
}

/// The log's size now (where new lines will start), or why it is unreadable.
fn log_position(path: &Path) -> Result<u64, String> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(|e| e.to_string())
        .and_then(|len| std::fs::File::open(path).map(|_| len).map_err(|e| e.to_string()))
}

fn log_errors(report: &mut ContextReport, log: &LogSource, start: Result<u64, String>, elapsed: f64) {
    let shown = log.path.display().to_string();
    let start = match start {
        Ok(start) => start,
        Err(why) => return unavailable_source(report, format!("log {shown}: {why}")),
    };
    let read = |from: u64| -> Result<String, String> {
        let mut file = std::fs::File::open(&log.path).map_err(|e| e.to_string())?;
        file.seek(SeekFrom::Start(from)).map_err(|e| e.to_string())?;
        let mut bytes = Vec::new();
        file.take(16 << 20).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    // Recent history: the end of the file before the window, whole lines.
    let tail_from = start.saturating_sub(LOG_TAIL_BYTES);
    let recent = match read(tail_from) {
        Ok(text) => {
            let text = &text[..text.len().min((start - tail_from) as usize)];
            let text = if tail_from > 0 {
                text.split_once('\n').map(|(_, rest)| rest).unwrap_or("")
            } else {
                text
            };
            text.to_string()
        }
        Err(why) => return unavailable_source(report, format!("log {shown}: {why}")),
    };
    let new = read(start).unwrap_or_default();
    let count = |text: &str| -> (usize, usize) {
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let errors = lines.iter().filter(|l| log.pattern.is_match(l)).count();
        (lines.len(), errors)
    };
    let (recent_lines, recent_errors) = count(&recent);
    let (new_lines, new_errors) = count(&new);
    let fraction = if recent_lines > 0 {
        recent_errors as f64 / recent_lines as f64
    } else {
        0.0
    };
    let rate = if elapsed > 0.0 {
        new_errors as f64 / elapsed
    } else {
        0.0
    };
    report.features.insert("context.log_error_fraction".into(), fraction);
    report.features.insert("context.log_error_rate_per_s".into(), rate);
    if new_errors > 0 || (recent_errors >= 5 && fraction >= 0.1) {
        report.findings.push(context_finding(
            "log-errors",
            Severity::Warning,
            format!(
                "{shown}: {recent_errors} of the last {recent_lines} lines match {} and {new_errors} more were logged during the {elapsed:.1} s window: the service is already reporting errors",
                log.pattern.as_str()
            ),
            json!({
                "log": shown,
                "pattern": log.pattern.as_str(),
                "recent_lines": recent_lines,
                "recent_errors": recent_errors,
                "window_lines": new_lines,
                "window_errors": new_errors,
                "errors_per_s": rate,
            }),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_fits_a_line_and_is_zero_without_trend() {
        let line: Vec<(f64, f64)> = (0..5).map(|i| (i as f64, 10.0 + 3.0 * i as f64)).collect();
        assert!((slope(&line) - 3.0).abs() < 1e-9);
        assert_eq!(slope(&[(0.0, 1.0)]), 0.0);
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 5.0)]), 0.0);
    }

    #[test]
    fn malformed_arguments_are_refused_with_their_name() {
        let bad_regex = ContextOptions::from_arguments(0.5, None, Some(Path::new("/tmp/x")), Some("(")).unwrap_err();
        assert!(
            bad_regex.is_bad_input() && bad_regex.to_string().contains("--error-pattern"),
            "{bad_regex}"
        );
        for url in [
            "not a url",
            "ftp://host/metrics",
            "https://host/metrics",
            "http:///metrics",
        ] {
            let error = ContextOptions::from_arguments(0.5, Some(url), None, None).unwrap_err();
            assert!(error.to_string().contains("--metrics-url"), "{url}: {error}");
        }
        assert!(ContextOptions::from_arguments(-1.0, None, None, None).is_err());
        assert!(ContextOptions::from_arguments(0.5, None, Some(Path::new("/tmp/x")), None).is_err());
        let fine = ContextOptions::from_arguments(0.0, Some("http://127.0.0.1:9100/metrics"), None, None).unwrap();
        assert_eq!(fine.samples, 1);
    }
}
