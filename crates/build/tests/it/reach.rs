//! The functions a replaced function reaches, for a stripped target's
//! manifest: by direct calls and jumps, transitively, and nothing else.

use shadowpatch_build::target::{SymbolMap, SymbolOrigin};

#[test]
fn reached_functions_are_the_transitive_direct_callees() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("r.c");
    std::fs::write(
        &source,
        "#define N __attribute__((noinline))\n\
         volatile int v;\n\
         N static int leaf(int x) { v += x; return v; }\n\
         N static int middle(int x) { return leaf(x) + 1; }\n\
         N int top(int x) { if (x > 3) return middle(x); return leaf(x - 1) * 2; }\n\
         N int unrelated(int x) { return leaf(x) + 7; }\n\
         int main(int argc, char **argv) { (void)argv; return top(argc) + unrelated(argc); }\n",
    )
    .unwrap();
    let binary = dir.path().join("r");
    let built = std::process::Command::new("gcc")
        .args(["-O2", "-o"])
        .arg(&binary)
        .arg(&source)
        .status()
        .unwrap();
    assert!(built.success());
    let bytes = std::fs::read(&binary).unwrap();
    let map = SymbolMap::of_file(&bytes, SymbolOrigin::TargetSymtab).unwrap();
    let top = map.symbols.iter().find(|s| s.name == "top").unwrap().address;
    let mut names: Vec<&str> = shadowpatch_build::reach::reached(&bytes, &map, &[top])
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    names.sort();
    assert_eq!(names, vec!["leaf", "middle"]);
}
