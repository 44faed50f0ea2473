//! Trampolines: a 5-byte `jmp rel32` at a replaced function's entry (after
//! its `endbr64`, if any), and the checks that make writing it safe: the
//! overwritten bytes lie inside the function, the entry decodes, and no
//! branch in the function lands inside the overwritten bytes.

use crate::PatchError;
use iced_x86::{Decoder, DecoderOptions, FlowControl};
use shadowpatch_symbols::{Module, SymbolKind};

pub const JUMP_LEN: u64 = 5;
const ENDBR64: [u8; 4] = [0xf3, 0x0f, 0x1e, 0xfa];

/// Where a function will be redirected.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FunctionSite {
    pub symbol: String,
    /// Runtime address of the function's first byte.
    pub entry: u64,
    pub size: u64,
    /// Where the jump goes (entry, or entry + 4 after `endbr64`).
    pub patch_at: u64,
}

/// Why a jump cannot be written at a function's entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "problem", rename_all = "snake_case")]
pub enum EntryProblem {
    /// The symbol table gives the function no size.
    UnknownSize,
    /// The jump does not fit inside the function.
    TooShort { size: u64, after_endbr64: bool },
    /// The bytes the jump overwrites do not decode.
    Undecodable { at: u64 },
    /// A branch of the function lands strictly inside the overwritten bytes.
    InboundBranch { from: u64, to: u64 },
}

impl EntryProblem {
    /// Stable identifier (the analysis reports it as a finding code).
    pub fn code(&self) -> &'static str {
        match self {
            EntryProblem::UnknownSize => "entry-unknown-size",
            EntryProblem::TooShort { .. } => "entry-too-short",
            EntryProblem::Undecodable { .. } => "entry-undecodable",
            EntryProblem::InboundBranch { .. } => "inbound-branch",
        }
    }

    /// The reason, as `PatchError::Unpatchable` words it.
    pub fn reason(&self) -> String {
        match self {
            EntryProblem::UnknownSize => "its size is unknown (0 in the symbol table)".into(),
            EntryProblem::TooShort { size, after_endbr64 } => format!(
                "the function is {size} bytes, shorter than the {JUMP_LEN}-byte jump{}",
                if *after_endbr64 { " after its endbr64" } else { "" }
            ),
            EntryProblem::Undecodable { at } => format!("the bytes at {at:#x} do not decode as an instruction"),
            EntryProblem::InboundBranch { from, to } => {
                format!(
                    "the instruction at {from:#x} branches to {to:#x}, inside the {JUMP_LEN} bytes the jump overwrites"
                )
            }
        }
    }

    pub fn into_error(self, symbol: &str, entry: u64) -> PatchError {
        PatchError::Unpatchable {
            symbol: symbol.to_string(),
            address: entry,
            reason: self.reason(),
        }
    }
}

/// A function found in the target, with every reason a jump cannot be
/// written at its entry (empty: it can).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteExamination {
    pub site: FunctionSite,
    pub problems: Vec<EntryProblem>,
}

/// Find `name` in `module` and check that a jump can be written at its entry.
/// `read` returns the function's current live bytes.
pub fn plan_site(
    module: &Module,
    name: &str,
    read: &mut dyn FnMut(u64, usize) -> Result<Vec<u8>, PatchError>,
) -> Result<FunctionSite, PatchError> {
    let examined = examine_site(module, name, read)?;
    match examined.problems.into_iter().next() {
        Some(problem) => Err(problem.into_error(name, examined.site.entry)),
        None => Ok(examined.site),
    }
}

/// Find `name` in `module` (an error if it is missing, not a function or
/// ambiguous) and collect every problem of its entry.
pub fn examine_site(
    module: &Module,
    name: &str,
    read: &mut dyn FnMut(u64, usize) -> Result<Vec<u8>, PatchError>,
) -> Result<SiteExamination, PatchError> {
    let found = module.symbol_addresses(name);
    let mut functions: Vec<_> = found.iter().filter(|(_, s)| s.kind == SymbolKind::Function).collect();
    functions.dedup_by_key(|(address, _)| *address);
    let (entry, symbol) = match functions.as_slice() {
        [] if found.is_empty() => {
            return Err(PatchError::UnknownSymbol {
                symbol: name.to_string(),
                place: module.name.clone(),
            })
        }
        [] => {
            return Err(PatchError::NotAFunction {
                symbol: name.to_string(),
                place: module.name.clone(),
            })
        }
        [one] => **one,
        many => {
            return Err(PatchError::Ambiguous {
                symbol: name.to_string(),
                module: module.name.clone(),
                count: many.len(),
            })
        }
    };
    let mut site = FunctionSite {
        symbol: name.to_string(),
        entry,
        size: symbol.size,
        patch_at: entry,
    };
    if symbol.size == 0 {
        return Ok(SiteExamination {
            site,
            problems: vec![EntryProblem::UnknownSize],
        });
    }
    let bytes = read(entry, symbol.size as usize)?;
    if bytes.starts_with(&ENDBR64) {
        site.patch_at = entry + ENDBR64.len() as u64;
    }
    let mut problems = Vec::new();
    if site.patch_at + JUMP_LEN > entry + symbol.size {
        problems.push(EntryProblem::TooShort {
            size: symbol.size,
            after_endbr64: site.patch_at != entry,
        });
    }
    problems.extend(instruction_problems(entry, site.patch_at, &bytes));
    Ok(SiteExamination { site, problems })
}

/// Decode the whole function: the entry must decode, and no direct branch
/// may land strictly inside the bytes the jump overwrites.
fn instruction_problems(entry: u64, patch_at: u64, bytes: &[u8]) -> Vec<EntryProblem> {
    let mut problems = Vec::new();
    let mut decoder = Decoder::with_ip(64, bytes, entry, DecoderOptions::NONE);
    let overwritten = patch_at + 1..patch_at + JUMP_LEN;
    for instruction in &mut decoder {
        let at = instruction.ip();
        if instruction.is_invalid() {
            if at < patch_at + JUMP_LEN {
                problems.push(EntryProblem::Undecodable { at });
            }
            // Data or padding further in: stop analysing, nothing branches
            // from bytes that are not code.
            break;
        }
        let direct = matches!(
            instruction.flow_control(),
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch | FlowControl::Call
        ) && instruction.near_branch_target() != 0;
        if direct && overwritten.contains(&instruction.near_branch_target()) {
            problems.push(EntryProblem::InboundBranch {
                from: at,
                to: instruction.near_branch_target(),
            });
        }
    }
    problems
}

/// The `jmp rel32` from `from` to `to`.
pub fn jump(symbol: &str, from: u64, to: u64) -> Result<Vec<u8>, PatchError> {
    let displacement = to as i128 - (from + JUMP_LEN) as i128;
    let rel = i32::try_from(displacement).map_err(|_| PatchError::Unpatchable {
        symbol: symbol.to_string(),
        address: from,
        reason: format!("the new code at {to:#x} is out of jmp rel32 range"),
    })?;
    let mut bytes = vec![0xe9];
    bytes.extend_from_slice(&rel.to_le_bytes());
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jump_encodes_rel32_from_the_next_instruction() {
        assert_eq!(jump("f", 0x1000, 0x1005).unwrap(), vec![0xe9, 0, 0, 0, 0]);
        assert_eq!(jump("f", 0x1000, 0x1000).unwrap(), vec![0xe9, 0xfb, 0xff, 0xff, 0xff]);
        assert!(jump("f", 0x1000, 0x1_0000_0000_0000).is_err());
    }

    #[test]
    fn inbound_branch_into_overwritten_bytes_is_refused() {
        // 0: push rbp (1) ; 1: mov rbp,rsp (3) ; 4: nop (1) ; 5: jmp 2 (2 bytes: eb f9 → 5+2-7 = 0? use target 2)
        // bytes: 55 | 48 89 e5 | 90 | eb fb (jmp to 7-5=2) ; 2 is inside 1..5
        let code = [0x55, 0x48, 0x89, 0xe5, 0x90, 0xeb, 0xfb, 0xc3];
        let problems = instruction_problems(0x1000, 0x1000, &code);
        assert_eq!(
            problems,
            vec![EntryProblem::InboundBranch {
                from: 0x1005,
                to: 0x1002
            }]
        );
        assert!(problems[0].reason().contains("branches to 0x1002"));
        // A branch back to the entry itself is fine.
        let code = [0x55, 0x48, 0x89, 0xe5, 0x90, 0xeb, 0xf9, 0xc3];
        assert!(instruction_problems(0x1000, 0x1000, &code).is_empty());
    }
}
