//! The batched check (`POST /api/v1/check`) with the REAL `bin-manager`:
//! each entry is what `bins/NAME` answers, an idle repeat is a `304`
//! with no body, the ETag changes after a publish and after a rollout
//! step, the heartbeat is recorded on a `304` too, and a binary the server
//! does not have is answered in its entry, not by a 404 of the whole.
use testkit as common;

use common::json::Json;
use common::manager::{call, envelope, get, post, put, Manager};
use common::{http, md5_hex};

const A: &[u8] = b"#!/bin/sh\n# build a\nexit 0\n";
const B: &[u8] = b"#!/bin/sh\n# build b\nexit 0\n";
const C: &[u8] = b"#!/bin/sh\n# build c\nexit 0\n";

fn register(m: &Manager, node: &str) {
    let body = format!(
        "{{\"name\":\"{node}\",\"cpuArch\":\"x86_64\",\"osRelease\":\"Test OS 1\",\"proxyVersion\":\"1.0.0\",\"binaries\":[{{\"name\":\"app\",\"version\":\"latest\",\"hash\":\"{}\"}}],\"lastSeen\":\"2020-01-01T00:00:00Z\"}}",
        md5_hex(A)
    );
    envelope(&post(m, &format!("/keepalive?node={node}"), &body), 200);
}

fn check_body(node: &str, bins: &[&str]) -> String {
    let list: Vec<String> = bins
        .iter()
        .map(|b| format!("{{\"name\":\"{b}\",\"hash\":\"{}\"}}", md5_hex(A)))
        .collect();
    format!(
        "{{\"node\":\"{node}\",\"arch\":\"x86_64\",\"binaries\":[{}]}}",
        list.join(",")
    )
}

/// One check; `etag` is sent as If-None-Match.
fn check(m: &Manager, node: &str, bins: &[&str], etag: Option<&str>) -> common::HttpResponse {
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(e) = etag {
        headers.push(("If-None-Match", e));
    }
    http(
        "POST",
        &format!("{}/check", m.api()),
        &headers,
        check_body(node, bins).as_bytes(),
    )
}

fn etag(r: &common::HttpResponse) -> String {
    r.header("etag").expect("an ETag header").to_string()
}

fn last_seen(m: &Manager, node: &str) -> String {
    let view = envelope(&get(m, "/nodes"), 200);
    let nodes = view.get("nodes");
    let n = nodes
        .arr()
        .iter()
        .find(|n| n.get("name").s() == node)
        .unwrap_or_else(|| panic!("{node} in the fleet view"));
    n.get("lastSeen").s().to_string()
}

fn entries(r: &common::HttpResponse) -> Vec<Json> {
    envelope(r, 200).get("binaries").arr().to_vec()
}

#[test]
fn idle_is_304_and_changes_show_in_the_etag() {
    let m = Manager::start(&["--quiet", "--admin-token", "adm"]);
    m.publish_mv("app", A);
    m.publish_mv("tool", B);
    register(&m, "web-1");

    let first = check(&m, "web-1", &["app", "tool", "missing"], None);
    let tag = etag(&first);
    assert!(
        tag.starts_with('"') && !tag.starts_with("W/"),
        "strong: {tag}"
    );
    let got = entries(&first);
    assert_eq!(got.len(), 3);
    // Each entry is exactly bins/NAME's data for this node and arch.
    for (entry, name) in got.iter().zip(["app", "tool"]) {
        let single = envelope(
            &get(&m, &format!("/bins/{name}?node=web-1&arch=x86_64")),
            200,
        );
        assert_eq!(format!("{entry:?}"), format!("{single:?}"), "{name}");
    }
    assert_eq!(got[0].get("hash").s(), md5_hex(A));
    assert_eq!(got[1].get("hash").s(), md5_hex(B));
    // The unknown binary: its own entry, what bins/missing answers.
    assert_eq!(got[2].get("name").s(), "missing");
    assert_eq!(got[2].get("code").n(), 404.0);
    assert_eq!(got[2].get("message").s(), "binary not found");

    // Idle: 304, no body, the same ETag; the heartbeat recorded anyway.
    assert!(
        last_seen(&m, "web-1").as_str() > "2021",
        "heartbeat on a 200"
    );
    let before = last_seen(&m, "web-1");
    // lastSeen has 1 s resolution: wait for the clock's next second.
    let second = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let read_at = second();
    assert!(
        common::wait_until(std::time::Duration::from_secs(5), || second() > read_at),
        "the clock did not reach the next second"
    );
    let idle = check(&m, "web-1", &["app", "tool", "missing"], Some(&tag));
    assert_eq!(idle.status, 304, "{}", idle.body_str());
    assert!(idle.body.is_empty());
    assert_eq!(etag(&idle), tag);
    assert!(last_seen(&m, "web-1") > before, "heartbeat on a 304");
    // Another node's answer to the same list is its own.
    register(&m, "web-2");
    assert_eq!(
        check(&m, "web-2", &["app", "tool", "missing"], Some(&tag)).status,
        304
    );

    // A publish changes the ETag, and the full answer comes back.
    m.publish_mv("tool", C);
    let after = check(&m, "web-1", &["app", "tool", "missing"], Some(&tag));
    assert_eq!(after.status, 200);
    assert_ne!(etag(&after), tag);
    assert_eq!(entries(&after)[1].get("hash").s(), md5_hex(C));
}

#[test]
fn a_rollout_step_changes_the_etag() {
    let m = Manager::start(&["--quiet", "--admin-token", "adm"]);
    m.publish_mv("app", A);
    let names: Vec<String> = (0..40).map(|i| format!("node-{i:02}")).collect();
    for n in &names {
        register(&m, n);
    }
    let r = put(&m, "/bins/app?rollout=10,100&soak=3600", Some("adm"), C);
    envelope(&r, 200);
    let tags: Vec<(String, String)> = names
        .iter()
        .map(|n| {
            let r = check(&m, n, &["app"], None);
            let e = entries(&r)[0].clone();
            let single = envelope(&get(&m, &format!("/bins/app?node={n}&arch=x86_64")), 200);
            assert_eq!(
                format!("{e:?}"),
                format!("{single:?}"),
                "{n}: the rollout's decision"
            );
            (etag(&r), e.get("hash").s().to_string())
        })
        .collect();
    let outside = tags.iter().filter(|(_, h)| *h == md5_hex(A)).count();
    assert!(
        outside > 0 && outside < names.len(),
        "{outside} of 40 on the old build"
    );
    // Still idle before the step.
    for (n, (tag, _)) in names.iter().zip(&tags) {
        assert_eq!(check(&m, n, &["app"], Some(tag)).status, 304, "{n}");
    }
    envelope(
        &call(&m, "POST", "/rollouts/app/promote", Some("adm"), b""),
        200,
    );
    for (n, (tag, _)) in names.iter().zip(&tags) {
        let r = check(&m, n, &["app"], Some(tag));
        assert_eq!(r.status, 200, "{n}: the step must show");
        assert_eq!(entries(&r)[0].get("hash").s(), md5_hex(C), "{n}");
    }
}

#[test]
fn refusals_name_what_is_wrong() {
    let m = Manager::start(&["--quiet"]);
    m.publish_mv("app", A);
    let r = post(&m, "/check", "{\"binaries\":[]}");
    assert_eq!(r.status, 400);
    assert!(
        r.body_str().contains("missing \\\"node\\\""),
        "{}",
        r.body_str()
    );
    let r = post(&m, "/check", "{\"node\":\"web-1\"}");
    assert_eq!(r.status, 400);
    assert!(r.body_str().contains("binaries"), "{}", r.body_str());
    assert_eq!(get(&m, "/check").status, 405);
    // An unregistered node is answered, and told it is not registered.
    let r = post(&m, "/check?node=new-1", &check_body("ignored", &["app"]));
    let data = envelope(&r, 200);
    assert_eq!(format!("{:?}", data.get("registered")), "Bool(false)");
    assert_eq!(data.get("binaries").arr()[0].get("hash").s(), md5_hex(A));
}

#[test]
fn over_max_requests_per_second_it_answers_503_with_retry_after() {
    let m = Manager::start_with_config(r#"{"maxRequestsPerSecond":5}"#, &["--quiet"]);
    m.publish_mv("app", A);
    register(&m, "web-1");
    // 40 requests as fast as one client can: at 5 a second with a second's
    // burst, most are shed, each with a Retry-After of 1..=600 seconds.
    let (mut served, mut shed) = (0, 0);
    for _ in 0..40 {
        let r = check(&m, "web-1", &["app"], None);
        match r.status {
            200 => served += 1,
            503 => {
                shed += 1;
                let secs: u64 = r
                    .header("retry-after")
                    .expect("Retry-After on a 503")
                    .parse()
                    .expect("Retry-After in seconds");
                assert!((1..=600).contains(&secs), "{secs}");
                assert!(r.body_str().contains("overloaded"), "{}", r.body_str());
            }
            s => panic!("status {s}: {}", r.body_str()),
        }
    }
    // The registration above took one of the burst of 5.
    assert!(served >= 4 && shed >= 20, "{served} served, {shed} shed");
    // The health check is never shed (load balancers must see it).
    assert_eq!(
        http("GET", &format!("{}/healthz", m.url()), &[], b"").status,
        200
    );
    // Logged, at most once a second.
    let warned = m.wait_log(std::time::Duration::from_secs(5), |l| {
        l.contains("overloaded")
    });
    assert!(warned.is_some(), "a log line about shedding");
    let lines = m
        .log_lines()
        .iter()
        .filter(|l| l.contains("overloaded"))
        .count();
    assert!(
        lines <= 3,
        "{lines} log lines for about a second of shedding"
    );
}

#[test]
fn downloads_resume_only_from_the_same_build() {
    let m = Manager::start(&["--quiet"]);
    m.publish_mv("app", A);
    let url = format!("{}/download/app", m.api());
    let full = http("GET", &url, &[], b"");
    assert_eq!(full.status, 200);
    assert_eq!(full.header("accept-ranges"), Some("bytes"));
    let tag = full.header("etag").expect("ETag").to_string();
    assert_eq!(tag, format!("\"{}\"", md5_hex(A)));
    let part = http(
        "GET",
        &url,
        &[("Range", "bytes=10-"), ("If-Range", &tag)],
        b"",
    );
    assert_eq!(part.status, 206);
    assert_eq!(
        part.header("content-range"),
        Some(format!("bytes 10-{}/{}", A.len() - 1, A.len()).as_str())
    );
    assert_eq!(part.body, &A[10..]);
    // Another build's ETag (or a date): the whole current file, never a piece.
    for other in [
        "\"0123456789abcdef0123456789abcdef\"",
        "Wed, 02 Dec 2026 10:00:00 GMT",
    ] {
        let r = http(
            "GET",
            &url,
            &[("Range", "bytes=10-"), ("If-Range", other)],
            b"",
        );
        assert_eq!(r.status, 200, "If-Range {other}");
        assert_eq!(r.body, A);
    }
    let r = http(
        "GET",
        &url,
        &[("Range", format!("bytes={}-", A.len()).as_str())],
        b"",
    );
    assert_eq!(r.status, 416);
    assert_eq!(
        r.header("content-range"),
        Some(format!("bytes */{}", A.len()).as_str())
    );
}
