//! `Manifest::parse` on arbitrary text: it must never panic, and whatever it
//! accepts must survive `to_json` unchanged (the agent rewrites the manifest
//! after every upgrade, so a lossy round trip would corrupt operators' files).
//! tests/fuzz_smoke.rs runs the same check on stable; keep the two in step.

#![no_main]

use bin_proxy::agent::manifest::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // `Manifest::load` refuses invalid UTF-8 before parsing; the lossy
    // conversion only keeps mutated inputs useful to the parser.
    let text = String::from_utf8_lossy(data);
    if let Ok(m) = Manifest::parse(&text) {
        let json = m.to_json();
        assert_eq!(
            Manifest::parse(&json),
            Ok(m),
            "the manifest does not round-trip through:\n{json}"
        );
    }
});
