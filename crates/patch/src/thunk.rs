//! Register-preserving thunks, for replacements that change registers the
//! original left alone (see `clobber`). The trampoline jumps to the thunk,
//! which saves those registers, copies the caller's first stack-argument
//! bytes down so the new function finds its stack arguments where it
//! expects them, calls the new function, restores and returns:
//!
//! ```text
//! sub  rsp, FRAME                ; saves + copied arguments, keeps alignment
//! mov  [rsp+SAVE+8*i], reg_i     ; each extra GPR
//! movdqu [rsp+SAVE+...], xmm_j   ; each extra XMM
//! mov  r11, [rsp+FRAME+8+k] ; mov [rsp+k], r11   ; copy stack arguments
//! call new_function
//! restore, add rsp, FRAME, ret
//! ```
//!
//! Up to `STACK_ARGUMENT_BYTES` of stack-passed arguments are carried over;
//! a function with more stack arguments than that is not supported through
//! a thunk (the limit is documented). Encodings are written out by hand:
//! they are few and fixed, and iced-x86's encoder is not among the features
//! we build.

use crate::clobber::RegisterSet;

/// Bytes of the caller's stack arguments copied for the new function.
pub const STACK_ARGUMENT_BYTES: u32 = 64;

/// The ModRM register number (0-15) of a caller-saved GPR by its index in `GPRS`.
fn gpr_number(index: usize) -> u8 {
    // rax rcx rdx rsi rdi r8 r9 r10 r11
    [0u8, 1, 2, 6, 7, 8, 9, 10, 11][index]
}

/// `mov [rsp+disp32], reg` (store) or `mov reg, [rsp+disp32]` (load).
pub(crate) fn mov_rsp(out: &mut Vec<u8>, register: u8, displacement: u32, store: bool) {
    out.push(0x48 | if register >= 8 { 0x04 } else { 0 });
    out.push(if store { 0x89 } else { 0x8b });
    out.push(0x84 | ((register & 7) << 3));
    out.push(0x24);
    out.extend_from_slice(&displacement.to_le_bytes());
}

/// `movdqu [rsp+disp32], xmm` (store) or `movdqu xmm, [rsp+disp32]`.
pub(crate) fn movdqu_rsp(out: &mut Vec<u8>, xmm: u8, displacement: u32, store: bool) {
    out.push(0xf3);
    if xmm >= 8 {
        out.push(0x44);
    }
    out.push(0x0f);
    out.push(if store { 0x7f } else { 0x6f });
    out.push(0x84 | ((xmm & 7) << 3));
    out.push(0x24);
    out.extend_from_slice(&displacement.to_le_bytes());
}

/// Build the thunk placed at `at` that calls `target` preserving `extra`.
pub fn build(at: u64, target: u64, extra: RegisterSet) -> Vec<u8> {
    let gprs: Vec<usize> = extra.gprs().collect();
    let xmms: Vec<u32> = extra.xmms().collect();
    // Layout from rsp after `sub`: [0, ARGS) copied stack arguments,
    // then XMM saves (16 each), then GPR saves (8 each, plus r11 which the
    // copy uses), padded so rsp stays 16-aligned at the call:
    // at entry rsp ≡ 8 (mod 16), so FRAME ≡ 8 (mod 16).
    let args = STACK_ARGUMENT_BYTES;
    let xmm_area = 16 * xmms.len() as u32;
    let mut gpr_slots: Vec<u8> = gprs.iter().map(|&i| gpr_number(i)).collect();
    let r11_saved_for_copy = !gpr_slots.contains(&11);
    if r11_saved_for_copy {
        gpr_slots.push(11);
    }
    let gpr_area = 8 * gpr_slots.len() as u32;
    let mut frame = args + xmm_area + gpr_area;
    if frame % 16 != 8 {
        frame += 8;
    }
    let mut out = Vec::with_capacity(128);
    // sub rsp, imm32
    out.extend_from_slice(&[0x48, 0x81, 0xec]);
    out.extend_from_slice(&frame.to_le_bytes());
    for (k, &xmm) in xmms.iter().enumerate() {
        movdqu_rsp(&mut out, xmm as u8, args + 16 * k as u32, true);
    }
    for (k, &register) in gpr_slots.iter().enumerate() {
        mov_rsp(&mut out, register, args + xmm_area + 8 * k as u32, true);
    }
    // Copy the caller's stack arguments: they were at entry rsp + 8 + k,
    // which is now rsp + frame + 8 + k; the new function will find them at
    // (rsp - 8) + 8 + k = rsp + k after our call pushes its return address.
    for k in (0..args).step_by(8) {
        mov_rsp(&mut out, 11, frame + 8 + k, false);
        mov_rsp(&mut out, 11, k, true);
    }
    // Restore r11 before the call when the caller relies on it being kept.
    if !r11_saved_for_copy {
        let slot = gpr_slots.iter().position(|r| *r == 11).expect("r11 saved") as u32;
        mov_rsp(&mut out, 11, args + xmm_area + 8 * slot, false);
    }
    // call rel32
    let after_call = at + out.len() as u64 + 5;
    out.push(0xe8);
    out.extend_from_slice(&((target as i64 - after_call as i64) as i32).to_le_bytes());
    for (k, &register) in gpr_slots.iter().enumerate() {
        // rax/rdx carry the return value unless the original kept them.
        mov_rsp(&mut out, register, args + xmm_area + 8 * k as u32, false);
    }
    for (k, &xmm) in xmms.iter().enumerate() {
        movdqu_rsp(&mut out, xmm as u8, args + 16 * k as u32, false);
    }
    // add rsp, imm32 ; ret
    out.extend_from_slice(&[0x48, 0x81, 0xc4]);
    out.extend_from_slice(&frame.to_le_bytes());
    out.push(0xc3);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Formatter, NasmFormatter};

    fn disassemble(at: u64, bytes: &[u8]) -> Vec<String> {
        let mut formatter = NasmFormatter::new();
        Decoder::with_ip(64, bytes, at, DecoderOptions::NONE)
            .into_iter()
            .map(|i| {
                assert!(!i.is_invalid());
                let mut text = String::new();
                formatter.format(&i, &mut text);
                text
            })
            .collect()
    }

    #[test]
    fn thunk_saves_restores_and_calls() {
        // Save rdi and xmm1 around a call to 0x2000, thunk at 0x1000.
        let extra = RegisterSet((1 << 4) | (1 << 10));
        let code = disassemble(0x1000, &build(0x1000, 0x2000, extra));
        let text = code.join("\n");
        assert!(code[0].starts_with("sub rsp,"), "{text}");
        assert!(text.contains("movdqu [rsp+40h],xmm1"), "{text}");
        assert!(text.contains("mov [rsp+50h],rdi"), "{text}");
        assert!(text.contains("call 0000000000002000h"), "{text}");
        assert!(text.contains("mov rdi,[rsp+50h]"), "{text}");
        assert!(code.last().unwrap() == "ret", "{text}");
        // Frame keeps the call 16-byte aligned: sub is ≡ 8 (mod 16).
        let sub: u32 = u32::from_str_radix(code[0].trim_start_matches("sub rsp,").trim_end_matches('h'), 16).unwrap();
        assert_eq!(sub % 16, 8);
    }
}
