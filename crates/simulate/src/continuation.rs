//! What the caller does after the call: harm downstream of the function.
//! A patched function may return, without a crash, an answer its caller
//! cannot live with: libevent's `evhttp_find_header` with a flipped
//! comparison returns "no such header", and the server then waits for a
//! request body that never comes; the client waits for its reply for ever.
//! Simulating the function alone shows only "another return value".
//!
//! So once both copies returned from a captured call (and from its
//! repeats), each resumes its caller at the call's real return address and
//! runs, sandboxed as the call was, until it waits for its next event
//! (`epoll_wait`, `poll`, `accept`, a futex wait...) or writes to memory it
//! shares with the service (`ended`). Two things are harm:
//!
//! - the original's caller answered on a socket of the service (wrote its
//!   reply, or asked its event loop to report the socket writable: a reply
//!   queued for the next turn, as libevent does), and the patched one did
//!   neither, nor closed the socket or shut it down, before waiting: the
//!   client there waits for an answer that never comes
//!   (`sim-patched-leaves-client-waiting`);
//! - the original's caller reached its wait and the patched one crashed,
//!   ended the process or spun through its processor-time budget on the
//!   way (`sim-patched-caller-fails`): memcached's caller runs the next
//!   commands of the same request, patched ones included.
//!
//! Another reply, or a connection closed instead of answered, is a change
//! of behaviour (a fix may well refuse a request): not these findings.

use super::policy::Descriptors;
use super::repeat::DescriptorsOf;
use super::sandbox::{self, Interest, Limits, Outcome, RunResult};
use super::SimulateError;
use shadowpatch_process::ProcessCopy;
use std::collections::BTreeSet;
use std::time::Duration;

/// Budgets of each continuation: a caller's work up to its next wait is
/// short; a copy that does not wait within them is inconclusive.
pub const LIMITS: Limits = Limits {
    cpu: Duration::from_millis(500),
    wall: Duration::from_secs(2),
    syscalls: 2_000,
};

/// Both callers after the call.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Continuation {
    pub original: RunResult,
    pub patched: RunResult,
    /// The service's sockets (descriptor numbers) when the call was
    /// captured (`fork::release_descriptors`): where a reply goes.
    pub sockets: BTreeSet<i32>,
    /// The event loop's next turn, when both queued a reply (asked their
    /// epoll set to report a socket writable) and waited: each copy's wait
    /// ended with its sockets writable, and each ran to its next wait
    /// (`next_turn`). That is where libevent writes a reply and closes the
    /// connection the request asked to be closed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<Turn>,
}

/// Both copies' runs in the event loop's next turn.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Turn {
    pub original: RunResult,
    pub patched: RunResult,
}

/// A client the patched caller leaves waiting, on socket `fd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeftWaiting {
    pub fd: i32,
    /// Bytes the original's caller wrote there (0: a reply queued only).
    pub bytes: u64,
    /// The patched caller answered too, but kept open the connection the
    /// original's closed (or shut down) after its reply: a client reading
    /// the reply to its end (`Connection: close`, HTTP/1.0) waits for ever.
    /// Otherwise it did not answer at all.
    pub kept_open: bool,
}

/// What one copy's caller did to the service's sockets over its turns.
struct Answers<'a> {
    runs: Vec<&'a RunResult>,
}

impl Answers<'_> {
    fn bytes_written(&self, fd: i32) -> u64 {
        self.runs
            .iter()
            .flat_map(|r| r.fd_writes.iter())
            .filter(|w| w.fd == fd)
            .map(|w| w.len)
            .sum()
    }

    fn wrote(&self, fd: i32) -> bool {
        self.runs.iter().flat_map(|r| r.fd_writes.iter()).any(|w| w.fd == fd)
    }

    /// A reply queued in the last turn (one queued before it had its turn
    /// to be written).
    fn queued(&self, fd: i32) -> bool {
        self.last().output_wanted.contains(&fd)
    }

    /// Closed, or shut down: the connection's end told to the client.
    fn ended_connection(&self, fd: i32) -> bool {
        self.runs.iter().any(|r| {
            r.closed_inherited.contains(&fd)
                || r.side_effects
                    .iter()
                    .any(|e| e.syscall == "shutdown" && e.detail == format!("fd {fd}"))
        })
    }

    /// Sockets of `sockets` answered: bytes written, or a reply queued.
    fn answered(&self, sockets: &BTreeSet<i32>) -> Vec<(i32, u64)> {
        sockets
            .iter()
            .filter(|&&fd| self.bytes_written(fd) > 0 || self.queued(fd))
            .map(|&fd| (fd, self.bytes_written(fd)))
            .collect()
    }

    /// The last turn's run: how the caller ended.
    fn last(&self) -> &RunResult {
        self.runs.last().expect("one turn at least")
    }
}

impl Continuation {
    fn original_answers(&self) -> Answers<'_> {
        Answers {
            runs: std::iter::once(&self.original)
                .chain(self.next.as_ref().map(|t| &t.original))
                .collect(),
        }
    }

    fn patched_answers(&self) -> Answers<'_> {
        Answers {
            runs: std::iter::once(&self.patched)
                .chain(self.next.as_ref().map(|t| &t.patched))
                .collect(),
        }
    }

    /// Sockets the original's caller answered on (wrote to, or asked its
    /// event loop to report writable: a reply queued for the next turn)
    /// where the patched one either left the socket alone (no write, no
    /// such request, no close, no shutdown) or answered but kept open the
    /// connection the original's closed, over the turns both ran, before
    /// waiting. Empty unless both waited at the end.
    pub fn left_waiting(&self) -> Vec<LeftWaiting> {
        let (original, patched) = (self.original_answers(), self.patched_answers());
        if !ended(original.last()) || !ended(patched.last()) {
            return Vec::new();
        }
        original
            .answered(&self.sockets)
            .into_iter()
            .filter_map(|(fd, bytes)| {
                let silent = !patched.wrote(fd) && !patched.queued(fd) && !patched.ended_connection(fd);
                let kept_open = original.ended_connection(fd)
                    && bytes > 0
                    && patched.bytes_written(fd) > 0
                    && !patched.ended_connection(fd);
                (silent || kept_open).then_some(LeftWaiting { fd, bytes, kept_open })
            })
            .collect()
    }

    /// The original's caller reached its wait; the patched one crashed,
    /// ended the process, or spun through its processor-time or syscall
    /// budget first, in either turn (its wall-time budget is not counted:
    /// a loaded machine can exhaust that).
    pub fn patched_failed(&self) -> bool {
        let turns = std::iter::once((&self.original, &self.patched))
            .chain(self.next.as_ref().map(|t| (&t.original, &t.patched)));
        turns.into_iter().any(|(original, patched)| {
            ended(original)
                && match &patched.outcome {
                    Outcome::Crashed { .. } | Outcome::Exited { .. } => true,
                    Outcome::Hung { budget } => budget != "wall time",
                    _ => false,
                }
        })
    }
}

/// Whether a continuation came to an end that says something: it waited
/// for the next event, or it reached the service's shared memory (kept
/// read-only in copies: nginx counts its requests there after answering),
/// where simulating further would be guessing.
pub fn ended(run: &RunResult) -> bool {
    matches!(run.outcome, Outcome::Waiting { .. } | Outcome::SharedMemoryWrite { .. })
}

/// Resume both copies (each just back from the call, at the sentinel) at
/// `return_address` and run each until it waits; then, if both queued a
/// reply on a socket and wait in `epoll_wait`, the loop's next turn.
pub fn continue_both(
    (original_copy, patched_copy): (&mut ProcessCopy, &mut ProcessCopy),
    descriptors: DescriptorsOf<'_>,
    return_address: u64,
    sockets: &BTreeSet<i32>,
) -> Result<Continuation, SimulateError> {
    let resume = |copy: &mut ProcessCopy| -> Result<RunResult, SimulateError> {
        let mut regs = copy.regs()?;
        // The `ret` already popped the (sentinel) return address.
        regs.rip = return_address;
        regs.orig_rax = u64::MAX;
        copy.set_regs(regs)?;
        let fds: Descriptors = descriptors(copy);
        Ok(sandbox::run_until_wait(copy, fds, &LIMITS)?)
    };
    let original = resume(original_copy)?;
    let patched = resume(patched_copy)?;
    let next = next_turn(
        (original_copy, &original),
        (patched_copy, &patched),
        descriptors,
        sockets,
    )?;
    Ok(Continuation {
        original,
        patched,
        sockets: sockets.clone(),
        next,
    })
}

/// The event loop's next turn for both copies, when both waited in
/// `epoll_wait` with a reply queued on one of the service's sockets: their
/// waits end with those sockets writable (as the kernel would report them,
/// the client's buffer being empty), and each runs to its next wait. No
/// turn when only one of them queued (the other left its client waiting
/// already, or answered directly) or either did not wait in `epoll_wait`.
fn next_turn(
    (original_copy, original): (&mut ProcessCopy, &RunResult),
    (patched_copy, patched): (&mut ProcessCopy, &RunResult),
    descriptors: DescriptorsOf<'_>,
    sockets: &BTreeSet<i32>,
) -> Result<Option<Turn>, SimulateError> {
    let waits_in_epoll =
        |run: &RunResult| matches!(&run.outcome, Outcome::Waiting { syscall } if syscall.starts_with("epoll_"));
    let queued = |run: &RunResult| -> Vec<Interest> {
        run.output_interest
            .iter()
            .filter(|i| sockets.contains(&i.fd))
            .copied()
            .collect()
    };
    let (original_ready, patched_ready) = (queued(original), queued(patched));
    if !waits_in_epoll(original) || !waits_in_epoll(patched) || original_ready.is_empty() || patched_ready.is_empty() {
        return Ok(None);
    }
    if !sandbox::end_wait_writable(original_copy, &original_ready)?
        || !sandbox::end_wait_writable(patched_copy, &patched_ready)?
    {
        return Ok(None);
    }
    let run = |copy: &mut ProcessCopy| -> Result<RunResult, SimulateError> {
        let fds: Descriptors = descriptors(copy);
        Ok(sandbox::run_until_wait(copy, fds, &LIMITS)?)
    };
    Ok(Some(Turn {
        original: run(original_copy)?,
        patched: run(patched_copy)?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::{Budget, FdWrite};

    fn run(outcome: Outcome, writes: &[(i32, u64)]) -> RunResult {
        RunResult {
            outcome,
            fd_writes: writes
                .iter()
                .map(|&(fd, len)| FdWrite {
                    fd,
                    syscall: "writev".into(),
                    len,
                    shown: String::new(),
                    digest: String::new(),
                })
                .collect(),
            side_effects: Vec::new(),
            syscalls: 0,
            foreign_signals: 0,
            elapsed_us: 0,
            budget: Budget {
                cpu_ms: 500,
                wall_ms: 2000,
                syscalls: 2000,
            },
            ran_changed_code: None,
            closed_inherited: Vec::new(),
            output_wanted: Vec::new(),
            output_interest: Vec::new(),
        }
    }

    fn silent(fd: i32, bytes: u64) -> LeftWaiting {
        LeftWaiting {
            fd,
            bytes,
            kept_open: false,
        }
    }

    fn waiting() -> Outcome {
        Outcome::Waiting {
            syscall: "epoll_wait".into(),
        }
    }

    #[test]
    fn a_socket_answered_by_the_original_only_leaves_its_client_waiting() {
        let sockets: BTreeSet<i32> = [5].into();
        let both = |original: RunResult, patched: RunResult| Continuation {
            original,
            patched,
            sockets: sockets.clone(),
            next: None,
        };
        // Answered, then silence before the wait (or the shared memory).
        let quiet = both(run(waiting(), &[(5, 235)]), run(waiting(), &[]));
        assert_eq!(quiet.left_waiting(), vec![silent(5, 235)]);
        let shared = Outcome::SharedMemoryWrite { address: 0x1000 };
        assert_eq!(
            both(run(waiting(), &[(5, 9)]), run(shared, &[])).left_waiting(),
            vec![silent(5, 9)]
        );
        // Another answer, a close, a queued answer: not left waiting.
        assert!(both(run(waiting(), &[(5, 235)]), run(waiting(), &[(5, 339)]))
            .left_waiting()
            .is_empty());
        let mut closed = run(waiting(), &[]);
        closed.closed_inherited.push(5);
        assert!(both(run(waiting(), &[(5, 235)]), closed).left_waiting().is_empty());
        let mut queued = run(waiting(), &[]);
        queued.output_wanted.push(5);
        assert!(both(run(waiting(), &[(5, 235)]), queued).left_waiting().is_empty());
        // A queued answer of the original's counts as one.
        let mut original = run(waiting(), &[]);
        original.output_wanted.push(5);
        assert_eq!(both(original, run(waiting(), &[])).left_waiting(), vec![silent(5, 0)]);
        // Not a socket (a log file), or a continuation that did not end.
        assert!(both(run(waiting(), &[(3, 80)]), run(waiting(), &[]))
            .left_waiting()
            .is_empty());
        let spun = Outcome::Hung {
            budget: "cpu time".into(),
        };
        assert!(both(run(waiting(), &[(5, 235)]), run(spun.clone(), &[]))
            .left_waiting()
            .is_empty());
        // ... which is the caller failing, unless only the wall clock ran out.
        assert!(both(run(waiting(), &[]), run(spun, &[])).patched_failed());
        let slow = Outcome::Hung {
            budget: "wall time".into(),
        };
        assert!(!both(run(waiting(), &[]), run(slow, &[])).patched_failed());
    }

    #[test]
    fn a_connection_the_original_closes_after_its_reply_and_the_patched_keeps_open_leaves_its_client_waiting() {
        let sockets: BTreeSet<i32> = [7].into();
        // Turn one: both queue their reply (libevent), then wait.
        let queued = || {
            let mut run = run(waiting(), &[]);
            run.output_wanted.push(7);
            run
        };
        let closing = || {
            let mut run = run(waiting(), &[(7, 217)]);
            run.closed_inherited.push(7);
            run
        };
        let two_turns = |original: RunResult, patched: RunResult| Continuation {
            original: queued(),
            patched: queued(),
            sockets: sockets.clone(),
            next: Some(Turn { original, patched }),
        };
        // Next turn: both write; only the original closes.
        let kept = two_turns(closing(), run(waiting(), &[(7, 166)]));
        assert_eq!(
            kept.left_waiting(),
            vec![LeftWaiting {
                fd: 7,
                bytes: 217,
                kept_open: true
            }]
        );
        // Both close (another reply: a change, not harm), or a shutdown.
        assert!(two_turns(closing(), closing()).left_waiting().is_empty());
        let mut shut = run(waiting(), &[(7, 166)]);
        shut.side_effects.push(crate::policy::SideEffect {
            kind: crate::policy::EffectKind::Network,
            syscall: "shutdown".into(),
            detail: "fd 7".into(),
        });
        assert!(two_turns(closing(), shut).left_waiting().is_empty());
        // The original keeps it open (keep-alive), the patched closes: no harm.
        assert!(two_turns(run(waiting(), &[(7, 217)]), closing())
            .left_waiting()
            .is_empty());
        // The patched one queued, then wrote nothing in the next turn.
        assert_eq!(
            two_turns(closing(), run(waiting(), &[])).left_waiting(),
            vec![silent(7, 217)]
        );
        // A crash in the next turn is the caller failing.
        let crashed = Outcome::Crashed {
            signal: "SIGSEGV".into(),
            code: 1,
            address: 0,
            rip: 0,
        };
        assert!(two_turns(closing(), run(crashed, &[])).patched_failed());
        assert!(!two_turns(closing(), closing()).patched_failed());
    }
}
