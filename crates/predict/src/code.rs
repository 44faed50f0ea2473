//! What a function's code does, transitively: the functions it reaches, the
//! other modules' functions it calls (by name), system call instructions,
//! backward branches (loops), indirect calls, and the global variables it
//! reads or writes with which offset and width. Decoded with iced-x86, in
//! the style of `shadowpatch_patch::clobber`: direct calls and tail jumps
//! are followed into functions that can be read, to a bounded depth, in the
//! target module (live bytes, active patches' entries shown as originally)
//! and in the patch object (its image before relocation), and from the
//! patch into the target through the symbols the patch imports.

use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory, Mnemonic, OpAccess, OpKind, Register,
};
use serde::Serialize;
use shadowpatch_patch::object::{PatchObject, RelocationKind};
use shadowpatch_process::{Mapping, TargetError, TargetMemory};
use shadowpatch_symbols::{Module, SymbolKind};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// Which code an address belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Space {
    /// The target module, at runtime addresses.
    Target,
    /// The patch object, at object addresses.
    Patch,
}

/// The executable bytes of the target module, read once from the live
/// process (one `process_vm_readv` per mapping), with entries that active
/// patches rewrote put back as they were.
#[derive(Debug, Clone, Default)]
pub struct ModuleText {
    ranges: Vec<(u64, Vec<u8>)>,
}

impl ModuleText {
    pub fn read(
        memory: &mut TargetMemory,
        maps: &[Mapping],
        module: &Module,
        originals: &[(u64, Vec<u8>)],
    ) -> Result<Self, TargetError> {
        let wanted: Vec<(u64, usize)> = maps
            .iter()
            .filter(|m| m.executable && module.contains(m.start))
            .map(|m| (m.start, m.len() as usize))
            .collect();
        let read = memory.read_many(&wanted)?;
        let mut ranges = Vec::new();
        for ((start, _), mut bytes) in wanted.into_iter().zip(read) {
            shadowpatch_patch::survey::overlay_originals(start, &mut bytes, originals);
            ranges.push((start, bytes));
        }
        Ok(ModuleText { ranges })
    }

    /// `len` bytes at runtime address `start`, if all are executable bytes.
    pub fn bytes(&self, start: u64, len: u64) -> Option<&[u8]> {
        self.ranges.iter().find_map(|(base, bytes)| {
            let end = base + bytes.len() as u64;
            (start >= *base && start + len <= end)
                .then(|| &bytes[(start - base) as usize..(start - base + len) as usize])
        })
    }

    pub fn ranges(&self) -> &[(u64, Vec<u8>)] {
        &self.ranges
    }
}

/// One memory access of a global variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Access {
    /// Offset into the variable.
    pub offset: i64,
    /// Bytes read or written.
    pub width: u32,
    pub write: bool,
}

/// What a function and everything it reaches (to the depth bound) do.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CodeFacts {
    /// Functions decoded.
    pub functions: u32,
    pub bytes: u64,
    /// Functions of other modules called, by name (libc's `write`, `malloc`).
    pub imports: BTreeSet<String>,
    /// Functions of the target module reached: runtime address → name.
    pub target_functions: BTreeMap<u64, String>,
    pub syscall_instructions: u32,
    /// Branches to an earlier address in the same function: loops.
    pub backward_branches: u32,
    pub indirect_calls: u32,
    /// Target-module globals accessed: name → accesses.
    pub globals: BTreeMap<String, BTreeSet<Access>>,
    /// Target symbols whose address the patch code loads from its GOT
    /// (the globals it uses, whether or not an access could be traced).
    pub imported_data: BTreeSet<String>,
    /// The patch object's own data accessed: name → accesses.
    pub own_data: BTreeMap<String, BTreeSet<Access>>,
    /// The walk came back to the function it started from: recursion.
    pub reaches_entry: bool,
    /// Replaced target functions reached: a call there runs the patch.
    pub calls_replaced: BTreeSet<String>,
    /// Branch targets whose code could not be read or identified.
    pub unreadable: u32,
    /// The depth bound cut the walk somewhere.
    pub depth_limited: bool,
}

/// The code the analysis can read, and how names connect the two spaces.
#[derive(Debug)]
pub struct CodeSpaces<'a> {
    pub module: &'a Module,
    pub text: &'a ModuleText,
    pub object: &'a PatchObject,
    image: Vec<u8>,
    /// The object's GOT slots: slot address → imported symbol name.
    object_slots: HashMap<u64, String>,
    /// Symbols the object imports that resolve into the target module:
    /// name → runtime address.
    pub resolved: HashMap<String, u64>,
    /// Runtime entries of the functions being replaced → their names.
    pub replaced: HashMap<u64, String>,
    /// The object's functions sorted by address: (start, size).
    object_functions: Vec<(u64, u64)>,
    /// The object's data symbols in writable segments: (start, size, name).
    object_data: Vec<(u64, u64, String)>,
}

impl<'a> CodeSpaces<'a> {
    pub fn new(
        module: &'a Module,
        text: &'a ModuleText,
        object: &'a PatchObject,
        resolved: HashMap<String, u64>,
        replaced: HashMap<u64, String>,
    ) -> Self {
        let object_slots = object
            .relocations
            .iter()
            .filter(|r| r.kind == RelocationKind::Slot || r.kind == RelocationKind::Absolute64)
            .filter_map(|r| Some((r.offset, r.symbol.as_ref()?.name.clone())))
            .collect();
        let mut object_functions: Vec<(u64, u64)> = object
            .symbols
            .values()
            .filter(|s| s.function && s.size > 0)
            .map(|s| (s.address, s.size))
            .collect();
        object_functions.sort_unstable();
        object_functions.dedup();
        let object_data = writable_data_symbols(object);
        CodeSpaces {
            module,
            text,
            object,
            image: object.initial_image(),
            object_slots,
            resolved,
            replaced,
            object_functions,
            object_data,
        }
    }

    /// The function containing `address`: its start and bytes.
    pub fn function_at(&self, space: Space, address: u64) -> Option<(u64, &[u8])> {
        match space {
            Space::Target => {
                let (symbol, _) = self.module.symbolize(address)?;
                if symbol.kind != SymbolKind::Function || symbol.size == 0 || symbol.size > 1 << 20 {
                    return None;
                }
                let start = symbol.address + self.module.bias;
                Some((start, self.text.bytes(start, symbol.size)?))
            }
            Space::Patch => {
                let index = self.object_functions.partition_point(|(start, _)| *start <= address);
                let (start, size) = *self.object_functions.get(index.checked_sub(1)?)?;
                (address < start + size).then_some(())?;
                Some((start, self.image.get(start as usize..(start + size) as usize)?))
            }
        }
    }

    /// Name of the imported function a PLT stub at `address` jumps to.
    fn stub_name(&self, space: Space, address: u64) -> Option<String> {
        let bytes = match space {
            Space::Target => self.text.bytes(address, 16)?,
            Space::Patch => self.image.get(address as usize..address as usize + 16)?,
        };
        let mut decoder = Decoder::with_ip(64, bytes, address, DecoderOptions::NONE);
        for instruction in decoder.iter().take(3) {
            if instruction.flow_control() == FlowControl::IndirectBranch && instruction.is_ip_rel_memory_operand() {
                return self.slot_name(space, instruction.ip_rel_memory_address());
            }
        }
        None
    }

    /// Name of the symbol whose address a GOT slot holds.
    fn slot_name(&self, space: Space, slot: u64) -> Option<String> {
        match space {
            Space::Target => self
                .module
                .image
                .import_slots
                .get(&slot.wrapping_sub(self.module.bias))
                .cloned(),
            Space::Patch => self.object_slots.get(&slot).cloned(),
        }
    }

    /// The patch object's writable data symbol containing `address`.
    fn own_data_at(&self, address: u64) -> Option<(&str, i64)> {
        self.object_data
            .iter()
            .find(|(start, size, _)| (*start..*start + (*size).max(1)).contains(&address))
            .map(|(start, _, name)| (name.as_str(), (address - start) as i64))
    }

    /// Writable data symbols of the object: (address, size, name).
    pub fn object_data(&self) -> &[(u64, u64, String)] {
        &self.object_data
    }
}

/// The object's data symbols that live in writable, non-RELRO memory,
/// without the compiler runtime's own (`completed.0`, `__dso_handle`...).
pub fn writable_data_symbols(object: &PatchObject) -> Vec<(u64, u64, String)> {
    const RUNTIME: &[&str] = &[
        "completed.0",
        "__dso_handle",
        "__TMC_END__",
        "_GLOBAL_OFFSET_TABLE_",
        "_DYNAMIC",
    ];
    let relro = object.relro.map(|(start, size)| start..start + size);
    let mut data: Vec<(u64, u64, String)> = object
        .symbols
        .iter()
        .filter(|(name, s)| !s.function && !RUNTIME.contains(&name.as_str()) && !name.starts_with("__"))
        .filter(|(_, s)| {
            object
                .segments
                .iter()
                .any(|seg| seg.writable && (seg.address..seg.address + seg.memory_size).contains(&s.address))
                && !relro.as_ref().is_some_and(|r| r.contains(&s.address))
        })
        .map(|(name, s)| (s.address, s.size, name.clone()))
        .collect();
    data.sort();
    data
}

/// Whether a return instruction lies in `[from, to)` of a function.
fn returns_between(bytes: &[u8], start: u64, from: u64, to: u64) -> bool {
    let Some(slice) = bytes.get((from - start) as usize..(to - start) as usize) else {
        return false;
    };
    let mut decoder = Decoder::with_ip(64, slice, from, DecoderOptions::NONE);
    decoder
        .iter()
        .take_while(|i| !i.is_invalid())
        .any(|i| i.flow_control() == FlowControl::Return)
}

impl CodeFacts {
    /// Add what `other` found (another function, or a walk's own flags).
    pub fn merge(&mut self, other: &CodeFacts) {
        self.functions += other.functions;
        self.bytes += other.bytes;
        self.imports.extend(other.imports.iter().cloned());
        self.target_functions
            .extend(other.target_functions.iter().map(|(a, n)| (*a, n.clone())));
        self.syscall_instructions += other.syscall_instructions;
        self.backward_branches += other.backward_branches;
        self.indirect_calls += other.indirect_calls;
        for (name, accesses) in &other.globals {
            self.globals.entry(name.clone()).or_default().extend(accesses);
        }
        self.imported_data.extend(other.imported_data.iter().cloned());
        for (name, accesses) in &other.own_data {
            self.own_data.entry(name.clone()).or_default().extend(accesses);
        }
        self.reaches_entry |= other.reaches_entry;
        self.calls_replaced.extend(other.calls_replaced.iter().cloned());
        self.unreadable += other.unreadable;
        self.depth_limited |= other.depth_limited;
    }
}

/// A walk, function by function: what each function's own code does,
/// and what belongs to the walk (recursion, calls of replaced functions,
/// unreadable targets, the depth bound), so that the functions two walks
/// share can be left out of a comparison.
#[derive(Debug, Clone, Default)]
pub struct Walk {
    /// Each function reached: its own facts (`functions` = 1).
    pub functions: BTreeMap<(Space, u64), CodeFacts>,
    /// The walk's own flags (no function's code).
    pub flags: CodeFacts,
}

impl Walk {
    /// Everything the walk found, over the functions `keep` accepts.
    pub fn facts(&self, keep: impl Fn(&(Space, u64)) -> bool) -> CodeFacts {
        let mut facts = self.flags.clone();
        for (key, function) in &self.functions {
            if keep(key) {
                facts.merge(function);
            }
        }
        facts
    }

    /// The target-module functions reached (runtime entries).
    pub fn target_functions(&self) -> BTreeSet<u64> {
        self.functions
            .keys()
            .filter(|(space, _)| *space == Space::Target)
            .map(|(_, start)| *start)
            .collect()
    }
}

/// Walk the function at `entry` in `space` and everything it reaches, up
/// to `depth` calls deep.
pub fn walk(spaces: &CodeSpaces, space: Space, entry: u64, depth: u32) -> CodeFacts {
    walk_functions(spaces, space, entry, depth).facts(|_| true)
}

/// [`walk`], keeping each function's facts apart.
pub fn walk_functions(spaces: &CodeSpaces, space: Space, entry: u64, depth: u32) -> Walk {
    let mut walker = Walker {
        spaces,
        root: (space, entry),
        visited: HashSet::new(),
        facts: CodeFacts::default(),
        walk: Walk::default(),
        info: InstructionInfoFactory::new(),
    };
    walker.function(space, entry, depth);
    walker.walk
}

struct Walker<'s, 'a> {
    spaces: &'s CodeSpaces<'a>,
    root: (Space, u64),
    visited: HashSet<(Space, u64)>,
    /// The function being decoded.
    facts: CodeFacts,
    walk: Walk,
    info: InstructionInfoFactory,
}

impl Walker<'_, '_> {
    fn function(&mut self, space: Space, address: u64, depth: u32) {
        let Some((start, bytes)) = self.spaces.function_at(space, address) else {
            self.walk.flags.unreadable += 1;
            return;
        };
        if !self.visited.insert((space, start)) {
            // Recursion is a call (or tail call) of the entry. A jump into
            // the middle of the function is not: a `.cold` part split off
            // by the compiler jumps back into its parent's body.
            if (space, start) == self.root && address == start {
                self.walk.flags.reaches_entry = true;
            }
            return;
        }
        self.facts = CodeFacts::default();
        if space == Space::Target {
            if let Some((symbol, _)) = self.spaces.module.symbolize(start) {
                self.facts.target_functions.insert(start, symbol.name.clone());
            }
        }
        self.facts.functions += 1;
        self.facts.bytes += bytes.len() as u64;
        let end = start + bytes.len() as u64;
        // Registers holding the address of a named target global (loaded
        // from the object's GOT): a PIC patch reaches target data so.
        let mut holds_global: HashMap<Register, String> = HashMap::new();
        let mut decoder = Decoder::with_ip(64, bytes, start, DecoderOptions::NONE);
        let mut instruction = Instruction::default();
        let mut callees: Vec<(Space, u64)> = Vec::new();
        while decoder.can_decode() {
            decoder.decode_out(&mut instruction);
            if instruction.is_invalid() {
                break;
            }
            if matches!(instruction.mnemonic(), Mnemonic::Syscall | Mnemonic::Sysenter)
                || (instruction.mnemonic() == Mnemonic::Int && instruction.immediate8() == 0x80)
            {
                self.facts.syscall_instructions += 1;
            }
            self.memory_accesses(space, &instruction, &mut holds_global);
            match instruction.flow_control() {
                FlowControl::Call | FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                    let target = instruction.near_branch_target();
                    let is_call = instruction.flow_control() == FlowControl::Call;
                    if target == 0 {
                        self.facts.indirect_calls += 1;
                    } else if !is_call && (start..end).contains(&target) {
                        // A jump back to a shared epilogue is not a loop: a
                        // loop's body (target..branch) holds no return.
                        if target <= instruction.ip() && !returns_between(bytes, start, target, instruction.ip()) {
                            self.facts.backward_branches += 1;
                        }
                    } else if let Some(callee) = self.callee(space, target) {
                        callees.push(callee);
                    }
                }
                FlowControl::IndirectCall | FlowControl::IndirectBranch => {
                    let named = instruction
                        .is_ip_rel_memory_operand()
                        .then(|| self.spaces.slot_name(space, instruction.ip_rel_memory_address()))
                        .flatten();
                    match named {
                        Some(name) => {
                            if let Some(callee) = self.import(space, name) {
                                callees.push(callee);
                            }
                        }
                        None => self.facts.indirect_calls += 1,
                    }
                }
                _ => {}
            }
        }
        // This function's own facts are complete: file them before its
        // callees reuse `facts`. (`callee` and `import` may have counted
        // unreadable targets into it: those belong to the walk.)
        let mut own = std::mem::take(&mut self.facts);
        self.walk.flags.unreadable += std::mem::take(&mut own.unreadable);
        self.walk.functions.insert((space, start), own);
        for (callee_space, callee) in callees {
            if let Some(name) = (callee_space == Space::Target)
                .then(|| self.spaces.replaced.get(&callee))
                .flatten()
            {
                self.walk.flags.calls_replaced.insert(name.clone());
            }
            if depth == 0 {
                self.walk.flags.depth_limited = true;
                continue;
            }
            self.function(callee_space, callee, depth - 1);
        }
    }

    /// Where a direct branch to `target` leads: a function to follow, or an
    /// import recorded by name.
    fn callee(&mut self, space: Space, target: u64) -> Option<(Space, u64)> {
        if let Some((start, _)) = self.spaces.function_at(space, target) {
            let _ = start;
            return Some((space, target));
        }
        match self.spaces.stub_name(space, target) {
            Some(name) => self.import(space, name),
            None => {
                self.facts.unreadable += 1;
                None
            }
        }
    }

    /// A call to imported symbol `name` from `space`.
    fn import(&mut self, space: Space, name: String) -> Option<(Space, u64)> {
        match space {
            Space::Patch => {
                if let Some(&address) = self.spaces.resolved.get(&name) {
                    if self.spaces.module.contains(address) {
                        return Some((Space::Target, address));
                    }
                }
            }
            // A library calls its own exported functions through its PLT
            // (they could be interposed): followed into its own code, as
            // the patch's call of the same function is, so that both
            // sides see the same function.
            Space::Target => {
                let own: BTreeSet<u64> = self
                    .spaces
                    .module
                    .symbol_addresses(&name)
                    .into_iter()
                    .filter(|(_, s)| s.kind == SymbolKind::Function && s.size > 0 && !s.ifunc)
                    .map(|(address, _)| address)
                    .collect();
                if let (1, Some(&address)) = (own.len(), own.first()) {
                    return Some((Space::Target, address));
                }
            }
        }
        self.facts.imports.insert(name);
        None
    }

    fn memory_accesses(
        &mut self,
        space: Space,
        instruction: &Instruction,
        holds_global: &mut HashMap<Register, String>,
    ) {
        let info = self.info.info(instruction);
        for used in info.used_memory() {
            let write = matches!(
                used.access(),
                OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
            );
            let width = used.memory_size().size() as u32;
            // iced reports a RIP-relative operand with its absolute address
            // (base None); ask the instruction for it either way.
            let rip_relative = instruction.is_ip_rel_memory_operand()
                && matches!(used.base(), Register::RIP | Register::EIP | Register::None)
                && used.index() == Register::None;
            if rip_relative {
                let address = instruction.ip_rel_memory_address();
                match space {
                    Space::Target => {
                        if let Some((symbol, offset)) = self.spaces.module.symbolize(address) {
                            if symbol.kind == SymbolKind::Object {
                                self.facts
                                    .globals
                                    .entry(symbol.name.clone())
                                    .or_default()
                                    .insert(Access {
                                        offset: offset as i64,
                                        width,
                                        write,
                                    });
                            }
                        }
                    }
                    Space::Patch => {
                        if let Some((name, offset)) = self.spaces.own_data_at(address) {
                            let name = name.to_string();
                            self.facts
                                .own_data
                                .entry(name)
                                .or_default()
                                .insert(Access { offset, width, write });
                        }
                    }
                }
            } else if let Some(name) = holds_global.get(&used.base().full_register()) {
                if used.index() == Register::None {
                    let name = name.clone();
                    self.facts.globals.entry(name).or_default().insert(Access {
                        offset: used.displacement() as i64,
                        width,
                        write,
                    });
                }
            }
        }
        // A register written here no longer holds a global's address,
        // unless this very instruction loads one from the GOT.
        let mut loaded = None;
        if space == Space::Patch
            && instruction.mnemonic() == Mnemonic::Mov
            && instruction.op0_kind() == OpKind::Register
            && instruction.is_ip_rel_memory_operand()
        {
            if let Some(name) = self.spaces.slot_name(space, instruction.ip_rel_memory_address()) {
                if self.spaces.resolved.contains_key(&name) {
                    self.facts.imported_data.insert(name.clone());
                    loaded = Some((instruction.op0_register().full_register(), name));
                }
            }
        }
        for used in info.used_registers() {
            if matches!(
                used.access(),
                OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
            ) {
                holds_global.remove(&used.register().full_register());
            }
        }
        if instruction.flow_control() == FlowControl::Call {
            holds_global.clear();
        }
        if let Some((register, name)) = loaded {
            holds_global.insert(register, name);
        }
    }
}
