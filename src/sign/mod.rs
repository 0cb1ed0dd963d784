//! Signed releases, shared by both programs: the one-line signature
//! document, key files, key ids and key rotation statements.
//!
//! A signature document is one ASCII line, so that it fits a file
//! (`binDir/…/NAME.sig`) and an HTTP header (`X-Bin-Signature`):
//!
//! ```text
//! bin-proxy-sig-v1 key=KEYID name=NAME arch=ARCH version=VERSION sha256=HEX size=N serial=N expires=UNIX sig=HEX
//! ```
//!
//! The fields come in exactly this order; `arch=*` covers every architecture
//! (a build under `binDir/NAME`), `version=-` a build without a version. The
//! Ed25519 signature covers [`DOMAIN`] followed by everything before ` sig=`,
//! so no field can be swapped, dropped, reordered or re-spelled.
//!
//! A rotation statement is the same kind of line: `bin-proxy-trust-v1
//! key=SIGNER trust=PUBLICKEYHEX sig=HEX` (trust a new key) or `… revoke=KEYID
//! sig=HEX` (stop trusting one), signed under [`TRUST_DOMAIN`].

use std::fmt;
use std::path::Path;

use crate::error::{Error, Result};

/// What a signature document starts with.
const MAGIC: &str = "bin-proxy-sig-v1";
/// What a rotation statement starts with.
const TRUST_MAGIC: &str = "bin-proxy-trust-v1";
/// Prefixed to every signed build message: a signature over a build can
/// never be replayed as anything else (a rotation statement).
const DOMAIN: &[u8] = b"bin-proxy signed build v1\0";
/// Prefixed to every signed rotation statement.
const TRUST_DOMAIN: &[u8] = b"bin-proxy key rotation v1\0";
/// The longest document accepted (a header line; real ones are ~300 bytes).
pub const MAX_LEN: usize = 1024;

const PUB_MAGIC: &str = "bin-proxy-public-key-v1";
const KEY_MAGIC: &str = "bin-proxy-secret-key-v1";

/// A parsed, not yet verified, signature document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    /// The id of the key that signed it ([`key_id`]).
    pub key: String,
    /// The binary's name.
    pub name: String,
    /// The architecture it is for, `*` for any.
    pub arch: String,
    /// The version, `-` for none.
    pub version: String,
    /// sha256 of the build, lowercase hex.
    pub sha256: String,
    /// The build's size in bytes.
    pub size: u64,
    /// Only ever increases per name: an older build cannot come back.
    pub serial: u64,
    /// Unix time after which it is no longer accepted.
    pub expires: u64,
    /// The Ed25519 signature.
    pub sig: [u8; 64],
}

impl Document {
    /// The bytes the signature covers.
    pub fn message(&self) -> Vec<u8> {
        let mut m = DOMAIN.to_vec();
        m.extend_from_slice(self.unsigned_line().as_bytes());
        m
    }

    fn unsigned_line(&self) -> String {
        format!(
            "{MAGIC} key={} name={} arch={} version={} sha256={} size={} serial={} expires={}",
            self.key,
            self.name,
            self.arch,
            self.version,
            self.sha256,
            self.size,
            self.serial,
            self.expires
        )
    }

    /// Signs the fields with `key` (its id replaces `self.key`).
    pub fn sign(mut self, key: &SecretKey) -> Document {
        self.key = key.id();
        self.sig = key.sign_bytes(&self.message());
        self
    }

    /// Checks the signature against the trusted keys; the error names the
    /// attack (unknown key, bad signature).
    pub fn verify(&self, trusted: &[TrustedKey]) -> std::result::Result<(), String> {
        let key = trusted.iter().find(|k| k.id == self.key).ok_or_else(|| {
            format!(
                "signed by unknown key {} (trusted: {}); a build signed by a key this host does not trust is refused",
                self.key,
                ids(trusted)
            )
        })?;
        if verify(&key.key, &self.message(), &self.sig) {
            Ok(())
        } else {
            Err(format!(
                "bad signature: the document does not verify under key {} (its fields or signature were altered)",
                self.key
            ))
        }
    }

    /// Whether it covers exactly this build: `name`, `arch` (a `*`
    /// document covers every arch; `None`: not checked), `version` (`None`:
    /// any), `sha256` and `size`. The error names the attack (mix-and-match,
    /// tampered bytes).
    pub fn covers(
        &self,
        name: &str,
        arch: Option<&str>,
        version: Option<&str>,
        sha256: &str,
        size: u64,
    ) -> std::result::Result<(), String> {
        let mix = |what: &str, signed: &str, here: &str| {
            Err(format!(
                "mix-and-match: the signature is for {what} \"{signed}\", not \"{here}\"; a genuine signature of another build is refused"
            ))
        };
        if self.name != name {
            return mix("binary", &self.name, name);
        }
        if let Some(arch) = arch {
            if self.arch != "*" && self.arch != arch {
                return mix("arch", &self.arch, arch);
            }
        }
        if let Some(v) = version {
            if self.version != v {
                return mix("version", &self.version, v);
            }
        }
        if !self.sha256.eq_ignore_ascii_case(sha256) || self.size != size {
            return Err(format!(
                "the build is not the one signed: signed sha256 {} and {} bytes, got sha256 {sha256} and {size} bytes (bytes or hashes were altered)",
                self.sha256, self.size
            ));
        }
        Ok(())
    }

    /// Parses one line, strictly: exact field order, no extra spaces.
    pub fn parse(text: &str) -> std::result::Result<Document, String> {
        let fields = split(text, MAGIC, 9)?;
        let get = |i: usize, k: &str| field(&fields, i, k);
        let doc = Document {
            key: word(get(0, "key")?, "key")?,
            name: word(get(1, "name")?, "name")?,
            arch: word(get(2, "arch")?, "arch")?,
            version: word(get(3, "version")?, "version")?,
            sha256: lower_hex(get(4, "sha256")?, 32, "sha256")?,
            size: number(get(5, "size")?, "size")?,
            serial: number(get(6, "serial")?, "serial")?,
            expires: number(get(7, "expires")?, "expires")?,
            sig: sig_bytes(get(8, "sig")?)?,
        };
        if doc.key.len() != 16 || lower_hex(&doc.key, 8, "key").is_err() {
            return Err("key is not a key id (16 lowercase hex digits)".into());
        }
        Ok(doc)
    }
}

impl fmt::Display for Document {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} sig={}", self.unsigned_line(), hex(&self.sig))
    }
}

fn split<'a>(text: &'a str, magic: &str, n: usize) -> std::result::Result<Vec<&'a str>, String> {
    if text.len() > MAX_LEN {
        return Err(format!("longer than {MAX_LEN} bytes"));
    }
    if !text.is_ascii() || text.bytes().any(|b| b.is_ascii_control()) {
        return Err("not one line of printable ASCII".into());
    }
    let mut parts = text.split(' ');
    if parts.next() != Some(magic) {
        return Err(format!("does not start with \"{magic}\""));
    }
    let fields: Vec<&str> = parts.collect();
    if fields.len() != n {
        return Err(format!(
            "has {} fields, expected {n} (truncated or padded)",
            fields.len()
        ));
    }
    Ok(fields)
}

fn field<'a>(fields: &[&'a str], i: usize, key: &str) -> std::result::Result<&'a str, String> {
    fields[i]
        .strip_prefix(key)
        .and_then(|v| v.strip_prefix('='))
        .ok_or_else(|| format!("field {} is not {key}=…", i + 1))
}

/// Names, arches, versions: what binDir allows in a file name, and `*`/`-`.
fn word(v: &str, key: &str) -> std::result::Result<String, String> {
    let ok = !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-@*~".contains(&b));
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!(
            "{key} \"{v}\" is empty or has characters a name cannot have"
        ))
    }
}

fn number(v: &str, key: &str) -> std::result::Result<u64, String> {
    let canonical =
        !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) && (v == "0" || !v.starts_with('0'));
    v.parse::<u64>()
        .ok()
        .filter(|_| canonical)
        .ok_or_else(|| format!("{key} \"{v}\" is not a decimal number"))
}

fn lower_hex(v: &str, bytes: usize, key: &str) -> std::result::Result<String, String> {
    if v.len() == bytes * 2 && v.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(v.to_string())
    } else {
        Err(format!("{key} is not {} lowercase hex digits", bytes * 2))
    }
}

fn unhex(v: &str) -> Vec<u8> {
    v.as_bytes()
        .chunks(2)
        .map(|p| {
            let d = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
            d(p[0]) << 4 | d(p[1])
        })
        .collect()
}

fn sig_bytes(v: &str) -> std::result::Result<[u8; 64], String> {
    let v = lower_hex(v, 64, "sig")?;
    let mut out = [0u8; 64];
    out.copy_from_slice(&unhex(&v));
    Ok(out)
}

/// Ed25519 verification (RFC 8032) through ring.
fn verify(key: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key)
        .verify(msg, sig)
        .is_ok()
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A key's id: the first 8 bytes of the sha256 of its public key, in hex.
fn key_id(public: &[u8; 32]) -> String {
    let mut h = crate::hash::Sha256::new();
    h.update(public);
    hex(&h.bytes()[..8])
}

fn ids(keys: &[TrustedKey]) -> String {
    if keys.is_empty() {
        return "none".into();
    }
    keys.iter()
        .map(|k| k.id.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A public key this host trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedKey {
    /// [`key_id`] of it.
    pub id: String,
    /// The key.
    pub key: [u8; 32],
}

impl TrustedKey {
    /// From the 32 raw bytes.
    pub fn new(bytes: [u8; 32]) -> TrustedKey {
        TrustedKey {
            id: key_id(&bytes),
            key: bytes,
        }
    }

    /// The public key file's one line.
    pub fn file_text(&self) -> String {
        format!("{PUB_MAGIC} {}\n", hex(&self.key))
    }

    /// Parses a public key file's text.
    pub fn parse(text: &str) -> std::result::Result<TrustedKey, String> {
        let hexkey = text
            .trim_end_matches('\n')
            .strip_prefix(PUB_MAGIC)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or_else(|| format!("not a bin-proxy public key (expected \"{PUB_MAGIC} HEX\")"))?;
        let hexkey = lower_hex(hexkey, 32, "the key")?;
        let mut b = [0u8; 32];
        b.copy_from_slice(&unhex(&hexkey));
        Ok(TrustedKey::new(b))
    }

    /// Reads a public key file (`release.pub`).
    pub fn load(path: &Path) -> Result<TrustedKey> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io("reading the public key", path, e))?;
        TrustedKey::parse(&text).map_err(|msg| Error::Config {
            path: path.into(),
            msg,
        })
    }
}

/// A signing key (bin-manager's offline tools only).
pub struct SecretKey {
    seed: [u8; 32],
    pair: ring::signature::Ed25519KeyPair,
}

impl SecretKey {
    /// From a 32-byte seed.
    fn from_seed(seed: [u8; 32]) -> SecretKey {
        SecretKey {
            seed,
            // Never rejected: any 32 bytes are a valid Ed25519 seed.
            pair: ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed)
                .unwrap_or_else(|_| unreachable!("ring rejects no 32-byte seed")),
        }
    }

    /// A fresh key from the kernel's random source.
    pub fn generate() -> Result<SecretKey> {
        use std::io::Read;
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(|e| Error::io("reading randomness from", "/dev/urandom", e))?;
        Ok(SecretKey::from_seed(seed))
    }

    /// Its public half.
    pub fn public(&self) -> TrustedKey {
        use ring::signature::KeyPair;
        let mut pk = [0u8; 32];
        pk.copy_from_slice(self.pair.public_key().as_ref());
        TrustedKey::new(pk)
    }

    /// Its key id.
    pub fn id(&self) -> String {
        self.public().id
    }

    /// The secret key file's one line.
    pub fn file_text(&self) -> String {
        format!("{KEY_MAGIC} {}\n", hex(&self.seed))
    }

    /// Reads a secret key file (`release.key`).
    pub fn load(path: &Path) -> Result<SecretKey> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io("reading the signing key", path, e))?;
        let bad = |msg: String| Error::Config {
            path: path.into(),
            msg,
        };
        let seed = text
            .trim_end_matches('\n')
            .strip_prefix(KEY_MAGIC)
            .and_then(|r| r.strip_prefix(' '))
            .ok_or_else(|| {
                bad(format!(
                    "not a bin-proxy signing key (expected \"{KEY_MAGIC} HEX\")"
                ))
            })?;
        let seed = lower_hex(seed, 32, "the key").map_err(bad)?;
        let mut b = [0u8; 32];
        b.copy_from_slice(&unhex(&seed));
        Ok(SecretKey::from_seed(b))
    }

    fn sign_bytes(&self, msg: &[u8]) -> [u8; 64] {
        let mut out = [0u8; 64];
        out.copy_from_slice(self.pair.sign(msg).as_ref());
        out
    }

    /// Signs a rotation statement.
    pub fn sign_statement(&self, change: Change) -> Statement {
        let mut s = Statement {
            key: self.id(),
            change,
            sig: [0; 64],
        };
        s.sig = self.sign_bytes(&s.message());
        s
    }
}

/// What a rotation statement changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Trust this key from now on.
    Trust(TrustedKey),
    /// Stop trusting the key with this id.
    Revoke(String),
}

/// "Trust key B" or "revoke key B", signed by a key already trusted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    /// The id of the key that signed it.
    pub key: String,
    /// What it changes.
    pub change: Change,
    /// The Ed25519 signature.
    pub sig: [u8; 64],
}

impl Statement {
    fn unsigned_line(&self) -> String {
        match &self.change {
            Change::Trust(k) => format!("{TRUST_MAGIC} key={} trust={}", self.key, hex(&k.key)),
            Change::Revoke(id) => format!("{TRUST_MAGIC} key={} revoke={id}", self.key),
        }
    }

    fn message(&self) -> Vec<u8> {
        let mut m = TRUST_DOMAIN.to_vec();
        m.extend_from_slice(self.unsigned_line().as_bytes());
        m
    }

    /// Parses one line.
    pub fn parse(text: &str) -> std::result::Result<Statement, String> {
        let fields = split(text, TRUST_MAGIC, 3)?;
        let key = field(&fields, 0, "key")?;
        let key = lower_hex(key, 8, "key")?;
        let change = if let Ok(v) = field(&fields, 1, "trust") {
            let v = lower_hex(v, 32, "trust")?;
            let mut b = [0u8; 32];
            b.copy_from_slice(&unhex(&v));
            Change::Trust(TrustedKey::new(b))
        } else {
            Change::Revoke(lower_hex(field(&fields, 1, "revoke")?, 8, "revoke")?)
        };
        let sig = sig_bytes(field(&fields, 2, "sig")?)?;
        Ok(Statement { key, change, sig })
    }
}

impl fmt::Display for Statement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} sig={}", self.unsigned_line(), hex(&self.sig))
    }
}

/// Applies rotation statements in order to the pinned keys: each must be
/// signed by a key trusted at that point (one step at a time, N → N+1). A
/// revoked key is never trusted again by a later statement. Returns the keys
/// trusted at the end, or the first statement that is not acceptable.
pub fn rotate(
    pinned: &[TrustedKey],
    statements: &[Statement],
) -> std::result::Result<Vec<TrustedKey>, String> {
    let mut trusted = pinned.to_vec();
    let mut revoked: Vec<String> = Vec::new();
    for (i, s) in statements.iter().enumerate() {
        let signer = trusted.iter().find(|k| k.id == s.key).ok_or_else(|| {
            format!(
                "key rotation statement {} is signed by untrusted key {} (trusted: {}); refused",
                i + 1,
                s.key,
                ids(&trusted)
            )
        })?;
        verify(&signer.key, &s.message(), &s.sig)
            .then_some(())
            .ok_or_else(|| {
                format!(
                    "key rotation statement {}: bad signature under key {}",
                    i + 1,
                    s.key
                )
            })?;
        match &s.change {
            Change::Trust(k) if revoked.contains(&k.id) => {
                return Err(format!(
                    "key rotation statement {} trusts key {}, which was revoked",
                    i + 1,
                    k.id
                ))
            }
            Change::Trust(k) => {
                if !trusted.iter().any(|t| t.id == k.id) {
                    trusted.push(k.clone());
                }
            }
            Change::Revoke(id) => {
                trusted.retain(|t| &t.id != id);
                revoked.push(id.clone());
            }
        }
    }
    Ok(trusted)
}

/// Parses `90d`, `12h`, `30m`, `3600s` or `3600` into seconds.
pub fn duration(v: &str) -> Option<u64> {
    let (digits, unit) = match v.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&v[..i], c),
        _ => (v, 's'),
    };
    let mul = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86400,
        _ => return None,
    };
    number(digits, "").ok()?.checked_mul(mul).filter(|&n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> SecretKey {
        SecretKey::from_seed([n; 32])
    }

    fn doc() -> Document {
        Document {
            key: String::new(),
            name: "app".into(),
            arch: "x86_64".into(),
            version: "1.2".into(),
            sha256: "ab".repeat(32),
            size: 1234,
            serial: 7,
            expires: 2_000_000_000,
            sig: [0; 64],
        }
        .sign(&key(1))
    }

    #[test]
    fn round_trip_and_exact_text() {
        let d = doc();
        let line = d.to_string();
        assert!(line.starts_with(&format!(
            "bin-proxy-sig-v1 key={} name=app arch=x86_64 version=1.2 sha256={} size=1234 serial=7 expires=2000000000 sig=",
            key(1).id(),
            "ab".repeat(32)
        )), "{line}");
        assert_eq!(line.len(), line.trim().len());
        assert_eq!(Document::parse(&line), Ok(d.clone()));
        d.verify(&[key(1).public()]).unwrap();
        // Ed25519 is deterministic: the same fields give the same line.
        assert_eq!(doc().to_string(), line);
    }

    #[test]
    fn every_field_is_covered() {
        let d = doc();
        let trusted = [key(1).public()];
        let mut changed = vec![];
        let mut c = d.clone();
        c.name = "other".into();
        changed.push(c);
        let mut c = d.clone();
        c.arch = "aarch64".into();
        changed.push(c);
        let mut c = d.clone();
        c.version = "1.1".into();
        changed.push(c);
        let mut c = d.clone();
        c.sha256 = "cd".repeat(32);
        changed.push(c);
        let mut c = d.clone();
        c.size += 1;
        changed.push(c);
        let mut c = d.clone();
        c.serial += 1;
        changed.push(c);
        let mut c = d.clone();
        c.expires += 1;
        changed.push(c);
        let mut c = d.clone();
        c.sig[0] ^= 1;
        changed.push(c);
        for c in changed {
            let e = c.verify(&trusted).unwrap_err();
            assert!(e.starts_with("bad signature"), "{e}");
        }
    }

    #[test]
    fn covers_exactly_one_build() {
        let d = doc();
        let sha = "ab".repeat(32);
        d.covers("app", Some("x86_64"), Some("1.2"), &sha, 1234)
            .unwrap();
        d.covers("app", None, None, &sha, 1234).unwrap();
        let e = d.covers("web", None, None, &sha, 1234).unwrap_err();
        assert!(
            e.contains("mix-and-match: the signature is for binary \"app\", not \"web\""),
            "{e}"
        );
        let e = d
            .covers("app", Some("aarch64"), None, &sha, 1234)
            .unwrap_err();
        assert!(e.contains("arch \"x86_64\", not \"aarch64\""), "{e}");
        let e = d.covers("app", None, Some("1.1"), &sha, 1234).unwrap_err();
        assert!(e.contains("version \"1.2\", not \"1.1\""), "{e}");
        let e = d
            .covers("app", None, None, &"cd".repeat(32), 1234)
            .unwrap_err();
        assert!(e.contains("not the one signed"), "{e}");
        assert!(d.covers("app", None, None, &sha, 1233).is_err());
        assert!(d.covers("app", None, None, &sha, 1235).is_err());
        let mut any = d.clone();
        any.arch = "*".into();
        any.covers("app", Some("riscv64"), None, &sha, 1234)
            .unwrap();
    }

    #[test]
    fn unknown_key_is_named() {
        let e = doc().verify(&[key(2).public()]).unwrap_err();
        assert!(
            e.contains(&format!("signed by unknown key {}", key(1).id())),
            "{e}"
        );
        assert!(e.contains(&key(2).id()), "{e}");
        let e = doc().verify(&[]).unwrap_err();
        assert!(e.contains("(trusted: none)"), "{e}");
        // A key claiming another's id does not verify either.
        let mut d = doc();
        d.key = key(2).id();
        assert!(d
            .verify(&[key(2).public()])
            .unwrap_err()
            .starts_with("bad signature"));
    }

    #[test]
    fn parser_is_strict() {
        let line = doc().to_string();
        assert!(Document::parse(&line[..line.len() - 1])
            .unwrap_err()
            .contains("sig is not 128"));
        let cut = &line[..line.find(" sig=").unwrap()];
        assert!(Document::parse(cut)
            .unwrap_err()
            .contains("has 8 fields, expected 9"));
        assert!(Document::parse(&format!("{line} x=1"))
            .unwrap_err()
            .contains("has 10 fields"));
        assert!(Document::parse(&format!("{line}\n"))
            .unwrap_err()
            .contains("printable ASCII"));
        assert!(
            Document::parse(&line.replace("bin-proxy-sig-v1", "bin-proxy-sig-v2"))
                .unwrap_err()
                .contains("does not start")
        );
        assert!(Document::parse(&line.replace(" name=", "  name=")).is_err());
        assert!(Document::parse(&line.replace("size=1234", "size=01234"))
            .unwrap_err()
            .contains("size \"01234\""));
        assert!(Document::parse(&line.replace("size=1234", "size=+1234")).is_err());
        assert!(Document::parse(&line.replace("size=1234", "size=")).is_err());
        assert!(Document::parse(&line.replace("serial=7", "serial=99999999999999999999")).is_err());
        assert!(Document::parse(&line.replace("name=app", "name=a/b"))
            .unwrap_err()
            .contains("name \"a/b\""));
        assert!(Document::parse(&line.replace("name=app", "name=")).is_err());
        assert!(Document::parse(&line.replace("name=app", "arch=app"))
            .unwrap_err()
            .contains("field 2 is not name="));
        assert!(
            Document::parse(&line.replace(&"ab".repeat(32), &"AB".repeat(32)))
                .unwrap_err()
                .contains("sha256")
        );
        assert!(Document::parse(&line.replace(&"ab".repeat(32), &"ab".repeat(31))).is_err());
        let k = key(1).id();
        assert!(Document::parse(&line.replace(&k, &k[..15]))
            .unwrap_err()
            .contains("key id"));
        // Sixteen characters a name may have, but not hex.
        assert!(Document::parse(&line.replace(&k, &"z".repeat(16)))
            .unwrap_err()
            .contains("key id"));
        assert!(Document::parse(&"x".repeat(2000))
            .unwrap_err()
            .contains("longer than 1024"));
        // The bound is inclusive: 1024 bytes get as far as the magic word.
        assert!(Document::parse(&"x".repeat(MAX_LEN))
            .unwrap_err()
            .contains("does not start"));
        assert!(Document::parse(&"x".repeat(MAX_LEN + 1))
            .unwrap_err()
            .contains("longer than 1024"));
        assert!(Document::parse(&line.replace("app", "äpp")).is_err());
        assert_eq!(
            Document::parse(&line.replace("size=1234", "size=0"))
                .unwrap()
                .size,
            0
        );
    }

    #[test]
    fn key_files_round_trip() {
        let k = key(3);
        let p = TrustedKey::parse(&k.public().file_text()).unwrap();
        assert_eq!(p, k.public());
        assert_eq!(p.id.len(), 16);
        assert_ne!(key(3).id(), key(4).id());
        assert!(TrustedKey::parse("bin-proxy-public-key-v1 00").is_err());
        assert!(TrustedKey::parse(&k.file_text())
            .unwrap_err()
            .contains("not a bin-proxy public key"));
        let dir = std::env::temp_dir().join(format!("sign-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("k"), k.file_text()).unwrap();
        assert_eq!(SecretKey::load(&dir.join("k")).unwrap().id(), k.id());
        assert!(SecretKey::load(&dir.join("missing")).is_err());
        std::fs::write(dir.join("k"), k.public().file_text()).unwrap();
        assert!(SecretKey::load(&dir.join("k")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
        let a = SecretKey::generate().unwrap();
        let b = SecretKey::generate().unwrap();
        assert_ne!(a.id(), b.id());
    }

    #[test]
    fn rotation_one_step_at_a_time() {
        let (a, b, c) = (key(1), key(2), key(3));
        let ab = a.sign_statement(Change::Trust(b.public()));
        let bc = b.sign_statement(Change::Trust(c.public()));
        let ra = b.sign_statement(Change::Revoke(a.id()));
        for s in [&ab, &bc, &ra] {
            assert_eq!(Statement::parse(&s.to_string()).as_ref(), Ok(s));
        }
        let ids = |v: Vec<TrustedKey>| v.into_iter().map(|k| k.id).collect::<Vec<_>>();
        let pinned = [a.public()];
        assert_eq!(ids(rotate(&pinned, &[]).unwrap()), [a.id()]);
        assert_eq!(
            ids(rotate(&pinned, std::slice::from_ref(&ab)).unwrap()),
            [a.id(), b.id()]
        );
        assert_eq!(
            ids(rotate(&pinned, &[ab.clone(), bc.clone(), ra.clone()]).unwrap()),
            [b.id(), c.id()]
        );
        // c before b is trusted: not one step at a time.
        let e = rotate(&pinned, &[bc.clone(), ab.clone()]).unwrap_err();
        assert!(
            e.contains(&format!(
                "statement 1 is signed by untrusted key {}",
                b.id()
            )),
            "{e}"
        );
        // A revoked key cannot be brought back.
        let back = b.sign_statement(Change::Trust(a.public()));
        let e = rotate(&pinned, &[ab.clone(), ra.clone(), back]).unwrap_err();
        assert!(e.contains("which was revoked"), "{e}");
        // Altered statement.
        let mut bad = ab.clone();
        bad.change = Change::Trust(c.public());
        assert!(rotate(&pinned, &[bad])
            .unwrap_err()
            .contains("bad signature"));
        // A build signature is not a statement and vice versa.
        assert!(Statement::parse(&doc().to_string()).is_err());
        assert!(Document::parse(&ab.to_string()).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(duration("90d"), Some(90 * 86400));
        assert_eq!(duration("12h"), Some(12 * 3600));
        assert_eq!(duration("30m"), Some(1800));
        assert_eq!(duration("45s"), Some(45));
        assert_eq!(duration("45"), Some(45));
        for bad in ["", "d", "0d", "-1d", "1w", "1.5d", "99999999999999999999d"] {
            assert_eq!(duration(bad), None, "{bad}");
        }
    }
}
