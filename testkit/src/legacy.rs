//! The original project's later agents (qnHackathon `scripts/binproxy.py`
//! and `scripts/bin-proxy.sh`, 1.2.0) as the tests use them, two ways:
//!
//! * their requests byte for byte, in Rust ([`python`], [`curl`]): the
//!   headers python-requests and curl send, and Python's `json.dumps` bodies
//!   (`", "` and `": "`), each on a new connection; and their reading of the
//!   answers ([`python_sha256`], [`shell_sha256`], [`curl_f`]);
//! * a host running our stand-ins of the two agents
//!   (`tests/fixtures/legacy/agent.py`, `agent.sh`: written from a
//!   description of what the originals send, not from their code) with the
//!   real python-requests, curl, jq and sha256sum ([`LegacyHost`]).
//!
//! Layout of a [`LegacyHost`]'s directory:
//! ```text
//! DIR/manifest.json    bin-manifests.json in the agent's own format
//! DIR/bin/             BIN_DIR (the managed files, .archive/)
//! DIR/locks/           LOCK_DIR
//! DIR/tmp/             TMPDIR (downloads)
//! DIR/bin-sv/          a fake supervisorctl on PATH (see super::fake_supervisorctl)
//! ```

use super::host::Ran;
use super::json::{parse, Json};
use super::manager::{read_answer, Manager};
use super::{fake_supervisorctl, path_with, wait_until, HttpResponse, TempDir};
use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// python-requests' User-Agent, as Debian 12's python3-requests sends it.
pub const PYTHON_UA: &str = "python-requests/2.28.1";
/// curl's, as Debian 12's curl sends it.
pub const CURL_UA: &str = "curl/7.88.1";
/// Longest an agent run may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// One request as `requests.get/post(…, json=BODY)` sends it: its default
/// headers in its order, then `Content-Type` and `Content-Length` for a body.
pub fn python(m: &Manager, method: &str, target: &str, json: Option<&str>) -> HttpResponse {
    let headers = format!(
        "User-Agent: {PYTHON_UA}\r\nAccept-Encoding: gzip, deflate\r\nAccept: */*\r\nConnection: keep-alive\r\n"
    );
    send(m, method, target, &headers, json)
}

/// One request as `curl -s [-f] [-X POST -H "Content-Type: application/json" -d BODY] URL` sends it.
pub fn curl(m: &Manager, method: &str, target: &str, body: Option<&str>) -> HttpResponse {
    let headers = format!("User-Agent: {CURL_UA}\r\nAccept: */*\r\n");
    send(m, method, target, &headers, body)
}

/// Sends `METHOD TARGET`, `Host`, the client's `headers`, and for a body
/// its `Content-Type` and `Content-Length`, on a new connection; reads one answer.
fn send(
    m: &Manager,
    method: &str,
    target: &str,
    headers: &str,
    body: Option<&str>,
) -> HttpResponse {
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: {}\r\n{headers}",
        m.addr()
    );
    if let Some(body) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    let mut raw = head.into_bytes();
    raw.extend_from_slice(body.unwrap_or("").as_bytes());
    let mut s = TcpStream::connect(m.addr()).expect("connect to bin-manager");
    s.write_all(&raw).expect("send the request");
    read_answer(&mut s, &mut Vec::new())
}

/// What `curl -s -f` makes of an answer: success (exit 0) below 400; 3xx
/// are not followed (no `-L`): their body would be taken as the answer.
pub fn curl_f(r: &HttpResponse) -> bool {
    r.status < 400
}

/// The hash the Python agent reads from a `bins/NAME` answer: exactly 200,
/// a JSON object, then top-level `sha256sum`, else top-level `sha256`
/// (never `data`); `None` means "failed to get latest SHA256".
pub fn python_sha256(r: &HttpResponse) -> Option<String> {
    if r.status != 200 {
        return None;
    }
    let doc = super::json::try_parse(&r.body_str()).ok()?;
    let Json::Obj(_) = doc else { return None };
    ["sha256sum", "sha256"]
        .iter()
        .find_map(|k| doc.opt(k).cloned())
        .and_then(|v| match v {
            Json::Str(s) if !s.is_empty() => Some(s),
            _ => None,
        })
}

/// The hash the shell agent reads: `curl -s -f` must succeed, then
/// `jq -e '.sha256'` (top level; null or false fail it) and `jq -r '.sha256'`;
/// an empty result fails the binary. `Err` says which step failed.
pub fn shell_sha256(r: &HttpResponse) -> Result<String, &'static str> {
    if !curl_f(r) {
        return Err("curl -f failed");
    }
    let doc = super::json::try_parse(&r.body_str()).map_err(|_| "jq: not JSON")?;
    match doc.opt("sha256") {
        None | Some(Json::Null) | Some(Json::Bool(false)) => Err("jq -e '.sha256' failed"),
        Some(Json::Str(s)) if s.is_empty() => Err("empty sha256"),
        Some(Json::Str(s)) => Ok(s.clone()),
        Some(other) => Ok(format!("{other:?}")),
    }
}

/// Which of the two agents a host runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Dialect {
    /// `binproxy.py` (python-requests).
    Python,
    /// `bin-proxy.sh` (curl, jq).
    Shell,
}

/// A host running one of the stand-in agents.
pub struct LegacyHost {
    /// Everything lives here (see the module docs).
    pub dir: TempDir,
    /// Its host name (`LEGACY_HOSTNAME`).
    pub node: String,
    dialect: Dialect,
    sv: PathBuf,
}

impl LegacyHost {
    /// A host named `node` managing `bins` (nothing installed yet), with
    /// the manifest in `dialect`'s format and a fake supervisorctl on PATH.
    pub fn new(dialect: Dialect, node: &str, bins: &[&str]) -> LegacyHost {
        require_tools(dialect);
        let dir = TempDir::new();
        for d in ["bin", "locks", "tmp"] {
            fs::create_dir_all(dir.join(d)).expect("create host dirs");
        }
        let entries: Vec<String> = bins
            .iter()
            .map(|b| match dialect {
                Dialect::Python => format!(
                    "{{\"serviceName\": \"{b}\", \"binaryName\": \"{b}\", \"version\": \"\", \"previousVersion\": \"\", \"port\": 8080}}"
                ),
                Dialect::Shell => format!("{{\"name\": \"{b}\", \"currentSha256\": \"\"}}"),
            })
            .collect();
        let manifest = format!(
            "{{\"binaries\": [{}], \"nodeInfo\": {{\"cpuArch\": \"\", \"osRelease\": \"\", \"nodeName\": \"\", \"binProxyVersion\": \"\"}}}}\n",
            entries.join(", ")
        );
        fs::write(dir.join("manifest.json"), manifest).expect("write manifest");
        let sv = fake_supervisorctl(&dir.join("sv"));
        LegacyHost {
            dir,
            node: node.to_string(),
            dialect,
            sv,
        }
    }

    /// One run of the agent against `m` (bounded).
    pub fn run(&self, m: &Manager) -> Ran {
        let fixtures = super::root().join("tests/fixtures/legacy");
        let mut cmd = match self.dialect {
            Dialect::Python => {
                let mut c = Command::new("/usr/bin/python3");
                c.arg(fixtures.join("agent.py"));
                c
            }
            Dialect::Shell => {
                let mut c = Command::new("bash");
                c.arg(fixtures.join("agent.sh"));
                c
            }
        };
        cmd.env_clear()
            .env("PATH", path_with(&self.sv))
            .env("BIN_MANAGER_API", m.api())
            .env("BIN_MANIFESTS", self.dir.join("manifest.json"))
            .env("BIN_DIR", self.dir.join("bin"))
            .env("LOCK_DIR", self.dir.join("locks"))
            .env("TMPDIR", self.dir.join("tmp"))
            .env("LEGACY_HOSTNAME", &self.node);
        Ran::bounded(
            &mut cmd,
            RUN_TIMEOUT,
            &format!("the {:?} agent", self.dialect),
        )
    }

    /// Makes the fake supervisorctl report the program FATAL after a restart.
    pub fn fail_restarts(&self, fail: bool) {
        let flag = self.dir.join("sv/supervisorctl.fail");
        if fail {
            fs::write(flag, "status").expect("write supervisorctl.fail");
        } else {
            let _ = fs::remove_file(flag);
        }
    }

    /// `BIN_DIR/NAME`'s bytes, if any.
    pub fn installed(&self, name: &str) -> Option<Vec<u8>> {
        fs::read(self.dir.join("bin").join(name)).ok()
    }

    /// The hash the manifest records for `name` (`version` for the Python
    /// agent, `currentSha256` for the shell one).
    pub fn recorded(&self, name: &str) -> String {
        let text = fs::read_to_string(self.dir.join("manifest.json")).expect("read manifest");
        let (key, field) = match self.dialect {
            Dialect::Python => ("binaryName", "version"),
            Dialect::Shell => ("name", "currentSha256"),
        };
        let doc = parse(&text);
        let entry = doc
            .get("binaries")
            .arr()
            .iter()
            .find(|b| b.get(key).s() == name)
            .unwrap_or_else(|| panic!("{name} is not in the manifest: {text}"))
            .clone();
        entry.get(field).s().to_string()
    }

    /// Files left in the download directory.
    pub fn leftovers(&self) -> Vec<String> {
        super::manager::tree(&self.dir.join("tmp"))
    }
}

/// The agents' API requests in the access log from line `from` on, as
/// `METHOD TARGET STATUS`, once there are `n` of them (bounded wait: a line
/// is logged after its answer was sent). The fleet view's requests are left
/// out: the agents never make them, and a test's own may be logged late.
pub fn api_requests(m: &Manager, from: usize, n: usize) -> Vec<String> {
    let collect = || -> Vec<String> {
        m.log_lines()
            .iter()
            .skip(from)
            .filter_map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let i = words.iter().position(|w| w.starts_with("/api/v1/"))?;
                if words[i].starts_with("/api/v1/nodes") {
                    return None;
                }
                Some(format!(
                    "{} {} {}",
                    words[i - 1],
                    words[i],
                    words.get(i + 1)?
                ))
            })
            .collect()
    };
    wait_until(Duration::from_secs(10), || collect().len() >= n);
    collect()
}

/// Panics, naming the Debian package, unless the tools `dialect`'s agent
/// needs are installed (scripts/setup.sh installs them).
pub fn require_tools(dialect: Dialect) {
    let ok = |cmd: &mut Command| cmd.output().is_ok_and(|o| o.status.success());
    let needs: &[(&str, &[&str], &str)] = match dialect {
        Dialect::Python => &[(
            "/usr/bin/python3",
            &["-c", "import requests"],
            "python3-requests",
        )],
        Dialect::Shell => &[
            ("bash", &["--version"], "bash"),
            ("curl", &["--version"], "curl"),
            ("jq", &["--version"], "jq"),
            ("sha256sum", &["--version"], "coreutils"),
        ],
    };
    for (tool, args, package) in needs {
        assert!(
            ok(Command::new(tool).args(*args)),
            "prerequisite missing: `{tool} {}` failed; install the Debian package `{package}` \
             (scripts/setup.sh does)",
            args.join(" ")
        );
    }
}
