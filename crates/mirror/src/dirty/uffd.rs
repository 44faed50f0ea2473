//! Dirty tracking with userfaultfd write protection in asynchronous mode
//! and `PAGEMAP_SCAN`.
//!
//! Setup, in one stop of the target: `userfaultfd()` runs *inside* the
//! target (a userfaultfd acts on the address space of the process that
//! created it), we duplicate it into our process with `pidfd_getfd`, and
//! close the target's copy before resuming, so the target's fd table is
//! exactly what it was. Then, from our side only and with the target
//! running: `UFFDIO_API` (WP_ASYNC: write faults on protected pages are
//! resolved by the kernel, nobody waits for events; WP_UNPOPULATED: pages
//! never touched are protected too, and `PAGEMAP_SCAN` requires it on
//! anonymous memory), `UFFDIO_REGISTER` in write-protect mode and
//! `UFFDIO_WRITEPROTECT` to arm. Each collect is one `PAGEMAP_SCAN` per
//! range on the target's /proc/PID/pagemap: the kernel reports the written
//! pages and re-protects each under its page-table lock, so a write is
//! either reported now or leaves the page written for the next scan.
//!
//! Crash safety, by construction: once the target's copy is closed, our
//! descriptor holds the only reference to the userfaultfd file (its
//! mappings reference the context, not the file). When that reference goes
//! (we close it, or the kernel closes it because shadowpatch died, even by
//! SIGKILL), `userfaultfd_release()` walks the target's mappings, clears
//! their registration and resets the write-protect bits of their page-table
//! entries. With WP_ASYNC no target thread ever blocks on the fd, so there
//! is nothing to wake either. The `dying_tracer_leaves_no_registration`
//! test kills a tracking process and checks the target's smaps.
//!
//! The one window that is not crash-safe is the stop itself: dying between
//! the remote `userfaultfd()` and the remote `close()` leaves one unused,
//! unregistered descriptor in the target (and a borrowed thread, as any
//! remote syscall would).

use super::{DirtyError, DirtyPages, TrackedRange};
use crate::hash::PAGE_SIZE;
use nix::errno::Errno;
use shadowpatch_process::{Attached, TargetError};
use shadowpatch_sys::pagemap::{
    PageRegion, Pagemap, ScanRequest, PAGE_IS_WRITTEN, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING,
};
use shadowpatch_sys::scratch::ScratchMapping;
use shadowpatch_sys::uffd::{
    Userfaultfd, UFFDIO_WRITEPROTECT_BIT, UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED, UFFD_USER_MODE_ONLY,
};

/// The features we need, both.
const FEATURES: u64 = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
/// `userfaultfd()` flags. User-mode-only: the kernel accesses (a `read()`
/// into a tracked buffer) are not ours to handle, and with it the call is
/// allowed without privilege under `vm.unprivileged_userfaultfd = 0`.
const FLAGS: i32 = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
/// Regions returned per `PAGEMAP_SCAN` call; a scan that fills them
/// continues from where the kernel stopped.
const REGIONS_PER_SCAN: usize = 1024;

/// Whether this kernel does the whole cycle: on a scratch mapping of our
/// own, write one page never touched and one populated page, and expect
/// exactly those two back from `PAGEMAP_SCAN`, then nothing.
pub(super) fn probe() -> Result<(), String> {
    let mut scratch = ScratchMapping::new(4).map_err(|e| format!("mapping a probe page: {e}"))?;
    let (start, len) = (scratch.address(), scratch.len() as u64);
    scratch.write(0, 1);
    let uffd = Userfaultfd::new_local(FLAGS).map_err(|e| format!("userfaultfd(): {e}"))?;
    let api = uffd
        .api(FEATURES)
        .map_err(|e| format!("UFFDIO_API with WP_ASYNC | WP_UNPOPULATED: {e} (needs Linux 6.7)"))?;
    if api.features & FEATURES != FEATURES {
        return Err(format!(
            "the kernel enabled features {:#x}, not WP_ASYNC | WP_UNPOPULATED",
            api.features
        ));
    }
    let ioctls = uffd
        .register_write_protect(start, len)
        .map_err(|e| format!("UFFDIO_REGISTER in write-protect mode: {e}"))?;
    if ioctls & UFFDIO_WRITEPROTECT_BIT == 0 {
        return Err("UFFDIO_WRITEPROTECT is not offered on anonymous memory".into());
    }
    uffd.write_protect(start, len, true)
        .map_err(|e| format!("UFFDIO_WRITEPROTECT: {e}"))?;
    let pagemap = Pagemap::open(0).map_err(|e| format!("opening /proc/self/pagemap: {e}"))?;
    let mut regions = vec![PageRegion::default(); 4];
    let mut scan = || -> Result<Vec<u64>, String> {
        let mut pages = Vec::new();
        scan_range(&pagemap, start, start + len, &mut regions, &mut pages).map_err(|e| match e {
            Errno::ENOTTY | Errno::EINVAL => format!("PAGEMAP_SCAN: {e} (needs Linux 6.7)"),
            e => format!("PAGEMAP_SCAN: {e}"),
        })?;
        Ok(pages)
    };
    scan()?;
    scratch.write(2 * PAGE_SIZE, 1);
    scratch.write(0, 2);
    let written = scan()?;
    let expected = vec![start, start + 2 * PAGE_SIZE as u64];
    if written != expected {
        return Err(format!(
            "PAGEMAP_SCAN reported pages {written:x?} after writes to {expected:x?}: not exact"
        ));
    }
    if !scan()?.is_empty() {
        return Err("PAGEMAP_SCAN did not re-protect the pages it reported".into());
    }
    Ok(())
}

/// Scan `start..end` for written pages, re-protecting them; append them.
fn scan_range(
    pagemap: &Pagemap,
    start: u64,
    end: u64,
    regions: &mut [PageRegion],
    pages: &mut Vec<u64>,
) -> Result<(), Errno> {
    let mut from = start;
    while from < end {
        let request = ScanRequest {
            start: from,
            end,
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            category_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
            ..Default::default()
        };
        let outcome = pagemap.scan(&request, regions)?;
        for region in &regions[..outcome.regions] {
            pages.extend((region.start..region.end).step_by(PAGE_SIZE));
        }
        // The walk stops early only when the output is full, so it always
        // advances; refuse to spin if a kernel ever answered otherwise.
        if outcome.walk_end <= from {
            return Err(Errno::EAGAIN);
        }
        from = outcome.walk_end;
    }
    Ok(())
}

/// A running registration over the tracked ranges of one target.
#[derive(Debug)]
pub(super) struct UffdTracking {
    pid: i32,
    /// Our descriptor: the only reference to the target's userfaultfd.
    uffd: Userfaultfd,
    pagemap: Pagemap,
    ranges: Vec<TrackedRange>,
    regions: Vec<PageRegion>,
}

impl UffdTracking {
    pub(super) fn start(attached: &mut Attached, ranges: &[TrackedRange]) -> Result<Self, DirtyError> {
        let pid = attached.pid();
        let unavailable = |reason: String| DirtyError::MethodUnavailable {
            pid,
            method: super::DirtyMethod::UffdWpAsync,
            reason,
        };
        let uffd = take_userfaultfd_of(attached)?;
        let uffd =
            Userfaultfd::from_fd(uffd).map_err(|_| unavailable("the descriptor taken is not a userfaultfd".into()))?;
        let api = uffd
            .api(FEATURES)
            .map_err(|e| unavailable(format!("UFFDIO_API with WP_ASYNC | WP_UNPOPULATED: {e}")))?;
        if api.features & FEATURES != FEATURES {
            return Err(unavailable(format!(
                "the kernel enabled features {:#x} only",
                api.features
            )));
        }
        let pagemap = Pagemap::open(pid).map_err(|e| DirtyError::Proc {
            pid,
            action: "opening",
            file: "pagemap",
            message: e.to_string(),
        })?;
        let mut tracking = UffdTracking {
            pid,
            uffd,
            pagemap,
            ranges: Vec::new(),
            regions: vec![PageRegion::default(); REGIONS_PER_SCAN],
        };
        // On any error below, dropping `tracking` unregisters what was
        // registered (and closing the fd would release it anyway).
        for range in ranges {
            match tracking.uffd.register_write_protect(range.start, range.len()) {
                Ok(ioctls) if ioctls & UFFDIO_WRITEPROTECT_BIT != 0 => tracking.ranges.push(*range),
                Ok(_) => {
                    tracking.ranges.push(*range);
                    return Err(unavailable(format!(
                        "range {:#x}..{:#x} cannot be write-protected (UFFDIO_WRITEPROTECT not offered)",
                        range.start, range.end
                    )));
                }
                Err(Errno::EBUSY) => {
                    return Err(unavailable(format!(
                        "range {:#x}..{:#x} is already registered with the target's own userfaultfd (EBUSY)",
                        range.start, range.end
                    )))
                }
                Err(Errno::EINVAL) => {
                    return Err(unavailable(format!(
                        "range {:#x}..{:#x} cannot be registered (EINVAL: a mapping type userfaultfd refuses)",
                        range.start, range.end
                    )))
                }
                Err(errno) => return Err(tracking.error("registering (UFFDIO_REGISTER) in", range, errno)),
            }
        }
        for range in ranges {
            tracking
                .uffd
                .write_protect(range.start, range.len(), true)
                .map_err(|errno| tracking.error("write-protecting (UFFDIO_WRITEPROTECT) in", range, errno))?;
        }
        Ok(tracking)
    }

    fn error(&self, action: &'static str, range: &TrackedRange, errno: Errno) -> DirtyError {
        match errno {
            Errno::ESRCH => TargetError::Exited {
                pid: self.pid,
                during: "tracking dirty pages",
            }
            .into(),
            errno => DirtyError::Kernel {
                pid: self.pid,
                action,
                start: range.start,
                end: range.end,
                errno,
            },
        }
    }

    pub(super) fn collect(&mut self) -> Result<DirtyPages, DirtyError> {
        let mut dirty = DirtyPages::default();
        for range in &self.ranges {
            scan_range(
                &self.pagemap,
                range.start,
                range.end,
                &mut self.regions,
                &mut dirty.pages,
            )
            .map_err(|errno| match errno {
                // CHECK_WPASYNC: part of the range is no longer
                // registered: the target unmapped or remapped it.
                Errno::EPERM => DirtyError::Kernel {
                    pid: self.pid,
                    action: "scanning (PAGEMAP_SCAN; was the range unmapped or remapped?)",
                    start: range.start,
                    end: range.end,
                    errno,
                },
                errno => self.error("scanning (PAGEMAP_SCAN)", range, errno),
            })?;
        }
        Ok(dirty)
    }

    /// Unregister every range, then close our descriptor (dropping `self`).
    pub(super) fn stop(mut self) -> Result<(), DirtyError> {
        self.unregister_all()
    }

    fn unregister_all(&mut self) -> Result<(), DirtyError> {
        let mut first_error = None;
        for range in std::mem::take(&mut self.ranges) {
            match self.uffd.unregister(range.start, range.len()) {
                // The target is gone: nothing left to undo.
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(errno) => {
                    first_error.get_or_insert(self.error("unregistering (UFFDIO_UNREGISTER) in", &range, errno));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for UffdTracking {
    fn drop(&mut self) {
        // Best effort; closing the descriptor right after releases the
        // registration in any case.
        let _ = self.unregister_all();
    }
}

/// Create a userfaultfd inside the target and take it, leaving the
/// target's descriptor table as it was, all in one stop.
fn take_userfaultfd_of(attached: &mut Attached) -> Result<std::os::fd::OwnedFd, DirtyError> {
    let pid = attached.pid();
    let mut stopped = attached.stop()?;
    let tid = stopped.borrowable_thread();
    let remote_fd = stopped.remote_userfaultfd(tid, FLAGS).map_err(|error| match error {
        // The call itself failed inside the target.
        TargetError::Sys { errno, .. } => DirtyError::MethodUnavailable {
            pid,
            method: super::DirtyMethod::UffdWpAsync,
            reason: format!("userfaultfd() inside the target failed: {errno} (a seccomp filter, or missing privilege)"),
        },
        other => other.into(),
    })?;
    let taken = stopped.take_fd(remote_fd);
    // Close the target's copy whatever happened to ours.
    let closed = stopped.remote_close(tid, remote_fd);
    stopped.resume()?;
    let taken = taken?;
    closed?;
    Ok(taken)
}
