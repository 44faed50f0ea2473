//! The operations layer seen from outside: a client writing raw JSON to
//! the agent's control socket gets the same analysis gate as the CLI (a
//! patch the analysis refuses is refused, the target untouched), `force`
//! is a field every client must state, and the history records who asked
//! and whether `force` overrode a refusal.

use crate::common::agent::Agent;
use crate::common::{anonymous_code_mappings, assert_untouched, build_id_of, shadowpatch, write_manifest};
use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};

#[test]
fn a_raw_client_of_the_agent_gets_the_analysis_gate_and_force_is_stated_and_recorded() {
    let mut target = Running::start(Fixture::AnalysisTarget, &[]).unwrap();
    let pid = target.pid();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    assert_eq!(shadowpatch(&state, &["mirror", &pid.to_string()]).code, 0);
    let mappings = anonymous_code_mappings(pid);
    // Declares `counter` an int where the target has a long: the analysis
    // refuses it (and forcing it is harmless: the low half of 5 is 5).
    let narrow = write_manifest(
        dir.path(),
        "narrow",
        &build_patch(Patch::Analysis).unwrap(),
        &build_id_of(&target.binary()),
        &[("read_counter", "read_counter_narrow")],
    );
    let agent = Agent::start(dir.path());
    let request = |force: Option<bool>| {
        let mut request = serde_json::json!({
            "op": "apply",
            "state_dir": state,
            "pid": pid,
            "manifest": narrow,
            "attempts": 100,
            "analysis": { "context_secs": 0.0 },
        });
        if let Some(force) = force {
            request["force"] = force.into();
        }
        request
    };

    // force is not optional: a client must say whether it overrides.
    let unstated = agent.ask(&request(None));
    assert_eq!(unstated["ok"], false, "{unstated}");
    assert_eq!(unstated["failure"], "bad_input", "{unstated}");
    assert!(unstated["error"].as_str().unwrap().contains("force"), "{unstated}");

    let refused = agent.ask(&request(Some(false)));
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["failure"], "refused", "{refused}");
    assert!(
        refused["error"].as_str().unwrap().contains("declares counter as int"),
        "{refused}"
    );
    assert_eq!(refused["result"]["result"], "refused", "{refused}");
    assert_eq!(
        refused["result"]["analysis"]["analysis"]["verdict"], "refuse",
        "{refused}"
    );
    assert_eq!(anonymous_code_mappings(pid), mappings, "target untouched");
    assert_eq!(shadowpatch(&state, &["verify", &pid.to_string()]).code, 0);
    assert_untouched(pid);

    let forced = agent.ask(&request(Some(true)));
    assert_eq!(forced["ok"], true, "{forced}");
    assert_eq!(forced["result"]["result"], "applied", "{forced}");
    assert_eq!(forced["result"]["forced"], true, "{forced}");
    assert_eq!(forced["result"]["patch_id"], "narrow", "{forced}");
    assert_eq!(target.check().unwrap()["errors"], 0);

    // The history: the refusal and the forced apply, each with who asked.
    let history = shadowpatch(&state, &["history", &pid.to_string(), "--kind", "apply", "--json"]);
    assert_eq!(history.code, 0, "{}", history.stderr);
    let events = history.json().as_array().unwrap().clone();
    assert_eq!(events.len(), 2, "{events:?}");
    assert_eq!(events[0]["outcome"], "refused", "{}", events[0]);
    assert_eq!(events[0]["details"]["force"], false, "{}", events[0]);
    assert_eq!(events[1]["outcome"], "ok", "{}", events[1]);
    assert_eq!(events[1]["details"]["force"], true, "{}", events[1]);
    assert_eq!(events[1]["details"]["forced"], true, "{}", events[1]);
    for event in &events {
        assert!(
            event["details"]["requested_by"].as_str().unwrap().starts_with("agent"),
            "{event}"
        );
    }
    drop(agent);

    // The CLI, acting directly, records the same way.
    assert_eq!(shadowpatch(&state, &["rollback", &pid.to_string()]).code, 0);
    let direct = shadowpatch(
        &state,
        &[
            "apply",
            &pid.to_string(),
            narrow.to_str().unwrap(),
            "--force",
            "--context-secs",
            "0",
        ],
    );
    assert_eq!(direct.code, 0, "{}{}", direct.stdout, direct.stderr);
    let history = shadowpatch(&state, &["history", &pid.to_string(), "--kind", "apply", "--json"]);
    let last = history.json().as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["details"]["requested_by"], "cli", "{last}");
    assert_eq!(last["details"]["forced"], true, "{last}");
}
