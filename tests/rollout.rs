//! Staged rollouts end to end, with the REAL `bin-manager` and `bin-proxy`
//! executables: who gets which build (stable buckets, canaries, labels, a
//! seed agent without `node=`), downloads that match the hash a node was
//! given, the health gate pausing on failures reported by real agents,
//! abort sending installed nodes back through the normal upgrade path,
//! promote, a policy from the config applied to a publish by `mv`, the
//! control API's refusals, and kill -9 of the server mid-rollout.
use testkit as common;

use bin_proxy::manager::rollout::{bucket, within};
use common::agent::{Agent, Setup};
use common::json::Json;
use common::manager::{call, envelope, expect_error, get, post, put, run_cli, Manager};
use common::{http, md5_hex};
use std::collections::BTreeSet;
use std::fs;
use std::time::Duration;

const GOOD_A: &[u8] = b"#!/bin/sh\n# build a\nexit 0\n";
const BAD_B: &[u8] = b"#!/bin/sh\n# build b: fails its health check\nexit 1\n";
const GOOD_C: &[u8] = b"#!/bin/sh\n# build c\nexit 0\n";
const GOOD_D: &[u8] = b"#!/bin/sh\n# build d\nexit 0\n";

fn registration(name: &str, hash: &str, labels: &str) -> String {
    format!(
        "{{\"name\":\"{name}\",\"cpuArch\":\"x86_64\",\"osRelease\":\"Test OS 1\",\"proxyVersion\":\"1.0.0\",\"binaries\":[{{\"name\":\"app\",\"version\":\"latest\",\"hash\":\"{hash}\"}}],\"lastSeen\":\"2020-01-01T00:00:00Z\",\"labels\":{labels}}}"
    )
}

/// Registers `names`, each running `bytes`' build of app.
fn register_all(m: &Manager, names: &[String], bytes: &[u8]) {
    for n in names {
        let body = registration(n, &md5_hex(bytes), "{}");
        envelope(&post(m, &format!("/keepalive?node={n}"), &body), 200);
    }
}

/// The md5 `bins/app` answers for `node` (none: a seed agent's request).
fn offered(m: &Manager, node: Option<&str>) -> String {
    let path = match node {
        Some(n) => format!("/bins/app?node={n}&arch=x86_64"),
        None => "/bins/app".to_string(),
    };
    envelope(&get(m, &path), 200).get("hash").s().to_string()
}

/// The nodes among `names` that `bins/app` offers `bytes`' build to.
fn offered_to(m: &Manager, names: &[String], bytes: &[u8]) -> BTreeSet<String> {
    let want = md5_hex(bytes);
    names
        .iter()
        .filter(|n| offered(m, Some(n)) == want)
        .cloned()
        .collect()
}

fn rollout(m: &Manager) -> Json {
    envelope(&get(m, "/rollouts/app"), 200)
}

fn control(m: &Manager, action: &str) -> Json {
    envelope(
        &call(
            m,
            "POST",
            &format!("/rollouts/app/{action}"),
            Some("adm"),
            b"",
        ),
        200,
    )
}

fn nodes(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("node-{i:03}")).collect()
}

fn count(r: &Json, what: &str) -> u64 {
    r.get("nodes").get(what).n() as u64
}

#[test]
fn a_staged_publish_reaches_its_bucket_and_no_one_else() {
    let m = Manager::start(&["--quiet", "--admin-token", "adm"]);
    m.publish_mv("app", GOOD_A);
    let names = nodes(100);
    register_all(&m, &names, GOOD_A);
    assert!(offered_to(&m, &names, GOOD_A).len() == 100);

    let r = put(
        &m,
        "/bins/app?rollout=10,100&soak=3600&maxFailures=2",
        Some("adm"),
        GOOD_C,
    );
    assert_eq!(envelope(&r, 200).get("hash").s(), md5_hex(GOOD_C));
    let ro = rollout(&m);
    assert_eq!(ro.get("state").s(), "running");
    assert_eq!(ro.get("percent").n(), 10.0);
    assert_eq!(ro.get("from").get("hash").s(), md5_hex(GOOD_A));
    assert_eq!(ro.get("to").get("hash").s(), md5_hex(GOOD_C));
    let id = ro.get("id").s().to_string();

    // Exactly the nodes whose bucket is below 10%, the same ones each time.
    let want: BTreeSet<String> = names
        .iter()
        .filter(|n| within(bucket(&id, n), 10))
        .cloned()
        .collect();
    let got = offered_to(&m, &names, GOOD_C);
    assert_eq!(got, want);
    assert!((2..=25).contains(&got.len()), "{} of 100 nodes", got.len());
    assert_eq!(
        offered_to(&m, &names, GOOD_C),
        got,
        "stable across requests"
    );
    assert_eq!(
        (count(&ro, "eligible"), count(&ro, "pending")),
        (got.len() as u64, got.len() as u64)
    );
    assert_eq!(count(&ro, "onNew"), 0);
    // A seed agent (no node=) gets what the fleet runs.
    assert_eq!(offered(&m, None), md5_hex(GOOD_A));

    // Downloads serve the build each node was given, from one URL.
    let inside = got.iter().next().unwrap();
    let outside = names.iter().find(|n| !got.contains(*n)).unwrap();
    for (node, bytes) in [(inside, GOOD_C), (outside, GOOD_A)] {
        assert_eq!(offered(&m, Some(node)), md5_hex(bytes));
        let d = http(
            "GET",
            &format!("{}/download/app?node={node}&arch=x86_64", m.api()),
            &[],
            b"",
        );
        assert_eq!(
            (d.status, d.body.as_slice()),
            (200, bytes),
            "download for {node}"
        );
    }
    let d = http("GET", &format!("{}/download/app", m.api()), &[], b"");
    assert_eq!(d.body, GOOD_A, "a seed agent downloads the fleet's build");

    // The list shows it; promote takes it to everyone.
    let list = envelope(&get(&m, "/rollouts"), 200);
    assert_eq!(list.arr().len(), 1);
    assert_eq!(list.arr()[0].get("id").s(), id);
    let done = control(&m, "promote");
    assert_eq!(
        (done.get("state").s(), done.get("percent").n()),
        ("done", 100.0)
    );
    assert_eq!(offered_to(&m, &names, GOOD_C).len(), 100);
    assert_eq!(offered(&m, None), md5_hex(GOOD_C));
    expect_error(
        &call(&m, "POST", "/rollouts/app/pause", Some("adm"), b""),
        409,
        "cannot pause a rollout that is done",
    );
}

#[test]
fn failures_pause_it_abort_sends_nodes_back_promote_finishes() {
    let mut m = Manager::start(&["--quiet", "--admin-token", "adm"]);
    m.publish_mv("app", GOOD_A);
    let names = nodes(40);
    register_all(&m, &names, GOOD_A);

    // A bad build to half the fleet; two failures must pause it.
    let r = put(
        &m,
        "/bins/app?rollout=50,100&maxFailures=2&soak=3600",
        Some("adm"),
        BAD_B,
    );
    envelope(&r, 200);
    let id = rollout(&m).get("id").s().to_string();
    let in_step = offered_to(&m, &names, BAD_B);
    assert!(!in_step.is_empty(), "no fake node in the 50% step");
    // Two real agents in the step and one outside it, all running a.
    let pick = |inside: bool, skip: usize| {
        (0..)
            .map(|i| format!("agent-{i}"))
            .filter(|n| within(bucket(&id, n), 50) == inside)
            .nth(skip)
            .unwrap()
    };
    let health = Setup {
        post_upgrade: Some("{path}"), // the build itself is its health check
        ..Setup::default()
    };
    let agents: Vec<Agent> = [pick(true, 0), pick(true, 1), pick(false, 0)]
        .iter()
        .map(|n| Agent::with(n, Some(GOOD_A), Setup { ..health }))
        .collect();
    let (code, log) = agents[0].run(&m.api(), None);
    assert_eq!(code, 1, "the first agent runs the bad build:\n{log}");
    assert!(
        log.contains("did not come up: postUpgrade") && log.contains("exited 1"),
        "{log}"
    );
    assert_eq!(agents[0].target(), GOOD_A, "rolled back:\n{log}");
    let ro = rollout(&m);
    assert_eq!(
        (ro.get("state").s(), count(&ro, "failed")),
        ("running", 1),
        "{ro:?}"
    );
    assert_eq!(
        offered_to(&m, &names, BAD_B),
        in_step,
        "one failure is below maxFailures"
    );
    let (code, log) = agents[1].run(&m.api(), None);
    assert_eq!(code, 1, "the second agent:\n{log}");
    assert!(log.contains("exited 1"), "{log}");
    let ro = rollout(&m);
    assert_eq!(ro.get("state").s(), "paused", "{ro:?}");
    assert!(
        ro.get("reason").s().starts_with("2 nodes failed with"),
        "{ro:?}"
    );
    assert_eq!(count(&ro, "failed"), 2);

    // A node told about the build before the pause still downloads what it
    // was told (its hash would not match anything else)…
    let told = in_step.iter().next().unwrap();
    let download = |node: &str| {
        let url = format!("{}/download/app?node={node}&arch=x86_64", m.api());
        http("GET", &url, &[], b"").body
    };
    assert_eq!(download(told), BAD_B);
    // …but no further node is offered the build, not even after kill -9.
    assert!(
        offered_to(&m, &names, BAD_B).is_empty(),
        "the step's other nodes are held"
    );
    assert_eq!(
        download(told),
        GOOD_A,
        "its next answer, and so its download, is a"
    );
    for a in &agents {
        assert_eq!(offered(&m, Some(&a.node)), md5_hex(GOOD_A), "{}", a.node);
    }
    let (code, log) = agents[2].run(&m.api(), None);
    assert_eq!(code, 0, "the agent outside the step stays on a:\n{log}");
    assert_eq!(agents[2].target(), GOOD_A);
    let before = rollout(&m);
    m.kill9();
    m.restart();
    assert_eq!(rollout(&m), before, "kill -9 changed the rollout");
    assert!(offered_to(&m, &names, BAD_B).is_empty());
    let aborted = control(&m, "abort");
    assert_eq!(aborted.get("state").s(), "aborted");

    // A good build, to one canary first: it installs it; abort sends it back.
    let canary = agents[2].node.clone();
    let r = put(
        &m,
        &format!("/bins/app?rollout=100&canary={canary}&soak=3600"),
        Some("adm"),
        GOOD_C,
    );
    envelope(&r, 200);
    let ro = rollout(&m);
    assert_eq!(
        ro.get("from").get("hash").s(),
        md5_hex(GOOD_A),
        "starts from what the fleet runs"
    );
    let (code, log) = agents[2].run(&m.api(), None);
    assert_eq!((code, agents[2].target()), (0, GOOD_C.to_vec()), "{log}");
    assert_eq!(count(&rollout(&m), "onNew"), 1);
    control(&m, "abort");
    assert_eq!(offered(&m, Some(&canary)), md5_hex(GOOD_A));
    let (code, log) = agents[2].run(&m.api(), None);
    assert_eq!(code, 0, "the canary goes back:\n{log}");
    assert_eq!(agents[2].target(), GOOD_A, "{log}");
    assert_eq!(
        fs::read(format!("{}.bak", agents[2].path().display())).unwrap(),
        GOOD_C
    );

    // Another one, promoted: every node gets it.
    let r = put(
        &m,
        "/bins/app?rollout=10,100&soak=3600",
        Some("adm"),
        GOOD_D,
    );
    envelope(&r, 200);
    control(&m, "promote");
    assert_eq!(offered_to(&m, &names, GOOD_D).len(), 40);
    for a in &agents[..2] {
        let (code, log) = a.run(&m.api(), None);
        assert_eq!(
            (code, a.target()),
            (0, GOOD_D.to_vec()),
            "{}:\n{log}",
            a.node
        );
    }
}

#[test]
fn a_config_policy_applies_to_a_publish_by_mv_and_labels_target() {
    let config = r#"{"rollouts": {"app": {"steps": [100], "soakSeconds": 3600, "match": {"region": "eu"}, "canaryLabels": {"group": "edge"}}}}"#;
    let m = Manager::start_with_config(config, &["--quiet", "--admin-token", "adm"]);
    m.publish_mv("app", GOOD_A);
    for (n, labels) in [
        ("eu-edge", r#"{"region":"eu","group":"edge"}"#),
        ("eu-plain", r#"{"region":"eu"}"#),
        ("us-edge", r#"{"region":"us","group":"edge"}"#),
    ] {
        let body = registration(n, &md5_hex(GOOD_A), labels);
        envelope(&post(&m, &format!("/keepalive?node={n}"), &body), 200);
    }
    assert_eq!(offered(&m, Some("eu-edge")), md5_hex(GOOD_A));
    m.publish_mv("app", GOOD_C);
    let ro = rollout(&m);
    assert_eq!(
        (ro.get("state").s(), ro.get("canaryPhase")),
        ("running", &Json::Bool(true))
    );
    assert_eq!(
        offered(&m, Some("eu-edge")),
        md5_hex(GOOD_C),
        "the label canary"
    );
    assert_eq!(
        offered(&m, Some("eu-plain")),
        md5_hex(GOOD_A),
        "waits for the first step"
    );
    assert_eq!(
        offered(&m, Some("us-edge")),
        md5_hex(GOOD_A),
        "outside the match"
    );
    let ro = rollout(&m);
    assert_eq!(count(&ro, "eligible"), 1);

    // The control API wants the admin token and names what it cannot do.
    expect_error(
        &call(&m, "POST", "/rollouts/app/pause", None, b""),
        401,
        "controlling a rollout needs the admin bearer token",
    );
    expect_error(
        &call(&m, "POST", "/rollouts/app/resume", Some("adm"), b""),
        409,
        "cannot resume a rollout that is running",
    );
    expect_error(
        &call(&m, "POST", "/rollouts/app/explode", Some("adm"), b""),
        404,
        "use POST /api/v1/rollouts/NAME/pause, resume, promote or abort",
    );
    expect_error(
        &get(&m, "/rollouts/other"),
        404,
        "no staged rollout of other",
    );
    let paused = control(&m, "pause");
    assert_eq!(paused.get("state").s(), "paused");
    assert_eq!(
        offered(&m, Some("eu-edge")),
        md5_hex(GOOD_A),
        "no further node, and it never installed"
    );
    let resumed = control(&m, "resume");
    assert_eq!(resumed.get("state").s(), "running");
    let r = put(&m, "/bins/app?rollout=5,1", Some("adm"), GOOD_D);
    expect_error(&r, 400, "rollout steps must increase: \"5,1\"");
    assert_eq!(
        fs::read(m.bin_dir().join("app")).unwrap(),
        GOOD_C,
        "a refused publish changes nothing"
    );
}

#[test]
fn the_rollout_command_shows_and_steers_it_from_a_shell() {
    let m = Manager::start(&["--quiet", "--admin-token", "adm"]);
    m.publish_mv("app", GOOD_A);
    register_all(&m, &nodes(10), GOOD_A);
    let r = put(
        &m,
        "/bins/app?rollout=10,100&soak=3600&maxFailures=2",
        Some("adm"),
        GOOD_C,
    );
    envelope(&r, 200);
    let server = m.url();
    let cli = |args: &[&str], env: &[(&str, &str)]| {
        let mut all = args.to_vec();
        all.extend(["--server", server.as_str()]);
        run_cli(&all, env, Duration::from_secs(30))
    };
    let admin = [("BIN_MANAGER_ADMIN_TOKEN", "adm")];

    let (code, out, err) = cli(&["rollout", "status", "app"], &[]);
    assert_eq!(code, 0, "{err}");
    let want = format!(
        "app: running at 10% (steps 10,100; soak 3600 s; maxFailures 2)\n  {}… → {}…\n",
        &md5_hex(GOOD_A)[..8],
        &md5_hex(GOOD_C)[..8]
    );
    assert!(out.starts_with(&want), "{out}");
    assert!(
        out.contains("  nodes: ") && out.contains("0 on the new build"),
        "{out}"
    );

    let (code, _, err) = cli(&["rollout", "pause", "app"], &[]);
    assert_eq!(code, 2, "no admin token: {err}");
    assert!(
        err.contains("no admin token: set BIN_MANAGER_ADMIN_TOKEN"),
        "{err}"
    );
    assert_eq!(rollout(&m).get("state").s(), "running");
    let (code, out, err) = cli(&["rollout", "pause", "app"], &admin);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("app: paused at 10%"), "{out}");
    assert_eq!(rollout(&m).get("state").s(), "paused");
    let (code, _, err) = cli(&["rollout", "pause", "app"], &admin);
    assert_eq!(code, 1, "pausing twice: {err}");
    assert!(
        err.contains("cannot pause a rollout that is paused"),
        "{err}"
    );
    let (code, _, err) = cli(&["rollout", "pause", "app", "--admin-token", "adm"], &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("never take the admin token from the command line"),
        "{err}"
    );
    let (code, _, err) = cli(&["rollout", "explode", "app"], &admin);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown rollout action \"explode\""), "{err}");
    let (code, out, err) = cli(&["rollout", "promote", "app"], &admin);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("app: done at 100%"), "{out}");
}
