//! Downloads over 8 MiB report progress every few seconds: served here at
//! about 1.5 MiB/s by a throttled server, so one run lasts ~6 s.
mod common;

use common::host::Host;
use common::{md5_hex, temp_files};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

const SIZE: usize = 9 << 20;

/// Serves `body` once, in 1 MiB blocks 700 ms apart.
fn throttled_server(body: Vec<u8>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/big", listener.local_addr().unwrap());
    std::thread::spawn(move || {
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
        for block in body.chunks(1 << 20) {
            if conn.write_all(block).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(700));
        }
    });
    url
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
    manifest(&throttled_server(body.clone()));

    let ran = host.run(&[]);
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
    assert_eq!(
        md5_hex(&std::fs::read(host.target("big")).unwrap()),
        md5_hex(&body)
    );
    assert!(temp_files(&host.opt).is_empty());

    // With --quiet, progress (info) is not printed.
    std::fs::remove_file(host.target("big")).unwrap();
    manifest(&throttled_server(body));
    let ran = host.run(&["--quiet"]);
    ran.expect_code(0);
    assert_eq!(ran.stderr, "", "--quiet prints nothing on success");
}
