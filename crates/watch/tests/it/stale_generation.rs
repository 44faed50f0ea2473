//! A running watcher follows the journal, not the highest generation file:
//! a rollback killed after its commit, before it removed its generation,
//! leaves a generation nothing backs; the watcher must verify against the
//! one the journal names (and raise no alert), as `verify` does.

use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use shadowpatch_mirror::StateDir;
use shadowpatch_process::ProcessIdentity;
use shadowpatch_watch::{StepOutcome, WatchEvent, WatchOptions, Watcher};
use std::sync::mpsc::channel;
use std::time::Duration;

#[test]
fn a_stale_generation_left_by_a_killed_rollback_is_not_verified_against() {
    let target = Running::start(Fixture::BusyC, &["2"]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let image = shadowpatch_symbols::ElfImage::open(&target.binary()).unwrap();
    let build_id = shadowpatch_symbols::hex(image.build_id.as_deref().unwrap());
    let object = build_patch(Patch::BusyFix).unwrap();
    let manifest = dir.path().join("fix.toml");
    std::fs::write(
        &manifest,
        format!(
            "id = \"fix\"\nobject = \"{}\"\n[target]\nbuild_id = \"{build_id}\"\n\
             [[replace]]\nsymbol = \"work_fn\"\nwith = \"work_fn_v2\"\n",
            object.display()
        ),
    )
    .unwrap();
    let (sender, events) = channel();
    // Unsettled states are reported at once: only a watcher that follows
    // the journal stays quiet.
    let options = WatchOptions {
        settle_timeout: Duration::ZERO,
        ..WatchOptions::default()
    };
    let mut watcher = Watcher::start(
        target.pid(),
        &state,
        &[],
        options,
        Box::new(move |event: &WatchEvent| {
            let _ = sender.send(event.clone());
        }),
    )
    .unwrap();
    let cycle = |watcher: &mut Watcher| assert_eq!(watcher.cycle().unwrap(), StepOutcome::PassDone);
    cycle(&mut watcher);
    shadowpatch_patch::apply(&state, target.pid(), &manifest, &Default::default()).unwrap();
    cycle(&mut watcher);
    cycle(&mut watcher);
    assert_eq!(watcher.stats().generation, 1);
    let identity = ProcessIdentity::of(target.pid()).unwrap();
    let target_dir = StateDir::open(&state)
        .unwrap()
        .target_dir(identity.pid, identity.start_time);
    let generation_1 = StateDir::generation_path(&target_dir, 1);
    let kept = std::fs::read(&generation_1).unwrap();
    shadowpatch_patch::rollback(&state, target.pid(), None).unwrap();
    // What a rollback killed between its commit and the removal leaves.
    std::fs::write(&generation_1, kept).unwrap();
    for _ in 0..3 {
        cycle(&mut watcher);
    }
    assert_eq!(watcher.stats().generation, 0);
    let seen: Vec<WatchEvent> = events.try_iter().collect();
    assert!(
        !seen.iter().any(|e| matches!(e, WatchEvent::Alert(_))),
        "no alert: {seen:?}"
    );
}
