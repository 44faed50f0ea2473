//! The application protocol: one JSON object per line each way. The agent
//! learns who is asking from the socket's peer credentials, never from the
//! message, so no field here names a process.
//!
//! Written by hand rather than with serde so that this crate has no
//! dependencies (see Cargo.toml): the requests are four fixed shapes and
//! the reply is one flat object. The agent parses these lines with its
//! serde types (`shadowpatch_agent::protocol`), and its tests check that
//! every line this file writes, and every line the C library writes, parses.

/// Bumped when a request or reply changes incompatibly.
pub const PROTOCOL_VERSION: u32 = 1;

/// How a critical variable is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VariableMode {
    /// Must never change after registration: a change is an alert (heal-able).
    Guarded,
    /// Changes legitimately: copied periodically with a history of snapshots.
    Mirrored,
}

impl VariableMode {
    pub fn as_str(self) -> &'static str {
        match self {
            VariableMode::Guarded => "guarded",
            VariableMode::Mirrored => "mirrored",
        }
    }
}

/// A request from an application.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppRequest {
    /// First message of a connection: the protocol version and the
    /// addresses of the safe-point mailbox in the application's memory.
    Hello {
        version: u32,
        pending_address: u64,
        parked_address: u64,
        passed_address: u64,
    },
    Ping,
    RegisterVariable {
        name: String,
        address: u64,
        size: u64,
        mode: VariableMode,
    },
    RequestRollback {
        reason: String,
    },
}

impl AppRequest {
    /// The request as one JSON line (without the newline).
    pub fn to_json(&self) -> String {
        match self {
            AppRequest::Hello {
                version,
                pending_address,
                parked_address,
                passed_address,
            } => format!(
                r#"{{"op":"hello","version":{version},"pending_address":{pending_address},"parked_address":{parked_address},"passed_address":{passed_address}}}"#
            ),
            AppRequest::Ping => r#"{"op":"ping"}"#.to_string(),
            AppRequest::RegisterVariable {
                name,
                address,
                size,
                mode,
            } => format!(
                r#"{{"op":"register_variable","name":{},"address":{address},"size":{size},"mode":"{}"}}"#,
                json_string(name),
                mode.as_str()
            ),
            AppRequest::RequestRollback { reason } => {
                format!(r#"{{"op":"request_rollback","reason":{}}}"#, json_string(reason))
            }
        }
    }
}

/// `text` as a JSON string literal, quotes included.
pub fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The agent's answer to one request: the fields an application uses.
/// Other fields of the reply are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppReply {
    pub ok: bool,
    pub error: Option<String>,
    /// For a rollback: the patch rolled back and the pause.
    pub patch_id: Option<String>,
    pub pause_us: Option<u64>,
}

impl AppReply {
    /// Parse one reply line: a flat JSON object whose values are strings,
    /// numbers, booleans, null, or nested values (skipped).
    pub fn parse(line: &str) -> Result<AppReply, String> {
        let mut parser = Parser {
            bytes: line.trim().as_bytes(),
            at: 0,
        };
        let mut reply = AppReply::default();
        let mut saw_ok = false;
        parser.expect(b'{')?;
        if !parser.eat(b'}') {
            loop {
                let key = parser.string()?;
                parser.expect(b':')?;
                match (key.as_str(), parser.value()?) {
                    ("ok", Value::Bool(ok)) => {
                        reply.ok = ok;
                        saw_ok = true;
                    }
                    ("error", Value::String(text)) => reply.error = Some(text),
                    ("patch_id", Value::String(text)) => reply.patch_id = Some(text),
                    ("pause_us", Value::Number(n)) => reply.pause_us = Some(n),
                    _ => {}
                }
                if parser.eat(b',') {
                    continue;
                }
                parser.expect(b'}')?;
                break;
            }
        }
        parser.skip_space();
        if parser.at != parser.bytes.len() {
            return Err(format!("trailing characters at byte {}", parser.at));
        }
        if !saw_ok {
            return Err("no \"ok\" field".into());
        }
        Ok(reply)
    }
}

enum Value {
    Bool(bool),
    String(String),
    Number(u64),
    Other,
}

struct Parser<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn skip_space(&mut self) {
        while self.bytes.get(self.at).is_some_and(|b| b.is_ascii_whitespace()) {
            self.at += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> bool {
        self.skip_space();
        if self.bytes.get(self.at) == Some(&byte) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), String> {
        if self.eat(byte) {
            Ok(())
        } else {
            Err(format!("expected '{}' at byte {}", byte as char, self.at))
        }
    }

    fn string(&mut self) -> Result<String, String> {
        self.expect(b'"')?;
        let mut out = Vec::new();
        loop {
            let byte = *self.bytes.get(self.at).ok_or("unterminated string")?;
            self.at += 1;
            match byte {
                b'"' => break,
                b'\\' => {
                    let escaped = *self.bytes.get(self.at).ok_or("unterminated escape")?;
                    self.at += 1;
                    match escaped {
                        b'n' => out.push(b'\n'),
                        b't' => out.push(b'\t'),
                        b'r' => out.push(b'\r'),
                        b'b' => out.push(8),
                        b'f' => out.push(12),
                        b'u' => {
                            let hex = self.bytes.get(self.at..self.at + 4).ok_or("short \\u escape")?;
                            self.at += 4;
                            let code = std::str::from_utf8(hex)
                                .ok()
                                .and_then(|h| u32::from_str_radix(h, 16).ok())
                                .ok_or("bad \\u escape")?;
                            // Surrogate pairs are not needed for the agent's
                            // messages; an unpaired one becomes U+FFFD.
                            let c = char::from_u32(code).unwrap_or('\u{fffd}');
                            let mut buffer = [0u8; 4];
                            out.extend_from_slice(c.encode_utf8(&mut buffer).as_bytes());
                        }
                        other => out.push(other),
                    }
                }
                other => out.push(other),
            }
        }
        String::from_utf8(out).map_err(|_| "string is not UTF-8".to_string())
    }

    fn value(&mut self) -> Result<Value, String> {
        self.skip_space();
        match self.bytes.get(self.at) {
            Some(b'"') => self.string().map(Value::String),
            Some(b't') if self.bytes[self.at..].starts_with(b"true") => {
                self.at += 4;
                Ok(Value::Bool(true))
            }
            Some(b'f') if self.bytes[self.at..].starts_with(b"false") => {
                self.at += 5;
                Ok(Value::Bool(false))
            }
            Some(b'n') if self.bytes[self.at..].starts_with(b"null") => {
                self.at += 4;
                Ok(Value::Other)
            }
            Some(b'{') | Some(b'[') => self.skip_nested().map(|()| Value::Other),
            Some(b) if b.is_ascii_digit() || *b == b'-' => {
                let start = self.at;
                while self
                    .bytes
                    .get(self.at)
                    .is_some_and(|b| b.is_ascii_digit() || matches!(b, b'-' | b'+' | b'.' | b'e' | b'E'))
                {
                    self.at += 1;
                }
                let text = std::str::from_utf8(&self.bytes[start..self.at]).expect("ASCII");
                Ok(text.parse().map(Value::Number).unwrap_or(Value::Other))
            }
            _ => Err(format!("unexpected value at byte {}", self.at)),
        }
    }

    /// Skip an object or array, strings inside included.
    fn skip_nested(&mut self) -> Result<(), String> {
        let mut depth = 0usize;
        loop {
            let byte = *self.bytes.get(self.at).ok_or("unterminated object")?;
            match byte {
                b'"' => {
                    self.string()?;
                    continue;
                }
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth -= 1;
                    if depth == 0 {
                        self.at += 1;
                        return Ok(());
                    }
                }
                _ => {}
            }
            self.at += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_the_documented_wire_form() {
        let request = AppRequest::RegisterVariable {
            name: "con\"fig\n".into(),
            address: 4096,
            size: 64,
            mode: VariableMode::Guarded,
        };
        assert_eq!(
            request.to_json(),
            r#"{"op":"register_variable","name":"con\"fig\n","address":4096,"size":64,"mode":"guarded"}"#
        );
        assert_eq!(AppRequest::Ping.to_json(), r#"{"op":"ping"}"#);
    }

    #[test]
    fn replies_parse_and_unknown_fields_are_skipped() {
        let reply = AppReply::parse(
            r#"{"ok":true,"id":null,"patch_id":"fix \u0041\"","pause_us":57,"exit_code":0,"result":{"a":[1,"}"]}}"#,
        )
        .unwrap();
        assert_eq!(
            reply,
            AppReply {
                ok: true,
                error: None,
                patch_id: Some("fix A\"".into()),
                pause_us: Some(57),
            }
        );
        let refused = AppReply::parse(r#"{"ok":false,"error":"pid 4 has no active patch"}"#).unwrap();
        assert_eq!(refused.error.as_deref(), Some("pid 4 has no active patch"));
        assert!(AppReply::parse(r#"{"error":"x"}"#).is_err());
        assert!(AppReply::parse(r#"{"ok":true"#).is_err());
        assert!(AppReply::parse("not json").is_err());
    }
}
