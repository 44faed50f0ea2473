//! Loading a patch object into the target: choose an address within
//! `jmp rel32` reach of the module being patched, relocate the image
//! ourselves, lay out register-preserving thunks and each entry's jump
//! (`plan_load`), then (inside a stop) map it and set each page's
//! protection in one chain of remote calls (`mmap`, then `mprotect`s) and
//! write it (`map_image`).
//! Both work on any process that can run remote syscalls: the live target
//! (`apply`) or a copy of it (simulation).

use crate::clobber::RegisterSet;
use crate::journal::{PatchedFunction, Write5};
use crate::object::{PatchObject, RelocationKind, SymbolReference};
use crate::resolve::resolve_symbol;
use crate::survey::Prepared;
use crate::thunk;
use crate::trampoline::{jump, JUMP_LEN};
use crate::PatchError;
use nix::unistd::Pid;
use shadowpatch_mirror::PAGE_SIZE;
use shadowpatch_process::remote::check_result;
use shadowpatch_process::{Mapping, ProcessCopy, RemoteCall, Stopped, TargetMemory};
use shadowpatch_symbols::Module;

/// A process stopped under our control that can run syscalls and have its
/// memory written: a thread of the stopped live target, or a copy.
pub trait RemoteProcess {
    fn pid(&self) -> i32;
    /// Run a syscall; the raw result (negative errno on failure).
    fn syscall(&mut self, number: i64, args: [u64; 6]) -> Result<i64, PatchError>;
    /// Run `calls` in turn, each only when the one before returned what it
    /// expects; the results of those run. One call at a time unless the
    /// process can chain them (a thread of the live target borrows once).
    fn syscalls(&mut self, calls: &[RemoteCall]) -> Result<Vec<i64>, PatchError> {
        let mut results = Vec::with_capacity(calls.len());
        for call in calls {
            let result = self.syscall(call.number, call.args)?;
            results.push(result);
            if !call.accepts(result) {
                break;
            }
        }
        Ok(results)
    }
    fn memory(&mut self) -> &mut TargetMemory;
}

/// A borrowed thread of the stopped target.
#[derive(Debug)]
pub struct StoppedThread<'s, 'a> {
    pub stopped: &'s mut Stopped<'a>,
    pub tid: Pid,
}

impl RemoteProcess for StoppedThread<'_, '_> {
    fn pid(&self) -> i32 {
        self.stopped.pid()
    }

    fn syscall(&mut self, number: i64, args: [u64; 6]) -> Result<i64, PatchError> {
        Ok(self.stopped.remote_syscall(self.tid, number, args)?)
    }

    fn syscalls(&mut self, calls: &[RemoteCall]) -> Result<Vec<i64>, PatchError> {
        Ok(self.stopped.remote_syscalls(self.tid, calls)?)
    }

    fn memory(&mut self) -> &mut TargetMemory {
        self.stopped.memory()
    }
}

impl RemoteProcess for ProcessCopy {
    fn pid(&self) -> i32 {
        ProcessCopy::pid(self).as_raw()
    }

    fn syscall(&mut self, number: i64, args: [u64; 6]) -> Result<i64, PatchError> {
        Ok(self.remote_syscall(number, args)?)
    }

    fn memory(&mut self) -> &mut TargetMemory {
        ProcessCopy::memory(self)
    }
}

/// Where and what to load, and each entry's jump.
#[derive(Debug, Clone)]
pub struct LoadPlan {
    pub address: u64,
    pub span: u64,
    /// The relocated object followed by its thunks, `span` bytes.
    pub image: Vec<u8>,
    /// `(start, end, prot)` offsets into the image.
    pub protections: Vec<(u64, u64, i32)>,
    /// Per replacement: its site, the new code and the entry write.
    pub functions: Vec<PatchedFunction>,
}

/// Lay out the patch for `prepared`'s target: an address near the module,
/// the relocated image, a thunk for each replacement that changes more
/// registers than the original, and each entry's jump (the entry's current
/// bytes, read from `memory`, as the write's original). With `watch_stubs`,
/// each entry jumps to a watch-window entry stub (`watchstub.rs`) placed
/// after the thunks, which calls the new code.
pub fn plan_load(prepared: &Prepared, memory: &mut TargetMemory, watch_stubs: bool) -> Result<LoadPlan, PatchError> {
    // Layout: the object's pages, then (if any replacement needs one) a
    // page-rounded area of register-preserving thunks, mapped r-x.
    let thunk_sizes: Vec<usize> = prepared
        .extra
        .iter()
        .map(|extra| {
            if *extra == RegisterSet::default() {
                0
            } else {
                thunk::build(0, 0, *extra).len()
            }
        })
        .collect();
    let thunk_area = (thunk_sizes.iter().sum::<usize>() as u64).div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64;
    let object_span = prepared.object.span;
    let stub_area = if watch_stubs {
        ((crate::watchstub::stub_len() * prepared.sites.len()) as u64).div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64
    } else {
        0
    };
    // The stubs' call counters: writable pages after them.
    let counter_area = if watch_stubs {
        (prepared.sites.len() as u64 * crate::watchstub::COUNTER_BYTES).div_ceil(PAGE_SIZE as u64) * PAGE_SIZE as u64
    } else {
        0
    };
    let span = object_span + thunk_area + stub_area + counter_area;
    let address = choose_address(&prepared.maps, &prepared.module, span, 0)?;
    let mut image = relocate(&prepared.object, address, &prepared.module, &prepared.modules, memory)?;
    image.resize(span as usize, 0);
    let mut protections = prepared.object.page_protections();
    if thunk_area > 0 {
        protections.push((object_span, object_span + thunk_area, libc::PROT_READ | libc::PROT_EXEC));
    }
    let counters_offset = object_span + thunk_area + stub_area;
    if stub_area > 0 {
        protections.push((
            object_span + thunk_area,
            counters_offset,
            libc::PROT_READ | libc::PROT_EXEC,
        ));
        protections.push((counters_offset, span, libc::PROT_READ | libc::PROT_WRITE));
    }
    let mut stub_offset = object_span + thunk_area;
    let mut counter = address + counters_offset;
    let mut functions = Vec::new();
    let mut thunk_offset = object_span;
    for (((site, with), extra), size) in prepared.sites.iter().zip(&prepared.extra).zip(&thunk_sizes) {
        let new_address = address + prepared.object.function(with)?.address;
        let (jump_to, preserved) = if *size == 0 {
            (new_address, None)
        } else {
            let thunk_address = address + thunk_offset;
            let bytes = thunk::build(thunk_address, new_address, *extra);
            image[thunk_offset as usize..thunk_offset as usize + bytes.len()].copy_from_slice(&bytes);
            thunk_offset += bytes.len() as u64;
            (thunk_address, Some(extra.names()))
        };
        let watch_stub = watch_stubs.then(|| {
            let stub = address + stub_offset;
            let bytes = crate::watchstub::build(stub, site.patch_at, jump_to, counter);
            image[stub_offset as usize..stub_offset as usize + bytes.len()].copy_from_slice(&bytes);
            stub_offset += bytes.len() as u64;
            let calls = Some(counter);
            counter += crate::watchstub::COUNTER_BYTES;
            crate::journal::WatchStubSite {
                stub,
                direct: jump_to,
                calls,
            }
        });
        let new = jump(&site.symbol, site.patch_at, watch_stub.map_or(jump_to, |w| w.stub))?;
        let original = memory.read_vec(site.patch_at, JUMP_LEN as usize)?;
        functions.push(PatchedFunction {
            site: site.clone(),
            with: with.clone(),
            new_address,
            write: Write5 {
                address: site.patch_at,
                original,
                new,
            },
            preserved,
            watch_stub,
        });
    }
    Ok(LoadPlan {
        address,
        span,
        image,
        protections,
        functions,
    })
}

/// Map `image` at `address` in `process` (remote `mmap`, fixed, never
/// replacing anything), write it and set each range's protection. Undoes
/// the mapping on failure.
pub fn map_image(
    process: &mut dyn RemoteProcess,
    protections: &[(u64, u64, i32)],
    address: u64,
    image: &[u8],
) -> Result<(), PatchError> {
    let span = image.len() as u64;
    let pid = process.pid();
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE;
    // Mapped with the protection most of it ends with, so that only the
    // other ranges need a remote mprotect: each remote call borrows a
    // thread for three round trips, and five of them were a tenth of a
    // host-wide apply's CPU. The image is written through /proc/PID/mem,
    // which writes a private mapping whatever its protection (as the
    // trampolines are written into the module's text).
    let initial = mapped_protection(protections);
    // The mmap and every mprotect in one borrowing of the thread, each
    // mprotect only after the mmap placed the mapping exactly at `address`
    // (and the mprotect before it succeeded): never on someone else's pages.
    let mut calls = vec![RemoteCall::expecting(
        libc::SYS_mmap,
        [address, span, initial as u64, flags as u64, u64::MAX, 0],
        address as i64,
    )];
    for &(start, end, protection) in protections.iter().filter(|(_, _, p)| *p != initial) {
        calls.push(RemoteCall::expecting(
            libc::SYS_mprotect,
            [address + start, end - start, protection as u64, 0, 0, 0],
            0,
        ));
    }
    let unmap = |process: &mut dyn RemoteProcess, at: u64| {
        let _ = process.syscall(libc::SYS_munmap, [at, span, 0, 0, 0, 0]);
    };
    let results = process.syscalls(&calls)?;
    let got = check_result(pid, "remote mmap in", results[0])?;
    if got as u64 != address {
        // Kernels before 4.17 ignore MAP_FIXED_NOREPLACE and map elsewhere.
        unmap(process, got as u64);
        return Err(PatchError::NoRoom {
            module: format!("pid {pid} (mmap placed it at {got:#x})"),
            span,
        });
    }
    let result = (|| {
        // The chain stops at the first mprotect that failed: its result is
        // the last one.
        for &result in &results[1..] {
            check_result(pid, "remote mprotect in", result)?;
        }
        process.memory().write(address, image)?;
        Ok::<(), PatchError>(())
    })();
    if let Err(error) = result {
        unmap(process, address);
        return Err(error);
    }
    Ok(())
}

/// The protection to map a load with: the one covering the most bytes of
/// `protections` (the first of equals), never PROT_NONE (a gap between
/// segments), PROT_READ when nothing else.
pub fn mapped_protection(protections: &[(u64, u64, i32)]) -> i32 {
    let mut bytes: Vec<(i32, u64)> = Vec::new();
    for &(start, end, protection) in protections.iter().filter(|(_, _, p)| *p != libc::PROT_NONE) {
        match bytes.iter_mut().find(|(p, _)| *p == protection) {
            Some((_, total)) => *total += end - start,
            None => bytes.push((protection, end - start)),
        }
    }
    let most = bytes.iter().map(|(_, total)| *total).max().unwrap_or(0);
    bytes
        .iter()
        .find(|(_, total)| *total == most)
        .map_or(libc::PROT_READ, |(protection, _)| *protection)
}

const PAGE: u64 = 4096;
/// Everything in the mapping must be reachable from every replaced entry.
const REACH: u64 = (1 << 31) - PAGE;

/// Pick a free, page-aligned address for `span` bytes near `module`, with a
/// guard page on each side, such that the whole mapping is within ±2 GiB of
/// the whole module. Candidates are tried nearest first.
pub fn choose_address(maps: &[Mapping], module: &Module, span: u64, skip: usize) -> Result<u64, PatchError> {
    let mut occupied: Vec<(u64, u64)> = maps.iter().map(|m| (m.start, m.end)).collect();
    occupied.sort();
    let mut candidates = Vec::new();
    let mut previous_end = 0x10000u64; // stay clear of mmap_min_addr
    for (start, end) in occupied
        .iter()
        .copied()
        .chain(std::iter::once((0x7fff_ffff_f000, 0x7fff_ffff_f000)))
    {
        if start > previous_end && start - previous_end >= span + 2 * PAGE {
            // Highest placement in the gap (near what follows) and lowest
            // (near what precedes): whichever is closer to the module.
            candidates.push(start - PAGE - span);
            candidates.push(previous_end + PAGE);
        }
        previous_end = previous_end.max(end);
    }
    let reaches = |address: u64| address + span <= module.base + REACH && module.end <= address + REACH;
    let distance = |address: u64| {
        if address >= module.end {
            address - module.end
        } else {
            module.base.saturating_sub(address + span)
        }
    };
    let mut reachable: Vec<u64> = candidates.into_iter().filter(|a| reaches(*a)).collect();
    reachable.sort_by_key(|a| distance(*a));
    reachable.dedup();
    reachable.get(skip).copied().ok_or(PatchError::NoRoom {
        module: module.name.clone(),
        span,
    })
}

/// Relocate `object` for load address `base`, resolving its undefined
/// symbols in the target. Returns the image exactly as it must be in memory.
pub fn relocate(
    object: &PatchObject,
    base: u64,
    target: &Module,
    modules: &[Module],
    memory: &mut TargetMemory,
) -> Result<Vec<u8>, PatchError> {
    relocate_with(object, base, |reference| {
        resolve_symbol(&reference.name, reference.weak, target, modules, memory)
    })
}

/// Relocate `object` for load address `base`, asking `resolve` for the
/// address of each symbol the object does not define. No I/O of its own:
/// the fuzz target drives it with any object and any answers.
pub fn relocate_with(
    object: &PatchObject,
    base: u64,
    mut resolve: impl FnMut(&SymbolReference) -> Result<u64, PatchError>,
) -> Result<Vec<u8>, PatchError> {
    let mut image = object.initial_image();
    for relocation in &object.relocations {
        let place = base + relocation.offset;
        let symbol_value = match &relocation.symbol {
            None => 0,
            Some(reference) => match reference.defined_at {
                Some(address) => base + address,
                None => resolve(reference)?,
            },
        };
        let addend = relocation.addend;
        let at = relocation.offset as usize;
        let name = || relocation.symbol.as_ref().map(|s| s.name.clone()).unwrap_or_default();
        match relocation.kind {
            RelocationKind::Relative => write64(&mut image, at, base.wrapping_add(addend as u64)),
            RelocationKind::Absolute64 => write64(&mut image, at, symbol_value.wrapping_add(addend as u64)),
            RelocationKind::Slot => write64(&mut image, at, symbol_value),
            RelocationKind::PcRelative32 => {
                let value = symbol_value as i128 + addend as i128 - place as i128;
                let value = i32::try_from(value).map_err(|_| PatchError::RelocationOverflow {
                    symbol: name(),
                    offset: relocation.offset,
                })?;
                image[at..at + 4].copy_from_slice(&value.to_le_bytes());
            }
            RelocationKind::Absolute32 { signed } => {
                let value = symbol_value as i128 + addend as i128;
                let bytes = if signed {
                    i32::try_from(value).map(i32::to_le_bytes).ok()
                } else {
                    u32::try_from(value).map(u32::to_le_bytes).ok()
                };
                let bytes = bytes.ok_or(PatchError::RelocationOverflow {
                    symbol: name(),
                    offset: relocation.offset,
                })?;
                image[at..at + 4].copy_from_slice(&bytes);
            }
        }
    }
    Ok(image)
}

fn write64(image: &mut [u8], at: usize, value: u64) {
    image[at..at + 8].copy_from_slice(&value.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::mapped_protection;
    const R: i32 = libc::PROT_READ;
    const RX: i32 = libc::PROT_READ | libc::PROT_EXEC;
    const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

    #[test]
    fn a_load_is_mapped_with_the_protection_of_most_of_its_bytes() {
        // r-- r-x r-- rw-: read-only covers two pages.
        let typical = [
            (0, 0x1000, R),
            (0x1000, 0x2000, RX),
            (0x2000, 0x3000, R),
            (0x3000, 0x4000, RW),
        ];
        assert_eq!(mapped_protection(&typical), R);
        assert_eq!(mapped_protection(&[(0, 0x1000, RW), (0x1000, 0x3000, RX)]), RX);
        // Equals: the first; a gap never; nothing: read-only.
        assert_eq!(mapped_protection(&[(0, 0x1000, RW), (0x1000, 0x2000, RX)]), RW);
        assert_eq!(
            mapped_protection(&[(0, 0x3000, libc::PROT_NONE), (0x3000, 0x4000, RX)]),
            RX
        );
        assert_eq!(mapped_protection(&[]), R);
    }
}
