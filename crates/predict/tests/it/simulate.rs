//! Simulation on forked copies of real, live fixture processes: captured
//! calls and explicit ones, patches that crash, hang, answer wrong or
//! behave, side effects the sandbox stops, and the live process served
//! correctly and left untouched throughout.

use crate::common::{blocking, capturing, codes, finding, Live};
use shadowpatch_predict::simulate::{
    parse_call, parse_vectors, CallOrigin, CallVerdict, Outcome, Progress, SimulateError, SimulationOptions,
};
use shadowpatch_predict::{Severity, Source, Verdict, VerdictPolicy};
use std::time::Duration;

/// A crashing, a hanging and a wrong-answer patch of `symbol`, each caught
/// on captured live calls while the live fixture keeps serving.
fn catches_crash_hang_and_wrong_answer(mut live: Live, symbol: &str, patch_prefix: &str) {
    let address = live.target.number("work_or_compute");
    let original = live.byte_at(address);
    for (kind, code) in [
        ("crash", "sim-patched-crashes"),
        ("hang", "sim-patched-hangs"),
        ("wrong", "sim-return-differs"),
    ] {
        let with = format!("{patch_prefix}_{kind}");
        let manifest = live.manifest(kind, &[(symbol, &with)]);
        let report = live.simulate(&manifest, &capturing(3)).unwrap();
        assert_eq!(report.calls.len(), 3, "{kind}");
        let found = finding(&report, code);
        assert_eq!(found.source, Source::Simulation);
        assert_eq!(found.symbol.as_deref(), Some(symbol));
        assert_eq!(found.evidence["count"], 3, "every call shows it: {}", found.message);
        // The finding names a call with its arguments.
        let example = &found.evidence["examples"][0];
        assert!(example["arguments"][0].is_u64(), "{example}");
        assert!(found.message.contains(&format!("{symbol}(rdi=")), "{}", found.message);
        let expected = if kind == "wrong" {
            Severity::Warning
        } else {
            Severity::Blocking
        };
        assert_eq!(found.severity, expected, "{kind}: {}", found.message);
        for call in &report.calls {
            assert!(call.original.outcome.returned(), "the original returns: {call:?}");
            match kind {
                "crash" => assert!(
                    matches!(&call.patched.outcome, Outcome::Crashed { signal, address: 0, .. } if signal == "SIGSEGV"),
                    "{:?}",
                    call.patched.outcome
                ),
                "hang" => assert_eq!(
                    call.patched.outcome,
                    Outcome::Hung {
                        budget: "cpu time".into()
                    }
                ),
                _ => {
                    let (Outcome::Returned { value: a, .. }, Outcome::Returned { value: b, .. }) =
                        (&call.original.outcome, &call.patched.outcome)
                    else {
                        unreachable!()
                    };
                    assert_eq!(*a, call.arguments[0].wrapping_mul(3) + 1);
                    assert_eq!(*b, call.arguments[0].wrapping_mul(3) + 2);
                }
            }
        }
        let verdict = VerdictPolicy::default().verdict(&report.findings, 0.0);
        assert_eq!(
            verdict,
            if kind == "wrong" {
                Verdict::Warn
            } else {
                Verdict::Refuse
            }
        );
        // After each simulation: served correctly, untouched, no child.
        live.assert_untouched(&[(address, original)]);
    }
}

#[test]
fn c_patches_that_crash_hang_or_answer_wrong_are_caught_on_live_calls() {
    let mut live = Live::sim(2);
    let compute = live.target.number("compute");
    live.target
        .ready
        .insert("work_or_compute".into(), format!("{compute:#x}"));
    catches_crash_hang_and_wrong_answer(live, "compute", "compute");
}

#[test]
fn rust_patches_that_crash_hang_or_answer_wrong_are_caught_on_live_calls() {
    let mut live = Live::rust(2);
    let work = live.target.number("work");
    live.target.ready.insert("work_or_compute".into(), format!("{work:#x}"));
    catches_crash_hang_and_wrong_answer(live, "rust_work", "rust_work");
}

/// A crash on every third call and a leak on every call: one simulated
/// call shows neither (each copy is made afresh from the live process);
/// the repeats of each call in the same copies show both, and refuse.
#[test]
fn harm_one_call_does_not_show_is_caught_when_the_call_is_repeated() {
    let mut live = Live::sim(2);
    let compute = live.target.number("compute");
    let original = live.byte_at(compute);
    for (with, code) in [
        ("compute_crash_third", "sim-patched-fails-on-repeat"),
        ("compute_leaky", "sim-patched-leaks"),
    ] {
        let manifest = live.manifest(with, &[("compute", with)]);
        let once = SimulationOptions {
            repeat: 0,
            ..capturing(2)
        };
        let report = live.simulate(&manifest, &once).unwrap();
        assert!(
            report
                .calls
                .iter()
                .all(|c| c.patched.outcome.returned() && c.repeats.is_none()),
            "{with}: one call each shows nothing: {:?}",
            codes(&report)
        );
        assert!(blocking(&report).is_empty(), "{with}: {:?}", codes(&report));

        let report = live.simulate(&manifest, &capturing(3)).unwrap();
        let found = finding(&report, code);
        assert_eq!(found.severity, Severity::Blocking, "{}", found.message);
        assert_eq!(found.evidence["count"], 3, "{}", found.message);
        for call in &report.calls {
            let repeats = call.repeats.as_ref().expect("both returned: repeated");
            assert_eq!(
                repeats.original_failed, None,
                "the original repeats cleanly: {repeats:?}"
            );
            if with == "compute_crash_third" {
                // The first run was call 1, repeats 1 and 2 calls 2 and 3.
                assert!(
                    matches!(&repeats.patched_failed, Some((2, Outcome::Crashed { signal, .. })) if signal == "SIGSEGV"),
                    "{repeats:?}"
                );
            } else {
                assert_eq!(repeats.completed, repeats.asked);
                assert!(repeats.patched_growth_kib >= 4 * 256, "{repeats:?}");
                assert!(repeats.original_growth_kib < 64, "{repeats:?}");
            }
        }
        assert_eq!(
            VerdictPolicy::default().verdict(&report.findings, 0.0),
            Verdict::Refuse,
            "{with}"
        );
        live.assert_untouched(&[(compute, original)]);
    }
    // The benign rewrite repeats cleanly too: no finding of either kind.
    let manifest = live.manifest("same-repeated", &[("compute", "compute_same")]);
    let report = live.simulate(&manifest, &capturing(3)).unwrap();
    assert!(
        report
            .calls
            .iter()
            .all(|c| c.repeats.as_ref().is_some_and(|r| r.completed == r.asked && !r.leaks())),
        "{:#?}",
        report.calls.iter().map(|c| &c.repeats).collect::<Vec<_>>()
    );
    assert!(blocking(&report).is_empty(), "{:?}", codes(&report));
}

/// The sockets and pipes a process holds, by what they link to.
fn sockets_and_pipes(pid: i32) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| target.to_str().map(str::to_string))
        .filter(|target| target.starts_with("socket:[") || target.starts_with("pipe:["))
        .collect()
}

/// A copy is a fork of the service: left holding the service's
/// connections, a client the service answered and closed waits for its end
/// of file until the simulation ends (Debian's tinyproxy: its error pages
/// have no length, and every such request hung while copies lived). Each
/// copy, as soon as it is made, holds none of the service's sockets and
/// pipes (its UDP socket, its stdin and stdout pipes here).
#[test]
fn a_copy_holds_none_of_the_services_sockets_or_pipes() {
    let live = Live::sim(2);
    let pid = live.pid();
    let service = sockets_and_pipes(pid);
    assert!(
        service.len() >= 3,
        "the fixture holds a socket and two pipes: {service:?}"
    );
    let manifest = live.manifest("same-fds", &[("compute", "compute_same")]);
    let survey = shadowpatch_patch::survey::survey(pid, &manifest, &[]).unwrap();
    let mut copies_seen = 0;
    let mut shared = Vec::new();
    let report = shadowpatch_predict::simulate::simulate(&live.state(), &survey, &capturing(3), &mut |step| {
        if let Progress::Captured { .. } = step {
            let children = std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
                .flat_map(|text| {
                    text.split_whitespace()
                        .filter_map(|c| c.parse::<i32>().ok())
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>();
            for child in children {
                copies_seen += 1;
                let held = sockets_and_pipes(child);
                assert!(!held.is_empty(), "the copy has stand-ins at the same numbers");
                shared.extend(held.into_iter().filter(|h| service.contains(h)));
            }
        }
    })
    .unwrap();
    assert_eq!(report.calls.len(), 3);
    assert!(copies_seen >= 3, "{copies_seen} copies seen");
    assert!(shared.is_empty(), "copies hold the service's {shared:?}");
}

/// `--capture N` spreads its captures over the calls: after each, twice
/// as many calls are passed over as before, so 5 captures of a function
/// called thousands of times a second span at least 20 calls (1, 3, 6,
/// 11, 20), not the first 5 of one burst.
#[test]
fn spread_captures_pass_over_ever_more_calls_between_them() {
    let live = Live::sim(1);
    let manifest = live.manifest("spread", &[("compute", "compute_same")]);
    let mut options = capturing(5);
    let first = live.simulate(&manifest, &options).unwrap();
    let first = first.capture.unwrap();
    assert_eq!((first.captured, first.skipped), (5, 0), "{first:?}");
    options.capture.as_mut().unwrap().spread = true;
    let report = live.simulate(&manifest, &options).unwrap();
    assert_eq!(report.calls.len(), 5);
    let spread = report.capture.unwrap();
    assert_eq!(spread.captured, 5, "{spread:?}");
    assert!(spread.skipped >= 15, "{spread:?}");
    assert!(spread.hits >= 20, "{spread:?}");
}

/// Fewer calls than asked within the window is said, with the count.
#[test]
fn fewer_calls_than_asked_are_reported_with_their_count() {
    let live = Live::sim(1);
    let manifest = live.manifest("fewer", &[("compute", "compute_same")]);
    let mut options = capturing(1000);
    let capture = options.capture.as_mut().unwrap();
    capture.within = Some(Duration::from_millis(300));
    capture.spread = true;
    options.repeat = 0;
    let report = live.simulate(&manifest, &options).unwrap();
    let got = report.calls.len();
    assert!(got > 0 && got < 1000, "{got} calls");
    let note = format!("only {got} of 1000 live calls of compute captured within 0.3 s");
    assert!(
        report.unavailable.iter().any(|u| u.contains(&note)),
        "{:?}",
        report.unavailable
    );
}

#[test]
fn a_function_starting_with_endbr64_is_captured_too() {
    let mut live = Live::sim(1);
    let cet = live.target.number("cet");
    let original = live.byte_at(cet);
    assert_eq!(original, 0xf3, "endbr64 first");
    let manifest = live.manifest("wrong", &[("compute_cet", "compute_wrong")]);
    let report = live.simulate(&manifest, &capturing(3)).unwrap();
    assert_eq!(finding(&report, "sim-return-differs").evidence["count"], 3);
    assert!(report.calls.iter().all(|c| c.original.outcome.returned()));
    live.assert_untouched(&[(cet, original)]);
}

#[test]
fn a_benign_patch_gives_no_finding_that_matters() {
    let mut live = Live::sim(2);
    let compute = live.target.number("compute");
    let original = live.byte_at(compute);
    let manifest = live.manifest("same", &[("compute", "compute_same")]);
    let report = live.simulate(&manifest, &capturing(5)).unwrap();
    assert_eq!(report.calls.len(), 5);
    assert!(
        report.calls.iter().all(|c| c.comparison.verdict == CallVerdict::Same),
        "{:#?}",
        report.calls
    );
    assert!(
        report.findings.iter().all(|f| f.severity == Severity::Info),
        "{:?}",
        codes(&report)
    );
    assert_eq!(
        VerdictPolicy::default().verdict(&report.findings, 0.0),
        Verdict::Proceed
    );
    assert_eq!(report.features["sim_calls"], 5.0);
    assert_eq!(report.features["sim_crashes"] + report.features["sim_hangs"], 0.0);
    // Every capture's live pause is reported.
    let capture = report.capture.as_ref().unwrap();
    assert_eq!(capture.pauses_us.len(), 5);
    assert!(report.features["sim_live_pause_us_max"] > 0.0);
    live.assert_untouched(&[(compute, original)]);
}

#[test]
fn the_sandbox_lets_no_write_escape_to_a_file_or_a_socket() {
    let mut live = Live::sim(1);
    let note = live.target.number("note");
    let total = live.target.number("total");
    let original = live.byte_at(note);
    let manifest = live.manifest("loud", &[("note", "note_loud")]);
    let mut options = capturing(3);
    options.critical = vec![(total, 8)];
    let report = live.simulate(&manifest, &options).unwrap();
    assert_eq!(report.calls.len(), 3);
    let writes = finding(&report, "sim-fd-writes-differ");
    assert_eq!(writes.severity, Severity::Warning);
    assert!(
        writes.message.contains("note "),
        "the bytes are shown: {}",
        writes.message
    );
    for call in &report.calls {
        assert!(call.original.fd_writes.is_empty());
        let syscalls: Vec<&str> = call.patched.fd_writes.iter().map(|w| w.syscall.as_str()).collect();
        assert_eq!(syscalls, ["write", "sendto"], "{:?}", call.patched.fd_writes);
        let x = call.arguments[0];
        assert_eq!(call.patched.fd_writes[0].shown, format!("note {x}\\n"));
        assert_eq!(call.patched.outcome, call.original.outcome, "the write 'succeeded'");
    }
    assert!(
        !codes(&report).contains(&"sim-critical-differs".to_string()),
        "total changes the same way"
    );
    // From outside: nothing reached the file or the socket.
    assert_eq!(
        std::fs::metadata(&live.log).unwrap().len(),
        0,
        "the log file is untouched"
    );
    let mut buffer = [0u8; 64];
    let received = live.udp.as_ref().unwrap().recv(&mut buffer);
    assert_eq!(
        received.map_err(|e| e.kind()).unwrap_err(),
        std::io::ErrorKind::WouldBlock,
        "no datagram was sent"
    );
    live.assert_untouched(&[(note, original)]);

    // A patch that changes the critical variable differently is caught.
    let manifest = live.manifest("skewed", &[("note", "note_skewed")]);
    let report = live.simulate(&manifest, &options).unwrap();
    let critical = finding(&report, "sim-critical-differs");
    assert!(
        critical.message.contains(&format!("{total:#x}")),
        "{}",
        critical.message
    );
    assert_eq!(report.features["sim_critical_divergences"], 3.0);
    live.assert_untouched(&[(note, original)]);
}

#[test]
fn explicit_calls_and_vectors_run_original_and_patched() {
    let mut live = Live::sim(1);
    let manifest = live.manifest("wrong", &[("compute", "compute_wrong")]);
    let vectors = live.dir.path().join("vectors.txt");
    std::fs::write(
        &vectors,
        "# inputs\ncompute(1)\ncompute(-2)   # negative\n\ncompute(0x10)\n",
    )
    .unwrap();
    let mut calls = vec![parse_call("compute(5)").unwrap()];
    calls.extend(parse_vectors(&vectors).unwrap());
    let options = SimulationOptions {
        calls,
        ..SimulationOptions::default()
    };
    let report = live.simulate(&manifest, &options).unwrap();
    let results: Vec<(String, i64, i64)> = report
        .calls
        .iter()
        .map(|call| {
            let (Outcome::Returned { value: a, .. }, Outcome::Returned { value: b, .. }) =
                (&call.original.outcome, &call.patched.outcome)
            else {
                panic!("{call:?}")
            };
            (call.describe(), *a as i64, *b as i64)
        })
        .collect();
    assert_eq!(
        results,
        [
            ("compute(5)".to_string(), 16, 17),
            ("compute(1)".to_string(), 4, 5),
            ("compute(-2)".to_string(), -5, -4),
            ("compute(0x10)".to_string(), 49, 50),
        ]
    );
    assert!(matches!(&report.calls[2].origin, CallOrigin::Explicit { given, .. } if given.ends_with("vectors.txt:3")));
    let found = finding(&report, "sim-return-differs");
    assert!(
        found
            .message
            .contains("compute(5): original returned 16, patched returned 17"),
        "{}",
        found.message
    );
    assert!(report.capture.is_none(), "no breakpoint for explicit calls");
    live.assert_untouched(&[]);
}

#[test]
fn an_original_that_faults_or_hangs_is_inconclusive_not_a_patch_failure() {
    let mut live = Live::sim(1);
    let manifest = live.manifest("safe", &[("divide", "divide_safe"), ("spin", "spin_quick")]);
    let options = SimulationOptions {
        calls: vec![
            parse_call("divide(7, 0)").unwrap(),
            parse_call("spin(-1)").unwrap(),
            parse_call("divide(7, 2)").unwrap(),
        ],
        limits: shadowpatch_predict::simulate::Limits {
            cpu: Duration::from_millis(300),
            wall: Duration::from_secs(10),
            syscalls: 100,
        },
        ..SimulationOptions::default()
    };
    let report = live.simulate(&manifest, &options).unwrap();
    let verdicts: Vec<CallVerdict> = report.calls.iter().map(|c| c.comparison.verdict).collect();
    assert_eq!(
        verdicts,
        [CallVerdict::Inconclusive, CallVerdict::Inconclusive, CallVerdict::Same]
    );
    assert!(matches!(&report.calls[0].original.outcome, Outcome::Crashed { signal, .. } if signal == "SIGFPE"));
    assert_eq!(
        report.calls[1].original.outcome,
        Outcome::Hung {
            budget: "cpu time".into()
        }
    );
    let inconclusive = finding(&report, "sim-inconclusive");
    assert_eq!(inconclusive.severity, Severity::Info);
    assert!(blocking(&report).is_empty(), "{:?}", codes(&report));
    assert_eq!(report.features["sim_inconclusive"], 2.0);
    live.assert_untouched(&[]);
}

#[test]
fn bad_explicit_input_is_one_line_and_leaves_the_target_untouched() {
    let mut live = Live::sim(1);
    let manifest = live.manifest("wrong", &[("compute", "compute_wrong")]);
    let error = parse_call("compute(5").unwrap_err();
    assert_eq!(
        error.to_string(),
        "--call:1:10: expected `,` or `)` after an argument, found the end of the line"
    );
    let vectors = live.dir.path().join("bad.txt");
    std::fs::write(&vectors, "compute(1)\ncompute(two)\n").unwrap();
    let error = parse_vectors(&vectors).unwrap_err().to_string();
    assert!(
        error.ends_with(
            "bad.txt:2:9: expected an integer argument (decimal, 0x hex, 0b binary, true or false), found `two`"
        ),
        "{error}"
    );
    assert!(!error.contains('\n'));
    // A call of a function the patch does not replace: refused before the
    // target is touched.
    let options = SimulationOptions {
        calls: vec![parse_call("divide(1, 2)").unwrap()],
        ..SimulationOptions::default()
    };
    let error = live.simulate(&manifest, &options).unwrap_err();
    assert!(matches!(error, SimulateError::NotReplaced { .. }), "{error}");
    assert_eq!(
        shadowpatch_patch::Classify::class(&error),
        shadowpatch_patch::FailureClass::BadInput
    );
    assert_eq!(
        error.to_string(),
        "--call: divide is not a function patch wrong replaces (it replaces compute)"
    );
    let error = live.simulate(&manifest, &SimulationOptions::default()).unwrap_err();
    assert_eq!(
        shadowpatch_patch::Classify::class(&error),
        shadowpatch_patch::FailureClass::BadInput
    );
    live.assert_untouched(&[]);
}

#[test]
fn a_function_never_called_is_reported_unavailable_within_the_window() {
    let mut live = Live::sim(1);
    let divide = live.target.number("divide");
    let original = live.byte_at(divide);
    let manifest = live.manifest("safe", &[("divide", "divide_safe")]);
    let mut options = capturing(1);
    options.capture.as_mut().unwrap().within = Some(Duration::from_millis(300));
    let report = live.simulate(&manifest, &options).unwrap();
    assert!(report.calls.is_empty());
    assert_eq!(report.unavailable.len(), 1, "{:?}", report.unavailable);
    assert!(report.unavailable[0].contains("no live call of divide captured within 0.3 s"));
    live.assert_untouched(&[(divide, original)]);
}

#[test]
fn a_process_forked_while_breakpoints_are_in_runs_clean() {
    // sim with no compute worker: compute runs only on request.
    let mut live = Live::sim(0);
    let compute = live.target.number("compute");
    let original = live.byte_at(compute);
    let manifest = live.manifest("same", &[("compute", "compute_same")]);
    let mut options = capturing(2);
    options.capture.as_mut().unwrap().within = Some(Duration::from_secs(20));
    let state = live.state();
    let pid = live.pid();
    let mut sent = false;
    let target = &mut live.target;
    let survey = shadowpatch_patch::survey::survey(pid, &manifest, &[]).unwrap();
    let report = shadowpatch_predict::simulate::simulate(&state, &survey, &options, &mut |progress| {
        if let shadowpatch_predict::simulate::Progress::Armed { .. } = progress {
            // The child calls compute with our int3 in its copy of the
            // memory; then the parent calls it twice (captured).
            target.send("fork 7").unwrap();
            target.send("ask 1").unwrap();
            target.send("ask 2").unwrap();
            sent = true;
        }
    })
    .unwrap();
    assert!(sent);
    assert_eq!(
        live.target.answer().unwrap(),
        "child=0",
        "the forked child computed right and exited 0"
    );
    assert_eq!(live.target.answer().unwrap(), "4");
    assert_eq!(live.target.answer().unwrap(), "7");
    assert_eq!(report.calls.len(), 2);
    assert_eq!(report.capture.as_ref().unwrap().new_processes, 1);
    live.assert_untouched(&[(compute, original)]);
}

#[test]
fn after_repeated_failures_further_calls_are_not_simulated() {
    let mut live = Live::sim(1);
    let compute = live.target.number("compute");
    let original = live.byte_at(compute);
    let manifest = live.manifest("crash", &[("compute", "compute_crash")]);
    let mut options = capturing(5);
    options.stop_after_failures = 2;
    let report = live.simulate(&manifest, &options).unwrap();
    assert_eq!(report.calls.len(), 2, "two failures tell the story");
    assert_eq!(report.capture.as_ref().unwrap().captured, 5);
    assert_eq!(finding(&report, "sim-patched-crashes").evidence["count"], 2);
    assert!(
        report
            .unavailable
            .iter()
            .any(|u| u.contains("3 more captured calls of compute not simulated")),
        "{:?}",
        report.unavailable
    );
    live.assert_untouched(&[(compute, original)]);
}
