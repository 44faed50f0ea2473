//! Loading a patch object into the target: choose an address within
//! `jmp rel32` reach of the module being patched, relocate the image
//! ourselves, then (inside a stop) map it with a remote `mmap`, write it and
//! set each page's protection with remote `mprotect`.

use crate::object::{PatchObject, RelocationKind};
use crate::resolve::resolve_symbol;
use crate::PatchError;
use shadowpatch_symbols::Module;
use shadowpatch_target::{Mapping, TargetMemory};

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
    let mut image = object.initial_image();
    for relocation in &object.relocations {
        let place = base + relocation.offset;
        let symbol_value = match &relocation.symbol {
            None => 0,
            Some(reference) => match reference.defined_at {
                Some(address) => base + address,
                None => resolve_symbol(&reference.name, reference.weak, target, modules, memory)?,
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
