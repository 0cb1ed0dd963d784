//! Integration tests of the REAL `bin-manager` executable (see
//! tests/common/manager.rs): the protocol and its envelopes, arch/version
//! selection, hash caching, Range/HEAD, publishing, limits, path traversal,
//! tokens, durability across kill -9, slow clients, publish-while-downloading,
//! the real agent end to end, the access log and start-up errors.
mod common;

use common::json::{parse, Json};
use common::manager::{exchange, http_within, run_to_exit, tree, Manager};
use common::{
    http, http_raw, json_string, md5_hex, parse_response, sha256_hex, HttpResponse, TempDir,
};
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// Checks the envelope of a JSON answer: Content-Type, Content-Length, keys
/// `code,message,data` in that order, `code` = HTTP status, message "Success"
/// on 200. Returns `data`.
fn envelope(r: &HttpResponse, status: u16) -> Json {
    assert_eq!(r.status, status, "HTTP status; body: {}", snippet(&r.body));
    let body = r.body_str();
    assert_eq!(
        r.header("content-type"),
        Some("application/json"),
        "Content-Type; body: {body}"
    );
    assert_eq!(r.content_length(), Some(r.body.len()), "Content-Length");
    let j = parse(&body);
    assert_eq!(
        j.keys(),
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

/// An error answer, exactly `{"code":S,"message":M,"data":null}`.
fn expect_error(r: &HttpResponse, status: u16, message: &str) {
    envelope(r, status);
    assert_eq!(
        r.body_str(),
        format!(
            "{{\"code\":{status},\"message\":{},\"data\":null}}",
            json_string(message)
        )
    );
}

fn get(m: &Manager, path: &str) -> HttpResponse {
    http("GET", &format!("{}{path}", m.api()), &[], b"")
}

fn post(m: &Manager, path: &str, body: &str) -> HttpResponse {
    http(
        "POST",
        &format!("{}{path}", m.api()),
        &[("Content-Type", "application/json")],
        body.as_bytes(),
    )
}

fn put(m: &Manager, path: &str, token: Option<&str>, body: &[u8]) -> HttpResponse {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    http("PUT", &format!("{}{path}", m.api()), &headers, body)
}

/// A raw `GET TARGET` (the target sent byte for byte); returns the parsed
/// answer and the raw bytes.
fn raw_get(m: &Manager, target: &str) -> (HttpResponse, Vec<u8>) {
    let raw = format!(
        "GET {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        m.addr()
    );
    let bytes = http_raw(&m.url(), raw.as_bytes());
    let resp = parse_response(&bytes).unwrap_or_else(|| {
        panic!(
            "no answer to GET {target}: {:?}",
            String::from_utf8_lossy(&bytes)
        )
    });
    (resp, bytes)
}

/// Deterministic pseudo-random bytes.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Now as RFC 3339 UTC with second precision (`2026-11-24T08:00:01Z`).
fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Asserts `t0 <= t <= t1` for RFC 3339 strings of the same shape.
fn assert_between(t: &str, t0: &str, t1: &str, what: &str) {
    assert_eq!(t.len(), 20, "{what} {t:?} is not YYYY-MM-DDTHH:MM:SSZ");
    assert!(t0 <= t && t <= t1, "{what} {t} not between {t0} and {t1}");
}

/// A body for a failure message: text (cut at 500 chars) or a byte count.
fn snippet(body: &[u8]) -> String {
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

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Entries below `dir` whose names mark a temp file.
fn temps_below(dir: &Path) -> Vec<String> {
    tree(dir)
        .into_iter()
        .filter(|p| p.contains("bin-proxy-tmp") || p.contains(".tmp"))
        .collect()
}

fn registration(name: &str, hash: &str) -> String {
    format!(
        "{{\"name\":\"{name}\",\"cpuArch\":\"x86_64\",\"osRelease\":\"Test OS 1\",\"proxyVersion\":\"1.0.0\",\"binaries\":[{{\"name\":\"app\",\"version\":\"latest\",\"hash\":\"{hash}\"}}],\"lastSeen\":\"2020-01-01T00:00:00Z\"}}"
    )
}

// ---------------------------------------------------------------------------
// 1. Envelopes
// ---------------------------------------------------------------------------

#[test]
fn every_json_answer_is_an_envelope() {
    let m = Manager::start(&["--admin-token", "adm"]);
    let app = pattern(1, 3000);
    fs::write(m.bin_dir().join("app"), &app).unwrap();

    let r = get(&m, "/bins/app");
    let data = envelope(&r, 200);
    assert_eq!(data.keys(), ["name", "version", "hash", "sha256", "size"]);
    assert_eq!(data.get("name").s(), "app");
    assert_eq!(data.get("version").s(), "latest");
    assert_eq!(data.get("hash").s(), md5_hex(&app));
    assert_eq!(data.get("sha256").s(), sha256_hex(&app));
    assert_eq!(data.get("size").n(), 3000.0);
    assert_eq!(
        r.body_str(),
        format!(
            "{{\"code\":200,\"message\":\"Success\",\"data\":{{\"name\":\"app\",\"version\":\"latest\",\"hash\":\"{}\",\"sha256\":\"{}\",\"size\":3000}}}}",
            md5_hex(&app),
            sha256_hex(&app)
        )
    );

    // 400
    expect_error(&get(&m, "/keepalive"), 400, "missing ?node=NAME");
    expect_error(
        &get(&m, "/bins/.hidden"),
        400,
        "invalid name: use letters, digits, '.', '_' and '-', not starting with '.'",
    );
    let r = post(&m, "/keepalive?node=n1", "{not json");
    envelope(&r, 400);
    assert!(
        parse_message(&r).starts_with("invalid JSON at "),
        "{}",
        r.body_str()
    );
    expect_error(
        &post(&m, "/bins/app?node=n1", "{\"hash\":\"nope\"}"),
        400,
        "body must be {\"hash\":\"<md5 hex>\"}",
    );
    // 401
    expect_error(
        &put(&m, "/bins/app", Some("nope"), b"x"),
        401,
        "publishing needs the admin bearer token",
    );
    // 404
    expect_error(&get(&m, "/bins/nothing"), 404, "binary not found");
    expect_error(&get(&m, "/download/nothing"), 404, "binary not found");
    expect_error(&get(&m, "/keepalive?node=ghost"), 404, "node not found");
    expect_error(&get(&m, "/nothing"), 404, "not found");
    expect_error(
        &http("GET", &format!("{}/elsewhere", m.url()), &[], b""),
        404,
        "not found",
    );
    // 405
    expect_error(
        &http("DELETE", &format!("{}/bins/app", m.api()), &[], b""),
        405,
        "method not allowed here",
    );
    expect_error(
        &http("POST", &format!("{}/download/app", m.api()), &[], b""),
        405,
        "method not allowed here",
    );
    expect_error(
        &http("PUT", &format!("{}/nodes", m.api()), &[], b""),
        405,
        "method not allowed here",
    );
    expect_error(
        &http("POST", &format!("{}/healthz", m.url()), &[], b""),
        405,
        "use GET",
    );
    // 413: the declared length alone is refused, before any body is read.
    let head = format!(
        "POST /api/v1/keepalive?node=n1 HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        m.addr(),
        (1 << 20) + 1
    );
    let raw = exchange(&m.addr(), head.into_bytes(), Duration::from_secs(15));
    let r = parse_response(&raw).expect("an answer to an oversized POST");
    expect_error(&r, 413, "JSON body larger than 1 MiB");
    // 416
    let r = http(
        "GET",
        &format!("{}/download/app", m.api()),
        &[("Range", "bytes=3000-")],
        b"",
    );
    expect_error(&r, 416, "range not satisfiable");

    // The nodes view and the listing are envelopes too.
    let nodes = envelope(&get(&m, "/nodes"), 200);
    assert_eq!(nodes.keys(), ["summary", "nodes"]);
    let list = envelope(&get(&m, "/bins"), 200);
    assert_eq!(list.arr().len(), 1);
}

fn parse_message(r: &HttpResponse) -> String {
    parse(&r.body_str()).get("message").s().to_string()
}

// ---------------------------------------------------------------------------
// 2. keepalive
// ---------------------------------------------------------------------------

#[test]
fn keepalive_registers_and_heartbeats() {
    let m = Manager::start(&[]);
    expect_error(&get(&m, "/keepalive?node=n1"), 404, "node not found");

    let hash = "0123456789abcdef0123456789abcdef";
    let t0 = now_rfc3339();
    let r = post(&m, "/keepalive?node=n1", &registration("n1", hash));
    let t1 = now_rfc3339();
    let rec = envelope(&r, 200);
    assert_eq!(
        rec.keys(),
        [
            "name",
            "cpuArch",
            "osRelease",
            "proxyVersion",
            "binaries",
            "failures",
            "lastSeen",
            "registered"
        ]
    );
    assert_eq!(rec.get("name").s(), "n1");
    assert_eq!(rec.get("cpuArch").s(), "x86_64");
    assert_eq!(rec.get("osRelease").s(), "Test OS 1");
    assert_eq!(rec.get("proxyVersion").s(), "1.0.0");
    let bins = rec.get("binaries").arr();
    assert_eq!(bins.len(), 1);
    assert_eq!(bins[0].keys(), ["name", "version", "hash"]);
    assert_eq!(
        (
            bins[0].get("name").s(),
            bins[0].get("version").s(),
            bins[0].get("hash").s()
        ),
        ("app", "latest", hash)
    );
    assert_eq!(rec.get("failures"), &Json::Arr(vec![]));
    // lastSeen is the server's clock, not the 2020 value the agent sent.
    assert_between(rec.get("lastSeen").s(), &t0, &t1, "lastSeen after POST");
    assert_between(rec.get("registered").s(), &t0, &t1, "registered");
    let registered = rec.get("registered").s().to_string();

    // Let the clock pass into the next second (bounded), so that a heartbeat
    // that did not refresh lastSeen would show.
    assert!(common::wait_until(Duration::from_secs(3), || now_rfc3339() > t1));
    let t2 = now_rfc3339();
    let r = get(&m, "/keepalive?node=n1");
    let t3 = now_rfc3339();
    let again = envelope(&r, 200);
    assert_between(again.get("lastSeen").s(), &t2, &t3, "lastSeen after GET");
    assert_eq!(again.get("registered").s(), registered);
    for k in [
        "name",
        "cpuArch",
        "osRelease",
        "proxyVersion",
        "binaries",
        "failures",
    ] {
        assert_eq!(again.get(k), rec.get(k), "{k}");
    }

    // Typed binding: binaries must be a list of objects.
    let bad = r#"{"name":"n1","cpuArch":"x86_64","osRelease":"Test OS 1","proxyVersion":"1.0.0","binaries":"x","lastSeen":"2020-01-01T00:00:00Z"}"#;
    let r = post(&m, "/keepalive?node=n1", bad);
    expect_error(&r, 400, "\"binaries\" must be a list, not a string");
    let bad = r#"{"name":"n1","binaries":["app"]}"#;
    expect_error(
        &post(&m, "/keepalive?node=n1", bad),
        400,
        "\"binaries\"[0] must be an object, not a string",
    );
    // A refused registration changes nothing.
    let after = envelope(&get(&m, "/keepalive?node=n1"), 200);
    assert_eq!(after.get("binaries"), rec.get("binaries"));
    // The node name comes from ?node= (or the body) and is validated.
    expect_error(
        &post(&m, "/keepalive?node=a%2Fb", &registration("x", hash)),
        400,
        "invalid node: use letters, digits, '.', '_' and '-'",
    );
    let r = post(&m, "/keepalive", &registration("from-body", hash));
    assert_eq!(envelope(&r, 200).get("name").s(), "from-body");
    envelope(&get(&m, "/keepalive?node=from-body"), 200);
}

// ---------------------------------------------------------------------------
// 3. arch and version selection
// ---------------------------------------------------------------------------

#[test]
fn arch_and_version_select_the_build() {
    let m = Manager::start(&[]);
    let (generic, arm, pinned) = (pattern(31, 1000), pattern(32, 1100), pattern(33, 1200));
    fs::write(m.bin_dir().join("app"), &generic).unwrap();
    fs::create_dir(m.bin_dir().join("aarch64")).unwrap();
    fs::write(m.bin_dir().join("aarch64/app"), &arm).unwrap();
    fs::write(m.bin_dir().join("app@1.2"), &pinned).unwrap();

    let info = |q: &str| envelope(&get(&m, &format!("/bins/app{q}")), 200);
    let cases: [(&str, &[u8], &str); 6] = [
        ("", &generic, "latest"),
        ("?arch=aarch64", &arm, "latest"),
        ("?arch=x86_64", &generic, "latest"),
        ("?version=1.2", &pinned, "1.2"),
        ("?version=latest", &generic, "latest"),
        ("?arch=aarch64&version=1.2", &pinned, "1.2"),
    ];
    for (q, bytes, version) in cases {
        let d = info(q);
        assert_eq!(d.get("hash").s(), md5_hex(bytes), "bins/app{q}");
        assert_eq!(d.get("sha256").s(), sha256_hex(bytes), "bins/app{q}");
        assert_eq!(d.get("size").n(), bytes.len() as f64, "bins/app{q}");
        assert_eq!(d.get("version").s(), version, "bins/app{q}");
        let r = get(&m, &format!("/download/app{q}"));
        assert_eq!(r.status, 200, "download/app{q}");
        assert_eq!(r.content_length(), Some(bytes.len()), "download/app{q}");
        assert!(r.body == bytes, "download/app{q}: wrong bytes");
        assert_eq!(
            r.header("etag"),
            Some(format!("\"{}\"", md5_hex(bytes)).as_str())
        );
    }
    expect_error(&get(&m, "/bins/app?version=9.9"), 404, "binary not found");
    expect_error(
        &get(&m, "/download/app?version=9.9"),
        404,
        "binary not found",
    );
    expect_error(
        &get(&m, "/bins/app?arch=aarch64&version=9.9"),
        404,
        "binary not found",
    );
}

// ---------------------------------------------------------------------------
// 4. hash cache invalidation
// ---------------------------------------------------------------------------

#[test]
fn publishing_by_mv_invalidates_the_hash_cache() {
    let m = Manager::start(&[]);
    let hash = || {
        envelope(&get(&m, "/bins/app"), 200)
            .get("hash")
            .s()
            .to_string()
    };
    let v1 = pattern(41, 4096);
    fs::write(m.bin_dir().join("app"), &v1).unwrap();
    assert_eq!(hash(), md5_hex(&v1));
    assert_eq!(hash(), md5_hex(&v1), "cached answer");

    // A different size, by atomic rename.
    let v2 = pattern(42, 5000);
    let tmp = m.bin_dir().join(".app.incoming");
    fs::write(&tmp, &v2).unwrap();
    fs::rename(&tmp, m.bin_dir().join("app")).unwrap();
    assert_eq!(hash(), md5_hex(&v2));

    // The same size, by atomic rename (the freed inode may well be reused).
    for seed in 43..46 {
        let v = pattern(seed, 5000);
        fs::write(&tmp, &v).unwrap();
        fs::rename(&tmp, m.bin_dir().join("app")).unwrap();
        assert_eq!(hash(), md5_hex(&v), "same-size publish {seed}");
        assert!(get(&m, "/download/app").body == v, "download {seed}");
    }

    // The same size, rewritten in place with a different mtime.
    let v3 = pattern(47, 5000);
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(m.bin_dir().join("app"))
            .unwrap();
        f.write_all(&v3).unwrap();
        f.set_modified(UNIX_EPOCH + Duration::from_secs(1_000_000_000))
            .unwrap();
    }
    assert_eq!(hash(), md5_hex(&v3), "in-place rewrite with another mtime");
    assert!(get(&m, "/download/app").body == v3);
}

// ---------------------------------------------------------------------------
// 5. Range and HEAD
// ---------------------------------------------------------------------------

#[test]
fn range_and_head() {
    let m = Manager::start(&[]);
    let size = 1000usize;
    let app = pattern(5, size);
    fs::write(m.bin_dir().join("app"), &app).unwrap();
    let url = format!("{}/download/app", m.api());
    let ranged = |range: &str| http("GET", &url, &[("Range", range)], b"");

    let r = ranged("bytes=0-9");
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 0-9/1000"));
    assert_eq!(r.content_length(), Some(10));
    assert_eq!(r.body, &app[..10]);

    let r = ranged("bytes=-5");
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 995-999/1000"));
    assert_eq!(r.body, &app[size - 5..]);

    let r = ranged("bytes=990-");
    assert_eq!(r.status, 206);
    assert_eq!(r.header("content-range"), Some("bytes 990-999/1000"));
    assert_eq!(r.body, &app[990..]);

    let r = ranged(&format!("bytes={size}-"));
    expect_error(&r, 416, "range not satisfiable");
    assert_eq!(r.header("content-range"), Some("bytes */1000"));

    let r = http("GET", &url, &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("accept-ranges"), Some("bytes"));
    assert_eq!(r.body, app);

    // HEAD: the head of a 200 with the full length, and nothing after it.
    let raw = format!(
        "HEAD /api/v1/download/app HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        m.addr()
    );
    let bytes = http_raw(&m.url(), raw.as_bytes());
    let end = find(&bytes, b"\r\n\r\n").expect("a response head") + 4;
    let r = parse_response(&bytes).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.content_length(), Some(size));
    assert_eq!(
        bytes.len(),
        end,
        "bytes after the HEAD response head: {}",
        snippet(&bytes[end..])
    );
}

// ---------------------------------------------------------------------------
// 6. PUT publishing
// ---------------------------------------------------------------------------

#[test]
fn put_publishes_with_the_admin_token_only() {
    // Publishing over HTTP is off without an admin token.
    let off = Manager::start(&[]);
    expect_error(
        &put(&off, "/bins/app", Some("adm"), b"payload"),
        403,
        "publishing over HTTP is disabled: configure an adminToken",
    );
    assert!(
        tree(&off.bin_dir()).is_empty(),
        "{:?}",
        tree(&off.bin_dir())
    );

    let m = Manager::start(&["--admin-token", "adm", "--max-upload", "1K"]);
    let v1 = pattern(61, 1000);
    for token in [None, Some("wrong"), Some("ad"), Some("admx"), Some("")] {
        let r = put(&m, "/bins/app", token, &v1);
        expect_error(&r, 401, "publishing needs the admin bearer token");
    }
    let r = http(
        "PUT",
        &format!("{}/bins/app", m.api()),
        &[("Authorization", "Basic adm")],
        &v1,
    );
    expect_error(&r, 401, "publishing needs the admin bearer token");
    assert!(tree(&m.bin_dir()).is_empty(), "{:?}", tree(&m.bin_dir()));

    let r = put(&m, "/bins/app", Some("adm"), &v1);
    let d = envelope(&r, 200);
    assert_eq!(
        r.body_str(),
        format!(
            "{{\"code\":200,\"message\":\"Success\",\"data\":{{\"name\":\"app\",\"version\":\"latest\",\"hash\":\"{}\",\"sha256\":\"{}\",\"size\":1000}}}}",
            md5_hex(&v1),
            sha256_hex(&v1)
        )
    );
    assert_eq!(d.get("hash").s(), md5_hex(&v1));
    assert_eq!(fs::read(m.bin_dir().join("app")).unwrap(), v1);
    assert_eq!(tree(&m.bin_dir()), ["app"]);
    assert_eq!(
        envelope(&get(&m, "/bins/app"), 200).get("hash").s(),
        md5_hex(&v1)
    );

    let v2 = pattern(62, 700);
    let r = put(&m, "/bins/app?arch=aarch64&version=2", Some("adm"), &v2);
    let d = envelope(&r, 200);
    assert_eq!(d.get("version").s(), "2");
    assert_eq!(d.get("hash").s(), md5_hex(&v2));
    assert_eq!(d.get("sha256").s(), sha256_hex(&v2));
    assert_eq!(fs::read(m.bin_dir().join("aarch64/app@2")).unwrap(), v2);
    assert_eq!(
        envelope(&get(&m, "/bins/app?arch=aarch64&version=2"), 200)
            .get("hash")
            .s(),
        md5_hex(&v2)
    );

    // Exactly the limit is accepted; one KiB more is 413 and writes nothing.
    let edge = pattern(63, 1024);
    envelope(&put(&m, "/bins/edge", Some("adm"), &edge), 200);
    assert_eq!(fs::read(m.bin_dir().join("edge")).unwrap(), edge);
    for name in ["big", "app"] {
        let body = pattern(64, 2048);
        let mut raw = format!(
            "PUT /api/v1/bins/{name} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer adm\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            m.addr(),
            body.len()
        )
        .into_bytes();
        raw.extend_from_slice(&body);
        let answer = exchange(&m.addr(), raw, Duration::from_secs(15));
        let r = parse_response(&answer).unwrap_or_else(|| {
            panic!(
                "no answer to an oversized PUT: {:?}",
                String::from_utf8_lossy(&answer)
            )
        });
        envelope(&r, 413);
        assert!(
            parse_message(&r).starts_with("upload larger than the limit of"),
            "{}",
            r.body_str()
        );
    }
    assert!(!m.bin_dir().join("big").exists());
    assert_eq!(fs::read(m.bin_dir().join("app")).unwrap(), v1);
    assert_eq!(
        tree(&m.bin_dir()),
        ["aarch64", "aarch64/app@2", "app", "edge"],
        "no temp file left in binDir"
    );
    assert!(temps_below(&m.bin_dir()).is_empty());

    let r = get(&m, "/bins");
    envelope(&r, 200);
    assert_eq!(
        r.body_str(),
        "{\"code\":200,\"message\":\"Success\",\"data\":[\
{\"name\":\"app\",\"arch\":null,\"version\":null,\"size\":1000},\
{\"name\":\"app\",\"arch\":\"aarch64\",\"version\":\"2\",\"size\":700},\
{\"name\":\"edge\",\"arch\":null,\"version\":null,\"size\":1024}]}"
    );
}

// ---------------------------------------------------------------------------
// 7. Oversized body and head
// ---------------------------------------------------------------------------

#[test]
fn oversized_json_body_and_head_are_refused() {
    let m = Manager::start(&[]);
    // A real body of 1 MiB + 1 (valid JSON, padded with spaces).
    let mut body = b"{\"name\":\"n1\"}".to_vec();
    body.resize((1 << 20) + 1, b' ');
    let mut raw = format!(
        "POST /api/v1/keepalive?node=n1 HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        m.addr(),
        body.len()
    )
    .into_bytes();
    raw.extend_from_slice(&body);
    let answer = exchange(&m.addr(), raw, Duration::from_secs(15));
    let r = parse_response(&answer).unwrap_or_else(|| {
        panic!(
            "no answer to a 1 MiB + 1 POST: {:?}",
            String::from_utf8_lossy(&answer)
        )
    });
    expect_error(&r, 413, "JSON body larger than 1 MiB");
    assert_eq!(r.header("connection"), Some("close"));
    expect_error(&get(&m, "/keepalive?node=n1"), 404, "node not found");

    // Exactly 1 MiB is read and accepted.
    body.truncate(1 << 20);
    let r = http_within(
        Duration::from_secs(15),
        "POST",
        &format!("{}/keepalive?node=n1", m.api()),
        &[],
        &body,
    );
    assert_eq!(envelope(&r, 200).get("name").s(), "n1");

    // A request head over 16 KiB: 431 (in the envelope), then the server closes.
    let raw = format!(
        "GET /healthz HTTP/1.1\r\nHost: {}\r\nX-Big: {}\r\n\r\n",
        m.addr(),
        "a".repeat(20 * 1024)
    );
    let answer = exchange(&m.addr(), raw.into_bytes(), Duration::from_secs(15));
    let r = parse_response(&answer).unwrap_or_else(|| {
        panic!(
            "no answer to a 20 KiB head: {:?}",
            String::from_utf8_lossy(&answer)
        )
    });
    assert_eq!(r.status, 431, "{}", r.body_str());
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(
        r.body_str(),
        r#"{"code":431,"message":"request head too large","data":null}"#
    );

    // More than 64 headers: 431 as well.
    let mut raw = format!("GET /healthz HTTP/1.1\r\nHost: {}\r\n", m.addr());
    for i in 0..80 {
        raw.push_str(&format!("X-H{i}: v\r\n"));
    }
    raw.push_str("\r\n");
    let answer = exchange(&m.addr(), raw.into_bytes(), Duration::from_secs(15));
    let r = parse_response(&answer).expect("an answer to 80 headers");
    assert_eq!(r.status, 431, "{}", r.body_str());

    // The server is still fine.
    let r = http("GET", &format!("{}/healthz", m.url()), &[], b"");
    assert_eq!(r.status, 200);
}

// ---------------------------------------------------------------------------
// 8. Path traversal
// ---------------------------------------------------------------------------

#[test]
fn traversal_corpus_gets_400_and_never_a_file() {
    let m = Manager::start(&[]);
    let secret = b"TOP-SECRET-4b1d-never-serve-me".to_vec();
    fs::write(m.root.join("secret"), &secret).unwrap();
    let nested = b"NESTED-a-b-never-serve-me".to_vec();
    fs::create_dir(m.bin_dir().join("a")).unwrap();
    fs::write(m.bin_dir().join("a/b"), &nested).unwrap();
    let hidden = b"HIDDEN-never-serve-me".to_vec();
    fs::write(m.bin_dir().join(".hidden"), &hidden).unwrap();
    fs::write(m.bin_dir().join("app"), b"the app").unwrap();

    let corpus = [
        "/api/v1/bins/..",
        "/api/v1/bins/%2e%2e",
        "/api/v1/bins/%2E%2E",
        "/api/v1/bins/..%2fsecret",
        "/api/v1/bins/..%2Fsecret",
        "/api/v1/bins/a%2Fb",
        "/api/v1/bins/",
        "/api/v1/bins/../secret",
        "/api/v1/bins/%2e%2e%2fsecret",
        "/api/v1/download/..",
        "/api/v1/download/../secret",
        "/api/v1/download/../../secret",
        "/api/v1/download/..%2fsecret",
        "/api/v1/download/..%2F..%2Fetc%2Fpasswd",
        "/api/v1/download/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/api/v1/download/%00",
        "/api/v1/download/app%00",
        "/api/v1/download/.hidden",
        "/api/v1/download/%2ehidden",
        "/api/v1/download/a/b",
        "/api/v1/download/a%2fb",
        "/api/v1/download/",
        "/api/v1/download/%",
        "/api/v1/download/%zz",
        "/api/v1/bins/app?arch=../..",
        "/api/v1/bins/app?arch=..",
        "/api/v1/bins/app?arch=..%2f..",
        "/api/v1/bins/app?version=../x",
        "/api/v1/bins/app?version=..%2fsecret",
        "/api/v1/download/app?arch=../..",
        "/api/v1/download/app?arch=a%2fb",
        "/api/v1/download/app?version=../x",
        "/api/v1/download/app?version=%2e%2e%2fsecret",
        "/api/v1/download/secret?arch=..",
        "/api/v1/keepalive?node=../x",
    ];
    for target in corpus {
        let (r, raw) = raw_get(&m, target);
        assert_eq!(r.status, 400, "GET {target}: {}", snippet(&r.body));
        envelope(&r, 400);
        for (marker, what) in [
            (&secret[..], "the secret outside binDir"),
            (&nested[..], "binDir/a/b"),
            (&hidden[..], "binDir/.hidden"),
            (&b"root:x:0:0"[..], "/etc/passwd"),
        ] {
            assert!(find(&raw, marker).is_none(), "GET {target} served {what}");
        }
    }
    // The same through PUT (with publishing off: still 400, not 403, and nothing written).
    let r = http(
        "PUT",
        &format!("{}/bins/..%2fsecret", m.api()),
        &[],
        b"overwrite",
    );
    assert_eq!(r.status, 400, "{}", snippet(&r.body));
    assert_eq!(fs::read(m.root.join("secret")).unwrap(), secret);
    // The valid name still works.
    let (r, _) = raw_get(&m, "/api/v1/download/app");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"the app"[..]));
}

// ---------------------------------------------------------------------------
// 9. Token
// ---------------------------------------------------------------------------

#[test]
fn token_guards_api_but_not_healthz() {
    let token = "s3cret-tok-9";
    let m = Manager::start(&["--token", token]);
    let app = pattern(9, 500);
    fs::write(m.bin_dir().join("app"), &app).unwrap();
    let bearer = format!("Bearer {token}");
    let wrong = format!("Bearer {token}x");
    let short = format!("Bearer {}", &token[..token.len() - 1]);
    for path in [
        "/bins/app",
        "/download/app",
        "/nodes",
        "/bins",
        "/keepalive?node=n1",
    ] {
        let url = format!("{}{path}", m.api());
        expect_error(
            &http("GET", &url, &[], b""),
            401,
            "missing or wrong bearer token",
        );
        for h in [wrong.as_str(), short.as_str(), "Bearer", token] {
            expect_error(
                &http("GET", &url, &[("Authorization", h)], b""),
                401,
                "missing or wrong bearer token",
            );
        }
    }
    expect_error(
        &post(
            &m,
            "/keepalive?node=n1",
            &registration("n1", &md5_hex(&app)),
        ),
        401,
        "missing or wrong bearer token",
    );
    let auth = [("Authorization", bearer.as_str())];
    let r = http("GET", &format!("{}/bins/app", m.api()), &auth, b"");
    assert_eq!(envelope(&r, 200).get("hash").s(), md5_hex(&app));
    let r = http("GET", &format!("{}/download/app", m.api()), &auth, b"");
    assert_eq!((r.status, &r.body), (200, &app));

    let r = http("GET", &format!("{}/healthz", m.url()), &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.body_str().trim_end(), "ok");
    // The token is never logged.
    assert!(
        m.log_lines().iter().all(|l| !l.contains(token)),
        "the token appears in the log"
    );
}

// ---------------------------------------------------------------------------
// 10. State survives kill -9
// ---------------------------------------------------------------------------

#[test]
fn registry_survives_kill_9_and_restart() {
    let mut m = Manager::start(&[]);
    let app = pattern(10, 800);
    fs::write(m.bin_dir().join("app"), &app).unwrap();
    let old = "00000000000000000000000000000000";
    envelope(
        &post(&m, "/keepalive?node=n1", &registration("n1", old)),
        200,
    );
    envelope(
        &post(&m, "/keepalive?node=n2", &registration("n2", old)),
        200,
    );
    let r = post(
        &m,
        "/bins/app?node=n1",
        &format!("{{\"hash\":\"{}\"}}", md5_hex(&app)),
    );
    envelope(&r, 200);
    assert_eq!(
        r.body_str(),
        "{\"code\":200,\"message\":\"Success\",\"data\":null}"
    );
    let state_dir = m.state_file().parent().unwrap().to_path_buf();
    assert_eq!(tree(&state_dir), ["state.json", "state.json.log"]);

    m.kill9();
    m.restart();

    for n in ["n1", "n2"] {
        let rec = envelope(&get(&m, &format!("/keepalive?node={n}")), 200);
        assert_eq!(rec.get("name").s(), n);
        assert_eq!(rec.get("cpuArch").s(), "x86_64");
    }
    let nodes = envelope(&get(&m, "/nodes"), 200);
    let list = nodes.get("nodes").arr();
    assert_eq!(list.len(), 2);
    let n1 = list.iter().find(|n| n.get("name").s() == "n1").unwrap();
    let n2 = list.iter().find(|n| n.get("name").s() == "n2").unwrap();
    let b1 = &n1.get("binaries").arr()[0];
    assert_eq!(b1.get("name").s(), "app");
    assert_eq!(b1.get("hash").s(), md5_hex(&app));
    assert_eq!(b1.get("published").s(), md5_hex(&app));
    assert_eq!(b1.get("status").s(), "current");
    let b2 = &n2.get("binaries").arr()[0];
    assert_eq!(b2.get("hash").s(), old);
    assert_eq!(b2.get("status").s(), "behind");
    assert_eq!(
        nodes.get("summary"),
        &parse("{\"nodes\":2,\"current\":1,\"behind\":1,\"failed\":0}")
    );
    assert_eq!(tree(&state_dir), ["state.json", "state.json.log"]);
    assert_eq!(tree(&m.bin_dir()), ["app"]);
    // The snapshot is valid JSON that names both nodes.
    let snap = parse(&fs::read_to_string(m.state_file()).unwrap());
    let names: Vec<&str> = snap
        .get("nodes")
        .arr()
        .iter()
        .map(|n| n.get("name").s())
        .collect();
    assert_eq!(names, ["n1", "n2"]);
}

// ---------------------------------------------------------------------------
// 11. Slow clients
// ---------------------------------------------------------------------------

#[test]
fn slow_clients_do_not_starve_others() {
    let m = Manager::start(&["--workers", "2"]);
    let app = pattern(11, 2000);
    fs::write(m.bin_dir().join("app"), &app).unwrap();

    let (tx, rx) = std::sync::mpsc::channel();
    let slow: Vec<_> = (0..3)
        .map(|i| {
            let addr = m.addr();
            let tx = tx.clone();
            thread::spawn(move || {
                let mut s = TcpStream::connect(&addr).expect("connect slow client");
                s.write_all(b"GET /api/v1/bins/app HTTP/1.1\r\n").unwrap();
                let _ = tx.send(i);
                // One byte per 500 ms for about 6 s, never finishing the head…
                for &b in b"X-Slow: 123456789".iter().take(12) {
                    thread::sleep(Duration::from_millis(500));
                    if s.write_all(&[b]).is_err() {
                        return ("write failed", Vec::new());
                    }
                }
                // …then silence: the server must drop the connection (bounded wait).
                s.set_read_timeout(Some(Duration::from_secs(25))).unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => return ("closed", got),
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            return ("still open", got)
                        }
                        Err(_) => return ("reset", got),
                    }
                }
            })
        })
        .collect();
    for _ in 0..3 {
        rx.recv_timeout(Duration::from_secs(5))
            .expect("slow clients connected");
    }
    thread::sleep(Duration::from_millis(300));

    // Meanwhile, normal requests are answered (liveness bound 15 s each).
    let started = Instant::now();
    let r = http_within(
        Duration::from_secs(15),
        "GET",
        &format!("{}/bins/app", m.api()),
        &[],
        b"",
    );
    let first = started.elapsed();
    assert_eq!(envelope(&r, 200).get("hash").s(), md5_hex(&app));
    let r = http_within(
        Duration::from_secs(15),
        "GET",
        &format!("{}/download/app", m.api()),
        &[],
        b"",
    );
    assert_eq!((r.status, &r.body), (200, &app));
    let r = http_within(
        Duration::from_secs(15),
        "GET",
        &format!("{}/healthz", m.url()),
        &[],
        b"",
    );
    assert_eq!(r.status, 200);
    eprintln!("first normal request answered after {first:?} (2 workers, 3 slow clients)");

    for h in slow {
        let (how, got) = h.join().unwrap();
        assert!(
            how == "closed" || how == "reset" || how == "write failed",
            "a slow client was not dropped: {how}, got {:?}",
            String::from_utf8_lossy(&got)
        );
        if !got.is_empty() {
            let r = parse_response(&got).expect("a parsable answer");
            assert!(
                matches!(r.status, 400 | 408),
                "slow client got {}",
                r.status
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 12. Publish while downloading
// ---------------------------------------------------------------------------

#[test]
fn download_started_before_a_publish_finishes_with_the_old_bytes() {
    let m = Manager::start(&[]);
    let size = 64 << 20;
    let old = pattern(121, size);
    let new = pattern(122, size);
    fs::write(m.bin_dir().join("app"), &old).unwrap();

    let mut s = TcpStream::connect(m.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET /api/v1/download/app HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        m.addr()
    )
    .unwrap();
    let mut got = Vec::with_capacity(size + 4096);
    let mut buf = vec![0u8; 256 * 1024];
    let head_end = loop {
        if let Some(i) = find(&got, b"\r\n\r\n") {
            break i + 4;
        }
        assert!(got.len() < 64 * 1024, "no response head");
        let n = s.read(&mut buf).expect("read the head");
        assert!(n > 0, "closed before the head");
        got.extend_from_slice(&buf[..n]);
    };
    let r = parse_response(&got[..head_end]).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.content_length(), Some(size));
    let mut body = got.split_off(head_end);
    while body.len() < (1 << 20) {
        let n = s.read(&mut buf).expect("read the first MiB");
        assert!(n > 0, "closed early");
        body.extend_from_slice(&buf[..n]);
    }

    // Paused mid-download: publish the new bytes by atomic rename.
    m.publish_mv("app", &new);
    // Hashing 64 MiB in a debug build takes a while: a generous bound.
    let r = http_within(
        Duration::from_secs(60),
        "GET",
        &format!("{}/bins/app", m.api()),
        &[],
        b"",
    );
    assert_eq!(envelope(&r, 200).get("hash").s(), md5_hex(&new));

    while body.len() < size {
        let n = s.read(&mut buf).expect("read the rest");
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    assert_eq!(body.len(), size, "downloaded length");
    if let Some(i) = body.iter().zip(&old).position(|(a, b)| a != b) {
        panic!("the download differs from the OLD file at byte {i}");
    }

    let r = http_within(
        Duration::from_secs(60),
        "GET",
        &format!("{}/download/app", m.api()),
        &[],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), size);
    assert!(r.body == new, "a new download must get the new bytes");
}

// ---------------------------------------------------------------------------
// 13. End to end with the real agent
// ---------------------------------------------------------------------------

struct Agent {
    dir: TempDir,
}

impl Agent {
    fn new(initial: &[u8]) -> Agent {
        let dir = TempDir::new();
        fs::create_dir_all(dir.join("opt")).unwrap();
        fs::write(dir.join("opt/app"), initial).unwrap();
        let manifest = format!(
            "{{\n  \"node\": {{\n    \"name\": \"e2e-node\",\n    \"cpuArch\": \"x86_64\",\n    \"osRelease\": \"Test OS 1\",\n    \"proxyVersion\": \"1.0.0\"\n  }},\n  \"binaries\": [\n    {{\n      \"name\": \"app\",\n      \"version\": \"latest\",\n      \"hash\": \"{}\",\n      \"path\": \"{}\",\n      \"restart\": \"none\"\n    }}\n  ]\n}}\n",
            md5_hex(initial),
            dir.join("opt/app").display()
        );
        fs::write(dir.join("manifest.json"), manifest).unwrap();
        Agent { dir }
    }

    fn target(&self) -> Vec<u8> {
        fs::read(self.dir.join("opt/app")).unwrap()
    }

    /// Runs the real agent (bounded: 60 s); returns (exit code, stderr).
    fn run(&self, api: &str, token: Option<&str>) -> (i32, String) {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bin-proxy"));
        cmd.arg("--config")
            .arg(self.dir.join("manifest.json"))
            .arg("--api")
            .arg(api)
            .arg("--timeout")
            .arg("20")
            .env_remove("BIN_PROXY_CONFIG")
            .env_remove("BIN_MANAGER_API")
            .env_remove("BIN_DOWNLOAD_URL")
            .env_remove("BIN_MANAGER_TOKEN")
            .env_remove("BIN_PROXY_SUPERVISORCTL")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(t) = token {
            cmd.env("BIN_MANAGER_TOKEN", t);
        }
        let mut child = cmd.spawn().expect("run bin-proxy");
        let mut err = child.stderr.take().unwrap();
        let mut out = child.stdout.take().unwrap();
        let reader = thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let out_reader = thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let code = loop {
            if let Ok(Some(st)) = child.try_wait() {
                break st.code().unwrap_or(-1);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("bin-proxy did not finish within 60 s");
            }
            thread::sleep(Duration::from_millis(20));
        };
        let _ = out_reader.join();
        (code, reader.join().unwrap_or_default())
    }
}

fn node_app(m: &Manager, node: &str) -> Json {
    let nodes = envelope(&get(m, "/nodes"), 200);
    let n = nodes
        .get("nodes")
        .arr()
        .iter()
        .find(|n| n.get("name").s() == node)
        .unwrap_or_else(|| panic!("{node} not in nodes: {nodes:?}"))
        .clone();
    let bins = n.get("binaries").arr();
    assert_eq!(bins.len(), 1, "{n:?}");
    bins[0].clone()
}

#[test]
fn end_to_end_with_the_real_agent() {
    let m = Manager::start(&["--admin-token", "adm"]);
    let (v0, v1, v2, v3) = (
        b"#!/bin/sh\necho v0\n".to_vec(),
        b"#!/bin/sh\necho v1\n".to_vec(),
        b"#!/bin/sh\necho version 2\n".to_vec(),
        b"#!/bin/sh\necho version three\n".to_vec(),
    );
    fs::write(m.bin_dir().join("app"), &v1).unwrap();
    let agent = Agent::new(&v0);

    let (code, log) = agent.run(&m.api(), None);
    assert_eq!(code, 0, "first run:\n{log}");
    assert_eq!(agent.target(), v1, "first run installs v1:\n{log}");
    assert_eq!(fs::read(agent.dir.join("opt/app.bak")).unwrap(), v0);

    envelope(&put(&m, "/bins/app", Some("adm"), &v2), 200);
    let (code, log) = agent.run(&m.api(), None);
    assert_eq!(code, 0, "second run:\n{log}");
    assert_eq!(agent.target(), v2, "second run installs v2:\n{log}");
    assert_eq!(fs::read(agent.dir.join("opt/app.bak")).unwrap(), v1);
    assert!(temps_below(&agent.dir.join("opt")).is_empty());

    let app = node_app(&m, "e2e-node");
    assert_eq!(app.get("name").s(), "app");
    assert_eq!(app.get("hash").s(), md5_hex(&v2));
    assert_eq!(app.get("published").s(), md5_hex(&v2));
    assert_eq!(app.get("status").s(), "current");

    // Published by mv; the agent has not run: behind.
    m.publish_mv("app", &v3);
    let app = node_app(&m, "e2e-node");
    assert_eq!(app.get("hash").s(), md5_hex(&v2));
    assert_eq!(app.get("published").s(), md5_hex(&v3));
    assert_eq!(app.get("status").s(), "behind");
    let nodes = envelope(&get(&m, "/nodes"), 200);
    assert_eq!(
        nodes.get("summary"),
        &parse("{\"nodes\":1,\"current\":0,\"behind\":1,\"failed\":0}")
    );

    // A manager that requires a token.
    let guarded = Manager::start(&["--token", "t"]);
    fs::write(guarded.bin_dir().join("app"), &v3).unwrap();
    let (code, log) = agent.run(&guarded.api(), None);
    assert_eq!(code, 1, "without the token:\n{log}");
    assert!(log.contains("401"), "no 401 in the agent's log:\n{log}");
    assert_eq!(agent.target(), v2, "nothing installed without the token");
    let (code, log) = agent.run(&guarded.api(), Some("t"));
    assert_eq!(code, 0, "with the token:\n{log}");
    assert_eq!(agent.target(), v3);
    assert_eq!(
        node_app_with_token(&guarded, "t").get("status").s(),
        "current"
    );
}

fn node_app_with_token(m: &Manager, token: &str) -> Json {
    let auth = format!("Bearer {token}");
    let r = http(
        "GET",
        &format!("{}/nodes", m.api()),
        &[("Authorization", &auth)],
        b"",
    );
    let nodes = envelope(&r, 200);
    let n = &nodes.get("nodes").arr()[0];
    assert_eq!(n.get("name").s(), "e2e-node");
    n.get("binaries").arr()[0].clone()
}

// ---------------------------------------------------------------------------
// 14. Access log
// ---------------------------------------------------------------------------

#[test]
fn access_log_has_one_line_per_request() {
    let m = Manager::start(&[]);
    let app = pattern(14, 1234);
    fs::write(m.bin_dir().join("app"), &app).unwrap();

    let check = |method: &str, target: &str, status: u16, bytes: usize| {
        let needle = format!(" {method} {target} ");
        let line = m
            .wait_log(Duration::from_secs(10), |l| l.contains(&needle))
            .unwrap_or_else(|| {
                panic!(
                    "no access-log line for {method} {target}:\n{}",
                    m.log_lines().join("\n")
                )
            });
        let all: Vec<String> = m
            .log_lines()
            .into_iter()
            .filter(|l| l.contains(&needle))
            .collect();
        assert_eq!(all.len(), 1, "one line per request: {all:?}");
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 8, "{line}");
        assert_eq!(f[1], "INFO", "{line}");
        assert!(f[2].starts_with("127.0.0.1:"), "peer in {line}");
        assert_eq!((f[3], f[4]), (method, target), "{line}");
        assert_eq!(f[5], status.to_string(), "status in {line}");
        assert_eq!(f[6], bytes.to_string(), "byte count in {line}");
        let ms = f[7]
            .strip_suffix("ms")
            .unwrap_or_else(|| panic!("duration in {line}"));
        assert!(ms.parse::<f64>().is_ok(), "duration in {line}");
    };

    let r = get(&m, "/bins/app?probe=1");
    assert_eq!(r.status, 200);
    check("GET", "/api/v1/bins/app?probe=1", 200, r.body.len());
    let r = get(&m, "/bins/none?probe=2");
    assert_eq!(r.status, 404);
    check("GET", "/api/v1/bins/none?probe=2", 404, r.body.len());
    let r = get(&m, "/download/app?probe=3");
    assert_eq!(r.body, app);
    check("GET", "/api/v1/download/app?probe=3", 200, app.len());
    let raw = format!(
        "HEAD /api/v1/download/app?probe=4 HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        m.addr()
    );
    http_raw(&m.url(), raw.as_bytes());
    check("HEAD", "/api/v1/download/app?probe=4", 200, 0);
    let (r, _) = raw_get(&m, "/api/v1/download/..%2fsecret?probe=5");
    check(
        "GET",
        "/api/v1/download/..%2fsecret?probe=5",
        400,
        r.body.len(),
    );
    let r = post(
        &m,
        "/keepalive?node=logged&probe=6",
        &registration("logged", "00000000000000000000000000000000"),
    );
    check(
        "POST",
        "/api/v1/keepalive?node=logged&probe=6",
        200,
        r.body.len(),
    );
    let r = http("GET", &format!("{}/healthz?probe=7", m.url()), &[], b"");
    check("GET", "/healthz?probe=7", 200, r.body.len());
}

// ---------------------------------------------------------------------------
// 15. Start-up errors
// ---------------------------------------------------------------------------

#[test]
fn start_up_errors_have_exit_codes() {
    let dir = TempDir::new();
    fs::write(dir.join("config.json"), "{}").unwrap();
    fs::create_dir(dir.join("bins")).unwrap();
    let config = dir.join("config.json").display().to_string();
    let state = dir.join("state.json").display().to_string();
    let bins = dir.join("bins").display().to_string();
    let missing = dir.join("no-such-bins").display().to_string();

    let (code, err) = run_to_exit(
        &[
            "--config",
            &config,
            "--listen",
            "127.0.0.1:0",
            "--bin-dir",
            &missing,
            "--state-file",
            &state,
        ],
        Duration::from_secs(10),
    );
    assert_eq!(code, 2, "missing binDir:\n{err}");
    assert!(err.contains(&missing), "the message names the dir:\n{err}");

    let busy = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let (code, err) = run_to_exit(
        &[
            "--config",
            &config,
            "--listen",
            &addr,
            "--bin-dir",
            &bins,
            "--state-file",
            &state,
        ],
        Duration::from_secs(10),
    );
    assert_eq!(code, 1, "address in use:\n{err}");
    assert!(err.contains("cannot listen"), "{err}");
    assert!(err.contains(&addr), "the message names the address:\n{err}");
    drop(busy);

    let (code, err) = run_to_exit(&["--no-such-flag"], Duration::from_secs(10));
    assert_eq!(code, 2, "unknown flag:\n{err}");
}

// ---------------------------------------------------------------------------
// 16. Event loops and the worker pool
// ---------------------------------------------------------------------------

/// Reads exactly one answer (with a Content-Length body) from a connection
/// that stays open; `pending` carries bytes read past it. Panics after 10 s.
fn read_answer(s: &mut TcpStream, pending: &mut Vec<u8>) -> HttpResponse {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = parse_response(&pending[..end + 4]).expect("an answer head");
            let len = head.content_length().expect("Content-Length");
            if pending.len() >= end + 4 + len {
                let raw: Vec<u8> = pending.drain(..end + 4 + len).collect();
                return parse_response(&raw).expect("an answer");
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

#[test]
fn new_and_kept_alive_connections_are_all_answered() {
    // Requests answered on the event loops (bins/NAME, healthz) and by
    // workers (download), on connections that are new each time or kept
    // alive across both, from many clients at once. A lost hand-over between
    // the accept thread, the loops and the workers shows as a hang here.
    let m = Manager::start(&["--quiet", "--workers", "4"]);
    let app = pattern(16, 3000);
    fs::write(m.bin_dir().join("app"), &app).unwrap();
    let want = md5_hex(&app);
    assert_eq!(envelope(&get(&m, "/bins/app"), 200).get("hash").s(), want);

    let mut clients = Vec::new();
    for _ in 0..24 {
        let (api, url, want) = (m.api(), m.url(), want.clone());
        clients.push(thread::spawn(move || {
            for i in 0..100 {
                let r = if i % 3 == 2 {
                    http_within(
                        Duration::from_secs(10),
                        "GET",
                        &format!("{url}/healthz"),
                        &[],
                        b"",
                    )
                } else {
                    http_within(
                        Duration::from_secs(10),
                        "GET",
                        &format!("{api}/bins/app"),
                        &[],
                        b"",
                    )
                };
                assert_eq!(r.status, 200, "request {i}: {}", r.body_str());
                if i % 3 != 2 {
                    assert_eq!(envelope(&r, 200).get("hash").s(), want);
                }
            }
        }));
    }
    for _ in 0..3 {
        let (addr, want, app) = (m.addr(), want.clone(), app.clone());
        clients.push(thread::spawn(move || {
            let mut s = TcpStream::connect(&addr).unwrap();
            let mut pending = Vec::new();
            for i in 0..150 {
                let path = if i % 2 == 0 {
                    "bins/app"
                } else {
                    "download/app"
                };
                let req = format!("GET /api/v1/{path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
                s.write_all(req.as_bytes()).unwrap();
                let r = read_answer(&mut s, &mut pending);
                assert_eq!(r.status, 200, "request {i} ({path})");
                assert_eq!(r.header("connection"), Some("keep-alive"));
                if i % 2 == 0 {
                    assert_eq!(envelope(&r, 200).get("hash").s(), want);
                } else {
                    assert!(r.body == app, "download {i}: wrong bytes");
                }
            }
        }));
    }
    for c in clients {
        c.join().expect("a client failed");
    }

    // Pipelined: four requests in one write, answered in order, the last
    // closing the connection; the download in the middle is a worker's,
    // the rest the loop's (before and after the hand-over).
    let raw = "GET /api/v1/bins/app HTTP/1.1\r\nHost: h\r\n\r\n\
         GET /api/v1/download/app HTTP/1.1\r\nHost: h\r\n\r\n\
         GET /healthz HTTP/1.1\r\nHost: h\r\n\r\n\
         GET /api/v1/bins/nope HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n";
    let mut s = TcpStream::connect(m.addr()).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut pending = Vec::new();
    let answers: Vec<HttpResponse> = (0..4).map(|_| read_answer(&mut s, &mut pending)).collect();
    assert_eq!(envelope(&answers[0], 200).get("hash").s(), want);
    assert!(
        answers[1].status == 200 && answers[1].body == app,
        "pipelined download"
    );
    assert_eq!(
        (answers[2].status, answers[2].body_str().as_str()),
        (200, "ok\n")
    );
    expect_error(&answers[3], 404, "binary not found");
    assert_eq!(answers[3].header("connection"), Some("close"));
    let mut rest = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.read_to_end(&mut rest);
    assert!(
        pending.is_empty() && rest.is_empty(),
        "bytes after the last answer"
    );
}

#[test]
fn a_full_worker_queue_answers_503_at_once() {
    // One worker, so its queue holds 16 requests.
    let m = Manager::start(&["--quiet", "--workers", "1", "--admin-token", "adm"]);
    let app = pattern(17, 1000);
    fs::write(m.bin_dir().join("app"), &app).unwrap();
    envelope(&get(&m, "/bins/app"), 200); // hashed now: answered on the loops from here on

    // The worker is busy with an upload whose body stops coming…
    let mut upload = TcpStream::connect(m.addr()).unwrap();
    upload
        .write_all(b"PUT /api/v1/bins/slow HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer adm\r\nContent-Length: 1000\r\n\r\nabc")
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    // …and sixteen requests that need a worker fill its queue.
    let queued: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut s = TcpStream::connect(m.addr()).unwrap();
            s.write_all(b"GET /api/v1/nodes HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
                .unwrap();
            s
        })
        .collect();
    thread::sleep(Duration::from_millis(500));

    // The next one is told at once, in the envelope, with Retry-After.
    let r = http_within(
        Duration::from_secs(5),
        "GET",
        &format!("{}/nodes", m.api()),
        &[],
        b"",
    );
    expect_error(&r, 503, "server busy: every worker is taken; retry shortly");
    assert_eq!(r.header("retry-after"), Some("1"));
    // What the loops answer is still answered.
    let r = http_within(
        Duration::from_secs(5),
        "GET",
        &format!("{}/bins/app", m.api()),
        &[],
        b"",
    );
    assert_eq!(envelope(&r, 200).get("hash").s(), md5_hex(&app));

    // The upload gives up: the worker answers it, then every queued request.
    drop(upload);
    for (i, mut s) in queued.into_iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let r = parse_response(&raw)
            .unwrap_or_else(|| panic!("queued request {i}: no answer: {:?}", snippet(&raw)));
        let data = envelope(&r, 200);
        assert!(data.get("nodes").arr().is_empty(), "queued request {i}");
    }
    assert!(
        !m.bin_dir().join("slow").exists(),
        "a cut-off upload was published"
    );
}

#[test]
fn the_fleet_view_names_failed_and_unpublished_builds() {
    let m = Manager::start(&["--quiet"]);
    let app = pattern(18, 700);
    fs::write(m.bin_dir().join("app"), &app).unwrap();
    let new = md5_hex(&app);
    let old = "0123456789abcdef0123456789abcdef";
    // n1 failed to install the published build; n2 failed an older one (so
    // it is merely behind); both also run a binary nobody publishes.
    let body = |name: &str, failed: &str| {
        format!(
            "{{\"name\":\"{name}\",\"cpuArch\":\"x86_64\",\"osRelease\":\"Test OS 1\",\"proxyVersion\":\"1.0.0\",\
             \"binaries\":[{{\"name\":\"app\",\"version\":\"latest\",\"hash\":\"{old}\"}},{{\"name\":\"ghost\",\"version\":\"latest\",\"hash\":\"{old}\"}}],\
             \"failures\":[{{\"name\":\"app\",\"hash\":\"{failed}\",\"error\":\"app: not RUNNING after restart\",\"at\":\"2020-01-01T00:00:00Z\"}}],\
             \"lastSeen\":\"2020-01-01T00:00:00Z\"}}"
        )
    };
    envelope(&post(&m, "/keepalive?node=n1", &body("n1", &new)), 200);
    envelope(
        &post(
            &m,
            "/keepalive?node=n2",
            &body("n2", "fedcba9876543210fedcba9876543210"),
        ),
        200,
    );

    let view = envelope(&get(&m, "/nodes"), 200);
    assert_eq!(
        view.get("summary"),
        &parse("{\"nodes\":2,\"current\":0,\"behind\":1,\"failed\":1}")
    );
    let list = view.get("nodes").arr();
    let bins = |n: &str| {
        list.iter()
            .find(|x| x.get("name").s() == n)
            .unwrap_or_else(|| panic!("{n} missing"))
            .get("binaries")
            .arr()
            .to_vec()
    };
    let n1 = bins("n1");
    assert_eq!(
        n1[0].keys(),
        ["name", "version", "hash", "published", "status", "error"]
    );
    assert_eq!(
        (
            n1[0].get("status").s(),
            n1[0].get("published").s(),
            n1[0].get("error").s()
        ),
        ("failed", new.as_str(), "app: not RUNNING after restart")
    );
    assert_eq!(n1[1].get("status").s(), "unpublished");
    assert_eq!(n1[1].get("published"), &Json::Null);
    let n2 = bins("n2");
    assert_eq!(
        n2[0].keys(),
        ["name", "version", "hash", "published", "status"]
    );
    assert_eq!(n2[0].get("status").s(), "behind");
    assert_eq!(n2[1].get("status").s(), "unpublished");
}

/// SIGTERM (what `systemctl stop` and `docker stop` send): new connections
/// are refused at once, a download in flight finishes whole, lastSeen
/// updates are written, one line says it stopped, exit 0.
#[test]
fn sigterm_stops_accepting_finishes_downloads_in_flight_and_exits_0() {
    let mut m = Manager::start(&["--quiet"]);
    let body = pattern(7, 32 << 20);
    m.publish_mv("big", &body);
    let r = post(
        &m,
        "/keepalive?node=n1",
        &registration("n1", &md5_hex(&body)),
    );
    envelope(&r, 200);

    // A download that has started but is read slowly: still in flight.
    let mut s = TcpStream::connect(m.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /api/v1/download/big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut got = vec![0u8; 64 * 1024];
    let n = s.read(&mut got).unwrap();
    got.truncate(n);

    m.signal("TERM");
    let refused = common::wait_until(Duration::from_secs(10), || {
        TcpStream::connect(m.addr()).is_err()
    });
    assert!(refused, "still accepting after SIGTERM");
    assert!(
        m.wait_exit(Duration::from_millis(100)).is_none(),
        "exited with a download in flight"
    );

    s.read_to_end(&mut got).unwrap();
    let start = find(&got, b"\r\n\r\n").expect("a head") + 4;
    assert_eq!(got.len() - start, body.len(), "the download was cut short");
    assert!(got[start..] == body[..], "the download's bytes differ");

    assert_eq!(
        m.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{:?}",
        m.log_lines()
    );
    let stopped = m
        .log_lines()
        .into_iter()
        .filter(|l| l.contains("bin-manager stopped"))
        .collect::<Vec<_>>();
    assert_eq!(stopped.len(), 1, "{:?}", m.log_lines());
    assert!(
        stopped[0].contains(
            "bin-manager stopped (SIGTERM): stopped accepting, finished the 1 request in flight"
        ),
        "{}",
        stopped[0]
    );

    // The registration survived; the count reads as English.
    m.restart();
    let line = m
        .log_lines()
        .into_iter()
        .rfind(|l| l.contains("listening on"))
        .unwrap();
    assert!(line.contains(", 1 node known,"), "{line}");
}
