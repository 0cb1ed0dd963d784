//! The admin side of the command line: `bin-manager node reset NAME`,
//! `node accept NAME` and `rollout status|pause|resume|promote|abort NAME`
//! ask a running server over its API, with the admin bearer token. The token comes from `$BIN_MANAGER_ADMIN_TOKEN` or
//! `--admin-token-file FILE`, never from the command line (every user of the
//! host can read another's arguments). The client is plain HTTP/1.1 on std
//! sockets (bin-manager itself speaks no TLS; reach a remote one through an
//! SSH tunnel), one request per connection, every wait bounded.

use crate::cli::{Env, ManagerArgs, ManagerCommand, RolloutAction, DEFAULT_SERVER};
use crate::error::{Error, Result};
use crate::json::Value;
use crate::protocol;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Deadline for connecting, and for each read or write.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read.
const MAX_ANSWER: u64 = 1 << 20;

/// A client for a running bin-manager's admin requests.
struct AdminClient {
    /// `host:port`.
    authority: String,
    /// `http://host:port/api/v1`, for messages.
    api: String,
    token: Option<String>,
}

impl AdminClient {
    /// A client for `server` (`http://host:port`, with or without
    /// `/api/v1`), sending `token`.
    pub fn new(server: &str, token: Option<String>) -> Result<AdminClient> {
        let bad = |why: &str| Error::Usage(format!("--server \"{server}\": {why}"));
        let rest = match server.strip_prefix("http://") {
            Some(rest) => rest,
            None if server.starts_with("https://") => {
                return Err(bad(
                    "bin-manager speaks plain HTTP; reach a remote one through an SSH tunnel",
                ))
            }
            None => return Err(bad("must start with http://")),
        };
        let authority = rest
            .trim_end_matches('/')
            .trim_end_matches("/api/v1")
            .trim_end_matches('/');
        if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
            return Err(bad("expected http://HOST:PORT"));
        }
        Ok(AdminClient {
            authority: authority.to_string(),
            api: format!("http://{authority}/api/v1"),
            token,
        })
    }

    /// `POST /api/v1/PATH` with no body; the answer's `data`.
    pub fn post(&self, path: &str) -> Result<Value> {
        self.request("POST", path)
    }

    /// `GET /api/v1/PATH`; the answer's `data`.
    pub fn get(&self, path: &str) -> Result<Value> {
        self.request("GET", path)
    }

    fn request(&self, method: &str, path: &str) -> Result<Value> {
        let url = format!("{}/{path}", self.api);
        let http = |msg: String| Error::Http {
            url: url.clone(),
            msg,
        };
        let addr = self
            .authority
            .to_socket_addrs()
            .map_err(|e| http(format!("cannot resolve {}: {e}", self.authority)))?
            .next()
            .ok_or_else(|| http(format!("{} has no address", self.authority)))?;
        let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| {
            http(match e.kind() {
                std::io::ErrorKind::ConnectionRefused => {
                    "connection refused (is bin-manager running there?)".to_string()
                }
                _ => e.to_string(),
            })
        })?;
        let io = |e: std::io::Error| http(e.to_string());
        s.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
        s.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
        let auth = self
            .token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        write!(
            s,
            "{method} /api/v1/{path} HTTP/1.1\r\nHost: {}\r\n{auth}User-Agent: bin-manager/{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.authority,
            env!("CARGO_PKG_VERSION")
        )
        .map_err(io)?;
        let mut raw = Vec::new();
        s.take(MAX_ANSWER).read_to_end(&mut raw).map_err(io)?;
        let (status, reason, body) = split_answer(&raw).ok_or_else(|| Error::Protocol {
            url: url.clone(),
            msg: "not an HTTP answer".into(),
        })?;
        protocol::unwrap_answer(&url, status, &reason, body)
    }
}

/// (status, reason, body) of a whole `Connection: close` answer.
fn split_answer(raw: &[u8]) -> Option<(i32, String, &[u8])> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let line = head.lines().next()?;
    let mut words = line.splitn(3, ' ');
    let version = words.next()?;
    let status = words.next()?.parse().ok()?;
    let reason = words.next().unwrap_or("").to_string();
    version
        .starts_with("HTTP/1.")
        .then_some((status, reason, &raw[end + 4..]))
}

/// Runs an admin subcommand; returns what to print on success.
pub fn run(args: &ManagerArgs, env: Env) -> Result<String> {
    let server = args.server.as_deref().unwrap_or(DEFAULT_SERVER);
    let (name, action) = match &args.command {
        ManagerCommand::NodeReset(name) => (name, "reset"),
        ManagerCommand::NodeAccept(name) => (name, "accept"),
        ManagerCommand::Rollout(action, name) => {
            check_name(name, "binary")?;
            if let Some(a) = args.arch.as_deref() {
                check_name(a, "arch")?;
            }
            // Reading needs a token only where the server guards reads.
            let token = match action {
                RolloutAction::Status => admin_token(args, env).ok(),
                _ => Some(admin_token(args, env)?),
            };
            let client = AdminClient::new(server, token)?;
            let query = args
                .arch
                .as_ref()
                .map(|a| format!("?arch={a}"))
                .unwrap_or_default();
            let r = match action {
                RolloutAction::Status => client.get(&format!("rollouts/{name}{query}"))?,
                a => client.post(&format!("rollouts/{name}/{}{query}", a.word()))?,
            };
            return Ok(describe_rollout(&r));
        }
        ManagerCommand::Serve
        | ManagerCommand::Keygen
        | ManagerCommand::Sign(_)
        | ManagerCommand::Trust(_)
        | ManagerCommand::Revoke(_) => return Err(Error::Usage("not an admin subcommand".into())),
    };
    check_name(name, "node")?;
    let token = admin_token(args, env)?;
    AdminClient::new(server, Some(token))?.post(&format!("nodes/{name}/{action}"))?;
    Ok(match action {
        "reset" => {
            format!("node \"{name}\": token forgotten; its next registration gets a new one")
        }
        _ => format!("node \"{name}\": accepted; it is served from now on"),
    })
}

fn check_name(name: &str, what: &str) -> Result<()> {
    if super::store::valid_name(name) {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "invalid {what} name \"{name}\": use letters, digits, '.', '_' and '-'"
    )))
}

/// A rollout as the API answers it, for a person at a shell:
/// `app: paused at 10% (steps 1,10,50,100; soak 600 s; maxFailures 2)`, the
/// builds, the counts and the reason.
fn describe_rollout(r: &Value) -> String {
    let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
    let n = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
    let short = |k: &str| {
        let h = r
            .get(k)
            .and_then(|b| b.get("hash"))
            .and_then(Value::as_str)
            .unwrap_or("");
        crate::log::short(h)
    };
    let steps: Vec<String> = match r.get("steps") {
        Some(Value::Arr(items)) => items.iter().map(Value::to_compact).collect(),
        _ => Vec::new(),
    };
    let phase = if r.get("canaryPhase") == Some(&Value::Bool(true)) {
        "canaries first".to_string()
    } else {
        format!("{}%", n(r.get("percent")))
    };
    let count = |k: &str| n(r.get("nodes").and_then(|c| c.get(k)));
    format!(
        "{}: {} at {phase} (steps {}; soak {} s; maxFailures {})\n  {} → {}\n  nodes: {} eligible, {} on the new build, {} succeeded, {} failed, {} pending\n  {}",
        s("binary"),
        s("state"),
        steps.join(","),
        n(r.get("soakSeconds")),
        s("maxFailures"),
        short("from"),
        short("to"),
        count("eligible"),
        count("onNew"),
        count("succeeded"),
        count("failed"),
        count("pending"),
        s("reason")
    )
}

/// The admin token: `$BIN_MANAGER_ADMIN_TOKEN`, else `--admin-token-file`.
fn admin_token(args: &ManagerArgs, env: Env) -> Result<String> {
    if let Some(file) = &args.admin_token_file {
        let text = std::fs::read_to_string(file)
            .map_err(|e| Error::io("reading the admin token file", file, e))?;
        return Some(text.trim().to_string())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::Usage(format!("\"{}\" is empty", file.display())));
    }
    env("BIN_MANAGER_ADMIN_TOKEN").ok_or_else(|| {
        Error::Usage(
            "no admin token: set BIN_MANAGER_ADMIN_TOKEN or use --admin-token-file FILE".into(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_and_answers() {
        let c = AdminClient::new("http://m:8081/api/v1/", Some("t".into())).unwrap();
        assert_eq!(
            (c.authority.as_str(), c.api.as_str()),
            ("m:8081", "http://m:8081/api/v1")
        );
        for bad in ["https://m", "m:8081", "http://", "http://m/x"] {
            let e = AdminClient::new(bad, Some("t".into())).err().unwrap();
            assert_eq!(e.exit_code(), 2, "{bad}: {e}");
        }
        let (status, reason, body) =
            split_answer(b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!(
            (status, reason.as_str(), body),
            (404, "Not Found", &b"{}"[..])
        );
        assert!(split_answer(b"garbage").is_none());
    }
}
