//! DWARF through `gimli`: the signatures of functions (parameters, return
//! type, variadic) and the types of global variables of one ELF file, in a
//! form that can be compared between two builds (size, register class,
//! struct layout). The file's own `.debug_info` is used when present, else
//! a separate debug file `/usr/lib/debug/.build-id/xx/yyyy.debug` with the
//! same build-id (distro `-dbgsym` packages).

use crate::{hex, Module, SymbolsError};
use gimli::{AttributeValue, DwTag, EndianSlice, LittleEndian, UnitOffset};
use object::{Object, ObjectSection};
use serde::Serialize;
use std::borrow::Cow;
use std::path::{Path, PathBuf};

type Slice<'a> = EndianSlice<'a, LittleEndian>;

/// How a value travels in the SysV x86_64 ABI, roughly: what matters to
/// decide whether two types are passed the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TypeClass {
    Void,
    /// Integers, characters, booleans, enums: general-purpose registers.
    Integer,
    /// Floating point: SSE registers.
    Float,
    Pointer,
    /// Structs, unions, arrays.
    Aggregate,
    Unknown,
}

/// A member of a struct or union.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub name: String,
    pub offset: u64,
    pub size: Option<u64>,
    pub type_name: String,
}

/// A type, reduced to what decides compatibility.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TypeShape {
    /// C-like spelling: `long`, `struct point *`, `buffer`.
    pub name: String,
    pub size: Option<u64>,
    pub class: TypeClass,
    /// Members of a struct or union (its layout), else empty.
    pub members: Vec<Member>,
    /// For a pointer: the layout of what it points to, when that is a
    /// struct (a changed struct behind a pointer is a changed meaning).
    pub pointee_members: Vec<Member>,
    /// For a pointer: the size of what it points to (1 for `char *`,
    /// `Some(0)` for `void *`, `None` for an incomplete type).
    pub pointee_size: Option<u64>,
}

impl TypeShape {
    pub fn void() -> Self {
        TypeShape {
            name: "void".into(),
            size: Some(0),
            class: TypeClass::Void,
            members: Vec::new(),
            pointee_members: Vec::new(),
            pointee_size: None,
        }
    }

    fn unknown() -> Self {
        TypeShape {
            name: "?".into(),
            size: None,
            class: TypeClass::Unknown,
            members: Vec::new(),
            pointee_members: Vec::new(),
            pointee_size: None,
        }
    }
}

/// A function as DWARF describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FunctionInfo {
    pub name: String,
    /// File address of the first instruction (definitions only).
    pub low_pc: Option<u64>,
    pub parameters: Parameters,
    pub return_type: TypeShape,
    /// Ends with `...`.
    pub variadic: bool,
    /// `DW_AT_calling_convention`, when given (1 = normal).
    pub calling_convention: Option<u8>,
    pub declaration: bool,
}

/// A variable at file scope (global or static) as DWARF describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VariableInfo {
    pub name: String,
    /// File address, when its location is a fixed address.
    pub address: Option<u64>,
    pub type_shape: TypeShape,
    /// An `extern` declaration rather than a definition.
    pub declaration: bool,
}

/// Where the debug information came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", content = "path", rename_all = "snake_case")]
pub enum DebugSource {
    /// The file's own `.debug_info`.
    Embedded(PathBuf),
    /// A separate debug file found by build-id.
    SeparateFile(PathBuf),
}

impl DebugSource {
    pub fn describe(&self) -> String {
        match self {
            DebugSource::Embedded(path) => format!("{} (.debug_info)", path.display()),
            DebugSource::SeparateFile(path) => path.display().to_string(),
        }
    }
}

/// File-scope functions and variables of one ELF file.
#[derive(Debug, Clone, Default)]
pub struct DebugInfo {
    pub functions: Vec<FunctionInfo>,
    pub variables: Vec<VariableInfo>,
}

impl DebugInfo {
    /// Parse the DWARF of an ELF file in memory; `None` when it has no
    /// `.debug_info`. Only functions and variables whose name `wanted`
    /// accepts have their types resolved (the rest costs a skip).
    pub fn parse(path: &Path, bytes: &[u8], wanted: &dyn Fn(&str) -> bool) -> Result<Option<Self>, SymbolsError> {
        let mut info = DebugInfo::default();
        let found = for_each_unit(path, bytes, &mut |unit| {
            let mut entries = unit.entries();
            while let Some(entry) = entries.next_dfs()? {
                let tag = entry.tag();
                if entry.depth() != 1 || (tag != gimli::DW_TAG_subprogram && tag != gimli::DW_TAG_variable) {
                    continue;
                }
                let Some(name) = name_of(&unit, entry) else {
                    continue;
                };
                if !wanted(&name) {
                    continue;
                }
                let declaration = matches!(
                    entry.attr_value(gimli::DW_AT_declaration),
                    Some(AttributeValue::Flag(true))
                );
                let offset = entry.offset();
                if tag == gimli::DW_TAG_subprogram {
                    let low_pc = entry
                        .attr_value(gimli::DW_AT_low_pc)
                        .and_then(|v| unit.attr_address(v).ok().flatten());
                    let calling_convention = match entry.attr_value(gimli::DW_AT_calling_convention) {
                        Some(AttributeValue::CallingConvention(cc)) => Some(cc.0),
                        _ => None,
                    };
                    let return_type = type_of(&unit, entry.attr_value(gimli::DW_AT_type), 0);
                    let (parameters, variadic) = parameters_of(&unit, offset)?;
                    info.functions.push(FunctionInfo {
                        name,
                        low_pc,
                        parameters,
                        return_type,
                        variadic,
                        calling_convention,
                        declaration,
                    });
                } else {
                    let address = match entry.attr_value(gimli::DW_AT_location) {
                        Some(AttributeValue::Exprloc(expression)) => fixed_address(&unit, expression),
                        _ => None,
                    };
                    info.variables.push(VariableInfo {
                        name,
                        address,
                        type_shape: type_of(&unit, entry.attr_value(gimli::DW_AT_type), 0),
                        declaration,
                    });
                }
            }
            Ok(())
        })?;
        Ok(found.then_some(info))
    }

    /// The definition of function `name` (the one at `low_pc`, when given
    /// and several translation units define a static function of that name).
    pub fn function(&self, name: &str, low_pc: Option<u64>) -> Option<&FunctionInfo> {
        let mut candidates = self.functions.iter().filter(|f| f.name == name && !f.declaration);
        match low_pc {
            Some(address) => {
                let all: Vec<&FunctionInfo> = candidates.collect();
                all.iter()
                    .find(|f| f.low_pc == Some(address))
                    .or_else(|| if all.len() == 1 { all.first() } else { None })
                    .copied()
            }
            None => candidates.next(),
        }
    }

    /// Variable `name`: a definition (preferring the one at `address`),
    /// else an `extern` declaration.
    pub fn variable(&self, name: &str, address: Option<u64>) -> Option<&VariableInfo> {
        let named: Vec<&VariableInfo> = self.variables.iter().filter(|v| v.name == name).collect();
        named
            .iter()
            .find(|v| address.is_some() && v.address == address)
            .or_else(|| named.iter().find(|v| !v.declaration))
            .or_else(|| named.first())
            .copied()
    }
}

/// Visit each compilation unit of an ELF file's DWARF; `false` when the
/// file has no `.debug_info`.
fn for_each_unit(
    path: &Path,
    bytes: &[u8],
    visit: &mut dyn FnMut(gimli::UnitRef<'_, Slice<'_>>) -> gimli::Result<()>,
) -> Result<bool, SymbolsError> {
    let malformed = |message: String| SymbolsError::Malformed {
        path: path.to_path_buf(),
        message,
    };
    let file = object::File::parse(bytes).map_err(|e| malformed(e.to_string()))?;
    if file.section_by_name(".debug_info").is_none_or(|s| s.size() == 0) {
        return Ok(false);
    }
    let sections = gimli::DwarfSections::load(|id| -> Result<Cow<[u8]>, SymbolsError> {
        Ok(match file.section_by_name(id.name()) {
            Some(section) => section
                .uncompressed_data()
                .map_err(|e| malformed(format!("section {}: {e}", id.name())))?,
            None => Cow::Borrowed(&[]),
        })
    })?;
    let dwarf = sections.borrow(|section| EndianSlice::new(section, LittleEndian));
    let mut walk = || -> gimli::Result<()> {
        let mut headers = dwarf.units();
        while let Some(header) = headers.next()? {
            let unit = dwarf.unit(header)?;
            visit(unit.unit_ref(&dwarf))?;
        }
        Ok(())
    };
    walk().map_err(|e| malformed(format!("DWARF: {e}")))?;
    Ok(true)
}

/// One inlined copy of a function (`DW_TAG_inlined_subroutine`): the
/// function's name and the `[start, end)` address ranges of its code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InlinedCode {
    pub function: String,
    pub ranges: Vec<(u64, u64)>,
}

/// Every inlined copy of the functions `wanted` accepts, in an ELF file
/// with its DWARF (addresses as the file has them: a linked file's).
/// Empty when the file has no `.debug_info`.
pub fn inlined_code(
    path: &Path,
    bytes: &[u8],
    wanted: &dyn Fn(&str) -> bool,
) -> Result<Vec<InlinedCode>, SymbolsError> {
    let mut found = Vec::new();
    for_each_unit(path, bytes, &mut |unit| {
        let mut entries = unit.entries();
        while let Some(entry) = entries.next_dfs()? {
            if entry.tag() != gimli::DW_TAG_inlined_subroutine {
                continue;
            }
            let Some(function) = origin_name(&unit, entry, 4) else {
                continue;
            };
            if !wanted(&function) {
                continue;
            }
            let mut ranges = Vec::new();
            let mut iter = unit.die_ranges(entry)?;
            while let Some(range) = iter.next()? {
                if range.end > range.begin {
                    ranges.push((range.begin, range.end));
                }
            }
            if !ranges.is_empty() {
                found.push(InlinedCode { function, ranges });
            }
        }
        Ok(())
    })?;
    Ok(found)
}

/// The name of an entry, or of what it is an instance of (abstract origin,
/// specification), following at most `depth` links.
fn origin_name<'a>(
    unit: &gimli::UnitRef<'_, Slice<'a>>,
    entry: &gimli::DebuggingInformationEntry<Slice<'a>>,
    depth: u32,
) -> Option<String> {
    if let Some(name) = name_of(unit, entry) {
        return Some(name);
    }
    if depth == 0 {
        return None;
    }
    let link = entry
        .attr_value(gimli::DW_AT_abstract_origin)
        .or_else(|| entry.attr_value(gimli::DW_AT_specification))?;
    let AttributeValue::UnitRef(offset) = link else {
        return None;
    };
    let origin = unit.entry(offset).ok()?;
    origin_name(unit, &origin, depth - 1)
}

/// The `DW_AT_name` of an entry.
fn name_of<'a>(
    unit: &gimli::UnitRef<'_, Slice<'a>>,
    entry: &gimli::DebuggingInformationEntry<Slice<'a>>,
) -> Option<String> {
    let value = entry.attr_value(gimli::DW_AT_name)?;
    Some(unit.attr_string(value).ok()?.to_string_lossy().into_owned())
}

/// Named parameters of a function, in order.
type Parameters = Vec<(Option<String>, TypeShape)>;

/// Parameters of the subprogram at `offset`, and whether it is variadic.
fn parameters_of(unit: &gimli::UnitRef<Slice>, offset: UnitOffset) -> gimli::Result<(Parameters, bool)> {
    let mut tree = unit.entries_tree(Some(offset))?;
    let root = tree.root()?;
    let mut children = root.children();
    let mut parameters = Vec::new();
    let mut variadic = false;
    while let Some(child) = children.next()? {
        let entry = child.entry();
        match entry.tag() {
            gimli::DW_TAG_formal_parameter => {
                let name = name_of(unit, entry);
                parameters.push((name, type_of(unit, entry.attr_value(gimli::DW_AT_type), 0)));
            }
            gimli::DW_TAG_unspecified_parameters => variadic = true,
            _ => {}
        }
    }
    Ok((parameters, variadic))
}

/// A `DW_OP_addr X` location: the variable lives at file address X.
fn fixed_address(unit: &gimli::UnitRef<Slice>, expression: gimli::Expression<Slice>) -> Option<u64> {
    let mut operations = expression.operations(unit.encoding());
    match operations.next().ok()?? {
        gimli::Operation::Address { address } => Some(address),
        _ => None,
    }
}

/// Follow a `DW_AT_type` reference (absent: `void`).
fn type_of(unit: &gimli::UnitRef<Slice>, reference: Option<AttributeValue<Slice>>, depth: u32) -> TypeShape {
    let offset = match reference {
        None => return TypeShape::void(),
        Some(AttributeValue::UnitRef(offset)) => offset,
        // Cross-unit references (DW_FORM_ref_addr) are rare in C builds.
        Some(_) => return TypeShape::unknown(),
    };
    if depth > 8 {
        return TypeShape::unknown();
    }
    let Ok(entry) = unit.entry(offset) else {
        return TypeShape::unknown();
    };
    let name = name_of(unit, &entry);
    let size = entry.attr_value(gimli::DW_AT_byte_size).and_then(|v| v.udata_value());
    let inner = || type_of(unit, entry.attr_value(gimli::DW_AT_type), depth + 1);
    let tag: DwTag = entry.tag();
    match tag {
        gimli::DW_TAG_base_type => {
            let encoding = match entry.attr_value(gimli::DW_AT_encoding) {
                Some(AttributeValue::Encoding(encoding)) => encoding,
                _ => gimli::DW_ATE_signed,
            };
            let class = if encoding == gimli::DW_ATE_float {
                TypeClass::Float
            } else {
                TypeClass::Integer
            };
            TypeShape {
                name: name.unwrap_or_else(|| "?".into()),
                size,
                class,
                members: Vec::new(),
                pointee_members: Vec::new(),
                pointee_size: None,
            }
        }
        gimli::DW_TAG_pointer_type | gimli::DW_TAG_reference_type | gimli::DW_TAG_rvalue_reference_type => {
            let pointee = inner();
            TypeShape {
                name: format!("{} *", pointee.name),
                size: size.or(Some(8)),
                class: TypeClass::Pointer,
                members: Vec::new(),
                pointee_size: pointee.size,
                pointee_members: if depth < 2 { pointee.members } else { Vec::new() },
            }
        }
        gimli::DW_TAG_typedef => {
            let mut target = inner();
            if let Some(name) = name {
                target.name = name;
            }
            target
        }
        gimli::DW_TAG_const_type
        | gimli::DW_TAG_volatile_type
        | gimli::DW_TAG_restrict_type
        | gimli::DW_TAG_atomic_type => inner(),
        gimli::DW_TAG_enumeration_type => TypeShape {
            name: format!("enum {}", name.unwrap_or_else(|| "<anonymous>".into())),
            size,
            class: TypeClass::Integer,
            members: Vec::new(),
            pointee_members: Vec::new(),
            pointee_size: None,
        },
        gimli::DW_TAG_structure_type | gimli::DW_TAG_union_type | gimli::DW_TAG_class_type => {
            let keyword = if tag == gimli::DW_TAG_union_type {
                "union"
            } else {
                "struct"
            };
            TypeShape {
                name: format!("{keyword} {}", name.unwrap_or_else(|| "<anonymous>".into())),
                size,
                class: TypeClass::Aggregate,
                members: members_of(unit, offset, depth),
                pointee_members: Vec::new(),
                pointee_size: None,
            }
        }
        gimli::DW_TAG_array_type => {
            let element = inner();
            TypeShape {
                name: format!("{}[]", element.name),
                size,
                class: TypeClass::Aggregate,
                members: Vec::new(),
                pointee_members: Vec::new(),
                pointee_size: None,
            }
        }
        gimli::DW_TAG_subroutine_type => TypeShape {
            name: "function".into(),
            size,
            class: TypeClass::Unknown,
            members: Vec::new(),
            pointee_members: Vec::new(),
            pointee_size: None,
        },
        _ => TypeShape::unknown(),
    }
}

/// The members of the struct or union at `offset`: name, offset, size, type.
fn members_of(unit: &gimli::UnitRef<Slice>, offset: UnitOffset, depth: u32) -> Vec<Member> {
    let mut members = Vec::new();
    let Ok(mut tree) = unit.entries_tree(Some(offset)) else {
        return members;
    };
    let Ok(root) = tree.root() else { return members };
    let mut children = root.children();
    while let Ok(Some(child)) = children.next() {
        let entry = child.entry();
        if entry.tag() != gimli::DW_TAG_member {
            continue;
        }
        let name = name_of(unit, entry).unwrap_or_default();
        let member_offset = entry
            .attr_value(gimli::DW_AT_data_member_location)
            .and_then(|v| v.udata_value())
            .unwrap_or(0);
        // Members' own struct types are named, not expanded: the layout
        // of this level is what a read at an offset depends on.
        let shape = type_of(unit, entry.attr_value(gimli::DW_AT_type), depth.max(7) + 1);
        members.push(Member {
            name,
            offset: member_offset,
            size: shape.size,
            type_name: shape.name,
        });
    }
    members
}

/// The debug information of a loaded module: its own `.debug_info`, else
/// the separate debug file with its build-id. `None` when neither exists.
pub fn module_debug_info(
    pid: i32,
    module: &Module,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<Option<(DebugInfo, DebugSource)>, SymbolsError> {
    let (start, end) = module.ranges.first().copied().unwrap_or((module.base, module.end));
    // The very inode mapped, even if the path was replaced since.
    let by_inode = PathBuf::from(format!("/proc/{pid}/map_files/{start:x}-{end:x}"));
    let bytes = std::fs::read(&by_inode)
        .or_else(|_| std::fs::read(&module.path))
        .map_err(|source| SymbolsError::Io {
            path: module.path.clone(),
            source,
        })?;
    if let Some(info) = DebugInfo::parse(&module.path, &bytes, wanted)? {
        return Ok(Some((info, DebugSource::Embedded(module.path.clone()))));
    }
    let Some(id) = module.image.build_id.as_deref().filter(|id| id.len() > 1) else {
        return Ok(None);
    };
    let hex_id = hex(id);
    let debug_file = PathBuf::from(format!(
        "/usr/lib/debug/.build-id/{}/{}.debug",
        &hex_id[..2],
        &hex_id[2..]
    ));
    let Ok(bytes) = std::fs::read(&debug_file) else {
        return Ok(None);
    };
    Ok(DebugInfo::parse(&debug_file, &bytes, wanted)?.map(|info| (info, DebugSource::SeparateFile(debug_file))))
}

/// [`module_debug_info`] of the functions and variables named `names`,
/// shared by every process that maps the same file: a host-wide apply of
/// a glibc patch read and walked glibc's 4 MB debug file once per process.
/// Kept by the mapped file (device, inode, size, change times), the
/// separate debug file's inode and mtime (an upgraded `-dbg` package is
/// read again) and the names; a failure is not kept. One thread reads a
/// given key at a time, the others wait for its result.
pub fn module_debug_info_named(
    pid: i32,
    module: &Module,
    names: &std::collections::BTreeSet<String>,
) -> Result<Option<(DebugInfo, DebugSource)>, SymbolsError> {
    let (start, end) = module.ranges.first().copied().unwrap_or((module.base, module.end));
    let by_inode = PathBuf::from(format!("/proc/{pid}/map_files/{start:x}-{end:x}"));
    let key = crate::module::FileKey::of(&by_inode, &module.path).map(|file| DebugKey {
        file,
        debug_file: crate::module::debug_stamp(&module.image),
        names: names.clone(),
    });
    let _reading = key.as_ref().map(|key| READING.claim(key));
    if let Some(found) = key.as_ref().and_then(|key| DEBUG_INFOS.get(key)) {
        return Ok(found);
    }
    let found = module_debug_info(pid, module, &|name| names.contains(name))?;
    if let Some(key) = key {
        DEBUG_INFOS.put(key, found.clone());
    }
    Ok(found)
}

/// What [`module_debug_info_named`] keeps its results by.
#[derive(Debug, Clone, PartialEq, Eq)]
struct DebugKey {
    file: crate::module::FileKey,
    /// Inode and mtime of the separate debug file, if installed.
    debug_file: Option<(u64, i128)>,
    names: std::collections::BTreeSet<String>,
}

static READING: crate::claim::Claims<DebugKey> = crate::claim::Claims::new();

/// What a module's debug information lookup found.
type Found = Option<(DebugInfo, DebugSource)>;

/// The debug information read by [`module_debug_info_named`], the least
/// recently used dropped first.
struct DebugInfos {
    entries: std::sync::Mutex<Vec<(DebugKey, Found)>>,
}

static DEBUG_INFOS: DebugInfos = DebugInfos {
    entries: std::sync::Mutex::new(Vec::new()),
};

impl DebugInfos {
    const CAPACITY: usize = 8;

    fn get(&self, key: &DebugKey) -> Option<Found> {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let at = entries.iter().position(|(k, _)| k == key)?;
        let entry = entries.remove(at);
        let found = entry.1.clone();
        entries.push(entry);
        Some(found)
    }

    fn put(&self, key: DebugKey, found: Found) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|(k, _)| *k != key);
        if entries.len() >= Self::CAPACITY {
            entries.remove(0);
        }
        entries.push((key, found));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let path = Path::new("garbage");
        assert!(DebugInfo::parse(path, b"not an elf", &|_| true).is_err());
    }
}
