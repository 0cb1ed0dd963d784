//! Shared fixture for the bin-proxy integration tests (a dev-dependency: `use testkit as common;`).
//!
//! This module owns:
//! - [`Server`]: an in-process HTTP/1.1 imitation of the "bin-manager" server
//!   (`/api/v1/keepalive`, `/api/v1/bins/NAME`, `/api/v1/download/NAME`) bound to
//!   `127.0.0.1:0`, which records every request and misbehaves on demand ([`Fault`]),
//!   answering in either envelope [`Style`];
//! - helpers for tests that run the real `bin-proxy` executable: [`TempDir`],
//!   [`fake_supervisorctl`], [`temp_files`], [`mode`], [`path_with`], [`wait_until`];
//! - a tiny raw-`TcpStream` HTTP client ([`http`], [`HttpResponse`]) used to poke the
//!   server directly;
//! - [`browser`]: a real headless Chromium driven over the DevTools protocol;
//! - [`json`]: a small strict JSON reader ([`json::Json`], [`json::parse`]) for
//!   assertions on the shape of answers, registrations and manifests.
//!
//! Only the standard library and the `md5` crate are used.

pub mod agent;
pub mod browser;
pub mod exporter;
pub mod host;
pub mod json;
pub mod legacy;
pub mod manager;
pub mod supervisor;

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Largest request head (request line + headers) the server accepts.
const MAX_HEAD: usize = 64 * 1024;
/// Largest request body the server accepts.
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Read/write timeout of accepted sockets.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a `Fault::Hang` connection is held at most.
const HANG_LIMIT: Duration = Duration::from_secs(60);
/// How often slow/hanging connection threads look at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------

/// One request as the server received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// Path only, still percent-encoded, without the query.
    pub path: String,
    /// Raw query without the `?`; `""` if none.
    pub query: String,
    /// Header names lowercased, values trimmed, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Request {
    /// First header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// Body as (lossy) UTF-8.
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// First query parameter with this name, percent-decoded (`+` is a space).
    pub fn param(&self, key: &str) -> Option<String> {
        query_param(&self.query, key)
    }

    /// The request target as sent: path, then `?query` if any.
    pub fn target(&self) -> String {
        match self.query.as_str() {
            "" => self.path.clone(),
            q => format!("{}?{q}", self.path),
        }
    }

    /// The path percent-decoded (the raw path if it does not decode).
    pub fn decoded_path(&self) -> String {
        percent_decode(&self.path, false).unwrap_or_else(|| self.path.clone())
    }
}

/// Envelope style of the answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// Success `{"code":200,"message":"Success",...}`, errors `{"code":<status>,"message":...}`.
    Seed,
    /// Success `{"code":0,"message":"success",...}`, errors `{"code":1,"message":...}`.
    Zero,
}

/// The fault "name" that stands for every route (see [`Server::fault`]).
pub const EVERY_ROUTE: &str = "*";

/// Misbehaviour of the `bins/NAME` and/or `download/NAME` routes of one name.
/// Faults apply to GET requests; `POST bins/NAME` is only affected by `ReportStatus` and `Busy`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// `bins/NAME` advertises the md5 of different bytes than `download/NAME` serves.
    WrongHash,
    /// `download/NAME` sends the full `Content-Length` but only the first N bytes, then closes.
    Truncate(usize),
    /// `bins/NAME` and `download/NAME` answer this status with
    /// `{"code":<status>,"message":"injected failure"}`.
    Status(u16),
    /// Only `download/NAME` answers this status (plain-text body `injected failure`).
    DownloadStatus(u16),
    /// `bins/NAME` answers 200 with the malformed body `{"code":200,"data":{"hash": `.
    Garbage,
    /// `bins/NAME` answers HTTP 200 with `{"code":<i64>,"message":<String>,"data":null}`.
    EnvelopeCode(i64, String),
    /// `bins/NAME` answers 200 with a bare `{"name":..,"version":"latest","hash":..,"extra":1}`.
    NoEnvelope,
    /// `download/NAME` sends the headers, then one byte per interval.
    SlowDownload(Duration),
    /// `bins/NAME` and `download/NAME` read the request and never answer (the socket is held
    /// until the server is dropped or 60 s pass).
    Hang,
    /// `download/NAME` answers 302 with `Location:` the same URL, forever.
    RedirectLoop,
    /// `download/NAME` answers 302 with this `Location`.
    Redirect(String),
    /// `bins/NAME` also offers the sha256 of what `download/NAME` serves (as
    /// bin-manager does; the seed's server offers none).
    Sha256,
    /// `bins/NAME` offers the right md5 but the sha256 of different bytes.
    WrongSha256,
    /// Addition: `POST bins/NAME` still records the hash but answers this status with
    /// `{"code":<status>,"message":"injected failure"}`.
    ReportStatus(u16),
    /// Signed releases: `bins/NAME` offers the sha256 and size of what
    /// `download/NAME` serves, this `signature` document (when not empty)
    /// and these `keyStatements`.
    Signed(String, Vec<String>),
    /// Overload: `bins/NAME`, `POST bins/NAME` and `download/NAME` answer this
    /// status with `{"code":<status>,"message":"server busy"}` and this
    /// `Retry-After` header (none for `None`).
    Busy(u16, Option<String>),
    /// The next N `download/NAME` answer `Busy(503, retry_after)`; after
    /// them it serves.
    DownloadBusy(Option<String>, usize),
    /// Like `Signed` (no statements), but `download/NAME` sends no length and
    /// the published bytes followed by endless filler (up to 256 MiB).
    Endless(String),
    /// Resumable downloads, as bin-manager serves them: `download/NAME` sends
    /// `ETag: "<md5>"` and `Accept-Ranges: bytes`, and answers `Range:
    /// bytes=N-` (under a matching `If-Range`, or none) with `206` and
    /// `Content-Range: bytes N-END/LEN`, or `416` past the end.
    Ranges,
    /// Like `Ranges`, but no byte at or past this offset is ever sent: the
    /// answer keeps its full `Content-Length` and the connection closes there.
    CutAt(usize),
    /// Sends the `ETag` and `Accept-Ranges` but ignores `Range`: always `200`
    /// with the whole file.
    IgnoreRange,
    /// Like `Ranges`, but a `Range` request gets a `206` of the bytes from this
    /// offset (whatever was asked for), with their honest `Content-Range`.
    RangeFrom(usize),
    /// Like `Ranges`, but a `Range` request gets `416` with `Content-Range: bytes */LEN`.
    RangeUnsatisfiable,
    /// Like `Ranges`, but the body goes out 16 KiB per interval.
    Trickle(Duration),
}

#[derive(Debug)]
struct State {
    style: Style,
    published: HashMap<String, Vec<u8>>,
    faults: HashMap<String, Fault>,
    nodes: HashMap<String, String>,
    reported: HashMap<String, Vec<String>>,
    requests: Vec<Request>,
    /// Handed out in the answer to every `POST keepalive` (`data.nodeToken`).
    node_token: Option<String>,
}

#[derive(Clone)]
struct Ctx {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    /// `http://127.0.0.1:PORT`
    base: String,
}

/// The fake bin-manager. Stops its accept loop when dropped; hanging and slow
/// connections notice within 50 ms and close.
pub struct Server {
    addr: SocketAddr,
    ctx: Ctx,
    accept: Option<JoinHandle<()>>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // A panicking test thread must not poison the fixture for everyone else.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Server {
    /// Binds `127.0.0.1:0` and starts the accept thread.
    pub fn start() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake bin-manager");
        let addr = listener.local_addr().expect("local_addr");
        let ctx = Ctx {
            state: Arc::new(Mutex::new(State {
                style: Style::Seed,
                published: HashMap::new(),
                faults: HashMap::new(),
                nodes: HashMap::new(),
                reported: HashMap::new(),
                requests: Vec::new(),
                node_token: None,
            })),
            stop: Arc::new(AtomicBool::new(false)),
            base: format!("http://{}", addr),
        };
        let accept_ctx = ctx.clone();
        let accept = thread::Builder::new()
            .name("fake-bin-manager-accept".into())
            .spawn(move || accept_loop(listener, accept_ctx))
            .expect("spawn accept thread");
        Server {
            addr,
            ctx,
            accept: Some(accept),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.ctx.state)
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        self.ctx.base.clone()
    }

    /// `url() + "/api/v1"`
    pub fn api(&self) -> String {
        format!("{}/api/v1", self.ctx.base)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn set_style(&self, s: Style) {
        self.state().style = s;
    }

    pub fn style(&self) -> Style {
        self.state().style
    }

    /// Replaces what `bins/NAME` and `download/NAME` serve.
    pub fn publish(&self, name: &str, bytes: &[u8]) {
        self.state()
            .published
            .insert(name.to_string(), bytes.to_vec());
    }

    pub fn unpublish(&self, name: &str) {
        self.state().published.remove(name);
    }

    /// md5 hex of what is published under `name`, if anything.
    pub fn published_hash(&self, name: &str) -> Option<String> {
        self.state().published.get(name).map(|b| md5_hex(b))
    }

    /// Sets the fault of `name` (`Fault::None` clears it). The name
    /// [`EVERY_ROUTE`] with `Fault::Status` makes every request, keepalive and
    /// check included, answer that status.
    pub fn fault(&self, name: &str, f: Fault) {
        assert!(
            name != EVERY_ROUTE || matches!(f, Fault::None | Fault::Status(_)),
            "fault {EVERY_ROUTE:?} takes only Fault::Status, not {f:?}"
        );
        let mut st = self.state();
        if f == Fault::None {
            st.faults.remove(name);
        } else {
            st.faults.insert(name.to_string(), f);
        }
    }

    /// Pre-registers a node as if it had POSTed `body` to keepalive.
    pub fn register(&self, node: &str, body: &str) {
        self.state()
            .nodes
            .insert(node.to_string(), body.to_string());
    }

    /// Answers every `POST keepalive` with `{"nodeToken": TOKEN}` as its
    /// data, as bin-manager does on a node's first registration.
    pub fn issue_token(&self, token: &str) {
        self.state().node_token = Some(token.to_string());
    }

    /// The last keepalive body POSTed for `node` (or given to `register`).
    pub fn registration(&self, node: &str) -> Option<String> {
        self.state().nodes.get(node).cloned()
    }

    /// Hashes POSTed to `bins/NAME`, in order. A body without a `"hash"` string is
    /// recorded as the raw body so that assertions show what was sent.
    pub fn reported(&self, name: &str) -> Vec<String> {
        self.state().reported.get(name).cloned().unwrap_or_default()
    }

    /// Every (well-formed) request so far, in arrival order.
    pub fn requests(&self) -> Vec<Request> {
        self.state().requests.clone()
    }

    /// How many requests have this method (case-insensitive; `"*"` = any) and a path
    /// starting with `path_prefix` (raw or percent-decoded path).
    pub fn count(&self, method: &str, path_prefix: &str) -> usize {
        self.state()
            .requests
            .iter()
            .filter(|r| method == "*" || r.method.eq_ignore_ascii_case(method))
            .filter(|r| {
                r.path.starts_with(path_prefix) || r.decoded_path().starts_with(path_prefix)
            })
            .count()
    }

    pub fn clear_requests(&self) {
        self.state().requests.clear();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.ctx.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept() once; it then sees the flag and returns.
        let woke = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)).is_ok();
        if let Some(handle) = self.accept.take() {
            if woke {
                let _ = handle.join();
            }
        }
    }
}

/// The bin-proxy repository (this crate lives in its `testkit/`).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit/ has a parent")
        .to_path_buf()
}

/// The package's executable `name` (`bin-proxy`, `bin-manager`) that cargo
/// built for the running test: `env!("CARGO_BIN_EXE_…")` exists only in the
/// test crates themselves, so it is found next to the test binary
/// (`…/target/debug/deps/TEST` → `…/target/debug/NAME`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe.parent().and_then(Path::parent);
    let path = dir
        .map(|d| d.join(name))
        .unwrap_or_else(|| PathBuf::from(name));
    assert!(
        path.is_file(),
        "{} (the `{name}` executable) is missing: run the tests with `cargo test`, \
         which builds it next to the test binary {}",
        path.display(),
        exe.display()
    );
    path
}

/// Lowercase hex md5 of `bytes`.
pub fn md5_hex(bytes: &[u8]) -> String {
    format!("{:x}", md5::compute(bytes))
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(bytes))
}

// ---------------------------------------------------------------------------
// Server internals
// ---------------------------------------------------------------------------

fn accept_loop(listener: TcpListener, ctx: Ctx) {
    // Bounded by the stop flag: Drop sets it and then connects once.
    for conn in listener.incoming() {
        if ctx.stop.load(Ordering::SeqCst) {
            break;
        }
        match conn {
            Ok(stream) => {
                let conn_ctx = ctx.clone();
                let _ = thread::Builder::new()
                    .name("fake-bin-manager-conn".into())
                    .spawn(move || handle_connection(stream, conn_ctx));
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

enum ReadError {
    /// Peer went away before sending anything useful: answer nothing.
    Closed,
    /// Malformed or oversized: answer this status and message.
    Bad(u16, &'static str),
}

/// What to send back, decided under the lock and performed without it.
enum Action {
    Reply {
        status: u16,
        content_type: &'static str,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    },
    Truncated {
        bytes: Vec<u8>,
        keep: usize,
    },
    Slow {
        bytes: Vec<u8>,
        interval: Duration,
    },
    Hang,
    Endless {
        bytes: Vec<u8>,
    },
    /// `status` with `headers`, the bytes of `bytes` from `start` announced,
    /// those before `cut` sent (16 KiB per `pace`, when given).
    Part {
        status: u16,
        headers: Vec<(String, String)>,
        bytes: Vec<u8>,
        start: usize,
        cut: usize,
        pace: Option<Duration>,
    },
}

fn handle_connection(mut stream: TcpStream, ctx: Ctx) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let action = match read_request(&mut stream) {
        Ok(req) => {
            let mut st = lock(&ctx.state);
            st.requests.push(req.clone());
            route(&mut st, &req, &ctx.base)
        }
        Err(ReadError::Closed) => return,
        Err(ReadError::Bad(status, msg)) => {
            let style = lock(&ctx.state).style;
            json(status, failure(style, status, msg))
        }
    };
    perform(stream, action, &ctx.stop);
}

fn find_subslice(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn read_request(stream: &mut TcpStream) -> Result<Request, ReadError> {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 8192];
    // Each iteration either grows `buf` (capped at MAX_HEAD) or returns.
    let head_end = loop {
        if let Some(pos) = find_subslice(&buf, b"\r\n\r\n") {
            break pos;
        }
        if buf.len() > MAX_HEAD {
            return Err(ReadError::Bad(431, "request head too large"));
        }
        // Not the start of an HTTP request (a TLS ClientHello, say): answer
        // at once, as bin-manager does, instead of waiting for a head.
        if buf.first().is_some_and(|b| !b.is_ascii_uppercase()) {
            return Err(ReadError::Bad(400, "not an HTTP request"));
        }
        match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Err(ReadError::Closed),
            Ok(0) => return Err(ReadError::Bad(400, "incomplete request head")),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) if buf.is_empty() => return Err(ReadError::Closed),
            Err(_) => return Err(ReadError::Bad(400, "incomplete request head")),
        }
    };
    if head_end + 4 > MAX_HEAD {
        return Err(ReadError::Bad(431, "request head too large"));
    }
    let head = std::str::from_utf8(&buf[..head_end])
        .map_err(|_| ReadError::Bad(400, "request head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or("");
    let parts: Vec<&str> = request_line.split(' ').collect();
    if parts.len() != 3 {
        return Err(ReadError::Bad(400, "malformed request line"));
    }
    let (method, target, version) = (parts[0], parts[1], parts[2]);
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(ReadError::Bad(400, "malformed method"));
    }
    if !version.starts_with("HTTP/1.") {
        return Err(ReadError::Bad(400, "unsupported HTTP version"));
    }
    // Accept absolute-form targets too (`http://host:port/path`).
    let target = match target.strip_prefix("http://") {
        Some(rest) => match rest.find('/') {
            Some(i) => &rest[i..],
            None => "/",
        },
        None => target,
    };
    if !target.starts_with('/') {
        return Err(ReadError::Bad(400, "malformed request target"));
    }
    let target = target.split('#').next().unwrap_or(target);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, q),
        None => (target, ""),
    };

    let mut headers = Vec::new();
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or(ReadError::Bad(400, "malformed header line"))?;
        let name = name.trim();
        if name.is_empty() || name.contains(|c: char| c.is_whitespace() || c.is_control()) {
            return Err(ReadError::Bad(400, "malformed header name"));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }

    if let Some(te) = find_header(&headers, "transfer-encoding") {
        if !te.eq_ignore_ascii_case("identity") {
            return Err(ReadError::Bad(
                501,
                "chunked request bodies are not supported",
            ));
        }
    }
    let content_length = match find_header(&headers, "content-length") {
        None => 0,
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| ReadError::Bad(400, "malformed Content-Length"))?,
    };
    if content_length > MAX_BODY {
        return Err(ReadError::Bad(413, "request body too large"));
    }

    let mut body: Vec<u8> = buf[head_end + 4..].to_vec();
    body.truncate(content_length);
    if body.len() < content_length {
        if find_header(&headers, "expect").is_some_and(|v| v.eq_ignore_ascii_case("100-continue")) {
            let _ = stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        let missing = (content_length - body.len()) as u64;
        // read_to_end stops at EOF, at `missing` bytes, or on error (e.g. the read timeout).
        let _ = (&mut *stream).take(missing).read_to_end(&mut body);
        if body.len() < content_length {
            return Err(ReadError::Bad(400, "body shorter than Content-Length"));
        }
    }

    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
        headers,
        body,
    })
}

fn route(st: &mut State, req: &Request, base: &str) -> Action {
    let style = st.style;
    let not_found = || json(404, failure(style, 404, "not found"));
    if let Some(Fault::Status(status)) = st.faults.get(EVERY_ROUTE) {
        return injected(*status);
    }
    let rest = match req.path.strip_prefix("/api/v1/") {
        Some(r) => r,
        None => return not_found(),
    };
    if rest == "keepalive" {
        return keepalive(st, req);
    }
    let (kind, raw_name) = match rest.split_once('/') {
        Some(x) => x,
        None => return not_found(),
    };
    if raw_name.is_empty() || raw_name.contains('/') {
        return not_found();
    }
    let name = match percent_decode(raw_name, false) {
        Some(n) => n,
        None => return json(400, failure(style, 400, "malformed percent-encoding")),
    };
    match (kind, req.method.as_str()) {
        ("bins", "GET") => bins_get(st, &name),
        ("bins", "POST") => bins_post(st, &name, req),
        ("download", "GET") => download(st, &name, req, base),
        _ => not_found(),
    }
}

fn keepalive(st: &mut State, req: &Request) -> Action {
    let style = st.style;
    let node = match req.param("node") {
        Some(n) if !n.is_empty() => n,
        _ => return json(400, failure(style, 400, "missing node parameter")),
    };
    match req.method.as_str() {
        "GET" => match st.nodes.get(&node) {
            Some(body) => {
                let data = if body.trim().is_empty() {
                    "null"
                } else {
                    body.trim()
                };
                json(200, success(style, data))
            }
            None => json(404, failure(style, 404, "node not found")),
        },
        "POST" => {
            st.nodes.insert(node, req.body_str());
            let data = match &st.node_token {
                Some(t) => format!("{{\"nodeToken\":{}}}", json_string(t)),
                None => "null".to_string(),
            };
            json(200, success(style, &data))
        }
        _ => json(404, failure(style, 404, "not found")),
    }
}

fn injected(status: u16) -> Action {
    json(
        status,
        format!("{{\"code\":{},\"message\":\"injected failure\"}}", status),
    )
}

/// A `Fault::Busy` answer.
fn busy(status: u16, retry_after: &Option<String>) -> Action {
    Action::Reply {
        status,
        content_type: "application/json",
        headers: retry_after
            .iter()
            .map(|v| ("Retry-After".to_string(), v.clone()))
            .collect(),
        body: format!("{{\"code\":{status},\"message\":\"server busy\"}}").into_bytes(),
    }
}

fn bins_get(st: &State, name: &str) -> Action {
    let style = st.style;
    let fault = st.faults.get(name).cloned().unwrap_or(Fault::None);
    match &fault {
        Fault::Status(s) => return injected(*s),
        Fault::Busy(s, after) => return busy(*s, after),
        Fault::Hang => return Action::Hang,
        Fault::Garbage => return json(200, "{\"code\":200,\"data\":{\"hash\": ".to_string()),
        Fault::EnvelopeCode(code, message) => {
            return json(
                200,
                format!(
                    "{{\"code\":{},\"message\":{},\"data\":null}}",
                    code,
                    json_string(message)
                ),
            )
        }
        _ => {}
    }
    let bytes = match st.published.get(name) {
        Some(b) => b,
        None => return json(404, failure(style, 404, "binary not found")),
    };
    let hash = if fault == Fault::WrongHash {
        let mut other = bytes.clone();
        other.extend_from_slice(b"\0not-what-download-serves");
        md5_hex(&other)
    } else {
        md5_hex(bytes)
    };
    if fault == Fault::NoEnvelope {
        return json(
            200,
            format!(
                "{{\"name\":{},\"version\":\"latest\",\"hash\":\"{}\",\"extra\":1}}",
                json_string(name),
                hash
            ),
        );
    }
    let sha256 = match &fault {
        Fault::Signed(sig, statements) => signed_fields(bytes, sig, statements),
        Fault::Endless(sig) => signed_fields(bytes, sig, &[]),
        Fault::Sha256 => format!(",\"sha256\":\"{}\"", sha256_hex(bytes)),
        Fault::WrongSha256 => format!(",\"sha256\":\"{}\"", sha256_hex(b"other bytes")),
        _ => String::new(),
    };
    let data = format!(
        "{{\"name\":{},\"version\":\"latest\",\"hash\":\"{}\"{sha256}}}",
        json_string(name),
        hash
    );
    json(200, success(style, &data))
}

fn signed_fields(bytes: &[u8], sig: &str, statements: &[String]) -> String {
    let mut out = format!(
        ",\"sha256\":\"{}\",\"size\":{}",
        sha256_hex(bytes),
        bytes.len()
    );
    if !sig.is_empty() {
        out.push_str(&format!(",\"signature\":{}", json_string(sig)));
    }
    if !statements.is_empty() {
        let list: Vec<String> = statements.iter().map(|s| json_string(s)).collect();
        out.push_str(&format!(",\"keyStatements\":[{}]", list.join(",")));
    }
    out
}

fn bins_post(st: &mut State, name: &str, req: &Request) -> Action {
    let body = req.body_str();
    let hash = json_string_field(&body, "hash").unwrap_or(body);
    st.reported.entry(name.to_string()).or_default().push(hash);
    match st.faults.get(name) {
        Some(Fault::ReportStatus(s)) => injected(*s),
        Some(Fault::Busy(s, after)) => busy(*s, after),
        _ => json(200, success(st.style, "null")),
    }
}

fn download(st: &mut State, name: &str, req: &Request, base: &str) -> Action {
    if let Some(Fault::DownloadBusy(after, left)) = st.faults.get_mut(name) {
        if *left > 0 {
            *left -= 1;
            return busy(503, after);
        }
    }
    let fault = st.faults.get(name).cloned().unwrap_or(Fault::None);
    match &fault {
        Fault::Status(s) => return injected(*s),
        Fault::Busy(s, after) => return busy(*s, after),
        Fault::DownloadStatus(s) => {
            return Action::Reply {
                status: *s,
                content_type: "text/plain",
                headers: Vec::new(),
                body: b"injected failure".to_vec(),
            }
        }
        Fault::Hang => return Action::Hang,
        Fault::RedirectLoop => {
            let mut here = format!("{}{}", base, req.path);
            if !req.query.is_empty() {
                here.push('?');
                here.push_str(&req.query);
            }
            return redirect(here);
        }
        Fault::Redirect(location) => return redirect(location.clone()),
        _ => {}
    }
    let bytes = match st.published.get(name) {
        Some(b) => b.clone(),
        None => return json(404, failure(st.style, 404, "binary not found")),
    };
    if matches!(
        fault,
        Fault::Ranges
            | Fault::CutAt(_)
            | Fault::IgnoreRange
            | Fault::RangeFrom(_)
            | Fault::RangeUnsatisfiable
            | Fault::Trickle(_)
    ) {
        return ranged(&fault, bytes, req);
    }
    match fault {
        Fault::Truncate(keep) => Action::Truncated { bytes, keep },
        Fault::SlowDownload(interval) => Action::Slow { bytes, interval },
        Fault::Endless(_) => Action::Endless { bytes },
        _ => Action::Reply {
            status: 200,
            content_type: "application/octet-stream",
            headers: Vec::new(),
            body: bytes,
        },
    }
}

/// The resumable download faults (see [`Fault::Ranges`]).
fn ranged(fault: &Fault, bytes: Vec<u8>, req: &Request) -> Action {
    let etag = format!("\"{}\"", md5_hex(&bytes));
    let len = bytes.len();
    let mut headers = vec![
        ("ETag".to_string(), etag.clone()),
        ("Accept-Ranges".to_string(), "bytes".to_string()),
    ];
    let asked = req
        .header("range")
        .filter(|_| req.header("if-range").is_none_or(|v| v == etag))
        .and_then(|r| {
            r.strip_prefix("bytes=")?
                .strip_suffix('-')?
                .parse::<usize>()
                .ok()
        })
        .filter(|_| *fault != Fault::IgnoreRange);
    let cut = match fault {
        Fault::CutAt(at) => *at,
        _ => len,
    };
    let pace = match fault {
        Fault::Trickle(every) => Some(*every),
        _ => None,
    };
    let Some(asked) = asked else {
        return Action::Part {
            status: 200,
            headers,
            bytes,
            start: 0,
            cut,
            pace,
        };
    };
    if asked >= len || *fault == Fault::RangeUnsatisfiable {
        headers.push(("Content-Range".to_string(), format!("bytes */{len}")));
        return Action::Part {
            status: 416,
            headers,
            bytes: Vec::new(),
            start: 0,
            cut: 0,
            pace: None,
        };
    }
    let start = match fault {
        Fault::RangeFrom(at) => *at,
        _ => asked,
    };
    headers.push((
        "Content-Range".to_string(),
        format!("bytes {start}-{}/{len}", len - 1),
    ));
    Action::Part {
        status: 206,
        headers,
        bytes,
        start,
        cut,
        pace,
    }
}

fn redirect(location: String) -> Action {
    Action::Reply {
        status: 302,
        content_type: "text/plain",
        headers: vec![("Location".to_string(), location)],
        body: b"redirect".to_vec(),
    }
}

fn json(status: u16, body: String) -> Action {
    Action::Reply {
        status,
        content_type: "application/json",
        headers: Vec::new(),
        body: body.into_bytes(),
    }
}

/// Success envelope around raw JSON `data`.
fn success(style: Style, data: &str) -> String {
    match style {
        Style::Seed => format!("{{\"code\":200,\"message\":\"Success\",\"data\":{}}}", data),
        Style::Zero => format!("{{\"code\":0,\"message\":\"success\",\"data\":{}}}", data),
    }
}

/// Error envelope (no data).
fn failure(style: Style, status: u16, message: &str) -> String {
    let code = match style {
        Style::Seed => i64::from(status),
        Style::Zero => 1,
    };
    format!("{{\"code\":{},\"message\":{}}}", code, json_string(message))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn response_head(
    status: u16,
    content_type: &str,
    headers: &[(String, String)],
    content_length: usize,
) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nServer: fake-bin-manager\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n",
        status,
        reason(status),
        content_type,
        content_length
    );
    for (k, v) in headers {
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// Sleeps `d` in slices, returning false as soon as the stop flag is set.
fn sleep_unless_stopped(d: Duration, stop: &AtomicBool) -> bool {
    let deadline = Instant::now() + d;
    loop {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        thread::sleep((deadline - now).min(STOP_POLL));
    }
}

fn perform(mut stream: TcpStream, action: Action, stop: &AtomicBool) {
    match action {
        Action::Reply {
            status,
            content_type,
            headers,
            body,
        } => {
            let mut out = response_head(status, content_type, &headers, body.len());
            out.extend_from_slice(&body);
            if stream.write_all(&out).is_err() {
                return;
            }
        }
        Action::Truncated { bytes, keep } => {
            let mut out = response_head(200, "application/octet-stream", &[], bytes.len());
            out.extend_from_slice(&bytes[..keep.min(bytes.len())]);
            if stream.write_all(&out).is_err() {
                return;
            }
        }
        Action::Slow { bytes, interval } => {
            let head = response_head(200, "application/octet-stream", &[], bytes.len());
            if stream.write_all(&head).is_err() {
                return;
            }
            for b in bytes {
                if !sleep_unless_stopped(interval, stop) || stream.write_all(&[b]).is_err() {
                    return;
                }
            }
        }
        Action::Endless { bytes } => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n";
            if stream.write_all(head.as_bytes()).is_err() || stream.write_all(&bytes).is_err() {
                return;
            }
            let filler = vec![b'A'; 64 * 1024];
            for _ in 0..4096 {
                if stop.load(std::sync::atomic::Ordering::Relaxed)
                    || stream.write_all(&filler).is_err()
                {
                    return;
                }
            }
        }
        Action::Part {
            status,
            headers,
            bytes,
            start,
            cut,
            pace,
        } => {
            let start = start.min(bytes.len());
            let head = response_head(
                status,
                "application/octet-stream",
                &headers,
                bytes.len() - start,
            );
            if stream.write_all(&head).is_err() {
                return;
            }
            let body = &bytes[start..cut.clamp(start, bytes.len())];
            let block = if pace.is_some() {
                16 * 1024
            } else {
                body.len().max(1)
            };
            for part in body.chunks(block) {
                if let Some(every) = pace {
                    if !sleep_unless_stopped(every, stop) {
                        return;
                    }
                }
                if stream.write_all(part).is_err() {
                    return;
                }
            }
        }
        Action::Hang => {
            // Hold the socket (never answer) until the server is dropped or the limit passes.
            let _ = sleep_unless_stopped(HANG_LIMIT, stop);
            return;
        }
    }
    finish(stream);
}

/// Half-closes after a response and drains what the client still sends, so that
/// closing never turns into a reset that could clobber the response.
fn finish(mut stream: TcpStream) {
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let mut sink = [0u8; 4096];
    for _ in 0..64 {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
}

// ---------------------------------------------------------------------------
// Small text helpers (also handy in tests)
// ---------------------------------------------------------------------------

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Percent-decodes `s` (`+` becomes a space if `plus_is_space`). None on a bad
/// escape or if the result is not UTF-8.
pub fn percent_decode(s: &str, plus_is_space: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                let hi = char::from(hex[0]).to_digit(16)?;
                let lo = char::from(hex[1]).to_digit(16)?;
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// First value of `key` in a raw query string, percent-decoded.
pub fn query_param(query: &str, key: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let k = percent_decode(k, true).unwrap_or_else(|| k.to_string());
        if k == key {
            Some(percent_decode(v, true).unwrap_or_else(|| v.to_string()))
        } else {
            None
        }
    })
}

/// `s` as a quoted JSON string.
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
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

/// The string value of the first `"key": "value"` in `json`, found by a plain text
/// search (no full parser; whitespace around the colon allowed, escapes decoded).
pub fn json_string_field(json: &str, key: &str) -> Option<String> {
    let needle = format!("\"{}\"", key);
    let mut from = 0;
    while let Some(off) = json[from..].find(&needle) {
        let after = from + off + needle.len();
        let rest = json[after..].trim_start();
        if let Some(rest) = rest.strip_prefix(':') {
            if let Some(rest) = rest.trim_start().strip_prefix('"') {
                return json_string_body(rest);
            }
        }
        from = after;
    }
    None
}

/// Decodes a JSON string body up to its closing quote.
fn json_string_body(s: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                'r' => out.push('\r'),
                'b' => out.push('\u{8}'),
                'f' => out.push('\u{c}'),
                'u' => {
                    let hex: String = chars.by_ref().take(4).collect();
                    let code = u32::from_str_radix(&hex, 16).ok()?;
                    out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Raw HTTP client (for poking the server directly)
// ---------------------------------------------------------------------------

/// A response read by [`http`] / [`http_raw`].
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Names lowercased.
    pub headers: Vec<(String, String)>,
    /// Everything after the head until the server closed (not de-chunked).
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn content_length(&self) -> Option<usize> {
        self.header("content-length").and_then(|v| v.parse().ok())
    }
}

/// Splits `http://host:port/path?q` into (`host:port`, `/path?q`).
fn split_url(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    match rest.find('/') {
        Some(i) => (rest[..i].to_string(), rest[i..].to_string()),
        None => (rest.to_string(), "/".to_string()),
    }
}

/// Sends `raw` bytes to the host of `url` and returns everything read until the
/// server closes (or 5 s of silence).
pub fn http_raw(url: &str, raw: &[u8]) -> Vec<u8> {
    let (host, _) = split_url(url);
    let mut stream = TcpStream::connect(&host).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    stream.write_all(raw).expect("send request");
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    out
}

/// Parses a raw HTTP/1.x response (head + whatever body bytes followed).
pub fn parse_response(raw: &[u8]) -> Option<HttpResponse> {
    let end = find_subslice(raw, b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(HttpResponse {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}

/// One HTTP/1.1 request over a fresh `TcpStream` (`Connection: close`).
pub fn http(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> HttpResponse {
    let (host, target) = split_url(url);
    let mut req = format!(
        "{} {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
        method,
        target,
        host,
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{}: {}\r\n", k, v));
    }
    req.push_str("\r\n");
    let mut raw = req.into_bytes();
    raw.extend_from_slice(body);
    let answer = http_raw(url, &raw);
    parse_response(&answer).unwrap_or_else(|| {
        panic!(
            "unparsable response to {} {}: {:?}",
            method,
            url,
            String::from_utf8_lossy(&answer)
        )
    })
}

// ---------------------------------------------------------------------------
// Helpers for tests that run the real executable
// ---------------------------------------------------------------------------

static TEMP_COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A unique directory under `std::env::temp_dir()`, removed on drop unless the
/// environment variable `KEEP_TEST_DIRS` is set.
#[derive(Debug)]
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        for _ in 0..100 {
            let n = TEMP_COUNTER.fetch_add(1, Ordering::SeqCst);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let path = std::env::temp_dir().join(format!(
                "bin-proxy-test-{}-{}-{}",
                std::process::id(),
                n,
                nanos
            ));
            match fs::create_dir(&path) {
                Ok(()) => return TempDir { path },
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("create {}: {}", path.display(), e),
            }
        }
        panic!("could not create a unique temp dir");
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.path.join(p)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.path
    }
}

/// Gives the owner rwx on every directory below `p` (tests may chmod things away).
fn make_removable(p: &Path, depth: usize) {
    if depth > 64 {
        return;
    }
    if let Ok(meta) = fs::symlink_metadata(p) {
        if meta.is_dir() {
            let _ = fs::set_permissions(p, fs::Permissions::from_mode(0o755));
            if let Ok(entries) = fs::read_dir(p) {
                for e in entries.flatten() {
                    make_removable(&e.path(), depth + 1);
                }
            }
        }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_TEST_DIRS").is_some() {
            eprintln!("KEEP_TEST_DIRS: keeping {}", self.path.display());
            return;
        }
        if fs::remove_dir_all(&self.path).is_err() {
            make_removable(&self.path, 0);
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Writes an executable shell script at `dir/bin/supervisorctl` that appends its
/// arguments (one line, space separated) to `dir/supervisorctl.log`.
/// - `status X…` prints `X` padded like supervisorctl (`%-32s %-10s%s`) with
///   `RUNNING   pid 4242, uptime 0:00:05`, exit 0;
/// - `restart X…` prints `X: stopped` / `X: started`, exit 0;
/// - `start X` / `stop X` print `X: started` / `X: stopped`, exit 0; anything else exits 0.
///
/// If `dir/supervisorctl.fail` exists and contains `restart` (or `status`), that
/// subcommand prints `X: ERROR (spawn error)` and exits 7 (or prints
/// `X  …  FATAL     Exited too quickly (process log may have details)` and exits 1).
/// Leading global options (`-c FILE`, `-s URL`, `-u`, `-p`, `-r`, `--x=y`, flags) are skipped.
/// Returns `dir/bin` (to prepend to PATH, see [`path_with`]).
pub fn fake_supervisorctl(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).expect("create bin dir");
    let quoted = dir.display().to_string().replace('\'', "'\\''");
    let script = format!(
        r#"#!/bin/sh
# Fake supervisorctl written by the bin-proxy test fixture (testkit/src/lib.rs).
dir='{quoted}'
printf '%s\n' "$*" >> "$dir/supervisorctl.log"
fail=''
if [ -f "$dir/supervisorctl.fail" ]; then fail=$(cat "$dir/supervisorctl.fail"); fi
while [ $# -gt 0 ]; do
  case "$1" in
    -c|-s|-u|-p|-r|--configuration|--serverurl|--username|--password|--history-file)
      shift
      if [ $# -gt 0 ]; then shift; fi ;;
    -*) shift ;;
    *) break ;;
  esac
done
cmd="$1"
if [ $# -gt 0 ]; then shift; fi
case "$cmd" in
  status)
    case "$fail" in
      *status*)
        for n in "$@"; do printf '%-32s %-10s%s\n' "$n" FATAL 'Exited too quickly (process log may have details)'; done
        exit 1 ;;
    esac
    for n in "$@"; do printf '%-32s %-10s%s\n' "$n" RUNNING 'pid 4242, uptime 0:00:05'; done
    exit 0 ;;
  restart)
    case "$fail" in
      *restart*)
        for n in "$@"; do printf '%s: ERROR (spawn error)\n' "$n"; done
        exit 7 ;;
    esac
    for n in "$@"; do printf '%s: stopped\n%s: started\n' "$n" "$n"; done
    exit 0 ;;
  start)
    for n in "$@"; do printf '%s: started\n' "$n"; done
    exit 0 ;;
  stop)
    for n in "$@"; do printf '%s: stopped\n' "$n"; done
    exit 0 ;;
  *)
    exit 0 ;;
esac
"#
    );
    let path = bin.join("supervisorctl");
    fs::write(&path, script).expect("write fake supervisorctl");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod supervisorctl");
    bin
}

/// Lines of `dir/supervisorctl.log` (empty if the fake was never run).
pub fn supervisorctl_log(dir: &Path) -> Vec<String> {
    fs::read_to_string(dir.join("supervisorctl.log"))
        .map(|s| s.lines().map(str::to_string).collect())
        .unwrap_or_default()
}

/// The calls in `dir/supervisorctl.log` that act on a program (all but
/// `status`, which the agent also asks before an upgrade to know that
/// supervisord can restart the service at all).
pub fn supervisorctl_actions(dir: &Path) -> Vec<String> {
    supervisorctl_log(dir)
        .into_iter()
        .filter(|l| !l.starts_with("status "))
        .collect()
}

/// `PATH` with `dir` prepended (for `Command::env("PATH", …)`).
pub fn path_with(dir: &Path) -> OsString {
    let mut parts = vec![dir.to_path_buf()];
    if let Some(old) = std::env::var_os("PATH") {
        parts.extend(std::env::split_paths(&old));
    }
    std::env::join_paths(parts).expect("join PATH")
}

/// Names (sorted) of the entries directly in `dir` that contain `.tmp` or
/// `bin-proxy-tmp`: stale temp files a run must not leave behind.
pub fn temp_files(dir: &Path) -> Vec<String> {
    // A missing or unreadable directory is a broken test, not "no temp
    // files": fail instead of returning an empty list.
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("temp_files: cannot list {}: {e}", dir.display()))
        .map(|e| {
            e.unwrap_or_else(|e| panic!("temp_files: reading {}: {e}", dir.display()))
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| n.contains(".tmp") || n.contains("bin-proxy-tmp"))
        .collect();
    names.sort();
    names
}

/// Mode bits (`st_mode & 0o7777`) of a path (follows symlinks).
pub fn mode(p: &Path) -> u32 {
    fs::metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {}", p.display(), e))
        .permissions()
        .mode()
        & 0o7777
}

/// Polls `f` every 20 ms until it returns true or `timeout` passes; returns the last result.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// For a test that needs something this machine may lack (root, a kernel
/// feature, a Debian package that cannot be installed): `true` when it is
/// there. When it is not, says so on stderr and returns `false` (the test
/// returns early) — except under `CI=true`, where a test that cannot run
/// fails.
pub fn can_run(have: bool, why: &str) -> bool {
    if have {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "cannot run here under CI=true: {why}"
    );
    eprintln!("SKIPPED (cannot run here): {why}");
    false
}

/// The proxy variables of the environment the tests run in: removed from
/// every `bin-proxy` command, so that a developer's proxy never changes a
/// test's outcome (tests that want a proxy set their own).
pub const PROXY_VARS: [&str; 8] = [
    "http_proxy",
    "HTTP_PROXY",
    "https_proxy",
    "HTTPS_PROXY",
    "no_proxy",
    "NO_PROXY",
    "all_proxy",
    "ALL_PROXY",
];

/// Removes [`PROXY_VARS`] from `cmd`'s environment.
pub fn without_proxies(cmd: &mut std::process::Command) -> &mut std::process::Command {
    for var in PROXY_VARS {
        cmd.env_remove(var);
    }
    cmd
}

/// Whether this process runs as root (reads `/proc/self/status`).
pub fn is_root() -> bool {
    fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// Installs Debian packages the way `scripts/setup.sh` does (idempotent:
/// nothing happens when they are there). Returns whether `program` (a path)
/// exists afterwards.
pub fn ensure_debian_packages(packages: &str, program: &str) -> bool {
    if Path::new(program).exists() {
        return true;
    }
    let out = std::process::Command::new("bash")
        .arg(root().join("scripts/setup.sh"))
        .env("BIN_PROXY_SETUP_PACKAGES", packages)
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        Ok(o) => eprintln!(
            "scripts/setup.sh ({packages}) failed: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => eprintln!("cannot run scripts/setup.sh: {e}"),
    }
    Path::new(program).exists()
}

/// Starts a server program on a free port of 127.0.0.1 (`command(port)`
/// builds its command line) and waits, bounded, until it accepts
/// connections. A port taken in between makes the program exit; the next
/// of five tries picks another. Returns the child (the caller kills it by
/// its pid) and the port.
pub fn start_on_free_port(
    what: &str,
    command: impl Fn(u16) -> std::process::Command,
) -> (std::process::Child, u16) {
    for _ in 0..5 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut child = command(port)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        let up = wait_until(Duration::from_secs(10), || {
            matches!(child.try_wait(), Ok(None)) && TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if up {
            return (child, port);
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("{what} did not start on 127.0.0.1 (5 tries)");
}

/// Starts `/usr/sbin/nginx` in the foreground on a free port of 127.0.0.1,
/// everything (config, pid, logs, temp files) in `dir`: `http` is the
/// config's `http {}` block content for that port (its `server`, `upstream`).
pub fn start_nginx(
    what: &str,
    dir: &Path,
    connections: u32,
    http: impl Fn(u16) -> String,
) -> (std::process::Child, u16) {
    let d = dir.display();
    let conf_path = dir.join("nginx.conf");
    start_on_free_port(what, |port| {
        let conf = format!(
            "daemon off; master_process off; pid {d}/nginx.pid; error_log {d}/error.log;
             events {{ worker_connections {connections}; }}
             http {{
               access_log off;
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
               fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
               {}
             }}",
            http(port)
        );
        fs::write(&conf_path, conf).expect("write nginx.conf");
        let mut c = std::process::Command::new("/usr/sbin/nginx");
        c.arg("-p").arg(dir).arg("-c").arg(&conf_path);
        c
    })
}
