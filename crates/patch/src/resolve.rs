//! Resolving a patch object's undefined symbols inside the live target:
//! first the module being patched (its private `.symtab` symbols included,
//! so a patch can call static functions and use static variables of the
//! program it fixes), then the other loaded modules' global symbols in load
//! order. IFUNC symbols resolve to the implementation the dynamic linker
//! chose (read from the module's IRELATIVE slot), never to the resolver.
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
    if let Some(address) = lookup_in(target, name, true, memory)? {
        return Ok(address);
    }
    for module in modules.iter().filter(|m| m.base != target.base) {
        if let Some(address) = lookup_in(module, name, false, memory)? {
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
    let Some(slot) = module.image.irelative_slots.get(&resolver) else {
        return Err(PatchError::UnresolvableIfunc {
            symbol: name.to_string(),
            module: module.name.clone(),
        });
    };
    let mut bytes = [0u8; 8];
    memory.read_exact(slot + module.bias, &mut bytes)?;
    Ok(Some(u64::from_le_bytes(bytes)))
}
