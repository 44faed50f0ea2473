//! The service over SQLite: the round trip, bad requests, durability
//! across a restart, retraining and promotion, and refusals to start.

use crate::support::{command, outcome, round_trip, verdict_request, Service};
use serde_json::{json, Value};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

fn database(dir: &Path) -> String {
    format!("sqlite:{}", dir.join("fleet.db").display())
}

#[test]
fn a_verdict_names_the_model_and_other_hosts_harm_refuses_the_same_patch() {
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start(dir.path(), &["--database", &database(dir.path())]);
    round_trip(&service, "fix-parser");
    // The model endpoint names the same model the verdicts do.
    let (status, model) = service.request("GET", "/v1/model", None);
    assert_eq!((status, model["name"].as_str()), (200, Some("built-in")));
}

#[test]
fn the_default_database_is_sqlite_under_the_state_directory() {
    let dir = tempfile::tempdir().unwrap();
    let service = Service::start(dir.path(), &[]);
    assert_eq!(service.post("/v1/outcomes", &outcome("h", "p", "kept", 1)).0, 200);
    assert!(dir.path().join("fleet-predictor.db").is_file());
}

#[test]
fn bad_requests_get_400_413_401_and_the_service_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret-token\n").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let service = Service::start(
        dir.path(),
        &[
            "--database",
            &database(dir.path()),
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    )
    .with_token("s3cret-token");
    let request = verdict_request("host-a", "p").to_string();
    let one_line = |body: &Value| {
        let error = body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error field: {body}"));
        assert!(!error.is_empty() && !error.contains('\n'), "{error:?}");
        error.to_string()
    };

    let (status, body) = service.request_as(None, "POST", "/v1/verdict", Some(request.as_bytes()));
    assert_eq!(status, 401, "{body}");
    one_line(&body);
    let (status, body) = service.request_as(Some("wrong"), "GET", "/v1/health", None);
    assert_eq!(status, 401, "{body}");

    let (status, body) = service.request("POST", "/v1/verdict", Some(b"{\"host\": \"a\", "));
    assert_eq!(status, 400);
    assert!(one_line(&body).contains("malformed verdict request"), "{body}");
    let (status, body) = service.request(
        "POST",
        "/v1/outcomes",
        Some(br#"[{"host":"a","patch_id":"p","kind":"exploded","at_unix_ms":1}]"#),
    );
    assert_eq!(status, 400, "{body}");
    assert!(one_line(&body).contains("exploded"), "{body}");
    let (status, body) = service.post("/v1/verdict", &json!({"host": "a"}));
    assert_eq!(status, 400, "{body}");
    let (status, body) = service.post("/v1/outcomes", &outcome("", "p", "kept", 1));
    assert_eq!(status, 400, "{body}");

    let limit = shadowpatch_predict::remote::MAX_REQUEST_BYTES;
    let oversized = vec![b' '; limit + 1];
    let (status, body) = service.request("POST", "/v1/outcomes", Some(&oversized));
    assert_eq!(status, 413, "{body}");
    one_line(&body);
    // Exactly at the limit is read (and then judged on its content).
    let mut at_limit = request.clone().into_bytes();
    at_limit.resize(limit, b' ');
    assert_eq!(service.request("POST", "/v1/verdict", Some(&at_limit)).0, 200);

    let (status, body) = service.request("GET", "/v2/nothing", None);
    assert_eq!(status, 404);
    one_line(&body);
    // Still serving.
    let (status, body) = service.request("POST", "/v1/verdict", Some(request.as_bytes()));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"]["name"], "built-in");
}

#[test]
fn outcomes_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let url = database(dir.path());
    let service = Service::start(dir.path(), &["--database", &url]);
    let batch = json!([outcome("host-b", "p", "crashed", 1), outcome("host-c", "p", "kept", 2)]);
    assert_eq!(service.post("/v1/outcomes", &batch), (200, json!({"stored": 2})));
    // The same outcome again (a host resending after a lost answer) is stored once.
    assert_eq!(
        service.post("/v1/outcomes", &outcome("host-b", "p", "crashed", 1)).0,
        200
    );
    service.kill();

    let service = Service::start(dir.path(), &["--database", &url]);
    let (status, verdict) = service.post("/v1/verdict", &verdict_request("host-a", "p"));
    assert_eq!(
        (status, verdict["verdict"].as_str()),
        (200, Some("refuse")),
        "{verdict}"
    );
    let finding = &verdict["fleet_findings"][0];
    assert_eq!(finding["code"], "fleet-history");
    assert_eq!(finding["evidence"]["outcomes"], 2, "{finding}");
    assert_eq!(finding["evidence"]["by_kind"], json!({"crashed": 1, "kept": 1}));
}

#[test]
fn a_retrained_model_is_promoted_named_in_verdicts_and_kept_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let url = database(dir.path());
    let args = [
        "--database",
        url.as_str(),
        "--retrain-after",
        "40",
        "--retrain-every",
        "86400",
    ];
    let service = Service::start(dir.path(), &args);
    // This fleet's harmful patches are the large ones, which the built-in
    // model does not rank as well as a model fitted on them.
    let outcomes: Vec<Value> = (0..40)
        .map(|patch| {
            let harmful = patch % 2 == 0;
            let mut o = outcome(
                &format!("host-{}", patch % 3),
                &format!("patch-{patch}"),
                if harmful { "rolled_back" } else { "kept" },
                1_000 + patch,
            );
            let noise = (patch * 7 % 11) as f64;
            o["features"] = json!({
                "static.bytes_changed": if harmful { 300.0 + noise } else { 20.0 + noise },
                "static.added-loop": (patch % 5 == 0) as u8 as f64,
            });
            o
        })
        .collect();
    assert_eq!(service.post("/v1/outcomes", &Value::Array(outcomes)).0, 200);
    let line = service.wait_for_log("promoted a retrained model", Duration::from_secs(300));
    assert!(line.contains("fleet-v1"), "{line}");
    let (_, model) = service.request("GET", "/v1/model", None);
    assert_eq!(
        (model["version"].as_u64(), model["name"].as_str()),
        (Some(1), Some("fleet-v1"))
    );
    assert_eq!(model["trained_on"], 40);
    assert!(model["held_out_auc"].as_f64().is_some(), "{model}");
    let (_, verdict) = service.post("/v1/verdict", &verdict_request("host-x", "new-patch"));
    assert_eq!(verdict["model"], model);
    service.kill();

    let service = Service::start(dir.path(), &args);
    let (_, after) = service.request("GET", "/v1/model", None);
    assert_eq!(after, model);
}

/// Run a `serve` that must refuse to start: exit 2, one line on stderr.
fn refused(state_dir: &Path, args: &[&str]) -> String {
    let output = command(state_dir, args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("error:")).collect();
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(output.stdout.is_empty(), "it said it was listening");
    errors[0].to_string()
}

#[test]
fn a_database_with_a_newer_schema_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let url = database(dir.path());
    Service::start(dir.path(), &["--database", &url]).kill();
    let connection = rusqlite::Connection::open(dir.path().join("fleet.db")).unwrap();
    connection
        .execute(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (999, 'from the future', 1, x'00', 0)",
            [],
        )
        .unwrap();
    drop(connection);
    let error = refused(dir.path(), &["--database", &url]);
    assert!(error.contains("schema version 999 is newer"), "{error}");
}

#[test]
fn unsafe_or_broken_options_refuse_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let error = refused(dir.path(), &["--listen", "0.0.0.0:0"]);
    assert!(error.contains("--token-file"), "{error}");

    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "t0ken").unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let error = refused(dir.path(), &["--token-file", token_file.to_str().unwrap()]);
    assert!(error.contains("chmod 600"), "{error}");

    let model = dir.path().join("model.json");
    std::fs::write(&model, "{\"format\": \"something else\"}").unwrap();
    let error = refused(dir.path(), &["--model", model.to_str().unwrap()]);
    assert!(
        error.contains("model.json") && error.contains("not a shadowpatch risk model"),
        "{error}"
    );

    let error = refused(dir.path(), &["--database", "mysql://db/x"]);
    assert!(error.contains("sqlite:PATH"), "{error}");
}
