//! Whether a function returns a value, told by the code that calls it when
//! the module has no DWARF: every direct `call rel32` to the function's
//! entry in the module's text is found, and the caller's code after the
//! call is decoded (iced-x86) along each path until it reads rax/eax (or
//! xmm0) — the function returns a value that wide — or writes it first, or
//! calls something else (which clobbers it) — the value is not used there.
//!
//! A path that returns, jumps indirectly or runs out of its instruction
//! budget says nothing (a caller passing the value on to its own caller).
//! The function returns a value when any caller reads one; it is treated
//! as `void` when no caller reads one and at least one discards it on
//! every path; otherwise it is unknown.

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess, OpKind};
use shadowpatch_patch::clobber::is_zeroing_idiom;
use std::collections::HashSet;

/// Instructions decoded after one call site, over all its paths.
const INSTRUCTION_BUDGET: usize = 96;

/// What one caller does with the value after the call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallerUse {
    /// Reads rax (`bytes` wide: al 1, ax 2, eax 4, rax 8) before writing it.
    ReadsInteger { bytes: u8 },
    /// Reads xmm0 before writing it.
    ReadsFloat,
    /// Writes rax and xmm0 (or calls another function) on every path
    /// before reading them.
    Discards,
    /// Paths that return, jump indirectly or are too long: no answer.
    Unknown,
}

/// The uses of the value at every direct call of `entry` in `text`
/// (`(runtime address, bytes)` of the module's executable mappings), one
/// per call site: `(call site, use)`.
pub fn uses_at_call_sites(text: &[(u64, Vec<u8>)], entry: u64) -> Vec<(u64, CallerUse)> {
    let mut uses = Vec::new();
    for (base, bytes) in text {
        if bytes.len() < 5 {
            continue;
        }
        for offset in 0..bytes.len() - 4 {
            if bytes[offset] != 0xe8 {
                continue;
            }
            let relative = i32::from_le_bytes(bytes[offset + 1..offset + 5].try_into().expect("4 bytes"));
            let after = base + offset as u64 + 5;
            if after.wrapping_add(relative as i64 as u64) == entry {
                uses.push((base + offset as u64, use_after(text, after)));
            }
        }
    }
    uses
}

/// The uses at every call through the GOT slot at `slot` (another module
/// importing the function) in `text`: `call [rip+slot]`, and direct calls
/// of the PLT stubs that `jmp [rip+slot]` (with or without `endbr64` and
/// `bnd` before the jump).
pub fn uses_through_slot(text: &[(u64, Vec<u8>)], slot: u64) -> Vec<(u64, CallerUse)> {
    let mut uses = Vec::new();
    let mut stubs = Vec::new();
    for (base, bytes) in text {
        if bytes.len() < 6 {
            continue;
        }
        for offset in 0..bytes.len() - 5 {
            if bytes[offset] != 0xff || !matches!(bytes[offset + 1], 0x15 | 0x25) {
                continue;
            }
            let displacement = i32::from_le_bytes(bytes[offset + 2..offset + 6].try_into().expect("4 bytes"));
            let after = base + offset as u64 + 6;
            if after.wrapping_add(displacement as i64 as u64) != slot {
                continue;
            }
            let at = base + offset as u64;
            if bytes[offset + 1] == 0x15 {
                uses.push((at, use_after(text, after)));
                continue;
            }
            // A stub starts at the jump, or before its `bnd` prefix, or
            // before an `endbr64` in front of either.
            let bnd = offset >= 1 && bytes[offset - 1] == 0xf2;
            let start = at - bnd as u64;
            let before = (start - base) as usize;
            let endbr = before >= 4 && bytes[before - 4..before] == [0xf3, 0x0f, 0x1e, 0xfa];
            stubs.push(start);
            if endbr {
                stubs.push(start - 4);
            }
        }
    }
    for stub in stubs {
        uses.extend(uses_at_call_sites(text, stub));
    }
    uses
}

/// What the code from `start` (just after a call) does with rax and xmm0.
/// Each path carries whether each register still holds the value; a path
/// ends at a read (a value), when both were overwritten or at another call
/// (discarded), or at a return: discarded if rax was overwritten (a
/// floating-point value passed up unread is rare enough), else unknown.
fn use_after(text: &[(u64, Vec<u8>)], start: u64) -> CallerUse {
    let mut factory = InstructionInfoFactory::new();
    let mut instruction = Instruction::default();
    // (address, rax still holds the value, xmm0 still does)
    let mut pending = vec![(start, true, true)];
    let mut visited = HashSet::new();
    let mut decoded = 0;
    let (mut reads_integer, mut reads_float, mut unknown) = (None::<u8>, false, false);
    'paths: while let Some((mut ip, mut integer_live, mut float_live)) = pending.pop() {
        loop {
            if !visited.insert((ip, integer_live, float_live)) {
                // A loop back, or a path joining one already followed.
                continue 'paths;
            }
            decoded += 1;
            if decoded > INSTRUCTION_BUDGET {
                unknown = true;
                break 'paths;
            }
            let Some((base, bytes)) = text
                .iter()
                .find(|(base, bytes)| ip >= *base && ip < base + bytes.len() as u64)
            else {
                unknown = true;
                continue 'paths;
            };
            let mut decoder = Decoder::with_ip(64, &bytes[(ip - base) as usize..], ip, DecoderOptions::NONE);
            decoder.decode_out(&mut instruction);
            if instruction.is_invalid() {
                unknown = true;
                continue 'paths;
            }
            let zeroing = is_zeroing_idiom(&instruction);
            let (mut wrote_integer, mut wrote_float) = (false, false);
            for used in factory.info(&instruction).used_registers() {
                let register = used.register();
                let full = register.full_register();
                let integer = full == iced_x86::Register::RAX && integer_live;
                let float = full == iced_x86::Register::ZMM0 && float_live;
                if !integer && !float {
                    continue;
                }
                let read = !zeroing
                    && matches!(
                        used.access(),
                        OpAccess::Read | OpAccess::CondRead | OpAccess::ReadWrite | OpAccess::ReadCondWrite
                    );
                if read && integer {
                    let bytes = register.size().clamp(1, 8) as u8;
                    reads_integer = Some(reads_integer.map_or(bytes, |b| b.max(bytes)));
                    continue 'paths;
                }
                if read && float {
                    reads_float = true;
                    continue 'paths;
                }
                if matches!(used.access(), OpAccess::Write | OpAccess::ReadWrite) {
                    wrote_integer |= integer;
                    wrote_float |= float;
                }
            }
            integer_live &= !wrote_integer;
            float_live &= !wrote_float;
            if !integer_live && !float_live {
                continue 'paths;
            }
            match instruction.flow_control() {
                // Another call clobbers both (its own use of rax, e.g.
                // `call *%rax`, was seen above).
                FlowControl::Call | FlowControl::IndirectCall => continue 'paths,
                FlowControl::Return => {
                    unknown |= integer_live;
                    continue 'paths;
                }
                FlowControl::IndirectBranch => {
                    unknown = true;
                    continue 'paths;
                }
                // ud2, int3, hlt: the path never gets to use the value.
                FlowControl::Exception | FlowControl::Interrupt => continue 'paths,
                FlowControl::UnconditionalBranch => {
                    if instruction.op0_kind() == OpKind::NearBranch64 {
                        ip = instruction.near_branch_target();
                        continue;
                    }
                    unknown = true;
                    continue 'paths;
                }
                FlowControl::ConditionalBranch if instruction.op0_kind() == OpKind::NearBranch64 => {
                    pending.push((instruction.near_branch_target(), integer_live, float_live));
                }
                _ => {}
            }
            ip = instruction.next_ip();
        }
    }
    match (reads_integer, reads_float) {
        (Some(bytes), _) => CallerUse::ReadsInteger { bytes },
        (None, true) => CallerUse::ReadsFloat,
        (None, false) if unknown => CallerUse::Unknown,
        (None, false) => CallerUse::Discards,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `bytes` placed at 0x1000 with a `call` at 0x1000 to 0x2000 first.
    fn caller(after_call: &[u8]) -> Vec<(u64, Vec<u8>)> {
        let mut bytes = vec![0xe8];
        bytes.extend_from_slice(&(0x2000i32 - 0x1005).to_le_bytes());
        bytes.extend_from_slice(after_call);
        vec![(0x1000, bytes)]
    }

    fn use_of(after_call: &[u8]) -> Vec<CallerUse> {
        uses_at_call_sites(&caller(after_call), 0x2000)
            .into_iter()
            .map(|(_, u)| u)
            .collect()
    }

    #[test]
    fn a_caller_reading_eax_or_rax_after_the_call_means_a_value() {
        // test eax, eax; ret
        assert_eq!(use_of(&[0x85, 0xc0, 0xc3]), [CallerUse::ReadsInteger { bytes: 4 }]);
        // mov rdi, rax; ret
        assert_eq!(
            use_of(&[0x48, 0x89, 0xc7, 0xc3]),
            [CallerUse::ReadsInteger { bytes: 8 }]
        );
        // movsd [rsp], xmm0; ret
        assert_eq!(use_of(&[0xf2, 0x0f, 0x11, 0x04, 0x24, 0xc3]), [CallerUse::ReadsFloat]);
    }

    #[test]
    fn a_caller_overwriting_or_calling_again_discards_the_value() {
        // xor eax, eax; pxor xmm0, xmm0; ret
        assert_eq!(
            use_of(&[0x31, 0xc0, 0x66, 0x0f, 0xef, 0xc0, 0xc3]),
            [CallerUse::Discards]
        );
        // mov edi, 1; call 0x2000 (itself a second call site, read after)
        let uses = use_of(&[0xbf, 1, 0, 0, 0, 0xe8, 0xf1, 0x0f, 0, 0, 0x85, 0xc0, 0xc3]);
        assert_eq!(uses[0], CallerUse::Discards);
        // add rsp, 8; ret: the value may go up to the caller's caller.
        assert_eq!(use_of(&[0x48, 0x83, 0xc4, 0x08, 0xc3]), [CallerUse::Unknown]);
    }

    #[test]
    fn calls_through_a_plt_stub_or_the_got_slot_are_found() {
        // 0x1000: endbr64; bnd jmp [rip+0x1000] (slot 0x200b); then a call
        // of the stub followed by `test eax, eax; ret`, and a `call
        // [rip+slot]` followed by `xor eax, eax; ret`.
        let mut bytes = vec![0xf3, 0x0f, 0x1e, 0xfa, 0xf2, 0xff, 0x25];
        bytes.extend_from_slice(&(0x200bi32 - 0x100b).to_le_bytes());
        bytes.push(0xe8);
        bytes.extend_from_slice(&(0x1000i32 - 0x1010).to_le_bytes());
        bytes.extend_from_slice(&[0x85, 0xc0, 0xc3]);
        bytes.extend_from_slice(&[0xff, 0x15]);
        bytes.extend_from_slice(&(0x200bi32 - 0x1019).to_le_bytes());
        bytes.extend_from_slice(&[0x31, 0xc0, 0xc3]);
        let mut uses = uses_through_slot(&[(0x1000, bytes)], 0x200b);
        uses.sort_by_key(|(at, _)| *at);
        assert_eq!(
            uses,
            [
                (0x100b, CallerUse::ReadsInteger { bytes: 4 }),
                (0x1013, CallerUse::Discards)
            ]
        );
    }

    #[test]
    fn both_branches_are_followed() {
        // test edi, edi; je +3; xor eax, eax; ret; (at +3) mov rdi, rax; ret
        let uses = use_of(&[0x85, 0xff, 0x74, 0x03, 0x31, 0xc0, 0xc3, 0x48, 0x89, 0xc7, 0xc3]);
        assert_eq!(uses, [CallerUse::ReadsInteger { bytes: 8 }]);
    }
}
