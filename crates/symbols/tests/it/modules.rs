//! Module discovery and symbol lookup on live fixture processes.

use shadowpatch_fixtures::{Fixture, Running};
use shadowpatch_process::maps::read_maps;
use shadowpatch_symbols::{modules_of, SymbolKind, SymbolSource};

#[test]
fn c_fixture_modules_symbols_and_bias() {
    let fixture = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let modules = modules_of(fixture.pid(), &read_maps(fixture.pid()).unwrap()).unwrap();
    let main = modules.iter().find(|m| m.main).expect("main executable found");
    assert!(main.build_id_hex().is_some_and(|id| id.len() == 40));
    assert!(
        modules.iter().any(|m| m.name.starts_with("libc.so")),
        "libc is a module"
    );
    // The bias maps the file's symbol to the address the fixture printed.
    let work = fixture.number("work");
    let found = main.symbol_addresses("work_fn");
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].0, work);
    assert_eq!(found[0].1.kind, SymbolKind::Function);
    // Static (private) symbols come from .symtab.
    let scaled = main.symbol_addresses("scaled");
    assert_eq!(scaled[0].1.source, SymbolSource::Symtab);
    assert!(!scaled[0].1.global);
    // Address → symbol + offset.
    let (symbol, offset) = main.symbolize(work + 3).unwrap();
    assert_eq!((symbol.name.as_str(), offset), ("work_fn", 3));
    // Stripped libc still has .dynsym.
    let libc = modules.iter().find(|m| m.name.starts_with("libc.so")).unwrap();
    assert!(!libc.symbol_addresses("malloc").is_empty());
    // Only the default version of a versioned symbol is listed.
    let memcpy: std::collections::BTreeSet<u64> = libc.symbol_addresses("memcpy").iter().map(|(a, _)| *a).collect();
    assert_eq!(memcpy.len(), 1, "memcpy@@GLIBC_2.14 only: {memcpy:x?}");
    // memcpy is an IFUNC; libc's own IRELATIVE slot for it exists.
    let (address, symbol) = libc.symbol_addresses("memcpy")[0];
    assert!(symbol.ifunc);
    assert!(libc.image.irelative_slots.contains_key(&(address - libc.bias)));
    assert!(libc.matches_name("libc") && libc.matches_name("c"));
}

#[test]
fn rust_fixture_symbols_resolve_to_printed_addresses() {
    let fixture = Running::start(Fixture::BusyRust, &["1"]).unwrap();
    let modules = modules_of(fixture.pid(), &read_maps(fixture.pid()).unwrap()).unwrap();
    let main = modules.iter().find(|m| m.main).unwrap();
    assert_eq!(main.symbol_addresses("rust_work")[0].0, fixture.number("work"));
}

/// Issue 15: a target killed mid-apply failed with "reading
/// /lib64/ld-linux-x86-64.so.2: No such file or directory" (its module
/// files vanish from /proc with it). The error says the target exited.
#[test]
fn a_target_that_exits_while_its_modules_are_read_is_reported_as_exited() {
    let mut fixture = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let pid = fixture.pid();
    let maps = read_maps(pid).unwrap();
    fixture.kill().unwrap();
    let error = modules_of(pid, &maps).unwrap_err();
    assert!(
        matches!(
            error,
            shadowpatch_symbols::SymbolsError::Target(shadowpatch_process::TargetError::Exited { .. })
        ),
        "{error}"
    );
    assert_eq!(
        error.to_string(),
        format!("pid {pid} exited while its modules were being read")
    );
}

/// Two processes mapping the same libc share one parsed image (a
/// host-wide apply parses glibc once), each with its own load bias; the
/// file's build-id read alone (headers and note) is the parsed image's.
#[test]
fn processes_mapping_the_same_file_share_its_parsed_image() {
    let first = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let second = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let libc = |pid: i32| {
        modules_of(pid, &read_maps(pid).unwrap())
            .unwrap()
            .into_iter()
            .find(|m| m.name.starts_with("libc.so"))
            .expect("libc is a module")
    };
    let (a, b) = (libc(first.pid()), libc(second.pid()));
    assert!(std::sync::Arc::ptr_eq(&a.image, &b.image), "one parsed libc");
    assert_eq!(a.bias, a.base.wrapping_sub(a.image.first_load_address()));
    assert_eq!(b.bias, b.base.wrapping_sub(b.image.first_load_address()));
    let read_alone = shadowpatch_symbols::elf::file_build_id(&a.path).unwrap();
    assert_eq!(read_alone, a.image.build_id);
    assert!(read_alone.is_some());
}
