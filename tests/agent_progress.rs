//! Downloads over 8 MiB report progress every few seconds (5 s): served
//! here by a server that holds most of the body back until the agent has
//! reported, so a run lasts about 5 s however loaded the machine is.
use testkit as common;

use common::host::{Host, Ran};
use common::{md5_hex, temp_files};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const SIZE: usize = 9 << 20;
/// The agent's interval between progress lines, plus a margin.
const REPORT_WITHIN: Duration = Duration::from_secs(6);

/// Serves `body` once: its first MiB, then 64 KiB every 100 ms (bytes keep
/// arriving, which is when the agent reports) until `enough(time since the
/// head was sent)`, then the rest at once. Bounded: the last chunk is never
/// held back (8 MiB at 640 KiB/s: 13 s).
fn throttled_server(body: Vec<u8>, enough: impl Fn(Duration) -> bool + Send + 'static) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/big", listener.local_addr().unwrap());
    thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
            if conn.read(&mut byte).unwrap_or(0) == 0 {
                return;
            }
            head.push(byte[0]);
        }
        let header = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        if conn.write_all(header.as_bytes()).is_err() {
            return;
        }
        let started = Instant::now();
        let (first, rest) = body.split_at(1 << 20);
        if conn.write_all(first).is_err() {
            return;
        }
        let mut rest = rest.chunks(64 << 10).peekable();
        while !enough(started.elapsed()) {
            let Some(chunk) = rest.next() else { break };
            if conn.write_all(chunk).is_err() {
                return;
            }
            // Never the last chunk: the download stays unfinished meanwhile.
            if rest.peek().is_none() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        for chunk in rest {
            if conn.write_all(chunk).is_err() {
                return;
            }
        }
    });
    url
}

/// Runs the agent on `host`, its log readable while it runs (`log`);
/// bounded.
fn run_watched(host: &Host, args: &[&str], log: &Arc<Mutex<String>>) -> Ran {
    let mut child = host
        .command(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start bin-proxy");
    let stderr = child.stderr.take().expect("stderr pipe");
    let reader = {
        let log = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let mut log = log.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        })
    };
    let exited = common::wait_until(Duration::from_secs(120), || {
        matches!(child.try_wait(), Ok(Some(_)))
    });
    if !exited {
        let _ = child.kill();
    }
    let code = child
        .wait()
        .expect("wait for bin-proxy")
        .code()
        .unwrap_or(-1);
    reader.join().unwrap();
    assert!(exited, "bin-proxy did not finish within 120 s");
    Ran {
        code,
        stdout: String::new(),
        stderr: log.lock().unwrap().clone(),
    }
}

#[test]
fn large_downloads_log_progress_lines() {
    let host = Host::new();
    let body: Vec<u8> = (0..SIZE).map(|i| (i % 251) as u8).collect();
    host.server.publish("big", &body);
    let manifest = |url: &str| {
        host.write_manifest(&format!(
            r#"{{"node":{{"name":"n"}},"binaries":[{{"name":"big","hash":"","path":"{}","downloadUrl":"{url}","restart":"none"}}]}}"#,
            host.target("big").display()
        ))
    };
    // The server finishes only once the agent has reported progress.
    let log = Arc::new(Mutex::new(String::new()));
    let watched = log.clone();
    manifest(&throttled_server(body.clone(), move |_| {
        watched.lock().unwrap().contains("big: downloading, ")
    }));

    let ran = run_watched(&host, &[], &log);
    ran.expect_code(0).expect_log("big: upgraded");
    let progress: Vec<&str> = ran
        .stderr
        .lines()
        .filter(|l| l.contains("big: downloading, "))
        .collect();
    assert!(!progress.is_empty(), "no progress line in\n{}", ran.stderr);
    for line in &progress {
        assert!(
            line.contains(" MiB of 9.0 MiB (") && line.ends_with("/s)"),
            "progress line: {line}"
        );
    }
    // Reported mid-download: the server held the rest back until then.
    assert!(
        !progress[0].contains("downloading, 9.0 MiB of"),
        "first progress line: {}",
        progress[0]
    );
    assert_eq!(
        md5_hex(&std::fs::read(host.target("big")).unwrap()),
        md5_hex(&body)
    );
    assert!(temp_files(&host.opt).is_empty());

    // With --quiet, progress (info) is not printed, though the download
    // lasts longer than the interval between progress lines.
    std::fs::remove_file(host.target("big")).unwrap();
    manifest(&throttled_server(body.clone(), |since| {
        since >= REPORT_WITHIN
    }));
    let started = Instant::now();
    let ran = run_watched(&host, &["--quiet"], &Arc::new(Mutex::new(String::new())));
    ran.expect_code(0);
    assert!(
        started.elapsed() >= REPORT_WITHIN,
        "the download was not held back"
    );
    assert_eq!(ran.stderr, "", "--quiet prints nothing on success");
    assert_eq!(
        md5_hex(&std::fs::read(host.target("big")).unwrap()),
        md5_hex(&body)
    );
}
