//! Hashing: the protocol's md5 (hex, lowercase), computed in one streaming
//! pass — over a file on disk, or over bytes as they are being downloaded.

use crate::error::{Error, Result};
use std::fs::File;
use std::io::Read;
use std::path::Path;

/// Read size for hashing files: large enough to amortise syscalls, small
/// enough to keep the agent's memory flat.
pub const BLOCK: usize = 256 * 1024;

/// A running md5.
pub struct Md5(md5::Context);

impl Md5 {
    /// A fresh hash.
    pub fn new() -> Md5 {
        Md5(md5::Context::new())
    }

    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.consume(bytes);
    }

    /// The lowercase hex digest.
    pub fn hex(self) -> String {
        hex(&self.0.finalize().0)
    }
}

impl Default for Md5 {
    fn default() -> Self {
        Md5::new()
    }
}

/// A running sha256 (for builds whose server offers one).
pub struct Sha256(sha2::Sha256);

impl Sha256 {
    /// A fresh hash.
    pub fn new() -> Sha256 {
        use sha2::Digest;
        Sha256(sha2::Sha256::new())
    }

    /// Feeds bytes.
    pub fn update(&mut self, bytes: &[u8]) {
        sha2::Digest::update(&mut self.0, bytes);
    }

    /// The lowercase hex digest.
    pub fn hex(self) -> String {
        hex(&sha2::Digest::finalize(self.0))
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256::new()
    }
}

/// The md5 and sha256 of everything `reader` yields, and its length, in one pass.
pub fn digest_all(mut reader: impl Read, what: &Path) -> Result<(String, String, u64)> {
    let (mut md5, mut sha) = (Md5::new(), Sha256::new());
    let mut buf = vec![0u8; BLOCK];
    let mut len = 0u64;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok((md5.hex(), sha.hex(), len)),
            Ok(n) => {
                md5.update(&buf[..n]);
                sha.update(&buf[..n]);
                len += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("reading", what, e)),
        }
    }
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 15)] as char);
    }
    out
}

/// The md5 of a file's contents.
pub fn md5_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io("reading", path, e))?;
    let mut md5 = Md5::new();
    let mut buf = vec![0u8; BLOCK];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(md5.hex()),
            Ok(n) => md5.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("reading", path, e)),
        }
    }
}

/// Whether `s` is an md5 in hex (32 hex digits, either case).
pub fn is_md5(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Hashes compare case-insensitively (servers differ in the case they print).
pub fn same(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        assert_eq!(Md5::new().hex(), "d41d8cd98f00b204e9800998ecf8427e");
        let mut h = Md5::new();
        h.update(b"hello ");
        h.update(b"world\n");
        assert_eq!(h.hex(), "6f5902ac237024bdd0c176cb93063dc4");
        let mut s = Sha256::new();
        s.update(b"abc");
        assert_eq!(
            s.hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let (md5, sha, len) = digest_all(&b"abc"[..], Path::new("-")).unwrap();
        assert_eq!((md5.as_str(), len), ("900150983cd24fb0d6963f7d28e17f72", 3));
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn md5_shape_and_comparison() {
        assert!(is_md5("D41D8CD98F00B204E9800998ECF8427E"));
        assert!(!is_md5("d41d8cd98f00b204e9800998ecf8427"));
        assert!(!is_md5("g41d8cd98f00b204e9800998ecf8427e"));
        assert!(same("ABCdef", "abcDEF"));
        assert!(!same("abc", "abd"));
    }
}
