//! Critical variables: ranges of a target's memory that the user declared
//! important, named by symbol (size from the symbol table) or by address
//! range, each either `guarded` (must never change after it was mirrored:
//! a change is an alert and can be healed) or `mirrored` (changes
//! legitimately; copied periodically, kept with a short history).
//!
//! The resolved set is persisted per target incarnation in
//! `targets/<pid>-<start>/variables.json`, written atomically, so every
//! command (watch, status, apply, rollback, snapshot) sees the same set.
//! A guarded variable's bytes as mirrored are stored with it: they are
//! what the verifier compares with and what a heal writes back.

use crate::store::write_atomically;
use crate::MirrorError;
use shadowpatch_process::Mapping;
use shadowpatch_symbols::Module;
use std::path::{Path, PathBuf};

/// File name of the registry inside a target directory.
pub const REGISTRY_FILE: &str = "variables.json";
/// Version of the registry format; a change of layout bumps it.
pub const REGISTRY_FORMAT: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VariableMode {
    /// Must never change after mirroring: a change is an alert (heal-able).
    Guarded,
    /// Changes legitimately: copied periodically with a short history.
    Mirrored,
}

impl VariableMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VariableMode::Guarded => "guarded",
            VariableMode::Mirrored => "mirrored",
        }
    }
}

/// How the user named a variable, before resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VariableTarget {
    /// A symbol, optionally qualified by its module (`module!symbol`).
    Symbol { module: Option<String>, name: String },
    /// An explicit address range.
    Range { address: u64, size: u64 },
}

/// One requested variable, with where the request came from (for errors).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariableRequest {
    pub target: VariableTarget,
    pub mode: VariableMode,
    /// `--guard busy!scale`, `watch.toml: variable 2`, ...
    pub origin: String,
}

/// Bad variable declarations: each names the variable and where it was declared.
#[derive(Debug, thiserror::Error)]
pub enum VariableError {
    #[error("{origin}: {message}")]
    Syntax { origin: String, message: String },
    #[error("{origin}: no symbol {name} in {place} of pid {pid}")]
    UnknownSymbol {
        origin: String,
        name: String,
        place: String,
        pid: i32,
    },
    #[error("{origin}: symbol {name} is defined in several places ({places}); qualify it as MODULE!{name}")]
    Ambiguous {
        origin: String,
        name: String,
        places: String,
    },
    #[error("{origin}: {what} has size 0 (give an address range ADDR:SIZE instead)")]
    ZeroSize { origin: String, what: String },
    #[error("{origin}: {range} is not mapped readable in pid {pid}")]
    Unmapped { origin: String, range: String, pid: i32 },
    #[error(
        "{origin}: {range} is not writable memory in pid {pid}; a mirrored variable is tracked \
         through its writes (declare it guarded)"
    )]
    NotWritable { origin: String, range: String, pid: i32 },
    #[error("{origin}: {range} overlaps {other} ({other_origin})")]
    Overlap {
        origin: String,
        range: String,
        other: String,
        other_origin: String,
    },
}

/// A resolved, registered critical variable.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CriticalVariable {
    /// `module!symbol`, or the address range for an unnamed one.
    pub name: String,
    pub module: Option<String>,
    pub symbol: Option<String>,
    pub address: u64,
    pub size: u64,
    pub mode: VariableMode,
    pub build_id: Option<String>,
    pub registered_unix_ms: u64,
    /// Where it was declared (flag or config file).
    pub origin: String,
    /// For a guarded variable: its bytes when it was mirrored.
    #[serde(default, with = "optional_hex", skip_serializing_if = "Option::is_none")]
    pub guarded_bytes: Option<Vec<u8>>,
}

impl CriticalVariable {
    pub fn end(&self) -> u64 {
        self.address + self.size
    }

    pub fn range_text(&self) -> String {
        format!("{:#x}..{:#x}", self.address, self.end())
    }
}

/// The variables registered for one target incarnation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VariableRegistry {
    pub format: u32,
    pub pid: i32,
    pub start_time: u64,
    pub variables: Vec<CriticalVariable>,
}

impl VariableRegistry {
    pub fn new(pid: i32, start_time: u64) -> Self {
        VariableRegistry {
            format: REGISTRY_FORMAT,
            pid,
            start_time,
            variables: Vec::new(),
        }
    }

    pub fn path_in(target_dir: &Path) -> PathBuf {
        target_dir.join(REGISTRY_FILE)
    }

    /// The registry of a target directory; `None` when none was written.
    pub fn load(target_dir: &Path) -> Result<Option<Self>, MirrorError> {
        load_versioned_json(
            &Self::path_in(target_dir),
            "critical-variable registry",
            REGISTRY_FORMAT,
            |registry: &Self| registry.format,
        )
    }

    /// Write the registry atomically (the previous file stays whole if this fails).
    pub fn save(&self, target_dir: &Path) -> Result<(), MirrorError> {
        let path = Self::path_in(target_dir);
        let json = serde_json::to_vec_pretty(self).expect("the registry serializes");
        write_atomically(&path, &json).map_err(|source| MirrorError::Io { path, source })
    }

    pub fn guarded(&self) -> impl Iterator<Item = &CriticalVariable> {
        self.variables.iter().filter(|v| v.mode == VariableMode::Guarded)
    }
}

/// Read a versioned JSON file of the state directory: `None` when it does
/// not exist; unparsable or of another format version is refused, naming
/// the file and `what` it holds.
pub(crate) fn load_versioned_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    what: &str,
    expected_format: u32,
    format_of: impl Fn(&T) -> u32,
) -> Result<Option<T>, MirrorError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(MirrorError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    let value: T = serde_json::from_slice(&bytes).map_err(|e| MirrorError::Corrupt {
        path: path.to_path_buf(),
        message: format!("{what} is not valid: {e}"),
    })?;
    let format = format_of(&value);
    if format != expected_format {
        return Err(MirrorError::Corrupt {
            path: path.to_path_buf(),
            message: format!("{what} format {format} is not supported (expected {expected_format})"),
        });
    }
    Ok(Some(value))
}

impl VariableRequest {
    /// Parse `0xADDR:SIZE` (size decimal or 0x-hex, optional K/M suffix),
    /// `MODULE!SYMBOL` or `SYMBOL`.
    pub fn parse(text: &str, mode: VariableMode, origin: &str) -> Result<Self, VariableError> {
        let syntax = |message: String| VariableError::Syntax {
            origin: origin.to_string(),
            message,
        };
        let text = text.trim();
        if text.is_empty() {
            return Err(syntax("empty variable name".into()));
        }
        let target = if let Some((address, size)) = text.split_once(':').filter(|_| text.starts_with("0x")) {
            let address = parse_number(address).ok_or_else(|| syntax(format!("{address:?} is not an address")))?;
            let size = parse_size(size).ok_or_else(|| syntax(format!("{size:?} is not a size")))?;
            VariableTarget::Range { address, size }
        } else if text.starts_with("0x") {
            return Err(syntax(format!("{text:?}: an address range is written ADDR:SIZE")));
        } else {
            match text.split_once('!') {
                Some((module, name)) if !module.is_empty() && !name.is_empty() => VariableTarget::Symbol {
                    module: Some(module.to_string()),
                    name: name.to_string(),
                },
                Some(_) => return Err(syntax(format!("{text:?} is not MODULE!SYMBOL"))),
                None => VariableTarget::Symbol {
                    module: None,
                    name: text.to_string(),
                },
            }
        };
        Ok(VariableRequest {
            target,
            mode,
            origin: origin.to_string(),
        })
    }
}

/// `0x1f`, `31`.
pub fn parse_number(text: &str) -> Option<u64> {
    let text = text.trim();
    match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// A size: a number with an optional `K`/`M`/`G` (binary) suffix.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let (number, multiplier) = match text.char_indices().last()? {
        (i, 'k' | 'K') => (&text[..i], 1u64 << 10),
        (i, 'm' | 'M') => (&text[..i], 1 << 20),
        (i, 'g' | 'G') => (&text[..i], 1 << 30),
        _ => (text, 1),
    };
    parse_number(number)?.checked_mul(multiplier)
}

/// A variable resolved to an address range, not yet registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedVariable {
    pub name: String,
    pub module: Option<String>,
    pub symbol: Option<String>,
    pub address: u64,
    pub size: u64,
    pub mode: VariableMode,
    pub build_id: Option<String>,
    pub origin: String,
}

/// Resolve requests against the live modules and mappings of `pid`: every
/// symbol known with a size, every range non-empty and mapped readable, and
/// no two requests overlapping.
pub fn resolve(
    requests: &[VariableRequest],
    pid: i32,
    maps: &[Mapping],
    modules: &[Module],
) -> Result<Vec<ResolvedVariable>, VariableError> {
    let mut resolved: Vec<ResolvedVariable> = Vec::new();
    for request in requests {
        let variable = resolve_one(request, pid, modules)?;
        let range = format!("{:#x}..{:#x}", variable.address, variable.address + variable.size);
        if !covered(maps, variable.address, variable.size, |m| m.readable) {
            return Err(VariableError::Unmapped {
                origin: request.origin.clone(),
                range,
                pid,
            });
        }
        // Checked here, before anything is registered: a mirrored variable
        // the dirty tracker cannot track would fail every later watch.
        if variable.mode == VariableMode::Mirrored && !covered(maps, variable.address, variable.size, |m| m.writable) {
            return Err(VariableError::NotWritable {
                origin: request.origin.clone(),
                range,
                pid,
            });
        }
        if let Some(other) = resolved
            .iter()
            .find(|o| o.address < variable.address + variable.size && variable.address < o.address + o.size)
        {
            return Err(VariableError::Overlap {
                origin: request.origin.clone(),
                range: described(&variable.name, variable.address, variable.size),
                other: described(&other.name, other.address, other.size),
                other_origin: other.origin.clone(),
            });
        }
        resolved.push(variable);
    }
    Ok(resolved)
}

fn resolve_one(request: &VariableRequest, pid: i32, modules: &[Module]) -> Result<ResolvedVariable, VariableError> {
    let origin = request.origin.clone();
    match &request.target {
        VariableTarget::Range { address, size } => {
            if *size == 0 {
                return Err(VariableError::ZeroSize {
                    origin,
                    what: format!("range {address:#x}"),
                });
            }
            if address.checked_add(*size).is_none() {
                return Err(VariableError::Syntax {
                    origin,
                    message: format!("range {address:#x} + {size} overflows the address space"),
                });
            }
            let module = modules.iter().find(|m| m.contains(*address));
            Ok(ResolvedVariable {
                name: format!("{address:#x}:{size}"),
                module: module.map(|m| m.name.clone()),
                symbol: None,
                address: *address,
                size: *size,
                mode: request.mode,
                build_id: module.and_then(Module::build_id_hex),
                origin,
            })
        }
        VariableTarget::Symbol { module, name } => {
            let candidates: Vec<&Module> = match module {
                Some(wanted) => modules.iter().filter(|m| m.matches_name(wanted)).collect(),
                None => modules.iter().collect(),
            };
            let mut found: Vec<(&Module, u64, u64)> = Vec::new();
            for m in &candidates {
                for (address, symbol) in m.symbol_addresses(name) {
                    if !found.iter().any(|(_, a, _)| *a == address) {
                        found.push((m, address, symbol.size));
                    }
                }
            }
            let place = match module {
                Some(wanted) if candidates.is_empty() => format!("any module named {wanted}"),
                Some(wanted) => format!("module {wanted}"),
                None => format!("any of its {} modules", modules.len()),
            };
            match found.as_slice() {
                [] => Err(VariableError::UnknownSymbol {
                    origin,
                    name: name.clone(),
                    place,
                    pid,
                }),
                [(m, address, size)] => {
                    if *size == 0 {
                        return Err(VariableError::ZeroSize {
                            origin,
                            what: format!("symbol {}!{name}", m.name),
                        });
                    }
                    Ok(ResolvedVariable {
                        name: format!("{}!{name}", m.name),
                        module: Some(m.name.clone()),
                        symbol: Some(name.clone()),
                        address: *address,
                        size: *size,
                        mode: request.mode,
                        build_id: m.build_id_hex(),
                        origin,
                    })
                }
                many => Err(VariableError::Ambiguous {
                    origin,
                    name: name.clone(),
                    places: many
                        .iter()
                        .map(|(m, a, _)| format!("{}!{name} at {a:#x}", m.name))
                        .collect::<Vec<_>>()
                        .join(", "),
                }),
            }
        }
    }
}

/// `name (0xaddr, N bytes)`, for overlap errors.
fn described(name: &str, address: u64, size: u64) -> String {
    format!("{name} ({address:#x}, {size} bytes)")
}

/// Whether `[address, address + size)` lies wholly in mappings that are `wanted`.
fn covered(maps: &[Mapping], address: u64, size: u64, wanted: impl Fn(&Mapping) -> bool) -> bool {
    let end = address + size;
    let mut at = address;
    while at < end {
        match maps.iter().find(|m| wanted(m) && m.contains(at)) {
            Some(m) => at = m.end,
            None => return false,
        }
    }
    true
}

/// Merge newly resolved variables into `registry`. A variable registered
/// before with the same range and mode is kept as it is (its mirrored
/// bytes are not re-read); any other overlap is refused. `read_bytes`
/// captures a new guarded variable's bytes. Returns how many were added.
pub fn merge(
    registry: &mut VariableRegistry,
    resolved: Vec<ResolvedVariable>,
    now_unix_ms: u64,
    read_bytes: &mut dyn FnMut(u64, u64) -> Result<Vec<u8>, MirrorError>,
) -> Result<usize, MirrorError> {
    let mut added = 0;
    let mut new_variables = Vec::new();
    for variable in resolved {
        let same = registry
            .variables
            .iter()
            .any(|o| o.address == variable.address && o.size == variable.size && o.mode == variable.mode);
        if same {
            continue;
        }
        if let Some(other) = registry
            .variables
            .iter()
            .find(|o| o.address < variable.address + variable.size && variable.address < o.end())
        {
            return Err(MirrorError::Variable(VariableError::Overlap {
                origin: variable.origin.clone(),
                range: described(&variable.name, variable.address, variable.size),
                other: format!(
                    "{}, already registered as {}",
                    described(&other.name, other.address, other.size),
                    other.mode.as_str()
                ),
                other_origin: other.origin.clone(),
            }));
        }
        let guarded_bytes = match variable.mode {
            VariableMode::Guarded => Some(read_bytes(variable.address, variable.size)?),
            VariableMode::Mirrored => None,
        };
        new_variables.push(CriticalVariable {
            name: variable.name,
            module: variable.module,
            symbol: variable.symbol,
            address: variable.address,
            size: variable.size,
            mode: variable.mode,
            build_id: variable.build_id,
            registered_unix_ms: now_unix_ms,
            origin: variable.origin,
            guarded_bytes,
        });
        added += 1;
    }
    registry.variables.extend(new_variables);
    registry.variables.sort_by_key(|v| v.address);
    Ok(added)
}

pub(crate) mod optional_hex {
    pub fn serialize<S: serde::Serializer>(bytes: &Option<Vec<u8>>, serializer: S) -> Result<S::Ok, S::Error> {
        match bytes {
            Some(bytes) => serializer.serialize_some(&shadowpatch_symbols::hex(bytes)),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Vec<u8>>, D::Error> {
        let text: Option<String> = serde::Deserialize::deserialize(deserializer)?;
        let Some(text) = text else { return Ok(None) };
        if !text.len().is_multiple_of(2) {
            return Err(serde::de::Error::custom("odd-length hex"));
        }
        (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16).map_err(serde::de::Error::custom))
            .collect::<Result<Vec<u8>, _>>()
            .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_symbols_and_ranges_and_refuses_malformed_ones() {
        let guarded = VariableMode::Guarded;
        assert_eq!(
            VariableRequest::parse("busy!scale", guarded, "--guard").unwrap().target,
            VariableTarget::Symbol {
                module: Some("busy".into()),
                name: "scale".into()
            }
        );
        assert_eq!(
            VariableRequest::parse("scale", guarded, "--guard").unwrap().target,
            VariableTarget::Symbol {
                module: None,
                name: "scale".into()
            }
        );
        assert_eq!(
            VariableRequest::parse("0x1000:16", guarded, "--guard").unwrap().target,
            VariableTarget::Range {
                address: 0x1000,
                size: 16
            }
        );
        assert_eq!(
            VariableRequest::parse("0x1000:0x10", guarded, "x").unwrap().target,
            VariableTarget::Range {
                address: 0x1000,
                size: 16
            }
        );
        assert_eq!(
            VariableRequest::parse("0x1000:16M", guarded, "x").unwrap().target,
            VariableTarget::Range {
                address: 0x1000,
                size: 16 << 20
            }
        );
        for bad in ["", "0x1000", "0xzz:4", "0x1000:many", "!x", "lib!"] {
            let error = VariableRequest::parse(bad, guarded, "--guard").unwrap_err();
            assert!(error.to_string().starts_with("--guard: "), "{bad:?}: {error}");
        }
    }

    #[test]
    fn registry_round_trips_and_merge_keeps_what_was_mirrored() {
        let dir = tempfile::tempdir().unwrap();
        assert!(VariableRegistry::load(dir.path()).unwrap().is_none());
        let mut registry = VariableRegistry::new(7, 8);
        let variable = |address: u64, size: u64| ResolvedVariable {
            name: format!("{address:#x}:{size}"),
            module: None,
            symbol: None,
            address,
            size,
            mode: VariableMode::Guarded,
            build_id: None,
            origin: "test".into(),
        };
        let mut reads = 0;
        let mut read = |_: u64, size: u64| {
            reads += 1;
            Ok(vec![0xab; size as usize])
        };
        assert_eq!(
            merge(&mut registry, vec![variable(0x1000, 4)], 1, &mut read).unwrap(),
            1
        );
        // The same variable again: kept, its bytes not re-read.
        assert_eq!(
            merge(&mut registry, vec![variable(0x1000, 4)], 2, &mut read).unwrap(),
            0
        );
        let error = merge(&mut registry, vec![variable(0x1002, 4)], 3, &mut read).unwrap_err();
        assert!(error.to_string().contains("overlaps"), "{error}");
        assert_eq!(reads, 1);
        registry.save(dir.path()).unwrap();
        let loaded = VariableRegistry::load(dir.path()).unwrap().unwrap();
        assert_eq!(loaded, registry);
        assert_eq!(loaded.variables[0].guarded_bytes.as_deref(), Some(&[0xab; 4][..]));
        std::fs::write(VariableRegistry::path_in(dir.path()), b"{").unwrap();
        assert!(VariableRegistry::load(dir.path()).is_err());
    }
}
