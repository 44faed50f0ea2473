//! userfaultfd write-protection in asynchronous mode: the ioctls nix lacks
//! (`UFFDIO_API`, `UFFDIO_REGISTER`, `UFFDIO_WRITEPROTECT`,
//! `UFFDIO_UNREGISTER`) over an fd known to be a userfaultfd.
//!
//! Structures and constants follow `include/uapi/linux/userfaultfd.h`. The
//! installed headers (linux-libc-dev 6.1) have the structures and ioctl
//! numbers but not the two features we depend on, defined here from the
//! kernel ABI: `UFFD_FEATURE_WP_UNPOPULATED` (bit 13, Linux 6.4) and
//! `UFFD_FEATURE_WP_ASYNC` (bit 15, Linux 6.7). A unit test checks every
//! value against `linux-raw-sys` (bindings generated from newer headers).

use nix::errno::Errno;
use std::os::fd::{AsRawFd, OwnedFd};

/// `UFFD_API`: the only API version.
pub const UFFD_API: u64 = 0xAA;
/// `userfaultfd(2)` flag: handle faults from user mode only (lets an
/// unprivileged process create one under `vm.unprivileged_userfaultfd=0`).
pub const UFFD_USER_MODE_ONLY: i32 = 1;
/// Write-protect markers on not-yet-populated pages (anonymous memory),
/// so a first write to a page that was never touched is reported too.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Write faults on protected pages are resolved by the kernel itself (the
/// protection is dropped, the page counts as written): nobody has to read
/// fault events, the faulting thread never blocks.
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `UFFDIO_REGISTER_MODE_WP`.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_WRITEPROTECT_MODE_WP`: set (rather than clear) protection.
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// Bit of `_UFFDIO_WRITEPROTECT` in the `ioctls` answered by a registration.
pub const UFFDIO_WRITEPROTECT_BIT: u64 = 1 << 0x06;

const UFFDIO: u8 = 0xAA;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

mod raw {
    use super::*;
    nix::ioctl_readwrite!(uffdio_api, UFFDIO, 0x3F, UffdioApi);
    nix::ioctl_readwrite!(uffdio_register, UFFDIO, 0x00, UffdioRegister);
    nix::ioctl_read!(uffdio_unregister, UFFDIO, 0x01, UffdioRange);
    nix::ioctl_readwrite!(uffdio_writeprotect, UFFDIO, 0x06, UffdioWriteprotect);
}

/// What `UFFDIO_API` answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UffdApi {
    /// Features the kernel enabled (those requested that it supports).
    pub features: u64,
    /// Bit mask of the ioctls available on the fd.
    pub ioctls: u64,
}

/// A userfaultfd. The ioctls are only ever issued on an fd checked to be a
/// userfaultfd, so no other driver interprets their numbers.
///
/// Dropping it closes the fd; when it was the last reference to the file,
/// the kernel (`userfaultfd_release`) unregisters every range registered
/// through it and clears their write protection.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

impl Userfaultfd {
    /// Create one in the calling process (`userfaultfd(2)`); used by probes.
    /// `flags`: `O_CLOEXEC`, `O_NONBLOCK`, [`UFFD_USER_MODE_ONLY`].
    pub fn new_local(flags: i32) -> Result<Self, Errno> {
        // SAFETY: userfaultfd takes one integer flag argument and returns a
        // new file descriptor (or -1 with errno); no memory is passed.
        let fd = Errno::result(unsafe { libc::syscall(libc::SYS_userfaultfd, flags) })?;
        // SAFETY: the kernel just returned this descriptor to us; nothing
        // else owns it.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
        Ok(Userfaultfd { fd })
    }

    /// Adopt `fd` (for instance one taken from another process with
    /// `pidfd_getfd`), refusing it with `EBADF` unless it is a userfaultfd.
    pub fn from_fd(fd: OwnedFd) -> Result<Self, Errno> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(|_| Errno::EBADF)?;
        if link.as_os_str() != "anon_inode:[userfaultfd]" {
            return Err(Errno::EBADF);
        }
        Ok(Userfaultfd { fd })
    }

    pub fn as_raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// `UFFDIO_API`: handshake, enabling `features`. The kernel refuses
    /// (EINVAL) features it does not know; callers check the answer.
    pub fn api(&self, features: u64) -> Result<UffdApi, Errno> {
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: `self.fd` is a userfaultfd (checked at construction) and
        // `api` is a valid, writable uffdio_api for the whole call.
        unsafe { raw::uffdio_api(self.fd.as_raw_fd(), &mut api) }?;
        Ok(UffdApi {
            features: api.features,
            ioctls: api.ioctls,
        })
    }

    /// `UFFDIO_REGISTER` in write-protect mode over `start..start+len` of the
    /// userfaultfd's process; returns the ioctls available on the range.
    /// `EBUSY`: part of the range is registered with another userfaultfd.
    pub fn register_write_protect(&self, start: u64, len: u64) -> Result<u64, Errno> {
        let mut register = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: `self.fd` is a userfaultfd and `register` is a valid,
        // writable uffdio_register for the whole call. The kernel changes
        // only the flags of the process's own mappings, never our memory.
        unsafe { raw::uffdio_register(self.fd.as_raw_fd(), &mut register) }?;
        Ok(register.ioctls)
    }

    /// `UFFDIO_WRITEPROTECT`: set (`protect`) or clear write protection.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool) -> Result<(), Errno> {
        let mut request = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if protect { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
        };
        // SAFETY: `self.fd` is a userfaultfd and `request` is a valid,
        // writable uffdio_writeprotect for the whole call.
        unsafe { raw::uffdio_writeprotect(self.fd.as_raw_fd(), &mut request) }.map(drop)
    }

    /// `UFFDIO_UNREGISTER`: drop the registration (and its protection).
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut range = UffdioRange { start, len };
        // SAFETY: `self.fd` is a userfaultfd and `range` is a valid
        // uffdio_range for the whole call (the kernel only reads it).
        unsafe { raw::uffdio_unregister(self.fd.as_raw_fd(), &mut range) }.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use linux_raw_sys::general as k;

    #[test]
    fn constants_and_layouts_match_the_kernel_headers() {
        assert_eq!(UFFD_API, k::UFFD_API as u64);
        assert_eq!(UFFD_USER_MODE_ONLY, k::UFFD_USER_MODE_ONLY as i32);
        assert_eq!(UFFD_FEATURE_WP_UNPOPULATED, k::UFFD_FEATURE_WP_UNPOPULATED as u64);
        assert_eq!(UFFD_FEATURE_WP_ASYNC, k::UFFD_FEATURE_WP_ASYNC as u64);
        assert_eq!(UFFDIO_REGISTER_MODE_WP, k::UFFDIO_REGISTER_MODE_WP as u64);
        assert_eq!(std::mem::size_of::<UffdioApi>(), std::mem::size_of::<k::uffdio_api>());
        assert_eq!(
            std::mem::size_of::<UffdioRegister>(),
            std::mem::size_of::<k::uffdio_register>()
        );
        assert_eq!(
            std::mem::size_of::<UffdioWriteprotect>(),
            std::mem::size_of::<k::uffdio_writeprotect>()
        );
        let ioctl = |code: nix::sys::ioctl::ioctl_num_type| code as u32;
        use linux_raw_sys::ioctl as io;
        assert_eq!(
            ioctl(nix::request_code_readwrite!(
                UFFDIO,
                0x3F,
                std::mem::size_of::<UffdioApi>()
            )),
            io::UFFDIO_API
        );
        assert_eq!(
            ioctl(nix::request_code_readwrite!(
                UFFDIO,
                0x00,
                std::mem::size_of::<UffdioRegister>()
            )),
            io::UFFDIO_REGISTER
        );
        assert_eq!(
            ioctl(nix::request_code_read!(
                UFFDIO,
                0x01,
                std::mem::size_of::<UffdioRange>()
            )),
            io::UFFDIO_UNREGISTER
        );
        assert_eq!(
            ioctl(nix::request_code_readwrite!(
                UFFDIO,
                0x06,
                std::mem::size_of::<UffdioWriteprotect>()
            )),
            io::UFFDIO_WRITEPROTECT
        );
    }

    #[test]
    fn async_write_protection_reports_exactly_the_written_pages() {
        use crate::pagemap::*;
        use crate::scratch::{ScratchMapping, PAGE_SIZE};
        let mut scratch = ScratchMapping::new(8).unwrap();
        let (start, len) = (scratch.address(), scratch.len() as u64);
        scratch.write(0, 1); // one populated page, seven never touched
        let uffd = Userfaultfd::new_local(libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY).unwrap();
        let wanted = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
        assert_eq!(uffd.api(wanted).unwrap().features & wanted, wanted);
        let ioctls = uffd.register_write_protect(start, len).unwrap();
        assert_ne!(ioctls & UFFDIO_WRITEPROTECT_BIT, 0);
        uffd.write_protect(start, len, true).unwrap();
        let pagemap = Pagemap::open(0).unwrap();
        let request = ScanRequest {
            start,
            end: start + len,
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            category_mask: PAGE_IS_WRITTEN,
            return_mask: PAGE_IS_WRITTEN,
            ..Default::default()
        };
        let mut regions = [PageRegion::default(); 8];
        let scan = |regions: &mut [PageRegion]| {
            let outcome = pagemap.scan(&request, regions).unwrap();
            assert_eq!(outcome.walk_end, start + len);
            regions[..outcome.regions].to_vec()
        };
        assert_eq!(scan(&mut regions), vec![]);
        scratch.write(3 * PAGE_SIZE + 5, 7); // never populated before
        scratch.write(0, 2);
        let written = scan(&mut regions);
        let page = |n: u64| start + n * PAGE_SIZE as u64;
        assert_eq!(
            written,
            vec![
                PageRegion {
                    start: page(0),
                    end: page(1),
                    categories: PAGE_IS_WRITTEN
                },
                PageRegion {
                    start: page(3),
                    end: page(4),
                    categories: PAGE_IS_WRITTEN
                },
            ]
        );
        // The scan re-protected them: nothing until the next write.
        assert_eq!(scan(&mut regions), vec![]);
        uffd.unregister(start, len).unwrap();
        assert_eq!(scratch.read(3 * PAGE_SIZE + 5), 7);
        assert_eq!(pagemap.scan(&request, &mut regions).unwrap_err(), Errno::EPERM);
    }

    #[test]
    fn a_plain_file_is_refused_as_a_userfaultfd() {
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert_eq!(Userfaultfd::from_fd(file.into()).unwrap_err(), Errno::EBADF);
    }
}
