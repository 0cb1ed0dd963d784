//! Putting a new build in place without ever exposing a partial file:
//! download into a temp file in the target's own directory (so the final
//! rename is atomic), hash while writing, verify, copy the old file's owner and
//! mode, fsync, keep the old file as `PATH.bak` (a hard link), rename over the
//! target (a running executable is never written to), fsync the directory.
//! Rollback renames the backup back the same way.

use crate::agent::backoff::Retries;
use crate::agent::client::{Begin, Client, From, CHUNK};
use crate::agent::state::Partial;
use crate::error::{Error, Result};
use crate::fsutil::{self, create_exclusive, sync_dir};
use crate::hash::{self, Md5, Sha256};
use crate::log;
use crate::protocol::BinInfo;
use std::cell::RefCell;
use std::fs::{self, File, Permissions};
use std::io::{Read, Seek, SeekFrom, Write};
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
/// A resumable download syncs and journals its bytes this often.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(2);
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
    /// A partial download kept to resume: not removed.
    keep: bool,
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.tmp);
        }
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

/// Records (`Some`: its bytes are synced; save the state now) or forgets
/// (`None`) the journal entry of a binary's partial download.
pub type Journal<'a> = dyn FnMut(Option<&Partial>) + 'a;

/// Downloads `url` into a temp file beside `target` and checks it against
/// the published md5 (and sha256, when offered), retrying transport
/// failures with back-off. A download the server made resumable (a strong
/// `ETag`) that is cut off keeps its temp file and its `journal` entry; the
/// next attempt, in this run or a later one (`partial`), asks for the rest.
#[allow(clippy::too_many_arguments)]
pub fn stage(
    client: &Client,
    name: &str,
    url: &str,
    target: &Path,
    want: &BinInfo,
    max: u64,
    partial: Option<Partial>,
    journal: &mut Journal,
) -> Result<Staged> {
    require_dir(target)?;
    let mut partial = partial;
    let mut attempt = 1;
    let mut waited = Duration::ZERO;
    loop {
        let e = match stage_once(client, name, url, target, want, max, &mut partial, journal) {
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

/// The partial download worth resuming: of this URL and build, beside
/// this target, its bytes still on disk. Any other is removed and forgotten.
fn usable(
    p: Partial,
    url: &str,
    target: &Path,
    want: &BinInfo,
    journal: &mut Journal,
) -> Option<Partial> {
    let same_sha = match (&p.sha256, &want.sha256) {
        (Some(a), Some(b)) => hash::same(a, b),
        (a, b) => a.is_none() && b.is_none(),
    };
    let on_disk = fs::symlink_metadata(&p.file).ok();
    let why = if p.url != url {
        "it came from another URL"
    } else if !hash::same(&p.md5, &want.hash) || !same_sha {
        "another build is published"
    } else if fsutil::parent(&p.file) != fsutil::parent(target) {
        "the target is in another directory now"
    } else if !on_disk
        .as_ref()
        .is_some_and(|m| m.is_file() && m.len() >= p.bytes)
    {
        "its file is missing or shorter than journalled"
    } else {
        return Some(p);
    };
    crate::event!(
        Info,
        log::Event::new(&p.name, "partial_discarded"),
        "not resuming the download cut off at {}: {why}; starting from byte 0",
        log::size(p.bytes)
    );
    if on_disk.is_some() {
        let _ = fs::remove_file(&p.file);
    }
    journal(None);
    None
}

/// The temp file being written, with its journal entry while the download
/// is resumable.
struct Out<'j, 'a> {
    file: File,
    tmp: PathBuf,
    /// Bytes in the file.
    pos: u64,
    entry: Option<Partial>,
    synced: Instant,
    journal: &'j mut Journal<'a>,
}

impl Out<'_, '_> {
    /// Syncs the bytes written and journals them: a kill from here on
    /// loses nothing before `pos`.
    fn checkpoint(&mut self) -> Result<()> {
        if let Some(e) = &mut self.entry {
            self.file
                .sync_data()
                .map_err(|err| Error::io("syncing", &self.tmp, err))?;
            e.bytes = self.pos;
            (self.journal)(Some(e));
        }
        self.synced = Instant::now();
        Ok(())
    }
}

#[allow(clippy::too_many_arguments)]
fn stage_once(
    client: &Client,
    name: &str,
    url: &str,
    target: &Path,
    want: &BinInfo,
    max: u64,
    partial: &mut Option<Partial>,
    journal: &mut Journal,
) -> Result<Staged> {
    let resume = partial
        .take()
        .and_then(|p| usable(p, url, target, want, journal));
    // Bytes past the journalled count may not have reached the disk.
    let reopened = resume.as_ref().and_then(|p| {
        let opened = fs::OpenOptions::new()
            .write(true)
            .open(&p.file)
            .and_then(|mut f| {
                f.set_len(p.bytes)?;
                f.seek(SeekFrom::Start(p.bytes))?;
                Ok(f)
            });
        match opened {
            Ok(f) => Some((p.file.clone(), f, p.bytes)),
            Err(e) => {
                // Never retried on the next run: the entry goes with the file.
                crate::event!(
                    Warn,
                    log::Event::new(name, "partial_discarded"),
                    "cannot reopen the partial download \"{}\": {e}; starting from byte 0",
                    p.file.display()
                );
                let _ = fs::remove_file(&p.file);
                journal(None);
                None
            }
        }
    });
    let resume = resume.filter(|_| reopened.is_some());
    let (tmp, file, pos) = match reopened {
        Some(r) => r,
        None => {
            let tmp = fsutil::temp_path(target, "dl");
            let file = create_exclusive(&tmp, 0o600)?;
            (tmp, file, 0)
        }
    };
    // From here on the temp file is removed on every exit path but a
    // resumable cut.
    let mut staged = Staged {
        tmp: tmp.clone(),
        md5: String::new(),
        size: 0,
        elapsed: Duration::ZERO,
        keep: false,
    };
    let from = resume.as_ref().map(|p| From {
        offset: p.bytes,
        etag: p.etag.clone(),
        total: p.size,
    });
    let out = RefCell::new(Out {
        file,
        tmp,
        pos,
        entry: resume,
        synced: Instant::now(),
        journal,
    });
    let started = Instant::now();
    let total_len = std::cell::Cell::new(None);
    let resumed_at = std::cell::Cell::new(0);
    let mut last_report = started;
    // The hashes run on their own threads while this one receives and
    // writes: each block goes from here to the md5 thread, from there to the
    // sha256 thread (when the server offers a sha256), and back here for
    // reuse. The three stages overlap, and memory stays at a few blocks
    // whatever the size.
    let result = std::thread::scope(|scope| {
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
        // The md5 thread lives until this scope ends, so sending cannot fail.
        let next_block = || returned.try_recv().unwrap_or_else(|_| vec![0; CHUNK]);
        let mut on_start = |b: &Begin| -> Result<()> {
            let mut out = out.borrow_mut();
            if let Some(why) = &b.restart {
                crate::event!(
                    Warn,
                    log::Event::new(name, "resume_refused"),
                    "not resuming at {}: {why}; downloading it again from byte 0",
                    log::size(out.pos)
                );
            }
            let (tmp, at) = (out.tmp.clone(), b.offset);
            if at == 0 {
                // The whole file follows: never append it to the part on disk.
                if out.pos > 0 {
                    out.file
                        .set_len(0)
                        .and_then(|()| out.file.seek(SeekFrom::Start(0)).map(drop))
                        .map_err(|e| Error::io("truncating", &tmp, e))?;
                    out.pos = 0;
                }
            } else {
                // The bytes on disk go through the hashers first.
                let mut r = File::open(&tmp).map_err(|e| Error::io("reading", &tmp, e))?;
                let mut left = at;
                while left > 0 {
                    let mut block = next_block();
                    let n = usize::try_from(left).unwrap_or(CHUNK).min(CHUNK);
                    r.read_exact(&mut block[..n])
                        .map_err(|e| Error::io("reading", &tmp, e))?;
                    let _ = to_md5.send((block, n));
                    left -= n as u64;
                }
                crate::event!(
                    Info,
                    log::Event::new(name, "resuming"),
                    "resuming the download at {}{}",
                    log::size(at),
                    b.total
                        .map(|t| format!(" of {}", log::size(t)))
                        .unwrap_or_default()
                );
                resumed_at.set(at);
            }
            total_len.set(b.total);
            out.entry = b.etag.clone().map(|etag| Partial {
                name: name.to_string(),
                url: url.to_string(),
                file: tmp,
                md5: want.hash.clone(),
                sha256: want.sha256.clone(),
                etag,
                size: b.total,
                bytes: 0,
            });
            match out.entry.is_some() {
                true => out.checkpoint(),
                false => {
                    (out.journal)(None);
                    Ok(())
                }
            }
        };
        let size = client.download(url, max, from.as_ref(), &mut on_start, &mut |buf, n| {
            if super::stop_requested() {
                return Err(Error::Stopped); // --every is stopping: abandon, nothing changed
            }
            let mut out = out.borrow_mut();
            let tmp = &out.tmp.clone();
            out.file
                .write_all(&buf[..n])
                .map_err(|e| Error::io("writing", tmp, e))?;
            out.pos += n as u64;
            // The block goes to the hashers as it is; a returned one (or a
            // new one, until some come back) takes its place.
            let block = std::mem::replace(buf, next_block());
            let _ = to_md5.send((block, n));
            let done = out.pos;
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
                    log::rate(done - resumed_at.get(), started.elapsed())
                );
            }
            if out.entry.is_some() && out.synced.elapsed() >= CHECKPOINT_EVERY {
                out.checkpoint()?;
            }
            Ok(())
        });
        // Closing the first stage ends the md5 thread, which closes the next.
        drop(to_md5);
        // Hash threads cannot panic: they only hash and send.
        let md5 = md5_thread.join().unwrap_or_default();
        let sha256 = sha_thread.map(|t| t.join().unwrap_or_default());
        size.map(|size| (size, md5, sha256))
    });
    let mut out = out.into_inner();
    let (size, md5, sha256) = match result {
        Ok(done) => done,
        Err(e) => {
            // Cut off while resumable: keep what arrived for the next attempt.
            if out.entry.is_some()
                && (super::plan::worth_retry(&e) || matches!(e, Error::Stopped))
                && out.checkpoint().is_ok()
            {
                staged.keep = true;
                *partial = out.entry.take();
                crate::event!(
                    Debug,
                    log::Event::new(name, "partial_kept"),
                    "kept the {} received in \"{}\" to resume",
                    log::size(out.pos),
                    staged.tmp.display()
                );
            } else {
                (out.journal)(None);
            }
            return Err(e);
        }
    };
    // Complete: whatever it verifies to, it is never resumed again.
    (out.journal)(None);
    // The hashes are of the bytes received (and, resumed, of those on
    // disk before them): the file must hold exactly those.
    let on_disk = out
        .file
        .metadata()
        .map_err(|e| Error::io("inspecting", &staged.tmp, e))?
        .len();
    if on_disk != size {
        return Err(Error::Other(format!(
            "\"{}\" holds {on_disk} bytes, not the {size} downloaded; discarded it",
            staged.tmp.display()
        )));
    }
    staged.size = size;
    staged.md5 = md5;
    staged.elapsed = started.elapsed();
    let resumed = match resumed_at.get() {
        0 => String::new(),
        at => format!(
            " (resumed at {}; the partial download is discarded, the next attempt starts from byte 0)",
            log::size(at)
        ),
    };
    if !hash::same(&staged.md5, &want.hash) {
        if !resumed.is_empty() {
            crate::event!(
                Warn,
                log::Event::new(name, "resume_failed"),
                "the resumed download does not verify{resumed}"
            );
        }
        return Err(Error::HashMismatch {
            algo: "md5",
            expected: want.hash.clone(),
            got: staged.md5.clone(),
        });
    }
    if let (Some(expected), Some(got)) = (&want.sha256, sha256) {
        if !hash::same(&got, expected) {
            if !resumed.is_empty() {
                crate::event!(
                    Warn,
                    log::Event::new(name, "resume_failed"),
                    "the resumed download does not verify{resumed}"
                );
            }
            return Err(Error::HashMismatch {
                algo: "sha256",
                expected: expected.clone(),
                got,
            });
        }
    }
    out.file
        .sync_all()
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
