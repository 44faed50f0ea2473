//! Plain journaled writes (heal, probe, repoint) on a real process: they
//! switch in one stop, and `recover` finishes an interrupted heal and
//! undoes an interrupted probe; one process at a time holds a target.

use shadowpatch_fixtures::{Fixture, Running};
use shadowpatch_mirror::StateDir;
use shadowpatch_patch::activate::{switch, Direction, DEFAULT_ATTEMPTS};
use shadowpatch_patch::journal::{Journal, TxnKind, Write5};
use shadowpatch_patch::state::TargetState;
use shadowpatch_patch::writes::{write_in_one_stop, PlainWrites};
use shadowpatch_patch::{recover, PatchError, Recovered};
use shadowpatch_process::{Attached, ProcessIdentity, TargetMemory};

struct Setup {
    target: Running,
    _dir: tempfile::TempDir,
    state: std::path::PathBuf,
    identity: ProcessIdentity,
    /// `cold_path`, which the fixture never calls: safe to overwrite.
    cold: u64,
}

impl Setup {
    fn new() -> Setup {
        let target = Running::start(Fixture::BusyC, &["2"]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let identity = ProcessIdentity::of(target.pid()).unwrap();
        let cold = target.number("cold");
        Setup {
            target,
            _dir: dir,
            state,
            identity,
            cold,
        }
    }

    fn open(&self) -> TargetState {
        TargetState::open(&StateDir::create(&self.state).unwrap(), &self.identity).unwrap()
    }

    fn live(&self, len: usize) -> Vec<u8> {
        TargetMemory::open(&self.identity)
            .unwrap()
            .read_vec(self.cold, len)
            .unwrap()
    }

    fn write(&self, new: &[u8]) -> Write5 {
        Write5 {
            address: self.cold,
            original: self.live(new.len()),
            new: new.to_vec(),
        }
    }
}

const NOPS: [u8; 5] = [0x90; 5];

#[test]
fn a_heal_switches_in_one_stop_and_is_journaled() {
    let setup = Setup::new();
    let write = setup.write(&NOPS);
    let mut target = setup.open();
    let mut attached = Attached::seize(&setup.identity).unwrap();
    let activation = write_in_one_stop(
        &mut attached,
        &mut target,
        TxnKind::Heal,
        "heal",
        vec![write.clone()],
        None,
        DEFAULT_ATTEMPTS,
    )
    .unwrap();
    drop(attached);
    assert!(activation.pause.pause_us > 0);
    assert_eq!(setup.live(5), NOPS);
    let replayed = Journal::replay(&target.dir).unwrap();
    assert!(replayed.open.is_none() && replayed.active.is_empty());
    assert_eq!(replayed.next_txn, 1);

    // The expected bytes are checked: the same heal again is refused and
    // journaled as aborted, touching nothing.
    let mut attached = Attached::seize(&setup.identity).unwrap();
    let error = write_in_one_stop(
        &mut attached,
        &mut target,
        TxnKind::Heal,
        "heal",
        vec![write],
        None,
        DEFAULT_ATTEMPTS,
    )
    .unwrap_err();
    assert!(matches!(error, PatchError::Tampered { .. }), "{error}");
    assert!(Journal::replay(&target.dir).unwrap().open.is_none());
    assert_eq!(setup.target.pid(), setup.identity.pid);
}

#[test]
fn recover_undoes_an_interrupted_probe_and_finishes_an_interrupted_heal() {
    let mut setup = Setup::new();
    // A probe whose breakpoint-like bytes were written, then the tool died.
    let probe = setup.write(&NOPS[..1]);
    {
        let mut target = setup.open();
        let transaction = PlainWrites::begin(
            &mut target,
            &setup.identity,
            TxnKind::Probe,
            "probe",
            vec![probe.clone()],
            None,
        )
        .unwrap();
        let mut attached = Attached::seize(&setup.identity).unwrap();
        switch(
            &mut attached,
            &transaction.writes,
            Direction::Forward,
            DEFAULT_ATTEMPTS,
            "",
            &mut |_| Ok(()),
        )
        .unwrap();
        std::mem::forget(transaction);
    }
    assert_eq!(setup.live(1), NOPS[..1]);
    let recovered = recover(&setup.state, setup.target.pid()).unwrap();
    assert_eq!(recovered.state, Recovered::FullyRolledBack);
    assert_eq!(recovered.interrupted, Some(TxnKind::Probe));
    assert_eq!(setup.live(1), probe.original, "the probe's byte is removed");

    // A heal announced but never written: recover completes it.
    let heal = setup.write(&NOPS);
    {
        let mut target = setup.open();
        let transaction = PlainWrites::begin(
            &mut target,
            &setup.identity,
            TxnKind::Heal,
            "heal",
            vec![heal.clone()],
            None,
        )
        .unwrap();
        std::mem::forget(transaction);
    }
    let recovered = recover(&setup.state, setup.target.pid()).unwrap();
    assert_eq!(recovered.state, Recovered::FullyApplied);
    assert_eq!((recovered.written, recovered.total), (0, 1));
    assert_eq!(setup.live(5), NOPS);
    assert!(Journal::replay(&setup.open().dir).unwrap().open.is_none());
    assert_eq!(setup.target.check().unwrap()["errors"], 0);
}

#[test]
fn a_second_process_waits_for_the_lock_then_is_refused_naming_the_holder() {
    let setup = Setup::new();
    let held = setup.open();
    std::env::set_var("SHADOWPATCH_LOCK_WAIT_MS", "200");
    let started = std::time::Instant::now();
    let error = shadowpatch_patch::state::TargetLock::acquire(&held.dir).unwrap_err();
    // The crate's other tests share this process (tests/it): give them
    // back the default wait.
    std::env::remove_var("SHADOWPATCH_LOCK_WAIT_MS");
    assert!(started.elapsed() >= std::time::Duration::from_millis(200));
    let message = error.to_string();
    assert!(matches!(error, PatchError::Locked { .. }), "{message}");
    assert!(message.contains(&std::process::id().to_string()), "{message}");
    let dir = held.dir.clone();
    drop(held);
    shadowpatch_patch::state::TargetLock::acquire(&dir).expect("free once the holder is gone");
}
