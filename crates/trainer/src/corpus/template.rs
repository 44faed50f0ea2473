//! The corpus templates: the prelude and the `corpus:function` blocks of
//! the corpus target's source, the `corpus:rewrite` blocks of its rewrites,
//! and the mutation sites (the identity macros `OP`, `BOUND`, `RET`,
//! `STEP`, `GUARD`, `FREE`, `LAYOUT`, `ENTRY`) inside them.

use std::collections::BTreeMap;

/// The site macros, as the generator knows them.
pub const SITE_MACROS: &[&str] = &["OP", "BOUND", "RET", "STEP", "GUARD", "FREE", "LAYOUT", "ENTRY"];

/// One site: a macro call in a template's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Site {
    pub macro_name: &'static str,
    /// Byte range of the whole call (`OP(<)`), in the text it was found in.
    pub start: usize,
    pub end: usize,
    /// The argument (`<`).
    pub argument: String,
}

/// One function of the corpus target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionTemplate {
    pub name: String,
    /// The function's definition, as in the target.
    pub text: String,
    pub sites: Vec<Site>,
    /// Equivalent rewrites by tag (definitions of the same name).
    pub rewrites: BTreeMap<String, String>,
}

/// The corpus target's templates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Templates {
    /// Includes, site macros and types every patch source starts with.
    pub prelude: String,
    pub functions: Vec<FunctionTemplate>,
}

/// A template source that does not parse: the fixture and this parser
/// disagree (a programming error, reported with the line).
#[derive(Debug, thiserror::Error)]
#[error("corpus template, line {line}: {message}")]
pub struct TemplateError {
    pub line: usize,
    pub message: String,
}

impl Templates {
    /// Parse the target's source and its rewrites.
    pub fn parse(target_source: &str, rewrites_source: &str) -> Result<Templates, TemplateError> {
        let mut prelude = None;
        let mut functions = Vec::new();
        for block in blocks(target_source)? {
            match block.header.as_slice() {
                [kind] if kind == "corpus:prelude" => prelude = Some(block.text),
                [kind, name] if kind == "corpus:function" => {
                    let sites = find_sites(&block.text, block.line)?;
                    functions.push(FunctionTemplate {
                        name: name.clone(),
                        text: block.text,
                        sites,
                        rewrites: BTreeMap::new(),
                    });
                }
                _ => {
                    return Err(TemplateError {
                        line: block.line,
                        message: format!("unknown block {:?}", block.header.join(" ")),
                    })
                }
            }
        }
        for block in blocks(rewrites_source)? {
            let [kind, name, tag] = block.header.as_slice() else {
                return Err(TemplateError {
                    line: block.line,
                    message: format!("expected `corpus:rewrite NAME TAG`, found {:?}", block.header.join(" ")),
                });
            };
            if kind != "corpus:rewrite" {
                return Err(TemplateError {
                    line: block.line,
                    message: format!("unknown block {kind:?} in the rewrites"),
                });
            }
            let function = functions
                .iter_mut()
                .find(|f| &f.name == name)
                .ok_or_else(|| TemplateError {
                    line: block.line,
                    message: format!("rewrite of unknown function {name}"),
                })?;
            function.rewrites.insert(tag.clone(), block.text);
        }
        let prelude = prelude.ok_or_else(|| TemplateError {
            line: 0,
            message: "no corpus:prelude block".into(),
        })?;
        Ok(Templates { prelude, functions })
    }

    /// The templates of the corpus target fixture.
    pub fn corpus_target() -> Templates {
        Templates::parse(
            shadowpatch_fixtures::CORPUS_TARGET_SOURCE,
            shadowpatch_fixtures::CORPUS_REWRITES_SOURCE,
        )
        .expect("the corpus target's templates parse (checked by a unit test)")
    }

    pub fn function(&self, name: &str) -> Option<&FunctionTemplate> {
        self.functions.iter().find(|f| f.name == name)
    }
}

struct Block {
    header: Vec<String>,
    line: usize,
    text: String,
}

/// The `/* corpus:... */` ... `/* corpus:end */` blocks of a source.
fn blocks(source: &str) -> Result<Vec<Block>, TemplateError> {
    let mut found = Vec::new();
    let mut open: Option<(Vec<String>, usize, String)> = None;
    for (index, line) in source.lines().enumerate() {
        let trimmed = line.trim();
        let marker = trimmed
            .strip_prefix("/* corpus:")
            .and_then(|rest| rest.strip_suffix("*/"))
            .map(|rest| format!("corpus:{}", rest.trim()));
        match (marker, &mut open) {
            (Some(marker), Some(_)) if marker == "corpus:end" => {
                let (header, line, text) = open.take().expect("open block");
                found.push(Block { header, line, text });
            }
            (Some(marker), None) => {
                if marker == "corpus:end" {
                    return Err(TemplateError {
                        line: index + 1,
                        message: "corpus:end without a block".into(),
                    });
                }
                open = Some((
                    marker.split_whitespace().map(str::to_string).collect(),
                    index + 1,
                    String::new(),
                ));
            }
            (Some(marker), Some(_)) => {
                return Err(TemplateError {
                    line: index + 1,
                    message: format!("{marker} inside another block"),
                })
            }
            (None, Some((_, _, text))) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, None) => {}
        }
    }
    if let Some((header, line, _)) = open {
        return Err(TemplateError {
            line,
            message: format!("{} is never closed", header.join(" ")),
        });
    }
    Ok(found)
}

/// Every site macro call in `text`, in order.
pub fn find_sites(text: &str, line: usize) -> Result<Vec<Site>, TemplateError> {
    let bytes = text.as_bytes();
    let mut sites = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let word_start = at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        let found = word_start
            .then(|| {
                SITE_MACROS
                    .iter()
                    .find(|name| text[at..].starts_with(&format!("{name}(")))
            })
            .flatten();
        let Some(name) = found else {
            at += 1;
            continue;
        };
        let open = at + name.len();
        let mut depth = 0usize;
        let mut close = None;
        for (offset, byte) in bytes[open..].iter().enumerate() {
            match byte {
                b'(' => depth += 1,
                b')' => {
                    depth -= 1;
                    if depth == 0 {
                        close = Some(open + offset);
                        break;
                    }
                }
                _ => {}
            }
        }
        let close = close.ok_or_else(|| TemplateError {
            line,
            message: format!("unbalanced {name}( call"),
        })?;
        sites.push(Site {
            macro_name: name,
            start: at,
            end: close + 1,
            argument: text[open + 1..close].to_string(),
        });
        at = close + 1;
    }
    Ok(sites)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_corpus_target_parses_into_fifteen_functions_with_sites_and_rewrites() {
        let templates = Templates::corpus_target();
        assert_eq!(templates.functions.len(), 15);
        assert!(templates.prelude.contains("#define OP(x) x"));
        for function in &templates.functions {
            assert!(
                function.text.contains(&format!("{}(", function.name)),
                "{} defines itself",
                function.name
            );
            assert!(
                function.sites.iter().any(|s| s.macro_name == "ENTRY"),
                "{}",
                function.name
            );
            assert!(!function.rewrites.is_empty(), "{} has a rewrite", function.name);
        }
        let clamp = templates.function("clamp_add").unwrap();
        let arguments: Vec<(&str, &str)> = clamp
            .sites
            .iter()
            .map(|s| (s.macro_name, s.argument.as_str()))
            .collect();
        assert_eq!(
            arguments,
            [
                ("ENTRY", ""),
                ("OP", ">"),
                ("OP", ">"),
                ("BOUND", "1000000"),
                ("OP", "<"),
                ("BOUND", "-1000000")
            ]
        );
        assert_eq!(&clamp.text[clamp.sites[1].start..clamp.sites[1].end], "OP(>)");
    }

    #[test]
    fn malformed_templates_are_refused_with_their_line() {
        let error = Templates::parse("/* corpus:function f */\nint f;\n", "").unwrap_err();
        assert!(error.to_string().contains("line 1"), "{error}");
        let error = Templates::parse("/* corpus:prelude */\n/* corpus:end */\n/* corpus:end */\n", "").unwrap_err();
        assert_eq!(error.line, 3);
        let error = find_sites("x OP(( y", 7).unwrap_err();
        assert!(error.to_string().contains("unbalanced OP("), "{error}");
    }
}
