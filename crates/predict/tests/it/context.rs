//! System context on live targets: memory growth toward a limit, log error
//! rates, Prometheus error counters, and optional sources that fail.

use shadowpatch_fixtures::{Fixture, Running};
use shadowpatch_predict::context::{read_context, ContextOptions, LogSource};
use shadowpatch_predict::Severity;
use shadowpatch_process::ProcessIdentity;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn options(window_ms: u64) -> ContextOptions {
    ContextOptions {
        window: Duration::from_millis(window_ms),
        samples: 6,
        metrics_url: None,
        log: None,
    }
}

#[test]
fn a_steady_target_gives_features_and_no_finding() {
    let target = Running::start(Fixture::AnalysisTarget, &[]).unwrap();
    let identity = ProcessIdentity::of(target.pid()).unwrap();
    let report = read_context(&identity, &options(300)).unwrap();
    for feature in [
        "context.cpu_percent",
        "context.rss_bytes",
        "context.rss_growth_bytes_per_s",
        "context.fd_count",
        "context.memory_time_to_limit_s",
    ] {
        assert!(
            report.features.contains_key(feature),
            "{feature}: {:?}",
            report.features
        );
    }
    assert!(report.features["context.rss_bytes"] > 0.0);
    assert!(report.features["context.fd_count"] >= 3.0);
    // The worker spins: busy, but that is information, not a warning.
    assert!(
        report.findings.iter().all(|f| f.severity == Severity::Info),
        "{:?}",
        report.findings
    );
}

#[test]
fn memory_growing_toward_the_limit_is_a_finding_with_a_time_estimate() {
    let mut target = Running::start(Fixture::AnalysisTarget, &[]).unwrap();
    let identity = ProcessIdentity::of(target.pid()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let report = std::thread::scope(|scope| {
        let stop_reading = stop.clone();
        let analysis = scope.spawn(move || {
            let report = read_context(&identity, &options(800));
            stop_reading.store(true, Ordering::SeqCst);
            report
        });
        // Grow 1 MiB per step (at most 600 MiB) while the window runs: the
        // pace is the load being measured, not a synchronisation.
        for _ in 0..600 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            assert_eq!(target.command("grow 1024").unwrap(), "grown");
            std::thread::sleep(Duration::from_millis(3));
        }
        analysis.join().unwrap().unwrap()
    });
    let growth = report
        .findings
        .iter()
        .find(|f| f.code == "memory-growth")
        .unwrap_or_else(|| panic!("no memory-growth finding: {:?} {:?}", report.findings, report.features));
    assert_eq!(growth.severity, Severity::Warning);
    let eta = growth.evidence["time_to_limit_s"].as_f64().unwrap();
    assert!(eta > 0.0 && eta < 600.0, "{}", growth.evidence);
    assert!(report.features["context.rss_growth_bytes_per_s"] > 1_000_000.0);
    assert_eq!(report.features["context.memory_time_to_limit_s"], eta);
}

#[test]
fn log_errors_are_counted_and_an_unreadable_log_is_a_note_not_an_abort() {
    let target = Running::start(Fixture::AnalysisTarget, &[]).unwrap();
    let identity = ProcessIdentity::of(target.pid()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("service.log");
    let mut text = String::new();
    for i in 0..40 {
        text.push_str(if i % 3 == 0 {
            "ERROR upstream timed out\n"
        } else {
            "INFO request served\n"
        });
    }
    std::fs::write(&log, text).unwrap();
    let mut with_log = options(100);
    with_log.log = Some(LogSource {
        path: log.clone(),
        pattern: regex::Regex::new("ERROR").unwrap(),
    });
    let report = read_context(&identity, &with_log).unwrap();
    let errors = report
        .findings
        .iter()
        .find(|f| f.code == "log-errors")
        .expect("log-errors");
    assert_eq!(errors.evidence["recent_errors"], 14);
    assert_eq!(errors.evidence["recent_lines"], 40);
    assert!(report.unavailable.is_empty());

    with_log.log.as_mut().unwrap().path = dir.path().join("missing.log");
    let report = read_context(&identity, &with_log).unwrap();
    assert_eq!(report.unavailable.len(), 1, "{:?}", report.unavailable);
    assert!(report.unavailable[0].contains("missing.log"));
    let note = report
        .findings
        .iter()
        .find(|f| f.code == "context-source-unavailable")
        .unwrap();
    assert_eq!(note.severity, Severity::Warning);
    assert_eq!(report.features["context.sources_unavailable"], 1.0);
}

/// A loopback exposition endpoint whose error counter rises on every scrape.
fn metrics_server() -> (String, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        for (scrape, stream) in listener.incoming().take(2).enumerate() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 2 {
                line.clear();
            }
            let body = format!(
                "# TYPE http_requests_total counter\nhttp_requests_total{{code=\"200\"}} 1000\n\
                 http_requests_total{{code=\"500\"}} {}\n# TYPE process_open_fds gauge\nprocess_open_fds 12\n",
                10 + 25 * scrape
            );
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
        }
    });
    (url, handle)
}

#[test]
fn prometheus_error_counters_rising_are_a_finding_and_an_unreachable_endpoint_a_note() {
    let target = Running::start(Fixture::AnalysisTarget, &[]).unwrap();
    let identity = ProcessIdentity::of(target.pid()).unwrap();
    let (url, server) = metrics_server();
    let mut with_metrics = options(200);
    with_metrics.metrics_url = Some(url.clone());
    let report = read_context(&identity, &with_metrics).unwrap();
    server.join().unwrap();
    let errors = report
        .findings
        .iter()
        .find(|f| f.code == "metrics-errors")
        .unwrap_or_else(|| panic!("{:?} {:?}", report.findings, report.unavailable));
    assert_eq!(errors.evidence["before"], 10.0);
    assert_eq!(errors.evidence["after"], 35.0);
    assert_eq!(report.features["context.metrics_series"], 3.0);

    // Nothing listens there: a note and a warning, never an error.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    with_metrics.metrics_url = Some(format!("http://127.0.0.1:{port}/metrics"));
    let report = read_context(&identity, &with_metrics).unwrap();
    assert_eq!(report.unavailable.len(), 1, "{:?}", report.unavailable);
    assert!(report.findings.iter().any(|f| f.code == "context-source-unavailable"));
}

#[test]
fn open_files_near_the_limit_are_a_finding_against_the_targets_own_limit() {
    // A process whose soft limit on open files is 16 and that holds 15 of
    // them: the limit is the target's (read by prlimit), not ours. It opens
    // files until it holds 15 whatever it inherited (under cargo, CI or a
    // terminal the count it starts with differs); listing /proc/self/fd
    // holds one descriptor more while it lists.
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            "import os,resource,sys\n\
             resource.setrlimit(resource.RLIMIT_NOFILE, (16, 64))\n\
             held = []\n\
             while len(os.listdir('/proc/self/fd')) < 16: held.append(open('/dev/null'))\n\
             print('ready', flush=True)\n\
             sys.stdin.read()",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let pid = child.id() as i32;
    let identity = ProcessIdentity::of(pid).unwrap();
    let report = read_context(&identity, &options(0)).unwrap();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count() as f64;
    assert!(fds >= 15.0, "{fds} descriptors");
    let fraction = report.features["context.fd_fraction"];
    assert!(
        (fraction - fds / 16.0).abs() < 1e-9,
        "fraction {fraction} for {fds} of 16"
    );
    let finding = report
        .findings
        .iter()
        .find(|f| f.code == "fd-exhaustion")
        .unwrap_or_else(|| panic!("no fd-exhaustion finding: {:?}", report.findings));
    assert!(
        finding.message.contains("of 16 file descriptors"),
        "{}",
        finding.message
    );
    child.kill().unwrap();
    child.wait().unwrap();
}
