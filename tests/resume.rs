use testkit as common;

// Resumable downloads across runs (issue 16): a download cut off leaves its
// temp file and a journal entry; the next run asks for the rest with
// `Range: bytes=N-` under `If-Range`, takes only a 206 that starts at N, and
// starts over on anything else — never appending a whole file to a part.
// Each test checks the requests on the wire, the managed file's bytes, the
// log line an operator reads, and what is left beside the target.

use common::host::{log_line, Host, Ran};
use common::manager::Manager;
use common::{md5_hex, temp_files, wait_until, Fault, Request};
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const OLD: &[u8] = b"#!/bin/sh\necho old build\n";
/// Not a multiple of the agent's 128 KiB blocks.
const LEN: usize = 300_000;
const HALF: usize = 150_000;

/// A body of `len` bytes that is not all one byte.
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// A host managing `app` (holding OLD, recorded) with `new` published.
fn outdated_host(new: &[u8]) -> Host {
    let host = Host::new();
    let target = host.target("app");
    fs::write(&target, OLD).unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
    host.manifest_for(&[("app", &md5_hex(OLD))]);
    host.server.publish("app", new);
    host
}

fn state_text(host: &Host) -> String {
    let mut p = host.manifest.as_os_str().to_owned();
    p.push(".state");
    fs::read_to_string(PathBuf::from(p)).unwrap_or_default()
}

/// The journalled byte count of the partial download, if one is journalled.
fn journalled(host: &Host) -> Option<u64> {
    let text = state_text(host);
    let at = text.find("\"partialDownloads\"")?;
    let rest = &text[at..];
    let rest = &rest[rest.find("\"bytes\":")? + 8..];
    rest.trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn downloads(host: &Host) -> Vec<Request> {
    host.server
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/api/v1/download/"))
        .collect()
}

/// Run 1 against a server that never sends a byte past HALF: it fails, the
/// first HALF bytes stay beside the target, journalled.
fn cut_at_half(body: &[u8]) -> Host {
    let host = outdated_host(body);
    host.server.fault("app", Fault::CutAt(HALF));
    let ran = host.run(&[]);
    assert_ne!(ran.code, 0, "{}", ran.stderr);
    log_line(&ran, &["app", "truncated"]);
    assert_eq!(fs::read(host.target("app")).unwrap(), OLD);
    assert_eq!(
        journalled(&host),
        Some(HALF as u64),
        "{}",
        state_text(&host)
    );
    let parts = temp_files(&host.opt);
    assert_eq!(parts.len(), 1, "{parts:?}");
    assert_eq!(
        fs::read(host.opt.join(&parts[0])).unwrap(),
        &body[..HALF],
        "the partial file holds the bytes received"
    );
    // Within the run, the retries already asked for the rest.
    let asked: Vec<_> = downloads(&host)
        .iter()
        .map(|r| r.header("range").unwrap_or("").to_string())
        .collect();
    assert_eq!(
        asked,
        ["", &format!("bytes={HALF}-"), &format!("bytes={HALF}-")],
        "{}",
        ran.stderr
    );
    host.server.clear_requests();
    host
}

/// The run converged: exit 0, the new bytes in place, recorded, no journal,
/// nothing left beside the target.
fn converged(host: &Host, ran: &Ran, body: &[u8]) {
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    let got = fs::read(host.target("app")).unwrap();
    assert_eq!(got.len(), body.len(), "{}", ran.stderr);
    assert!(got == body, "wrong bytes in place\n{}", ran.stderr);
    assert!(host.manifest_text().contains(&md5_hex(body)));
    assert_eq!(journalled(host), None, "{}", state_text(host));
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
}

/// (a) Cut halfway: the next run resumes with `Range: bytes=HALF-` under
/// `If-Range: "<md5>"` and ends with the right bytes.
#[test]
fn a_download_cut_halfway_resumes_on_the_next_run() {
    let body = pattern(LEN);
    let host = cut_at_half(&body);
    host.server.fault("app", Fault::Ranges);
    let ran = host.run(&[]);
    converged(&host, &ran, &body);
    let d = downloads(&host);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(
        d[0].header("range"),
        Some(format!("bytes={HALF}-").as_str())
    );
    let etag = format!("\"{}\"", md5_hex(&body));
    assert_eq!(d[0].header("if-range"), Some(etag.as_str()));
    log_line(
        &ran,
        &["app", "resuming the download at 146.5 KiB of 293.0 KiB"],
    );
}

/// (b) A server that ignores `Range` (200, whole file): the file is right,
/// not the part followed by the whole.
#[test]
fn a_200_to_a_range_request_starts_over_and_never_appends() {
    let body = pattern(LEN);
    let host = cut_at_half(&body);
    host.server.fault("app", Fault::IgnoreRange);
    let ran = host.run(&[]);
    converged(&host, &ran, &body);
    let d = downloads(&host);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(
        d[0].header("range"),
        Some(format!("bytes={HALF}-").as_str())
    );
    log_line(
        &ran,
        &[
            "app",
            "not resuming",
            "the server sent the whole file (status 200)",
        ],
    );
}

/// (c) A 206 from another offset than asked: not used; the whole file is
/// asked for again.
#[test]
fn a_206_at_a_wrong_offset_starts_over() {
    let body = pattern(LEN);
    let host = cut_at_half(&body);
    host.server.fault("app", Fault::RangeFrom(1000));
    let ran = host.run(&[]);
    converged(&host, &ran, &body);
    let asked: Vec<_> = downloads(&host)
        .iter()
        .map(|r| r.header("range").map(str::to_string))
        .collect();
    assert_eq!(asked, [Some(format!("bytes={HALF}-")), None]);
    log_line(
        &ran,
        &[
            "app",
            "not resuming",
            "answered 206 with Content-Range \"bytes 1000-299999/300000\", not bytes 150000-",
        ],
    );
}

/// (d) A 416 to the rest: started over; and a partial that is already the
/// whole file is answered 416 and just verified.
#[test]
fn a_416_starts_over_or_verifies_a_complete_partial() {
    let body = pattern(LEN);
    let host = cut_at_half(&body);
    host.server.fault("app", Fault::RangeUnsatisfiable);
    let ran = host.run(&[]);
    converged(&host, &ran, &body);
    let asked: Vec<_> = downloads(&host)
        .iter()
        .map(|r| r.header("range").map(str::to_string))
        .collect();
    assert_eq!(asked, [Some(format!("bytes={HALF}-")), None]);
    log_line(&ran, &["app", "not resuming", "416"]);

    // Complete on disk (killed between the last byte and the swap): the
    // journal says LEN bytes; the server has nothing more to send.
    let host = cut_at_half(&body);
    let part = host.opt.join(&temp_files(&host.opt)[0]);
    fs::write(&part, &body).unwrap();
    let mut state = PathBuf::from(host.manifest.as_os_str().to_owned());
    state.as_mut_os_string().push(".state");
    let text = fs::read_to_string(&state).unwrap();
    let text = text.replace(&format!("\"bytes\": {HALF}"), &format!("\"bytes\": {LEN}"));
    fs::write(&state, text).unwrap();
    assert_eq!(journalled(&host), Some(LEN as u64));
    host.server.fault("app", Fault::Ranges);
    let ran = host.run(&[]);
    converged(&host, &ran, &body);
    let d = downloads(&host);
    assert_eq!(d.len(), 1, "verified, not downloaded again: {d:?}");
    assert_eq!(d[0].header("range"), Some(format!("bytes={LEN}-").as_str()));
}

/// A resumed download that does not verify is discarded: the next run
/// starts from byte 0 (it never loops on a bad partial).
#[test]
fn a_resumed_download_that_does_not_verify_is_discarded() {
    let body = pattern(LEN);
    let host = cut_at_half(&body);
    // The part on disk is damaged (a bad disk, a bug): the whole does not verify.
    let part = host.opt.join(&temp_files(&host.opt)[0]);
    let mut bad = body[..HALF].to_vec();
    bad[10] ^= 0xff;
    fs::write(&part, &bad).unwrap();
    host.server.fault("app", Fault::Ranges);
    let ran = host.run(&[]);
    assert_ne!(ran.code, 0, "{}", ran.stderr);
    log_line(&ran, &["app", "the resumed download does not verify"]);
    assert_eq!(fs::read(host.target("app")).unwrap(), OLD);
    assert_eq!(journalled(&host), None, "{}", state_text(&host));
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
    host.server.clear_requests();
    let ran = host.run(&[]);
    converged(&host, &ran, &body);
    let d = downloads(&host);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].header("range"), None);
}

/// Another build published since the cut: the partial is discarded.
#[test]
fn a_new_build_discards_the_partial() {
    let body = pattern(LEN);
    let host = cut_at_half(&body);
    let newer = pattern(LEN + 5);
    host.server.publish("app", &newer);
    host.server.fault("app", Fault::Ranges);
    let ran = host.run(&[]);
    converged(&host, &ran, &newer);
    log_line(
        &ran,
        &["app", "discarded the download of", "cut off at 146.5 KiB"],
    );
    let d = downloads(&host);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].header("range"), None);
}

/// No ETag, no resume: a cut download from a server without one leaves
/// nothing behind (as before), and an idle run writes no state.
#[test]
fn without_an_etag_nothing_is_kept_and_idle_runs_write_nothing() {
    let body = pattern(LEN);
    let host = outdated_host(&body);
    host.server.fault("app", Fault::Truncate(HALF));
    let ran = host.run(&[]);
    assert_ne!(ran.code, 0, "{}", ran.stderr);
    assert!(
        temp_files(&host.opt).is_empty(),
        "{:?}",
        temp_files(&host.opt)
    );
    assert_eq!(journalled(&host), None);
    assert!(downloads(&host).iter().all(|r| r.header("range").is_none()));
    host.server.fault("app", Fault::Ranges);
    converged(&host, &host.run(&[]), &body);
    let mut state = PathBuf::from(host.manifest.as_os_str().to_owned());
    state.as_mut_os_string().push(".state");
    let before = fs::metadata(&state).unwrap().modified().unwrap();
    let ran = host.run(&[]);
    assert_eq!(ran.code, 0, "{}", ran.stderr);
    assert_eq!(fs::metadata(&state).unwrap().modified().unwrap(), before);
}

/// An unjournalled partial (its entry lost) is swept like any temp file.
#[test]
fn an_unjournalled_partial_is_swept() {
    let body = pattern(LEN);
    let host = cut_at_half(&body);
    let mut state = PathBuf::from(host.manifest.as_os_str().to_owned());
    state.as_mut_os_string().push(".state");
    fs::remove_file(&state).unwrap();
    host.server.fault("app", Fault::Ranges);
    let ran = host.run(&[]);
    converged(&host, &ran, &body);
    log_line(&ran, &["app", "removed 1 temp file"]);
    assert_eq!(downloads(&host)[0].header("range"), None);
}

/// (e) kill -9 mid-download: the next run asks for the bytes the journal
/// says are on disk, and ends with the right file.
#[test]
fn a_run_killed_mid_download_resumes_where_the_journal_says() {
    let body = pattern(4 << 20);
    let host = outdated_host(&body);
    host.server
        .fault("app", Fault::Trickle(Duration::from_millis(20)));
    let mut child = host
        .command(&[])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn the run");
    // Killed with more bytes in the file than journalled (not yet synced):
    // those are cut off, never trusted.
    let journalled_some = wait_until(Duration::from_secs(20), || {
        let on_disk = temp_files(&host.opt)
            .first()
            .and_then(|f| fs::metadata(host.opt.join(f)).ok())
            .map_or(0, |m| m.len());
        journalled(&host).is_some_and(|n| n > 0 && on_disk > n)
    });
    child.kill().expect("kill -9");
    child.wait().unwrap();
    assert!(journalled_some, "never journalled: {}", state_text(&host));
    let at = journalled(&host).unwrap();
    assert!(at < body.len() as u64, "{at}");
    assert_eq!(fs::read(host.target("app")).unwrap(), OLD);
    host.server.fault("app", Fault::Ranges);
    host.server.clear_requests();
    let ran = host.run(&[]);
    converged(&host, &ran, &body);
    let d = downloads(&host);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(d[0].header("range"), Some(format!("bytes={at}-").as_str()));
}

// ---------------------------------------------------------------------------
// Against the real bin-manager
// ---------------------------------------------------------------------------

/// A TCP relay in front of bin-manager that records each request head and,
/// while `slow` is set, passes answers on at about 1 MiB/s.
struct Relay {
    port: u16,
    heads: Arc<Mutex<Vec<String>>>,
    slow: Arc<AtomicBool>,
}

impl Relay {
    fn start(upstream: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let heads = Arc::new(Mutex::new(Vec::new()));
        let slow = Arc::new(AtomicBool::new(true));
        let (h, s) = (heads.clone(), slow.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (h, s, up) = (h.clone(), s.clone(), upstream.clone());
                std::thread::spawn(move || relay(client, &up, &h, &s));
            }
        });
        Relay { port, heads, slow }
    }
}

fn relay(mut client: TcpStream, upstream: &str, heads: &Mutex<Vec<String>>, slow: &AtomicBool) {
    let Ok(mut server) = TcpStream::connect(upstream) else {
        return;
    };
    let _ = client.set_read_timeout(Some(Duration::from_secs(30)));
    let mut head = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match client.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    heads
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&head).into_owned());
    // The agent's requests carry no body the head did not bring.
    if server.write_all(&head).is_err() {
        return;
    }
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let want = if slow.load(Ordering::SeqCst) {
            16 * 1024
        } else {
            chunk.len()
        };
        match server.read(&mut chunk[..want]) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if client.write_all(&chunk[..n]).is_err() {
                    return;
                }
            }
        }
        if slow.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(15));
        }
    }
}

/// (f) bin-manager itself: a big download through a slow link, the agent
/// killed mid-way; the next run resumes with `Range` and `If-Range` (the
/// server's ETag), bin-manager answers 206, and the bytes in place are right.
#[test]
fn against_bin_manager_a_killed_download_resumes_with_the_right_bytes() {
    let m = Manager::start(&["--quiet"]);
    let body = pattern(8 << 20);
    m.publish_mv("app", &body);
    let relay = Relay::start(m.addr());
    let api = format!("http://127.0.0.1:{}/api/v1", relay.port);
    let agent = common::agent::Agent::new(OLD);
    let state = agent.dir.join("manifest.json.state");
    let journalled = || {
        let text = fs::read_to_string(&state).unwrap_or_default();
        let at = text.find("\"partialDownloads\"")?;
        let rest = &text[at..];
        let rest = &rest[rest.find("\"bytes\":")? + 8..];
        rest.trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse::<u64>()
            .ok()
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_bin-proxy"))
        .arg("--config")
        .arg(agent.dir.join("manifest.json"))
        .arg("--api")
        .arg(&api)
        .env_remove("BIN_PROXY_CONFIG")
        .env_remove("BIN_MANAGER_API")
        .env_remove("BIN_DOWNLOAD_URL")
        .env_remove("BIN_MANAGER_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let seen = wait_until(Duration::from_secs(30), || {
        journalled().is_some_and(|n| n > 0)
    });
    child.kill().expect("kill -9");
    child.wait().unwrap();
    assert!(seen, "never journalled");
    let at = journalled().unwrap();
    assert!(at < body.len() as u64, "{at}");
    assert!(agent.target() == OLD);

    relay.slow.store(false, Ordering::SeqCst);
    relay.heads.lock().unwrap().clear();
    let (code, log) = agent.run(&api, None);
    assert_eq!(code, 0, "{log}");
    assert!(agent.target() == body, "wrong bytes in place\n{log}");
    assert!(log.contains("resuming the download at"), "{log}");
    let heads = relay.heads.lock().unwrap().clone();
    let dl: Vec<_> = heads.iter().filter(|h| h.contains("/download/")).collect();
    assert_eq!(dl.len(), 1, "{heads:?}");
    assert!(
        dl[0].contains(&format!("Range: bytes={at}-\r\n")),
        "{}",
        dl[0]
    );
    assert!(
        dl[0].contains(&format!("If-Range: \"{}\"\r\n", md5_hex(&body))),
        "{}",
        dl[0]
    );
    assert!(
        temp_files(&agent.dir.join("opt")).is_empty(),
        "{:?}",
        temp_files(&agent.dir.join("opt"))
    );
}
