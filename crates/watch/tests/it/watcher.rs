//! The watcher library on real processes: tampering is alerted once per
//! change with its exact location and bytes, healed through the journal
//! when asked, guarded variables are verified while their neighbours
//! change freely, authorised changes (apply, rollback, announced writes)
//! raise no alert, and a target that exits ends the watch.

use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use shadowpatch_mirror::{DirtyMethod, StateDir, VariableMode, VariableRegistry, VariableRequest};
use shadowpatch_patch::journal::{Journal, TxnKind, Write5};
use shadowpatch_patch::state::TargetState;
use shadowpatch_patch::writes::PlainWrites;
use shadowpatch_process::{ProcessIdentity, TargetMemory};
use shadowpatch_watch::{StepOutcome, WatchEvent, WatchOptions, Watcher};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver};

struct Setup {
    target: Running,
    _dir: tempfile::TempDir,
    state: PathBuf,
    memory: TargetMemory,
}

impl Setup {
    fn new(fixture: Fixture) -> Setup {
        let target = Running::start(fixture, &["2"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let memory = TargetMemory::open(&ProcessIdentity::of(target.pid()).unwrap()).unwrap();
        Setup {
            target,
            _dir: dir,
            state,
            memory,
        }
    }

    fn watcher(&self, requests: &[VariableRequest], options: WatchOptions) -> (Watcher, Receiver<WatchEvent>) {
        let (sender, receiver) = channel();
        let mut watcher = Watcher::start(
            self.target.pid(),
            &self.state,
            requests,
            options,
            Box::new(move |event: &WatchEvent| {
                let _ = sender.send(event.clone());
            }),
        )
        .unwrap();
        // As the CLI and the agent do: heals go through the operations layer.
        watcher.set_healer(std::sync::Arc::new(shadowpatch_ops::heal::OpsHealer));
        (watcher, receiver)
    }

    fn flip(&mut self, address: u64, mask: u8) -> (u8, u8) {
        let original = self.memory.read_vec(address, 1).unwrap()[0];
        self.memory.write(address, &[original ^ mask]).unwrap();
        (original, original ^ mask)
    }

    fn target_dir(&self) -> PathBuf {
        let identity = ProcessIdentity::of(self.target.pid()).unwrap();
        StateDir::open(&self.state)
            .unwrap()
            .target_dir(identity.pid, identity.start_time)
    }
}

/// Events since the last call, without the per-pass progress ones.
fn drain(events: &Receiver<WatchEvent>) -> Vec<WatchEvent> {
    events
        .try_iter()
        .filter(|e| !matches!(e, WatchEvent::Pass { .. }))
        .collect()
}

fn alerts(events: &[WatchEvent]) -> Vec<&shadowpatch_watch::Alert> {
    events
        .iter()
        .filter_map(|e| match e {
            WatchEvent::Alert(alert) => Some(alert),
            _ => None,
        })
        .collect()
}

fn cycle(watcher: &mut Watcher) {
    assert_eq!(watcher.cycle().unwrap(), StepOutcome::PassDone);
}

#[test]
fn tamper_is_alerted_once_per_change_and_again_after_it_was_undone() {
    let mut setup = Setup::new(Fixture::BusyC);
    let (mut watcher, events) = setup.watcher(&[], WatchOptions::default());
    let started = drain(&events);
    match &started[0] {
        WatchEvent::Started {
            baseline_taken,
            classification,
            ..
        } => {
            assert!(*baseline_taken, "no mirror existed: generation 0 is taken first");
            assert!(classification.immutable.iter().any(|r| r.reason.starts_with("code")));
            assert!(classification.mutable.iter().any(|r| r.reason.contains("GOT")));
        }
        other => panic!("first event {other:?}"),
    }
    cycle(&mut watcher);
    assert!(alerts(&drain(&events)).is_empty(), "clean target, no alert");

    let address = setup.target.number("cold") + 3;
    let (original, tampered) = setup.flip(address, 0x5a);
    cycle(&mut watcher);
    let seen = drain(&events);
    let found = alerts(&seen);
    assert_eq!(found.len(), 1, "{seen:?}");
    assert_eq!(found[0].address, address);
    assert_eq!(found[0].location.symbol.as_deref(), Some("cold_path"));
    assert_eq!(found[0].location.offset, Some(3));
    assert_eq!(found[0].expected, format!("{original:02x}"));
    assert_eq!(found[0].live, format!("{tampered:02x}"));
    assert_eq!(found[0].len, 1);

    // The same bytes on the next passes: no new alert.
    cycle(&mut watcher);
    cycle(&mut watcher);
    assert!(alerts(&drain(&events)).is_empty());

    // Different tampering of the same place: a new alert.
    setup.memory.write(address, &[original ^ 0x33]).unwrap();
    cycle(&mut watcher);
    let again = drain(&events);
    assert_eq!(alerts(&again).len(), 1, "{again:?}");
    assert_eq!(alerts(&again)[0].live, format!("{:02x}", original ^ 0x33));

    // Undone, then the first tampering again: cleared, then a new alert.
    setup.memory.write(address, &[original]).unwrap();
    cycle(&mut watcher);
    let restored = drain(&events);
    assert!(
        restored
            .iter()
            .any(|e| matches!(e, WatchEvent::Cleared { address: a, .. } if *a == address & !0xfff)),
        "{restored:?}"
    );
    setup.memory.write(address, &[tampered]).unwrap();
    cycle(&mut watcher);
    assert_eq!(alerts(&drain(&events)).len(), 1);
    setup.memory.write(address, &[original]).unwrap();
    assert_eq!(watcher.stats().alerts, 3);
}

#[test]
fn heal_writes_the_mirrored_bytes_back_through_the_journal() {
    let mut setup = Setup::new(Fixture::BusyC);
    let options = WatchOptions {
        heal: true,
        ..WatchOptions::default()
    };
    let (mut watcher, events) = setup.watcher(&[], options);
    cycle(&mut watcher);
    drain(&events);
    let address = setup.target.number("cold") + 1;
    let (original, _) = setup.flip(address, 0xff);
    cycle(&mut watcher);
    let seen = drain(&events);
    assert_eq!(alerts(&seen).len(), 1, "{seen:?}");
    let heal = seen
        .iter()
        .find_map(|e| match e {
            WatchEvent::Heal(heal) => Some(heal),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no heal in {seen:?}"));
    assert!(heal.ok, "{heal:?}");
    assert_eq!(heal.runs, vec![(address, 1)]);
    assert_eq!(setup.memory.read_vec(address, 1).unwrap()[0], original);
    // Journaled as a committed heal transaction.
    let journal = Journal::replay(&setup.target_dir()).unwrap();
    assert!(journal.open.is_none());
    assert_eq!(journal.next_txn, heal.txn.unwrap() + 1);
    let text = std::fs::read_to_string(Journal::path_in(&setup.target_dir())).unwrap();
    assert!(text.contains("\"kind\":\"heal\""), "{text}");

    // Healed, then tampered again: a new alert, healed again.
    cycle(&mut watcher);
    assert!(alerts(&drain(&events)).is_empty(), "clean after the heal");
    setup.flip(address, 0x0f);
    cycle(&mut watcher);
    let again = drain(&events);
    assert_eq!(alerts(&again).len(), 1, "{again:?}");
    assert!(again.iter().any(|e| matches!(e, WatchEvent::Heal(h) if h.ok)));
    assert_eq!(setup.memory.read_vec(address, 1).unwrap()[0], original);
    assert_eq!(setup.target.check().unwrap()["errors"], 0);
    common_untouched(setup.target.pid());
}

#[test]
fn guarded_variable_tamper_is_alerted_and_healed_while_its_changing_neighbour_is_not() {
    let mut setup = Setup::new(Fixture::BusyC);
    let request = VariableRequest::parse("scale", VariableMode::Guarded, "--guard scale").unwrap();
    let options = WatchOptions {
        heal: true,
        ..WatchOptions::default()
    };
    let (mut watcher, events) = setup.watcher(&[request], options);
    let registry = VariableRegistry::load(&setup.target_dir()).unwrap().unwrap();
    assert_eq!(registry.variables.len(), 1);
    let scale = &registry.variables[0];
    assert_eq!((scale.symbol.as_deref(), scale.size), (Some("scale"), 8));
    assert_eq!(scale.guarded_bytes.as_deref(), Some(&3u64.to_le_bytes()[..]));
    // `calls`, on the same page, changes all the time: never an alert.
    for _ in 0..5 {
        cycle(&mut watcher);
    }
    assert!(alerts(&drain(&events)).is_empty());

    setup.memory.write(scale.address, &5u64.to_le_bytes()).unwrap();
    cycle(&mut watcher);
    let seen = drain(&events);
    let found = alerts(&seen);
    assert_eq!(found.len(), 1, "{seen:?}");
    assert_eq!(found[0].address, scale.address);
    assert_eq!(found[0].variable.as_deref(), Some(scale.name.as_str()));
    assert_eq!(found[0].location.symbol.as_deref(), Some("scale"));
    assert_eq!(found[0].expected, "03");
    assert_eq!(found[0].live, "05");
    assert!(
        seen.iter().any(|e| matches!(e, WatchEvent::Heal(h) if h.ok)),
        "{seen:?}"
    );
    assert_eq!(setup.memory.read_vec(scale.address, 8).unwrap(), 3u64.to_le_bytes());
}

#[test]
fn apply_rollback_and_announced_writes_raise_no_alert_but_other_tampering_does() {
    let mut setup = Setup::new(Fixture::BusyC);
    let (mut watcher, events) = setup.watcher(&[], WatchOptions::default());
    cycle(&mut watcher);
    let binary = setup.target.binary();
    let manifest = write_manifest(setup._dir.path(), &binary);
    for _ in 0..3 {
        let applied = shadowpatch_patch::apply(
            &setup.state,
            setup.target.pid(),
            &manifest,
            &shadowpatch_patch::ApplyOptions::default(),
        )
        .unwrap();
        cycle(&mut watcher);
        cycle(&mut watcher);
        assert_eq!(watcher.stats().generation, applied.generation);
        shadowpatch_patch::rollback(&setup.state, setup.target.pid(), None).unwrap();
        cycle(&mut watcher);
        cycle(&mut watcher);
        assert_eq!(watcher.stats().generation, 0);
    }
    let seen = drain(&events);
    assert!(alerts(&seen).is_empty(), "{seen:?}");
    assert!(seen
        .iter()
        .any(|e| matches!(e, WatchEvent::GenerationSwitched { to: 1, .. })));
    assert!(
        !seen.iter().any(|e| matches!(
            e,
            WatchEvent::NewExecutableMapping { .. }
                | WatchEvent::RegionUnmapped { .. }
                | WatchEvent::PermissionsChanged { .. }
        )),
        "{seen:?}"
    );

    // Writes announced by an open transaction are authorised while it is
    // open; a change elsewhere meanwhile is still an alert.
    let cold = setup.target.number("cold");
    let identity = ProcessIdentity::of(setup.target.pid()).unwrap();
    let mut target = TargetState::open(&StateDir::open(&setup.state).unwrap(), &identity).unwrap();
    let original = setup.memory.read_vec(cold, 5).unwrap();
    let probe = PlainWrites::begin(
        &mut target,
        &identity,
        TxnKind::Probe,
        "probe-test",
        vec![Write5 {
            address: cold,
            original: original.clone(),
            new: vec![0xcc; 5],
        }],
        None,
    )
    .unwrap();
    setup.memory.write(cold, &[0xcc; 5]).unwrap();
    cycle(&mut watcher);
    assert!(alerts(&drain(&events)).is_empty());
    let elsewhere = cold + 40;
    setup.flip(elsewhere, 0x11);
    cycle(&mut watcher);
    let seen = drain(&events);
    assert_eq!(alerts(&seen).len(), 1, "{seen:?}");
    assert_eq!(alerts(&seen)[0].address, elsewhere);
    setup.flip(elsewhere, 0x11);
    setup.memory.write(cold, &original).unwrap();
    probe.commit(&mut target, 0).unwrap();
    drop(target);
    cycle(&mut watcher);
    assert!(alerts(&drain(&events)).is_empty());
    assert_eq!(setup.target.check().unwrap()["errors"], 0);
}

#[test]
fn code_made_writable_and_new_executable_memory_are_reported_once() {
    use nix::libc::{MAP_ANONYMOUS, MAP_PRIVATE, PROT_EXEC, PROT_READ, PROT_WRITE};
    let setup = Setup::new(Fixture::BusyC);
    let (mut watcher, events) = setup.watcher(&[], WatchOptions::default());
    cycle(&mut watcher);
    drain(&events);
    let cold_page = setup.target.number("cold") & !0xfff;
    let identity = ProcessIdentity::of(setup.target.pid()).unwrap();
    let mut attached = shadowpatch_process::Attached::seize(&identity).unwrap();
    let mut stopped = attached.stop().unwrap();
    let tid = stopped.borrowable_thread();
    stopped
        .remote_mprotect(tid, cold_page, 4096, PROT_READ | PROT_WRITE | PROT_EXEC)
        .unwrap();
    let injected = stopped
        .remote_mmap(tid, 0, 4096, PROT_READ | PROT_EXEC, MAP_PRIVATE | MAP_ANONYMOUS)
        .unwrap();
    stopped.resume().unwrap();
    attached.detach().unwrap();

    cycle(&mut watcher);
    cycle(&mut watcher);
    let seen = drain(&events);
    let changed: Vec<&WatchEvent> = seen
        .iter()
        .filter(|e| matches!(e, WatchEvent::PermissionsChanged { .. }))
        .collect();
    assert_eq!(changed.len(), 1, "reported once: {seen:?}");
    match changed[0] {
        WatchEvent::PermissionsChanged { mirrored, live, .. } => {
            assert_eq!((mirrored.as_str(), live.as_str()), ("r-xp", "rwxp"))
        }
        _ => unreachable!(),
    }
    let new_code: Vec<&WatchEvent> = seen
        .iter()
        .filter(|e| matches!(e, WatchEvent::NewExecutableMapping { start, .. } if *start == injected))
        .collect();
    assert_eq!(new_code.len(), 1, "reported once: {seen:?}");
    assert!(alerts(&seen).is_empty(), "the bytes themselves did not change");
}

/// Watch `fixture` with `requests` for a pass, end the process, and check
/// the next pass reports the exit; returns the watcher.
fn exit_ends_the_watch(fixture: Fixture, requests: &[VariableRequest]) -> Watcher {
    let setup = Setup::new(fixture);
    let (mut watcher, events) = setup.watcher(requests, WatchOptions::default());
    cycle(&mut watcher);
    let Setup { target, .. } = setup;
    drop(target);
    match watcher.cycle().unwrap() {
        StepOutcome::TargetExited(reason) => assert!(reason.contains("pid"), "{reason}"),
        other => panic!("expected the exit to be seen, got {other:?}"),
    }
    assert!(drain(&events)
        .iter()
        .any(|e| matches!(e, WatchEvent::TargetExited { .. })));
    watcher
}

#[test]
fn a_target_that_exits_ends_the_watch() {
    exit_ends_the_watch(Fixture::BusyRust, &[]);
}

#[test]
fn a_mirrored_variable_gets_a_snapshot_per_change_and_tracking_is_undone_on_stop() {
    let mut setup = Setup::new(Fixture::BusyC);
    let request = VariableRequest::parse("scale", VariableMode::Mirrored, "--mirror-var scale").unwrap();
    let (mut watcher, events) = setup.watcher(&[request], WatchOptions::default());
    let started = drain(&events);
    match &started[0] {
        WatchEvent::Started {
            mirrored_variables,
            dirty_method,
            guarded_variables,
            ..
        } => {
            assert_eq!(mirrored_variables.len(), 1);
            assert!(guarded_variables.is_empty());
            assert_eq!(*dirty_method, Some(DirtyMethod::UffdWpAsync), "the best method here");
        }
        other => panic!("{other:?}"),
    }
    let value_of = |events: &[WatchEvent]| -> Vec<Option<u64>> {
        events
            .iter()
            .filter_map(|e| match e {
                WatchEvent::Snapshot { value, .. } => Some(*value),
                _ => None,
            })
            .collect()
    };
    assert_eq!(value_of(&started), [Some(3)], "the first snapshot is taken at start");
    let scale = VariableRegistry::load(&setup.target_dir()).unwrap().unwrap().variables[0].clone();
    // `calls` shares the page and changes all the time: its page is
    // re-copied, but scale's bytes did not change, so no snapshot.
    for _ in 0..3 {
        cycle(&mut watcher);
    }
    assert!(value_of(&drain(&events)).is_empty());
    for value in [5u64, 6] {
        setup.memory.write(scale.address, &value.to_le_bytes()).unwrap();
        cycle(&mut watcher);
        let seen = drain(&events);
        assert_eq!(value_of(&seen), [Some(value)], "{seen:?}");
        assert!(alerts(&seen).is_empty(), "a mirrored variable may change");
    }
    setup.memory.write(scale.address, &3u64.to_le_bytes()).unwrap();
    cycle(&mut watcher);
    assert_eq!(watcher.stop_dirty_tracking(), Some(true));
    assert_eq!(watcher.stop_dirty_tracking(), None, "undone once");
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", setup.target.pid())).unwrap();
    assert!(
        !smaps
            .lines()
            .filter_map(|l| l.strip_prefix("VmFlags:"))
            .any(|flags| flags.split_whitespace().any(|f| f == "uw")),
        "no write-protected mapping left"
    );
    common_untouched(setup.target.pid());
}

#[test]
fn a_target_with_mirrored_variables_that_exits_ends_the_watch() {
    let request = VariableRequest::parse("scale", VariableMode::Mirrored, "--mirror-var scale").unwrap();
    let mut watcher = exit_ends_the_watch(Fixture::BusyC, &[request]);
    // Nothing is left to undo in a process that is gone.
    assert_eq!(watcher.stop_dirty_tracking(), Some(true));
}

#[test]
fn an_unavailable_dirty_method_is_refused_and_nothing_is_written() {
    let setup = Setup::new(Fixture::BusyC);
    let request = VariableRequest::parse("scale", VariableMode::Mirrored, "--mirror-var scale").unwrap();
    let error = Watcher::start(
        setup.target.pid(),
        &setup.state,
        &[request],
        WatchOptions {
            dirty_method: Some(DirtyMethod::SoftDirty),
            ..WatchOptions::default()
        },
        Box::new(|_| {}),
    )
    .unwrap_err();
    assert!(error.is_bad_input());
    assert!(error.to_string().contains("soft_dirty is unavailable"), "{error}");
    assert!(!setup.state.exists(), "nothing written before the input was checked");
}

fn write_manifest(dir: &Path, binary: &Path) -> PathBuf {
    let image = shadowpatch_symbols::ElfImage::open(binary).unwrap();
    let build_id = shadowpatch_symbols::hex(image.build_id.as_deref().unwrap());
    let object = build_patch(Patch::BusyFix).unwrap();
    let path = dir.join("fix.toml");
    std::fs::write(
        &path,
        format!(
            "id = \"fix\"\nobject = \"{}\"\n[target]\nbuild_id = \"{build_id}\"\n\
             [[replace]]\nsymbol = \"work_fn\"\nwith = \"work_fn_v2\"\n",
            object.display()
        ),
    )
    .unwrap();
    path
}

/// Not traced and not stopped.
fn common_untouched(pid: i32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("TracerPid:\t0"), "{status}");
}
