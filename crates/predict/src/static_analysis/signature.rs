//! The replacement's calling interface against the original's: with
//! DWARF on both sides, the declared signatures (and the registers the new
//! code reads as arguments against where its declared parameters arrive);
//! otherwise the registers each side reads before writing them.

use super::{finding, Totals, WALK_DEPTH};
use crate::abi::{self, arguments_read, compare_register_use, compare_signatures, expected_arguments};
use crate::code::{CodeSpaces, Space};
use crate::finding::{Finding, Severity};
use serde_json::json;
use shadowpatch_symbols::dwarf::{DebugInfo, DebugSource};

/// The DWARF of the target's module and of the patch object, when found.
pub(super) type DwarfPair<'a> = (
    &'a Option<(DebugInfo, DebugSource)>,
    &'a Option<(DebugInfo, DebugSource)>,
);

/// ABI findings for `symbol` (at `entry` in the target) replaced by `with`
/// (at `new_address` in the patch object).
#[allow(clippy::too_many_arguments)]
pub(super) fn signature_findings(
    spaces: &CodeSpaces,
    module: &shadowpatch_symbols::Module,
    symbol: &str,
    with: &str,
    entry: u64,
    new_address: u64,
    (target_dwarf, patch_dwarf): DwarfPair<'_>,
    totals: &mut Totals,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    let old_info = target_dwarf
        .as_ref()
        .and_then(|(info, _)| info.function(symbol, Some(entry.wrapping_sub(module.bias))));
    let new_info = patch_dwarf
        .as_ref()
        .and_then(|(info, _)| info.function(with, Some(new_address)));
    let old_reads = arguments_read(spaces, Space::Target, entry, WALK_DEPTH);
    let new_reads = arguments_read(spaces, Space::Patch, new_address, WALK_DEPTH);
    let mut differences = match (old_info, new_info) {
        (Some(old), Some(new_signature)) => {
            totals.dwarf_compared += 1;
            let mut found = compare_signatures(old, new_signature);
            // The code must read its arguments where its declared
            // signature says they arrive (an ms_abi function does not).
            if let Some(expected) = expected_arguments(new_signature) {
                let stray = new_reads.minus(expected);
                if !stray.is_empty() && !found.iter().any(|d| d.code == "calling-convention") {
                    found.push(abi::AbiDifference {
                        code: "calling-convention",
                        severity: Severity::Blocking,
                        message: format!(
                            "{} reads {} as arguments, where none of its declared parameters arrive under the SysV ABI: it uses another calling convention",
                            with,
                            stray.names().join(", ")
                        ),
                        evidence: json!({
                            "method": format!("{} + {}", abi::METHOD_DWARF, abi::METHOD_REGISTERS),
                            "expected": expected.names(),
                            "reads": new_reads.names(),
                        }),
                    });
                }
            }
            found
        }
        _ => {
            totals.heuristic_compared += 1;
            compare_register_use(old_reads, new_reads)
        }
    };
    for difference in differences.drain(..) {
        let mut evidence = difference.evidence;
        if let Some(map) = evidence.as_object_mut() {
            if let Some((_, source)) = target_dwarf {
                map.insert("target_dwarf".into(), source.describe().into());
            }
            if let Some((_, source)) = patch_dwarf {
                map.insert("patch_dwarf".into(), source.describe().into());
            }
        }
        findings.push(
            finding(
                difference.code,
                difference.severity,
                format!("{symbol}: {}", difference.message),
            )
            .symbol(symbol)
            .evidence(evidence),
        );
    }
    findings
}
