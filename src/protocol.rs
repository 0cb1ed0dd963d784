//! The wire protocol of the seed document, shared by the agent and the
//! server: the `{"code","message","data"}` envelope, the `bins/NAME` answer,
//! the keepalive registration body and the hash report. Agents are liberal in
//! what they accept (extra fields, a missing envelope, code 200 or 0 for
//! success) and exact in what they send (RFC 3339 `lastSeen`, `binaries` as
//! a list of `{name, version, hash}` objects).

use crate::error::{Error, Result};
use crate::hash;
use crate::json::{self, Value};

/// What `GET bins/NAME` says about the published build.
#[derive(Clone, Debug, PartialEq)]
pub struct BinInfo {
    /// The version label the server gives (informational).
    pub version: String,
    /// md5 of the published file, lowercase hex.
    pub hash: String,
    /// sha256 of the published file, when the server offers it (lowercase hex).
    pub sha256: Option<String>,
    /// Size in bytes, when the server offers it.
    pub size: Option<u64>,
    /// The build's signature document (`signature`), when the server has one.
    pub signature: Option<String>,
    /// Key rotation statements the server passes on (`keyStatements`).
    pub key_statements: Vec<String>,
}

/// One entry of the registration's `binaries` list.
#[derive(Clone, Debug, PartialEq)]
pub struct BinaryFact {
    /// Binary name.
    pub name: String,
    /// Version as in the manifest ("latest" when unpinned).
    pub version: String,
    /// md5 this node now runs ("" when not installed).
    pub hash: String,
}

/// A failed upgrade, reported in the keepalive body (an extension field that
/// a seed-only server ignores).
#[derive(Clone, Debug, PartialEq)]
pub struct FailureFact {
    /// Binary name.
    pub name: String,
    /// The hash that failed to install or to run.
    pub hash: String,
    /// What went wrong, one line.
    pub error: String,
    /// When, RFC 3339 UTC.
    pub at: String,
}

/// The `POST keepalive` body.
#[derive(Clone, Debug, PartialEq)]
pub struct Registration {
    /// Node name.
    pub name: String,
    /// `uname -m`.
    pub cpu_arch: String,
    /// `/etc/os-release` PRETTY_NAME.
    pub os_release: String,
    /// The agent's own version.
    pub proxy_version: String,
    /// What this node runs.
    pub binaries: Vec<BinaryFact>,
    /// Now, RFC 3339 UTC.
    pub last_seen: String,
    /// Failures of this run (omitted when empty).
    pub failures: Vec<FailureFact>,
    /// The node's labels (omitted when empty).
    pub labels: Vec<(String, String)>,
}

impl BinaryFact {
    /// `{"name","version","hash"}`.
    pub fn to_json(&self) -> Value {
        Value::obj([
            ("name", Value::str(&self.name)),
            ("version", Value::str(&self.version)),
            ("hash", Value::str(&self.hash)),
        ])
    }
}

impl FailureFact {
    /// `{"name","hash","error","at"}`.
    pub fn to_json(&self) -> Value {
        Value::obj([
            ("name", Value::str(&self.name)),
            ("hash", Value::str(&self.hash)),
            ("error", Value::str(&self.error)),
            ("at", Value::str(&self.at)),
        ])
    }
}

impl Registration {
    /// The JSON body.
    pub fn to_json(&self) -> String {
        let bins = self.binaries.iter().map(BinaryFact::to_json);
        let mut top = vec![
            ("name", Value::str(&self.name)),
            ("cpuArch", Value::str(&self.cpu_arch)),
            ("osRelease", Value::str(&self.os_release)),
            ("proxyVersion", Value::str(&self.proxy_version)),
            ("binaries", Value::Arr(bins.collect())),
            ("lastSeen", Value::str(&self.last_seen)),
        ];
        if !self.failures.is_empty() {
            let failures = self.failures.iter().map(FailureFact::to_json);
            top.push(("failures", Value::Arr(failures.collect())));
        }
        if !self.labels.is_empty() {
            let labels = self.labels.iter().map(|(k, v)| (k.clone(), Value::str(v)));
            top.push(("labels", Value::Obj(labels.collect())));
        }
        Value::obj(top).to_compact()
    }
}

/// The `POST bins/NAME` body: `{"hash":"…"}`.
pub fn hash_report(md5: &str) -> String {
    Value::obj([("hash", Value::str(md5))]).to_compact()
}

/// An envelope as the server writes it: `{"code":…,"message":…,"data":…}`,
/// with `code` 200 and message "Success" for success (the seed's form) and
/// `code` = the HTTP status for errors.
pub fn envelope(code: u16, message: &str, data: Value) -> String {
    envelope_with(code, message, |out| data.write_compact(out))
}

/// The same envelope with `data` appended as compact JSON text by
/// `write_data`, for answers too large to build as a [`Value`] first.
pub fn envelope_with(code: u16, message: &str, write_data: impl FnOnce(&mut String)) -> String {
    let mut out = format!("{{\"code\":{code},\"message\":");
    Value::str(message).write_compact(&mut out);
    out.push_str(",\"data\":");
    write_data(&mut out);
    out.push('}');
    out
}

/// Interprets an answer: an HTTP status outside 2xx, or an envelope `code`
/// other than 200 or 0, is an error carrying the server's message. Returns
/// the `data` of an envelope, or the whole document when there is none.
pub fn unwrap_answer(url: &str, status: i32, reason: &str, body: &[u8]) -> Result<Value> {
    let text = String::from_utf8_lossy(body);
    let doc = if text.trim().is_empty() {
        Ok(Value::Null)
    } else {
        json::parse(&text)
    };
    if !(200..300).contains(&status) {
        let message = match &doc {
            Ok(v) => v.get("message").and_then(Value::as_str).map(quoted),
            Err(_) => None,
        };
        let message = message.unwrap_or_else(|| match text.trim() {
            "" => reason.to_string(),
            t => one_line(t, 200),
        });
        return Err(Error::Server {
            url: url.to_string(),
            status,
            message,
        });
    }
    let doc = doc.map_err(|e| Error::Protocol {
        url: url.to_string(),
        msg: format!("invalid JSON at {e}"),
    })?;
    if doc.get("code").is_none() && doc.get("data").is_none() {
        return Ok(doc); // no envelope: the object is the data
    }
    if let Some(code) = doc.get("code") {
        let ok = matches!(code.as_f64(), Some(c) if c == 200.0 || c == 0.0); // 200, 0, 200.0 (numbers only)
        if !ok {
            let message = doc
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| "no message".to_string(), quoted);
            return Err(Error::Server {
                url: url.to_string(),
                status,
                message: format!("code {}: {message}", code.to_compact()),
            });
        }
    }
    Ok(doc.get("data").cloned().unwrap_or(Value::Null))
}

/// A server's message as it is quoted in errors: capped (the log escapes
/// what it holds).
fn quoted(message: &str) -> String {
    crate::log::clip(message, 300).into_owned()
}

/// Reads the `bins/NAME` data object.
pub fn bin_info(url: &str, data: &Value) -> Result<BinInfo> {
    let bad = |msg: String| Error::Protocol {
        url: url.to_string(),
        msg,
    };
    let hash = match data.get("hash") {
        Some(Value::Str(h)) if hash::is_md5(h) => h.to_ascii_lowercase(),
        Some(Value::Str(h)) if h.is_empty() => {
            return Err(bad("the server publishes no build (empty hash)".into()))
        }
        Some(Value::Str(h)) => {
            return Err(bad(format!(
                "\"hash\" is not an md5: \"{}\"",
                one_line(h, 80)
            )))
        }
        Some(v) => return Err(bad(format!("\"hash\" must be a string, not {}", v.kind()))),
        None if matches!(data, Value::Null) => return Err(bad("no \"data\" in the answer".into())),
        None => return Err(bad("no \"hash\" in the answer".into())),
    };
    let sha256 = match data.get("sha256") {
        None | Some(Value::Null) => None,
        Some(Value::Str(s)) if s.is_empty() => None,
        Some(Value::Str(s)) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Some(s.to_ascii_lowercase())
        }
        Some(_) => return Err(bad("\"sha256\" is not 64 hex digits".into())),
    };
    let version = data
        .get("version")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let size = data.get("size").and_then(Value::as_u64);
    let signature = data
        .get("signature")
        .and_then(Value::as_str)
        .map(str::to_string);
    let key_statements = match data.get("keyStatements") {
        Some(Value::Arr(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    };
    Ok(BinInfo {
        version,
        hash,
        sha256,
        size,
        signature,
        key_statements,
    })
}

/// `s` cut to `max` characters on one line, for quoting server text in errors.
/// What is wrong with a URL the agent would talk to, if anything: it must
/// be `http://` or `https://` (and `https://` needs the TLS build).
pub fn url_problem(url: &str) -> Option<&'static str> {
    if url.starts_with("https://") && !cfg!(feature = "tls") {
        Some("is https://, but this bin-proxy was built without TLS (use the TLS build, or an http:// URL)")
    } else if url.starts_with("http://") || url.starts_with("https://") {
        None
    } else {
        Some("must start with http:// or https://")
    }
}

pub fn one_line(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    if s.chars().count() > max {
        out.push('…');
    }
    out
}

/// Percent-encodes a path segment or query value (everything but RFC 3986
/// unreserved characters).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "9e107d9d372bb6826bd81d3542a419d6";

    fn answer(status: i32, body: &str) -> Result<Value> {
        unwrap_answer("http://m/api/v1/bins/a", status, "Reason", body.as_bytes())
    }

    /// Expected: (hash, sha256, version, size) or an error fragment.
    type Want<'a> = Result<(&'a str, Option<&'a str>, &'a str, Option<u64>), &'a str>;

    fn check_info(body: &str, expected: Want) {
        let got = answer(200, body).and_then(|d| bin_info("u", &d));
        match (got, expected) {
            (Ok(info), Ok((hash, sha, version, size))) => {
                assert_eq!(info.hash, hash, "{body}");
                assert_eq!(info.sha256.as_deref(), sha, "{body}");
                assert_eq!(info.version, version, "{body}");
                assert_eq!(info.size, size, "{body}");
            }
            (Err(e), Err(msg)) => assert!(e.to_string().contains(msg), "{body}: {e}"),
            (got, want) => panic!("{body}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn both_success_styles_and_no_envelope() {
        check_info(
            &format!(
                r#"{{"code":200,"message":"Success","data":{{"name":"a","version":"latest","hash":"{H}"}}}}"#
            ),
            Ok((H, None, "latest", None)),
        );
        check_info(
            &format!(
                r#"{{"code":0,"message":"success","data":{{"hash":"{}"}}}}"#,
                H.to_uppercase()
            ),
            Ok((H, None, "", None)),
        );
        check_info(
            &format!(r#"{{"name":"a","hash":"{H}","extra":[1,2]}}"#),
            Ok((H, None, "", None)),
        );
        let sha = "a".repeat(64);
        check_info(
            &format!(r#"{{"data":{{"hash":"{H}","sha256":"{sha}","size":12,"version":"v2"}}}}"#),
            Ok((H, Some(&sha), "v2", Some(12))),
        );
        // Upper-case sha256 is accepted and lowered; an empty one is "none".
        check_info(
            &format!(
                r#"{{"data":{{"hash":"{H}","sha256":"{}"}}}}"#,
                sha.to_uppercase()
            ),
            Ok((H, Some(&sha), "", None)),
        );
        check_info(
            &format!(r#"{{"data":{{"hash":"{H}","sha256":""}}}}"#),
            Ok((H, None, "", None)),
        );
        check_info(
            &format!(r#"{{"data":{{"hash":"{H}","sha256":null}}}}"#),
            Ok((H, None, "", None)),
        );
    }

    #[test]
    fn errors_carry_the_servers_message() {
        check_info(
            r#"{"code":1,"message":"binary not found","data":null}"#,
            Err("server answered 200: code 1: binary not found"),
        );
        check_info(r#"{"code":500,"message":"boom"}"#, Err("code 500: boom"));
        check_info(
            r#"{"code":200,"data":{"hash": "#,
            Err("unexpected answer: invalid JSON at line 1"),
        );
        check_info(
            r#"{"code":200,"data":{"hash":"../../etc"}}"#,
            Err("\"hash\" is not an md5"),
        );
        check_info(r#"{"code":200,"data":null}"#, Err("no \"data\""));
        check_info(r#"{"code":200,"data":{"name":"a"}}"#, Err("no \"hash\""));
        check_info(
            r#"{"code":200,"data":{"hash":7}}"#,
            Err("\"hash\" must be a string"),
        );
        // Not a sha256: too short, too long, not hex, not a string.
        for bad in [
            format!("\"{}\"", "a".repeat(63)),
            format!("\"{}\"", "a".repeat(65)),
            format!("\"{}g\"", "a".repeat(63)),
            "64".to_string(),
        ] {
            check_info(
                &format!(r#"{{"data":{{"hash":"{H}","sha256":{bad}}}}}"#),
                Err("\"sha256\" is not 64 hex digits"),
            );
        }
        check_info(
            r#"{"code":200,"data":{"hash":""}}"#,
            Err("publishes no build"),
        );
        let e = answer(404, r#"{"code":404,"message":"binary not found"}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "http://m/api/v1/bins/a: server answered 404: binary not found"
        );
        let e = answer(502, "<html>bad gateway</html>").unwrap_err();
        assert!(
            e.to_string()
                .ends_with("server answered 502: <html>bad gateway</html>"),
            "{e}"
        );
        let e = answer(500, "").unwrap_err();
        assert!(
            e.to_string().ends_with("server answered 500: Reason"),
            "{e}"
        );
    }

    #[test]
    fn registration_body_is_what_the_original_server_binds() {
        let r = Registration {
            name: "web-01".into(),
            cpu_arch: "x86_64".into(),
            os_release: "Debian \"12\"".into(),
            proxy_version: "1.0.0".into(),
            binaries: vec![BinaryFact {
                name: "a".into(),
                version: "latest".into(),
                hash: H.into(),
            }],
            last_seen: "2026-11-24T08:00:01Z".into(),
            failures: vec![],
            labels: vec![],
        };
        assert_eq!(
            r.to_json(),
            format!(
                r#"{{"name":"web-01","cpuArch":"x86_64","osRelease":"Debian \"12\"","proxyVersion":"1.0.0","binaries":[{{"name":"a","version":"latest","hash":"{H}"}}],"lastSeen":"2026-11-24T08:00:01Z"}}"#
            )
        );
        assert_eq!(hash_report(H), format!(r#"{{"hash":"{H}"}}"#));
    }

    #[test]
    fn encoding() {
        assert_eq!(encode("my app/../x"), "my%20app%2F..%2Fx");
        assert_eq!(encode("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(encode("é+"), "%C3%A9%2B");
    }

    #[test]
    fn registration_carries_failures_and_labels_when_there_are_some() {
        let r = Registration {
            name: "n".into(),
            cpu_arch: "aarch64".into(),
            os_release: "".into(),
            proxy_version: "1.0.0".into(),
            binaries: vec![],
            last_seen: "2026-11-24T08:00:01Z".into(),
            failures: vec![FailureFact {
                name: "a".into(),
                hash: H.into(),
                error: "exit 1".into(),
                at: "2026-11-24T08:00:00Z".into(),
            }],
            labels: vec![("zone".into(), "eu".into())],
        };
        assert_eq!(
            r.to_json(),
            format!(
                r#"{{"name":"n","cpuArch":"aarch64","osRelease":"","proxyVersion":"1.0.0","binaries":[],"lastSeen":"2026-11-24T08:00:01Z","failures":[{{"name":"a","hash":"{H}","error":"exit 1","at":"2026-11-24T08:00:00Z"}}],"labels":{{"zone":"eu"}}}}"#
            )
        );
    }

    #[test]
    fn signature_and_key_statements_are_passed_on() {
        let body = format!(
            r#"{{"data":{{"hash":"{H}","signature":"sig doc","keyStatements":["k1",7,"k2"]}}}}"#
        );
        let info = bin_info("u", &answer(200, &body).unwrap()).unwrap();
        assert_eq!(info.signature.as_deref(), Some("sig doc"));
        assert_eq!(info.key_statements, ["k1", "k2"], "non-strings are skipped");
        let plain = bin_info("u", &answer(200, &format!(r#"{{"hash":"{H}"}}"#)).unwrap()).unwrap();
        assert_eq!((plain.signature, plain.key_statements), (None, vec![]));
    }

    #[test]
    fn envelopes_are_the_seeds_form() {
        assert_eq!(
            envelope(200, "Success", Value::obj([("hash", Value::str(H))])),
            format!(r#"{{"code":200,"message":"Success","data":{{"hash":"{H}"}}}}"#)
        );
        assert_eq!(
            envelope(404, "no \"x\"", Value::Null),
            r#"{"code":404,"message":"no \"x\"","data":null}"#
        );
    }

    #[test]
    fn urls_must_be_http_or_https() {
        assert_eq!(url_problem("http://m/api"), None);
        let https = url_problem("https://m/api");
        if cfg!(feature = "tls") {
            assert_eq!(https, None);
        } else {
            assert!(https.unwrap().contains("built without TLS"), "{https:?}");
        }
        for bad in ["ftp://m", "m/api", "", "HTTP//m"] {
            assert_eq!(
                url_problem(bad),
                Some("must start with http:// or https://"),
                "{bad}"
            );
        }
    }

    #[test]
    fn quoted_text_is_one_capped_line() {
        assert_eq!(one_line("a\nb\tc", 10), "a b c");
        assert_eq!(one_line("abc", 3), "abc", "exactly max: no ellipsis");
        assert_eq!(one_line("abcd", 3), "abc…");
        assert_eq!(one_line("ééé", 2), "éé…", "characters, not bytes");
    }
}
