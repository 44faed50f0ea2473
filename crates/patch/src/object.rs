//! The patch object: an x86_64 ELF shared object (`-fPIC -shared`), parsed
//! into what the loader needs (loadable segments, symbols, dynamic
//! relocations) and checked for what it cannot load: TLS, IFUNC, COPY
//! relocations, user constructors. Compiler-runtime boilerplate (crtbegin's
//! `frame_dummy` in `.init_array`, Rust std's argv initialiser) is
//! recognised and skipped: constructors are never run inside the target.

use crate::PatchError;
use object::elf;
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader};
use object::{Object, ObjectSection, ObjectSymbol, ObjectSymbolTable, RelocationFlags, RelocationTarget};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Constructors we recognise as runtime boilerplate, safe to skip.
const HARMLESS_CONSTRUCTORS: &[&str] = &["frame_dummy", "register_tm_clones", "ARGV_INIT_ARRAY"];

/// A PT_LOAD segment of the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoadSegment {
    pub address: u64,
    pub memory_size: u64,
    pub file_offset: u64,
    pub file_size: u64,
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
}

/// A symbol defined by the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DefinedSymbol {
    pub address: u64,
    pub size: u64,
    pub function: bool,
}

/// What a relocation computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelocationKind {
    /// B + A
    Relative,
    /// S + A (R_X86_64_64)
    Absolute64,
    /// S (GLOB_DAT, JUMP_SLOT)
    Slot,
    /// S + A - P, 32-bit signed (PC32, PLT32)
    PcRelative32,
    /// S + A, 32-bit (R_X86_64_32 zero-extended, 32S sign-extended)
    Absolute32 { signed: bool },
}

/// One dynamic relocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relocation {
    /// Where to write, as an address in the object.
    pub offset: u64,
    pub kind: RelocationKind,
    pub addend: i64,
    /// The symbol, for symbol-based kinds.
    pub symbol: Option<SymbolReference>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SymbolReference {
    pub name: String,
    pub weak: bool,
    /// Defined in the object itself (bound there, as with -Bsymbolic).
    pub defined_at: Option<u64>,
}

/// A parsed, checked patch object.
#[derive(Debug, Clone)]
pub struct PatchObject {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    pub segments: Vec<LoadSegment>,
    /// Bytes from address 0 to the end of the last segment, page-rounded.
    pub span: u64,
    pub symbols: HashMap<String, DefinedSymbol>,
    pub relocations: Vec<Relocation>,
    /// GNU_RELRO range (address, size), made read-only after relocation.
    pub relro: Option<(u64, u64)>,
    pub build_id: Option<String>,
}

const PAGE: u64 = 4096;
/// The most address space a patch object may span.
pub const MAX_SPAN: u64 = 1 << 30;

fn malformed(path: &Path, message: impl Into<String>) -> PatchError {
    PatchError::Object {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

impl PatchObject {
    pub fn load(path: &Path) -> Result<Self, PatchError> {
        let bytes = crate::manifest::read_input(path, crate::manifest::MAX_OBJECT_BYTES)
            .map_err(|e| malformed(path, format!("cannot read: {e}")))?;
        Self::parse(path, bytes)
    }

    pub fn parse(path: &Path, bytes: Vec<u8>) -> Result<Self, PatchError> {
        if bytes.len() < 4 || &bytes[..4] != b"\x7fELF" {
            return Err(malformed(path, "not an ELF file"));
        }
        let file = ElfFile64::<object::Endianness>::parse(&*bytes).map_err(|e| {
            if bytes.get(4) == Some(&1) {
                malformed(path, "32-bit ELF; only x86_64 objects can be loaded")
            } else {
                malformed(path, format!("malformed ELF: {e}"))
            }
        })?;
        if file.architecture() != object::Architecture::X86_64 {
            return Err(malformed(
                path,
                format!("ELF for {:?}; only x86_64 objects can be loaded", file.architecture()),
            ));
        }
        if file.kind() != object::ObjectKind::Dynamic {
            return Err(malformed(
                path,
                format!("is a {:?} object; build the patch with -fPIC -shared", file.kind()),
            ));
        }
        let endian = file.endian();
        let mut segments = Vec::new();
        let mut relro = None;
        let headers = file
            .elf_header()
            .program_headers(endian, &*bytes)
            .map_err(|e| malformed(path, e.to_string()))?;
        for header in headers {
            match header.p_type(endian) {
                elf::PT_LOAD => {
                    let flags = header.p_flags(endian);
                    let segment = LoadSegment {
                        address: header.p_vaddr(endian),
                        memory_size: header.p_memsz(endian),
                        file_offset: header.p_offset(endian),
                        file_size: header.p_filesz(endian),
                        readable: flags & elf::PF_R != 0,
                        writable: flags & elf::PF_W != 0,
                        executable: flags & elf::PF_X != 0,
                    };
                    let in_file = segment.file_offset.checked_add(segment.file_size);
                    if in_file.is_none_or(|end| end > bytes.len() as u64) || segment.file_size > segment.memory_size {
                        return Err(malformed(
                            path,
                            format!("segment at {:#x} extends past the file", segment.address),
                        ));
                    }
                    if segment.memory_size > 1 << 30 {
                        return Err(malformed(
                            path,
                            format!("segment at {:#x} is larger than 1 GiB", segment.address),
                        ));
                    }
                    segments.push(segment);
                }
                elf::PT_TLS => {
                    return Err(PatchError::Unsupported {
                        path: path.to_path_buf(),
                        feature: "thread-local storage (PT_TLS)".into(),
                    })
                }
                elf::PT_GNU_RELRO => relro = Some((header.p_vaddr(endian), header.p_memsz(endian))),
                elf::PT_INTERP => return Err(malformed(path, "is an executable (has PT_INTERP); build with -shared")),
                _ => {}
            }
        }
        if segments.is_empty() {
            return Err(malformed(path, "has no loadable segments"));
        }
        let lowest = segments.iter().map(|s| s.address).min().unwrap_or(0);
        if lowest != 0 {
            return Err(malformed(
                path,
                format!("first segment at {lowest:#x}; a shared object starts at 0"),
            ));
        }
        // The image is allocated whole (`initial_image`) and RELRO indexes
        // its pages (`page_protections`): both must lie within a bounded
        // span. A RELRO past the segments panicked (found by fuzzing).
        let mut end = 0u64;
        for segment in &segments {
            match segment.address.checked_add(segment.memory_size) {
                Some(segment_end) if segment_end <= MAX_SPAN => end = end.max(segment_end),
                _ => {
                    return Err(malformed(
                        path,
                        format!("segment at {:#x} ends past 1 GiB", segment.address),
                    ))
                }
            }
        }
        let span = end.div_ceil(PAGE) * PAGE;
        if let Some((start, size)) = relro {
            if start.checked_add(size).is_none_or(|relro_end| relro_end > span) {
                return Err(malformed(
                    path,
                    format!("GNU_RELRO at {start:#x} lies outside the object"),
                ));
            }
        }

        let mut symbols = HashMap::new();
        let mut local_names: HashMap<u64, String> = HashMap::new();
        for table in [file.symbol_table(), file.dynamic_symbol_table()].into_iter().flatten() {
            for symbol in table.symbols() {
                let Ok(name) = symbol.name() else { continue };
                if let object::SymbolFlags::Elf { st_info, .. } = symbol.flags() {
                    if st_info & 0xf == elf::STT_GNU_IFUNC && !symbol.is_undefined() {
                        return Err(PatchError::Unsupported {
                            path: path.to_path_buf(),
                            feature: format!("IFUNC symbol {name}"),
                        });
                    }
                    if st_info & 0xf == elf::STT_TLS {
                        return Err(PatchError::Unsupported {
                            path: path.to_path_buf(),
                            feature: format!("thread-local symbol {name}"),
                        });
                    }
                }
                if symbol.is_undefined() || name.is_empty() || symbol.address() == 0 {
                    continue;
                }
                local_names.entry(symbol.address()).or_insert_with(|| name.to_string());
                if symbol.is_local() && symbols.contains_key(name) {
                    continue;
                }
                symbols.insert(
                    name.to_string(),
                    DefinedSymbol {
                        address: symbol.address(),
                        size: symbol.size(),
                        function: symbol.kind() == object::SymbolKind::Text,
                    },
                );
            }
        }

        let dynamic_symbols = file.dynamic_symbol_table();
        let mut relocations = Vec::new();
        for (offset, relocation) in file.dynamic_relocations().into_iter().flatten() {
            let RelocationFlags::Elf { r_type } = relocation.flags() else {
                continue;
            };
            let kind = match r_type {
                elf::R_X86_64_NONE => continue,
                elf::R_X86_64_RELATIVE => RelocationKind::Relative,
                elf::R_X86_64_64 => RelocationKind::Absolute64,
                elf::R_X86_64_GLOB_DAT | elf::R_X86_64_JUMP_SLOT => RelocationKind::Slot,
                elf::R_X86_64_PC32 | elf::R_X86_64_PLT32 => RelocationKind::PcRelative32,
                elf::R_X86_64_32 => RelocationKind::Absolute32 { signed: false },
                elf::R_X86_64_32S => RelocationKind::Absolute32 { signed: true },
                elf::R_X86_64_IRELATIVE => {
                    return Err(PatchError::Unsupported {
                        path: path.to_path_buf(),
                        feature: "IFUNC (IRELATIVE)".into(),
                    })
                }
                elf::R_X86_64_DTPMOD64
                | elf::R_X86_64_DTPOFF64
                | elf::R_X86_64_TPOFF64
                | elf::R_X86_64_TLSDESC
                | elf::R_X86_64_TPOFF32 => {
                    return Err(PatchError::Unsupported {
                        path: path.to_path_buf(),
                        feature: "thread-local storage relocations".into(),
                    })
                }
                elf::R_X86_64_COPY => {
                    return Err(PatchError::Unsupported {
                        path: path.to_path_buf(),
                        feature: "COPY relocations".into(),
                    })
                }
                other => {
                    return Err(PatchError::Unsupported {
                        path: path.to_path_buf(),
                        feature: format!("relocation type {other} at {offset:#x}"),
                    })
                }
            };
            let symbol = match relocation.target() {
                RelocationTarget::Symbol(index) if index.0 != 0 => {
                    let table = dynamic_symbols
                        .as_ref()
                        .ok_or_else(|| malformed(path, "relocation without .dynsym"))?;
                    let symbol = table
                        .symbol_by_index(index)
                        .map_err(|e| malformed(path, e.to_string()))?;
                    let name = symbol.name().map_err(|e| malformed(path, e.to_string()))?.to_string();
                    Some(SymbolReference {
                        defined_at: (!symbol.is_undefined()).then(|| symbol.address()),
                        weak: symbol.is_weak(),
                        name,
                    })
                }
                _ => None,
            };
            if symbol.is_none() && kind != RelocationKind::Relative {
                return Err(malformed(path, format!("relocation at {offset:#x} names no symbol")));
            }
            if offset.checked_add(8).is_none_or(|end| end > span) {
                return Err(malformed(
                    path,
                    format!("relocation at {offset:#x} lies outside the object"),
                ));
            }
            if let Some(SymbolReference {
                defined_at: Some(address),
                name,
                ..
            }) = &symbol
            {
                if *address >= span {
                    return Err(malformed(
                        path,
                        format!("relocation at {offset:#x} names {name}, defined outside the object"),
                    ));
                }
            }
            relocations.push(Relocation {
                offset,
                kind,
                addend: relocation.addend(),
                symbol,
            });
        }

        // Constructors: every .init_array entry must be known boilerplate.
        // Each slot's relocation, looked up from the relocations: the
        // section's size is the file's word, and walking a huge one slot by
        // slot would take for ever.
        if let Some(section) = file.section_by_name(".init_array") {
            let start = section.address();
            let slots = start..start.saturating_add(section.size());
            let mut seen = std::collections::HashSet::new();
            for relocation in &relocations {
                let slot = relocation.offset;
                let in_array = slots.contains(&slot) && (slot - start) % 8 == 0;
                // The first relative relocation of a slot is the one it holds.
                if !in_array || relocation.kind != RelocationKind::Relative || !seen.insert(slot) {
                    continue;
                }
                let target = relocation.addend as u64;
                if target == 0 {
                    continue;
                }
                let name = local_names
                    .get(&target)
                    .cloned()
                    .unwrap_or_else(|| format!("{target:#x}"));
                if !HARMLESS_CONSTRUCTORS.iter().any(|known| name.contains(known)) {
                    return Err(PatchError::Unsupported {
                        path: path.to_path_buf(),
                        feature: format!(
                            "constructor {name} in .init_array (constructors are never run in the target)"
                        ),
                    });
                }
            }
        }
        if file.section_by_name(".preinit_array").is_some_and(|s| s.size() > 0) {
            return Err(PatchError::Unsupported {
                path: path.to_path_buf(),
                feature: ".preinit_array".into(),
            });
        }
        let build_id = file.build_id().ok().flatten().map(shadowpatch_symbols::hex);
        Ok(PatchObject {
            path: path.to_path_buf(),
            bytes,
            segments,
            span,
            symbols,
            relocations,
            relro,
            build_id,
        })
    }

    /// A defined function of the object, by name.
    pub fn function(&self, name: &str) -> Result<&DefinedSymbol, PatchError> {
        match self.symbols.get(name) {
            Some(symbol) if symbol.function => Ok(symbol),
            Some(_) => Err(PatchError::NotAFunction {
                symbol: name.to_string(),
                place: self.path.display().to_string(),
            }),
            None => Err(PatchError::UnknownSymbol {
                symbol: name.to_string(),
                place: self.path.display().to_string(),
            }),
        }
    }

    /// The image as it sits in memory at address 0 before relocation:
    /// segment bytes copied in, the rest zero.
    pub fn initial_image(&self) -> Vec<u8> {
        let mut image = vec![0u8; self.span as usize];
        for s in &self.segments {
            let from = &self.bytes[s.file_offset as usize..(s.file_offset + s.file_size) as usize];
            image[s.address as usize..(s.address + s.file_size) as usize].copy_from_slice(from);
        }
        image
    }

    /// Page protections after loading: the union of the flags of every
    /// segment touching each page (segments may share a page), with the
    /// RELRO range made read-only.
    pub fn page_protections(&self) -> Vec<(u64, u64, i32)> {
        let pages = (self.span / PAGE) as usize;
        let mut protections = vec![0i32; pages];
        for s in &self.segments {
            let first = s.address / PAGE;
            let last = (s.address + s.memory_size).div_ceil(PAGE);
            for page in first..last {
                let p = &mut protections[page as usize];
                if s.readable {
                    *p |= libc::PROT_READ;
                }
                if s.writable {
                    *p |= libc::PROT_WRITE;
                }
                if s.executable {
                    *p |= libc::PROT_EXEC;
                }
            }
        }
        if let Some((start, size)) = self.relro {
            // Only whole pages inside RELRO become read-only.
            let first = start.div_ceil(PAGE);
            let last = (start + size) / PAGE;
            for page in first..last {
                protections[page as usize] &= !libc::PROT_WRITE;
            }
        }
        // Merge runs of equal protection into ranges.
        let mut ranges: Vec<(u64, u64, i32)> = Vec::new();
        for (page, protection) in protections.into_iter().enumerate() {
            let start = page as u64 * PAGE;
            match ranges.last_mut() {
                Some((_, end, p)) if *p == protection && *end == start => *end += PAGE,
                _ => ranges.push((start, start + PAGE, protection)),
            }
        }
        ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small patch object (`fuzz/seeds/README.md` says how it was built).
    const WITH_CRT: &[u8] = include_bytes!("../../../fuzz/seeds/object/with-crt.so");

    /// Sets field `at` (8 bytes) of the first program header of `p_type`.
    fn set_program_header(bytes: &mut [u8], p_type: u32, at: usize, value: u64) {
        let offset = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap()) as usize;
        let size = u16::from_le_bytes(bytes[0x36..0x38].try_into().unwrap()) as usize;
        let count = u16::from_le_bytes(bytes[0x38..0x3a].try_into().unwrap()) as usize;
        let header = (0..count)
            .map(|i| offset + i * size)
            .find(|h| u32::from_le_bytes(bytes[*h..*h + 4].try_into().unwrap()) == p_type)
            .expect("the object has that program header");
        bytes[header + at..header + at + 8].copy_from_slice(&value.to_le_bytes());
    }

    fn parse(bytes: Vec<u8>) -> Result<PatchObject, PatchError> {
        PatchObject::parse(Path::new("fix.so"), bytes)
    }

    #[test]
    fn the_seed_object_parses_and_lays_out() {
        let object = parse(WITH_CRT.to_vec()).unwrap();
        assert!(object.relro.is_some());
        assert!(!object.page_protections().is_empty());
        assert_eq!(object.initial_image().len() as u64, object.span);
    }

    /// Found by fuzzing: a GNU_RELRO past the segments indexed past the
    /// page table in `page_protections` and panicked.
    #[test]
    fn a_relro_outside_the_object_is_refused() {
        const P_MEMSZ: usize = 0x28;
        let mut bytes = WITH_CRT.to_vec();
        set_program_header(&mut bytes, elf::PT_GNU_RELRO, P_MEMSZ, 1 << 40);
        let error = parse(bytes).unwrap_err().to_string();
        assert!(
            error.contains("GNU_RELRO at") && error.contains("outside the object"),
            "{error}"
        );
        let mut bytes = WITH_CRT.to_vec();
        set_program_header(&mut bytes, elf::PT_GNU_RELRO, P_MEMSZ, u64::MAX);
        assert!(parse(bytes).is_err());
    }

    /// A segment placed far out would make the whole image (allocated at
    /// once) terabytes long, or overflow its end.
    #[test]
    fn a_segment_ending_past_the_span_limit_is_refused() {
        const P_VADDR: usize = 0x10;
        for address in [MAX_SPAN, u64::MAX - 4096] {
            let mut bytes = WITH_CRT.to_vec();
            set_program_header(&mut bytes, elf::PT_DYNAMIC, 0, 0);
            // The second PT_LOAD (the first must stay at 0): make the
            // dynamic header, now type 0, harmless, and move the data one.
            let offset = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap()) as usize;
            let size = u16::from_le_bytes(bytes[0x36..0x38].try_into().unwrap()) as usize;
            let second_load = (0..16)
                .map(|i| offset + i * size)
                .filter(|h| u32::from_le_bytes(bytes[*h..*h + 4].try_into().unwrap()) == elf::PT_LOAD)
                .nth(1)
                .expect("two PT_LOAD");
            bytes[second_load + P_VADDR..second_load + P_VADDR + 8].copy_from_slice(&address.to_le_bytes());
            let error = parse(bytes).unwrap_err().to_string();
            assert!(error.contains("ends past 1 GiB"), "{error}");
        }
    }
}
