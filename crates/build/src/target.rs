//! The binary a patch is for (a module of a running process, or a file)
//! and where its symbols come from, in order: its own `.symtab`; the
//! distribution's `/usr/lib/debug/.build-id/xx/yyyy.debug`; the reference
//! build's binary when its build-id is the target's; else that binary
//! matched function by function (`matching.rs`). Private symbols are
//! grouped by the `STT_FILE` symbol that precedes them, so statics of one
//! name in two source files are told apart.

use crate::unit::normalize;
use crate::BuildError;
use iced_x86::{Decoder, DecoderOptions};
use object::elf;
use object::{Object, ObjectSection, ObjectSymbol};
use std::path::{Path, PathBuf};

/// Where a binding's address came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SymbolOrigin {
    /// The target's own `.symtab`.
    TargetSymtab,
    /// `/usr/lib/debug/.build-id/...` for the target's build-id.
    DebugFile,
    /// The reference build's binary, whose build-id is the target's.
    ReferenceBuild,
    /// The reference build's binary (another build-id), matched function
    /// by function against the target's code (`matching.rs`).
    MaskedMatch,
}

/// The binary being patched.
#[derive(Debug, Clone)]
pub struct Target {
    /// Module name (file name) as `apply` will see it.
    pub name: String,
    /// The file read (for a process, the inode it maps).
    pub path: PathBuf,
    pub build_id: String,
    pub bytes: Vec<u8>,
    pub pid: Option<i32>,
}

impl Target {
    /// `spec` is a PID (the module `module`, default the main executable)
    /// or a path to an ELF file.
    pub fn open(spec: &str, module: Option<&str>) -> Result<Target, BuildError> {
        if let Ok(pid) = spec.parse::<i32>() {
            let maps = shadowpatch_process::maps::read_maps(pid)
                .map_err(|e| BuildError::Input(format!("target {pid}: {e}")))?;
            let modules = shadowpatch_symbols::modules_of(pid, &maps)
                .map_err(|e| BuildError::Input(format!("target {pid}: {e}")))?;
            let found = modules.iter().find(|m| match module {
                Some(name) => m.matches_name(name),
                None => m.main,
            });
            let Some(found) = found else {
                return Err(BuildError::ModuleNotFound {
                    pid,
                    module: module.unwrap_or("the main executable").to_string(),
                });
            };
            let path = found.image.path.clone();
            let bytes = std::fs::read(&path).map_err(|e| BuildError::io(&path, e))?;
            let build_id = found
                .build_id_hex()
                .ok_or_else(|| BuildError::Input(format!("{}: has no GNU build-id", found.name)))?;
            return Ok(Target {
                name: found.name.clone(),
                path,
                build_id,
                bytes,
                pid: Some(pid),
            });
        }
        let path = PathBuf::from(spec);
        let bytes = std::fs::read(&path).map_err(|e| BuildError::io(&path, e))?;
        let build_id = build_id_of(&bytes)
            .ok_or_else(|| BuildError::Input(format!("{}: not an ELF file with a GNU build-id", path.display())))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(Target {
            name,
            path,
            build_id,
            bytes,
            pid: None,
        })
    }

    /// The compilers named in the target's `.comment`, if it kept one.
    pub fn comment(&self) -> Option<String> {
        comment_of(&self.bytes)
    }
}

pub fn build_id_of(bytes: &[u8]) -> Option<String> {
    let file = object::File::parse(bytes).ok()?;
    file.build_id().ok().flatten().map(shadowpatch_symbols::hex)
}

pub fn comment_of(bytes: &[u8]) -> Option<String> {
    let file = object::File::parse(bytes).ok()?;
    let data = file.section_by_name(".comment")?.data().ok()?;
    let text = String::from_utf8_lossy(data).trim_matches('\0').replace('\0', "; ");
    (!text.is_empty()).then_some(text)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryKind {
    Function,
    Object,
    Tls,
}

/// A symbol of a linked binary.
#[derive(Debug, Clone)]
pub struct BinarySymbol {
    pub name: String,
    /// The `STT_FILE` group of a local symbol.
    pub file: Option<String>,
    pub address: u64,
    pub size: u64,
    pub kind: BinaryKind,
    pub global: bool,
}

/// The symbols of the target, from the first source that has them.
#[derive(Debug, Clone)]
pub struct SymbolMap {
    pub origin: SymbolOrigin,
    pub symbols: Vec<BinarySymbol>,
}

impl SymbolMap {
    /// `.symtab` of an ELF file, with locals grouped by `STT_FILE`.
    pub fn of_file(bytes: &[u8], origin: SymbolOrigin) -> Option<SymbolMap> {
        let file = object::File::parse(bytes).ok()?;
        let mut symbols = Vec::new();
        let mut current_file: Option<String> = None;
        for symbol in file.symbols() {
            let object::SymbolFlags::Elf { st_info, .. } = symbol.flags() else {
                continue;
            };
            let name = symbol.name().unwrap_or("").to_string();
            let kind = match st_info & 0xf {
                elf::STT_FILE => {
                    current_file = (!name.is_empty()).then_some(name);
                    continue;
                }
                elf::STT_FUNC => BinaryKind::Function,
                elf::STT_OBJECT => BinaryKind::Object,
                elf::STT_TLS => BinaryKind::Tls,
                _ => continue,
            };
            if symbol.is_undefined() || name.is_empty() {
                continue;
            }
            let global = symbol.is_global() || symbol.is_weak();
            symbols.push(BinarySymbol {
                file: (!global).then(|| current_file.clone()).flatten(),
                name,
                address: symbol.address(),
                size: symbol.size(),
                kind,
                global,
            });
        }
        let has_functions = symbols.iter().any(|s| s.kind == BinaryKind::Function && !s.global);
        has_functions.then_some(SymbolMap { origin, symbols })
    }

    /// The symbols for `target`, from the first source that has them;
    /// `reference` is the reference build's binary (bytes), if any.
    pub fn for_target(target: &Target, reference: Option<&[u8]>) -> Option<SymbolMap> {
        if let Some(map) = SymbolMap::of_file(&target.bytes, SymbolOrigin::TargetSymtab) {
            return Some(map);
        }
        let debug = format!(
            "/usr/lib/debug/.build-id/{}/{}.debug",
            &target.build_id[..2],
            &target.build_id[2..]
        );
        if let Some(map) = std::fs::read(&debug)
            .ok()
            .filter(|bytes| build_id_of(bytes).as_deref() == Some(target.build_id.as_str()))
            .and_then(|bytes| SymbolMap::of_file(&bytes, SymbolOrigin::DebugFile))
        {
            return Some(map);
        }
        let reference = reference?;
        if build_id_of(reference).as_deref() == Some(target.build_id.as_str()) {
            return SymbolMap::of_file(reference, SymbolOrigin::ReferenceBuild);
        }
        crate::matching::match_reference(&target.bytes, reference)
    }

    /// The symbol `name` of source file `file` (a local), or the global
    /// `name`. A renumbered static local (`calls.1` for `calls.0`) matches
    /// when it is the only one of its name in the file.
    pub fn find(&self, name: &str, file: Option<&str>) -> Result<&BinarySymbol, String> {
        let base = |f: &str| {
            Path::new(f)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let in_file = |s: &&BinarySymbol| match (file, &s.file) {
            (Some(wanted), Some(have)) => base(wanted) == base(have),
            _ => false,
        };
        fn pick<'s>(found: Vec<&'s BinarySymbol>, name: &str, what: &str) -> Result<Option<&'s BinarySymbol>, String> {
            match found.as_slice() {
                [] => Ok(None),
                [one] => Ok(Some(*one)),
                many => {
                    let first = many[0].address;
                    if many.iter().all(|s| s.address == first) {
                        Ok(Some(many[0]))
                    } else {
                        Err(format!("{} symbols named {name} {what}", many.len()))
                    }
                }
            }
        }
        if let Some(file) = file {
            let exact: Vec<_> = self
                .symbols
                .iter()
                .filter(|s| !s.global && s.name == name)
                .filter(in_file)
                .collect();
            if let Some(found) = pick(exact, name, &format!("in {file}"))? {
                return Ok(found);
            }
            let wanted = normalize(name);
            let renumbered: Vec<_> = self
                .symbols
                .iter()
                .filter(|s| !s.global && normalize(&s.name) == wanted)
                .filter(in_file)
                .collect();
            if let Some(found) = pick(renumbered, name, &format!("(numbering aside) in {file}"))? {
                return Ok(found);
            }
        }
        let global: Vec<_> = self.symbols.iter().filter(|s| s.global && s.name == name).collect();
        pick(global, name, "with global binding")?.ok_or_else(|| match file {
            Some(file) => format!("no symbol {name} of {file}"),
            None => format!("no global symbol {name}"),
        })
    }
}

/// The file bytes of `[address, address + size)` of an ELF file (by its
/// PT_LOAD segments).
pub fn bytes_at(bytes: &[u8], address: u64, size: u64) -> Option<&[u8]> {
    let file = object::File::parse(bytes).ok()?;
    for section in file.sections() {
        let start = section.address();
        if section.kind() == object::SectionKind::UninitializedData {
            continue;
        }
        if start <= address && address + size <= start + section.size() {
            let data = section.data().ok()?;
            let at = (address - start) as usize;
            return data.get(at..at + size as usize);
        }
    }
    None
}

/// Whether an operand is an immediate (its value is `Instruction::immediate(i)`).
pub(crate) fn is_immediate(kind: iced_x86::OpKind) -> bool {
    use iced_x86::OpKind::*;
    matches!(
        kind,
        Immediate8
            | Immediate8_2nd
            | Immediate16
            | Immediate32
            | Immediate64
            | Immediate8to16
            | Immediate8to32
            | Immediate8to64
            | Immediate32to64
    )
}

/// Two functions' code with what linking decides masked: every
/// instruction's memory displacement and branch target are zeroed, so
/// the same code linked at other addresses compares equal.
pub fn same_code_masked(a: &[u8], a_address: u64, b: &[u8], b_address: u64) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut left = Decoder::with_ip(64, a, a_address, DecoderOptions::NONE);
    let mut right = Decoder::with_ip(64, b, b_address, DecoderOptions::NONE);
    while left.can_decode() && right.can_decode() {
        let (x, y) = (left.decode(), right.decode());
        if x.code() != y.code() || x.len() != y.len() {
            return false;
        }
        let relative = x.is_ip_rel_memory_operand()
            || matches!(
                x.op0_kind(),
                iced_x86::OpKind::NearBranch64 | iced_x86::OpKind::NearBranch32 | iced_x86::OpKind::NearBranch16
            );
        let start = (x.ip() - a_address) as usize;
        let (xa, yb) = (&a[start..start + x.len()], &b[start..start + y.len()]);
        if xa == yb {
            continue;
        }
        if !relative {
            return false;
        }
        // Same instruction, other displacement: compare everything else
        // (the operands' registers and immediates).
        // (`immediate64()` of an instruction with no 64-bit immediate
        // reads storage that holds the displacement: each immediate is
        // compared by its operand instead.)
        let same_rest = x.op_count() == y.op_count()
            && (0..x.op_count()).all(|i| {
                x.op_kind(i) == y.op_kind(i)
                    && x.op_register(i) == y.op_register(i)
                    && (!is_immediate(x.op_kind(i)) || x.immediate(i) == y.immediate(i))
            })
            && x.memory_base() == y.memory_base();
        if !same_rest {
            return false;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::same_code_masked;

    #[test]
    fn masking_ignores_displacements_only() {
        // lea rcx,[rip+0xdde]; mov edx,0x11 (gcc's assert: the function
        // name and the line), in two builds whose string layout differs.
        let a = [0x48, 0x8d, 0x0d, 0xde, 0x0d, 0, 0, 0xba, 0x11, 0, 0, 0];
        let mut b = a;
        b[3] = 0xfe;
        assert!(same_code_masked(&a, 0x124b, &b, 0x124b));
        // Another line number is another function.
        let mut line = a;
        line[8] = 0x12;
        assert!(!same_code_masked(&a, 0x124b, &line, 0x124b));
        // Another register, same displacement change: different.
        let mut register = b;
        register[2] = 0x35;
        assert!(!same_code_masked(&a, 0x124b, &register, 0x124b));
        // An immediate beside a displacement: add dword [rip+d],1 vs ,2.
        let add = [0x83, 0x05, 0x35, 0x2e, 0, 0, 0x01];
        let mut other = add;
        other[2] = 0x45;
        assert!(same_code_masked(&add, 0x1230, &other, 0x1230));
        other[6] = 0x02;
        assert!(!same_code_masked(&add, 0x1230, &other, 0x1230));
    }
}
