//! The agent: one invocation of `bin-proxy`. [`main`] dispatches the
//! command; [`run`] is the cron run, and reads as its table of contents:
//! lock, settings, check in, each binary's upgrade ([`upgrade`]), report,
//! summary. The operator's other commands are in [`commands`].
//!
//! Below it, each module owns one thing: the manifest and the agent's state
//! file, the pure planner, the client for bin-manager, staging and swapping
//! files, running services and hooks, and the host's own facts.

pub mod backoff;
pub mod batch;
pub mod client;
pub mod host;
pub mod http;
pub mod install;
pub mod manifest;
pub mod metrics;
pub mod paths;
pub mod plan;
pub mod selftest;
pub mod service;
pub mod state;
pub mod supervisor;
pub mod tls_hint;
pub mod verify;

mod commands;
mod settings;
mod upgrade;

use crate::cli::{process_env, Args, Command};
use crate::error::{Error, Result};
use crate::hash;
use crate::json::Value;
use crate::log::{self, Event};
use crate::protocol::{BinaryFact, FailureFact, Registration};
use crate::{debug, error, event, info, warn};
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
    let format = match (args.log_format, process_env("BIN_PROXY_LOG_FORMAT")) {
        (Some(f), _) => Ok(f),
        (None, Some(v)) => crate::cli::log_format(&v, "$BIN_PROXY_LOG_FORMAT"),
        (None, None) => Ok(log::Format::Text),
    };
    match format {
        Ok(f) => log::set_format(f),
        Err(e) => {
            error!("{e}");
            return e.exit_code();
        }
    }
    let config = config_path(args, &process_env);
    let result = match &args.command {
        Command::Help => {
            print!("{}", crate::cli::HELP);
            Ok(0)
        }
        Command::Version => {
            println!(
                "bin-proxy {VERSION}{}",
                if cfg!(feature = "tls") {
                    ""
                } else {
                    " (without TLS: http:// only)"
                }
            );
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
        Command::SelfTest(manifest, state) => selftest::self_test(manifest, state),
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

/// SIGTERM and SIGINT in `--every` mode (and SIGCHLD, to reap orphans):
/// read from a signalfd at safe points instead of killing the agent
/// mid-step. Unset in one-shot mode, where the default action is right (a
/// run is crash-safe wherever it is killed).
static SIGNALS: std::sync::OnceLock<std::os::fd::OwnedFd> = std::sync::OnceLock::new();
/// The termination signal received, once one was (0: none).
static STOP: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Whether `--every` was asked to stop. Checked where stopping leaves
/// nothing half done: between binaries, while downloading, before a swap.
pub(crate) fn stop_requested() -> bool {
    use std::sync::atomic::Ordering;
    if let Some(fd) = SIGNALS.get() {
        while let Some(sig) = crate::sys::read_signal(fd) {
            if sig != crate::sys::SIGCHLD {
                STOP.store(sig, Ordering::SeqCst);
            }
        }
    }
    STOP.load(Ordering::SeqCst) != 0
}

/// `--every`: run, wait, repeat, until SIGTERM or SIGINT (then exit 0, the
/// current step finished or abandoned before its swap). Errors are logged
/// and the loop goes on. As a container's PID 1 it also reaps the orphans
/// that hooks leave behind.
fn every(args: &Args, config: &Path, secs: u64) -> Result<u8> {
    match crate::sys::signal_fd(&[crate::sys::SIGTERM, crate::sys::SIGINT, crate::sys::SIGCHLD]) {
        Ok(fd) => drop(SIGNALS.set(fd)),
        Err(e) => warn!("cannot watch for SIGTERM ({e}); a stop signal ends the agent at once"),
    }
    loop {
        match run(args, config) {
            Err(Error::Stopped) | Ok(_) => {}
            Err(e) => error!("{e}"),
        }
        if pause(Duration::from_secs(secs)) {
            let sig = STOP.load(std::sync::atomic::Ordering::SeqCst);
            info!(
                "received {}: stopping; no step was left half done",
                crate::sys::signal_name(sig)
            );
            return Ok(0);
        }
    }
}

/// Waits `how_long`, reaping orphans meanwhile; in `--every` mode a stop
/// signal ends the wait at once. Returns whether to stop.
fn pause(how_long: Duration) -> bool {
    use std::os::fd::AsRawFd;
    let deadline = std::time::Instant::now() + how_long;
    loop {
        if SIGNALS.get().is_some() {
            crate::sys::reap_children(); // no child of ours is being waited for now
        }
        if stop_requested() {
            return true;
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return false;
        }
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX).max(1);
        match SIGNALS.get() {
            Some(fd) => drop(crate::sys::poll_readable(&[fd.as_raw_fd()], ms)),
            None => std::thread::sleep(left),
        }
    }
}

/// What happened to one binary in a run.
enum Outcome {
    UpToDate,
    Changed,
    /// Its published build failed here before.
    HeldBack,
    Failed,
    /// supervisord cannot restart its service: not attempted, not held back.
    Waiting,
    /// The server could not be reached to ask about it.
    Unreachable(Error),
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
    /// Release keys this host trusts (none: signatures are not required).
    trusted: Vec<crate::sign::TrustedKey>,
    /// Temp files of earlier runs, each directory listed once a run.
    temps: crate::fsutil::Temps,
    /// A report was answered 429/503 ([`Error::Busy`]): the run asks nothing more.
    busy: Option<Error>,
    /// The batched check's last answer, beside the manifest ([`batch`]).
    cache: batch::Cache,
    cache_path: PathBuf,
    /// Where this run's answers about the binaries come from.
    answers: batch::Answers,
}

/// One upgrade cycle.
fn run(args: &Args, config: &Path) -> Result<u8> {
    let started = std::time::Instant::now();
    let Some(_lock) = lock(config)? else {
        info!(
            "another bin-proxy run holds the lock on \"{}\"; exiting",
            config.display()
        );
        return Ok(0);
    };
    let manifest = Manifest::load(config)?;
    check_only(args, &manifest)?;
    if backoff_lasts(args, config) {
        return Ok(0); // told once, with exit 1, by the run the server answered
    }
    let facts = node_facts(&manifest);
    let client = client_for(args, &process_env, &manifest, config, &facts)?;
    if args.splay > 0 {
        let secs = splay(&facts.name, args.splay);
        debug!("waiting {secs} s before starting (--splay spreads a fleet's runs over the minute)");
        if pause(Duration::from_secs(secs)) {
            return Err(Error::Stopped);
        }
    }
    let mut keys = manifest.manager.trusted_keys.clone();
    keys.extend(args.trusted_keys.iter().cloned());
    let trusted = verify::load_keys(&keys)?;
    let mut run = Run::new(args, config, manifest, client, facts);
    run.trusted = trusted;
    run.state.clear_backoff(); // passed, or --now: asked again below

    let bins: Vec<Binary> = run
        .manifest
        .binaries
        .iter()
        .filter(|b| selected(args, b))
        .cloned()
        .collect();
    // A heartbeat that cannot reach the server is told once, below, if the
    // binaries' lookups cannot reach it either.
    let CheckIn {
        pending,
        error: keepalive_error,
    } = run.check_in_batched(&bins);
    // The server asked to be left alone: ask it nothing more this run.
    let (mut unreachable, keepalive_error) = match keepalive_error {
        Some(e @ Error::Busy { .. }) => (Some(e), None),
        e => (None, e),
    };
    let mut tally = Tally::default();
    if pending {
        warn!(
            "node \"{}\" is waiting for an admin to accept it on {} (bin-manager node accept {}); nothing is installed until then",
            run.facts.name, run.client.api, run.facts.name
        );
        tally.held_back = bins.len();
    }
    if unreachable.is_some() {
        tally.unreachable = bins.len();
    }
    // How each binary ended the run, for the metrics ("not_checked" unless reached).
    let mut states = vec!["not_checked"; bins.len()];
    for (i, bin) in bins.iter().enumerate().filter(|_| !pending) {
        if stop_requested() || unreachable.is_some() {
            break; // --every is stopping: the rest wait for the next start
        }
        if let Some(e) = run.busy.take() {
            // A report was answered 429/503: the rest wait for the back-off.
            tally.unreachable = bins.len() - i;
            unreachable = Some(e);
            break;
        }
        states[i] = match run.binary(bin) {
            Ok(Outcome::UpToDate) => {
                tally.up_to_date += 1;
                "up_to_date"
            }
            Ok(Outcome::Changed) => {
                tally.changed += 1;
                "upgraded"
            }
            Ok(Outcome::HeldBack) => {
                tally.held_back += 1;
                "held_back"
            }
            Ok(Outcome::Failed) => {
                tally.failed += 1;
                "failed"
            }
            Ok(Outcome::Waiting) => {
                tally.waiting += 1;
                "waiting"
            }
            Ok(Outcome::Unreachable(e)) => {
                // The rest would only wait for the same outage.
                tally.unreachable = bins.len() - i;
                unreachable = Some(e);
                break;
            }
            Err(Error::Stopped) => break,
            Err(e @ Error::Busy { .. }) => {
                tally.unreachable = bins.len() - i;
                unreachable = Some(e);
                break;
            }
            Err(e) => {
                event!(Error, Event::new(&bin.name, "failed"), "{e}");
                tally.failed += 1;
                "failed"
            }
        };
    }
    if let Some(e) = run.busy.take() {
        unreachable = Some(e); // the last binary's report: no inventory after it
    }
    match (&unreachable, keepalive_error) {
        (Some(e @ Error::Busy { .. }), _) => run.back_off(e, tally.unreachable),
        (Some(e), _) => event!(
            Error,
            Event::run("server_unreachable"),
            "{}: {e}; {} not checked, nothing changed",
            match e {
                Error::Tls { .. } => "cannot talk to the server",
                Error::Http { .. } | Error::Server { status: 500.., .. } => "server unreachable",
                _ => "the server could not answer the check",
            },
            plural(tally.unreachable, "binary", "binaries")
        ),
        (None, Some(e)) => warn!("keepalive: {e}"),
        (None, None) => {}
    }
    if let Err(e) = run.state.save_if_changed(&run.state_path) {
        warn!("{e}");
    }
    if unreachable.is_none() && tally.changed + tally.failed > 0 {
        match run.client.keepalive_post(&run.registration()) {
            Ok(data) => run.take_token(&data),
            Err(e) => run.node_request_failed("reporting the node's inventory", e),
        }
        if let Some(e) = run.busy.take() {
            run.back_off(&e, 0);
            unreachable = Some(e);
        }
    }
    tally.backing_off = matches!(unreachable, Some(Error::Busy { .. }));
    let mut summary = tally.summary(bins.len());
    if run.token_refused {
        summary.push_str("; the server refused this node's token");
    }
    let failed = tally.failed + tally.waiting + tally.unreachable > 0
        || run.token_refused
        || matches!(unreachable, Some(Error::Busy { .. }));
    let code = u8::from(failed);
    if code > 0 {
        event!(Error, Event::run("summary"), "{summary}");
    } else {
        event!(Info, Event::run("summary"), "{summary}");
    }
    if let Some(path) = metrics_path(args, &run.manifest) {
        // Kept only for the metrics: without them an idle run writes nothing.
        let ended = log::unix_now();
        // A server that asked to back off was reached: not an unreachable run.
        run.state.run_ended(
            code == 0,
            unreachable.is_some() && !tally.backing_off,
            ended,
        );
        run.save_state();
        let facts = metrics::RunFacts {
            ended,
            duration: started.elapsed(),
            exit_code: code,
            binaries: bins
                .iter()
                .zip(&states)
                .map(|(b, state)| metrics::BinaryRow {
                    name: &b.name,
                    md5: run
                        .manifest
                        .binaries
                        .iter()
                        .find(|m| m.name == b.name)
                        .map_or("", |m| &m.hash),
                    state,
                })
                .collect(),
        };
        if let Err(e) = metrics::write(&path, &facts, &run.state) {
            warn!("writing the metrics file: {e}");
        }
    }
    Ok(code)
}

/// `--metrics-file`, else `BIN_PROXY_METRICS_FILE`, else the manifest's `metricsFile`.
fn metrics_path(args: &Args, manifest: &Manifest) -> Option<PathBuf> {
    args.metrics_file
        .clone()
        .or_else(|| process_env("BIN_PROXY_METRICS_FILE").map(PathBuf::from))
        .or_else(|| manifest.metrics_file.clone())
}

/// What checking in found.
#[derive(Default)]
struct CheckIn {
    /// The server holds this node for an admin to accept.
    pending: bool,
    /// The heartbeat could not reach the server (told once, with the binaries').
    error: Option<Error>,
}

/// How the binaries of one run fared.
#[derive(Default)]
struct Tally {
    up_to_date: usize,
    changed: usize,
    failed: usize,
    held_back: usize,
    waiting: usize,
    unreachable: usize,
    /// The binaries not checked were not checked because of a 429/503.
    backing_off: bool,
}

impl Tally {
    /// `2 binaries: 1 up to date, 1 changed, 0 failed, 0 held back` (and the
    /// infrastructure's share when there is one).
    fn summary(&self, total: usize) -> String {
        let mut s = format!(
            "{}: {} up to date, {} changed, {} failed, {} held back",
            plural(total, "binary", "binaries"),
            self.up_to_date,
            self.changed,
            self.failed,
            self.held_back
        );
        if self.waiting > 0 {
            s.push_str(&format!(
                ", {} waiting (its service cannot be restarted now)",
                self.waiting
            ));
        }
        if self.unreachable > 0 {
            s.push_str(&format!(
                ", {} not checked ({})",
                self.unreachable,
                if self.backing_off {
                    "the server asked to back off"
                } else {
                    "server unreachable"
                }
            ));
        }
        s
    }
}

/// `1 binary`, `2 binaries`.
pub(crate) fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
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

/// Whether the back-off the server asked for still lasts: then this run
/// asks nothing (one info line). `--now` overrides it; one that passed is
/// forgotten by the run (its state is saved at the end).
fn backoff_lasts(args: &Args, config: &Path) -> bool {
    let state = State::load(&State::path_for(config));
    let Some(b) = state.backoff(log::unix_now()) else {
        return false;
    };
    if args.now {
        info!(
            "--now: asking the server although it asked to be left alone until {} ({})",
            at(b.until),
            b.why
        );
        return false;
    }
    info!(
        "server asked to be left alone until {} ({}); not asking before then (--now overrides)",
        at(b.until),
        b.why
    );
    true
}

/// Unix seconds as RFC 3339 UTC.
fn at(secs: u64) -> String {
    log::rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(secs))
}

/// A random number for jitter: from /dev/urandom; where that cannot be
/// read, the clock and the pid mixed through md5 (jitter needs spread, not
/// secrecy).
pub(crate) fn random() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    if File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return u64::from_le_bytes(b);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut md5 = hash::Md5::new();
    md5.update(format!("{nanos} {}", std::process::id()).as_bytes());
    u64::from_str_radix(&md5.hex()[..16], 16).unwrap_or(0)
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
        let cache_path = batch::Cache::path_for(config);
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
            trusted: Vec::new(),
            temps: crate::fsutil::Temps::default(),
            busy: None,
            cache: batch::Cache::load(&cache_path),
            cache_path,
            answers: batch::Answers::default(),
        }
    }

    /// Heartbeat; registers when the server does not know this node. A
    /// refused token is logged; another failure is handed back, to be told
    /// once with the binaries' (the run goes on).
    fn check_in(&mut self) -> CheckIn {
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
                Err(e @ Error::Busy { .. }) => {
                    return CheckIn {
                        pending: false,
                        error: Some(e),
                    }
                }
                Err(e) => {
                    self.node_request_failed(&format!("registering node \"{node}\""), e);
                    return CheckIn::default();
                }
            },
            // Unknown: do not re-register blindly; a change below still reports.
            Err(e @ Error::Server { status: 403, .. }) => {
                self.node_request_failed("keepalive", e);
                return CheckIn::default();
            }
            Err(e) => {
                return CheckIn {
                    pending: false,
                    error: Some(tls_hint::classify(e)),
                }
            }
        };
        self.take_token(&data);
        CheckIn {
            pending: data.get("admission").and_then(Value::as_str) == Some("pending"),
            error: None,
        }
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
            e @ Error::Busy { .. } => self.busy = Some(e),
            e => warn!("{what}: {e}"),
        }
    }

    /// The server answered 429/503: keeps "not before" (its Retry-After plus
    /// jitter, at most a day) in the state, so that the runs until then ask
    /// nothing, and says so once. `skipped`: the binaries left unchecked.
    fn back_off(&mut self, e: &Error, skipped: usize) {
        let Error::Busy {
            url,
            status,
            retry_after,
            message,
        } = e
        else {
            return;
        };
        let now = log::unix_now();
        let until = backoff::not_before(now, *retry_after, random());
        let asked = match retry_after {
            Some(secs) => format!("server asks to retry after {secs} s"),
            None => "server is overloaded (no Retry-After)".to_string(),
        };
        let why = format!("{status} from {url}: {message}");
        self.state
            .set_backoff(until, &crate::protocol::one_line(&why, 300));
        self.save_state();
        event!(
            Error,
            Event::run("server_backoff"),
            "{asked} ({why}); next attempt not before {}{}",
            at(until),
            if skipped > 0 {
                format!(
                    "; {} not checked, nothing changed",
                    plural(skipped, "binary", "binaries")
                )
            } else {
                String::new()
            }
        );
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
