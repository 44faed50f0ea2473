//! Explicit test inputs for pure functions: a call expression such as
//! `compute(5)` or `divide(-7, 0x10)` (`--call`), or a vectors file of such
//! expressions, one per line.
//!
//! Grammar of one call: `NAME ( [ARG {, ARG}] )`, spaces anywhere between
//! tokens. NAME is a C identifier (letters, digits, `_`, `$`, `.`; not
//! starting with a digit). An ARG is an integer — decimal, `0x` hex or `0b`
//! binary, optionally negative, `_` allowed between digits — or `true` /
//! `false` (1 / 0). Up to six arguments: they go in rdi, rsi, rdx, rcx, r8,
//! r9 (System V), as 64-bit values (negative ones in two's complement).
//! Pointers, floating-point values and structures are out of scope: a
//! function that takes one cannot be called with made-up input.
//!
//! Vectors file: one call per line; blank lines and everything from `#` to
//! the end of a line are ignored. A malformed call is refused with one line
//! naming the file, line and column: `vectors.txt:3:12: expected ...`.

use std::fmt;
use std::path::Path;

/// Integer arguments passed in registers (System V x86_64).
pub const MAX_ARGUMENTS: usize = 6;

/// One explicit call.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CallSpec {
    pub function: String,
    /// Register values, in argument order.
    pub arguments: Vec<u64>,
    /// The expression as written (for reports).
    pub text: String,
    /// Where it came from: `--call` or `FILE:LINE`.
    pub origin: String,
}

/// A malformed call, with its position (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct CallSyntaxError {
    /// `--call` or the vectors file's path.
    pub source_name: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for CallSyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.source_name, self.line, self.column, self.message
        )
    }
}

/// Parse one `--call` expression.
pub fn parse_call(text: &str) -> Result<CallSpec, CallSyntaxError> {
    parse_line(text, "--call", 1)?.ok_or_else(|| CallSyntaxError {
        source_name: "--call".into(),
        line: 1,
        column: 1,
        message: "empty call: expected NAME(ARGS), e.g. compute(5)".into(),
    })
}

/// Read a vectors file: one call per line (see the module documentation).
pub fn parse_vectors(path: &Path) -> Result<Vec<CallSpec>, CallSyntaxError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| CallSyntaxError {
        source_name: name.clone(),
        line: 0,
        column: 0,
        message: format!("cannot read: {e}"),
    })?;
    parse_vectors_text(&name, &text)
}

/// Parse the text of a vectors file named `name`.
pub fn parse_vectors_text(name: &str, text: &str) -> Result<Vec<CallSpec>, CallSyntaxError> {
    let mut calls = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let code = line.split('#').next().unwrap_or("");
        if let Some(call) = parse_line(code, name, index + 1)? {
            calls.push(call);
        }
    }
    Ok(calls)
}

/// Parse one line; `None` for a blank one.
fn parse_line(text: &str, source_name: &str, line: usize) -> Result<Option<CallSpec>, CallSyntaxError> {
    let mut parser = Parser {
        text,
        position: 0,
        source_name,
        line,
    };
    parser.skip_spaces();
    if parser.at_end() {
        return Ok(None);
    }
    let function = parser.identifier()?;
    parser.skip_spaces();
    parser.expect('(', "`(` after the function name")?;
    let mut arguments = Vec::new();
    parser.skip_spaces();
    if !parser.eat(')') {
        loop {
            parser.skip_spaces();
            if arguments.len() == MAX_ARGUMENTS {
                return Err(parser.error(format!(
                    "at most {MAX_ARGUMENTS} arguments (the ones passed in registers)"
                )));
            }
            arguments.push(parser.argument()?);
            parser.skip_spaces();
            if parser.eat(')') {
                break;
            }
            parser.expect(',', "`,` or `)` after an argument")?;
        }
    }
    parser.skip_spaces();
    if !parser.at_end() {
        return Err(parser.error(format!("unexpected `{}` after the call", parser.rest_token())));
    }
    Ok(Some(CallSpec {
        function,
        arguments,
        text: text.trim().to_string(),
        origin: if source_name == "--call" {
            source_name.to_string()
        } else {
            format!("{source_name}:{line}")
        },
    }))
}

struct Parser<'a> {
    text: &'a str,
    /// Byte offset of the next character.
    position: usize,
    source_name: &'a str,
    line: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.text[self.position..].chars().next()
    }

    fn at_end(&self) -> bool {
        self.position >= self.text.len()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.position += c.len_utf8();
        Some(c)
    }

    fn eat(&mut self, wanted: char) -> bool {
        if self.peek() == Some(wanted) {
            self.position += wanted.len_utf8();
            true
        } else {
            false
        }
    }

    fn skip_spaces(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.bump();
        }
    }

    fn error(&self, message: String) -> CallSyntaxError {
        CallSyntaxError {
            source_name: self.source_name.to_string(),
            line: self.line,
            column: self.text[..self.position].chars().count() + 1,
            message,
        }
    }

    /// The token at the current position, for error messages.
    fn rest_token(&self) -> String {
        let rest = &self.text[self.position..];
        let token: String = rest
            .chars()
            .take_while(|c| !c.is_whitespace() && !matches!(c, ',' | ')' | '('))
            .collect();
        if token.is_empty() {
            rest.chars().next().map(String::from).unwrap_or_default()
        } else {
            token
        }
    }

    fn found(&self) -> String {
        if self.at_end() {
            "the end of the line".to_string()
        } else {
            format!("`{}`", self.rest_token())
        }
    }

    fn expect(&mut self, wanted: char, what: &str) -> Result<(), CallSyntaxError> {
        if self.eat(wanted) {
            Ok(())
        } else {
            Err(self.error(format!("expected {what}, found {}", self.found())))
        }
    }

    fn identifier(&mut self) -> Result<String, CallSyntaxError> {
        let start = self.position;
        match self.peek() {
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {}
            _ => return Err(self.error(format!("expected a function name, found {}", self.found()))),
        }
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '.'))
        {
            self.bump();
        }
        Ok(self.text[start..self.position].to_string())
    }

    fn argument(&mut self) -> Result<u64, CallSyntaxError> {
        let start = self.position;
        let word: String = self.text[self.position..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '+' | '.'))
            .collect();
        let value = match word.as_str() {
            "true" => Some(1),
            "false" => Some(0),
            _ => parse_integer(&word),
        };
        if let Some(value) = value {
            self.position += word.len();
            return Ok(value);
        }
        self.position = start;
        let message = if word.chars().any(|c| c.is_ascii_digit()) && looks_numeric(&word) {
            format!("integer `{word}` does not fit in 64 bits")
        } else {
            let found = if word.is_empty() {
                self.found()
            } else {
                format!("`{word}`")
            };
            format!("expected an integer argument (decimal, 0x hex, 0b binary, true or false), found {found}")
        };
        Err(self.error(message))
    }
}

fn looks_numeric(word: &str) -> bool {
    let digits = word.trim_start_matches(['-', '+']);
    let digits = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
        .or_else(|| digits.strip_prefix("0b"))
        .unwrap_or(digits);
    !digits.is_empty() && digits.chars().all(|c| c.is_ascii_hexdigit() || c == '_')
}

/// An integer as a 64-bit register value: anything from `i64::MIN` to
/// `u64::MAX`, negative values in two's complement.
fn parse_integer(word: &str) -> Option<u64> {
    let (negative, digits) = match word.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, word.strip_prefix('+').unwrap_or(word)),
    };
    let (radix, digits) = if let Some(hex) = digits.strip_prefix("0x").or_else(|| digits.strip_prefix("0X")) {
        (16, hex)
    } else if let Some(binary) = digits.strip_prefix("0b").or_else(|| digits.strip_prefix("0B")) {
        (2, binary)
    } else {
        (10, digits)
    };
    if digits.is_empty() || digits.starts_with('_') || digits.ends_with('_') {
        return None;
    }
    let cleaned: String = digits.chars().filter(|c| *c != '_').collect();
    let magnitude = u64::from_str_radix(&cleaned, radix).ok()?;
    if negative {
        if magnitude > 1u64 << 63 {
            return None;
        }
        Some((magnitude as i64).wrapping_neg() as u64)
    } else {
        Some(magnitude)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_parse_with_every_integer_form() {
        let call = parse_call("  divide( -7 , 0x10,0b101, 1_000 , true,false ) ").unwrap();
        assert_eq!(call.function, "divide");
        assert_eq!(call.arguments, vec![(-7i64) as u64, 16, 5, 1000, 1, 0]);
        assert_eq!(call.text, "divide( -7 , 0x10,0b101, 1_000 , true,false )");
        assert_eq!(parse_call("f()").unwrap().arguments, Vec::<u64>::new());
        assert_eq!(
            parse_call("f(18446744073709551615, -9223372036854775808)")
                .unwrap()
                .arguments,
            vec![u64::MAX, 1 << 63]
        );
    }

    #[test]
    fn malformed_calls_name_the_column() {
        let cases = [
            ("", 1, "empty call"),
            ("5(1)", 1, "expected a function name"),
            (
                "f",
                2,
                "expected `(` after the function name, found the end of the line",
            ),
            ("f(1 2)", 5, "expected `,` or `)` after an argument, found `2`"),
            ("f(x)", 3, "expected an integer argument"),
            (
                "f(1,)",
                5,
                "expected an integer argument (decimal, 0x hex, 0b binary, true or false), found `)`",
            ),
            ("f(0x1g)", 3, "found `0x1g`"),
            ("f(99999999999999999999)", 3, "does not fit in 64 bits"),
            ("f(-9223372036854775809)", 3, "does not fit in 64 bits"),
            ("f(1) g", 6, "unexpected `g` after the call"),
            ("f(1,2,3,4,5,6,7)", 15, "at most 6 arguments"),
            ("f(1.5)", 3, "expected an integer argument"),
            ("f(&x)", 3, "found `&x`"),
        ];
        for (text, column, message) in cases {
            let error = parse_call(text).unwrap_err();
            assert_eq!(error.column, column, "{text:?}: {error}");
            assert!(error.to_string().contains(message), "{text:?}: {error}");
            assert!(
                error.to_string().starts_with(&format!("--call:1:{column}: ")),
                "{error}"
            );
            assert!(!error.to_string().contains('\n'));
        }
    }

    #[test]
    fn vectors_skip_comments_and_blank_lines_and_name_the_bad_line() {
        let text = "# inputs for compute\ncompute(1)\n\n  compute(0x10)  # hex\ndivide(1, 2)\n";
        let calls = parse_vectors_text("v.txt", text).unwrap();
        let functions: Vec<_> = calls.iter().map(|c| c.function.as_str()).collect();
        assert_eq!(functions, ["compute", "compute", "divide"]);
        assert_eq!(calls[1].origin, "v.txt:4");
        assert_eq!(calls[1].arguments, vec![16]);
        let error = parse_vectors_text("v.txt", "compute(1)\ncompute(1,\n").unwrap_err();
        assert_eq!(error.to_string(), "v.txt:2:11: expected an integer argument (decimal, 0x hex, 0b binary, true or false), found the end of the line");
    }
}
