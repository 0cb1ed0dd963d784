//! The fleet view (`GET /api/v1/nodes`): every node, what it runs, and
//! where each binary stands against what is published — `current`,
//! `behind`, `failed` (its failure names the published build) or
//! `unpublished` — plus whether the node is `pending` admission.

use super::http::Response;
use super::registry::Node;
use super::routes::App;
use super::store::valid_name;
use crate::json::Value;
use crate::protocol::{self, BinaryFact, FailureFact};
use std::collections::HashMap;

impl App {
    /// The fleet view, written as text in two passes over the registry
    /// (counts for the summary, then the nodes) with no document tree: at
    /// 10,000 nodes × 50 binaries the answer is 60 MB, and a tree of it
    /// would take several times that.
    pub(super) fn nodes(&self) -> Response {
        let nodes = self.registry.nodes();
        // One lookup per (binary, arch, version), however many nodes share it.
        let mut published = HashMap::new();
        let (mut current, mut behind, mut failed) = (0u64, 0u64, 0u64);
        let pending = nodes.iter().filter(|n| n.pending).count();
        for node in &nodes {
            for b in &node.binaries {
                match self.standing(node, b, &mut published).0 {
                    "current" => current += 1,
                    "behind" => behind += 1,
                    "failed" => failed += 1,
                    _ => {}
                }
            }
        }
        let summary = Value::obj([
            ("nodes", Value::int(nodes.len() as u64)),
            ("current", Value::int(current)),
            ("behind", Value::int(behind)),
            ("failed", Value::int(failed)),
            ("pending", Value::int(pending as u64)),
        ]);
        let body = protocol::envelope_with(200, "Success", |out| {
            out.push_str("{\"summary\":");
            summary.write_compact(out);
            out.push_str(",\"nodes\":[");
            for (i, node) in nodes.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let bins = node.binaries.iter().map(|b| {
                    let (status, want, failure) = self.standing(node, b, &mut published);
                    let mut entry = vec![
                        ("name", Value::str(&b.name)),
                        ("version", Value::str(&b.version)),
                        ("hash", Value::str(&b.hash)),
                        ("published", want.map_or(Value::Null, Value::Str)),
                        ("status", Value::str(status)),
                    ];
                    if let Some(f) = failure {
                        entry.push(("error", Value::str(&f.error)));
                    }
                    Value::obj(entry)
                });
                Value::obj([
                    ("name", Value::str(&node.name)),
                    ("cpuArch", Value::str(&node.cpu_arch)),
                    ("osRelease", Value::str(&node.os_release)),
                    ("proxyVersion", Value::str(&node.proxy_version)),
                    ("lastSeen", Value::str(&node.last_seen)),
                    (
                        "admission",
                        Value::str(if node.pending { "pending" } else { "accepted" }),
                    ),
                    ("binaries", Value::Arr(bins.collect())),
                ])
                .write_compact(out);
            }
            out.push_str("]}");
        });
        Response::json(200, body)
    }

    /// Where one binary of a node stands: "current", "behind", "failed" (its
    /// failure names the published build) or "unpublished"; with the
    /// published md5 and the failure.
    fn standing<'n>(
        &self,
        node: &'n Node,
        b: &BinaryFact,
        published: &mut HashMap<(String, String, String), Option<String>>,
    ) -> (&'static str, Option<String>, Option<&'n FailureFact>) {
        let pinned = pinned(b);
        let key = (
            b.name.clone(),
            node.cpu_arch.clone(),
            pinned.unwrap_or("").to_string(),
        );
        let want = published
            .entry(key)
            .or_insert_with(|| {
                let arch = Some(node.cpu_arch.as_str()).filter(|a| valid_name(a));
                if !valid_name(&b.name) || pinned.is_some_and(|v| !valid_name(v)) {
                    return None;
                }
                self.store
                    .get(&b.name, arch, pinned)
                    .ok()
                    .flatten()
                    .map(|build| build.md5)
            })
            .clone();
        let failure = node.failures.iter().find(|f| {
            f.name == b.name
                && want
                    .as_deref()
                    .is_some_and(|w| f.hash.eq_ignore_ascii_case(w))
        });
        let status = match (&want, failure) {
            (None, _) => "unpublished",
            (Some(_), Some(_)) => "failed",
            (Some(w), None) if w.eq_ignore_ascii_case(&b.hash) => "current",
            (Some(_), None) => "behind",
        };
        (status, want, failure)
    }
}

fn pinned(b: &BinaryFact) -> Option<&str> {
    Some(b.version.as_str()).filter(|v| !v.is_empty() && *v != "latest")
}
