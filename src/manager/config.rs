//! bin-manager's settings: `/etc/bin-manager/config.json`
//! (`{"binDir","listen","stateFile","token","adminToken","maxUpload","workers",
//! "workersPerClient","requireNodeTokens","admission","maxNodes",
//! "registrationsPerMinute","maxRequestsPerSecond","maxRequestsPerClientPerSecond"}`),
//! overridden by environment
//! (`BIN_MANAGER_TOKEN`, `BIN_MANAGER_ADMIN_TOKEN`) and flags. Unknown keys
//! and values of the wrong type are errors, as in the agent's manifest.

use super::rollout::Policy;
use crate::cli::ManagerArgs;
use crate::error::{Error, Result};
use crate::fsutil;
use crate::json::{self, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where the config file is when `--config` is not given.
const DEFAULT_CONFIG: &str = "/etc/bin-manager/config.json";

/// Worker threads by default. Workers serve only the requests that may block
/// (registrations and reports, which are fsynced; downloads; uploads; the
/// fleet view; a build's first hashing); idle connections and heartbeats
/// stay on the event loops. Each costs a 256 KiB stack reservation and
/// ~20 KiB of memory; 16 requests per worker may wait before a 503.
const DEFAULT_WORKERS: usize = 256;
/// The most worker threads allowed.
const MAX_WORKERS: usize = 4096;

/// Nodes the registry holds by default (`maxNodes`).
const DEFAULT_MAX_NODES: usize = 100_000;
/// New nodes one client address may register per minute by default.
const DEFAULT_REGISTRATIONS_PER_MINUTE: u32 = 600;

/// Who may join the fleet (`admission`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Every node that registers is served (the default).
    Open,
    /// A new node is `pending` and served nothing until an admin accepts it.
    Manual,
}

/// The validated settings.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Published builds.
    pub bin_dir: PathBuf,
    /// `host:port` to listen on (port 0 picks one).
    pub listen: String,
    /// The registry snapshot (its log is `stateFile.log`).
    pub state_file: PathBuf,
    /// PostgreSQL instead of the state file (`database`), if set.
    pub database: Option<String>,
    /// Bearer token guarding /api/v1.
    pub token: Option<String>,
    /// Bearer token guarding publishing.
    pub admin_token: Option<String>,
    /// Largest upload in bytes.
    pub max_upload: u64,
    /// Worker threads.
    pub workers: usize,
    /// Requests one client address may have queued for or held by workers
    /// at once (default: max(4, workers / 8)).
    pub workers_per_client: usize,
    /// Refuse registrations, reports and failures for a known node that do
    /// not carry its node token.
    pub require_node_tokens: bool,
    /// Who may join.
    pub admission: Admission,
    /// Most nodes in the registry; a new one beyond it gets 503.
    pub max_nodes: usize,
    /// New nodes one client address may register per minute (0: no limit).
    pub registrations_per_minute: u32,
    /// Requests a second the server takes before answering 503 with
    /// Retry-After (0: no limit).
    pub max_requests_per_second: u32,
    /// Requests a second one client address may make before it is answered
    /// 429 with Retry-After (0: no limit).
    pub max_requests_per_client_per_second: u32,
    /// One stderr line per request.
    pub access_log: bool,
    /// Default rollout policy per binary (`"rollouts": {"NAME": {…}}`),
    /// applied to every publish of it, by `mv` or `PUT`.
    pub rollouts: HashMap<String, Policy>,
    /// Refuse to publish or serve a build without a valid signature.
    pub require_signatures: bool,
    /// The public keys publishes are checked against (`trustedKeys`).
    pub trusted_keys: Vec<crate::sign::TrustedKey>,
}

const KEYS: &[&str] = &[
    "binDir",
    "listen",
    "stateFile",
    "database",
    "token",
    "adminToken",
    "maxUpload",
    "workers",
    "workersPerClient",
    "requireNodeTokens",
    "admission",
    "maxNodes",
    "registrationsPerMinute",
    "maxRequestsPerSecond",
    "maxRequestsPerClientPerSecond",
    "rollouts",
    "requireSignatures",
    "trustedKeys",
];

impl Config {
    /// Defaults, then the config file (if given or present at the default
    /// path), then environment, then flags.
    pub fn resolve(args: &ManagerArgs, env: &dyn Fn(&str) -> Option<String>) -> Result<Config> {
        let mut c = Config {
            bin_dir: "/var/lib/bin-manager/bins".into(),
            listen: "127.0.0.1:8081".into(),
            state_file: "/var/lib/bin-manager/state.json".into(),
            database: None,
            token: None,
            admin_token: None,
            max_upload: 2 << 30,
            workers: DEFAULT_WORKERS,
            workers_per_client: 0, // derived from workers below unless set
            require_node_tokens: false,
            admission: Admission::Open,
            max_nodes: DEFAULT_MAX_NODES,
            registrations_per_minute: DEFAULT_REGISTRATIONS_PER_MINUTE,
            max_requests_per_second: 0,
            max_requests_per_client_per_second: 0,
            access_log: !args.quiet,
            rollouts: HashMap::new(),
            require_signatures: false,
            trusted_keys: Vec::new(),
        };
        let path = args
            .config
            .clone()
            .or_else(|| Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()));
        if let Some(path) = path {
            c.apply_file(&path)?;
            if c.require_signatures && c.trusted_keys.is_empty() {
                return Err(Error::Config {
                    path,
                    msg: "requireSignatures needs trustedKeys (the public key files builds are signed with)".into(),
                });
            }
        }
        c.token = env("BIN_MANAGER_TOKEN").or(c.token);
        c.admin_token = env("BIN_MANAGER_ADMIN_TOKEN").or(c.admin_token);
        if let Some(v) = &args.bin_dir {
            c.bin_dir = v.clone();
        }
        if let Some(v) = &args.listen {
            c.listen = v.clone();
        }
        if let Some(v) = &args.state_file {
            c.state_file = v.clone();
        }
        if let Some(v) = &args.database {
            c.database = Some(v.clone());
        }
        if let Some(v) = &args.token {
            c.token = Some(v.clone());
        }
        if let Some(v) = &args.admin_token {
            c.admin_token = Some(v.clone());
        }
        if let Some(v) = args.max_upload {
            c.max_upload = v;
        }
        if let Some(v) = args.workers {
            c.workers = v.clamp(1, MAX_WORKERS);
        }
        if c.workers_per_client == 0 {
            c.workers_per_client = (c.workers / 8).max(4);
        }
        c.token = c.token.filter(|t| !t.trim().is_empty());
        c.admin_token = c.admin_token.filter(|t| !t.trim().is_empty());
        Ok(c)
    }

    fn apply_file(&mut self, path: &Path) -> Result<()> {
        let bad = |msg: String| Error::Config {
            path: path.to_path_buf(),
            msg,
        };
        let text =
            std::fs::read_to_string(path).map_err(|e| Error::io("reading config", path, e))?;
        let doc = json::parse(&text).map_err(|e| bad(format!("invalid JSON at {e}")))?;
        let Value::Obj(entries) = &doc else {
            return Err(bad("must be a JSON object".into()));
        };
        for (key, value) in entries {
            if !KEYS.contains(&key.as_str()) {
                return Err(bad(format!(
                    "unknown key \"{key}\" (known keys: {})",
                    KEYS.join(", ")
                )));
            }
            let text = || {
                value.as_str().map(str::to_string).ok_or_else(|| {
                    bad(format!(
                        "key \"{key}\" must be a string, not {}",
                        value.kind()
                    ))
                })
            };
            let number = || {
                value
                    .as_u64()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| bad(format!("key \"{key}\" must be a positive whole number")))
            };
            let flag = || match value {
                Value::Bool(b) => Ok(*b),
                other => Err(bad(format!(
                    "key \"{key}\" must be true or false, not {}",
                    other.kind()
                ))),
            };
            let limit = || {
                value
                    .as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| {
                        bad(format!(
                            "key \"{key}\" must be a whole number (0: no limit)"
                        ))
                    })
            };
            let count = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
            match key.as_str() {
                "binDir" => self.bin_dir = text()?.into(),
                "listen" => self.listen = text()?,
                "stateFile" => self.state_file = text()?.into(),
                "database" => self.database = Some(text()?),
                "token" => self.token = Some(text()?),
                "adminToken" => self.admin_token = Some(text()?),
                "maxUpload" => self.max_upload = number()?,
                "workers" => self.workers = count(number()?).min(MAX_WORKERS),
                "workersPerClient" => self.workers_per_client = count(number()?),
                "maxNodes" => self.max_nodes = count(number()?),
                "maxRequestsPerClientPerSecond" => {
                    self.max_requests_per_client_per_second = limit()?
                }
                "maxRequestsPerSecond" => self.max_requests_per_second = limit()?,
                "registrationsPerMinute" => self.registrations_per_minute = limit()?,
                "requireSignatures" => self.require_signatures = flag()?,
                "trustedKeys" => {
                    let Value::Arr(items) = value else {
                        return Err(bad(format!(
                            "key \"{key}\" must be a list of public key files"
                        )));
                    };
                    for item in items {
                        let file = item.as_str().ok_or_else(|| {
                            bad(format!("key \"{key}\" must be a list of public key files"))
                        })?;
                        let file = fsutil::parent(path).join(file);
                        self.trusted_keys
                            .push(crate::sign::TrustedKey::load(&file)?);
                    }
                }
                "requireNodeTokens" => self.require_node_tokens = flag()?,
                "rollouts" => {
                    let Value::Obj(policies) = value else {
                        return Err(bad(format!(
                            "key \"rollouts\" must be an object of binary names, not {}",
                            value.kind()
                        )));
                    };
                    for (name, policy) in policies {
                        if !super::store::valid_name(name) {
                            return Err(bad(format!("rollouts: \"{name}\" is not a binary name")));
                        }
                        let policy = Policy::from_json(policy)
                            .map_err(|msg| bad(format!("rollouts.{name}: {msg}")))?;
                        self.rollouts.insert(name.clone(), policy);
                    }
                }
                _ => {
                    self.admission = match text()?.as_str() {
                        "open" => Admission::Open,
                        "manual" => Admission::Manual,
                        other => {
                            return Err(bad(format!(
                                "key \"admission\" must be \"open\" or \"manual\", not \"{other}\""
                            )))
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_env_and_flags_layer() {
        let dir = std::env::temp_dir().join(format!("bin-manager-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.json");
        std::fs::write(
            &file,
            r#"{"binDir":"/srv/bins","listen":"0.0.0.0:9000","token":"file","workers":4}"#,
        )
        .unwrap();
        let args = ManagerArgs {
            config: Some(file.clone()),
            listen: Some("127.0.0.1:0".into()),
            ..ManagerArgs::default()
        };
        let env = |k: &str| (k == "BIN_MANAGER_ADMIN_TOKEN").then(|| "adm".to_string());
        let c = Config::resolve(&args, &env).unwrap();
        assert_eq!(c.bin_dir, PathBuf::from("/srv/bins"));
        assert_eq!(c.listen, "127.0.0.1:0");
        assert_eq!(
            (c.token.as_deref(), c.admin_token.as_deref(), c.workers),
            (Some("file"), Some("adm"), 4)
        );

        std::fs::write(
            &file,
            r#"{"maxRequestsPerSecond":50,"maxRequestsPerClientPerSecond":0,"registrationsPerMinute":7}"#,
        )
        .unwrap();
        let c = Config::resolve(&args, &|_| None).unwrap();
        assert_eq!(
            (
                c.max_requests_per_second,
                c.max_requests_per_client_per_second,
                c.registrations_per_minute
            ),
            (50, 0, 7)
        );
        for key in [
            "maxRequestsPerSecond",
            "maxRequestsPerClientPerSecond",
            "registrationsPerMinute",
        ] {
            for bad in ["-1", "\"5\"", "4294967296"] {
                std::fs::write(&file, format!("{{\"{key}\":{bad}}}")).unwrap();
                let e = Config::resolve(&args, &|_| None).unwrap_err();
                let want = format!("key \"{key}\" must be a whole number (0: no limit)");
                assert!(e.to_string().contains(&want), "{key}={bad}: {e}");
            }
        }

        std::fs::write(&file, r#"{"bindir":"/x"}"#).unwrap();
        let e = Config::resolve(&args, &|_| None).unwrap_err();
        assert!(e.to_string().contains("unknown key \"bindir\""), "{e}");
        assert_eq!(e.exit_code(), 2);

        std::fs::write(
            &file,
            r#"{"requireNodeTokens":true,"admission":"manual","maxNodes":5,"registrationsPerMinute":0,"workers":64,"maxRequestsPerClientPerSecond":20}"#,
        )
        .unwrap();
        let c = Config::resolve(&args, &|_| None).unwrap();
        assert_eq!(c.max_requests_per_client_per_second, 20);
        assert_eq!(
            (
                c.require_node_tokens,
                c.admission,
                c.max_nodes,
                c.registrations_per_minute,
                c.workers_per_client
            ),
            (true, Admission::Manual, 5, 0, 8)
        );
        for (text, msg) in [
            (
                r#"{"admission":"closed"}"#,
                "key \"admission\" must be \"open\" or \"manual\", not \"closed\"",
            ),
            (
                r#"{"requireNodeTokens":"yes"}"#,
                "key \"requireNodeTokens\" must be true or false, not a string",
            ),
            (
                r#"{"maxNodes":0}"#,
                "key \"maxNodes\" must be a positive whole number",
            ),
            (
                r#"{"registrationsPerMinute":-1}"#,
                "key \"registrationsPerMinute\" must be a whole number (0: no limit)",
            ),
            (
                r#"{"maxRequestsPerClientPerSecond":1.5}"#,
                "key \"maxRequestsPerClientPerSecond\" must be a whole number (0: no limit)",
            ),
        ] {
            std::fs::write(&file, text).unwrap();
            let e = Config::resolve(&args, &|_| None).unwrap_err();
            assert!(e.to_string().ends_with(msg), "{text}: {e}");
            assert_eq!(e.exit_code(), 2);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
