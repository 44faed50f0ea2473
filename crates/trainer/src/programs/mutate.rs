//! Source mutations of one C function for the real-program corpus: find
//! the function's definition in its file (GNU style with the return type
//! on the line before, or on one line; prototypes skipped), then insert a
//! template's statements at the top of its body, or wrap it in an
//! optimisation pragma. The result is a unified diff (`similar`) that
//! `shadowpatch build --debian` turns into a patch.
//!
//! The locator reads C lexically (comments, strings and character
//! literals are skipped when counting braces); it does not preprocess, so
//! a function defined inside `#if` branches twice is ambiguous and
//! refused.

use serde::{Deserialize, Serialize};

/// What a template is made to be: the label still comes from running it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Intent {
    /// Same behaviour, other code.
    Benign,
    /// A change of behaviour (a flipped comparison).
    Change,
    /// Harm: crash, hang, exit or leak.
    Harm,
}

/// A mutation of a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Template {
    /// A call counter in a new static (instrumentation; benign).
    Counter,
    /// The function compiled at -O1 (`#pragma GCC optimize`; benign).
    OptimiseO1,
    /// The first `==` of the body turned into `!=` (or the reverse).
    FlipEquality,
    /// A store through a null pointer on every call.
    CrashAlways,
    /// A store through a null pointer on every third call.
    CrashSometimes,
    /// An endless loop on every call.
    HangAlways,
    /// `exit(71)` on every call (`__builtin_exit`).
    Exit,
    /// 256 KiB allocated, touched and never freed on every call.
    Leak,
}

impl Template {
    pub const ALL: [Template; 8] = [
        Template::Counter,
        Template::OptimiseO1,
        Template::FlipEquality,
        Template::CrashAlways,
        Template::CrashSometimes,
        Template::HangAlways,
        Template::Exit,
        Template::Leak,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Template::Counter => "counter",
            Template::OptimiseO1 => "optimise-o1",
            Template::FlipEquality => "flip-equality",
            Template::CrashAlways => "crash-always",
            Template::CrashSometimes => "crash-sometimes",
            Template::HangAlways => "hang-always",
            Template::Exit => "exit",
            Template::Leak => "leak",
        }
    }

    pub fn parse(name: &str) -> Option<Template> {
        Template::ALL.into_iter().find(|t| t.as_str() == name)
    }

    pub fn intent(self) -> Intent {
        match self {
            Template::Counter | Template::OptimiseO1 => Intent::Benign,
            Template::FlipEquality => Intent::Change,
            _ => Intent::Harm,
        }
    }

    /// The statements put first in the body (`None`: not an insertion).
    fn prologue(self) -> Option<&'static str> {
        Some(match self {
            Template::Counter => "{ static volatile unsigned long sp_corpus_calls; sp_corpus_calls++; }",
            Template::CrashAlways => "{ *(volatile int *)0 = 0; }",
            Template::CrashSometimes => {
                "{ static volatile unsigned sp_corpus_n; if (++sp_corpus_n % 3 == 0) *(volatile int *)0 = 0; }"
            }
            Template::HangAlways => "{ for (;;) __asm__ __volatile__(\"\"); }",
            // The builtin: a block-scope `extern void exit(int)` is a
            // redundant declaration, an error under memcached's -Werror.
            Template::Exit => "{ __builtin_exit(71); }",
            Template::Leak => {
                "{ static void *volatile sp_corpus_sink; sp_corpus_sink = __builtin_malloc(262144); \
                 if (sp_corpus_sink) __builtin_memset(sp_corpus_sink, 1, 262144); }"
            }
            Template::OptimiseO1 | Template::FlipEquality => return None,
        })
    }
}

/// Where a function's definition is in a file (byte offsets).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Definition {
    /// Start of the line where the definition begins (its return type).
    pub start: usize,
    /// The body's opening brace.
    pub open: usize,
    /// The body's closing brace.
    pub close: usize,
}

/// Why a mutation could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MutateError {
    #[error("{function}: no definition found")]
    NotFound { function: String },
    #[error("{function}: defined {count} times (inside #if branches?)")]
    Ambiguous { function: String, count: usize },
    #[error("{function}: the body's braces do not balance")]
    Unbalanced { function: String },
    #[error("{function}: the body has no `==` or `!=` to flip")]
    NothingToFlip { function: String },
}

/// Bytes of `text` that are code (not comment, string or char literal).
fn code_mask(text: &[u8]) -> Vec<bool> {
    let mut mask = vec![true; text.len()];
    let mut i = 0;
    while i < text.len() {
        let rest = &text[i..];
        let end = if rest.starts_with(b"/*") {
            find(text, i + 2, b"*/").map_or(text.len(), |e| e + 2)
        } else if rest.starts_with(b"//") {
            find(text, i, b"\n").unwrap_or(text.len())
        } else if rest[0] == b'"' || rest[0] == b'\'' {
            let quote = rest[0];
            let mut j = i + 1;
            while j < text.len() && text[j] != quote && text[j] != b'\n' {
                j += if text[j] == b'\\' { 2 } else { 1 };
            }
            (j + 1).min(text.len())
        } else {
            i += 1;
            continue;
        };
        for m in &mut mask[i..end] {
            *m = false;
        }
        i = end;
    }
    mask
}

fn find(text: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    text.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| p + from)
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The definition of `function` in `source`.
pub fn locate(source: &str, function: &str) -> Result<Definition, MutateError> {
    let text = source.as_bytes();
    let mask = code_mask(text);
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(at) = find(text, from, function.as_bytes()) {
        from = at + 1;
        let after = at + function.len();
        if !mask[at] || (at > 0 && is_ident(text[at - 1])) || text.get(after).is_some_and(|b| is_ident(*b)) {
            continue;
        }
        // The name then `(`, on a line that starts at column 0 (a top-level
        // declaration, not a call inside a body).
        let mut k = after;
        while k < text.len() && (text[k] == b' ' || text[k] == b'\t') {
            k += 1;
        }
        if text.get(k) != Some(&b'(') {
            continue;
        }
        let line_start = source[..at].rfind('\n').map_or(0, |p| p + 1);
        if text[line_start].is_ascii_whitespace() || text[line_start] == b'#' {
            continue;
        }
        // Past the parameter list: `{` starts a definition, `;` or `,`
        // ends a prototype.
        let mut depth = 0i32;
        let mut j = k;
        let mut open = None;
        while j < text.len() {
            if mask[j] {
                match text[j] {
                    b'(' => depth += 1,
                    b')' => depth -= 1,
                    b'{' if depth == 0 => {
                        open = Some(j);
                        break;
                    }
                    b';' | b',' if depth == 0 => break,
                    _ => {}
                }
            }
            j += 1;
        }
        let Some(open) = open else { continue };
        let mut depth = 0i32;
        let mut close = None;
        for (j, byte) in text.iter().enumerate().skip(open) {
            if !mask[j] {
                continue;
            }
            match byte {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        close = Some(j);
                        break;
                    }
                }
                _ => {}
            }
        }
        let close = close.ok_or_else(|| MutateError::Unbalanced {
            function: function.to_string(),
        })?;
        found.push(Definition {
            start: definition_start(source, line_start),
            open,
            close,
        });
    }
    match found.len() {
        0 => Err(MutateError::NotFound {
            function: function.to_string(),
        }),
        1 => Ok(found[0]),
        count => Err(MutateError::Ambiguous {
            function: function.to_string(),
            count,
        }),
    }
}

/// GNU style puts the return type on the line(s) before the name: walk
/// back over lines that are not blank, a directive, or the end of
/// something else.
fn definition_start(source: &str, name_line: usize) -> usize {
    let mut start = name_line;
    while start > 0 {
        let previous_start = source[..start - 1].rfind('\n').map_or(0, |p| p + 1);
        let line = source[previous_start..start - 1].trim_end();
        if line.is_empty()
            || line.starts_with('#')
            || line.ends_with(';')
            || line.ends_with('}')
            || line.ends_with("*/")
            || line.starts_with(' ')
            || line.starts_with('\t')
        {
            break;
        }
        start = previous_start;
    }
    start
}

/// The source with `template` applied to `function`.
pub fn mutate(source: &str, function: &str, template: Template) -> Result<String, MutateError> {
    let def = locate(source, function)?;
    if let Some(prologue) = template.prologue() {
        return Ok(format!(
            "{}\n    {prologue}\n{}",
            &source[..=def.open],
            &source[def.open + 1..]
        ));
    }
    match template {
        Template::OptimiseO1 => {
            let after = source[def.close..]
                .find('\n')
                .map_or(source.len(), |p| def.close + p + 1);
            Ok(format!(
                "{}#pragma GCC push_options\n#pragma GCC optimize (\"O1\")\n{}#pragma GCC pop_options\n{}",
                &source[..def.start],
                &source[def.start..after],
                &source[after..]
            ))
        }
        Template::FlipEquality => {
            let text = source.as_bytes();
            let mask = code_mask(text);
            let at = (def.open..def.close - 1)
                .find(|&i| {
                    mask[i] && (text[i] == b'=' || text[i] == b'!') && text[i + 1] == b'=' && {
                        // Not `<=`, `>=`, `===`-like runs.
                        let before = if i > 0 { text[i - 1] } else { b' ' };
                        !matches!(before, b'<' | b'>' | b'=' | b'!') && text.get(i + 2) != Some(&b'=')
                    }
                })
                .ok_or_else(|| MutateError::NothingToFlip {
                    function: function.to_string(),
                })?;
            let flipped = if text[at] == b'=' { "!=" } else { "==" };
            Ok(format!("{}{flipped}{}", &source[..at], &source[at + 2..]))
        }
        _ => unreachable!("every other template has a prologue"),
    }
}

/// A unified diff of one file (`a/PATH`, `b/PATH`, for `patch -p1`).
pub fn unified_diff(path: &str, old: &str, new: &str) -> String {
    similar::TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(&format!("a/{path}"), &format!("b/{path}"))
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GNU: &str = "/* yaml_parser_fetch_value(x) in a comment */\nstatic int\nyaml_parser_fetch_value(yaml_parser_t *parser);\n\nstatic int\nyaml_parser_fetch_value(yaml_parser_t *parser)\n{\n    if (parser->x == 1) { return \"}\" == 0; }\n    return 1;\n}\n\nint other(void) { return yaml_parser_fetch_value(0); }\n";

    #[test]
    fn gnu_style_definitions_are_found_past_their_prototype_comments_and_calls() {
        let def = locate(GNU, "yaml_parser_fetch_value").unwrap();
        assert_eq!(&GNU[def.start..def.start + 10], "static int");
        assert!(GNU[def.start..].starts_with("static int\nyaml_parser_fetch_value(yaml_parser_t *parser)\n{"));
        assert_eq!(&GNU[def.open..=def.open], "{");
        assert_eq!(&GNU[def.close..def.close + 2], "}\n");
        assert!(GNU[def.close + 2..].starts_with("\nint other"));
    }

    #[test]
    fn one_line_definitions_and_missing_functions() {
        let source = "static int f(int a) {\n    return a == 2;\n}\n";
        let def = locate(source, "f").unwrap();
        assert_eq!(def.start, 0);
        assert_eq!(locate(source, "g"), Err(MutateError::NotFound { function: "g".into() }));
        let twice = "#if A\nint f(void) { return 1; }\n#else\nint f(void) { return 2; }\n#endif\n";
        assert!(matches!(
            locate(twice, "f"),
            Err(MutateError::Ambiguous { count: 2, .. })
        ));
    }

    #[test]
    fn templates_insert_at_the_top_of_the_body_and_flip_the_first_equality() {
        let source = "static int f(int a) {\n    if (a <= 1) return 0;\n    return a == 2;\n}\n";
        let crashed = mutate(source, "f", Template::CrashAlways).unwrap();
        assert!(crashed.starts_with("static int f(int a) {\n    { *(volatile int *)0 = 0; }\n\n    if"));
        let flipped = mutate(source, "f", Template::FlipEquality).unwrap();
        assert!(flipped.contains("a <= 1") && flipped.contains("return a != 2;"));
        let o1 = mutate(source, "f", Template::OptimiseO1).unwrap();
        assert!(o1.starts_with("#pragma GCC push_options\n#pragma GCC optimize (\"O1\")\nstatic int f"));
        assert!(o1.ends_with("}\n#pragma GCC pop_options\n"));
        assert_eq!(
            mutate("int g(void) { return 1; }\n", "g", Template::FlipEquality),
            Err(MutateError::NothingToFlip { function: "g".into() })
        );
        let diff = unified_diff("src/f.c", source, &crashed);
        assert!(diff.starts_with("--- a/src/f.c\n+++ b/src/f.c\n@@"));
        assert!(diff.contains("+    { *(volatile int *)0 = 0; }"));
    }
}
