//! The real `bin-proxy` against the real `bin-manager` through a real HTTP
//! proxy: Debian's tinyproxy, started here with a config of its own
//! (`tinyproxy -d -c CONF`, port, log and pid file in a temp dir) and
//! stopped by its pid. Which requests went through the proxy is read from
//! its log ("Request (file descriptor N): GET http://… HTTP/1.1",
//! "CONNECT host:port"); what the agent sent to the proxy itself is read
//! from a recording relay in front of it. Also IPv6: bin-manager, the API
//! URL and the proxy on `[::1]`.
//!
//! Without tinyproxy (scripts/setup.sh installs it) these tests are skipped
//! loudly, and fail under CI=true.

use testkit as common;

use common::agent::{Agent, Setup};
use common::manager::{envelope, Manager};
use common::{can_run, ensure_debian_packages, md5_hex, wait_until, TempDir};
use std::fs;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

const TINYPROXY: &str = "/usr/bin/tinyproxy";
const TOKEN: &str = "s3cret-api-token";

/// A tinyproxy of the test's own.
struct Tinyproxy {
    child: Child,
    /// `127.0.0.1:PORT` or `[::1]:PORT`.
    addr: String,
    dir: TempDir,
}

impl Tinyproxy {
    /// Starts tinyproxy listening on `host` (`127.0.0.1` or `::1`) with
    /// `extra` config lines; `None` (skipped) when it is not installed.
    fn start(host: &str, extra: &str) -> Option<Tinyproxy> {
        let have = ensure_debian_packages("tinyproxy", TINYPROXY);
        if !can_run(
            have,
            "Debian's tinyproxy is not installed and could not be (scripts/setup.sh installs it)",
        ) {
            return None;
        }
        let dir = TempDir::new();
        let bracketed = match host.contains(':') {
            true => format!("[{host}]"),
            false => host.to_string(),
        };
        for _ in 0..5 {
            let port = TcpListener::bind(format!("{bracketed}:0"))
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let conf = format!(
                "Port {port}\nListen {host}\nTimeout 30\nMaxClients 50\nLogLevel Info\n\
                 LogFile \"{d}/tinyproxy.log\"\nPidFile \"{d}/tinyproxy.pid\"\n{extra}\n",
                d = dir.path.display()
            );
            fs::write(dir.join("tinyproxy.conf"), conf).expect("write tinyproxy.conf");
            let mut child = Command::new(TINYPROXY)
                .arg("-d")
                .arg("-c")
                .arg(dir.join("tinyproxy.conf"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start tinyproxy");
            let addr = format!("{bracketed}:{port}");
            let up = wait_until(Duration::from_secs(10), || {
                matches!(child.try_wait(), Ok(None)) && TcpStream::connect(&addr).is_ok()
            });
            if up {
                return Some(Tinyproxy { child, addr, dir });
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "tinyproxy did not start on {host} (5 tries); its log:\n{}",
            fs::read_to_string(dir.join("tinyproxy.log")).unwrap_or_default()
        );
    }

    /// `http://ADDR`, for `http_proxy`.
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its log so far.
    fn log(&self) -> String {
        fs::read_to_string(self.dir.join("tinyproxy.log")).unwrap_or_default()
    }

    /// The request lines it logged that name `needle`.
    fn requests(&self, needle: &str) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains("Request (file descriptor") && l.contains(needle))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Tinyproxy {
    fn drop(&mut self) {
        let _ = self.child.kill(); // by its pid
        let _ = self.child.wait();
    }
}

/// A TCP relay on 127.0.0.1 in front of `to`, keeping every byte clients
/// sent through it: what the agent told the proxy.
struct Relay {
    addr: String,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Relay {
    fn start(to: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind relay");
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (to, record) = (to.to_string(), seen.clone());
        thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(upstream) = TcpStream::connect(&to) else {
                    continue;
                };
                let (record, back) = (record.clone(), upstream.try_clone().unwrap());
                let client_back = client.try_clone().unwrap();
                thread::spawn(move || pipe(client, upstream, Some(record)));
                thread::spawn(move || pipe(back, client_back, None));
            }
        });
        Relay { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> String {
        String::from_utf8_lossy(&self.seen.lock().unwrap()).into_owned()
    }
}

/// Copies `from` to `to` until either closes, recording the bytes.
fn pipe(mut from: TcpStream, mut to: TcpStream, record: Option<Arc<Mutex<Vec<u8>>>>) {
    let mut buf = [0u8; 16384];
    while let Ok(n @ 1..) = from.read(&mut buf) {
        if let Some(r) = &record {
            r.lock().unwrap().extend_from_slice(&buf[..n]);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// nginx terminating TLS on 127.0.0.1 in front of `upstream` (bin-manager),
/// with a CA and a certificate for IP 127.0.0.1 made by openssl; stopped by
/// its pid.
struct TlsFront {
    child: Child,
    port: u16,
    /// The CA certificate, for `SSL_CERT_FILE`.
    ca: PathBuf,
    _dir: TempDir,
}

impl TlsFront {
    fn start(upstream: &str) -> Option<TlsFront> {
        let have = ensure_debian_packages("nginx openssl", "/usr/sbin/nginx")
            && Path::new("/usr/bin/openssl").exists();
        if !can_run(
            have,
            "nginx or openssl is not installed (scripts/setup.sh installs them)",
        ) {
            return None;
        }
        let dir = TempDir::new();
        let d = dir.path.display().to_string();
        let openssl = |args: &str| {
            let out = Command::new("openssl")
                .args(args.split_whitespace())
                .current_dir(&dir.path)
                .output()
                .expect("run openssl");
            assert!(out.status.success(), "openssl {args}: {out:?}");
        };
        openssl("req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=proxy-test-CA -keyout ca.key -out ca.pem");
        openssl(
            "req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout server.key -out server.csr",
        );
        fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
        openssl("x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile san.ext -out server.pem");
        let (child, port) = common::start_nginx("nginx (TLS)", &dir.path, 64, |port| {
            format!(
                "server {{
                   listen 127.0.0.1:{port} ssl;
                   ssl_certificate {d}/server.pem; ssl_certificate_key {d}/server.key;
                   location / {{ proxy_pass http://{upstream}; proxy_buffering off; }}
                 }}"
            )
        });
        Some(TlsFront {
            child,
            port,
            ca: dir.join("ca.pem"),
            _dir: dir,
        })
    }

    fn api(&self) -> String {
        format!("https://127.0.0.1:{}/api/v1", self.port)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn build(n: u32) -> Vec<u8> {
    format!("#!/bin/sh\necho build {n}\n").into_bytes()
}

/// What the manager knows of `node`'s app: (reported hash, status).
fn reported(m: &Manager, node: &str) -> (String, String) {
    let r = common::http(
        "GET",
        &format!("{}/nodes", m.api()),
        &[("Authorization", &format!("Bearer {TOKEN}"))],
        b"",
    );
    let data = envelope(&r, 200);
    let node = data
        .get("nodes")
        .arr()
        .iter()
        .find(|n| n.get("name").s() == node)
        .unwrap_or_else(|| panic!("{node} is not registered: {}", r.body_str()))
        .clone();
    let app = node.get("binaries").arr()[0].clone();
    (
        app.get("hash").s().to_string(),
        app.get("status").s().to_string(),
    )
}

/// The manager's access log lines (its stderr) naming `path`.
fn served(m: &Manager, path: &str) -> usize {
    m.log_lines().iter().filter(|l| l.contains(path)).count()
}

/// (a), (c): API calls and the download go through `http_proxy` (the
/// proxy's log names each URL, and nothing but the proxy reached the
/// manager); `no_proxy` (a host:port, upper case) and `--no-proxy` bypass
/// it; `HTTP_PROXY` is honoured too. The token goes to the origin through
/// the proxy, never in a proxy's own header, and never into its log.
#[test]
fn http_proxy_carries_api_calls_and_downloads_and_no_proxy_bypasses_it() {
    let Some(proxy) = Tinyproxy::start("127.0.0.1", "") else {
        return;
    };
    let relay = Relay::start(&proxy.addr);
    let m = Manager::start(&["--token", TOKEN]);
    m.publish_mv("app", &build(1));
    let agent = Agent::with("proxied", Some(&build(0)), Setup::default());

    let mut cmd = agent.command(&m.api(), Some(TOKEN));
    cmd.env("http_proxy", relay.url());
    let (code, log) = agent.run_command(&mut cmd);
    assert_eq!(code, 0, "through the proxy:\n{log}");
    assert_eq!(
        agent.target(),
        build(1),
        "installed through the proxy:\n{log}"
    );
    // Registration, the check, the download and the report.
    for (method, path) in [
        ("POST", "/api/v1/check HTTP/1.1"),
        ("POST", "/api/v1/keepalive?"),
        ("GET", "/api/v1/download/app?"),
        ("POST", "/api/v1/bins/app?"),
    ] {
        let line = format!("{method} http://{}{path}", m.addr());
        assert!(
            !proxy.requests(&line).is_empty(),
            "tinyproxy logged no request {line}:\n{}",
            proxy.log()
        );
    }
    let through = proxy.requests(&m.addr()).len();
    // The manager logs a request once it is answered, the agent may be
    // gone by then: wait (bounded) for the lines to arrive.
    wait_until(Duration::from_secs(10), || {
        served(&m, "/api/v1/") >= through
    });
    let api_requests = served(&m, "/api/v1/");
    assert_eq!(
        through,
        api_requests,
        "every request the manager served came through the proxy:\n{}\n--- manager\n{}",
        proxy.log(),
        m.log_lines().join("\n")
    );
    assert_eq!(
        reported(&m, "proxied"),
        (md5_hex(&build(1)), "current".into())
    );
    let sent = relay.seen();
    assert!(
        sent.contains(&format!("GET http://{}/api/v1/download/app", m.addr())),
        "{sent}"
    );
    assert!(!sent.contains("Proxy-Authorization"), "{sent}");
    assert!(
        !proxy.log().contains(TOKEN),
        "the token is in the proxy's log:\n{}",
        proxy.log()
    );

    // no_proxy names the manager (upper case, host:port): reached directly.
    m.publish_mv("app", &build(2));
    let mut cmd = agent.command(&m.api(), Some(TOKEN));
    cmd.env("http_proxy", proxy.url())
        .env("NO_PROXY", format!("example.org, {}", m.addr()));
    let (code, log) = agent.run_command(&mut cmd);
    assert_eq!(code, 0, "NO_PROXY:\n{log}");
    assert_eq!(agent.target(), build(2), "installed directly:\n{log}");
    assert_eq!(
        proxy.requests(&m.addr()).len(),
        through,
        "NO_PROXY: the proxy was used:\n{}",
        proxy.log()
    );

    // --no-proxy ignores HTTP_PROXY.
    m.publish_mv("app", &build(3));
    let mut cmd = agent.command(&m.api(), Some(TOKEN));
    cmd.arg("--no-proxy").env("HTTP_PROXY", proxy.url());
    let (code, log) = agent.run_command(&mut cmd);
    assert_eq!(code, 0, "--no-proxy:\n{log}");
    assert_eq!(agent.target(), build(3), "installed directly:\n{log}");
    assert_eq!(
        proxy.requests(&m.addr()).len(),
        through,
        "--no-proxy: the proxy was used:\n{}",
        proxy.log()
    );

    // HTTP_PROXY alone (upper case) is used.
    m.publish_mv("app", &build(4));
    let mut cmd = agent.command(&m.api(), Some(TOKEN));
    cmd.env("HTTP_PROXY", proxy.url());
    let (code, log) = agent.run_command(&mut cmd);
    assert_eq!(code, 0, "HTTP_PROXY:\n{log}");
    assert_eq!(
        agent.target(),
        build(4),
        "installed through HTTP_PROXY:\n{log}"
    );
    let url = format!("http://{}/api/v1/download/app", m.addr());
    assert_eq!(proxy.requests(&url).len(), 2, "HTTP_PROXY: {}", proxy.log());
}

/// (b), (e): an https:// API through `HTTPS_PROXY` is a CONNECT tunnel to
/// the TLS port (allowed by `ConnectPort`): the proxy sees only the
/// CONNECT line — never the token, which travels inside TLS.
#[test]
fn https_api_goes_through_a_connect_tunnel_and_the_token_never_reaches_the_proxy() {
    let m = Manager::start(&["--token", TOKEN]);
    let Some(tls) = TlsFront::start(&m.addr()) else {
        return;
    };
    let Some(proxy) = Tinyproxy::start("127.0.0.1", &format!("ConnectPort {}", tls.port)) else {
        return;
    };
    let relay = Relay::start(&proxy.addr);
    m.publish_mv("app", &build(1));
    let agent = Agent::with("tunnelled", Some(&build(0)), Setup::default());
    let mut cmd = agent.command(&tls.api(), Some(TOKEN));
    cmd.env("SSL_CERT_FILE", &tls.ca)
        .env("HTTPS_PROXY", relay.url());
    let (code, log) = agent.run_command(&mut cmd);
    assert_eq!(code, 0, "through the tunnel:\n{log}");
    assert_eq!(
        agent.target(),
        build(1),
        "installed through the tunnel:\n{log}"
    );
    assert!(
        log.contains(&format!("from {}/download/app", tls.api())),
        "{log}"
    );
    let connect = format!("CONNECT 127.0.0.1:{}", tls.port);
    assert!(
        proxy.log().lines().any(|l| l.contains(&connect)),
        "tinyproxy logged no {connect}:\n{}",
        proxy.log()
    );
    let sent = relay.seen();
    assert!(sent.starts_with(&connect), "{sent}");
    assert!(
        !sent.contains(TOKEN),
        "the token reached the proxy:\n{sent}"
    );
    assert!(!sent.contains("Authorization"), "{sent}");
    assert!(
        !sent.contains("/api/v1"),
        "a plain request went to the proxy:\n{sent}"
    );
    assert_eq!(
        reported(&m, "tunnelled"),
        (md5_hex(&build(1)), "current".into())
    );
}

/// (d): a proxy that is not running, that denies this client, or that
/// refuses the tunnel: exit 1,
/// the error names the proxy, nothing changes and nothing is held back —
/// the next run without the proxy installs the build.
#[test]
fn a_refusing_proxy_is_named_and_never_blamed_on_the_build() {
    let m = Manager::start(&[]);
    let Some(tls) = TlsFront::start(&m.addr()) else {
        return;
    };
    // No ConnectPort for the TLS port: tinyproxy refuses the CONNECT.
    let Some(proxy) = Tinyproxy::start("127.0.0.1", "ConnectPort 1") else {
        return;
    };
    let Some(denying) = Tinyproxy::start("127.0.0.1", "Deny 127.0.0.1") else {
        return;
    };
    m.publish_mv("app", &build(1));
    let agent = Agent::with("refused", Some(&build(0)), Setup::default());

    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut cmd = agent.command(&m.api(), None);
    cmd.env("http_proxy", format!("http://{closed}"));
    let (code, log) = agent.run_command(&mut cmd);
    assert_eq!(code, 1, "a closed proxy port:\n{log}");
    assert!(
        log.contains(&format!(
            "proxy {closed}: connection refused (is the proxy running?)"
        )),
        "{log}"
    );

    // A proxy that denies this client answers 403 itself: not the
    // server refusing this node's token, not a failed build.
    let mut cmd = agent.command(&m.api(), None);
    cmd.env("http_proxy", denying.url());
    let (code, log) = agent.run_command(&mut cmd);
    assert_eq!(code, 1, "a denying proxy:\n{log}");
    let refused = format!(
        "proxy {} refused the request: 403 Access denied",
        denying.addr
    );
    assert!(log.contains(&refused), "no \"{refused}\" in:\n{log}");
    assert!(log.contains("server unreachable"), "{log}");
    assert!(
        !log.contains("token refused") && !log.contains("1 failed"),
        "{log}"
    );

    let mut cmd = agent.command(&tls.api(), None);
    cmd.env("SSL_CERT_FILE", &tls.ca)
        .env("https_proxy", proxy.url());
    let (code, log) = agent.run_command(&mut cmd);
    assert_eq!(code, 1, "a refused CONNECT:\n{log}");
    let refused = format!(
        "proxy {} refused CONNECT 127.0.0.1:{}",
        proxy.addr, tls.port
    );
    assert!(log.contains(&refused), "no \"{refused}\" in:\n{log}");
    assert_eq!(agent.target(), build(0), "nothing installed");
    assert!(log.contains("nothing changed"), "{log}");
    assert!(!log.contains("holding back"), "{log}");

    // Not the build's fault: directly, it installs at once.
    let mut cmd = agent.command(&tls.api(), None);
    cmd.env("SSL_CERT_FILE", &tls.ca);
    let (code, log) = agent.run_command(&mut cmd);
    assert_eq!(code, 0, "directly:\n{log}");
    assert_eq!(agent.target(), build(1), "installed directly:\n{log}");
}

/// IPv6: bin-manager on [::1], `--api http://[::1]:PORT/api/v1`:
/// registration, the check, the download and the report all work — and
/// through a proxy listening on ::1 too.
#[test]
fn ipv6_manager_api_and_proxy_on_the_loopback() {
    let have = TcpListener::bind("[::1]:0").is_ok();
    if !can_run(have, "this machine has no IPv6 loopback ([::1])") {
        return;
    }
    let m = Manager::start_listening("[::1]:0", &["--token", TOKEN]);
    assert!(m.api().starts_with("http://[::1]:"), "{}", m.api());
    m.publish_mv("app", &build(1));
    let agent = Agent::with("six", Some(&build(0)), Setup::default());
    let (code, log) = agent.run(&m.api(), Some(TOKEN));
    assert_eq!(code, 0, "over IPv6:\n{log}");
    assert_eq!(agent.target(), build(1), "installed over IPv6:\n{log}");
    assert!(
        log.contains(&format!("from {}/download/app", m.api())),
        "{log}"
    );
    assert_eq!(reported(&m, "six"), (md5_hex(&build(1)), "current".into()));

    let Some(proxy) = Tinyproxy::start("::1", "") else {
        return;
    };
    m.publish_mv("app", &build(2));
    let mut cmd = agent.command(&m.api(), Some(TOKEN));
    cmd.env("http_proxy", proxy.url());
    let (code, log) = agent.run_command(&mut cmd);
    assert_eq!(code, 0, "through the proxy on ::1:\n{log}");
    assert_eq!(
        agent.target(),
        build(2),
        "installed through the proxy on ::1:\n{log}"
    );
    let url = format!("{}/download/app", m.api());
    assert_eq!(proxy.requests(&url).len(), 1, "{}", proxy.log());
    assert_eq!(reported(&m, "six"), (md5_hex(&build(2)), "current".into()));
}
