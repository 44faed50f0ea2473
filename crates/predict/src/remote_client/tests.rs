//! The client against a canned stub (a std `TcpListener` thread): the
//! answer parsed, the request as sent, and each failure falling back to
//! the local scorer. The end-to-end proof with the real service is the
//! CLI's `fleet_host` test module.

use super::*;
use crate::engine::InterimRisk;
use crate::finding::{Class, Severity, Source, Verdict};
use crate::remote::{ModelVersion, VerdictResponse};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::mpsc;

/// A stub answering one connection with `status` and `body`; the request
/// body it read comes back on the channel. `None`: accept and never answer.
fn stub(answer: Option<(u16, String)>) -> (String, mpsc::Receiver<(String, String)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (sent, received) = mpsc::channel();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut head = String::new();
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = value.trim().parse().unwrap();
            }
            head.push_str(&line);
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        let _ = sent.send((head, String::from_utf8(body).unwrap()));
        match answer {
            Some((status, body)) => {
                let mut stream = stream;
                let _ = write!(
                    stream,
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
            // Hold the connection open, silent, until the client gives up.
            None => {
                let mut rest = Vec::new();
                let _ = reader.read_to_end(&mut rest);
            }
        }
    });
    (url, received)
}

fn settings(url: &str, timeout_secs: f64) -> PredictorSettings {
    PredictorSettings {
        url: url.into(),
        token_file: None,
        timeout_secs,
        host: Some("host-a".into()),
    }
}

fn scorer(url: &str, timeout_secs: f64) -> RemoteScorer {
    RemoteScorer::new(
        settings(url, timeout_secs).check().unwrap(),
        AskedPatch {
            patch_id: "fix-1".into(),
            build_id: Some("abcd".into()),
            program: None,
        },
        VerdictPolicy::default(),
        Box::new(InterimRisk),
    )
}

fn answer() -> VerdictResponse {
    VerdictResponse {
        analysis_id: "a-17".into(),
        risk: 0.42,
        verdict: Verdict::Warn,
        explanation: Explanation {
            formula: "fleet logistic regression".into(),
            ..Explanation::default()
        },
        model: ModelVersion {
            version: 3,
            name: "fleet-v3".into(),
            trained_on: 120,
            held_out_auc: Some(0.81),
        },
        fleet_findings: vec![Finding {
            class: Class::Harm,
            ..Finding::new(
                "fleet-history",
                Severity::Blocking,
                Source::Model,
                "rolled back on 2 hosts",
            )
        }],
    }
}

fn warning() -> Vec<Finding> {
    vec![Finding::new("x", Severity::Warning, Source::Static, "x")]
}

#[test]
fn the_service_answer_is_parsed_kept_and_asked_for_once() {
    let (url, received) = stub(Some((200, serde_json::to_string(&answer()).unwrap())));
    let scorer = scorer(&url, 2.0);
    let mut features = BTreeMap::new();
    features.insert("sim_calls".to_string(), 3.0);
    assert_eq!(scorer.score(&warning(), &features), 0.42);
    // Asked once: a second score reads the kept answer (the stub serves one connection).
    assert_eq!(scorer.score(&warning(), &features), 0.42);
    let (head, body) = received.recv().unwrap();
    assert!(head.starts_with("POST /v1/verdict "), "{head}");
    let request: VerdictRequest = serde_json::from_str(&body).unwrap();
    assert_eq!((request.host.as_str(), request.patch_id.as_str()), ("host-a", "fix-1"));
    assert_eq!(request.evidence.simulated_calls, 3);
    assert_eq!(request.findings, warning());
    assert_eq!(scorer.extra_findings()[0].code, "fleet-history");
    assert_eq!(scorer.explain(&[], &features).formula, "fleet logistic regression");
    match scorer.decided_by() {
        DecidedBy::Service { model, analysis_id, .. } => assert_eq!((model.version, analysis_id.as_str()), (3, "a-17")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_silent_service_times_out_and_the_local_model_decides() {
    let (url, _received) = stub(None);
    let scorer = scorer(&url, 0.3);
    let local = InterimRisk.score(&warning(), &BTreeMap::new());
    assert_eq!(scorer.score(&warning(), &BTreeMap::new()), local);
    assert!(scorer.extra_findings().is_empty());
    match scorer.decided_by() {
        DecidedBy::Local { model, why: Some(why) } => {
            assert_eq!(model, InterimRisk.describe());
            assert!(why.contains("no answer within 0.3 s") && why.contains(&url), "{why}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_http_error_or_a_bad_body_falls_back_and_says_why() {
    let (url, _received) = stub(Some((401, r#"{"error":"bad token"}"#.into())));
    let scorer_401 = scorer(&url, 2.0);
    scorer_401.score(&[], &BTreeMap::new());
    let why = match scorer_401.decided_by() {
        DecidedBy::Local { why: Some(why), .. } => why,
        other => panic!("{other:?}"),
    };
    assert!(why.contains("HTTP 401: bad token"), "{why}");
    let mut wrong = serde_json::to_value(answer()).unwrap();
    wrong["risk"] = serde_json::json!(7.0);
    let (url, _received) = stub(Some((200, wrong.to_string())));
    let scorer_bad = scorer(&url, 2.0);
    scorer_bad.score(&[], &BTreeMap::new());
    assert!(matches!(scorer_bad.decided_by(), DecidedBy::Local { why: Some(why), .. } if why.contains("risk of 7")));
}

#[test]
fn a_closed_port_is_unreachable() {
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let scorer = scorer(&format!("http://127.0.0.1:{port}"), 2.0);
    scorer.score(&[], &BTreeMap::new());
    assert!(matches!(scorer.decided_by(), DecidedBy::Local { why: Some(why), .. } if why.contains("unreachable")));
}

#[test]
fn bad_settings_are_named() {
    let error = |url: &str, timeout| settings(url, timeout).check().unwrap_err().to_string();
    assert!(error("ftp://x", 2.0).contains("not an http:// URL"));
    assert!(error("https://x", 2.0).contains("https:// is not supported"));
    assert!(error("http://", 2.0).starts_with("--predictor http://:"));
    assert!(error("http://x", 0.0).starts_with("--predictor-timeout 0"));
    let mut missing = settings("http://x", 2.0);
    missing.token_file = Some("/nonexistent/token".into());
    assert!(missing
        .check()
        .unwrap_err()
        .0
        .starts_with("--predictor-token /nonexistent/token:"));
    assert_eq!(
        settings("http://x:1/base/", 2.0).check().unwrap().url,
        "http://x:1/base"
    );
}
