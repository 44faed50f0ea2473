//! Where a changed function's code sits inside a function that only
//! carries it: a changed `static` function the compiler inlined into a
//! caller, which then goes into the patch whole (`Inclusion::Inlined`).
//! The patched object is linked on its own into a throwaway static
//! executable (never run), so that its DWARF holds plain addresses (a
//! relocatable object's would need every debug relocation applied), and each
//! `DW_TAG_inlined_subroutine` of a changed function inside the carrier
//! becomes a range of offsets from the carrier's first byte. The patch
//! object copies the carrier's section byte for byte, so the offsets hold
//! there too.

use crate::source::TouchedFunctions;
use object::{Object, ObjectSymbol};
use shadowpatch_patch::manifest::CodeRange;
use std::path::Path;

/// One patched object linked alone: its function symbols and the inlined
/// copies of its changed functions, read once for every carrier in it.
#[derive(Debug)]
pub struct LinkedUnit {
    object: String,
    /// Function symbols: name, address, size.
    symbols: Vec<(String, u64, u64)>,
    copies: Vec<shadowpatch_symbols::InlinedCode>,
}

impl LinkedUnit {
    /// Link the relocatable `object_path` in `scratch` and read the inlined
    /// copies of the `touched` functions. `Err` says why they could not be
    /// found (no debug information, the object does not link alone): the
    /// caller then treats all of each carrier as changed.
    pub fn link(object_path: &Path, touched: &TouchedFunctions, scratch: &Path) -> Result<LinkedUnit, String> {
        let linked = scratch.join(format!(
            "inlined-{}.elf",
            object_path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        ));
        // Static, not shared: a non-PIC object's references to undefined
        // symbols would not link into a shared object; here they resolve
        // to 0, which no DWARF range of ours depends on.
        let output = std::process::Command::new("gcc")
            .args([
                "-nostdlib",
                "-static",
                "-no-pie",
                "-Wl,--unresolved-symbols=ignore-all",
                "-Wl,-e,0",
                "-o",
            ])
            .arg(&linked)
            .arg(object_path)
            .output()
            .map_err(|e| format!("gcc: {e}"))?;
        if !output.status.success() {
            let text = String::from_utf8_lossy(&output.stderr);
            return Err(format!(
                "{} does not link on its own: {}",
                object_path.display(),
                text.lines().rfind(|l| !l.contains("warning")).unwrap_or("").trim()
            ));
        }
        let bytes = std::fs::read(&linked).map_err(|e| format!("{}: {e}", linked.display()))?;
        let _ = std::fs::remove_file(&linked);
        let file = object::File::parse(&*bytes).map_err(|e| format!("{}: {e}", linked.display()))?;
        let symbols = file
            .symbols()
            .filter(|s| s.size() > 0)
            .filter_map(|s| Some((s.name().ok()?.to_string(), s.address(), s.size())))
            .collect();
        let copies = shadowpatch_symbols::inlined_code(&linked, &bytes, &|name| touched.contains(name))
            .map_err(|e| e.to_string())?;
        Ok(LinkedUnit {
            object: object_path.display().to_string(),
            symbols,
            copies,
        })
    }

    /// The ranges of `carrier` that hold inlined code of the changed
    /// functions, merged and in order.
    pub fn changed_code(&self, carrier: &str) -> Result<Vec<CodeRange>, String> {
        let (_, start, size) = self
            .symbols
            .iter()
            .find(|(name, _, _)| name == carrier)
            .ok_or_else(|| format!("{carrier} is not in {} once linked", self.object))?;
        Ok(ranges_within(&self.copies, *start, start + size))
    }
}

/// The parts of `copies` inside `[start, end)`, as offsets from `start`,
/// overlapping or touching ranges of one function merged.
pub fn ranges_within(copies: &[shadowpatch_symbols::InlinedCode], start: u64, end: u64) -> Vec<CodeRange> {
    let mut pieces: Vec<(String, u64, u64)> = copies
        .iter()
        .flat_map(|copy| {
            copy.ranges.iter().filter_map(move |&(from, to)| {
                let (from, to) = (from.max(start), to.min(end));
                (from < to).then(|| (copy.function.clone(), from - start, to - start))
            })
        })
        .collect();
    pieces.sort();
    let mut merged: Vec<(String, u64, u64)> = Vec::new();
    for (function, from, to) in pieces {
        match merged.last_mut() {
            Some(last) if last.0 == function && from <= last.2 => last.2 = last.2.max(to),
            _ => merged.push((function, from, to)),
        }
    }
    merged.sort_by_key(|(_, from, _)| *from);
    merged
        .into_iter()
        .map(|(function, from, to)| CodeRange {
            offset: from,
            size: to - from,
            function,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadowpatch_symbols::InlinedCode;

    #[test]
    fn ranges_are_clipped_to_the_carrier_and_merged_per_function() {
        let copies = [
            InlinedCode {
                function: "f".into(),
                ranges: vec![(0x1010, 0x1020), (0x1020, 0x1030), (0x0ff0, 0x1004)],
            },
            InlinedCode {
                function: "g".into(),
                ranges: vec![(0x1018, 0x1028), (0x3000, 0x3010)],
            },
        ];
        let ranges = ranges_within(&copies, 0x1000, 0x2000);
        let plain: Vec<(&str, u64, u64)> = ranges.iter().map(|r| (r.function.as_str(), r.offset, r.size)).collect();
        assert_eq!(plain, vec![("f", 0, 4), ("f", 0x10, 0x20), ("g", 0x18, 0x10)]);
    }
}
