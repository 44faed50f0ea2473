//! A watched patch that recurses without end overflows the stack: the
//! SIGSEGV comes on a stack with no room left, and the window still
//! contains it (issue 15 item 3): the rewind only sets registers, with rsp
//! back at the outermost stub record, megabytes above the overflow. The
//! target survives and answers from the original code afterwards, on the
//! main thread's stack and on a worker thread's.

use shadowpatch_fixtures::{build_patch, Fixture, Patch, Running};
use shadowpatch_patch::watchwindow::{WatchWindow, WindowEvent};
use shadowpatch_patch::{apply_watched, ApplyOptions};
use std::path::Path;
use std::time::{Duration, Instant};

fn manifest(dir: &Path, id: &str, object: &Path, binary: &Path) -> std::path::PathBuf {
    let image = shadowpatch_symbols::ElfImage::open(binary).unwrap();
    let build_id = shadowpatch_symbols::hex(image.build_id.as_deref().unwrap());
    let text = format!(
        "id = \"{id}\"\nobject = \"{}\"\n[target]\nbuild_id = \"{build_id}\"\n[[replace]]\nsymbol = \"work_fn\"\nwith = \"work_fn_recurse\"\n",
        object.display()
    );
    let path = dir.join(format!("{id}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

fn wait_for_event(window: &mut WatchWindow) -> WindowEvent {
    let started = Instant::now();
    loop {
        match window.poll().unwrap() {
            WindowEvent::Quiet => {}
            event => return event,
        }
        assert!(started.elapsed() < Duration::from_secs(20), "no event within 20 s");
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn overflow_is_survived(threads: &str) {
    let mut target = Running::start(Fixture::BusyC, &[threads]).unwrap();
    let pid = target.pid();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let object = build_patch(Patch::BusyWatch).unwrap();
    let manifest = manifest(dir.path(), "recurse", &object, &target.binary());
    let (_, mut window) = apply_watched(&state, pid, &manifest, &ApplyOptions::default()).unwrap();
    // `ask 7` overflows the main thread's stack (with workers, a worker may
    // overflow its own first: either way the call is re-run in the original).
    let asker = std::thread::spawn(move || {
        let answer = target.command("ask 7").unwrap();
        (target, answer)
    });
    let event = wait_for_event(&mut window);
    let WindowEvent::Recovered(recovery) = event else {
        panic!("expected the overflow survived, got {event:?}");
    };
    assert_eq!(recovery.signal, "SIGSEGV");
    assert_eq!(recovery.function, "work_fn");
    for _ in 0..20 {
        match window.poll().unwrap() {
            WindowEvent::Quiet | WindowEvent::Recovered(_) => {}
            other => panic!("after the rollback: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    window.close().unwrap();
    let (mut target, answer) = asker.join().unwrap();
    assert_eq!(answer, "22", "the overflowing call re-run in the original");
    assert!(target.is_running(), "the service survived its stack overflow");
    assert_eq!(target.command("ask 1007").unwrap(), "3022", "original code back");
    let check = target.check().unwrap();
    assert_eq!(check["errors"], 0, "every call answered correctly: {check:?}");
}

#[test]
fn endless_recursion_on_the_main_thread_is_survived() {
    overflow_is_survived("0");
}

#[test]
fn endless_recursion_on_worker_threads_is_survived() {
    overflow_is_survived("2");
}
