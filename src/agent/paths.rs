//! Whether the agent may replace a managed file where it is, checked before
//! anything is downloaded:
//!
//! * **Who else can write there** (like sshd's StrictModes). Root must not
//!   be steered into replacing a file by whoever can write its directory:
//!   they could swap in their own file or plant names beside it. Every
//!   directory from the file's up to `/` — along the path as written in the
//!   manifest and along the resolved one — must be owned by root or by the
//!   file's owner, and not writable by group or others. One exception, for
//!   directories above the file's own: a sticky directory (`/tmp`, mode
//!   1777), where nobody can rename or remove what they do not own.
//! * **Whether it can be replaced at all**: a read-only mount, or a file
//!   that is a mount point of its own (a bind mount, as containers make),
//!   where rename(2) cannot put a new file.

use crate::error::{Error, Result};
use crate::fsutil;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Refuses (with [`Error::UnsafePath`]) a target whose directories someone
/// other than root or the file's owner could write. `managed` is the path
/// as the manifest gives it, `target` the file actually replaced.
pub fn check_owners(managed: &Path, target: &Path) -> Result<()> {
    let owner = match fs::metadata(target) {
        Ok(m) => m.uid(),
        Err(_) => crate::sys::euid(), // a new file is ours
    };
    let mut chains = vec![fsutil::parent(managed).to_path_buf()];
    if let Ok(real) = fs::canonicalize(fsutil::parent(target)) {
        chains.push(real);
    }
    for dir in chains {
        for (depth, d) in dir.ancestors().enumerate() {
            if d.as_os_str().is_empty() {
                continue;
            }
            let meta = fs::metadata(d).map_err(|e| Error::io("inspecting", d, e))?;
            let why = unsafe_dir(&meta, owner, depth == 0);
            if let Some(why) = why {
                return Err(Error::UnsafePath {
                    path: target.to_path_buf(),
                    dir: d.to_path_buf(),
                    why,
                });
            }
        }
    }
    Ok(())
}

/// Why a directory is not safe for a file owned by `owner`, if it is not.
fn unsafe_dir(meta: &fs::Metadata, owner: u32, own_dir: bool) -> Option<String> {
    let mode = meta.mode() & 0o7777;
    if meta.uid() != 0 && meta.uid() != owner {
        return Some(format!(
            "it is owned by uid {}, neither root nor the file's owner (uid {owner})",
            meta.uid()
        ));
    }
    let shared = mode & 0o022 != 0;
    let sticky = mode & 0o1000 != 0;
    if shared && (own_dir || !sticky) {
        return Some(format!(
            "it is writable by group or others (mode {mode:04o})"
        ));
    }
    None
}

/// Refuses (with [`Error::CannotReplace`]) a target that rename(2) cannot
/// replace: on a read-only mount, or a mount point of its own.
pub fn check_replaceable(target: &Path) -> Result<()> {
    let dir = fsutil::parent(target);
    let cannot = |why: String| Error::CannotReplace {
        path: target.to_path_buf(),
        dir: dir.to_path_buf(),
        why,
    };
    if let (Ok(file), Ok(d)) = (fs::metadata(target), fs::metadata(dir)) {
        if file.dev() != d.dev() || is_mount_point(target) {
            return Err(cannot(
                "it is a mount point of its own (a bind mount?), which rename cannot replace"
                    .into(),
            ));
        }
    }
    if !dir.exists() {
        return Ok(()); // created when staging (and checked by that)
    }
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| cannot("NUL in the path".into()))?;
    match crate::sys::check_writable(&c) {
        Err(e) if e.raw_os_error() == Some(30) => Err(cannot(format!(
            "\"{}\" is on a read-only mount ({e})",
            dir.display()
        ))),
        _ => Ok(()),
    }
}

/// Whether `path` is where something is mounted (`/proc/self/mountinfo`'s
/// fifth field; a file bind-mounted from the same filesystem keeps its
/// device number, so only this tells).
fn is_mount_point(path: &Path) -> bool {
    let Ok(table) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.as_os_str().as_bytes();
    table
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| unescape_mount(m) == want)
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mount(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match (b[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn check(uid: u32, mode: u32, owner: u32, own_dir: bool, bad: Option<&str>) {
        let dir = std::env::temp_dir().join(format!(
            "bin-proxy-paths-{}-{uid}-{mode:o}-{own_dir}",
            std::process::id()
        ));
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(mode)).unwrap();
        if crate::sys::euid() == 0 {
            std::os::unix::fs::chown(&dir, Some(uid), None).unwrap();
        }
        let meta = fs::metadata(&dir).unwrap();
        let got = unsafe_dir(&meta, owner, own_dir);
        fs::remove_dir(&dir).unwrap();
        if crate::sys::euid() != 0 && uid != 0 {
            return; // cannot chown here: the owner cases need root
        }
        match (got, bad) {
            (None, None) => {}
            (Some(why), Some(want)) => assert!(why.contains(want), "{why}"),
            (got, want) => panic!("uid {uid} mode {mode:o}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn mount_points() {
        assert_eq!(unescape_mount("/a\\040b/c"), b"/a b/c");
        assert_eq!(unescape_mount("/x\\9"), b"/x\\9");
        assert!(is_mount_point(Path::new("/proc")) || !Path::new("/proc/self").exists());
        assert!(!is_mount_point(Path::new("/proc/self/mountinfo")));
    }

    #[test]
    fn directories_only_root_or_the_owner_can_write() {
        let me = crate::sys::euid();
        check(me, 0o755, me, true, None);
        check(
            me,
            0o775,
            me,
            true,
            Some("writable by group or others (mode 0775)"),
        );
        check(me, 0o757, me, false, Some("mode 0757"));
        check(me, 0o1777, me, false, None); // /tmp above the file's own dir
        check(me, 0o1777, me, true, Some("mode 1777")); // but not as the file's own
        if me == 0 {
            check(1234, 0o755, 0, true, Some("owned by uid 1234"));
            check(1234, 0o755, 1234, true, None); // the file's owner's own dir
        }
    }
}
