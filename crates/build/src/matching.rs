//! Symbols for a stripped target whose build-id no reference build
//! reproduces: the reference binary's functions matched one by one against
//! the target's code, relocation-masked (displacements and branch targets
//! ignored), and its variables located through the instructions of
//! matched functions that address them. The target's functions are the
//! ranges of its `.eh_frame` entries (present in stripped binaries: the
//! unwinder needs them). A reference function whose masked code occurs
//! more than once in the target is left out, so nothing is bound by guess.

use crate::target::{BinaryKind, BinarySymbol, SymbolMap, SymbolOrigin};
use gimli::{BaseAddresses, CieOrFde, EhFrame, LittleEndian, UnwindSection};
use iced_x86::{Decoder, DecoderOptions, Instruction, OpKind};
use object::{Object, ObjectSection};
use std::collections::HashMap;

/// The symbol map of the target built from the reference's symbols, or
/// `None` when not one function matched.
pub fn match_reference(target: &[u8], reference: &[u8]) -> Option<SymbolMap> {
    let reference_map = SymbolMap::of_file(reference, SymbolOrigin::MaskedMatch)?;
    let mut by_signature: HashMap<(usize, blake3::Hash), Vec<u64>> = HashMap::new();
    for (start, length) in function_ranges(target) {
        if let Some(code) = crate::target::bytes_at(target, start, length) {
            by_signature
                .entry((code.len(), signature(code, start)))
                .or_default()
                .push(start);
        }
    }
    // Reference file address → target file address.
    let mut moved: HashMap<u64, Option<u64>> = HashMap::new();
    let mut note = |from: u64, to: u64| {
        moved
            .entry(from)
            .and_modify(|known| {
                if *known != Some(to) {
                    *known = None;
                }
            })
            .or_insert(Some(to));
    };
    let mut matched = 0usize;
    for symbol in reference_map
        .symbols
        .iter()
        .filter(|s| s.kind == BinaryKind::Function && s.size > 0)
    {
        let Some(code) = crate::target::bytes_at(reference, symbol.address, symbol.size) else {
            continue;
        };
        let Some(starts) = by_signature.get(&(code.len(), signature(code, symbol.address))) else {
            continue;
        };
        let [start] = starts.as_slice() else { continue };
        matched += 1;
        note(symbol.address, *start);
        let Some(running) = crate::target::bytes_at(target, *start, symbol.size) else {
            continue;
        };
        for (from, to) in addressed(code, symbol.address)
            .into_iter()
            .zip(addressed(running, *start))
        {
            note(from, to);
        }
    }
    if matched == 0 {
        return None;
    }
    let symbols = reference_map
        .symbols
        .iter()
        .filter_map(|symbol| {
            let address = (*moved.get(&symbol.address)?)?;
            Some(BinarySymbol {
                address,
                ..symbol.clone()
            })
        })
        .collect();
    Some(SymbolMap {
        origin: SymbolOrigin::MaskedMatch,
        symbols,
    })
}

/// `(start, length)` of each function the `.eh_frame` describes.
fn function_ranges(bytes: &[u8]) -> Vec<(u64, u64)> {
    let Ok(file) = object::File::parse(bytes) else {
        return Vec::new();
    };
    let Some(section) = file.section_by_name(".eh_frame") else {
        return Vec::new();
    };
    let Ok(data) = section.data() else { return Vec::new() };
    let mut eh_frame = EhFrame::new(data, LittleEndian);
    eh_frame.set_address_size(8);
    let mut bases = BaseAddresses::default().set_eh_frame(section.address());
    if let Some(text) = file.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    let mut ranges = Vec::new();
    let mut entries = eh_frame.entries(&bases);
    while let Ok(Some(entry)) = entries.next() {
        if let CieOrFde::Fde(partial) = entry {
            if let Ok(fde) = partial.parse(EhFrame::cie_from_offset) {
                ranges.push((fde.initial_address(), fde.len()));
            }
        }
    }
    ranges
}

fn is_relative(instruction: &Instruction) -> bool {
    instruction.is_ip_rel_memory_operand()
        || matches!(
            instruction.op0_kind(),
            OpKind::NearBranch64 | OpKind::NearBranch32 | OpKind::NearBranch16
        )
}

/// A hash of the code with each instruction's address-dependent part
/// (RIP-relative displacement, branch target) left out.
fn signature(code: &[u8], address: u64) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    while decoder.can_decode() {
        let instruction = decoder.decode();
        let start = (instruction.ip() - address) as usize;
        hasher.update(&(instruction.code() as u32).to_le_bytes());
        if is_relative(&instruction) {
            for i in 0..instruction.op_count() {
                hasher.update(&[instruction.op_kind(i) as u8, instruction.op_register(i) as u8]);
                // Only real immediates: `immediate64()` of an instruction
                // without one reads the displacement, which differs.
                if crate::target::is_immediate(instruction.op_kind(i)) {
                    hasher.update(&instruction.immediate(i).to_le_bytes());
                }
            }
        } else {
            hasher.update(&code[start..start + instruction.len()]);
        }
    }
    hasher.finalize()
}

/// Every address the code refers to relatively (data it addresses,
/// functions it calls or jumps to outside itself), in order.
fn addressed(code: &[u8], address: u64) -> Vec<u64> {
    let mut found = Vec::new();
    let mut decoder = Decoder::with_ip(64, code, address, DecoderOptions::NONE);
    let end = address + code.len() as u64;
    while decoder.can_decode() {
        let instruction = decoder.decode();
        if instruction.is_ip_rel_memory_operand() {
            found.push(instruction.ip_rel_memory_address());
        } else if is_relative(&instruction) {
            let target = instruction.near_branch_target();
            if !(address..end).contains(&target) {
                found.push(target);
            }
        }
    }
    found
}
