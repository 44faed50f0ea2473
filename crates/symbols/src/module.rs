//! Modules of a live process: each ELF file mapped at offset 0, with every
//! later mapping of the same file, its load bias and its parsed image.

use crate::{hex, ElfImage, Symbol, SymbolsError};
use shadowpatch_process::{Mapping, MappingKind};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A loaded ELF module (the executable or a shared library).
#[derive(Debug, Clone)]
pub struct Module {
    /// File name (`libc.so.6`).
    pub name: String,
    /// Path as the target's /proc/PID/maps shows it.
    pub path: PathBuf,
    pub inode: u64,
    /// Runtime address of the module's first byte.
    pub base: u64,
    /// End of the module's last mapping.
    pub end: u64,
    /// Runtime address = file virtual address + bias.
    pub bias: u64,
    /// Address ranges of this module's mappings.
    pub ranges: Vec<(u64, u64)>,
    pub image: Arc<ElfImage>,
    /// Whether this is the process's main executable.
    pub main: bool,
}

impl Module {
    pub fn build_id_hex(&self) -> Option<String> {
        self.image.build_id.as_deref().map(hex)
    }

    pub fn contains(&self, address: u64) -> bool {
        self.ranges.iter().any(|(start, end)| (*start..*end).contains(&address))
    }

    /// Symbol containing runtime `address`, with the offset into it.
    pub fn symbolize(&self, address: u64) -> Option<(&Symbol, u64)> {
        self.image.symbols.symbolize(address.checked_sub(self.bias)?)
    }

    /// Runtime addresses of every symbol named `name`.
    pub fn symbol_addresses(&self, name: &str) -> Vec<(u64, &Symbol)> {
        self.image
            .symbols
            .by_name(name)
            .into_iter()
            .map(|s| (s.address + self.bias, s))
            .collect()
    }

    /// Whether a name given by a user (`--module`) designates this module:
    /// the exact file name, its name without version suffixes, or the path.
    pub fn matches_name(&self, wanted: &str) -> bool {
        self.name == wanted
            || self.path == Path::new(wanted)
            || self.name.split(".so").next() == Some(wanted)
            || self.name.strip_prefix("lib").and_then(|n| n.split(".so").next()) == Some(wanted)
    }
}

/// Discover the modules of process `pid` from its memory map.
pub fn modules_of(pid: i32, maps: &[Mapping]) -> Result<Vec<Module>, SymbolsError> {
    use std::os::unix::fs::MetadataExt;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    // The executable's inode identifies it even when its path was replaced.
    let exe_inode = std::fs::metadata(format!("/proc/{pid}/exe")).map(|m| m.ino()).ok();
    let mut modules: Vec<Module> = Vec::new();
    // Path → index of the module currently open for that file.
    let mut open: HashMap<(PathBuf, u64), usize> = HashMap::new();
    for mapping in maps {
        let MappingKind::File(path) = &mapping.kind else {
            continue;
        };
        let key = (path.clone(), mapping.inode);
        if mapping.offset == 0 {
            let Some(image) = load_image(pid, mapping, path) else {
                // Not an ELF module (locale archive, fonts, data files).
                continue;
            };
            let image = match image {
                Ok(image) => image,
                // Another architecture or a malformed mapped ELF: not ours to mirror.
                Err(SymbolsError::WrongArchitecture { .. }) | Err(SymbolsError::Malformed { .. }) => continue,
                Err(other) => return Err(other),
            };
            let bias = mapping.start.wrapping_sub(image.first_load_address());
            modules.push(Module {
                name: path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                path: path.clone(),
                inode: mapping.inode,
                base: mapping.start,
                end: mapping.end,
                bias,
                ranges: vec![(mapping.start, mapping.end)],
                image: Arc::new(image),
                main: exe.as_deref() == Some(path.as_path()) || exe_inode == Some(mapping.inode),
            });
            open.insert(key, modules.len() - 1);
        } else if let Some(&index) = open.get(&key) {
            let module = &mut modules[index];
            module.end = module.end.max(mapping.end);
            module.ranges.push((mapping.start, mapping.end));
        }
    }
    Ok(modules)
}

/// Parse the file behind `mapping`. Reads it through /proc/PID/map_files,
/// which names the very inode mapped (even if the path was since replaced
/// or deleted), falling back to the path inside the target's root.
/// `None` when the file is not an ELF file at all.
fn load_image(pid: i32, mapping: &Mapping, path: &Path) -> Option<Result<ElfImage, SymbolsError>> {
    let by_inode = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", mapping.start, mapping.end));
    let in_root = PathBuf::from(format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap_or(path));
    let bytes = std::fs::read(&by_inode).or_else(|_| std::fs::read(&in_root));
    let bytes = match bytes {
        Ok(bytes) => bytes,
        Err(source) => {
            return Some(Err(SymbolsError::Io {
                path: path.to_path_buf(),
                source,
            }))
        }
    };
    if !bytes.starts_with(b"\x7fELF") {
        return None;
    }
    let mut image = match ElfImage::parse(path, &bytes) {
        Ok(image) => image,
        Err(error) => return Some(Err(error)),
    };
    if let Some(id) = image.build_id.as_deref().filter(|id| id.len() > 1) {
        let hex_id = hex(id);
        let debug_file = PathBuf::from(format!(
            "/usr/lib/debug/.build-id/{}/{}.debug",
            &hex_id[..2],
            &hex_id[2..]
        ));
        if let Ok(debug) = ElfImage::open(&debug_file) {
            image.merge_debug_symbols(debug);
        }
    }
    Some(Ok(image))
}

/// Where an address lies: module, symbol and offset, and the one-line form.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Location {
    pub module: Option<String>,
    pub symbol: Option<String>,
    pub offset: Option<u64>,
    /// `module!symbol+0x12`, `module+0x1234` or `?`.
    pub location: String,
}

impl Location {
    pub fn of(address: u64, modules: &[Module]) -> Location {
        let Some(module) = modules.iter().find(|m| m.contains(address)) else {
            return Location {
                module: None,
                symbol: None,
                offset: None,
                location: "?".into(),
            };
        };
        match module.symbolize(address) {
            Some((symbol, offset)) => Location {
                module: Some(module.name.clone()),
                symbol: Some(symbol.name.clone()),
                offset: Some(offset),
                location: format!("{}!{}+{offset:#x}", module.name, symbol.name),
            },
            None => {
                // Say where it lies, so padding after a function is not
                // read as part of it.
                let relative = address.checked_sub(module.bias).unwrap_or(address);
                let between = match module.image.symbols.neighbours(relative) {
                    (Some(before), Some(after)) => format!(" (between {} and {})", before.name, after.name),
                    (Some(before), None) => format!(" (after {})", before.name),
                    (None, Some(after)) => format!(" (before {})", after.name),
                    (None, None) => String::new(),
                };
                Location {
                    module: Some(module.name.clone()),
                    symbol: None,
                    offset: None,
                    location: format!("{}+{:#x}{between}", module.name, address - module.base),
                }
            }
        }
    }

    /// A location inside a region of no module (patch code, `[anon]`).
    pub fn in_region(name: &str, region_start: u64, address: u64) -> Location {
        Location {
            module: Some(name.to_string()),
            symbol: None,
            offset: None,
            location: format!("{name}+{:#x}", address - region_start),
        }
    }
}
