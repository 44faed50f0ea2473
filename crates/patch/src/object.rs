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
        let end = segments.iter().map(|s| s.address + s.memory_size).max().unwrap_or(0);
        let span = end.div_ceil(PAGE) * PAGE;

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
            relocations.push(Relocation {
                offset,
                kind,
                addend: relocation.addend(),
                symbol,
            });
        }

        // Constructors: every .init_array entry must be known boilerplate.
        if let Some(section) = file.section_by_name(".init_array") {
            let start = section.address();
            for slot in (start..start + section.size()).step_by(8) {
                let target = relocations
                    .iter()
                    .find(|r| r.offset == slot && r.kind == RelocationKind::Relative)
                    .map(|r| r.addend as u64)
                    .unwrap_or(0);
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
