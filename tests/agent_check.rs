//! The agent's batched check, with the REAL `bin-manager` and the real
//! `bin-proxy`: an idle run is one request on the wire (counted in
//! bin-manager's access log) and writes nothing; a publish is picked up; a
//! binary the server does not have fails alone; an unknown node registers
//! and is then checked; against the seed-style fake server the agent falls
//! back to the per-binary calls without an error and remembers it.
use testkit as common;

use common::host::{Host, Ran};
use common::legacy::api_requests;
use common::manager::Manager;
use common::{http, md5_hex, wait_until, Fault, Server};
use std::fs;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

const NODE: &str = "test-node"; // the node name of Host::manifest_for

fn build(name: &str, n: u32) -> Vec<u8> {
    format!("#!/bin/sh\n# {name} build {n}\nexit 0\n").into_bytes()
}

/// A bin-proxy run of `host` against `m`.
fn run(host: &Host, m: &Manager) -> Ran {
    let mut cmd = host.command(&["--timeout", "20"]);
    cmd.env("BIN_MANAGER_API", m.api());
    Ran::bounded(&mut cmd, Duration::from_secs(60), "bin-proxy")
}

/// The API requests bin-manager logged since line `from`, as
/// `METHOD TARGET STATUS`: all of them, since a request sent after the run
/// (`GET /healthz`, not counted) is logged after them.
fn requests_since(m: &Manager, from: usize) -> Vec<String> {
    let marker = http("GET", &format!("{}/healthz", m.url()), &[], b"");
    assert_eq!(marker.status, 200);
    assert!(
        wait_until(Duration::from_secs(10), || m
            .log_lines()
            .iter()
            .skip(from)
            .any(|l| l.contains("GET /healthz"))),
        "the access log shows GET /healthz"
    );
    api_requests(m, from, 0)
}

/// Every file of the host's etc/ and opt/: name → (bytes, mtime).
fn files(host: &Host) -> Vec<(PathBuf, Vec<u8>, SystemTime)> {
    let mut out = Vec::new();
    for dir in [host.dir.join("etc"), host.opt.clone()] {
        for e in fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let mtime = fs::metadata(&p).unwrap().modified().unwrap();
            out.push((p.clone(), fs::read(&p).unwrap(), mtime));
        }
    }
    out.sort();
    out
}

fn check_file(host: &Host) -> PathBuf {
    host.dir.join("etc/bin-manifests.json.check")
}

/// Whether the state remembers an API without the check.
fn remembers_no_check(host: &Host) -> bool {
    fs::read_to_string(host.dir.join("etc/bin-manifests.json.state"))
        .is_ok_and(|t| common::json::parse(&t).opt("noCheck").is_some())
}

#[test]
fn an_idle_run_is_one_request_and_writes_nothing() {
    let m = Manager::start(&[]);
    let names = ["app", "tool", "lib", "cli", "daemon"];
    for n in names {
        m.publish_mv(n, &build(n, 1));
    }
    let host = Host::new();
    host.manifest_for(&names.map(|n| (n, "")));

    // First run: unknown to the server, registered, then checked; installs all.
    let from = m.log_lines().len();
    run(&host, &m).expect_code(0);
    let first = requests_since(&m, from);
    assert_eq!(
        first[..3],
        [
            "POST /api/v1/check 200",
            "POST /api/v1/keepalive?node=test-node 200",
            "POST /api/v1/check 200"
        ],
        "{first:#?}"
    );
    assert!(!first
        .iter()
        .any(|r| r.contains("/bins/") && r.starts_with("GET")));
    for n in names {
        assert_eq!(fs::read(host.target(n)).unwrap(), build(n, 1), "{n}");
    }
    assert!(check_file(&host).exists());

    // Idle: one request, a 304, and not a byte written (nor an mtime touched).
    let before = files(&host);
    std::thread::sleep(Duration::from_millis(20)); // a rewrite would show in the mtime
    let from = m.log_lines().len();
    let ran = run(&host, &m);
    ran.expect_code(0);
    assert_eq!(
        requests_since(&m, from),
        ["POST /api/v1/check 304"],
        "{}",
        ran.stderr
    );
    assert!(files(&host) == before, "an idle run changed files");
    assert!(
        ran.stderr.contains("5 binaries: 5 up to date"),
        "{}",
        ran.stderr
    );

    // A publish: a new ETag, the full answer, the new build installed.
    m.publish_mv("tool", &build("tool", 2));
    let from = m.log_lines().len();
    run(&host, &m).expect_code(0);
    let after = requests_since(&m, from);
    assert_eq!(after[0], "POST /api/v1/check 200", "{after:#?}");
    assert!(after
        .iter()
        .any(|r| r.starts_with("GET /api/v1/download/tool")));
    assert!(
        !after.iter().any(|r| r.contains("download/app")),
        "{after:#?}"
    );
    assert_eq!(fs::read(host.target("tool")).unwrap(), build("tool", 2));
    assert!(host.manifest_text().contains(&md5_hex(&build("tool", 2))));
    // And idle again.
    let from = m.log_lines().len();
    run(&host, &m).expect_code(0);
    assert_eq!(requests_since(&m, from), ["POST /api/v1/check 304"]);
}

#[test]
fn a_binary_the_server_does_not_have_fails_alone() {
    let m = Manager::start(&["--quiet"]);
    m.publish_mv("app", &build("app", 1));
    m.publish_mv("tool", &build("tool", 1));
    let host = Host::new();
    host.manifest_for(&[("app", ""), ("ghost", ""), ("tool", "")]);
    let ran = run(&host, &m);
    ran.expect_code(1);
    let line = common::host::log_line(&ran, &["ghost", "404"]);
    assert!(line.contains("binary not found"), "{line}");
    assert!(
        ran.stderr
            .contains("3 binaries: 0 up to date, 2 changed, 1 failed"),
        "{}",
        ran.stderr
    );
    assert!(!ran.stderr.contains("unreachable"), "{}", ran.stderr);
    assert_eq!(fs::read(host.target("app")).unwrap(), build("app", 1));
    assert_eq!(fs::read(host.target("tool")).unwrap(), build("tool", 1));
    assert!(!host.target("ghost").exists());
    // Not held back: published later, it is installed on the next run.
    m.publish_mv("ghost", &build("ghost", 1));
    run(&host, &m).expect_code(0);
    assert_eq!(fs::read(host.target("ghost")).unwrap(), build("ghost", 1));
}

#[test]
fn an_unknown_node_is_registered_and_then_checked() {
    let m = Manager::start(&[]);
    m.publish_mv("app", &build("app", 1));
    let host = Host::new();
    host.manifest_for(&[("app", &md5_hex(&build("app", 1)))]);
    common::host::install_file(&host, "app", &build("app", 1), 0o755);
    let from = m.log_lines().len();
    let ran = run(&host, &m);
    ran.expect_code(0);
    assert_eq!(
        requests_since(&m, from),
        [
            "POST /api/v1/check 200",
            "POST /api/v1/keepalive?node=test-node 200",
            "POST /api/v1/check 200"
        ],
        "{}",
        ran.stderr
    );
    common::host::log_line(&ran, &["registered node", NODE]);
    let nodes = http("GET", &format!("{}/nodes", m.api()), &[], b"").body_str();
    assert!(nodes.contains(&format!("\"name\":\"{NODE}\"")), "{nodes}");
    // The registration's node token is kept, and sent from now on.
    let state = fs::read_to_string(host.dir.join("etc/bin-manifests.json.state")).unwrap();
    assert!(
        state.contains("nodeToken") || state.contains("token"),
        "{state}"
    );
    let from = m.log_lines().len();
    run(&host, &m).expect_code(0);
    assert_eq!(requests_since(&m, from), ["POST /api/v1/check 304"]);
}

#[test]
fn a_seed_server_without_the_check_is_asked_the_old_way() {
    let host = Host::new();
    host.server.publish("app", &build("app", 1));
    host.server.publish("tool", &build("tool", 1));
    host.manifest_for(&[("app", ""), ("tool", "")]);
    let ran = host.run(&["--timeout", "20"]);
    ran.expect_code(0);
    assert!(
        !ran.stderr.to_lowercase().contains("error"),
        "no error logged:\n{}",
        ran.stderr
    );
    assert_eq!(host.server.count("POST", "/api/v1/check"), 1);
    assert_eq!(host.server.count("GET", "/api/v1/keepalive"), 1);
    assert_eq!(host.server.count("GET", "/api/v1/bins/"), 2);
    assert_eq!(fs::read(host.target("app")).unwrap(), build("app", 1));
    assert_eq!(fs::read(host.target("tool")).unwrap(), build("tool", 1));
    // Remembered in the state, keyed by the API; no check cache written.
    let state = common::json::parse(
        &fs::read_to_string(host.dir.join("etc/bin-manifests.json.state")).unwrap(),
    );
    assert_eq!(state.get("noCheck").get("api").s(), host.server.api());
    assert!(!check_file(&host).exists());

    // The next run goes straight to the old calls.
    host.server.clear_requests();
    let ran = host.run(&["--timeout", "20"]);
    ran.expect_code(0);
    assert_eq!(
        host.server.count("POST", "/api/v1/check"),
        0,
        "{}",
        ran.stderr
    );
    assert_eq!(host.server.count("GET", "/api/v1/keepalive"), 1);
    assert_eq!(host.server.count("GET", "/api/v1/bins/"), 2);
}

/// A fake server answering every request with `status`.
fn failing(status: u16) -> Server {
    let server = Server::start();
    server.fault(common::EVERY_ROUTE, Fault::Status(status));
    server
}

/// The requests `server` got, as `METHOD TARGET`.
fn seen(server: &Server) -> Vec<String> {
    let requests = server.requests();
    requests
        .iter()
        .map(|r| format!("{} {}", r.method, r.target()))
        .collect()
}

#[test]
fn a_check_that_fails_is_the_run_s_fault_never_a_build_s() {
    let host = Host::new();
    host.manifest_for(&[("app", ""), ("tool", "")]);
    let before = common::host::snapshot(&host);
    let down = failing(500);
    for round in 0..2 {
        let mut cmd = host.command(&["--timeout", "20"]);
        cmd.env("BIN_MANAGER_API", down.api());
        let ran = Ran::bounded(&mut cmd, Duration::from_secs(60), "bin-proxy");
        ran.expect_code(1);
        let line = common::host::log_line(&ran, &["server unreachable", "500"]);
        assert!(
            line.contains("2 binaries not checked, nothing changed"),
            "{line}"
        );
        // Not taken for a server without the check: asked again each run.
        assert_eq!(
            seen(&down),
            vec!["POST /api/v1/check"; round + 1],
            "{}",
            ran.stderr
        );
        common::host::assert_unchanged(&host, &before, &ran);
        assert!(!check_file(&host).exists(), "nothing remembered");
        assert!(
            !remembers_no_check(&host),
            "not taken for a server without the check"
        );
        if let Ok(text) = fs::read_to_string(host.dir.join("etc/bin-manifests.json.state")) {
            let held = common::json::parse(&text);
            let held = held.opt("quarantine").map_or(0, |q| q.arr().len());
            assert_eq!(held, 0, "nothing held back: {text}");
        }
    }

    // Nobody listening: the same, told as unreachable.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let api = format!("http://{}/api/v1", closed.local_addr().unwrap());
    drop(closed);
    let mut cmd = host.command(&["--timeout", "5"]);
    cmd.env("BIN_MANAGER_API", &api);
    let ran = Ran::bounded(&mut cmd, Duration::from_secs(60), "bin-proxy");
    ran.expect_code(1);
    common::host::log_line(&ran, &["server unreachable", "2 binaries not checked"]);
    assert!(!check_file(&host).exists());
}

#[test]
fn an_answer_that_is_no_check_s_makes_this_run_ask_the_old_way() {
    let host = Host::new();
    host.manifest_for(&[("app", ""), ("tool", "")]);
    let refusing = failing(401);
    for round in 0..2 {
        let mut cmd = host.command(&["--timeout", "20"]);
        cmd.env("BIN_MANAGER_API", refusing.api());
        let ran = Ran::bounded(&mut cmd, Duration::from_secs(60), "bin-proxy");
        ran.expect_code(1);
        // Each binary's error told as without the check; nothing remembered.
        for name in ["app", "tool"] {
            common::host::log_line(&ran, &[name, "401"]);
        }
        let once = [
            "POST /api/v1/check",
            "GET /api/v1/keepalive?node=test-node",
            "GET /api/v1/bins/app?arch=x86_64&node=test-node",
            "GET /api/v1/bins/tool?arch=x86_64&node=test-node",
            "POST /api/v1/keepalive?node=test-node", // the inventory, after a failure
        ];
        assert_eq!(seen(&refusing), once.repeat(round + 1), "{}", ran.stderr);
        assert!(!check_file(&host).exists());
        assert!(!remembers_no_check(&host));
    }
}
