//! The Ansible collection (`dist/ansible`, docs/ansible.md) run for real:
//! three "hosts" (local connections, one fixture process each) patched in
//! waves by `playbooks/rollout.yml`; a wave whose watch rolls back is
//! rolled back whole and stops the rollout; a host already patched is not
//! changed again; check
//! mode writes nothing; the rollback and facts modules.

use crate::common::{build_id_of, shadowpatch, write_manifest};
use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What busy.c's `ask 5` answers once work_fn_v2 runs.
const PATCHED: &str = "1000016";

fn collections() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../dist/ansible")
}

struct Hosts {
    dir: tempfile::TempDir,
    targets: Vec<Running>,
    manifest: PathBuf,
}

impl Hosts {
    fn start() -> Hosts {
        let dir = tempfile::tempdir().unwrap();
        let targets: Vec<Running> = (0..3)
            .map(|_| Running::start(Fixture::BusyC, &["1"]).unwrap())
            .collect();
        let manifest = write_manifest(
            dir.path(),
            "wave",
            &build_patch(Patch::BusyFix).unwrap(),
            &build_id_of(&targets[0].binary()),
            &[("work_fn", "work_fn_v2")],
        );
        Hosts { dir, targets, manifest }
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The inventory: h1..h3, each with its process; `failing` gets a
    /// health command that passes once (the check before applying) and
    /// fails from then on, so its watch rolls the patch back.
    fn inventory(&self, failing: Option<usize>) -> PathBuf {
        let mut text = String::from("[service]\n");
        for (index, target) in self.targets.iter().enumerate() {
            text.push_str(&format!("h{} shadowpatch_pid={}", index + 1, target.pid()));
            if failing == Some(index) {
                let flag = self.dir.path().join(format!("health-{index}"));
                text.push_str(&format!(
                    " shadowpatch_health_cmd=\"sh -c 'test ! -e {0} && touch {0}'\"",
                    flag.display()
                ));
            }
            text.push('\n');
        }
        text.push_str("[service:vars]\nansible_connection=local\nansible_python_interpreter=python3\n");
        let path = self.dir.path().join(format!("inventory-{}", failing.map_or(9, |f| f)));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn vars(&self) -> PathBuf {
        let vars = serde_json::json!({
            "shadowpatch_manifest": self.manifest,
            "shadowpatch_binary": env!("CARGO_BIN_EXE_shadowpatch"),
            "shadowpatch_state_dir": self.state(),
            "shadowpatch_watch": 1,
            "rollout_serial": [1, 2],
        });
        let path = self.dir.path().join("vars.json");
        std::fs::write(&path, vars.to_string()).unwrap();
        path
    }

    fn ansible(&self, program: &str, args: &[&str]) -> (i32, String) {
        let tmp = self.dir.path().join("ansible-tmp");
        let output = Command::new(program)
            .args(args)
            .env("ANSIBLE_COLLECTIONS_PATH", collections())
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_LOCAL_TEMP", &tmp)
            .env("ANSIBLE_REMOTE_TEMP", &tmp)
            .env("ANSIBLE_HOME", self.dir.path().join("ansible-home"))
            .env("ANSIBLE_RETRY_FILES_ENABLED", "0")
            .env("ANSIBLE_STDOUT_CALLBACK", "default")
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e} (`.ci/run` installs ansible-core with pip)"));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status.code().unwrap_or(-1), text)
    }

    fn rollout(&self, failing: Option<usize>, extra: &[&str]) -> (i32, String) {
        let playbook = collections().join("ansible_collections/shadowpatch/live/playbooks/rollout.yml");
        let inventory = self.inventory(failing);
        let vars = format!("@{}", self.vars().display());
        let mut args = vec![
            "-i",
            inventory.to_str().unwrap(),
            "-e",
            &vars,
            playbook.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        self.ansible("ansible-playbook", &args)
    }

    fn patched(&mut self) -> Vec<bool> {
        self.targets
            .iter_mut()
            .map(|t| t.command("ask 5").unwrap() == PATCHED)
            .collect()
    }
}

/// `h1 : ok=2 changed=1 ...` → the changed count of `host` in the recap.
fn changed(output: &str, host: &str) -> u64 {
    output
        .lines()
        .rev()
        .find(|line| line.trim_start().starts_with(&format!("{host} ")) && line.contains("changed="))
        .and_then(|line| line.split("changed=").nth(1)?.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no recap line for {host}:\n{output}"))
}

#[test]
fn a_rollout_in_waves_stops_and_rolls_back_the_wave_whose_watch_rolled_back() {
    let mut hosts = Hosts::start();

    // Check mode: the analysis runs, nothing is written.
    let (code, output) = hosts.rollout(None, &["--check"]);
    assert_eq!(code, 0, "{output}");
    assert_eq!(changed(&output, "h1"), 1, "{output}");
    assert_eq!(hosts.patched(), [false, false, false], "check mode patched something");

    // h2's watch rolls back: the canary h1 stays patched, its wave (h2,
    // h3) is rolled back whole and the rollout stops.
    let (code, output) = hosts.rollout(Some(1), &[]);
    assert_ne!(code, 0, "{output}");
    assert!(output.contains("the rollout stops"), "{output}");
    assert!(output.contains("the watch rolled wave back in pid"), "{output}");
    assert_eq!(hosts.patched(), [true, false, false], "{output}");

    // Without the failing health command every host is patched; h1
    // already was, so it is ok, not changed.
    let (code, output) = hosts.rollout(None, &[]);
    assert_eq!(code, 0, "{output}");
    assert_eq!(changed(&output, "h1"), 0, "{output}");
    assert_eq!(changed(&output, "h2"), 1, "{output}");
    assert_eq!(hosts.patched(), [true, true, true]);

    // Facts, then the rollback module ad hoc, twice (the second is ok).
    let inventory = hosts.inventory(None);
    let common = format!(
        "binary={} state_dir={}",
        env!("CARGO_BIN_EXE_shadowpatch"),
        hosts.state().display()
    );
    let (code, output) = hosts.ansible(
        "ansible",
        &[
            "h1",
            "-i",
            inventory.to_str().unwrap(),
            "-m",
            "shadowpatch.live.shadowpatch_facts",
            "-a",
            &format!("pid={{{{ shadowpatch_pid }}}} {common}"),
        ],
    );
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains("\"persisted\"") && output.contains("\"wave\""),
        "{output}"
    );
    for expect_changed in [true, false] {
        let (code, output) = hosts.ansible(
            "ansible",
            &[
                "service",
                "-i",
                inventory.to_str().unwrap(),
                "-m",
                "shadowpatch.live.shadowpatch_rollback",
                "-a",
                &format!("pid={{{{ shadowpatch_pid }}}} patch_id=wave {common}"),
            ],
        );
        assert_eq!(code, 0, "{output}");
        assert_eq!(output.contains("\"changed\": true"), expect_changed, "{output}");
    }
    assert_eq!(hosts.patched(), [false, false, false]);
    for target in &hosts.targets {
        let status = shadowpatch(&hosts.state(), &["status", &target.pid().to_string(), "--json"]).json();
        assert_eq!(status["patches"].as_array().map_or(0, Vec::len), 0, "{status}");
    }
}
