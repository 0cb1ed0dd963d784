use testkit as common;

// The agent against a hostile bin-manager: truncated, endless, huge, slow,
// silent, looping, cross-origin, header-bombing and garbage-speaking servers.
// Each scenario runs the real `bin-proxy` executable (testkit/src/host.rs)
// against a small misbehaving HTTP server written here (std::net only, one
// thread per connection, every loop bounded, every thread joined when the
// server is dropped). Each run must end in bounded time (a hung agent is
// killed after HARD_KILL and the test fails), with exit code 1 and a clear
// log line, and leave the managed file, its mode, the manifest and the target
// directory exactly as they were, with no temp file behind.

use common::host::{assert_unchanged, install_file, log_line, snapshot, Host, Ran, NODE};
use common::{json_string, md5_hex, mode, temp_files};
use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

const OLD: &[u8] = b"#!/bin/sh\necho old build\n";
const NEW: &[u8] = b"#!/bin/sh\necho new build, from a hostile server\n";

/// A run still going after this long is a hang: it is killed and the test fails.
const HARD_KILL: Duration = Duration::from_secs(30);
/// No server thread lives longer than this, whatever happens.
const SERVER_LIFETIME: Duration = Duration::from_secs(60);
/// Socket timeouts of the server's connections.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections one server accepts at most.
const MAX_CONNECTIONS: usize = 200;
/// Largest request head / body the server reads.
const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 1 << 20;

// ---------------------------------------------------------------------------
// The hostile server
// ---------------------------------------------------------------------------

/// One request as received.
#[derive(Clone, Debug)]
struct Req {
    method: String,
    /// Path without the query.
    path: String,
    /// Path and query as sent.
    target: String,
    /// Names lowercased.
    headers: Vec<(String, String)>,
}

impl Req {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn is(&self, method: &str, path: &str) -> bool {
        self.method == method && self.path == path
    }
}

/// What a misbehaving handler sees besides the request: the stop flag (and a
/// lifetime cap) that every one of its loops must watch.
struct Ctl {
    stop: AtomicBool,
    born: Instant,
    /// `http://127.0.0.1:PORT`
    base: String,
}

impl Ctl {
    fn live(&self) -> bool {
        !self.stop.load(Ordering::SeqCst) && self.born.elapsed() < SERVER_LIFETIME
    }

    /// Sleeps `d` in small slices; false when the server is stopping.
    fn pause(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        while self.live() {
            let now = Instant::now();
            if now >= until {
                return true;
            }
            thread::sleep((until - now).min(Duration::from_millis(10)));
        }
        false
    }

    /// Holds the connection open, answering nothing, until the server stops.
    fn hold(&self, stream: &mut TcpStream) {
        let _ = stream.flush();
        while self.pause(Duration::from_millis(50)) {}
    }
}

/// Misbehaviour: returns true when it handled the request (the connection
/// is then closed), false to let the normal protocol answer.
type Handler = dyn Fn(&Req, &mut TcpStream, &Ctl) -> bool + Send + Sync;

struct Shared {
    ctl: Ctl,
    handler: Box<Handler>,
    published: Mutex<HashMap<String, Vec<u8>>>,
    requests: Mutex<Vec<Req>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn guard<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A bin-manager imitation that answers the protocol normally except where
/// its handler misbehaves.
struct Hostile {
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl Hostile {
    fn start(handler: impl Fn(&Req, &mut TcpStream, &Ctl) -> bool + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind hostile server");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::new(Shared {
            ctl: Ctl {
                stop: AtomicBool::new(false),
                born: Instant::now(),
                base: format!("http://{addr}"),
            },
            handler: Box::new(handler),
            published: Mutex::new(HashMap::new()),
            requests: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
        });
        let sh = shared.clone();
        let accept = thread::spawn(move || {
            let mut accepted = 0;
            while sh.ctl.live() && accepted < MAX_CONNECTIONS {
                match listener.accept() {
                    Ok((stream, _)) => {
                        accepted += 1;
                        let conn = sh.clone();
                        let t = thread::spawn(move || serve(stream, &conn));
                        guard(&sh.threads).push(t);
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Hostile {
            shared,
            accept: Some(accept),
        }
    }

    /// A server with no misbehaviour at all.
    fn normal() -> Self {
        Hostile::start(|_, _, _| false)
    }

    fn base(&self) -> String {
        self.shared.ctl.base.clone()
    }

    fn api(&self) -> String {
        format!("{}/api/v1", self.base())
    }

    fn publish(&self, name: &str, bytes: &[u8]) {
        guard(&self.shared.published).insert(name.into(), bytes.to_vec());
    }

    fn requests(&self) -> Vec<Req> {
        guard(&self.shared.requests).clone()
    }

    fn count(&self, method: &str, path: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.is(method, path))
            .count()
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.shared.ctl.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.accept.take() {
            let _ = a.join();
        }
        let threads: Vec<_> = guard(&self.shared.threads).drain(..).collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

fn serve(mut stream: TcpStream, sh: &Shared) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(SOCKET_TIMEOUT));
    let _ = stream.set_write_timeout(Some(SOCKET_TIMEOUT));
    let Some(req) = read_request(&mut stream) else {
        return;
    };
    guard(&sh.requests).push(req.clone());
    if !(sh.handler)(&req, &mut stream, &sh.ctl) {
        answer_normally(&req, &mut stream, sh);
    }
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Both);
}

/// Reads one request head (and discards its body), bounded in size and time.
fn read_request(stream: &mut TcpStream) -> Option<Req> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
        .min(MAX_BODY);
    let mut have = buf.len() - (head_end + 4);
    while have < length {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => have += n,
        }
    }
    let path = target.split('?').next().unwrap_or("").to_string();
    Some(Req {
        method,
        path,
        target,
        headers,
    })
}

/// Writes a complete response with `Content-Length` and `Connection: close`.
fn respond(stream: &mut TcpStream, status: u16, ctype: &str, body: &[u8]) {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        _ => "Whatever",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

fn respond_json(stream: &mut TcpStream, status: u16, body: &str) {
    respond(stream, status, "application/json", body.as_bytes());
}

/// The normal protocol: keepalive GET 404 / POST 200, `bins/NAME`, `download/NAME`.
fn answer_normally(req: &Req, stream: &mut TcpStream, sh: &Shared) {
    const OK: &str = r#"{"code":200,"message":"Success","data":null}"#;
    const UNKNOWN: &str = r#"{"code":404,"message":"not found","data":null}"#;
    let published = |name: &str| guard(&sh.published).get(name).cloned();
    if req.method == "POST" {
        return respond_json(stream, 200, OK);
    }
    if req.path == "/api/v1/keepalive" {
        return respond_json(stream, 404, UNKNOWN);
    }
    if let Some(name) = req.path.strip_prefix("/api/v1/bins/") {
        return match published(name) {
            Some(bytes) => respond_json(stream, 200, &bins_answer(name, &md5_hex(&bytes))),
            None => respond_json(stream, 404, UNKNOWN),
        };
    }
    if let Some(name) = req.path.strip_prefix("/api/v1/download/") {
        return match published(name) {
            Some(bytes) => respond(stream, 200, "application/octet-stream", &bytes),
            None => respond(stream, 404, "text/plain", b"no such file"),
        };
    }
    respond_json(stream, 404, UNKNOWN)
}

fn bins_answer(name: &str, hash: &str) -> String {
    format!(
        r#"{{"code":200,"message":"Success","data":{{"name":"{name}","version":"latest","hash":"{hash}"}}}}"#
    )
}

/// Status line and headers of a 200 download, without a body.
fn download_head(stream: &mut TcpStream, extra: &str) -> bool {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n{extra}Connection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).is_ok()
}

/// Sends `Transfer-Encoding: chunked` 64 KiB chunks until the client goes
/// away, the server stops, or (a bound) 1 GiB went out; `pace` between chunks.
fn endless_chunks(stream: &mut TcpStream, ctl: &Ctl, pace: Duration) {
    if !download_head(stream, "Transfer-Encoding: chunked\r\n") {
        return;
    }
    let block = vec![b'x'; 64 * 1024];
    let mut sent = 0usize;
    while ctl.live() && sent < 1 << 30 {
        let ok = stream.write_all(b"10000\r\n").is_ok()
            && stream.write_all(&block).is_ok()
            && stream.write_all(b"\r\n").is_ok();
        if !ok || !ctl.pause(pace) {
            return;
        }
        sent += block.len();
    }
}

// ---------------------------------------------------------------------------
// Running the agent, and what to check afterwards
// ---------------------------------------------------------------------------

/// `bin-proxy ARGS` on `host`, talking to `srv`.
fn agent(host: &Host, srv: &Hostile, args: &[&str]) -> Command {
    let mut cmd = host.command(args);
    cmd.env("BIN_MANAGER_API", srv.api());
    cmd
}

/// Runs the command, killing it after [`HARD_KILL`] (then the test fails).
fn run(mut cmd: Command) -> (Ran, Duration) {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let started = Instant::now();
    let mut child = cmd.spawn().expect("spawn bin-proxy");
    let drain = |mut pipe: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut kept = Vec::new();
            let mut buf = [0u8; 8192];
            loop {
                match pipe.read(&mut buf) {
                    Ok(0) | Err(_) => return kept,
                    Ok(n) if kept.len() < 4 << 20 => kept.extend_from_slice(&buf[..n]),
                    Ok(_) => {}
                }
            }
        })
    };
    let out = drain(Box::new(child.stdout.take().unwrap()));
    let err = drain(Box::new(child.stderr.take().unwrap()));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for bin-proxy") {
            break Some(status);
        }
        if started.elapsed() > HARD_KILL {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    let ran = Ran {
        code: status.and_then(|s| s.code()).unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.join().unwrap()).into_owned(),
        stderr: String::from_utf8_lossy(&err.join().unwrap()).into_owned(),
    };
    // Shown with --nocapture (and for failing tests).
    eprintln!(
        "--- bin-proxy log ({elapsed:.1?}, exit {})\n{}",
        ran.code, ran.stderr
    );
    assert!(
        status.is_some(),
        "bin-proxy HUNG: killed after {HARD_KILL:?}\n--- stderr\n{}",
        ran.stderr
    );
    assert!(
        !ran.stderr.contains("panicked") && !ran.stdout.contains("panicked"),
        "bin-proxy panicked\n--- stderr\n{}",
        ran.stderr
    );
    (ran, elapsed)
}

fn failed_with<'a>(ran: &'a Ran, words: &[&str]) -> &'a str {
    assert_eq!(
        ran.code, 1,
        "exit code (expected 1)\n--- stderr\n{}",
        ran.stderr
    );
    log_line(ran, words)
}

/// Writes a seed-format manifest managing `(name, recorded hash)` pairs at
/// `opt/NAME`, with `"restart": "none"` (no service to watch here).
fn write_manifest(host: &Host, bins: &[(&str, &str)]) {
    let entries: Vec<String> = bins
        .iter()
        .map(|(name, hash)| {
            format!(
                "    {{\n      \"name\": {},\n      \"version\": \"latest\",\n      \"hash\": \"{hash}\",\n      \"path\": {},\n      \"restart\": \"none\"\n    }}",
                json_string(name),
                json_string(&host.target(name).display().to_string())
            )
        })
        .collect();
    host.write_manifest(&format!(
        "{{\n  \"node\": {{\n    \"name\": \"{NODE}\",\n    \"cpuArch\": \"x86_64\",\n    \"osRelease\": \"Test OS 1\",\n    \"proxyVersion\": \"1.0.0\"\n  }},\n  \"binaries\": [\n{}\n  ]\n}}\n",
        entries.join(",\n")
    ));
}

/// A host managing `names` at `opt/NAME` (each holding `OLD`, mode 0750,
/// recorded as installed), with `NEW` published on `srv` for each.
fn outdated(srv: &Hostile, names: &[&str]) -> Host {
    let host = Host::new();
    let old = md5_hex(OLD);
    for name in names {
        install_file(&host, name, OLD, 0o750);
        srv.publish(name, NEW);
    }
    let bins: Vec<(&str, &str)> = names.iter().map(|n| (*n, old.as_str())).collect();
    write_manifest(&host, &bins);
    host
}

fn assert_quick(elapsed: Duration, limit: Duration, ran: &Ran) {
    assert!(
        elapsed < limit,
        "took {elapsed:?} (limit {limit:?})\n--- stderr\n{}",
        ran.stderr
    );
}

// ---------------------------------------------------------------------------
// 1 and 11: bodies shorter than their Content-Length
// ---------------------------------------------------------------------------

/// 1: `Content-Length: 1 MiB`, 100 KiB sent, connection closed.
#[test]
fn truncated_download_is_refused_and_changes_nothing() {
    let srv = Hostile::start(|req, stream, _| {
        if !req.is("GET", "/api/v1/download/myapp") {
            return false;
        }
        if download_head(stream, "Content-Length: 1048576\r\n") {
            let _ = stream.write_all(&vec![b'y'; 100 * 1024]);
        }
        true
    });
    let host = outdated(&srv, &["myapp"]);
    let before = snapshot(&host);

    let (ran, elapsed) = run(agent(
        &host,
        &srv,
        &["--timeout", "2", "--download-timeout", "3"],
    ));
    let line = failed_with(&ran, &["myapp", "truncated"]);
    assert!(line.contains("102400 of 1048576"), "{line}");
    assert_unchanged(&host, &before, &ran);
    assert_quick(elapsed, Duration::from_secs(20), &ran);
    let n = srv.count("GET", "/api/v1/download/myapp");
    assert!((1..=3).contains(&n), "{n} download attempts");
    assert_eq!(srv.count("POST", "/api/v1/bins/myapp"), 0);
}

/// 11: the whole (correct!) file, but a `Content-Length` 1000 bytes larger,
/// then the connection closes: the same as truncation.
#[test]
fn content_length_larger_than_the_body_is_truncation() {
    let srv = Hostile::start(|req, stream, _| {
        if !req.is("GET", "/api/v1/download/myapp") {
            return false;
        }
        let len = format!("Content-Length: {}\r\n", NEW.len() + 1000);
        if download_head(stream, &len) {
            let _ = stream.write_all(NEW);
        }
        true
    });
    let host = outdated(&srv, &["myapp"]);
    let before = snapshot(&host);

    let (ran, elapsed) = run(agent(
        &host,
        &srv,
        &["--timeout", "2", "--download-timeout", "3"],
    ));
    let line = failed_with(&ran, &["myapp", "truncated"]);
    assert!(
        line.contains(&format!("{} of {}", NEW.len(), NEW.len() + 1000)),
        "{line}"
    );
    assert_unchanged(&host, &before, &ran);
    assert_quick(elapsed, Duration::from_secs(20), &ran);
    assert_eq!(srv.count("POST", "/api/v1/bins/myapp"), 0);
}

// ---------------------------------------------------------------------------
// 2, 3, 4: endless, huge and slow downloads
// ---------------------------------------------------------------------------

/// 2a: an endless chunked body stops at `--max-size 2M`, long before the
/// (generous) download timeout.
#[test]
fn endless_chunked_download_stops_at_max_size() {
    let srv = Hostile::start(|req, stream, ctl| {
        if !req.is("GET", "/api/v1/download/myapp") {
            return false;
        }
        endless_chunks(stream, ctl, Duration::ZERO);
        true
    });
    let host = outdated(&srv, &["myapp"]);
    let before = snapshot(&host);

    let (ran, elapsed) = run(agent(
        &host,
        &srv,
        &[
            "--timeout",
            "2",
            "--download-timeout",
            "25",
            "--max-size",
            "2M",
        ],
    ));
    let line = failed_with(&ran, &["myapp", "limit"]);
    assert!(line.contains("2.0 MiB"), "the limit is not named: {line}");
    assert_unchanged(&host, &before, &ran);
    assert_quick(elapsed, Duration::from_secs(15), &ran);
    assert_eq!(
        srv.count("GET", "/api/v1/download/myapp"),
        1,
        "an over-size body is not worth a retry"
    );
}

/// 2b: an endless (paced, ~3 MB/s) chunked body under a large `--max-size`
/// is cut by `--download-timeout`.
#[test]
fn endless_chunked_download_stops_at_download_timeout() {
    let srv = Hostile::start(|req, stream, ctl| {
        if !req.is("GET", "/api/v1/download/myapp") {
            return false;
        }
        endless_chunks(stream, ctl, Duration::from_millis(20));
        true
    });
    let host = outdated(&srv, &["myapp"]);
    let before = snapshot(&host);

    let (ran, elapsed) = run(agent(
        &host,
        &srv,
        &[
            "--timeout",
            "2",
            "--download-timeout",
            "3",
            "--max-size",
            "1G",
        ],
    ));
    failed_with(&ran, &["myapp", "did not finish within 3 s"]);
    assert_unchanged(&host, &before, &ran);
    // Three attempts of 3 s and back-offs of 1 + 2 s: about 12 s.
    assert_quick(elapsed, Duration::from_secs(20), &ran);
}

/// 3: `Content-Length: 10737418240` is refused from the headers alone: the
/// server then sends nothing, so reading would hang until the 25 s timeout.
#[test]
fn ten_gib_content_length_is_refused_before_reading() {
    let srv = Hostile::start(|req, stream, ctl| {
        if !req.is("GET", "/api/v1/download/myapp") {
            return false;
        }
        if download_head(stream, "Content-Length: 10737418240\r\n") {
            ctl.hold(stream);
        }
        true
    });
    let host = outdated(&srv, &["myapp"]);
    let before = snapshot(&host);

    let (ran, elapsed) = run(agent(
        &host,
        &srv,
        &["--timeout", "2", "--download-timeout", "25"],
    ));
    let line = failed_with(&ran, &["myapp", "limit"]);
    assert!(
        line.contains("10737418240") && line.contains("2.0 GiB"),
        "the size and the limit are not named: {line}"
    );
    assert_unchanged(&host, &before, &ran);
    assert_quick(elapsed, Duration::from_secs(8), &ran);
    assert_eq!(srv.count("GET", "/api/v1/download/myapp"), 1);
}

/// 4: one byte per second ends by `--download-timeout 3`.
#[test]
fn one_byte_per_second_ends_by_download_timeout() {
    let srv = Hostile::start(|req, stream, ctl| {
        if !req.is("GET", "/api/v1/download/myapp") {
            return false;
        }
        if download_head(stream, "Content-Length: 100\r\n") {
            for _ in 0..100 {
                if stream.write_all(b"z").is_err() || !ctl.pause(Duration::from_secs(1)) {
                    break;
                }
            }
        }
        true
    });
    let host = outdated(&srv, &["myapp"]);
    let before = snapshot(&host);

    let (ran, elapsed) = run(agent(
        &host,
        &srv,
        &["--timeout", "2", "--download-timeout", "3"],
    ));
    failed_with(&ran, &["myapp", "did not finish within 3 s"]);
    assert_unchanged(&host, &before, &ran);
    assert_quick(elapsed, Duration::from_secs(20), &ran);
}

// ---------------------------------------------------------------------------
// 5: silence
// ---------------------------------------------------------------------------

/// 5: `bins/NAME` is accepted and never answered.
#[test]
fn silent_bins_answer_ends_by_timeout() {
    let srv = Hostile::start(|req, stream, ctl| {
        if !req.is("GET", "/api/v1/bins/myapp") {
            return false;
        }
        ctl.hold(stream);
        true
    });
    let host = outdated(&srv, &["myapp"]);
    let before = snapshot(&host);

    let (ran, elapsed) = run(agent(
        &host,
        &srv,
        &["--timeout", "2", "--download-timeout", "3"],
    ));
    failed_with(&ran, &["myapp", "no answer within 2 s"]);
    assert_unchanged(&host, &before, &ran);
    assert_quick(elapsed, Duration::from_secs(10), &ran);
    assert_eq!(srv.count("GET", "/api/v1/download/myapp"), 0);
}

/// 5 (cont.): a silent keepalive (GET and POST) is logged and the run goes
/// on: the upgrade still happens (§4.3).
#[test]
fn silent_keepalive_does_not_stop_the_upgrade() {
    let srv = Hostile::start(|req, stream, ctl| {
        if req.path != "/api/v1/keepalive" {
            return false;
        }
        ctl.hold(stream);
        true
    });
    let host = outdated(&srv, &["myapp"]);

    let (ran, elapsed) = run(agent(
        &host,
        &srv,
        &["--timeout", "2", "--download-timeout", "3"],
    ));
    assert_eq!(ran.code, 0, "exit code\n--- stderr\n{}", ran.stderr);
    log_line(&ran, &["keepalive", "no answer within 2 s"]);
    log_line(&ran, &["myapp", "upgraded"]);
    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
    assert_eq!(mode(&host.target("myapp")), 0o750);
    assert!(host.manifest_text().contains(&md5_hex(NEW)));
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
    assert_quick(elapsed, Duration::from_secs(10), &ran);
}

// ---------------------------------------------------------------------------
// 6, 7: redirects
// ---------------------------------------------------------------------------

/// 6: the download redirects to itself forever.
#[test]
fn redirect_loop_gives_up_after_three_redirects() {
    let srv = Hostile::start(|req, stream, ctl| {
        if !req.is("GET", "/api/v1/download/myapp") {
            return false;
        }
        let head = format!(
            "HTTP/1.1 302 Found\r\nLocation: {}{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            ctl.base, req.target
        );
        let _ = stream.write_all(head.as_bytes());
        true
    });
    let host = outdated(&srv, &["myapp"]);
    let before = snapshot(&host);

    let (ran, elapsed) = run(agent(
        &host,
        &srv,
        &["--timeout", "2", "--download-timeout", "3"],
    ));
    failed_with(&ran, &["myapp", "more than 3 redirects"]);
    assert_unchanged(&host, &before, &ran);
    assert_quick(elapsed, Duration::from_secs(15), &ran);
    let n = srv.count("GET", "/api/v1/download/myapp");
    assert!(
        (1..=4).contains(&n),
        "the server got {n} requests for a redirect loop (1 + 3 redirects = 4 expected); \
         a deterministic redirect loop is retried as if it were transient \
         (src/install.rs retryable(): Error::Http => true)\n--- stderr\n{}",
        ran.stderr
    );
}

/// 7: the download redirects to another origin (another port), which serves
/// the right bytes: the upgrade succeeds, and the token stays home.
#[test]
fn cross_origin_redirect_succeeds_without_the_token() {
    let mirror = Hostile::start(|req, stream, _| {
        if req.is("GET", "/files/myapp") {
            respond(stream, 200, "application/octet-stream", NEW);
        } else {
            respond(stream, 404, "text/plain", b"no");
        }
        true
    });
    let to = format!("{}/files/myapp", mirror.base());
    let srv = Hostile::start(move |req, stream, _| {
        if !req.is("GET", "/api/v1/download/myapp") {
            return false;
        }
        let head = format!(
            "HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let _ = stream.write_all(head.as_bytes());
        true
    });
    let host = outdated(&srv, &["myapp"]);

    let mut cmd = agent(&host, &srv, &["--timeout", "2", "--download-timeout", "3"]);
    cmd.env("BIN_MANAGER_TOKEN", "s3cret");
    let (ran, _) = run(cmd);
    assert_eq!(ran.code, 0, "exit code\n--- stderr\n{}", ran.stderr);
    log_line(&ran, &["myapp", "upgraded"]);
    assert!(!ran.stderr.contains("s3cret"), "token in the log");
    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
    assert_eq!(mode(&host.target("myapp")), 0o750);
    assert!(host.manifest_text().contains(&md5_hex(NEW)));
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );

    let home = srv.requests();
    assert_eq!(srv.count("GET", "/api/v1/download/myapp"), 1);
    for r in &home {
        assert_eq!(
            r.header("authorization"),
            Some("Bearer s3cret"),
            "{} {}",
            r.method,
            r.target
        );
    }
    let away = mirror.requests();
    assert_eq!(away.len(), 1, "{away:?}");
    for r in &away {
        assert_eq!(
            r.header("authorization"),
            None,
            "the token leaked to another origin: {} {}",
            r.method,
            r.target
        );
    }
}

// ---------------------------------------------------------------------------
// 8: header bombs
// ---------------------------------------------------------------------------

/// 8: 200 KiB of response headers (many lines; one huge line; on the
/// download) and a 100 KiB status line: refused, with a message about them.
#[test]
fn oversized_response_headers_are_refused() {
    let srv = Hostile::start(|req, stream, _| {
        let pad = "a".repeat(1000);
        let head = match req.path.as_str() {
            "/api/v1/bins/lines" | "/api/v1/download/dlhead" if req.method == "GET" => {
                let mut h = String::from("HTTP/1.1 200 OK\r\n");
                for i in 0..205 {
                    h.push_str(&format!("X-Pad-{i}: {pad}\r\n"));
                }
                h
            }
            "/api/v1/bins/oneline" if req.method == "GET" => {
                format!("HTTP/1.1 200 OK\r\nX-Huge: {}\r\n", "b".repeat(200 * 1024))
            }
            "/api/v1/bins/status" if req.method == "GET" => {
                format!("HTTP/1.1 200 {}\r\n", "c".repeat(100 * 1024))
            }
            _ => return false,
        };
        let body = bins_answer("x", &md5_hex(NEW));
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(
            format!(
                "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        true
    });
    let host = outdated(&srv, &["lines", "oneline", "dlhead", "status"]);
    let before = snapshot(&host);

    let (ran, elapsed) = run(agent(
        &host,
        &srv,
        &["--timeout", "2", "--download-timeout", "3"],
    ));
    failed_with(&ran, &["lines:", "header"]);
    failed_with(&ran, &["oneline:", "header"]);
    failed_with(&ran, &["dlhead:", "header"]);
    failed_with(&ran, &["status:", "status line"]);
    log_line(&ran, &["4 binaries", "4 failed"]);
    assert_unchanged(&host, &before, &ran);
    assert_quick(elapsed, Duration::from_secs(20), &ran);
}

// ---------------------------------------------------------------------------
// 9: malformed answers to `bins/NAME`
// ---------------------------------------------------------------------------

/// The corpus: (binary name, body, words its log line must hold).
fn corpus() -> Vec<(&'static str, Vec<u8>, &'static [&'static str])> {
    let h = md5_hex(NEW);
    let mut deep = "[".repeat(100_000).into_bytes();
    deep.extend(std::iter::repeat_n(b']', 100_000));
    let mut big = format!(r#"{{"code":200,"data":{{"hash":"{h}","pad":""#).into_bytes();
    big.extend(std::iter::repeat_n(b'p', 2 << 20));
    big.extend_from_slice(b"\"}}");
    let mut bad_utf8 = b"{\"code\":200,\"data\":{\"hash\":\"".to_vec();
    bad_utf8.extend_from_slice(b"\xff\xfe\xc3\x28\xa0\xa1");
    bad_utf8.extend_from_slice(b"\"}}");
    vec![
        ("open-brace", b"{".to_vec(), &["invalid JSON"]),
        (
            "cut-short",
            br#"{"code":200,"data":{"hash":"#.to_vec(),
            &["invalid JSON"],
        ),
        ("empty-array", b"[]".to_vec(), &["no \"hash\""]),
        ("bare-string", br#""str""#.to_vec(), &["no \"hash\""]),
        ("null", b"null".to_vec(), &["no \"data\""]),
        ("empty-body", Vec::new(), &["no \"data\""]),
        (
            "hash-number",
            br#"{"code":200,"data":{"hash":123}}"#.to_vec(),
            &["\"hash\" must be a string"],
        ),
        (
            "hash-zz",
            br#"{"code":200,"data":{"hash":"zz"}}"#.to_vec(),
            &["\"hash\" is not an md5"],
        ),
        ("deep", deep, &["invalid JSON", "nested too deeply"]),
        ("two-mib", big, &["larger than 1 MiB"]),
        (
            "raw-bytes",
            b"\xff\xfe\x00\x01\xc3\x28garbage".to_vec(),
            &["invalid JSON"],
        ),
        ("utf8-hash", bad_utf8, &["\"hash\" is not an md5"]),
        (
            "html",
            b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>oops</body></html>"
                .to_vec(),
            &["invalid JSON"],
        ),
    ]
}

/// 9: each binary of one manifest gets a different malformed answer; each
/// fails on its own with a clear message, nothing is downloaded or changed.
#[test]
fn malformed_bins_answers_fail_each_binary_clearly() {
    let corpus = corpus();
    let bodies: HashMap<String, Vec<u8>> = corpus
        .iter()
        .map(|(n, b, _)| (format!("/api/v1/bins/{n}"), b.clone()))
        .collect();
    let srv = Hostile::start(move |req, stream, _| match bodies.get(&req.path) {
        Some(body) if req.method == "GET" => {
            respond(stream, 200, "application/json", body);
            true
        }
        _ => false,
    });
    let names: Vec<&str> = corpus.iter().map(|(n, _, _)| *n).collect();
    let host = outdated(&srv, &names);
    let before = snapshot(&host);

    let (ran, elapsed) = run(agent(
        &host,
        &srv,
        &["--timeout", "2", "--download-timeout", "3"],
    ));
    assert_eq!(ran.code, 1, "exit code\n--- stderr\n{}", ran.stderr);
    for (name, _, words) in &corpus {
        let prefix = format!("{name}: ");
        let mut all = vec![prefix.as_str(), "/api/v1/bins/"];
        all.extend_from_slice(words);
        failed_with(&ran, &all);
    }
    log_line(
        &ran,
        &[
            &format!("{} binaries", corpus.len()),
            &format!("{} failed", corpus.len()),
        ],
    );
    for line in ran.stderr.lines() {
        assert!(line.len() < 2000, "an overlong log line: {}…", &line[..200]);
    }
    assert_quick(elapsed, Duration::from_secs(10), &ran);
    assert_unchanged(&host, &before, &ran);
    let downloads = srv
        .requests()
        .iter()
        .filter(|r| r.path.starts_with("/api/v1/download/"))
        .count();
    assert_eq!(downloads, 0);
}

/// 9 (cont.): `"code":"200"` (a string). The agent takes only a number as
/// the success code, so this is an error naming the code, nothing changed.
#[test]
fn code_as_a_string_is_a_clear_error() {
    let body = format!(r#"{{"code":"200","data":{{"hash":"{}"}}}}"#, md5_hex(NEW));
    let srv = Hostile::start(move |req, stream, _| {
        if !req.is("GET", "/api/v1/bins/myapp") {
            return false;
        }
        respond_json(stream, 200, &body);
        true
    });
    let host = outdated(&srv, &["myapp"]);
    let before = snapshot(&host);

    let (ran, _) = run(agent(
        &host,
        &srv,
        &["--timeout", "2", "--download-timeout", "3"],
    ));
    failed_with(&ran, &["myapp", "code \"200\""]);
    assert_unchanged(&host, &before, &ran);
    assert_eq!(srv.count("GET", "/api/v1/download/myapp"), 0);
}

// ---------------------------------------------------------------------------
// 10: the server's `data.name` is not a path
// ---------------------------------------------------------------------------

fn files_named(dir: &Path, names: &[&str], depth: usize, found: &mut Vec<PathBuf>) {
    if depth > 8 {
        return;
    }
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if names.iter().any(|n| e.file_name() == *n) {
            found.push(p.clone());
        }
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            files_named(&p, names, depth + 1, found);
        }
    }
}

/// 10: `data.name` of `../../etc/passwd` or an absolute path is ignored: the
/// agent installs at the manifest's path only and creates nothing elsewhere.
#[test]
fn server_supplied_name_never_becomes_a_path() {
    let h = md5_hex(NEW);
    let host = Host::new();
    let evil = host.dir.join("elsewhere/evil");
    let answers: HashMap<&str, String> = [
        ("myapp", "../../etc/passwd".to_string()),
        ("other", evil.display().to_string()),
        ("third", "../opt2/third".to_string()),
    ]
    .into_iter()
    .map(|(n, evil_name)| {
        (
            n,
            format!(
                r#"{{"code":200,"message":"Success","data":{{"name":{},"version":"latest","hash":"{h}"}}}}"#,
                json_string(&evil_name)
            ),
        )
    })
    .collect();
    let srv = Hostile::start(move |req, stream, _| {
        let Some(name) = req.path.strip_prefix("/api/v1/bins/") else {
            return false;
        };
        match answers.get(name) {
            Some(body) if req.method == "GET" => {
                respond_json(stream, 200, body);
                true
            }
            _ => false,
        }
    });
    let old = md5_hex(OLD);
    for name in ["myapp", "other", "third"] {
        install_file(&host, name, OLD, 0o750);
        srv.publish(name, NEW);
    }
    write_manifest(&host, &[("myapp", &old), ("other", &old), ("third", &old)]);
    let tmp = host.dir.path.parent().unwrap().to_path_buf();
    let outside = [
        tmp.join("etc/passwd"),
        tmp.join("passwd"),
        tmp.join("opt2/third"),
        host.dir.join("etc/passwd"),
        host.dir.join("opt2/third"),
        evil.clone(),
    ];
    let existed: Vec<Option<Vec<u8>>> = outside.iter().map(|p| fs::read(p).ok()).collect();

    let (ran, _) = run(agent(
        &host,
        &srv,
        &["--timeout", "2", "--download-timeout", "3"],
    ));
    assert_eq!(ran.code, 0, "exit code\n--- stderr\n{}", ran.stderr);
    for name in ["myapp", "other", "third"] {
        log_line(&ran, &[&format!("{name}:"), "upgraded"]);
        assert_eq!(fs::read(host.target(name)).unwrap(), NEW);
        assert_eq!(mode(&host.target(name)), 0o750);
    }
    for (p, was) in outside.iter().zip(&existed) {
        assert_eq!(&fs::read(p).ok(), was, "{} was touched", p.display());
    }
    let mut found = Vec::new();
    files_named(
        &host.dir.path,
        &["passwd", "evil", "opt2", "elsewhere"],
        0,
        &mut found,
    );
    assert!(
        found.is_empty(),
        "files created from the server's name: {found:?}"
    );
    let listing: Vec<String> = fs::read_dir(&host.opt)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    for n in &listing {
        assert!(
            ["myapp", "other", "third"]
                .iter()
                .any(|b| n == b || *n == format!("{b}.bak")),
            "unexpected file in opt: {n} ({listing:?})"
        );
    }
    let manifest = host.manifest_text();
    assert!(
        !manifest.contains("passwd") && !manifest.contains("evil"),
        "{manifest}"
    );
    assert!(manifest.contains("\"name\": \"myapp\""), "{manifest}");
    assert!(manifest.contains(NODE), "{manifest}");
    for r in srv.requests() {
        assert!(
            !r.target.contains("passwd") && !r.target.contains("evil") && !r.target.contains(".."),
            "a request used the server's name: {} {}",
            r.method,
            r.target
        );
    }
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
}

/// The normal server works end to end (the harness itself is sound).
#[test]
fn normal_server_upgrades() {
    let srv = Hostile::normal();
    let host = outdated(&srv, &["myapp"]);
    let (ran, _) = run(agent(
        &host,
        &srv,
        &["--timeout", "2", "--download-timeout", "3"],
    ));
    assert_eq!(ran.code, 0, "exit code\n--- stderr\n{}", ran.stderr);
    assert_eq!(fs::read(host.target("myapp")).unwrap(), NEW);
    assert_eq!(mode(&host.target("myapp")), 0o750);
    assert_eq!(srv.count("POST", "/api/v1/bins/myapp"), 1);
    assert!(srv.count("POST", "/api/v1/keepalive") >= 1);
}

// ---------------------------------------------------------------------------
// 12: the server's words cannot forge the agent's log
// ---------------------------------------------------------------------------

/// A server `message` holding a newline and a whole forged log line, CR,
/// ESC sequences (erase line, OSC window title), BEL, a C1 CSI, a bidi
/// override and 10,000 more bytes: in the agent's log it is escaped text,
/// capped, on the one line of the event it belongs to.
#[test]
fn server_messages_cannot_forge_log_lines_or_drive_the_terminal() {
    let forged = format!(
        "nope\n2026-11-24T08:00:01Z INFO myapp: upgraded 1f3a2b4c…→9c0d1e2f… (12.4 MiB), restarted, RUNNING\r\x1b[2K\x1b]0;owned\x07\x07\u{9b}31m\u{202e}{}",
        "x".repeat(10_000)
    );
    let (in_envelope, in_500) = (
        format!(
            r#"{{"code":1,"message":{},"data":null}}"#,
            json_string(&forged)
        ),
        format!(r#"{{"code":500,"message":{}}}"#, json_string(&forged)),
    );
    let srv = Hostile::start(move |req, stream, _| {
        if req.is("GET", "/api/v1/bins/myapp") {
            respond_json(stream, 200, &in_envelope);
        } else if req.is("GET", "/api/v1/bins/other") {
            respond_json(stream, 500, &in_500);
        } else {
            return false;
        }
        true
    });
    let host = outdated(&srv, &["myapp", "other"]);
    let before = snapshot(&host);

    let (ran, _) = run(agent(&host, &srv, &["--timeout", "2"]));
    assert_eq!(ran.code, 1, "{}", ran.stderr);
    assert_unchanged(&host, &before, &ran);
    let raw = ran.stderr.as_bytes();
    let controls: Vec<u8> = raw
        .iter()
        .copied()
        .filter(|&b| (b < 0x20 && b != b'\n') || b == 0x7f)
        .collect();
    assert!(
        controls.is_empty(),
        "raw control bytes in the log: {controls:?}"
    );
    for c in ['\u{9b}', '\u{202e}'] {
        assert!(!ran.stderr.contains(c), "{c:?} reached the log raw");
    }
    // Exactly the lines of this run, each one event: timestamp, level, subject.
    let events: Vec<(&str, &str)> = ran
        .stderr
        .lines()
        .map(|l| {
            let mut words = l.splitn(4, ' ');
            let (at, level, subject) = (
                words.next().unwrap_or(""),
                words.next().unwrap_or(""),
                words.next().unwrap_or(""),
            );
            let stamp = at.len() == 20
                && at.ends_with('Z')
                && at.as_bytes()[10] == b'T'
                && at.bytes().filter(u8::is_ascii_digit).count() == 14;
            assert!(stamp, "a line that is not an event of this run: {l:?}");
            assert!(
                l.len() < 1200,
                "an outside string was not capped: {} bytes",
                l.len()
            );
            (level, subject)
        })
        .collect();
    assert_eq!(
        events,
        [
            ("INFO", "registered"),
            ("ERROR", "myapp:"),
            ("ERROR", "other:"),
            ("ERROR", "2")
        ],
        "\n{}",
        ran.stderr
    );
    // The message is there, as text.
    for (name, code) in [
        ("myapp", "server answered 200: code 1: "),
        ("other", "server answered 500: "),
    ] {
        let line = log_line(&ran, &[&format!("ERROR {name}:"), code]);
        assert!(
            line.contains(
                "nope\\n2026-11-24T08:00:01Z INFO myapp: upgraded 1f3a2b4c…→9c0d1e2f… (12.4 MiB), restarted, RUNNING\\r\\x1b[2K\\x1b]0;owned\\x07\\x07\\u{009b}31m\\u{202e}xxx"
            ),
            "{line}"
        );
        assert!(line.ends_with("x…"), "not capped: {line}");
    }
}
