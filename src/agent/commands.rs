//! The operator's commands beside the cron run: `check` (dry run) and
//! `status` (table), both read-only; `init` (a starter manifest);
//! `rollback NAME` and `retry NAME`.

use super::install;
use super::manifest::Manifest;
use super::plan::{self, Action, Reason};
use super::service::{self, Restart};
use super::settings::{api_url, client_for, node_facts};
use super::state::{Count, Quarantined, State};
use super::upgrade::{backup_of, describe, hook_env};
use super::{check_only, host, lock, selected, Run, VERSION};
use crate::cli::{process_env, Args};
use crate::error::{Error, Result};
use crate::hash;
use crate::log::{self, Event};
use crate::{event, info, warn};
use std::fs;
use std::path::Path;

/// `check` (dry run) and `status` (table): read-only, no lock, no writes.
pub(super) fn check(args: &Args, config: &Path, table: bool) -> Result<u8> {
    let manifest = Manifest::load(config)?;
    check_only(args, &manifest)?;
    let facts = node_facts(&manifest);
    let mut client = client_for(args, &process_env, &manifest, config, &facts)?;
    let state = State::load(&State::path_for(config));
    client.node_token = state.node_token(&facts.name).map(str::to_string);
    if let Some(b) = state.backoff(log::unix_now()) {
        // Shown, not obeyed: an operator asking is not the fleet's cron.
        warn!(
            "the server asked to be left alone until {} ({}); runs ask nothing until then (`bin-proxy --now` overrides)",
            super::at(b.until),
            b.why
        );
    }
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
                    event!(Error, Event::new(&bin.name, "failed"), "{e}");
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
                    Action::HeldBack => (
                        format!(
                            "{}: would hold back {} (failed here: {})",
                            bin.name,
                            log::short(&remote.hash),
                            q.map_or("", |q| &q.error)
                        ),
                        "held back".into(),
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
pub(super) fn init(args: &Args, config: &Path) -> Result<u8> {
    if fs::symlink_metadata(config).is_ok() {
        return Err(Error::Other(format!(
            "\"{}\" already exists; not overwriting it",
            config.display()
        )));
    }
    // Checked before anything is written.
    let api = api_url(args, &process_env, None, config)?;
    let dir = crate::fsutil::parent(config);
    fs::create_dir_all(dir).map_err(|e| Error::io("creating directory", dir, e))?;
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

/// `rollback NAME`: put `PATH.bak` back, restart, hold back the build rolled
/// back from (so the next cron run does not reinstall it), record and report.
pub(super) fn rollback(args: &Args, config: &Path, name: &str) -> Result<u8> {
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
    let facts = node_facts(&manifest);
    let client = client_for(args, &process_env, &manifest, config, &facts)?;
    let mut run = Run::new(args, config, manifest, client, facts);
    let target = install::real_target(&bin.path);
    super::paths::check_owners(&bin.path, &target)?;
    let backup = backup_of(&target);
    if fs::symlink_metadata(&backup).is_err() {
        return Err(Error::Other(format!(
            "no backup of {name} to roll back to (\"{}\" does not exist); nothing changed",
            backup.display()
        )));
    }
    let from = run.state.actual_hash(&target)?.unwrap_or_default();
    let to = hash::md5_file(&backup)?;
    install::restore(&target, &backup)?;
    run.state.forget(&target);
    run.state.count(name, Count::Rollback);
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
    let ev = Event::new(name, "rolled_back").hashes(&from, &to);
    match restarted {
        Ok(r) => {
            event!(
                Info,
                ev,
                "rolled back {}→{}, {}; {} stays held back until a new build or `bin-proxy retry {name}`",
                log::short(&from),
                log::short(&to),
                describe(&r),
                log::short(&from)
            );
            Ok(0)
        }
        Err(e) => {
            event!(
                Error,
                ev,
                "rolled back {}→{}, but the restart failed: {e}",
                log::short(&from),
                log::short(&to)
            );
            Ok(1)
        }
    }
}

/// `retry NAME`: forget that a build failed here, so the next run tries it again.
pub(super) fn retry(config: &Path, name: &str) -> Result<u8> {
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
    let blocked = state.clear_block(name);
    if state.clear_quarantine(name) | blocked {
        state.save_if_changed(&state_path)?;
        event!(
            Info,
            Event::new(name, "released"),
            "no longer held back; the next run installs the published build again"
        );
    } else {
        event!(Info, Event::new(name, "released"), "nothing is held back");
    }
    Ok(0)
}
