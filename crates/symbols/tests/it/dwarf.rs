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
