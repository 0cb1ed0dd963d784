//! Self-test of the integration-test fixture in `testkit/src/mod.rs`, using raw
//! `TcpStream` requests only.

use testkit as common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

fn get(url: &str) -> HttpResponse {
    http("GET", url, &[], b"")
}

#[test]
fn keepalive_is_404_until_registered_then_echoes_the_body() {
    let s = Server::start();
    let url = format!("{}/keepalive?node=edge-1", s.api());

    let r = get(&url);
    assert_eq!(r.status, 404);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.body_str(), r#"{"code":404,"message":"node not found"}"#);
    assert_eq!(s.registration("edge-1"), None);

    let body = r#"{"node":"edge-1","version":"1.2.3"}"#;
    let r = http(
        "POST",
        &url,
        &[
            ("Content-Type", "application/json"),
            ("Authorization", "Bearer s3cret"),
        ],
        body.as_bytes(),
    );
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body_str(),
        r#"{"code":200,"message":"Success","data":null}"#
    );
    assert_eq!(r.content_length(), Some(r.body.len()));
    assert_eq!(s.registration("edge-1").as_deref(), Some(body));

    let r = get(&url);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body_str(),
        format!(r#"{{"code":200,"message":"Success","data":{}}}"#, body)
    );

    s.register("edge-2", r#"{"pre":true}"#);
    let r = get(&format!("{}/keepalive?node=edge-2", s.api()));
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body_str(),
        r#"{"code":200,"message":"Success","data":{"pre":true}}"#
    );

    // Requests are recorded in order, with headers, query and body.
    let reqs = s.requests();
    assert_eq!(reqs.len(), 4);
    assert_eq!(reqs[1].method, "POST");
    assert_eq!(reqs[1].path, "/api/v1/keepalive");
    assert_eq!(reqs[1].query, "node=edge-1");
    assert_eq!(reqs[1].param("node").as_deref(), Some("edge-1"));
    assert_eq!(reqs[1].header("Authorization"), Some("Bearer s3cret"));
    assert_eq!(reqs[1].body_str(), body);
    assert_eq!(s.count("GET", "/api/v1/keepalive"), 3);
    assert_eq!(s.count("post", "/api/v1/keep"), 1);
    assert_eq!(s.count("*", "/api/v1/"), 4);
    s.clear_requests();
    assert!(s.requests().is_empty());
}

#[test]
fn bins_advertise_the_md5_in_both_styles() {
    let s = Server::start();
    let bytes = b"#!/bin/sh\necho hello\n";
    s.publish("tool", bytes);
    let hash = md5_hex(bytes);
    assert_eq!(s.published_hash("tool"), Some(hash.clone()));

    let url = format!("{}/bins/tool?arch=x86_64&version=1.0", s.api());
    let r = get(&url);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(
        r.body_str(),
        format!(
            r#"{{"code":200,"message":"Success","data":{{"name":"tool","version":"latest","hash":"{}"}}}}"#,
            hash
        )
    );
    let r = get(&format!("{}/bins/nope", s.api()));
    assert_eq!(r.status, 404);
    assert_eq!(r.body_str(), r#"{"code":404,"message":"binary not found"}"#);

    s.set_style(Style::Zero);
    assert_eq!(s.style(), Style::Zero);
    let r = get(&url);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body_str(),
        format!(
            r#"{{"code":0,"message":"success","data":{{"name":"tool","version":"latest","hash":"{}"}}}}"#,
            hash
        )
    );
    let r = get(&format!("{}/bins/nope", s.api()));
    assert_eq!(r.status, 404);
    assert_eq!(r.body_str(), r#"{"code":1,"message":"binary not found"}"#);
    let r = get(&format!("{}/keepalive?node=x", s.api()));
    assert_eq!(r.body_str(), r#"{"code":1,"message":"node not found"}"#);

    // Republishing replaces; unpublishing removes.
    s.publish("tool", b"v2");
    assert!(get(&url).body_str().contains(&md5_hex(b"v2")));
    s.unpublish("tool");
    assert_eq!(get(&url).status, 404);

    // Unknown routes are 404 with an envelope.
    let r = get(&format!("{}/other", s.url()));
    assert_eq!(r.status, 404);
    assert_eq!(r.body_str(), r#"{"code":1,"message":"not found"}"#);
}

#[test]
fn reported_hashes_are_recorded_in_order() {
    let s = Server::start();
    let url = format!("{}/bins/tool", s.api());
    for body in [r#"{"hash":"abc"}"#, r#"{ "hash" : "def" }"#, "not json"] {
        let r = http(
            "POST",
            &url,
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body_str(),
            r#"{"code":200,"message":"Success","data":null}"#
        );
    }
    assert_eq!(s.reported("tool"), vec!["abc", "def", "not json"]);
    assert!(s.reported("other").is_empty());

    s.fault("tool", Fault::ReportStatus(500));
    let r = http("POST", &url, &[], br#"{"hash":"ghi"}"#);
    assert_eq!(r.status, 500);
    assert_eq!(s.reported("tool").last().map(String::as_str), Some("ghi"));
}

#[test]
fn download_serves_bytes_with_content_length() {
    let s = Server::start();
    let bytes: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    s.publish("big", &bytes);
    let r = get(&format!("{}/download/big?arch=x86_64", s.api()));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(r.content_length(), Some(bytes.len()));
    assert_eq!(r.body, bytes);
    assert_eq!(get(&format!("{}/download/nope", s.api())).status, 404);
}

#[test]
fn truncate_sends_fewer_bytes_than_content_length() {
    let s = Server::start();
    let bytes = vec![7u8; 5000];
    s.publish("cut", &bytes);
    s.fault("cut", Fault::Truncate(1000));
    let r = get(&format!("{}/download/cut", s.api()));
    assert_eq!(r.status, 200);
    assert_eq!(r.content_length(), Some(5000));
    assert_eq!(r.body.len(), 1000);
    // bins/ is unaffected by a download-only fault
    assert!(get(&format!("{}/bins/cut", s.api()))
        .body_str()
        .contains(&md5_hex(&bytes)));
    s.fault("cut", Fault::None);
    assert_eq!(get(&format!("{}/download/cut", s.api())).body.len(), 5000);
}

#[test]
fn names_are_percent_decoded() {
    let s = Server::start();
    s.publish("my app", b"spaced");
    let r = get(&format!("{}/bins/my%20app?version=1", s.api()));
    assert_eq!(r.status, 200);
    assert!(
        r.body_str().contains(r#""name":"my app""#),
        "{}",
        r.body_str()
    );
    let r = get(&format!("{}/download/my%20app", s.api()));
    assert_eq!(r.body, b"spaced");
    http(
        "POST",
        &format!("{}/bins/my%20app", s.api()),
        &[],
        br#"{"hash":"h"}"#,
    );
    assert_eq!(s.reported("my app"), vec!["h"]);

    let reqs = s.requests();
    assert_eq!(reqs[0].path, "/api/v1/bins/my%20app");
    assert_eq!(reqs[0].decoded_path(), "/api/v1/bins/my app");
    assert_eq!(reqs[0].query, "version=1");
    assert_eq!(s.count("GET", "/api/v1/bins/my%20app"), 1);
    assert_eq!(s.count("GET", "/api/v1/bins/my app"), 1);
    assert_eq!(s.count("GET", "/api/v1/download/"), 1);
}

#[test]
fn envelope_and_status_faults() {
    let s = Server::start();
    s.publish("t", b"payload");
    let bins = format!("{}/bins/t", s.api());
    let dl = format!("{}/download/t", s.api());

    s.fault("t", Fault::Status(503));
    for url in [&bins, &dl] {
        let r = get(url);
        assert_eq!(r.status, 503);
        assert_eq!(r.body_str(), r#"{"code":503,"message":"injected failure"}"#);
    }

    s.fault("t", Fault::DownloadStatus(500));
    assert_eq!(get(&bins).status, 200);
    let r = get(&dl);
    assert_eq!(r.status, 500);
    assert_eq!(r.body_str(), "injected failure");

    s.fault("t", Fault::Garbage);
    let r = get(&bins);
    assert_eq!(r.status, 200);
    assert_eq!(r.body_str(), r#"{"code":200,"data":{"hash": "#);
    assert_eq!(r.content_length(), Some(r.body.len()));

    s.fault("t", Fault::EnvelopeCode(42, "quota \"exceeded\"".into()));
    let r = get(&bins);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.body_str(),
        r#"{"code":42,"message":"quota \"exceeded\"","data":null}"#
    );

    s.fault("t", Fault::NoEnvelope);
    assert_eq!(
        get(&bins).body_str(),
        format!(
            r#"{{"name":"t","version":"latest","hash":"{}","extra":1}}"#,
            md5_hex(b"payload")
        )
    );

    s.fault("t", Fault::WrongHash);
    let advertised = json_string_field(&get(&bins).body_str(), "hash").unwrap();
    assert_eq!(advertised.len(), 32);
    assert_ne!(advertised, md5_hex(&get(&dl).body));
    assert_eq!(get(&dl).body, b"payload");
}

#[test]
fn redirect_faults() {
    let s = Server::start();
    s.fault("loop", Fault::RedirectLoop);
    let r = get(&format!("{}/download/loop?arch=x86_64", s.api()));
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location"),
        Some(format!("{}/api/v1/download/loop?arch=x86_64", s.url()).as_str())
    );

    s.publish("real", b"real bytes");
    s.fault(
        "moved",
        Fault::Redirect(format!("{}/download/real", s.api())),
    );
    let r = get(&format!("{}/download/moved", s.api()));
    assert_eq!(r.status, 302);
    let r = get(r.header("location").unwrap());
    assert_eq!(r.body, b"real bytes");
}

#[test]
fn slow_download_trickles_bytes() {
    let s = Server::start();
    s.publish("slow", b"abcde");
    s.fault("slow", Fault::SlowDownload(Duration::from_millis(20)));
    let t = Instant::now();
    let r = get(&format!("{}/download/slow", s.api()));
    assert!(
        t.elapsed() >= Duration::from_millis(90),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(r.content_length(), Some(5));
    assert_eq!(r.body, b"abcde");
}

#[test]
fn hang_is_recorded_never_answers_and_ends_when_server_drops() {
    let s = Server::start();
    s.publish("h", b"x");
    s.fault("h", Fault::Hang);
    let mut c = TcpStream::connect(s.addr()).unwrap();
    c.write_all(b"GET /api/v1/bins/h HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert!(wait_until(Duration::from_secs(2), || s
        .count("GET", "/api/v1/bins/h")
        == 1));
    c.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut buf = [0u8; 16];
    let err = c
        .read(&mut buf)
        .expect_err("a hanging route must not answer");
    assert!(matches!(
        err.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));

    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let t = Instant::now();
    drop(s);
    assert_eq!(c.read(&mut buf).unwrap_or(0), 0);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
}

#[test]
fn malformed_requests_get_400_and_are_not_recorded() {
    let s = Server::start();
    for raw in [
        &b"GARBAGE\r\n\r\n"[..],
        b"GET /api/v1/bins/x HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
        b"GET /api/v1/bins/x HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /api/v1/bins/x HTTP/1.1\r\nContent-Length: 10\r\n\r\nshort",
        b"GET /api/v1/bins/\xff HTTP/1.1\r\n\r\n",
    ] {
        let mut c = TcpStream::connect(s.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        c.write_all(raw).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        let r = parse_response(&out).expect("a response");
        assert_eq!(r.status, 400, "{:?}", String::from_utf8_lossy(raw));
    }
    // bad percent-encoding in a name is well-formed HTTP, so it is recorded
    assert_eq!(get(&format!("{}/bins/%zz", s.api())).status, 400);
    assert_eq!(s.requests().len(), 1);
    // the server still works
    assert_eq!(get(&format!("{}/bins/x", s.api())).status, 404);
}

#[test]
fn fake_supervisorctl_logs_and_honours_fail_file() {
    let dir = TempDir::new();
    let bin = fake_supervisorctl(&dir.path);
    assert_eq!(bin, dir.join("bin"));
    assert_eq!(mode(&bin.join("supervisorctl")), 0o755);
    let run = |args: &[&str]| {
        let out = Command::new("supervisorctl")
            .args(args)
            .env("PATH", path_with(&bin))
            .output()
            .expect("run fake supervisorctl");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };

    let (code, out) = run(&["status", "app"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        out,
        "app                              RUNNING   pid 4242, uptime 0:00:05\n"
    );
    let (code, out) = run(&["-c", "/etc/supervisord.conf", "restart", "app"]);
    assert_eq!(code, Some(0));
    assert_eq!(out, "app: stopped\napp: started\n");

    std::fs::write(dir.join("supervisorctl.fail"), "restart\n").unwrap();
    let (code, out) = run(&["restart", "app"]);
    assert_eq!(code, Some(7));
    assert_eq!(out, "app: ERROR (spawn error)\n");
    assert_eq!(run(&["status", "app"]).0, Some(0));

    std::fs::write(dir.join("supervisorctl.fail"), "status restart").unwrap();
    let (code, out) = run(&["status", "app"]);
    assert_eq!(code, Some(1));
    assert!(out.starts_with("app "), "{}", out);
    assert!(out.contains("FATAL     Exited too quickly"), "{}", out);

    assert_eq!(
        supervisorctl_log(&dir.path),
        vec![
            "status app",
            "-c /etc/supervisord.conf restart app",
            "restart app",
            "status app",
            "status app",
        ]
    );
}

#[test]
fn temp_dir_temp_files_and_mode() {
    let dir = TempDir::new();
    let kept = dir.path.clone();
    assert!(kept.is_dir());
    assert!(kept
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with(&format!("bin-proxy-test-{}-", std::process::id())));
    assert_ne!(TempDir::new().path, kept);

    for name in ["app", "app.tmp", ".app.tmp123", "bin-proxy-tmp-9", "notes"] {
        std::fs::write(dir.join(name), b"x").unwrap();
    }
    assert_eq!(
        temp_files(&dir.path),
        vec![".app.tmp123", "app.tmp", "bin-proxy-tmp-9"]
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.join("app"), std::fs::Permissions::from_mode(0o750)).unwrap();
    assert_eq!(mode(&dir.join("app")), 0o750);
    // A directory that cannot be listed is a broken test, not "no temp files".
    let missing = dir.join("missing");
    assert!(std::panic::catch_unwind(|| temp_files(&missing)).is_err());

    if std::env::var_os("KEEP_TEST_DIRS").is_none() {
        drop(dir);
        assert!(!kept.exists());
    }
}

#[test]
fn md5_hex_and_json_helpers() {
    assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
    assert_eq!(md5_hex(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
    assert_eq!(
        json_string_field(r#"{"x":1, "hash" :  "a\"b"}"#, "hash").as_deref(),
        Some("a\"b")
    );
    assert_eq!(json_string_field(r#"{"hash":1}"#, "hash"), None);
    assert_eq!(percent_decode("a%2Fb+c", true).as_deref(), Some("a/b c"));
    assert_eq!(percent_decode("%zz", false), None);
}
