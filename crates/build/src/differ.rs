//! The object differ: an original and a patched build of one translation
//! unit (both with a section per function and per variable) compared
//! function by function, relocations matched by what they designate
//! rather than by offset into a section. The ideas are kpatch's
//! create-diff-object's; the code is our own.
//!
//! Decides: changed functions, new functions, functions changed only
//! because a changed callee was inlined into them, `__LINE__`-only
//! changes (ignored), new variables (allowed), changed existing
//! variables, new thread-locals and changed constructors (refused).

use crate::source::TouchedFunctions;
use crate::unit::{normalize, relocation_width, Referent, Sym, SymKind, Unit};
use crate::BuildError;
use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind};
use std::collections::HashSet;

/// Why a function is in the patch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Inclusion {
    /// Its own source changed.
    Changed,
    /// It did not exist before.
    New,
    /// Its source did not change; a changed callee was inlined into it.
    Inlined,
}

/// A function of the patched unit that goes into the patch.
#[derive(Debug, Clone)]
pub struct Included {
    /// Index into the patched unit's symbols.
    pub symbol: usize,
    pub name: String,
    pub inclusion: Inclusion,
}

/// What differs between the two builds of one unit.
#[derive(Debug, Clone, Default)]
pub struct UnitDiff {
    pub functions: Vec<Included>,
    /// Functions whose only difference is a line number.
    pub line_only: Vec<String>,
    /// New variables (patched unit symbol indices).
    pub new_data: Vec<usize>,
}

/// Compare `original` and `patched`; `touched` names the functions whose
/// source lines the diff changed.
pub fn diff_units(original: &Unit, patched: &Unit, touched: &TouchedFunctions) -> Result<UnitDiff, BuildError> {
    let before = original.defined();
    let mut result = UnitDiff::default();
    let constructors = constructors(patched);
    for (index, symbol) in patched.symbols.iter().enumerate() {
        if symbol.undefined || symbol.section.is_none() {
            continue;
        }
        let old = find(original, &before, &symbol.name, symbol.kind);
        match symbol.kind {
            SymKind::Function => {
                let inclusion = match old {
                    None => Inclusion::New,
                    Some(old) if same_code(original, old, patched, symbol) => continue,
                    Some(old) if line_only(original, old, patched, symbol) => {
                        result.line_only.push(symbol.name.clone());
                        continue;
                    }
                    Some(_) if touched.contains(&symbol.name) => Inclusion::Changed,
                    Some(_) => Inclusion::Inlined,
                };
                if constructors.contains(&index) {
                    return Err(BuildError::Refused {
                        symbol: symbol.name.clone(),
                        reason: "constructor code (new or changed) already ran or would never run in the target".into(),
                    });
                }
                result.functions.push(Included {
                    symbol: index,
                    name: symbol.name.clone(),
                    inclusion,
                });
            }
            SymKind::Tls if old.is_none() => {
                return Err(BuildError::Refused {
                    symbol: symbol.name.clone(),
                    reason: "new thread-local variable; a patch cannot add TLS to running threads".into(),
                })
            }
            SymKind::Data | SymKind::Tls => match old {
                None => result.new_data.push(index),
                Some(old) if old.size != symbol.size => {
                    return Err(BuildError::Refused {
                        symbol: symbol.name.clone(),
                        reason: format!(
                            "size changed from {} to {} bytes (a layout change of existing data)",
                            old.size, symbol.size
                        ),
                    })
                }
                Some(old) if !same_bytes(original, old, patched, symbol) => {
                    return Err(BuildError::Refused {
                        symbol: symbol.name.clone(),
                        reason: "initial value changed; existing data keeps its running value (use a new variable)"
                            .into(),
                    })
                }
                Some(_) => {}
            },
            _ => {}
        }
    }
    refuse_renumbered(original, patched, &result)?;
    Ok(result)
}

/// gcc numbers a unit's static locals with one counter: a new static, or
/// a use made dead, shifts the numbers of others, and a name can then
/// hold another function's variable. Existing data is bound by name, so a
/// function going into the patch would use that one. Refused: a writable
/// numbered variable of an included function whose users in the original
/// are all other functions, one of which is still there (not merely
/// inlined away). Read-only data is left to the size and value checks: a
/// copy with the same bytes (a `__func__` string whose users moved with
/// inlining) is as good as the target's.
fn refuse_renumbered(original: &Unit, patched: &Unit, result: &UnitDiff) -> Result<(), BuildError> {
    let included: HashSet<String> = result.functions.iter().map(|f| normalize(&f.name)).collect();
    let (users_before, users_after) = (data_users(original), data_users(patched));
    let functions_after: HashSet<String> = patched
        .symbols
        .iter()
        .filter(|s| s.kind == SymKind::Function && !s.undefined && s.section.is_some())
        .map(|s| normalize(&s.name))
        .collect();
    let before = original.defined();
    for (&index, is) in &users_after {
        let symbol = &patched.symbols[index];
        let writable = symbol
            .section
            .is_some_and(|s| patched.sections[s].flags & u64::from(object::elf::SHF_WRITE) != 0);
        if !writable || normalize(&symbol.name) == symbol.name || !is.iter().any(|user| included.contains(user)) {
            continue;
        }
        let Some(was) = before.get(symbol.name.as_str()).and_then(|old| users_before.get(old)) else {
            continue;
        };
        if was.is_disjoint(is) && was.iter().any(|user| functions_after.contains(user)) {
            return Err(BuildError::Refused {
                symbol: symbol.name.clone(),
                reason: format!(
                    "static locals renumbered by the compiler: this name was used by {}, is now used by {} (bound by name, the patch would use another function's variable)",
                    list(was),
                    list(is)
                ),
            });
        }
    }
    Ok(())
}

/// For each variable of `unit`, the functions whose code refers to it
/// (names without numbering).
fn data_users(unit: &Unit) -> std::collections::HashMap<usize, std::collections::BTreeSet<String>> {
    let mut users: std::collections::HashMap<usize, std::collections::BTreeSet<String>> = Default::default();
    for function in unit
        .symbols
        .iter()
        .filter(|s| s.kind == SymKind::Function && !s.undefined)
    {
        let Some(section) = function.section else { continue };
        for rel in &unit.sections[section].relocations {
            if rel.offset < function.value || rel.offset >= function.value + function.size.max(1) {
                continue;
            }
            if let Some((_, _, Some(inner))) = unit.place(rel.symbol, rel.addend, rel.r_type) {
                if unit.symbols[inner].kind == SymKind::Data {
                    users.entry(inner).or_default().insert(normalize(&function.name));
                }
            }
        }
    }
    users
}

fn list(names: &std::collections::BTreeSet<String>) -> String {
    names.iter().map(String::as_str).collect::<Vec<_>>().join(", ")
}

fn find<'u>(
    unit: &'u Unit,
    defined: &std::collections::HashMap<&str, usize>,
    name: &str,
    kind: SymKind,
) -> Option<&'u Sym> {
    if let Some(&i) = defined.get(name) {
        return Some(&unit.symbols[i]);
    }
    // Renumbered static locals and clones: the same name without numbering,
    // if exactly one symbol of the unit has it.
    let wanted = normalize(name);
    let mut matches = unit
        .symbols
        .iter()
        .filter(|s| !s.undefined && s.section.is_some() && s.kind == kind && normalize(&s.name) == wanted);
    let first = matches.next()?;
    matches.next().is_none().then_some(first)
}

/// Bytes with relocation fields zeroed, and the relocations' referents.
fn masked(unit: &Unit, symbol: &Sym) -> (Vec<u8>, Vec<(u64, u32, Referent)>) {
    let mut bytes = unit.bytes_of(symbol).to_vec();
    let mut referents = Vec::new();
    let Some(section) = symbol.section else {
        return (bytes, referents);
    };
    for rel in &unit.sections[section].relocations {
        if rel.offset < symbol.value || rel.offset >= symbol.value + symbol.size.max(1) {
            continue;
        }
        let at = (rel.offset - symbol.value) as usize;
        let end = (at + relocation_width(rel.r_type)).min(bytes.len());
        bytes[at.min(end)..end].fill(0);
        referents.push((rel.offset - symbol.value, rel.r_type, unit.referent(rel)));
    }
    (bytes, referents)
}

fn same_code(a: &Unit, a_symbol: &Sym, b: &Unit, b_symbol: &Sym) -> bool {
    masked(a, a_symbol) == masked(b, b_symbol)
}

fn same_bytes(a: &Unit, a_symbol: &Sym, b: &Unit, b_symbol: &Sym) -> bool {
    let (a_bytes, a_refs) = masked(a, a_symbol);
    let (b_bytes, b_refs) = masked(b, b_symbol);
    let nobits = |u: &Unit, s: &Sym| s.section.is_some_and(|i| u.sections[i].nobits);
    a_refs == b_refs && (a_bytes == b_bytes || (nobits(a, a_symbol) && nobits(b, b_symbol)))
}

/// Whether two versions of a function differ only in the line number an
/// `assert` passes: the same instructions and relocations, except
/// `mov r32, imm32` immediates in a function that calls `__assert_fail`.
fn line_only(a: &Unit, a_symbol: &Sym, b: &Unit, b_symbol: &Sym) -> bool {
    let (a_bytes, a_refs) = masked(a, a_symbol);
    let (b_bytes, b_refs) = masked(b, b_symbol);
    if a_bytes.len() != b_bytes.len() || a_refs != b_refs {
        return false;
    }
    let asserts = a_refs.iter().any(|(_, _, r)| {
        matches!(r, Referent::Named { name, .. } if name.contains("assert_fail") || name.contains("__assert"))
    });
    if !asserts {
        return false;
    }
    let mut left = Decoder::with_ip(64, &a_bytes, 0, DecoderOptions::NONE);
    let mut right = Decoder::with_ip(64, &b_bytes, 0, DecoderOptions::NONE);
    while left.can_decode() && right.can_decode() {
        let (x, y) = (left.decode(), right.decode());
        let same_shape = x.code() == y.code() && x.len() == y.len();
        if !same_shape {
            return false;
        }
        let start = x.ip() as usize;
        if a_bytes[start..start + x.len()] == b_bytes[start..start + y.len()] {
            continue;
        }
        let immediate_move = x.mnemonic() == Mnemonic::Mov
            && x.op1_kind() == OpKind::Immediate32
            && x.op0_register() == y.op0_register();
        if !immediate_move {
            return false;
        }
    }
    true
}

/// Functions a constructor array of the unit points at.
fn constructors(unit: &Unit) -> HashSet<usize> {
    let mut found = HashSet::new();
    for section in &unit.sections {
        if !(section.name.starts_with(".init_array") || section.name.starts_with(".ctors")) {
            continue;
        }
        for rel in &section.relocations {
            let target = &unit.symbols[rel.symbol];
            if target.kind == SymKind::Function {
                found.insert(rel.symbol);
            } else if let Some(s) = target.section {
                found.extend(
                    unit.symbols_in(s)
                        .filter(|(_, f)| f.kind == SymKind::Function && f.value as i64 == rel.addend)
                        .map(|(i, _)| i),
                );
            }
        }
    }
    found
}
