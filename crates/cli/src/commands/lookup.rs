//! `shadowpatch lookup PID [MODULE!]NAME|ADDRESS`: symbols of a live process.

use super::{Context, Location};
use crate::failure::BadInput;
use crate::output::print_json;
use serde::Serialize;
use shadowpatch_process::maps::read_maps;
use shadowpatch_process::ProcessIdentity;
use shadowpatch_symbols::{modules_of, SymbolKind, SymbolSource};

#[derive(Debug, Serialize)]
struct Found {
    module: String,
    name: String,
    address: String,
    size: u64,
    kind: SymbolKind,
    source: SymbolSource,
    global: bool,
}

pub fn run(context: &Context, pid: i32, what: &str) -> anyhow::Result<i32> {
    ProcessIdentity::of(pid)?;
    let modules = modules_of(pid, &read_maps(pid)?)?;
    if let Some(hex) = what.strip_prefix("0x") {
        let address =
            u64::from_str_radix(hex, 16).map_err(|_| BadInput(format!("{what:?} is not a hexadecimal address")))?;
        let location = Location::of(address, &modules);
        if context.json {
            print_json(&location);
        } else {
            println!("{address:#x} {}", location.location);
        }
        return Ok(0);
    }
    // MODULE!SYMBOL: the module named as `--module` and `--guard` name it
    // (file name, name without version, soname, the command's own name).
    let (module_name, symbol) = match what.split_once('!') {
        Some((module, symbol)) => (Some(module), symbol),
        None => (None, what),
    };
    if let Some(wanted) = module_name {
        if !modules.iter().any(|m| m.matches_name(wanted)) {
            let names: Vec<&str> = modules.iter().map(|m| m.name.as_str()).collect();
            return Err(BadInput(format!(
                "pid {pid}: no module named {wanted} (modules: {})",
                names.join(", ")
            ))
            .into());
        }
    }
    let found: Vec<Found> = modules
        .iter()
        .filter(|m| module_name.is_none_or(|wanted| m.matches_name(wanted)))
        .flat_map(|m| {
            m.symbol_addresses(symbol).into_iter().map(move |(address, s)| Found {
                module: m.name.clone(),
                name: s.name.clone(),
                address: format!("{address:#x}"),
                size: s.size,
                kind: s.kind,
                source: s.source,
                global: s.global,
            })
        })
        .collect();
    if found.is_empty() {
        return Err(BadInput(format!("pid {pid}: no symbol named {what:?} in any module")).into());
    }
    if context.json {
        print_json(&found);
    } else {
        for f in &found {
            println!(
                "{} {}!{} size {} {:?} {:?}{}",
                f.address,
                f.module,
                f.name,
                f.size,
                f.kind,
                f.source,
                if f.global { "" } else { " (local)" }
            );
        }
    }
    Ok(0)
}
