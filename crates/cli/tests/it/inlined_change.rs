//! A change the compiler inlined into its caller (`shadowpatch build`
//! includes the whole caller, with `changed_code` saying where the change
//! is): a simulated call of the caller counts as evidence about the change
//! only if it runs that code. The fixture is a dispatcher with two inlined
//! handlers, the patch makes one of them crash on its third call; a process
//! that only ever takes the other path gives calls that never run the
//! change, one that takes the changed path shows the crash.

use crate::common::shadowpatch;
use std::path::Path;
use std::process::{Child, Command};

const DISPATCH: &str = r#"/* dispatch(): two handlers, both inlined into it at -O2. */
static int handle_get(int x)
{
    return x * 5 + 1;
}

static int handle_del(int x)
{
    return x * 3 - 1;
}

int dispatch(int command, int x)
{
    if (command == 1)
        return handle_del(x) + 7;
    return handle_get(x) + 11;
}
"#;

const MAIN: &str = r#"/* Calls dispatch(mode, i) for ever, mode from argv[1]. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

int dispatch(int command, int x);
volatile int sink;

int main(int argc, char **argv)
{
    int mode = argc > 1 ? atoi(argv[1]) : 0;
    for (int i = 0;; i++) {
        sink += dispatch(mode, i);
        usleep(500);
    }
}
"#;

const MAKEFILE: &str = "CFLAGS ?= -O2 -g -ffile-prefix-map=$(CURDIR)=.\nOBJS = main.o dispatch.o\n\ndispatcher: $(OBJS)\n\t$(CC) $(CFLAGS) -o $@ $(OBJS)\n\n%.o: %.c\n\t$(CC) $(CFLAGS) -c -o $@ $<\n";

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tree(dir: &Path) -> std::path::PathBuf {
    let tree = dir.join("dispatcher");
    std::fs::create_dir_all(&tree).unwrap();
    std::fs::write(tree.join("dispatch.c"), DISPATCH).unwrap();
    std::fs::write(tree.join("main.c"), MAIN).unwrap();
    std::fs::write(tree.join("Makefile"), MAKEFILE).unwrap();
    tree
}

#[test]
fn calls_that_never_run_an_inlined_change_are_no_evidence_about_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let source = tree(dir.path());
    let shipped = crate::common::shipped_build(&source, dir.path());
    let binary = shipped.join("dispatcher");
    let diff = dir.path().join("third.diff");
    std::fs::write(
        &diff,
        "--- a/dispatch.c\n+++ b/dispatch.c\n@@ -8,4 +8,6 @@\n static int handle_del(int x)\n {\n+    static int n;\n+    if (++n % 3 == 0) *(volatile int *)0 = 0;\n     return x * 3 - 1;\n }\n",
    )
    .unwrap();
    let out = dir.path().join("patch");
    let built = shadowpatch(
        &state,
        &[
            "--json",
            "build",
            "--source",
            source.to_str().unwrap(),
            "--diff",
            diff.to_str().unwrap(),
            "--target",
            binary.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--cache",
            dir.path().join("cache").to_str().unwrap(),
        ],
    );
    assert_eq!(built.code, 0, "{}{}", built.stdout, built.stderr);
    let json = built.json();
    assert_eq!(
        json["functions_included_for_inlining"][0]["symbol"], "dispatch",
        "{json:#}"
    );
    let changed = &json["manifest"]["replace"][0]["changed_code"];
    let ranges = changed
        .as_array()
        .unwrap_or_else(|| panic!("no changed_code in {json:#}"));
    assert!(
        !ranges.is_empty() && ranges.iter().all(|r| r["function"] == "handle_del"),
        "{changed}"
    );
    let manifest = out.join("manifest.toml");
    let manifest = manifest.to_str().unwrap();

    let analyze = |pid: u32| {
        let run = shadowpatch(
            &state,
            &[
                "--json",
                "analyze",
                &pid.to_string(),
                manifest,
                "--capture",
                "4",
                "--capture-for",
                "20",
            ],
        );
        assert!(run.code == 0 || run.code == 1, "{}{}", run.stdout, run.stderr);
        run.json()
    };
    let unavailable = |json: &serde_json::Value| -> String {
        json["unavailable"]
            .as_array()
            .map(|list| {
                list.iter()
                    .map(|u| u.as_str().unwrap_or("").to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default()
    };

    // Only the unchanged handler runs: clean calls (four times the four
    // asked: the replacement only carries the change), none of them
    // evidence about the change, and said so.
    let gets = Process(Command::new(&binary).arg("0").spawn().unwrap());
    std::thread::sleep(std::time::Duration::from_millis(100));
    let json = analyze(gets.0.id());
    let said = unavailable(&json);
    assert!(
        said.contains("none of the 16 simulated calls of dispatch ran the changed code (handle_del"),
        "{json:#}"
    );
    assert_eq!(json["features"]["sim_calls"], 16.0, "{json:#}");
    assert_eq!(json["features"]["sim_unreached_calls"], 16.0, "{json:#}");
    assert_eq!(json["features"]["sim_live_repeated_clean"], 0.0, "{json:#}");
    assert!(
        !json["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["code"] == "sim-patched-fails-on-repeat"),
        "{json:#}"
    );
    drop(gets);

    // The changed handler runs: each call ran the change, and its repeats
    // reach the third call's crash.
    let deletes = Process(Command::new(&binary).arg("1").spawn().unwrap());
    std::thread::sleep(std::time::Duration::from_millis(100));
    let json = analyze(deletes.0.id());
    assert!(!unavailable(&json).contains("ran the changed code"), "{json:#}");
    assert_eq!(json["features"]["sim_unreached_calls"], 0.0, "{json:#}");
    assert!(
        json["findings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["code"] == "sim-patched-fails-on-repeat"),
        "{json:#}"
    );
    assert_eq!(json["verdict"], "refuse", "{json:#}");
}
