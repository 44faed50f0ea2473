//! Reading and writing a target's memory.
//!
//! Reads use `process_vm_readv` (the "DMA" of the design: no stop, no ptrace
//! attach needed), falling back to `pread` on /proc/PID/mem where the kernel
//! refuses it. Writes go through /proc/PID/mem, the one path that can write
//! read-only text (`process_vm_writev` fails with EFAULT on r-x pages).

use crate::{ProcessIdentity, TargetError};
use nix::errno::Errno;
use nix::sys::uio::{process_vm_readv, RemoteIoVec};
use nix::unistd::Pid;
use std::fs::File;
use std::io::IoSliceMut;
use std::os::unix::fs::FileExt;

/// How target memory is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryBackend {
    ProcessVmReadv,
    ProcMem,
}

impl MemoryBackend {
    pub fn name(self) -> &'static str {
        match self {
            MemoryBackend::ProcessVmReadv => "process_vm_readv",
            MemoryBackend::ProcMem => "/proc/PID/mem",
        }
    }
}

/// Open handle on a target's memory. /proc/PID/mem is opened once and kept:
/// opening it costs ~40 µs, and an open handle keeps pointing at the same
/// process even if the pid is later recycled.
#[derive(Debug)]
pub struct TargetMemory {
    pid: i32,
    mem: File,
    backend: MemoryBackend,
}

impl TargetMemory {
    /// Open the memory of `identity`, checking it is still the same process.
    pub fn open(identity: &ProcessIdentity) -> Result<Self, TargetError> {
        let pid = identity.pid;
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .map_err(|e| match e.raw_os_error().map(Errno::from_raw) {
                Some(Errno::ENOENT) => TargetError::NoSuchProcess { pid },
                Some(errno) => TargetError::from_errno(pid, "opening /proc/PID/mem of", errno),
                None => TargetError::Sys {
                    pid,
                    action: "opening /proc/PID/mem of",
                    errno: Errno::EIO,
                },
            })?;
        // The handle is bound to the process that owned the pid at open time;
        // check after opening that this is still the one we identified.
        identity.check_alive()?;
        Ok(TargetMemory {
            pid,
            mem,
            backend: MemoryBackend::ProcessVmReadv,
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn backend(&self) -> MemoryBackend {
        self.backend
    }

    /// Force a backend (benchmarks and tests compare them).
    pub fn set_backend(&mut self, backend: MemoryBackend) {
        self.backend = backend;
    }

    /// Read as much of `buf` as is readable from `address` on; returns the
    /// count (short at the first unreadable page). Errors only when nothing
    /// at all can be read.
    pub fn read_partial(&mut self, address: u64, buf: &mut [u8]) -> Result<usize, TargetError> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.backend == MemoryBackend::ProcessVmReadv {
            let remote = [RemoteIoVec {
                base: address as usize,
                len: buf.len(),
            }];
            match process_vm_readv(Pid::from_raw(self.pid), &mut [IoSliceMut::new(buf)], &remote) {
                Ok(n) => return Ok(n),
                // Kernels built without CONFIG_CROSS_MEMORY_ATTACH, or
                // seccomp filters, refuse the syscall: fall back for good.
                Err(Errno::ENOSYS) | Err(Errno::EPERM) => self.backend = MemoryBackend::ProcMem,
                Err(Errno::ESRCH) => {
                    return Err(TargetError::Exited {
                        pid: self.pid,
                        during: "reading memory",
                    })
                }
                Err(errno) => {
                    return Err(TargetError::Read {
                        pid: self.pid,
                        address,
                        len: buf.len(),
                        errno,
                    })
                }
            }
        }
        let mut done = 0;
        while done < buf.len() {
            match self.mem.read_at(&mut buf[done..], address + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if done > 0 => {
                    let _ = e;
                    break;
                }
                Err(e) => {
                    let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc_eio()));
                    return Err(TargetError::Read {
                        pid: self.pid,
                        address,
                        len: buf.len(),
                        errno,
                    });
                }
            }
        }
        Ok(done)
    }

    /// Read exactly `buf.len()` bytes or fail naming the first unreadable address.
    pub fn read_exact(&mut self, address: u64, buf: &mut [u8]) -> Result<(), TargetError> {
        let mut done = 0;
        while done < buf.len() {
            let n = self.read_partial(address + done as u64, &mut buf[done..])?;
            if n == 0 {
                return Err(TargetError::Read {
                    pid: self.pid,
                    address: address + done as u64,
                    len: buf.len() - done,
                    errno: Errno::EFAULT,
                });
            }
            done += n;
        }
        Ok(())
    }

    /// Read several small ranges at once (one `process_vm_readv` with one
    /// remote iovec per range, up to 1024 per call): reading 100 function
    /// entries costs one syscall instead of 100 inside a stop window.
    pub fn read_many(&mut self, ranges: &[(u64, usize)]) -> Result<Vec<Vec<u8>>, TargetError> {
        let mut out: Vec<Vec<u8>> = ranges.iter().map(|(_, len)| vec![0u8; *len]).collect();
        let mut parts: Vec<(u64, &mut [u8])> = ranges
            .iter()
            .zip(out.iter_mut())
            .map(|((address, _), buffer)| (*address, buffer.as_mut_slice()))
            .collect();
        self.read_many_into(&mut parts)?;
        Ok(out)
    }

    /// Read each `(address, buffer)` part in full, straight into the
    /// caller's buffers, batching up to 1024 parts per `process_vm_readv`
    /// (the dirty pages of a data mirror land in place, no copy). A part
    /// that cannot be read is named in the error.
    pub fn read_many_into(&mut self, parts: &mut [(u64, &mut [u8])]) -> Result<(), TargetError> {
        let mut done = 0;
        if self.backend == MemoryBackend::ProcessVmReadv {
            while done < parts.len() {
                let batch = (parts.len() - done).min(1024);
                let remote: Vec<RemoteIoVec> = parts[done..done + batch]
                    .iter()
                    .map(|(address, buffer)| RemoteIoVec {
                        base: *address as usize,
                        len: buffer.len(),
                    })
                    .collect();
                let expected: usize = remote.iter().map(|r| r.len).sum();
                let mut local: Vec<IoSliceMut> = parts[done..done + batch]
                    .iter_mut()
                    .map(|(_, buffer)| IoSliceMut::new(buffer))
                    .collect();
                match process_vm_readv(Pid::from_raw(self.pid), &mut local, &remote) {
                    Ok(n) if n == expected => done += batch,
                    // A short read: some part is unreadable; let the
                    // one-by-one path below name it.
                    Ok(_) => break,
                    Err(Errno::ENOSYS) | Err(Errno::EPERM) => {
                        self.backend = MemoryBackend::ProcMem;
                        break;
                    }
                    Err(Errno::ESRCH) => {
                        return Err(TargetError::Exited {
                            pid: self.pid,
                            during: "reading memory",
                        })
                    }
                    Err(_) => break,
                }
            }
        }
        for (address, buffer) in &mut parts[done..] {
            self.read_exact(*address, buffer)?;
        }
        Ok(())
    }

    /// Read `len` bytes into a new vector.
    pub fn read_vec(&mut self, address: u64, len: usize) -> Result<Vec<u8>, TargetError> {
        let mut buf = vec![0; len];
        self.read_exact(address, &mut buf)?;
        Ok(buf)
    }

    /// Write `bytes` at `address` through /proc/PID/mem (works on read-only
    /// text, as the kernel uses FOLL_FORCE for it).
    pub fn write(&mut self, address: u64, bytes: &[u8]) -> Result<(), TargetError> {
        // The journal records announcing this write are durable first
        // (deferred inside a batch: `durable`).
        crate::durable::flush().map_err(|errno| TargetError::Sys {
            pid: self.pid,
            action: "syncing the state files (syncfs) before writing to",
            errno,
        })?;
        let mut done = 0;
        while done < bytes.len() {
            match self.mem.write_at(&bytes[done..], address + done as u64) {
                Ok(0) => {
                    return Err(TargetError::Write {
                        pid: self.pid,
                        address: address + done as u64,
                        len: bytes.len() - done,
                        errno: Errno::EFAULT,
                    })
                }
                Ok(n) => done += n,
                Err(e) => {
                    let errno = Errno::from_raw(e.raw_os_error().unwrap_or(libc_eio()));
                    return Err(TargetError::Write {
                        pid: self.pid,
                        address,
                        len: bytes.len(),
                        errno,
                    });
                }
            }
        }
        Ok(())
    }
}

fn libc_eio() -> i32 {
    Errno::EIO as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_backends_read_the_same_bytes_of_our_own_text() {
        let me = ProcessIdentity::of(std::process::id() as i32).unwrap();
        let mut memory = TargetMemory::open(&me).unwrap();
        let address = both_backends_read_the_same_bytes_of_our_own_text as *const () as u64;
        let via_vm = memory.read_vec(address, 64).unwrap();
        memory.set_backend(MemoryBackend::ProcMem);
        let via_mem = memory.read_vec(address, 64).unwrap();
        assert_eq!(via_vm, via_mem);
    }

    #[test]
    fn read_many_matches_single_reads_and_names_a_bad_range() {
        let me = ProcessIdentity::of(std::process::id() as i32).unwrap();
        let mut memory = TargetMemory::open(&me).unwrap();
        let a = read_many_matches_single_reads_and_names_a_bad_range as *const () as u64;
        let ranges = [(a, 5), (a + 100, 7), (a + 3, 1)];
        let many = memory.read_many(&ranges).unwrap();
        for ((address, len), bytes) in ranges.iter().zip(&many) {
            assert_eq!(&memory.read_vec(*address, *len).unwrap(), bytes);
        }
        let err = memory.read_many(&[(a, 5), (16, 4)]).unwrap_err();
        assert!(err.to_string().contains("at 0x10"), "{err}");
    }

    #[test]
    fn unmapped_address_is_an_error_naming_it() {
        let me = ProcessIdentity::of(std::process::id() as i32).unwrap();
        let mut memory = TargetMemory::open(&me).unwrap();
        let err = memory.read_vec(8, 16).unwrap_err();
        assert!(err.to_string().contains("at 0x8"), "{err}");
    }
}
