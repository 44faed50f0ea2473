//! ABI comparison of a replaced function and its replacement. With DWARF on
//! both sides: parameter count, each parameter's register class and size,
//! struct layouts (by value or behind a pointer), return type, variadic and
//! calling-convention attributes. Without: a register-use heuristic — which
//! SysV argument registers (rdi rsi rdx rcx r8 r9, xmm0-7) each function
//! reads before writing them, following direct calls and tail jumps. The
//! heuristic also checks the DWARF signature against the code (an `ms_abi`
//! replacement reads rcx/rdx where its declared parameters never arrive).

use crate::code::{CodeSpaces, Space};
use crate::finding::Severity;
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, OpAccess, Register};
use serde_json::json;
use shadowpatch_patch::clobber::is_zeroing_idiom;
use shadowpatch_symbols::dwarf::{FunctionInfo, TypeClass, TypeShape};
use std::collections::HashMap;

/// How an ABI finding was established (reported in its evidence).
pub const METHOD_DWARF: &str = "dwarf";
pub const METHOD_REGISTERS: &str = "register-use heuristic";

const INTEGER_ARGUMENTS: [Register; 6] = [
    Register::RDI,
    Register::RSI,
    Register::RDX,
    Register::RCX,
    Register::R8,
    Register::R9,
];

/// A set of SysV argument registers: bits 0-5 rdi rsi rdx rcx r8 r9, bits
/// 6-13 xmm0-7.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ArgumentRegisters(pub u16);

impl ArgumentRegisters {
    pub const ALL: ArgumentRegisters = ArgumentRegisters((1 << 14) - 1);

    fn bit(register: Register) -> Option<u16> {
        let full = register.full_register();
        if let Some(index) = INTEGER_ARGUMENTS.iter().position(|r| *r == full) {
            return Some(index as u16);
        }
        let zmm = full as u32;
        let first = Register::ZMM0 as u32;
        (first..first + 8).contains(&zmm).then(|| 6 + (zmm - first) as u16)
    }

    pub fn minus(self, other: ArgumentRegisters) -> ArgumentRegisters {
        ArgumentRegisters(self.0 & !other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn names(self) -> Vec<String> {
        let gpr = ["rdi", "rsi", "rdx", "rcx", "r8", "r9"];
        let mut names: Vec<String> = (0..6)
            .filter(|i| self.0 & (1 << i) != 0)
            .map(|i| gpr[i].to_string())
            .collect();
        names.extend(
            (0..8)
                .filter(|i| self.0 & (1 << (6 + i)) != 0)
                .map(|i| format!("xmm{i}")),
        );
        names
    }
}

/// Argument registers the function at `entry` reads before writing them
/// (in layout order), including what the functions it calls or tail-jumps
/// to read of the registers it passes on unchanged.
pub fn arguments_read(spaces: &CodeSpaces, space: Space, entry: u64, depth: u32) -> ArgumentRegisters {
    let mut memo = HashMap::new();
    arguments_read_inner(spaces, space, entry, depth, &mut memo)
}

fn arguments_read_inner(
    spaces: &CodeSpaces,
    space: Space,
    entry: u64,
    depth: u32,
    memo: &mut HashMap<(Space, u64), ArgumentRegisters>,
) -> ArgumentRegisters {
    if let Some(known) = memo.get(&(space, entry)) {
        return *known;
    }
    // Recursion meets itself here: it adds nothing new.
    memo.insert((space, entry), ArgumentRegisters::default());
    let Some((start, bytes)) = spaces.function_at(space, entry) else {
        return ArgumentRegisters::default();
    };
    let end = start + bytes.len() as u64;
    // Decode once, then follow the control flow: a register counts as an
    // argument when some path from the entry reads it before writing it.
    // (Reading in layout order instead takes a loop body placed before its
    // header for reads of arguments: gcc lays loops out that way.)
    struct Step {
        reads: u16,
        writes: u16,
        flow: FlowControl,
        target: u64,
        next: u64,
    }
    let mut steps: HashMap<u64, Step> = HashMap::new();
    let mut info = InstructionInfoFactory::new();
    let mut decoder = Decoder::with_ip(64, bytes, start, DecoderOptions::NONE);
    let mut instruction = Instruction::default();
    while decoder.can_decode() {
        decoder.decode_out(&mut instruction);
        if instruction.is_invalid() {
            break;
        }
        let zeroing = is_zeroing_idiom(&instruction);
        let (mut reads, mut writes) = (0u16, 0u16);
        for used in info.info(&instruction).used_registers() {
            let Some(bit) = ArgumentRegisters::bit(used.register()) else {
                continue;
            };
            if !zeroing
                && matches!(
                    used.access(),
                    OpAccess::Read | OpAccess::CondRead | OpAccess::ReadWrite | OpAccess::ReadCondWrite
                )
            {
                reads |= 1 << bit;
            }
            // A conditional write may not happen: only unconditional writes
            // make later reads non-arguments.
            if matches!(used.access(), OpAccess::Write | OpAccess::ReadWrite) {
                writes |= 1 << bit;
            }
        }
        steps.insert(
            instruction.ip(),
            Step {
                reads,
                writes,
                flow: instruction.flow_control(),
                target: instruction.near_branch_target(),
                next: instruction.next_ip(),
            },
        );
    }
    /// Paths explored at most (ip, registers written so far): a bound for
    /// pathological code, far above what real functions need.
    const MAX_STATES: usize = 200_000;
    let mut read = ArgumentRegisters::default();
    let mut seen: std::collections::HashSet<(u64, u16)> = std::collections::HashSet::new();
    let mut work = vec![(entry, 0u16)];
    while let Some((ip, written)) = work.pop() {
        if seen.len() >= MAX_STATES || !seen.insert((ip, written)) {
            continue;
        }
        let Some(step) = steps.get(&ip) else { continue };
        read.0 |= step.reads & !written;
        let mut written = written | step.writes;
        let inside = |target: u64| target != 0 && (start..end).contains(&target);
        match step.flow {
            FlowControl::Call | FlowControl::UnconditionalBranch => {
                let is_call = step.flow == FlowControl::Call;
                if step.target != 0 && (is_call || !inside(step.target)) && depth > 0 {
                    let callee = arguments_read_inner(spaces, space, step.target, depth - 1, memo);
                    read.0 |= callee.0 & !written;
                }
                if is_call {
                    // The callee may change every argument register.
                    written = ArgumentRegisters::ALL.0;
                    work.push((step.next, written));
                } else if inside(step.target) {
                    work.push((step.target, written));
                }
            }
            FlowControl::IndirectCall => work.push((step.next, ArgumentRegisters::ALL.0)),
            FlowControl::ConditionalBranch => {
                if inside(step.target) {
                    work.push((step.target, written));
                }
                work.push((step.next, written));
            }
            FlowControl::Return | FlowControl::IndirectBranch | FlowControl::Interrupt | FlowControl::Exception => {}
            _ => work.push((step.next, written)),
        }
    }
    memo.insert((space, entry), read);
    read
}

/// `xor eax, eax` and kin read nothing: the result does not depend on it.
/// The argument registers a signature's parameters arrive in under the
/// SysV ABI; `None` when that needs the full classification (aggregates by
/// value, variadic functions, more than six of a class).
pub fn expected_arguments(info: &FunctionInfo) -> Option<ArgumentRegisters> {
    if info.variadic {
        return None;
    }
    let mut set = ArgumentRegisters::default();
    let (mut integers, mut floats) = (0u16, 0u16);
    // A struct returned in memory takes rdi for its address.
    if info.return_type.class == TypeClass::Aggregate && info.return_type.size.is_none_or(|s| s > 16) {
        set.0 |= 1;
        integers = 1;
    }
    for (_, parameter) in &info.parameters {
        match parameter.class {
            TypeClass::Integer | TypeClass::Pointer => {
                if integers >= 6 {
                    return None;
                }
                set.0 |= 1 << integers;
                integers += 1;
            }
            TypeClass::Float if parameter.size.is_some_and(|s| s <= 8) => {
                if floats >= 8 {
                    return None;
                }
                set.0 |= 1 << (6 + floats);
                floats += 1;
            }
            _ => return None,
        }
    }
    Some(set)
}

/// One ABI difference, before it becomes a finding.
#[derive(Debug, Clone)]
pub struct AbiDifference {
    pub code: &'static str,
    pub severity: Severity,
    pub message: String,
    pub evidence: serde_json::Value,
}

fn difference(code: &'static str, severity: Severity, message: String, evidence: serde_json::Value) -> AbiDifference {
    AbiDifference {
        code,
        severity,
        message,
        evidence,
    }
}

/// Compare two DWARF signatures.
pub fn compare_signatures(old: &FunctionInfo, new: &FunctionInfo) -> Vec<AbiDifference> {
    let mut differences = Vec::new();
    let signature = |f: &FunctionInfo| {
        let parameters: Vec<&str> = f.parameters.iter().map(|(_, t)| t.name.as_str()).collect();
        format!(
            "{} {}({}{})",
            f.return_type.name,
            f.name,
            parameters.join(", "),
            if f.variadic { ", ..." } else { "" }
        )
    };
    let base = || json!({ "method": METHOD_DWARF, "old": signature(old), "new": signature(new) });
    let with = |extra: serde_json::Value| {
        let mut evidence = base();
        if let (Some(target), Some(more)) = (evidence.as_object_mut(), extra.as_object()) {
            target.extend(more.clone());
        }
        evidence
    };
    if old.variadic != new.variadic || old.calling_convention != new.calling_convention {
        differences.push(difference(
            "calling-convention",
            Severity::Blocking,
            format!(
                "the calling convention changed ({} → {}): callers pass arguments the way the old one expects",
                describe_convention(old),
                describe_convention(new)
            ),
            base(),
        ));
    }
    if old.parameters.len() != new.parameters.len() {
        differences.push(difference(
            "abi-parameter-count",
            Severity::Blocking,
            format!(
                "the replacement takes {} parameter{}, the replaced function {}: callers pass {}",
                new.parameters.len(),
                if new.parameters.len() == 1 { "" } else { "s" },
                old.parameters.len(),
                old.parameters.len()
            ),
            base(),
        ));
    }
    for (index, ((_, old_type), (name, new_type))) in old.parameters.iter().zip(&new.parameters).enumerate() {
        let what = format!("parameter {} ({})", index + 1, name.as_deref().unwrap_or("unnamed"));
        differences.extend(compare_types(&what, old_type, new_type, &with));
    }
    differences.extend(compare_types(
        "the return type",
        &old.return_type,
        &new.return_type,
        &with,
    ));
    differences
}

fn describe_convention(f: &FunctionInfo) -> String {
    match (f.variadic, f.calling_convention) {
        (true, _) => "variadic".into(),
        (false, None | Some(1)) => "normal".into(),
        (false, Some(other)) => format!("DW_CC {other}"),
    }
}

fn compare_types(
    what: &str,
    old: &TypeShape,
    new: &TypeShape,
    with: &dyn Fn(serde_json::Value) -> serde_json::Value,
) -> Vec<AbiDifference> {
    let return_type = what == "the return type";
    let evidence = || with(json!({ "what": what, "old_type": old, "new_type": new }));
    if old.class != new.class && old.class != TypeClass::Unknown && new.class != TypeClass::Unknown {
        let code = if return_type {
            "abi-return-type"
        } else {
            "abi-parameter-class"
        };
        return vec![difference(
            code,
            Severity::Blocking,
            format!(
                "{what} changed from {} to {}: it travels in {} instead of {}",
                old.name,
                new.name,
                register_kind(new.class),
                register_kind(old.class)
            ),
            evidence(),
        )];
    }
    if old.size.is_some() && new.size.is_some() && old.size != new.size {
        let code = if return_type {
            "abi-return-type"
        } else {
            "abi-parameter-size"
        };
        return vec![difference(
            code,
            Severity::Blocking,
            format!(
                "{what} changed from {} ({} bytes) to {} ({} bytes)",
                old.name,
                old.size.unwrap_or(0),
                new.name,
                new.size.unwrap_or(0)
            ),
            evidence(),
        )];
    }
    if !old.members.is_empty() && !new.members.is_empty() && old.members != new.members
        || !old.pointee_members.is_empty()
            && !new.pointee_members.is_empty()
            && old.pointee_members != new.pointee_members
    {
        return vec![difference(
            "struct-layout-changed",
            Severity::Blocking,
            format!(
                "{what}: the layout of {} differs between the target and the patch (members at other offsets or sizes)",
                old.name
            ),
            evidence(),
        )];
    }
    if old.name != new.name {
        return vec![difference(
            "abi-type-renamed",
            Severity::Warning,
            format!(
                "{what} is {} in the target and {} in the patch (same size and class: check the meaning)",
                old.name, new.name
            ),
            evidence(),
        )];
    }
    Vec::new()
}

fn register_kind(class: TypeClass) -> &'static str {
    match class {
        TypeClass::Integer | TypeClass::Pointer => "a general-purpose register",
        TypeClass::Float => "an SSE register",
        TypeClass::Aggregate => "memory or a register pair",
        TypeClass::Void => "nothing",
        TypeClass::Unknown => "an unknown place",
    }
}

/// Compare what two functions read as arguments, without DWARF.
pub fn compare_register_use(old: ArgumentRegisters, new: ArgumentRegisters) -> Vec<AbiDifference> {
    let evidence = json!({
        "method": METHOD_REGISTERS,
        "old_reads": old.names(),
        "new_reads": new.names(),
    });
    let only_new = new.minus(old);
    let only_old = old.minus(new);
    if only_new.is_empty() {
        return Vec::new();
    }
    if !only_old.is_empty() {
        return vec![difference(
            "calling-convention",
            Severity::Warning,
            format!(
                "the replacement reads its arguments from {} where the replaced function reads {}: another calling convention or parameter order (register-use heuristic, no DWARF)",
                only_new.names().join(", "),
                only_old.names().join(", ")
            ),
            evidence,
        )];
    }
    vec![difference(
        "abi-parameter-count",
        Severity::Warning,
        format!(
            "the replacement reads {} as argument{}, which the replaced function never reads: a parameter callers may not pass (register-use heuristic, no DWARF)",
            only_new.names().join(", "),
            if only_new.names().len() == 1 { "" } else { "s" }
        ),
        evidence,
    )]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_use_comparison_tells_extra_parameters_from_another_convention() {
        let rdi_rsi = ArgumentRegisters(0b11);
        let rdi_rsi_rdx = ArgumentRegisters(0b111);
        let rdx_rcx = ArgumentRegisters(0b1100);
        assert!(compare_register_use(rdi_rsi, rdi_rsi).is_empty());
        assert!(
            compare_register_use(rdi_rsi_rdx, rdi_rsi).is_empty(),
            "reading fewer is fine"
        );
        assert_eq!(
            compare_register_use(rdi_rsi, rdi_rsi_rdx)[0].code,
            "abi-parameter-count"
        );
        let changed = compare_register_use(rdi_rsi, rdx_rcx);
        assert_eq!(changed[0].code, "calling-convention");
        assert_eq!(changed[0].evidence["method"], METHOD_REGISTERS);
        assert_eq!(ArgumentRegisters(1 << 6 | 1).names(), vec!["rdi", "xmm0"]);
    }

    fn shape(name: &str, size: u64, class: TypeClass) -> TypeShape {
        TypeShape {
            name: name.into(),
            size: Some(size),
            class,
            members: Vec::new(),
            pointee_members: Vec::new(),
            pointee_size: None,
        }
    }

    fn function(parameters: Vec<TypeShape>, return_type: TypeShape) -> FunctionInfo {
        FunctionInfo {
            name: "f".into(),
            low_pc: None,
            parameters: parameters.into_iter().map(|t| (None, t)).collect(),
            return_type,
            variadic: false,
            calling_convention: None,
            declaration: false,
        }
    }

    #[test]
    fn dwarf_comparison_finds_count_class_size_and_return_changes() {
        let long = shape("long", 8, TypeClass::Integer);
        let int = shape("int", 4, TypeClass::Integer);
        let double = shape("double", 8, TypeClass::Float);
        let old = function(vec![long.clone(), long.clone()], long.clone());
        let codes = |new: FunctionInfo| -> Vec<&'static str> {
            compare_signatures(&old, &new).iter().map(|d| d.code).collect()
        };
        assert!(codes(old.clone()).is_empty());
        assert_eq!(
            codes(function(vec![long.clone(); 3], long.clone())),
            ["abi-parameter-count"]
        );
        assert_eq!(
            codes(function(vec![int.clone(), int.clone()], long.clone())),
            ["abi-parameter-size", "abi-parameter-size"]
        );
        assert_eq!(
            codes(function(vec![long.clone(), double.clone()], long.clone())),
            ["abi-parameter-class"]
        );
        assert_eq!(
            codes(function(vec![long.clone(), long.clone()], double.clone())),
            ["abi-return-type"]
        );
        let expected = expected_arguments(&function(vec![long.clone(), double, long], int)).unwrap();
        assert_eq!(expected.names(), vec!["rdi", "rsi", "xmm0"]);
    }
}
