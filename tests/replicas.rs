//! bin-manager replicas on a real PostgreSQL (`--database`), behind a real
//! nginx as the load balancer: one fleet view from every replica, nothing
//! acknowledged lost when a replica is killed -9 mid-run, and the schema
//! migrated once however many replicas start at once. Each test installs
//! Debian's `postgresql` and `nginx` when missing (scripts/setup.sh), runs
//! its own cluster in a temp dir on 127.0.0.1 with its own port, and stops
//! every process it started by PID.
use testkit as common;

use common::json::Json;
use common::manager::{envelope, Manager};
use common::{
    ensure_debian_packages, http, is_root, start_nginx, start_on_free_port, wait_until, TempDir,
};
use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The directory of PostgreSQL's programs (`/usr/lib/postgresql/N/bin`),
/// installing Debian's `postgresql` when there is none.
fn pg_bin() -> Option<PathBuf> {
    let find = || {
        let mut found: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("postgres").exists() && b.join("initdb").exists())
            .collect();
        found.sort();
        found.pop()
    };
    find().or_else(|| {
        ensure_debian_packages("postgresql", "/usr/lib/postgresql");
        find()
    })
}

/// Skips (or, under CI, fails) a test whose service cannot be had.
fn unavailable(what: &str) {
    let msg = format!("cannot run: {what}");
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{msg} (CI=true)");
    }
    eprintln!("{msg}; skipped");
}

/// A PostgreSQL cluster of the test's own, stopped by PID when dropped.
struct Pg {
    child: Option<Child>,
    port: u16,
    bin: PathBuf,
    dir: TempDir,
}

impl Pg {
    fn start() -> Option<Pg> {
        let Some(bin) = pg_bin() else {
            unavailable("Debian's postgresql is not installed and could not be");
            return None;
        };
        let dir = TempDir::new();
        let data = dir.join("data");
        fs::create_dir(&data).expect("create the data dir");
        // initdb refuses root: the cluster belongs to `postgres` then.
        if is_root() {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir.path)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown of the cluster's temp dir to postgres");
        }
        let out = as_owner(&bin.join("initdb"))
            .args([
                "-A",
                "trust",
                "-U",
                "binmgr",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (child, port) =
            start_on_free_port("postgres", |port| postgres_command(&bin, &dir.path, port));
        let pg = Pg {
            child: Some(child),
            port,
            bin,
            dir,
        };
        pg.wait_ready();
        pg.psql("postgres", "CREATE DATABASE fleet");
        Some(pg)
    }

    /// Stops the cluster (a fast shutdown), bounded.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let gone = wait_until(Duration::from_secs(10), || {
            matches!(child.try_wait(), Ok(Some(_)))
        });
        if !gone {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the stopped cluster again on its port; waits until it takes
    /// connections.
    fn start_again(&mut self) {
        let child = postgres_command(&self.bin, &self.dir.path, self.port)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start postgres again");
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits (bounded) until the server takes connections, past "starting up".
    fn wait_ready(&self) {
        let up = wait_until(Duration::from_secs(20), || {
            Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        });
        assert!(
            up,
            "postgres did not accept connections on port {}",
            self.port
        );
    }

    fn url(&self) -> String {
        format!("postgres://binmgr@127.0.0.1:{}/fleet", self.port)
    }

    /// Runs `sql` with psql; its unaligned output.
    fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-U",
                "binmgr",
            ])
            .args(["-p", &self.port.to_string(), "-d", db, "-c", sql])
            .stdin(Stdio::null())
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs as `postgres` when root (initdb and postgres refuse root).
fn as_owner(program: &Path) -> Command {
    let mut cmd = if is_root() {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=postgres", "--regid=postgres", "--clear-groups"])
            .arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .current_dir("/");
    cmd
}

/// The cluster's server on 127.0.0.1:`port`, its socket in `dir`.
fn postgres_command(bin: &Path, dir: &Path, port: u16) -> Command {
    let mut c = as_owner(&bin.join("postgres"));
    c.arg("-D")
        .arg(dir.join("data"))
        .args(["-p", &port.to_string(), "-k"])
        .arg(dir)
        .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"]);
    c
}

/// nginx balancing round-robin over `ports`, stopped by PID when dropped.
struct Nginx {
    child: Child,
    port: u16,
    _dir: TempDir,
}

impl Nginx {
    fn start(ports: &[u16]) -> Option<Nginx> {
        if !ensure_debian_packages("nginx", "/usr/sbin/nginx") {
            unavailable("Debian's nginx is not installed and could not be");
            return None;
        }
        let dir = TempDir::new();
        let servers: String = ports
            .iter()
            .map(|p| format!("server 127.0.0.1:{p} max_fails=0;\n"))
            .collect();
        let (child, port) = start_nginx("nginx", &dir.path, 256, |port| {
            format!(
                "upstream managers {{ {servers} }}
                 server {{
                   listen 127.0.0.1:{port};
                   location / {{
                     proxy_pass http://managers;
                     proxy_http_version 1.1;
                     proxy_set_header Connection \"\";
                     proxy_next_upstream error timeout;
                     proxy_connect_timeout 2s;
                   }}
                 }}"
            )
        });
        Some(Nginx {
            child,
            port,
            _dir: dir,
        })
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn registration(name: &str, hash: &str) -> String {
    format!(
        "{{\"name\":\"{name}\",\"cpuArch\":\"x86_64\",\"osRelease\":\"Test OS 1\",\"proxyVersion\":\"1.0.0\",\"binaries\":[{{\"name\":\"app\",\"version\":\"latest\",\"hash\":\"{hash}\"}}]}}"
    )
}

/// Every node a replica (or nginx) at `base` knows, with its app's hash.
fn fleet_at(base: &str) -> BTreeMap<String, String> {
    let r = http("GET", &format!("{base}/api/v1/nodes?limit=10000"), &[], b"");
    let d = envelope(&r, 200);
    assert_eq!(d.get("next"), &Json::Null, "one page holds the test fleet");
    d.get("nodes")
        .arr()
        .iter()
        .map(|n| {
            let hash = n.get("binaries").arr()[0].get("hash").s().to_string();
            (n.get("name").s().to_string(), hash)
        })
        .collect()
}

#[test]
fn replicas_behind_nginx_serve_one_fleet_and_lose_nothing_acknowledged() {
    let Some(pg) = Pg::start() else { return };
    let config = r#"{"registrationsPerMinute":100000}"#;
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut replicas: Vec<Manager> = ports
        .iter()
        .map(|p| {
            let listen = format!("127.0.0.1:{p}");
            Manager::start_with_config(config, &["--database", &pg.url(), "--listen", &listen])
        })
        .collect();
    let Some(lb) = Nginx::start(&ports) else {
        return;
    };
    let base = format!("http://127.0.0.1:{}", lb.port);

    // Three rounds over 120 nodes; each round a new hash. Replica 1 is
    // killed -9 in the middle of round 1 and restarted in round 2.
    let mut acknowledged = BTreeMap::new();
    let mut refused = Vec::new();
    for round in 0..3 {
        let hash = format!("{round:032x}");
        for i in 0..120 {
            if round == 1 && i == 60 {
                replicas[1].kill9();
            }
            if round == 2 && i == 30 {
                replicas[1].restart();
            }
            let name = format!("node{i:03}");
            let r = http(
                "POST",
                &format!("{base}/api/v1/keepalive?node={name}"),
                &[("Content-Type", "application/json")],
                registration(&name, &hash).as_bytes(),
            );
            if (200..300).contains(&r.status) {
                acknowledged.insert(name, hash.clone());
            } else {
                refused.push((name, r.status));
            }
        }
    }
    assert!(
        refused.is_empty(),
        "nginx fails over to a live replica: every write is taken; refused: {refused:?}"
    );
    // Every replica, and the balancer, shows exactly what was acknowledged.
    for (i, m) in replicas.iter().enumerate() {
        assert_eq!(
            fleet_at(&m.url()),
            acknowledged,
            "the fleet as replica {i} sees it"
        );
    }
    assert_eq!(fleet_at(&base), acknowledged, "the fleet through nginx");
    // The replicas shared the work: each one's log has registrations.
    let lines = pg.psql("fleet", "SELECT count(*) FROM registry_log");
    assert!(
        lines.parse::<u64>().unwrap() >= 360,
        "registry_log lines: {lines}"
    );
}

#[test]
fn the_schema_is_migrated_once_by_replicas_starting_at_once() {
    let Some(pg) = Pg::start() else { return };
    let url = pg.url();
    let starts: Vec<_> = (0..2)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || Manager::start(&["--database", &url]))
        })
        .collect();
    let mut replicas: Vec<Manager> = starts
        .into_iter()
        .map(|t| t.join().expect("a replica started"))
        .collect();
    let migrated = |m: &Manager| {
        m.log_lines()
            .iter()
            .filter(|l| l.contains("applied 1 schema migration"))
            .count()
    };
    assert_eq!(
        replicas.iter().map(migrated).sum::<usize>(),
        1,
        "exactly one of the two applied the schema"
    );
    assert_eq!(
        pg.psql("fleet", "SELECT version FROM schema_migrations"),
        "1"
    );
    assert_eq!(
        pg.psql("fleet", "SELECT count(*) FROM registry_log"),
        "0",
        "the table exists, empty"
    );
    // A second start migrates nothing, and serves what the first stored.
    let r = http(
        "POST",
        &format!("{}/api/v1/keepalive?node=n1", replicas[0].url()),
        &[("Content-Type", "application/json")],
        registration("n1", &"a".repeat(32)).as_bytes(),
    );
    envelope(&r, 200);
    let before = replicas[1].log_lines().len();
    replicas[1].restart();
    let after: Vec<String> = replicas[1].log_lines()[before..].to_vec();
    assert!(
        !after.iter().any(|l| l.contains("migration")),
        "a second start applies nothing: {after:?}"
    );
    assert!(
        after
            .iter()
            .any(|l| l.contains("in database") && l.contains("1 node")),
        "the restarted replica names its database and knows the node: {after:?}"
    );
}

#[test]
fn a_database_outage_answers_writes_503_with_retry_after_and_recovers() {
    let Some(mut pg) = Pg::start() else { return };
    let m = Manager::start(&["--database", &pg.url()]);
    let register = |name: &str| {
        http(
            "POST",
            &format!("{}/api/v1/keepalive?node={name}", m.url()),
            &[("Content-Type", "application/json")],
            registration(name, &"b".repeat(32)).as_bytes(),
        )
    };
    envelope(&register("n1"), 200);

    pg.stop();
    let r = register("n2");
    assert_eq!(
        r.status,
        503,
        "a write without its database: {}",
        r.body_str()
    );
    assert_eq!(r.header("retry-after"), Some("5"), "Retry-After");
    assert!(
        r.body_str()
            .contains("could not store the registration: database: "),
        "{}",
        r.body_str()
    );
    // Reads go on from what was last read; the log says what happened.
    let names: Vec<String> = fleet_at(&m.url()).into_keys().collect();
    assert_eq!(names, ["n1"]);
    assert!(
        m.log_lines()
            .iter()
            .any(|l| l.contains("ERROR") && l.contains("could not store the registration")),
        "{:?}",
        m.log_lines()
    );

    pg.start_again();
    let mut status = 0;
    let back = wait_until(Duration::from_secs(15), || {
        status = register("n2").status;
        status == 200
    });
    assert!(
        back,
        "writes resume once the database is back (last status {status})"
    );
    let names: Vec<String> = fleet_at(&m.url()).into_keys().collect();
    assert_eq!(names, ["n1", "n2"]);
}

#[test]
fn two_replicas_advance_a_rollout_exactly_once_per_step() {
    let Some(pg) = Pg::start() else { return };
    let first = Manager::start(&["--quiet", "--admin-token", "adm", "--database", &pg.url()]);
    let shared = first.bin_dir().display().to_string();
    let second = Manager::start(&[
        "--quiet",
        "--admin-token",
        "adm",
        "--database",
        &pg.url(),
        "--bin-dir",
        &shared,
    ]);
    first.publish_mv("app", b"#!/bin/sh\n# build a\nexit 0\n");
    for i in 0..20 {
        let name = format!("n{i:02}");
        let r = http(
            "POST",
            &format!("{}/api/v1/keepalive?node={name}", second.url()),
            &[("Content-Type", "application/json")],
            registration(&name, &common::md5_hex(b"#!/bin/sh\n# build a\nexit 0\n")).as_bytes(),
        );
        envelope(&r, 200);
    }
    // A staged publish through one replica; both run the health gate every
    // second against the same rollout record.
    let r = common::manager::put(
        &first,
        "/bins/app?rollout=10,50,100&soak=1",
        Some("adm"),
        b"#!/bin/sh\n# build c\nexit 0\n",
    );
    envelope(&r, 200);
    let state = |m: &Manager| {
        let r = http("GET", &format!("{}/api/v1/rollouts/app", m.url()), &[], b"");
        envelope(&r, 200).get("state").s().to_string()
    };
    let done = wait_until(Duration::from_secs(30), || state(&first) == "done");
    assert!(done, "the rollout finished (state {})", state(&first));
    assert_eq!(state(&second), "done", "both replicas see it done");
    // Every stored rollout record is one revision, each exactly once, in
    // order: no step was taken twice.
    let revisions = pg.psql(
        "fleet",
        "SELECT (op::json->'rollout'->>'revision') FROM registry_log \
         WHERE op::json->>'op' = 'rollout' ORDER BY seq",
    );
    let all: Vec<u64> = revisions.lines().map(|l| l.parse().unwrap()).collect();
    // The staged rollout's records start at its revision 1 (before it: the
    // record of build a, noticed in binDir).
    let start = all.iter().rposition(|r| *r == 1).expect("a revision 1");
    let revisions = all[start..].to_vec();
    let expected: Vec<u64> = (1..=revisions.len() as u64).collect();
    assert_eq!(
        revisions, expected,
        "the staged rollout's revisions as stored: {all:?}"
    );
    let percents = pg.psql(
        "fleet",
        "SELECT (op::json->'rollout'->>'state') FROM registry_log \
         WHERE op::json->>'op' = 'rollout' ORDER BY seq",
    );
    assert_eq!(percents.lines().last(), Some("done"), "{percents}");
    assert!(
        revisions.len() >= 4,
        "publish, 50%, 100%, done: {revisions:?}"
    );
}

/// The once-per-step guarantee forced: two replicas on one database are
/// told the same thing (pause, then resume) at the same moment, many times.
/// Each time exactly one of them may take the step and the other must be
/// refused (409: it is already paused / running), and the database must
/// hold exactly one record of each step, revisions 1, 2, 3… once each. A
/// replica that decided without the revision check, or without the write
/// lock, takes a step twice within a few rounds.
#[test]
fn replicas_told_the_same_step_at_once_take_it_exactly_once() {
    let Some(pg) = Pg::start() else { return };
    let first = Manager::start(&["--quiet", "--admin-token", "adm", "--database", &pg.url()]);
    let shared = first.bin_dir().display().to_string();
    let second = Manager::start(&[
        "--quiet",
        "--admin-token",
        "adm",
        "--database",
        &pg.url(),
        "--bin-dir",
        &shared,
    ]);
    first.publish_mv("app", b"#!/bin/sh\n# build a\nexit 0\n");
    // A staged rollout whose first step soaks for an hour: the health gate
    // takes no step during the test, only the operators below do.
    let r = common::manager::put(
        &first,
        "/bins/app?rollout=10,50,100&soak=3600",
        Some("adm"),
        b"#!/bin/sh\n# build c\nexit 0\n",
    );
    envelope(&r, 200);
    let rows = |pg: &Pg| -> Vec<(u64, String)> {
        pg.psql(
            "fleet",
            "SELECT (op::json->'rollout'->>'revision') || ' ' || (op::json->'rollout'->>'state') \
             FROM registry_log WHERE op::json->>'op' = 'rollout' ORDER BY seq",
        )
        .lines()
        .map(|l| {
            let (rev, state) = l.split_once(' ').expect("revision and state");
            (rev.parse().expect("a revision"), state.to_string())
        })
        .collect()
    };
    let before = rows(&pg);
    assert_eq!(
        before.last().map(|(_, s)| s.as_str()),
        Some("running"),
        "{before:?}"
    );

    // An answer in a line: its message, or the rollout's state and revision.
    let brief = |r: &common::HttpResponse| match common::json::try_parse(&r.body_str()) {
        Ok(j) => match j.opt("data").and_then(|d| d.opt("revision")) {
            Some(rev) => format!(
                "{}: {} at revision {rev:?}",
                r.status,
                j.get("data").get("state").s()
            ),
            None => format!("{}: {:?}", r.status, j.opt("message")),
        },
        Err(_) => format!("{}: {}", r.status, r.body_str()),
    };
    const ROUNDS: usize = 25;
    let urls = [first.url(), second.url()];
    for round in 0..ROUNDS {
        for (action, state) in [("pause", "paused"), ("resume", "running")] {
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(2));
            let answers: Vec<_> = urls
                .iter()
                .map(|base| {
                    let url = format!("{base}/api/v1/rollouts/app/{action}");
                    let barrier = barrier.clone();
                    std::thread::spawn(move || {
                        barrier.wait();
                        http("POST", &url, &[("Authorization", "Bearer adm")], b"")
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect();
            let mut statuses: Vec<u16> = answers.iter().map(|r| r.status).collect();
            statuses.sort();
            assert_eq!(
                statuses,
                [200, 409],
                "round {round}, {action} on both replicas at once: {:?}",
                answers.iter().map(brief).collect::<Vec<_>>()
            );
            let won = answers.iter().find(|r| r.status == 200).unwrap();
            assert_eq!(envelope(won, 200).get("state").s(), state, "round {round}");
        }
    }

    // The database holds each step once: one record per step taken, in
    // revision order, the states alternating.
    let after = rows(&pg);
    let start = before.len() - 1;
    let ours = &after[start..];
    let (rev0, _) = ours[0];
    let expected: Vec<(u64, String)> = (0..=2 * ROUNDS as u64)
        .map(|i| {
            let state = if i % 2 == 1 { "paused" } else { "running" };
            (rev0 + i, state.to_string())
        })
        .collect();
    assert_eq!(ours, expected, "the rollout's records as stored");
    for m in [&first, &second] {
        let r = http("GET", &format!("{}/api/v1/rollouts/app", m.url()), &[], b"");
        let d = envelope(&r, 200);
        assert_eq!(d.get("state").s(), "running");
    }
}
