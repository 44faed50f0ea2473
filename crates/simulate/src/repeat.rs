//! The same call again, in the same two copies: harm that one call does
//! not show. A patch that crashes on every third call (a counter of its
//! own), fails once a buffer it grows is full, or leaks on every call
//! looks clean in a single simulated call: every copy is made afresh from
//! the live process, where the patch never ran. So once both copies
//! returned from a call and were compared, each runs the call again
//! `runs` times from the same entry registers, its memory as its previous
//! run left it (as the live process would run the next such call), and
//! the data segment's growth is measured over the repeats.
//!
//! Only a difference counts: the original is repeated first each time,
//! and if it cannot repeat the call (its own state makes the next run
//! crash or hang: the call is not repeatable) nothing more is concluded.

use super::policy::Descriptors;
use super::probe::ChangedCode;
use super::sandbox::{self, Limits, Outcome};
use super::SimulateError;
use shadowpatch_process::ProcessCopy;

/// Repeats of each simulated call that both copies returned from (the
/// default of `SimulationOptions::repeat`): enough for a failure on every
/// third call, and 4 × a leak per call for the growth measure.
pub const DEFAULT_REPEATS: u32 = 4;

/// Growth of the patched copy's data segment beyond the original's, per
/// repeated call, that is a leak (a finding): 64 KiB a call.
pub const LEAK_KIB_PER_CALL: i64 = 64;

/// What repeating one call showed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Repeats {
    /// Repeats asked for.
    pub asked: u32,
    /// Repeats both copies returned from.
    pub completed: u32,
    /// The original failed on this repeat (1-based): the call is not
    /// repeatable from here, and says nothing more about the patch.
    pub original_failed: Option<u32>,
    /// The patched failed on this repeat (1-based) where the original
    /// returned, and how.
    pub patched_failed: Option<(u32, Outcome)>,
    /// Growth of each copy's data segment (`VmData`) over the completed
    /// repeats, KiB.
    pub original_growth_kib: i64,
    pub patched_growth_kib: i64,
    /// Repeats whose patched run ran the changed code, when the
    /// replacement carries an inlined change (`probe`): a repeat that
    /// never ran it (the call's input consumed by the first run, say)
    /// shows nothing about the change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ran_changed_code: Option<u32>,
}

impl Repeats {
    /// The patched copy's growth beyond the original's, per completed
    /// repeat, KiB.
    pub fn excess_kib_per_call(&self) -> i64 {
        if self.completed == 0 {
            return 0;
        }
        (self.patched_growth_kib - self.original_growth_kib) / i64::from(self.completed)
    }

    /// Every repeat that ran, ran the changed code (trivially so when the
    /// whole replacement is the change).
    pub fn each_ran_change(&self) -> bool {
        self.ran_changed_code
            .is_none_or(|ran| ran >= self.completed + u32::from(self.patched_failed.is_some()))
    }

    /// Leaks by the finding's measure.
    pub fn leaks(&self) -> bool {
        self.excess_kib_per_call() >= LEAK_KIB_PER_CALL
    }
}

/// `VmData` of a copy, KiB.
fn data_kib(copy: &ProcessCopy) -> Result<i64, SimulateError> {
    let path = format!("/proc/{}/status", copy.pid().as_raw());
    let text = std::fs::read_to_string(&path).map_err(|source| SimulateError::Copy {
        pid: copy.pid().as_raw(),
        message: format!("cannot read {path}: {source}"),
    })?;
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix("VmData:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0))
}

/// Put a copy back at the call's entry: the registers, and the sentinel
/// return address the previous run's `ret` consumed.
fn rewind(copy: &mut ProcessCopy, entry: &libc::user_regs_struct, sentinel: u64) -> Result<(), SimulateError> {
    copy.memory().write(entry.rsp, &sentinel.to_le_bytes())?;
    copy.set_regs(*entry)?;
    Ok(())
}

/// The descriptors a copy's sandbox starts from.
pub type DescriptorsOf<'a> = &'a dyn Fn(&ProcessCopy) -> Descriptors;

/// Repeat the call `runs` times in both copies, both of which returned
/// from it (see the module's doc).
pub fn repeat(
    (original_copy, patched_copy): (&mut ProcessCopy, &mut ProcessCopy),
    descriptors: DescriptorsOf<'_>,
    entry: &libc::user_regs_struct,
    sentinel: u64,
    limits: &Limits,
    runs: u32,
    changed: Option<&ChangedCode>,
) -> Result<Repeats, SimulateError> {
    let mut repeats = Repeats {
        asked: runs,
        completed: 0,
        original_failed: None,
        patched_failed: None,
        original_growth_kib: 0,
        patched_growth_kib: 0,
        ran_changed_code: changed.map(|_| 0),
    };
    let original_before = data_kib(original_copy)?;
    let patched_before = data_kib(patched_copy)?;
    for run in 1..=runs {
        rewind(original_copy, entry, sentinel)?;
        let fds = descriptors(original_copy);
        let original = sandbox::run(original_copy, sentinel, fds, limits)?;
        if !original.outcome.returned() {
            repeats.original_failed = Some(run);
            break;
        }
        rewind(patched_copy, entry, sentinel)?;
        let fds = descriptors(patched_copy);
        let patched = sandbox::run_probed(
            patched_copy,
            sentinel,
            fds,
            &limits.for_patched(original.elapsed_us),
            changed,
        )?;
        if patched.ran_changed_code == Some(true) {
            *repeats.ran_changed_code.get_or_insert(0) += 1;
        }
        if !patched.outcome.returned() {
            // A write to memory shared with the service is stopped by the
            // sandbox on the first run already; on a repeat it is the same
            // finding, not a new kind of failure.
            if !matches!(patched.outcome, Outcome::SharedMemoryWrite { .. }) {
                repeats.patched_failed = Some((run, patched.outcome));
            }
            break;
        }
        repeats.completed = run;
    }
    if repeats.completed > 0 {
        repeats.original_growth_kib = data_kib(original_copy)? - original_before;
        repeats.patched_growth_kib = data_kib(patched_copy)? - patched_before;
    }
    Ok(repeats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repeats(completed: u32, original: i64, patched: i64) -> Repeats {
        Repeats {
            asked: 4,
            completed,
            original_failed: None,
            patched_failed: None,
            original_growth_kib: original,
            patched_growth_kib: patched,
            ran_changed_code: None,
        }
    }

    #[test]
    fn repeats_that_never_ran_the_changed_code_are_not_each_running_it() {
        let mut r = repeats(4, 0, 0);
        assert!(r.each_ran_change());
        r.ran_changed_code = Some(4);
        assert!(r.each_ran_change());
        r.ran_changed_code = Some(0);
        assert!(!r.each_ran_change());
        // A failed repeat ran too.
        r.completed = 2;
        r.patched_failed = Some((3, Outcome::Exited { code: 1 }));
        r.ran_changed_code = Some(2);
        assert!(!r.each_ran_change());
        r.ran_changed_code = Some(3);
        assert!(r.each_ran_change());
    }

    #[test]
    fn a_leak_is_growth_beyond_the_originals_per_repeat() {
        // 256 KiB a call (and the mmap's page) over 4 repeats.
        assert!(repeats(4, 0, 4 * 260).leaks());
        // Both grew alike (a cache filled by the call itself): no leak.
        assert!(!repeats(4, 1024, 1100).leaks());
        // Under 64 KiB a call.
        assert!(!repeats(4, 0, 200).leaks());
        // Nothing completed: nothing measured.
        assert!(!repeats(0, 0, 4096).leaks());
    }
}
