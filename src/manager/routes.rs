//! bin-manager's answers: the seed's protocol (keepalive, bins, download)
//! with its `{"code","message","data"}` envelope on every JSON answer,
//! errors included, plus publishing (`PUT bins/NAME`), the fleet view
//! (`GET nodes`, in [`super::fleet`]), the admins' node requests and
//! `GET /healthz`. This file dispatches and serves builds; the answers
//! about nodes are in [`super::nodes`]. Names are checked before any file
//! is touched; tokens are compared in constant time.

use super::config::Admission;
use super::http::{Context, Payload, Request, Response};
use super::limits::RateLimit;
use super::registry::{Policy, Registry};
use super::store::{valid_name, Build, Lookup, Store};
use crate::json::{self, Value};
use crate::log;
use crate::protocol;
use std::sync::Mutex;

/// Largest JSON request body.
const MAX_JSON: u64 = 1 << 20;

/// Everything a request may touch.
pub struct App {
    /// binDir.
    pub store: Store,
    /// The node registry.
    pub registry: Registry,
    /// Guards all of /api/v1 when set.
    pub token: Option<String>,
    /// Guards publishing; publishing over HTTP is off without it.
    pub admin_token: Option<String>,
    /// Largest upload accepted.
    pub max_upload: u64,
    /// How registrations are judged (tokens, admission, size).
    pub policy: Policy,
    /// Who is served.
    pub admission: Admission,
    /// New registrations per client address.
    pub rate: Mutex<RateLimit>,
}

/// The seed's success envelope.
pub(super) fn ok(data: Value) -> Response {
    Response::json(200, protocol::envelope(200, "Success", data))
}

/// An error in the same envelope, `code` = HTTP status.
pub(super) fn fail(status: u16, message: &str) -> Response {
    Response::error(status, message)
}

impl App {
    /// Answers one request. On an event loop ([`Context::EventLoop`]) only
    /// what cannot block is answered — heartbeats, and build lookups whose
    /// hashes are cached, which is what a fleet sends all day — and `None`
    /// hands the rest to a worker.
    pub fn handle(&self, req: &mut Request, ctx: Context) -> Option<Response> {
        let on_loop = ctx == Context::EventLoop;
        if req.path == "/healthz" {
            return Some(match req.method.as_str() {
                "GET" | "HEAD" => Response::text(200, "ok"),
                _ => fail(405, "use GET"),
            });
        }
        let Some(rest) = req.path.strip_prefix("/api/v1/") else {
            return Some(fail(404, "not found"));
        };
        if let Some(token) = &self.token {
            let given = bearer(req);
            let admin = self
                .admin_token
                .as_deref()
                .is_some_and(|a| same_secret(given, a));
            if !same_secret(given, token) && !admin {
                return Some(fail(401, "missing or wrong bearer token"));
            }
        }
        let (route, name) = match rest.split_once('/') {
            Some((route, name)) => (route, Some(name)),
            None => (rest, None),
        };
        // `nodes/NAME/ACTION` (admin): the one route with two segments.
        if let (true, Some((node, action))) =
            (route == "nodes", name.and_then(|n| n.split_once('/')))
        {
            if on_loop {
                return None;
            }
            return Some(
                match (
                    percent_decode(node).filter(|n| valid_name(n)),
                    req.method.as_str(),
                ) {
                    (None, _) => fail(400, "invalid node name"),
                    (Some(node), "POST") => self.admin_node(req, &node, action),
                    (Some(_), _) => fail(405, "use POST"),
                },
            );
        }
        let name =
            match name.map(|n| percent_decode(n).filter(|n| valid_name(n))) {
                None => None,
                Some(Some(n)) => Some(n),
                Some(None) => return Some(fail(
                    400,
                    "invalid name: use letters, digits, '.', '_' and '-', not starting with '.'",
                )),
            };
        let query = match Query::parse(&req.query) {
            Ok(q) => q,
            Err(resp) => return Some(resp),
        };
        if matches!(
            (route, req.method.as_str()),
            ("bins", "GET") | ("download", "GET" | "HEAD")
        ) {
            if let Some(refusal) = self.refuse_unadmitted(req, &query) {
                return Some(refusal);
            }
        }
        Some(match (route, name, req.method.as_str()) {
            ("keepalive", None, "GET") => self.keepalive_get(req, &query),
            ("bins", Some(name), "GET") => return self.bin_info(&name, &query, on_loop),
            _ if on_loop => return None,
            ("keepalive", None, "POST") => self.keepalive_post(req, &query),
            ("bins", None, "GET") => self.list(),
            ("bins", Some(name), "POST") => self.report(req, &name, &query),
            ("bins", Some(name), "PUT") => self.publish(req, &name, &query),
            ("download", Some(name), "GET" | "HEAD") => self.download(req, &name, &query),
            ("nodes", None, "GET") => self.nodes(),
            ("keepalive" | "bins" | "download" | "nodes", _, _) => {
                fail(405, "method not allowed here")
            }
            _ => fail(404, "not found"),
        })
    }

    fn find(&self, name: &str, q: &Query) -> Result<Build, Response> {
        match self
            .store
            .get(name, q.arch.as_deref(), q.version.as_deref())
        {
            Ok(Some(build)) => Ok(build),
            Ok(None) => Err(fail(404, "binary not found")),
            Err(e) => Err(fail(500, &e.to_string())),
        }
    }

    /// A build's hashes; `None` when it would have to be hashed first and
    /// `on_loop` forbids that.
    fn bin_info(&self, name: &str, q: &Query, on_loop: bool) -> Option<Response> {
        let found = self
            .store
            .lookup(name, q.arch.as_deref(), q.version.as_deref(), !on_loop);
        Some(match found {
            Ok(Lookup::Found(b)) => ok(Value::obj([
                ("name", Value::str(name)),
                ("version", Value::str(&b.version)),
                ("hash", Value::str(&b.md5)),
                ("sha256", Value::str(&b.sha256)),
                ("size", Value::int(b.size)),
            ])),
            Ok(Lookup::Missing) => fail(404, "binary not found"),
            Ok(Lookup::Unhashed) => return None,
            Err(e) => fail(500, &e.to_string()),
        })
    }

    fn list(&self) -> Response {
        let items = self.store.list().into_iter().map(|l| {
            let opt = |v: Option<String>| v.map_or(Value::Null, Value::Str);
            Value::obj([
                ("name", Value::Str(l.name)),
                ("arch", opt(l.arch)),
                ("version", opt(l.version)),
                ("size", Value::int(l.size)),
            ])
        });
        ok(Value::Arr(items.collect()))
    }

    fn publish(&self, req: &mut Request, name: &str, q: &Query) -> Response {
        let Some(admin) = &self.admin_token else {
            return fail(
                403,
                "publishing over HTTP is disabled: configure an adminToken",
            );
        };
        if !same_secret(bearer(req), admin) {
            return fail(401, "publishing needs the admin bearer token");
        }
        if req.body_len > self.max_upload {
            return fail(
                413,
                &format!(
                    "upload larger than the limit of {}",
                    log::size(self.max_upload)
                ),
            );
        }
        let len = req.body_len;
        match self.store.publish(
            name,
            q.arch.as_deref(),
            q.version.as_deref(),
            req.body(),
            len,
        ) {
            Ok((md5, sha256)) => {
                crate::info!(
                    "published {name} ({}, {})",
                    log::size(len),
                    log::short(&md5)
                );
                ok(Value::obj([
                    ("name", Value::str(name)),
                    (
                        "version",
                        Value::str(q.version.as_deref().unwrap_or("latest")),
                    ),
                    ("hash", Value::Str(md5)),
                    ("sha256", Value::Str(sha256)),
                    ("size", Value::int(len)),
                ]))
            }
            Err(e @ crate::error::Error::Upload { .. }) => {
                let timed_out = matches!(&e, crate::error::Error::Upload { source, .. }
                    if source.kind() == std::io::ErrorKind::TimedOut);
                fail(
                    if timed_out { 408 } else { 400 },
                    &format!("nothing published: {e}"),
                )
            }
            Err(e) => fail(500, &format!("publishing failed: {e}")),
        }
    }

    fn download(&self, req: &Request, name: &str, q: &Query) -> Response {
        let build = match self.find(name, q) {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let size = build.size;
        let mut headers = vec![
            ("Content-Type", "application/octet-stream".to_string()),
            ("Accept-Ranges", "bytes".to_string()),
            ("ETag", format!("\"{}\"", build.md5)),
        ];
        let (status, start, len) = match req.header("range").map(|r| parse_range(r, size)) {
            None | Some(Range::Ignore) => (200, 0, size),
            Some(Range::Bytes(start, end)) => {
                headers.push(("Content-Range", format!("bytes {start}-{end}/{size}")));
                (206, start, end - start + 1)
            }
            Some(Range::Unsatisfiable) => {
                let mut resp = fail(416, "range not satisfiable");
                resp.headers
                    .push(("Content-Range", format!("bytes */{size}")));
                return resp;
            }
        };
        Response {
            status,
            headers,
            body: Payload::File {
                file: build.file,
                start,
                len,
            },
        }
    }
}

pub(super) fn json_body(req: &mut Request) -> Result<Value, Response> {
    if req.body_len > MAX_JSON {
        return Err(fail(413, "JSON body larger than 1 MiB"));
    }
    let bytes = req
        .body_bytes(MAX_JSON)
        .map_err(|r| fail(r.status, "could not read the body"))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| fail(400, "body is not UTF-8"))?;
    json::parse(text).map_err(|e| fail(400, &format!("invalid JSON at {e}")))
}

pub(super) fn bearer<'a>(req: &'a Request) -> &'a str {
    req.header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .trim()
}

/// Compares secrets without an early exit that would leak their prefix.
pub(super) fn same_secret(given: &str, want: &str) -> bool {
    let (g, w) = (given.as_bytes(), want.as_bytes());
    let mut diff = g.len() ^ w.len();
    for (i, b) in w.iter().enumerate() {
        diff |= usize::from(g.get(i).copied().unwrap_or(0) ^ b);
    }
    diff == 0 && !want.is_empty()
}

/// The query parameters the protocol knows, validated.
pub(super) struct Query {
    /// `node=`
    pub(super) node: Option<String>,
    /// `arch=`
    pub(super) arch: Option<String>,
    /// `version=`
    pub(super) version: Option<String>,
}

impl Query {
    fn parse(raw: &str) -> Result<Query, Response> {
        let mut q = Query {
            node: None,
            arch: None,
            version: None,
        };
        for pair in raw.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let Some(v) = percent_decode(&v.replace('+', " ")) else {
                return Err(fail(400, "invalid percent-encoding in the query"));
            };
            let slot = match k {
                "node" => &mut q.node,
                "arch" => &mut q.arch,
                "version" => &mut q.version,
                _ => continue,
            };
            if v.is_empty() || (k == "version" && v == "latest") {
                continue;
            }
            if !valid_name(&v) {
                return Err(fail(
                    400,
                    &format!("invalid {k}: use letters, digits, '.', '_' and '-'"),
                ));
            }
            *slot = Some(v);
        }
        Ok(q)
    }
}

/// Decodes `%XX` escapes; `None` for a bad escape, invalid UTF-8 or a NUL.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok().filter(|s| !s.contains('\0'))
}

enum Range {
    Ignore,
    Bytes(u64, u64),
    Unsatisfiable,
}

/// One `bytes=` range (`a-b`, `a-`, `-n`); multiple ranges are ignored
/// (answered with the whole file, as RFC 9110 allows).
fn parse_range(header: &str, size: u64) -> Range {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Range::Ignore;
    };
    if spec.contains(',') {
        return Range::Ignore;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return Range::Ignore;
    };
    let (a, b) = (a.trim(), b.trim());
    let parsed = match (a.is_empty(), b.is_empty()) {
        (false, _) => {
            let Ok(start) = a.parse::<u64>() else {
                return Range::Ignore;
            };
            let end = if b.is_empty() {
                Ok(u64::MAX)
            } else {
                b.parse::<u64>()
            };
            let Ok(end) = end else { return Range::Ignore };
            if end < start {
                return Range::Ignore;
            }
            (start, end.min(size.saturating_sub(1)))
        }
        (true, false) => {
            let Ok(n) = b.parse::<u64>() else {
                return Range::Ignore;
            };
            if n == 0 {
                return Range::Unsatisfiable;
            }
            (size.saturating_sub(n), size.saturating_sub(1))
        }
        (true, true) => return Range::Ignore,
    };
    if parsed.0 >= size {
        return Range::Unsatisfiable;
    }
    Range::Bytes(parsed.0, parsed.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_range(h: &str, size: u64, expected: Option<(u64, u64)>) {
        let got = match parse_range(h, size) {
            Range::Bytes(a, b) => Some((a, b)),
            Range::Ignore => None,
            Range::Unsatisfiable => Some((u64::MAX, u64::MAX)),
        };
        assert_eq!(got, expected, "{h}");
    }

    #[test]
    fn ranges() {
        check_range("bytes=0-9", 100, Some((0, 9)));
        check_range("bytes=90-", 100, Some((90, 99)));
        check_range("bytes=-10", 100, Some((90, 99)));
        check_range("bytes=-1000", 100, Some((0, 99)));
        check_range("bytes=50-5000", 100, Some((50, 99)));
        check_range("bytes=100-", 100, Some((u64::MAX, u64::MAX)));
        check_range("bytes=0-1,5-6", 100, None);
        check_range("items=0-1", 100, None);
        check_range("bytes=9-1", 100, None);
    }

    #[test]
    fn decoding_and_secrets() {
        assert_eq!(percent_decode("my%20app").as_deref(), Some("my app"));
        assert_eq!(percent_decode("%2e%2e").as_deref(), Some(".."));
        assert_eq!(percent_decode("a%00b"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%4"), None);
        assert!(same_secret("s3cret", "s3cret"));
        assert!(!same_secret("s3cre", "s3cret"));
        assert!(!same_secret("s3cretX", "s3cret"));
        assert!(!same_secret("", ""));
    }
}
