//! Moving a stopped thread forward over a few simple instructions without
//! running it: the tracer computes what each instruction does and sets the
//! registers (and the stack word a `push` or `call` writes) itself.
//!
//! Used instead of single-stepping a thread out of a function entry about to
//! be rewritten. A single step sets the trap flag and ends in a SIGTRAP
//! signal-delivery stop; a tracer killed in either state leaves the thread
//! a SIGTRAP with no tracer to take it, and the target dies. Emulation
//! leaves nothing behind: the stack word is written first (the word the
//! instruction itself is about to write, below the stack pointer, so
//! nothing live is there), then all registers in one `PTRACE_SETREGS`.
//! Whatever instant the tracer dies at, the thread holds either its old
//! state or the new one.
//!
//! Only what function prologues hold is emulated: `endbr64` and `nop`s,
//! `push reg`, `mov reg, reg` and `mov reg, imm`, `lea`, `call rel32`,
//! `jmp rel`, `add`/`sub reg, imm` (flags computed), `xor reg, reg` of a
//! register with itself. Anything else is declined and the caller lets the
//! thread run on instead.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

/// The effect of one emulated instruction.
#[derive(Debug, Clone)]
pub(crate) struct Effect {
    /// The registers after it.
    pub regs: libc::user_regs_struct,
    /// A stack word it writes (`push`, `call`): address, value.
    pub store: Option<(u64, u64)>,
    /// Whether the instruction pointer is the only register it changes
    /// (`endbr64`, `nop`, `jmp`): the thread can then be moved with one
    /// word written, not the whole register set.
    pub rip_only: bool,
}

/// What instruction `bytes` (at `regs.rip`) does to the thread, or `None`
/// when it is not one we emulate.
pub(crate) fn emulate(regs: &libc::user_regs_struct, bytes: &[u8]) -> Option<Effect> {
    let mut decoder = Decoder::with_ip(64, bytes, regs.rip, DecoderOptions::NONE);
    let instruction = decoder.decode();
    if instruction.is_invalid() || instruction.len() > bytes.len() {
        return None;
    }
    let mut next = *regs;
    next.rip = instruction.next_ip();
    let mut store = None;
    let rip_only = matches!(
        instruction.mnemonic(),
        Mnemonic::Endbr64 | Mnemonic::Nop | Mnemonic::Jmp
    );
    match instruction.mnemonic() {
        Mnemonic::Endbr64 | Mnemonic::Nop => {}
        Mnemonic::Push if instruction.op0_kind() == OpKind::Register && is_gpr64(instruction.op0_register()) => {
            let value = get(regs, instruction.op0_register())?;
            next.rsp = regs.rsp.wrapping_sub(8);
            store = Some((next.rsp, value));
        }
        Mnemonic::Call if instruction.code() == Code::Call_rel32_64 => {
            next.rsp = regs.rsp.wrapping_sub(8);
            store = Some((next.rsp, instruction.next_ip()));
            next.rip = instruction.near_branch_target();
        }
        Mnemonic::Jmp if matches!(instruction.op0_kind(), OpKind::NearBranch64) => {
            next.rip = instruction.near_branch_target();
        }
        Mnemonic::Mov if instruction.op0_kind() == OpKind::Register => {
            let value = match instruction.op1_kind() {
                OpKind::Register => get(regs, instruction.op1_register())?,
                OpKind::Immediate32 | OpKind::Immediate64 | OpKind::Immediate32to64 => instruction.immediate(1),
                _ => return None,
            };
            set(&mut next, instruction.op0_register(), value)?;
        }
        Mnemonic::Lea if instruction.op1_kind() == OpKind::Memory => {
            let address = effective_address(regs, &instruction)?;
            set(&mut next, instruction.op0_register(), address)?;
        }
        Mnemonic::Xor
            if instruction.op0_kind() == OpKind::Register
                && instruction.op1_kind() == OpKind::Register
                && instruction.op0_register() == instruction.op1_register() =>
        {
            set(&mut next, instruction.op0_register(), 0)?;
            next.eflags = flags(regs.eflags, 0, false, false, false, 64);
        }
        Mnemonic::Add | Mnemonic::Sub if instruction.op0_kind() == OpKind::Register => {
            let register = instruction.op0_register();
            let width = width(register)?;
            let a = get(regs, register)?;
            let b = match instruction.op1_kind() {
                OpKind::Immediate8to64 | OpKind::Immediate32to64 | OpKind::Immediate8to32 | OpKind::Immediate32 => {
                    instruction.immediate(1)
                }
                _ => return None,
            };
            let mask = if width == 64 { u64::MAX } else { u64::from(u32::MAX) };
            let (a, b) = (a & mask, b & mask);
            let sign = 1u64 << (width - 1);
            let (result, carry, overflow) = if instruction.mnemonic() == Mnemonic::Add {
                let result = a.wrapping_add(b) & mask;
                (result, result < a, (!(a ^ b) & (a ^ result) & sign) != 0)
            } else {
                let result = a.wrapping_sub(b) & mask;
                (result, a < b, ((a ^ b) & (a ^ result) & sign) != 0)
            };
            let adjust = ((a ^ b ^ result) >> 4) & 1 == 1;
            set(&mut next, register, result)?;
            next.eflags = flags(regs.eflags, result, carry, overflow, adjust, width);
        }
        _ => return None,
    }
    // Every arm above takes registers and immediates only (a `nop`'s or
    // `lea`'s memory operand is never accessed): no memory is read.
    Some(Effect {
        regs: next,
        store,
        rip_only,
    })
}

/// EFLAGS after an arithmetic result (`width` bits): CF, PF, AF, ZF, SF, OF
/// set, the other bits kept.
fn flags(old: u64, result: u64, carry: bool, overflow: bool, adjust: bool, width: u32) -> u64 {
    const CF: u64 = 1;
    const PF: u64 = 1 << 2;
    const AF: u64 = 1 << 4;
    const ZF: u64 = 1 << 6;
    const SF: u64 = 1 << 7;
    const OF: u64 = 1 << 11;
    let mut flags = old & !(CF | PF | AF | ZF | SF | OF);
    let bit = |condition: bool, flag: u64| if condition { flag } else { 0 };
    flags |= bit(carry, CF);
    flags |= bit((result as u8).count_ones().is_multiple_of(2), PF);
    flags |= bit(adjust, AF);
    flags |= bit(result == 0, ZF);
    flags |= bit((result >> (width - 1)) & 1 == 1, SF);
    flags |= bit(overflow, OF);
    flags
}

fn effective_address(regs: &libc::user_regs_struct, instruction: &Instruction) -> Option<u64> {
    if instruction.memory_base() == Register::RIP {
        return Some(instruction.memory_displacement64());
    }
    if instruction.segment_prefix() != Register::None {
        return None;
    }
    let base = match instruction.memory_base() {
        Register::None => 0,
        register if is_gpr64(register) => get(regs, register)?,
        _ => return None,
    };
    let index = match instruction.memory_index() {
        Register::None => 0,
        register if is_gpr64(register) => get(regs, register)?,
        _ => return None,
    };
    let address = base
        .wrapping_add(index.wrapping_mul(u64::from(instruction.memory_index_scale())))
        .wrapping_add(instruction.memory_displacement64());
    Some(address)
}

fn is_gpr64(register: Register) -> bool {
    register.is_gpr64()
}

fn width(register: Register) -> Option<u32> {
    if register.is_gpr64() {
        Some(64)
    } else if register.is_gpr32() {
        Some(32)
    } else {
        None
    }
}

/// A general-purpose register's value (32-bit names read the low half).
fn get(regs: &libc::user_regs_struct, register: Register) -> Option<u64> {
    let full = *slot_ref(regs, register.full_register())?;
    match width(register)? {
        64 => Some(full),
        _ => Some(full & u64::from(u32::MAX)),
    }
}

/// Write a general-purpose register (a 32-bit write zero-extends, as the
/// CPU does).
fn set(regs: &mut libc::user_regs_struct, register: Register, value: u64) -> Option<()> {
    let value = match width(register)? {
        64 => value,
        _ => value & u64::from(u32::MAX),
    };
    *slot_mut(regs, register.full_register())? = value;
    Some(())
}

fn slot_ref(regs: &libc::user_regs_struct, register: Register) -> Option<&u64> {
    Some(match register {
        Register::RAX => &regs.rax,
        Register::RBX => &regs.rbx,
        Register::RCX => &regs.rcx,
        Register::RDX => &regs.rdx,
        Register::RSI => &regs.rsi,
        Register::RDI => &regs.rdi,
        Register::RBP => &regs.rbp,
        Register::RSP => &regs.rsp,
        Register::R8 => &regs.r8,
        Register::R9 => &regs.r9,
        Register::R10 => &regs.r10,
        Register::R11 => &regs.r11,
        Register::R12 => &regs.r12,
        Register::R13 => &regs.r13,
        Register::R14 => &regs.r14,
        Register::R15 => &regs.r15,
        _ => return None,
    })
}

fn slot_mut(regs: &mut libc::user_regs_struct, register: Register) -> Option<&mut u64> {
    Some(match register {
        Register::RAX => &mut regs.rax,
        Register::RBX => &mut regs.rbx,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::RBP => &mut regs.rbp,
        Register::RSP => &mut regs.rsp,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(rip: u64) -> libc::user_regs_struct {
        let mut regs = crate::sigframe::zeroed_regs();
        regs.rip = rip;
        regs.rsp = 0x7000_1000;
        regs.eflags = 0x202;
        regs
    }

    #[test]
    fn prologue_instructions_move_the_thread_and_write_what_the_cpu_would() {
        let mut start = regs(0x1000);
        start.rbp = 0xdead;
        // push rbp
        let effect = emulate(&start, &[0x55]).unwrap();
        assert_eq!(effect.regs.rip, 0x1001);
        assert_eq!(effect.regs.rsp, 0x7000_0ff8);
        assert_eq!(effect.store, Some((0x7000_0ff8, 0xdead)));
        assert!(!effect.rip_only);
        // endbr64
        let effect = emulate(&start, &[0xf3, 0x0f, 0x1e, 0xfa]).unwrap();
        assert_eq!((effect.regs.rip, effect.rip_only), (0x1004, true));
        // call rel32 (+0x10)
        let effect = emulate(&start, &[0xe8, 0x10, 0, 0, 0]).unwrap();
        assert_eq!((effect.regs.rip, effect.store), (0x1015, Some((0x7000_0ff8, 0x1005))));
        // sub rsp, 8: flags of a non-zero, positive result without borrow
        let effect = emulate(&start, &[0x48, 0x83, 0xec, 0x08]).unwrap();
        assert_eq!(effect.regs.rsp, 0x7000_0ff8);
        // 0x70001000 - 8: a borrow out of bit 3 (AF), odd parity of 0xf8.
        assert_eq!(effect.regs.eflags & 0x8d5, 0x10, "{:#x}", effect.regs.eflags);
        // sub eax, 1 from 0: borrow, sign, zero-extended result
        let effect = emulate(&start, &[0x83, 0xe8, 0x01]).unwrap();
        assert_eq!(effect.regs.rax, 0xffff_ffff);
        assert_eq!(effect.regs.eflags & 0x81, 0x81, "CF and SF");
        // xor eax, eax
        start.rax = 77;
        let effect = emulate(&start, &[0x31, 0xc0]).unwrap();
        assert_eq!((effect.regs.rax, effect.regs.eflags & 0x44), (0, 0x44), "ZF and PF");
        // mov rbp, rsp
        assert_eq!(emulate(&start, &[0x48, 0x89, 0xe5]).unwrap().regs.rbp, 0x7000_1000);
    }

    #[test]
    fn memory_reads_and_unknown_instructions_are_declined() {
        let start = regs(0x1000);
        assert!(emulate(&start, &[0x48, 0x8b, 0x07]).is_none(), "mov rax, [rdi]");
        assert!(
            emulate(&start, &[0x48, 0x83, 0x2f, 0x01]).is_none(),
            "sub qword [rdi], 1"
        );
        assert!(emulate(&start, &[0xc3]).is_none(), "ret");
        assert!(emulate(&start, &[0x0f, 0x05]).is_none(), "syscall");
        assert!(emulate(&start, &[0x48]).is_none(), "cut short");
    }
}
