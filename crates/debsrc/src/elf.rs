//! The few ELF facts this crate needs: a file's GNU build-id, whether it
//! carries a symbol table, and whether two images load the same bytes
//! (every allocated section equal but the build-id note), which is what a
//! rebuild that differs only in debug information gives.

use std::path::{Path, PathBuf};

use object::{Object, ObjectKind, ObjectSection, SectionFlags};

/// Reading an ELF file failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildIdError {
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not an ELF object: {source}", .path.display())]
    NotElf {
        path: PathBuf,
        #[source]
        source: object::Error,
    },
    #[error("{} has no GNU build-id note", .path.display())]
    NoBuildId { path: PathBuf },
}

impl shadowpatch_failure::Classify for BuildIdError {
    fn class(&self) -> shadowpatch_failure::FailureClass {
        match self {
            BuildIdError::Read { source, .. } => shadowpatch_failure::class_of_io(source),
            _ => shadowpatch_failure::FailureClass::BadInput,
        }
    }
}

/// What a scan of one ELF file found.
#[derive(Debug, Clone)]
pub(crate) struct ElfFacts {
    pub build_id: Option<String>,
    /// An executable or shared object (not a relocatable `.o`).
    pub linked: bool,
    /// Has `.symtab` (not stripped).
    pub has_symtab: bool,
    /// Has DWARF (`.debug_info`).
    pub has_debug_info: bool,
}

fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

fn read(path: &Path) -> Result<Vec<u8>, BuildIdError> {
    std::fs::read(path).map_err(|source| BuildIdError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn parse<'data>(path: &Path, data: &'data [u8]) -> Result<object::File<'data>, BuildIdError> {
    object::File::parse(data).map_err(|source| BuildIdError::NotElf {
        path: path.to_path_buf(),
        source,
    })
}

/// The GNU build-id of the ELF file at `path`, in lowercase hex.
pub fn build_id_hex(path: &Path) -> Result<String, BuildIdError> {
    let data = read(path)?;
    let file = parse(path, &data)?;
    match file.build_id() {
        Ok(Some(id)) if !id.is_empty() => Ok(hex(id)),
        _ => Err(BuildIdError::NoBuildId {
            path: path.to_path_buf(),
        }),
    }
}

/// The facts of an ELF file, or `None` when it is not one (most files of
/// a build tree are not).
pub(crate) fn facts(path: &Path) -> Option<ElfFacts> {
    let data = std::fs::read(path).ok()?;
    let file = object::File::parse(&*data).ok()?;
    if file.format() != object::BinaryFormat::Elf {
        return None;
    }
    Some(ElfFacts {
        build_id: file.build_id().ok().flatten().filter(|id| !id.is_empty()).map(hex),
        linked: matches!(file.kind(), ObjectKind::Executable | ObjectKind::Dynamic),
        has_symtab: file.section_by_name(".symtab").is_some(),
        has_debug_info: file.section_by_name(".debug_info").is_some(),
    })
}

/// Whether the two images load exactly the same bytes: the same allocated
/// sections (name, address, size, contents), the build-id note excepted.
/// `.bss`-like sections compare by name, address and size.
pub(crate) fn same_loaded_bytes(left: &Path, right: &Path) -> Result<bool, BuildIdError> {
    let (left_data, right_data) = (read(left)?, read(right)?);
    let (left_file, right_file) = (parse(left, &left_data)?, parse(right, &right_data)?);
    let allocated = |file: &object::File<'_>| -> Vec<(String, u64, u64, Vec<u8>)> {
        file.sections()
            .filter(|section| matches!(section.flags(), SectionFlags::Elf { sh_flags } if sh_flags & u64::from(object::elf::SHF_ALLOC) != 0))
            .filter(|section| section.name() != Ok(".note.gnu.build-id"))
            .map(|section| {
                let contents = section.uncompressed_data().map(|data| data.into_owned()).unwrap_or_default();
                (section.name().unwrap_or("").to_string(), section.address(), section.size(), contents)
            })
            .collect()
    };
    Ok(allocated(&left_file) == allocated(&right_file))
}
