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
    pub fn contains(&self, symbol: &str) -> bool {
        let base = symbol.split('.').next().unwrap_or(symbol);
        self.0.contains(base)
    }
}

/// For each line (0-based), the function it belongs to, if any.
fn function_of_each_line(source: &str) -> Vec<Option<String>> {
    let mut owners = Vec::new();
    let mut depth = 0i32;
    let mut candidate: Option<(String, usize)> = None;
    let mut current: Option<String> = None;
    for (number, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap_or(line);
        if depth == 0 {
            if let Some(name) = defined_name(code) {
                candidate = Some((name, number));
            } else if code.trim_end().ends_with(';') {
                candidate = None;
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
                        }
                    }
                    depth += 1;
                }
                '}' => {
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

/// `int f(int x)` → `f`: the identifier before the first `(` on a line
/// at file scope, unless the line is a declaration or a macro.
fn defined_name(code: &str) -> Option<String> {
    let trimmed = code.trim_start();
    if trimmed.starts_with('#') || trimmed.starts_with('*') || trimmed.starts_with("/*") {
        return None;
    }
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
}
