//! C++ names: demangling for what people read (the manifest and `--json`
//! keep the mangled names, which are the symbols), and a mangled
//! function's own unqualified name, to tell whether the diff touched its
//! source (`source.rs` finds `step` in `int Counter::step(int x) {`).
//!
//! `cpp_demangle` rather than `symbolic-demangle`: only the Itanium ABI
//! is needed (g++ on Linux), and it is the pure-Rust demangler that
//! `symbolic-demangle` itself uses for C++, without the Swift/MSVC parts.

use cpp_demangle::{DemangleOptions, Symbol};

/// `name` demangled when it is a mangled C++ name (`_ZN7Counter4stepEi` →
/// `Counter::step(int)`), as it is otherwise. A private symbol's
/// `file::` prefix (`counter.cpp::_ZN12_GLOBAL__N_14bumpEi`) is kept.
pub fn demangle(name: &str) -> String {
    if let Some((file, symbol)) = name.split_once("::") {
        if symbol.starts_with("_Z") {
            return format!("{file}::{}", demangle(symbol));
        }
    }
    demangle_with(name, &DemangleOptions::new()).unwrap_or_else(|| name.to_string())
}

fn demangle_with(name: &str, options: &DemangleOptions) -> Option<String> {
    if !name.starts_with("_Z") {
        return None;
    }
    Symbol::new(name.as_bytes()).ok()?.demangle(options).ok()
}

/// Whether `name` is a mangled C++ name.
pub fn is_mangled(name: &str) -> bool {
    name.starts_with("_Z") && Symbol::new(name.as_bytes()).is_ok()
}

/// The unqualified name of a mangled function, template arguments and
/// clone suffixes off: `_ZN7Counter4stepEi` → `step`, `_Z5twiceIiET_S0_`
/// → `twice`, `_ZN7CounterD2Ev` → `Counter`. `None` for a name that is
/// not mangled.
pub fn base_name(name: &str) -> Option<String> {
    let name = name.split('.').next().unwrap_or(name);
    let qualified = demangle_with(name, &DemangleOptions::new().no_params().no_return_type())?;
    // The last `::` component outside template arguments.
    let mut depth = 0i32;
    let mut start = 0;
    let bytes = qualified.as_bytes();
    let mut last = String::new();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'<' | b'(' => depth += 1,
            b'>' | b')' => depth -= 1,
            b':' if depth == 0 && bytes.get(i + 1) == Some(&b':') => start = i + 2,
            _ => {}
        }
        if depth == 0 && b != b':' {
            last = qualified[start..=i].to_string();
        }
    }
    let without_template = match last.find('<') {
        Some(open) if !last.starts_with("operator") => &last[..open],
        _ => last.as_str(),
    };
    let base = without_template.trim_start_matches('~').trim();
    (!base.is_empty()).then(|| base.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demangles_and_keeps_the_file_of_a_private_symbol() {
        assert_eq!(demangle("_ZN7Counter4stepEi"), "Counter::step(int)");
        assert_eq!(demangle("_Z5twiceIiET_S0_"), "int twice<int>(int)");
        assert_eq!(
            demangle("counter.cpp::_ZN12_GLOBAL__N_14bumpEi"),
            "counter.cpp::(anonymous namespace)::bump(int)"
        );
        assert_eq!(demangle("compute"), "compute");
        assert_eq!(demangle("a.c::counter"), "a.c::counter");
    }

    #[test]
    fn finds_the_unqualified_name() {
        assert_eq!(base_name("_ZN7Counter4stepEi").as_deref(), Some("step"));
        assert_eq!(base_name("_Z5twiceIiET_S0_").as_deref(), Some("twice"));
        assert_eq!(base_name("_ZN7CounterD2Ev").as_deref(), Some("Counter"));
        assert_eq!(base_name("_ZN12_GLOBAL__N_14bumpEi").as_deref(), Some("bump"));
        assert_eq!(base_name("_ZNK6Square4areaEi").as_deref(), Some("area"));
        assert_eq!(base_name("_ZN7Counter4stepEi.cold").as_deref(), Some("step"));
        assert_eq!(base_name("compute"), None);
    }
}
