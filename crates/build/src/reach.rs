//! The target's functions the replaced ones reach. A stripped target has
//! no symbols but those the manifest binds, and `build` binds what the
//! patch refers to: the analysis then walks the replacement through named
//! functions and the original into unnamed code, and calls what the
//! original reaches through a function it cannot name "new" (memcached's
//! dispatcher calls `process_stat`, which allocates; a rebuild that
//! inlined `process_stat` calls its allocators by name). Binding every
//! function the original reaches by direct calls and jumps makes both
//! walks see the same code.

use crate::target::{bytes_at, BinaryKind, BinarySymbol, SymbolMap};
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction};
use shadowpatch_patch::manifest::{BoundKind, BoundSymbol};
use std::collections::BTreeSet;

/// Functions of `symbols` reached from `roots` (start addresses) by
/// direct calls and jumps, roots excluded, in address order.
pub fn reached<'s>(target: &[u8], symbols: &'s SymbolMap, roots: &[u64]) -> Vec<&'s BinarySymbol> {
    let mut functions: Vec<&BinarySymbol> = symbols
        .symbols
        .iter()
        .filter(|s| s.kind == BinaryKind::Function && s.size > 0)
        .collect();
    functions.sort_by_key(|s| (s.address, std::cmp::Reverse(s.size)));
    functions.dedup_by_key(|s| s.address);
    let containing = |address: u64| -> Option<usize> {
        let index = functions.partition_point(|s| s.address <= address).checked_sub(1)?;
        (address < functions[index].address + functions[index].size).then_some(index)
    };
    let mut seen: BTreeSet<usize> = BTreeSet::new();
    let mut queue: Vec<usize> = roots.iter().filter_map(|&root| containing(root)).collect();
    let rooted: BTreeSet<usize> = queue.iter().copied().collect();
    let mut instruction = Instruction::default();
    while let Some(index) = queue.pop() {
        if !seen.insert(index) {
            continue;
        }
        let function = functions[index];
        let Some(bytes) = bytes_at(target, function.address, function.size) else {
            continue;
        };
        let mut decoder = Decoder::with_ip(64, bytes, function.address, DecoderOptions::NONE);
        while decoder.can_decode() {
            decoder.decode_out(&mut instruction);
            if !matches!(
                instruction.flow_control(),
                FlowControl::Call | FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
            ) {
                continue;
            }
            let to = instruction.near_branch_target();
            if let Some(callee) = containing(to).filter(|callee| *callee != index && !seen.contains(callee)) {
                queue.push(callee);
            }
        }
    }
    seen.into_iter()
        .filter(|index| !rooted.contains(index))
        .map(|index| functions[index])
        .collect()
}

/// A stripped target: bind every function the replaced ones reach (see
/// `reach`) under its manifest name, so that the analysis walks the
/// original as far as the replacement. A name two functions share is left
/// out (a `[[symbol]]` must name one address).
pub fn bind_reached(bound: &mut Vec<BoundSymbol>, target: &[u8], symbols: &SymbolMap, roots: &[u64]) {
    let public = |s: &BinarySymbol| match (&s.file, s.global) {
        (_, true) => Some(s.name.clone()),
        (Some(file), false) => Some(format!("{file}::{}", s.name)),
        (None, false) => None,
    };
    let mut addresses: std::collections::HashMap<String, std::collections::BTreeSet<u64>> = Default::default();
    for symbol in symbols.symbols.iter().filter(|s| s.kind == BinaryKind::Function) {
        if let Some(name) = public(symbol) {
            addresses.entry(name).or_default().insert(symbol.address);
        }
    }
    for found in reached(target, symbols, roots) {
        let Some(name) = public(found) else { continue };
        if addresses.get(&name).is_some_and(|a| a.len() > 1) || bound.iter().any(|b| b.name == name) {
            continue;
        }
        bound.push(BoundSymbol {
            name,
            address: found.address,
            size: found.size,
            kind: BoundKind::Function,
        });
    }
}
