//! One agent invocation: resolve the settings (flag > env > manifest >
//! default), take the run lock, check in with the server, decide and apply
//! each binary's upgrade, report, and record. Also the read-only `check` and
//! `status`, and the operator commands `init`, `rollback` and `retry`.

use crate::cli::{Args, Command};
use crate::client::Client;
use crate::error::{Error, Result};
use crate::hash;
use crate::host;
use crate::install::{self, Staged};
use crate::log;
use crate::manifest::{Binary, Manifest, DEFAULT_PATH};
use crate::plan::{self, Action, Reason};
use crate::protocol::{BinInfo, BinaryFact, FailureFact, Registration};
use crate::service::{self, Restart, Restarted};
use crate::state::{Pending, Quarantined, Stamp, State};
use crate::{debug, error, info, warn};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The agent's own version, reported as `proxyVersion`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The API base when nothing else names one.
pub const DEFAULT_API: &str = "http://127.0.0.1:8081/api/v1";

/// Environment lookups, injectable for tests.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The process environment, with empty values treated as unset.
pub fn process_env(key: &str) -> Option<String> {
    std::env::var(key).ok().filter(|v| !v.trim().is_empty())
}

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
        Command::Check => check(args, &config, false),
        Command::Status => check(args, &config, true),
        Command::Init => init(args, &config),
        Command::Rollback(name) => rollback(args, &config, name),
        Command::Retry(name) => retry(&config, name),
    };
    result.unwrap_or_else(|e| {
        error!("{e}");
        e.exit_code()
    })
}

/// The manifest path: `--config`, else `BIN_PROXY_CONFIG`, else the default.
pub fn config_path(args: &Args, env: Env) -> PathBuf {
    args.config
        .clone()
        .or_else(|| env("BIN_PROXY_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| DEFAULT_PATH.into())
}

/// Builds the client from flag > env > manifest > default.
pub fn client_for(
    args: &Args,
    env: Env,
    manifest: &Manifest,
    config: &Path,
    arch: &str,
) -> Result<Client> {
    let api = args
        .api
        .clone()
        .or_else(|| env("BIN_MANAGER_API"))
        .or_else(|| manifest.manager.api.clone());
    let api = api
        .unwrap_or_else(|| DEFAULT_API.to_string())
        .trim_end_matches('/')
        .to_string();
    let download = args
        .download_url
        .clone()
        .or_else(|| env("BIN_DOWNLOAD_URL"))
        .or_else(|| manifest.manager.download_url.clone());
    let download_base = download
        .unwrap_or_else(|| format!("{api}/download"))
        .trim_end_matches('/')
        .to_string();
    for (what, url) in [("API", &api), ("download", &download_base)] {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(Error::Usage(format!(
                "the {what} URL must start with http:// or https://, not \"{url}\""
            )));
        }
    }
    let token = match (env("BIN_MANAGER_TOKEN"), &manifest.manager.token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(file)) => {
            let t = fs::read_to_string(file).map_err(|e| Error::Config {
                path: config.to_path_buf(),
                msg: format!(
                    "manager.tokenFile \"{}\" cannot be read: {e}",
                    file.display()
                ),
            })?;
            Some(t.trim().to_string()).filter(|t| !t.is_empty())
        }
        (None, None) => None,
    };
    Ok(Client {
        api,
        download_base,
        token,
        timeout: args.timeout,
        download_timeout: args.download_timeout,
        arch: arch.to_string(),
    })
}

/// The node facts to report: the manifest's, with empty ones detected.
fn node_facts(manifest: &Manifest) -> (String, String, String) {
    let pick = |v: &Option<String>, detect: fn() -> String| {
        v.as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map_or_else(detect, str::to_string)
    };
    (
        pick(&manifest.node.name, host::hostname),
        pick(&manifest.node.cpu_arch, host::cpu_arch),
        pick(&manifest.node.os_release, host::os_release),
    )
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
    facts: (String, String, String),
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
    let (node, arch, _) = node_facts(&manifest);
    let client = client_for(args, &process_env, &manifest, config, &arch)?;
    if args.splay > 0 {
        let secs = splay(&node, args.splay);
        debug!("splay: sleeping {secs} s");
        std::thread::sleep(Duration::from_secs(secs));
    }
    let mut run = Run::new(args, config, manifest, client);

    let registered = match run.client.keepalive_get(&node) {
        Ok(found) => found.is_some(),
        Err(e) => {
            warn!("keepalive: {e}");
            true // unknown: do not re-register blindly; a change below still reports
        }
    };
    if !registered {
        match run.client.keepalive_post(&run.registration()) {
            Ok(()) => info!("registered node \"{node}\" with {}", run.client.api),
            Err(e) => warn!("registering node \"{node}\": {e}"),
        }
    }

    let (mut up_to_date, mut changed, mut failed, mut skipped) = (0, 0, 0, 0);
    let bins: Vec<Binary> = run
        .manifest
        .binaries
        .iter()
        .filter(|b| selected(args, b))
        .cloned()
        .collect();
    for bin in &bins {
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
        if let Err(e) = run.client.keepalive_post(&run.registration()) {
            warn!("reporting the node's inventory: {e}");
        }
    }
    let summary =
        format!(
        "{} {}: {up_to_date} up to date, {changed} changed, {failed} failed, {skipped} held back",
        bins.len(),
        if bins.len() == 1 { "binary" } else { "binaries" }
    );
    if failed > 0 {
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
    fn new(args: &'a Args, config: &'a Path, manifest: Manifest, client: Client) -> Run<'a> {
        let state_path = State::path_for(config);
        Run {
            args,
            config,
            state: State::load(&state_path),
            state_path,
            facts: node_facts(&manifest),
            manifest,
            client,
        }
    }

    fn registration(&self) -> Registration {
        let (name, cpu_arch, os_release) = self.facts.clone();
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
        }
    }

    /// Records a new hash for a binary in the manifest (atomically on disk).
    fn record(&mut self, name: &str, md5: &str) -> Result<()> {
        if let Some(b) = self.manifest.binaries.iter_mut().find(|b| b.name == name) {
            b.hash = md5.to_string();
        }
        self.manifest.save(self.config)
    }

    fn report(&self, name: &str, md5: &str) {
        if let Err(e) = self.client.report_hash(&self.facts.0, name, md5) {
            warn!("{name}: reporting hash {}: {e}", log::short(md5));
        }
    }

    fn binary(&mut self, bin: &Binary) -> Result<Outcome> {
        if let Some(outcome) = self.resume(bin) {
            return outcome;
        }
        let remote = self.client.bin_info(&bin.name, bin.pinned_version())?;
        let target = install::real_target(&bin.path);
        let swept =
            crate::fsutil::sweep_temps(&target) + crate::fsutil::sweep_temps(&backup_of(&target));
        if swept > 0 {
            info!(
                "{}: removed {swept} temp file(s) left by an interrupted run",
                bin.name
            );
        }
        let actual = self.state.actual_hash(&target)?;
        if self
            .state
            .quarantine
            .iter()
            .any(|q| q.name == bin.name && !hash::same(&q.hash, &remote.hash))
        {
            self.state.clear_quarantine(&bin.name);
            info!(
                "{}: a new build {} is published; its quarantine is lifted",
                bin.name,
                log::short(&remote.hash)
            );
        }
        let quarantine = self.state.quarantined(&bin.name, &remote.hash).cloned();
        match plan::decide(
            &bin.hash,
            actual.as_deref(),
            &remote.hash,
            quarantine.is_some(),
        ) {
            Action::UpToDate { record: false } => {
                debug!("{}: up to date ({})", bin.name, log::short(&remote.hash));
                Ok(Outcome::UpToDate)
            }
            Action::UpToDate { record: true } => {
                self.record(&bin.name, &remote.hash)?;
                self.report(&bin.name, &remote.hash);
                info!(
                    "{}: file already is the published build {}; recorded it",
                    bin.name,
                    log::short(&remote.hash)
                );
                Ok(Outcome::Changed)
            }
            Action::Quarantined => {
                let q = quarantine.unwrap_or_else(|| unreachable!("decide() says quarantined"));
                warn!(
                    "{}: holding back {}: it failed here at {} ({}); waiting for a new build or `bin-proxy retry {}`",
                    bin.name, log::short(&remote.hash), q.at, q.error, bin.name
                );
                Ok(Outcome::Skipped)
            }
            Action::Install(reason) => {
                self.install(bin, &target, actual.as_deref(), &remote, reason)
            }
        }
    }

    fn install(
        &mut self,
        bin: &Binary,
        target: &Path,
        actual: Option<&str>,
        remote: &BinInfo,
        reason: Reason,
    ) -> Result<Outcome> {
        let from = actual.unwrap_or("");
        let url =
            self.client
                .download_url(&bin.name, bin.download_url.as_deref(), bin.pinned_version());
        info!(
            "{}: {}; installing {}→{} from {url}",
            bin.name,
            reason.describe(),
            log::short(from),
            log::short(&remote.hash)
        );
        let kept = |e: Error| Error::Other(format!("{e}; kept the running version"));
        let staged = install::stage(
            &self.client,
            &bin.name,
            &url,
            target,
            remote,
            self.args.max_size,
        )
        .map_err(kept)?;
        if let Some(cmd) = &bin.pre_upgrade {
            let env = hook_env(bin, target, from, &remote.hash, Some(&staged));
            service::run_hook(cmd, &env)
                .map_err(|e| Error::Other(format!("preUpgrade failed, nothing changed: {e}")))?;
        }
        // Journal first: a run killed from here on is finished by the next one.
        self.state.set_pending(Pending {
            name: bin.name.clone(),
            old: from.to_string(),
            new: staged.md5.clone(),
            at: log::utc_now(),
        });
        self.state.save_if_changed(&self.state_path).map_err(kept)?;
        if let Err(e) = install::swap(&staged, target, &backup_of(target)) {
            self.state.clear_pending(&bin.name);
            self.save_state();
            return Err(kept(e));
        }
        if let Ok(meta) = fs::metadata(target) {
            self.state.remember(target, Stamp::of(&meta), &staged.md5);
        }
        let transfer = match staged.size {
            // A rate measured over a few milliseconds means nothing.
            0..0x100000 => log::size(staged.size),
            _ => format!(
                "{}, {}",
                log::size(staged.size),
                log::rate(staged.size, staged.elapsed)
            ),
        };
        self.commit_or_undo(bin, target, from, &staged.md5, Some(transfer))
    }

    /// After a swap: restart, confirm and health-check the new build; then
    /// record and report it, or roll back and quarantine it. Either way the
    /// journal entry is closed.
    fn commit_or_undo(
        &mut self,
        bin: &Binary,
        target: &Path,
        from: &str,
        new: &str,
        transfer: Option<String>,
    ) -> Result<Outcome> {
        let env = hook_env(bin, target, from, new, None);
        let policy = Restart::from_manifest(bin.restart.as_deref());
        let started = service::restart(&policy, bin.service(), bin.confirm_window(), &env)
            .and_then(|r| {
                if let Some(cmd) = &bin.post_upgrade {
                    service::run_hook(cmd, &env)
                        .map_err(|e| Error::Other(format!("postUpgrade failed: {e}")))?;
                }
                Ok(r)
            });
        let outcome = match started {
            Ok(restarted) => {
                self.record(&bin.name, new)?; // on failure the journal stays: the next run commits
                if matches!(restarted, Restarted::Skipped("supervisorctl not found")) {
                    warn!(
                        "{}: supervisorctl not found; the new build is in place but service \"{}\" was not restarted",
                        bin.name,
                        bin.service()
                    );
                }
                let transfer = transfer.map(|t| format!(" ({t})")).unwrap_or_default();
                info!(
                    "{}: upgraded {}→{}{transfer}, {}",
                    bin.name,
                    log::short(from),
                    log::short(new),
                    describe(&restarted)
                );
                Outcome::Changed
            }
            Err(e) => {
                error!("{}: {} did not come up: {e}", bin.name, log::short(new));
                self.undo(bin, target, from, &policy, &env);
                self.state.add_quarantine(Quarantined {
                    name: bin.name.clone(),
                    hash: new.to_string(),
                    error: crate::protocol::one_line(&e.to_string(), 300),
                    at: log::utc_now(),
                });
                Outcome::Failed
            }
        };
        self.state.clear_pending(&bin.name);
        self.save_state();
        if matches!(outcome, Outcome::Changed) {
            self.report(&bin.name, new);
        }
        Ok(outcome)
    }

    /// Finishes an upgrade a killed run left between swap and commit: if the
    /// new build is in place, confirm it now (or roll it back); if the swap
    /// never happened, forget the journal entry. `None`: go on as usual.
    fn resume(&mut self, bin: &Binary) -> Option<Result<Outcome>> {
        let p = self.state.pending_for(&bin.name)?.clone();
        let target = install::real_target(&bin.path);
        let actual = match self.state.actual_hash(&target) {
            Ok(a) => a,
            Err(e) => return Some(Err(e)),
        };
        if actual.as_deref().is_some_and(|a| hash::same(a, &p.new)) {
            if hash::same(&bin.hash, &p.new) {
                self.state.clear_pending(&bin.name); // committed; only the entry was left
                return None;
            }
            warn!(
                "{}: the run at {} was interrupted after swapping in {}; confirming it now",
                bin.name,
                p.at,
                log::short(&p.new)
            );
            return Some(self.commit_or_undo(bin, &target, &p.old, &p.new, None));
        }
        info!(
            "{}: the run at {} was interrupted before its swap; nothing had changed",
            bin.name, p.at
        );
        self.state.clear_pending(&bin.name);
        None
    }

    fn save_state(&mut self) {
        if let Err(e) = self.state.save_if_changed(&self.state_path) {
            warn!("{e}");
        }
    }

    /// Takes a failed build out of service: the backup goes back (or, for a
    /// fresh install, the new file goes away) and the service is restarted.
    /// A backup that is missing or is not the build it replaced is never
    /// restored: the failed build then stays, nothing is deleted, and the
    /// error says so loudly.
    fn undo(
        &mut self,
        bin: &Binary,
        target: &Path,
        from: &str,
        policy: &Restart,
        env: &[(&str, String)],
    ) {
        self.state.forget(target);
        if from.is_empty() {
            match fs::remove_file(target) {
                Ok(()) => warn!(
                    "{}: removed the failed fresh install \"{}\"",
                    bin.name,
                    target.display()
                ),
                Err(e) => error!(
                    "{}: could not remove the failed install \"{}\": {e}",
                    bin.name,
                    target.display()
                ),
            }
            return;
        }
        let backup = backup_of(target);
        let cannot = |why: String| {
            error!(
                "{}: CANNOT ROLL BACK: {why}; the failed build stays at \"{}\", nothing was deleted",
                bin.name,
                target.display()
            )
        };
        match hash::md5_file(&backup) {
            Err(e) => return cannot(format!("no usable backup ({e})")),
            Ok(h) if !hash::same(&h, from) => {
                return cannot(format!(
                    "backup \"{}\" holds {}, not the previous build {}",
                    backup.display(),
                    log::short(&h),
                    log::short(from)
                ))
            }
            Ok(_) => {}
        }
        if let Err(e) = install::restore(target, &backup) {
            return cannot(e.to_string());
        }
        match service::restart(policy, bin.service(), bin.confirm_window(), env) {
            Ok(r) => warn!(
                "{}: rolled back to {} ({})",
                bin.name,
                log::short(from),
                describe(&r)
            ),
            Err(e) => error!(
                "{}: rolled back to {}, but restarting it failed too: {e}",
                bin.name,
                log::short(from)
            ),
        }
    }
}

fn describe(r: &Restarted) -> String {
    match r {
        Restarted::Confirmed(status) => format!("restarted, {status}"),
        Restarted::Commanded => "restarted".into(),
        Restarted::Skipped(why) => format!("not restarted: {why}"),
    }
}

/// `PATH.bak` for the file actually replaced.
fn backup_of(target: &Path) -> PathBuf {
    let mut p = target.as_os_str().to_owned();
    p.push(".bak");
    PathBuf::from(p)
}

/// What hooks and restart commands learn about the upgrade.
fn hook_env(
    bin: &Binary,
    target: &Path,
    old: &str,
    new: &str,
    staged: Option<&Staged>,
) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("BIN_PROXY_NAME", bin.name.clone()),
        ("BIN_PROXY_PATH", target.display().to_string()),
        ("BIN_PROXY_OLD_HASH", old.to_string()),
        ("BIN_PROXY_NEW_HASH", new.to_string()),
    ];
    if let Some(s) = staged {
        env.push(("BIN_PROXY_NEW_FILE", s.tmp.display().to_string()));
    }
    env
}

/// `check` (dry run) and `status` (table): read-only, no lock, no writes.
fn check(args: &Args, config: &Path, table: bool) -> Result<u8> {
    let manifest = Manifest::load(config)?;
    check_only(args, &manifest)?;
    let (_, arch, _) = node_facts(&manifest);
    let client = client_for(args, &process_env, &manifest, config, &arch)?;
    let state = State::load(&State::path_for(config));
    let mut failed = false;
    let mut rows =
        vec![["NAME", "PATH", "RECORDED", "ACTUAL", "REMOTE", "STATE"].map(String::from)];
    for bin in manifest.binaries.iter().filter(|b| selected(args, b)) {
        let target = install::real_target(&bin.path);
        let actual = state.peek_hash(&target);
        let remote = client.bin_info(&bin.name, bin.pinned_version());
        let (line, state_word) = match (&actual, &remote) {
            (Err(e), _) | (_, Err(e)) => {
                failed = true;
                if table {
                    error!("{}: {e}", bin.name);
                }
                (
                    format!("{}: cannot check: {e}", bin.name),
                    "error".to_string(),
                )
            }
            (Ok(actual), Ok(remote)) => {
                let q = state.quarantined(&bin.name, &remote.hash);
                match plan::decide(&bin.hash, actual.as_deref(), &remote.hash, q.is_some()) {
                    Action::UpToDate { record: false } => (
                        format!("{}: up to date ({})", bin.name, log::short(&remote.hash)),
                        "up to date".into(),
                    ),
                    Action::UpToDate { record: true } => (
                        format!(
                            "{}: would record {} (the file already matches)",
                            bin.name,
                            log::short(&remote.hash)
                        ),
                        "unrecorded".into(),
                    ),
                    Action::Quarantined => (
                        format!(
                            "{}: would hold back {} (failed here: {})",
                            bin.name,
                            log::short(&remote.hash),
                            q.map_or("", |q| &q.error)
                        ),
                        "quarantined".into(),
                    ),
                    Action::Install(reason) => (
                        format!(
                            "{}: would install {}→{} ({})",
                            bin.name,
                            log::short(actual.as_deref().unwrap_or("")),
                            log::short(&remote.hash),
                            reason.describe()
                        ),
                        match reason {
                            Reason::Fresh => "not installed",
                            Reason::Missing => "missing",
                            Reason::Changed => "changed on disk",
                            Reason::Outdated => "outdated",
                        }
                        .into(),
                    ),
                }
            }
        };
        if table {
            let short = |h: Option<&str>| h.map_or("?".to_string(), log::short);
            rows.push([
                bin.name.clone(),
                bin.path.display().to_string(),
                log::short(&bin.hash),
                match &actual {
                    Ok(Some(h)) => log::short(h),
                    Ok(None) => "missing".into(),
                    Err(_) => "?".into(),
                },
                short(remote.as_ref().ok().map(|r| r.hash.as_str())),
                state_word,
            ]);
        } else {
            println!("{line}");
        }
    }
    if table {
        print_table(&rows);
    }
    Ok(u8::from(failed))
}

fn print_table(rows: &[[String; 6]]) {
    let mut widths = [0usize; 6];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

/// `init`: a starter manifest with this host's facts; never overwrites.
fn init(args: &Args, config: &Path) -> Result<u8> {
    if fs::symlink_metadata(config).is_ok() {
        return Err(Error::Other(format!(
            "\"{}\" already exists; not overwriting it",
            config.display()
        )));
    }
    let dir = crate::fsutil::parent(config);
    fs::create_dir_all(dir).map_err(|e| Error::io("creating directory", dir, e))?;
    let api = args
        .api
        .clone()
        .or_else(|| process_env("BIN_MANAGER_API"))
        .unwrap_or_else(|| DEFAULT_API.into());
    let mut m = Manifest::default();
    m.manager.api = Some(api);
    m.node.name = Some(host::hostname());
    m.node.cpu_arch = Some(host::cpu_arch());
    m.node.os_release = Some(host::os_release());
    m.node.proxy_version = Some(VERSION.into());
    let file = crate::fsutil::create_exclusive(config, 0o644)?;
    drop(file);
    m.save(config)?;
    info!(
        "wrote a starter manifest to \"{}\"; add your binaries to its \"binaries\" list",
        config.display()
    );
    Ok(0)
}

/// `rollback NAME`: put `PATH.bak` back, restart, quarantine the build rolled
/// back from (so the next cron run does not reinstall it), record and report.
fn rollback(args: &Args, config: &Path, name: &str) -> Result<u8> {
    let Some(_lock) = lock(config)? else {
        return Err(Error::Other(
            "another bin-proxy run holds the lock; try again in a moment".into(),
        ));
    };
    let manifest = Manifest::load(config)?;
    let bin = manifest
        .binaries
        .iter()
        .find(|b| b.name == name)
        .cloned()
        .ok_or_else(|| {
            Error::Usage(format!(
                "no binary named \"{name}\" in \"{}\"",
                config.display()
            ))
        })?;
    let (_, arch, _) = node_facts(&manifest);
    let client = client_for(args, &process_env, &manifest, config, &arch)?;
    let mut run = Run::new(args, config, manifest, client);
    let target = install::real_target(&bin.path);
    let backup = backup_of(&target);
    let from = run.state.actual_hash(&target)?.unwrap_or_default();
    let to = hash::md5_file(&backup)?;
    install::restore(&target, &backup)?;
    run.state.forget(&target);
    if !from.is_empty() {
        run.state.add_quarantine(Quarantined {
            name: name.to_string(),
            hash: from.clone(),
            error: "rolled back by hand".into(),
            at: log::utc_now(),
        });
    }
    let env = hook_env(&bin, &target, &from, &to, None);
    let restarted = service::restart(
        &Restart::from_manifest(bin.restart.as_deref()),
        bin.service(),
        bin.confirm_window(),
        &env,
    );
    run.record(name, &to)?;
    run.state.save_if_changed(&run.state_path)?;
    run.report(name, &to);
    if let Err(e) = run.client.keepalive_post(&run.registration()) {
        warn!("reporting the node's inventory: {e}");
    }
    match restarted {
        Ok(r) => {
            info!("{name}: rolled back {}→{}, {}; {} stays held back until a new build or `bin-proxy retry {name}`", log::short(&from), log::short(&to), describe(&r), log::short(&from));
            Ok(0)
        }
        Err(e) => {
            error!(
                "{name}: rolled back {}→{}, but the restart failed: {e}",
                log::short(&from),
                log::short(&to)
            );
            Ok(1)
        }
    }
}

/// `retry NAME`: forget that a build failed here, so the next run tries it again.
fn retry(config: &Path, name: &str) -> Result<u8> {
    let Some(_lock) = lock(config)? else {
        return Err(Error::Other(
            "another bin-proxy run holds the lock; try again in a moment".into(),
        ));
    };
    let manifest = Manifest::load(config)?;
    if !manifest.binaries.iter().any(|b| b.name == name) {
        return Err(Error::Usage(format!(
            "no binary named \"{name}\" in \"{}\"",
            config.display()
        )));
    }
    let state_path = State::path_for(config);
    let mut state = State::load(&state_path);
    if state.clear_quarantine(name) {
        state.save_if_changed(&state_path)?;
        info!("{name}: quarantine cleared; the next run installs the published build again");
    } else {
        info!("{name}: nothing is held back");
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn precedence_flag_env_manifest_default() {
        let mut m = Manifest::default();
        let cfg = Path::new("/m.json");
        let none = env_of(&[]);
        let c = client_for(&Args::default(), &none, &m, cfg, "x86_64").unwrap();
        assert_eq!(
            (c.api.as_str(), c.download_base.as_str()),
            (DEFAULT_API, "http://127.0.0.1:8081/api/v1/download")
        );
        m.manager.api = Some("http://manifest/api/v1/".into());
        let c = client_for(&Args::default(), &none, &m, cfg, "x86_64").unwrap();
        assert_eq!(
            (c.api.as_str(), c.download_base.as_str()),
            ("http://manifest/api/v1", "http://manifest/api/v1/download")
        );
        let env = env_of(&[
            ("BIN_MANAGER_API", "http://env/api"),
            ("BIN_DOWNLOAD_URL", "http://cdn/"),
            ("BIN_MANAGER_TOKEN", " s3cret\n"),
        ]);
        let c = client_for(&Args::default(), &env, &m, cfg, "x86_64").unwrap();
        assert_eq!(
            (c.api.as_str(), c.download_base.as_str(), c.token.as_deref()),
            ("http://env/api", "http://cdn", Some("s3cret"))
        );
        let args = Args {
            api: Some("https://flag/api".into()),
            ..Args::default()
        };
        let c = client_for(&args, &env, &m, cfg, "x86_64").unwrap();
        assert_eq!(c.api, "https://flag/api");
        let args = Args {
            api: Some("ftp://x".into()),
            ..Args::default()
        };
        assert_eq!(
            client_for(&args, &none, &m, cfg, "x")
                .unwrap_err()
                .exit_code(),
            2
        );
    }

    #[test]
    fn config_path_precedence() {
        let env = env_of(&[("BIN_PROXY_CONFIG", "/env.json")]);
        assert_eq!(
            config_path(&Args::default(), &env_of(&[])),
            PathBuf::from(DEFAULT_PATH)
        );
        assert_eq!(
            config_path(&Args::default(), &env),
            PathBuf::from("/env.json")
        );
        let args = Args {
            config: Some("/flag.json".into()),
            ..Args::default()
        };
        assert_eq!(config_path(&args, &env), PathBuf::from("/flag.json"));
    }

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
