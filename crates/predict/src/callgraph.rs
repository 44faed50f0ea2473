//! The target module's direct call graph, decoded once per analysis: which
//! functions only constructors reach (init-only code: a patch of one never
//! runs, a patch calling one re-runs initialisation), and every direct
//! branch that crosses function boundaries (a branch from another function
//! into the bytes a trampoline overwrites is as fatal as one from inside).

use crate::code::ModuleText;
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic};
use shadowpatch_symbols::{Module, SymbolKind};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

#[derive(Debug, Clone, Default)]
pub struct ModuleCallGraph {
    /// Function start (runtime) → name.
    names: BTreeMap<u64, String>,
    /// Functions reached from constructors and from nothing else:
    /// start → the constructors that reach it.
    pub init_only: HashMap<u64, Vec<String>>,
    /// Direct branches whose target lies outside their own function:
    /// (target, source instruction), sorted.
    crossing: Vec<(u64, u64)>,
    /// Functions decoded.
    pub functions: usize,
}

impl ModuleCallGraph {
    pub fn build(module: &Module, text: &ModuleText) -> Self {
        let mut functions: Vec<(u64, u64, &str)> = module
            .image
            .symbols
            .iter()
            .filter(|s| s.kind == SymbolKind::Function && s.size > 0 && !s.ifunc)
            .map(|s| (s.address + module.bias, s.size, s.name.as_str()))
            .collect();
        functions.sort_unstable();
        functions.dedup_by_key(|(start, _, _)| *start);
        let names: BTreeMap<u64, String> = functions.iter().map(|(a, _, n)| (*a, n.to_string())).collect();
        let containing = |address: u64| -> Option<u64> {
            let index = functions.partition_point(|(start, _, _)| *start <= address);
            let (start, size, _) = functions.get(index.checked_sub(1)?)?;
            (address < start + size).then_some(*start)
        };
        let mut edges: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut address_taken: HashSet<u64> = module
            .image
            .data_pointers
            .iter()
            .map(|p| p + module.bias)
            .filter(|p| names.contains_key(p))
            .collect();
        let mut crossing = Vec::new();
        let mut instruction = Instruction::default();
        for &(start, size, _) in &functions {
            let Some(bytes) = text.bytes(start, size) else { continue };
            let end = start + size;
            let mut decoder = Decoder::with_ip(64, bytes, start, DecoderOptions::NONE);
            while decoder.can_decode() {
                decoder.decode_out(&mut instruction);
                if instruction.is_invalid() {
                    break;
                }
                match instruction.flow_control() {
                    FlowControl::Call | FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                        let target = instruction.near_branch_target();
                        if target == 0 || (start..end).contains(&target) {
                            continue;
                        }
                        crossing.push((target, instruction.ip()));
                        if let Some(callee) = containing(target) {
                            edges.entry(start).or_default().push(callee);
                        }
                    }
                    _ => {
                        // `lea reg, [rip+function]`: a callback or thread
                        // function whose address is taken.
                        if instruction.mnemonic() == Mnemonic::Lea && instruction.is_ip_rel_memory_operand() {
                            let address = instruction.ip_rel_memory_address();
                            if names.contains_key(&address) {
                                address_taken.insert(address);
                            }
                        }
                    }
                }
            }
        }
        crossing.sort_unstable();
        let constructors: Vec<u64> = module
            .image
            .constructors
            .iter()
            .map(|c| c + module.bias)
            .filter(|c| names.contains_key(c))
            .collect();
        let mut runtime_roots: Vec<u64> = address_taken.into_iter().collect();
        for (address, name) in &names {
            if name == "main" || name == "_start" {
                runtime_roots.push(*address);
            }
        }
        if !module.main {
            // A library's exported functions are called from outside.
            runtime_roots.extend(
                module
                    .image
                    .symbols
                    .iter()
                    .filter(|s| s.kind == SymbolKind::Function && s.global)
                    .map(|s| s.address + module.bias),
            );
        }
        runtime_roots.retain(|r| !constructors.contains(r));
        let runtime = reach(&edges, &runtime_roots);
        let mut init_only: HashMap<u64, Vec<String>> = HashMap::new();
        for constructor in &constructors {
            for function in reach(&edges, &[*constructor]) {
                if !runtime.contains(&function) {
                    init_only
                        .entry(function)
                        .or_default()
                        .push(names.get(constructor).cloned().unwrap_or_default());
                }
            }
        }
        ModuleCallGraph {
            functions: names.len(),
            names,
            init_only,
            crossing,
        }
    }

    /// Direct branches from outside `[start, end)` landing in `[from, to)`:
    /// (source instruction, target).
    pub fn branches_into(&self, from: u64, to: u64, start: u64, end: u64) -> Vec<(u64, u64)> {
        let first = self.crossing.partition_point(|(target, _)| *target < from);
        self.crossing[first..]
            .iter()
            .take_while(|(target, _)| *target < to)
            .filter(|(_, source)| !(start..end).contains(source))
            .map(|(target, source)| (*source, *target))
            .collect()
    }

    pub fn name(&self, address: u64) -> Option<&str> {
        self.names.get(&address).map(String::as_str)
    }
}

/// Every function reachable from `roots` through direct calls and jumps.
fn reach(edges: &HashMap<u64, Vec<u64>>, roots: &[u64]) -> HashSet<u64> {
    let mut seen: HashSet<u64> = roots.iter().copied().collect();
    let mut queue: VecDeque<u64> = roots.iter().copied().collect();
    while let Some(function) = queue.pop_front() {
        for callee in edges.get(&function).into_iter().flatten() {
            if seen.insert(*callee) {
                queue.push_back(*callee);
            }
        }
    }
    seen
}
