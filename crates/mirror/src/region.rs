//! Which parts of a target are mirrored: every executable mapping and every
//! read-only mapping of an ELF module (text, .rodata, RELRO after it is made
//! read-only). Writable memory is mutable by definition and is left to the
//! critical-variable mirror.

use crate::MirrorError;
use shadowpatch_process::{Mapping, MappingKind};
use shadowpatch_symbols::Module;
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegionKind {
    /// Executable, not writable.
    Code,
    /// Readable, neither writable nor executable, file-backed by a module.
    ReadOnlyData,
}

/// One mirrored address range, with what it belongs to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RegionSpec {
    pub start: u64,
    pub end: u64,
    pub kind: RegionKind,
    pub perms: String,
    /// Module file name, or `[vdso]` / `[anon]` for memory of no module.
    pub module: String,
    pub path: Option<PathBuf>,
    /// Hex GNU build-id of the module, when it has one.
    pub build_id: Option<String>,
    pub file_offset: u64,
}

impl RegionSpec {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Choose the regions to mirror. With `module_filter`, only that module's
/// (by file name, name without version, or path); an unknown name is an
/// error listing the modules there are.
pub fn select_regions(
    pid: i32,
    maps: &[Mapping],
    modules: &[Module],
    module_filter: Option<&str>,
) -> Result<Vec<RegionSpec>, MirrorError> {
    if let Some(wanted) = module_filter {
        let known = modules.iter().any(|m| m.matches_name(wanted)) || wanted == "[vdso]" || wanted == "[anon]";
        if !known {
            let mut names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
            names.dedup();
            return Err(MirrorError::UnknownModule {
                pid,
                name: wanted.to_string(),
                available: names.join(", "),
            });
        }
    }
    let mut regions = Vec::new();
    for mapping in maps.iter().filter(|m| m.readable && !m.writable) {
        let module = modules.iter().find(|m| m.contains(mapping.start));
        let kind = match (&mapping.kind, mapping.executable, module) {
            (MappingKind::Special(name), true, _) if name == "[vdso]" => RegionKind::Code,
            // [vsyscall] cannot be read by process_vm_readv; [vvar] changes.
            (MappingKind::Special(_), _, _) => continue,
            (_, true, _) => RegionKind::Code,
            // Read-only file data of a module: .rodata, headers, RELRO.
            (MappingKind::File(_), false, Some(_)) => RegionKind::ReadOnlyData,
            _ => continue,
        };
        let spec = RegionSpec {
            start: mapping.start,
            end: mapping.end,
            kind,
            perms: mapping.perms(),
            module: module.map(|m| m.name.clone()).unwrap_or_else(|| mapping.display_name()),
            path: module
                .map(|m| m.path.clone())
                .or_else(|| mapping.file().map(|p| p.to_path_buf())),
            build_id: module.and_then(Module::build_id_hex),
            file_offset: mapping.offset,
        };
        if let Some(wanted) = module_filter {
            let matches = match module {
                Some(m) => m.matches_name(wanted),
                None => spec.module == wanted,
            };
            if !matches {
                continue;
            }
        }
        regions.push(spec);
    }
    Ok(regions)
}
