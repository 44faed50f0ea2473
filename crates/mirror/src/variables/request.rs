//! Declaring critical variables: a request as the user wrote it
//! (`MODULE!SYMBOL`, `SYMBOL`, `0xADDR:SIZE`), and its resolution against
//! the live modules and mappings of the target.

use super::{VariableError, VariableMode};
use shadowpatch_process::Mapping;
use shadowpatch_symbols::Module;

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
pub(super) fn described(name: &str, address: u64, size: u64) -> String {
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
}
