//! A patch's own state lives on from one call to the next: live, a patch
//! that counts its calls in a static of its own crashes on every third
//! call. Each simulated call is made in fresh copies of the live process,
//! where the patch never ran, and here a repeat of the call does not run
//! it again (the first run consumed the job), so only carrying the patch's
//! statics from each simulated call to the next shows the crash. A state
//! holding a heap pointer is not carried: the pointer would dangle.

use crate::common::{analyze_three_live_calls, build_id_of, finding_codes, gcc, write_manifest, Killed};
use std::process::{Command, Stdio};

const PROGRAM: &str = r#"/* Hands consume() one job at a time, for ever. */
#include <stdio.h>
#include <unistd.h>

struct job { int pending; int value; };
static struct job job;
volatile int sink;

/* Takes the pending job, if any: a second call finds none. */
__attribute__((noinline)) int consume(struct job *j)
{
    if (!j->pending) return 0;
    j->pending = 0;
    return j->value * 2;
}

int main(void)
{
    printf("ready\n");
    fflush(stdout);
    for (int i = 1;; i++) {
        job.pending = 1;
        job.value = i;
        sink += consume(&job);
        usleep(2000);
    }
}
"#;

const PATCHES: &str = r#"#include <stdlib.h>

struct job { int pending; int value; };
static int taken;

/* The same, counting the jobs taken. */
int consume_counted(struct job *j)
{
    if (!j->pending) return 0;
    j->pending = 0;
    taken++;
    return j->value * 2;
}

/* Allocates its box on the first job, then reuses it: a flag and a
   heap pointer that only make sense together. */
static int ready;
static int *box;
int consume_boxed(struct job *j)
{
    if (!j->pending) return 0;
    j->pending = 0;
    if (!ready) { box = malloc(sizeof *box); ready = 1; }
    *box = j->value;
    return *box * 2;
}

/* Crashes on every third job taken. */
int consume_third(struct job *j)
{
    if (!j->pending) return 0;
    j->pending = 0;
    if (++taken % 3 == 0) *(volatile int *)0 = 1;
    return j->value * 2;
}
"#;

#[test]
fn a_patch_counting_in_its_own_static_crashes_on_the_third_captured_call() {
    let dir = tempfile::tempdir().unwrap();
    let program = gcc(dir.path(), "jobs.c", PROGRAM, "jobs", &[]);
    let patches = gcc(dir.path(), "patches.c", PATCHES, "patches.so", &["-shared", "-fPIC"]);
    let mut child = Command::new(&program).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    assert_eq!(line, "ready\n");
    let process = Killed(child);
    let build_id = build_id_of(&program);
    let analyze = |with: &str| {
        let manifest = write_manifest(dir.path(), with, &patches, &build_id, &[("consume", with)]);
        analyze_three_live_calls(&dir.path().join("state"), process.0.id(), &manifest)
    };

    // Counting alone harms nothing, however far the count goes.
    let counted = analyze("consume_counted");
    assert_eq!(counted["features"]["sim_calls"], 3.0, "{counted:#}");
    assert!(
        !finding_codes(&counted).iter().any(|c| c.starts_with("sim-patched")),
        "{counted:#}"
    );

    // A flag set beside a heap pointer: the pointer means nothing in the
    // next call's copies, so neither is carried (carrying the flag alone
    // would crash on a NULL box no live process has).
    let boxed = analyze("consume_boxed");
    assert!(
        !finding_codes(&boxed).iter().any(|c| c.starts_with("sim-patched")),
        "{boxed:#}"
    );

    // The first two calls take jobs one and two; the third crashes.
    let third = analyze("consume_third");
    let crashed = third["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "sim-patched-crashes")
        .unwrap_or_else(|| panic!("{third:#}"));
    assert!(
        crashed["message"].as_str().unwrap().contains("1 of 3 simulated calls"),
        "{crashed:#}"
    );
    assert_eq!(third["verdict"], "refuse", "{third:#}");
    // The live process never ran the patch: it goes on.
    assert!(std::fs::read_to_string(format!("/proc/{}/stat", process.0.id()))
        .unwrap()
        .split_whitespace()
        .nth(2)
        .is_some_and(|state| state != "Z"));
}
