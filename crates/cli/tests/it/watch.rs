//! End to end: `shadowpatch watch` as a separate process with `--json`
//! against the C and Rust fixtures and Debian's lighttpd: tampering is
//! alerted and healed, guarded variables too, the hook runs, 100
//! apply/rollback cycles under load raise no alert (and a tamper after them
//! is still caught), SIGTERM leaves the target untouched, a target that
//! exits ends the watch with exit 4, and bad input exits 2 with one line.

use crate::common::lighttpd::{get, start_lighttpd};
use crate::common::watch::{WatchProcess, PATIENCE};
use crate::common::{assert_bad_input, assert_untouched, build_id_of, shadowpatch, write_manifest};
use serde_json::Value;
use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use shadowpatch_process::{ProcessIdentity, TargetMemory};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Events that report integrity problems.
fn alarms(events: &[Value]) -> Vec<&Value> {
    events
        .iter()
        .filter(|e| {
            matches!(
                e["event"].as_str(),
                Some("alert" | "permissions_changed" | "new_executable_mapping" | "region_unmapped")
            )
        })
        .collect()
}

fn memory_of(pid: i32) -> TargetMemory {
    TargetMemory::open(&ProcessIdentity::of(pid).unwrap()).unwrap()
}

fn tamper_detected_and_healed(fixture: Fixture, cold_symbol: &str) {
    let mut target = Running::start(fixture, &["2"]).unwrap();
    let pid = target.pid();
    let state = tempfile::tempdir().unwrap();
    let mut watch = WatchProcess::start(state.path(), pid, &["--interval", "20ms", "--heal"]);
    assert_eq!(
        watch.seen[0]["baseline_taken"], true,
        "no mirror existed: generation 0 first"
    );
    let address = target.number("cold") + 3;
    let mut memory = memory_of(pid);
    let original = memory.read_vec(address, 1).unwrap()[0];
    memory.write(address, &[original ^ 0x5a]).unwrap();
    let alert = watch.wait_for("alert", |_| true);
    assert_eq!(alert["address"], address);
    assert_eq!(alert["symbol"], cold_symbol);
    assert_eq!(alert["offset"], 3);
    assert_eq!(alert["scope"], "code");
    assert_eq!(alert["expected"], format!("{original:02x}"));
    assert_eq!(alert["live"], format!("{:02x}", original ^ 0x5a));
    assert!(alert["latency_us"].as_u64().is_some());
    let heal = watch.wait_for("heal", |_| true);
    assert_eq!(heal["ok"], true, "{heal}");
    assert_eq!(memory.read_vec(address, 1).unwrap()[0], original, "healed");
    let (code, events) = watch.stop();
    assert_eq!(code, 1, "alerts were raised: exit 1");
    assert_eq!(events.last().unwrap()["event"], "stopped");
    assert_eq!(alarms(&events).len(), 1, "{events:#?}");
    assert_untouched(pid);
    assert_eq!(target.check().unwrap()["errors"], 0);
    // The history holds the alert and the heal.
    let store = shadowpatch_store::Store::open_read_only(state.path()).unwrap().unwrap();
    let kinds: Vec<String> = store
        .events(&Default::default())
        .unwrap()
        .iter()
        .map(|e| e.kind.to_string())
        .collect();
    for kind in ["watch_start", "alert", "heal", "watch_stop"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} not in {kinds:?}");
    }
}

#[test]
fn c_fixture_tamper_is_alerted_and_healed() {
    tamper_detected_and_healed(Fixture::BusyC, "cold_path");
}

#[test]
fn rust_fixture_tamper_is_alerted_and_healed() {
    tamper_detected_and_healed(Fixture::BusyRust, "rust_cold_path");
}

#[test]
fn lighttpd_tamper_is_alerted_and_healed_while_it_serves() {
    let dir = tempfile::tempdir().unwrap();
    let server = start_lighttpd(dir.path());
    let pid = server.child.id() as i32;
    let state = dir.path().join("state");
    let mut watch = WatchProcess::start(&state, pid, &["--interval", "20ms", "--heal"]);
    get(server.port).unwrap();
    // configparser runs only while loading the configuration (see lighttpd.rs).
    let lookup = shadowpatch(&state, &["lookup", &pid.to_string(), "configparser", "--json"]).json();
    let function = u64::from_str_radix(lookup[0]["address"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
    let address = function + 100;
    let mut memory = memory_of(pid);
    let original = memory.read_vec(address, 1).unwrap()[0];
    memory.write(address, &[!original]).unwrap();
    let alert = watch.wait_for("alert", |_| true);
    assert_eq!(alert["address"], address);
    assert_eq!(alert["module"], "lighttpd");
    assert_eq!(alert["symbol"], "configparser");
    assert_eq!(alert["offset"], 100);
    assert_eq!(watch.wait_for("heal", |_| true)["ok"], true);
    assert_eq!(memory.read_vec(address, 1).unwrap()[0], original);
    for _ in 0..20 {
        get(server.port).expect("lighttpd serves while watched and healed");
    }
    let (code, events) = watch.stop();
    assert_eq!(code, 1);
    assert_eq!(alarms(&events).len(), 1, "{events:#?}");
    assert_untouched(pid);
}

#[test]
fn no_alert_across_100_apply_rollback_cycles_under_load_then_a_tamper_is_caught() {
    let mut target = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let pid = target.pid();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let object = build_patch(Patch::BusyFix).unwrap();
    let manifest = write_manifest(
        dir.path(),
        "fix",
        &object,
        &build_id_of(&target.binary()),
        &[("work_fn", "work_fn_v2")],
    );
    let mut watch = WatchProcess::start(&state, pid, &["--interval", "5ms", "--cpu-budget", "50"]);
    let options = shadowpatch_patch::ApplyOptions::default();
    for cycle in 0..100 {
        // Most cycles race the watcher freely; every tenth (and the last)
        // waits until it has followed each generation, so it provably
        // verified against the patched one too and ends on generation 0.
        let follow = cycle % 10 == 0 || cycle == 99;
        shadowpatch_patch::apply(&state, pid, &manifest, &options).unwrap();
        if follow {
            watch.wait_for("generation_switched", |e| e["to"] == 1);
        }
        shadowpatch_patch::rollback(&state, pid, None).unwrap();
        if follow {
            watch.wait_for("generation_switched", |e| e["to"] == 0);
        }
    }
    let check = target.check().unwrap();
    assert_eq!(check["errors"], 0);
    assert!(check["patched"] > 0, "the patch ran: {check:?}");
    // ... and a real tamper afterwards is caught.
    let address = target.number("cold") + 2;
    let mut memory = memory_of(pid);
    let original = memory.read_vec(address, 1).unwrap()[0];
    memory.write(address, &[original ^ 1]).unwrap();
    let alert = watch.wait_for("alert", |_| true);
    memory.write(address, &[original]).unwrap();
    assert_eq!(alert["address"], address, "{alert:#}");
    let (_, events) = watch.stop();
    let alarms = alarms(&events);
    assert_eq!(alarms.len(), 1, "only the real tamper: {alarms:#?}");
    let switches = events.iter().filter(|e| e["event"] == "generation_switched").count();
    assert!(
        switches >= 22,
        "the watcher followed the generations ({switches} switches)"
    );
    assert_untouched(pid);
}

#[test]
fn guarded_variable_from_a_config_file_is_healed_and_the_hook_runs() {
    let target = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let pid = target.pid();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("watch.toml");
    std::fs::write(
        &config,
        "interval = \"20ms\"\nheal = true\n[[variable]]\nsymbol = \"scale\"\nmode = \"guarded\"\n",
    )
    .unwrap();
    let hook_out = dir.path().join("hook");
    let hook = format!(
        "cat > {0}.json; echo \"$SHADOWPATCH_EVENT $SHADOWPATCH_ADDRESS\" > {0}.env",
        hook_out.display()
    );
    let config_arg = config.to_str().unwrap().to_string();
    let mut watch = WatchProcess::start(&state, pid, &["--config", &config_arg, "--on-alert", &hook]);
    assert_eq!(watch.seen[0]["guarded_bytes"], 8);
    let status = shadowpatch(&state, &["status", &pid.to_string(), "--json"]).json();
    let scale = status["variables"][0]["address"].as_u64().unwrap();
    assert_eq!(status["variables"][0]["mode"], "guarded");
    let mut memory = memory_of(pid);
    memory.write(scale, &7u64.to_le_bytes()).unwrap();
    let alert = watch.wait_for("alert", |_| true);
    assert_eq!(alert["scope"], "guarded_variable");
    assert_eq!(alert["symbol"], "scale");
    assert_eq!(alert["expected"], "03");
    assert_eq!(alert["live"], "07");
    assert_eq!(watch.wait_for("heal", |_| true)["ok"], true);
    assert_eq!(memory.read_vec(scale, 8).unwrap(), 3u64.to_le_bytes());
    // The hook got the alert on stdin and in its environment.
    let deadline = Instant::now() + PATIENCE;
    let env_file = PathBuf::from(format!("{}.env", hook_out.display()));
    while !std::fs::read_to_string(&env_file).is_ok_and(|t| t.ends_with('\n')) {
        assert!(Instant::now() < deadline, "the hook never ran");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        std::fs::read_to_string(&env_file).unwrap(),
        format!("alert {scale:#x}\n")
    );
    let hooked: Value = serde_json::from_str(
        std::fs::read_to_string(format!("{}.json", hook_out.display()))
            .unwrap()
            .trim(),
    )
    .unwrap();
    assert_eq!(hooked["address"], scale);
    let (code, events) = watch.stop();
    assert_eq!(code, 1);
    assert_eq!(
        alarms(&events).len(),
        1,
        "the changing neighbours raised nothing: {events:#?}"
    );
    assert_untouched(pid);
}

#[test]
fn a_target_that_exits_ends_the_watch_with_exit_4() {
    let target = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let pid = target.pid();
    let state = tempfile::tempdir().unwrap();
    let mut watch = WatchProcess::start(state.path(), pid, &["--interval", "20ms"]);
    drop(target);
    watch.wait_for("target_exited", |e| e["pid"] == pid);
    let (code, events) = watch.finish();
    assert_eq!(code, 4, "{events:#?}");
    assert_eq!(events.last().unwrap()["reason"], "target_exited");
}

#[test]
fn sigterm_without_alerts_exits_0_and_leaves_the_target_running() {
    let mut target = Running::start(Fixture::BusyC, &["2", "--blockers"]).unwrap();
    let pid = target.pid();
    let state = tempfile::tempdir().unwrap();
    let mut watch = WatchProcess::start(state.path(), pid, &["--interval", "10ms", "--heal", "--pin-cpu", "0"]);
    watch.wait_for("pass", |_| true);
    let (code, events) = watch.stop();
    assert_eq!(code, 0, "{events:#?}");
    assert!(alarms(&events).is_empty());
    assert_untouched(pid);
    let check = target.check().unwrap();
    assert_eq!(check["errors"], 0, "{check:?}");
}

#[test]
fn bad_input_exits_2_with_one_line_and_leaves_target_and_mirror_untouched() {
    let target = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let pid = target.pid();
    let pid_text = pid.to_string();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    assert_eq!(shadowpatch(&state, &["mirror", &pid_text]).code, 0);
    let identity = ProcessIdentity::of(pid).unwrap();
    let generation = state
        .join("targets")
        .join(format!("{pid}-{}", identity.start_time))
        .join("gen-000000.mirror");
    let mirrored = std::fs::read(&generation).unwrap();
    let scale = {
        let maps = shadowpatch_process::maps::read_maps(pid).unwrap();
        let modules = shadowpatch_symbols::modules_of(pid, &maps).unwrap();
        modules.iter().find(|m| m.main).unwrap().symbol_addresses("scale")[0].0
    };
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "interval = \"20ms\"\nwobble = 1\n").unwrap();
    let config_text = config.to_str().unwrap();
    let overlapping = [format!("{scale:#x}:8"), format!("{:#x}:8", scale + 4)];
    let zero = format!("{scale:#x}:0");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--guard", "no_such_variable"], "no symbol no_such_variable"),
        (vec!["--guard", &overlapping[0], "--guard", &overlapping[1]], "overlaps"),
        (vec!["--guard", &zero], "size 0"),
        (vec!["--guard", "0x10:8"], "not mapped"),
        (vec!["--interval", "2h"], "--interval"),
        (vec!["--interval", "soon"], "--interval"),
        (vec!["--cpu-budget", "0"], "--cpu-budget"),
        (vec!["--cpu-budget", "250"], "--cpu-budget"),
        (
            vec!["--mirror-var", "scale", "--dirty-method", "soft-dirty"],
            "soft_dirty is unavailable",
        ),
        (vec!["--config", config_text], "line 2"),
        (vec!["--pin-cpu", "4096"], "--pin-cpu 4096"),
    ];
    for (args, needle) in cases {
        let mut full = vec!["watch", pid_text.as_str()];
        full.extend(args.iter());
        let run = shadowpatch(&state, &full);
        assert_bad_input(&run, needle);
        assert_untouched(pid);
    }
    assert_bad_input(&shadowpatch(&state, &["watch", "999999999"]), "no process");
    assert_eq!(std::fs::read(&generation).unwrap(), mirrored, "the mirror is intact");
    assert!(
        !generation.with_file_name("variables.json").exists(),
        "no variable registered from bad input"
    );
}

#[test]
fn a_read_only_state_directory_is_refused_at_start_naming_it() {
    let target = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let pid = target.pid();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    let stderr = dir.path().join("stderr");
    // A private mount namespace: a small tmpfs, mirrored into, then made read-only.
    let script = format!(
        "mount -t tmpfs -o size=16m tmpfs {state} && {bin} --state-dir {state} mirror {pid} >/dev/null && \
         mount -o remount,ro {state} && {bin} --state-dir {state} watch {pid} 2>{stderr}; echo $?",
        state = state.display(),
        bin = env!("CARGO_BIN_EXE_shadowpatch"),
        stderr = stderr.display()
    );
    let output = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .expect("unshare runs");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "2");
    let message = std::fs::read_to_string(&stderr).unwrap();
    assert_eq!(message.lines().count(), 1, "{message}");
    assert!(
        message.contains("is not writable") && message.contains(&state.display().to_string()),
        "{message}"
    );
    assert_untouched(pid);
}

#[test]
fn a_state_directory_that_fills_up_mid_run_is_reported_once_and_the_watch_goes_on() {
    let mut target = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let pid = target.pid();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    // The watcher runs in a private mount namespace with its state on a
    // small tmpfs, which is then filled from inside that namespace.
    let mut command = Command::new("unshare");
    command
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
        "mount -t tmpfs -o size=16m tmpfs {state} && exec {bin} --state-dir {state} watch {pid} --json --interval 20ms",
        state = state.display(),
        bin = env!("CARGO_BIN_EXE_shadowpatch"),
    ));
    let mut watch = WatchProcess::start_command(command);
    let fill = Command::new("nsenter")
        .args(["-t", &watch.child.id().to_string(), "-m", "sh", "-c"])
        .arg(format!(
            "dd if=/dev/zero of={}/fill bs=64k 2>/dev/null; true",
            state.display()
        ))
        .status()
        .expect("nsenter runs");
    assert!(fill.success());
    let address = target.number("cold") + 5;
    let mut memory = memory_of(pid);
    let original = memory.read_vec(address, 1).unwrap()[0];
    memory.write(address, &[original ^ 0x42]).unwrap();
    let alert = watch.wait_for("alert", |_| true);
    assert_eq!(alert["address"], address, "the alert is still reported");
    memory.write(address, &[original]).unwrap();
    watch.wait_for("cleared", |_| true);
    let (code, events) = watch.stop();
    assert_eq!(code, 1);
    let warnings: Vec<&Value> = events.iter().filter(|e| e["event"] == "warning").collect();
    assert_eq!(warnings.len(), 1, "said once: {warnings:#?}");
    assert!(
        warnings[0]["message"]
            .as_str()
            .unwrap()
            .contains("cannot record events"),
        "{warnings:#?}"
    );
    assert_eq!(
        events.last().unwrap()["event"],
        "stopped",
        "the watch went on to a clean stop"
    );
    assert_untouched(pid);
    assert_eq!(target.check().unwrap()["errors"], 0);
}
