//! End to end: mirror and verify real C and Rust processes, detect a
//! tampered byte exactly, and refuse every kind of bad input cleanly.

use crate::common::{assert_bad_input, assert_untouched, shadowpatch};
use shadowpatch_fixtures::{Fixture, Running};
use shadowpatch_process::{ProcessIdentity, TargetMemory};

fn tamper_detect_restore(fixture: Fixture, cold_symbol: &str) {
    let mut target = Running::start(fixture, &["4"]).unwrap();
    let pid = target.pid().to_string();
    let state = tempfile::tempdir().unwrap();
    let mirror = shadowpatch(state.path(), &["mirror", &pid, "--json"]);
    assert_eq!(mirror.code, 0, "{}", mirror.stderr);
    let mirror = mirror.json();
    assert_eq!(mirror["generation"], 0);
    assert!(mirror["bytes"].as_u64().unwrap() > 0);
    assert!(mirror["modules"]
        .as_array()
        .unwrap()
        .iter()
        .any(|m| m["name"].as_str().unwrap().starts_with("libc")));

    let clean = shadowpatch(state.path(), &["verify", &pid, "--json"]);
    assert_eq!(clean.code, 0, "{}{}", clean.stdout, clean.stderr);
    assert_eq!(clean.json()["clean"], true);

    // Tamper one byte of a function the workers never call.
    let address = target.number("cold") + 3;
    let mut memory = TargetMemory::open(&ProcessIdentity::of(target.pid()).unwrap()).unwrap();
    let original = memory.read_vec(address, 1).unwrap()[0];
    memory.write(address, &[original ^ 0x5a]).unwrap();

    let dirty = shadowpatch(state.path(), &["verify", &pid, "--json"]);
    assert_eq!(dirty.code, 1, "{}{}", dirty.stdout, dirty.stderr);
    let dirty = dirty.json();
    assert_eq!(dirty["clean"], false);
    assert_eq!(dirty["differing_pages"], 1);
    let differences = dirty["differences"].as_array().unwrap();
    assert_eq!(differences.len(), 1, "{differences:?}");
    let difference = &differences[0];
    assert_eq!(difference["address"], address);
    assert_eq!(difference["len"], 1);
    assert_eq!(difference["symbol"], cold_symbol);
    assert_eq!(difference["offset"], 3);
    assert_eq!(difference["expected"], format!("{original:02x}"));
    assert_eq!(difference["live"], format!("{:02x}", original ^ 0x5a));
    assert!(difference["module"].as_str().unwrap().starts_with("busy"));

    // The human form names the same place.
    let text = shadowpatch(state.path(), &["verify", &pid]);
    assert_eq!(text.code, 1);
    assert!(
        text.stdout.contains(&format!("!{cold_symbol}+0x3 (1 byte)")),
        "{}",
        text.stdout
    );

    memory.write(address, &[original]).unwrap();
    let restored = shadowpatch(state.path(), &["verify", &pid, "--json"]);
    assert_eq!(restored.code, 0, "{}", restored.stdout);
    assert_eq!(target.check().unwrap()["errors"], 0);
    assert_untouched(target.pid());
}

#[test]
fn c_fixture_tamper_is_detected_exactly_and_restored() {
    tamper_detect_restore(Fixture::BusyC, "cold_path");
}

#[test]
fn rust_fixture_tamper_is_detected_exactly_and_restored() {
    tamper_detect_restore(Fixture::BusyRust, "rust_cold_path");
}

#[test]
fn read_only_data_is_mirrored_too() {
    let target = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let pid = target.pid().to_string();
    let state = tempfile::tempdir().unwrap();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let name = exe.file_name().unwrap().to_str().unwrap();
    assert_eq!(shadowpatch(state.path(), &["mirror", &pid, "--module", name]).code, 0);
    let address = target.number("greeting");
    let mut memory = TargetMemory::open(&ProcessIdentity::of(target.pid()).unwrap()).unwrap();
    memory.write(address, b"S").unwrap();
    let dirty = shadowpatch(state.path(), &["verify", &pid, "--json"]).json();
    assert_eq!(dirty["differences"][0]["symbol"], "greeting");
    assert_eq!(dirty["differences"][0]["live"], "53");
    memory.write(address, b"s").unwrap();
}

#[test]
fn module_filter_limits_regions_and_unknown_module_is_refused() {
    let target = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let pid = target.pid().to_string();
    let state = tempfile::tempdir().unwrap();
    let only_libc = shadowpatch(state.path(), &["mirror", &pid, "--module", "libc", "--json"]).json();
    let modules = only_libc["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 1);
    assert!(modules[0]["name"].as_str().unwrap().starts_with("libc.so"));
    assert_bad_input(
        &shadowpatch(state.path(), &["mirror", &pid, "--module", "nosuchlib"]),
        "no module named nosuchlib",
    );
    assert_untouched(target.pid());
}

#[test]
fn status_reports_identity_modules_and_generations() {
    let target = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let pid = target.pid().to_string();
    let state = tempfile::tempdir().unwrap();
    let before = shadowpatch(state.path(), &["status", &pid, "--json"]).json();
    assert_eq!(before["generations"].as_array().unwrap().len(), 0);
    assert_eq!(before["threads"], 3);
    assert_eq!(shadowpatch(state.path(), &["mirror", &pid]).code, 0);
    let after = shadowpatch(state.path(), &["status", &pid, "--json"]).json();
    assert_eq!(after["pid"], target.pid());
    assert_eq!(
        after["start_time"],
        ProcessIdentity::of(target.pid()).unwrap().start_time
    );
    let generations = after["generations"].as_array().unwrap();
    assert_eq!(generations.len(), 1);
    assert!(generations[0]["bytes"].as_u64().unwrap() > 0);
    let main = after["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["main"] == true)
        .cloned()
        .unwrap();
    assert_eq!(main["build_id"].as_str().unwrap().len(), 40);
    assert_eq!(main["has_symtab"], true);
}

#[test]
fn pause_reports_latencies_for_every_thread() {
    let target = Running::start(Fixture::BusyC, &["8"]).unwrap();
    let state = tempfile::tempdir().unwrap();
    let run = shadowpatch(
        state.path(),
        &["pause", &target.pid().to_string(), "--rounds", "20", "--json"],
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    let summary = run.json();
    assert_eq!(summary["threads"], 9);
    assert_eq!(summary["rounds"], 20);
    assert!(summary["pause_us"]["median"].as_u64().unwrap() > 0);
    assert_untouched(target.pid());
}

#[test]
fn lookup_resolves_names_and_addresses() {
    let target = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let pid = target.pid().to_string();
    let state = tempfile::tempdir().unwrap();
    let by_name = shadowpatch(state.path(), &["lookup", &pid, "work_fn", "--json"]).json();
    assert_eq!(by_name[0]["address"], format!("{:#x}", target.number("work")));
    let by_address = shadowpatch(
        state.path(),
        &["lookup", &pid, &format!("{:#x}", target.number("work") + 2), "--json"],
    )
    .json();
    assert_eq!(by_address["symbol"], "work_fn");
    assert_eq!(by_address["offset"], 2);
    assert_bad_input(
        &shadowpatch(state.path(), &["lookup", &pid, "no_such_symbol"]),
        "no symbol named",
    );
}

#[test]
fn dead_missing_kernel_and_zombie_pids_are_refused() {
    let state = tempfile::tempdir().unwrap();
    for command in ["mirror", "verify", "status", "pause"] {
        assert_bad_input(
            &shadowpatch(state.path(), &[command, "2147483646"]),
            "no process with pid 2147483646",
        );
        assert_bad_input(&shadowpatch(state.path(), &[command, "2"]), "kernel thread");
    }
    let zombie = std::process::Command::new("true").spawn().unwrap();
    let pid = zombie.id().to_string();
    // Poll until the child has exited (a zombie until we reap it).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        if stat.rsplit_once(") ").unwrap().1.starts_with('Z') {
            break;
        }
        assert!(std::time::Instant::now() < deadline);
        std::thread::yield_now();
    }
    for command in ["mirror", "verify", "pause"] {
        assert_bad_input(&shadowpatch(state.path(), &[command, &pid]), "zombie");
    }
    drop(zombie);
}

#[test]
fn a_thread_id_is_refused_naming_its_process() {
    let target = Running::start(Fixture::BusyC, &["1", "--blockers"]).unwrap();
    let state = tempfile::tempdir().unwrap();
    let tid = target.number("tid_read").to_string();
    assert_bad_input(
        &shadowpatch(state.path(), &["pause", &tid]),
        &format!("thread of process {}", target.pid()),
    );
    assert_untouched(target.pid());
}

#[test]
fn an_unprivileged_caller_gets_the_ptrace_hint_and_the_target_is_untouched() {
    use std::os::unix::process::CommandExt;
    let target = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let state = tempfile::tempdir().unwrap();
    // The build directory may sit under a directory only root can enter
    // (CI clones anywhere): run a copy from a world-readable place.
    let (_bin_dir, binary) = crate::common::binary_runnable_by_anyone();
    for command in ["pause", "mirror"] {
        let output = std::process::Command::new(&binary)
            .args([command, &target.pid().to_string()])
            .env("SHADOWPATCH_STATE_DIR", state.path())
            .current_dir("/")
            .uid(65534)
            .gid(65534)
            .output()
            .unwrap();
        let run = crate::common::from_output(output);
        assert_bad_input(&run, "CAP_SYS_PTRACE");
    }
    assert_untouched(target.pid());
}

#[test]
fn state_directory_problems_are_refused() {
    let mut target = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let pid = target.pid().to_string();
    let root = tempfile::tempdir().unwrap();

    // Missing: verify has nothing to compare with.
    let missing = root.path().join("missing");
    assert_bad_input(&shadowpatch(&missing, &["verify", &pid]), "does not exist");

    // Foreign: a non-empty directory that is not ours.
    let foreign = root.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("precious.txt"), "not yours").unwrap();
    assert_bad_input(
        &shadowpatch(&foreign, &["mirror", &pid]),
        "not a shadowpatch state directory",
    );
    assert_bad_input(
        &shadowpatch(&foreign, &["verify", &pid]),
        "not a shadowpatch state directory",
    );
    assert_eq!(
        std::fs::read_to_string(foreign.join("precious.txt")).unwrap(),
        "not yours"
    );

    // No mirror of this pid yet.
    let state = root.path().join("state");
    assert_eq!(shadowpatch(&state, &["status", &pid]).code, 0);
    let other = Running::start(Fixture::BusyC, &["1"]).unwrap();
    assert_eq!(shadowpatch(&state, &["mirror", &other.pid().to_string()]).code, 0);
    assert_bad_input(&shadowpatch(&state, &["verify", &pid]), "run `shadowpatch mirror");

    // Corrupt: flip a byte in the page-hash section, then truncate.
    assert_eq!(shadowpatch(&state, &["mirror", &pid]).code, 0);
    let start_time = ProcessIdentity::of(target.pid()).unwrap().start_time;
    let dir = state.join("targets").join(format!("{pid}-{start_time}"));
    let file = dir.join("gen-000000.mirror");
    let pristine = std::fs::read(&file).unwrap();
    let header_offset = u64::from_le_bytes(pristine[pristine.len() - 16..pristine.len() - 8].try_into().unwrap());
    let header_end = pristine.len() - 48;
    let mut corrupt = pristine.clone();
    corrupt[header_offset as usize - 5] ^= 1;
    std::fs::write(&file, &corrupt).unwrap();
    assert_bad_input(
        &shadowpatch(&state, &["verify", &pid]),
        "corrupt: page hashes do not match",
    );
    std::fs::write(&file, &pristine[..pristine.len() - 3]).unwrap();
    assert_bad_input(&shadowpatch(&state, &["verify", &pid]), "corrupt");
    std::fs::write(&file, &pristine).unwrap();
    assert_eq!(shadowpatch(&state, &["verify", &pid]).code, 0);

    // A changed module: the mirror says another build-id.
    let text = String::from_utf8_lossy(&pristine).into_owned();
    let live_id = shadowpatch(&state, &["status", &pid, "--json"]).json()["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["main"] == true)
        .unwrap()["build_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains(&live_id));
    let forged_id: String = live_id.chars().map(|c| if c == '0' { '1' } else { '0' }).collect();
    // Edit the header: without re-sealing its digest the edit is caught as
    // corruption; re-sealed, as a mirror of another build would be, the
    // build-id check refuses it.
    let mut changed = replace_bytes(&pristine, live_id.as_bytes(), forged_id.as_bytes());
    std::fs::write(&file, &changed).unwrap();
    assert_bad_input(
        &shadowpatch(&state, &["verify", &pid]),
        "header does not match its digest",
    );
    let digest = *blake3::hash(&changed[header_offset as usize..header_end]).as_bytes();
    changed[header_end..header_end + 32].copy_from_slice(&digest);
    std::fs::write(&file, &changed).unwrap();
    assert_bad_input(&shadowpatch(&state, &["verify", &pid]), "changed since it was mirrored");
    std::fs::write(&file, &pristine).unwrap();

    // Another incarnation: state recorded for the same pid with another start time.
    std::fs::rename(&dir, dir.with_file_name(format!("{pid}-{}", start_time + 1))).unwrap();
    assert_bad_input(
        &shadowpatch(&state, &["verify", &pid]),
        "a different process incarnation",
    );

    assert_eq!(target.check().unwrap()["errors"], 0);
    assert_untouched(target.pid());
}

fn replace_bytes(haystack: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = haystack.to_vec();
    let mut i = 0;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from {
            out[i..i + from.len()].copy_from_slice(to);
            i += from.len();
        } else {
            i += 1;
        }
    }
    out
}

#[test]
fn read_only_state_directory_fails_cleanly() {
    let target = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let root = tempfile::tempdir().unwrap();
    // /proc is never writable, even for root: a stand-in for a read-only disk.
    let run = shadowpatch(
        std::path::Path::new("/proc/shadowpatch-state"),
        &["mirror", &target.pid().to_string()],
    );
    assert_bad_input(&run, "/proc/shadowpatch-state");
    drop(root);
    assert_untouched(target.pid());
}
