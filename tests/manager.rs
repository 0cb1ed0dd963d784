//! Integration tests of the REAL `bin-manager` executable (see
//! testkit/src/manager.rs): the protocol and its envelopes, arch/version
//! selection, hash caching, Range/HEAD, publishing, limits, path traversal,
//! tokens, durability across kill -9, slow clients, publish-while-downloading,
//! the real agent end to end, the access log and start-up errors.
use testkit as common;

use common::agent::Agent;
use common::json::{parse, Json};
use common::manager::{
    envelope, exchange, expect_error, get, http_from, http_within, post, put, read_answer, run_cli,
    run_to_exit, snippet, tree, Manager,
};
use common::{
    http, http_raw, json_string, md5_hex, parse_response, sha256_hex, HttpResponse, TempDir,
};
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

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
            "{{\"code\":200,\"message\":\"Success\",\"data\":{{\"name\":\"app\",\"version\":\"latest\",\"hash\":\"{}\",\"sha256\":\"{}\",\"size\":3000}},\"sha256\":\"{2}\",\"sha256sum\":\"{2}\"}}",
            md5_hex(&app),
            sha256_hex(&app),
            sha256_hex(&app)
        ),
        "the envelope, then the sha256 where the original project's agents read it"
    );
    // Only the bins/NAME answer carries them: a publish's answer does not.
    let r = put(&m, "/bins/other", Some("adm"), b"other");
    assert_eq!(parse(&r.body_str()).keys(), ["code", "message", "data"]);
    envelope(&r, 200);

    // A heartbeat naming no node (the original project's shell agent):
    // 204, no body, no Content-Length.
    let r = get(&m, "/keepalive");
    assert_eq!(
        (r.status, r.body.as_slice()),
        (204, &b""[..]),
        "{}",
        r.body_str()
    );
    assert_eq!(r.content_length(), None);

    // 400
    expect_error(&post(&m, "/keepalive", "{}"), 400, "missing ?node=NAME");
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
    assert_eq!(nodes.keys(), ["summary", "next", "nodes"]);
    let list = envelope(&get(&m, "/bins"), 200);
    assert_eq!(list.arr().len(), 2);
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
    // The first registration also hands the node its token (once).
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
            "registered",
            "labels",
            "since",
            "nodeToken"
        ]
    );
    assert_eq!(rec.get("nodeToken").s().len(), 64);
    assert_eq!(rec.get("name").s(), "n1");
    assert!(rec.get("labels").keys().is_empty(), "{rec:?}");
    assert_eq!(rec.get("since").keys(), ["app"], "{rec:?}");
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
    assert!(
        !again.keys().contains(&"nodeToken"),
        "a heartbeat shows the token: {:?}",
        again.keys()
    );

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
    assert_eq!(m.bin_dir_tree(), ["app"]);
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
        m.bin_dir_tree(),
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
        &parse("{\"nodes\":2,\"current\":1,\"behind\":1,\"failed\":0,\"pending\":0}")
    );
    assert_eq!(tree(&state_dir), ["state.json", "state.json.log"]);
    assert_eq!(m.bin_dir_tree(), ["app"]);
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
    // Two workers, three clients sending their heads a byte at a time: if
    // heads were read by workers (or one request at a time), the normal
    // requests below would wait for the slow clients' head timeout (10 s).
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
                        return ("write failed", Instant::now(), Vec::new());
                    }
                }
                // …then silence: the server must drop the connection (bounded wait).
                s.set_read_timeout(Some(Duration::from_secs(25))).unwrap();
                let mut got = Vec::new();
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => return ("closed", Instant::now(), got),
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                        Err(e)
                            if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) =>
                        {
                            return ("still open", Instant::now(), got)
                        }
                        Err(_) => return ("reset", Instant::now(), got),
                    }
                }
            })
        })
        .collect();
    // The slow clients are connected (and queued for accept) before the
    // normal requests below, so a server serving in arrival order would
    // take them first.
    for _ in 0..3 {
        rx.recv_timeout(Duration::from_secs(5))
            .expect("slow clients connected");
    }

    // Meanwhile, normal requests are answered, each well within the slow
    // clients' 10 s head timeout (a generous bound: they take milliseconds).
    let bound = Duration::from_secs(5);
    let timed = |path: String| {
        let started = Instant::now();
        let r = http_within(Duration::from_secs(30), "GET", &path, &[], b"");
        let took = started.elapsed();
        assert!(
            took < bound,
            "GET {path} took {took:?} with 3 slow clients on 2 workers (bound {bound:?})"
        );
        r
    };
    let r = timed(format!("{}/bins/app", m.api()));
    assert_eq!(envelope(&r, 200).get("hash").s(), md5_hex(&app));
    let r = timed(format!("{}/download/app", m.api()));
    assert_eq!((r.status, &r.body), (200, &app));
    let r = timed(format!("{}/healthz", m.url()));
    assert_eq!(r.status, 200);
    let answered = Instant::now();

    for h in slow {
        let (how, when, got) = h.join().unwrap();
        assert!(
            how == "closed" || how == "reset" || how == "write failed",
            "a slow client was not dropped: {how}, got {:?}",
            String::from_utf8_lossy(&got)
        );
        // Whatever the machine's speed: the normal requests were answered
        // while every slow client was still connected.
        assert!(
            when > answered,
            "a slow client was dropped before the normal requests were answered"
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
        &parse("{\"nodes\":1,\"current\":0,\"behind\":1,\"failed\":0,\"pending\":0}")
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
    // One worker, so its queue holds 16 requests (all from one address here,
    // so that address may have them all).
    let m = Manager::start_with_config(
        r#"{"workersPerClient":100}"#,
        &["--quiet", "--workers", "1", "--admin-token", "adm"],
    );
    let app = pattern(17, 1000);
    fs::write(m.bin_dir().join("app"), &app).unwrap();
    envelope(&get(&m, "/bins/app"), 200); // hashed now: answered on the loops from here on

    // The worker is busy with an upload whose body keeps coming, a byte at a
    // time (so its read timeout never ends it), until `stop`.
    let mut upload = TcpStream::connect(m.addr()).unwrap();
    upload
        .write_all(b"PUT /api/v1/bins/slow HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer adm\r\nContent-Length: 67108864\r\n\r\nabc")
        .unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickle = {
        let stop = stop.clone();
        thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(200));
                if upload.write_all(b"x").is_err() {
                    break;
                }
            }
        })
    };
    // The worker has it once its temp file holds the first bytes.
    let taken = common::wait_until(Duration::from_secs(30), || {
        fs::read_dir(m.bin_dir()).unwrap().flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(".slow.")
                && name.ends_with(".bin-proxy-tmp")
                && e.metadata().is_ok_and(|md| md.len() >= 3)
        })
    });
    assert!(taken, "the worker never started writing the upload");

    // Sixteen requests that need a worker fill its queue…
    let nodes = || {
        let mut s = TcpStream::connect(m.addr()).unwrap();
        s.write_all(b"GET /api/v1/nodes HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .unwrap();
        s
    };
    let mut queued: Vec<TcpStream> = (0..16).map(|_| nodes()).collect();
    // …and the next is refused. Sent one by one until one is: one not
    // answered within 2 s is not yet read by its loop (so queued, or
    // refused later): kept, and read below.
    let mut refused = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    while refused.is_none() && Instant::now() < deadline && queued.len() < 40 {
        let mut s = nodes();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut first = [0u8; 1];
        match s.read(&mut first) {
            Ok(1) => {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut raw = first.to_vec();
                let _ = s.read_to_end(&mut raw);
                refused = Some(parse_response(&raw).unwrap_or_else(|| {
                    panic!("after {} queued: {:?}", queued.len(), snippet(&raw))
                }));
            }
            _ => queued.push(s),
        }
    }
    let r = refused.unwrap_or_else(|| {
        panic!(
            "no request was refused with {} waiting for the one worker",
            queued.len()
        )
    });
    // Refused at once (within the 2 s above), in the envelope, with Retry-After.
    expect_error(&r, 503, "server busy: every worker is taken; retry shortly");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(
        queued.len() >= 16,
        "refused with only {} requests queued",
        queued.len()
    );
    // And so is the next one, while the queue stays full.
    let r = http_within(
        Duration::from_secs(5),
        "GET",
        &format!("{}/nodes", m.api()),
        &[],
        b"",
    );
    expect_error(&r, 503, "server busy: every worker is taken; retry shortly");
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
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    trickle.join().unwrap();
    let mut served = 0;
    for (i, mut s) in queued.into_iter().enumerate() {
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        let r = parse_response(&raw)
            .unwrap_or_else(|| panic!("queued request {i}: no answer: {:?}", snippet(&raw)));
        if r.status == 503 {
            continue; // read by its loop only after the queue was full
        }
        let data = envelope(&r, 200);
        assert!(data.get("nodes").arr().is_empty(), "queued request {i}");
        served += 1;
    }
    assert_eq!(served, 16, "requests the full queue held");
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
        &parse("{\"nodes\":2,\"current\":0,\"behind\":1,\"failed\":1,\"pending\":0}")
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

// ---------------------------------------------------------------------------
// 17. Concurrent uploads
// ---------------------------------------------------------------------------

/// One `PUT bins/NAME` sent in two halves with a pause in between that the
/// caller controls; `cut` closes the connection instead of sending the rest.
struct Upload {
    name: &'static str,
    body: Vec<u8>,
    cut: bool,
}

#[test]
fn concurrent_uploads_publish_only_complete_builds() {
    let m = Manager::start(&["--quiet", "--admin-token", "adm"]);
    // Names sharing a prefix: a PUT of "app" once removed the temp file of
    // a concurrent PUT of "app.x".
    let names = ["app", "app.x", "app.1"];
    let uploads: Vec<Upload> = names
        .iter()
        .flat_map(|&name| (0..6).map(move |i| (name, i)))
        .enumerate()
        .map(|(seed, (name, i))| Upload {
            name,
            body: pattern(700 + seed as u64, 256 * 1024 + seed),
            cut: i % 3 == 2,
        })
        .collect();
    let all_sent_half = std::sync::Arc::new(std::sync::Barrier::new(uploads.len()));
    let handles: Vec<_> = uploads
        .iter()
        .map(|u| {
            let (addr, barrier) = (m.addr(), all_sent_half.clone());
            let (name, body, cut) = (u.name, u.body.clone(), u.cut);
            thread::spawn(move || {
                let mut s = TcpStream::connect(&addr).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                write!(
                    s,
                    "PUT /api/v1/bins/{name} HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer adm\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                )
                .unwrap();
                let half = body.len() / 2;
                s.write_all(&body[..half]).unwrap();
                // Every upload is in flight at once before any finishes.
                barrier.wait();
                if cut {
                    drop(s); // cut off halfway
                    return None;
                }
                s.write_all(&body[half..]).unwrap();
                let mut raw = Vec::new();
                let _ = s.read_to_end(&mut raw);
                Some(parse_response(&raw).unwrap_or_else(|| {
                    panic!("no answer to PUT {name}: {:?}", snippet(&raw))
                }))
            })
        })
        .collect();
    let answers: Vec<Option<HttpResponse>> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();

    for name in names {
        let mine: Vec<(&Upload, &Option<HttpResponse>)> = uploads
            .iter()
            .zip(&answers)
            .filter(|(u, _)| u.name == name)
            .collect();
        // Every complete upload got a 200 naming the hashes of its own bytes.
        let mut answered = Vec::new();
        for (u, a) in mine.iter().filter(|(u, _)| !u.cut) {
            let a = a.as_ref().unwrap();
            let d = envelope(a, 200);
            assert_eq!(d.get("hash").s(), md5_hex(&u.body), "{name}");
            assert_eq!(d.get("sha256").s(), sha256_hex(&u.body), "{name}");
            assert_eq!(d.get("size").n() as usize, u.body.len(), "{name}");
            answered.push(md5_hex(&u.body));
        }
        // What is published is one of those complete uploads, never a cut
        // one, and what is served describes exactly those bytes.
        let on_disk = fs::read(m.bin_dir().join(name)).unwrap();
        let served = envelope(&get(&m, &format!("/bins/{name}")), 200);
        assert!(
            answered.contains(&md5_hex(&on_disk)),
            "{name}: the published file ({} bytes) is none of the uploads answered 200",
            on_disk.len()
        );
        assert_eq!(served.get("hash").s(), md5_hex(&on_disk), "{name}");
        assert_eq!(served.get("sha256").s(), sha256_hex(&on_disk), "{name}");
        let r = get(&m, &format!("/download/{name}"));
        assert_eq!(r.body, on_disk, "{name}: download");
    }
    // The cut-off uploads' temp files go as soon as the server sees the cut
    // (`.builds/` is where bin-manager keeps builds by md5 for rollouts).
    let mut left = Vec::new();
    let clean = common::wait_until(Duration::from_secs(20), || {
        left = tree(&m.bin_dir());
        left.retain(|p| !p.starts_with(".builds"));
        left == ["app", "app.1", "app.x"]
    });
    assert!(clean, "binDir holds more than the three builds: {left:?}");
    assert!(
        temps_below(&m.bin_dir()).is_empty(),
        "{:?}",
        tree(&m.bin_dir())
    );
}

#[test]
fn stale_upload_temp_files_are_swept_and_live_ones_kept() {
    let mut m = Manager::start(&["--quiet", "--admin-token", "adm"]);
    let stale = m
        .bin_dir()
        .join(".app.4242up-0-0123456789abcdef.bin-proxy-tmp");
    let fresh = m
        .bin_dir()
        .join(".app.4243up-0-0123456789abcdef.bin-proxy-tmp");
    let arch_stale = m
        .bin_dir()
        .join("aarch64/.app.4242up-1-0123456789abcdef.bin-proxy-tmp");
    let mine = m.bin_dir().join(".app.new"); // an operator's, about to be mv'd
    fs::create_dir_all(m.bin_dir().join("aarch64")).unwrap();
    for p in [&stale, &fresh, &arch_stale, &mine] {
        fs::write(p, b"partial").unwrap();
    }
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    for p in [&stale, &arch_stale, &mine] {
        fs::File::options()
            .write(true)
            .open(p)
            .unwrap()
            .set_modified(hour_ago)
            .unwrap();
    }
    m.restart();
    m.wait_log(Duration::from_secs(5), |l| {
        l.contains("removed 2 temp file(s) of interrupted uploads")
    })
    .unwrap_or_else(|| panic!("no sweep line: {:?}", m.log_lines()));
    assert!(!stale.exists() && !arch_stale.exists());
    assert!(fresh.exists(), "a temp file written to just now was swept");
    assert!(
        mine.exists(),
        "a file that is not an upload's temp was swept"
    );
}

// ---------------------------------------------------------------------------
// 18. Request parsing leaves no doubt; one address cannot take every worker
// ---------------------------------------------------------------------------

/// How many responses `raw` holds (status lines at the start or after a body).
fn responses_in(raw: &[u8]) -> usize {
    let text = String::from_utf8_lossy(raw);
    text.match_indices("HTTP/1.1 ")
        .filter(|(i, _)| *i == 0 || text[..*i].ends_with('\n') || text[..*i].ends_with('}'))
        .count()
}

#[test]
fn duplicate_or_odd_content_length_is_400_and_nothing_is_smuggled() {
    let m = Manager::start(&[]);
    let smuggled = "GET /api/v1/nodes HTTP/1.1\r\nHost: h\r\n\r\n";
    let n = smuggled.len();
    let variants = [
        format!("Content-Length: {n}\r\nContent-Length: {n}"),
        format!("Content-Length: {n}\r\ncontent-length: 0{n}"),
        format!("Content-Length: 0\r\nContent-Length: {n}"),
        format!("Content-Length: +{n}"),
        format!("Content-Length: {n}, {n}"),
        format!("Content-Length: 0x{n:x}"),
    ];
    for cl in &variants {
        let raw =
            format!("POST /api/v1/keepalive?node=n1 HTTP/1.1\r\nHost: h\r\n{cl}\r\n\r\n{smuggled}");
        let answer = exchange(&m.addr(), raw.into_bytes(), Duration::from_secs(10));
        let r = parse_response(&answer)
            .unwrap_or_else(|| panic!("{cl:?}: no answer: {:?}", snippet(&answer)));
        envelope(&r, 400);
        let msg = parse_message(&r);
        assert!(
            msg == "more than one Content-Length header"
                || msg == "invalid Content-Length: plain digits only",
            "{cl:?}: {msg}"
        );
        assert_eq!(r.header("connection"), Some("close"), "{cl:?}");
        assert_eq!(
            responses_in(&answer),
            1,
            "{cl:?}: the smuggled request was answered: {:?}",
            snippet(&answer)
        );
    }
    // The access log has the refusals, and never the smuggled request.
    let refused = |l: &str| l.contains(" - - 400 ");
    assert!(
        common::wait_until(Duration::from_secs(5), || {
            m.log_lines().iter().filter(|l| refused(l)).count() == variants.len()
        }),
        "{:?}",
        m.log_lines()
    );
    assert!(
        !m.log_lines().iter().any(|l| l.contains("/api/v1/nodes")),
        "{:?}",
        m.log_lines()
    );
    // No registration came through either.
    expect_error(&get(&m, "/keepalive?node=n1"), 404, "node not found");
}

#[test]
fn a_head_with_bare_lf_line_ends_is_400_at_once() {
    let m = Manager::start(&["--quiet"]);
    for raw in [
        &b"GET /healthz HTTP/1.1\nHost: h\n\n"[..],
        b"GET /healthz HTTP/1.1\r\nHost: h\n\r\n",
        // Never finished: the bare LF alone decides, nothing is waited for.
        b"GET /healthz HTTP/1.1\nHost: h",
    ] {
        // Well under the 10 s a head may take: "at once", with room for a
        // loaded machine.
        let answer = exchange(&m.addr(), raw.to_vec(), Duration::from_secs(5));
        let r = parse_response(&answer)
            .unwrap_or_else(|| panic!("{:?}: no answer within 5 s", String::from_utf8_lossy(raw)));
        expect_error(&r, 400, "malformed request: lines must end in CRLF");
        assert_eq!(r.header("connection"), Some("close"));
    }
}

/// A connection that sends a POST head and then its body one byte at a time.
struct Dribbler {
    s: TcpStream,
    got: Vec<u8>,
    done: bool,
}

impl Dribbler {
    /// Reads what arrived without blocking; `done` once the server closed.
    fn poll(&mut self) {
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => {
                    self.done = true;
                    return;
                }
                Ok(n) => self.got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    self.done = true;
                    return;
                }
            }
        }
    }

    fn status(&self) -> Option<u16> {
        parse_response(&self.got).map(|r| r.status)
    }
}

#[test]
fn dribbling_request_bodies_from_one_address_do_not_starve_another() {
    let m = Manager::start(&[]);
    let app = pattern(19, 1 << 20);
    fs::write(m.bin_dir().join("app"), &app).unwrap();
    envelope(&get(&m, "/bins/app"), 200); // hashed now
    let server: std::net::SocketAddrV4 = m.addr().parse().unwrap();
    let dribbler_ip = std::net::Ipv4Addr::new(127, 0, 0, 2);

    // 600 connections from 127.0.0.2, each a registration whose body comes
    // one byte at a time.
    let mut dribblers: Vec<Dribbler> = (0..600)
        .map(|i| {
            let mut s = bin_proxy::sys::connect_from(dribbler_ip, server)
                .unwrap_or_else(|e| panic!("connect from {dribbler_ip}: {e}"));
            write!(
                s,
                "POST /api/v1/keepalive?node=d{i} HTTP/1.1\r\nHost: h\r\nContent-Length: 1000\r\n\r\n{{"
            )
            .unwrap();
            s.set_nonblocking(true).unwrap();
            Dribbler {
                s,
                got: Vec::new(),
                done: false,
            }
        })
        .collect();
    // The default 256 workers give one address at most 32: the rest are
    // told 503 at once.
    let mut refused = 0;
    let told = common::wait_until(Duration::from_secs(30), || {
        dribblers.iter_mut().for_each(Dribbler::poll);
        refused = dribblers.iter().filter(|d| d.status() == Some(503)).count();
        refused >= 600 - 32
    });
    assert!(told, "only {refused} of 600 dribblers were refused at once");
    let sample = dribblers.iter().find(|d| d.status() == Some(503)).unwrap();
    let r = parse_response(&sample.got).unwrap();
    expect_error(
        &r,
        503,
        "too many requests from your address at once; retry shortly",
    );
    assert_eq!(r.header("retry-after"), Some("1"));

    // Another address is served: a download and a registration (both need
    // a worker). Generous bounds: a loaded machine, a debug build.
    let started = Instant::now();
    let r = http_within(
        Duration::from_secs(30),
        "GET",
        &format!("{}/download/app", m.api()),
        &[],
        b"",
    );
    assert_eq!(r.status, 200);
    assert!(r.body == app, "the download is not the file");
    let r = http_within(
        Duration::from_secs(30),
        "POST",
        &format!("{}/keepalive?node=other", m.api()),
        &[],
        registration("other", "").as_bytes(),
    );
    envelope(&r, 200);
    eprintln!("another address was served in {:?}", started.elapsed());

    // The dribblers that got a worker are cut at their body deadline (10 s
    // plus a second per 256 KiB): 408. Keep dribbling meanwhile.
    let mut last = Instant::now();
    let finished = common::wait_until(Duration::from_secs(60), || {
        if last.elapsed() >= Duration::from_millis(500) {
            last = Instant::now();
            for d in dribblers.iter_mut().filter(|d| !d.done) {
                let _ = d.s.write_all(b" ");
            }
        }
        dribblers.iter_mut().for_each(Dribbler::poll);
        dribblers.iter().all(|d| d.done || d.status().is_some())
    });
    let statuses: Vec<Option<u16>> = dribblers.iter().map(Dribbler::status).collect();
    assert!(finished, "some dribblers are still held: {statuses:?}");
    let timed_out = statuses.iter().filter(|s| **s == Some(408)).count();
    assert!(
        statuses.iter().all(|s| matches!(s, Some(503 | 408))),
        "a dribbler got something other than 503 or 408: {statuses:?}"
    );
    assert!(timed_out >= 1, "no dribbler got a worker and a 408");
    // Every 503 is in the access log.
    let logged = m
        .log_lines()
        .iter()
        .filter(|l| l.contains("/api/v1/keepalive?node=d") && l.contains(" 503 "))
        .count();
    let refused = statuses.iter().filter(|s| **s == Some(503)).count();
    assert_eq!(logged, refused, "503s in the access log");
}

// ---------------------------------------------------------------------------
// 19. No host can speak for another: node tokens, admission, bounds
// ---------------------------------------------------------------------------

/// The agent's state file beside its manifest.
fn agent_state(agent: &Agent) -> std::path::PathBuf {
    agent.dir.join("manifest.json.state")
}

/// The node token the agent keeps.
fn kept_token(agent: &Agent) -> String {
    let state = parse(&fs::read_to_string(agent_state(agent)).unwrap());
    state.get("node").get("token").s().to_string()
}

/// `bin-manager node ACTION NAME --server URL` with the admin token in the
/// environment; (exit code, stdout, stderr).
fn node_cli(m: &Manager, action: &str, name: &str, admin: &str) -> (i32, String, String) {
    let url = m.url();
    run_cli(
        &["node", action, name, "--server", &url],
        &[("BIN_MANAGER_ADMIN_TOKEN", admin)],
        Duration::from_secs(20),
    )
}

/// Everything in the registry's files, for "nothing changed" and "no
/// token on disk".
fn registry_text(m: &Manager) -> String {
    let state = m.state_file();
    let log = state.with_extension("json.log");
    format!(
        "{}{}",
        fs::read_to_string(&state).unwrap_or_default(),
        fs::read_to_string(&log).unwrap_or_default()
    )
}

#[test]
fn node_tokens_keep_hosts_from_speaking_for_each_other() {
    let m = Manager::start_with_config(r#"{"requireNodeTokens":true}"#, &["--admin-token", "adm"]);
    let (v0, v1, v2) = (
        b"#!/bin/sh\necho v0\n".to_vec(),
        b"#!/bin/sh\necho v1\n".to_vec(),
        b"#!/bin/sh\necho v2\n".to_vec(),
    );
    m.publish_mv("app", &v1);
    let agent = Agent::new(&v0);
    let (code, log) = agent.run(&m.api(), None);
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("keeping the node token the server issued"),
        "{log}"
    );
    let token = kept_token(&agent);
    assert_eq!(token.len(), 64, "{token}");
    assert_eq!(common::mode(&agent_state(&agent)), 0o600);
    assert!(!log.contains(&token), "the agent logged its token");
    // The server keeps only a hash, in files only root can read.
    let on_disk = registry_text(&m);
    assert!(
        !on_disk.contains(&token),
        "the registry holds the token itself"
    );
    assert!(on_disk.contains(&sha256_hex(token.as_bytes())), "{on_disk}");
    for file in [m.state_file(), m.state_file().with_extension("json.log")] {
        assert_eq!(common::mode(&file), 0o600, "{}", file.display());
    }
    let before = node_app(&m, "e2e-node");
    assert_eq!(before.get("status").s(), "current");

    // Another host speaks for e2e-node: without the token, or with a wrong
    // one, everything about the node is refused and nothing changes.
    let forged = "{\"name\":\"e2e-node\",\"binaries\":[{\"name\":\"app\",\"version\":\"latest\",\"hash\":\"ffffffffffffffffffffffffffffffff\"}],\"failures\":[]}";
    let missing = "node \"e2e-node\" has a node token and this server requires it (X-Node-Token)";
    let wrong = "node \"e2e-node\": the X-Node-Token sent is not this node's token";
    let api = m.api();
    for (headers, why) in [
        (vec![], missing),
        (vec![("X-Node-Token", "0000")], wrong),
        (vec![("X-Node-Token", &token[..63])], wrong),
    ] {
        let req = |method: &str, path: &str, body: &str| {
            http(method, &format!("{api}{path}"), &headers, body.as_bytes())
        };
        expect_error(&req("POST", "/keepalive?node=e2e-node", forged), 403, why);
        expect_error(
            &req(
                "POST",
                "/bins/app?node=e2e-node",
                "{\"hash\":\"ffffffffffffffffffffffffffffffff\"}",
            ),
            403,
            why,
        );
        expect_error(&req("GET", "/keepalive?node=e2e-node", ""), 403, why);
        // Nor in the original project's agents' dialect.
        let legacy = "{\"nodeName\":\"e2e-node\",\"cpuArch\":\"x86_64\",\"osRelease\":\"forged\",\"binProxyVersion\":\"1.2.0\"}";
        expect_error(&req("POST", "/keepalive", legacy), 403, why);
        let sha = sha256_hex(b"forged");
        let legacy_report = format!("{{\"node_id\":\"e2e-node\",\"sha256sum\":\"{sha}\"}}");
        expect_error(&req("POST", "/bins/app", &legacy_report), 403, why);
    }
    assert_eq!(
        node_app(&m, "e2e-node"),
        before,
        "a forged request changed the node"
    );

    // The agent itself, with its token, goes on: upgrade, report.
    m.publish_mv("app", &v2);
    let (code, log) = agent.run(&m.api(), None);
    assert_eq!(code, 0, "{log}");
    assert_eq!(agent.target(), v2);
    assert_eq!(node_app(&m, "e2e-node").get("status").s(), "current");

    // The host is rebuilt (its state file lost): refused, said clearly.
    fs::remove_file(agent_state(&agent)).unwrap();
    let (code, log) = agent.run(&m.api(), None);
    assert_eq!(code, 1, "{log}");
    assert!(
        log.contains("node token refused: ")
            && log.contains(missing)
            && log.contains(
                "run `bin-manager node reset e2e-node` on the server if this host was rebuilt"
            ),
        "{log}"
    );

    // The admin forgets the node's token; the next run gets a new one.
    let (code, _, err) = run_cli(
        &[
            "node",
            "reset",
            "e2e-node",
            "--server",
            &m.url(),
            "--admin-token",
            "adm",
        ],
        &[],
        Duration::from_secs(20),
    );
    assert_eq!(code, 2, "the admin token on the command line: {err}");
    assert!(
        err.contains("never take the admin token from the command line"),
        "{err}"
    );
    let (code, _, err) = node_cli(&m, "reset", "e2e-node", "wrong");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("server answered 401: this needs the admin bearer token"),
        "{err}"
    );
    let (code, _, err) = node_cli(&m, "reset", "nobody", "adm");
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("server answered 404: node not found"), "{err}");
    let (code, out, err) = node_cli(&m, "reset", "e2e-node", "adm");
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "node \"e2e-node\": token forgotten; its next registration gets a new one"
    );
    assert!(m
        .wait_log(Duration::from_secs(5), |l| l.contains(
            "node \"e2e-node\" token forgotten: its next registration gets a new one"
        ))
        .is_some());
    let (code, log) = agent.run(&m.api(), None);
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("has no node token on the server; registered again to get one"),
        "{log}"
    );
    let renewed = kept_token(&agent);
    assert!(renewed.len() == 64 && renewed != token, "{renewed}");
    // The old token is worthless now.
    let r = http(
        "GET",
        &format!("{}/keepalive?node=e2e-node", m.api()),
        &[("X-Node-Token", &token)],
        b"",
    );
    expect_error(&r, 403, wrong);
}

#[test]
fn without_required_tokens_seed_agents_work_and_a_wrong_token_is_still_refused() {
    let m = Manager::start(&[]);
    let hash = "0123456789abcdef0123456789abcdef";
    let token = envelope(
        &post(&m, "/keepalive?node=n1", &registration("n1", hash)),
        200,
    )
    .get("nodeToken")
    .s()
    .to_string();
    // A seed agent (no token at all) may refresh and report.
    let other = "fedcba9876543210fedcba9876543210";
    let r = post(&m, "/keepalive?node=n1", &registration("n1", other));
    let data = envelope(&r, 200);
    assert!(
        !data.keys().contains(&"nodeToken"),
        "a token handed out twice"
    );
    envelope(
        &post(&m, "/bins/app?node=n1", &format!("{{\"hash\":\"{hash}\"}}")),
        200,
    );
    // A token that is present but wrong is refused all the same.
    let r = http(
        "POST",
        &format!("{}/keepalive?node=n1", m.api()),
        &[("X-Node-Token", "not-it")],
        registration("n1", other).as_bytes(),
    );
    expect_error(
        &r,
        403,
        "node \"n1\": the X-Node-Token sent is not this node's token",
    );
    let r = http(
        "POST",
        &format!("{}/keepalive?node=n1", m.api()),
        &[("X-Node-Token", &token)],
        registration("n1", other).as_bytes(),
    );
    envelope(&r, 200);
}

#[test]
fn manual_admission_serves_nothing_until_an_admin_accepts() {
    let m = Manager::start_with_config(r#"{"admission":"manual"}"#, &["--admin-token", "adm"]);
    let (v0, v1) = (
        b"#!/bin/sh\necho v0\n".to_vec(),
        b"#!/bin/sh\necho v1\n".to_vec(),
    );
    m.publish_mv("app", &v1);
    let agent = Agent::new(&v0);
    let (code, log) = agent.run(&m.api(), None);
    assert_eq!(code, 0, "{log}");
    assert!(
        log.contains("node \"e2e-node\" is waiting for an admin to accept it")
            && log.contains("(bin-manager node accept e2e-node)"),
        "{log}"
    );
    assert_eq!(agent.target(), v0, "a pending node installed something");
    let view = envelope(&get(&m, "/nodes"), 200);
    assert_eq!(view.get("summary").get("pending").n(), 1.0);
    assert_eq!(view.get("nodes").arr()[0].get("admission").s(), "pending");

    // Nothing is served to it, nor to anyone who does not say who they are.
    let token = kept_token(&agent);
    let pending = "node \"e2e-node\" is pending: an admin must accept it first (bin-manager node accept e2e-node)";
    let anonymous = "admission is manual: name this node with ?node=NAME (and its X-Node-Token)";
    let as_node = [("X-Node-Token", token.as_str())];
    for path in ["/bins/app", "/download/app", "/bins"] {
        let named = format!("{path}?node=e2e-node");
        let r = http("GET", &format!("{}{named}", m.api()), &as_node, b"");
        expect_error(&r, 403, pending);
        expect_error(&get(&m, path), 403, anonymous);
        expect_error(
            &get(&m, &format!("{path}?node=stranger")),
            403,
            "node \"stranger\" is not registered: register it (POST keepalive), then an admin accepts it",
        );
    }
    // An admin is served.
    let r = http(
        "GET",
        &format!("{}/bins/app", m.api()),
        &[("Authorization", "Bearer adm")],
        b"",
    );
    assert_eq!(envelope(&r, 200).get("hash").s(), md5_hex(&v1));
    assert!(
        !m.log_lines().iter().any(|l| l
            .contains("GET /api/v1/download/app?arch=x86_64&node=e2e-node")
            && l.contains(" 200 ")),
        "a pending node was sent a build"
    );

    let (code, out, err) = node_cli(&m, "accept", "e2e-node", "adm");
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.trim(),
        "node \"e2e-node\": accepted; it is served from now on"
    );
    // Accepted, but still only to itself: its token is checked.
    expect_error(
        &get(&m, "/bins/app?node=e2e-node"),
        403,
        "node \"e2e-node\" has a node token and this server requires it (X-Node-Token)",
    );
    let (code, log) = agent.run(&m.api(), None);
    assert_eq!(code, 0, "{log}");
    assert_eq!(agent.target(), v1, "{log}");
    let app = node_app(&m, "e2e-node");
    assert_eq!(app.get("status").s(), "current");
    let view = envelope(&get(&m, "/nodes"), 200);
    assert_eq!(view.get("nodes").arr()[0].get("admission").s(), "accepted");
}

#[test]
fn registrations_are_bounded_in_size_number_and_rate() {
    let mut m = Manager::start_with_config(r#"{"maxNodes":3,"registrationsPerMinute":5}"#, &[]);
    let big = |field: &str, value: String| {
        format!("{{\"name\":\"big\",\"{field}\":{}}}", json_string(&value))
    };
    let bins = |n: usize| {
        let one = "{\"name\":\"a\",\"version\":\"latest\",\"hash\":\"\"}";
        format!(
            "{{\"name\":\"big\",\"binaries\":[{}]}}",
            vec![one; n].join(",")
        )
    };
    let failure = format!(
        "{{\"name\":\"big\",\"failures\":[{{\"name\":\"a\",\"hash\":\"\",\"error\":{},\"at\":\"\"}}]}}",
        json_string(&"e".repeat(2000))
    );
    for (body, msg) in [
        (
            big("osRelease", "x".repeat(300_000)),
            "\"osRelease\" is 300000 bytes long, more than the limit of 256",
        ),
        (
            big("cpuArch", "x".repeat(100)),
            "\"cpuArch\" is 100 bytes long, more than the limit of 64",
        ),
        (
            big("proxyVersion", "x".repeat(100)),
            "\"proxyVersion\" is 100 bytes long, more than the limit of 64",
        ),
        (
            bins(1001),
            "\"binaries\" has 1001 entries, more than the limit of 1000",
        ),
        (
            failure,
            "\"failures\"[0].\"error\" is 2000 bytes long, more than the limit of 1000",
        ),
    ] {
        expect_error(&post(&m, "/keepalive?node=big", &body), 400, msg);
    }
    expect_error(&get(&m, "/keepalive?node=big"), 404, "node not found");

    // maxNodes: a fourth node is refused, logged; known ones go on.
    for n in ["n1", "n2", "n3"] {
        envelope(
            &post(&m, &format!("/keepalive?node={n}"), &registration(n, "")),
            200,
        );
    }
    let r = post(&m, "/keepalive?node=n4", &registration("n4", ""));
    expect_error(
        &r,
        503,
        "the registry is full (3 nodes); an admin must raise maxNodes",
    );
    assert_eq!(r.header("retry-after"), Some("600"));
    assert!(m
        .wait_log(Duration::from_secs(5), |l| {
            l.contains(
            "registry full: 3 nodes (maxNodes); refused to register new node \"n4\" from 127.0.0.1:"
        )
        })
        .is_some());
    envelope(
        &post(&m, "/keepalive?node=n1", &registration("n1", "")),
        200,
    );

    // Files of an older version, readable by everyone, become 0600.
    let log = m.state_file().with_extension("json.log");
    fs::set_permissions(&log, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    m.restart();
    envelope(
        &post(&m, "/keepalive?node=n1", &registration("n1", "")),
        200,
    );
    for file in [m.state_file(), log] {
        assert_eq!(common::mode(&file), 0o600, "{}", file.display());
    }

    // Five new nodes a minute per address: the sixth from 127.0.0.2 waits,
    // 127.0.0.3 has its own allowance, and a known node's refresh is free.
    let m = Manager::start_with_config(r#"{"registrationsPerMinute":5}"#, &["--quiet"]);
    let from = |ip: [u8; 4], node: &str| {
        http_from(
            ip.into(),
            "POST",
            &format!("{}/keepalive?node={node}", m.api()),
            &[],
            registration(node, "").as_bytes(),
        )
    };
    for i in 0..5 {
        envelope(&from([127, 0, 0, 2], &format!("a{i}")), 200);
    }
    let r = from([127, 0, 0, 2], "a5");
    envelope(&r, 429);
    assert!(
        parse_message(&r).starts_with("too many new registrations from your address; retry in "),
        "{}",
        r.body_str()
    );
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=12).contains(&wait), "Retry-After {wait}");
    expect_error(&get(&m, "/keepalive?node=a5"), 404, "node not found");
    envelope(&from([127, 0, 0, 3], "b0"), 200);
    envelope(&from([127, 0, 0, 2], "a0"), 200);
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

    // A download that has started and is read slowly (64 KiB per 100 ms, so
    // the server's writes keep making progress and never hit its 10 s write
    // timeout, however long the checks below take) until `go`: in flight.
    let mut s = TcpStream::connect(m.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"GET /api/v1/download/big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut got = vec![0u8; 64 * 1024];
    let n = s.read(&mut got).unwrap();
    got.truncate(n);
    let go = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let go = go.clone();
        thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                if !go.load(std::sync::atomic::Ordering::SeqCst) {
                    thread::sleep(Duration::from_millis(100));
                }
                match s.read(&mut buf) {
                    Ok(0) => return Ok(got),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return Err(format!("{e} after {} bytes", got.len())),
                }
            }
        })
    };

    m.signal("TERM");
    let refused = common::wait_until(Duration::from_secs(30), || {
        TcpStream::connect(m.addr()).is_err()
    });
    assert!(refused, "still accepting after SIGTERM");
    assert!(
        m.wait_exit(Duration::from_millis(100)).is_none(),
        "exited with a download in flight"
    );

    go.store(true, std::sync::atomic::Ordering::SeqCst);
    let got = reader.join().unwrap().expect("reading the download");
    let start = find(&got, b"\r\n\r\n").expect("a head") + 4;
    assert_eq!(got.len() - start, body.len(), "the download was cut short");
    assert!(got[start..] == body[..], "the download's bytes differ");

    assert_eq!(
        m.wait_exit(Duration::from_secs(60)),
        Some(0),
        "{:?}",
        m.log_lines()
    );
    // The last line may still be on its way from the pipe.
    let stopped = m.wait_log(Duration::from_secs(10), |l| {
        l.contains("bin-manager stopped")
    });
    let stopped = stopped.unwrap_or_else(|| panic!("no \"stopped\" line: {:?}", m.log_lines()));
    assert!(
        stopped.contains(
            "bin-manager stopped (SIGTERM): stopped accepting, finished the 1 request in flight"
        ),
        "{stopped}"
    );
    let count = m
        .log_lines()
        .iter()
        .filter(|l| l.contains("bin-manager stopped"))
        .count();
    assert_eq!(count, 1, "{:?}", m.log_lines());

    // The registration survived; the count reads as English.
    m.restart();
    let line = m
        .log_lines()
        .into_iter()
        .rfind(|l| l.contains("listening on"))
        .unwrap();
    assert!(line.contains(", 1 node known,"), "{line}");
}

#[test]
fn the_fleet_view_pages_by_name_with_a_cursor() {
    let m = Manager::start_with_config(r#"{"registrationsPerMinute":1000}"#, &[]);
    let hash = "0123456789abcdef0123456789abcdef";
    // Registered out of order: the pages are in name order all the same.
    let mut names: Vec<String> = (0..25).map(|i| format!("n{:02}", (i * 7) % 25)).collect();
    for n in &names {
        let r = post(&m, &format!("/keepalive?node={n}"), &registration(n, hash));
        envelope(&r, 200);
    }
    names.sort();
    let page_names = |d: &Json| -> Vec<String> {
        d.get("nodes")
            .arr()
            .iter()
            .map(|n| n.get("name").s().to_string())
            .collect()
    };
    let mut seen = Vec::new();
    let mut after = String::new();
    for round in 0..4 {
        let path = if after.is_empty() {
            "/nodes?limit=10".to_string()
        } else {
            format!("/nodes?limit=10&after={after}")
        };
        let d = envelope(&get(&m, &path), 200);
        assert_eq!(
            d.get("summary").get("nodes"),
            &Json::Num(25.0),
            "whole fleet"
        );
        let page = page_names(&d);
        assert!(page.len() <= 10, "{path}: {page:?}");
        seen.extend(page.clone());
        match d.get("next") {
            Json::Null => {
                assert_eq!(round, 2, "the third page is the last");
                break;
            }
            Json::Str(next) => {
                assert_eq!(next, page.last().unwrap(), "next is the page's last name");
                after = next.clone();
            }
            o => panic!("next: {o:?}"),
        }
    }
    assert_eq!(seen, names, "every node once, in name order");
    // Without parameters: the whole fleet, as before, no cursor.
    let d = envelope(&get(&m, "/nodes"), 200);
    assert_eq!(page_names(&d), names);
    assert_eq!(d.get("next"), &Json::Null);
    // A cursor between names, past the end; a bad limit.
    let d = envelope(&get(&m, "/nodes?limit=2&after=n10x"), 200);
    assert_eq!(page_names(&d), ["n11", "n12"]);
    let d = envelope(&get(&m, "/nodes?after=zz"), 200);
    assert!(page_names(&d).is_empty());
    assert_eq!(d.get("next"), &Json::Null);
    for bad in ["0", "10001", "x"] {
        expect_error(
            &get(&m, &format!("/nodes?limit={bad}")),
            400,
            "invalid limit: expected a number from 1 to 10000",
        );
    }
}
