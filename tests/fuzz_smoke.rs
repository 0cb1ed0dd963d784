//! A stable, deterministic stand-in for the cargo-fuzz targets in fuzz/
//! (scripts/fuzz.sh runs those; they need nightly, so CI runs this instead).
//! A fixed-seed xorshift mutates the committed seed corpora
//! (fuzz/corpus/*/seed-*) a few thousand times per target — byte flips,
//! truncations, inserted JSON punctuation and digits, duplicated slices —
//! and feeds every input to the same checks as the fuzz targets: nothing may
//! panic, and an accepted manifest must round-trip through `to_json`.
//! A failure prints the input, so it can be added to the corpus as a seed.

use bin_proxy::agent::manifest::Manifest;
use bin_proxy::manager::registry::Node;
use bin_proxy::protocol;
use std::panic::{self, AssertUnwindSafe};

const MANIFEST_CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/manifest");
const ANSWER_CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz/corpus/answer");

/// Mutated inputs per target.
const ITERATIONS: usize = 4000;

/// As in fuzz/fuzz_targets/answer.rs.
const STATUSES: [i32; 8] = [200, 201, 204, 301, 400, 404, 500, 502];
const URL: &str = "http://m/api/v1/bins/a";

/// What fuzz/fuzz_targets/manifest.rs checks. True when the input parsed.
fn check_manifest(data: &[u8]) -> bool {
    let text = String::from_utf8_lossy(data);
    match Manifest::parse(&text) {
        Ok(m) => {
            let json = m.to_json();
            assert_eq!(
                Manifest::parse(&json),
                Ok(m),
                "the manifest does not round-trip through:\n{json}"
            );
            true
        }
        Err(_) => false,
    }
}

/// What fuzz/fuzz_targets/answer.rs checks. True when `bin_info` accepted it.
fn check_answer(data: &[u8]) -> bool {
    let Some((&first, body)) = data.split_first() else {
        return false;
    };
    let status = STATUSES[usize::from(first & 7)];
    match protocol::unwrap_answer(URL, status, "Reason", body) {
        Ok(v) => {
            if let Ok(node) = Node::from_json(&v) {
                assert_eq!(Node::from_json(&node.to_json()), Ok(node));
            }
            match protocol::bin_info(URL, &v) {
                Ok(info) => {
                    assert!(info.hash.len() == 32, "{info:?}");
                    true
                }
                Err(e) => {
                    let _ = e.to_string();
                    false
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
            false
        }
    }
}

/// Marsaglia's xorshift64: tiny, and the same sequence on every machine.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n` (`n` > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Bytes worth inserting into JSON: structure, escapes, digits.
const PUNCT: &[u8] = b"{}[]\"\\:,-+.eE0123456789 \n/u";

/// Fragments that reach the odd corners of the tokenizer and the checks.
const TOKENS: &[&[u8]] = &[
    b"null",
    b"true",
    b"\"\"",
    b"{}",
    b"[]",
    b"\\u0000",
    b"\\ud83d\\ude00",
    b"\\ud800",
    b"\\u00e9",
    b"\xc3\xa9",
    b"\xff",
    b"\0",
    b"18446744073709551616",
    b"-0.0e-7",
    b"1e999",
    b"//",
    b"/*",
    b"\"/x/a\"",
    b"\".bak\"",
    b"\"d41d8cd98f00b204e9800998ecf8427e\"",
    b"\"code\":0,",
    b"\"data\":",
];

/// Applies random mutations to `data`: usually one (so that a fair share of
/// mutants still parse and reach the deeper checks), sometimes up to eight.
fn mutate(rng: &mut XorShift, data: &mut Vec<u8>) {
    let count = if rng.below(4) == 0 {
        1 + rng.below(8)
    } else {
        1
    };
    for _ in 0..count {
        match rng.below(7) {
            // Flip one bit.
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            // Truncate.
            1 => {
                let len = rng.below(data.len() + 1);
                data.truncate(len);
            }
            // Insert punctuation or a digit.
            2 => {
                let b = PUNCT[rng.below(PUNCT.len())];
                data.insert(rng.below(data.len() + 1), b);
            }
            // Duplicate a slice somewhere else.
            3 if !data.is_empty() => {
                let start = rng.below(data.len());
                let end = start + 1 + rng.below((data.len() - start).min(64));
                let slice = data[start..end].to_vec();
                let at = rng.below(data.len() + 1);
                data.splice(at..at, slice);
            }
            // Remove a slice.
            4 if !data.is_empty() => {
                let start = rng.below(data.len());
                let end = start + 1 + rng.below((data.len() - start).min(16));
                data.drain(start..end);
            }
            // Overwrite a byte with punctuation or a digit.
            5 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = PUNCT[rng.below(PUNCT.len())];
            }
            // Insert a token.
            _ => {
                let token = TOKENS[rng.below(TOKENS.len())];
                let at = rng.below(data.len() + 1);
                data.splice(at..at, token.iter().copied());
            }
        }
    }
}

/// The committed seeds of one corpus (`seed-*`), sorted by name.
fn seeds(dir: &str) -> Vec<(String, Vec<u8>)> {
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .map(|entry| entry.unwrap().path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seed-"))
        })
        .map(|path| {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
            (name, data)
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seed-* files in {dir}");
    seeds
}

/// Runs `check` on every seed and on `ITERATIONS` mutants; a panic is
/// reported with the input that caused it. Returns how many inputs the check
/// accepted (true), out of how many.
fn run(corpus: &str, rng_seed: u64, check: fn(&[u8]) -> bool) -> (usize, usize) {
    let seeds = seeds(corpus);
    let mut rng = XorShift(rng_seed);
    let mut inputs: Vec<(String, Vec<u8>)> = seeds.clone();
    for i in 0..ITERATIONS {
        let (name, seed) = &seeds[rng.below(seeds.len())];
        let mut data = seed.clone();
        mutate(&mut rng, &mut data);
        inputs.push((format!("mutant {i} of {name}"), data));
    }
    let mut accepted = 0;
    for (what, data) in &inputs {
        match panic::catch_unwind(AssertUnwindSafe(|| check(data))) {
            Ok(true) => accepted += 1,
            Ok(false) => {}
            Err(_) => panic!(
                "{corpus}: {what} panicked (message above); the input, {} bytes:\n{:?}\nas text:\n{}",
                data.len(),
                data,
                String::from_utf8_lossy(data)
            ),
        }
    }
    eprintln!("{corpus}: {accepted} of {} inputs accepted", inputs.len());
    (accepted, inputs.len())
}

#[test]
fn manifest_parser_survives_mutated_seeds_and_round_trips() {
    for (name, data) in seeds(MANIFEST_CORPUS) {
        if !name.starts_with("seed-crash-") {
            assert!(check_manifest(&data), "seed {name} does not parse");
        }
    }
    let (accepted, total) = run(MANIFEST_CORPUS, 0x9e37_79b9_7f4a_7c15, check_manifest);
    // The round trip must actually be exercised, not just the error paths.
    assert!(accepted * 20 > total, "only {accepted} of {total} parsed");
    assert!(
        accepted < total,
        "every input parsed: the mutations do nothing"
    );
}

#[test]
fn answer_decoding_survives_mutated_seeds() {
    let (accepted, total) = run(ANSWER_CORPUS, 0xd1b5_4a32_d192_ed03, check_answer);
    assert!(accepted * 50 > total, "only {accepted} of {total} decoded");
    assert!(
        accepted < total,
        "every input decoded: the mutations do nothing"
    );
}

#[test]
fn xorshift_is_the_documented_sequence() {
    // The smoke is only reproducible if the generator never changes.
    let mut rng = XorShift(1);
    assert_eq!(
        [rng.next(), rng.next(), rng.next()],
        [
            1_082_269_761,
            1_152_992_998_833_853_505,
            11_177_516_664_432_764_457
        ]
    );
}
