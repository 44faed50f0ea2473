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
use super::sandbox::{self, Limits, Outcome, RunResult};
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
}

impl Continuation {
    /// Sockets the original's caller answered on (wrote to, or asked its
    /// event loop to report writable: a reply queued for the next turn)
    /// and the patched one left alone (no write, no such request, no
    /// close, no shutdown) before waiting, with the bytes the original
    /// wrote there (0: queued). Empty unless both waited.
    pub fn left_waiting(&self) -> Vec<(i32, u64)> {
        if !ended(&self.original) || !ended(&self.patched) {
            return Vec::new();
        }
        let mut written: Vec<(i32, u64)> = Vec::new();
        for write in self
            .original
            .fd_writes
            .iter()
            .filter(|w| self.sockets.contains(&w.fd) && w.len > 0)
        {
            match written.iter_mut().find(|(fd, _)| *fd == write.fd) {
                Some((_, bytes)) => *bytes += write.len,
                None => written.push((write.fd, write.len)),
            }
        }
        for &fd in self
            .original
            .output_wanted
            .iter()
            .filter(|fd| self.sockets.contains(fd))
        {
            if !written.iter().any(|(known, _)| *known == fd) {
                written.push((fd, 0));
            }
        }
        let shut = |fd: i32| {
            self.patched
                .side_effects
                .iter()
                .any(|e| e.syscall == "shutdown" && e.detail == format!("fd {fd}"))
        };
        written
            .into_iter()
            .filter(|(fd, _)| {
                !self.patched.fd_writes.iter().any(|w| w.fd == *fd)
                    && !self.patched.output_wanted.contains(fd)
                    && !self.patched.closed_inherited.contains(fd)
                    && !shut(*fd)
            })
            .collect()
    }

    /// The original's caller reached its wait; the patched one crashed,
    /// ended the process, or spun through its processor-time or syscall
    /// budget first (its wall-time budget is not counted: a loaded machine
    /// can exhaust that).
    pub fn patched_failed(&self) -> bool {
        ended(&self.original)
            && match &self.patched.outcome {
                Outcome::Crashed { .. } | Outcome::Exited { .. } => true,
                Outcome::Hung { budget } => budget != "wall time",
                _ => false,
            }
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
/// `return_address` and run each until it waits.
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
    Ok(Continuation {
        original,
        patched,
        sockets: sockets.clone(),
    })
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
        };
        // Answered, then silence before the wait (or the shared memory).
        let silent = both(run(waiting(), &[(5, 235)]), run(waiting(), &[]));
        assert_eq!(silent.left_waiting(), vec![(5, 235)]);
        let shared = Outcome::SharedMemoryWrite { address: 0x1000 };
        assert_eq!(
            both(run(waiting(), &[(5, 9)]), run(shared, &[])).left_waiting(),
            vec![(5, 9)]
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
        assert_eq!(both(original, run(waiting(), &[])).left_waiting(), vec![(5, 0)]);
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
}
