//! Signed releases on the agent's side: when trusted keys are set
//! (`manager.trustedKeys`, `--trusted-key`), a build is installed only if
//! its signature document, by a trusted key (or one they rotated to, see
//! [`crate::sign::rotate`]), covers exactly this name, this node's arch, the
//! pinned version if any, and the sha256 and size downloaded; is not older
//! (serial) than the highest this host installed for the name unless the
//! version is pinned; and has not expired by the local clock. Everything the
//! server says is judged here: it may choose among signed builds, never
//! make one. The download itself is then checked against the *signed*
//! sha256 and cut at the *signed* size.

use crate::error::{Error, Result};
use crate::protocol::BinInfo;
use crate::sign::{self, Document, Statement, TrustedKey};
use std::path::PathBuf;

/// Loads the trusted keys: the manifest's, then the command line's.
pub fn load_keys(files: &[PathBuf]) -> Result<Vec<TrustedKey>> {
    files.iter().map(|f| TrustedKey::load(f)).collect()
}

/// What a build must match.
pub struct Want<'a> {
    /// The binary's name.
    pub name: &'a str,
    /// This node's arch.
    pub arch: &'a str,
    /// The pinned version, if any.
    pub pinned: Option<&'a str>,
    /// The highest serial installed here for this name.
    pub floor: Option<u64>,
    /// The local clock (Unix seconds).
    pub now: u64,
}

/// The refusal, naming the attack.
fn refused(name: &str, why: String) -> Error {
    Error::Other(format!(
        "{name}: signature check failed: {why}; nothing installed"
    ))
}

/// Judges the server's answer; the signed document, whose sha256 and size
/// the download must then match.
pub fn check(pinned_keys: &[TrustedKey], remote: &BinInfo, want: &Want) -> Result<Document> {
    let name = want.name;
    let line = remote.signature.as_deref().ok_or_else(|| {
        refused(
            name,
            "no signature: the server offers this build unsigned, and this host trusts only signed builds".into(),
        )
    })?;
    let doc = Document::parse(line.trim())
        .map_err(|e| refused(name, format!("malformed or truncated signature: {e}")))?;
    let statements = remote
        .key_statements
        .iter()
        .map(|s| Statement::parse(s))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| refused(name, format!("malformed key rotation statement: {e}")))?;
    let trusted = sign::rotate(pinned_keys, &statements).map_err(|e| refused(name, e))?;
    doc.verify(&trusted).map_err(|e| refused(name, e))?;
    // The server's own sha256 and size, if it gives them, must agree too
    // (never trusted on their own: the signed ones are what is checked).
    let sha = remote.sha256.as_deref().unwrap_or(&doc.sha256);
    let size = remote.size.unwrap_or(doc.size);
    doc.covers(name, Some(want.arch), want.pinned, sha, size)
        .map_err(|e| refused(name, e))?;
    if let Some(floor) = want.floor {
        if doc.serial < floor && want.pinned.is_none() {
            return Err(refused(
                name,
                format!(
                    "rollback: serial {} is lower than {floor}, the highest installed here; an older signed build is refused unless the manifest pins its version",
                    doc.serial
                ),
            ));
        }
    }
    if doc.expires < want.now {
        return Err(refused(
            name,
            format!(
                "expired (freeze attack?): the signature expired at {} (Unix {}), the local clock says {} (Unix {}); re-sign the build",
                at(doc.expires),
                doc.expires,
                at(want.now),
                want.now
            ),
        ));
    }
    Ok(doc)
}

fn at(unix: u64) -> String {
    crate::log::rfc3339(std::time::UNIX_EPOCH + std::time::Duration::from_secs(unix))
}

/// The answer to download against: the signed sha256 and size replace
/// whatever the server said (the md5 stays, the agent's install key).
pub fn signed_want(remote: &BinInfo, doc: &Document) -> BinInfo {
    BinInfo {
        sha256: Some(doc.sha256.clone()),
        size: Some(doc.size),
        ..remote.clone()
    }
}
