//! The console (`GET /`) in a REAL headless Chromium against the REAL
//! `bin-manager` with a staged rollout in progress: what the page shows
//! (fleet counts, the rollout's percent, counts, state and failures, the
//! builds across the fleet, label and state filters), that what the server
//! holds (labels, error messages) is shown as text and never run, the
//! admin token asked for, refused (401) and accepted, a stale action
//! refused (409) with the server's message, the read token asked for and
//! kept in the tab only; and the page's own headers.
//! `CONSOLE_SCREENSHOT=docs/console.png cargo test --test console` redraws
//! the README's screenshot.
use testkit as common;

use common::browser::Browser;
use common::json::Json;
use common::manager::{call, envelope, get, put, Manager};
use common::{http, json_string, md5_hex};
use std::collections::BTreeSet;
use std::path::PathBuf;

const APP_OLD: &[u8] = b"#!/bin/sh\n# app build 1\nexit 0\n";
const APP_NEW: &[u8] = b"#!/bin/sh\n# app build 2\nexit 0\n";
const WEB_OLD: &[u8] = b"#!/bin/sh\n# web build 1\nexit 0\n";
const WEB_NEW: &[u8] = b"#!/bin/sh\n# web build 2\nexit 0\n";
const ADMIN: &str = "admin-s3cret-7f2e";
const READ: &str = "read-s3cret-91ac";
/// Markup in a label and in an error: it must show as text, and never run.
const LABEL_BAIT: &str = "<img src=x onerror=window.__xss=1>";
const ERROR_BAIT: &str = "<img src=x onerror=window.__xss=2>";

const NODES: usize = 20;
/// The last two were last seen long ago (they come from the snapshot).
const SILENT: [&str; 2] = ["node-18", "node-19"];
/// Behind on `web`.
const BEHIND: [&str; 2] = ["node-03", "node-07"];
/// Reports that app's new build failed.
const FAILING: &str = "node-06";

fn name(i: usize) -> String {
    format!("node-{i:02}")
}

fn labels(i: usize) -> String {
    let region = if i.is_multiple_of(2) {
        "eu-west"
    } else {
        "us-east"
    };
    let dc = ["fra1", "ams1", "iad1"][i % 3];
    let group = if i.is_multiple_of(4) { "edge" } else { "core" };
    let mut l = format!("{{\"region\":\"{region}\",\"dc\":\"{dc}\",\"group\":\"{group}\"");
    if i == 5 {
        l.push_str(&format!(",\"note\":{}", json_string(LABEL_BAIT)));
    }
    l + "}"
}

/// A node as registered (and as a snapshot stores it).
fn node(i: usize, app: &[u8], failures: &str, seen: &str) -> String {
    let web = if BEHIND.contains(&name(i).as_str()) {
        WEB_OLD
    } else {
        WEB_NEW
    };
    format!(
        "{{\"name\":\"{}\",\"cpuArch\":\"x86_64\",\"osRelease\":\"Test OS 1\",\"proxyVersion\":\"1.0.0\",\
         \"binaries\":[{{\"name\":\"app\",\"version\":\"latest\",\"hash\":\"{}\"}},\
         {{\"name\":\"web\",\"version\":\"latest\",\"hash\":\"{}\"}}],\"failures\":[{failures}],\
         \"lastSeen\":\"{seen}\",\"registered\":\"{seen}\",\"labels\":{}}}",
        name(i),
        md5_hex(app),
        md5_hex(web),
        labels(i)
    )
}

/// 20 nodes with labels (two silent for hours, two behind on web), app
/// published and then staged to 10% and 100%, one node on its new build
/// when the first step offers it to one, and one node reporting that it
/// failed (with markup in the error).
fn fleet(extra: &[&str]) -> Manager {
    let long_ago = "2020-01-01T00:00:00Z";
    let snapshot: Vec<String> = (NODES - 2..NODES)
        .map(|i| node(i, APP_OLD, "", long_ago))
        .collect();
    let mut args = vec!["--admin-token", ADMIN];
    args.extend(extra);
    let m = Manager::start_with_state(&format!("{{\"nodes\":[{}]}}", snapshot.join(",")), &args);
    m.publish_mv("app", APP_OLD);
    m.publish_mv("web", WEB_NEW);
    let auth = extra.contains(&"--token").then_some(READ);
    let register = |i: usize, app: &[u8], failures: &str| {
        let body = node(i, app, failures, long_ago);
        let r = call(
            &m,
            "POST",
            &format!("/keepalive?node={}", name(i)),
            auth,
            body.as_bytes(),
        );
        envelope(&r, 200);
    };
    for i in 0..NODES - 2 {
        register(i, APP_OLD, "");
    }
    let r = put(
        &m,
        "/bins/app?rollout=10,100&soak=3600&maxFailures=3",
        Some(ADMIN),
        APP_NEW,
    );
    envelope(&r, 200);
    let offered = |i: usize| {
        let r = call(
            &m,
            "GET",
            &format!("/bins/app?node={}&arch=x86_64", name(i)),
            auth,
            b"",
        );
        envelope(&r, 200).get("hash").s() == md5_hex(APP_NEW)
    };
    if let Some(i) = (0..NODES - 2)
        .filter(|i| name(*i) != FAILING)
        .find(|i| offered(*i))
    {
        register(i, APP_NEW, "");
    }
    let failure = format!(
        "{{\"name\":\"app\",\"hash\":\"{}\",\"error\":{},\"at\":\"2026-01-01T00:00:00Z\"}}",
        md5_hex(APP_NEW),
        json_string(&format!("app: postUpgrade failed: {ERROR_BAIT}"))
    );
    register(FAILING[5..].parse().unwrap(), APP_OLD, &failure);
    m
}

fn admin_post(m: &Manager, action: &str) -> common::HttpResponse {
    call(
        m,
        "POST",
        &format!("/rollouts/app/{action}"),
        Some(ADMIN),
        b"",
    )
}

fn rollout(m: &Manager, auth: Option<&str>) -> Json {
    envelope(&call(m, "GET", "/rollouts/app", auth, b""), 200)
}

fn names(filter: impl Fn(usize) -> bool) -> BTreeSet<String> {
    (0..NODES).filter(|i| filter(*i)).map(name).collect()
}

/// The page's rows until they are `want` (it re-renders on input).
fn wait_rows(b: &mut Browser, want: &BTreeSet<String>, what: &str) {
    let js = format!(
        "JSON.stringify([...document.querySelectorAll('#nodes tr')].map(r => r.dataset.node).sort()) === {}",
        json_string(&format!("[{}]", want.iter().map(|n| json_string(n)).collect::<Vec<_>>().join(",")))
    );
    b.wait(&js, what);
}

/// Submits a wrong token through `input` and `button`; waits for the
/// element `message` to say the server refused it.
fn refused(b: &mut Browser, input: &str, button: &str, message: &str) {
    b.type_into(input, "not-the-token");
    b.click(button);
    b.wait(
        &format!("document.getElementById('{message}').textContent.includes('refused')"),
        "the 401 message",
    );
}

const CARD: &str = "document.querySelector('[data-rollout=\"app\"]')";

#[test]
fn the_console_shows_the_fleet_and_its_rollout_and_pauses_it() {
    let m = fleet(&[]);
    let ro = rollout(&m, None);
    assert_eq!(
        (ro.get("state").s(), ro.get("percent").n()),
        ("running", 10.0)
    );
    let count = |k: &str| ro.get("nodes").get(k).n();
    assert_eq!(count("failed"), 1.0);
    let on_new = count("onNew") as usize;

    // The fleet view carries what the console needs: labels, failures, the server's clock.
    let r = get(&m, "/nodes");
    assert!(
        r.header("date").is_some_and(|d| d.ends_with(" GMT")),
        "{:?}",
        r.headers
    );
    let view = envelope(&r, 200);
    let failing = view
        .get("nodes")
        .arr()
        .iter()
        .find(|n| n.get("name").s() == FAILING)
        .unwrap();
    assert_eq!(failing.get("labels").get("region").s(), "eu-west");
    assert_eq!(
        failing.get("failures").arr()[0].get("hash").s(),
        md5_hex(APP_NEW)
    );

    let mut b = Browser::launch();
    b.goto(&format!("{}/", m.url()));
    b.wait(
        &format!("!!{CARD} && document.querySelectorAll('#nodes tr').length === {NODES}"),
        "the fleet",
    );

    // Fleet summary: per node, failed > behind > current; silent besides.
    let summary = |b: &mut Browser, s: &str| {
        b.number(&format!(
            "+document.querySelector('#summary [data-state={s}] b').textContent"
        ))
    };
    assert_eq!(summary(&mut b, "all"), NODES as f64);
    assert_eq!(summary(&mut b, "failed"), 1.0);
    assert_eq!(summary(&mut b, "silent"), 2.0);
    let behind = summary(&mut b, "behind") as usize;
    assert!(behind >= BEHIND.len(), "{behind}");
    assert_eq!(
        behind,
        behind_nodes(&m),
        "web's two, and app's eligible nodes not on it yet"
    );
    assert_eq!(summary(&mut b, "current") as usize, NODES - 1 - behind);
    let badges = |b: &mut Browser, n: &str| {
        b.text(&format!(
            "document.querySelector('#nodes tr[data-node=\"{n}\"]').cells[1].textContent"
        ))
    };
    assert_eq!(badges(&mut b, FAILING), "failed");
    assert_eq!(badges(&mut b, BEHIND[0]), "behind");
    assert!(badges(&mut b, SILENT[0]).ends_with("silent"));

    // The rollout: state, percent, bar, counts, its failure as text.
    assert_eq!(b.text(&format!("{CARD}.dataset.state")), "running");
    assert!(b
        .text(&format!("{CARD}.querySelector('.top').textContent"))
        .contains("running"));
    assert_eq!(
        b.text(&format!("{CARD}.querySelector('.pct b').textContent")),
        "10%"
    );
    assert_eq!(
        b.number(&format!("{CARD}.querySelector('progress').value")),
        10.0
    );
    for k in ["eligible", "onNew", "succeeded", "failed", "pending"] {
        let shown = b.number(&format!(
            "+{CARD}.querySelector('[data-count={k}] b').textContent"
        ));
        assert_eq!(shown, count(k), "{k}");
    }
    let failures = b.eval(&format!(
        "[...{CARD}.querySelectorAll('.failures li')].map(li => li.textContent)"
    ));
    assert_eq!(
        failures,
        Json::Arr(vec![Json::Str(format!(
            "{FAILING}: app: postUpgrade failed: {ERROR_BAIT} (2026-01-01T00:00:00Z)"
        ))])
    );

    // The builds across the fleet, the rollout's two tagged.
    let builds = b.eval("[...document.querySelectorAll('#builds tr')].map(r => [r.dataset.binary, r.dataset.hash, r.dataset.tag, +r.cells[3].textContent])");
    let row = |bin: &str, bytes: &[u8], tag: &str, n: usize| {
        Json::Arr(vec![
            Json::Str(bin.into()),
            Json::Str(md5_hex(bytes)),
            Json::Str(tag.into()),
            Json::Num(n as f64),
        ])
    };
    // The busiest build first; the new one is listed even while no node runs it.
    let mut want = vec![
        row("app", APP_OLD, "previous", NODES - on_new),
        row("app", APP_NEW, "new", on_new),
    ];
    want.extend([
        row("web", WEB_NEW, "published", NODES - 2),
        row("web", WEB_OLD, "", 2),
    ]);
    assert_eq!(builds, Json::Arr(want));

    // Filters: by labels (every term must hold), by state (the summary's buttons).
    b.type_into("#f-label", "region=eu-west");
    wait_rows(&mut b, &names(|i| i.is_multiple_of(2)), "the eu-west nodes");
    b.type_into("#f-label", "region=eu-west group=edge");
    wait_rows(
        &mut b,
        &names(|i| i.is_multiple_of(4)),
        "the eu-west edge nodes",
    );
    b.type_into("#f-label", "note");
    wait_rows(&mut b, &names(|i| i == 5), "the node with a note");
    b.type_into("#f-label", "");
    b.click("#summary [data-state=failed]");
    wait_rows(&mut b, &[FAILING.to_string()].into(), "the failed node");
    b.click("#summary [data-state=silent]");
    wait_rows(
        &mut b,
        &SILENT.iter().map(|s| s.to_string()).collect(),
        "the silent nodes",
    );
    b.click("#summary [data-state=silent]");
    wait_rows(&mut b, &names(|_| true), "every node again");

    // What the server holds shows as text: no element made of it, nothing run.
    let labels_cell =
        b.text("document.querySelector('#nodes tr[data-node=\"node-05\"]').cells[2].textContent");
    assert!(
        labels_cell.contains(&format!("note={LABEL_BAIT}")),
        "{labels_cell}"
    );
    let problem = b.text(&format!(
        "document.querySelector('#nodes tr[data-node=\"{FAILING}\"]').cells[5].textContent"
    ));
    assert_eq!(
        problem,
        format!("app: app: postUpgrade failed: {ERROR_BAIT}")
    );
    assert_eq!(b.number("document.querySelectorAll('img').length"), 0.0);
    assert_eq!(b.text("typeof window.__xss"), "undefined");

    // Pause: the page asks for the admin token, a wrong one is refused and asked again.
    b.click("[data-rollout=\"app\"] [data-action=pause]");
    b.wait(
        "document.getElementById('act').open",
        "the admin token dialog",
    );
    refused(&mut b, "#act-token", "#act-go", "act-msg");
    assert!(b.eval("document.getElementById('act').open") == Json::Bool(true));
    assert_eq!(rollout(&m, None).get("state").s(), "running");
    b.type_into("#act-token", ADMIN);
    b.click("#act-go");
    b.wait(
        &format!("!document.getElementById('act').open && {CARD}.dataset.state === 'paused'"),
        "paused",
    );
    let ro = rollout(&m, None);
    assert_eq!(
        (ro.get("state").s(), ro.get("reason").s()),
        ("paused", "paused by an operator")
    );
    let top = b.text(&format!("{CARD}.textContent"));
    assert!(
        top.contains("paused") && top.contains("paused by an operator"),
        "{top}"
    );
    assert_eq!(
        b.eval(&format!(
            "{CARD}.querySelector('[data-action=resume]').disabled"
        )),
        Json::Bool(false)
    );

    let png = b.screenshot(&screenshot_path());
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    assert_eq!(
        u32::from_be_bytes(png[16..20].try_into().unwrap()),
        1280,
        "its width"
    );

    // A stale action: resumed elsewhere while the dialog is open, the
    // page's resume is refused with the server's own words.
    b.click("[data-rollout=\"app\"] [data-action=resume]");
    b.wait(
        "document.getElementById('act').open && document.getElementById('act-token-row').hidden",
        "the dialog, token remembered",
    );
    envelope(&admin_post(&m, "resume"), 200);
    let refusal = admin_post(&m, "resume");
    assert_eq!(refusal.status, 409);
    let msg = common::json::parse(&refusal.body_str())
        .get("message")
        .s()
        .to_string();
    b.click("#act-go");
    b.wait(
        &format!(
            "({CARD}.querySelector('.msg') || {{}}).textContent === {}",
            json_string(&format!("resume refused: {msg}"))
        ),
        "the 409 message",
    );
    b.wait(
        &format!("{CARD}.dataset.state === 'running'"),
        "the refreshed state",
    );

    // The admin token went in a header, never in a URL.
    let log = m.log_lines();
    assert!(log.iter().all(|l| !l.contains(ADMIN)), "token in the log");
    for (action, status) in [("pause", 401), ("pause", 200), ("resume", 409)] {
        let needle = format!(" POST /api/v1/rollouts/app/{action} {status} ");
        assert!(
            log.iter().any(|l| l.contains(&needle)),
            "no {needle:?} in:\n{}",
            log.join("\n")
        );
    }
    b.assert_clean();
}

/// Nodes with a binary "behind" and no failure, from the API.
fn behind_nodes(m: &Manager) -> usize {
    let view = envelope(&get(m, "/nodes"), 200);
    view.get("nodes")
        .arr()
        .iter()
        .filter(|n| n.get("failures").arr().is_empty())
        .filter(|n| {
            n.get("binaries")
                .arr()
                .iter()
                .any(|b| b.get("status").s() == "behind")
        })
        .count()
}

/// Where the screenshot goes: `CONSOLE_SCREENSHOT`, else the target's temp dir.
fn screenshot_path() -> PathBuf {
    let path = match std::env::var_os("CONSOLE_SCREENSHOT") {
        Some(p) => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p),
        None => PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console.png"),
    };
    eprintln!("console: screenshot in {}", path.display());
    path
}

#[test]
fn the_console_asks_for_the_read_token_and_keeps_it_in_the_tab() {
    let m = fleet(&["--token", READ]);
    let mut b = Browser::launch();
    b.goto(&format!("{}/", m.url()));
    b.wait(
        "!document.getElementById('login').hidden && document.getElementById('main').hidden",
        "the read token form",
    );
    refused(&mut b, "#login-token", "#login-go", "login-msg");
    assert!(b.eval("document.getElementById('main').hidden") == Json::Bool(true));
    b.type_into("#login-token", READ);
    b.click("#login-go");
    b.wait(
        &format!("document.querySelectorAll('#nodes tr').length === {NODES}"),
        "the fleet",
    );

    // In this tab's sessionStorage, nowhere else; a reload keeps it.
    assert_eq!(
        b.text("sessionStorage.getItem('bin-manager.readToken')"),
        READ
    );
    assert_eq!(b.number("localStorage.length"), 0.0);
    assert!(!b.text("document.cookie + location.href").contains(READ));
    b.goto(&format!("{}/", m.url()));
    b.wait(
        &format!("!!{CARD} && document.getElementById('login').hidden"),
        "the fleet, without asking again",
    );

    // It refreshes by itself, and a refresh keeps the filter.
    b.type_into("#f-label", "region=us-east");
    wait_rows(&mut b, &names(|i| i % 2 == 1), "the us-east nodes");
    let late = node(21, APP_OLD, "", "2020-01-01T00:00:00Z");
    envelope(
        &call(
            &m,
            "POST",
            "/keepalive?node=node-21",
            Some(READ),
            late.as_bytes(),
        ),
        200,
    );
    let mut want = names(|i| i % 2 == 1);
    want.insert(name(21));
    wait_rows(
        &mut b,
        &want,
        "a node that registered after the page loaded",
    );
    assert_eq!(
        b.text("document.getElementById('f-label').value"),
        "region=us-east"
    );

    b.click("[data-rollout=\"app\"] [data-action=pause]");
    b.wait("document.getElementById('act').open", "the dialog");
    b.type_into("#act-token", ADMIN);
    b.click("#act-go");
    b.wait(&format!("{CARD}.dataset.state === 'paused'"), "paused");
    assert_eq!(rollout(&m, Some(READ)).get("state").s(), "paused");

    let log = m.log_lines();
    assert!(
        log.iter().all(|l| !l.contains(READ) && !l.contains(ADMIN)),
        "a token in the log"
    );
    assert!(
        log.iter().any(|l| l.contains(" GET /api/v1/nodes 401 ")),
        "the first read was refused"
    );
    assert!(log.iter().any(|l| l.contains(" GET /api/v1/nodes 200 ")));
    b.assert_clean();
}

#[test]
fn the_page_is_served_without_a_token_with_a_strict_policy() {
    let m = Manager::start(&["--quiet", "--token", READ]);
    for method in ["GET", "HEAD"] {
        let r = http(method, &format!("{}/", m.url()), &[], b"");
        assert_eq!(r.status, 200, "{method}");
        assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
        assert_eq!(r.header("cache-control"), Some("no-store"));
        let csp = r.header("content-security-policy").unwrap_or_default();
        assert!(
            csp.starts_with("default-src 'none'; script-src 'sha256-"),
            "{csp}"
        );
        assert!(
            csp.contains("connect-src 'self'") && !csp.contains("unsafe"),
            "{csp}"
        );
        let len: usize = r.header("content-length").unwrap().parse().unwrap();
        assert!(len > 1000 && len < 20 * 1024, "{len} bytes");
        let body = if method == "GET" { len } else { 0 };
        assert_eq!(r.body.len(), body, "{method}");
    }
    let r = http("POST", &format!("{}/", m.url()), &[], b"");
    assert_eq!(r.status, 405);
    // The data stays behind the token.
    assert_eq!(get(&m, "/nodes").status, 401);
}
