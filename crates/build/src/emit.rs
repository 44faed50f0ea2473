//! The patch object: the included functions' sections copied out of the
//! patched build into one new relocatable object (with the anonymous
//! constants and new variables they use), every reference to unchanged
//! code or existing data made an undefined symbol bound to the running
//! module's original, then linked with `gcc -shared`.
//!
//! Code sections are marked writable in that object: the linker refuses a
//! PC-relative reference from read-only code to a symbol another module
//! defines, but emits it as a dynamic `R_X86_64_PC32` from a writable
//! one. The loader relocates the image itself before mapping it read-only
//! and executable, and the patch is mapped within ±2 GiB of the module, so
//! such references always reach.

use crate::differ::Inclusion;
use crate::target::{BinaryKind, SymbolMap, SymbolOrigin};
use crate::unit::{SymKind, Unit};
use crate::BuildError;
use object::write::{self, SectionId, SymbolId};
use object::{elf, Architecture, BinaryFormat, Endianness, SymbolFlags, SymbolKind, SymbolScope};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A function to put in the patch.
#[derive(Debug, Clone)]
pub struct PatchFunction {
    /// Index into the units.
    pub unit: usize,
    pub symbol: usize,
    pub inclusion: Inclusion,
}

/// A reference bound to the running module.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Binding {
    /// The name the patch object and the manifest use.
    pub symbol: String,
    /// File virtual address in the target module.
    pub address: u64,
    pub size: u64,
    pub function: bool,
    pub how: SymbolOrigin,
}

/// What `emit` produced.
#[derive(Debug)]
pub struct Emitted {
    /// Per included function: (its name in the target / manifest, its name
    /// in the patch object).
    pub names: Vec<(String, String)>,
    pub bindings: BTreeMap<String, Binding>,
    /// New variables, by name.
    pub new_data: Vec<String>,
}

/// The name a symbol of `unit` has in the patch and the manifest:
/// `file::name` for a private one, the name for a global one.
pub fn public_name(unit: &Unit, symbol: usize) -> String {
    let s = &unit.symbols[symbol];
    if s.global || s.undefined {
        s.name.clone()
    } else {
        format!("{}::{}", unit.file, s.name)
    }
}

struct Emitter<'a> {
    units: &'a [Unit],
    symbols: &'a SymbolMap,
    out: write::Object<'static>,
    /// (unit, section) → copied section.
    sections: HashMap<(usize, usize), SectionId>,
    /// (unit, section) of each included function → its defined symbol.
    included: HashMap<(usize, usize), SymbolId>,
    undefined: HashMap<String, SymbolId>,
    defined_data: HashMap<(usize, usize), SymbolId>,
    bindings: BTreeMap<String, Binding>,
    new_data: Vec<String>,
    pending: Vec<(usize, usize)>,
}

/// Write the patch object for `functions` to `object_path` (a relocatable
/// object, then linked to `so_path`).
pub fn emit(
    units: &[Unit],
    functions: &[PatchFunction],
    symbols: &SymbolMap,
    object_path: &Path,
    so_path: &Path,
) -> Result<Emitted, BuildError> {
    let mut emitter = Emitter {
        units,
        symbols,
        out: write::Object::new(BinaryFormat::Elf, Architecture::X86_64, Endianness::Little),
        sections: HashMap::new(),
        included: HashMap::new(),
        undefined: HashMap::new(),
        defined_data: HashMap::new(),
        bindings: BTreeMap::new(),
        new_data: Vec::new(),
        pending: Vec::new(),
    };
    let mut names = Vec::new();
    // First every included function's section and symbol, so references
    // between them bind inside the patch.
    for function in functions {
        let unit = &units[function.unit];
        let symbol = &unit.symbols[function.symbol];
        let section = symbol.section.expect("a defined function");
        let id = emitter.copy_section(function.unit, section);
        let name = public_name(unit, function.symbol);
        let defined = emitter.out.add_symbol(write::Symbol {
            name: name.clone().into_bytes(),
            value: symbol.value,
            size: symbol.size,
            kind: SymbolKind::Text,
            scope: SymbolScope::Linkage,
            weak: false,
            section: write::SymbolSection::Section(id),
            flags: SymbolFlags::None,
        });
        emitter.included.insert((function.unit, section), defined);
        if function.inclusion != Inclusion::New {
            names.push((name.clone(), name));
        }
    }
    while let Some((unit, section)) = emitter.pending.pop() {
        emitter.relocate(unit, section)?;
    }
    let bytes = emitter
        .out
        .write()
        .map_err(|e| BuildError::Input(format!("writing the patch object: {e}")))?;
    std::fs::write(object_path, bytes).map_err(|e| BuildError::io(object_path, e))?;
    link(object_path, so_path)?;
    Ok(Emitted {
        names,
        bindings: emitter.bindings,
        new_data: emitter.new_data,
    })
}

impl Emitter<'_> {
    /// Copy a section of a unit into the output (once); its relocations
    /// are processed later.
    fn copy_section(&mut self, unit: usize, section: usize) -> SectionId {
        if let Some(id) = self.sections.get(&(unit, section)) {
            return *id;
        }
        let sec = &self.units[unit].sections[section];
        let executable = sec.flags & u64::from(elf::SHF_EXECINSTR) != 0;
        let kind = if executable {
            object::SectionKind::Text
        } else if sec.nobits {
            object::SectionKind::UninitializedData
        } else if sec.flags & u64::from(elf::SHF_WRITE) != 0 {
            object::SectionKind::Data
        } else {
            object::SectionKind::ReadOnlyData
        };
        let name = format!("{}.sp{unit}", sec.name);
        let segment = Vec::new();
        let id = self.out.add_section(segment, name.into_bytes(), kind);
        let out = self.out.section_mut(id);
        if sec.nobits {
            out.append_bss(sec.size, sec.align.max(1));
        } else {
            out.set_data(sec.data.clone(), sec.align.max(1));
        }
        let mut flags = u64::from(elf::SHF_ALLOC) | (sec.flags & u64::from(elf::SHF_EXECINSTR | elf::SHF_WRITE));
        if executable {
            flags |= u64::from(elf::SHF_WRITE);
        }
        out.flags = object::SectionFlags::Elf { sh_flags: flags };
        self.sections.insert((unit, section), id);
        self.pending.push((unit, section));
        id
    }

    fn relocate(&mut self, unit_index: usize, section: usize) -> Result<(), BuildError> {
        let unit = &self.units[unit_index];
        let out_section = self.sections[&(unit_index, section)];
        for rel in &unit.sections[section].relocations {
            let (symbol, addend) = self.referent(unit_index, rel.symbol, rel.addend, rel.r_type)?;
            self.out
                .add_relocation(
                    out_section,
                    write::Relocation {
                        offset: rel.offset,
                        symbol,
                        addend,
                        flags: object::RelocationFlags::Elf { r_type: rel.r_type },
                    },
                )
                .map_err(|e| BuildError::Input(format!("relocation in {}: {e}", unit.sections[section].name)))?;
        }
        Ok(())
    }

    /// The output symbol (and addend) a relocation of `unit` against its
    /// symbol `target` becomes.
    fn referent(
        &mut self,
        unit_index: usize,
        target: usize,
        addend: i64,
        r_type: u32,
    ) -> Result<(SymbolId, i64), BuildError> {
        let unit = &self.units[unit_index];
        let symbol = &unit.symbols[target];
        if symbol.undefined {
            return Ok((self.external(&symbol.name)?, addend));
        }
        let Some((section, in_section, named)) = unit.place(target, addend, r_type) else {
            return Err(BuildError::Refused {
                symbol: symbol.name.clone(),
                reason: "references an absolute or common symbol".into(),
            });
        };
        let offset = named.map_or(in_section, |i| in_section - unit.symbols[i].value as i64);
        if let Some(&id) = self.included.get(&(unit_index, section)) {
            // Into an included function (itself, or its own cold part).
            return Ok((self.section_symbol(id), in_section));
        }
        let Some(named) = named else {
            // An anonymous constant (string, constant pool, jump table): a copy.
            let id = self.copy_section(unit_index, section);
            return Ok((self.out.section_symbol(id), in_section));
        };
        let named_symbol = &unit.symbols[named];
        let existing = self.existing(unit_index, named);
        match existing {
            Some(binding_name) => Ok((binding_name, offset)),
            None => {
                // New: a function not included (cannot happen: new
                // functions are included) or a new variable: a copy.
                let id = self.copy_section(unit_index, section);
                if let Some(&defined) = self.defined_data.get(&(unit_index, named)) {
                    return Ok((defined, offset));
                }
                let name = public_name(unit, named);
                let defined = self.out.add_symbol(write::Symbol {
                    name: name.clone().into_bytes(),
                    value: named_symbol.value,
                    size: named_symbol.size,
                    kind: if named_symbol.kind == SymKind::Function {
                        SymbolKind::Text
                    } else {
                        SymbolKind::Data
                    },
                    scope: SymbolScope::Linkage,
                    weak: false,
                    section: write::SymbolSection::Section(id),
                    flags: SymbolFlags::None,
                });
                self.defined_data.insert((unit_index, named), defined);
                if named_symbol.kind != SymKind::Function {
                    self.new_data.push(name);
                }
                Ok((defined, offset))
            }
        }
    }

    fn section_symbol(&mut self, id: SymbolId) -> SymbolId {
        let section = match self.out.symbol(id).section {
            write::SymbolSection::Section(s) => s,
            _ => unreachable!("an included function is defined in a section"),
        };
        self.out.section_symbol(section)
    }

    /// The binding of `named` (a symbol the unit defines) to the running
    /// module, if the module has it; `None` for a new symbol.
    fn existing(&mut self, unit_index: usize, named: usize) -> Option<SymbolId> {
        let unit = &self.units[unit_index];
        let symbol = &unit.symbols[named];
        // A cold part jumps back into its parent's body: the included code's
        // own copy goes with it, never the running one.
        if symbol.kind == SymKind::Function && symbol.name.contains(".cold") {
            return None;
        }
        let file = (!symbol.global).then_some(unit.file.as_str());
        let found = self.symbols.find(&symbol.name, file).ok()?.clone();
        let name = public_name(unit, named);
        Some(self.bind(&name, &found))
    }

    /// A symbol the unit leaves undefined: bound to the module when the
    /// module defines it, else left for the loader (another library).
    fn external(&mut self, name: &str) -> Result<SymbolId, BuildError> {
        if let Ok(found) = self.symbols.find(name, None) {
            let found = found.clone();
            if found.kind == BinaryKind::Tls {
                return Err(BuildError::Refused {
                    symbol: name.into(),
                    reason: "references a thread-local variable of the module (not supported by the loader)".into(),
                });
            }
            return Ok(self.bind(name, &found));
        }
        Ok(self.undefined_symbol(name, SymbolKind::Unknown))
    }

    fn bind(&mut self, name: &str, found: &crate::target::BinarySymbol) -> SymbolId {
        self.bindings.entry(name.to_string()).or_insert_with(|| Binding {
            symbol: name.to_string(),
            address: found.address,
            size: found.size,
            function: found.kind == BinaryKind::Function,
            how: self.symbols.origin,
        });
        let kind = if found.kind == BinaryKind::Function {
            SymbolKind::Text
        } else {
            SymbolKind::Data
        };
        self.undefined_symbol(name, kind)
    }

    fn undefined_symbol(&mut self, name: &str, kind: SymbolKind) -> SymbolId {
        if let Some(id) = self.undefined.get(name) {
            return *id;
        }
        let id = self.out.add_symbol(write::Symbol {
            name: name.as_bytes().to_vec(),
            value: 0,
            size: 0,
            kind,
            scope: SymbolScope::Dynamic,
            weak: false,
            section: write::SymbolSection::Undefined,
            flags: SymbolFlags::None,
        });
        self.undefined.insert(name.to_string(), id);
        id
    }
}

/// `gcc -shared` without start files or libraries: the object holds only
/// what was copied, and the loader resolves the rest in the target.
fn link(object_path: &Path, so_path: &Path) -> Result<(), BuildError> {
    let output = std::process::Command::new("gcc")
        .args(["-shared", "-nostdlib", "-Wl,-z,notext", "-Wl,--build-id", "-o"])
        .arg(so_path)
        .arg(object_path)
        .output()
        .map_err(|e| BuildError::io(Path::new("gcc"), e))?;
    if !output.status.success() {
        let text = String::from_utf8_lossy(&output.stderr);
        let last = text.lines().rfind(|l| !l.contains("warning")).unwrap_or("").to_string();
        return Err(BuildError::Input(format!(
            "linking the patch object {} failed: {last}",
            so_path.display()
        )));
    }
    Ok(())
}
