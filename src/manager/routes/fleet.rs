//! The fleet view (`GET /api/v1/nodes`): every node, what it runs, and
//! where each binary stands against what it should run — `current`,
//! `behind`, `failed` (its failure names that build) or `unpublished` —
//! with its labels, failures, and whether it is `pending` admission.

use super::App;
use crate::json::Value;
use crate::log;
use crate::manager::http::Response;
use crate::manager::registry::Node;
use crate::manager::rollout::Rollout;
use crate::manager::store::valid_name;
use crate::protocol::{self, BinaryFact, FailureFact};
use std::collections::HashMap;

/// The most nodes one answer of `GET nodes` holds (about 60 MB at 50
/// binaries a node).
const MAX_PAGE: usize = 10_000;

impl App {
    /// The fleet view, written as text in two passes over the registry
    /// (counts for the summary, then the nodes, each with its binaries,
    /// labels and failures) with no document tree: at 10,000 nodes × 50
    /// binaries the answer is 60 MB, and a tree of it would take several
    /// times that.
    ///
    /// Paged by name: `?limit=N&after=NAME` answers at most N nodes (at most
    /// [`MAX_PAGE`]) whose names sort after NAME, and `next`, the cursor of
    /// the following page (`null` on the last). Without `limit` the answer
    /// is today's whole fleet, capped at [`MAX_PAGE`] nodes (with `next`
    /// when cut). The summary always counts the whole fleet.
    pub(super) fn nodes(&self, pairs: &[(String, String)]) -> Response {
        let param = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let limit = match param("limit").map(str::parse::<usize>) {
            None => MAX_PAGE,
            Some(Ok(n)) if (1..=MAX_PAGE).contains(&n) => n,
            Some(_) => {
                return super::fail(
                    400,
                    &format!("invalid limit: expected a number from 1 to {MAX_PAGE}"),
                )
            }
        };
        let all = self.registry.nodes();
        let start =
            param("after").map_or(0, |after| all.partition_point(|n| n.name.as_str() <= after));
        let page = &all[start..all.len().min(start.saturating_add(limit))];
        let next = (start + page.len() < all.len())
            .then(|| page.last().map(|n| n.name.clone()))
            .flatten();
        let nodes = all.as_slice();
        // One lookup per (binary, arch, version), however many nodes share it.
        let mut published = HashMap::new();
        let (mut current, mut behind, mut failed) = (0u64, 0u64, 0u64);
        let pending = nodes.iter().filter(|n| n.pending).count();
        for node in nodes {
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
        let now = crate::manager::release::now();
        let body = protocol::envelope_with(200, "Success", |out| {
            out.push_str("{\"summary\":");
            summary.write_compact(out);
            out.push_str(",\"next\":");
            next.map_or(Value::Null, Value::Str).write_compact(out);
            out.push_str(",\"nodes\":[");
            for (i, node) in page.iter().enumerate() {
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
                    crate::manager::legacy::annotate(
                        node.legacy.get(&b.name),
                        status,
                        now,
                        &mut entry,
                    );
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
                    (
                        "labels",
                        Value::obj(node.labels.iter().map(|(k, v)| (k.clone(), Value::str(v)))),
                    ),
                    (
                        "failures",
                        Value::Arr(node.failures.iter().map(FailureFact::to_json).collect()),
                    ),
                ])
                .write_compact(out);
            }
            out.push_str("]}");
        });
        let mut resp = Response::json(200, body);
        // The clock lastSeen is written by: the console tells silent nodes
        // by it, not by the browser's clock.
        resp.headers
            .push(("Date", log::http_date(std::time::SystemTime::now())));
        resp
    }

    /// Where one binary of a node stands: "current", "behind", "failed" (its
    /// failure names the published build) or "unpublished"; with the
    /// published md5 and the failure.
    fn standing<'n>(
        &self,
        node: &'n Node,
        b: &BinaryFact,
        published: &mut Published,
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
                let build = self.store.get(&b.name, arch, pinned).ok().flatten()?;
                let key = crate::manager::rollout::key(&b.name, build.arch_dir.as_deref());
                let governing = self
                    .registry
                    .rollout(&key)
                    .filter(|r| r.staged && pinned.is_none())
                    .filter(|r| r.state != crate::manager::rollout::State::Done)
                    .filter(|r| crate::hash::same(&r.to.md5, &build.md5));
                Some((build.md5, governing))
            })
            .as_ref()
            .map(|(md5, governing)| match governing {
                // During a rollout a node should run what the rollout gives it.
                Some(r) => match r.choose(
                    &crate::manager::release::view(node, r),
                    crate::manager::release::now(),
                ) {
                    crate::manager::rollout::Choice::To => r.to.md5.clone(),
                    crate::manager::rollout::Choice::From => r.from.md5.clone(),
                },
                None => md5.clone(),
            });
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
            (Some(w), None) if crate::manager::legacy::failed(node.legacy.get(&b.name), w) => {
                "failed"
            }
            (Some(_), None) => "behind",
        };
        (status, want, failure)
    }
}

/// Per (binary, arch, pinned version): the published md5 and the rollout
/// that governs it, looked up once however many nodes share them.
type Published = HashMap<(String, String, String), Option<(String, Option<Rollout>)>>;

fn pinned(b: &BinaryFact) -> Option<&str> {
    Some(b.version.as_str()).filter(|v| !v.is_empty() && *v != "latest")
}
