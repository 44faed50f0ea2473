//! One ELF file, parsed: build-id, loadable segments and a merged symbol
//! table (`.symtab` + `.dynsym`, deduplicated) indexed by name and address.

use crate::SymbolsError;
use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, ObjectSymbolTable, SymbolKind as ObjectSymbolKind};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SymbolKind {
    Function,
    Object,
    Other,
}

/// Which table a symbol came from: `.symtab` holds private (static)
/// symbols too, `.dynsym` survives stripping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SymbolSource {
    Symtab,
    Dynsym,
    /// Named by a patch manifest's `[[symbol]]` entries: what `build`
    /// found for this exact build (a stripped target, or statics of one
    /// name in several files).
    Manifest,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Symbol {
    pub name: String,
    /// Address in the file's own virtual address space (add the load bias).
    pub address: u64,
    pub size: u64,
    pub kind: SymbolKind,
    pub source: SymbolSource,
    pub global: bool,
    /// STT_GNU_IFUNC: `address` is a resolver, not the function itself.
    pub ifunc: bool,
}

/// A loadable segment (PT_LOAD).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Segment {
    pub address: u64,
    pub memory_size: u64,
    pub file_offset: u64,
    pub file_size: u64,
}

/// Symbols sorted by address, with a name index.
#[derive(Debug, Default, Clone)]
pub struct SymbolTable {
    by_address: Vec<Symbol>,
    by_name: HashMap<String, Vec<usize>>,
}

impl SymbolTable {
    pub fn new(mut symbols: Vec<Symbol>) -> Self {
        // Prefer .symtab's entry when both tables list the same symbol, but
        // keep what .dynsym says of its binding: a distro debug file's
        // .symtab can list an exported IFUNC (libc's memcpy) as local.
        symbols.sort_by(|a, b| (a.address, &a.name, a.source as u8).cmp(&(b.address, &b.name, b.source as u8)));
        symbols.dedup_by(|later, earlier| {
            let same = later.address == earlier.address && later.name == earlier.name;
            if same {
                earlier.global |= later.global;
                earlier.ifunc |= later.ifunc;
            }
            same
        });
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        for (index, symbol) in symbols.iter().enumerate() {
            by_name.entry(symbol.name.clone()).or_default().push(index);
        }
        SymbolTable {
            by_address: symbols,
            by_name,
        }
    }

    pub fn len(&self) -> usize {
        self.by_address.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_address.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Symbol> {
        self.by_address.iter()
    }

    /// Every symbol with this exact name (static symbols of different
    /// translation units may share one).
    pub fn by_name(&self, name: &str) -> Vec<&Symbol> {
        self.by_name
            .get(name)
            .map(|ix| ix.iter().map(|&i| &self.by_address[i]).collect())
            .unwrap_or_default()
    }

    /// The symbol containing file address `address` and the offset into it.
    /// A symbol's size bounds it: an address past the end of the nearest
    /// sized symbol before it (padding after a function, code no symbol
    /// describes) is in no symbol, even if an earlier label has no size.
    /// Falls back to the nearest preceding sized-0 symbol (hand-written asm
    /// often has no size, and crt's `frame_dummy` neither) only when no
    /// sized symbol ends between it and the address; `None` when nothing
    /// covers the address.
    pub fn symbolize(&self, address: u64) -> Option<(&Symbol, u64)> {
        let end = self.by_address.partition_point(|s| s.address <= address);
        let candidates = self.by_address[..end]
            .iter()
            .rev()
            .take_while(|s| address - s.address < (1 << 20));
        let mut fallback = None;
        let mut after_a_sized_symbol = false;
        for symbol in candidates {
            if symbol.kind == SymbolKind::Other && symbol.size == 0 {
                continue;
            }
            if symbol.size > 0 {
                if address < symbol.address + symbol.size {
                    return Some((symbol, address - symbol.address));
                }
                // Keep looking only for a sized symbol that encloses this
                // one; a sized-0 label before it does not reach past it.
                after_a_sized_symbol = true;
                continue;
            }
            if !after_a_sized_symbol && fallback.is_none() {
                fallback = Some((symbol, address - symbol.address));
            }
        }
        fallback
    }

    /// The nearest named symbols before and after `address` (markers of
    /// kind `Other` with no size left out): where an address no symbol
    /// covers lies.
    pub fn neighbours(&self, address: u64) -> (Option<&Symbol>, Option<&Symbol>) {
        let wanted = |s: &&Symbol| !(s.kind == SymbolKind::Other && s.size == 0);
        let end = self.by_address.partition_point(|s| s.address <= address);
        let before = self.by_address[..end].iter().rev().find(wanted);
        let after = self.by_address[end..].iter().find(wanted);
        (before, after)
    }
}

/// A parsed ELF file.
#[derive(Debug, Clone)]
pub struct ElfImage {
    pub path: PathBuf,
    pub build_id: Option<Vec<u8>>,
    pub segments: Vec<Segment>,
    pub symbols: SymbolTable,
    /// Whether the file had a `.symtab` (not stripped).
    pub has_symtab: bool,
    /// IRELATIVE relocations: IFUNC resolver address → GOT slot address
    /// (file addresses). The dynamic linker fills these slots eagerly with
    /// the implementation the resolver chose, so reading the live slot gives
    /// the address a new caller must use.
    pub irelative_slots: HashMap<u64, u64>,
    /// GOT slots the dynamic linker fills with another module's symbol
    /// (JUMP_SLOT, GLOB_DAT): slot file address → symbol name. A call
    /// through the PLT or `call [rip+slot]` names its callee here.
    pub import_slots: HashMap<u64, String>,
    /// Functions run before `main` (`.preinit_array`, `.init_array`,
    /// `DT_INIT`'s `_init`), as file addresses.
    pub constructors: Vec<u64>,
    /// Code or data addresses stored in the file's data through RELATIVE
    /// relocations, constructor and destructor arrays excepted: function
    /// pointer tables, callbacks (address-taken functions).
    pub data_pointers: Vec<u64>,
    /// `DT_SONAME` of a shared library (`libevent-2.1.so.7` for
    /// `libevent-2.1.so.7.0.1`): the name programs link against.
    pub soname: Option<String>,
}

/// `DT_SONAME` from `.dynamic` and `.dynstr` (x86_64: little-endian
/// 16-byte entries); `None` when the file has none.
fn soname_of(file: &object::File) -> Option<String> {
    const DT_NULL: u64 = 0;
    const DT_SONAME: u64 = 14;
    let dynamic = file.section_by_name(".dynamic")?.data().ok()?;
    let strings = file.section_by_name(".dynstr")?.data().ok()?;
    let offset = dynamic.chunks_exact(16).find_map(|entry| {
        let tag = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
        let value = u64::from_le_bytes(entry[8..].try_into().expect("8 bytes"));
        match tag {
            DT_SONAME => Some(Some(value as usize)),
            DT_NULL => Some(None),
            _ => None,
        }
    })??;
    let tail = strings.get(offset..)?;
    let end = tail.iter().position(|&b| b == 0)?;
    std::str::from_utf8(&tail[..end]).ok().map(str::to_string)
}

/// The build-id of the x86-64 ELF file at `path` (`None`: it has none),
/// reading only the headers and the note that holds it, not the whole
/// file: host-wide sets ask this of every file every process maps.
pub fn file_build_id(path: &Path) -> Result<Option<Vec<u8>>, SymbolsError> {
    use object::ReadCache;
    let file = std::fs::File::open(path).map_err(|source| SymbolsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let cache = ReadCache::new(file);
    let malformed = |e: object::Error| SymbolsError::Malformed {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let parsed = object::File::parse(&cache).map_err(malformed)?;
    if parsed.architecture() != object::Architecture::X86_64 {
        return Err(SymbolsError::WrongArchitecture {
            path: path.to_path_buf(),
            found: format!("{:?}", parsed.architecture()),
        });
    }
    Ok(parsed.build_id().map_err(malformed)?.map(<[u8]>::to_vec))
}

impl ElfImage {
    pub fn open(path: &Path) -> Result<Self, SymbolsError> {
        let bytes = std::fs::read(path).map_err(|source| SymbolsError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &bytes)
    }

    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self, SymbolsError> {
        let malformed = |e: object::Error| SymbolsError::Malformed {
            path: path.to_path_buf(),
            message: e.to_string(),
        };
        let file = object::File::parse(bytes).map_err(malformed)?;
        if file.architecture() != object::Architecture::X86_64 {
            return Err(SymbolsError::WrongArchitecture {
                path: path.to_path_buf(),
                found: format!("{:?}", file.architecture()),
            });
        }
        let build_id = file.build_id().map_err(malformed)?.map(<[u8]>::to_vec);
        let segments = file
            .segments()
            .map(|s| {
                let (file_offset, file_size) = s.file_range();
                Segment {
                    address: s.address(),
                    memory_size: s.size(),
                    file_offset,
                    file_size,
                }
            })
            .collect();
        let mut symbols = Vec::new();
        collect(&mut symbols, file.symbols(), SymbolSource::Symtab, &[]);
        // Versioned libraries list old versions of a symbol (memcpy@GLIBC_2.2.5)
        // beside the default one (memcpy@@GLIBC_2.14); the hidden bit of
        // .gnu.version marks the old ones, which a new binding never gets.
        let versions: Vec<u16> = file
            .section_by_name(".gnu.version")
            .and_then(|s| s.data().ok())
            .map(|data| data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect())
            .unwrap_or_default();
        collect(&mut symbols, file.dynamic_symbols(), SymbolSource::Dynsym, &versions);
        let has_symtab = file.section_by_name(".symtab").is_some_and(|s| s.size() > 0);
        const R_X86_64_IRELATIVE: u32 = 37;
        let irelative_slots = file
            .dynamic_relocations()
            .into_iter()
            .flatten()
            .filter(
                |(_, r)| matches!(r.flags(), object::RelocationFlags::Elf { r_type } if r_type == R_X86_64_IRELATIVE),
            )
            .map(|(slot, r)| (r.addend() as u64, slot))
            .collect();
        const R_X86_64_GLOB_DAT: u32 = 6;
        const R_X86_64_JUMP_SLOT: u32 = 7;
        let dynamic_symbols = file.dynamic_symbol_table();
        let import_slots = file
            .dynamic_relocations()
            .into_iter()
            .flatten()
            .filter(|(_, r)| {
                matches!(r.flags(), object::RelocationFlags::Elf { r_type } if r_type == R_X86_64_GLOB_DAT || r_type == R_X86_64_JUMP_SLOT)
            })
            .filter_map(|(slot, r)| {
                let object::RelocationTarget::Symbol(index) = r.target() else {
                    return None;
                };
                let symbol = dynamic_symbols.as_ref()?.symbol_by_index(index).ok()?;
                Some((slot, symbol.name().ok()?.to_string()))
            })
            .collect();
        let (constructors, data_pointers) = constructors_and_pointers(&file);
        let soname = soname_of(&file);
        Ok(ElfImage {
            path: path.to_path_buf(),
            build_id,
            segments,
            symbols: SymbolTable::new(symbols),
            has_symtab,
            irelative_slots,
            import_slots,
            constructors,
            data_pointers,
            soname,
        })
    }

    /// Add the `.symtab` of a separate debug file (distro `-dbgsym`
    /// packages) when its build-id matches ours.
    pub fn merge_debug_symbols(&mut self, debug: ElfImage) {
        if debug.build_id.is_some() && debug.build_id == self.build_id {
            let mut merged: Vec<Symbol> = self.symbols.iter().cloned().collect();
            merged.extend(
                debug
                    .symbols
                    .iter()
                    .filter(|s| s.source == SymbolSource::Symtab)
                    .cloned(),
            );
            self.symbols = SymbolTable::new(merged);
            self.has_symtab |= debug.has_symtab;
        }
    }

    /// Lowest PT_LOAD address rounded down to a page: subtract it from the
    /// start of the offset-0 mapping to get the load bias.
    pub fn first_load_address(&self) -> u64 {
        self.segments.iter().map(|s| s.address & !0xfff).min().unwrap_or(0)
    }
}

/// Constructors (entries of `.preinit_array` and `.init_array`, plus
/// `_init`) and the other RELATIVE relocation targets of a file.
fn constructors_and_pointers(file: &object::File) -> (Vec<u64>, Vec<u64>) {
    const R_X86_64_RELATIVE: u32 = 8;
    let relative: HashMap<u64, u64> = file
        .dynamic_relocations()
        .into_iter()
        .flatten()
        .filter(|(_, r)| matches!(r.flags(), object::RelocationFlags::Elf { r_type } if r_type == R_X86_64_RELATIVE))
        .map(|(slot, r)| (slot, r.addend() as u64))
        .collect();
    let mut arrays: Vec<(u64, u64)> = Vec::new();
    let mut constructors = Vec::new();
    for name in [".preinit_array", ".init_array", ".fini_array"] {
        let Some(section) = file.section_by_name(name) else {
            continue;
        };
        arrays.push((section.address(), section.address() + section.size()));
        if name == ".fini_array" {
            continue;
        }
        let data = section.data().unwrap_or_default();
        for (index, chunk) in data.chunks_exact(8).enumerate() {
            let slot = section.address() + 8 * index as u64;
            // In a PIE or library the slot holds 0 and a RELATIVE relocation
            // the address; in a fixed-address executable, the address itself.
            let stored = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            let address = relative.get(&slot).copied().unwrap_or(stored);
            if address != 0 && address != u64::MAX {
                constructors.push(address);
            }
        }
    }
    if let Some(init) = file.symbols().find(|s| s.name() == Ok("_init")) {
        constructors.push(init.address());
    }
    let mut data_pointers: Vec<u64> = relative
        .iter()
        .filter(|(slot, _)| !arrays.iter().any(|(start, end)| (*start..*end).contains(*slot)))
        .map(|(_, target)| *target)
        .collect();
    data_pointers.sort_unstable();
    data_pointers.dedup();
    (constructors, data_pointers)
}

fn collect<'data: 'file, 'file>(
    out: &mut Vec<Symbol>,
    symbols: impl Iterator<Item = object::Symbol<'data, 'file>>,
    source: SymbolSource,
    versions: &[u16],
) {
    const VERSYM_HIDDEN: u16 = 0x8000;
    for symbol in symbols {
        if versions.get(symbol.index().0).is_some_and(|v| v & VERSYM_HIDDEN != 0) {
            continue;
        }
        if symbol.is_undefined() || symbol.address() == 0 {
            continue;
        }
        let Ok(name) = symbol.name() else { continue };
        if name.is_empty() {
            continue;
        }
        let kind = match symbol.kind() {
            ObjectSymbolKind::Text => SymbolKind::Function,
            ObjectSymbolKind::Data => SymbolKind::Object,
            ObjectSymbolKind::Tls | ObjectSymbolKind::Section | ObjectSymbolKind::File => continue,
            _ => SymbolKind::Other,
        };
        const STT_GNU_IFUNC: u8 = 10;
        let ifunc =
            matches!(symbol.flags(), object::SymbolFlags::Elf { st_info, .. } if st_info & 0xf == STT_GNU_IFUNC);
        out.push(Symbol {
            name: name.to_string(),
            address: symbol.address(),
            size: symbol.size(),
            kind,
            source,
            global: symbol.is_global(),
            ifunc,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn symbol(name: &str, address: u64, size: u64) -> Symbol {
        Symbol {
            name: name.into(),
            address,
            size,
            kind: SymbolKind::Function,
            source: SymbolSource::Symtab,
            global: true,
            ifunc: false,
        }
    }

    #[test]
    fn a_local_symtab_entry_keeps_the_dynsym_binding_of_the_same_symbol() {
        // libc's debug file lists memcpy as a local symbol; .dynsym exports
        // it as a global IFUNC, and patches must still resolve it.
        let local = Symbol {
            global: false,
            ..symbol("memcpy", 0x9be70, 265)
        };
        let exported = Symbol {
            source: SymbolSource::Dynsym,
            ifunc: true,
            ..symbol("memcpy", 0x9be70, 265)
        };
        let table = SymbolTable::new(vec![exported, local]);
        assert_eq!(table.len(), 1);
        let merged = &table.by_address[0];
        assert_eq!(merged.source, SymbolSource::Symtab);
        assert!(merged.global && merged.ifunc, "{merged:?}");
    }

    #[test]
    fn symbolize_finds_the_containing_symbol_and_offset() {
        let table = SymbolTable::new(vec![symbol("b", 0x2000, 0x10), symbol("a", 0x1000, 0x100)]);
        assert_eq!(
            table.symbolize(0x1000).map(|(s, o)| (s.name.as_str(), o)),
            Some(("a", 0))
        );
        assert_eq!(
            table.symbolize(0x10ff).map(|(s, o)| (s.name.as_str(), o)),
            Some(("a", 0xff))
        );
        assert_eq!(table.symbolize(0x1100), None, "past the end of a sized symbol");
        assert_eq!(
            table.symbolize(0x2004).map(|(s, o)| (s.name.as_str(), o)),
            Some(("b", 4))
        );
        assert_eq!(table.symbolize(0x10), None);
    }

    #[test]
    fn a_sized_symbol_ends_where_its_size_says_even_after_a_sizeless_label() {
        // crt's frame_dummy has no size; `tiny` (1 byte) and `work` follow it.
        let table = SymbolTable::new(vec![
            symbol("frame_dummy", 0x1000, 0),
            symbol("tiny", 0x1010, 1),
            symbol("work", 0x1020, 0x20),
        ]);
        let named = |address| table.symbolize(address).map(|(s, o)| (s.name.as_str(), o));
        assert_eq!(
            named(0x1004),
            Some(("frame_dummy", 4)),
            "a sizeless label still covers what follows it"
        );
        assert_eq!(named(0x1010), Some(("tiny", 0)));
        assert_eq!(named(0x1011), None, "past tiny's one byte: not frame_dummy+0x11");
        assert_eq!(named(0x1045), None, "padding after work: not frame_dummy+0x45");
        let (before, after) = table.neighbours(0x1011);
        assert_eq!(
            (before.map(|s| s.name.as_str()), after.map(|s| s.name.as_str())),
            (Some("tiny"), Some("work"))
        );
    }

    #[test]
    fn duplicate_entries_from_both_tables_are_merged() {
        let mut dynsym = symbol("f", 0x1000, 8);
        dynsym.source = SymbolSource::Dynsym;
        let table = SymbolTable::new(vec![dynsym, symbol("f", 0x1000, 8)]);
        assert_eq!(table.len(), 1);
        assert_eq!(table.by_name("f")[0].source, SymbolSource::Symtab);
    }

    #[test]
    fn garbage_and_truncated_files_are_malformed_not_panics() {
        let path = Path::new("garbage.so");
        assert!(matches!(
            ElfImage::parse(path, b"not an elf"),
            Err(SymbolsError::Malformed { .. })
        ));
        let me = std::fs::read("/proc/self/exe").unwrap();
        for cut in [4, 16, 63, 64, 200, me.len() / 3] {
            let _ = ElfImage::parse(path, &me[..cut]);
        }
    }

    #[test]
    fn our_own_executable_has_a_build_id_and_this_function() {
        let image = ElfImage::open(Path::new("/proc/self/exe")).unwrap();
        assert!(image.build_id.as_ref().is_some_and(|id| id.len() >= 16));
        assert!(!image.segments.is_empty());
        assert!(image
            .symbols
            .iter()
            .any(|s| s.name.contains("our_own_executable_has_a_build_id")));
    }
}
