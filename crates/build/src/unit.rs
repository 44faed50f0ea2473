//! One compiled object (a relocatable ELF file, one translation unit),
//! parsed into sections, symbols and relocations with `object`, and the
//! comparable description of what a relocation points at.

use crate::BuildError;
use object::elf;
use object::{Object, ObjectComdat, ObjectSection, ObjectSymbol, RelocationFlags, RelocationTarget, SectionIndex};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SymKind {
    Function,
    Data,
    Tls,
    Section,
    Other,
}

#[derive(Debug, Clone)]
pub struct Sym {
    pub name: String,
    pub kind: SymKind,
    pub section: Option<usize>,
    pub value: u64,
    pub size: u64,
    pub global: bool,
    pub undefined: bool,
}

#[derive(Debug, Clone)]
pub struct Rel {
    pub offset: u64,
    pub r_type: u32,
    pub addend: i64,
    /// Index into `Unit::symbols`.
    pub symbol: usize,
}

#[derive(Debug, Clone)]
pub struct Sec {
    pub name: String,
    pub data: Vec<u8>,
    pub size: u64,
    pub align: u64,
    pub flags: u64,
    pub nobits: bool,
    pub relocations: Vec<Rel>,
    /// The signature of the COMDAT group the section belongs to (C++
    /// inline functions, template instances, implicit methods, vtables).
    pub comdat: Option<String>,
}

/// A parsed relocatable object.
#[derive(Debug, Clone)]
pub struct Unit {
    pub path: PathBuf,
    /// The source file name as the compiler wrote it (`STT_FILE`).
    pub file: String,
    pub sections: Vec<Sec>,
    pub symbols: Vec<Sym>,
    /// The compiler, from `.comment`.
    pub producer: Option<String>,
}

/// What a relocation designates, comparable between two builds.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Referent {
    /// A named symbol (function or variable) plus an offset into it.
    Named { name: String, offset: i64 },
    /// Bytes of an anonymous constant (a string literal, a constant pool
    /// entry, a jump table): equal content is the same constant.
    Constant { content: Vec<u8>, offset: i64 },
}

impl Unit {
    pub fn open(path: &Path) -> Result<Unit, BuildError> {
        let bytes = std::fs::read(path).map_err(|e| BuildError::io(path, e))?;
        let malformed = |e: object::Error| BuildError::Input(format!("{}: {e}", path.display()));
        let file = object::File::parse(&*bytes).map_err(malformed)?;
        if file.kind() != object::ObjectKind::Relocatable {
            return Err(BuildError::Input(format!(
                "{}: not a relocatable object",
                path.display()
            )));
        }
        let mut sections = Vec::new();
        let mut index_of: HashMap<SectionIndex, usize> = HashMap::new();
        for section in file.sections() {
            let object::SectionFlags::Elf { sh_flags } = section.flags() else {
                continue;
            };
            index_of.insert(section.index(), sections.len());
            let nobits = matches!(
                section.kind(),
                object::SectionKind::UninitializedData | object::SectionKind::UninitializedTls
            );
            sections.push(Sec {
                name: section.name().unwrap_or("").to_string(),
                data: if nobits {
                    Vec::new()
                } else {
                    section.data().map_err(malformed)?.to_vec()
                },
                size: section.size(),
                align: section.align(),
                flags: sh_flags,
                nobits,
                relocations: Vec::new(),
                comdat: None,
            });
        }
        let mut symbols = vec![Sym {
            name: String::new(),
            kind: SymKind::Other,
            section: None,
            value: 0,
            size: 0,
            global: false,
            undefined: true,
        }];
        let mut symbol_of: HashMap<object::SymbolIndex, usize> = HashMap::new();
        let mut file_name = String::new();
        for symbol in file.symbols() {
            let object::SymbolFlags::Elf { st_info, .. } = symbol.flags() else {
                continue;
            };
            let kind = match st_info & 0xf {
                elf::STT_FUNC | elf::STT_GNU_IFUNC => SymKind::Function,
                elf::STT_OBJECT | elf::STT_COMMON => SymKind::Data,
                elf::STT_TLS => SymKind::Tls,
                elf::STT_SECTION => SymKind::Section,
                elf::STT_FILE => {
                    if file_name.is_empty() {
                        file_name = symbol.name().unwrap_or("").to_string();
                    }
                    SymKind::Other
                }
                _ => SymKind::Other,
            };
            let section = symbol.section_index().and_then(|i| index_of.get(&i).copied());
            let name = match kind {
                SymKind::Section => section.map(|s| sections[s].name.clone()).unwrap_or_default(),
                _ => symbol.name().unwrap_or("").to_string(),
            };
            symbol_of.insert(symbol.index(), symbols.len());
            symbols.push(Sym {
                name,
                kind,
                section,
                value: symbol.address(),
                size: symbol.size(),
                global: symbol.is_global() || symbol.is_weak(),
                undefined: symbol.is_undefined(),
            });
        }
        for section in file.sections() {
            let Some(&at) = index_of.get(&section.index()) else {
                continue;
            };
            for (offset, relocation) in section.relocations() {
                let RelocationFlags::Elf { r_type } = relocation.flags() else {
                    continue;
                };
                let RelocationTarget::Symbol(index) = relocation.target() else {
                    continue;
                };
                let Some(&symbol) = symbol_of.get(&index) else { continue };
                sections[at].relocations.push(Rel {
                    offset,
                    r_type,
                    addend: relocation.addend(),
                    symbol,
                });
            }
            sections[at].relocations.sort_by_key(|r| r.offset);
        }
        for comdat in file.comdats() {
            let signature = file
                .symbol_by_index(comdat.symbol())
                .ok()
                .and_then(|s| s.name().ok().map(str::to_string))
                .unwrap_or_default();
            for section in comdat.sections() {
                if let Some(&at) = index_of.get(&section) {
                    sections[at].comdat = Some(signature.clone());
                }
            }
        }
        let producer = sections
            .iter()
            .find(|s| s.name == ".comment")
            .map(|s| String::from_utf8_lossy(&s.data).trim_matches('\0').replace('\0', "; "));
        Ok(Unit {
            path: path.to_path_buf(),
            file: file_name,
            sections,
            symbols,
            producer,
        })
    }

    /// Defined functions and variables by name.
    pub fn defined(&self) -> HashMap<&str, usize> {
        self.symbols
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                !s.undefined
                    && s.section.is_some()
                    && matches!(s.kind, SymKind::Function | SymKind::Data | SymKind::Tls)
            })
            .map(|(i, s)| (s.name.as_str(), i))
            .collect()
    }

    /// The symbols defined in section `section`.
    pub fn symbols_in(&self, section: usize) -> impl Iterator<Item = (usize, &Sym)> {
        self.symbols.iter().enumerate().filter(move |(_, s)| {
            s.section == Some(section)
                && !s.undefined
                && matches!(s.kind, SymKind::Function | SymKind::Data | SymKind::Tls)
        })
    }

    /// The COMDAT group of a defined symbol's section, if any.
    pub fn comdat_of(&self, symbol: &Sym) -> Option<&str> {
        symbol.section.and_then(|s| self.sections[s].comdat.as_deref())
    }

    /// The code sections whose `.eh_frame` entry (FDE) names a language
    /// specific data area (`.gcc_except_table`): functions with landing
    /// pads (`catch`, or destructors run while an exception unwinds).
    pub fn sections_with_lsda(&self) -> HashSet<usize> {
        let mut found = HashSet::new();
        for eh in self.sections.iter().filter(|s| s.name == ".eh_frame") {
            let data = &eh.data;
            let mut at = 0usize;
            while at + 8 <= data.len() {
                let length = u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes")) as usize;
                if length == 0 || length == 0xffff_ffff {
                    break;
                }
                let end = (at + 4 + length).min(data.len());
                let cie_pointer = u32::from_le_bytes(data[at + 4..at + 8].try_into().expect("4 bytes"));
                if cie_pointer != 0 {
                    let targets: Vec<usize> = eh
                        .relocations
                        .iter()
                        .filter(|r| (at as u64..end as u64).contains(&r.offset))
                        .filter_map(|r| self.symbols[r.symbol].section)
                        .collect();
                    let lsda = targets
                        .iter()
                        .any(|&s| self.sections[s].name.starts_with(".gcc_except_table"));
                    if lsda {
                        found.extend(
                            targets
                                .iter()
                                .copied()
                                .filter(|&s| self.sections[s].flags & u64::from(elf::SHF_EXECINSTR) != 0),
                        );
                    }
                }
                at = end;
            }
        }
        found
    }

    /// Bytes `[value, value + size)` of a symbol's section.
    pub fn bytes_of(&self, symbol: &Sym) -> &[u8] {
        let Some(section) = symbol.section else { return &[] };
        let data = &self.sections[section].data;
        let start = (symbol.value as usize).min(data.len());
        let end = ((symbol.value + symbol.size) as usize).min(data.len());
        &data[start..end]
    }

    /// Where relocation (`symbol`, `addend`, `r_type`) points: for a
    /// section symbol or a local label (`.LC0`), the section, the addend
    /// relative to it, and the named variable or function inside it — the
    /// only one the section holds (one section per variable), else the one
    /// containing the target.
    pub fn place(&self, symbol: usize, addend: i64, r_type: u32) -> Option<(usize, i64, Option<usize>)> {
        let s = &self.symbols[symbol];
        let section = s.section?;
        let label = s.kind == SymKind::Section || (s.kind == SymKind::Other && !s.global);
        if !label {
            return Some((section, addend + s.value as i64, Some(symbol)));
        }
        let in_section = if s.kind == SymKind::Section {
            addend
        } else {
            addend + s.value as i64
        };
        let named: Vec<(usize, &Sym)> = self.symbols_in(section).collect();
        if let [(only, _)] = named.as_slice() {
            return Some((section, in_section, Some(*only)));
        }
        // A PC-relative reference's addend is the target minus the distance
        // to the instruction's end: 4, or more with an immediate after it.
        let pc_relative = matches!(r_type, elf::R_X86_64_PC32 | elf::R_X86_64_PLT32);
        let target = if pc_relative { in_section + 4 } else { in_section };
        let inner = named
            .iter()
            .filter(|(_, s)| (s.value as i64) <= target && target < (s.value + s.size.max(1)) as i64)
            .max_by_key(|(_, s)| s.value)
            .map(|(i, _)| *i);
        Some((section, in_section, inner))
    }

    /// What relocation `rel` designates: a named symbol and the offset
    /// from it, else an anonymous constant's content.
    pub fn referent(&self, rel: &Rel) -> Referent {
        let symbol = &self.symbols[rel.symbol];
        let Some((section, in_section, inner)) = self.place(rel.symbol, rel.addend, rel.r_type) else {
            return Referent::Named {
                name: normalize(&symbol.name),
                offset: rel.addend,
            };
        };
        if let Some(inner) = inner {
            let inner = &self.symbols[inner];
            return Referent::Named {
                name: normalize(&inner.name),
                offset: in_section - inner.value as i64,
            };
        }
        let pc_relative = matches!(rel.r_type, elf::R_X86_64_PC32 | elf::R_X86_64_PLT32);
        let target = if pc_relative { in_section + 4 } else { in_section };
        let sec = &self.sections[section];
        if sec.name.starts_with(".rodata.str") || sec.flags & u64::from(elf::SHF_STRINGS) != 0 {
            let start = (target.max(0) as usize).min(sec.data.len());
            let end = sec.data[start..]
                .iter()
                .position(|&b| b == 0)
                .map_or(sec.data.len(), |n| start + n);
            return Referent::Constant {
                content: sec.data[start..end].to_vec(),
                offset: in_section - target,
            };
        }
        Referent::Constant {
            content: self.section_digest(section),
            offset: in_section,
        }
    }

    /// A section's bytes with its relocations' referents, for comparing
    /// anonymous constants (jump tables point back into code).
    fn section_digest(&self, section: usize) -> Vec<u8> {
        let sec = &self.sections[section];
        let mut digest = sec.name.as_bytes().to_vec();
        digest.extend_from_slice(&sec.data);
        for rel in &sec.relocations {
            let target = &self.symbols[rel.symbol];
            digest.extend_from_slice(&rel.offset.to_le_bytes());
            digest.extend_from_slice(target.name.as_bytes());
            digest.extend_from_slice(&rel.addend.to_le_bytes());
        }
        digest
    }
}

/// A name with the compiler's numbering taken off (`calls.1` → `calls`,
/// `f.constprop.0` → `f.constprop`, `f.isra.3` → `f.isra`): gcc numbers
/// static locals and clones per translation unit, and an unrelated edit
/// can renumber them.
pub fn normalize(name: &str) -> String {
    name.split('.')
        .enumerate()
        .filter(|(i, part)| *i == 0 || part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()))
        .map(|(_, part)| part)
        .collect::<Vec<_>>()
        .join(".")
}

/// The byte span of relocation `r_type` at its offset.
pub fn relocation_width(r_type: u32) -> usize {
    match r_type {
        elf::R_X86_64_64 | elf::R_X86_64_PC64 | elf::R_X86_64_GOTOFF64 => 8,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn numbering_is_dropped() {
        assert_eq!(normalize("calls.1"), "calls");
        assert_eq!(normalize("f.constprop.0"), "f.constprop");
        assert_eq!(normalize("f.part.0.cold"), "f.part.cold");
        assert_eq!(normalize("compute"), "compute");
    }
}
