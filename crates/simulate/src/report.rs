//! From compared calls to what the engine reports: findings (one per
//! function and kind, with counts and a few example calls as evidence) and
//! named numeric features for the risk model.
//!
//! Severity, and why: a patch exists to change behaviour, so a different
//! return value, different writes or different side effects are expected
//! for *some* inputs; they are warnings that show counts and examples, so
//! the user can confirm the change is the intended one. A patched function
//! that crashes, hangs or ends the process on a call the original handled
//! is never intended: blocking. A call on which the original itself
//! crashed or hung says nothing about the patch: inconclusive (info).

use super::capture::CaptureStats;
use super::compare::{CallVerdict, Comparison};
use super::continuation::LeftWaiting;
use super::repeat::{Repeats, LEAK_KIB_PER_CALL};
use super::returns::{ReturnKind, ReturnShape};
use super::sandbox::{show_value, Outcome, RunResult};
use shadowpatch_finding::{Finding, Severity, Source};
use std::collections::BTreeMap;

/// Example calls kept as evidence per finding.
const EXAMPLES: usize = 5;

/// Where a simulated call came from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CallOrigin {
    /// A live call, captured in `thread`; the live thread was held `pause_us`.
    Captured { thread: i32, pause_us: u64 },
    /// An explicit call: its text and where it was given.
    Explicit { text: String, given: String },
}

/// One call, run original and patched.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SimulatedCall {
    pub symbol: String,
    pub origin: CallOrigin,
    /// rdi, rsi, rdx, rcx, r8, r9 at the entry.
    pub arguments: [u64; 6],
    pub original: RunResult,
    pub patched: RunResult,
    pub comparison: Comparison,
    /// The call repeated in the same copies, when both returned from it.
    pub repeats: Option<Repeats>,
    /// What both callers did next (a captured call both copies returned
    /// from, every time).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub continuation: Option<crate::continuation::Continuation>,
}

impl SimulatedCall {
    /// The patched copy crashed, hung or exited on a repeat of the call
    /// that the original returned from.
    pub fn failed_on_repeat(&self) -> bool {
        self.repeats.as_ref().is_some_and(|r| r.patched_failed.is_some())
    }

    /// Whether the call ran the code the patch changes: false only when
    /// the replacement carries an inlined change (`changed_code`) and the
    /// patched run never entered it.
    pub fn ran_change(&self) -> bool {
        self.patched.ran_changed_code != Some(false)
    }

    /// After the call, the original's caller answered on a socket that the
    /// patched one left untouched before waiting again.
    pub fn leaves_client_waiting(&self) -> bool {
        self.continuation.as_ref().is_some_and(|k| !k.left_waiting().is_empty())
    }

    /// The patched copy's memory grew on repeats beyond the original's.
    pub fn leaked_on_repeat(&self) -> bool {
        self.repeats.as_ref().is_some_and(Repeats::leaks)
    }

    /// `compute(5)` for an explicit call, `compute(rdi=5, rsi=0, rdx=7)`
    /// for a captured one (the arity is unknown: the first registers).
    pub fn describe(&self) -> String {
        match &self.origin {
            CallOrigin::Explicit { text, .. } => text.clone(),
            CallOrigin::Captured { .. } => format!(
                "{}(rdi={}, rsi={}, rdx={})",
                self.symbol,
                show_value(self.arguments[0]),
                show_value(self.arguments[1]),
                show_value(self.arguments[2])
            ),
        }
    }

    fn evidence(&self) -> serde_json::Value {
        serde_json::json!({
            "call": self.describe(),
            "arguments": self.arguments,
            "origin": self.origin,
            "original": self.original.outcome,
            "patched": self.patched.outcome,
            "returned": self.comparison.returned,
            "original_writes": self.original.fd_writes,
            "patched_writes": self.patched.fd_writes,
            "original_side_effects": self.original.side_effects,
            "patched_side_effects": self.patched.side_effects,
            "critical": self.comparison.critical,
            "memory_pages_differing": self.comparison.memory_pages_differing,
            "repeats": self.repeats,
            "continuation": self.continuation.as_ref().map(|k| serde_json::json!({
                "sockets": k.sockets,
                "original": k.original.outcome,
                "patched": k.patched.outcome,
                "original_writes": writes(&k.original),
                "patched_writes": writes(&k.patched),
                "patched_closed": k.patched.closed_inherited,
                "original_output_wanted": k.original.output_wanted,
                "patched_output_wanted": k.patched.output_wanted,
                "next_turn": k.next.as_ref().map(|turn| serde_json::json!({
                    "original": turn.original.outcome,
                    "patched": turn.patched.outcome,
                    "original_writes": writes(&turn.original),
                    "patched_writes": writes(&turn.patched),
                    "original_closed": turn.original.closed_inherited,
                    "patched_closed": turn.patched.closed_inherited,
                })),
            })),
        })
    }
}

/// A run's writes as (descriptor, bytes), for the evidence.
fn writes(run: &RunResult) -> Vec<(i32, u64)> {
    run.fd_writes.iter().map(|w| (w.fd, w.len)).collect()
}

/// The findings of a set of calls; `returns` says what each function
/// returns (how its return values were compared).
pub fn findings(calls: &[SimulatedCall], returns: &[(String, ReturnShape)]) -> Vec<Finding> {
    let mut by_symbol: BTreeMap<&str, Vec<&SimulatedCall>> = BTreeMap::new();
    for call in calls {
        by_symbol.entry(&call.symbol).or_default().push(call);
    }
    let mut findings = Vec::new();
    for (symbol, calls) in by_symbol {
        let total = calls.len();
        let shape = returns.iter().find(|(name, _)| name == symbol).map(|(_, shape)| shape);
        let return_type = shape.map(|s| s.describe());
        let mut add =
            |code: &str, severity: Severity, matching: Vec<&SimulatedCall>, what: &dyn Fn(&SimulatedCall) -> String| {
                if matching.is_empty() {
                    return;
                }
                let example = matching[0];
                let message = format!(
                    "{symbol}: {} in {} of {total} simulated calls, e.g. {}",
                    kind_phrase(code),
                    matching.len(),
                    what(example)
                );
                findings.push(
                    Finding::new(code, severity, Source::Simulation, message)
                        .symbol(symbol)
                        .evidence(serde_json::json!({
                            "count": matching.len(),
                            "calls": total,
                            "return_type": return_type,
                            "examples": matching.iter().take(EXAMPLES).map(|c| c.evidence()).collect::<Vec<_>>(),
                        })),
                );
            };
        let failed = |call: &&SimulatedCall, pick: fn(&Outcome) -> bool| {
            call.comparison.verdict == CallVerdict::PatchedFailed && pick(&call.patched.outcome)
        };
        let void = shape.is_some_and(|s| s.kind == ReturnKind::Void);
        let outcome_change = |call: &SimulatedCall| {
            format!(
                "{}: original {}, patched {}",
                call.describe(),
                describe_run(&call.original, void),
                describe_run(&call.patched, void)
            )
        };
        add(
            "sim-patched-crashes",
            Severity::Blocking,
            calls
                .iter()
                .filter(|c| failed(c, |o| matches!(o, Outcome::Crashed { .. })))
                .copied()
                .collect(),
            &outcome_change,
        );
        add(
            "sim-patched-hangs",
            Severity::Blocking,
            calls
                .iter()
                .filter(|c| failed(c, |o| matches!(o, Outcome::Hung { .. })))
                .copied()
                .collect(),
            &outcome_change,
        );
        add(
            "sim-patched-exits",
            Severity::Blocking,
            calls
                .iter()
                .filter(|c| failed(c, |o| matches!(o, Outcome::Exited { .. })))
                .copied()
                .collect(),
            &outcome_change,
        );
        add(
            "sim-patched-fails-on-repeat",
            Severity::Blocking,
            calls.iter().filter(|c| c.failed_on_repeat()).copied().collect(),
            &|call| {
                let repeats = call.repeats.as_ref().expect("failed on a repeat");
                let (run, outcome) = repeats.patched_failed.as_ref().expect("failed on a repeat");
                format!(
                    "{}: the patched {} on repeat {run} of {}; the original returned each time",
                    call.describe(),
                    outcome.describe(),
                    repeats.asked
                )
            },
        );
        add(
            "sim-patched-leaks",
            Severity::Blocking,
            calls.iter().filter(|c| c.leaked_on_repeat()).copied().collect(),
            &|call| {
                let repeats = call.repeats.as_ref().expect("leaked on repeats");
                format!(
                    "{}: over {} repeats the patched copy's data grew {} KiB, the original's {} KiB \
                     ({} KiB a call beyond the original's; {LEAK_KIB_PER_CALL} KiB is a leak)",
                    call.describe(),
                    repeats.completed,
                    repeats.patched_growth_kib,
                    repeats.original_growth_kib,
                    repeats.excess_kib_per_call()
                )
            },
        );
        add(
            "sim-patched-leaves-client-waiting",
            Severity::Blocking,
            calls.iter().filter(|c| c.leaves_client_waiting()).copied().collect(),
            &|call| {
                let continuation = call.continuation.as_ref().expect("continued");
                let left = continuation.left_waiting();
                let (kept, silent): (Vec<&LeftWaiting>, Vec<&LeftWaiting>) = left.iter().partition(|l| l.kept_open);
                let mut told = Vec::new();
                if !silent.is_empty() {
                    told.push(format!(
                        "the original's caller answered ({}) before waiting; the patched one went back to waiting ({}) without answering on {}, closing or shutting down {}: a client there waits for an answer that never comes",
                        silent
                            .iter()
                            .map(|l| match l.bytes {
                                0 => format!("a reply queued on socket fd {} (asked to be told it is writable)", l.fd),
                                bytes => format!("{bytes} bytes to socket fd {}", l.fd),
                            })
                            .collect::<Vec<_>>()
                            .join(", "),
                        continuation.patched.outcome.describe(),
                        if silent.len() == 1 { "it" } else { "them" },
                        if silent.len() == 1 { "it" } else { "them" },
                    ));
                }
                if !kept.is_empty() {
                    told.push(format!(
                        "the original's caller wrote its reply ({}) and closed the connection{}; the patched one answered but kept it open and went back to waiting: a client reading the reply to its end (Connection: close, HTTP/1.0) waits for ever",
                        kept.iter()
                            .map(|l| format!("{} bytes to socket fd {}", l.bytes, l.fd))
                            .collect::<Vec<_>>()
                            .join(", "),
                        if continuation.next.is_some() { " in the event loop's next turn" } else { "" },
                    ));
                }
                format!("{}: {}", call.describe(), told.join("; "))
            },
        );
        add(
            "sim-patched-caller-fails",
            Severity::Blocking,
            calls
                .iter()
                .filter(|c| c.continuation.as_ref().is_some_and(|k| k.patched_failed()))
                .copied()
                .collect(),
            &|call| {
                let continuation = call.continuation.as_ref().expect("continued");
                format!(
                    "{}: both returned; then the original's caller {}, the patched one's {}",
                    call.describe(),
                    continuation.original.outcome.describe(),
                    continuation.patched.outcome.describe()
                )
            },
        );
        let ran = |c: &&&SimulatedCall| c.comparison.verdict == CallVerdict::Diverged;
        let unknown_type = shape.is_some_and(|s| s.kind == ReturnKind::Unknown);
        add(
            "sim-return-differs",
            Severity::Warning,
            calls
                .iter()
                .filter(ran)
                .filter(|c| c.comparison.return_differs)
                .copied()
                .collect(),
            &|call| match &call.comparison.returned {
                Some(returned) => format!(
                    "{}: original returned {}, patched returned {}{}",
                    call.describe(),
                    returned.original,
                    returned.patched,
                    if unknown_type {
                        " (return type unknown: rax compared as a 64-bit value)"
                    } else {
                        ""
                    }
                ),
                None => outcome_change(call),
            },
        );
        add(
            "sim-fd-writes-differ",
            Severity::Warning,
            calls
                .iter()
                .filter(ran)
                .filter(|c| c.comparison.fd_writes_differ)
                .copied()
                .collect(),
            &|call| {
                format!(
                    "{}: {}",
                    call.describe(),
                    writes_difference(&call.original, &call.patched)
                )
            },
        );
        add(
            "sim-side-effects-differ",
            Severity::Warning,
            calls
                .iter()
                .filter(ran)
                .filter(|c| c.comparison.side_effects_differ)
                .copied()
                .collect(),
            &|call| {
                format!(
                    "{}: {}",
                    call.describe(),
                    effects_difference(&call.original, &call.patched)
                )
            },
        );
        add(
            "sim-critical-differs",
            Severity::Warning,
            calls
                .iter()
                .filter(ran)
                .filter(|c| !c.comparison.critical.is_empty())
                .copied()
                .collect(),
            &|call| {
                let first = &call.comparison.critical[0];
                format!(
                    "{}: {} bytes at {:#x} are {} after the original, {} after the patched",
                    call.describe(),
                    first.len,
                    first.address,
                    first.original,
                    first.patched
                )
            },
        );
        add(
            "sim-unsupported-syscall",
            Severity::Warning,
            calls
                .iter()
                .filter(|c| c.comparison.unsupported_in_patched)
                .copied()
                .collect(),
            &|call| {
                let effect = call
                    .patched
                    .side_effects
                    .iter()
                    .find(|e| e.kind == super::policy::EffectKind::Unsupported)
                    .map(|e| e.syscall.clone())
                    .unwrap_or_default();
                format!("{}: {effect} (emulated as ENOSYS, not simulated)", call.describe())
            },
        );
        add(
            "sim-memory-differs",
            Severity::Info,
            calls
                .iter()
                .filter(|c| c.comparison.memory_pages_differing > 0)
                .copied()
                .collect(),
            &|call| {
                format!(
                    "{}: {} pages of writable memory differ after it",
                    call.describe(),
                    call.comparison.memory_pages_differing
                )
            },
        );
        add(
            "sim-inconclusive",
            Severity::Info,
            calls
                .iter()
                .filter(|c| c.comparison.verdict == CallVerdict::Inconclusive)
                .copied()
                .collect(),
            &outcome_change,
        );
    }
    findings
}

/// How a run ended; a hang says which budget it had; a `void` function's
/// return shows no value.
fn describe_run(run: &RunResult, void: bool) -> String {
    match &run.outcome {
        Outcome::Returned { .. } if void => "returned".into(),
        Outcome::Hung { budget } => {
            let amount = match budget.as_str() {
                "cpu time" => format!("{} ms", run.budget.cpu_ms),
                "wall time" => format!("{} ms", run.budget.wall_ms),
                _ => run.budget.syscalls.to_string(),
            };
            format!("did not return within its {budget} budget ({amount})")
        }
        outcome => outcome.describe(),
    }
}

fn kind_phrase(code: &str) -> &'static str {
    match code {
        "sim-patched-crashes" => "the patched function crashed where the original returned",
        "sim-patched-hangs" => "the patched function did not return where the original did",
        "sim-patched-exits" => "the patched function ended the process where the original returned",
        "sim-patched-fails-on-repeat" => "the patched function failed when the call was repeated",
        "sim-patched-leaks" => "the patched function's memory grew when the call was repeated",
        "sim-patched-leaves-client-waiting" => {
            "after the patched function returned, its caller left a client waiting: no reply where the original's caller wrote one, or a connection kept open that the original's closed"
        }
        "sim-patched-caller-fails" => {
            "after the patched function returned, its caller failed where the original's went on to wait"
        }
        "sim-return-differs" => "the patched function returned a different value",
        "sim-fd-writes-differ" => "the patched function wrote different bytes to file descriptors (not performed)",
        "sim-side-effects-differ" => "the patched function had different side effects (not performed)",
        "sim-critical-differs" => "a critical variable ended up different",
        "sim-unsupported-syscall" => "the patched function made a syscall the sandbox does not model",
        "sim-memory-differs" => "memory differed after the call",
        "sim-inconclusive" => "the original function itself failed, so the call says nothing about the patch",
        _ => "the runs differed",
    }
}

fn writes_difference(original: &RunResult, patched: &RunResult) -> String {
    let show = |run: &RunResult| {
        run.fd_writes
            .iter()
            .map(|w| format!("fd {} {} \"{}\"", w.fd, w.syscall, w.shown))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (o, p) = (show(original), show(patched));
    format!(
        "original wrote [{}], patched wrote [{}]",
        if o.is_empty() { "nothing" } else { &o },
        if p.is_empty() { "nothing" } else { &p }
    )
}

fn effects_difference(original: &RunResult, patched: &RunResult) -> String {
    let only = |a: &RunResult, b: &RunResult| {
        a.side_effects
            .iter()
            .filter(|e| !b.side_effects.contains(e))
            .map(|e| format!("{} {}", e.syscall, e.detail).trim().to_string())
            .collect::<Vec<_>>()
    };
    let mut parts = Vec::new();
    let patched_only = only(patched, original);
    if !patched_only.is_empty() {
        parts.push(format!("patched only: {}", patched_only.join(", ")));
    }
    let original_only = only(original, patched);
    if !original_only.is_empty() {
        parts.push(format!("original only: {}", original_only.join(", ")));
    }
    if let Outcome::SharedMemoryWrite { address } = patched.outcome {
        parts.push(format!("patched wrote to shared memory at {address:#x}"));
    }
    parts.join("; ")
}

/// Named features for the risk model.
pub fn features(calls: &[SimulatedCall], stats: &CaptureStats) -> BTreeMap<String, f64> {
    let count = |pick: &dyn Fn(&SimulatedCall) -> bool| calls.iter().filter(|c| pick(c)).count() as f64;
    let failed = |c: &SimulatedCall, pick: fn(&Outcome) -> bool| {
        c.comparison.verdict == CallVerdict::PatchedFailed && pick(&c.patched.outcome)
    };
    let diverged = |c: &SimulatedCall| c.comparison.verdict == CallVerdict::Diverged;
    let mut features = BTreeMap::new();
    let mut put = |name: &str, value: f64| {
        features.insert(name.to_string(), value);
    };
    put("sim_calls", calls.len() as f64);
    put(
        "sim_captured_calls",
        count(&|c| matches!(c.origin, CallOrigin::Captured { .. })),
    );
    put(
        "sim_explicit_calls",
        count(&|c| matches!(c.origin, CallOrigin::Explicit { .. })),
    );
    put(
        "sim_crashes",
        count(&|c| failed(c, |o| matches!(o, Outcome::Crashed { .. }))),
    );
    put(
        "sim_hangs",
        count(&|c| failed(c, |o| matches!(o, Outcome::Hung { .. }))),
    );
    put(
        "sim_exits",
        count(&|c| failed(c, |o| matches!(o, Outcome::Exited { .. }))),
    );
    put("sim_repeat_failures", count(&|c| c.failed_on_repeat()));
    put("sim_repeat_leaks", count(&|c| c.leaked_on_repeat()));
    // Live calls whose repeats showed no harm: run to the end, or as far
    // as the original could repeat the call (a dispatcher's `quit` closes
    // its connection: the call is not repeatable, which says nothing of
    // the patch). Counted only if at least one ran every repeat, and only
    // calls that ran the changed code: a dispatcher's `get` says nothing of
    // its inlined `delete` handler's change.
    fn live_repeats(c: &SimulatedCall) -> Option<&Repeats> {
        c.repeats
            .as_ref()
            .filter(|_| matches!(c.origin, CallOrigin::Captured { .. }) && c.ran_change())
    }
    let clean = count(&|c| {
        live_repeats(c).is_some_and(|r| {
            r.patched_failed.is_none()
                && !r.leaks()
                && r.each_ran_change()
                && (r.completed == r.asked || r.original_failed.is_some())
        })
    });
    let complete = count(&|c| live_repeats(c).is_some_and(|r| r.completed == r.asked && r.asked > 0));
    put("sim_live_repeated_clean", if complete > 0.0 { clean } else { 0.0 });
    put("sim_unreached_calls", count(&|c| !c.ran_change()));
    put("sim_callers_left_waiting", count(&|c| c.leaves_client_waiting()));
    put(
        "sim_callers_failed",
        count(&|c| c.continuation.as_ref().is_some_and(|k| k.patched_failed())),
    );
    // Calls whose callers, continued, both reached their next wait: the
    // continuation is evidence (0 where it could not be made).
    put(
        "sim_continued_calls",
        count(&|c| {
            c.continuation
                .as_ref()
                .is_some_and(|k| crate::continuation::ended(&k.original) && crate::continuation::ended(&k.patched))
        }),
    );
    put(
        "sim_divergent_returns",
        count(&|c| diverged(c) && c.comparison.return_differs),
    );
    put(
        "sim_fd_write_divergences",
        count(&|c| diverged(c) && c.comparison.fd_writes_differ),
    );
    put(
        "sim_side_effect_divergences",
        count(&|c| diverged(c) && c.comparison.side_effects_differ),
    );
    put(
        "sim_critical_divergences",
        count(&|c| diverged(c) && !c.comparison.critical.is_empty()),
    );
    put(
        "sim_unsupported_syscalls",
        count(&|c| c.comparison.unsupported_in_patched),
    );
    put(
        "sim_memory_pages_differing",
        calls
            .iter()
            .map(|c| c.comparison.memory_pages_differing as f64)
            .sum::<f64>()
            / calls.len().max(1) as f64,
    );
    put(
        "sim_inconclusive",
        count(&|c| c.comparison.verdict == CallVerdict::Inconclusive),
    );
    let mut pauses = stats.pauses_us.clone();
    pauses.sort_unstable();
    put("sim_live_pause_us_max", pauses.last().copied().unwrap_or(0) as f64);
    put(
        "sim_live_pause_us_median",
        pauses.get(pauses.len() / 2).copied().unwrap_or(0) as f64,
    );
    // The same counts per simulated call: what the model reads, so that a
    // run of 3 calls and one of 100 speak the same language.
    let calls_made = calls.len().max(1) as f64;
    for name in RATED {
        let rate = features.get(*name).copied().unwrap_or(0.0) / calls_made;
        features.insert(format!("sim_rate_{}", &name["sim_".len()..]), rate);
    }
    features.insert(
        "sim_rate_memory_pages_differing".into(),
        features.get("sim_memory_pages_differing").copied().unwrap_or(0.0),
    );
    features
}

/// The counts that also appear as a rate per simulated call (`sim_rate_*`).
const RATED: &[&str] = &[
    "sim_crashes",
    "sim_hangs",
    "sim_exits",
    "sim_divergent_returns",
    "sim_fd_write_divergences",
    "sim_side_effect_divergences",
    "sim_critical_divergences",
    "sim_unsupported_syscalls",
    "sim_inconclusive",
    "sim_repeat_failures",
    "sim_repeat_leaks",
    "sim_callers_left_waiting",
    "sim_callers_failed",
];
