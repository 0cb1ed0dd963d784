//! Putting a new build in place without ever exposing a partial file:
//! download into a temp file in the target's own directory (so the final
//! rename is atomic), hash while writing, verify, copy the old file's owner and
//! mode, fsync, keep the old file as `PATH.bak` (a hard link), rename over the
//! target (a running executable is never written to), fsync the directory.
//! Rollback renames the backup back the same way.

use crate::agent::backoff::Retries;
use crate::agent::client::{Client, CHUNK};
use crate::error::{Error, Result};
use crate::fsutil::{self, create_exclusive, sync_dir};
use crate::hash::{self, Md5, Sha256};
use crate::log;
use crate::protocol::BinInfo;
use std::fs::{self, File, Permissions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Downloads are attempted 3 times (transport errors, 5xx, truncation, a
/// 429/503 with a short Retry-After), waiting full-jitter 0..1 s, then 0..2 s
/// (at least the server's short delay), 30 s of waiting at most.
const RETRIES: Retries = Retries {
    attempts: 3,
    base: Duration::from_secs(1),
    cap: Duration::from_secs(8),
    budget: Duration::from_secs(30),
};
/// Blocks queued for each hash thread at most.
const HASH_QUEUE: usize = 2;
/// Files at least this large get progress lines…
const PROGRESS_MIN: u64 = 8 << 20;
/// …this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// A verified download waiting beside its target. Dropping it removes the file.
pub struct Staged {
    /// The temp file.
    pub tmp: PathBuf,
    /// Its md5.
    pub md5: String,
    /// Its size.
    pub size: u64,
    /// How long the download took.
    pub elapsed: Duration,
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// The path that is actually replaced: a symlink at the managed path is
/// followed, so the link keeps pointing where the operator made it point;
/// and its directory is resolved, so that the temp file, the backup and the
/// swap all happen in the directory the path leads to now — and a switch of
/// a symlinked directory mid-run shows as a different result.
pub fn real_target(path: &Path) -> PathBuf {
    let file = match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => {
            fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
        }
        _ => path.to_path_buf(),
    };
    match (fs::canonicalize(fsutil::parent(&file)), file.file_name()) {
        (Ok(dir), Some(name)) => dir.join(name),
        _ => file,
    }
}

/// Downloads `url` into a temp file beside `target` and checks it against
/// the published md5 (and sha256, when offered), retrying transport
/// failures with back-off.
pub fn stage(
    client: &Client,
    name: &str,
    url: &str,
    target: &Path,
    want: &BinInfo,
    max: u64,
) -> Result<Staged> {
    require_dir(target)?;
    let mut attempt = 1;
    let mut waited = Duration::ZERO;
    loop {
        let e = match stage_once(client, name, url, target, want, max) {
            Ok(staged) => return Ok(staged),
            Err(e) => super::tls_hint::classify(e),
        };
        let retry_after = match &e {
            Error::Busy { retry_after, .. } => *retry_after,
            _ => None,
        };
        let wait = super::plan::worth_retry(&e)
            .then(|| RETRIES.wait(attempt, waited, retry_after, super::random()))
            .flatten();
        let Some(wait) = wait else {
            return Err(e);
        };
        crate::event!(
            Warn,
            log::Event::new(name, "download_retry"),
            "download attempt {attempt} of {} failed: {e}; retrying in {} ms",
            RETRIES.attempts,
            wait.as_millis()
        );
        std::thread::sleep(wait);
        waited += wait;
        attempt += 1;
    }
}

/// The target's directory must exist: a missing one is most often a typo
/// in "path", and a tree is never created on a guess.
pub fn require_dir(target: &Path) -> Result<()> {
    let dir = fsutil::parent(target);
    if dir.is_dir() {
        return Ok(());
    }
    Err(Error::Other(format!(
        "directory \"{}\" does not exist (create it, or correct \"path\" in the manifest); nothing was downloaded",
        dir.display()
    )))
}

fn stage_once(
    client: &Client,
    name: &str,
    url: &str,
    target: &Path,
    want: &BinInfo,
    max: u64,
) -> Result<Staged> {
    let tmp = fsutil::temp_path(target, "dl");
    let mut file = create_exclusive(&tmp, 0o600)?;
    // From here on the temp file is removed on every exit path.
    let mut staged = Staged {
        tmp,
        md5: String::new(),
        size: 0,
        elapsed: Duration::ZERO,
    };
    let started = Instant::now();
    let total_len = std::cell::Cell::new(None);
    let mut last_report = started;
    let mut done: u64 = 0;
    let tmp = staged.tmp.clone();
    // The hashes run on their own threads while this one receives and
    // writes: each block goes from here to the md5 thread, from there to the
    // sha256 thread (when the server offers a sha256), and back here for
    // reuse. The three stages overlap, and memory stays at a few blocks
    // whatever the size.
    let (size, md5, sha256) = std::thread::scope(|scope| {
        // A block travels with the count of its bytes that are data.
        let (to_md5, md5_in) = mpsc::sync_channel::<(Vec<u8>, usize)>(HASH_QUEUE);
        let (to_sha, sha_in) = mpsc::sync_channel::<(Vec<u8>, usize)>(HASH_QUEUE);
        let (give_back, returned) = mpsc::channel::<Vec<u8>>();
        let sha_thread = want.sha256.is_some().then(|| {
            let give_back = give_back.clone();
            scope.spawn(move || {
                let mut sha = Sha256::new();
                for (block, n) in sha_in {
                    sha.update(&block[..n]);
                    let _ = give_back.send(block);
                }
                sha.hex()
            })
        });
        let onward = sha_thread.is_some().then_some(to_sha);
        let md5_thread = scope.spawn(move || {
            let mut md5 = Md5::new();
            for (block, n) in md5_in {
                md5.update(&block[..n]);
                // The next stage lives until its input closes: sends succeed.
                match &onward {
                    Some(sha) => {
                        let _ = sha.send((block, n));
                    }
                    None => {
                        let _ = give_back.send(block);
                    }
                }
            }
            md5.hex()
        });
        let size = client.download(url, max, &mut |len| total_len.set(len), &mut |buf, n| {
            if super::stop_requested() {
                return Err(Error::Stopped); // --every is stopping: abandon, nothing changed
            }
            file.write_all(&buf[..n])
                .map_err(|e| Error::io("writing", &tmp, e))?;
            // The block goes to the hashers as it is; a returned one (or a
            // new one, until some come back) takes its place.
            let next = returned.try_recv().unwrap_or_else(|_| vec![0; CHUNK]);
            let block = std::mem::replace(buf, next);
            // The md5 thread lives until this scope ends, so sending cannot fail.
            let _ = to_md5.send((block, n));
            done += n as u64;
            if total_len.get().unwrap_or(done) >= PROGRESS_MIN
                && last_report.elapsed() >= PROGRESS_EVERY
            {
                last_report = Instant::now();
                let of = total_len
                    .get()
                    .map(|t| format!(" of {}", log::size(t)))
                    .unwrap_or_default();
                crate::event!(
                    Info,
                    log::Event::new(name, "progress"),
                    "downloading, {}{of} ({})",
                    log::size(done),
                    log::rate(done, started.elapsed())
                );
            }
            Ok(())
        });
        // Closing the first stage ends the md5 thread, which closes the next.
        drop(to_md5);
        // Hash threads cannot panic: they only hash and send.
        let md5 = md5_thread.join().unwrap_or_default();
        let sha256 = sha_thread.map(|t| t.join().unwrap_or_default());
        size.map(|size| (size, md5, sha256))
    })?;
    staged.size = size;
    staged.md5 = md5;
    staged.elapsed = started.elapsed();
    if !hash::same(&staged.md5, &want.hash) {
        return Err(Error::HashMismatch {
            algo: "md5",
            expected: want.hash.clone(),
            got: staged.md5.clone(),
        });
    }
    if let (Some(expected), Some(got)) = (&want.sha256, sha256) {
        if !hash::same(&got, expected) {
            return Err(Error::HashMismatch {
                algo: "sha256",
                expected: expected.clone(),
                got,
            });
        }
    }
    file.sync_all()
        .map_err(|e| Error::io("syncing", &staged.tmp, e))?;
    Ok(staged)
}

/// Gives the staged file the old file's owner and mode (0755 for a fresh
/// install), keeps the old file as `backup`, and renames the new one over
/// `target`. Returns whether a backup was made.
pub fn swap(staged: &Staged, target: &Path, backup: &Path) -> Result<bool> {
    let file = File::open(&staged.tmp).map_err(|e| Error::io("opening", &staged.tmp, e))?;
    let old = match fs::metadata(target) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(Error::io("inspecting", target, e)),
    };
    let mode = match &old {
        Some(old) => {
            // Owner first: chown clears set-id bits, the chmod below restores them.
            let mine = file
                .metadata()
                .map_err(|e| Error::io("inspecting", &staged.tmp, e))?;
            if (mine.uid(), mine.gid()) != (old.uid(), old.gid()) {
                std::os::unix::fs::fchown(&file, Some(old.uid()), Some(old.gid()))
                    .map_err(|e| Error::io("giving the new file the old owner", &staged.tmp, e))?;
            }
            old.mode() & 0o7777
        }
        None => 0o755,
    };
    file.set_permissions(Permissions::from_mode(mode))
        .map_err(|e| Error::io("setting the mode of", &staged.tmp, e))?;
    if old.is_some() {
        // Last: chown and chmod clear file capabilities.
        fsutil::copy_xattrs(target, &file)?;
    }
    file.sync_all()
        .map_err(|e| Error::io("syncing", &staged.tmp, e))?;
    drop(file);

    if old.is_some() {
        keep_backup(target, backup)?;
    }
    fs::rename(&staged.tmp, target)
        .map_err(|e| Error::io("renaming the new file over", target, e))?;
    sync_dir(fsutil::parent(target))?;
    Ok(old.is_some())
}

/// Makes `backup` a hard link to the current `target`, replacing an older
/// backup atomically (link to a temp name, rename over). Falls back to a copy
/// on filesystems without hard links.
fn keep_backup(target: &Path, backup: &Path) -> Result<()> {
    let tmp = fsutil::temp_path(backup, "bak");
    let _ = fs::remove_file(&tmp);
    if fs::hard_link(target, &tmp).is_err() {
        // No hard links here: copy, into a file we create (never through a link).
        let mut out = create_exclusive(&tmp, 0o600)?;
        let mut old = File::open(target).map_err(|e| Error::io("reading", target, e))?;
        std::io::copy(&mut old, &mut out)
            .map_err(|e| Error::io("copying the old file to", &tmp, e))?;
        out.sync_all().map_err(|e| Error::io("syncing", &tmp, e))?;
    }
    // rename(2) between two names of one inode succeeds and does nothing: if the
    // backup already is the current file, the temp link would stay behind.
    let result =
        fs::rename(&tmp, backup).map_err(|e| Error::io("keeping the old file as", backup, e));
    let _ = fs::remove_file(&tmp);
    result
}

/// Puts `backup` back over `target` atomically. Refuses (changing nothing)
/// when there is no backup or the backup is the current file.
pub fn restore(target: &Path, backup: &Path) -> Result<()> {
    let bak = fs::metadata(backup).map_err(|e| Error::io("finding the backup", backup, e))?;
    if !bak.is_file() {
        return Err(Error::Other(format!(
            "backup \"{}\" is not a regular file; nothing restored",
            backup.display()
        )));
    }
    if let Ok(cur) = fs::metadata(target) {
        if (cur.dev(), cur.ino()) == (bak.dev(), bak.ino()) {
            return Err(Error::Other(format!(
                "backup \"{}\" is the running file itself; nothing to restore",
                backup.display()
            )));
        }
    }
    fs::rename(backup, target).map_err(|e| Error::io("restoring the backup over", target, e))?;
    sync_dir(fsutil::parent(target))
}
