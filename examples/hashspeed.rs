//! The agent's hashes on their own (run by `scripts/bench/agent.sh`): one
//! pass of md5 (the `md5` crate, through `bin_proxy::hash`, as the agent
//! computes it while downloading) or sha256 over a file, read in the agent's
//! block size. This is the floor of an upgrade: the agent hashes md5 on its
//! own thread while the download runs, so an upgrade cannot beat it.
//!
//! Usage: hashspeed md5|sha256 FILE (prints the digest)

use bin_proxy::hash::{Md5, Sha256, BLOCK};
use std::io::Read;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [algo, path] = args.as_slice() else {
        eprintln!("usage: hashspeed md5|sha256 FILE");
        std::process::exit(2);
    };
    let mut file = std::fs::File::open(path).unwrap_or_else(|e| {
        eprintln!("hashspeed: {path}: {e}");
        std::process::exit(1);
    });
    let mut buf = vec![0u8; BLOCK];
    let mut feed = |update: &mut dyn FnMut(&[u8])| loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("hashspeed: reading {path}: {e}");
                std::process::exit(1);
            }
        }
    };
    let digest = match algo.as_str() {
        "md5" => {
            let mut h = Md5::new();
            feed(&mut |b| h.update(b));
            h.hex()
        }
        "sha256" => {
            let mut h = Sha256::new();
            feed(&mut |b| h.update(b));
            h.hex()
        }
        _ => {
            eprintln!("hashspeed: unknown hash {algo:?} (md5 or sha256)");
            std::process::exit(2);
        }
    };
    println!("{digest}  {path}");
}
