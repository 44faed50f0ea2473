//! Whether a simulated call ran the changed code, when the replacement
//! only carries it: a changed function the compiler inlined into the
//! replaced one (`changed_code` in the manifest, written by `shadowpatch
//! build`). A dispatcher replaced because its `delete` handler changed is
//! called for every command; a captured `get` never runs the new code, and
//! its clean run says nothing about the change.
//!
//! The patched copy (a private fork) gets an `int3` on the first byte of
//! every instruction of those ranges, so that any entry into them traps,
//! whatever jump leads there (a jump table's included). The first trap
//! puts every byte back, steps the copy back onto the instruction, and the
//! call goes on unobserved: one trap per call at most.

use iced_x86::{Decoder, DecoderOptions};
use shadowpatch_patch::manifest::CodeRange;
use shadowpatch_process::{ProcessCopy, TargetError};

const INT3: u8 = 0xcc;

/// The changed code of one replacement, as loaded in the copies.
#[derive(Debug, Clone)]
pub struct ChangedCode {
    /// The changed functions whose code it is, for messages.
    pub functions: Vec<String>,
    ranges: Vec<Armed>,
}

#[derive(Debug, Clone)]
struct Armed {
    address: u64,
    original: Vec<u8>,
    armed: Vec<u8>,
}

impl ChangedCode {
    /// `code` is the replacement's bytes as loaded at `address`; `None`
    /// when no range is declared (all of the replacement is the change).
    /// Ranges past the end of `code` are cut (the survey refused them).
    pub fn new(address: u64, code: &[u8], declared: &[CodeRange]) -> Option<ChangedCode> {
        let mut functions: Vec<String> = Vec::new();
        let mut ranges = Vec::new();
        for range in declared {
            let start = range.offset as usize;
            let end = (range.offset + range.size).min(code.len() as u64) as usize;
            if start >= end {
                continue;
            }
            let original = code[start..end].to_vec();
            let mut armed = original.clone();
            let mut decoder = Decoder::with_ip(64, &original, address + range.offset, DecoderOptions::NONE);
            while decoder.can_decode() {
                let position = decoder.position();
                let _ = decoder.decode();
                armed[position] = INT3;
            }
            ranges.push(Armed {
                address: address + range.offset,
                original,
                armed,
            });
            if !functions.contains(&range.function) {
                functions.push(range.function.clone());
            }
        }
        (!ranges.is_empty()).then_some(ChangedCode { functions, ranges })
    }

    /// Put the traps into the copy.
    pub fn arm(&self, copy: &mut ProcessCopy) -> Result<(), TargetError> {
        for range in &self.ranges {
            copy.memory().write(range.address, &range.armed)?;
        }
        Ok(())
    }

    /// Take the traps out of the copy.
    pub fn disarm(&self, copy: &mut ProcessCopy) -> Result<(), TargetError> {
        for range in &self.ranges {
            copy.memory().write(range.address, &range.original)?;
        }
        Ok(())
    }

    /// Whether a `SIGTRAP` with the instruction pointer at `rip` is one of
    /// ours: an `int3` just executed at an instruction start.
    pub fn trapped_at(&self, rip: u64) -> bool {
        let at = rip.wrapping_sub(1);
        self.ranges.iter().any(|range| {
            let offset = at.wrapping_sub(range.address) as usize;
            offset < range.armed.len() && range.armed[offset] == INT3 && range.original[offset] != INT3
        })
    }

    /// `process_delete_command`, or `f, g` for several.
    pub fn names(&self) -> String {
        self.functions.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_instruction_start_of_a_range_and_nothing_else_traps() {
        // push rbp; mov rbp, rsp; nop; pop rbp; ret
        let code = [0x55, 0x48, 0x89, 0xe5, 0x90, 0x5d, 0xc3];
        let declared = [CodeRange {
            offset: 1,
            size: 4,
            function: "inner".into(),
        }];
        let changed = ChangedCode::new(0x1000, &code, &declared).unwrap();
        assert_eq!(changed.ranges[0].armed, vec![INT3, 0x89, 0xe5, INT3]);
        // The trap reports the address after the int3.
        assert!(changed.trapped_at(0x1002) && changed.trapped_at(0x1005));
        assert!(!changed.trapped_at(0x1001) && !changed.trapped_at(0x1003) && !changed.trapped_at(0x1006));
        assert!(ChangedCode::new(0x1000, &code, &[]).is_none());
        assert_eq!(changed.names(), "inner");
    }
}
