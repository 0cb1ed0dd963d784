//! binDir: what is published. `binDir/NAME` is the latest build,
//! `binDir/ARCH/NAME` wins for an agent that sends `arch=ARCH`, and
//! `NAME@VERSION` files serve pinned versions. Hashes are computed from the
//! files and cached by what `fstat` says (device, inode, size, mtime, ctime),
//! so publishing is just an atomic `mv` into binDir. Every answer comes from
//! one open file descriptor, so a download that started before a publish
//! finishes with the old bytes, and a hash always describes the bytes served.
//!
//! Every build of a binary's slot (`NAME` or `ARCH/NAME`) is also kept as a
//! hard link `binDir/.builds/MD5` once it has been hashed, so that a staged
//! rollout can go on serving the previous build to the nodes not yet in it
//! after the file was replaced (a name starting with `.` is never served by
//! name). Builds no rollout needs are pruned.

use crate::error::{Error, Result};
use crate::fsutil;
use crate::hash;
use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// The tag of upload temp files (`.NAME.PIDup-N-RANDOM.bin-proxy-tmp`).
const UPLOAD_TAG: &str = "up";
/// The tag of the temp links that keep a build in `.builds/` (a hard link
/// shares the build's old mtime, so these are never swept by age).
const KEEP_TAG: &str = "keep";
/// An upload temp file not written to for this long is a crashed server's
/// leftover: a live upload's body reads time out after 10 s of silence, and
/// the last write is followed only by an fsync.
pub const STALE_UPLOAD: std::time::Duration = std::time::Duration::from_secs(600);

/// Whether a name (binary, arch, version, node) is safe to use as one path
/// component: `[A-Za-z0-9_-][A-Za-z0-9._-]*`, at most 128 bytes.
pub fn valid_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && b[0] != b'.'
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(c))
}

/// The identity of a file's contents as far as `stat` can tell.
type Key = (u64, u64, u64, (i64, i64), (i64, i64));

fn key(m: &fs::Metadata) -> Key {
    (
        m.dev(),
        m.ino(),
        m.size(),
        (m.mtime(), m.mtime_nsec()),
        (m.ctime(), m.ctime_nsec()),
    )
}

/// A published build, open and ready to serve.
pub struct Build {
    /// The open file.
    pub file: File,
    /// Its size.
    pub size: u64,
    /// Its md5 (hex).
    pub md5: String,
    /// Its sha256 (hex).
    pub sha256: String,
    /// "latest", or the pinned version served.
    pub version: String,
    /// The arch directory it was found in (`binDir/ARCH/NAME`), if any.
    pub arch_dir: Option<String>,
    /// Its signature document (`NAME.sig` beside it, or the copy kept with
    /// a kept build), when one names this very sha256; not verified here.
    pub signature: Option<String>,
}

/// The signature document in `path` unless it is one for another build.
fn signature_in(path: &Path, sha256: &str) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let line = text.trim_end_matches('\n');
    // One for another build (left from before a publish) is not this
    // build's; one that does not parse is passed on for the agents to judge.
    match crate::sign::Document::parse(line) {
        Ok(d) if !d.sha256.eq_ignore_ascii_case(sha256) => None,
        _ => Some(crate::protocol::one_line(line, crate::sign::MAX_LEN)),
    }
}

/// `PATH.sig`.
pub fn sig_path(path: &Path) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".sig");
    PathBuf::from(p)
}

/// What [`Store::lookup`] found.
pub enum Lookup {
    /// The build, hashed.
    Found(Build),
    /// Nothing published under that name.
    Missing,
    /// A file that would have to be hashed first.
    Unhashed,
}

/// One line of the `GET bins` listing.
pub struct Listed {
    /// Binary name.
    pub name: String,
    /// Arch directory it is under, if any.
    pub arch: Option<String>,
    /// Pinned version, if any.
    pub version: Option<String>,
    /// Size in bytes.
    pub size: u64,
}

/// The directory under binDir that keeps builds by md5.
const KEPT: &str = ".builds";

/// The binDir and its hash cache.
pub struct Store {
    dir: PathBuf,
    cache: Mutex<HashMap<PathBuf, (Key, String, String)>>,
}

impl Store {
    /// Opens a binDir; it must exist and be readable.
    pub fn open(dir: &Path) -> Result<Store> {
        fs::read_dir(dir).map_err(|e| Error::io("reading binDir", dir, e))?;
        Ok(Store {
            dir: dir.to_path_buf(),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The file that serves `name` for `arch` and `version`, most specific
    /// first. All parts must be [`valid_name`]s (the caller checks).
    fn candidates<'a>(
        &self,
        name: &str,
        arch: Option<&'a str>,
        version: Option<&str>,
    ) -> Vec<(PathBuf, Option<&'a str>)> {
        let file = match version {
            Some(v) => format!("{name}@{v}"),
            None => name.to_string(),
        };
        let mut out = Vec::with_capacity(2);
        if let Some(arch) = arch {
            out.push((self.dir.join(arch).join(&file), Some(arch)));
        }
        out.push((self.dir.join(file), None));
        out
    }

    /// Opens the build for `name`, or `None` when nothing is published.
    pub fn get(
        &self,
        name: &str,
        arch: Option<&str>,
        version: Option<&str>,
    ) -> Result<Option<Build>> {
        Ok(match self.lookup(name, arch, version, true)? {
            Lookup::Found(build) => Some(build),
            Lookup::Missing | Lookup::Unhashed => None,
        })
    }

    /// Like [`Store::get`], but hashes a file only if `may_hash`; otherwise a
    /// file not hashed yet (new, or changed since) is [`Lookup::Unhashed`].
    pub fn lookup(
        &self,
        name: &str,
        arch: Option<&str>,
        version: Option<&str>,
        may_hash: bool,
    ) -> Result<Lookup> {
        for (path, arch_dir) in self.candidates(name, arch, version) {
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("opening", &path, e)),
            };
            let meta = file
                .metadata()
                .map_err(|e| Error::io("inspecting", &path, e))?;
            if !meta.is_file() {
                continue;
            }
            let k = key(&meta);
            let cached = self
                .lock()
                .get(&path)
                .filter(|(ck, _, _)| *ck == k)
                .map(|(_, m, s)| (m.clone(), s.clone()));
            let (md5, sha256) = match cached {
                Some(hashes) => hashes,
                None if !may_hash => return Ok(Lookup::Unhashed),
                None => {
                    // Hash the very descriptor that will be served (the
                    // response seeks back to its start).
                    let (md5, sha, _) = hash::digest_all(&file, &path)?;
                    let mut k = k;
                    if version.is_none() {
                        self.keep(&path, &meta, &file, &md5);
                        // A new link changes the inode's ctime, which the
                        // cache key holds: take the key again.
                        if let Ok(m) = file.metadata() {
                            k = key(&m);
                        }
                    }
                    self.lock()
                        .insert(path.clone(), (k, md5.clone(), sha.clone()));
                    (md5, sha)
                }
            };
            let signature = signature_in(&sig_path(&path), &sha256);
            if let Some(sig) = &signature {
                // Kept with the build, for a rollout that serves it later.
                let kept = sig_path(&self.dir.join(KEPT).join(&md5));
                if version.is_none() && self.dir.join(KEPT).join(&md5).exists() && !kept.exists() {
                    let _ = fsutil::atomic_write(&kept, format!("{sig}\n").as_bytes(), 0o644);
                }
            }
            let version = version.unwrap_or("latest").to_string();
            return Ok(Lookup::Found(Build {
                signature,
                file,
                size: meta.size(),
                md5,
                sha256,
                version,
                arch_dir: arch_dir.map(str::to_string),
            }));
        }
        Ok(Lookup::Missing)
    }

    /// A kept build by md5 (see the module comment), or `None` when it is
    /// not kept. Its hashes are trusted from `sha256` (ours, from when it
    /// was published); its size is the file's.
    pub fn kept(&self, md5: &str, sha256: &str) -> Result<Option<Build>> {
        if !hash::is_md5(md5) {
            return Ok(None);
        }
        let path = self.dir.join(KEPT).join(md5.to_ascii_lowercase());
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("opening", &path, e)),
        };
        let meta = file
            .metadata()
            .map_err(|e| Error::io("inspecting", &path, e))?;
        Ok(Some(Build {
            signature: signature_in(&sig_path(&path), sha256),
            file,
            size: meta.size(),
            md5: md5.to_ascii_lowercase(),
            sha256: sha256.to_string(),
            version: "latest".into(),
            arch_dir: None,
        }))
    }

    /// Keeps the build just hashed from `file` (opened at `path`) as
    /// `.builds/MD5`: a hard link under a temp name, checked to be the very
    /// inode that was hashed (the path may have been replaced meanwhile),
    /// then renamed into place; a copy of the open file where a link is not
    /// possible. Failing to keep a build is logged, not fatal: only a later
    /// rollout from it would miss it (and says so).
    fn keep(&self, path: &Path, meta: &fs::Metadata, file: &File, md5: &str) {
        let dir = self.dir.join(KEPT);
        let dest = dir.join(md5);
        if dest.exists() {
            return;
        }
        let result = (|| -> Result<()> {
            fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
            // Of its own: two requests may keep the same new build at once.
            let tmp = fsutil::unique_temp_path(&dest, KEEP_TAG);
            let linked = fs::hard_link(path, &tmp).is_ok()
                && fs::metadata(&tmp).is_ok_and(|m| (m.dev(), m.ino()) == (meta.dev(), meta.ino()));
            if !linked {
                let _ = fs::remove_file(&tmp);
                let mut out = fsutil::create_exclusive(&tmp, 0o644)?;
                let copied = std::io::copy(&mut Read::take(&mut &*file, meta.size()), &mut out)
                    .map_err(|e| Error::io("copying", &tmp, e));
                let synced =
                    copied.and_then(|_| out.sync_all().map_err(|e| Error::io("syncing", &tmp, e)));
                if let Err(e) = synced {
                    let _ = fs::remove_file(&tmp);
                    return Err(e);
                }
                use std::io::Seek;
                let _ = (&*file).seek(std::io::SeekFrom::Start(0));
            }
            fs::rename(&tmp, &dest).map_err(|e| Error::io("renaming into place", &dest, e))?;
            fsutil::sync_dir(&dir)
        })();
        if let Err(e) = result {
            crate::warn!(
                "cannot keep a copy of \"{}\" for rollouts: {e}",
                path.display()
            );
        }
    }

    /// Removes the kept builds whose md5 is not in `needed`.
    pub fn prune_kept(&self, needed: &std::collections::HashSet<String>) {
        let dir = self.dir.join(KEPT);
        let Ok(entries) = fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            let md5 = name.strip_suffix(".sig").unwrap_or(&name);
            if hash::is_md5(md5) && !needed.contains(md5) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Publishes `len` bytes from `body` as `name` (for `arch`, `version`):
    /// streamed to a temp file of its own in the destination directory
    /// (unique to this upload, so concurrent uploads of one name, or of
    /// `app` and `app.x`, never touch each other's), fsynced, renamed into
    /// place, directory fsynced. Returns (md5, sha256) of exactly the bytes
    /// renamed into place: hashed as they were written to that file, which
    /// only this upload has open, and checked to still be the file under the
    /// temp name at the rename.
    pub fn publish(
        &self,
        name: &str,
        arch: Option<&str>,
        version: Option<&str>,
        body: &mut dyn Read,
        len: u64,
        check: &dyn Fn(&str) -> Result<Option<String>>,
    ) -> Result<(String, String)> {
        let dest = self.candidates(name, arch, version).remove(0).0;
        let dir = fsutil::parent(&dest).to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| Error::io("creating", &dir, e))?;
        let tmp = fsutil::unique_temp_path(&dest, UPLOAD_TAG);
        let result = (|| {
            let mut file = fsutil::create_exclusive(&tmp, 0o644)?;
            let (mut md5, mut sha) = (hash::Md5::new(), hash::Sha256::new());
            let mut buf = vec![0u8; hash::BLOCK];
            let mut got = 0u64;
            while got < len {
                let n = body.read(&mut buf).map_err(|e| Error::Upload {
                    got,
                    len,
                    source: e,
                })?;
                if n == 0 {
                    return Err(Error::Upload {
                        got,
                        len,
                        source: std::io::ErrorKind::UnexpectedEof.into(),
                    });
                }
                file.write_all(&buf[..n])
                    .map_err(|e| Error::io("writing", &tmp, e))?;
                md5.update(&buf[..n]);
                sha.update(&buf[..n]);
                got += n as u64;
            }
            file.sync_all().map_err(|e| Error::io("syncing", &tmp, e))?;
            let mine = file
                .metadata()
                .map_err(|e| Error::io("inspecting", &tmp, e))?;
            match fs::symlink_metadata(&tmp) {
                Ok(m) if (m.dev(), m.ino()) == (mine.dev(), mine.ino()) => {}
                _ => {
                    return Err(Error::Other(format!(
                        "\"{}\": the upload's temp file was removed or replaced by someone else; nothing published",
                        tmp.display()
                    )))
                }
            }
            let (md5, sha) = (md5.hex(), sha.hex());
            // The signature goes in before the build it covers (or the old
            // one goes away when the new build comes unsigned).
            let sig = sig_path(&dest);
            match check(&sha)? {
                Some(line) => fsutil::atomic_write(&sig, format!("{line}\n").as_bytes(), 0o644)?,
                None => match fs::remove_file(&sig) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(Error::io("removing the old signature", &sig, e))
                    }
                    _ => {}
                },
            }
            fs::rename(&tmp, &dest).map_err(|e| Error::io("renaming into place", &dest, e))?;
            fsutil::sync_dir(&dir)?;
            // The next lookup of these very bytes needs no second read (the
            // rename changed the ctime: stat the file again).
            if let Ok(meta) = file.metadata() {
                self.lock()
                    .insert(dest.clone(), (key(&meta), md5.clone(), sha.clone()));
            }
            Ok((md5, sha))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Removes the temp files of uploads a crashed server left in binDir and
    /// its arch directories: those not written to for [`STALE_UPLOAD`]. Never
    /// a live upload's (it writes every few seconds or fails and removes its
    /// own), so several servers may share a binDir. Returns how many.
    pub fn sweep_stale_uploads(&self) -> usize {
        let mut removed = fsutil::sweep_stale_uploads(&self.dir, UPLOAD_TAG, STALE_UPLOAD);
        if let Ok(entries) = fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                if is_dir && entry.file_name().to_str().is_some_and(valid_name) {
                    removed += fsutil::sweep_stale_uploads(&entry.path(), UPLOAD_TAG, STALE_UPLOAD);
                }
            }
        }
        removed
    }

    /// Everything published, sorted by name, arch, version.
    pub fn list(&self) -> Vec<Listed> {
        let mut out = Vec::new();
        self.list_dir(&self.dir, None, &mut out);
        out.sort_by(|a, b| (&a.name, &a.arch, &a.version).cmp(&(&b.name, &b.arch, &b.version)));
        out
    }

    fn list_dir(&self, dir: &Path, arch: Option<&str>, out: &mut Vec<Listed>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(file) = entry.file_name().into_string() else {
                continue;
            };
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() && arch.is_none() && valid_name(&file) {
                self.list_dir(&entry.path(), Some(&file), out);
            } else if meta.is_file() {
                let (name, version) = match file.split_once('@') {
                    Some((n, v)) => (n.to_string(), Some(v.to_string())),
                    None => (file.clone(), None),
                };
                if valid_name(&name) && version.as_deref().is_none_or(valid_name) {
                    out.push(Listed {
                        name,
                        arch: arch.map(str::to_string),
                        version,
                        size: meta.size(),
                    });
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, (Key, String, String)>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (single inserts), so a poisoned lock is still usable.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["myapp", "my-app_2", "a.b", "x86_64", "1.2.3", "A"] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "../etc/passwd",
            "a\0b",
            "a b",
            "é",
            &"a".repeat(129),
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
