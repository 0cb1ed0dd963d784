//! Hashing: the protocol's md5 (hex, lowercase), computed in one streaming
//! pass — over a file on disk, or over bytes as they are being downloaded.

use crate::error::{Error, Result};
use std::fs::File;
use std::io::Read;
use std::path::Path;

/// Read size for hashing files: large enough to amortise syscalls, small
/// enough to keep the agent's memory flat.
pub const BLOCK: usize = 256 * 1024;

/// A running md5 (RFC 1321).
///
/// Written here rather than taken from the `md5` crate (which remains the
/// tests' oracle): md5 runs on its own thread while a build downloads, so its
/// speed is the floor of every upgrade, and this one is about 1.3× the
/// crate's (BENCHMARKS.md: `examples/hashspeed.rs` against `md5sum`).
pub struct Md5 {
    state: [u32; 4],
    /// A partial block waiting for more bytes.
    pending: [u8; 64],
    pending_len: usize,
    /// Bytes fed so far.
    len: u64,
}

impl Md5 {
    /// A fresh hash.
    pub fn new() -> Md5 {
        Md5 {
            state: [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476],
            pending: [0; 64],
            pending_len: 0,
            len: 0,
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.len = self.len.wrapping_add(bytes.len() as u64);
        if self.pending_len > 0 {
            let n = bytes.len().min(64 - self.pending_len);
            self.pending[self.pending_len..self.pending_len + n].copy_from_slice(&bytes[..n]);
            self.pending_len += n;
            bytes = &bytes[n..];
            if self.pending_len < 64 {
                return;
            }
            let block = self.pending;
            compress(&mut self.state, &block);
            self.pending_len = 0;
        }
        let mut blocks = bytes.chunks_exact(64);
        for block in &mut blocks {
            compress(&mut self.state, block.try_into().expect("64 bytes"));
        }
        let rest = blocks.remainder();
        self.pending[..rest.len()].copy_from_slice(rest);
        self.pending_len = rest.len();
    }

    /// The lowercase hex digest.
    pub fn hex(mut self) -> String {
        let bits = self.len.wrapping_mul(8);
        // 0x80, zeros up to 56 bytes into a block, the length in bits.
        let pad = if self.pending_len < 56 {
            56 - self.pending_len
        } else {
            120 - self.pending_len
        };
        let mut tail = [0u8; 72];
        tail[0] = 0x80;
        tail[pad..pad + 8].copy_from_slice(&bits.to_le_bytes());
        self.update(&tail[..pad + 8]);
        let mut digest = [0u8; 16];
        for (out, word) in digest.chunks_exact_mut(4).zip(self.state) {
            out.copy_from_slice(&word.to_le_bytes());
        }
        hex(&digest)
    }
}

impl Default for Md5 {
    fn default() -> Self {
        Md5::new()
    }
}

/// The 64 additive constants: floor(abs(sin(i + 1)) × 2^32).
const K: [u32; 64] = [
    0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501,
    0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821,
    0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8,
    0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed, 0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a,
    0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70,
    0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665,
    0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
    0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb, 0xeb86d391,
];

/// One 64-byte block into the state. Each step is `a = b + rotl(a + x + k +
/// f(b, c, d), s)`; only `f` and what follows wait for the previous step's
/// result, so `a + x + k` is summed first, off that chain. The constants are
/// read through an opaque reference: as literals, the optimiser moves their
/// addition after `f`, onto the chain (measured: 0.77× the speed).
#[inline(always)]
fn compress(state: &mut [u32; 4], block: &[u8; 64]) {
    let x = |i: usize| {
        u32::from_le_bytes([
            block[4 * i],
            block[4 * i + 1],
            block[4 * i + 2],
            block[4 * i + 3],
        ])
    };
    let k: &[u32; 64] = std::hint::black_box(&K);
    let [mut a, mut b, mut c, mut d] = *state;
    // Round 1: f = (b & c) | (!b & d), as d ^ (b & (c ^ d)).
    macro_rules! r1 {
        ($a:ident, $b:ident, $c:ident, $d:ident, $i:expr, $s:expr) => {
            $a = $a
                .wrapping_add(x($i))
                .wrapping_add(k[$i])
                .wrapping_add($d ^ ($b & ($c ^ $d)))
                .rotate_left($s)
                .wrapping_add($b);
        };
    }
    // Round 2: g = (b & d) | (c & !d); the two halves never overlap, so they
    // are added one by one, the half without b first.
    macro_rules! r2 {
        ($a:ident, $b:ident, $c:ident, $d:ident, $k:expr, $i:expr, $s:expr) => {
            $a = $a
                .wrapping_add(x($i))
                .wrapping_add(k[$k])
                .wrapping_add($c & !$d)
                .wrapping_add($b & $d)
                .rotate_left($s)
                .wrapping_add($b);
        };
    }
    // Round 3: h = b ^ c ^ d.
    macro_rules! r3 {
        ($a:ident, $b:ident, $c:ident, $d:ident, $k:expr, $i:expr, $s:expr) => {
            $a = $a
                .wrapping_add(x($i))
                .wrapping_add(k[$k])
                .wrapping_add($b ^ ($c ^ $d))
                .rotate_left($s)
                .wrapping_add($b);
        };
    }
    // Round 4: i = c ^ (b | !d).
    macro_rules! r4 {
        ($a:ident, $b:ident, $c:ident, $d:ident, $k:expr, $i:expr, $s:expr) => {
            $a = $a
                .wrapping_add(x($i))
                .wrapping_add(k[$k])
                .wrapping_add($c ^ ($b | !$d))
                .rotate_left($s)
                .wrapping_add($b);
        };
    }
    r1!(a, b, c, d, 0, 7);
    r1!(d, a, b, c, 1, 12);
    r1!(c, d, a, b, 2, 17);
    r1!(b, c, d, a, 3, 22);
    r1!(a, b, c, d, 4, 7);
    r1!(d, a, b, c, 5, 12);
    r1!(c, d, a, b, 6, 17);
    r1!(b, c, d, a, 7, 22);
    r1!(a, b, c, d, 8, 7);
    r1!(d, a, b, c, 9, 12);
    r1!(c, d, a, b, 10, 17);
    r1!(b, c, d, a, 11, 22);
    r1!(a, b, c, d, 12, 7);
    r1!(d, a, b, c, 13, 12);
    r1!(c, d, a, b, 14, 17);
    r1!(b, c, d, a, 15, 22);
    r2!(a, b, c, d, 16, 1, 5);
    r2!(d, a, b, c, 17, 6, 9);
    r2!(c, d, a, b, 18, 11, 14);
    r2!(b, c, d, a, 19, 0, 20);
    r2!(a, b, c, d, 20, 5, 5);
    r2!(d, a, b, c, 21, 10, 9);
    r2!(c, d, a, b, 22, 15, 14);
    r2!(b, c, d, a, 23, 4, 20);
    r2!(a, b, c, d, 24, 9, 5);
    r2!(d, a, b, c, 25, 14, 9);
    r2!(c, d, a, b, 26, 3, 14);
    r2!(b, c, d, a, 27, 8, 20);
    r2!(a, b, c, d, 28, 13, 5);
    r2!(d, a, b, c, 29, 2, 9);
    r2!(c, d, a, b, 30, 7, 14);
    r2!(b, c, d, a, 31, 12, 20);
    r3!(a, b, c, d, 32, 5, 4);
    r3!(d, a, b, c, 33, 8, 11);
    r3!(c, d, a, b, 34, 11, 16);
    r3!(b, c, d, a, 35, 14, 23);
    r3!(a, b, c, d, 36, 1, 4);
    r3!(d, a, b, c, 37, 4, 11);
    r3!(c, d, a, b, 38, 7, 16);
    r3!(b, c, d, a, 39, 10, 23);
    r3!(a, b, c, d, 40, 13, 4);
    r3!(d, a, b, c, 41, 0, 11);
    r3!(c, d, a, b, 42, 3, 16);
    r3!(b, c, d, a, 43, 6, 23);
    r3!(a, b, c, d, 44, 9, 4);
    r3!(d, a, b, c, 45, 12, 11);
    r3!(c, d, a, b, 46, 15, 16);
    r3!(b, c, d, a, 47, 2, 23);
    r4!(a, b, c, d, 48, 0, 6);
    r4!(d, a, b, c, 49, 7, 10);
    r4!(c, d, a, b, 50, 14, 15);
    r4!(b, c, d, a, 51, 5, 21);
    r4!(a, b, c, d, 52, 12, 6);
    r4!(d, a, b, c, 53, 3, 10);
    r4!(c, d, a, b, 54, 10, 15);
    r4!(b, c, d, a, 55, 1, 21);
    r4!(a, b, c, d, 56, 8, 6);
    r4!(d, a, b, c, 57, 15, 10);
    r4!(c, d, a, b, 58, 6, 15);
    r4!(b, c, d, a, 59, 13, 21);
    r4!(a, b, c, d, 60, 4, 6);
    r4!(d, a, b, c, 61, 11, 10);
    r4!(c, d, a, b, 62, 2, 15);
    r4!(b, c, d, a, 63, 9, 21);
    for (s, v) in state.iter_mut().zip([a, b, c, d]) {
        *s = s.wrapping_add(v);
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
        hex(&self.bytes())
    }

    /// The digest's 32 bytes.
    pub fn bytes(self) -> [u8; 32] {
        sha2::Digest::finalize(self.0).into()
    }
}

impl Default for Sha256 {
    fn default() -> Self {
        Sha256::new()
    }
}

/// The md5 and sha256 of everything `reader` yields, and its length, in one pass.
pub fn digest_all(reader: impl Read, what: &Path) -> Result<(String, String, u64)> {
    let (mut md5, mut sha) = (Md5::new(), Sha256::new());
    let mut len = 0u64;
    each_block(reader, what, |block| {
        md5.update(block);
        sha.update(block);
        len += block.len() as u64;
    })?;
    Ok((md5.hex(), sha.hex(), len))
}

/// Feeds everything `reader` yields to `f`, a block at a time, until the
/// end; a read interrupted by a signal is retried, any other error names
/// `what`.
fn each_block(mut reader: impl Read, what: &Path, mut f: impl FnMut(&[u8])) -> Result<()> {
    let mut buf = vec![0u8; BLOCK];
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => f(&buf[..n]),
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
    let file = File::open(path).map_err(|e| Error::io("reading", path, e))?;
    let mut md5 = Md5::new();
    each_block(file, path, |block| md5.update(block))?;
    Ok(md5.hex())
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
    use std::fs;

    /// Yields `data` in two reads with `first` (an error) before them.
    struct Flaky {
        first: Option<std::io::ErrorKind>,
        data: Vec<u8>,
    }

    impl Read for Flaky {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if let Some(kind) = self.first.take() {
                return Err(kind.into());
            }
            let n = buf.len().min(self.data.len()).min(3);
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data.drain(..n);
            Ok(n)
        }
    }

    #[test]
    fn a_read_interrupted_by_a_signal_is_retried_and_any_other_error_named() {
        let data = b"hello world\n".to_vec();
        let what = Path::new("/the/file");
        let r = Flaky {
            first: Some(std::io::ErrorKind::Interrupted),
            data: data.clone(),
        };
        let (md5, sha, len) = digest_all(r, what).unwrap();
        assert_eq!(md5, "6f5902ac237024bdd0c176cb93063dc4");
        assert_eq!(len, 12);
        let mut s = Sha256::new();
        s.update(&data);
        assert_eq!(sha, s.hex());
        let r = Flaky {
            first: Some(std::io::ErrorKind::PermissionDenied),
            data,
        };
        let e = digest_all(r, what).unwrap_err().to_string();
        assert!(e.contains("/the/file"), "{e}");
    }

    #[test]
    fn md5_file_reads_the_whole_file_and_names_a_missing_one() {
        let dir = std::env::temp_dir().join(format!("bin-proxy-md5file-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("big");
        // More than one block, and not a whole number of them.
        let data: Vec<u8> = (0..BLOCK * 2 + 7).map(|i| (i * 31 % 251) as u8).collect();
        fs::write(&path, &data).unwrap();
        let mut h = Md5::new();
        h.update(&data);
        assert_eq!(md5_file(&path).unwrap(), h.hex());
        assert_ne!(md5_file(&path).unwrap(), Md5::new().hex());
        let missing = dir.join("missing");
        let e = md5_file(&missing).unwrap_err().to_string();
        assert!(e.contains("missing"), "{e}");
        assert!(md5_file(&dir).is_err(), "a directory is not a file to hash");
        fs::remove_dir_all(&dir).unwrap();
    }

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
    fn md5_matches_the_rfc_and_the_md5_crate() {
        // RFC 1321, appendix A.5.
        for (input, want) in [
            ("", "d41d8cd98f00b204e9800998ecf8427e"),
            ("a", "0cc175b9c0f1b6a831c399e269772661"),
            ("abc", "900150983cd24fb0d6963f7d28e17f72"),
            ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
            (
                "abcdefghijklmnopqrstuvwxyz",
                "c3fcd3d76192e4007dfb496cca67e13b",
            ),
            (
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789",
                "d174ab98d277d9f5a5611c2c9f419d9f",
            ),
            (
                "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "57edf4a22be3c955ac49da2e2107b67a",
            ),
        ] {
            let mut h = Md5::new();
            h.update(input.as_bytes());
            assert_eq!(h.hex(), want, "{input:?}");
        }
        // Every length around the block and padding edges, fed whole and in
        // uneven pieces, against the md5 crate.
        let data: Vec<u8> = (0u32..1100)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        for len in (0..200).chain([511, 512, 513, 1000, 1099]) {
            let want = format!("{:x}", md5::compute(&data[..len]));
            let mut whole = Md5::new();
            whole.update(&data[..len]);
            assert_eq!(whole.hex(), want, "length {len}, whole");
            for piece in [1, 3, 63, 64, 65, 127] {
                let mut h = Md5::new();
                for chunk in data[..len].chunks(piece) {
                    h.update(chunk);
                }
                assert_eq!(h.hex(), want, "length {len}, pieces of {piece}");
            }
        }
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
