//! A server answer as the agent decodes it: `unwrap_answer` with an HTTP
//! status taken from the first byte, then `bin_info` on the data (and the
//! registry's `Node::from_json`, which reads the same kind of document).
//! Nothing may panic; a node that decodes must round-trip through `to_json`.
//! tests/fuzz_smoke.rs runs the same check on stable; keep the two in step.

#![no_main]

use bin_proxy::manager::registry::Node;
use bin_proxy::protocol;
use libfuzzer_sys::fuzz_target;

/// Indexed by the first byte's low three bits: ASCII '0' is 200, '5' is 404,
/// '6' is 500 (the seeds start with such a digit).
const STATUSES: [i32; 8] = [200, 201, 204, 301, 400, 404, 500, 502];

const URL: &str = "http://m/api/v1/bins/a";

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else {
        return;
    };
    let status = STATUSES[usize::from(first & 7)];
    match protocol::unwrap_answer(URL, status, "Reason", body) {
        Ok(v) => {
            match protocol::bin_info(URL, &v) {
                Ok(info) => assert!(info.hash.len() == 32, "{info:?}"),
                Err(e) => {
                    let _ = e.to_string();
                }
            }
            if let Ok(node) = Node::from_json(&v) {
                assert_eq!(Node::from_json(&node.to_json()), Ok(node));
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
});
