//! A patch that calls a libc IFUNC which libc holds no IRELATIVE slot for
//! (`strstr`: libc never calls it through its own PLT) binds to the
//! implementation the dynamic linker chose for the program, read from the
//! program's GOT, and runs in the live server. Found on Debian's
//! tinyproxy, where every patch including `process_request` was refused
//! with "strstr ... is an IFUNC without an IRELATIVE slot".

use crate::common::Live;
use std::time::Duration;

#[test]
fn a_patch_calling_strstr_binds_through_the_program_s_got_and_runs() {
    let mut live = Live::server(true);
    // The premise: libc defines strstr as an IFUNC and has no IRELATIVE
    // slot for it, and the server imports it.
    let maps = shadowpatch_process::maps::read_maps(live.pid()).unwrap();
    let modules = shadowpatch_symbols::modules_of(live.pid(), &maps).unwrap();
    let libc = modules.iter().find(|m| m.name.starts_with("libc.so")).unwrap();
    let (resolver, symbol) = libc
        .symbol_addresses("strstr")
        .into_iter()
        .find(|(_, s)| s.global)
        .unwrap();
    assert!(symbol.ifunc);
    assert!(!libc.image.irelative_slots.contains_key(&(resolver - libc.bias)));
    let server = modules.iter().find(|m| m.main).unwrap();
    assert!(server.image.import_slots.values().any(|name| name == "strstr"));

    let manifest = live.manifest("libc", &[("handle_command", "handle_command_libc")]);
    // `Live::server` ran one command: the server's lazily bound strstr
    // slot holds the implementation the linker chose.
    let before = live.target.check().unwrap();
    shadowpatch_patch::apply(
        &live.state(),
        live.pid(),
        &manifest,
        &shadowpatch_patch::ApplyOptions::default(),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let after = live.target.check().unwrap();
    assert!(after["calls"] > before["calls"] + 100, "{before:?} {after:?}");
    assert_eq!(after["errors"], 0, "every reply checked by the server's workers");
}

/// Before the program has called strstr, lazy binding has not chosen an
/// implementation: the apply is refused in one line that says so, and the
/// server is left as it was (no mapping added, the entry unchanged, no
/// active patch).
#[test]
fn a_strstr_no_module_has_bound_yet_is_refused_and_the_target_untouched() {
    let mut live = Live::server_before_any_command(true);
    let handle = live.target.number("handle");
    let original = live.byte_at(handle);
    let maps = || std::fs::read_to_string(format!("/proc/{}/maps", live.pid())).unwrap();
    let before = maps();
    let manifest = live.manifest("libc", &[("handle_command", "handle_command_libc")]);
    let error = shadowpatch_patch::apply(
        &live.state(),
        live.pid(),
        &manifest,
        &shadowpatch_patch::ApplyOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("strstr") && error.contains("lazy binding"), "{error}");
    assert!(!error.contains('\n'), "{error}");
    assert_eq!(maps(), before, "no mapping added or left behind");
    for target in std::fs::read_dir(live.state().join("targets")).into_iter().flatten() {
        let journal = shadowpatch_patch::journal::Journal::replay(&target.unwrap().path()).unwrap();
        assert!(
            journal.active.is_empty() && journal.open.is_none(),
            "no patch left: {journal:?}"
        );
    }
    live.assert_untouched(&[(handle, original)]);
}
