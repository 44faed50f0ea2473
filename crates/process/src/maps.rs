//! The target's memory map, read with the `procfs` crate.

use crate::identity::proc_error;
use crate::TargetError;
use std::path::PathBuf;

/// What backs a mapping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MappingKind {
    /// A file (a module: executable or shared library, or a data file).
    File(PathBuf),
    /// Anonymous memory (JIT code, heap arenas, our own patch mappings).
    Anonymous,
    /// A kernel-named region: `[heap]`, `[stack]`, `[vdso]`, `[vvar]`, ...
    Special(String),
}

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
    pub shared: bool,
    pub offset: u64,
    pub inode: u64,
    pub kind: MappingKind,
}

impl Mapping {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    pub fn contains(&self, address: u64) -> bool {
        (self.start..self.end).contains(&address)
    }

    pub fn file(&self) -> Option<&std::path::Path> {
        match &self.kind {
            MappingKind::File(path) => Some(path),
            _ => None,
        }
    }

    /// `r-xp`-style permission string.
    pub fn perms(&self) -> String {
        format!(
            "{}{}{}{}",
            if self.readable { 'r' } else { '-' },
            if self.writable { 'w' } else { '-' },
            if self.executable { 'x' } else { '-' },
            if self.shared { 's' } else { 'p' }
        )
    }

    /// Name for display: file name, `[special]` or `[anon]`.
    pub fn display_name(&self) -> String {
        match &self.kind {
            MappingKind::File(path) => path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            MappingKind::Anonymous => "[anon]".to_string(),
            MappingKind::Special(name) => name.clone(),
        }
    }
}

/// Read /proc/PID/maps.
pub fn read_maps(pid: i32) -> Result<Vec<Mapping>, TargetError> {
    use procfs::process::{MMPermissions, MMapPath};
    let process = procfs::process::Process::new(pid).map_err(|e| proc_error(pid, "maps", e))?;
    let maps = process.maps().map_err(|e| proc_error(pid, "maps", e))?;
    Ok(maps
        .into_iter()
        .map(|m| {
            let kind = match m.pathname {
                MMapPath::Path(path) => MappingKind::File(path),
                MMapPath::Anonymous => MappingKind::Anonymous,
                MMapPath::Heap => MappingKind::Special("[heap]".into()),
                MMapPath::Stack => MappingKind::Special("[stack]".into()),
                MMapPath::TStack(tid) => MappingKind::Special(format!("[stack:{tid}]")),
                MMapPath::Vdso => MappingKind::Special("[vdso]".into()),
                MMapPath::Vvar => MappingKind::Special("[vvar]".into()),
                MMapPath::Vsyscall => MappingKind::Special("[vsyscall]".into()),
                MMapPath::Rollup => MappingKind::Special("[rollup]".into()),
                MMapPath::Vsys(key) => MappingKind::Special(format!("/SYSV{key:08x}")),
                MMapPath::Other(name) => MappingKind::Special(name),
            };
            Mapping {
                start: m.address.0,
                end: m.address.1,
                readable: m.perms.contains(MMPermissions::READ),
                writable: m.perms.contains(MMPermissions::WRITE),
                executable: m.perms.contains(MMPermissions::EXECUTE),
                shared: m.perms.contains(MMPermissions::SHARED),
                offset: m.offset,
                inode: m.inode,
                kind,
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_maps_include_executable_text_of_this_binary() {
        let maps = read_maps(std::process::id() as i32).unwrap();
        let here = main_address();
        let mapping = maps.iter().find(|m| m.contains(here)).expect("code address is mapped");
        assert!(mapping.executable && mapping.readable && !mapping.writable);
        assert!(mapping.file().is_some());
    }

    fn main_address() -> u64 {
        own_maps_include_executable_text_of_this_binary as *const () as u64
    }
}
