//! The offline signing tools: `bin-manager keygen --out DIR` and
//! `bin-manager sign --key FILE --name NAME … BUILD`. They never talk to a
//! server: the signing key stays on the operator's machine, so whoever
//! controls bin-manager (or a mirror) can choose which signed build a node
//! gets, but not which builds exist.

use crate::cli::{ManagerArgs, ManagerCommand};
use crate::error::{Error, Result};
use crate::fsutil;
use crate::sign::{Change, Document, SecretKey};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// How long a signature lasts when `--expires` is not given.
const DEFAULT_EXPIRES: u64 = 90 * 86400;

/// Runs `keygen` or `sign`; the line to print.
pub fn run(args: &ManagerArgs) -> Result<String> {
    match &args.command {
        ManagerCommand::Keygen => keygen(args.out.as_deref().unwrap_or(Path::new("."))),
        ManagerCommand::Sign(build) => sign(args, build),
        ManagerCommand::Trust(public) => {
            let key = SecretKey::load(args.key.as_deref().unwrap_or(Path::new("")))?;
            let new = crate::sign::TrustedKey::load(public)?;
            Ok(key.sign_statement(Change::Trust(new)).to_string())
        }
        ManagerCommand::Revoke(id) => {
            if id.len() != 16 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err(Error::Usage(format!(
                    "\"{id}\" is not a key id (16 lowercase hex digits)"
                )));
            }
            let key = SecretKey::load(args.key.as_deref().unwrap_or(Path::new("")))?;
            Ok(key.sign_statement(Change::Revoke(id.clone())).to_string())
        }
        _ => Err(Error::Other("not a key tool command".into())),
    }
}

fn keygen(dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
    let (key_path, pub_path) = (dir.join("release.key"), dir.join("release.pub"));
    if key_path.exists() || pub_path.exists() {
        return Err(Error::Other(format!(
            "\"{}\" already holds a release key; refusing to overwrite it (move it away first)",
            dir.display()
        )));
    }
    let key = SecretKey::generate()?;
    // O_EXCL with mode 0600: the secret is never readable by others, not even briefly.
    let mut f = fsutil::create_exclusive(&key_path, 0o600)?;
    f.write_all(key.file_text().as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io("writing", &key_path, e))?;
    fsutil::atomic_write(&pub_path, key.public().file_text().as_bytes(), 0o644)?;
    Ok(format!(
        "key id {} (secret \"{}\", public \"{}\": copy the public key to the hosts' manager.trustedKeys and bin-manager's trustedKeys)",
        key.id(),
        key_path.display(),
        pub_path.display()
    ))
}

/// Where `sign` remembers the last serial of each name it signed with a
/// key: `FILE.serials` beside the key, lines `NAME SERIAL`.
fn ledger_path(key: &Path) -> PathBuf {
    let mut p = key.as_os_str().to_owned();
    p.push(".serials");
    PathBuf::from(p)
}

fn ledger(path: &Path) -> Vec<(String, u64)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (n, s) = l.split_once(' ')?;
            Some((n.to_string(), s.parse().ok()?))
        })
        .collect()
}

/// `BUILD.sig`: the signature document beside the build.
pub fn sig_path(build: &Path) -> PathBuf {
    let mut p = build.as_os_str().to_owned();
    p.push(".sig");
    PathBuf::from(p)
}

fn sign(args: &ManagerArgs, build: &Path) -> Result<String> {
    let key_path = args.key.as_deref().unwrap_or(Path::new(""));
    let key = SecretKey::load(key_path)?;
    let name = args.name.clone().unwrap_or_default();
    let check = |v: &str, what: &str| {
        if crate::manager::store::valid_name(v) {
            Ok(())
        } else {
            Err(Error::Usage(format!(
                "{what} \"{v}\" is not a valid name ([A-Za-z0-9_-][A-Za-z0-9._-]*)"
            )))
        }
    };
    check(&name, "--name")?;
    if let Some(a) = &args.arch {
        check(a, "--arch")?;
    }
    if let Some(v) = &args.sign_version {
        check(v, "--version")?;
    }
    let file = std::fs::File::open(build).map_err(|e| Error::io("opening the build", build, e))?;
    let (_, sha256, size) = crate::hash::digest_all(file, build)?;
    let out = sig_path(build);
    let ledger_file = ledger_path(key_path);
    let mut entries = ledger(&ledger_file);
    let previous = std::fs::read_to_string(&out)
        .ok()
        .and_then(|t| Document::parse(t.trim_end()).ok())
        .filter(|d| d.name == name)
        .map(|d| d.serial);
    let last = entries
        .iter()
        .filter(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .chain(previous)
        .max();
    let serial = match args.serial {
        Some(s) => s,
        None => last
            .map_or(Some(1), |s| s.checked_add(1))
            .ok_or_else(|| Error::Other(format!("the serial of \"{name}\" cannot go higher")))?,
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let doc = Document {
        key: String::new(),
        name: name.clone(),
        arch: args.arch.clone().unwrap_or_else(|| "*".into()),
        version: args.sign_version.clone().unwrap_or_else(|| "-".into()),
        sha256,
        size,
        serial,
        expires: now.saturating_add(args.expires.unwrap_or(DEFAULT_EXPIRES)),
        sig: [0; 64],
    }
    .sign(&key);
    let line = doc.to_string();
    fsutil::atomic_write(&out, format!("{line}\n").as_bytes(), 0o644)?;
    entries.retain(|(n, _)| *n != name);
    entries.push((name, serial.max(last.unwrap_or(0))));
    let text: String = entries.iter().map(|(n, s)| format!("{n} {s}\n")).collect();
    fsutil::atomic_write(&ledger_file, text.as_bytes(), 0o600)?;
    crate::info!(
        "signed \"{}\" (serial {serial}, {size} bytes) into \"{}\"",
        build.display(),
        out.display()
    );
    Ok(line)
}
