//! A capture session killed (SIGKILL, as `kill -9` would) at each of its
//! steps, in a subprocess: the live fixture keeps serving, no copy of it
//! ever runs free, and `recover` removes the breakpoints and reaps the
//! copies the kernel killed with the tool.

use crate::common::{capturing, Live};
use shadowpatch_patch::fault::CAPTURE_POINTS;
use shadowpatch_patch::journal::TxnKind;
use shadowpatch_patch::{recover, Recovered};
use shadowpatch_predict::simulate::{simulate, Progress};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};

/// Run by the test below in a subprocess (this same test binary): a
/// capture session that says "armed" once its breakpoints are in.
#[test]
#[ignore = "a helper the interrupted-capture test runs as a subprocess"]
fn capture_session_helper() {
    let Ok(pid) = std::env::var("SIM_HELPER_PID") else {
        return;
    };
    let manifest = std::env::var("SIM_HELPER_MANIFEST").unwrap();
    let state = std::env::var("SIM_HELPER_STATE").unwrap();
    let survey = shadowpatch_patch::survey::survey(pid.parse().unwrap(), manifest.as_ref(), &[]).unwrap();
    let report = simulate(state.as_ref(), &survey, &capturing(5), &mut |progress| {
        if let Progress::Armed { .. } = progress {
            println!("armed");
            std::io::stdout().flush().unwrap();
        }
    });
    println!("finished: {:?}", report.map(|r| r.calls.len()));
}

fn state_of(pid: i32) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit_once(") ").unwrap().1[..1].to_string()
}

#[test]
fn killed_at_every_capture_step_recover_removes_the_breakpoints() {
    for &point in CAPTURE_POINTS {
        // No compute worker: compute runs only when asked, so the fixture
        // survives the breakpoint a killed session leaves in it.
        let mut live = Live::sim(0);
        let pid = live.pid();
        let compute = live.target.number("compute");
        let original = live.byte_at(compute);
        let manifest = live.manifest("same", &[("compute", "compute_same")]);
        let mut helper = Command::new(std::env::current_exe().unwrap())
            // Its name in the crate's one test binary (tests/it/main.rs).
            .args([
                "--exact",
                "interrupted::capture_session_helper",
                "--ignored",
                "--nocapture",
            ])
            .env("SIM_HELPER_PID", pid.to_string())
            .env("SIM_HELPER_MANIFEST", &manifest)
            .env("SIM_HELPER_STATE", live.state())
            .env("SHADOWPATCH_FAULT", point)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        if point == "capture-copied" {
            let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines();
            assert!(
                lines.by_ref().map_while(Result::ok).any(|line| line == "armed"),
                "the helper armed its breakpoints"
            );
            // This call is captured; the tool dies right after copying.
            assert_eq!(live.target.command("ask 5").unwrap(), "16", "{point}");
        }
        let status = helper.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "{point}: the tool was killed: {status:?}");

        let armed = point != "capture-begin";
        assert_eq!(live.byte_at(compute) == 0xcc, armed, "{point}: breakpoint left behind");
        let copies = shadowpatch_fixtures::children_of(pid);
        if point == "capture-copied" {
            assert_eq!(copies.len(), 1, "one copy was made");
            // SIGKILL was sent in the tracer's exit; dying takes a moment
            // (it cannot return to user mode with SIGKILL pending).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while state_of(copies[0]) != "Z" && std::time::Instant::now() < deadline {
                std::thread::yield_now();
            }
            assert_eq!(state_of(copies[0]), "Z", "the kernel killed the copy with its tracer");
        } else {
            assert!(copies.is_empty(), "{point}: {copies:?}");
        }
        let recovered = recover(&live.state(), pid).unwrap();
        assert_eq!(recovered.interrupted, Some(TxnKind::Probe), "{point}");
        assert_eq!(recovered.state, Recovered::FullyRolledBack, "{point}");
        assert_eq!(recovered.written, usize::from(armed), "{point}");
        assert_eq!(recovered.copies_reaped, copies.len(), "{point}");
        assert_eq!(
            live.target.command("ask 6").unwrap(),
            "19",
            "{point}: serves after recover"
        );
        live.assert_untouched(&[(compute, original)]);
    }
}
