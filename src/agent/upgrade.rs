//! One binary's upgrade, as a transaction: decide (plan), stage the
//! download beside the target, run preUpgrade, journal, swap, restart and
//! confirm, health-check — then commit (record, report) or undo (put the
//! backup back, restart, quarantine). A run killed anywhere in between is
//! finished by the next one ([`Run::resume`]).

use super::install::{self, Staged};
use super::manifest::Binary;
use super::paths;
use super::plan::{self, Action, Reason};
use super::service::{self, Restart, Restarted};
use super::state::{Blocked, Pending, Quarantined, Stamp};
use super::{Outcome, Run};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::hash;
use crate::log;
use crate::protocol::BinInfo;
use crate::{debug, error, info, warn};
use std::fs;
use std::path::{Path, PathBuf};

impl Run<'_> {
    pub(super) fn binary(&mut self, bin: &Binary) -> Result<Outcome> {
        if let Some(outcome) = self.resume(bin) {
            return outcome;
        }
        let remote = self.client.bin_info(&bin.name, bin.pinned_version())?;
        let target = install::real_target(&bin.path);
        self.sweep(bin, &target);
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
        if let Some(b) = self.state.blocked_for(&bin.name).cloned() {
            let moved = b.dir != fsutil::parent(&target);
            if moved || !hash::same(&b.hash, &remote.hash) {
                self.state.clear_block(&bin.name);
                info!(
                    "{}: {}; trying again",
                    bin.name,
                    if moved {
                        format!("\"{}\" leads elsewhere now", bin.path.display())
                    } else {
                        format!("a new build {} is published", log::short(&remote.hash))
                    }
                );
            }
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
                if let Some(b) = self.state.blocked_for(&bin.name).cloned() {
                    match paths::check_replaceable(&target) {
                        Err(e) => {
                            warn!(
                                "{}: holding back {}: {e} (since {}); waiting for a new build or for it to become replaceable",
                                bin.name,
                                log::short(&remote.hash),
                                b.at
                            );
                            return Ok(Outcome::Skipped);
                        }
                        Ok(()) => {
                            self.state.clear_block(&bin.name);
                            info!(
                                "{}: \"{}\" can be replaced again; trying {} again",
                                bin.name,
                                target.display(),
                                log::short(&remote.hash)
                            );
                        }
                    }
                }
                self.install(bin, &target, actual.as_deref(), &remote, reason)
            }
        }
    }

    /// Removes the temp files a killed run left beside the target — and in
    /// the directory its last download was staged in, when the managed path
    /// leads elsewhere now (a symlinked directory was switched).
    fn sweep(&mut self, bin: &Binary, target: &Path) {
        let swept = fsutil::sweep_temps(target) + fsutil::sweep_temps(&backup_of(target));
        if swept > 0 {
            info!(
                "{}: removed {swept} temp file(s) left by an interrupted run",
                bin.name
            );
        }
        // Where this run stages (saved with the state at the latest before
        // the swap): a later run killed after the directory was switched is
        // cleaned up by the next one.
        let here = fsutil::parent(target).to_path_buf();
        let before = self.state.staged_in(&bin.name).map(Path::to_path_buf);
        self.state.set_staged_in(&bin.name, &here);
        let Some(before) = before.filter(|b| *b != here) else {
            return;
        };
        if let Some(file) = target.file_name() {
            let old = before.join(file);
            let swept = fsutil::sweep_temps(&old) + fsutil::sweep_temps(&backup_of(&old));
            if swept > 0 {
                info!(
                    "{}: removed {swept} temp file(s) an interrupted run left in \"{}\": the directory of \"{}\" changed since, it leads to \"{}\" now",
                    bin.name,
                    before.display(),
                    bin.path.display(),
                    here.display()
                );
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
        paths::check_owners(&bin.path, target)?;
        let dir = fsutil::parent(target).to_path_buf();
        if let Err(e) = paths::check_replaceable(target) {
            self.state.add_block(Blocked {
                name: bin.name.clone(),
                hash: remote.hash.clone(),
                dir: dir.clone(),
                why: crate::protocol::one_line(&e.to_string(), 300),
                at: log::utc_now(),
            });
            self.save_state();
            return Err(Error::Other(format!(
                "{e}; kept the running version; {} is not downloaded again until a new build is published or \"{}\" can be replaced",
                log::short(&remote.hash),
                target.display()
            )));
        }
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
        // The managed path must still lead where the file was staged.
        let now = install::real_target(&bin.path);
        if now != target {
            return Err(kept(Error::DirChanged {
                path: bin.path.clone(),
                was: dir,
                now: fsutil::parent(&now).to_path_buf(),
            }));
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

pub(super) fn describe(r: &Restarted) -> String {
    match r {
        Restarted::Confirmed(status) => format!("restarted, {status}"),
        Restarted::Commanded => "restarted".into(),
        Restarted::Skipped(why) => format!("not restarted: {why}"),
    }
}

/// `PATH.bak` for the file actually replaced.
pub(super) fn backup_of(target: &Path) -> PathBuf {
    let mut p = target.as_os_str().to_owned();
    p.push(".bak");
    PathBuf::from(p)
}

/// What hooks and restart commands learn about the upgrade.
pub(super) fn hook_env(
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
