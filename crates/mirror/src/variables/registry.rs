//! The registry of a target's critical variables, persisted per target
//! incarnation and written atomically, with the bytes of the guarded ones
//! as they were mirrored.

use super::request::{described, ResolvedVariable};
use super::{VariableError, VariableMode};
use crate::store::write_atomically;
use crate::MirrorError;
use std::path::{Path, PathBuf};

/// File name of the registry inside a target directory.
pub const REGISTRY_FILE: &str = "variables.json";
/// Version of the registry format; a change of layout bumps it.
pub const REGISTRY_FORMAT: u32 = 1;

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
        shadowpatch_symbols::unhex(&text)
            .map(Some)
            .ok_or_else(|| serde::de::Error::custom("not hex bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
