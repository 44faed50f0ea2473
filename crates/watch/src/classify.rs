//! Classifying a target's memory at the start of a watch: what is
//! immutable (verified), what is mutable (legitimately written: data, the
//! GOT lazy binding fills, heaps, stacks) and what is neither, and why.

use crate::event::{ClassRow, Classification};
use crate::watched::{ActiveGeneration, WatchedVariable};
use shadowpatch_mirror::RegionKind;
use shadowpatch_process::{Mapping, MappingKind};
use shadowpatch_symbols::Module;

fn add(rows: &mut Vec<ClassRow>, reason: &str, bytes: u64) {
    match rows.iter_mut().find(|r| r.reason == reason) {
        Some(row) => {
            row.regions += 1;
            row.bytes += bytes;
        }
        None => rows.push(ClassRow {
            reason: reason.to_string(),
            regions: 1,
            bytes,
        }),
    }
}

/// Classify every mapping of the target against what is watched.
pub fn classify(
    maps: &[Mapping],
    modules: &[Module],
    generation: &ActiveGeneration,
    variables: &[WatchedVariable],
) -> Classification {
    let mut classification = Classification::default();
    for region in &generation.regions {
        let reason = match (region.spec.kind, region.spec.module.starts_with("patch:")) {
            (RegionKind::Code, true) => "code of active patches",
            (RegionKind::ReadOnlyData, true) => "read-only data of active patches",
            (RegionKind::Code, false) => "code (executable mappings)",
            (RegionKind::ReadOnlyData, false) => "read-only data of modules (.rodata, RELRO)",
        };
        add(&mut classification.immutable, reason, region.spec.len());
    }
    for variable in variables {
        add(
            &mut classification.immutable,
            "guarded critical variables",
            variable.variable.size,
        );
    }
    for mapping in maps {
        let mirrored = generation
            .regions
            .iter()
            .any(|r| r.spec.start < mapping.end && mapping.start < r.spec.end);
        if mirrored {
            continue;
        }
        let of_module = modules.iter().any(|m| m.contains(mapping.start));
        let (rows, reason) = match (&mapping.kind, mapping.readable, mapping.writable, mapping.executable) {
            (MappingKind::Special(name), _, _, _) if name == "[vvar]" || name.starts_with("[vvar") => (
                &mut classification.unverified,
                "kernel data pages ([vvar]: the kernel updates them)",
            ),
            (MappingKind::Special(name), _, _, _) if name == "[vsyscall]" => (
                &mut classification.unverified,
                "[vsyscall] (fixed kernel page, not readable by process_vm_readv)",
            ),
            (_, false, _, _) => (
                &mut classification.unverified,
                "no access (guard pages, reserved ranges)",
            ),
            (MappingKind::File(_), _, true, _) if of_module => (
                &mut classification.mutable,
                "writable data of modules (.data, .bss, GOT that lazy binding fills)",
            ),
            (MappingKind::Special(name), _, true, _) if name == "[heap]" => (&mut classification.mutable, "heap"),
            (MappingKind::Special(name), _, true, _) if name.starts_with("[stack") => {
                (&mut classification.mutable, "stack")
            }
            (_, _, true, _) => (
                &mut classification.mutable,
                "other writable memory (anonymous: thread stacks, arenas, JIT data)",
            ),
            (_, _, false, true) => (
                &mut classification.unverified,
                "executable but not mirrored (appeared after the mirror)",
            ),
            (_, _, false, false) => (
                &mut classification.unverified,
                "read-only, not of a module (data files, anonymous)",
            ),
        };
        add(rows, reason, mapping.len());
    }
    classification
}
