//! The agent: one invocation of `bin-proxy`. [`main`] dispatches the
//! command; [`run`] is the cron run, and reads as its table of contents:
//! lock, settings, check in, each binary's upgrade ([`upgrade`]), report,
//! summary. The operator's other commands are in [`commands`].
//!
//! Below it, each module owns one thing: the manifest and the agent's state
//! file, the pure planner, the client for bin-manager, staging and swapping
//! files, running services and hooks, and the host's own facts.

pub mod client;
pub mod fetch;
pub mod host;
pub mod install;
pub mod manifest;
pub mod paths;
pub mod plan;
pub mod service;
pub mod state;

mod commands;
mod settings;
mod upgrade;

use crate::cli::{process_env, Args, Command};
use crate::error::{Error, Result};
use crate::hash;
use crate::json::Value;
use crate::log;
use crate::protocol::{BinaryFact, FailureFact, Registration};
use crate::{debug, error, info, warn};
use client::Client;
use manifest::{Binary, Manifest};
use settings::{client_for, config_path, node_facts, NodeFacts};
use state::State;
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use settings::DEFAULT_API;

/// The agent's own version, reported as `proxyVersion`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Runs the parsed command; returns the exit code.
pub fn main(args: &Args) -> u8 {
    log::set_level(if args.quiet {
        log::Level::Warn
    } else if args.verbose {
        log::Level::Debug
    } else {
        log::Level::Info
    });
    let config = config_path(args, &process_env);
    let result = match &args.command {
        Command::Help => {
            print!("{}", crate::cli::HELP);
            Ok(0)
        }
        Command::Version => {
            println!("bin-proxy {VERSION}");
            Ok(0)
        }
        Command::Run => match args.every {
            Some(secs) => every(args, &config, secs),
            None => run(args, &config),
        },
        Command::Check => commands::check(args, &config, false),
        Command::Status => commands::check(args, &config, true),
        Command::Init => commands::init(args, &config),
        Command::Rollback(name) => commands::rollback(args, &config, name),
        Command::Retry(name) => commands::retry(&config, name),
    };
    result.unwrap_or_else(|e| {
        error!("{e}");
        e.exit_code()
    })
}

/// The run lock beside the manifest. `None` when another run holds it.
/// A missing manifest is reported first (and no lock file is left behind).
fn lock(config: &Path) -> Result<Option<File>> {
    if fs::metadata(config).is_err() {
        Manifest::load(config)?; // the error names the path and the remedy
    }
    let mut path = config.as_os_str().to_owned();
    path.push(".lock");
    let path = PathBuf::from(path);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("opening the lock file", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(Error::io("locking", &path, e)),
    }
}

/// `--every`: run, sleep, repeat. Errors are logged and the loop goes on.
fn every(args: &Args, config: &Path, secs: u64) -> Result<u8> {
    loop {
        if let Err(e) = run(args, config) {
            error!("{e}");
        }
        std::thread::sleep(Duration::from_secs(secs));
    }
}

/// What happened to one binary in a run.
enum Outcome {
    UpToDate,
    Changed,
    Skipped,
    Failed,
}

/// Everything one run works with.
struct Run<'a> {
    args: &'a Args,
    config: &'a Path,
    manifest: Manifest,
    state: State,
    state_path: PathBuf,
    client: Client,
    /// Node name, cpuArch, osRelease: read from the host once per run.
    facts: NodeFacts,
    /// The server refused a request about this node (403): exit 1.
    token_refused: bool,
}

/// One upgrade cycle.
fn run(args: &Args, config: &Path) -> Result<u8> {
    let Some(_lock) = lock(config)? else {
        info!(
            "another bin-proxy run holds the lock on \"{}\"; exiting",
            config.display()
        );
        return Ok(0);
    };
    let manifest = Manifest::load(config)?;
    check_only(args, &manifest)?;
    let facts = node_facts(&manifest);
    let client = client_for(args, &process_env, &manifest, config, &facts)?;
    if args.splay > 0 {
        let secs = splay(&facts.name, args.splay);
        debug!("splay: sleeping {secs} s");
        std::thread::sleep(Duration::from_secs(secs));
    }
    let mut run = Run::new(args, config, manifest, client, facts);

    let pending = run.check_in();
    let (mut up_to_date, mut changed, mut failed, mut skipped) = (0, 0, 0, 0);
    let bins: Vec<Binary> = run
        .manifest
        .binaries
        .iter()
        .filter(|b| selected(args, b))
        .cloned()
        .collect();
    if pending {
        warn!(
            "node \"{}\" is waiting for an admin to accept it on {} (bin-manager node accept {}); nothing is installed until then",
            run.facts.name, run.client.api, run.facts.name
        );
        skipped = bins.len();
    }
    for bin in bins.iter().filter(|_| !pending) {
        match run.binary(bin) {
            Ok(Outcome::UpToDate) => up_to_date += 1,
            Ok(Outcome::Changed) => changed += 1,
            Ok(Outcome::Skipped) => skipped += 1,
            Ok(Outcome::Failed) => failed += 1,
            Err(e) => {
                error!("{}: {e}", bin.name);
                failed += 1;
            }
        }
    }
    if let Err(e) = run.state.save_if_changed(&run.state_path) {
        warn!("{e}");
    }
    if changed + failed > 0 {
        match run.client.keepalive_post(&run.registration()) {
            Ok(data) => run.take_token(&data),
            Err(e) => run.node_request_failed("reporting the node's inventory", e),
        }
    }
    let mut summary =
        format!(
        "{} {}: {up_to_date} up to date, {changed} changed, {failed} failed, {skipped} held back",
        bins.len(),
        if bins.len() == 1 { "binary" } else { "binaries" }
    );
    if run.token_refused {
        summary.push_str("; the server refused this node's token");
    }
    if failed > 0 || run.token_refused {
        error!("{summary}");
        Ok(1)
    } else {
        info!("{summary}");
        Ok(0)
    }
}

fn selected(args: &Args, bin: &Binary) -> bool {
    args.only.is_empty() || args.only.contains(&bin.name)
}

fn check_only(args: &Args, manifest: &Manifest) -> Result<()> {
    match args
        .only
        .iter()
        .find(|n| !manifest.binaries.iter().any(|b| &&b.name == n))
    {
        Some(n) => Err(Error::Usage(format!(
            "--only \"{n}\": no such binary in the manifest"
        ))),
        None => Ok(()),
    }
}

/// A fixed per-node delay in 0..=max seconds.
fn splay(node: &str, max: u64) -> u64 {
    let mut md5 = hash::Md5::new();
    md5.update(node.as_bytes());
    let hex = md5.hex();
    u64::from_str_radix(&hex[..12], 16).unwrap_or(0) % (max + 1)
}

impl<'a> Run<'a> {
    fn new(
        args: &'a Args,
        config: &'a Path,
        manifest: Manifest,
        mut client: Client,
        facts: NodeFacts,
    ) -> Run<'a> {
        let state_path = State::path_for(config);
        let state = State::load(&state_path);
        client.node_token = state.node_token(&facts.name).map(str::to_string);
        Run {
            args,
            config,
            state,
            state_path,
            facts,
            manifest,
            client,
            token_refused: false,
        }
    }

    /// Heartbeat; registers when the server does not know this node. A
    /// failure is logged and the run goes on. Returns whether the server
    /// says the node is pending admission.
    fn check_in(&mut self) -> bool {
        let node = self.facts.name.clone();
        // A node the server holds no token for (an admin reset it) registers
        // again to be given one; a seed server never says so.
        let tokenless = |d: &Value| matches!(d.get("hasNodeToken"), Some(Value::Bool(false)));
        let data = match self.client.keepalive_get(&node) {
            Ok(Some(data)) if !tokenless(&data) => data,
            Ok(found) => match self.client.keepalive_post(&self.registration()) {
                Ok(data) => {
                    match found {
                        None => info!("registered node \"{node}\" with {}", self.client.api),
                        Some(_) => info!("node \"{node}\" has no node token on the server; registered again to get one"),
                    }
                    data
                }
                Err(e) => {
                    self.node_request_failed(&format!("registering node \"{node}\""), e);
                    return false;
                }
            },
            // Unknown: do not re-register blindly; a change below still reports.
            Err(e) => {
                self.node_request_failed("keepalive", e);
                return false;
            }
        };
        self.take_token(&data);
        data.get("admission").and_then(Value::as_str) == Some("pending")
    }

    /// Keeps a node token the server issued (`data.nodeToken`): in the state
    /// file at once, since the server keeps only its hash.
    fn take_token(&mut self, data: &Value) {
        let Some(token) = data.get("nodeToken").and_then(Value::as_str) else {
            return;
        };
        let node = self.facts.name.clone();
        if token.is_empty() || token.len() > 256 || !token.bytes().all(|b| b.is_ascii_graphic()) {
            warn!("node \"{node}\": ignoring a malformed nodeToken from the server");
            return;
        }
        self.state.set_node_token(&node, token);
        self.client.node_token = Some(token.to_string());
        match self.state.save_if_changed(&self.state_path) {
            Ok(()) => info!(
                "node \"{node}\": keeping the node token the server issued in \"{}\"",
                self.state_path.display()
            ),
            Err(e) => error!("node \"{node}\": cannot keep the node token the server issued: {e}"),
        }
    }

    /// Logs a failed request about this node: a refused token (403) as an
    /// error that fails the run, anything else as a warning.
    fn node_request_failed(&mut self, what: &str, e: Error) {
        match e {
            Error::Server {
                status: 403,
                url,
                message,
            } => {
                self.token_refused = true;
                let e = Error::NodeTokenRefused {
                    node: self.facts.name.clone(),
                    msg: format!("{url}: {message}"),
                };
                error!("{what}: {e}");
            }
            e => warn!("{what}: {e}"),
        }
    }

    fn registration(&self) -> Registration {
        let NodeFacts {
            name,
            cpu_arch,
            os_release,
        } = self.facts.clone();
        let binaries = self.manifest.binaries.iter().map(|b| BinaryFact {
            name: b.name.clone(),
            version: b.version.clone().unwrap_or_else(|| "latest".into()),
            hash: b.hash.clone(),
        });
        let failures = self.state.quarantine.iter().map(|q| FailureFact {
            name: q.name.clone(),
            hash: q.hash.clone(),
            error: q.error.clone(),
            at: q.at.clone(),
        });
        Registration {
            name,
            cpu_arch,
            os_release,
            proxy_version: VERSION.to_string(),
            binaries: binaries.collect(),
            last_seen: log::utc_now(),
            failures: failures.collect(),
            labels: self.manifest.node.labels.clone(),
        }
    }

    /// Records a new hash for a binary in the manifest (atomically on disk).
    fn record(&mut self, name: &str, md5: &str) -> Result<()> {
        if let Some(b) = self.manifest.binaries.iter_mut().find(|b| b.name == name) {
            b.hash = md5.to_string();
        }
        self.manifest.save(self.config)
    }

    fn report(&mut self, name: &str, md5: &str) {
        if let Err(e) = self.client.report_hash(&self.facts.name, name, md5) {
            self.node_request_failed(&format!("{name}: reporting hash {}", log::short(md5)), e);
        }
    }

    fn save_state(&mut self) {
        if let Err(e) = self.state.save_if_changed(&self.state_path) {
            warn!("{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splay_is_fixed_per_node_and_bounded() {
        assert_eq!(splay("web-01", 30), splay("web-01", 30));
        assert!((0..200).all(|i| splay(&format!("n{i}"), 30) <= 30));
        assert!(
            (0..200)
                .map(|i| splay(&format!("n{i}"), 30))
                .collect::<std::collections::HashSet<_>>()
                .len()
                > 10
        );
    }
}
