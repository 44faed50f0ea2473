//! Watch-window entry stubs (`apply --watch`): while a patch is watched,
//! each trampoline jumps to a stub that records the call's entry state on
//! the calling thread's own stack, then calls the new code. If the new code
//! raises a fatal signal, the watcher finds the record from the faulting
//! thread's stack pointer, rolls the patch back, restores the recorded
//! registers and resumes the thread at the original function's entry: the
//! call runs again as if the patch had never run (side effects the patch
//! made before faulting are not undone). After a keep verdict the
//! trampolines are re-pointed straight at the new code (`Repoint`).
//!
//! ```text
//! lock inc qword [rip → CALLS]                    ; this stub's call counter
//! push rax rdi rsi rdx rcx r8 r9 r10 r11 rbx rbp r12 r13 r14 r15
//! sub rsp, 128 ; movdqu [rsp+16*i], xmm_i        ; i = 0..8
//! mov r11, ENTRY ; push r11 ; mov r11, MARKER ; push r11
//! sub rsp, 64 ; copy the caller's 64 bytes of stack arguments down
//! mov r11, [saved r11] ; call new ; add rsp, 64 + RECORD_BYTES ; ret
//! ```
//!
//! The counter (8 bytes per stub, in a writable page after the stubs)
//! counts the calls the window saw, so a keep verdict can require that
//! every replaced function ran (`--min-calls`); the tool reads it from the
//! target's memory. The `inc` changes only flags, which no function expects
//! to keep across a call.
//!
//! At entry rsp ≡ 8 (mod 16); the record is 264 bytes, so the call is
//! 16-byte aligned. Callee-saved registers are not restored after the call:
//! the new function (or its thunk) keeps them. The stub has no unwind
//! information: an exception unwinding through a watched function stops
//! there (documented limit, like the thunk's 64 bytes of stack arguments).

use crate::thunk::{mov_rsp, movdqu_rsp, STACK_ARGUMENT_BYTES};

/// The word at the bottom of every record: "SPWATCH1", xor'd so the
/// constant itself is unlikely to sit in a program's data.
pub const MARKER: u64 = 0x5350_5741_5443_4831 ^ 0xa5a5_a5a5_a5a5_a5a5;

/// Bytes of one record, from its marker up to (not including) the return
/// address the caller pushed.
pub const RECORD_BYTES: u64 = 264;

/// GPRs pushed, in push order (ModRM numbers): the record holds them in
/// reverse, r15 lowest.
const PUSHED: [u8; 15] = [0, 7, 6, 2, 1, 8, 9, 10, 11, 3, 5, 12, 13, 14, 15];

/// The entry state of one watched call, read back from a thread's stack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRecord {
    /// Where the record starts (its marker).
    pub address: u64,
    /// The original function's entry (where the call resumes).
    pub entry: u64,
    /// The stack pointer at entry (pointing at the return address).
    pub entry_rsp: u64,
    /// rax rdi rsi rdx rcx r8 r9 r10 r11 rbx rbp r12 r13 r14 r15.
    pub gprs: [u64; 15],
    /// xmm0..xmm7, 16 bytes each.
    pub xmms: [[u8; 16]; 8],
}

fn push(out: &mut Vec<u8>, register: u8) {
    if register >= 8 {
        out.push(0x41);
    }
    out.push(0x50 + (register & 7));
}

fn push_imm64_via_r11(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&[0x49, 0xbb]);
    out.extend_from_slice(&value.to_le_bytes());
    push(out, 11);
}

/// Bytes of one call counter.
pub const COUNTER_BYTES: u64 = 8;

/// Build the stub placed at `at` for the function whose entry is `entry`,
/// calling `target` (the new function or its thunk), counting each call in
/// the 8 bytes at `counter` (within ±2 GiB of the stub).
pub fn build(at: u64, entry: u64, target: u64, counter: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(200);
    // lock inc qword [rip + disp32], disp32 from the end of this 8-byte instruction.
    out.extend_from_slice(&[0xf0, 0x48, 0xff, 0x05]);
    out.extend_from_slice(&((counter as i64 - (at as i64 + 8)) as i32).to_le_bytes());
    for register in PUSHED {
        push(&mut out, register);
    }
    out.extend_from_slice(&[0x48, 0x81, 0xec]);
    out.extend_from_slice(&128u32.to_le_bytes());
    for xmm in 0..8u8 {
        movdqu_rsp(&mut out, xmm, 16 * xmm as u32, true);
    }
    push_imm64_via_r11(&mut out, entry);
    push_imm64_via_r11(&mut out, MARKER);
    let args = STACK_ARGUMENT_BYTES;
    out.extend_from_slice(&[0x48, 0x81, 0xec]);
    out.extend_from_slice(&args.to_le_bytes());
    // The caller's stack arguments sat at entry rsp + 8 + k, which is now
    // rsp + args + RECORD_BYTES + 8 + k; after our call they are at rsp + k
    // as the new function sees it (see thunk.rs for the same copy).
    for k in (0..args).step_by(8) {
        mov_rsp(&mut out, 11, args + RECORD_BYTES as u32 + 8 + k, false);
        mov_rsp(&mut out, 11, k, true);
    }
    // r11 back as the caller left it (a thunk may have to preserve it).
    mov_rsp(&mut out, 11, args + gpr_offset(11), false);
    let after_call = at + out.len() as u64 + 5;
    out.push(0xe8);
    out.extend_from_slice(&((target as i64 - after_call as i64) as i32).to_le_bytes());
    out.extend_from_slice(&[0x48, 0x81, 0xc4]);
    out.extend_from_slice(&(args + RECORD_BYTES as u32).to_le_bytes());
    out.push(0xc3);
    out
}

/// Offset in the record of a pushed GPR (by ModRM number).
fn gpr_offset(register: u8) -> u32 {
    let position = PUSHED.iter().position(|r| *r == register).expect("pushed register") as u32;
    // Pushed first = highest: rax at 256, r15 at 144.
    16 + 128 + 8 * (14 - position)
}

/// Size of one stub (every stub has the same length).
pub fn stub_len() -> usize {
    build(0, 0, 0, 0).len()
}

/// Find the outermost record on a thread's stack: `stack` holds the bytes
/// read from `stack_address` (the faulting stack pointer) upward; `entries`
/// are the watched functions' entries (a record must name one, which keeps
/// a stray marker-valued word from being taken for a record).
pub fn find_outermost(stack_address: u64, stack: &[u8], entries: &[u64]) -> Option<EntryRecord> {
    let word =
        |offset: usize| -> Option<u64> { Some(u64::from_le_bytes(stack.get(offset..offset + 8)?.try_into().ok()?)) };
    let mut found = None;
    let mut offset = 0;
    while offset + RECORD_BYTES as usize <= stack.len() {
        if word(offset) == Some(MARKER) && word(offset + 8).is_some_and(|entry| entries.contains(&entry)) {
            let mut gprs = [0u64; 15];
            for (k, register) in PUSHED.iter().enumerate() {
                gprs[k] = word(offset + gpr_offset(*register) as usize)?;
            }
            let mut xmms = [[0u8; 16]; 8];
            for (k, xmm) in xmms.iter_mut().enumerate() {
                xmm.copy_from_slice(&stack[offset + 16 + 16 * k..offset + 32 + 16 * k]);
            }
            found = Some(EntryRecord {
                address: stack_address + offset as u64,
                entry: word(offset + 8)?,
                entry_rsp: stack_address + offset as u64 + RECORD_BYTES,
                gprs,
                xmms,
            });
        }
        offset += 8;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, NasmFormatter};

    #[test]
    fn stub_records_then_calls_and_its_record_is_found() {
        let code = build(0x1000, 0x4000, 0x2000, 0x3000);
        let mut formatter = NasmFormatter::new();
        let text: Vec<String> = Decoder::with_ip(64, &code, 0x1000, DecoderOptions::NONE)
            .into_iter()
            .map(|i| {
                assert!(!i.is_invalid());
                let mut s = String::new();
                formatter.format(&i, &mut s);
                s
            })
            .collect();
        let joined = text.join("\n");
        assert_eq!(text[0], "lock inc qword [rel 3000h]", "{joined}");
        assert_eq!(text[1], "push rax", "{joined}");
        assert!(joined.contains("movdqu [rsp+70h],xmm7"), "{joined}");
        assert!(joined.contains("call 0000000000002000h"), "{joined}");
        assert_eq!(text.last().unwrap(), "ret", "{joined}");
        // Pushes (15 × 8) + xmm area + two pushed words = the record.
        assert_eq!(15 * 8 + 128 + 16, RECORD_BYTES);

        // A record laid out as the stub lays it, at 0x7000 + 24.
        let mut stack = vec![0u8; 24 + RECORD_BYTES as usize + 8];
        let base = 24;
        stack[base..base + 8].copy_from_slice(&MARKER.to_le_bytes());
        stack[base + 8..base + 16].copy_from_slice(&0x4000u64.to_le_bytes());
        let rdi_at = base + gpr_offset(7) as usize;
        stack[rdi_at..rdi_at + 8].copy_from_slice(&42u64.to_le_bytes());
        assert!(find_outermost(0x7000, &stack, &[0x5000]).is_none(), "unknown entry");
        let record = find_outermost(0x7000, &stack, &[0x4000]).expect("record");
        assert_eq!(record.entry, 0x4000);
        assert_eq!(record.gprs[1], 42, "rdi is the second pushed");
        assert_eq!(record.entry_rsp, 0x7000 + 24 + RECORD_BYTES);
    }
}
