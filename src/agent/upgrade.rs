//! One binary's upgrade, as a transaction: decide (plan), ask supervisord
//! whether it can restart the service at all, stage the download beside the
//! target, run preUpgrade, journal, swap, restart and confirm, health-check —
//! then commit (record, report) or undo (put the backup back, restart, hold
//! the failed build back). A run killed anywhere in between is finished by
//! the next one ([`Run::resume`]). Faults of the infrastructure (the server
//! unreachable, supervisord down or without the program) are never blamed
//! on the build: nothing is held back for them.

use super::batch::Missed;
use super::install::{self, Staged};
use super::manifest::Binary;
use super::paths;
use super::plan::{self, Action, Reason};
use super::selftest;
use super::service::{self, Restart, Restarted};
use super::state::{Blocked, Cached, Count, Partial, Pending, Quarantined, Stamp};
use super::verify;
use super::{Outcome, Run};
use crate::error::{Error, Result};
use crate::event;
use crate::fsutil;
use crate::hash;
use crate::log::{self, Event};
use crate::protocol::BinInfo;
use std::fs;
use std::path::{Path, PathBuf};

impl Run<'_> {
    pub(super) fn binary(&mut self, bin: &Binary) -> Result<Outcome> {
        if let Some(outcome) = self.resume(bin) {
            return outcome;
        }
        let remote = match self.remote(bin) {
            Ok(remote) => remote,
            // Not this binary's fault: the run reports it once.
            Err(Missed::Unreachable(e)) => return Ok(Outcome::Unreachable(e)),
            Err(Missed::Failed(e)) => return Err(e),
        };
        let target = install::real_target(&bin.path);
        self.sweep(bin, &target, &remote);
        let cached = self.state.cached_hash(&target)?;
        if self
            .state
            .quarantine
            .iter()
            .any(|q| q.name == bin.name && !hash::same(&q.hash, &remote.hash))
        {
            self.state.clear_quarantine(&bin.name);
            event!(
                Info,
                Event::new(&bin.name, "released"),
                "a new build {} is published; the one held back is forgotten",
                log::short(&remote.hash)
            );
        }
        if let Some(b) = self.state.blocked_for(&bin.name).cloned() {
            let moved = b.dir != fsutil::parent(&target);
            if moved || !hash::same(&b.hash, &remote.hash) {
                self.state.clear_block(&bin.name);
                event!(
                    Info,
                    Event::new(&bin.name, "released"),
                    "{}; trying again",
                    if moved {
                        format!("\"{}\" leads elsewhere now", bin.path.display())
                    } else {
                        format!("a new build {} is published", log::short(&remote.hash))
                    }
                );
            }
        }
        let quarantine = self.state.quarantined(&bin.name, &remote.hash).cloned();
        // A file the state does not know as it is now is read whole only
        // where the answer can change what happens; else while the new
        // build downloads.
        let held = quarantine.is_some() || self.state.blocked_for(&bin.name).is_some();
        let actual = match cached {
            Cached::Missing => None,
            Cached::Known(md5) => Some(md5),
            Cached::Unread(stamp) => {
                match plan::install_while_hashing(&bin.hash, &remote.hash, held) {
                    Some(reason) => {
                        event!(
                            Debug,
                            Event::new(&bin.name, "checked").hashes(&bin.hash, &remote.hash),
                            "recorded {}, on disk not known yet (read during the download), published {}",
                            log::short(&bin.hash),
                            log::short(&remote.hash)
                        );
                        return self.install(bin, &target, Old::Unread(stamp), &remote, reason);
                    }
                    None => self.state.actual_hash(&target)?,
                }
            }
        };
        event!(
            Debug,
            Event::new(&bin.name, "checked").hashes(&bin.hash, &remote.hash),
            "recorded {}, on disk {}, published {}{}",
            log::short(&bin.hash),
            actual.as_deref().map_or("no file".into(), log::short),
            log::short(&remote.hash),
            if quarantine.is_some() {
                " (held back: it failed here)"
            } else {
                ""
            }
        );
        match plan::decide(
            &bin.hash,
            actual.as_deref(),
            &remote.hash,
            quarantine.is_some(),
        ) {
            Action::UpToDate { record: false } => {
                event!(
                    Debug,
                    Event::new(&bin.name, "up_to_date").hashes(&remote.hash, &remote.hash),
                    "up to date: the file and the manifest are the published build {}",
                    log::short(&remote.hash)
                );
                Ok(Outcome::UpToDate)
            }
            Action::UpToDate { record: true } => self.record_published(bin, &remote.hash),
            Action::HeldBack => {
                let q = quarantine.unwrap_or_else(|| unreachable!("decide() says held back"));
                event!(
                    Warn,
                    Event::new(&bin.name, "held_back").hashes(actual.as_deref().unwrap_or(""), &remote.hash),
                    "holding back {}: it failed here at {} ({}); waiting for a new build or `bin-proxy retry {}`",
                    log::short(&remote.hash), q.at, q.error, bin.name
                );
                Ok(Outcome::HeldBack)
            }
            Action::Install(reason) => {
                if let Some(b) = self.state.blocked_for(&bin.name).cloned() {
                    match paths::check_replaceable(&target) {
                        Err(e) => {
                            event!(
                                Warn,
                                Event::new(&bin.name, "held_back").hashes(actual.as_deref().unwrap_or(""), &remote.hash),
                                "holding back {}: {e} (since {}); waiting for a new build or for it to become replaceable",
                                log::short(&remote.hash),
                                b.at
                            );
                            return Ok(Outcome::HeldBack);
                        }
                        Ok(()) => {
                            self.state.clear_block(&bin.name);
                            event!(
                                Info,
                                Event::new(&bin.name, "released"),
                                "\"{}\" can be replaced again; trying {} again",
                                target.display(),
                                log::short(&remote.hash)
                            );
                        }
                    }
                }
                self.install(bin, &target, Old::Known(actual.as_deref()), &remote, reason)
            }
        }
    }

    /// The file already is the published build: record and report it.
    fn record_published(&mut self, bin: &Binary, hash: &str) -> Result<Outcome> {
        self.record(&bin.name, hash)?;
        self.report(&bin.name, hash);
        event!(
            Info,
            Event::new(&bin.name, "recorded").hashes(&bin.hash, hash),
            "file already is the published build {}; recorded it",
            log::short(hash)
        );
        Ok(Outcome::Changed)
    }

    /// Removes the temp files a killed run left beside the target — and in
    /// the directory its last download was staged in, when the managed path
    /// leads elsewhere now (a symlinked directory was switched).
    fn sweep(&mut self, bin: &Binary, target: &Path, remote: &BinInfo) {
        let keep = self.keep_partial(bin, target, remote);
        let swept = self
            .temps
            .sweep(target, &backup_of(target), keep.as_deref());
        if swept > 0 {
            event!(
                Info,
                Event::new(&bin.name, "swept"),
                "removed {swept} temp file(s) left by an interrupted run"
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
                event!(
                    Info,
                    Event::new(&bin.name, "swept"),
                    "removed {swept} temp file(s) an interrupted run left in \"{}\": the directory of \"{}\" changed since, it leads to \"{}\" now",
                    before.display(),
                    bin.path.display(),
                    here.display()
                );
            }
        }
    }

    /// The temp file of a journalled partial download that may still be
    /// resumed: of the build published now, beside this target. Another is
    /// removed (by the sweep, or here) and forgotten.
    fn keep_partial(&mut self, bin: &Binary, target: &Path, remote: &BinInfo) -> Option<PathBuf> {
        let p = self.state.partial_for(&bin.name)?.clone();
        if hash::same(&p.md5, &remote.hash) && fsutil::parent(&p.file) == fsutil::parent(target) {
            return Some(p.file);
        }
        let _ = fs::remove_file(&p.file);
        self.state.clear_partial(&bin.name);
        event!(
            Info,
            Event::new(&bin.name, "partial_discarded"),
            "discarded the download of {} cut off at {}: {} is published now",
            log::short(&p.md5),
            log::size(p.bytes),
            log::short(&remote.hash)
        );
        None
    }

    fn install(
        &mut self,
        bin: &Binary,
        target: &Path,
        old: Old,
        remote: &BinInfo,
        reason: Reason,
    ) -> Result<Outcome> {
        let from = match old {
            Old::Known(actual) => actual.unwrap_or(""),
            Old::Unread(_) => "",
        };
        let url =
            self.client
                .download_url(&bin.name, bin.download_url.as_deref(), bin.pinned_version());
        // Before a byte is downloaded: can the service be restarted at all?
        let policy = Restart::from_manifest(bin.restart.as_deref());
        if let Err(e) = service::restart_ready(&policy, bin.service()) {
            return Ok(self.waiting(bin, from, &remote.hash, &e));
        }
        event!(
            Info,
            Event::new(&bin.name, "installing").hashes(from, &remote.hash),
            "{}; installing {} from {url}",
            reason.describe(),
            match old {
                Old::Known(_) => format!("{}→{}", log::short(from), log::short(&remote.hash)),
                Old::Unread(_) => format!(
                    "{} over the file on disk (read while downloading)",
                    log::short(&remote.hash)
                ),
            }
        );
        let kept = |e: Error| match e {
            // The server's back-off ends the run; the running version is kept anyway.
            Error::Stopped | Error::Busy { .. } => e,
            e => Error::Other(format!("{e}; kept the running version")),
        };
        install::require_dir(target)?;
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
        // Signed releases: judge the signature before a byte is downloaded,
        // then download against the signed sha256, cut at the signed size.
        let signed = match self.trusted.is_empty() {
            true => None,
            false => Some(verify::check(
                &self.trusted,
                remote,
                &verify::Want {
                    name: &bin.name,
                    arch: &self.facts.cpu_arch,
                    pinned: bin.pinned_version(),
                    floor: self.state.serial(&bin.name),
                    now: log::unix_now(),
                },
            )?),
        };
        let signed_want = signed.as_ref().map(|d| verify::signed_want(remote, d));
        let (want, max) = match (&signed_want, &signed) {
            (Some(w), Some(d)) => (w, d.size.min(self.args.max_size)),
            _ => (remote, self.args.max_size),
        };
        // A cut-off download is journalled (and the state saved) as it
        // goes, so that the next run resumes it.
        let partial = self.state.partial_for(&bin.name).cloned();
        let (state, state_path) = (&mut self.state, &self.state_path);
        let mut journal = |p: Option<&Partial>| match p {
            Some(p) => {
                state.set_partial(p.clone());
                if let Err(e) = state.save_if_changed(state_path) {
                    crate::warn!("{}: could not journal the partial download: {e}", p.name);
                }
            }
            None => state.clear_partial(&bin.name),
        };
        let unread = matches!(old, Old::Unread(_)).then_some(target);
        let (staged, read) = stage_while_hashing(unread, || {
            install::stage(&self.client, &bin.name, &url, target, want, max, partial, &mut journal)
                .map_err(|e| match (e, &signed) {
                    (Error::Size { url, msg }, Some(d)) => {
                        Error::Size {
                            url,
                            msg: format!(
                                "{msg}: more bytes than the {} signed (endless or padded data), cut at the signed size",
                                d.size
                            ),
                        }
                    }
                    (e, _) => e,
                })
                .map_err(kept)
        });
        let staged = staged?;
        let read = match (read, old) {
            (Some(md5), Old::Unread(stamp)) => Some((md5.map_err(kept)?, stamp)),
            _ => None,
        };
        let from = match &read {
            None => from,
            Some((md5, stamp)) => {
                self.state.remember(target, *stamp, md5);
                match plan::replaced(&bin.hash, md5, &remote.hash) {
                    None => return self.record_published(bin, &remote.hash), // the download goes
                    Some(Reason::Changed) => event!(
                        Warn,
                        Event::new(&bin.name, "changed").hashes(&bin.hash, md5),
                        "{}: recorded {}, on disk {}",
                        Reason::Changed.describe(),
                        log::short(&bin.hash),
                        log::short(md5)
                    ),
                    Some(_) => {}
                }
                md5.as_str()
            }
        };
        if selftest::is_self(target) {
            self.save_state();
            match selftest::run_new(
                &staged.tmp,
                self.config,
                &self.state_path,
                selftest::TIMEOUT,
            ) {
                Ok(version) => event!(
                    Info,
                    Event::new(&bin.name, "self_test"),
                    "the new agent {} passed its self-test ({version})",
                    log::short(&staged.md5)
                ),
                Err(why) => {
                    let _ = std::fs::remove_file(&staged.tmp);
                    let msg = format!(
                        "the new agent {} failed its self-test: {why}; holding it back, the running agent stays",
                        log::short(&staged.md5)
                    );
                    self.state.add_quarantine(Quarantined {
                        name: bin.name.clone(),
                        hash: remote.hash.clone(),
                        error: crate::protocol::one_line(&msg, 300),
                        at: log::utc_now(),
                    });
                    self.save_state();
                    return Err(Error::Other(msg));
                }
            }
        }
        if let Some(cmd) = &bin.pre_upgrade {
            let env = hook_env(bin, target, from, &remote.hash, Some(&staged));
            service::run_hook("preUpgrade", cmd, &env)
                .map_err(|e| Error::Other(format!("{e}; nothing changed")))?;
        }
        // The last point where stopping changes nothing (the staged file goes).
        if super::stop_requested() {
            return Err(Error::Stopped);
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
        let outcome = self.commit_or_undo(bin, target, from, &staged.md5, Some(transfer));
        if let (Ok(Outcome::Changed), Some(doc)) = (&outcome, &signed) {
            self.state.raise_serial(&bin.name, doc.serial);
            self.save_state();
        }
        outcome
    }

    /// After a swap: restart, confirm and health-check the new build; then
    /// record and report it, or roll back and hold it back. Either way the
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
                    service::run_hook("postUpgrade", cmd, &env)?;
                }
                Ok(r)
            });
        let outcome = match started {
            Ok(restarted) => {
                self.record(&bin.name, new)?; // on failure the journal stays: the next run commits
                if matches!(restarted, Restarted::Skipped("supervisorctl not found")) {
                    event!(
                        Warn,
                        Event::new(&bin.name, "not_restarted").hashes(from, new),
                        "supervisorctl not found; the new build is in place but service \"{}\" was not restarted",
                        bin.service()
                    );
                }
                let transfer = transfer.map(|t| format!(" ({t})")).unwrap_or_default();
                event!(
                    Info,
                    Event::new(&bin.name, "upgraded").hashes(from, new),
                    "upgraded {}→{}{transfer}, {}",
                    log::short(from),
                    log::short(new),
                    describe(&restarted)
                );
                self.state.count(&bin.name, Count::Upgrade);
                Outcome::Changed
            }
            Err(e) => {
                event!(
                    Error,
                    Event::new(&bin.name, "failed").hashes(from, new),
                    "{} did not come up: {e}",
                    log::short(new)
                );
                self.undo(bin, target, from, new, &policy, &env);
                // The service became impossible to restart since the check:
                // not the build's fault — provided the undo put the old
                // build back (a failed build left in place is always held
                // back, so that it is never recorded as installed).
                let restored = match self.state.actual_hash(target) {
                    Ok(Some(h)) => hash::same(&h, from),
                    Ok(None) => from.is_empty(),
                    Err(_) => false,
                };
                match service::restart_ready(&policy, bin.service()) {
                    Err(down) if restored => {
                        self.waiting(bin, from, new, &down);
                        Outcome::Waiting
                    }
                    _ => {
                        self.state.add_quarantine(Quarantined {
                            name: bin.name.clone(),
                            hash: new.to_string(),
                            error: crate::protocol::one_line(&e.to_string(), 300),
                            at: log::utc_now(),
                        });
                        self.state.count(&bin.name, Count::Failure);
                        Outcome::Failed
                    }
                }
            }
        };
        self.state.clear_pending(&bin.name);
        self.save_state();
        if matches!(outcome, Outcome::Changed) {
            self.report(&bin.name, new);
        }
        Ok(outcome)
    }

    /// supervisord cannot restart the service: nothing is swapped (or the
    /// swap was undone), nothing held back; the next run installs `to` once
    /// supervisord answers.
    fn waiting(&mut self, bin: &Binary, from: &str, to: &str, e: &Error) -> Outcome {
        event!(
            Error,
            Event::new(&bin.name, "supervisor_unavailable").hashes(from, to),
            "not installing {}: {e}; kept the running build; not held back: a later run installs it once the service can be restarted",
            log::short(to)
        );
        Outcome::Waiting
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
            // Confirming needs supervisord: without it, keep the journal
            // and let a later run finish the job.
            let policy = Restart::from_manifest(bin.restart.as_deref());
            if let Err(e) = service::restart_ready(&policy, bin.service()) {
                event!(
                    Error,
                    Event::new(&bin.name, "supervisor_unavailable").hashes(&p.old, &p.new),
                    "cannot confirm {}, swapped in by the interrupted run at {}: {e}; not held back: a later run confirms it once the service can be restarted",
                    log::short(&p.new),
                    p.at
                );
                return Some(Ok(Outcome::Waiting));
            }
            event!(
                Warn,
                Event::new(&bin.name, "resumed").hashes(&p.old, &p.new),
                "the run at {} was interrupted after swapping in {}; confirming it now",
                p.at,
                log::short(&p.new)
            );
            return Some(self.commit_or_undo(bin, &target, &p.old, &p.new, None));
        }
        event!(
            Info,
            Event::new(&bin.name, "resumed").hashes(&p.old, &p.new),
            "the run at {} was interrupted before its swap; nothing had changed",
            p.at
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
        new: &str,
        policy: &Restart,
        env: &[(&str, String)],
    ) {
        self.state.forget(target);
        let ev = Event::new(&bin.name, "rolled_back").hashes(new, from);
        if from.is_empty() {
            match fs::remove_file(target) {
                Ok(()) => event!(
                    Warn,
                    ev,
                    "removed the failed fresh install \"{}\"",
                    target.display()
                ),
                Err(e) => event!(
                    Error,
                    Event {
                        event: Some("rollback_failed"),
                        ..ev
                    },
                    "could not remove the failed install \"{}\": {e}",
                    target.display()
                ),
            }
            return;
        }
        let backup = backup_of(target);
        let cannot =
            |why: String| {
                event!(
                Error,
                Event { event: Some("rollback_failed"), ..ev },
                "CANNOT ROLL BACK: {why}; the failed build stays at \"{}\", nothing was deleted",
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
        self.state.count(&bin.name, Count::Rollback);
        match service::restart(policy, bin.service(), bin.confirm_window(), env) {
            Ok(r) => event!(
                Warn,
                ev,
                "rolled back to {} ({})",
                log::short(from),
                describe(&r)
            ),
            Err(e) => event!(
                Error,
                ev,
                "rolled back to {}, but restarting it failed too: {e}",
                log::short(from)
            ),
        }
    }
}

/// The file an install replaces, as known before the download.
#[derive(Clone, Copy)]
enum Old<'a> {
    /// Its md5 (`None`: there is no file).
    Known(Option<&'a str>),
    /// There, but not read yet: it is hashed while the new build downloads
    /// (its stamp, to remember the hash by).
    Unread(Stamp),
}

/// Runs `stage` (the download) while another thread hashes the file at
/// `old`, if any: on two cores a cold upgrade then costs about what a warm
/// one does. Returns the download's result and the old file's md5.
fn stage_while_hashing<T>(
    old: Option<&Path>,
    stage: impl FnOnce() -> T,
) -> (T, Option<Result<String>>) {
    std::thread::scope(|s| {
        let hashing = old.map(|path| s.spawn(move || hash::md5_file(path)));
        let staged = stage();
        let md5 = hashing.map(|h| {
            h.join()
                .unwrap_or_else(|_| Err(Error::Other("hashing the old file failed".into())))
        });
        (staged, md5)
    })
}

pub(super) fn describe(r: &Restarted) -> String {
    match r {
        Restarted::Confirmed(status) => format!("restarted, {status}"),
        Restarted::Commanded => "restarted".into(),
        Restarted::Skipped(why) => format!("not restarted: {why}"),
        Restarted::Signalled(how) => format!("restarted: {how}"),
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
