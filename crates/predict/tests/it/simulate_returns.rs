//! What the simulation compares on real processes shaped like servers:
//! a void command handler's garbage rax is never a difference (told by
//! DWARF, and without DWARF by the handler's callers), a returned string
//! is compared by its text, not its address, and a crash under the
//! target's own crash reporter (a SIGSEGV handler that never returns) is
//! a crash, not a hang.

use crate::common::{blocking, capturing, codes, finding, Live};
use shadowpatch_predict::simulate::{CallVerdict, Outcome, ReturnKind};
use shadowpatch_predict::{Severity, Verdict, VerdictPolicy};

/// A benign patch of the void handler that leaves other garbage in rax.
fn a_void_handler_is_not_compared_by_rax(debug: bool, method: &str) {
    let mut live = Live::server(debug);
    let handle = live.target.number("handle");
    let original = live.byte_at(handle);
    let manifest = live.manifest("same", &[("handle_command", "handle_command_same")]);
    let report = live.simulate(&manifest, &capturing(5)).unwrap();
    assert_eq!(report.calls.len(), 5);
    let (symbol, shape) = &report.returns[0];
    assert_eq!(symbol, "handle_command");
    assert_eq!(shape.kind, ReturnKind::Void, "{}", shape.describe());
    assert_eq!(shape.method, method, "{}", shape.describe());
    for call in &report.calls {
        // The garbage really differs: 7 left by the original, 10 by the patch.
        let (Outcome::Returned { value: a, .. }, Outcome::Returned { value: b, .. }) =
            (&call.original.outcome, &call.patched.outcome)
        else {
            panic!("{call:?}")
        };
        assert_eq!((*a as u32, *b as u32), (7, 10));
        assert!(!call.comparison.return_differs);
        assert!(call.comparison.returned.is_none());
        assert_eq!(call.comparison.verdict, CallVerdict::Same, "{call:#?}");
    }
    assert!(
        !codes(&report).contains(&"sim-return-differs".to_string()),
        "{:?}",
        codes(&report)
    );
    assert_eq!(report.features["sim_divergent_returns"], 0.0);
    assert_eq!(
        VerdictPolicy::default().verdict(&report.findings, 0.0),
        Verdict::Proceed
    );
    live.assert_untouched(&[(handle, original)]);
}

#[test]
fn a_void_handler_s_garbage_rax_is_no_difference_with_dwarf() {
    a_void_handler_is_not_compared_by_rax(true, "dwarf");
}

#[test]
fn a_void_handler_s_garbage_rax_is_no_difference_by_its_call_sites() {
    a_void_handler_is_not_compared_by_rax(false, "call sites");
}

#[test]
fn a_void_handler_s_wrong_reply_is_still_seen_in_memory() {
    let mut live = Live::server(true);
    let manifest = live.manifest("wrong", &[("handle_command", "handle_command_wrong")]);
    let report = live.simulate(&manifest, &capturing(6)).unwrap();
    assert!(!codes(&report).contains(&"sim-return-differs".to_string()));
    // Command 0 (one call in three) gets another reply: the worker's
    // stack differs after the call.
    assert!(
        report.calls.iter().any(|c| c.comparison.memory_pages_differing > 0),
        "{:#?}",
        report.calls
    );
    live.assert_untouched(&[]);
}

#[test]
fn a_returned_string_is_compared_by_its_text_not_its_address() {
    for debug in [true, false] {
        let mut live = Live::server(debug);
        let version = live.target.number("version");
        let original = live.byte_at(version);
        // The same text at another address: the same answer.
        let manifest = live.manifest("copy", &[("server_version", "version_copy")]);
        let report = live.simulate(&manifest, &capturing(3)).unwrap();
        let shape = &report.returns[0].1;
        let expected = if debug { "dwarf" } else { "call sites" };
        assert_eq!(shape.method, expected, "{}", shape.describe());
        for call in &report.calls {
            let (Outcome::Returned { value: a, .. }, Outcome::Returned { value: b, .. }) =
                (&call.original.outcome, &call.patched.outcome)
            else {
                panic!("{call:?}")
            };
            assert_ne!(a, b, "two addresses");
            let returned = call.comparison.returned.as_ref().unwrap();
            assert_eq!(returned.original, "\"server 1.0\"");
            assert_eq!(returned.patched, "\"server 1.0\"");
            assert_eq!(call.comparison.verdict, CallVerdict::Same, "{call:#?}");
        }
        assert!(blocking(&report).is_empty());
        assert!(!codes(&report).contains(&"sim-return-differs".to_string()));
        // Another text: a difference, shown as text.
        let manifest = live.manifest("other", &[("server_version", "version_other")]);
        let report = live.simulate(&manifest, &capturing(3)).unwrap();
        let differs = finding(&report, "sim-return-differs");
        assert_eq!(differs.severity, Severity::Warning);
        let return_type = differs.evidence["return_type"].as_str().unwrap();
        assert!(return_type.contains(expected), "{return_type}");
        assert!(
            differs
                .message
                .contains("original returned \"server 1.0\", patched returned \"server 1.1\""),
            "{}",
            differs.message
        );
        live.assert_untouched(&[(version, original)]);
    }
}

#[test]
fn a_crash_under_the_target_s_own_crash_reporter_is_a_crash() {
    let mut live = Live::server(true);
    let handle = live.target.number("handle");
    let original = live.byte_at(handle);
    let manifest = live.manifest("crash", &[("handle_command", "handle_command_crash")]);
    let report = live.simulate(&manifest, &capturing(2)).unwrap();
    assert_eq!(report.calls.len(), 2);
    for call in &report.calls {
        assert!(
            matches!(&call.patched.outcome, Outcome::Crashed { signal, address: 0, .. } if signal == "SIGSEGV"),
            "caught at its delivery, before the reporter ran: {:?}",
            call.patched.outcome
        );
        assert_eq!(call.comparison.verdict, CallVerdict::PatchedFailed);
    }
    let crashes = finding(&report, "sim-patched-crashes");
    assert_eq!(crashes.severity, Severity::Blocking);
    assert!(
        crashes
            .message
            .contains("original returned, patched crashed with SIGSEGV"),
        "a void function's return shows no value: {}",
        crashes.message
    );
    assert!(!codes(&report).contains(&"sim-patched-hangs".to_string()));
    assert_eq!(VerdictPolicy::default().verdict(&report.findings, 0.0), Verdict::Refuse);
    live.assert_untouched(&[(handle, original)]);
}

#[test]
fn a_hang_is_judged_on_a_budget_adapted_to_the_original_call() {
    let mut live = Live::server(true);
    let manifest = live.manifest("hang", &[("handle_command", "handle_command_hang")]);
    let mut options = capturing(1);
    // A generous budget for the original: the patched copy's is derived
    // from the original's own time (20 times, at least 200 ms, at most 2 s).
    options.limits.cpu = std::time::Duration::from_secs(5);
    options.limits.wall = std::time::Duration::from_secs(30);
    let report = live.simulate(&manifest, &options).unwrap();
    let call = &report.calls[0];
    assert_eq!(
        call.patched.outcome,
        Outcome::Hung {
            budget: "cpu time".into()
        }
    );
    assert_eq!(call.original.budget.cpu_ms, 5000);
    let budget = call.patched.budget;
    assert!((200..=2000).contains(&budget.cpu_ms), "{budget:?}");
    assert_eq!(budget.wall_ms, 2000);
    let hangs = finding(&report, "sim-patched-hangs");
    assert!(
        hangs
            .message
            .contains(&format!("cpu time budget ({} ms)", budget.cpu_ms)),
        "the budget used is reported: {}",
        hangs.message
    );
    live.assert_untouched(&[]);
}

/// Debian's redis-server, on a Unix socket, killed on drop.
struct Redis {
    child: std::process::Child,
    socket: std::path::PathBuf,
}

impl Redis {
    fn start(dir: &std::path::Path) -> Option<Redis> {
        if !std::path::Path::new(REDIS_SERVER).exists() {
            eprintln!("skipped: {REDIS_SERVER} is not installed");
            return None;
        }
        let socket = dir.join("redis.sock");
        let child = std::process::Command::new(REDIS_SERVER)
            .args(["--port", "0", "--save", "", "--appendonly", "no", "--unixsocket"])
            .arg(&socket)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut redis = Redis { child, socket };
        // Ready when it answers on its socket.
        for _ in 0..500 {
            if redis.ping() {
                return Some(redis);
            }
            assert!(redis.child.try_wait().unwrap().is_none(), "redis-server exited");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("redis-server never answered on {}", redis.socket.display());
    }

    fn ping(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut stream) = std::os::unix::net::UnixStream::connect(&self.socket) else {
            return false;
        };
        let mut reply = [0u8; 7];
        stream.write_all(b"PING\r\n").is_ok() && stream.read_exact(&mut reply).is_ok() && &reply == b"+PONG\r\n"
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const REDIS_SERVER: &str = "/usr/bin/redis-server";

#[test]
fn a_crash_under_redis_s_own_crash_report_handler_is_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let Some(redis) = Redis::start(dir.path()) else { return };
    let pid = redis.child.id() as i32;
    // redis-server reports crashes from its own SIGSEGV handler.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let caught = status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
        .unwrap();
    assert_ne!(caught & 1 << (libc::SIGSEGV - 1), 0, "redis catches SIGSEGV");
    let object = shadowpatch_fixtures::build_c_patch(
        "redis_process_command_crash",
        "int processCommand_crash(void *c) { *(volatile long *)0 = (long)c; return 0; }\n",
    )
    .unwrap();
    let image = shadowpatch_symbols::ElfImage::open(std::path::Path::new(REDIS_SERVER)).unwrap();
    let manifest = dir.path().join("crash.toml");
    std::fs::write(
        &manifest,
        format!(
            "id = \"redis-crash\"\nobject = \"{}\"\n[target]\nbuild_id = \"{}\"\n\
             [[replace]]\nsymbol = \"processCommand\"\nwith = \"processCommand_crash\"\n",
            object.display(),
            shadowpatch_symbols::hex(image.build_id.as_deref().unwrap())
        ),
    )
    .unwrap();
    // Commands keep coming while the breakpoint waits for them.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let socket = redis.socket.clone();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
            let mut reply = [0u8; 7];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                stream.write_all(b"PING\r\n").unwrap();
                stream.read_exact(&mut reply).unwrap();
                assert_eq!(&reply, b"+PONG\r\n");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        })
    };
    let survey = shadowpatch_patch::survey::survey(pid, &manifest, &[]).unwrap();
    let report =
        shadowpatch_predict::simulate::simulate(&dir.path().join("state"), &survey, &capturing(2), &mut |_| {})
            .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    traffic.join().expect("redis answered every command during the capture");
    assert_eq!(report.calls.len(), 2);
    for call in &report.calls {
        assert!(call.original.outcome.returned(), "{:?}", call.original.outcome);
        assert!(
            matches!(&call.patched.outcome, Outcome::Crashed { signal, .. } if signal == "SIGSEGV"),
            "caught before redis's handler ran: {:?}",
            call.patched.outcome
        );
    }
    assert!(codes(&report).contains(&"sim-patched-crashes".to_string()));
    assert!(!codes(&report).contains(&"sim-patched-hangs".to_string()));
    // The live server: answering, not traced, no copy left behind.
    assert!(redis.ping());
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("TracerPid:\t0"));
    assert!(shadowpatch_fixtures::children_of(pid).is_empty());
}
