//! What a replaced function returns, and how two runs' returns compare:
//! only a value that exists is compared. A `void` function leaves garbage
//! in rax and xmm0; comparing it would call a harmless patch divergent.
//!
//! The return type comes from the module's DWARF when it has some (its own
//! `.debug_info` or a build-id debug file); otherwise from its callers
//! (`call_sites`): a caller that reads rax or xmm0 after the call. A
//! pointer is compared by what it points to — a NUL-terminated string, or
//! the pointee's bytes when DWARF gives its size — since the same content
//! at another address (a patch's own copy of a string) is the same answer.
//! An unknown type is compared as a 64-bit value, or, when both values are
//! readable addresses, as the strings there; the report says so.

use super::call_sites::{uses_at_call_sites, uses_through_slot, CallerUse};
use super::sandbox::{show_value, Outcome};
use shadowpatch_patch::trampoline::FunctionSite;
use shadowpatch_process::{Mapping, ProcessCopy, TargetMemory};
use shadowpatch_symbols::dwarf::{module_debug_info_named, TypeClass, TypeShape};
use shadowpatch_symbols::Module;

/// Bytes of a returned string read from each copy at most.
pub const STRING_LIMIT: usize = 256;
/// Bytes of a returned pointer's pointee read from each copy at most.
pub const POINTEE_LIMIT: u64 = 4096;

/// What a function returns, as far as comparing two runs goes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ReturnKind {
    /// Nothing: rax and xmm0 are garbage, never compared.
    Void,
    /// An integer in rax, `bytes` wide (the rest of rax is garbage); 16:
    /// rax and rdx (a small struct).
    Integer { bytes: u8 },
    /// A floating-point value in xmm0, `bytes` wide.
    Float { bytes: u8 },
    /// A pointer in rax: what it points to is compared, not the address.
    Pointer { pointee: Pointee },
    /// A 64-bit value in rax, integer or pointer (callers read all of
    /// rax; no DWARF to tell): compared as a value, or as the strings both
    /// point to when both are readable addresses.
    Word,
    /// Not known: compared as a `Word`, and the report says so.
    Unknown,
}

/// What a returned pointer points to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Pointee {
    /// A `char`: a NUL-terminated string (at most `STRING_LIMIT` bytes).
    String,
    /// An object of `len` bytes (at most `POINTEE_LIMIT` compared).
    Bytes { len: u64 },
    /// `void *` or an incomplete type: compared as a `Word`.
    Unknown,
}

/// A replaced function's return, and how that was established.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReturnShape {
    pub kind: ReturnKind,
    /// "dwarf", "call sites" or "unknown".
    pub method: String,
    /// The type's name, or what the call sites showed.
    pub detail: String,
}

impl ReturnShape {
    /// One line for reports: `void (dwarf: void)`.
    pub fn describe(&self) -> String {
        let kind = match &self.kind {
            ReturnKind::Void => "void: rax and xmm0 not compared".to_string(),
            ReturnKind::Integer { bytes } => format!("an integer of {bytes} bytes in rax"),
            ReturnKind::Float { bytes } => format!("a floating-point value of {bytes} bytes in xmm0"),
            ReturnKind::Pointer {
                pointee: Pointee::String,
            } => "a string pointer: the strings compared".into(),
            ReturnKind::Pointer {
                pointee: Pointee::Bytes { len },
            } => format!("a pointer: the {len} bytes it points to compared"),
            ReturnKind::Pointer {
                pointee: Pointee::Unknown,
            }
            | ReturnKind::Word => "a 64-bit value or pointer in rax".into(),
            ReturnKind::Unknown => "unknown: rax compared as a 64-bit value (or the strings it points to)".into(),
        };
        format!("{kind} ({}: {})", self.method, self.detail)
    }
}

/// The return shape of each site's function: DWARF first, else the
/// module's call sites (its executable mappings read from `memory` before
/// any breakpoint is in).
pub fn infer(
    pid: i32,
    module: &Module,
    modules: &[Module],
    maps: &[Mapping],
    memory: &mut TargetMemory,
    sites: &[&FunctionSite],
) -> Vec<ReturnShape> {
    let names: std::collections::BTreeSet<String> = sites.iter().map(|s| s.symbol.clone()).collect();
    let debug = match module_debug_info_named(pid, module, &names) {
        Ok(debug) => debug,
        Err(error) => {
            tracing::debug!("no DWARF for the return types of {}: {error}", module.name);
            None
        }
    };
    let mut text: Option<Vec<(u64, Vec<u8>)>> = None;
    sites
        .iter()
        .map(|site| {
            let file_address = site.entry.wrapping_sub(module.bias);
            if let Some(function) = debug
                .as_ref()
                .and_then(|(info, _)| info.function(&site.symbol, Some(file_address)))
            {
                return from_dwarf(&function.return_type);
            }
            let text = text.get_or_insert_with(|| module_text(module, maps, memory));
            let mut uses = uses_at_call_sites(text, site.entry);
            let mut places = vec![module.name.clone()];
            // An exported function is also called from the modules that
            // import it, through their GOT slot (memcached calling
            // libevent's event_get_version).
            for other in modules.iter().filter(|m| m.path != module.path) {
                let slots: Vec<u64> = other
                    .image
                    .import_slots
                    .iter()
                    .filter(|(_, name)| **name == site.symbol)
                    .map(|(slot, _)| slot + other.bias)
                    .collect();
                if slots.is_empty() {
                    continue;
                }
                let other_text = module_text(other, maps, memory);
                for slot in slots {
                    uses.extend(uses_through_slot(&other_text, slot));
                }
                places.push(other.name.clone());
            }
            from_call_sites(&uses, &places.join(", "))
        })
        .collect()
}

/// The module's executable mappings, read live.
fn module_text(module: &Module, maps: &[Mapping], memory: &mut TargetMemory) -> Vec<(u64, Vec<u8>)> {
    maps.iter()
        .filter(|m| m.executable && module.contains(m.start))
        .filter_map(|m| Some((m.start, memory.read_vec(m.start, m.len() as usize).ok()?)))
        .collect()
}

fn from_dwarf(shape: &TypeShape) -> ReturnShape {
    let kind = match shape.class {
        TypeClass::Void => ReturnKind::Void,
        TypeClass::Integer => ReturnKind::Integer {
            bytes: shape.size.unwrap_or(8).clamp(1, 8) as u8,
        },
        TypeClass::Float => ReturnKind::Float {
            bytes: shape.size.unwrap_or(8).clamp(4, 16) as u8,
        },
        TypeClass::Pointer => ReturnKind::Pointer {
            pointee: match shape.pointee_size {
                Some(1) => Pointee::String,
                Some(len) if len > 0 => Pointee::Bytes { len },
                _ => Pointee::Unknown,
            },
        },
        // Small structs come back in rax:rdx (or xmm registers); larger
        // ones in memory the caller passed, whose address rax returns.
        TypeClass::Aggregate => match shape.size {
            Some(size) if size <= 16 => ReturnKind::Integer { bytes: 16 },
            Some(len) => ReturnKind::Pointer {
                pointee: Pointee::Bytes { len },
            },
            None => ReturnKind::Unknown,
        },
        TypeClass::Unknown => ReturnKind::Unknown,
    };
    ReturnShape {
        kind,
        method: "dwarf".into(),
        detail: shape.name.clone(),
    }
}

fn from_call_sites(uses: &[(u64, CallerUse)], module: &str) -> ReturnShape {
    let count = |wanted: fn(&CallerUse) -> bool| uses.iter().filter(|(_, u)| wanted(u)).count();
    let integer_width = uses
        .iter()
        .filter_map(|(_, u)| match u {
            CallerUse::ReadsInteger { bytes } => Some(*bytes),
            _ => None,
        })
        .max();
    let floats = count(|u| *u == CallerUse::ReadsFloat);
    let discards = count(|u| *u == CallerUse::Discards);
    let detail = format!(
        "{} direct calls in {module}: {} read rax, {floats} read xmm0, {discards} discard the value",
        uses.len(),
        count(|u| matches!(u, CallerUse::ReadsInteger { .. })),
    );
    let kind = match (integer_width, floats, discards) {
        (Some(_), 1.., _) => ReturnKind::Unknown,
        (Some(8), _, _) => ReturnKind::Word,
        (Some(bytes), _, _) => ReturnKind::Integer { bytes },
        (None, 1.., _) => ReturnKind::Float { bytes: 8 },
        (None, 0, 1..) => ReturnKind::Void,
        (None, 0, 0) => ReturnKind::Unknown,
    };
    let method = if kind == ReturnKind::Unknown && integer_width.is_none() && floats == 0 {
        "unknown"
    } else {
        "call sites"
    };
    ReturnShape {
        kind,
        method: method.into(),
        detail,
    }
}

/// How the two runs' returns compare.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReturnCheck {
    pub differs: bool,
    /// What each run returned, as compared (a value, a string, bytes).
    pub original: String,
    pub patched: String,
}

/// Compare what both runs returned (both must have returned), reading
/// pointees from the copies.
pub fn compare_returns(
    shape: &ReturnShape,
    original: &Outcome,
    patched: &Outcome,
    copies: (&mut ProcessCopy, &mut ProcessCopy),
) -> Option<ReturnCheck> {
    let (
        Outcome::Returned {
            value: rax_a,
            rdx: rdx_a,
            xmm0: xmm_a,
        },
        Outcome::Returned {
            value: rax_b,
            rdx: rdx_b,
            xmm0: xmm_b,
        },
    ) = (original, patched)
    else {
        return None;
    };
    let (copy_a, copy_b) = copies;
    let check = |a: String, b: String, differs: bool| {
        Some(ReturnCheck {
            differs,
            original: a,
            patched: b,
        })
    };
    match &shape.kind {
        ReturnKind::Void => None,
        ReturnKind::Integer { bytes: 16 } => check(
            format!("{} (rdx {})", show_value(*rax_a), show_value(*rdx_a)),
            format!("{} (rdx {})", show_value(*rax_b), show_value(*rdx_b)),
            (rax_a, rdx_a) != (rax_b, rdx_b),
        ),
        ReturnKind::Integer { bytes } => {
            let (a, b) = (sign_extend(*rax_a, *bytes), sign_extend(*rax_b, *bytes));
            check(show_value(a), show_value(b), a != b)
        }
        ReturnKind::Float { bytes } => {
            let (a, b) = (float_bits(xmm_a, *bytes), float_bits(xmm_b, *bytes));
            check(show_float(a, *bytes), show_float(b, *bytes), a != b)
        }
        ReturnKind::Pointer {
            pointee: Pointee::String,
        } => {
            let (a, b) = (read_string(copy_a, *rax_a), read_string(copy_b, *rax_b));
            check(a.1, b.1, a.0 != b.0)
        }
        ReturnKind::Pointer {
            pointee: Pointee::Bytes { len },
        } => {
            let (a, b) = (read_bytes(copy_a, *rax_a, *len), read_bytes(copy_b, *rax_b, *len));
            check(a.1, b.1, a.0 != b.0)
        }
        ReturnKind::Pointer {
            pointee: Pointee::Unknown,
        }
        | ReturnKind::Word
        | ReturnKind::Unknown => {
            if rax_a == rax_b {
                return check(show_value(*rax_a), show_value(*rax_b), false);
            }
            let (a, b) = (read_string(copy_a, *rax_a), read_string(copy_b, *rax_b));
            if a.2 && b.2 {
                // Both are addresses of readable memory: what is there.
                return check(a.1, b.1, a.0 != b.0);
            }
            check(show_value(*rax_a), show_value(*rax_b), true)
        }
    }
}

fn sign_extend(value: u64, bytes: u8) -> u64 {
    if bytes >= 8 {
        return value;
    }
    let shift = 64 - 8 * bytes as u32;
    (((value << shift) as i64) >> shift) as u64
}

/// The low `bytes` of xmm0 (given as `0x` + 32 hex digits).
fn float_bits(xmm0: &str, bytes: u8) -> u128 {
    let value = u128::from_str_radix(xmm0.trim_start_matches("0x"), 16).unwrap_or(0);
    match bytes {
        4 => value & 0xffff_ffff,
        8 => value & 0xffff_ffff_ffff_ffff,
        _ => value,
    }
}

fn show_float(bits: u128, bytes: u8) -> String {
    match bytes {
        4 => f32::from_bits(bits as u32).to_string(),
        8 => f64::from_bits(bits as u64).to_string(),
        _ => format!("{bits:#x}"),
    }
}

/// The string at `address` in a copy: (bytes compared, shown, readable).
/// Not NUL-terminated within the limit: the bytes read are compared.
fn read_string(copy: &mut ProcessCopy, address: u64) -> (Vec<u8>, String, bool) {
    if address == 0 {
        return (b"\0null".to_vec(), "NULL".into(), false);
    }
    let mut bytes = vec![0u8; STRING_LIMIT];
    let read = copy.memory().read_partial(address, &mut bytes).unwrap_or(0);
    if read == 0 {
        let shown = format!("{address:#x} (unreadable)");
        return (shown.clone().into_bytes(), shown, false);
    }
    bytes.truncate(read);
    let terminated = bytes.iter().position(|b| *b == 0);
    if let Some(end) = terminated {
        bytes.truncate(end);
    }
    let shown = format!(
        "\"{}\"{}",
        bytes.escape_ascii(),
        if terminated.is_some() { "" } else { "..." }
    );
    (bytes, shown, true)
}

/// `len` bytes (at most `POINTEE_LIMIT`) at `address` in a copy.
fn read_bytes(copy: &mut ProcessCopy, address: u64, len: u64) -> (Vec<u8>, String, bool) {
    if address == 0 {
        return (b"\0null".to_vec(), "NULL".into(), false);
    }
    let mut bytes = vec![0u8; len.min(POINTEE_LIMIT) as usize];
    let read = copy.memory().read_partial(address, &mut bytes).unwrap_or(0);
    if read < bytes.len() {
        let shown = format!("{address:#x} (unreadable)");
        return (shown.clone().into_bytes(), shown, false);
    }
    let shown = format!(
        "{len} bytes {}{}",
        shadowpatch_symbols::hex(&bytes[..bytes.len().min(32)]),
        if bytes.len() > 32 { "..." } else { "" }
    );
    (bytes, shown, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_are_compared_at_their_width() {
        assert_eq!(sign_extend(0xdead_0000_ffff_ffff, 4), u64::MAX);
        assert_eq!(sign_extend(0x1234_0000_0000_0007, 4), 7);
        assert_eq!(sign_extend(0x1ff, 1), u64::MAX);
        assert_eq!(float_bits("0x0000000000000000123456783ff00000", 4), 0x3ff00000);
    }

    #[test]
    fn call_sites_decide_void_value_or_unknown() {
        let sites = |uses: &[CallerUse]| -> Vec<(u64, CallerUse)> { uses.iter().map(|u| (0, *u)).collect() };
        let kind = |uses: &[CallerUse]| from_call_sites(&sites(uses), "m").kind;
        assert_eq!(kind(&[CallerUse::Discards, CallerUse::Unknown]), ReturnKind::Void);
        assert_eq!(
            kind(&[CallerUse::Discards, CallerUse::ReadsInteger { bytes: 4 }]),
            ReturnKind::Integer { bytes: 4 }
        );
        assert_eq!(kind(&[CallerUse::ReadsInteger { bytes: 8 }]), ReturnKind::Word);
        assert_eq!(kind(&[CallerUse::ReadsFloat]), ReturnKind::Float { bytes: 8 });
        assert_eq!(kind(&[CallerUse::Unknown]), ReturnKind::Unknown);
        assert_eq!(from_call_sites(&[], "m").method, "unknown");
    }
}
