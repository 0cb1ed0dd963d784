//! A REAL headless Chromium (Debian's `chromium`) for the console's tests,
//! driven through the DevTools protocol over a pipe
//! (`--remote-debugging-pipe`: commands go in on the browser's fd 3,
//! answers and events come out of its fd 4, each one JSON message ending in
//! a NUL byte). No WebSocket, no port, no npm: `sh` maps the child's stdin
//! and stdout onto fds 3 and 4.
//!
//! Clicks and typing are real input events (`Input.dispatchMouseEvent`,
//! `Input.insertText`) at the element's place on the page, not `el.click()`.
//! Every script error, console error and Content-Security-Policy report the
//! page produces is collected; [`Browser::assert_clean`] fails on any.
//!
//! When chromium is missing, [`Browser::launch`] installs it with apt-get
//! (the packages `scripts/setup.sh` lists) and fails loudly when it cannot:
//! a console test never passes without having run.

use super::json::{try_parse, Json};
use super::{json_string, wait_until, TempDir};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// Debian's launcher.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// What the tests install when chromium is missing (as scripts/setup.sh does).
const PACKAGES: [&str; 2] = ["chromium", "fonts-dejavu-core"];
/// Longest wait for one DevTools answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for a condition on the page.
pub const PAGE_TIMEOUT: Duration = Duration::from_secs(20);
/// The window.
const WIDTH: u32 = 1280;
const HEIGHT: u32 = 1000;

/// One browser with one page.
pub struct Browser {
    child: Child,
    commands: ChildStdin,
    messages: Receiver<Json>,
    next_id: u64,
    session: String,
    /// Script errors, console errors and CSP reports, as text.
    problems: Vec<String>,
    stderr: Arc<Mutex<Vec<String>>>,
    _profile: TempDir,
    /// One browser at a time: the machine has two cores.
    _turn: MutexGuard<'static, ()>,
}

impl Browser {
    /// Starts chromium (installing it if needed) with a fresh profile and
    /// opens one blank page.
    pub fn launch() -> Browser {
        ensure_installed();
        static TURN: Mutex<()> = Mutex::new(());
        let turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
        let profile = TempDir::new();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg("exec \"$0\" \"$@\" 3<&0 4>&1 0</dev/null 1>&2")
            .arg(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-breakpad",
                "--disable-dev-shm-usage",
                "--hide-scrollbars",
                "--mute-audio",
                // Only 127.0.0.1 resolves: nothing leaves the machine.
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                "--remote-debugging-pipe",
                &format!("--window-size={WIDTH},{HEIGHT}"),
                &format!("--user-data-dir={}", profile.path.display()),
                "about:blank",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {CHROMIUM}: {e}"));
        let commands = child.stdin.take().expect("fd 3 pipe");
        let mut out = child.stdout.take().expect("fd 4 pipe");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let (tx, messages) = mpsc::channel();
        thread::spawn(move || {
            let mut pending = Vec::new();
            let mut buf = [0u8; 64 * 1024];
            while let Ok(n @ 1..) = out.read(&mut buf) {
                pending.extend_from_slice(&buf[..n]);
                while let Some(end) = pending.iter().position(|b| *b == 0) {
                    let msg: Vec<u8> = pending.drain(..=end).collect();
                    let text = String::from_utf8_lossy(&msg[..end]);
                    match try_parse(&text) {
                        Ok(j) => {
                            if tx.send(j).is_err() {
                                return;
                            }
                        }
                        Err(e) => eprintln!("browser: unreadable DevTools message ({e}): {text}"),
                    }
                }
            }
        });
        let errs = child.stderr.take().expect("stderr pipe");
        let lines = stderr.clone();
        thread::spawn(move || {
            for line in BufReader::new(errs).lines().map_while(Result::ok) {
                lines.lock().unwrap_or_else(|p| p.into_inner()).push(line);
            }
        });
        let mut b = Browser {
            child,
            commands,
            messages,
            next_id: 0,
            session: String::new(),
            problems: Vec::new(),
            stderr,
            _profile: profile,
            _turn: turn,
        };
        let target = b.browser_command("Target.createTarget", r#"{"url":"about:blank"}"#);
        let id = json_string(target.get("targetId").s());
        let attached = b.browser_command(
            "Target.attachToTarget",
            &format!(r#"{{"targetId":{id},"flatten":true}}"#),
        );
        b.session = attached.get("sessionId").s().to_string();
        for domain in ["Page", "Runtime", "Log"] {
            b.command(&format!("{domain}.enable"), "{}");
        }
        b.command(
            "Emulation.setDeviceMetricsOverride",
            &format!(
                r#"{{"width":{WIDTH},"height":{HEIGHT},"deviceScaleFactor":1,"mobile":false}}"#
            ),
        );
        b
    }

    /// A command to the page; returns its `result`.
    pub fn command(&mut self, method: &str, params: &str) -> Json {
        let session = self.session.clone();
        self.send(method, params, Some(&session))
    }

    fn browser_command(&mut self, method: &str, params: &str) -> Json {
        self.send(method, params, None)
    }

    fn send(&mut self, method: &str, params: &str, session: Option<&str>) -> Json {
        self.next_id += 1;
        let id = self.next_id;
        let session = session.map_or(String::new(), |s| {
            format!(",\"sessionId\":{}", json_string(s))
        });
        let msg = format!("{{\"id\":{id}{session},\"method\":\"{method}\",\"params\":{params}}}\0");
        if let Err(e) = self.commands.write_all(msg.as_bytes()) {
            panic!(
                "{method}: the browser is gone ({e}); its stderr:\n{}",
                self.stderr_text()
            );
        }
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.messages.recv_timeout(left) {
                Ok(m)
                    if m.opt("id").and_then(|v| match v {
                        Json::Num(n) => Some(*n as u64),
                        _ => None,
                    }) == Some(id) =>
                {
                    if let Some(err) = m.opt("error") {
                        panic!("{method} {params}: {err:?}");
                    }
                    return m.get("result").clone();
                }
                Ok(event) => self.note(&event),
                Err(RecvTimeoutError::Timeout) => {
                    panic!("{method}: no answer within {COMMAND_TIMEOUT:?}")
                }
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "{method}: the browser closed its pipe; its stderr:\n{}",
                    self.stderr_text()
                ),
            }
        }
    }

    /// Keeps the events that mean the page went wrong.
    fn note(&mut self, event: &Json) {
        let params = event.opt("params");
        let text = |j: Option<&Json>| j.and_then(Json::as_str).unwrap_or("").to_string();
        match event.opt("method").and_then(Json::as_str) {
            Some("Runtime.exceptionThrown") => {
                let d = params.and_then(|p| p.opt("exceptionDetails"));
                let desc = d
                    .and_then(|d| d.opt("exception"))
                    .and_then(|e| e.opt("description"));
                self.problems.push(format!(
                    "script error: {} {}",
                    text(d.and_then(|d| d.opt("text"))),
                    text(desc)
                ));
            }
            Some("Runtime.consoleAPICalled")
                if params.and_then(|p| p.opt("type")).and_then(Json::as_str) == Some("error") =>
            {
                self.problems.push(format!("console.error: {params:?}"));
            }
            // Failed loads (a 401 the page handles) come as "network"
            // entries; CSP violations as "security" ones.
            Some("Log.entryAdded") => {
                let entry = params.and_then(|p| p.opt("entry"));
                let field = |k| text(entry.and_then(|e| e.opt(k)));
                if field("source") != "network" && field("level") == "error" {
                    self.problems
                        .push(format!("{}: {}", field("source"), field("text")));
                }
            }
            _ => {}
        }
    }

    /// Loads `url` and waits for it to finish loading.
    pub fn goto(&mut self, url: &str) {
        self.command(
            "Page.navigate",
            &format!(r#"{{"url":{}}}"#, json_string(url)),
        );
        self.wait(
            "document.readyState === 'complete' && location.href !== 'about:blank'",
            "the page to load",
        );
    }

    /// Evaluates `js` in the page (awaiting a promise) and returns its value.
    pub fn eval(&mut self, js: &str) -> Json {
        let r = self.command(
            "Runtime.evaluate",
            &format!(
                r#"{{"expression":{},"returnByValue":true,"awaitPromise":true}}"#,
                json_string(js)
            ),
        );
        if let Some(d) = r.opt("exceptionDetails") {
            panic!("evaluating {js}: {d:?}");
        }
        r.get("result").opt("value").cloned().unwrap_or(Json::Null)
    }

    /// A string the page computes.
    pub fn text(&mut self, js: &str) -> String {
        match self.eval(js) {
            Json::Str(s) => s,
            other => panic!("{js}: not a string: {other:?}"),
        }
    }

    /// A number the page computes.
    pub fn number(&mut self, js: &str) -> f64 {
        match self.eval(js) {
            Json::Num(n) => n,
            other => panic!("{js}: not a number: {other:?}"),
        }
    }

    /// Waits (bounded) until `js` is `true`; panics naming `what`, with
    /// what the page shows.
    pub fn wait(&mut self, js: &str, what: &str) {
        let ok = wait_until(PAGE_TIMEOUT, || self.eval(js) == Json::Bool(true));
        if !ok {
            let shown = self.eval("document.body ? document.body.innerText : ''");
            panic!(
                "waited {PAGE_TIMEOUT:?} for {what} ({js}); the page shows:\n{}",
                shown.as_str().unwrap_or("")
            );
        }
    }

    /// Clicks the middle of the first element matching `selector` with the
    /// mouse, once it is visible and enabled.
    pub fn click(&mut self, selector: &str) {
        let sel = json_string(selector);
        self.wait(
            &format!(
                "(() => {{ const e = document.querySelector({sel}); if (!e || e.disabled) return false; \
                 e.scrollIntoView({{block: 'center'}}); const r = e.getBoundingClientRect(); \
                 return r.width > 0 && r.height > 0; }})()"
            ),
            &format!("{selector} to be clickable"),
        );
        let at = self.eval(&format!(
            "(() => {{ const r = document.querySelector({sel}).getBoundingClientRect(); \
             return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ));
        let (x, y) = (at.arr()[0].n(), at.arr()[1].n());
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.command(
                "Input.dispatchMouseEvent",
                &format!(r#"{{"type":"{kind}","x":{x},"y":{y},"button":"left","clickCount":1}}"#),
            );
        }
    }

    /// Clicks into `selector`, empties it and types `text`.
    pub fn type_into(&mut self, selector: &str, text: &str) {
        self.click(selector);
        self.eval(&format!(
            "document.querySelector({}).select()",
            json_string(selector)
        ));
        self.command(
            "Input.insertText",
            &format!(r#"{{"text":{}}}"#, json_string(text)),
        );
    }

    /// The top of the page (the window) as a PNG, written to `path`;
    /// returns its bytes.
    pub fn screenshot(&mut self, path: &Path) -> Vec<u8> {
        self.eval("window.scrollTo(0, 0)");
        let shot = self.command("Page.captureScreenshot", r#"{"format":"png"}"#);
        let png = base64_decode(shot.get("data").s());
        std::fs::write(path, &png).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        png
    }

    /// Fails on any script error, console error or CSP report so far.
    pub fn assert_clean(&mut self) {
        self.eval("0"); // drains the events sent before now
        assert!(
            self.problems.is_empty(),
            "the page reported:\n{}",
            self.problems.join("\n")
        );
    }

    fn stderr_text(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .join("\n")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self
            .commands
            .write_all(b"{\"id\":0,\"method\":\"Browser.close\"}\0");
        let exited = wait_until(Duration::from_secs(5), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Installs chromium when it is missing; panics, loudly, when that fails
/// (with or without CI=true: a console test never passes without a browser).
fn ensure_installed() {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        if Path::new(CHROMIUM).exists() {
            return Ok(());
        }
        eprintln!("browser: {CHROMIUM} is missing: installing {PACKAGES:?} with apt-get");
        let apt = |args: &[&str]| {
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("apt-get {args:?}: {e}"))
                .and_then(|o| match o.status.success() {
                    true => Ok(()),
                    false => Err(format!(
                        "apt-get {args:?} exited with {}: {}",
                        o.status,
                        String::from_utf8_lossy(&o.stderr).trim()
                    )),
                })
        };
        apt(&["-o", "DPkg::Lock::Timeout=300", "update", "-qq"])?;
        let mut install = vec![
            "-o",
            "DPkg::Lock::Timeout=300",
            "install",
            "-y",
            "-qq",
            "--no-install-recommends",
        ];
        install.extend(PACKAGES);
        apt(&install)?;
        match Path::new(CHROMIUM).exists() {
            true => Ok(()),
            false => Err(format!("{CHROMIUM} is still missing after apt-get install")),
        }
    });
    if let Err(e) = result {
        panic!(
            "\n\n*** the console tests need Debian's headless chromium ({CHROMIUM}), which is not \
             installed and could not be installed: {e}\n*** run scripts/setup.sh as root, then \
             the tests again (CI={}). ***\n",
            std::env::var("CI").unwrap_or_default()
        );
    }
}

/// Decodes standard base64 (what DevTools sends binary data in).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {:?}", char::from(c)),
    };
    let digits: Vec<u8> = text.bytes().filter(|c| *c != b'=').map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, d)| n | u32::from(*d) << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}
