//! The original project's later agents (qnHackathon `scripts/binproxy.py`
//! and `scripts/bin-proxy.sh`, 1.2.0) against the REAL bin-manager,
//! unchanged: they check in, install, upgrade, roll back, and show up in the
//! fleet view with what they run and their last progress.
//!
//! Two ways (testkit/src/legacy.rs): their requests made byte for byte in
//! Rust and their answers read the way they read them; and our stand-ins
//! of the two agents (tests/fixtures/legacy/) run with the real
//! python-requests, curl and jq (Debian packages `python3-requests`, `curl`,
//! `jq`: scripts/setup.sh installs them; these tests fail, never skip,
//! without them).
use testkit as common;

use common::agent::{Agent, Setup};
use common::json::Json;
use common::legacy::{
    api_requests, curl, curl_f, python, python_sha256, shell_sha256, Dialect, LegacyHost,
};
use common::manager::{envelope, expect_error, get, Manager};
use common::{md5_hex, sha256_hex, supervisorctl_log, HttpResponse};

const V1: &[u8] = b"#!/bin/sh\necho build 1\n";
const V2: &[u8] = b"#!/bin/sh\necho build 2, much better\n";
const V3: &[u8] = b"#!/bin/sh\necho build 3 does not start\nexit 1\n";

/// The fleet view's entry for `node`.
fn fleet_node(m: &Manager, node: &str) -> Json {
    let view = envelope(&get(m, "/nodes"), 200);
    view.get("nodes")
        .arr()
        .iter()
        .find(|n| n.get("name").s() == node)
        .unwrap_or_else(|| panic!("{node} is not in the fleet view: {view:?}"))
        .clone()
}

/// `node`'s entry for binary `bin` in the fleet view.
fn fleet_bin(m: &Manager, node: &str, bin: &str) -> Json {
    let n = fleet_node(m, node);
    n.get("binaries")
        .arr()
        .iter()
        .find(|b| b.get("name").s() == bin)
        .unwrap_or_else(|| panic!("{node} has no {bin} in the fleet view: {n:?}"))
        .clone()
}

/// Asserts a binary's fleet-view status, md5, reported sha256 and progress.
fn assert_standing(b: &Json, status: &str, md5: &str, sha256: &str, progress: &str, target: &str) {
    assert_eq!(b.get("status").s(), status, "{b:?}");
    assert_eq!(b.get("hash").s(), md5, "{b:?}");
    assert_eq!(
        b.opt("sha256").and_then(Json::as_str),
        Some(sha256).filter(|s| !s.is_empty()),
        "{b:?}"
    );
    let p = b.get("progress");
    assert_eq!(
        (p.get("status").s(), p.get("targetHash").s()),
        (progress, target),
        "{b:?}"
    );
    assert_eq!(p.get("at").s().len(), 20, "RFC 3339 time: {b:?}");
}

/// The download as both agents need it: exactly 200 (no redirect, no
/// partial content, nothing compressed), the whole file.
fn assert_plain_download(r: &HttpResponse, bytes: &[u8]) {
    assert_eq!(r.status, 200, "{}", r.body_str());
    for h in [
        "content-range",
        "location",
        "content-encoding",
        "transfer-encoding",
    ] {
        assert_eq!(r.header(h), None, "{h} on the download");
    }
    assert_eq!(r.content_length(), Some(bytes.len()));
    assert!(r.body == bytes, "the download is not the published build");
}

/// A progress body as `dialect`'s agent writes it (Python's `json.dumps`
/// puts a space after `,` and `:`; the shell agent interpolates a string).
fn progress_body(dialect: Dialect, node: &str, sha: &str, t: u32, status: &str) -> String {
    let body = format!(
        "{{\"nodeName\": \"{node}\", \"binName\": \"app\", \"targetHash\": \"{sha}\", \"processingTime\": {t}, \"status\": \"{status}\"}}"
    );
    match dialect {
        Dialect::Python => body,
        Dialect::Shell => body.replace(", ", ",").replace(": ", ":"),
    }
}

fn py_progress(node: &str, sha: &str, t: u32, status: &str) -> String {
    progress_body(Dialect::Python, node, sha, t, status)
}

fn sh_progress(node: &str, sha: &str, t: u32, status: &str) -> String {
    progress_body(Dialect::Shell, node, sha, t, status)
}

/// One upgrade as `dialect`'s agent makes it: the hash read its way,
/// progress, download, progress, its report.
fn upgrade(m: &Manager, dialect: Dialect, node: &str, bytes: &[u8]) {
    let send = match dialect {
        Dialect::Python => python,
        Dialect::Shell => curl,
    };
    let r = send(m, "GET", "/api/v1/bins/app", None);
    let sha = match dialect {
        Dialect::Python => python_sha256(&r).expect("the Python agent reads a sha256"),
        Dialect::Shell => shell_sha256(&r).expect("the shell agent reads a sha256"),
    };
    assert_eq!(sha, sha256_hex(bytes));
    for (t, status) in [(0, "in_progress"), (1, "success")] {
        let body = progress_body(dialect, node, &sha, t, status);
        let r = send(m, "POST", "/api/v1/bins/app/progress", Some(&body));
        assert_eq!(r.status, 200, "{}", r.body_str());
        if t == 0 {
            assert_plain_download(&send(m, "GET", "/api/v1/download/app", None), bytes);
        }
    }
    let report = match dialect {
        Dialect::Python => format!("{{\"node_id\": \"{node}\", \"sha256sum\": \"{sha}\"}}"),
        Dialect::Shell => format!(
            "{{\"nodeName\":\"{node}\",\"binName\":\"app\",\"sha256\":\"{sha}\",\"version\":\"latest\"}}"
        ),
    };
    let r = send(m, "POST", "/api/v1/bins/app", Some(&report));
    // The Python agent takes 200 or 201 as posted; the shell one any answer.
    assert_eq!(r.status, 200, "{}", r.body_str());
}

#[test]
fn their_exact_requests_install_upgrade_and_show_in_the_fleet_view() {
    let mut m = Manager::start(&[]);
    m.publish_mv("app", V1);
    let (sha1, sha2) = (sha256_hex(V1), sha256_hex(V2));

    // The Python agent: unknown (exactly-200 test fails), so it posts its facts.
    let r = python(&m, "GET", "/api/v1/keepalive?node_id=py-host", None);
    assert_eq!(r.status, 404, "{}", r.body_str());
    let facts = "{\"cpuArch\": \"x86_64\", \"osRelease\": \"Debian GNU/Linux 12 (bookworm)\", \"nodeName\": \"py-host\", \"binProxyVersion\": \"1.2.0\", \"node_id\": \"py-host\"}";
    let r = python(&m, "POST", "/api/v1/keepalive", Some(facts));
    assert_eq!(envelope(&r, 200).get("name").s(), "py-host");
    let r = python(&m, "GET", "/api/v1/keepalive?node_id=py-host", None);
    assert_eq!(r.status, 200, "registered now: {}", r.body_str());
    // `node` wins over `node_id` when both are given.
    assert_eq!(get(&m, "/keepalive?node_id=ghost&node=py-host").status, 200);
    assert_eq!(get(&m, "/keepalive?node=ghost&node_id=py-host").status, 404);

    // The shell agent: its keepalive names no node. Under `set -e` a 4xx
    // would end its run here; an empty 2xx makes it post its facts.
    let r = curl(&m, "GET", "/api/v1/keepalive", None);
    assert!(
        curl_f(&r),
        "curl -f fails on {}: the shell agent's run would end",
        r.status
    );
    assert_eq!((r.status, r.body.as_slice()), (204, &b""[..]));
    let facts = "{\"cpuArch\":\"aarch64\",\"osRelease\":\"Alpine Linux v3.19\",\"nodeName\":\"sh-host\",\"binProxyVersion\":\"1.2.0\"}";
    let r = curl(&m, "POST", "/api/v1/keepalive", Some(facts));
    assert_eq!(envelope(&r, 200).get("name").s(), "sh-host");

    // The bins answer: the sha256 at the top level for them, `data` for us.
    let r = get(&m, "/bins/app");
    assert_eq!(python_sha256(&r).as_deref(), Some(sha1.as_str()));
    assert_eq!(shell_sha256(&r).as_deref(), Ok(sha1.as_str()));
    let data = envelope(&r, 200);
    assert_eq!(
        (data.get("hash").s(), data.get("sha256").s()),
        (md5_hex(V1).as_str(), sha1.as_str())
    );
    // The shell agent's fallback, tried only after a failure, must not succeed either.
    assert!(!curl_f(&curl(
        &m,
        "GET",
        "/api/v1/releases/latest/app/sha256",
        None
    )));
    assert!(!curl_f(&curl(&m, "GET", "/api/v1/bins/nothing", None)));

    // In flight: the fleet view shows the progress before anything is installed.
    let r = python(
        &m,
        "POST",
        "/api/v1/bins/app/progress",
        Some(&py_progress("py-host", &sha1, 0, "in_progress")),
    );
    assert_eq!(r.status, 200);
    assert_standing(
        &fleet_bin(&m, "py-host", "app"),
        "behind",
        "",
        "",
        "in_progress",
        &sha1,
    );

    upgrade(&m, Dialect::Python, "py-host", V1);
    upgrade(&m, Dialect::Shell, "sh-host", V1);
    for (node, arch) in [("py-host", "x86_64"), ("sh-host", "aarch64")] {
        let n = fleet_node(&m, node);
        assert_eq!(
            (n.get("proxyVersion").s(), n.get("cpuArch").s()),
            ("1.2.0", arch),
            "{n:?}"
        );
        let b = fleet_bin(&m, node, "app");
        assert_standing(&b, "current", &md5_hex(V1), &sha1, "success", &sha1);
        assert_eq!(b.get("published").s(), md5_hex(V1));
    }
    assert_eq!(
        fleet_node(&m, "sh-host").get("osRelease").s(),
        "Alpine Linux v3.19"
    );
    assert_eq!(
        fleet_bin(&m, "py-host", "app")
            .get("progress")
            .get("processingTime")
            .n(),
        1.0
    );

    // A new build: both are behind until they upgrade, then current on it.
    m.publish_mv("app", V2);
    assert_eq!(fleet_bin(&m, "py-host", "app").get("status").s(), "behind");
    upgrade(&m, Dialect::Python, "py-host", V2);
    upgrade(&m, Dialect::Shell, "sh-host", V2);

    // All of it is durable: kill -9 and start again.
    m.restart();
    let view = envelope(&get(&m, "/nodes"), 200);
    assert_eq!(view.get("summary").get("current").n(), 2.0, "{view:?}");
    for node in ["py-host", "sh-host"] {
        assert_standing(
            &fleet_bin(&m, node, "app"),
            "current",
            &md5_hex(V2),
            &sha2,
            "success",
            &sha2,
        );
    }
    // A registration again (the shell agent posts one every run) keeps what
    // the node runs and its progress.
    let facts = "{\"cpuArch\":\"aarch64\",\"osRelease\":\"Alpine Linux v3.20\",\"nodeName\":\"sh-host\",\"binProxyVersion\":\"1.2.0\"}";
    envelope(&curl(&m, "POST", "/api/v1/keepalive", Some(facts)), 200);
    assert_eq!(
        fleet_node(&m, "sh-host").get("osRelease").s(),
        "Alpine Linux v3.20"
    );
    assert_standing(
        &fleet_bin(&m, "sh-host", "app"),
        "current",
        &md5_hex(V2),
        &sha2,
        "success",
        &sha2,
    );

    // Moving py-host to bin-proxy: its first run registers it, and the
    // record is bin-proxy's from then on.
    let agent = Agent::with("py-host", None, Setup::default());
    let (code, log) = agent.run(&m.api(), None);
    assert_eq!(code, 0, "{log}");
    let n = fleet_node(&m, "py-host");
    assert_eq!(
        n.get("proxyVersion").s(),
        env!("CARGO_PKG_VERSION"),
        "{n:?}"
    );
    let b = fleet_bin(&m, "py-host", "app");
    assert_eq!(
        b.keys(),
        ["name", "version", "hash", "published", "status"],
        "{b:?}"
    );
    assert_eq!(
        (b.get("status").s(), b.get("hash").s()),
        ("current", md5_hex(V2).as_str())
    );
}

#[test]
fn bad_or_unknown_legacy_reports_are_refused_and_store_nothing() {
    let m = Manager::start(&[]);
    m.publish_mv("app", V1);
    let sha1 = sha256_hex(V1);

    // Nothing is created for a node that never checked in.
    expect_error(
        &curl(
            &m,
            "POST",
            "/api/v1/bins/app/progress",
            Some(&sh_progress("h1", &sha1, 0, "in_progress")),
        ),
        404,
        "node not found: register it first (POST keepalive)",
    );
    let report = format!("{{\"node_id\": \"h1\", \"sha256sum\": \"{sha1}\"}}");
    expect_error(
        &python(&m, "POST", "/api/v1/bins/app", Some(&report)),
        404,
        "node not found: register it first (POST keepalive)",
    );
    let facts = "{\"cpuArch\":\"x86_64\",\"osRelease\":\"Debian\",\"nodeName\":\"h1\",\"binProxyVersion\":\"1.2.0\"}";
    envelope(&curl(&m, "POST", "/api/v1/keepalive", Some(facts)), 200);
    let before = fleet_node(&m, "h1");

    // Each bad body gets 400 naming the key and value; unknown binaries 404.
    let progress = |body: &str| curl(&m, "POST", "/api/v1/bins/app/progress", Some(body));
    expect_error(
        &progress(&sh_progress("h1", &sha1, 0, "done")),
        400,
        "\"status\" must be \"in_progress\", \"success\" or \"failed\", not \"done\"",
    );
    expect_error(
        &progress(&sh_progress("h1", "zz", 0, "success")),
        400,
        "\"targetHash\" must be a sha256 (64 hex digits) or an md5 (32), not \"zz\"",
    );
    expect_error(
        &progress(&sh_progress(&"h".repeat(300), &sha1, 0, "success")),
        400,
        "\"nodeName\" is longer than 256 bytes (300)",
    );
    expect_error(
        &progress("{\"nodeName\":\"h1\",\"status\":\"success\"}"),
        400,
        "\"nodeName\", \"targetHash\" and \"status\" are required",
    );
    expect_error(
        &curl(
            &m,
            "POST",
            "/api/v1/bins/ghost/progress",
            Some(&sh_progress("h1", &sha1, 0, "success")),
        ),
        404,
        "binary not found",
    );
    expect_error(
        &curl(&m, "GET", "/api/v1/bins/app/progress", None),
        405,
        "method not allowed here",
    );
    expect_error(
        &curl(&m, "POST", "/api/v1/bins/.app/progress", Some("{}")),
        400,
        "invalid name: use letters, digits, '.', '_' and '-', not starting with '.'",
    );
    expect_error(
        &python(
            &m,
            "POST",
            "/api/v1/bins/app",
            Some("{\"node_id\": \"h1\", \"sha256sum\": \"abc\"}"),
        ),
        400,
        "\"sha256sum\" must be a sha256 (64 hex digits), not \"abc\"",
    );
    expect_error(
        &python(&m, "POST", "/api/v1/bins/ghost", Some(&report)),
        404,
        "binary not found",
    );
    // The shell agent interpolates its facts: a quote in them breaks the JSON.
    let r = curl(&m, "POST", "/api/v1/keepalive", Some("{\"cpuArch\":\"x86_64\",\"osRelease\":\"a\"b\",\"nodeName\":\"h1\",\"binProxyVersion\":\"1.2.0\"}"));
    envelope(&r, 400);
    assert_eq!(
        fleet_node(&m, "h1"),
        before,
        "a refused request changed the record"
    );

    // A sha256 this server never published is kept as a sha256 of its own,
    // with no md5: the node is behind.
    let other = sha256_hex(b"someone else's build");
    let r = python(
        &m,
        "POST",
        "/api/v1/bins/app",
        Some(&format!(
            "{{\"node_id\": \"h1\", \"sha256sum\": \"{other}\"}}"
        )),
    );
    let d = envelope(&r, 200);
    assert_eq!(
        (d.get("hash").s(), d.get("sha256").s()),
        ("", other.as_str())
    );
    let b = fleet_bin(&m, "h1", "app");
    assert_eq!(
        (b.get("status").s(), b.get("hash").s(), b.get("sha256").s()),
        ("behind", "", other.as_str())
    );

    // A failed upgrade to the published build: "failed", and why.
    envelope(&progress(&sh_progress("h1", &sha1, 7, "failed")), 200);
    let b = fleet_bin(&m, "h1", "app");
    assert_standing(&b, "failed", "", &other, "failed", &sha1);
    assert_eq!(
        b.get("error").s(),
        format!(
            "the agent reported the upgrade to {}… failed after 7 s",
            &sha1[..8]
        )
    );
    let view = envelope(&get(&m, "/nodes"), 200);
    assert_eq!(view.get("summary").get("failed").n(), 1.0, "{view:?}");
}

/// The stand-in agent's runs, and the requests bin-manager saw from each.
struct Runs<'a> {
    m: &'a Manager,
    host: &'a LegacyHost,
}

impl Runs<'_> {
    /// One run; asserts its exit code and returns its API requests as
    /// `METHOD TARGET STATUS`, once `n` of them are logged.
    fn run(&self, code: i32, n: usize) -> Vec<String> {
        let from = self.m.log_lines().len();
        let ran = self.host.run(self.m);
        ran.expect_code(code);
        let seen = api_requests(self.m, from, n);
        assert_eq!(
            seen.len(),
            n,
            "requests: {seen:#?}\n--- agent stderr\n{}",
            ran.stderr
        );
        assert!(
            self.host.leftovers().is_empty(),
            "temp files left: {:?}",
            self.host.leftovers()
        );
        seen
    }
}

/// Installs V1, stays idle, upgrades to V2, rolls back from V3: what a
/// stand-in agent installs and records, and what the fleet view shows.
/// `check_in` is what its keepalive requests look like on a known node.
fn install_upgrade_roll_back(m: &Manager, host: &LegacyHost, first: &[&str], check_in: &[&str]) {
    let runs = Runs { m, host };
    let node = host.node.as_str();
    let (sha1, sha2, sha3) = (sha256_hex(V1), sha256_hex(V2), sha256_hex(V3));
    let upgrade = |ok: bool| -> Vec<String> {
        let mut want: Vec<String> = check_in.iter().map(|s| s.to_string()).collect();
        want.extend(
            [
                "GET /api/v1/bins/app 200",
                "POST /api/v1/bins/app/progress 200",
                "GET /api/v1/download/app 200",
                "POST /api/v1/bins/app/progress 200",
            ]
            .map(String::from),
        );
        if ok {
            want.push("POST /api/v1/bins/app 200".into());
        }
        want
    };

    m.publish_mv("app", V1);
    let mut want: Vec<String> = first.iter().map(|s| s.to_string()).collect();
    want.extend(upgrade(true).into_iter().skip(check_in.len()));
    assert_eq!(runs.run(0, want.len()), want, "first run");
    assert_eq!(host.installed("app").as_deref(), Some(V1));
    assert_eq!(host.recorded("app"), sha1);
    assert_eq!(
        supervisorctl_log(&host.dir.join("sv")),
        ["restart app", "status app"]
    );
    let n = fleet_node(m, node);
    assert_eq!(n.get("proxyVersion").s(), "1.2.0", "{n:?}");
    assert_eq!(n.get("cpuArch").s(), std::env::consts::ARCH, "{n:?}");
    assert_standing(
        &fleet_bin(m, node, "app"),
        "current",
        &md5_hex(V1),
        &sha1,
        "success",
        &sha1,
    );

    // Idle: nothing but the check-in and the hash.
    let mut idle: Vec<String> = check_in.iter().map(|s| s.to_string()).collect();
    idle.push("GET /api/v1/bins/app 200".into());
    assert_eq!(runs.run(0, idle.len()), idle, "idle run");

    m.publish_mv("app", V2);
    assert_eq!(runs.run(0, upgrade(true).len()), upgrade(true), "upgrade");
    assert_eq!(host.installed("app").as_deref(), Some(V2));
    assert_eq!(host.recorded("app"), sha2);
    assert_standing(
        &fleet_bin(m, node, "app"),
        "current",
        &md5_hex(V2),
        &sha2,
        "success",
        &sha2,
    );

    // A build that does not come up: it rolls back and says so.
    m.publish_mv("app", V3);
    host.fail_restarts(true);
    assert_eq!(
        runs.run(0, upgrade(false).len()),
        upgrade(false),
        "failed upgrade"
    );
    host.fail_restarts(false);
    assert_eq!(host.installed("app").as_deref(), Some(V2), "rolled back");
    assert_eq!(host.recorded("app"), sha2);
    let b = fleet_bin(m, node, "app");
    assert_standing(&b, "failed", &md5_hex(V2), &sha2, "failed", &sha3);
    assert!(b.get("error").s().contains("failed after"), "{b:?}");
}

#[test]
fn the_python_agent_installs_upgrades_and_rolls_back() {
    let m = Manager::start(&[]);
    let host = LegacyHost::new(Dialect::Python, "py-node", &["app"]);
    install_upgrade_roll_back(
        &m,
        &host,
        &[
            "GET /api/v1/keepalive?node_id=py-node 404",
            "POST /api/v1/keepalive 200",
        ],
        &["GET /api/v1/keepalive?node_id=py-node 200"],
    );
}

#[test]
fn the_shell_agent_installs_upgrades_and_rolls_back_beside_bin_proxy() {
    let m = Manager::start(&[]);
    let host = LegacyHost::new(Dialect::Shell, "sh-node", &["app"]);
    // It posts its facts on every run: the keepalive GET names no node.
    let check_in = ["GET /api/v1/keepalive 204", "POST /api/v1/keepalive 200"];
    install_upgrade_roll_back(&m, &host, &check_in, &check_in);

    // bin-proxy on the same server reads the same answers its own way.
    let agent = Agent::with("bp-node", None, Setup::default());
    m.publish_mv("app", V2);
    let (code, log) = agent.run(&m.api(), None);
    assert_eq!(code, 0, "{log}");
    assert_eq!(agent.target(), V2);
    let b = fleet_bin(&m, "bp-node", "app");
    assert_eq!(
        (b.get("status").s(), b.get("hash").s()),
        ("current", md5_hex(V2).as_str()),
        "{b:?}"
    );
    assert!(
        b.opt("progress").is_none() && b.opt("sha256").is_none(),
        "{b:?}"
    );
    let view = envelope(&get(&m, "/nodes"), 200);
    assert_eq!(view.get("summary").get("nodes").n(), 2.0, "{view:?}");
}

#[test]
fn with_a_token_set_they_cannot_check_in() {
    // They send no Authorization header: a server with `token` set refuses
    // them (README: they cannot be used with a token). The shell agent's
    // run ends at its keepalive (curl -f, exit 22); the Python one changes nothing.
    let m = Manager::start(&["--token", "s3cret"]);
    m.publish_mv("app", V1);
    let sh = LegacyHost::new(Dialect::Shell, "sh-node", &["app"]);
    let runs = Runs { m: &m, host: &sh };
    assert_eq!(runs.run(22, 1), ["GET /api/v1/keepalive 401"]);
    assert_eq!(sh.installed("app"), None);

    let py = LegacyHost::new(Dialect::Python, "py-node", &["app"]);
    let runs = Runs { m: &m, host: &py };
    assert_eq!(
        runs.run(0, 3),
        [
            "GET /api/v1/keepalive?node_id=py-node 401",
            "POST /api/v1/keepalive 401",
            "GET /api/v1/bins/app 401"
        ]
    );
    assert_eq!(py.installed("app"), None);
    let r = common::http(
        "GET",
        &format!("{}/nodes", m.api()),
        &[("Authorization", "Bearer s3cret")],
        b"",
    );
    assert_eq!(envelope(&r, 200).get("nodes").arr().len(), 0);
}
