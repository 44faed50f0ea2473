//! Activation at the application's safe point (`apply` with
//! `ApplyOptions::safe_point`) on a real process exposing the runtime's
//! three-word mailbox: activation waits for a parked thread and clears the
//! request in the activation stop; with no thread reaching a safe point it
//! is refused after the timeout, the request word restored and nothing
//! patched.

use shadowpatch_fixtures::{build_c_patch, build_c_source, Running};
use shadowpatch_patch::safepoint::SafePoint;
use shadowpatch_patch::{apply, ApplyOptions, PatchError};
use shadowpatch_process::{ProcessIdentity, TargetMemory};
use std::time::Duration;

/// The mailbox as `crates/runtime` lays it out, and workers that pass a
/// safe point after every call of `step`.
const PROGRAM: &str = r#"
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
_Atomic unsigned int sp_pending, sp_parked;
_Atomic unsigned long sp_passed;
static atomic_long errors;
static atomic_int started;
static void safe_point(void) {
    atomic_fetch_add(&sp_passed, 1);
    if (atomic_load(&sp_pending)) {
        atomic_fetch_add(&sp_parked, 1);
        while (atomic_load(&sp_pending)) sched_yield();
        atomic_fetch_sub(&sp_parked, 1);
    }
}
__attribute__((noinline, used)) long step(long x) { __asm__ volatile("" ::: "memory"); return x * 2 + 1; }
static void *worker(void *arg) {
    (void)arg;
    atomic_fetch_add(&started, 1);
    for (long i = 0;; i = (i + 1) & 0xffff) {
        long r = step(i);
        if (r != i * 2 + 1 && r != i * 2 + 1 + 1000000) atomic_fetch_add(&errors, 1);
        safe_point();
    }
    return NULL;
}
int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 1;
    pthread_t t;
    for (int i = 0; i < threads; i++) pthread_create(&t, NULL, worker, NULL);
    while (atomic_load(&started) < threads) sched_yield();
    printf("ready pending=%p parked=%p passed=%p\n", (void *)&sp_pending, (void *)&sp_parked, (void *)&sp_passed);
    fflush(stdout);
    char line[64];
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "check", 5) == 0) printf("errors=%ld\n", atomic_load(&errors));
        else if (strncmp(line, "ask ", 4) == 0) printf("%ld\n", step(atol(line + 4)));
        else printf("unknown command\n");
        fflush(stdout);
    }
    return 0;
}
"#;

const PATCH: &str = "long step_v2(long x) { return x * 2 + 1 + 1000000; }\n";

fn start(threads: &str) -> (Running, tempfile::TempDir, std::path::PathBuf, SafePoint) {
    let binary = build_c_source("safe-point-app", PROGRAM).unwrap();
    let object = build_c_patch("safe-point-patch", PATCH).unwrap();
    let target = Running::start_binary(&binary, &[threads]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = shadowpatch_symbols::ElfImage::open(&binary).unwrap();
    let build_id = shadowpatch_symbols::hex(image.build_id.as_deref().unwrap());
    let manifest = dir.path().join("step.toml");
    std::fs::write(
        &manifest,
        format!(
            "id = \"step\"\nobject = \"{}\"\n[target]\nbuild_id = \"{build_id}\"\n[[replace]]\nsymbol = \"step\"\nwith = \"step_v2\"\n",
            object.display()
        ),
    )
    .unwrap();
    let safe_point = SafePoint {
        pending_address: target.number("pending"),
        parked_address: target.number("parked"),
        passed_address: target.number("passed"),
        timeout: Duration::from_millis(300),
    };
    (target, dir, manifest, safe_point)
}

fn pending(target: &Running) -> Vec<u8> {
    let identity = ProcessIdentity::of(target.pid()).unwrap();
    TargetMemory::open(&identity)
        .unwrap()
        .read_vec(target.number("pending"), 4)
        .unwrap()
}

#[test]
fn activation_waits_for_a_parked_thread_and_releases_it() {
    let (mut target, dir, manifest, safe_point) = start("2");
    let options = ApplyOptions {
        safe_point: Some(safe_point),
        ..ApplyOptions::default()
    };
    let outcome = apply(&dir.path().join("state"), target.pid(), &manifest, &options).unwrap();
    let parked = outcome.safe_point.expect("activated at a safe point");
    assert!(parked.threads >= 1, "{parked:?}");
    assert_eq!(pending(&target), vec![0; 4], "the request is cleared");
    assert_eq!(target.command("ask 3").unwrap(), "1000007", "the patch runs");
    assert_eq!(target.command("check").unwrap(), "errors=0");
}

#[test]
fn no_thread_at_a_safe_point_is_refused_and_nothing_is_patched() {
    // No worker: nothing ever passes a safe point.
    let (mut target, dir, manifest, safe_point) = start("0");
    let options = ApplyOptions {
        safe_point: Some(safe_point),
        ..ApplyOptions::default()
    };
    let error = apply(&dir.path().join("state"), target.pid(), &manifest, &options).unwrap_err();
    assert!(matches!(error, PatchError::SafePoint { .. }), "{error}");
    assert!(
        error
            .to_string()
            .contains("no thread reached a safe point within 300 ms"),
        "{error}"
    );
    assert_eq!(pending(&target), vec![0; 4], "the request is cleared");
    assert_eq!(target.command("ask 3").unwrap(), "7", "not patched");
}
