//! bin-manager's side of signed releases: the signature document of a
//! build goes out in the `bins/NAME` answer (`signature`, which old agents
//! ignore); a `PUT` may carry one in `X-Bin-Signature`, checked against the
//! uploaded bytes before the build is moved in; with `requireSignatures` a
//! build without a valid signature by one of `trustedKeys` is neither
//! published nor served. The server is not what makes signatures safe — the
//! agents verify them against their own pinned keys — but refusing early
//! tells the operator at publish time instead of on every host.
//!
//! Rotation statements (`binDir/.trust`, one per line, see `crate::sign`) go
//! out in the same answer (`keyStatements`); the agents judge them.

use super::store::Build;
use crate::error::{Error, Result};
use crate::sign::{self, Document, TrustedKey};
use std::path::Path;

/// The server's signing policy.
#[derive(Default)]
pub struct Signing {
    /// Refuse what is not validly signed.
    pub require: bool,
    /// The keys a signature must be by (when set).
    pub trusted: Vec<TrustedKey>,
}

impl Signing {
    /// Checks a document for the build `name` (under `arch`'s directory,
    /// pinned `version`) with these hashes; `Ok(None)` when there is none and
    /// none is required.
    pub fn check(
        &self,
        line: Option<&str>,
        name: &str,
        arch: Option<&str>,
        version: Option<&str>,
        sha256: &str,
        size: u64,
    ) -> std::result::Result<Option<Document>, String> {
        let Some(line) = line else {
            return if self.require {
                Err(format!(
                    "\"{name}\" is not signed and requireSignatures is set"
                ))
            } else {
                Ok(None)
            };
        };
        let doc = Document::parse(line.trim()).map_err(|e| format!("signature: {e}"))?;
        doc.covers(name, arch, version, sha256, size)?;
        if !self.trusted.is_empty() {
            doc.verify(&self.trusted)?;
        }
        Ok(Some(doc))
    }

    /// The check of a build about to be served.
    pub fn check_served(&self, name: &str, b: &Build) -> std::result::Result<(), String> {
        if !self.require {
            return Ok(());
        }
        let version = (b.version != "latest").then_some(b.version.as_str());
        self.check(
            b.signature.as_deref(),
            name,
            b.arch_dir.as_deref(),
            version,
            &b.sha256,
            b.size,
        )
        .map(|_| ())
    }
}

/// The rotation statements in `binDir/.trust` (empty when there is none);
/// a line that is not one is an error naming it.
pub fn statements(bin_dir: &Path) -> Result<Vec<String>> {
    let path = bin_dir.join(".trust");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("reading", &path, e)),
    };
    let mut out = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        sign::Statement::parse(line.trim()).map_err(|e| Error::Config {
            path: path.clone(),
            msg: format!("line {}: {e}", i + 1),
        })?;
        out.push(line.trim().to_string());
    }
    Ok(out)
}
