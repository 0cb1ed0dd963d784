//! A running REAL `bin-manager` executable for integration tests: a temp dir
//! holding `bins/` (the binDir), `state/state.json` (the registry) and an empty
//! config file, the child process started with
//! `--listen 127.0.0.1:0 --bin-dir DIR --state-file DIR/state.json` (+ extra
//! args; [`Manager::start_listening`] picks another address, e.g. `[::1]:0`), its stderr collected line by line for assertions on the access log.
//!
//! Layout of [`Manager::root`]:
//! ```text
//! ROOT/bins/              binDir
//! ROOT/state/state.json   stateFile (and state.json.log beside it)
//! ROOT/config.json        "{}" or what the test gave (so that a host's /etc/bin-manager/config.json is never read)
//! ```

use super::json::{parse, Json};
use super::{http, json_string, wait_until, HttpResponse, TempDir};
use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// Longest wait for the "listening on" line.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A running bin-manager.
pub struct Manager {
    /// Everything lives here (see the module docs).
    pub root: TempDir,
    args: Vec<String>,
    /// `--listen`: `127.0.0.1:0` unless the test chose another.
    listen: String,
    child: Option<Child>,
    /// The host part of the address it reported (`127.0.0.1`, `[::1]`).
    host: String,
    port: u16,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Manager {
    /// Starts bin-manager on a fresh temp dir with these extra arguments.
    pub fn start(extra: &[&str]) -> Manager {
        Manager::start_with_config("{}", extra)
    }

    /// Starts bin-manager with `config` as its config file's text.
    pub fn start_with_config(config: &str, extra: &[&str]) -> Manager {
        Manager::start_in(config, None, extra)
    }

    /// Starts bin-manager on a registry snapshot (`state.json`'s text):
    /// nodes as a server that ran before left them, e.g. long unseen.
    pub fn start_with_state(state: &str, extra: &[&str]) -> Manager {
        Manager::start_in("{}", Some(state), extra)
    }

    /// Starts bin-manager with `--listen listen` (e.g. `[::1]:0`).
    pub fn start_listening(listen: &str, extra: &[&str]) -> Manager {
        Manager::start_at(listen, "{}", None, extra)
    }

    fn start_in(config: &str, state: Option<&str>, extra: &[&str]) -> Manager {
        Manager::start_at("127.0.0.1:0", config, state, extra)
    }

    fn start_at(listen: &str, config: &str, state: Option<&str>, extra: &[&str]) -> Manager {
        let root = TempDir::new();
        fs::create_dir_all(root.join("bins")).expect("create binDir");
        fs::create_dir_all(root.join("state")).expect("create state dir");
        fs::write(root.join("config.json"), config).expect("write config");
        if let Some(state) = state {
            fs::write(root.join("state").join("state.json"), state).expect("write state");
        }
        let mut m = Manager {
            root,
            args: extra.iter().map(|s| s.to_string()).collect(),
            listen: listen.to_string(),
            child: None,
            host: String::new(),
            port: 0,
            lines: Arc::new(Mutex::new(Vec::new())),
        };
        m.spawn();
        m
    }

    /// The arguments every start uses (before the extra ones).
    fn base_args(&self) -> Vec<String> {
        vec![
            "--config".into(),
            self.root.join("config.json").display().to_string(),
            "--listen".into(),
            self.listen.clone(),
            "--bin-dir".into(),
            self.bin_dir().display().to_string(),
            "--state-file".into(),
            self.state_file().display().to_string(),
        ]
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(super::bin("bin-manager"));
        cmd.args(self.base_args())
            .args(&self.args)
            .env_remove("BIN_MANAGER_TOKEN")
            .env_remove("BIN_MANAGER_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start bin-manager");
        let stderr = child.stderr.take().expect("stderr pipe");
        let first = self.lines.lock().unwrap().len();
        let lines = self.lines.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut line = String::new();
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => lines
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(line.trim_end_matches(['\r', '\n']).to_string()),
                }
            }
        });
        self.child = Some(child);
        let mut port = None;
        let up = wait_until(START_TIMEOUT, || {
            port = self.lines.lock().unwrap()[first..]
                .iter()
                .find_map(|l| listening_at(l));
            port.is_some()
                || self
                    .child
                    .as_mut()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
        });
        match port {
            Some((host, p)) if up => (self.host, self.port) = (host, p),
            _ => {
                if let Some(mut c) = self.child.take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                panic!(
                    "bin-manager --listen {} did not report \"listening on http://HOST:PORT\" within {:?}; stderr:\n{}",
                    self.listen,
                    START_TIMEOUT,
                    self.log_lines().join("\n")
                );
            }
        }
    }

    /// `http://127.0.0.1:PORT` (the host it listens on: `http://[::1]:PORT`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// `http://127.0.0.1:PORT/api/v1`.
    pub fn api(&self) -> String {
        format!("{}/api/v1", self.url())
    }

    /// `127.0.0.1:PORT` (or `[::1]:PORT`).
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The binDir (`ROOT/bins`).
    pub fn bin_dir(&self) -> PathBuf {
        self.root.join("bins")
    }

    /// Everything below binDir (as [`tree`] lists it) but the builds kept
    /// for rollouts (`.builds/`).
    pub fn bin_dir_tree(&self) -> Vec<String> {
        tree(&self.bin_dir())
            .into_iter()
            .filter(|p| p != ".builds" && !p.starts_with(".builds/"))
            .collect()
    }

    /// The state file (`ROOT/state/state.json`).
    pub fn state_file(&self) -> PathBuf {
        self.root.join("state").join("state.json")
    }

    /// Every stderr line so far (across restarts).
    pub fn log_lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Waits (bounded) until some stderr line satisfies `f`; returns it.
    pub fn wait_log(&self, timeout: Duration, f: impl Fn(&str) -> bool) -> Option<String> {
        let mut found = None;
        wait_until(timeout, || {
            found = self.log_lines().into_iter().find(|l| f(l));
            found.is_some()
        });
        found
    }

    /// The server's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends a signal by name (`TERM`) with kill(1).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([format!("-{name}"), self.pid().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -{name} {}", self.pid());
    }

    /// Waits (bounded) for the server to exit; its exit code (`None`: still
    /// running after `timeout`, or killed by a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut()?;
        let mut code = None;
        let exited = wait_until(timeout, || match child.try_wait() {
            Ok(Some(status)) => {
                code = status.code();
                true
            }
            _ => false,
        });
        if exited {
            self.child = None;
        }
        code
    }

    /// SIGKILL (`Child::kill`) and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again with the same dirs and args (a new port); kills a running one first.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Writes `bytes` to `binDir/REL` (creating directories), via a temp file
    /// and an atomic rename, like a real publish by `mv`.
    pub fn publish_mv(&self, rel: &str, bytes: &[u8]) {
        let dest = self.bin_dir().join(rel);
        let dir = dest.parent().expect("parent").to_path_buf();
        fs::create_dir_all(&dir).expect("create dir");
        let tmp = dir.join(format!(".incoming-{}", std::process::id()));
        fs::write(&tmp, bytes).expect("write temp");
        fs::rename(&tmp, &dest).expect("rename into place");
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The host and port of a `listening on http://HOST:PORT` line (HOST
/// `127.0.0.1` or `[::1]`).
fn listening_at(line: &str) -> Option<(String, u16)> {
    let rest = &line[line.find("listening on http://")? + 20..];
    let addr = rest.split_whitespace().next()?;
    let (host, port) = addr.rsplit_once(':')?;
    Some((host.to_string(), port.parse().ok()?))
}

/// Runs `bin-manager ARGS` expecting it to exit by itself within `timeout`;
/// returns (exit code, stderr). Kills it and panics if it does not exit.
pub fn run_to_exit(args: &[&str], timeout: Duration) -> (i32, String) {
    let (code, _, stderr) = run_cli(args, &[], timeout);
    (code, stderr)
}

/// Like [`run_to_exit`] with these environment variables set (the tokens'
/// are otherwise removed); returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str], env: &[(&str, &str)], timeout: Duration) -> (i32, String, String) {
    let mut cmd = Command::new(super::bin("bin-manager"));
    cmd.args(args)
        .env_remove("BIN_MANAGER_TOKEN")
        .env_remove("BIN_MANAGER_ADMIN_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let ran = super::host::Ran::bounded(&mut cmd, timeout, &format!("bin-manager {args:?}"));
    (ran.code, ran.stdout, ran.stderr)
}

/// Splits `http://host:port/path` into (`host:port`, `/path`).
fn split(url: &str) -> (String, String) {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    match rest.find('/') {
        Some(i) => (rest[..i].to_string(), rest[i..].to_string()),
        None => (rest.to_string(), "/".to_string()),
    }
}

/// Sends `raw` to `addr`, tolerating a server that closes before taking all of
/// it (the write happens in a thread, its errors ignored), and returns all it
/// answered until it closed, or until `timeout` passed overall.
pub fn exchange(addr: &str, raw: Vec<u8>, timeout: Duration) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).expect("connect");
    let mut writer = stream.try_clone().expect("clone stream");
    let _ = writer.set_write_timeout(Some(timeout));
    let sender = thread::spawn(move || {
        let _ = writer.write_all(&raw);
    });
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        let _ = stream.set_read_timeout(Some(deadline - now));
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
    let _ = sender.join();
    out
}

/// `host:port` of `url` and the bytes of one `Connection: close` request to it.
fn request(method: &str, url: &str, headers: &[(&str, &str)], body: &[u8]) -> (String, Vec<u8>) {
    let (host, target) = split(url);
    let mut req = format!(
        "{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut raw = req.into_bytes();
    raw.extend_from_slice(body);
    (host, raw)
}

/// One request (`Connection: close`) to `url` sent from the local address
/// `from` (any of 127.0.0.0/8), as another client would; read deadline 15 s.
pub fn http_from(
    from: std::net::Ipv4Addr,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let (host, raw) = request(method, url, headers, body);
    let mut stream = bin_proxy::sys::connect_from(from, host.parse().expect("127.0.0.1:PORT"))
        .unwrap_or_else(|e| panic!("connect from {from} to {host}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("read timeout");
    stream.write_all(&raw).expect("send the request");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    super::parse_response(&answer).unwrap_or_else(|| {
        panic!(
            "no parsable answer to {method} {url} from {from}: {:?}",
            String::from_utf8_lossy(&answer)
        )
    })
}

/// One request (`Connection: close`) with a read deadline of `timeout`
/// (instead of [`super::http`]'s 5 s of silence); panics on no answer.
pub fn http_within(
    timeout: Duration,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> HttpResponse {
    let (host, raw) = request(method, url, headers, body);
    let answer = exchange(&host, raw, timeout);
    super::parse_response(&answer).unwrap_or_else(|| {
        panic!(
            "no parsable answer to {method} {url} within {timeout:?}: {:?}",
            String::from_utf8_lossy(&answer)
        )
    })
}

/// Reads exactly one answer (with a Content-Length body, or a 204 without
/// one) from a connection that stays open; `pending` carries bytes read
/// past it. Panics after 10 s.
pub fn read_answer(s: &mut TcpStream, pending: &mut Vec<u8>) -> HttpResponse {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = super::parse_response(&pending[..end + 4]).expect("an answer head");
            let len = match head.status {
                204 => 0,
                _ => head.content_length().expect("Content-Length"),
            };
            if pending.len() >= end + 4 + len {
                let raw: Vec<u8> = pending.drain(..end + 4 + len).collect();
                return super::parse_response(&raw).expect("an answer");
            }
        }
        let now = Instant::now();
        assert!(
            now < deadline,
            "no complete answer within 10 s; have {:?}",
            snippet(pending)
        );
        s.set_read_timeout(Some(deadline - now)).unwrap();
        let mut buf = [0u8; 64 * 1024];
        match s.read(&mut buf) {
            Ok(0) => panic!("server closed; have {:?}", snippet(pending)),
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => panic!("reading an answer: {e}; have {:?}", snippet(pending)),
        }
    }
}

/// Names (sorted) of every entry below `dir`, recursively, as paths relative to it.
pub fn tree(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>, depth: usize) {
        if depth > 16 {
            return;
        }
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            out.push(
                p.strip_prefix(base)
                    .unwrap_or(&p)
                    .to_string_lossy()
                    .into_owned(),
            );
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk(base, &p, out, depth + 1);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out, 0);
    out.sort();
    out
}

// ---------------------------------------------------------------------------
// Requests to the API and checks of its answers
// ---------------------------------------------------------------------------

/// Checks the envelope of a JSON answer: Content-Type, Content-Length, keys
/// `code,message,data` in that order, `code` = HTTP status, message "Success"
/// on 200. Returns `data`.
///
/// One extension: a successful answer whose `data` has a `sha256` (a
/// `bins/NAME` answer) may also carry `sha256` and `sha256sum` after `data`,
/// both exactly `data.sha256`, for the original project's agents that read
/// them there ([`legacy_sha256`] requires them).
pub fn envelope(r: &HttpResponse, status: u16) -> Json {
    assert_eq!(r.status, status, "HTTP status; body: {}", snippet(&r.body));
    let body = r.body_str();
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "Content-Type; body: {body}"
    );
    assert_eq!(r.content_length(), Some(r.body.len()), "Content-Length");
    let j = parse(&body);
    if j.keys().len() > 3 {
        assert_eq!(status, 200, "top-level keys beyond the envelope: {body}");
        assert_eq!(legacy_sha256(&j), j.get("data").get("sha256").s(), "{body}");
    }
    assert_eq!(
        j.keys()[..3.min(j.keys().len())],
        ["code", "message", "data"],
        "envelope keys: {body}"
    );
    assert_eq!(j.get("code"), &Json::Num(f64::from(status)), "code: {body}");
    if status == 200 {
        assert_eq!(j.get("message").s(), "Success", "{body}");
    } else {
        assert!(!j.get("message").s().is_empty(), "empty message: {body}");
        assert_eq!(j.get("data"), &Json::Null, "error data: {body}");
    }
    j.get("data").clone()
}

/// The top-level sha256 of a `bins/NAME` answer (`j`, the whole document),
/// asserting the keys are exactly `code,message,data,sha256,sha256sum` and
/// both hashes the same lowercase 64-hex string.
pub fn legacy_sha256(j: &Json) -> String {
    assert_eq!(
        j.keys(),
        ["code", "message", "data", "sha256", "sha256sum"],
        "keys of a bins/NAME answer: {j:?}"
    );
    let (a, b) = (j.get("sha256").s(), j.get("sha256sum").s());
    assert_eq!(a, b, "sha256 and sha256sum differ: {j:?}");
    assert!(
        a.len() == 64
            && a.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)),
        "not a lowercase sha256: {a:?}"
    );
    a.to_string()
}

/// An error answer, exactly `{"code":S,"message":M,"data":null}`.
pub fn expect_error(r: &HttpResponse, status: u16, message: &str) {
    envelope(r, status);
    assert_eq!(
        r.body_str(),
        format!(
            "{{\"code\":{status},\"message\":{},\"data\":null}}",
            json_string(message)
        )
    );
}

pub fn get(m: &Manager, path: &str) -> HttpResponse {
    http("GET", &format!("{}{path}", m.api()), &[], b"")
}

pub fn post(m: &Manager, path: &str, body: &str) -> HttpResponse {
    http(
        "POST",
        &format!("{}{path}", m.api()),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
}

pub fn put(m: &Manager, path: &str, token: Option<&str>, body: &[u8]) -> HttpResponse {
    call(m, "PUT", path, token, body)
}

/// `METHOD {api}PATH` with the bearer `token`, if any.
pub fn call(
    m: &Manager,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> HttpResponse {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    http(method, &format!("{}{path}", m.api()), &headers, body)
}

/// A body for a failure message: text (cut at 500 chars) or a byte count.
pub fn snippet(body: &[u8]) -> String {
    match std::str::from_utf8(body) {
        Ok(t) if t.chars().count() > 500 => {
            format!(
                "{}… ({} bytes)",
                t.chars().take(500).collect::<String>(),
                body.len()
            )
        }
        Ok(t) => t.to_string(),
        Err(_) => format!("<{} bytes, not UTF-8>", body.len()),
    }
}
