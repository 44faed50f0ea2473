//! A private anonymous mapping of our own, for behavioural probes of kernel
//! features (does a write set the soft-dirty bit? is it reported by
//! `PAGEMAP_SCAN`?) that must touch memory nobody else uses.

use nix::errno::Errno;
use nix::sys::mman::{mmap_anonymous, munmap, MapFlags, ProtFlags};
use std::num::NonZeroUsize;
use std::ptr::NonNull;

pub const PAGE_SIZE: usize = 4096;

/// `pages` pages of fresh, unpopulated, read-write anonymous memory,
/// unmapped on drop.
#[derive(Debug)]
pub struct ScratchMapping {
    base: NonNull<libc::c_void>,
    len: usize,
}

impl ScratchMapping {
    pub fn new(pages: usize) -> Result<Self, Errno> {
        let len = NonZeroUsize::new(pages * PAGE_SIZE).ok_or(Errno::EINVAL)?;
        // SAFETY: a new private anonymous mapping at an address of the
        // kernel's choosing cannot alias any existing Rust object.
        let base = unsafe {
            mmap_anonymous(
                None,
                len,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_PRIVATE,
            )
        }?;
        Ok(ScratchMapping { base, len: len.get() })
    }

    pub fn address(&self) -> u64 {
        self.base.as_ptr() as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Write one byte at `offset` (a real store the compiler cannot elide).
    pub fn write(&mut self, offset: usize, value: u8) {
        assert!(
            offset < self.len,
            "offset {offset} outside a {}-byte scratch mapping",
            self.len
        );
        // SAFETY: `offset` is inside the mapping (checked above), which is
        // read-write and owned by `self` alone; `&mut self` excludes races.
        unsafe { std::ptr::write_volatile(self.base.as_ptr().cast::<u8>().add(offset), value) }
    }

    /// Read one byte at `offset`.
    pub fn read(&self, offset: usize) -> u8 {
        assert!(
            offset < self.len,
            "offset {offset} outside a {}-byte scratch mapping",
            self.len
        );
        // SAFETY: `offset` is inside the readable mapping owned by `self`.
        unsafe { std::ptr::read_volatile(self.base.as_ptr().cast::<u8>().add(offset)) }
    }
}

impl Drop for ScratchMapping {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `new` with this length and no
        // reference into it outlives `self`.
        let _ = unsafe { munmap(self.base, self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_read_back_and_bounds_are_checked() {
        let mut scratch = ScratchMapping::new(2).unwrap();
        assert_eq!(scratch.address() % PAGE_SIZE as u64, 0);
        assert_eq!(scratch.read(PAGE_SIZE + 7), 0);
        scratch.write(PAGE_SIZE + 7, 42);
        assert_eq!(scratch.read(PAGE_SIZE + 7), 42);
        let out_of_bounds = std::panic::catch_unwind(move || scratch.read(2 * PAGE_SIZE));
        assert!(out_of_bounds.is_err());
    }
}
