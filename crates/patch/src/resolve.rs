//! Resolving a patch object's undefined symbols inside the live target:
//! first the module being patched (its private `.symtab` symbols included,
//! so a patch can call static functions and use static variables of the
//! program it fixes), then the other loaded modules' global symbols in load
//! order. IFUNC symbols resolve to the implementation the dynamic linker
//! chose, never to the resolver: read from the defining module's IRELATIVE
//! slot, else from a GOT slot of a module that imports the symbol (libc's
//! `strstr` has no IRELATIVE slot of libc's own; the program that calls it
//! holds the chosen implementation in its JUMP_SLOT or GLOB_DAT).
//! An unresolved weak symbol is 0; an unresolved strong one is an error.

use crate::PatchError;
use shadowpatch_process::TargetMemory;
use shadowpatch_symbols::{Module, Symbol};

/// Resolve `name` (a symbol the patch object leaves undefined).
pub fn resolve_symbol(
    name: &str,
    weak: bool,
    target: &Module,
    modules: &[Module],
    memory: &mut TargetMemory,
) -> Result<u64, PatchError> {
    if let Some(address) = lookup_in(target, name, true, modules, memory)? {
        return Ok(address);
    }
    for module in modules.iter().filter(|m| m.base != target.base) {
        if let Some(address) = lookup_in(module, name, false, modules, memory)? {
            return Ok(address);
        }
    }
    if weak {
        return Ok(0);
    }
    Err(PatchError::Unresolved {
        symbol: name.to_string(),
        module: target.name.clone(),
        others: modules.len() - 1,
    })
}

fn lookup_in(
    module: &Module,
    name: &str,
    allow_local: bool,
    modules: &[Module],
    memory: &mut TargetMemory,
) -> Result<Option<u64>, PatchError> {
    let mut candidates: Vec<(u64, &Symbol)> = module
        .symbol_addresses(name)
        .into_iter()
        .filter(|(_, s)| allow_local || s.global)
        .collect();
    if candidates.is_empty() {
        return Ok(None);
    }
    // Prefer global definitions; several static symbols of one name in
    // different translation units cannot be told apart by name.
    if candidates.iter().any(|(_, s)| s.global) {
        candidates.retain(|(_, s)| s.global);
    }
    candidates.sort_by_key(|(address, _)| *address);
    candidates.dedup_by_key(|(address, _)| *address);
    if candidates.len() > 1 {
        return Err(PatchError::Ambiguous {
            symbol: name.to_string(),
            module: module.name.clone(),
            count: candidates.len(),
        });
    }
    let (address, symbol) = candidates[0];
    if !symbol.ifunc {
        return Ok(Some(address));
    }
    let resolver = address - module.bias;
    if let Some(slot) = module.image.irelative_slots.get(&resolver) {
        return Ok(Some(read_slot(memory, slot + module.bias)?));
    }
    match chosen_by_an_importer(name, module, modules, memory)? {
        Some(implementation) => Ok(Some(implementation)),
        None => Err(PatchError::UnresolvableIfunc {
            symbol: name.to_string(),
            module: module.name.clone(),
        }),
    }
}

fn read_slot(memory: &mut TargetMemory, address: u64) -> Result<u64, PatchError> {
    let mut bytes = [0u8; 8];
    memory.read_exact(address, &mut bytes)?;
    Ok(u64::from_le_bytes(bytes))
}

/// The implementation of IFUNC `name` (defined in `defining`) that the
/// dynamic linker bound into another module's GOT. A slot still pointing
/// into its own module's PLT (lazy binding, not called yet) is skipped:
/// only an address inside the defining module is an implementation.
fn chosen_by_an_importer(
    name: &str,
    defining: &Module,
    modules: &[Module],
    memory: &mut TargetMemory,
) -> Result<Option<u64>, PatchError> {
    let resolver = address_of_resolver(defining, name);
    for module in modules.iter().filter(|m| m.base != defining.base) {
        let mut slots: Vec<u64> = module
            .image
            .import_slots
            .iter()
            .filter(|(_, symbol)| symbol.as_str() == name)
            .map(|(slot, _)| *slot)
            .collect();
        slots.sort_unstable();
        for slot in slots {
            let value = read_slot(memory, slot + module.bias)?;
            if value != resolver && defining.contains(value) {
                return Ok(Some(value));
            }
        }
    }
    Ok(None)
}

/// The resolver's own address (a slot holding it was never resolved).
fn address_of_resolver(defining: &Module, name: &str) -> u64 {
    defining
        .symbol_addresses(name)
        .into_iter()
        .find(|(_, s)| s.ifunc)
        .map_or(0, |(address, _)| address)
}
