//! DWARF of real builds: signatures and variable types from a patch object
//! built with `-g`, nothing from the same object built without.

use shadowpatch_fixtures::{build_patch, Patch};
use shadowpatch_symbols::{DebugInfo, TypeClass};

#[test]
fn signatures_and_variable_types_come_from_debug_info() {
    let path = build_patch(Patch::Analysis).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let info = DebugInfo::parse(&path, &bytes, &|_| true)
        .unwrap()
        .expect("built with -g");
    let three = info.function("add_values_three", None).expect("defined");
    assert_eq!(three.parameters.len(), 3);
    assert!(three
        .parameters
        .iter()
        .all(|(_, t)| t.class == TypeClass::Integer && t.size == Some(8)));
    assert_eq!(three.return_type.name, "long int");
    let double = info.function("scale_value_long", None).unwrap();
    assert_eq!(double.return_type.class, TypeClass::Float);
    let point = info.function("sum_point_v2", None).unwrap();
    assert_eq!(point.parameters[0].1.class, TypeClass::Pointer);
    let members: Vec<(&str, u64)> = point.parameters[0]
        .1
        .pointee_members
        .iter()
        .map(|m| (m.name.as_str(), m.offset))
        .collect();
    assert_eq!(members, [("x", 0), ("y", 4)]);
    let counter = info.variable("counter", None).expect("the extern declaration");
    assert!(counter.declaration);
    assert_eq!(
        (counter.type_shape.name.as_str(), counter.type_shape.size),
        ("int", Some(4))
    );
    let config = info.variable("config", None).unwrap();
    assert_eq!(config.type_shape.size, Some(24));
    assert_eq!(config.type_shape.members.len(), 3);

    let only = DebugInfo::parse(&path, &bytes, &|name| name == "add_values_ok")
        .unwrap()
        .unwrap();
    assert_eq!(only.functions.len(), 1, "unwanted names are skipped");

    let stripped = build_patch(Patch::AnalysisNoDebug).unwrap();
    let bytes = std::fs::read(&stripped).unwrap();
    assert!(DebugInfo::parse(&stripped, &bytes, &|_| true).unwrap().is_none());
}

/// The debug information of a mapped module is read once per file and
/// names: processes mapping the same libc get what an uncached read gives
/// (from libc6-dbg's file when installed), and other names are read anew,
/// not served the first names' answer.
#[test]
fn a_modules_debug_information_is_shared_by_file_and_names() {
    use shadowpatch_fixtures::{Fixture, Running};
    use shadowpatch_symbols::dwarf::{module_debug_info, module_debug_info_named};
    let first = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let second = Running::start(Fixture::BusyC, &["1"]).unwrap();
    let libc = |pid: i32| {
        shadowpatch_symbols::modules_of(pid, &shadowpatch_process::maps::read_maps(pid).unwrap())
            .unwrap()
            .into_iter()
            .find(|m| m.name.starts_with("libc.so"))
            .expect("libc is a module")
    };
    let names = |list: &[&str]| {
        list.iter()
            .map(|n| n.to_string())
            .collect::<std::collections::BTreeSet<_>>()
    };
    let function_names = |found: &Option<(DebugInfo, shadowpatch_symbols::DebugSource)>| {
        found
            .as_ref()
            .map(|(info, _)| info.functions.iter().map(|f| f.name.clone()).collect::<Vec<_>>())
    };
    let (a, b) = (libc(first.pid()), libc(second.pid()));
    let getenv = names(&["getenv"]);
    let once = module_debug_info_named(first.pid(), &a, &getenv).unwrap();
    let again = module_debug_info_named(second.pid(), &b, &getenv).unwrap();
    let uncached = module_debug_info(second.pid(), &b, &|n| n == "getenv").unwrap();
    assert_eq!(function_names(&once), function_names(&uncached));
    assert_eq!(function_names(&again), function_names(&uncached));
    assert_eq!(once.as_ref().map(|(_, s)| s), uncached.as_ref().map(|(_, s)| s));
    let atoi = module_debug_info_named(first.pid(), &a, &names(&["atoi"])).unwrap();
    let uncached_atoi = module_debug_info(first.pid(), &a, &|n| n == "atoi").unwrap();
    assert_eq!(function_names(&atoi), function_names(&uncached_atoi));
    if let Some(found) = function_names(&once) {
        assert!(found.iter().all(|n| n == "getenv"), "{found:?}");
        assert!(!found.is_empty(), "getenv is in libc's debug information");
    }
}
