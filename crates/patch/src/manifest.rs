//! The patch manifest (format v1): a TOML file beside the patch object.
//!
//! ```toml
//! id = "ping-fix"
//! object = "ping_fix.so"          # relative to the manifest
//! [target]
//! build_id = "a50d6825e7..."
//! module = "redis-server"         # optional file-name hint
//! [[replace]]
//! symbol = "pingCommand"
//! with = "pingCommand_fixed"
//! ```
//!
//! Unknown keys are refused (a typo must not silently drop a replacement).
//!
//! A `[[replace]]` may say whether the patch means to change what the
//! function does: `behaviour = "preserved"` (the default: any difference
//! the simulation sees is a warning) or `"changed"` (differences are the
//! point of the patch; expected results may be given, and the analysis
//! checks them on simulated calls):
//!
//! ```toml
//! [[replace]]
//! symbol = "compute"
//! with = "compute_fixed"
//! behaviour = "changed"
//! expect = [{ args = [5], returns = 1000016 }, { args = [-1, 0x10], returns = 0 }]
//! ```
//!
//! `args` are up to six integers (rdi, rsi, rdx, rcx, r8, r9, as
//! `--call` takes them); `returns` is compared with rax, or with eax only
//! when it fits in 32 bits (an `int` leaves rax's upper half undefined).
//!
//! `changed_code` (written by `shadowpatch build`) says where the change
//! is when a replacement only carries it, as code of a changed function
//! the compiler inlined into it; a simulated call that runs none of it is
//! no evidence about the change:
//!
//! ```toml
//! changed_code = [{ offset = 0x2d0, size = 0x58, function = "process_delete_command" }]
//! ```
//!
//! Optional `[[symbol]]` entries name functions and variables of the
//! target module by file address, for this exact build-id: `shadowpatch
//! build` writes them when the target is stripped or two files have
//! statics of one name. Each hides every other symbol of its name in the
//! module, for `[[replace]]` and for the object's undefined symbols alike.
//!
//! ```toml
//! [[symbol]]
//! name = "b.c::counter"           # as the object and [[replace]] use it
//! address = 16400                 # file virtual address in the target
//! size = 4
//! kind = "object"                 # or "function"
//! ```

use crate::PatchError;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Unique per target process.
    pub id: String,
    /// The patch object, relative to the manifest's directory.
    pub object: PathBuf,
    pub target: TargetSpec,
    #[serde(rename = "replace")]
    pub replacements: Vec<Replacement>,
    /// Optional free text shown in status and history.
    #[serde(default)]
    pub description: Option<String>,
    /// Target symbols by address (see the module comment).
    #[serde(default, rename = "symbol", skip_serializing_if = "Vec::is_empty")]
    pub symbols: Vec<BoundSymbol>,
}

/// A symbol of the target module at a file address, for this build-id.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct BoundSymbol {
    pub name: String,
    /// File virtual address in the target module (the load bias is added).
    pub address: u64,
    pub size: u64,
    pub kind: BoundKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BoundKind {
    Function,
    Object,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSpec {
    /// Hex GNU build-id of the module whose functions are replaced.
    pub build_id: String,
    /// Optional file-name hint (checked when given).
    #[serde(default)]
    pub module: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Replacement {
    /// Function in the target module (.symtab or .dynsym).
    pub symbol: String,
    /// Function in the patch object.
    pub with: String,
    /// Whether the replacement means to change the function's behaviour.
    #[serde(default, skip_serializing_if = "Behaviour::is_preserved")]
    pub behaviour: Behaviour,
    /// Expected results for given inputs (`behaviour = "changed"` only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expect: Vec<Expectation>,
    /// Where the change is inside `with`, when `with` only carries it: the
    /// code of changed functions the compiler inlined into it (`shadowpatch
    /// build` writes these from the patched object's DWARF). Empty: all of
    /// `with` is the change. A simulated call is evidence about the change
    /// only if it runs code in one of these ranges.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed_code: Vec<CodeRange>,
}

/// Code inside a replacement: `size` bytes at `offset` from its first
/// byte, holding an inlined copy of `function`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct CodeRange {
    pub offset: u64,
    pub size: u64,
    /// The changed function whose code this is.
    pub function: String,
}

/// What a replacement means to do to the function's behaviour.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Behaviour {
    /// Same results for the same inputs (a refactoring, a fix of a crash).
    #[default]
    Preserved,
    /// Other results for some inputs: the point of the patch.
    Changed,
}

impl Behaviour {
    pub fn is_preserved(&self) -> bool {
        *self == Behaviour::Preserved
    }
}

/// One expected result: the replacement called with `args` returns `returns`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Expectation {
    /// Integer arguments, in register order (at most six).
    pub args: Vec<i64>,
    /// The return value (rax; eax when it fits in 32 bits).
    pub returns: i64,
}

impl Expectation {
    /// Whether `rax` is the expected return value: all 64 bits, or the
    /// low 32 when the expected value fits in an `int` / `unsigned`.
    pub fn met_by(&self, rax: u64) -> bool {
        let expected = self.returns;
        if rax == expected as u64 {
            return true;
        }
        let fits_32 = i32::try_from(expected).is_ok() || u32::try_from(expected).is_ok();
        fits_32 && rax as u32 == expected as u32
    }

    /// The call as `--call` writes it: `compute(5, -1)`.
    pub fn call_text(&self, function: &str) -> String {
        let args: Vec<String> = self.args.iter().map(|a| a.to_string()).collect();
        format!("{function}({})", args.join(", "))
    }
}

impl Manifest {
    /// Read and validate a manifest file.
    pub fn load(path: &Path) -> Result<(Manifest, PathBuf), PatchError> {
        let bytes = read_input(path, MAX_MANIFEST_BYTES).map_err(|message| PatchError::Manifest {
            path: path.to_path_buf(),
            message,
        })?;
        Self::from_bytes(path, &bytes)
    }

    /// Parse manifest bytes already read from `path` (the bytes a
    /// signature was checked over), resolving the object beside it.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<(Manifest, PathBuf), PatchError> {
        let malformed = |message: String| PatchError::Manifest {
            path: path.to_path_buf(),
            message,
        };
        let text = std::str::from_utf8(bytes).map_err(|_| malformed("not UTF-8 text".into()))?;
        let manifest = Self::parse(text).map_err(malformed)?;
        let object = path.parent().unwrap_or(Path::new(".")).join(&manifest.object);
        Ok((manifest, object))
    }

    /// Parse and validate manifest text; the error is one line.
    pub fn parse(text: &str) -> Result<Manifest, String> {
        let manifest: Manifest = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].lines().count().max(1));
            match line {
                Some(line) => format!("line {line}: {}", e.message()),
                None => e.message().to_string(),
            }
        })?;
        manifest.validate()?;
        Ok(manifest)
    }

    fn validate(&self) -> Result<(), String> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 64
            && self.id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !id_ok {
            return Err(format!("id {:?}: use 1-64 characters of [A-Za-z0-9._-]", self.id));
        }
        let hex_ok = self.target.build_id.len() >= 8
            && self.target.build_id.len().is_multiple_of(2)
            && self.target.build_id.chars().all(|c| c.is_ascii_hexdigit());
        if !hex_ok {
            return Err(format!(
                "target.build_id {:?} is not a hex build-id",
                self.target.build_id
            ));
        }
        if self.replacements.is_empty() {
            return Err("no [[replace]] entries: nothing to patch".into());
        }
        for (i, r) in self.replacements.iter().enumerate() {
            if r.symbol.is_empty() || r.with.is_empty() {
                return Err(format!("replace[{i}]: symbol and with must both be non-empty"));
            }
            if self.replacements[..i].iter().any(|earlier| earlier.symbol == r.symbol) {
                return Err(format!("replace[{i}]: symbol {} is replaced twice", r.symbol));
            }
            if !r.expect.is_empty() && r.behaviour != Behaviour::Changed {
                return Err(format!(
                    "replace[{i}] ({}): expect needs behaviour = \"changed\" (a preserved behaviour is checked against the original)",
                    r.symbol
                ));
            }
            for (j, range) in r.changed_code.iter().enumerate() {
                if range.size == 0 || range.offset.checked_add(range.size).is_none() || range.function.is_empty() {
                    return Err(format!(
                        "replace[{i}].changed_code[{j}] ({}): needs a function and a non-empty range (offset {}, size {})",
                        r.symbol, range.offset, range.size
                    ));
                }
            }
            for (j, expectation) in r.expect.iter().enumerate() {
                if expectation.args.len() > 6 {
                    return Err(format!(
                        "replace[{i}].expect[{j}] ({}): {} args; at most 6 integers (rdi, rsi, rdx, rcx, r8, r9)",
                        r.symbol,
                        expectation.args.len()
                    ));
                }
            }
        }
        for (i, bound) in self.symbols.iter().enumerate() {
            if bound.name.is_empty() || bound.address == 0 {
                return Err(format!("symbol[{i}]: name and a non-zero address are required"));
            }
            if self.symbols[..i].iter().any(|earlier| earlier.name == bound.name) {
                return Err(format!("symbol[{i}]: {} is named twice", bound.name));
            }
        }
        Ok(())
    }

    /// The `[[symbol]]` entries as symbols of the target module.
    pub fn bound_symbols(&self) -> Vec<shadowpatch_symbols::Symbol> {
        self.symbols
            .iter()
            .map(|bound| shadowpatch_symbols::Symbol {
                name: bound.name.clone(),
                address: bound.address,
                size: bound.size,
                kind: match bound.kind {
                    BoundKind::Function => shadowpatch_symbols::SymbolKind::Function,
                    BoundKind::Object => shadowpatch_symbols::SymbolKind::Object,
                },
                source: shadowpatch_symbols::SymbolSource::Manifest,
                global: false,
                ifunc: false,
            })
            .collect()
    }

    pub fn build_id_lowercase(&self) -> String {
        self.target.build_id.to_ascii_lowercase()
    }
}

/// A patch as read from disk, once: the manifest's bytes and their parse,
/// and the object's bytes, both read bounded. Everything downstream (the
/// trust policy's signature check, the analysis, the simulation, the
/// transaction) works on this value and never opens the files again, so
/// the bytes checked are the bytes applied.
#[derive(Debug, Clone)]
pub struct PatchInput {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
    pub manifest_bytes: Vec<u8>,
    /// Resolved against the manifest's directory.
    pub object_path: PathBuf,
    pub object_bytes: std::sync::Arc<[u8]>,
}

impl PatchInput {
    /// Read the manifest at `manifest_path` and the object it names.
    pub fn read(manifest_path: &Path) -> Result<PatchInput, PatchError> {
        let manifest_bytes = read_input(manifest_path, MAX_MANIFEST_BYTES).map_err(|message| PatchError::Manifest {
            path: manifest_path.to_path_buf(),
            message,
        })?;
        let (manifest, object_path) = Manifest::from_bytes(manifest_path, &manifest_bytes)?;
        let object_bytes = read_input(&object_path, MAX_OBJECT_BYTES).map_err(|message| PatchError::Object {
            path: object_path.clone(),
            message: format!("cannot read: {message}"),
        })?;
        Ok(PatchInput {
            manifest,
            manifest_path: manifest_path.to_path_buf(),
            manifest_bytes,
            object_path,
            object_bytes: object_bytes.into(),
        })
    }

    /// The object, parsed from the bytes read.
    pub fn object(&self) -> Result<crate::PatchObject, PatchError> {
        crate::PatchObject::parse(&self.object_path, self.object_bytes.to_vec())
    }
}

/// The largest manifest read (a manifest is a few hundred bytes).
pub const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;
/// The largest patch object read.
pub const MAX_OBJECT_BYTES: u64 = 256 * 1024 * 1024;

/// Reads a whole input file of at most `limit` bytes, refusing FIFOs and
/// devices without blocking on them (a FIFO as a manifest hung the tool,
/// `/dev/zero` was read until memory ran out). The message names no path:
/// the caller's error does.
pub fn read_input(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    use shadowpatch_signing::SigningError;
    shadowpatch_signing::read_bounded(path, limit).map_err(|error| match error {
        SigningError::Io { source, .. } => source.to_string(),
        SigningError::NotRegular { kind, .. } => format!("is not a regular file ({kind}); refusing to read it"),
        SigningError::TooLarge { size, limit, .. } => format!("is {size} bytes, more than the {limit} bytes allowed"),
        other => other.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
id = "ping-fix"
object = "ping_fix.so"
[target]
build_id = "A50D6825e7aa"
module = "redis-server"
[[replace]]
symbol = "pingCommand"
with = "pingCommand_fixed"
"#;

    #[test]
    fn parses_the_documented_example() {
        let m = Manifest::parse(GOOD).unwrap();
        assert_eq!(m.id, "ping-fix");
        assert_eq!(m.build_id_lowercase(), "a50d6825e7aa");
        assert_eq!(m.replacements[0].with, "pingCommand_fixed");
    }

    #[test]
    fn bound_symbols_round_trip() {
        let text =
            format!("{GOOD}[[symbol]]\nname = \"b.c::counter\"\naddress = 0x4010\nsize = 4\nkind = \"object\"\n");
        let m = Manifest::parse(&text).unwrap();
        assert_eq!(m.symbols[0].address, 0x4010);
        let again = Manifest::parse(&toml::to_string(&m).unwrap()).unwrap();
        assert_eq!(again, m);
        let twice = format!("{text}[[symbol]]\nname = \"b.c::counter\"\naddress = 1\nsize = 4\nkind = \"object\"\n");
        assert!(Manifest::parse(&twice).unwrap_err().contains("named twice"));
        let bad_kind = text.replace("\"object\"", "\"thing\"");
        assert!(Manifest::parse(&bad_kind).is_err());
    }

    #[test]
    fn behaviour_and_expectations_parse_and_bad_ones_name_where() {
        let m = Manifest::parse(GOOD).unwrap();
        assert_eq!(m.replacements[0].behaviour, Behaviour::Preserved);
        let text = format!(
            "{GOOD}behaviour = \"changed\"\nexpect = [{{ args = [5], returns = 1000016 }}, {{ args = [-1, 0x10], returns = -1 }}]\n"
        );
        let m = Manifest::parse(&text).unwrap();
        let r = &m.replacements[0];
        assert_eq!(r.behaviour, Behaviour::Changed);
        assert_eq!(r.expect[0].args, vec![5]);
        assert_eq!(r.expect[1].call_text("f"), "f(-1, 16)");
        assert!(r.expect[0].met_by(1000016));
        // An int's -1 in eax, upper half zero; a long's -1 in all of rax.
        assert!(r.expect[1].met_by(0xffff_ffff) && r.expect[1].met_by(u64::MAX));
        assert!(!r.expect[0].met_by(1000017));
        assert_eq!(Manifest::parse(&toml::to_string(&m).unwrap()).unwrap(), m);
        let cases = [
            (format!("{GOOD}behaviour = \"different\"\n"), "line 10"),
            (
                format!("{GOOD}behaviour = \"different\"\n"),
                "unknown variant `different`",
            ),
            (
                format!("{GOOD}behaviour = \"changed\"\nexpect = [{{ args = [5] }}]\n"),
                "line 11",
            ),
            (
                format!("{GOOD}behaviour = \"changed\"\nexpect = [{{ args = [5], returns = \"x\" }}]\n"),
                "line 11",
            ),
            (
                format!("{GOOD}behaviour = \"changed\"\nexpect = [{{ arg = [5], returns = 1 }}]\n"),
                "unknown field `arg`",
            ),
            (
                format!("{GOOD}expect = [{{ args = [5], returns = 1 }}]\n"),
                "needs behaviour = \"changed\"",
            ),
            (
                format!("{GOOD}behaviour = \"changed\"\nexpect = [{{ args = [1,2,3,4,5,6,7], returns = 1 }}]\n"),
                "at most 6",
            ),
        ];
        for (text, needle) in cases {
            let error = Manifest::parse(&text).unwrap_err();
            assert!(error.contains(needle), "{needle:?} not in {error:?}");
            assert!(!error.contains('\n'), "{error:?}");
        }
    }

    #[test]
    fn changed_code_parses_and_bad_ranges_name_where() {
        let text = format!("{GOOD}changed_code = [{{ offset = 0x10, size = 8, function = \"inner\" }}]\n");
        let m = Manifest::parse(&text).unwrap();
        assert_eq!(m.replacements[0].changed_code[0].offset, 16);
        assert_eq!(Manifest::parse(&toml::to_string(&m).unwrap()).unwrap(), m);
        for (bad, needle) in [
            (
                "{ offset = 1, size = 0, function = \"f\" }",
                "replace[0].changed_code[0]",
            ),
            ("{ offset = 1, size = 2, function = \"\" }", "needs a function"),
            ("{ offset = 1, size = 2 }", "missing field `function`"),
            (
                "{ offset = 1, size = 2, function = \"f\", at = 3 }",
                "unknown field `at`",
            ),
        ] {
            let error = Manifest::parse(&format!("{GOOD}changed_code = [{bad}]\n")).unwrap_err();
            assert!(error.contains(needle), "{needle:?} not in {error:?}");
            assert!(!error.contains('\n'), "{error:?}");
        }
    }

    #[test]
    fn refuses_missing_unknown_and_bad_values() {
        let cases = [
            (GOOD.replace("id = \"ping-fix\"\n", ""), "missing field `id`"),
            (GOOD.replace("symbol = ", "symbl = "), "unknown field `symbl`"),
            (GOOD.replace("module = ", "modul = "), "unknown field `modul`"),
            (format!("{GOOD}extra = 1\n"), "unknown field `extra`"),
            (GOOD.replace("A50D6825e7aa", "xyz"), "not a hex build-id"),
            (GOOD.replace("ping-fix", "a b"), "id \"a b\""),
            (
                format!("replace = []\n{}", &GOOD[..GOOD.find("[[replace]]").unwrap()]),
                "no [[replace]]",
            ),
            (
                format!("{GOOD}[[replace]]\nsymbol = \"pingCommand\"\nwith = \"x\"\n"),
                "replaced twice",
            ),
            ("id = ".to_string(), "line 1"),
        ];
        for (text, needle) in cases {
            let error = Manifest::parse(&text).unwrap_err();
            assert!(error.contains(needle), "{needle:?} not in {error:?}");
            assert!(!error.contains('\n'));
        }
    }
}
