//! /proc/PID/pagemap: per-page entries (soft-dirty bit 55) and the
//! `PAGEMAP_SCAN` ioctl (Linux 6.7), which nix and the installed headers lack.
//!
//! `PAGEMAP_SCAN` is `_IOWR('f', 16, struct pm_scan_arg)` in
//! `include/uapi/linux/fs.h` since Linux 6.7 (commit 52526ca7fdb9,
//! "fs/proc/task_mmu: implement IOCTL to get and optionally clear info about
//! PTEs"); the structures and category bits below are copied from there and
//! checked against `linux-raw-sys` in a unit test. The ioctl works on the
//! process whose pagemap file it is called on, so a tracer can scan (and
//! re-protect) its target's pages without running anything inside it.

use nix::errno::Errno;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// Page has asynchronous write protection allowed (registered WP_ASYNC).
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// Page was written since write protection was last set.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
pub const PAGE_IS_FILE: u64 = 1 << 2;
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
pub const PAGE_IS_HUGE: u64 = 1 << 6;
/// Soft-dirty bit set (kernels with CONFIG_MEM_SOFT_DIRTY).
pub const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;

/// Write-protect the pages that match, atomically with reporting them.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail with EPERM if a scanned mapping is not registered for async
/// write-protection (instead of silently skipping it).
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// Bit 55 of a pagemap entry: the page is soft-dirty.
pub const PAGEMAP_ENTRY_SOFT_DIRTY: u64 = 1 << 55;

/// `struct page_region`: a run of pages sharing the returned categories.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

mod raw {
    use super::PmScanArg;
    nix::ioctl_readwrite!(pagemap_scan, b'f', 16, PmScanArg);
}

/// One `PAGEMAP_SCAN` request (see Documentation/admin-guide/mm/pagemap.rst).
#[derive(Debug, Clone, Copy, Default)]
pub struct ScanRequest {
    pub start: u64,
    pub end: u64,
    /// `PM_SCAN_*` flags.
    pub flags: u64,
    /// Stop after this many matching pages (0: no limit).
    pub max_pages: u64,
    pub category_inverted: u64,
    /// Categories a page must all have (after inversion).
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    /// Categories reported in each region.
    pub return_mask: u64,
}

/// What one scan did: `regions` entries filled, and where the walk ended
/// (`== request.end` unless the output was full or `max_pages` reached).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanOutcome {
    pub regions: usize,
    pub walk_end: u64,
}

/// An open /proc/PID/pagemap. Opening it needs the same rights as reading
/// the process's memory (PTRACE_MODE_READ); the handle stays bound to the
/// process (its mm) it was opened for.
#[derive(Debug)]
pub struct Pagemap {
    file: File,
}

impl Pagemap {
    /// Open /proc/`pid`/pagemap (`pid` 0: our own process).
    pub fn open(pid: i32) -> std::io::Result<Self> {
        let path = if pid == 0 {
            "/proc/self/pagemap".to_string()
        } else {
            format!("/proc/{pid}/pagemap")
        };
        Ok(Pagemap {
            file: File::open(path)?,
        })
    }

    /// Read the 64-bit entries of `entries.len()` pages from `first_page`
    /// (an address divided by the page size).
    pub fn read_entries(&self, first_page: u64, entries: &mut [u64]) -> std::io::Result<()> {
        let mut bytes = vec![0u8; entries.len() * 8];
        self.file.read_exact_at(&mut bytes, first_page * 8)?;
        for (entry, chunk) in entries.iter_mut().zip(bytes.chunks_exact(8)) {
            *entry = u64::from_ne_bytes(chunk.try_into().expect("chunks of 8 bytes"));
        }
        Ok(())
    }

    /// Run `PAGEMAP_SCAN` over `request.start..request.end`, filling
    /// `regions` from the front. `ENOTTY`: the kernel predates the ioctl.
    pub fn scan(&self, request: &ScanRequest, regions: &mut [PageRegion]) -> Result<ScanOutcome, Errno> {
        let mut arg = PmScanArg {
            size: std::mem::size_of::<PmScanArg>() as u64,
            flags: request.flags,
            start: request.start,
            end: request.end,
            walk_end: 0,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            max_pages: request.max_pages,
            category_inverted: request.category_inverted,
            category_mask: request.category_mask,
            category_anyof_mask: request.category_anyof_mask,
            return_mask: request.return_mask,
        };
        // SAFETY: the fd is a /proc/PID/pagemap file (opened by `open`), for
        // which 'f'/16 is PAGEMAP_SCAN. `arg` is a valid pm_scan_arg for the
        // call; `arg.vec` points at `regions`, writable for `vec_len`
        // entries, and the kernel writes at most `vec_len` page_regions.
        let filled = unsafe { raw::pagemap_scan(self.file.as_raw_fd(), &mut arg) }?;
        Ok(ScanOutcome {
            regions: (filled as usize).min(regions.len()),
            walk_end: arg.walk_end,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_raw_sys::general as k;

    #[test]
    fn constants_and_layouts_match_the_kernel_headers() {
        assert_eq!(PAGE_IS_WPALLOWED, k::PAGE_IS_WPALLOWED as u64);
        assert_eq!(PAGE_IS_WRITTEN, k::PAGE_IS_WRITTEN as u64);
        assert_eq!(PAGE_IS_FILE, k::PAGE_IS_FILE as u64);
        assert_eq!(PAGE_IS_PRESENT, k::PAGE_IS_PRESENT as u64);
        assert_eq!(PAGE_IS_SWAPPED, k::PAGE_IS_SWAPPED as u64);
        assert_eq!(PAGE_IS_PFNZERO, k::PAGE_IS_PFNZERO as u64);
        assert_eq!(PAGE_IS_HUGE, k::PAGE_IS_HUGE as u64);
        assert_eq!(PAGE_IS_SOFT_DIRTY, k::PAGE_IS_SOFT_DIRTY as u64);
        assert_eq!(PM_SCAN_WP_MATCHING, k::PM_SCAN_WP_MATCHING as u64);
        assert_eq!(PM_SCAN_CHECK_WPASYNC, k::PM_SCAN_CHECK_WPASYNC as u64);
        assert_eq!(std::mem::size_of::<PmScanArg>(), std::mem::size_of::<k::pm_scan_arg>());
        assert_eq!(std::mem::size_of::<PageRegion>(), std::mem::size_of::<k::page_region>());
        // _IOWR('f', 16, struct pm_scan_arg) with a 96-byte argument.
        assert_eq!(
            nix::request_code_readwrite!(b'f', 16, std::mem::size_of::<PmScanArg>()) as u32,
            0xC060_6610
        );
    }

    #[test]
    fn reads_our_own_pagemap() {
        let pagemap = Pagemap::open(0).unwrap();
        let local = 0u64;
        let page = std::hint::black_box(&local) as *const u64 as u64 / 4096;
        let mut entry = [0u64; 1];
        pagemap.read_entries(page, &mut entry).unwrap();
        // Bit 63: present (our stack page is in use right now).
        assert_ne!(entry[0] & (1 << 63), 0, "{:#x}", entry[0]);
    }
}
