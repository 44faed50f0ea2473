//! Signed patches end to end: with a policy that requires signatures, an
//! unsigned patch, one signed by an untrusted key and one whose object
//! changed after signing are refused (exit 1, one line, target untouched)
//! by the CLI and by the agent; a patch signed by a trusted key applies and
//! the history names the signer; a malformed policy is bad input.

use crate::common::agent::Agent;
use crate::common::{
    anonymous_code_mappings, assert_bad_input, assert_untouched, build_id_of, shadowpatch, write_manifest, Run,
};
use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use std::path::Path;

fn apply(state: &Path, pid: i32, manifest: &Path) -> Run {
    shadowpatch(
        state,
        &[
            "apply",
            &pid.to_string(),
            manifest.to_str().unwrap(),
            "--json",
            "--context-secs",
            "0",
        ],
    )
}

fn assert_refused(run: &Run, needle: &str) {
    assert_eq!(run.code, 1, "expected a refusal: {}{}", run.stdout, run.stderr);
    let error = run
        .stderr
        .lines()
        .find(|l| l.starts_with("shadowpatch: error: "))
        .unwrap_or("");
    assert!(error.contains(needle), "{needle:?} not in {:?}", run.stderr);
}

#[test]
fn a_policy_requiring_signatures_is_enforced_by_the_cli_and_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let target = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let pid = target.pid();
    assert_eq!(shadowpatch(&state, &["mirror", &pid.to_string()]).code, 0);
    let mappings = anonymous_code_mappings(pid);
    // The object beside the manifest, so that the test can change it.
    let object = dir.path().join("fix.so");
    std::fs::copy(build_patch(Patch::BusyFix).unwrap(), &object).unwrap();
    let manifest = write_manifest(
        dir.path(),
        "fix",
        &object,
        &build_id_of(&target.binary()),
        &[("work_fn", "work_fn_v2")],
    );
    let mut key_ids = Vec::new();
    for name in ["release", "other"] {
        let made = shadowpatch(&state, &["keygen", name, "--dir", keys.to_str().unwrap(), "--json"]);
        assert_eq!(made.code, 0, "{}", made.stderr);
        key_ids.push(made.json()["key_id"].as_str().unwrap().to_string());
    }
    let release_id = key_ids[0].clone();
    std::fs::write(
        state.join("policy.toml"),
        format!(
            "require_signature = true\n[[trusted_key]]\npath = {:?}\n",
            keys.join("release.pub")
        ),
    )
    .unwrap();

    // Unsigned.
    assert_refused(&apply(&state, pid, &manifest), "is not signed");
    // Signed, but by a key the policy does not list.
    let sign = |key: &str| {
        shadowpatch(
            &state,
            &[
                "sign",
                manifest.to_str().unwrap(),
                "--key",
                keys.join(key).to_str().unwrap(),
            ],
        )
    };
    assert_eq!(sign("other.key").code, 0);
    assert_refused(&apply(&state, pid, &manifest), "does not trust");
    assert_eq!(anonymous_code_mappings(pid), mappings, "nothing loaded");
    assert_untouched(pid);

    // Signed by the trusted key: applied, and the history names the signer.
    let signed = sign("release.key");
    assert_eq!(signed.code, 0, "{}", signed.stderr);
    let applied = apply(&state, pid, &manifest);
    assert_eq!(applied.code, 0, "{}{}", applied.stdout, applied.stderr);
    assert_eq!(
        applied.json()["signature"]["signature"],
        "verified",
        "{}",
        applied.stdout
    );
    assert_eq!(applied.json()["signature"]["key_id"], release_id.as_str());
    let history = shadowpatch(&state, &["history", &pid.to_string(), "--kind", "apply", "--json"]);
    let events = history.json();
    let last = events.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["details"]["signer_key_id"], release_id.as_str(), "{last}");
    assert_eq!(shadowpatch(&state, &["rollback", &pid.to_string()]).code, 0);

    // The object changed after it was signed: refused by the CLI and by an
    // agent serving the same state directory (its own policy).
    let mut bytes = std::fs::read(&object).unwrap();
    bytes.push(0);
    std::fs::write(&object, bytes).unwrap();
    assert_refused(
        &apply(&state, pid, &manifest),
        "patch object changed since it was signed",
    );
    let agent = Agent::start(dir.path());
    let reply = agent.ask(&serde_json::json!({
        "op": "apply", "state_dir": state, "pid": pid, "manifest": manifest,
        "attempts": 10, "force": true, "analysis": { "context_secs": 0.0 },
    }));
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["failure"], "refused", "{reply}");
    assert!(
        reply["error"].as_str().unwrap().contains("changed since it was signed"),
        "{reply}"
    );
    drop(agent);
    assert_eq!(anonymous_code_mappings(pid), mappings, "nothing loaded");
    assert_eq!(shadowpatch(&state, &["verify", &pid.to_string()]).code, 0);
    assert_untouched(pid);

    // A policy that does not parse is bad input naming the file.
    std::fs::write(state.join("policy.toml"), "require_signature = maybe\n").unwrap();
    assert_bad_input(&apply(&state, pid, &manifest), "policy.toml");
    assert_untouched(pid);
}

#[test]
fn a_fifo_or_a_device_as_manifest_is_bad_input_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let target = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let pid = target.pid();
    let fifo = dir.path().join("manifest.toml");
    assert!(std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    assert_bad_input(&apply(&state, pid, &fifo), "a FIFO");
    assert_bad_input(&apply(&state, pid, Path::new("/dev/zero")), "a device");
    assert_untouched(pid);
}

#[test]
fn keygen_and_sign_bad_inputs_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let keys = dir.path().join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    assert_bad_input(
        &shadowpatch(&state, &["keygen", "a/b", "--dir", keys.to_str().unwrap()]),
        "plain file name",
    );
    assert_eq!(
        shadowpatch(&state, &["keygen", "k", "--dir", keys.to_str().unwrap()]).code,
        0
    );
    // A key is never overwritten.
    assert_bad_input(
        &shadowpatch(&state, &["keygen", "k", "--dir", keys.to_str().unwrap()]),
        "refusing to overwrite",
    );
    let manifest = write_manifest(
        dir.path(),
        "p",
        Path::new("missing.so"),
        "0011223344556677",
        &[("f", "g")],
    );
    // The object the manifest names is missing: nothing is signed.
    assert_bad_input(
        &shadowpatch(
            &state,
            &[
                "sign",
                manifest.to_str().unwrap(),
                "--key",
                keys.join("k.key").to_str().unwrap(),
            ],
        ),
        "missing.so",
    );
    // A public key given as the secret key.
    let object = dir.path().join("o.so");
    std::fs::write(&object, b"\x7fELF").unwrap();
    let manifest = write_manifest(dir.path(), "q", &object, "0011223344556677", &[("f", "g")]);
    assert_bad_input(
        &shadowpatch(
            &state,
            &[
                "sign",
                manifest.to_str().unwrap(),
                "--key",
                keys.join("k.pub").to_str().unwrap(),
            ],
        ),
        "k.pub",
    );
    assert!(!dir.path().join("p.toml.sig").exists() && !dir.path().join("q.toml.sig").exists());
}
