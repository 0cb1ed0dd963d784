//! bin-manager's answers: the seed's protocol (keepalive, bins, download)
//! with its `{"code","message","data"}` envelope on every JSON answer,
//! errors included, plus publishing (`PUT bins/NAME`), the fleet view
//! (`GET nodes`, in [`fleet`]), the admins' node requests, `GET /healthz`
//! and the console page at `/`. This file dispatches and serves builds; the
//! answers about nodes are in [`nodes`]. Names are checked before any file
//! is touched; tokens are compared in constant time.

use super::config::Admission;
use super::http::{Context, Payload, Request, Response};
use super::limits::{RateLimit, Shed};
use super::registry::{self, Registry};
mod check;
mod console;
mod fleet;
mod legacy;
mod nodes;
mod rollouts;

use super::release::{Releases, Resolved};
use super::rollout::{Policy, Rollout};
use super::store::{valid_name, Build, Store};
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
    /// Rollouts: who gets which build.
    pub releases: Releases,
    /// How registrations are judged (tokens, admission, size).
    pub policy: registry::Policy,
    /// Who is served.
    pub admission: Admission,
    /// New registrations per client address.
    pub rate: Mutex<RateLimit>,
    /// The server's own load limit (`maxRequestsPerSecond`).
    pub shed: Mutex<Shed>,
    /// One client address's share (`maxRequestsPerClientPerSecond`).
    pub client_rate: Mutex<RateLimit>,
    /// Signed releases: what is required of a publish.
    pub signing: super::signing::Signing,
    /// Key rotation statements (`binDir/.trust`, read at start).
    pub statements: Vec<String>,
}

/// The seed's success envelope.
fn ok(data: Value) -> Response {
    Response::json(200, protocol::envelope(200, "Success", data))
}

/// An error in the same envelope, `code` = HTTP status.
/// Retry-After of a 503 for a write the database did not take.
const DATABASE_RETRY_SECS: u64 = 5;

/// The answer to a write that could not be stored: 503 with Retry-After
/// when the database (`--database`) is down, so agents come back; 500
/// otherwise. Logged either way.
fn not_stored(what: &str, e: &crate::error::Error) -> Response {
    crate::error!("could not store {what}: {e}");
    if matches!(e, crate::error::Error::Database(_)) {
        let mut resp = fail(503, &format!("could not store {what}: {e}; try again"));
        resp.headers
            .push(("Retry-After", DATABASE_RETRY_SECS.to_string()));
        return resp;
    }
    fail(500, &format!("could not store {what}: {e}"))
}

fn fail(status: u16, message: &str) -> Response {
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
        if req.path == "/" {
            return Some(console::page(&req.method));
        }
        let Some(rest) = req.path.strip_prefix("/api/v1/") else {
            return Some(fail(404, "not found"));
        };
        // Each request is charged once: a request without a body is seen on
        // a loop first (and maybe again by a worker), one with a body only
        // by a worker.
        if on_loop || req.body_len > 0 {
            // One client over its share is told first, so it does not use
            // up the tokens of everyone else's bucket.
            let own = self
                .client_rate
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take(super::http::client_of(req.peer), std::time::Instant::now());
            if let Err(wait) = own {
                let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
                let mut resp = fail(
                    429,
                    "too many requests from your address (maxRequestsPerClientPerSecond): retry after the Retry-After delay",
                );
                resp.headers.push(("Retry-After", secs.to_string()));
                return Some(resp);
            }
            let taken = match self.shed.lock() {
                Ok(mut shed) => shed.take(std::time::Instant::now()),
                Err(_) => Ok(()),
            };
            if let Err(secs) = taken {
                let mut resp = fail(503, "server overloaded: retry after the Retry-After delay");
                resp.headers.push(("Retry-After", secs.to_string()));
                return Some(resp);
            }
        }
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
        // `rollouts/NAME/ACTION`: the action travels in the query.
        let (name, action) = match (route, name.and_then(|n| n.split_once('/'))) {
            ("rollouts", Some((n, action))) => (Some(n), Some(action)),
            // The admins' `nodes/NAME/accept` and `nodes/NAME/reset`.
            ("nodes", Some((n, action))) => (Some(n), Some(action)),
            // The original project's agents (routes/legacy.rs).
            ("bins", Some((n, action @ "progress"))) => (Some(n), Some(action)),
            _ => (name, None),
        };
        let name =
            match name.map(|n| percent_decode(n).filter(|n| valid_name(n))) {
                None => None,
                Some(Some(n)) => Some(n),
                Some(None) => return Some(fail(
                    400,
                    "invalid name: use letters, digits, '.', '_' and '-', not starting with '.'",
                )),
            };
        let mut query = match Query::parse(&req.query) {
            Ok(q) => q,
            Err(resp) => return Some(resp),
        };
        query.action = action.map(str::to_string);
        if matches!(
            (route, req.method.as_str()),
            ("bins", "GET") | ("download", "GET" | "HEAD")
        ) {
            if let Some(refusal) = self.refuse_unadmitted(req, &query) {
                return Some(refusal);
            }
        }
        Some(match (route, name, req.method.as_str()) {
            ("bins", Some(name), _) if query.action.is_some() => {
                return self.legacy_progress(req, &name, on_loop)
            }
            ("nodes", Some(_), _) if on_loop && query.action.is_some() => return None,
            ("nodes", Some(name), "POST") if query.action.is_some() => {
                let action = query.action.clone().unwrap_or_default();
                self.admin_node(req, &name, &action)
            }
            ("keepalive", None, "GET") => self.keepalive_get(req, &query),
            ("bins", Some(name), "GET") => return self.bin_info(&name, &query, on_loop),
            _ if on_loop => return None,
            ("keepalive", None, "POST") => self.keepalive_post(req, &query),
            ("check", None, "POST") => self.check(req, &query),
            ("bins", None, "GET") => self.list(),
            ("bins", Some(name), "POST") => self.report(req, &name, &query),
            ("bins", Some(name), "PUT") => self.publish(req, &name, &query),
            ("download", Some(name), "GET" | "HEAD") => self.download(req, &name, &query),
            ("nodes", None, "GET") => self.nodes(&query.pairs),
            ("rollouts", None, "GET") => self.rollouts(),
            ("rollouts", Some(name), "GET") => self.rollout(&name, &query),
            ("rollouts", Some(name), "POST") => self.control(req, &name, &query),
            ("keepalive" | "bins" | "download" | "nodes" | "rollouts" | "check", _, _) => {
                fail(405, "method not allowed here")
            }
            _ => fail(404, "not found"),
        })
    }

    /// The build this request should get (through a rollout when one
    /// runs); `Ok(None)` when that needs a worker and `may_hash` is false.
    fn resolve(
        &self,
        name: &str,
        q: &Query,
        download: bool,
        may_hash: bool,
    ) -> Result<Option<Served>, Response> {
        let found = self.releases.resolve(
            &self.store,
            &self.registry,
            name,
            q.arch.as_deref(),
            q.version.as_deref(),
            q.node.as_deref(),
            download,
            may_hash,
        );
        match found {
            Ok(Resolved::Found(b, r)) => Ok(Some((b, r))),
            Ok(Resolved::Missing) => Err(fail(404, "binary not found")),
            Ok(Resolved::Unhashed) => Ok(None),
            Err(e) => Err(fail(500, &e.to_string())),
        }
    }

    /// A build's hashes; `None` when it would have to be hashed first and
    /// `on_loop` forbids that.
    fn bin_info(&self, name: &str, q: &Query, on_loop: bool) -> Option<Response> {
        Some(match self.bin_data(name, q, !on_loop) {
            Ok(Some((data, sha256))) => legacy::bin_answer(data, &sha256),
            Ok(None) => return None,
            Err(resp) => resp,
        })
    }

    /// `bins/NAME`'s `data` (and the build's sha256): the build this node
    /// gets, with the rollout that chose it. Shared by `GET bins/NAME` and
    /// each entry of `POST check` so that both answer the same.
    fn bin_data(
        &self,
        name: &str,
        q: &Query,
        may_hash: bool,
    ) -> Result<Option<(Value, String)>, Response> {
        let Some((b, r)) = self.resolve(name, q, false, may_hash)? else {
            return Ok(None);
        };
        if let Err(msg) = self.signing.check_served(name, &b) {
            crate::warn!("not serving {name}: {msg}");
            return Err(fail(409, &format!("not served: {msg}")));
        }
        let mut data = vec![
            ("name", Value::str(name)),
            ("version", Value::str(&b.version)),
            ("hash", Value::str(&b.md5)),
            ("sha256", Value::str(&b.sha256)),
            ("size", Value::int(b.size)),
        ];
        if let Some(sig) = &b.signature {
            data.push(("signature", Value::str(sig)));
        }
        if !self.statements.is_empty() {
            data.push((
                "keyStatements",
                Value::Arr(self.statements.iter().map(Value::str).collect()),
            ));
        }
        if let Some(r) = r {
            let build = if crate::hash::same(&b.md5, &r.to.md5) {
                "new"
            } else {
                "previous"
            };
            data.push((
                "rollout",
                Value::obj([
                    ("id", Value::str(&r.id)),
                    ("state", Value::str(r.state.word())),
                    ("percent", Value::int(r.percent())),
                    ("build", Value::str(build)),
                ]),
            ));
        }
        Ok(Some((Value::obj(data), b.sha256)))
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

    /// Admin actions need the admin token, and are off without one.
    fn check_admin(&self, req: &Request, what: &str) -> Result<(), Response> {
        let Some(admin) = &self.admin_token else {
            return Err(fail(
                403,
                &format!("{what} over HTTP is disabled: configure an adminToken"),
            ));
        };
        if !same_secret(bearer(req), admin) {
            return Err(fail(401, &format!("{what} needs the admin bearer token")));
        }
        Ok(())
    }

    fn publish(&self, req: &mut Request, name: &str, q: &Query) -> Response {
        if let Err(resp) = self.check_admin(req, "publishing") {
            return resp;
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
        let policy = match Policy::from_query(&q.pairs) {
            Ok(p) => p,
            Err(msg) => return fail(400, &msg),
        };
        if policy.is_some() && q.version.is_some() {
            return fail(
                400,
                "a pinned version (version=) is not rolled out in steps",
            );
        }
        if policy.is_some() {
            // Record (and keep) the build being replaced: the rollout starts
            // from it and serves it to the rest of the fleet.
            let _ = self.resolve(
                name,
                &Query {
                    node: None,
                    ..q.clone()
                },
                false,
                true,
            );
        }
        // A staged publish records its rollout before any request can see
        // the new file and record it as an ordinary publish.
        let _guard = policy.as_ref().map(|_| self.releases.lock_publishing());
        let header = req.header("x-bin-signature").map(str::to_string);
        if header
            .as_deref()
            .is_some_and(|h| h.len() > crate::sign::MAX_LEN)
        {
            return fail(400, "nothing published: X-Bin-Signature is too long");
        }
        let signing = &self.signing;
        let check = |sha256: &str| {
            signing
                .check(
                    header.as_deref(),
                    name,
                    q.arch.as_deref(),
                    q.version.as_deref(),
                    sha256,
                    len,
                )
                .map(|doc| doc.map(|d| d.to_string()))
                .map_err(|msg| crate::error::Error::Other(format!("signature refused: {msg}")))
        };
        let published = self.store.publish(
            name,
            q.arch.as_deref(),
            q.version.as_deref(),
            req.body(),
            len,
            &check,
        );
        let published = match (published, policy) {
            (Ok(hashes), Some(policy)) => self
                .store
                .lookup(name, q.arch.as_deref(), None, true)
                .and_then(|found| match found {
                    super::store::Lookup::Found(b) => {
                        self.releases
                            .record(&self.store, &self.registry, name, &b, Some(policy))
                    }
                    _ => Err(crate::error::Error::Other(format!(
                        "{name}: the published file vanished"
                    ))),
                })
                .map(|_| hashes),
            (other, _) => other,
        };
        match published {
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
            Err(crate::error::Error::Other(msg)) if msg.starts_with("signature refused") => {
                crate::warn!("{name}: nothing published: {msg}");
                fail(400, &format!("nothing published: {msg}"))
            }
            Err(e) => fail(500, &format!("publishing failed: {e}")),
        }
    }

    fn download(&self, req: &Request, name: &str, q: &Query) -> Response {
        let build = match self.resolve(name, q, true, true) {
            Ok(Some((b, _))) => b,
            Ok(None) => return fail(500, "no answer for this download"),
            Err(resp) => return resp,
        };
        if let Err(msg) = self.signing.check_served(name, &build) {
            return fail(409, &format!("not served: {msg}"));
        }
        let size = build.size;
        let mut headers = vec![
            ("Content-Type", "application/octet-stream".to_string()),
            ("Accept-Ranges", "bytes".to_string()),
            ("ETag", format!("\"{}\"", build.md5)),
        ];
        // If-Range: the range only of this very build (strong comparison;
        // a date or another ETag gets the whole file, RFC 9110 13.1.5).
        let etag = format!("\"{}\"", build.md5);
        let range = req
            .header("range")
            .filter(|_| req.header("if-range").is_none_or(|v| v.trim() == etag));
        let (status, start, len) = match range.map(|r| parse_range(r, size)) {
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

/// A build to serve, and the rollout that chose it.
type Served = (Build, Option<Box<Rollout>>);

fn json_body(req: &mut Request) -> Result<Value, Response> {
    if req.body_len > MAX_JSON {
        return Err(fail(413, "JSON body larger than 1 MiB"));
    }
    let bytes = req
        .body_bytes(MAX_JSON)
        .map_err(|r| fail(r.status, "could not read the body"))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| fail(400, "body is not UTF-8"))?;
    json::parse(text).map_err(|e| fail(400, &format!("invalid JSON at {e}")))
}

fn bearer<'a>(req: &'a Request) -> &'a str {
    req.header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .trim()
}

/// Compares secrets without an early exit that would leak their prefix.
fn same_secret(given: &str, want: &str) -> bool {
    let (g, w) = (given.as_bytes(), want.as_bytes());
    let mut diff = g.len() ^ w.len();
    for (i, b) in w.iter().enumerate() {
        diff |= usize::from(g.get(i).copied().unwrap_or(0) ^ b);
    }
    diff == 0 && !want.is_empty()
}

/// The query parameters the protocol knows, validated.
#[derive(Clone)]
struct Query {
    node: Option<String>,
    arch: Option<String>,
    version: Option<String>,
    /// Every parameter, decoded (a staged publish's policy reads them).
    pairs: Vec<(String, String)>,
    /// `rollouts/NAME/ACTION`'s action.
    action: Option<String>,
}

impl Query {
    fn parse(raw: &str) -> Result<Query, Response> {
        let mut q = Query {
            node: None,
            arch: None,
            version: None,
            pairs: Vec::new(),
            action: None,
        };
        for pair in raw.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let Some(v) = percent_decode(&v.replace('+', " ")) else {
                return Err(fail(400, "invalid percent-encoding in the query"));
            };
            q.pairs.push((k.to_string(), v.clone()));
            let slot = match k {
                "node" => &mut q.node,
                // The original project's agents' name for it; `node` wins.
                "node_id" if q.node.is_none() => &mut q.node,
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
