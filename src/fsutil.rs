//! Crash-safe file replacement shared by the manifest, the agent's state file
//! and the installer: write a temp file beside the target, fsync it, rename it
//! over the target, fsync the directory. A reader (or a crash) sees the whole
//! old file or the whole new one, never a mix.

use crate::error::{Error, Result};
use crate::sys;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Every temp file this program creates ends with this, so that a later run
/// can recognise and sweep the leftovers of a killed one.
const TEMP_SUFFIX: &str = ".bin-proxy-tmp";

/// The directory holding `path` (`.` for a bare file name).
pub fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A temp path beside `target`, unique to this process:
/// `/usr/local/bin/.myapp.4242.bin-proxy-tmp`. Hidden, so that it does not
/// show up in `ls` or shell completion while it exists.
pub fn temp_path(target: &Path, tag: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    parent(target).join(format!(".{name}.{}{tag}{TEMP_SUFFIX}", std::process::id()))
}

/// Creates a new file exclusively: fails if anything, even a dangling
/// symlink, already has that name (`O_CREAT|O_EXCL` never follows links).
pub fn create_exclusive(path: &Path, mode: u32) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io("creating", path, e))
}

/// A temp path beside `target` that no other upload, thread or process can
/// be given: `.myapp.4242up-7-9f3c5a1e2b4d6f80.bin-proxy-tmp` (pid, `tag`,
/// a per-process counter and a random number). For bin-manager, where many
/// uploads of one name may run at once and no lock orders them. Never
/// matched by [`sweep_temps`]; [`sweep_stale_uploads`] removes the ones a
/// crash left.
pub fn unique_temp_path(target: &Path, tag: &str) -> PathBuf {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // std seeds every RandomState from the OS's random source.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    parent(target).join(format!(
        ".{name}.{}{tag}-{n}-{:016x}{TEMP_SUFFIX}",
        std::process::id(),
        h.finish()
    ))
}

/// Whether `file` is a temp name [`temp_path`] made for `target_name`:
/// `.NAME.` + digits and a lowercase tag + the suffix, and nothing else — so
/// that sweeping `app` never touches `.app.x.4242.bin-proxy-tmp`, which
/// belongs to `app.x`.
fn is_temp_of(file: &str, target_name: &str) -> bool {
    let Some(rest) = file
        .strip_prefix('.')
        .and_then(|f| f.strip_prefix(target_name))
        .and_then(|f| f.strip_prefix('.'))
        .and_then(|f| f.strip_suffix(TEMP_SUFFIX))
    else {
        return false;
    };
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0 && rest.bytes().skip(digits).all(|b| b.is_ascii_lowercase())
}

/// Removes the temp files that runs of this program left beside `target`
/// when they were killed. Only call it while holding the run lock. Returns
/// how many were removed.
pub fn sweep_temps(target: &Path) -> usize {
    let Some(name) = target.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return 0;
    };
    sweep_dir(parent(target), |file| is_temp_of(file, &name), |_| true)
}

/// Removes, in `dir`, the upload temp files ([`unique_temp_path`] with
/// `tag`) not written to for `age`: an upload still in progress writes at
/// least every few seconds (or fails and removes its own file), so only the
/// leftovers of a crashed server are this old. Returns how many were removed.
pub fn sweep_stale_uploads(dir: &Path, tag: &str, age: std::time::Duration) -> usize {
    let marker = format!("{tag}-");
    sweep_dir(
        dir,
        |file| file.starts_with('.') && file.ends_with(TEMP_SUFFIX) && file.contains(&marker),
        |meta| {
            meta.modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|e| e >= age)
        },
    )
}

/// The temp files of earlier runs, one directory listing per run: an idle
/// run sweeps beside every binary, and 50 binaries in one directory swept
/// from a fresh listing each (the target's and its backup's) were 100
/// listings, two thirds of the run's system calls. Only names are kept
/// (those that look like any temp file); what this run creates later is
/// its own and not swept. Only use it while holding the run lock.
#[derive(Debug, Default)]
pub struct Temps {
    dirs: std::collections::HashMap<PathBuf, Vec<String>>,
}

impl Temps {
    /// Removes the temp files earlier runs left beside `target` (and its
    /// backup `backup`), sparing `keep`; returns how many were removed.
    pub fn sweep(&mut self, target: &Path, backup: &Path, keep: Option<&Path>) -> usize {
        let dir = parent(target);
        let names = self.dirs.entry(dir.to_path_buf()).or_insert_with(|| {
            let Ok(entries) = fs::read_dir(dir) else {
                return Vec::new();
            };
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|f| f.starts_with('.') && f.ends_with(TEMP_SUFFIX))
                .collect()
        });
        let of = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
        let (Some(name), backup) = (of(target), of(backup)) else {
            return 0;
        };
        let keep = keep.and_then(of);
        let mut removed = 0;
        names.retain(|file| {
            let picked = (is_temp_of(file, &name)
                || backup.as_ref().is_some_and(|b| is_temp_of(file, b)))
                && keep.as_ref() != Some(file);
            if !picked {
                return true;
            }
            let path = dir.join(file);
            match fs::symlink_metadata(&path) {
                Ok(m) if !m.is_dir() && fs::remove_file(&path).is_ok() => {
                    removed += 1;
                    false
                }
                _ => true,
            }
        });
        removed
    }
}

/// Removes the entries of `dir` (never following links) whose name `name`
/// picks and whose metadata `meta` then does. Only the names picked are
/// `lstat`ed: an idle run sweeps beside every binary, and 50 binaries in one
/// directory would otherwise be 5,000 `lstat`s a run.
fn sweep_dir(
    dir: &Path,
    name: impl Fn(&str) -> bool,
    meta: impl Fn(&fs::Metadata) -> bool,
) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let file = entry.file_name();
        if !name(&file.to_string_lossy()) {
            continue;
        }
        let Ok(m) = fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if !m.is_dir() && meta(&m) && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// fsyncs a directory, making the renames and links in it durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("syncing directory", dir, e))
}

/// The mode a replaced file gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The existing file's mode and owner; this mode for a new file.
    Keep(u32),
    /// Exactly this mode (the existing owner is still kept): for files that
    /// hold secrets, which must not stay readable because an operator once
    /// loosened them.
    Force(u32),
}

/// Replaces `path` with `bytes` atomically and durably. An existing file
/// keeps its mode and owner; a new one gets `new_mode`.
pub fn atomic_write(path: &Path, bytes: &[u8], new_mode: u32) -> Result<()> {
    atomic_write_with(path, Mode::Keep(new_mode), &mut |w| w.write_all(bytes))
}

/// [`atomic_write`] for contents produced by a writer (streamed, never
/// held whole in memory).
pub fn atomic_write_with(
    path: &Path,
    mode: Mode,
    contents: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let old = fs::metadata(path).ok();
    let tmp = temp_path(path, "");
    let new_mode = match mode {
        Mode::Keep(m) | Mode::Force(m) => m,
    };
    let result = (|| {
        let file = create_exclusive(&tmp, new_mode)?;
        let mut out = std::io::BufWriter::with_capacity(256 * 1024, file);
        contents(&mut out).map_err(|e| Error::io("writing", &tmp, e))?;
        let file = out
            .into_inner()
            .map_err(|e| Error::io("writing", &tmp, e.into_error()))?;
        if let Some(old) = &old {
            // Owner first: chown clears set-id bits, chmod then restores them.
            if old.uid() != file_owner(&file).0 || old.gid() != file_owner(&file).1 {
                std::os::unix::fs::fchown(&file, Some(old.uid()), Some(old.gid()))
                    .map_err(|e| Error::io("setting the owner of", &tmp, e))?;
            }
        }
        // A new file keeps the mode it was created with (under the umask).
        let final_mode = match (mode, &old) {
            (Mode::Keep(_), Some(old)) => Some(old.mode() & 0o7777),
            (Mode::Keep(_), None) => None,
            (Mode::Force(m), _) => Some(m),
        };
        if let Some(m) = final_mode {
            file.set_permissions(Permissions::from_mode(m))
                .map_err(|e| Error::io("setting the mode of", &tmp, e))?;
        }
        file.sync_all().map_err(|e| Error::io("syncing", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| Error::io("renaming into place", path, e))?;
        sync_dir(parent(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Copies every extended attribute of `from` onto the open file `to`: file
/// capabilities (`security.capability`), ACLs, SELinux labels, user notes.
/// Call it after chown and chmod, which clear capabilities. A filesystem
/// without xattr support has none to copy.
pub fn copy_xattrs(from: &Path, to: &File) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let fail = |e: std::io::Error| Error::io("copying extended attributes of", from, e);
    let path = CString::new(from.as_os_str().as_bytes())
        .map_err(|_| Error::Other(format!("\"{}\": NUL in path", from.display())))?;
    let names = match sys::list_xattrs(&path) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(95) => return Ok(()), // EOPNOTSUPP: none here
        Err(e) => return Err(fail(e)),
    };
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = CString::new(name).map_err(|_| Error::Other("xattr name with NUL".into()))?;
        let value = sys::get_xattr(&path, &name).map_err(fail)?;
        sys::set_xattr(to, &name, &value).map_err(|e| {
            Error::Other(format!(
                "\"{}\": cannot give the new file the extended attribute {}: {e}",
                from.display(),
                name.to_string_lossy()
            ))
        })?;
    }
    Ok(())
}

fn file_owner(file: &File) -> (u32, u32) {
    file.metadata()
        .map_or((u32::MAX, u32::MAX), |m| (m.uid(), m.gid()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("bin-proxy-fsutil-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn atomic_write_keeps_mode_and_leaves_no_temp() {
        let dir = scratch("write");
        let path = dir.join("m.json");
        atomic_write(&path, b"one", 0o600).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
        fs::set_permissions(&path, Permissions::from_mode(0o640)).unwrap();
        atomic_write(&path, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o640);
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        // A secret's mode is forced back, whatever it was loosened to.
        atomic_write_with(&path, Mode::Force(0o600), &mut |w| w.write_all(b"s")).unwrap();
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sweep_removes_only_our_temps_for_that_target() {
        let dir = scratch("sweep");
        let target = dir.join("app");
        for name in [
            ".app.1.bin-proxy-tmp",
            ".app.2dl.bin-proxy-tmp",
            ".other.1.bin-proxy-tmp",
            "app",
            ".app.notes",
            ".app.x.3.bin-proxy-tmp",
            ".app.4.5.bin-proxy-tmp",
            ".app.6up-1-ab.bin-proxy-tmp",
        ] {
            fs::write(dir.join(name), b"x").unwrap();
        }
        assert_eq!(sweep_temps(&target), 2);
        let mut left: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                ".app.4.5.bin-proxy-tmp",      // belongs to "app.4"
                ".app.6up-1-ab.bin-proxy-tmp", // an upload: never swept per name
                ".app.notes",
                ".app.x.3.bin-proxy-tmp", // belongs to "app.x"
                ".other.1.bin-proxy-tmp",
                "app"
            ]
        );
        assert_eq!(sweep_temps(&dir.join("app.x")), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_run_lists_each_directory_once_and_sweeps_each_target_s_temps() {
        let dir = scratch("temps");
        let names = |dir: &Path| {
            let mut left: Vec<_> = fs::read_dir(dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect();
            left.sort();
            left
        };
        for name in [
            "a",
            ".a.1.bin-proxy-tmp",
            ".a.bak.2.bin-proxy-tmp",
            ".a.3dl.bin-proxy-tmp", // a journalled partial download: kept
            ".b.4.bin-proxy-tmp",
            ".c.5.bin-proxy-tmp",
            ".a.notes",
        ] {
            fs::write(dir.join(name), b"x").unwrap();
        }
        fs::create_dir(dir.join(".a.6.bin-proxy-tmp")).unwrap(); // never a directory
        let mut temps = Temps::default();
        let keep = dir.join(".a.3dl.bin-proxy-tmp");
        assert_eq!(
            temps.sweep(&dir.join("a"), &dir.join("a.bak"), Some(&keep)),
            2
        );
        // Created after the listing: this run's own, not swept.
        fs::write(dir.join(".b.7.bin-proxy-tmp"), b"x").unwrap();
        assert_eq!(temps.sweep(&dir.join("b"), &dir.join("b.bak"), None), 1);
        assert_eq!(temps.sweep(&dir.join("a"), &dir.join("a.bak"), None), 1);
        assert_eq!(
            names(&dir),
            [
                ".a.6.bin-proxy-tmp",
                ".a.notes",
                ".b.7.bin-proxy-tmp",
                ".c.5.bin-proxy-tmp",
                "a"
            ]
        );
        let other = dir.join("sub");
        fs::create_dir(&other).unwrap();
        fs::write(other.join(".c.8.bin-proxy-tmp"), b"x").unwrap();
        assert_eq!(temps.sweep(&other.join("c"), &other.join("c.bak"), None), 1);
        assert_eq!(
            temps.sweep(&dir.join("gone/c"), &dir.join("gone/c.bak"), None),
            0
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unique_temps_differ_and_only_stale_uploads_are_swept() {
        let dir = scratch("unique");
        let target = dir.join("app");
        let names: std::collections::HashSet<PathBuf> =
            (0..1000).map(|_| unique_temp_path(&target, "up")).collect();
        assert_eq!(names.len(), 1000);
        let live = unique_temp_path(&target, "up");
        fs::write(&live, b"x").unwrap();
        fs::write(dir.join(".app.notes"), b"x").unwrap();
        let day = std::time::Duration::from_secs(86_400);
        assert_eq!(
            sweep_stale_uploads(&dir, "up", day),
            0,
            "a fresh upload is live"
        );
        assert_eq!(
            sweep_stale_uploads(&dir, "up", std::time::Duration::ZERO),
            1
        );
        assert!(!live.exists());
        assert!(dir.join(".app.notes").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn xattrs_are_copied() {
        let dir = scratch("xattr");
        let (from, to) = (dir.join("from"), dir.join("to"));
        fs::write(&from, b"a").unwrap();
        let set = std::process::Command::new("setfattr")
            .args(["-n", "user.note", "-v", "keep"])
            .arg(&from)
            .status();
        if !set.is_ok_and(|s| s.success()) {
            // setup.sh installs attr; a filesystem without user xattrs
            // cannot run this test, which must not pass silently in CI.
            let why = "setfattr unavailable or user xattrs unsupported in the temp dir";
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "cannot run here under CI=true: {why}"
            );
            eprintln!("SKIPPED (cannot run here): {why}");
            fs::remove_dir_all(&dir).unwrap();
            return;
        }
        let target = create_exclusive(&to, 0o600).unwrap();
        copy_xattrs(&from, &target).unwrap();
        let out = std::process::Command::new("getfattr")
            .args(["--only-values", "-n", "user.note"])
            .arg(&to)
            .output()
            .expect("getfattr runs where setfattr did");
        assert!(
            out.status.success(),
            "user.note not copied: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(out.stdout, b"keep");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exclusive_create_refuses_a_planted_symlink() {
        let dir = scratch("symlink");
        let outside = dir.join("outside");
        fs::write(&outside, b"precious").unwrap();
        let planted = dir.join(".app.1.bin-proxy-tmp");
        std::os::unix::fs::symlink(&outside, &planted).unwrap();
        assert!(create_exclusive(&planted, 0o600).is_err());
        assert_eq!(fs::read(&outside).unwrap(), b"precious");
        fs::remove_dir_all(&dir).unwrap();
    }
}
