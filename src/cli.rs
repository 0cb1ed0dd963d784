//! Both command lines (the only lexopt user): the agent's `Args`, the
//! server's `ManagerArgs`, and their hand-written `--help` texts. Parsing is
//! pure, so every form is a test.

use crate::error::{Error, Result};
use lexopt::prelude::*;
use std::ffi::OsString;
use std::path::PathBuf;

/// Environment lookups, injectable for tests.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, with empty values treated as unset.
pub fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

/// What to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// One upgrade cycle (what cron calls).
    Run,
    /// Dry run: what would change.
    Check,
    /// A table of every managed binary.
    Status,
    /// Write a starter manifest.
    Init,
    /// Put `PATH.bak` back for this binary.
    Rollback(String),
    /// Stop holding back this binary's published build.
    Retry(String),
    /// `self-test --manifest M --state S`: what a new agent must pass
    /// before it replaces the running one.
    SelfTest(PathBuf, PathBuf),
    /// Print help.
    Help,
    /// Print the version.
    Version,
}

/// Parsed arguments; `None` means "not given" so that env and manifest can fill in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Args {
    /// The subcommand.
    pub command: Command,
    /// `--config PATH`
    pub config: Option<PathBuf>,
    /// `--api URL`
    pub api: Option<String>,
    /// `--download-url URL`
    pub download_url: Option<String>,
    /// `--timeout SECS` for API requests.
    pub timeout: u64,
    /// `--download-timeout SECS` for a whole download.
    pub download_timeout: u64,
    /// `--max-size BYTES`
    pub max_size: u64,
    /// `--splay SECS`
    pub splay: u64,
    /// `--every SECS`
    pub every: Option<u64>,
    /// `--only NAME` (repeatable)
    pub only: Vec<String>,
    /// `--quiet`
    pub quiet: bool,
    /// `--verbose`
    pub verbose: bool,
    /// `--log-format text|json` (else `BIN_PROXY_LOG_FORMAT`).
    pub log_format: Option<crate::log::Format>,
    /// `--metrics-file PATH` (else `BIN_PROXY_METRICS_FILE`, else the manifest's `metricsFile`).
    pub metrics_file: Option<PathBuf>,
    /// `--trusted-key FILE` (repeatable; added to the manifest's `manager.trustedKeys`).
    pub trusted_keys: Vec<PathBuf>,
    /// `--no-proxy`: ignore `http_proxy`, `https_proxy` and `no_proxy`.
    pub no_proxy: bool,
    /// `--now`: ask the server even while the back-off it asked for lasts.
    pub now: bool,
}

impl Default for Args {
    fn default() -> Args {
        Args {
            command: Command::Run,
            config: None,
            api: None,
            download_url: None,
            timeout: 30,
            download_timeout: 1800,
            max_size: 2 << 30,
            splay: 0,
            every: None,
            only: Vec::new(),
            quiet: false,
            verbose: false,
            log_format: None,
            metrics_file: None,
            trusted_keys: Vec::new(),
            no_proxy: false,
            now: false,
        }
    }
}

/// `text` or `json`, for `--log-format` and `BIN_PROXY_LOG_FORMAT` (`from` names which).
pub fn log_format(value: &str, from: &str) -> Result<crate::log::Format> {
    match value.trim() {
        "text" => Ok(crate::log::Format::Text),
        "json" => Ok(crate::log::Format::Json),
        other => Err(Error::Usage(format!(
            "{from} takes text or json, not \"{other}\""
        ))),
    }
}

/// The `--help` text.
pub const HELP: &str = concat!(
    "bin-proxy ",
    env!("CARGO_PKG_VERSION"),
    "
Keeps this host's binaries on the builds published by bin-manager. Each run
checks in with the server, compares the md5 of every binary in the manifest
with the published one, downloads what changed, verifies it, swaps it in
atomically (keeping PATH.bak), restarts its service through supervisorctl,
confirms it runs, rolls back when it does not, and reports the result.

USAGE:
    bin-proxy [OPTIONS]                 one run (put this in cron)
    bin-proxy check [OPTIONS]           show what a run would change; change nothing
    bin-proxy status [OPTIONS]          table of recorded, actual and published hashes
    bin-proxy rollback NAME [OPTIONS]   put NAME's PATH.bak back, restart, record it
    bin-proxy retry NAME [OPTIONS]      stop holding back NAME's published build
    bin-proxy self-test --manifest M --state S
                                        what a new agent must pass before it replaces
                                        the running one (parse M and S, print the version)
    bin-proxy init [OPTIONS]            write a starter manifest (never overwrites)

OPTIONS:
    -c, --config PATH        The manifest. Default: $BIN_PROXY_CONFIG, else
                             /etc/bin-proxy/bin-manifests.json.
        --api URL            bin-manager's API base. Default: $BIN_MANAGER_API, else
                             the manifest's manager.api, else http://127.0.0.1:8081/api/v1.
        --download-url URL   Base URL binaries are downloaded from. Default:
                             $BIN_DOWNLOAD_URL, else manager.downloadUrl, else API/download.
        --trusted-key FILE   A release public key (bin-manager keygen); repeatable,
                             added to manager.trustedKeys. When any is set, only
                             builds signed by a trusted key are installed.
        --timeout SECS       Deadline for each API request. Default: 30.
        --download-timeout SECS
                             Deadline for each whole download attempt. Network
                             failures, 5xx answers and truncated bodies are
                             tried 3 times (waits drawn from 0..1 s, then 0..2 s;
                             a 429/503 Retry-After of up to 10 s is waited out).
                             Default: 1800.
        --max-size SIZE      Refuse downloads larger than this (suffixes K, M, G).
                             Default: 2G.
        --splay SECS         Sleep a per-node fixed 0..SECS seconds before starting, so
                             a fleet's cron minute does not hit the server at one instant.
        --every SECS         Do not exit: run again every SECS seconds (for containers;
                             SIGTERM or SIGINT ends the loop after the current step,
                             exit 0).
        --only NAME          Handle only this binary (repeat for more).
        --metrics-file PATH  After each run, write Prometheus metrics there
                             (node_exporter's textfile format, replaced atomically).
                             Default: $BIN_PROXY_METRICS_FILE, else the manifest's
                             metricsFile, else none.
        --log-format FORMAT  text (default) or json: one object per line with ts,
                             level, binary, event, from, to, msg. Default:
                             $BIN_PROXY_LOG_FORMAT, else text.
        --no-proxy           Connect directly, ignoring http_proxy, https_proxy and
                             no_proxy.
        --now                Ask the server even while the back-off it asked for
                             lasts (see BACK-OFF below).
    -q, --quiet              Print only warnings and errors.
    -v, --verbose            Print every request and decision.
    -h, --help               Print this help.
    -V, --version            Print the version.

ENVIRONMENT:
    BIN_MANAGER_TOKEN        Bearer token for the server (else manager.tokenFile). Never printed.
    BIN_PROXY_SUPERVISORCTL  The supervisorctl command, e.g. \"supervisorctl -c /etc/s.conf\".
    http_proxy, https_proxy  http://[user:pass@]host:port of the proxy for http:// and
                             https:// URLs (a CONNECT tunnel); upper case also read.
    no_proxy                 Hosts reached directly: host, .domain, host:port, *.

A build that failed here (it did not come up, or its postUpgrade check
failed) is rolled back and held back: later runs leave it alone until the
server publishes another build, or `bin-proxy retry NAME`.

BACK-OFF: when the server answers 429 or 503 the run stops asking (exit 1)
and keeps \"not before\" in the state file: its Retry-After (seconds or a
date; none: 60 s) plus up to half as much jitter (none: up to 4 min), never
more than a day. Runs before then ask nothing and exit 0 with one info line
(none with --quiet), so cron does not mail every minute; `status` and
`check` show it; `--now` ignores it.

EXIT STATUS:
    0  nothing failed (also: another run holds the lock; a failed build is
       held back; the server's back-off lasts)
    1  a binary failed, supervisord could not restart a service (nothing
       swapped, nothing held back), the server could not be reached or
       asked to back off (429/503), or it refused this node's token
    2  bad command line or invalid manifest; nothing was changed

Logs go to stderr, one line per event, UTC timestamps. Manifest format, install
and the server: see README.md.
"
);

/// Parses the arguments after the program name.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Args> {
    let mut out = Args::default();
    let mut command: Option<Command> = None;
    let mut parser = lexopt::Parser::from_args(args);
    while let Some(arg) = parser.next().map_err(usage)? {
        match arg {
            Short('h') | Long("help") => {
                return Ok(Args {
                    command: Command::Help,
                    ..out
                })
            }
            Short('V') | Long("version") => {
                return Ok(Args {
                    command: Command::Version,
                    ..out
                })
            }
            Short('c') | Long("config") => out.config = Some(parser.value().map_err(usage)?.into()),
            Long("api") => out.api = Some(string(&mut parser, "--api")?),
            Long("download-url") => out.download_url = Some(string(&mut parser, "--download-url")?),
            Long("trusted-key") => out.trusted_keys.push(parser.value().map_err(usage)?.into()),
            Long("timeout") => out.timeout = seconds(&mut parser, "--timeout")?.max(1),
            Long("download-timeout") => {
                out.download_timeout = seconds(&mut parser, "--download-timeout")?.max(1)
            }
            Long("max-size") => {
                out.max_size = size(&string(&mut parser, "--max-size")?, "--max-size")?
            }
            Long("splay") => out.splay = seconds(&mut parser, "--splay")?,
            Long("every") => out.every = Some(seconds(&mut parser, "--every")?.max(1)),
            Long("only") => out.only.push(string(&mut parser, "--only")?),
            Long("log-format") => {
                out.log_format = Some(log_format(
                    &string(&mut parser, "--log-format")?,
                    "--log-format",
                )?)
            }
            Long("metrics-file") => out.metrics_file = Some(parser.value().map_err(usage)?.into()),
            Long("no-proxy") => out.no_proxy = true,
            Long("now") => out.now = true,
            Short('q') | Long("quiet") => out.quiet = true,
            Short('v') | Long("verbose") => out.verbose = true,
            Value(word) if command.is_none() => {
                let word = word
                    .into_string()
                    .map_err(|w| Error::Usage(format!("unknown command {w:?}")))?;
                command = Some(match word.as_str() {
                    "run" => Command::Run,
                    "check" => Command::Check,
                    "status" => Command::Status,
                    "init" => Command::Init,
                    "self-test" => {
                        let mut path = |flag: &str| {
                            let named = matches!(parser.next().map_err(usage)?, Some(Long(f)) if f == &flag[2..]);
                            match (named, parser.value()) {
                                (true, Ok(v)) => Ok(PathBuf::from(v)),
                                _ => Err(Error::Usage(
                                    "self-test needs --manifest M --state S".into(),
                                )),
                            }
                        };
                        let manifest = path("--manifest")?;
                        let state = path("--state")?;
                        Command::SelfTest(manifest, state)
                    }
                    "rollback" | "retry" => {
                        let name = match parser.next().map_err(usage)? {
                            Some(Value(name)) => name
                                .into_string()
                                .map_err(|_| Error::Usage("NAME must be UTF-8".into()))?,
                            _ => {
                                return Err(Error::Usage(format!(
                                    "{word} needs the NAME of a binary"
                                )))
                            }
                        };
                        if word == "rollback" {
                            Command::Rollback(name)
                        } else {
                            Command::Retry(name)
                        }
                    }
                    other => return Err(Error::Usage(format!("unknown command \"{other}\""))),
                });
            }
            other => return Err(usage(other.unexpected())),
        }
    }
    out.command = command.unwrap_or(Command::Run);
    if out.quiet && out.verbose {
        return Err(Error::Usage(
            "--quiet and --verbose exclude each other".into(),
        ));
    }
    Ok(out)
}

fn usage(e: lexopt::Error) -> Error {
    Error::Usage(e.to_string())
}

fn string(parser: &mut lexopt::Parser, flag: &str) -> Result<String> {
    let v = parser.value().map_err(usage)?;
    let v = v
        .into_string()
        .map_err(|_| Error::Usage(format!("{flag} must be UTF-8")))?;
    if v.trim().is_empty() {
        return Err(Error::Usage(format!("{flag} must not be empty")));
    }
    Ok(v)
}

fn seconds(parser: &mut lexopt::Parser, flag: &str) -> Result<u64> {
    let v = string(parser, flag)?;
    v.parse().map_err(|_| {
        let unit = if flag == "--workers" {
            "a whole number"
        } else {
            "whole seconds"
        };
        Error::Usage(format!("{flag} takes {unit}, not \"{v}\""))
    })
}

/// `1048576`, `512K`, `100M`, `2G` (powers of 1024).
fn size(v: &str, flag: &str) -> Result<u64> {
    let (digits, shift) = match v.trim_end_matches(['B', 'b', 'i']).to_ascii_uppercase() {
        s if s.ends_with('K') => (s[..s.len() - 1].to_string(), 10),
        s if s.ends_with('M') => (s[..s.len() - 1].to_string(), 20),
        s if s.ends_with('G') => (s[..s.len() - 1].to_string(), 30),
        s => (s, 0),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(1 << shift))
        .filter(|&n| n > 0)
        .ok_or_else(|| Error::Usage(format!("{flag} takes a size like 500M or 2G, not \"{v}\"")))
}

/// What `bin-manager` is asked to do.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ManagerCommand {
    /// Run the server (no subcommand).
    #[default]
    Serve,
    /// `node reset NAME`: ask a running server to forget a node's token.
    NodeReset(String),
    /// `node accept NAME`: ask a running server to admit a pending node.
    NodeAccept(String),
    /// `rollout ACTION NAME`: show or steer a running server's rollout of NAME.
    Rollout(RolloutAction, String),
    /// `keygen --out DIR`: write a release signing key pair (offline).
    Keygen,
    /// `sign --key FILE --name NAME … BUILD`: write BUILD's signature document (offline).
    Sign(PathBuf),
    /// `trust --key FILE NEW.pub`: print a rotation statement "trust NEW" signed by FILE.
    Trust(PathBuf),
    /// `revoke --key FILE KEYID`: print a statement "stop trusting KEYID" signed by FILE.
    Revoke(String),
}

/// What `bin-manager rollout` does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutAction {
    /// Show where it stands.
    Status,
    /// Stop offering the build.
    Pause,
    /// Go on after a pause.
    Resume,
    /// To the whole fleet now.
    Promote,
    /// Everyone back to the previous build.
    Abort,
}

impl RolloutAction {
    /// The word on the command line and in the API path.
    pub fn word(self) -> &'static str {
        match self {
            RolloutAction::Status => "status",
            RolloutAction::Pause => "pause",
            RolloutAction::Resume => "resume",
            RolloutAction::Promote => "promote",
            RolloutAction::Abort => "abort",
        }
    }
}

/// The server an admin subcommand talks to when `--server` is not given.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:8081";

/// bin-manager's parsed arguments (`None`: not given, config file or default applies).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ManagerArgs {
    /// The subcommand.
    pub command: ManagerCommand,
    /// `--server URL` (admin subcommands).
    pub server: Option<String>,
    /// `--admin-token-file FILE` (admin subcommands).
    pub admin_token_file: Option<PathBuf>,
    /// `--arch ARCH` (`rollout`: the rollout of the `binDir/ARCH/NAME` build).
    pub arch: Option<String>,
    /// `--config PATH`
    pub config: Option<PathBuf>,
    /// `--bin-dir DIR`
    pub bin_dir: Option<PathBuf>,
    /// `--listen ADDR`
    pub listen: Option<String>,
    /// `--state-file PATH`
    pub state_file: Option<PathBuf>,
    /// `--database postgres://…`
    pub database: Option<String>,
    /// `--token TOKEN`
    pub token: Option<String>,
    /// `--admin-token TOKEN`
    pub admin_token: Option<String>,
    /// `--max-upload SIZE`
    pub max_upload: Option<u64>,
    /// `--workers N`
    pub workers: Option<usize>,
    /// `--quiet`: no access log.
    pub quiet: bool,
    /// `--out DIR` (`keygen`).
    pub out: Option<PathBuf>,
    /// `--key FILE` (`sign`).
    pub key: Option<PathBuf>,
    /// `--name NAME` (`sign`).
    pub name: Option<String>,
    /// `--version V` (`sign`; `-V` alone is bin-manager's own version).
    pub sign_version: Option<String>,
    /// `--expires DURATION` (`sign`), in seconds.
    pub expires: Option<u64>,
    /// `--serial N` (`sign`).
    pub serial: Option<u64>,
    /// `--help`
    pub help: bool,
    /// `--version`
    pub version: bool,
}

/// bin-manager's `--help` text.
pub const MANAGER_HELP: &str = concat!(
    "bin-manager ",
    env!("CARGO_PKG_VERSION"),
    "
Serves the builds that bin-proxy agents install: binDir/NAME is the latest
build, binDir/ARCH/NAME wins for agents of that architecture, NAME@VERSION
serves pinned versions. Publish with an atomic mv into binDir or with
PUT /api/v1/bins/NAME. Keeps the registry of nodes that check in.

USAGE:
    bin-manager [OPTIONS]                     run the server
    bin-manager node reset NAME [--server URL] [--admin-token-file FILE]
                                              make a running server forget NAME's
                                              node token (a rebuilt host: its next
                                              registration gets a new one)
    bin-manager node accept NAME [--server URL] [--admin-token-file FILE]
                                              admit a pending node (admission: manual)
    bin-manager keygen --out DIR              write a release signing key pair offline:
                                              DIR/release.key (0600), DIR/release.pub;
                                              prints the key id
    bin-manager sign --key FILE --name NAME [--arch A] [--version V]
                [--expires 90d] [--serial N] BUILD
                                              write BUILD.sig, the one-line signature
                                              document (also printed); the serial is
                                              one above the name's last, or --serial
    bin-manager trust --key OLD.key NEW.pub   print a key rotation statement \"trust NEW\",
                                              signed by a trusted key (append it to
                                              binDir/.trust)
    bin-manager revoke --key FILE KEYID       print a statement \"stop trusting KEYID\"
    bin-manager rollout status|pause|resume|promote|abort NAME [--arch ARCH]
                [--server URL] [--admin-token-file FILE]
                                              show or steer the staged rollout of NAME
                                              (status needs a token only when the
                                              server guards reads)

OPTIONS:
    -c, --config PATH        JSON config {\"binDir\",\"listen\",\"stateFile\",\"token\",
                             \"adminToken\",\"maxUpload\",\"workers\"}. Default:
                             /etc/bin-manager/config.json when it exists.
        --bin-dir DIR        Published builds. Default: /var/lib/bin-manager/bins.
        --listen ADDR        Address to listen on; port 0 picks a free one (the
                             address bound is logged). Default: 127.0.0.1:8081.
        --state-file PATH    Node registry. Default: /var/lib/bin-manager/state.json.
        --database URL       Keep the registry and rollouts in PostgreSQL instead
                             (postgres://USER[:PASSWORD]@HOST:PORT/DB), so that
                             several replicas sharing one binDir serve one fleet.
                             Config key \"database\". Default: the state file.
        --token TOKEN        Bearer token every /api/v1 request must carry
                             (also $BIN_MANAGER_TOKEN). Default: none.
        --admin-token TOKEN  Bearer token for PUT /api/v1/bins/NAME (also
                             $BIN_MANAGER_ADMIN_TOKEN). Without it, publishing over
                             HTTP is off.
        --max-upload SIZE    Largest upload (suffixes K, M, G). Default: 2G.
        --workers N          Worker threads for requests that may block (bodies,
                             downloads, disk writes), up to 4096; idle connections
                             and heartbeats never hold one. Default: 256.
    -q, --quiet              No access log.
    -h, --help               Print this help.
    -V, --version            Print the version.

NODE SUBCOMMANDS:
        --server URL         The server to ask. Default: http://127.0.0.1:8081.
        --admin-token-file FILE
                             Read the admin token from FILE. Default:
                             $BIN_MANAGER_ADMIN_TOKEN. Never taken from the command
                             line, where every user of the host can read it.

CONFIG KEYS BEYOND THE FLAGS (see README.md):
    workersPerClient         Worker requests one client address may have at once
                             (default max(4, workers/8)); the next gets 503.
    requireNodeTokens        true: refuse (403) a registration, report or failure
                             for a known node without its X-Node-Token.
    admission                \"open\" (default) or \"manual\": new nodes are pending,
                             served nothing until accepted.
    maxNodes                 Most nodes in the registry (default 100000); beyond: 503.
    registrationsPerMinute   New nodes one address may register a minute (default
                             600; 0 = no limit); beyond: 429.
    maxRequestsPerSecond     Requests a second for all of /api/v1 (default 0 = no
                             limit); beyond: 503 with Retry-After.
    maxRequestsPerClientPerSecond
                             Requests a second one client address (IPv4, IPv6
                             /64) may make to /api/v1 (default 0 = no limit);
                             beyond: 429 with Retry-After.
    requireSignatures        true: refuse to publish a build without a valid
                             signature by one of trustedKeys (public key files).

ENDPOINTS (all JSON answers are {\"code\",\"message\",\"data\"}):
    GET|POST /api/v1/keepalive?node=NAME   heartbeat / registration
    GET      /api/v1/bins                   what is published
    GET      /api/v1/bins/NAME              {name, version, hash (md5), sha256, size}
    POST     /api/v1/bins/NAME?node=NODE    an agent reports {\"hash\"} it runs
    PUT      /api/v1/bins/NAME              publish (admin token; ?arch=&version=)
    GET|HEAD /api/v1/download/NAME          the file (Range supported)
    POST     /api/v1/check                  every binary of a node at once (ETag, 304)
    GET      /api/v1/nodes                  the fleet (?limit=N&after=NAME pages)
    POST     /api/v1/nodes/NAME/accept      admit a pending node (admin token)
    POST     /api/v1/nodes/NAME/reset       forget a node's token (admin token)
    GET      /healthz                       liveness

EXIT STATUS:
    1  could not start (address in use, state unreadable); a node subcommand
       failed (server unreachable or refused)
    2  bad command line or configuration (binDir missing)
"
);

/// Parses bin-manager's arguments (after the program name).
pub fn parse_manager(args: impl IntoIterator<Item = OsString>) -> Result<ManagerArgs> {
    let mut out = ManagerArgs::default();
    let mut parser = lexopt::Parser::from_args(args);
    while let Some(arg) = parser.next().map_err(usage)? {
        match arg {
            Short('h') | Long("help") => out.help = true,
            Long("version") if matches!(out.command, ManagerCommand::Sign(_)) => {
                out.sign_version = Some(string(&mut parser, "--version")?)
            }
            Short('V') | Long("version") => out.version = true,
            Short('c') | Long("config") => out.config = Some(parser.value().map_err(usage)?.into()),
            Long("bin-dir") => out.bin_dir = Some(parser.value().map_err(usage)?.into()),
            Long("listen") => out.listen = Some(string(&mut parser, "--listen")?),
            Long("state-file") => out.state_file = Some(parser.value().map_err(usage)?.into()),
            Long("database") => {
                out.database = Some(parser.value().map_err(usage)?.string().map_err(usage)?)
            }
            Long("token") => out.token = Some(string(&mut parser, "--token")?),
            Long("admin-token") => out.admin_token = Some(string(&mut parser, "--admin-token")?),
            Long("max-upload") => {
                out.max_upload = Some(size(&string(&mut parser, "--max-upload")?, "--max-upload")?)
            }
            Long("workers") => {
                let n = seconds(&mut parser, "--workers")?;
                out.workers = Some(usize::try_from(n).unwrap_or(usize::MAX));
            }
            Short('q') | Long("quiet") => out.quiet = true,
            Long("server") => out.server = Some(string(&mut parser, "--server")?),
            Long("admin-token-file") => {
                out.admin_token_file = Some(parser.value().map_err(usage)?.into())
            }
            Long("arch") => out.arch = Some(string(&mut parser, "--arch")?),
            Long("out") => out.out = Some(parser.value().map_err(usage)?.into()),
            Long("key") => out.key = Some(parser.value().map_err(usage)?.into()),
            Long("name") => out.name = Some(string(&mut parser, "--name")?),
            Long("expires") => {
                let v = string(&mut parser, "--expires")?;
                out.expires = Some(crate::sign::duration(&v).ok_or_else(|| {
                    Error::Usage(format!(
                        "--expires takes a duration like 90d, 12h or 30m, not \"{v}\""
                    ))
                })?)
            }
            Long("serial") => out.serial = Some(seconds(&mut parser, "--serial")?),
            Value(word) if out.command == ManagerCommand::Serve && word == "keygen" => {
                out.command = ManagerCommand::Keygen;
            }
            Value(word) if out.command == ManagerCommand::Serve && word == "sign" => {
                out.command = ManagerCommand::Sign(PathBuf::new());
            }
            Value(build) if out.command == ManagerCommand::Sign(PathBuf::new()) => {
                out.command = ManagerCommand::Sign(build.into());
            }
            Value(word)
                if out.command == ManagerCommand::Serve
                    && (word == "trust" || word == "revoke") =>
            {
                let arg = match parser.next().map_err(usage)? {
                    Some(Long("key")) => {
                        out.key = Some(parser.value().map_err(usage)?.into());
                        parser.next().map_err(usage)?
                    }
                    other => other,
                };
                let need = "trust --key FILE NEW.pub / revoke --key FILE KEYID";
                let Some(Value(arg)) = arg else {
                    return Err(Error::Usage(need.into()));
                };
                out.command = if word == "trust" {
                    ManagerCommand::Trust(arg.into())
                } else {
                    ManagerCommand::Revoke(
                        arg.into_string().map_err(|_| Error::Usage(need.into()))?,
                    )
                };
            }
            Value(word) if out.command == ManagerCommand::Serve && word == "rollout" => {
                let need = "rollout needs an action and a binary: rollout status|pause|resume|promote|abort NAME";
                let mut word = || match parser.next().map_err(usage)? {
                    Some(Value(w)) => w
                        .into_string()
                        .map_err(|_| Error::Usage("rollout arguments must be UTF-8".into())),
                    _ => Err(Error::Usage(need.into())),
                };
                let (action, name) = (word()?, word()?);
                let action = [
                    RolloutAction::Status,
                    RolloutAction::Pause,
                    RolloutAction::Resume,
                    RolloutAction::Promote,
                    RolloutAction::Abort,
                ]
                .into_iter()
                .find(|a| a.word() == action)
                .ok_or_else(|| {
                    Error::Usage(format!(
                        "unknown rollout action \"{action}\" (use status, pause, resume, promote or abort)"
                    ))
                })?;
                out.command = ManagerCommand::Rollout(action, name);
            }
            Value(word) if out.command == ManagerCommand::Serve && word == "node" => {
                let mut word = || match parser.next().map_err(usage)? {
                    Some(Value(w)) => w.into_string().map_err(|_| {
                        Error::Usage("node subcommand arguments must be UTF-8".into())
                    }),
                    _ => Err(Error::Usage(
                        "node needs a subcommand and a NAME: node reset NAME, node accept NAME"
                            .into(),
                    )),
                };
                let (action, name) = (word()?, word()?);
                out.command = match action.as_str() {
                    "reset" => ManagerCommand::NodeReset(name),
                    "accept" => ManagerCommand::NodeAccept(name),
                    other => {
                        return Err(Error::Usage(format!(
                            "unknown node subcommand \"{other}\" (use reset or accept)"
                        )))
                    }
                };
            }
            other => return Err(usage(other.unexpected())),
        }
    }
    match &out.command {
        ManagerCommand::Trust(_) | ManagerCommand::Revoke(_) if out.key.is_none() => {
            return Err(Error::Usage(
                "trust and revoke need --key FILE, a key the hosts already trust".into(),
            ))
        }
        ManagerCommand::Keygen if out.out.is_none() => {
            return Err(Error::Usage("keygen needs --out DIR".into()))
        }
        ManagerCommand::Sign(build) if build.as_os_str().is_empty() || out.key.is_none() || out.name.is_none() => {
            return Err(Error::Usage(
                "sign needs --key FILE --name NAME and the BUILD file: sign --key FILE --name NAME [--arch A] [--version V] [--expires 90d] [--serial N] BUILD".into(),
            ))
        }
        _ => {}
    }
    if out.command != ManagerCommand::Serve && out.admin_token.is_some() {
        return Err(Error::Usage(
            "admin subcommands never take the admin token from the command line (every user of this host can read it there): set BIN_MANAGER_ADMIN_TOKEN or use --admin-token-file FILE".into(),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(args: &[&str], expected: Args) {
        assert_eq!(
            parse(args.iter().map(OsString::from)).unwrap(),
            expected,
            "{args:?}"
        );
    }

    fn check_err(args: &[&str], msg: &str) {
        let e = parse(args.iter().map(OsString::from)).unwrap_err();
        assert_eq!(e.to_string(), format!("{msg} (see --help)"), "{args:?}");
        assert_eq!(e.exit_code(), 2);
    }

    #[test]
    fn forms() {
        check(&[], Args::default());
        check(
            &["check", "-c", "/m.json"],
            Args {
                command: Command::Check,
                config: Some("/m.json".into()),
                ..Args::default()
            },
        );
        check(
            &["--api=http://a/api/v1", "status", "--timeout", "5"],
            Args {
                command: Command::Status,
                api: Some("http://a/api/v1".into()),
                timeout: 5,
                ..Args::default()
            },
        );
        check(
            &["rollback", "myapp", "-q"],
            Args {
                command: Command::Rollback("myapp".into()),
                quiet: true,
                ..Args::default()
            },
        );
        check(
            &["retry", "myapp"],
            Args {
                command: Command::Retry("myapp".into()),
                ..Args::default()
            },
        );
        check(
            &[
                "--only", "a", "--only", "b", "--splay", "30", "--every", "60",
            ],
            Args {
                only: vec!["a".into(), "b".into()],
                splay: 30,
                every: Some(60),
                ..Args::default()
            },
        );
        check(
            &["--max-size", "100M"],
            Args {
                max_size: 100 << 20,
                ..Args::default()
            },
        );
        check(
            &["--max-size", "1GiB"],
            Args {
                max_size: 1 << 30,
                ..Args::default()
            },
        );
        check(
            &["--max-size", "1000"],
            Args {
                max_size: 1000,
                ..Args::default()
            },
        );
        check(
            &["status", "--help"],
            Args {
                command: Command::Help,
                ..Args::default()
            },
        );
        check(
            &["-V"],
            Args {
                command: Command::Version,
                ..Args::default()
            },
        );
    }

    #[test]
    fn manager_forms() {
        let parse = |a: &[&str]| parse_manager(a.iter().map(OsString::from));
        assert_eq!(parse(&[]).unwrap(), ManagerArgs::default());
        let m = parse(&[
            "--listen",
            "127.0.0.1:0",
            "--bin-dir",
            "/b",
            "--max-upload",
            "1M",
            "--workers",
            "8",
            "-q",
        ])
        .unwrap();
        assert_eq!(
            (m.listen.as_deref(), m.max_upload, m.workers, m.quiet),
            (Some("127.0.0.1:0"), Some(1 << 20), Some(8), true)
        );
        assert_eq!(m.bin_dir, Some(PathBuf::from("/b")));
        assert_eq!(
            parse(&["--workers", "many"]).unwrap_err().to_string(),
            "--workers takes a whole number, not \"many\" (see --help)"
        );
        assert_eq!(parse(&["serve"]).unwrap_err().exit_code(), 2);

        let m = parse(&["keygen", "--out", "/k"]).unwrap();
        assert_eq!(
            (m.command, m.out),
            (ManagerCommand::Keygen, Some("/k".into()))
        );
        assert!(parse(&["keygen"])
            .unwrap_err()
            .to_string()
            .contains("--out DIR"));
        let m = parse(&[
            "sign",
            "--key",
            "/k/release.key",
            "--name",
            "app",
            "--arch",
            "x86_64",
            "--version",
            "1.2",
            "--expires",
            "2d",
            "--serial",
            "9",
            "/b/app",
        ])
        .unwrap();
        assert_eq!(m.command, ManagerCommand::Sign("/b/app".into()));
        assert_eq!(
            (
                m.key,
                m.name.as_deref(),
                m.arch.as_deref(),
                m.sign_version.as_deref(),
                m.expires,
                m.serial,
                m.version
            ),
            (
                Some("/k/release.key".into()),
                Some("app"),
                Some("x86_64"),
                Some("1.2"),
                Some(172800),
                Some(9),
                false
            )
        );
        assert!(parse(&["sign", "--key", "k", "--name", "a"])
            .unwrap_err()
            .to_string()
            .contains("BUILD"));
        assert!(parse(&["sign", "--key", "k", "b"])
            .unwrap_err()
            .to_string()
            .contains("--name"));
        assert!(parse(&["sign", "--expires", "soon"])
            .unwrap_err()
            .to_string()
            .contains("--expires takes a duration"));

        let m = parse(&["node", "reset", "web-01", "--server", "http://m:1"]).unwrap();
        assert_eq!(
            (m.command, m.server.as_deref()),
            (
                ManagerCommand::NodeReset("web-01".into()),
                Some("http://m:1")
            )
        );
        let m = parse(&["--admin-token-file", "/t", "node", "accept", "n"]).unwrap();
        assert_eq!(m.command, ManagerCommand::NodeAccept("n".into()));
        assert_eq!(m.admin_token_file, Some(PathBuf::from("/t")));
        for (args, msg) in [
            (&["node"][..], "node needs a subcommand and a NAME: node reset NAME, node accept NAME"),
            (&["node", "reset"], "node needs a subcommand and a NAME: node reset NAME, node accept NAME"),
            (&["node", "delete", "n"], "unknown node subcommand \"delete\" (use reset or accept)"),
            (
                &["node", "reset", "n", "--admin-token", "s3cret"],
                "admin subcommands never take the admin token from the command line (every user of this host can read it there): set BIN_MANAGER_ADMIN_TOKEN or use --admin-token-file FILE",
            ),
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.to_string(), format!("{msg} (see --help)"), "{args:?}");
            assert_eq!(e.exit_code(), 2);
        }
    }

    #[test]
    fn mistakes() {
        check_err(
            &["--timeout", "soon"],
            "--timeout takes whole seconds, not \"soon\"",
        );
        check_err(
            &["--max-size", "lots"],
            "--max-size takes a size like 500M or 2G, not \"lots\"",
        );
        check_err(&["frobnicate"], "unknown command \"frobnicate\"");
        check_err(&["rollback"], "rollback needs the NAME of a binary");
        check_err(&["--bogus"], "invalid option '--bogus'");
        check_err(&["check", "extra"], "unexpected argument \"extra\"");
        check_err(&["--api"], "missing argument for option '--api'");
        check_err(&["-q", "-v"], "--quiet and --verbose exclude each other");
    }
}
