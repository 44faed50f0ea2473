//! Which caller-saved registers a function may change, transitively.
//!
//! Compilers assume more than the ABI about callees they can see: with
//! interprocedural register allocation (gcc's `-fipa-ra`, on at -O2) a
//! caller keeps values in caller-saved registers across a call when it
//! knows the callee leaves them alone. A replacement function that changes
//! one of those registers corrupts its callers. So for every replacement we
//! compute the registers the original may change and those the new function
//! may change; when the new set is not a subset of the old, the trampoline
//! goes through a thunk that saves and restores the difference.
//!
//! The analysis decodes the function's bytes (its symbol's extent) with
//! iced-x86 and follows direct calls and tail jumps into functions it can
//! read; an indirect call, a call through the PLT or into code it cannot
//! read counts as the whole ABI caller-saved set. Callee-saved registers
//! are preserved by every function and not tracked.

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register,
};
use std::collections::HashMap;

/// A set of caller-saved registers: bits 0-8 rax rcx rdx rsi rdi r8 r9
/// r10 r11, bits 9-24 xmm0-15.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, serde::Serialize, serde::Deserialize)]
pub struct RegisterSet(pub u32);

pub const GPRS: [Register; 9] = [
    Register::RAX,
    Register::RCX,
    Register::RDX,
    Register::RSI,
    Register::RDI,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
];

impl RegisterSet {
    /// Every register the ABI lets a callee change.
    pub const ALL: RegisterSet = RegisterSet((1 << 25) - 1);

    pub fn contains_all(self, other: RegisterSet) -> bool {
        other.0 & !self.0 == 0
    }

    pub fn minus(self, other: RegisterSet) -> RegisterSet {
        RegisterSet(self.0 & !other.0)
    }

    pub fn union(self, other: RegisterSet) -> RegisterSet {
        RegisterSet(self.0 | other.0)
    }

    fn bit(register: Register) -> Option<u32> {
        let full = register.full_register();
        if let Some(index) = GPRS.iter().position(|r| *r == full) {
            return Some(index as u32);
        }
        // full_register of an XMM/YMM register is the ZMM register.
        let zmm = full as u32;
        let first = Register::ZMM0 as u32;
        (first..first + 16).contains(&zmm).then(|| 9 + zmm - first)
    }

    /// General-purpose registers in the set (indices into `GPRS`).
    pub fn gprs(self) -> impl Iterator<Item = usize> {
        (0..9).filter(move |i| self.0 & (1 << i) != 0)
    }

    /// XMM registers in the set (0-15).
    pub fn xmms(self) -> impl Iterator<Item = u32> {
        (0..16).filter(move |i| self.0 & (1 << (9 + i)) != 0)
    }

    /// Names, for messages: `rdi, xmm1`.
    pub fn names(self) -> String {
        let gpr = ["rax", "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11"];
        let mut names: Vec<String> = self.gprs().map(|i| gpr[i].to_string()).collect();
        names.extend(self.xmms().map(|i| format!("xmm{i}")));
        names.join(", ")
    }
}

/// A function's code, as the analysis sees it.
pub trait CodeSource {
    /// The bytes and start address of the function containing `address`,
    /// if it is a function whose code can be read.
    fn function_at(&mut self, address: u64) -> Option<(u64, Vec<u8>)>;
}

/// Registers the function at `entry` may change, following callees up to
/// `depth` levels deep.
pub fn clobbered(source: &mut dyn CodeSource, entry: u64, depth: u32) -> RegisterSet {
    let mut memo = HashMap::new();
    clobbered_inner(source, entry, depth, &mut memo)
}

fn clobbered_inner(
    source: &mut dyn CodeSource,
    entry: u64,
    depth: u32,
    memo: &mut HashMap<u64, RegisterSet>,
) -> RegisterSet {
    if let Some(known) = memo.get(&entry) {
        return *known;
    }
    // Recursion (direct or mutual) meets itself here: assume the worst
    // until the first pass completes.
    memo.insert(entry, RegisterSet::ALL);
    let Some((start, bytes)) = source.function_at(entry) else {
        return RegisterSet::ALL;
    };
    if depth == 0 {
        return RegisterSet::ALL;
    }
    let end = start + bytes.len() as u64;
    let mut set = RegisterSet::default();
    let mut info = InstructionInfoFactory::new();
    let mut decoder = Decoder::with_ip(64, &bytes, start, DecoderOptions::NONE);
    for instruction in &mut decoder {
        if instruction.is_invalid() {
            break;
        }
        for used in info.info(&instruction).used_registers() {
            let writes = matches!(
                used.access(),
                OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
            );
            if writes {
                if let Some(bit) = RegisterSet::bit(used.register()) {
                    set.0 |= 1 << bit;
                }
            }
        }
        match instruction.flow_control() {
            FlowControl::Call | FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                let target = instruction.near_branch_target();
                let is_call = instruction.flow_control() == FlowControl::Call;
                if target == 0 {
                    set = set.union(RegisterSet::ALL);
                } else if is_call || !(start..end).contains(&target) {
                    // A call, or a jump out of the function (tail call).
                    set = set.union(clobbered_inner(source, target, depth - 1, memo));
                }
            }
            FlowControl::IndirectCall | FlowControl::IndirectBranch => set = set.union(RegisterSet::ALL),
            _ => {}
        }
        if set == RegisterSet::ALL {
            break;
        }
    }
    memo.insert(entry, set);
    set
}

/// `xor eax, eax` and the like: iced-x86 lists the register as read, but
/// the result does not depend on it (a write only).
pub fn is_zeroing_idiom(instruction: &Instruction) -> bool {
    matches!(
        instruction.mnemonic(),
        Mnemonic::Xor
            | Mnemonic::Sub
            | Mnemonic::Pxor
            | Mnemonic::Xorps
            | Mnemonic::Xorpd
            | Mnemonic::Vpxor
            | Mnemonic::Vxorps
            | Mnemonic::Vxorpd
    ) && instruction.op_count() >= 2
        && instruction.op0_kind() == OpKind::Register
        && instruction.op1_kind() == OpKind::Register
        && instruction.op0_register() == instruction.op1_register()
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Functions(Vec<(u64, Vec<u8>)>);

    impl CodeSource for Functions {
        fn function_at(&mut self, address: u64) -> Option<(u64, Vec<u8>)> {
            self.0
                .iter()
                .find(|(start, bytes)| (*start..*start + bytes.len() as u64).contains(&address))
                .cloned()
        }
    }

    #[test]
    fn follows_direct_calls_and_counts_only_writes() {
        // 0x1000: call 0x2000 ; add rax, 1 ; ret
        // 0x2000: imul rax, rdi, 3 ; ret   (reads rdi, writes rax)
        let mut code = Functions(vec![
            (0x1000, vec![0xe8, 0xfb, 0x0f, 0x00, 0x00, 0x48, 0x83, 0xc0, 0x01, 0xc3]),
            (0x2000, vec![0x48, 0x6b, 0xc7, 0x03, 0xc3]),
        ]);
        let set = clobbered(&mut code, 0x1000, 4);
        assert_eq!(set.names(), "rax");
        // imul rdi, [rax] writes rdi.
        let mut code = Functions(vec![(0x3000, vec![0x48, 0x0f, 0xaf, 0x38, 0xc3])]);
        assert_eq!(clobbered(&mut code, 0x3000, 4).names(), "rdi");
    }

    #[test]
    fn unknown_or_indirect_callees_clobber_everything() {
        // call 0x9000 (unreadable) ; ret
        let mut code = Functions(vec![(0x1000, vec![0xe8, 0xfb, 0x7f, 0x00, 0x00, 0xc3])]);
        assert_eq!(clobbered(&mut code, 0x1000, 4), RegisterSet::ALL);
        // call rax ; ret
        let mut code = Functions(vec![(0x1000, vec![0xff, 0xd0, 0xc3])]);
        assert_eq!(clobbered(&mut code, 0x1000, 4), RegisterSet::ALL);
        assert!(RegisterSet::ALL.contains_all(RegisterSet(5)));
        assert!(!RegisterSet(1).contains_all(RegisterSet(3)));
    }
}
