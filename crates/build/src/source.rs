//! Which functions a diff touches: the lines each hunk changes in the new
//! file, and the C function around each line (a brace-depth scan, enough
//! for C written one definition at a time). Used only to say whether a
//! changed function changed by its own source or by inlining.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Per file of a diff (its path in the new tree), the new-file lines the
/// hunks change (a deletion counts as the line after it).
pub fn changed_lines(diff: &str) -> BTreeMap<PathBuf, BTreeSet<usize>> {
    let mut files: BTreeMap<PathBuf, BTreeSet<usize>> = BTreeMap::new();
    let mut current: Option<PathBuf> = None;
    let mut line = 0usize;
    for text in diff.lines() {
        if let Some(name) = text.strip_prefix("+++ ") {
            let name = name.split('\t').next().unwrap_or(name).trim();
            let name = name.strip_prefix("b/").unwrap_or(name);
            current = (name != "/dev/null").then(|| PathBuf::from(name));
            continue;
        }
        if text.starts_with("--- ") {
            continue;
        }
        if let Some(header) = text.strip_prefix("@@ ") {
            // @@ -a,b +c,d @@
            line = header
                .split_whitespace()
                .find_map(|part| part.strip_prefix('+'))
                .and_then(|range| range.split(',').next())
                .and_then(|start| start.parse().ok())
                .unwrap_or(1);
            continue;
        }
        let Some(file) = &current else { continue };
        match text.as_bytes().first() {
            Some(b'+') => {
                files.entry(file.clone()).or_default().insert(line);
                line += 1;
            }
            Some(b'-') => {
                files.entry(file.clone()).or_default().insert(line);
            }
            Some(b'\\') => {}
            _ => line += 1,
        }
    }
    files
}

/// The functions whose source lines a diff changed.
#[derive(Debug, Default, Clone)]
pub struct TouchedFunctions(BTreeSet<String>);

impl TouchedFunctions {
    /// Functions of `source` (the patched file's text) containing `lines`.
    pub fn of(source: &str, lines: &BTreeSet<usize>) -> TouchedFunctions {
        let owners = function_of_each_line(source);
        TouchedFunctions(
            lines
                .iter()
                .filter_map(|line| owners.get(line.saturating_sub(1)).cloned().flatten())
                .collect(),
        )
    }

    pub fn extend(&mut self, other: TouchedFunctions) {
        self.0.extend(other.0);
    }

    /// Whether `symbol` (a compiler clone `f.constprop.0` counts as `f`)
    /// is one of the functions.
    /// A mangled C++ name counts by its unqualified name
    /// (`_ZN7Counter4stepEi` as `step`).
    pub fn contains(&self, symbol: &str) -> bool {
        if let Some(base) = crate::cxx::base_name(symbol) {
            return self.0.contains(&base);
        }
        let base = symbol.split('.').next().unwrap_or(symbol);
        self.0.contains(base)
    }
}

/// For each line (0-based), the function it belongs to, if any. C++
/// scopes (`namespace`, `class`, `struct`, `extern "C"` blocks) are
/// transparent: a definition inside one counts as at file scope.
fn function_of_each_line(source: &str) -> Vec<Option<String>> {
    let mut owners = Vec::new();
    // Depth inside the current function (or other non-scope braces).
    let mut depth = 0i32;
    // Open scope braces, to close them at their `}`.
    let mut scopes = 0i32;
    let mut candidate: Option<(String, usize)> = None;
    let mut scope_opening = false;
    let mut current: Option<String> = None;
    for (number, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap_or(line);
        if depth == 0 {
            if let Some(name) = defined_name(code) {
                candidate = Some((name, number));
                scope_opening = false;
            } else if code.trim_end().ends_with(';') {
                candidate = None;
                scope_opening = false;
            }
            if opens_scope(code) && candidate.is_none() {
                scope_opening = true;
            }
        }
        let mut owner_now = current.clone();
        for c in code.chars() {
            match c {
                '{' => {
                    if depth == 0 {
                        if let Some((name, start)) = candidate.take() {
                            // The signature's lines belong to the function too.
                            for owner in owners.iter_mut().skip(start) {
                                *owner = Some(name.clone());
                            }
                            current = Some(name);
                            owner_now = current.clone();
                        } else if scope_opening {
                            scope_opening = false;
                            scopes += 1;
                            continue;
                        }
                    }
                    depth += 1;
                }
                '}' => {
                    if depth == 0 && scopes > 0 {
                        scopes -= 1;
                        continue;
                    }
                    depth -= 1;
                    if depth <= 0 {
                        depth = 0;
                        current = None;
                    }
                }
                _ => {}
            }
        }
        owners.push(owner_now);
    }
    owners
}

/// A line opening a C++ scope whose braces hold definitions.
fn opens_scope(code: &str) -> bool {
    let trimmed = code.trim_start();
    [
        "namespace",
        "class ",
        "struct ",
        "union ",
        "extern \"C\"",
        "extern \"C++\"",
    ]
    .iter()
    .any(|keyword| trimmed.starts_with(keyword) || trimmed.contains(&format!(" {keyword}")))
        && !trimmed.trim_end().ends_with(';')
}

/// `int f(int x)` → `f`: the identifier before the first `(` on a line
/// at file scope, unless the line is a declaration or a macro.
fn defined_name(code: &str) -> Option<String> {
    let trimmed = code.trim_start();
    if trimmed.starts_with('#') || trimmed.starts_with('*') || trimmed.starts_with("/*") {
        return None;
    }
    let code = without_attributes(code);
    let open = code.find('(')?;
    let before = code[..open].trim_end();
    let name: String = before
        .chars()
        .rev()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let keyword = matches!(name.as_str(), "if" | "while" | "for" | "switch" | "return" | "sizeof");
    (!name.is_empty() && !keyword && !name.starts_with(|c: char| c.is_ascii_digit())).then_some(name)
}

/// `code` without GNU `__attribute__((...))` and C++ `[[...]]`
/// attributes (`__attribute__((noinline)) int f(int x)` → `int f(int x)`).
fn without_attributes(code: &str) -> String {
    let mut code = code.to_string();
    while let Some(at) = code.find("__attribute__") {
        let mut depth = 0;
        let mut end = code.len();
        for (i, c) in code[at..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        end = at + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        code.replace_range(at..end, "");
    }
    while let (Some(open), Some(close)) = (code.find("[["), code.find("]]")) {
        if close < open {
            break;
        }
        code.replace_range(open..close + 2, "");
    }
    code
}

/// The diff's file that is `source` (paths compared from the end).
pub fn lines_for<'d>(changed: &'d BTreeMap<PathBuf, BTreeSet<usize>>, source: &Path) -> Option<&'d BTreeSet<usize>> {
    changed
        .iter()
        .find(|(file, _)| source.ends_with(file) || file.ends_with(source))
        .map(|(_, lines)| lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_changed_lines_and_their_functions() {
        let diff = "--- a/a.c\n+++ b/a.c\n@@ -7,3 +7,3 @@ static int scale(int x)\n {\n-    return x * 2;\n+    return x * 3;\n }\n";
        let changed = changed_lines(diff);
        let lines = &changed[Path::new("a.c")];
        assert_eq!(lines.iter().copied().collect::<Vec<_>>(), vec![8]);
        let source = "#include <x.h>\nstatic int counter;\n\nint g(void);\n\nstatic int scale(int x)\n{\n    return x * 3;\n}\n\nint compute(int x)\n{\n    return scale(x);\n}\n";
        let touched = TouchedFunctions::of(source, lines);
        assert!(touched.contains("scale"));
        assert!(touched.contains("scale.constprop.0"));
        assert!(!touched.contains("compute"));
    }

    #[test]
    fn finds_cplusplus_methods_and_functions_in_namespaces() {
        let source = "#include \"counter.h\"\nnamespace {\n__attribute__((noinline)) int bump(int x)\n{\n    return x + 1;\n}\n}\n\nint Counter::step(int x)\n{\n    total_ += bump(x);\n    return total_;\n}\nstruct Sq {\n    int area(int x) const { return x * x; }\n};\n";
        let all: BTreeSet<usize> = (1..=17).collect();
        let touched = TouchedFunctions::of(source, &all);
        assert!(touched.contains("_ZN12_GLOBAL__N_14bumpEi"));
        assert!(touched.contains("_ZN7Counter4stepEi"));
        assert!(touched.contains("_ZNK2Sq4areaEi"));
        let only_step = TouchedFunctions::of(source, &[11].into_iter().collect());
        assert!(only_step.contains("_ZN7Counter4stepEi"));
        assert!(!only_step.contains("_ZN12_GLOBAL__N_14bumpEi"));
    }
}
