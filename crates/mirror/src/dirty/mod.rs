//! Dirty-page tracking: which pages of a target's mutable memory were
//! written since the last look, so a data mirror re-copies only those.
//!
//! Three methods, in order of preference:
//!
//! 1. [`DirtyMethod::UffdWpAsync`] (`uffd.rs`): a userfaultfd created inside
//!    the target and held by us write-protects the tracked ranges in
//!    asynchronous mode; `PAGEMAP_SCAN` reports the written pages and
//!    re-protects them in one atomic step per page. Exact, no stop, cost
//!    limited to the tracked ranges (one minor fault per first write).
//! 2. [`DirtyMethod::SoftDirty`] (`soft_dirty.rs`): `clear_refs` + bit 55 of
//!    /proc/PID/pagemap. The brief ranked it first; it comes second because
//!    `clear_refs` can only clear the *whole* process (every writable page of
//!    the target takes a write fault after each cycle, not just the tracked
//!    ones), and reading then clearing the bits is only race-free with the
//!    target stopped, so each cycle costs a stop. It remains the fallback
//!    when the target already uses userfaultfd on a tracked range.
//! 3. [`DirtyMethod::FullSweep`] (`sweep.rs`): read and hash every page each
//!    cycle. Always available, touches nothing in the target, costs a full
//!    read per cycle.
//!
//! Detection is by behaviour, on our own memory (`detect`): a kernel
//! version says nothing about its configuration (soft-dirty needs
//! CONFIG_MEM_SOFT_DIRTY; `clear_refs` accepts "4" without it and simply
//! never marks a page). Starting a tracker may still fall back for reasons
//! only the target shows (it already uses userfaultfd: EBUSY; a seccomp
//! filter refuses userfaultfd()); each skipped method keeps its reason.
//!
//! Whatever a method sets up in the target is undone by
//! [`DirtyTracker::stop`], and on drop as a best effort; the uffd method is
//! also undone by the kernel if shadowpatch dies (see `uffd.rs`).
//!
//! Only `start` needs the target attached (the userfaultfd is created by a
//! remote system call; soft-dirty clears in a stop). Collecting does not:
//! the uffd method scans /proc/PID/pagemap and the sweep reads with
//! `process_vm_readv`, both from outside, and soft-dirty attaches itself
//! for the one short stop each collect needs. A long-running caller (the
//! watcher) therefore detaches right after `start`: a target attached
//! between cycles would hold every signal sent to it in a signal-delivery
//! stop until our next stop.

mod soft_dirty;
mod sweep;
mod uffd;

use crate::hash::PAGE_SIZE;
use serde::{Deserialize, Serialize};
use shadowpatch_process::{Attached, ProcessIdentity, TargetError, TargetMemory};
use std::time::Instant;

/// How dirty pages are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DirtyMethod {
    /// userfaultfd write-protect in async mode + `PAGEMAP_SCAN`.
    UffdWpAsync,
    /// Soft-dirty bits (`clear_refs` + /proc/PID/pagemap).
    SoftDirty,
    /// Read and hash every tracked page.
    FullSweep,
}

impl DirtyMethod {
    /// Every method, most preferred first (see the module documentation).
    pub const PREFERENCE: [DirtyMethod; 3] = [DirtyMethod::UffdWpAsync, DirtyMethod::SoftDirty, DirtyMethod::FullSweep];

    /// The snake_case name used in JSON and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            DirtyMethod::UffdWpAsync => "uffd_wp_async",
            DirtyMethod::SoftDirty => "soft_dirty",
            DirtyMethod::FullSweep => "full_sweep",
        }
    }

    /// Whether this kernel supports the method, judged by its behaviour on
    /// our own memory; the error says why not.
    pub fn probe(self) -> Result<(), String> {
        match self {
            DirtyMethod::UffdWpAsync => uffd::probe(),
            DirtyMethod::SoftDirty => soft_dirty::probe(),
            DirtyMethod::FullSweep => Ok(()),
        }
    }
}

impl std::fmt::Display for DirtyMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DirtyMethod {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        DirtyMethod::PREFERENCE
            .into_iter()
            .find(|m| m.name() == text)
            .ok_or_else(|| format!("unknown dirty-tracking method {text:?} (soft_dirty, uffd_wp_async, full_sweep)"))
    }
}

/// One method's availability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MethodStatus {
    pub method: DirtyMethod,
    pub available: bool,
    /// Why it is unavailable (None when available).
    pub reason: Option<String>,
}

/// The outcome of probing every method on this kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Detection {
    /// The most preferred available method.
    pub best: DirtyMethod,
    /// Every method in order of preference, with its availability.
    pub methods: Vec<MethodStatus>,
}

impl Detection {
    /// The available methods, most preferred first.
    pub fn available(&self) -> Vec<DirtyMethod> {
        self.methods.iter().filter(|s| s.available).map(|s| s.method).collect()
    }

    /// Methods more preferred than `best`, each with why it is unavailable.
    pub fn better_unavailable(&self) -> impl Iterator<Item = &MethodStatus> {
        self.methods.iter().take_while(|s| s.method != self.best)
    }
}

/// Probe every method (a few hundred microseconds, on our own memory).
pub fn detect() -> Detection {
    let methods: Vec<MethodStatus> = DirtyMethod::PREFERENCE
        .into_iter()
        .map(|method| match method.probe() {
            Ok(()) => MethodStatus {
                method,
                available: true,
                reason: None,
            },
            Err(reason) => MethodStatus {
                method,
                available: false,
                reason: Some(reason),
            },
        })
        .collect();
    let best = methods
        .iter()
        .find(|s| s.available)
        .map_or(DirtyMethod::FullSweep, |s| s.method);
    Detection { best, methods }
}

/// A page-aligned range of target memory to track, `start..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TrackedRange {
    pub start: u64,
    pub end: u64,
}

impl TrackedRange {
    /// The whole pages covering `len` bytes at `address` (a variable, a
    /// data section): the tracker works on pages.
    pub fn covering(address: u64, len: u64) -> Self {
        let page = PAGE_SIZE as u64;
        TrackedRange {
            start: address / page * page,
            end: (address + len).div_ceil(page) * page,
        }
    }

    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub fn pages(&self) -> usize {
        (self.len() / PAGE_SIZE as u64) as usize
    }

    pub fn contains(&self, address: u64) -> bool {
        (self.start..self.end).contains(&address)
    }
}

/// Pages written since the previous collect.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DirtyPages {
    /// Page addresses, ascending, each once.
    pub pages: Vec<u64>,
    /// Bytes of target memory the method read to find them (the full
    /// sweep reads everything; the others read none).
    pub bytes_read: u64,
    /// Time the method took.
    pub collect_us: u64,
}

impl DirtyPages {
    /// Runs of contiguous dirty pages as `(address, bytes)`, ascending.
    pub fn runs(&self) -> Vec<(u64, usize)> {
        let mut runs: Vec<(u64, usize)> = Vec::new();
        for &page in &self.pages {
            match runs.last_mut() {
                Some((start, len)) if *start + *len as u64 == page => *len += PAGE_SIZE,
                _ => runs.push((page, PAGE_SIZE)),
            }
        }
        runs
    }
}

/// Errors of dirty-page tracking and data mirroring, naming pid and range.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("dirty-page tracking method {method} is unavailable for pid {pid}: {reason}")]
    MethodUnavailable {
        pid: i32,
        method: DirtyMethod,
        reason: String,
    },
    #[error("tracked range {start:#x}..{end:#x} of pid {pid}: {problem}")]
    BadRange {
        pid: i32,
        start: u64,
        end: u64,
        problem: &'static str,
    },
    #[error("{action} pid {pid} over {start:#x}..{end:#x}: {errno}")]
    Kernel {
        pid: i32,
        action: &'static str,
        start: u64,
        end: u64,
        errno: nix::errno::Errno,
    },
    #[error("{action} /proc/{pid}/{file}: {message}")]
    Proc {
        pid: i32,
        action: &'static str,
        file: &'static str,
        message: String,
    },
    #[error("the dirty tracker was started for pid {tracker_pid}, not pid {pid}")]
    WrongTarget { tracker_pid: i32, pid: i32 },
    #[error("the dirty tracker of pid {pid} is stopped")]
    Stopped { pid: i32 },
    #[error(transparent)]
    Target(#[from] TargetError),
}

impl DirtyError {
    /// Errors caused by the caller's choice of ranges or method (the target
    /// was left untouched): the CLI exits 2 on these.
    pub fn is_bad_input(&self) -> bool {
        shadowpatch_failure::Classify::is_bad_input(self)
    }
}

impl shadowpatch_failure::Classify for DirtyError {
    fn class(&self) -> shadowpatch_failure::FailureClass {
        use shadowpatch_failure::FailureClass;
        match self {
            DirtyError::MethodUnavailable { .. } | DirtyError::BadRange { .. } | DirtyError::WrongTarget { .. } => {
                FailureClass::BadInput
            }
            DirtyError::Target(e) => e.class(),
            _ => FailureClass::FailedMidway,
        }
    }
}

/// How a collect reaches the target.
enum Access<'a> {
    Detached(&'a mut TargetMemory),
    Attached(&'a mut Attached),
}

/// The running method's state.
#[derive(Debug)]
enum Backend {
    Uffd(uffd::UffdTracking),
    SoftDirty(soft_dirty::SoftDirtyTracking),
    Sweep(sweep::SweepTracking),
}

/// Tracks writes to a set of page-aligned ranges of one seized target.
///
/// ```text
/// let mut tracker = DirtyTracker::start(&mut attached, &ranges, None)?;   // best method
/// attached.detach()?;                                                      // not needed any more
/// let mut mirror = DataMirror::capture(&tracker, &mut memory)?;           // after start
/// loop { let report = mirror.refresh(&mut tracker, &mut memory)?; ... }
/// tracker.stop()?;
/// ```
#[derive(Debug)]
pub struct DirtyTracker {
    identity: ProcessIdentity,
    pid: i32,
    ranges: Vec<TrackedRange>,
    method: DirtyMethod,
    skipped: Vec<MethodStatus>,
    backend: Option<Backend>,
}

impl DirtyTracker {
    /// Start tracking `ranges` (page-aligned, writable mappings of the
    /// target; adjacent ranges are merged, overlapping ones refused) with
    /// `method`, or with the most preferred method that works for this
    /// target when `None`. A forced method that cannot work is an error
    /// ([`DirtyError::MethodUnavailable`]) and leaves the target untouched.
    pub fn start(
        attached: &mut Attached,
        ranges: &[TrackedRange],
        method: Option<DirtyMethod>,
    ) -> Result<Self, DirtyError> {
        let pid = attached.pid();
        let ranges = normalize(pid, ranges)?;
        check_writable(pid, &ranges)?;
        let candidates: Vec<DirtyMethod> = match method {
            Some(forced) => vec![forced],
            None => DirtyMethod::PREFERENCE.to_vec(),
        };
        let mut skipped = Vec::new();
        for candidate in candidates {
            let started = match candidate.probe() {
                Err(reason) => Err(DirtyError::MethodUnavailable {
                    pid,
                    method: candidate,
                    reason,
                }),
                Ok(()) => start_backend(candidate, attached, &ranges),
            };
            match started {
                Ok(backend) => {
                    tracing::debug!(pid, method = %candidate, "dirty tracking started");
                    return Ok(DirtyTracker {
                        identity: attached.identity().clone(),
                        pid,
                        ranges,
                        method: candidate,
                        skipped,
                        backend: Some(backend),
                    });
                }
                // Only an unavailable method falls back; anything else
                // (the target exited, a read failed) is the caller's to see.
                Err(DirtyError::MethodUnavailable { reason, .. }) if method.is_none() => {
                    tracing::debug!(pid, method = %candidate, %reason, "dirty tracking method skipped");
                    skipped.push(MethodStatus {
                        method: candidate,
                        available: false,
                        reason: Some(reason),
                    });
                }
                Err(error) => return Err(error),
            }
        }
        // Only reached if every method, the full sweep included, said it
        // was unavailable: report the last reason rather than panic.
        let last = skipped.pop();
        Err(DirtyError::MethodUnavailable {
            pid,
            method: last.as_ref().map_or(DirtyMethod::FullSweep, |s| s.method),
            reason: last.and_then(|s| s.reason).unwrap_or_default(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The method in use.
    pub fn method(&self) -> DirtyMethod {
        self.method
    }

    /// The more preferred methods that were skipped, each with why.
    pub fn skipped(&self) -> &[MethodStatus] {
        &self.skipped
    }

    /// The tracked ranges (sorted, merged).
    pub fn ranges(&self) -> &[TrackedRange] {
        &self.ranges
    }

    pub fn page_count(&self) -> usize {
        self.ranges.iter().map(TrackedRange::pages).sum()
    }

    /// The pages written since the previous collect (or since `start`),
    /// re-arming the tracking for the next one. Every page written before
    /// the collect returns is either in this answer or in the next one.
    ///
    /// Needs no attach: the uffd method and the sweep work from outside;
    /// soft-dirty seizes the target for its one stop and detaches (use
    /// [`DirtyTracker::collect_attached`] when the caller already holds an
    /// attach, since a second tracer cannot seize).
    pub fn collect(&mut self, memory: &mut TargetMemory) -> Result<DirtyPages, DirtyError> {
        self.collect_via(Access::Detached(memory))
    }

    /// [`DirtyTracker::collect`] for a caller that holds the target attached.
    pub fn collect_attached(&mut self, attached: &mut Attached) -> Result<DirtyPages, DirtyError> {
        self.collect_via(Access::Attached(attached))
    }

    fn collect_via(&mut self, access: Access<'_>) -> Result<DirtyPages, DirtyError> {
        let pid = match &access {
            Access::Detached(memory) => memory.pid(),
            Access::Attached(attached) => attached.pid(),
        };
        self.check_target(pid)?;
        let started = Instant::now();
        let mut dirty = match (self.backend.as_mut(), access) {
            (None, _) => return Err(DirtyError::Stopped { pid: self.pid }),
            (Some(Backend::Uffd(tracking)), _) => tracking.collect()?,
            (Some(Backend::SoftDirty(tracking)), Access::Attached(attached)) => tracking.collect(attached)?,
            (Some(Backend::SoftDirty(tracking)), Access::Detached(_)) => {
                let mut attached = Attached::seize(&self.identity)?;
                let dirty = tracking.collect(&mut attached);
                attached.detach()?;
                dirty?
            }
            (Some(Backend::Sweep(tracking)), Access::Attached(attached)) => tracking.collect(attached.memory())?,
            (Some(Backend::Sweep(tracking)), Access::Detached(memory)) => tracking.collect(memory)?,
        };
        dirty.collect_us = started.elapsed().as_micros() as u64;
        Ok(dirty)
    }

    fn check_target(&self, pid: i32) -> Result<(), DirtyError> {
        if pid != self.pid {
            return Err(DirtyError::WrongTarget {
                tracker_pid: self.pid,
                pid,
            });
        }
        Ok(())
    }

    /// Undo what the method set up in the target (unregister and close
    /// the userfaultfd; nothing for the others).
    pub fn stop(mut self) -> Result<(), DirtyError> {
        self.stop_backend()
    }

    fn stop_backend(&mut self) -> Result<(), DirtyError> {
        match self.backend.take() {
            Some(Backend::Uffd(tracking)) => tracking.stop(),
            Some(Backend::SoftDirty(_)) | Some(Backend::Sweep(_)) | None => Ok(()),
        }
    }
}

impl Drop for DirtyTracker {
    fn drop(&mut self) {
        if let Err(error) = self.stop_backend() {
            tracing::warn!(pid = self.pid, %error, "stopping dirty tracking on drop");
        }
    }
}

fn start_backend(method: DirtyMethod, attached: &mut Attached, ranges: &[TrackedRange]) -> Result<Backend, DirtyError> {
    Ok(match method {
        DirtyMethod::UffdWpAsync => Backend::Uffd(uffd::UffdTracking::start(attached, ranges)?),
        DirtyMethod::SoftDirty => Backend::SoftDirty(soft_dirty::SoftDirtyTracking::start(attached, ranges)?),
        DirtyMethod::FullSweep => Backend::Sweep(sweep::SweepTracking::start(attached.memory(), ranges)?),
    })
}

/// Sort, refuse unaligned, empty and overlapping ranges, merge adjacent
/// ones (so a run of dirty pages never crosses from one range to another).
fn normalize(pid: i32, ranges: &[TrackedRange]) -> Result<Vec<TrackedRange>, DirtyError> {
    let page = PAGE_SIZE as u64;
    let bad = |range: &TrackedRange, problem| DirtyError::BadRange {
        pid,
        start: range.start,
        end: range.end,
        problem,
    };
    if ranges.is_empty() {
        return Err(DirtyError::BadRange {
            pid,
            start: 0,
            end: 0,
            problem: "no range to track",
        });
    }
    let mut sorted = ranges.to_vec();
    sorted.sort();
    let mut merged: Vec<TrackedRange> = Vec::new();
    for range in sorted {
        if range.start % page != 0 || range.end % page != 0 {
            return Err(bad(&range, "not page-aligned"));
        }
        if range.is_empty() {
            return Err(bad(&range, "empty"));
        }
        match merged.last_mut() {
            Some(last) if range.start < last.end => return Err(bad(&range, "overlaps another tracked range")),
            Some(last) if range.start == last.end => last.end = range.end,
            _ => merged.push(range),
        }
    }
    Ok(merged)
}

/// Every byte of every range must be in a writable mapping: tracking
/// read-only memory is the immutable mirror's job, and registering a
/// userfaultfd over a hole fails half-way.
fn check_writable(pid: i32, ranges: &[TrackedRange]) -> Result<(), DirtyError> {
    let maps = shadowpatch_process::maps::read_maps(pid)?;
    for range in ranges {
        let mut address = range.start;
        while address < range.end {
            match maps.iter().find(|m| m.start <= address && address < m.end) {
                Some(mapping) if mapping.writable => address = mapping.end,
                Some(_) => {
                    return Err(DirtyError::BadRange {
                        pid,
                        start: range.start,
                        end: range.end,
                        problem: "not writable (only mutable memory is tracked)",
                    })
                }
                None => {
                    return Err(DirtyError::BadRange {
                        pid,
                        start: range.start,
                        end: range.end,
                        problem: "not entirely mapped",
                    })
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_sorted_merged_and_checked() {
        let r = |start, end| TrackedRange { start, end };
        assert_eq!(
            normalize(1, &[r(0x3000, 0x4000), r(0x1000, 0x3000), r(0x8000, 0x9000)]).unwrap(),
            vec![r(0x1000, 0x4000), r(0x8000, 0x9000)]
        );
        let err = normalize(1, &[r(0x1000, 0x3000), r(0x2000, 0x4000)]).unwrap_err();
        assert!(err.to_string().contains("overlaps"), "{err}");
        let err = normalize(7, &[r(0x1000, 0x1800)]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tracked range 0x1000..0x1800 of pid 7: not page-aligned"
        );
        assert!(err.is_bad_input());
        assert!(normalize(1, &[]).is_err());
        assert_eq!(TrackedRange::covering(0x1ff8, 16), r(0x1000, 0x3000));
    }

    #[test]
    fn dirty_pages_coalesce_into_runs() {
        let dirty = DirtyPages {
            pages: vec![0x1000, 0x2000, 0x3000, 0x5000, 0x9000, 0xa000],
            ..Default::default()
        };
        assert_eq!(dirty.runs(), vec![(0x1000, 0x3000), (0x5000, 0x1000), (0x9000, 0x2000)]);
    }

    #[test]
    fn method_names_round_trip_through_text_and_json() {
        for method in DirtyMethod::PREFERENCE {
            assert_eq!(method.name().parse::<DirtyMethod>().unwrap(), method);
            assert_eq!(
                serde_json::to_string(&method).unwrap(),
                format!("\"{}\"", method.name())
            );
        }
        assert!("dirty_bits".parse::<DirtyMethod>().is_err());
    }

    #[test]
    fn detection_always_offers_the_sweep_and_explains_every_refusal() {
        let detection = detect();
        assert!(detection
            .methods
            .iter()
            .any(|s| s.method == DirtyMethod::FullSweep && s.available));
        for status in &detection.methods {
            assert_eq!(status.available, status.reason.is_none(), "{status:?}");
        }
        assert!(detection.better_unavailable().all(|s| !s.available));
    }
}
