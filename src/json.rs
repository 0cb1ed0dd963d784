//! A small JSON document model over nanoserde's tokenizer (the only nanoserde
//! user). The manifest needs what derive-based decoding cannot give: unknown
//! and duplicate keys reported by name, errors with line and column, and
//! output that keeps a human-friendly key order. Server answers need
//! tolerance: extra fields, a missing envelope.

use nanoserde::{DeJsonErrReason, DeJsonState, DeJsonTok};
use std::fmt::Write;
use std::str::Chars;

/// Nesting deeper than this is refused (a hostile server cannot blow the stack).
const MAX_DEPTH: usize = 64;

/// A parsed JSON value. Objects keep their keys in document order, duplicates included.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// `null`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// A number, as its JSON text: round-trips exactly (64-bit inode numbers
    /// included) and never needs float formatting.
    Num(String),
    /// A string.
    Str(String),
    /// An array.
    Arr(Vec<Value>),
    /// An object, keys in document order.
    Obj(Vec<(String, Value)>),
}

/// Where and why a document failed to parse. Line and column count from 1.
#[derive(Debug, PartialEq)]
pub struct SyntaxError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What was expected or wrong.
    pub msg: String,
}

impl std::fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "line {}, column {}: {}",
            self.line, self.column, self.msg
        )
    }
}

impl Value {
    /// The value of `key` in an object (the last one, if repeated).
    pub fn get(&self, key: &str) -> Option<&Value> {
        match self {
            Value::Obj(entries) => entries.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The number, if this is one.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Num(n) => n.parse().ok(),
            _ => None,
        }
    }

    /// The number, if this is a whole one that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            Value::Num(n) => n.parse().ok(),
            _ => None,
        }
    }

    /// The number, if this is a whole non-negative one that fits.
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::Num(n) => n.parse().ok(),
            _ => None,
        }
    }

    /// An integer value.
    pub fn int(n: impl Into<i128>) -> Value {
        Value::Num(n.into().to_string())
    }

    /// A short name of the value's type, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Num(_) => "a number",
            Value::Str(_) => "a string",
            Value::Arr(_) => "an array",
            Value::Obj(_) => "an object",
        }
    }

    /// Builds an object from key/value pairs.
    pub fn obj<K: Into<String>>(entries: impl IntoIterator<Item = (K, Value)>) -> Value {
        Value::Obj(entries.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    /// A string value.
    pub fn str(s: impl Into<String>) -> Value {
        Value::Str(s.into())
    }

    /// Compact text: `{"hash":"…"}`.
    pub fn to_compact(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, None, 0);
        out
    }

    /// Appends the compact text to `out`.
    pub fn write_compact(&self, out: &mut String) {
        self.write(out, None, 0);
    }

    /// Pretty text with two-space indentation and a final newline, for files
    /// people keep editing by hand.
    pub fn to_pretty(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, Some(2), 0);
        out.push('\n');
        out
    }

    fn write(&self, out: &mut String, indent: Option<usize>, depth: usize) {
        let newline = |out: &mut String, depth: usize| {
            if let Some(step) = indent {
                out.push('\n');
                out.extend(std::iter::repeat_n(' ', step * depth));
            }
        };
        match self {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Num(n) => out.push_str(n),
            Value::Str(s) => write_str(out, s),
            Value::Arr(items) if items.is_empty() => out.push_str("[]"),
            Value::Obj(entries) if entries.is_empty() => out.push_str("{}"),
            Value::Arr(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline(out, depth + 1);
                    item.write(out, indent, depth + 1);
                }
                newline(out, depth);
                out.push(']');
            }
            Value::Obj(entries) => {
                out.push('{');
                for (i, (key, value)) in entries.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    newline(out, depth + 1);
                    write_str(out, key);
                    out.push_str(if indent.is_some() { ": " } else { ":" });
                    value.write(out, indent, depth + 1);
                }
                newline(out, depth);
                out.push('}');
            }
        }
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Parses one JSON document; anything after it but whitespace is an error.
pub fn parse(text: &str) -> Result<Value, SyntaxError> {
    // nanoserde's tokenizer takes NUL for the end of input: refuse it
    // outright, or anything after it would be silently ignored.
    if let Some(at) = text.find('\0') {
        let line = text[..at].matches('\n').count() + 1;
        let column = text[..at]
            .rsplit('\n')
            .next()
            .map_or(0, |l| l.chars().count())
            + 1;
        return Err(SyntaxError {
            line,
            column,
            msg: "NUL byte".into(),
        });
    }
    let mut p = Parser {
        s: DeJsonState::default(),
        chars: text.chars(),
        pos: (1, 1),
    };
    p.s.next(&mut p.chars);
    p.advance()?;
    let value = p.value(0)?;
    if p.s.tok != DeJsonTok::Eof {
        return Err(p.error("unexpected text after the end of the document"));
    }
    Ok(value)
}

/// nanoserde's tokenizer plus the position where the current token starts
/// (the tokenizer itself only knows where the next one would).
struct Parser<'a> {
    s: DeJsonState,
    chars: Chars<'a>,
    pos: (usize, usize),
}

impl Parser<'_> {
    fn value(&mut self, depth: usize) -> Result<Value, SyntaxError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        let value = match self.s.tok {
            DeJsonTok::Null => Value::Null,
            DeJsonTok::Bool(b) => Value::Bool(b),
            DeJsonTok::U64(_) | DeJsonTok::I64(_) | DeJsonTok::F64(_) => {
                Value::Num(std::mem::take(&mut self.s.numbuf))
            }
            DeJsonTok::Str => Value::Str(std::mem::take(&mut self.s.strbuf)),
            DeJsonTok::BlockOpen => {
                let mut items = Vec::new();
                self.advance()?;
                while self.s.tok != DeJsonTok::BlockClose {
                    items.push(self.value(depth + 1)?);
                    match self.s.tok {
                        DeJsonTok::Comma => self.comma(&DeJsonTok::BlockClose, ']')?,
                        DeJsonTok::BlockClose => {}
                        _ => return Err(self.error("expected ',' or ']'")),
                    }
                }
                Value::Arr(items)
            }
            DeJsonTok::CurlyOpen => {
                let mut entries = Vec::new();
                self.advance()?;
                while self.s.tok != DeJsonTok::CurlyClose {
                    if self.s.tok != DeJsonTok::Str {
                        return Err(self.error("expected a quoted key or '}'"));
                    }
                    let key = std::mem::take(&mut self.s.strbuf);
                    self.advance()?;
                    if self.s.tok != DeJsonTok::Colon {
                        return Err(self.error(&format!("expected ':' after key \"{key}\"")));
                    }
                    self.advance()?;
                    entries.push((key, self.value(depth + 1)?));
                    match self.s.tok {
                        DeJsonTok::Comma => self.comma(&DeJsonTok::CurlyClose, '}')?,
                        DeJsonTok::CurlyClose => {}
                        _ => return Err(self.error("expected ',' or '}'")),
                    }
                }
                Value::Obj(entries)
            }
            DeJsonTok::Eof => return Err(self.error("unexpected end of the document")),
            _ => return Err(self.error("expected a value")),
        };
        self.advance()?;
        Ok(value)
    }

    /// Steps over a ',' — which must not be the last one before `close`
    /// (JSON has no trailing commas; the error points at the comma).
    fn comma(&mut self, close: &DeJsonTok, shown: char) -> Result<(), SyntaxError> {
        let at = self.pos;
        self.advance()?;
        if self.s.tok == *close {
            return Err(SyntaxError {
                line: at.0,
                column: at.1,
                msg: format!("trailing comma before '{shown}' (JSON allows none)"),
            });
        }
        Ok(())
    }

    fn advance(&mut self) -> Result<(), SyntaxError> {
        while matches!(self.s.cur, ' ' | '\t' | '\r' | '\n') {
            self.s.next(&mut self.chars);
        }
        if self.s.cur == '/' {
            // The tokenizer would skip comments; JSON has none, and the
            // manifest's rewrite would silently drop them.
            return Err(SyntaxError {
                line: self.s.line + 1,
                column: self.s.col.max(1),
                msg: "comments are not allowed in JSON".into(),
            });
        }
        // At the end of input the tokenizer stops counting: the end is one past.
        let col = if self.s.cur == '\0' {
            self.s.col + 1
        } else {
            self.s.col.max(1)
        };
        self.pos = (self.s.line + 1, col);
        self.s.next_tok(&mut self.chars).map_err(|e| {
            let msg = match e.msg {
                DeJsonErrReason::CannotParse(what) => format!("invalid {what}"),
                _ => "invalid character".to_string(),
            };
            SyntaxError {
                line: self.pos.0,
                column: self.pos.1,
                msg,
            }
        })
    }

    fn error(&self, msg: &str) -> SyntaxError {
        SyntaxError {
            line: self.pos.0,
            column: self.pos.1,
            msg: msg.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected_compact: &str) {
        let v = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(v.to_compact(), expected_compact);
        assert_eq!(
            parse(&v.to_pretty()).unwrap(),
            v,
            "pretty output parses back"
        );
    }

    fn check_err(text: &str, line: usize, column: usize, msg_part: &str) {
        let e = parse(text).expect_err(text);
        assert_eq!((e.line, e.column), (line, column), "{text}: {e}");
        assert!(e.msg.contains(msg_part), "{text}: {e}");
    }

    #[test]
    fn round_trips() {
        check(
            r#"{"a": [1, -2, 3.5, true, null], "b": {}}"#,
            r#"{"a":[1,-2,3.5,true,null],"b":{}}"#,
        );
        check(
            r#" "tab\there \"q\" \u00e9 \u0001" "#,
            r#""tab\there \"q\" é \u0001""#,
        );
        check("[]", "[]");
        check(r#"{"k":1,"k":2}"#, r#"{"k":1,"k":2}"#);
    }

    #[test]
    fn pretty_is_indented() {
        let v = parse(r#"{"node":{"name":"a"},"binaries":[]}"#).unwrap();
        assert_eq!(
            v.to_pretty(),
            "{\n  \"node\": {\n    \"name\": \"a\"\n  },\n  \"binaries\": []\n}\n"
        );
    }

    #[test]
    fn errors_have_positions() {
        check_err("{\n  \"a\": 1,\n  \"b\" 2\n}", 3, 7, "expected ':'");
        check_err("{\"a\": 1", 1, 8, "expected ',' or '}'");
        check_err("[1, 2] x", 1, 8, "invalid character");
        check_err("[1, 2] 3", 1, 8, "after the end");
        check_err("", 1, 1, "end of the document");
        check_err("{\"a\": tru}", 1, 7, "invalid character");
        check_err("{\"binaries\":[]}\0 trailing", 1, 16, "NUL byte");
        check_err("[1, 2,]", 1, 6, "trailing comma before ']'");
        check_err(
            "{\n  \"a\": 1,\n  \"b\": 2,\n}",
            3,
            9,
            "trailing comma before '}'",
        );
        check_err(
            "{\n  // note\n  \"a\": 1}",
            2,
            3,
            "comments are not allowed",
        );
    }

    #[test]
    fn deep_nesting_is_refused() {
        let text = "[".repeat(100_000);
        assert!(parse(&text).unwrap_err().msg.contains("nested too deeply"));
    }

    #[test]
    fn lookups() {
        let v = parse(r#"{"code":200,"data":{"hash":"ab"}}"#).unwrap();
        assert_eq!(v.get("code").and_then(Value::as_f64), Some(200.0));
        assert_eq!(v.get("code").and_then(Value::as_i64), Some(200));
        let big = parse(r#"{"ino":18446744073709551615}"#).unwrap();
        assert_eq!(big.get("ino").and_then(Value::as_u64), Some(u64::MAX));
        assert_eq!(big.to_compact(), r#"{"ino":18446744073709551615}"#);
        assert_eq!(
            v.get("data")
                .and_then(|d| d.get("hash"))
                .and_then(Value::as_str),
            Some("ab")
        );
        assert_eq!(v.get("missing"), None);
    }
}
